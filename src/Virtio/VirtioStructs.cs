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
