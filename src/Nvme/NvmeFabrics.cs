using System.Buffers.Binary;
using System.Text;

namespace VhostBackend.Nvme;

/// <summary>NVMe over Fabrics commands (opcode 0x7F; NVMe-oF 1.1, 3.3-3.5) and SGL descriptors, transport-independent.</summary>
public static class NvmeFabrics
{
    public const byte Opcode = 0x7F;
    public const byte FctypePropertySet = 0x00;
    public const byte FctypeConnect = 0x01;
    public const byte FctypePropertyGet = 0x04;

    /// <summary>Size of the Connect command's data (host id, controller id, subsystem and host NQN).</summary>
    public const int ConnectDataSize = 1024;

    /// <summary>Dynamic controller model: ask the subsystem for a new controller.</summary>
    public const ushort DynamicCntlid = 0xFFFF;

    /// <summary>Command flags PSDT = 01b: SGLs, the metadata pointer a single buffer.</summary>
    public const byte PsdtSgl = 0x40;

    /// <summary>SGL type byte of a data block addressed by an offset into the capsule (in-capsule data).</summary>
    public const byte SglInCapsule = 0x01;

    /// <summary>SGL type byte of a transport data block (the transport moves the data: R2T/H2CData, C2HData).</summary>
    public const byte SglTransport = 0x5A;

    /// <summary>The NQN of a discovery controller.</summary>
    public const string DiscoveryNqn = "nqn.2014-08.org.nvmexpress.discovery";

    /// <summary>Writes the command's SGL1: a single data block of <paramref name="length"/> bytes.</summary>
    public static void SetSgl(ref NvmeCommand cmd, uint length, bool inCapsule)
    {
        cmd.Flags = (byte)((cmd.Flags & 0x3F) | PsdtSgl);
        cmd.Prp1 = 0; // address: offset 0 into the capsule, or unused for a transport data block
        cmd.Prp2 = length | ((ulong)(inCapsule ? SglInCapsule : SglTransport) << 56);
    }

    /// <summary>A Connect command for queue <paramref name="qid"/> with <paramref name="entries"/> entries and a keep-alive timeout (ms, 0 = none; admin queue only).</summary>
    public static NvmeCommand Connect(ushort qid, int entries, uint katoMs)
    {
        var cmd = new NvmeCommand { Opcode = Opcode, Nsid = FctypeConnect };
        cmd.Cdw10 = (uint)qid << 16; // recfmt 0
        cmd.Cdw11 = (uint)(entries - 1); // sqsize (0's based), cattr 0
        cmd.Cdw12 = katoMs;
        return cmd;
    }

    /// <summary>Writes Connect data: host identifier, controller id, subsystem NQN, host NQN (NQNs UTF-8, at most 223 bytes).</summary>
    public static void WriteConnectData(Span<byte> data, Guid hostId, ushort cntlid, string subnqn, string hostnqn)
    {
        data[..ConnectDataSize].Clear();
        hostId.TryWriteBytes(data[..16], bigEndian: true, out _);
        BinaryPrimitives.WriteUInt16LittleEndian(data[16..], cntlid);
        Encoding.UTF8.GetBytes(subnqn, data.Slice(256, 256));
        Encoding.UTF8.GetBytes(hostnqn, data.Slice(512, 256));
    }

    /// <summary>True when <paramref name="nqn"/> is a usable NQN: 1 to 223 bytes of UTF-8 without NUL.</summary>
    public static bool IsValidNqn(string? nqn) =>
        !string.IsNullOrEmpty(nqn) && Encoding.UTF8.GetByteCount(nqn) <= 223 && !nqn.Contains('\0', StringComparison.Ordinal);

    /// <summary>A Property Get of a 4- or 8-byte controller property (a register offset: CAP 0x0, VS 0x8, CC 0x14, CSTS 0x1C).</summary>
    public static NvmeCommand PropertyGet(uint offset, bool eightBytes) =>
        new() { Opcode = Opcode, Nsid = FctypePropertyGet, Cdw10 = eightBytes ? 1u : 0u, Cdw11 = offset };

    /// <summary>A Property Set of a 4-byte property.</summary>
    public static NvmeCommand PropertySet(uint offset, uint value) =>
        new() { Opcode = Opcode, Nsid = FctypePropertySet, Cdw10 = 0, Cdw11 = offset, Cdw12 = value };

    /// <summary>The fctype of a fabrics command (its byte 4), or -1 for other commands.</summary>
    public static int FctypeOf(in NvmeCommand cmd) => cmd.Opcode == Opcode ? (int)(cmd.Nsid & 0xFF) : -1;

    /// <summary>Connect CATTR bit 2: the host disabled SQ flow control (a controller may then use the C2HData SUCCESS flag).</summary>
    public const byte ConnectCattrDisableSqFlow = 0x04;

    /// <summary>SGL descriptor type (bits 7:4 of SGL1 byte 15) of a data block; subtype (3:0) 1 = offset (in-capsule), 0xA = transport.</summary>
    public const byte SglTypeDataBlock = 0x0;
    public const byte SglTypeTransportDataBlock = 0x5;

    /// <summary>SGL1 of a command: address (or in-capsule offset), length, type byte (type in bits 7:4, subtype in 3:0).</summary>
    public static (ulong Address, uint Length, byte TypeByte) Sgl(in NvmeCommand cmd) =>
        (cmd.Prp1, (uint)cmd.Prp2, (byte)(cmd.Prp2 >> 56));

    /// <summary>Reads Connect data (a target's view): host identifier, controller id, subsystem and host NQN (NUL-terminated, at most 256 bytes each).</summary>
    public static (Guid HostId, ushort Cntlid, string SubNqn, string HostNqn) ReadConnectData(ReadOnlySpan<byte> data)
    {
        if (data.Length < ConnectDataSize)
        {
            throw new ArgumentException("connect data is 1024 bytes");
        }

        var hostId = new Guid(data[..16], bigEndian: true);
        ushort cntlid = BinaryPrimitives.ReadUInt16LittleEndian(data[16..]);
        return (hostId, cntlid, NulTerminated(data.Slice(256, 256)), NulTerminated(data.Slice(512, 256)));
    }

    /// <summary>The UTF-8 text before the first NUL (the whole span when there is none: then longer than an NQN may be).</summary>
    public static string NulTerminated(ReadOnlySpan<byte> b)
    {
        int n = b.IndexOf((byte)0);
        return Encoding.UTF8.GetString(n >= 0 ? b[..n] : b);
    }
}
