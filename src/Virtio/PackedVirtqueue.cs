using System.Runtime.CompilerServices;

namespace VhostBackend.Virtio;

/// <summary>
/// The device side of a packed virtqueue (virtio 1.2, 2.8) living in guest memory: one descriptor ring that the
/// driver fills (AVAIL flag = its wrap counter, USED flag = its inverse) and the device overwrites with used
/// descriptors (both flags = the device's wrap counter), plus two event suppression areas (the driver's, read here
/// to decide interrupts; the device's, written here to ask for or suppress kicks). Owned by one reactor.
///
/// The driver is hostile: a buffer id must be below the ring size, a chain is at most the ring size long (counted
/// at pop, so a chain whose NEXT flags never end cannot loop), an indirect descriptor must stand alone and its table
/// be a non-empty multiple of 16 bytes, every address is translated with bounds checks, and each descriptor is
/// copied once before use. A duplicate id from a broken driver costs only that driver its own accounting: our
/// per-id state is overwritten, never indexed out of range.
///
/// Memory ordering: pop reads the head's flags with acquire before anything else of the chain (the driver writes
/// the head's flags last, with release); a used descriptor's id and length are written before its flags, which are
/// stored with release; the notify decision and re-arming put a full fence between our store and the load of the
/// driver's field.
/// </summary>
public sealed unsafe class PackedVirtqueue : DeviceVirtqueue
{
    private readonly VirtqPackedDesc* _ring;
    private readonly VirtqEventSuppress* _driverEvent;
    private readonly VirtqEventSuppress* _deviceEvent;
    private readonly GuestMemory _memory;
    private readonly ushort _size;
    private readonly bool _eventIdx;

    // Per buffer id: where its chain starts and how many ring slots it takes (the used descriptor skips that many).
    private readonly ushort[] _idStart;
    private readonly ushort[] _idCount;

    // Chains recovered from the in-flight buffer (a previous back end took them; their ring slots may be reused
    // since): walked from these copies instead of the ring. Allocated only when something was restored.
    private VirtqPackedDesc[]?[]? _restored;

    private ulong _ringGpa;
    private ulong _deviceEventGpa;
    private ushort _lastAvail;
    private bool _availWrap;
    private ushort _usedIdx;
    private bool _usedWrap;
    private ushort _signalledUsed;
    private bool _signalledWrap;
    private bool _signalledValid;

    private PackedVirtqueue(GuestMemory memory, ushort size, nint ring, nint driverEvent, nint deviceEvent, bool eventIdx, uint vringBase)
    {
        _memory = memory;
        _size = size;
        _ring = (VirtqPackedDesc*)ring;
        _driverEvent = (VirtqEventSuppress*)driverEvent;
        _deviceEvent = (VirtqEventSuppress*)deviceEvent;
        _eventIdx = eventIdx;
        _idStart = new ushort[size];
        _idCount = new ushort[size];
        _lastAvail = (ushort)((vringBase & 0x7FFF) % size);
        _availWrap = (vringBase & 0x8000) != 0;
        _usedIdx = (ushort)(((vringBase >> 16) & 0x7FFF) % size);
        _usedWrap = (vringBase & 0x8000_0000) != 0;
    }

    /// <summary>The base a fresh packed ring starts from: both indices 0, both wrap counters 1 (2.8.1).</summary>
    public const uint InitialBase = 0x8000_8000;

    public override ushort Size => _size;
    public override bool EventIdx => _eventIdx;
    public override bool IsPacked => true;
    public override GuestMemory Memory => _memory;

    public override uint VringBase =>
        _lastAvail | (_availWrap ? 0x8000u : 0) | ((uint)_usedIdx << 16) | (_usedWrap ? 0x8000_0000u : 0);

    public override ushort LastUsedIdx => _usedIdx;

    /// <summary>Next descriptor to consume and the driver wrap counter it must carry.</summary>
    public ushort LastAvailIdx => _lastAvail;

    public bool AvailWrapCounter => _availWrap;

    public bool UsedWrapCounter => _usedWrap;

    public static ulong RingBytes(uint size) => 16UL * size;

    /// <summary>Packed rings allow any size up to 32768; we keep the split ring's power-of-two rule (every front end we know uses one).</summary>
    public static bool IsValidSize(uint size) => SplitVirtqueue.IsValidSize(size);

    /// <summary>
    /// Maps a packed ring given as front-end virtual addresses (SET_VRING_ADDR: desc = the descriptor ring, avail =
    /// the driver event suppression area, used = the device event suppression area), each aligned as 2.8.10
    /// requires (16 / 4 / 4) and inside one mapped region. <paramref name="vringBase"/> is SET_VRING_BASE's value.
    /// </summary>
    public static PackedVirtqueue? Create(GuestMemory memory, uint size, ulong ringUva, ulong driverUva, ulong deviceUva, bool eventIdx, uint vringBase, out string error)
    {
        if (!IsValidSize(size))
        {
            error = $"queue size {size} is not a power of two in 1..{SplitVirtqueue.MaxQueueSize}";
            return null;
        }

        if ((ringUva & 15) != 0 || (driverUva & 3) != 0 || (deviceUva & 3) != 0)
        {
            error = $"misaligned packed ring addresses desc 0x{ringUva:x} driver 0x{driverUva:x} device 0x{deviceUva:x}";
            return null;
        }

        if (!memory.TryTranslateUva(ringUva, RingBytes(size), out nint ring)
            || !memory.TryTranslateUva(driverUva, 4, out nint driver)
            || !memory.TryTranslateUva(deviceUva, 4, out nint device))
        {
            error = $"packed ring addresses desc 0x{ringUva:x} driver 0x{driverUva:x} device 0x{deviceUva:x} (size {size}) are not inside mapped guest memory";
            return null;
        }

        error = "";
        return new PackedVirtqueue(memory, (ushort)size, ring, driver, device, eventIdx, vringBase);
    }

    /// <summary>Like <see cref="Create"/> with guest physical addresses (tests and front ends without a user address space).</summary>
    public static PackedVirtqueue? CreateFromGpa(GuestMemory memory, uint size, ulong ringGpa, ulong driverGpa, ulong deviceGpa, bool eventIdx, uint vringBase, out string error)
    {
        if (!IsValidSize(size) || (ringGpa & 15) != 0 || (driverGpa & 3) != 0 || (deviceGpa & 3) != 0
            || !memory.TryTranslateGpa(ringGpa, RingBytes(size), out nint ring)
            || !memory.TryTranslateGpa(driverGpa, 4, out nint driver)
            || !memory.TryTranslateGpa(deviceGpa, 4, out nint device))
        {
            error = "bad ring size, alignment or address";
            return null;
        }

        error = "";
        return new PackedVirtqueue(memory, (ushort)size, ring, driver, device, eventIdx, vringBase);
    }

    /// <summary>Ring writes are logged by guest-physical address: the used descriptors in the ring, the device event area.</summary>
    private protected override void OnDirtyLogSet()
    {
        _memory.TryHostToGpa((nint)_ring, out _ringGpa);
        _memory.TryHostToGpa((nint)_deviceEvent, out _deviceEventGpa);
    }

    private static bool IsAvail(ushort flags, bool wrap) =>
        ((flags & VirtqPackedDesc.FlagAvail) != 0) == wrap && ((flags & VirtqPackedDesc.FlagUsed) != 0) != wrap;

    /// <summary>Whether the descriptor at our position is available in our wrap (acquire read of its flags).</summary>
    public override bool HasAvailable => IsAvail(Volatile.Read(ref _ring[_lastAvail].Flags), _availWrap);

    /// <summary>
    /// Consumes the next available chain: counts its descriptors (bounded by the ring size) and takes the buffer id
    /// from its last one (2.8.6). The chain's slots and length are kept per id for <see cref="WalkChain"/> and
    /// <see cref="AddUsed"/>.
    /// </summary>
    public override PopResult TryPop(out ushort head)
    {
        head = 0;

        // Acquire: the rest of the chain was written before the head's flags.
        if (!IsAvail(Volatile.Read(ref _ring[_lastAvail].Flags), _availWrap))
        {
            return PopResult.Empty;
        }

        ushort start = _lastAvail;
        uint pos = start;
        uint count = 0;
        ushort id;
        while (true)
        {
            if (++count > _size)
            {
                return PopResult.Broken; // NEXT never ends
            }

            ushort flags = Volatile.Read(ref _ring[pos].Flags);
            if ((flags & VirtqPackedDesc.FlagNext) == 0 || (flags & VirtqPackedDesc.FlagIndirect) != 0)
            {
                id = Volatile.Read(ref _ring[pos].Id);
                break;
            }

            if (++pos == _size)
            {
                pos = 0;
            }
        }

        if (id >= _size)
        {
            return PopResult.Broken;
        }

        _idStart[id] = start;
        _idCount[id] = (ushort)count;
        if (_restored is not null)
        {
            _restored[id] = null;
        }
        uint next = start + count;
        if (next >= _size)
        {
            next -= _size;
            _availWrap = !_availWrap;
        }

        _lastAvail = (ushort)next;
        head = id;
        return PopResult.Popped;
    }

    /// <summary>
    /// Walks the chain popped under <paramref name="head"/>: its descriptors in ring order, or the table of its single
    /// indirect descriptor (entries in order, NEXT and INDIRECT ignored in the table as 2.8.19 says, WRITE honoured).
    /// </summary>
    public override ChainError WalkChain(ushort head, Span<DescSegment> segments, out ChainInfo info)
    {
        info = default;
        info.FirstWritable = -1;
        if (head >= _size)
        {
            return ChainError.IndexOutOfRange;
        }

        uint pos = _idStart[head];
        uint n = _idCount[head];
        var restored = _restored?[head];
        int count = 0;
        for (uint i = 0; i < n; i++)
        {
            // Copy once: the driver may change the descriptor under us.
            VirtqPackedDesc d = restored is not null ? restored[i] : Unsafe.ReadUnaligned<VirtqPackedDesc>(_ring + pos);
            info.Descriptors++;
            if ((d.Flags & VirtqPackedDesc.FlagIndirect) != 0)
            {
                if (n != 1 || (d.Flags & VirtqPackedDesc.FlagNext) != 0)
                {
                    return ChainError.IndirectWithNext;
                }

                return WalkIndirect(d, segments, ref info);
            }

            var e = AppendBuffer(_memory, d.Addr, d.Len, (d.Flags & VirtqPackedDesc.FlagWrite) != 0, segments, ref info, ref count);
            if (e != ChainError.None)
            {
                return e;
            }

            if (++pos == _size)
            {
                pos = 0;
            }
        }

        info.SegmentCount = count;
        if (info.FirstWritable < 0)
        {
            info.FirstWritable = count;
        }

        return ChainError.None;
    }

    /// <summary>Ring slots the chain popped (or restored) under <paramref name="id"/> took; 0 for an id out of range.</summary>
    public int ChainLength(ushort id) => id < _size ? _idCount[id] : 0;

    /// <summary>
    /// A copy of descriptor <paramref name="index"/> (0 = the first) of the chain popped under <paramref name="id"/>,
    /// read from its ring slot (for the in-flight buffer, right after the pop); default when out of range.
    /// </summary>
    public VirtqPackedDesc ReadChainDesc(ushort id, int index)
    {
        if (id >= _size || (uint)index >= _idCount[id])
        {
            return default;
        }

        uint pos = _idStart[id] + (uint)index;
        if (pos >= _size)
        {
            pos -= _size;
        }

        return Unsafe.ReadUnaligned<VirtqPackedDesc>(_ring + pos);
    }

    /// <summary>The flags of ring slot <paramref name="slot"/> (acquire; in-flight recovery checks whether a used descriptor was written there).</summary>
    public ushort RingFlags(ushort slot) => Volatile.Read(ref _ring[slot % _size].Flags);

    /// <summary>
    /// Before the queue starts: buffer <paramref name="id"/> is in flight with <paramref name="chain"/> (copies a
    /// previous back end kept in the in-flight buffer, in ring order). It is walked from the copy, its used
    /// descriptor skips <c>chain.Length</c> slots, and a later pop of the same id replaces it.
    /// </summary>
    public void Restore(ushort id, VirtqPackedDesc[] chain)
    {
        ArgumentNullException.ThrowIfNull(chain);
        if (id >= _size || chain.Length == 0 || chain.Length > _size)
        {
            throw new ArgumentException($"bad restored chain: id {id}, {chain.Length} descriptors");
        }

        _restored ??= new VirtqPackedDesc[]?[_size];
        _restored[id] = chain;
        _idStart[id] = 0;
        _idCount[id] = (ushort)chain.Length;
    }

    private ChainError WalkIndirect(in VirtqPackedDesc d, Span<DescSegment> segments, ref ChainInfo info)
    {
        if (d.Len == 0 || (d.Len & 15) != 0 || d.Len / 16 > SplitVirtqueue.MaxQueueSize)
        {
            return ChainError.BadIndirectLength;
        }

        if (!_memory.TryTranslateGpa(d.Addr, d.Len, out nint t))
        {
            return ChainError.AddressNotMapped;
        }

        var table = (VirtqPackedDesc*)t;
        uint entries = d.Len / 16;
        int count = 0;
        for (uint i = 0; i < entries; i++)
        {
            VirtqPackedDesc e = Unsafe.ReadUnaligned<VirtqPackedDesc>(table + i);
            info.Descriptors++;
            var err = AppendBuffer(_memory, e.Addr, e.Len, (e.Flags & VirtqPackedDesc.FlagWrite) != 0, segments, ref info, ref count);
            if (err != ChainError.None)
            {
                return err;
            }
        }

        info.SegmentCount = count;
        if (info.FirstWritable < 0)
        {
            info.FirstWritable = count;
        }

        return ChainError.None;
    }

    /// <summary>
    /// Writes the used descriptor of buffer <paramref name="head"/> at our used position (id and length, then the
    /// flags with release: AVAIL = USED = our wrap counter) and skips as many slots as its chain took (2.8.7).
    /// </summary>
    public override void AddUsed(ushort head, uint length)
    {
        if (head >= _size)
        {
            return; // not an id we popped
        }

        var slot = _ring + _usedIdx;
        slot->Id = head;
        slot->Len = length;
        ushort flags = _usedWrap ? (ushort)(VirtqPackedDesc.FlagAvail | VirtqPackedDesc.FlagUsed) : (ushort)0;
        Volatile.Write(ref slot->Flags, flags);
        LogRingGpa(_ringGpa + (16UL * _usedIdx), 16);

        uint next = _usedIdx + (uint)Math.Max((ushort)1, _idCount[head]);
        if (next >= _size)
        {
            next -= _size;
            _usedWrap = !_usedWrap;
        }

        _usedIdx = (ushort)next;
    }

    /// <summary>Each used descriptor was published by its own flags store.</summary>
    public override void PublishUsed()
    {
    }

    /// <summary>
    /// The driver's event suppression (2.8.10): DISABLE, ENABLE, or (with EVENT_IDX) DESC: an interrupt when the used
    /// descriptor at its offset and wrap counter lies among those written since the last signal.
    /// </summary>
    public override bool NeedsNotify()
    {
        // Full fence: our used flags stores are visible before we read the driver's suppression area.
        Interlocked.MemoryBarrier();
        ushort oldIdx = _signalledUsed;
        bool oldWrap = _signalledWrap;
        bool valid = _signalledValid;
        _signalledUsed = _usedIdx;
        _signalledWrap = _usedWrap;
        _signalledValid = true;

        ushort flags = Volatile.Read(ref _driverEvent->Flags);
        if (flags == VirtqEventSuppress.Disable)
        {
            return false;
        }

        if (flags != VirtqEventSuppress.Desc || !_eventIdx || !valid)
        {
            return flags != VirtqEventSuppress.Disable;
        }

        ushort offWrap = Volatile.Read(ref _driverEvent->OffWrap);

        // Positions on one line: the current lap is [0, size), the previous one [-size, 0).
        int newPos = _usedIdx;
        int oldPos = oldWrap == _usedWrap ? oldIdx : oldIdx - _size;
        if (oldPos >= newPos)
        {
            oldPos -= _size; // a whole lap (or more) since the last signal
        }

        int eventPos = (offWrap & 0x7FFF) - (((offWrap & 0x8000) != 0) == _usedWrap ? 0 : _size);
        return eventPos >= oldPos && eventPos < newPos;
    }

    /// <summary>Asks for kicks (ENABLE in the device area), then re-checks the ring after a full fence.</summary>
    public override bool EnableNotify()
    {
        if (Volatile.Read(ref _deviceEvent->Flags) != VirtqEventSuppress.Enable)
        {
            Volatile.Write(ref _deviceEvent->Flags, VirtqEventSuppress.Enable);
            LogRingGpa(_deviceEventGpa, 4);
        }

        Interlocked.MemoryBarrier();
        return HasAvailable;
    }

    /// <summary>Tells the driver not to kick (DISABLE in the device area).</summary>
    public override void DisableNotify()
    {
        if (Volatile.Read(ref _deviceEvent->Flags) != VirtqEventSuppress.Disable)
        {
            Volatile.Write(ref _deviceEvent->Flags, VirtqEventSuppress.Disable);
            LogRingGpa(_deviceEventGpa, 4);
        }
    }
}
