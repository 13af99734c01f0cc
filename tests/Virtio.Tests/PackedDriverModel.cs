using VhostBackend.Platform;

namespace VhostBackend.Virtio.Tests;

/// <summary>
/// A model of a packed-ring virtio driver (the guest side, as Linux's virtio_ring.c behaves: buffer id in every
/// descriptor of a chain, the head's flags written last with release, used descriptors consumed in ring order and
/// skipping the chain length of the id they carry) for tests. Guest memory is a memfd split into two regions,
/// contiguous in guest-physical space; the ring and the two event suppression areas sit at its start. Not a real driver.
/// </summary>
internal sealed unsafe class PackedDriverModel : IDisposable
{
    public const ulong GpaBase = 0x100000;
    public const ulong UvaBase = 0x7f00_0000_0000;
    public const ulong RegionSize = 1 << 20;

    private readonly int _fd;
    private readonly MappedRegion _map;
    private readonly ushort[] _chainLength;
    private ulong _next;
    private ushort _availPos;
    private bool _availWrap = true;
    private ushort _usedPos;
    private bool _usedWrap = true;

    public PackedDriverModel(ushort size = 16, bool eventIdx = false)
    {
        Size = size;
        EventIdx = eventIdx;
        _chainLength = new ushort[size];
        _fd = MappedRegion.CreateMemFd("packed-model", (long)(2 * RegionSize), true);
        _map = MappedRegion.Map(_fd, 2 * RegionSize);
        Memory = new GuestMemory(
        [
            new GuestMemoryRegion(GpaBase, RegionSize, UvaBase, 0, _map.Pointer),
            new GuestMemoryRegion(GpaBase + RegionSize, RegionSize, UvaBase + RegionSize, RegionSize, _map.Pointer + (nint)RegionSize),
        ]);
        RingGpa = GpaBase;
        DriverEventGpa = RingGpa + PackedVirtqueue.RingBytes(size);
        DeviceEventGpa = DriverEventGpa + 4;
        _next = DriverEventGpa + 4096;
    }

    public ushort Size { get; }
    public bool EventIdx { get; }

    /// <summary>The guest memory's memfd (for a vhost-user front end model's SET_MEM_TABLE).</summary>
    public int MemFd => _fd;
    public GuestMemory Memory { get; }
    public ulong RingGpa { get; }
    public ulong DriverEventGpa { get; }
    public ulong DeviceEventGpa { get; }

    /// <summary>Where the driver will put its next chain, and its wrap counter.</summary>
    public ushort AvailPos => _availPos;

    public bool AvailWrap => _availWrap;

    public ulong ToUva(ulong gpa) => gpa - GpaBase + UvaBase;

    public PackedVirtqueue CreateDeviceQueue(uint vringBase = PackedVirtqueue.InitialBase)
    {
        var q = PackedVirtqueue.Create(Memory, Size, ToUva(RingGpa), ToUva(DriverEventGpa), ToUva(DeviceEventGpa), EventIdx, vringBase, out var err);
        return q ?? throw new InvalidOperationException(err);
    }

    public byte* Host(ulong gpa) => (byte*)_map.Pointer + (gpa - GpaBase);

    public ulong Alloc(int len, ulong align = 16)
    {
        _next = (_next + align - 1) & ~(align - 1);
        ulong a = _next;
        _next += (ulong)len;
        if (_next > GpaBase + (2 * RegionSize))
        {
            throw new InvalidOperationException("model memory exhausted");
        }

        return a;
    }

    public VirtqPackedDesc* Slot(int i) => (VirtqPackedDesc*)Host(RingGpa) + i;

    private ushort AvailFlags(bool wrap) => wrap ? VirtqPackedDesc.FlagAvail : VirtqPackedDesc.FlagUsed;

    /// <summary>Makes a chain available: descriptors in ring order, every one carrying <paramref name="id"/>, the head's flags last.</summary>
    public void Add(ushort id, params (ulong Addr, uint Len, bool Write)[] bufs)
    {
        ushort head = _availPos;
        ushort headFlags = 0;
        for (int i = 0; i < bufs.Length; i++)
        {
            ushort flags = (ushort)((bufs[i].Write ? VirtqPackedDesc.FlagWrite : 0) | (i + 1 < bufs.Length ? VirtqPackedDesc.FlagNext : 0) | AvailFlags(_availWrap));
            var d = Slot(_availPos);
            d->Addr = bufs[i].Addr;
            d->Len = bufs[i].Len;
            d->Id = id;
            if (i == 0)
            {
                headFlags = flags;
            }
            else
            {
                d->Flags = flags;
            }

            if (++_availPos == Size)
            {
                _availPos = 0;
                _availWrap = !_availWrap;
            }
        }

        _chainLength[id] = (ushort)bufs.Length;
        Volatile.Write(ref Slot(head)->Flags, headFlags);
    }

    /// <summary>Makes one indirect descriptor available pointing at a table of <paramref name="bufs"/>.</summary>
    public void AddIndirect(ushort id, params (ulong Addr, uint Len, bool Write)[] bufs)
    {
        ulong table = Alloc(16 * bufs.Length);
        var t = (VirtqPackedDesc*)Host(table);
        for (int i = 0; i < bufs.Length; i++)
        {
            t[i].Addr = bufs[i].Addr;
            t[i].Len = bufs[i].Len;
            t[i].Flags = bufs[i].Write ? VirtqPackedDesc.FlagWrite : (ushort)0;
        }

        AddRaw(id, table, (uint)(16 * bufs.Length), VirtqPackedDesc.FlagIndirect);
    }

    /// <summary>One descriptor with the given flags (plus this lap's AVAIL/USED bits): for hostile-driver tests.</summary>
    public void AddRaw(ushort id, ulong addr, uint len, ushort flags)
    {
        var d = Slot(_availPos);
        d->Addr = addr;
        d->Len = len;
        d->Id = id;
        if (id < Size)
        {
            _chainLength[id] = 1;
        }

        Volatile.Write(ref d->Flags, (ushort)(flags | AvailFlags(_availWrap)));
        if (++_availPos == Size)
        {
            _availPos = 0;
            _availWrap = !_availWrap;
        }
    }

    /// <summary>Takes the next used descriptor, if the device wrote one (both flags equal to our used wrap counter).</summary>
    public bool TryGetUsed(out ushort id, out uint len)
    {
        var d = Slot(_usedPos);
        ushort flags = Volatile.Read(ref d->Flags);
        bool avail = (flags & VirtqPackedDesc.FlagAvail) != 0, used = (flags & VirtqPackedDesc.FlagUsed) != 0;
        if (avail != _usedWrap || used != _usedWrap)
        {
            id = 0;
            len = 0;
            return false;
        }

        id = d->Id;
        len = d->Len;
        int next = _usedPos + _chainLength[id];
        if (next >= Size)
        {
            next -= Size;
            _usedWrap = !_usedWrap;
        }

        _usedPos = (ushort)next;
        return true;
    }

    public ushort UsedPos => _usedPos;

    public bool UsedWrap => _usedWrap;

    /// <summary>The driver event suppression area (written by the driver: when it wants interrupts).</summary>
    public void SetDriverEvent(ushort flags, ushort offWrap = 0)
    {
        var e = (VirtqEventSuppress*)Host(DriverEventGpa);
        e->OffWrap = offWrap;
        Volatile.Write(ref e->Flags, flags);
    }

    /// <summary>The device event suppression area's flags (written by the device: whether it wants kicks).</summary>
    public ushort DeviceEventFlags => Volatile.Read(ref ((VirtqEventSuppress*)Host(DeviceEventGpa))->Flags);

    public void Dispose()
    {
        _map.Dispose();
        Fd.Close(_fd);
    }
}
