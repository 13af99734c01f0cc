using System.Runtime.InteropServices;

namespace VhostBackend.Virtio.Blk;

/// <summary>virtio-blk feature bits (virtio 1.1, 5.2.3).</summary>
public static class VirtioBlkFeature
{
    public const int SizeMax = 1;
    public const int SegMax = 2;
    public const int Geometry = 4;
    public const int Ro = 5;
    public const int BlkSize = 6;
    public const int Flush = 9;
    public const int Topology = 10;
    public const int ConfigWce = 11;
    public const int Mq = 12;
    public const int Discard = 13;
    public const int WriteZeroes = 14;
}

/// <summary>Request types and status codes (virtio 1.1, 5.2.6).</summary>
public static class VirtioBlkRequestType
{
    public const uint In = 0;
    public const uint Out = 1;
    public const uint Flush = 4;
    public const uint GetId = 8;
    public const uint Discard = 11;
    public const uint WriteZeroes = 13;

    public const byte StatusOk = 0;
    public const byte StatusIoErr = 1;
    public const byte StatusUnsupp = 2;

    public const int IdBytes = 20;
    public const uint SectorSize = 512;

    /// <summary>Flag of a write-zeroes segment: the device may deallocate the range.</summary>
    public const uint SegmentFlagUnmap = 1;
}

/// <summary>struct virtio_blk_outhdr: the 16 bytes at the start of every request.</summary>
[StructLayout(LayoutKind.Sequential, Size = 16)]
public struct VirtioBlkOutHeader
{
    public const int Size = 16;

    public uint Type;
    public uint IoPrio;
    public ulong Sector;
}

/// <summary>struct virtio_blk_discard_write_zeroes: one range of a DISCARD / WRITE_ZEROES request (16 bytes).</summary>
[StructLayout(LayoutKind.Sequential, Size = 16)]
public struct VirtioBlkDiscardWriteZeroes
{
    public const int Size = 16;

    public ulong Sector;
    public uint NumSectors;
    public uint Flags;
}

/// <summary>struct virtio_blk_config up to write_zeroes_may_unmap (60 bytes, the size QEMU 7.2 uses).</summary>
[StructLayout(LayoutKind.Explicit, Size = 60)]
public struct VirtioBlkConfig
{
    [FieldOffset(0)] public ulong Capacity;
    [FieldOffset(8)] public uint SizeMax;
    [FieldOffset(12)] public uint SegMax;
    [FieldOffset(16)] public ushort Cylinders;
    [FieldOffset(18)] public byte Heads;
    [FieldOffset(19)] public byte Sectors;
    [FieldOffset(20)] public uint BlkSize;
    [FieldOffset(24)] public byte PhysicalBlockExp;
    [FieldOffset(25)] public byte AlignmentOffset;
    [FieldOffset(26)] public ushort MinIoSize;
    [FieldOffset(28)] public uint OptIoSize;
    [FieldOffset(32)] public byte Writeback;
    [FieldOffset(33)] public byte Unused0;
    [FieldOffset(34)] public ushort NumQueues;
    [FieldOffset(36)] public uint MaxDiscardSectors;
    [FieldOffset(40)] public uint MaxDiscardSeg;
    [FieldOffset(44)] public uint DiscardSectorAlignment;
    [FieldOffset(48)] public uint MaxWriteZeroesSectors;
    [FieldOffset(52)] public uint MaxWriteZeroesSeg;
    [FieldOffset(56)] public byte WriteZeroesMayUnmap;
}
