using System.Buffers.Binary;
using System.Runtime.InteropServices;

namespace VhostBackend.Nvme.Tcp;

/// <summary>NVMe/TCP PDU types (NVMe/TCP transport specification 1.0, 3.6).</summary>
public static class NvmeTcpPduType
{
    public const byte IcReq = 0x00;
    public const byte IcResp = 0x01;
    public const byte H2CTermReq = 0x02;
    public const byte C2HTermReq = 0x03;
    public const byte CapsuleCmd = 0x04;
    public const byte CapsuleResp = 0x05;
    public const byte H2CData = 0x06;
    public const byte C2HData = 0x07;
    public const byte R2T = 0x09;
}

/// <summary>Common-header flags.</summary>
public static class NvmeTcpFlags
{
    public const byte HeaderDigest = 0x01;
    public const byte DataDigest = 0x02;

    /// <summary>H2CData/C2HData: the last data PDU of the command (or of the R2T).</summary>
    public const byte LastPdu = 0x04;

    /// <summary>C2HData: the command succeeded; no CapsuleResp follows (only with <see cref="LastPdu"/>).</summary>
    public const byte Success = 0x08;
}

/// <summary>Fatal error status of a termination request (H2CTermReq/C2HTermReq FES).</summary>
public enum NvmeTcpFes : ushort
{
    None = 0,
    InvalidHeaderField = 0x01,
    PduSequenceError = 0x02,
    HeaderDigestError = 0x03,
    DataTransferOutOfRange = 0x04,
    DataTransferLimitExceeded = 0x05,
    UnsupportedParameter = 0x06,
}

/// <summary>What a validated PDU header says (see <see cref="NvmeTcpPdu.ValidateHeader"/>).</summary>
[StructLayout(LayoutKind.Auto)]
public struct NvmeTcpPduInfo
{
    public byte Type;
    public byte Flags;

    /// <summary>hlen plus the header digest when present: bytes of the header on the wire.</summary>
    public int HeaderBytes;

    /// <summary>PDU data offset (pdo): where the data starts, from the start of the PDU; 0 when there is none.</summary>
    public int DataOffset;

    /// <summary>Bytes of data (without padding and digest).</summary>
    public int DataLength;

    /// <summary>Total PDU length (plen).</summary>
    public int Length;

    /// <summary>A data digest follows the data.</summary>
    public readonly bool HasDataDigest => (Flags & NvmeTcpFlags.DataDigest) != 0 && DataLength > 0;
}

/// <summary>
/// NVMe/TCP PDU layout and codec, shared by the initiator (this driver) and a target: the common header, the fixed
/// header of each PDU type, builders that write them, and <see cref="ValidateHeader"/>, which checks a received
/// header against the negotiated digests and limits before anything in it is used. No allocation; every method works
/// on caller-provided spans (a PDU's header fits in <see cref="MaxHeaderBytes"/>).
/// </summary>
public static class NvmeTcpPdu
{
    public const int CommonHeaderSize = 8;
    public const int IcSize = 128;
    public const int CapsuleCmdHlen = 72;
    public const int CapsuleRespHlen = 24;
    public const int DataHlen = 24;
    public const int R2THlen = 24;
    public const int TermReqHlen = 24;
    public const int DigestSize = 4;
    public const int TermReqMaxErrorData = 128;
    public const int MaxPda = 31;

    /// <summary>The largest header (an ICReq/ICResp: 128 bytes; a capsule command with its digest and the widest padding is 76 + 128).</summary>
    public const int MaxHeaderBytes = CapsuleCmdHlen + DigestSize + ((MaxPda + 1) * 4);

    // Common header accessors.
    public static byte Type(ReadOnlySpan<byte> pdu) => pdu[0];
    public static byte Flags(ReadOnlySpan<byte> pdu) => pdu[1];
    public static byte Hlen(ReadOnlySpan<byte> pdu) => pdu[2];
    public static byte Pdo(ReadOnlySpan<byte> pdu) => pdu[3];
    public static uint Plen(ReadOnlySpan<byte> pdu) => BinaryPrimitives.ReadUInt32LittleEndian(pdu[4..]);

    // Fields of the data PDUs (H2CData, C2HData) and R2T: cccid at 8, ttag at 10, offset at 12, length at 16.
    public static ushort Cccid(ReadOnlySpan<byte> pdu) => BinaryPrimitives.ReadUInt16LittleEndian(pdu[8..]);
    public static ushort Ttag(ReadOnlySpan<byte> pdu) => BinaryPrimitives.ReadUInt16LittleEndian(pdu[10..]);
    public static uint DataOffsetField(ReadOnlySpan<byte> pdu) => BinaryPrimitives.ReadUInt32LittleEndian(pdu[12..]);
    public static uint DataLengthField(ReadOnlySpan<byte> pdu) => BinaryPrimitives.ReadUInt32LittleEndian(pdu[16..]);

    // ICReq/ICResp fields.
    public static ushort Pfv(ReadOnlySpan<byte> pdu) => BinaryPrimitives.ReadUInt16LittleEndian(pdu[8..]);
    public static byte IcPda(ReadOnlySpan<byte> pdu) => pdu[10];
    public static byte IcDigests(ReadOnlySpan<byte> pdu) => pdu[11];
    public static uint IcMax(ReadOnlySpan<byte> pdu) => BinaryPrimitives.ReadUInt32LittleEndian(pdu[12..]);

    // Termination request fields.
    public static NvmeTcpFes TermFes(ReadOnlySpan<byte> pdu) => (NvmeTcpFes)BinaryPrimitives.ReadUInt16LittleEndian(pdu[8..]);
    public static uint TermFei(ReadOnlySpan<byte> pdu) => BinaryPrimitives.ReadUInt32LittleEndian(pdu[10..]);

    /// <summary>The 64-byte command of a CapsuleCmd (a target's view).</summary>
    public static NvmeCommand CapsuleCommand(ReadOnlySpan<byte> pdu) => MemoryMarshal.Read<NvmeCommand>(pdu[CommonHeaderSize..]);

    /// <summary>The 16-byte completion of a CapsuleResp.</summary>
    public static NvmeCompletion CapsuleCompletion(ReadOnlySpan<byte> pdu) => MemoryMarshal.Read<NvmeCompletion>(pdu[CommonHeaderSize..]);

    /// <summary>ICReq MAXR2T (0's based: outstanding R2Ts per command the host accepts, minus one).</summary>
    public static uint IcMaxR2T(ReadOnlySpan<byte> pdu) => IcMax(pdu);

    /// <summary>The data offset for a PDU whose header ends at <paramref name="headerBytes"/>, aligned to (pda+1)*4.</summary>
    public static int AlignedDataOffset(int headerBytes, int pda)
    {
        int a = (pda + 1) * 4;
        return (headerBytes + a - 1) / a * a;
    }

    public static void WriteCommon(Span<byte> pdu, byte type, byte flags, byte hlen, byte pdo, uint plen)
    {
        pdu[0] = type;
        pdu[1] = flags;
        pdu[2] = hlen;
        pdu[3] = pdo;
        BinaryPrimitives.WriteUInt32LittleEndian(pdu[4..], plen);
    }

    /// <summary>ICReq (128 bytes): PFV 0, host PDU data alignment, requested digests, MAXR2T (0's based).</summary>
    public static int WriteIcReq(Span<byte> pdu, int hpda, bool hdgst, bool ddgst, uint maxR2T)
    {
        pdu[..IcSize].Clear();
        WriteCommon(pdu, NvmeTcpPduType.IcReq, 0, IcSize, 0, IcSize);
        pdu[10] = (byte)hpda;
        pdu[11] = (byte)((hdgst ? 1 : 0) | (ddgst ? 2 : 0));
        BinaryPrimitives.WriteUInt32LittleEndian(pdu[12..], maxR2T);
        return IcSize;
    }

    /// <summary>ICResp (128 bytes, a target's answer): controller PDU data alignment, enabled digests, MAXH2CDATA.</summary>
    public static int WriteIcResp(Span<byte> pdu, int cpda, bool hdgst, bool ddgst, uint maxH2CData)
    {
        pdu[..IcSize].Clear();
        WriteCommon(pdu, NvmeTcpPduType.IcResp, 0, IcSize, 0, IcSize);
        pdu[10] = (byte)cpda;
        pdu[11] = (byte)((hdgst ? 1 : 0) | (ddgst ? 2 : 0));
        BinaryPrimitives.WriteUInt32LittleEndian(pdu[12..], maxH2CData);
        return IcSize;
    }

    private static int FinishHeader(Span<byte> pdu, byte type, bool hdgst, bool ddgst, int hlen, int pda, int dataLength)
    {
        int hb = hlen + (hdgst ? DigestSize : 0);
        int pdo = dataLength > 0 ? AlignedDataOffset(hb, pda) : 0;
        int plen = dataLength > 0 ? pdo + dataLength + (ddgst ? DigestSize : 0) : hb;
        byte flags = (byte)((hdgst ? NvmeTcpFlags.HeaderDigest : 0) | (ddgst && dataLength > 0 ? NvmeTcpFlags.DataDigest : 0) | pdu[1]);
        WriteCommon(pdu, type, flags, (byte)hlen, (byte)pdo, (uint)plen);
        int end = dataLength > 0 ? pdo : hb;
        if (hdgst)
        {
            BinaryPrimitives.WriteUInt32LittleEndian(pdu[hlen..], Crc32C.Compute(pdu[..hlen]));
        }

        pdu[hb..end].Clear(); // padding up to the data
        return end;
    }

    /// <summary>
    /// A CapsuleCmd header: common header, the 64-byte command, the header digest, padding to the controller's PDA.
    /// The caller sends <paramref name="dataLength"/> bytes of in-capsule data after it (and their digest when
    /// <paramref name="ddgst"/>). Returns the header's length on the wire (the data offset when there is data).
    /// </summary>
    public static int WriteCapsuleCmd(Span<byte> pdu, in NvmeCommand cmd, bool hdgst, bool ddgst, int cpda, int dataLength)
    {
        pdu[1] = 0;
        MemoryMarshal.Write(pdu[CommonHeaderSize..], in cmd);
        return FinishHeader(pdu, NvmeTcpPduType.CapsuleCmd, hdgst, ddgst, CapsuleCmdHlen, cpda, dataLength);
    }

    /// <summary>A CapsuleResp (a target's): the 16-byte completion. Returns its length on the wire.</summary>
    public static int WriteCapsuleResp(Span<byte> pdu, in NvmeCompletion cqe, bool hdgst)
    {
        pdu[1] = 0;
        MemoryMarshal.Write(pdu[CommonHeaderSize..], in cqe);
        return FinishHeader(pdu, NvmeTcpPduType.CapsuleResp, hdgst, false, CapsuleRespHlen, 0, 0);
    }

    private static int WriteDataPdu(Span<byte> pdu, byte type, byte extraFlags, ushort cccid, ushort ttag, uint offset, uint length, bool hdgst, bool ddgst, int pda)
    {
        pdu[1] = extraFlags;
        BinaryPrimitives.WriteUInt16LittleEndian(pdu[8..], cccid);
        BinaryPrimitives.WriteUInt16LittleEndian(pdu[10..], ttag);
        BinaryPrimitives.WriteUInt32LittleEndian(pdu[12..], offset);
        BinaryPrimitives.WriteUInt32LittleEndian(pdu[16..], length);
        pdu.Slice(20, 4).Clear();
        return FinishHeader(pdu, type, hdgst, ddgst, DataHlen, pda, (int)length);
    }

    /// <summary>An H2CData header for <paramref name="length"/> bytes at <paramref name="offset"/> of the command's data, answering the R2T with <paramref name="ttag"/>.</summary>
    public static int WriteH2CData(Span<byte> pdu, ushort cccid, ushort ttag, uint offset, uint length, bool last, bool hdgst, bool ddgst, int cpda) =>
        WriteDataPdu(pdu, NvmeTcpPduType.H2CData, last ? NvmeTcpFlags.LastPdu : (byte)0, cccid, ttag, offset, length, hdgst, ddgst, cpda);

    /// <summary>A C2HData header (a target's).</summary>
    public static int WriteC2HData(Span<byte> pdu, ushort cccid, uint offset, uint length, bool last, bool success, bool hdgst, bool ddgst, int hpda) =>
        WriteDataPdu(pdu, NvmeTcpPduType.C2HData, (byte)((last ? NvmeTcpFlags.LastPdu : 0) | (success ? NvmeTcpFlags.Success : 0)), cccid, 0, offset, length, hdgst, ddgst, hpda);

    /// <summary>An R2T (a target's): send <paramref name="length"/> bytes at <paramref name="offset"/> tagged <paramref name="ttag"/>.</summary>
    public static int WriteR2T(Span<byte> pdu, ushort cccid, ushort ttag, uint offset, uint length, bool hdgst)
    {
        pdu[1] = 0;
        BinaryPrimitives.WriteUInt16LittleEndian(pdu[8..], cccid);
        BinaryPrimitives.WriteUInt16LittleEndian(pdu[10..], ttag);
        BinaryPrimitives.WriteUInt32LittleEndian(pdu[12..], offset);
        BinaryPrimitives.WriteUInt32LittleEndian(pdu[16..], length);
        pdu.Slice(20, 4).Clear();
        return FinishHeader(pdu, NvmeTcpPduType.R2T, hdgst, false, R2THlen, 0, 0);
    }

    /// <summary>
    /// A termination request (H2CTermReq from a host, C2HTermReq from a controller) carrying up to 128 bytes of the
    /// offending PDU's header. Returns its length (no digests on termination requests).
    /// </summary>
    public static int WriteTermReq(Span<byte> pdu, bool fromHost, NvmeTcpFes fes, uint fei, ReadOnlySpan<byte> offendingHeader)
    {
        int n = Math.Min(offendingHeader.Length, TermReqMaxErrorData);
        WriteCommon(pdu, fromHost ? NvmeTcpPduType.H2CTermReq : NvmeTcpPduType.C2HTermReq, 0, TermReqHlen, 0, (uint)(TermReqHlen + n));
        BinaryPrimitives.WriteUInt16LittleEndian(pdu[8..], (ushort)fes);
        BinaryPrimitives.WriteUInt32LittleEndian(pdu[10..], fei);
        pdu.Slice(14, 10).Clear();
        offendingHeader[..n].CopyTo(pdu[TermReqHlen..]);
        return TermReqHlen + n;
    }

    /// <summary>The fixed hlen of a PDU type, or 0 for an unknown type.</summary>
    public static int HlenOf(byte type) => type switch
    {
        NvmeTcpPduType.IcReq or NvmeTcpPduType.IcResp => IcSize,
        NvmeTcpPduType.H2CTermReq or NvmeTcpPduType.C2HTermReq => TermReqHlen,
        NvmeTcpPduType.CapsuleCmd => CapsuleCmdHlen,
        NvmeTcpPduType.CapsuleResp => CapsuleRespHlen,
        NvmeTcpPduType.H2CData or NvmeTcpPduType.C2HData => DataHlen,
        NvmeTcpPduType.R2T => R2THlen,
        _ => 0,
    };

    /// <summary>
    /// Checks a received common header (8 bytes) before the rest of the PDU is read: a type this side may receive
    /// (<paramref name="fromController"/>: a host receives ICResp, CapsuleResp, C2HData, R2T, C2HTermReq; a target the
    /// H2C types), its fixed hlen, digest flags equal to what was negotiated (<paramref name="hdgst"/>,
    /// <paramref name="ddgst"/>; not before the connection is initialized, <paramref name="initialized"/>), pdo and plen
    /// consistent with them, and data no longer than <paramref name="maxData"/>. On failure returns the termination
    /// request's FES and puts the offending field's byte offset in <paramref name="errorOffset"/>.
    /// </summary>
    public static NvmeTcpFes ValidateHeader(ReadOnlySpan<byte> ch, bool fromController, bool initialized, bool hdgst, bool ddgst, int maxData, out NvmeTcpPduInfo info, out int errorOffset)
    {
        info = default;
        errorOffset = 0;
        byte type = ch[0];
        byte flags = ch[1];
        int hlen = ch[2];
        int pdo = ch[3];
        uint plen = Plen(ch);
        info.Type = type;
        info.Flags = flags;

        bool allowed = fromController
            ? type is NvmeTcpPduType.IcResp or NvmeTcpPduType.C2HTermReq or NvmeTcpPduType.CapsuleResp or NvmeTcpPduType.C2HData or NvmeTcpPduType.R2T
            : type is NvmeTcpPduType.IcReq or NvmeTcpPduType.H2CTermReq or NvmeTcpPduType.CapsuleCmd or NvmeTcpPduType.H2CData;
        if (!allowed)
        {
            return NvmeTcpFes.InvalidHeaderField; // offset 0: pdu type
        }

        bool isIc = type is NvmeTcpPduType.IcReq or NvmeTcpPduType.IcResp;
        bool isTerm = type is NvmeTcpPduType.C2HTermReq or NvmeTcpPduType.H2CTermReq;
        if (isIc == initialized && !isTerm)
        {
            return NvmeTcpFes.PduSequenceError; // IC before anything else, exactly once
        }

        if (hlen != HlenOf(type))
        {
            errorOffset = 2;
            return NvmeTcpFes.InvalidHeaderField;
        }

        if (isIc || isTerm)
        {
            // No digests, no data offset; ICs are exactly 128 bytes, term requests carry up to 128 bytes of error data.
            if (flags != 0)
            {
                errorOffset = 1;
                return NvmeTcpFes.InvalidHeaderField;
            }

            if (pdo != 0)
            {
                errorOffset = 3;
                return NvmeTcpFes.InvalidHeaderField;
            }

            if (isIc ? plen != IcSize : plen < TermReqHlen || plen > TermReqHlen + TermReqMaxErrorData)
            {
                errorOffset = 4;
                return NvmeTcpFes.InvalidHeaderField;
            }

            info.HeaderBytes = hlen;
            info.DataOffset = isTerm && plen > TermReqHlen ? TermReqHlen : 0;
            info.DataLength = (int)plen - hlen;
            info.Length = (int)plen;
            return NvmeTcpFes.None;
        }

        bool carriesData = type is NvmeTcpPduType.C2HData or NvmeTcpPduType.H2CData or NvmeTcpPduType.CapsuleCmd;
        byte known = (byte)(NvmeTcpFlags.HeaderDigest | NvmeTcpFlags.DataDigest
            | (type is NvmeTcpPduType.C2HData ? NvmeTcpFlags.LastPdu | NvmeTcpFlags.Success : 0)
            | (type is NvmeTcpPduType.H2CData ? NvmeTcpFlags.LastPdu : 0));
        if ((flags & ~known) != 0
            || ((flags & NvmeTcpFlags.HeaderDigest) != 0) != hdgst
            || (type is NvmeTcpPduType.C2HData && (flags & NvmeTcpFlags.Success) != 0 && (flags & NvmeTcpFlags.LastPdu) == 0))
        {
            errorOffset = 1;
            return NvmeTcpFes.InvalidHeaderField;
        }

        int hb = hlen + (hdgst ? DigestSize : 0);
        info.HeaderBytes = hb;
        info.Length = (int)Math.Min(plen, int.MaxValue);
        if (!carriesData || plen == hb)
        {
            // No data: no data digest flag, no data offset, plen is the header.
            if (type is NvmeTcpPduType.C2HData or NvmeTcpPduType.H2CData)
            {
                errorOffset = 4; // a data PDU without data
                return NvmeTcpFes.InvalidHeaderField;
            }

            if ((flags & NvmeTcpFlags.DataDigest) != 0 || pdo != 0)
            {
                errorOffset = (flags & NvmeTcpFlags.DataDigest) != 0 ? 1 : 3;
                return NvmeTcpFes.InvalidHeaderField;
            }

            if (plen != hb)
            {
                errorOffset = 4;
                return NvmeTcpFes.InvalidHeaderField;
            }

            return NvmeTcpFes.None;
        }

        if (((flags & NvmeTcpFlags.DataDigest) != 0) != ddgst)
        {
            errorOffset = 1;
            return NvmeTcpFes.InvalidHeaderField;
        }

        int dd = ddgst ? DigestSize : 0;
        if (pdo < hb || pdo > hb + ((MaxPda + 1) * 4) || plen < (uint)(pdo + dd) + 1)
        {
            errorOffset = pdo < hb || pdo > hb + ((MaxPda + 1) * 4) ? 3 : 4;
            return NvmeTcpFes.InvalidHeaderField;
        }

        long dataLen = plen - (long)pdo - dd;
        if (dataLen > maxData)
        {
            errorOffset = 4;
            return NvmeTcpFes.DataTransferLimitExceeded;
        }

        info.DataOffset = pdo;
        info.DataLength = (int)dataLen;
        return NvmeTcpFes.None;
    }

    /// <summary>Checks the header digest of a received header whose first <paramref name="hlen"/> bytes are followed by the digest.</summary>
    public static bool CheckHeaderDigest(ReadOnlySpan<byte> header, int hlen) =>
        BinaryPrimitives.ReadUInt32LittleEndian(header[hlen..]) == Crc32C.Compute(header[..hlen]);
}
