using System.Runtime.CompilerServices;
using VhostBackend.Platform;

namespace VhostBackend.Virtio.Tests;

/// <summary>
/// A model of a virtio driver (the guest side) for tests: guest memory in a memfd, split into two regions
/// that are contiguous in guest-physical space but mapped separately here, a ring laid out at the start,
/// and a bump allocator for buffers. Not a real driver.
/// </summary>
internal sealed unsafe class DriverRingModel : IDisposable
{
    public const ulong GpaBase = 0x100000;
    public const ulong UvaBase = 0x7f00_0000_0000;
    public const ulong RegionSize = 1 << 20;

    private readonly int _fd;
    private readonly MappedRegion _map;
    private ulong _next;
    private ushort _availIdx;

    /// <param name="sealMemory">Seal the memfd's size as QEMU's memfd backend does (false: a front end that could still truncate it).</param>
    public DriverRingModel(ushort size = 16, bool eventIdx = false, bool sealMemory = true)
    {
        Size = size;
        _fd = MappedRegion.CreateMemFd("driver-model", (long)(2 * RegionSize), sealMemory);
        _map = MappedRegion.Map(_fd, 2 * RegionSize);

        // Two regions, adjacent in guest-physical and user space, backed by the same mapping (so a buffer can
        // cross the boundary and the device must split it into two segments).
        Memory = new GuestMemory(
        [
            new GuestMemoryRegion(GpaBase, RegionSize, UvaBase, 0, _map.Pointer),
            new GuestMemoryRegion(GpaBase + RegionSize, RegionSize, UvaBase + RegionSize, RegionSize, _map.Pointer + (nint)RegionSize),
        ]);
        DescGpa = GpaBase;
        AvailGpa = Align(DescGpa + SplitVirtqueue.DescTableBytes(size), 2);
        UsedGpa = Align(AvailGpa + SplitVirtqueue.AvailRingBytes(size), 4);
        _next = Align(UsedGpa + SplitVirtqueue.UsedRingBytes(size), 4096);
        EventIdx = eventIdx;
    }

    public ushort Size { get; }
    public bool EventIdx { get; }
    public GuestMemory Memory { get; }
    public int MemFd => _fd;
    public nint HostBase => _map.Pointer;
    public ulong DescGpa { get; }
    public ulong AvailGpa { get; }
    public ulong UsedGpa { get; }

    public ulong ToUva(ulong gpa) => gpa - GpaBase + UvaBase;

    public static ulong Align(ulong v, ulong a) => (v + a - 1) & ~(a - 1);

    public SplitVirtqueue CreateDeviceQueue()
    {
        var q = SplitVirtqueue.Create(Memory, Size, ToUva(DescGpa), ToUva(AvailGpa), ToUva(UsedGpa), EventIdx, 0, out var err);
        return q ?? throw new InvalidOperationException(err);
    }

    public byte* Host(ulong gpa) => (byte*)_map.Pointer + (gpa - GpaBase);

    public Span<byte> Bytes(ulong gpa, int len) => new(Host(gpa), len);

    public ulong Alloc(int len, ulong align = 16)
    {
        _next = Align(_next, align);
        ulong a = _next;
        _next += (ulong)len;
        return a;
    }

    /// <summary>Allocates a buffer that straddles the boundary between the two regions.</summary>
    public ulong AllocAcrossRegions(int len)
    {
        ulong a = GpaBase + RegionSize - (ulong)(len / 2);
        return a;
    }

    public void SetDesc(int i, ulong addr, uint len, ushort flags, ushort next = 0)
    {
        var d = (VirtqDesc*)Host(DescGpa) + i;
        d->Addr = addr;
        d->Len = len;
        d->Flags = flags;
        d->Next = next;
    }

    public static void SetDescAt(byte* table, int i, ulong addr, uint len, ushort flags, ushort next = 0)
    {
        var d = (VirtqDesc*)table + i;
        d->Addr = addr;
        d->Len = len;
        d->Flags = flags;
        d->Next = next;
    }

    public void Publish(ushort head)
    {
        *(ushort*)(Host(AvailGpa) + 4 + (2 * (_availIdx % Size))) = head;
        _availIdx++;
        Volatile.Write(ref *(ushort*)(Host(AvailGpa) + 2), _availIdx);
    }

    public void SetAvailIdxRaw(ushort idx) => Volatile.Write(ref *(ushort*)(Host(AvailGpa) + 2), idx);

    public ushort AvailFlags
    {
        get => *(ushort*)Host(AvailGpa);
        set => *(ushort*)Host(AvailGpa) = value;
    }

    public ushort UsedEvent
    {
        get => *(ushort*)(Host(AvailGpa) + 4 + (2 * Size));
        set => *(ushort*)(Host(AvailGpa) + 4 + (2 * Size)) = value;
    }

    public ushort UsedIdx => Volatile.Read(ref *(ushort*)(Host(UsedGpa) + 2));

    public ushort UsedFlags => *(ushort*)Host(UsedGpa);

    public ushort AvailEvent => *(ushort*)(Host(UsedGpa) + 4 + (8 * Size));

    public (uint Id, uint Len) Used(int slot)
    {
        var e = (VirtqUsedElem*)(Host(UsedGpa) + 4) + (slot % Size);
        return (e->Id, e->Len);
    }

    public void Dispose()
    {
        _map.Dispose();
        Fd.Close(_fd);
    }
}
