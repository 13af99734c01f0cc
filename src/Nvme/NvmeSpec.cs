using System.Runtime.InteropServices;
using System.Text;

namespace VhostBackend.Nvme;

/// <summary>Controller register offsets in BAR0 (NVMe 1.4, section 3.1).</summary>
public static class NvmeReg
{
    public const int Cap = 0x00;   // 64-bit
    public const int Vs = 0x08;
    public const int Intms = 0x0C;
    public const int Intmc = 0x10;
    public const int Cc = 0x14;
    public const int Csts = 0x1C;
    public const int Nssr = 0x20;
    public const int Aqa = 0x24;
    public const int Asq = 0x28;   // 64-bit
    public const int Acq = 0x30;   // 64-bit
    public const int DoorbellBase = 0x1000;

    public const uint CcEn = 1;
    public const uint CstsRdy = 1;
    public const uint CstsCfs = 2;

    /// <summary>CC value: enable, NVM command set, MPS, round robin, no shutdown, IOSQES=6 (64 B), IOCQES=4 (16 B).</summary>
    public static uint MakeCc(int mps, bool enable) =>
        (enable ? CcEn : 0) | (0u << 4) | ((uint)mps << 7) | (0u << 11) | (6u << 16) | (4u << 20);

    /// <summary>Offset of a doorbell: SQ y tail at 0x1000 + (2y) * (4 &lt;&lt; DSTRD), CQ y head one stride later.</summary>
    public static int DoorbellOffset(int qid, bool completionQueue, int dstrd) =>
        DoorbellBase + (((2 * qid) + (completionQueue ? 1 : 0)) * (4 << dstrd));
}

/// <summary>CAP decoded (NVMe 1.4, 3.1.1).</summary>
public readonly struct NvmeCap
{
    public NvmeCap(ulong raw) => Raw = raw;

    public ulong Raw { get; }

    /// <summary>Maximum queue entries (1-based; MQES is 0-based).</summary>
    public int MaxQueueEntries => (int)(Raw & 0xFFFF) + 1;
    public bool ContiguousQueuesRequired => ((Raw >> 16) & 1) != 0;

    /// <summary>CAP.TO in 500 ms units.</summary>
    public int TimeoutUnits => (int)((Raw >> 24) & 0xFF);
    public TimeSpan Timeout => TimeSpan.FromMilliseconds(Math.Max(1, TimeoutUnits) * 500);
    public int DoorbellStride => (int)((Raw >> 32) & 0xF);
    public bool NvmCommandSet => ((Raw >> 37) & 1) != 0;
    public int MpsMin => (int)((Raw >> 48) & 0xF);
    public int MpsMax => (int)((Raw >> 52) & 0xF);
}

public static class NvmeAdminOpcode
{
    public const byte DeleteIoSq = 0x00;
    public const byte CreateIoSq = 0x01;
    public const byte GetLogPage = 0x02;
    public const byte DeleteIoCq = 0x04;
    public const byte CreateIoCq = 0x05;
    public const byte Identify = 0x06;
    public const byte Abort = 0x08;
    public const byte SetFeatures = 0x09;
    public const byte GetFeatures = 0x0A;
    public const byte AsyncEventRequest = 0x0C;
    public const byte KeepAlive = 0x18;
}

public static class NvmeIoOpcode
{
    public const byte Flush = 0x00;
    public const byte Write = 0x01;
    public const byte Read = 0x02;
    public const byte Compare = 0x05;
    public const byte WriteZeroes = 0x08;
    public const byte DatasetManagement = 0x09;
}

public static class NvmeFeature
{
    public const byte Arbitration = 0x01;
    public const byte PowerManagement = 0x02;
    public const byte TemperatureThreshold = 0x04;
    public const byte ErrorRecovery = 0x05;
    public const byte VolatileWriteCache = 0x06;
    public const byte NumberOfQueues = 0x07;
    public const byte AsyncEventConfiguration = 0x0B;
    public const byte KeepAliveTimer = 0x0F;
    public const byte InterruptCoalescing = 0x08;
    public const byte WriteAtomicity = 0x0A;
}

public static class NvmeLogPage
{
    public const byte Error = 0x01;
    public const byte SmartHealth = 0x02;
    public const byte FirmwareSlot = 0x03;

    /// <summary>Changed Namespace List: reading it re-arms the namespace attribute notice.</summary>
    public const byte ChangedNamespaceList = 0x04;

    /// <summary>Discovery log page (NVMe-oF).</summary>
    public const byte Discovery = 0x70;
}

/// <summary>Asynchronous event completion DW0 (NVMe base spec, Asynchronous Event Request).</summary>
public static class NvmeAsyncEvent
{
    /// <summary>AEC (Set Features 0x0B) bit enabling namespace attribute notices.</summary>
    public const uint NamespaceAttributeNotices = 1u << 8;

    /// <summary>A Notice (type 2) of information 0: a namespace was added, removed or changed (Changed Namespace List).</summary>
    public static bool IsNamespaceAttributeChanged(uint dw0) => (dw0 & 7) == 2 && ((dw0 >> 8) & 0xFF) == 0;

    /// <summary>AEC bit (discovery controllers) enabling Discovery Log Page Change notices (NVMe-oF 1.1, 5.3.x).</summary>
    public const uint DiscoveryLogChangeNotices = 1u << 31;

    /// <summary>A Notice (type 2) of information F0h: the discovery log page changed (re-read log 70h).</summary>
    public static bool IsDiscoveryLogChanged(uint dw0) => (dw0 & 7) == 2 && ((dw0 >> 8) & 0xFF) == 0xF0;
}

/// <summary>ONCS bits of Identify Controller (optional NVM commands).</summary>
[Flags]
public enum NvmeOncs : ushort
{
    Compare = 1 << 0,
    WriteUncorrectable = 1 << 1,
    DatasetManagement = 1 << 2,
    WriteZeroes = 1 << 3,
    SaveSelect = 1 << 4,
    Reservations = 1 << 5,
    Timestamp = 1 << 6,
    Verify = 1 << 7,
}

/// <summary>A submission queue entry (64 bytes, NVMe 1.4 figure 105).</summary>
[StructLayout(LayoutKind.Explicit, Size = 64)]
public struct NvmeCommand
{
    [FieldOffset(0)] public byte Opcode;
    [FieldOffset(1)] public byte Flags;      // FUSE bits 1:0, PSDT bits 7:6 (0 = PRP)
    [FieldOffset(2)] public ushort Cid;
    [FieldOffset(4)] public uint Nsid;
    [FieldOffset(8)] public uint Cdw2;
    [FieldOffset(12)] public uint Cdw3;
    [FieldOffset(16)] public ulong Mptr;
    [FieldOffset(24)] public ulong Prp1;
    [FieldOffset(32)] public ulong Prp2;
    [FieldOffset(40)] public uint Cdw10;
    [FieldOffset(44)] public uint Cdw11;
    [FieldOffset(48)] public uint Cdw12;
    [FieldOffset(52)] public uint Cdw13;
    [FieldOffset(56)] public uint Cdw14;
    [FieldOffset(60)] public uint Cdw15;
}

/// <summary>A completion queue entry (16 bytes, NVMe 1.4 figure 121).</summary>
[StructLayout(LayoutKind.Explicit, Size = 16)]
public struct NvmeCompletion
{
    [FieldOffset(0)] public uint Dw0;
    [FieldOffset(4)] public uint Dw1;
    [FieldOffset(8)] public ushort SqHead;
    [FieldOffset(10)] public ushort SqId;
    [FieldOffset(12)] public ushort Cid;

    /// <summary>Phase tag in bit 0, status field in bits 15:1.</summary>
    [FieldOffset(14)] public ushort StatusPhase;
}

/// <summary>One DSM range (16 bytes): context attributes, length in blocks, starting LBA.</summary>
[StructLayout(LayoutKind.Explicit, Size = 16)]
public struct NvmeDsmRange
{
    [FieldOffset(0)] public uint Attributes;
    [FieldOffset(4)] public uint LengthBlocks;
    [FieldOffset(8)] public ulong StartLba;
}

/// <summary>A command's status field without the phase bit: SCT (3 bits), SC (8 bits), CRD, More, DNR.</summary>
public readonly struct NvmeStatus : IEquatable<NvmeStatus>
{
    /// <summary>Status field as in the CQE with the phase bit shifted out (bits: SC 7:0, SCT 10:8, CRD 12:11, M 13, DNR 14).</summary>
    public NvmeStatus(ushort field) => Field = field;

    public static NvmeStatus Make(int sct, int sc, bool dnr = false) =>
        new((ushort)((sc & 0xFF) | ((sct & 7) << 8) | (dnr ? 1 << 14 : 0)));

    public static readonly NvmeStatus Success = default;

    /// <summary>Generic: command aborted due to SQ deletion (used for I/O failed by a reset or disconnect).</summary>
    public static readonly NvmeStatus AbortedSqDeletion = Make(NvmeSct.Generic, NvmeSc.AbortedSqDeletion);

    /// <summary>Generic: command abort requested (Abort command, or timeout handling).</summary>
    public static readonly NvmeStatus AbortRequested = Make(NvmeSct.Generic, NvmeSc.AbortRequested);

    /// <summary>Generic: internal error, no retry (device removed or controller fatal).</summary>
    public static readonly NvmeStatus InternalDeviceError = Make(NvmeSct.Generic, NvmeSc.InternalDeviceError, dnr: true);

    /// <summary>A fabrics transport failed (the connection was lost): retryable on another or a new connection.</summary>
    public static readonly NvmeStatus TransientTransportError = Make(NvmeSct.Generic, NvmeSc.TransientTransportError);

    public ushort Field { get; }
    public int Sc => Field & 0xFF;
    public int Sct => (Field >> 8) & 7;
    public bool DoNotRetry => (Field & (1 << 14)) != 0;
    public bool IsSuccess => (Field & 0x7FF) == 0;
    public bool IsCompareFailure => Sct == NvmeSct.MediaError && Sc == NvmeSc.CompareFailure;

    /// <summary>SCT &lt;&lt; 8 | SC, as the bdev layer's NvmeStatus expects.</summary>
    public int SctSc => Field & 0x7FF;

    public bool Equals(NvmeStatus other) => SctSc == other.SctSc;

    public override bool Equals(object? obj) => obj is NvmeStatus s && Equals(s);

    public override int GetHashCode() => SctSc;

    public static bool operator ==(NvmeStatus a, NvmeStatus b) => a.Equals(b);

    public static bool operator !=(NvmeStatus a, NvmeStatus b) => !a.Equals(b);

    public override string ToString() => IsSuccess ? "success" : $"sct={Sct} sc=0x{Sc:x2}{(DoNotRetry ? " dnr" : "")}";
}

public static class NvmeSct
{
    public const int Generic = 0;
    public const int CommandSpecific = 1;
    public const int MediaError = 2;
    public const int Path = 3;
}

public static class NvmeSc
{
    public const int Success = 0x00;
    public const int InvalidOpcode = 0x01;
    public const int InvalidField = 0x02;
    public const int CidConflict = 0x03;
    public const int DataTransferError = 0x04;
    public const int InternalDeviceError = 0x06;
    public const int AbortRequested = 0x07;
    public const int AbortedSqDeletion = 0x08;
    public const int InvalidNamespace = 0x0B;
    public const int CommandSequenceError = 0x0C;
    public const int InvalidSglSegmentDescriptor = 0x0D;
    public const int DataSglLengthInvalid = 0x0F;
    public const int SglDescriptorTypeInvalid = 0x11;
    public const int SglOffsetInvalid = 0x16;
    public const int NamespaceNotReady = 0x82; // generic
    public const int AbortLimitExceeded = 0x03; // command specific
    public const int AsyncEventRequestLimitExceeded = 0x05; // command specific
    public const int InvalidLogPage = 0x09; // command specific
    public const int FeatureNotChangeable = 0x0E; // command specific
    public const int ConnectIncompatibleFormat = 0x80; // command specific (fabrics)
    public const int ConnectControllerBusy = 0x81; // command specific (fabrics)
    public const int ConnectInvalidParameters = 0x82; // command specific (fabrics)
    public const int ConnectInvalidHost = 0x84; // command specific (fabrics)
    public const int TransientTransportError = 0x22;
    public const int LbaOutOfRange = 0x80;
    public const int InvalidQueueId = 0x01; // command specific
    public const int InvalidQueueSize = 0x02; // command specific
    public const int CompareFailure = 0x85; // media error
}

/// <summary>The fields of Identify Controller (CNS 1, 4096 bytes) the driver uses.</summary>
public sealed class NvmeControllerData
{
    public ushort VendorId { get; init; }
    public ushort SubsystemVendorId { get; init; }
    public string SerialNumber { get; init; } = "";
    public string ModelNumber { get; init; } = "";
    public string FirmwareRevision { get; init; } = "";
    public byte Mdts { get; init; }
    public ushort ControllerId { get; init; }
    public uint Version { get; init; }
    public ushort Oacs { get; init; }
    public byte AbortLimit { get; init; }
    public byte AsyncEventLimit { get; init; }
    public byte LogPageAttributes { get; init; }
    public byte ErrorLogEntries { get; init; }
    public byte SqEntrySizes { get; init; }
    public byte CqEntrySizes { get; init; }
    public uint NamespaceCount { get; init; }

    /// <summary>OAES (bytes 92-95): optional asynchronous events supported (bit 8: namespace attribute notices).</summary>
    public uint Oaes { get; init; }
    public NvmeOncs Oncs { get; init; }
    public byte VolatileWriteCache { get; init; }
    public ushort KeepAliveSupport { get; init; }
    public string SubsystemNqn { get; init; } = "";

    public bool HasVolatileWriteCache => (VolatileWriteCache & 1) != 0;

    public static NvmeControllerData Parse(ReadOnlySpan<byte> d)
    {
        if (d.Length < 4096)
        {
            throw new ArgumentException("identify controller data is 4096 bytes");
        }

        return new NvmeControllerData
        {
            VendorId = BitConverter.ToUInt16(d[0..2]),
            SubsystemVendorId = BitConverter.ToUInt16(d[2..4]),
            SerialNumber = Ascii(d[4..24]),
            ModelNumber = Ascii(d[24..64]),
            FirmwareRevision = Ascii(d[64..72]),
            Mdts = d[77],
            ControllerId = BitConverter.ToUInt16(d[78..80]),
            Version = BitConverter.ToUInt32(d[80..84]),
            Oaes = BitConverter.ToUInt32(d[92..96]),
            KeepAliveSupport = BitConverter.ToUInt16(d[320..322]),
            Oacs = BitConverter.ToUInt16(d[256..258]),
            AbortLimit = d[258],
            AsyncEventLimit = d[259],
            LogPageAttributes = d[261],
            ErrorLogEntries = d[262],
            SqEntrySizes = d[512],
            CqEntrySizes = d[513],
            NamespaceCount = BitConverter.ToUInt32(d[516..520]),
            Oncs = (NvmeOncs)BitConverter.ToUInt16(d[520..522]),
            VolatileWriteCache = d[525],
            SubsystemNqn = Ascii(d[768..1024]),
        };
    }

    internal static string Ascii(ReadOnlySpan<byte> b)
    {
        int n = b.IndexOf((byte)0);
        if (n >= 0)
        {
            b = b[..n];
        }

        var chars = new char[b.Length];
        for (int i = 0; i < b.Length; i++)
        {
            chars[i] = b[i] is >= 0x20 and < 0x7F ? (char)b[i] : '?';
        }

        return new string(chars).Trim();
    }
}

/// <summary>The fields of Identify Namespace (CNS 0) the driver uses.</summary>
public sealed class NvmeNamespaceData
{
    public uint Nsid { get; init; }
    public ulong Size { get; init; }
    public ulong Capacity { get; init; }
    public ulong Utilization { get; init; }
    public byte Features { get; init; }
    public int LbaFormatCount { get; init; }
    public byte FormattedLbaSize { get; init; }
    public (ushort MetadataSize, byte LbaDataShift, byte RelativePerformance)[] LbaFormats { get; init; } = Array.Empty<(ushort, byte, byte)>();
    public byte[] Nguid { get; init; } = new byte[16];
    public ulong Eui64 { get; init; }

    /// <summary>Index of the LBA format in use (FLBAS bits 3:0, plus bits 6:5 as the upper bits when more than 16 formats).</summary>
    public int LbaFormatIndex => (FormattedLbaSize & 0xF) | (LbaFormatCount > 16 ? ((FormattedLbaSize >> 5) & 3) << 4 : 0);

    public uint BlockSize => LbaFormatIndex < LbaFormats.Length ? 1u << LbaFormats[LbaFormatIndex].LbaDataShift : 0;
    public int MetadataSize => LbaFormatIndex < LbaFormats.Length ? LbaFormats[LbaFormatIndex].MetadataSize : 0;

    /// <summary>NSFEAT bit 0: the namespace supports thin provisioning / deallocation reporting.</summary>
    public bool ThinProvisioned => (Features & 1) != 0;

    public bool IsActive => Size != 0;

    public static NvmeNamespaceData Parse(uint nsid, ReadOnlySpan<byte> d)
    {
        if (d.Length < 4096)
        {
            throw new ArgumentException("identify namespace data is 4096 bytes");
        }

        int nlbaf = Math.Min(d[25] + 1, 64);
        var formats = new (ushort, byte, byte)[nlbaf];
        for (int i = 0; i < nlbaf; i++)
        {
            uint f = BitConverter.ToUInt32(d.Slice(128 + (4 * i), 4));
            formats[i] = ((ushort)(f & 0xFFFF), (byte)((f >> 16) & 0xFF), (byte)((f >> 24) & 3));
        }

        return new NvmeNamespaceData
        {
            Nsid = nsid,
            Size = BitConverter.ToUInt64(d[0..8]),
            Capacity = BitConverter.ToUInt64(d[8..16]),
            Utilization = BitConverter.ToUInt64(d[16..24]),
            Features = d[24],
            LbaFormatCount = nlbaf,
            FormattedLbaSize = d[26],
            LbaFormats = formats,
            Nguid = d[104..120].ToArray(),
            Eui64 = System.Buffers.Binary.BinaryPrimitives.ReadUInt64BigEndian(d[120..128]),
        };
    }

    public override string ToString()
    {
        var sb = new StringBuilder();
        sb.Append("nsid ").Append(Nsid).Append(": ").Append(Size).Append(" blocks of ").Append(BlockSize);
        return sb.ToString();
    }
}
