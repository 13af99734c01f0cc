using System.Buffers.Binary;
using System.Net;
using System.Net.Sockets;
using System.Runtime.InteropServices;
using VhostBackend.Nvme;
using VhostBackend.Nvme.Tcp;

namespace VhostBackend.Nvmf.Tests;

/// <summary>A received PDU: its header bytes (with digest and padding) and its data.</summary>
public sealed record ModelPdu(byte Type, byte Flags, byte[] Header, byte[] Data)
{
    public NvmeCompletion Completion => NvmeTcpPdu.CapsuleCompletion(Header);
    public ushort Status => (ushort)(Completion.StatusPhase >> 1);
}

/// <summary>
/// An in-process NVMe/TCP HOST MODEL for the target's tests (not a real initiator): a blocking loopback socket that
/// writes PDUs exactly as the test asks (well-formed or not) and reads what the target sends. Digests are computed
/// when negotiated unless a test corrupts them on purpose.
/// </summary>
public sealed class NvmfHostModel : IDisposable
{
    public const string HostNqn = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555";
    private readonly Socket _s;
    private ushort _cid;

    public NvmfHostModel(int port)
    {
        _s = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp) { NoDelay = true, ReceiveTimeout = 10000, SendTimeout = 10000 };
        _s.Connect(new IPEndPoint(IPAddress.Loopback, port));
    }

    public IPEndPoint LocalEndPoint => (IPEndPoint)_s.LocalEndPoint!;

    /// <summary>The next PDU, or null when none starts within <paramref name="ms"/>.</summary>
    public ModelPdu? TryReadPdu(int ms)
    {
        if (!_s.Poll(ms * 1000, SelectMode.SelectRead))
        {
            return null;
        }

        return ReadPdu();
    }

    public bool Hdgst { get; private set; }
    public bool Ddgst { get; private set; }
    public uint MaxH2CData { get; private set; }

    public void Send(ReadOnlySpan<byte> b)
    {
        while (b.Length > 0)
        {
            int n = _s.Send(b);
            b = b[n..];
        }
    }

    private void ReadExact(Span<byte> b)
    {
        while (b.Length > 0)
        {
            int n = _s.Receive(b);
            if (n == 0)
            {
                throw new EndOfStreamException("target closed the connection");
            }

            b = b[n..];
        }
    }

    /// <summary>Reads one PDU (checks digests when negotiated).</summary>
    public ModelPdu ReadPdu()
    {
        var ch = new byte[8];
        ReadExact(ch);
        int hlen = ch[2];
        int pdo = ch[3];
        int plen = (int)BinaryPrimitives.ReadUInt32LittleEndian(ch.AsSpan(4));
        bool hd = (ch[1] & NvmeTcpFlags.HeaderDigest) != 0;
        bool dd = (ch[1] & NvmeTcpFlags.DataDigest) != 0;
        int headerEnd = pdo > 0 ? pdo : hlen + (hd ? 4 : 0);
        if (ch[0] is NvmeTcpPduType.C2HTermReq)
        {
            headerEnd = plen;
        }

        var header = new byte[headerEnd];
        ch.CopyTo(header, 0);
        ReadExact(header.AsSpan(8));
        if (hd && !NvmeTcpPdu.CheckHeaderDigest(header, hlen))
        {
            throw new InvalidDataException("bad header digest from the target");
        }

        byte[] data = Array.Empty<byte>();
        if (pdo > 0)
        {
            data = new byte[plen - pdo - (dd ? 4 : 0)];
            ReadExact(data);
            if (dd)
            {
                var dg = new byte[4];
                ReadExact(dg);
                if (BinaryPrimitives.ReadUInt32LittleEndian(dg) != Crc32C.Compute(data))
                {
                    throw new InvalidDataException("bad data digest from the target");
                }
            }
        }

        return new ModelPdu(ch[0], ch[1], header, data);
    }

    /// <summary>True when the target closed the connection within <paramref name="ms"/> (after any PDUs it sent).</summary>
    public bool ClosedByTarget(int ms = 5000, List<ModelPdu>? seen = null)
    {
        _s.ReceiveTimeout = ms;
        try
        {
            while (true)
            {
                var p = ReadPdu();
                seen?.Add(p);
            }
        }
        catch (EndOfStreamException)
        {
            return true;
        }
        catch (SocketException e) when (e.SocketErrorCode == SocketError.ConnectionReset)
        {
            return true;
        }
        catch (SocketException)
        {
            return false;
        }
    }

    public ModelPdu IcReq(bool hdgst = false, bool ddgst = false, int hpda = 0)
    {
        var b = new byte[NvmeTcpPdu.IcSize];
        NvmeTcpPdu.WriteIcReq(b, hpda, hdgst, ddgst, 0);
        Send(b);
        var r = ReadPdu();
        if (r.Type == NvmeTcpPduType.IcResp)
        {
            byte dg = NvmeTcpPdu.IcDigests(r.Header);
            Hdgst = (dg & 1) != 0;
            Ddgst = (dg & 2) != 0;
            MaxH2CData = NvmeTcpPdu.IcMax(r.Header);
        }

        return r;
    }

    public ushort NextCid() => _cid++;

    /// <summary>Sends a command capsule with optional in-capsule data (the SGL is set here unless <paramref name="keepSgl"/>).</summary>
    public void SendCommand(NvmeCommand cmd, byte[]? inCapsule = null, uint transportLength = 0, bool keepSgl = false, bool corruptDataDigest = false, bool corruptHeaderDigest = false)
    {
        int dl = inCapsule?.Length ?? 0;
        if (!keepSgl)
        {
            NvmeFabrics.SetSgl(ref cmd, dl > 0 ? (uint)dl : transportLength, dl > 0);
        }

        var h = new byte[NvmeTcpPdu.MaxHeaderBytes];
        int hl = NvmeTcpPdu.WriteCapsuleCmd(h, in cmd, Hdgst, Ddgst, 0, dl);
        if (corruptHeaderDigest)
        {
            h[NvmeTcpPdu.CapsuleCmdHlen] ^= 0xFF;
        }

        Send(h.AsSpan(0, hl));
        if (dl > 0)
        {
            Send(inCapsule);
            if (Ddgst)
            {
                var d = new byte[4];
                BinaryPrimitives.WriteUInt32LittleEndian(d, Crc32C.Compute(inCapsule) ^ (corruptDataDigest ? 1u : 0u));
                Send(d);
            }
        }
    }

    public void SendH2C(ushort cid, ushort ttag, uint offset, ReadOnlySpan<byte> data, bool last)
    {
        var h = new byte[NvmeTcpPdu.MaxHeaderBytes];
        int hl = NvmeTcpPdu.WriteH2CData(h, cid, ttag, offset, (uint)data.Length, last, Hdgst, Ddgst, 0);
        Send(h.AsSpan(0, hl));
        Send(data);
        if (Ddgst)
        {
            var d = new byte[4];
            BinaryPrimitives.WriteUInt32LittleEndian(d, Crc32C.Compute(data));
            Send(d);
        }
    }

    /// <summary>Fabrics Connect; returns the CapsuleResp.</summary>
    public ModelPdu Connect(string subnqn, ushort qid = 0, ushort cntlid = 0xFFFF, int entries = 32, string hostnqn = HostNqn, uint kato = 0, bool disableSqFlow = false)
    {
        var cmd = NvmeFabrics.Connect(qid, entries, kato);
        if (disableSqFlow)
        {
            cmd.Cdw11 |= (uint)NvmeFabrics.ConnectCattrDisableSqFlow << 16;
        }

        cmd.Cid = NextCid();
        var data = new byte[NvmeFabrics.ConnectDataSize];
        NvmeFabrics.WriteConnectData(data, Guid.Parse("11111111-2222-3333-4444-555555555555"), cntlid, subnqn, hostnqn);
        SendCommand(cmd, data);
        return ReadPdu();
    }

    /// <summary>Sends a command without data and returns its CapsuleResp.</summary>
    public ModelPdu Execute(NvmeCommand cmd)
    {
        cmd.Cid = NextCid();
        SendCommand(cmd);
        return ReadPdu();
    }

    public void Enable()
    {
        var r = Execute(NvmeFabrics.PropertySet(NvmeReg.Cc, NvmeReg.CcEn | (6u << 16) | (4u << 20)));
        if (r.Status != 0)
        {
            throw new InvalidOperationException($"enable failed: {r.Status:x}");
        }
    }

    /// <summary>A command reading <paramref name="length"/> bytes: the C2HData PDUs' data and the final response (null when SUCCESS ended it).</summary>
    public (byte[] Data, ModelPdu? Resp, List<ModelPdu> Pdus) Read(NvmeCommand cmd, uint length)
    {
        cmd.Cid = NextCid();
        SendCommand(cmd, null, length);
        var data = new MemoryStream();
        var pdus = new List<ModelPdu>();
        while (true)
        {
            var p = ReadPdu();
            pdus.Add(p);
            if (p.Type == NvmeTcpPduType.C2HData)
            {
                data.Write(p.Data);
                if ((p.Flags & NvmeTcpFlags.Success) != 0)
                {
                    return (data.ToArray(), null, pdus);
                }

                continue;
            }

            return (data.ToArray(), p, pdus);
        }
    }

    public void Dispose() => _s.Dispose();

    public static NvmeCommand Identify(byte cns, uint nsid = 0) => new() { Opcode = NvmeAdminOpcode.Identify, Nsid = nsid, Cdw10 = cns };

    public static NvmeCommand Rw(byte opcode, uint nsid, ulong lba, uint blocks) => new()
    {
        Opcode = opcode,
        Nsid = nsid,
        Cdw10 = (uint)lba,
        Cdw11 = (uint)(lba >> 32),
        Cdw12 = blocks - 1,
    };

    public static int Sct(ushort status) => (status >> 8) & 7;
    public static int Sc(ushort status) => status & 0xFF;

    public static NvmeCompletion ReadCompletion(byte[] header) => MemoryMarshal.Read<NvmeCompletion>(header.AsSpan(8));
}
