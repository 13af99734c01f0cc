using System.Runtime.InteropServices;

namespace VhostBackend.Virtio;

/// <summary>Feature bits common to all virtio devices and the split ring (virtio 1.1, section 6).</summary>
public static class VirtioFeatures
{
    public const int NotifyOnEmpty = 24;
    public const int AnyLayout = 27;
    public const int RingIndirectDesc = 28;
    public const int RingEventIdx = 29;
    public const int Version1 = 32;
    public const int AccessPlatform = 33;
    public const int RingPacked = 34;

    public static ulong Bit(int bit) => 1UL << bit;
}

/// <summary>struct virtq_desc (16 bytes, little endian).</summary>
[StructLayout(LayoutKind.Sequential, Size = 16)]
public struct VirtqDesc
{
    public const ushort FlagNext = 1;
    public const ushort FlagWrite = 2;
    public const ushort FlagIndirect = 4;

    public ulong Addr;
    public uint Len;
    public ushort Flags;
    public ushort Next;
}

/// <summary>struct pvirtq_desc (virtio 1.2, 2.8.13: 16 bytes, little endian): a packed ring descriptor.</summary>
[StructLayout(LayoutKind.Sequential, Size = 16)]
public struct VirtqPackedDesc
{
    public const ushort FlagNext = 1;
    public const ushort FlagWrite = 2;
    public const ushort FlagIndirect = 4;
    public const ushort FlagAvail = 1 << 7;
    public const ushort FlagUsed = 1 << 15;

    public ulong Addr;
    public uint Len;
    public ushort Id;
    public ushort Flags;
}

/// <summary>struct pvirtq_event_suppress (virtio 1.2, 2.8.14: 4 bytes): the driver's and the device's event suppression areas.</summary>
[StructLayout(LayoutKind.Sequential, Size = 4)]
public struct VirtqEventSuppress
{
    /// <summary>Notifications enabled.</summary>
    public const ushort Enable = 0;

    /// <summary>Notifications disabled.</summary>
    public const ushort Disable = 1;

    /// <summary>Notify when the descriptor at OffWrap is reached (needs VIRTIO_F_RING_EVENT_IDX).</summary>
    public const ushort Desc = 2;

    /// <summary>Bits 0-14: descriptor ring offset; bit 15: wrap counter.</summary>
    public ushort OffWrap;
    public ushort Flags;
}

/// <summary>struct virtq_used_elem (8 bytes).</summary>
[StructLayout(LayoutKind.Sequential, Size = 8)]
public struct VirtqUsedElem
{
    public uint Id;
    public uint Len;
}

/// <summary>One host-memory piece of a descriptor chain: where, how long, and whether the device may write it.</summary>
[StructLayout(LayoutKind.Sequential)]
public struct DescSegment
{
    public nint Host;
    public uint Length;
    public bool Writable;

    public DescSegment(nint host, uint length, bool writable)
    {
        Host = host;
        Length = length;
        Writable = writable;
    }

    public override readonly string ToString() => $"{Host:x}+{Length}{(Writable ? " w" : "")}";
}

/// <summary>Why a descriptor chain was refused.</summary>
public enum ChainError
{
    None = 0,

    /// <summary>More descriptors than the table holds: a loop.</summary>
    TooLong,

    /// <summary>A head or next index beyond the table.</summary>
    IndexOutOfRange,

    /// <summary>An indirect descriptor inside an indirect table.</summary>
    NestedIndirect,

    /// <summary>An indirect descriptor that also has NEXT set.</summary>
    IndirectWithNext,

    /// <summary>An indirect table whose length is 0, not a multiple of 16, or too large.</summary>
    BadIndirectLength,

    /// <summary>A buffer or table address not in guest memory.</summary>
    AddressNotMapped,

    /// <summary>More host segments than the caller's buffer holds.</summary>
    TooManySegments,

    /// <summary>A device-readable descriptor after a device-writable one.</summary>
    ReadableAfterWritable,

    /// <summary>The chain's total length exceeds 4 GiB.</summary>
    TooLarge,
}

/// <summary>Result of a descriptor-chain walk.</summary>
public struct ChainInfo
{
    public int SegmentCount;

    /// <summary>Index of the first writable segment (== SegmentCount when there is none).</summary>
    public int FirstWritable;

    public ulong ReadableBytes;
    public ulong WritableBytes;
    public int Descriptors;
}
