namespace VhostBackend.Virtio;

/// <summary>
/// The driver side of a packed virtqueue (virtio 1.2, 2.8), for a vhost-user front end: one descriptor ring we
/// fill (AVAIL flag = our wrap counter, USED flag = its inverse) and the device overwrites with used descriptors
/// (both flags = its wrap counter), the driver event suppression area (ours: whether and where the device should
/// interrupt us) and the device's (read to decide kicks). This type owns the buffer ids (a free stack), each id's
/// chain length and token, and the two positions with their wrap counters. Owned by one thread; no allocation
/// after construction.
///
/// Memory ordering (the device runs concurrently on another CPU):
/// <list type="bullet">
/// <item>add: every descriptor of a chain but the head is written, then the head's flags with release (the device
/// reads the head's flags with acquire before the rest of the chain).</item>
/// <item>reap: a used descriptor's flags are read with acquire, then its id and length.</item>
/// <item>kick decision and re-arming interrupts: a full fence between our store and the load of the device's field.</item>
/// </list>
/// The device is not trusted: a used descriptor whose id is out of range or not in flight is reported as
/// <see cref="UsedResult.Broken"/>; our position advances by the chain length we recorded for that id, never by
/// anything the device wrote.
/// </summary>
public sealed unsafe class PackedVirtqueueDriver : VirtqueueDriver
{
    private readonly VirtqPackedDesc* _ring;
    private readonly VirtqEventSuppress* _driverEvent;
    private readonly VirtqEventSuppress* _deviceEvent;
    private readonly ushort _size;
    private readonly bool _eventIdx;
    private readonly ushort[] _chainLength; // per id: ring slots its chain takes (0 = not in flight)
    private readonly int[] _token;
    private readonly ushort[] _freeIds;
    private int _freeIdCount;
    private int _freeCount;
    private int _inFlight;
    private ushort _nextAvail;
    private bool _availWrap;
    private ushort _lastUsed;
    private bool _usedWrap;
    private int _addedSinceKick;

    /// <param name="ring">Host address of the descriptor ring (16 * size bytes, 16-aligned).</param>
    /// <param name="driverEvent">Host address of the driver event suppression area (4 bytes, 4-aligned): we write it.</param>
    /// <param name="deviceEvent">Host address of the device event suppression area (4 bytes, 4-aligned): the device writes it.</param>
    public PackedVirtqueueDriver(nint ring, nint driverEvent, nint deviceEvent, ushort size, bool eventIdx)
    {
        if (!SplitVirtqueue.IsValidSize(size))
        {
            throw new ArgumentException($"queue size {size} is not a power of two in 1..{SplitVirtqueue.MaxQueueSize}");
        }

        if ((ring & 15) != 0 || (driverEvent & 3) != 0 || (deviceEvent & 3) != 0)
        {
            throw new ArgumentException("misaligned ring parts");
        }

        _size = size;
        _eventIdx = eventIdx;
        _ring = (VirtqPackedDesc*)ring;
        _driverEvent = (VirtqEventSuppress*)driverEvent;
        _deviceEvent = (VirtqEventSuppress*)deviceEvent;
        _chainLength = new ushort[size];
        _token = new int[size];
        _freeIds = new ushort[size];
        Reset();
    }

    public override ushort Size => _size;
    public override bool EventIdx => _eventIdx;
    public override bool IsPacked => true;
    public override int FreeCount => _freeCount;
    public override int InFlight => _inFlight;

    /// <summary>Both positions 0, both wrap counters 1 (2.8.1), in vhost-user's SET_VRING_BASE layout for packed rings.</summary>
    public override uint InitialVringBase => 0x8000_8000;

    /// <summary>Bytes of the descriptor ring.</summary>
    public static ulong RingBytes(uint size) => 16UL * size;

    /// <summary>Zeroes the ring and both event areas and frees every id (the queue must not be live on the device side).</summary>
    public void Reset()
    {
        new Span<byte>(_ring, (int)RingBytes(_size)).Clear();
        *_driverEvent = default;
        *_deviceEvent = default;
        for (int i = 0; i < _size; i++)
        {
            _chainLength[i] = 0;
            _token[i] = -1;
            _freeIds[i] = (ushort)(_size - 1 - i);
        }

        _freeIdCount = _size;
        _freeCount = _size;
        _inFlight = 0;
        _nextAvail = 0;
        _availWrap = true;
        _lastUsed = 0;
        _usedWrap = true;
        _addedSinceKick = 0;
    }

    /// <summary>Tells the device we poll and want no interrupts (driver event flags = disable).</summary>
    public override void DisableInterrupts()
    {
        if (_driverEvent->Flags != VirtqEventSuppress.Disable)
        {
            Volatile.Write(ref _driverEvent->Flags, VirtqEventSuppress.Disable);
        }
    }

    /// <summary>
    /// Asks for an interrupt at the next used descriptor: with EVENT_IDX the event offset and wrap of our next
    /// used position, then flags = desc; otherwise flags = enable. Returns true when used descriptors arrived
    /// meanwhile: reap them instead of sleeping.
    /// </summary>
    public override bool EnableInterrupts()
    {
        if (_eventIdx)
        {
            Volatile.Write(ref _driverEvent->OffWrap, (ushort)(_lastUsed | (_usedWrap ? 0x8000 : 0)));
            Volatile.Write(ref _driverEvent->Flags, VirtqEventSuppress.Desc);
        }
        else
        {
            Volatile.Write(ref _driverEvent->Flags, VirtqEventSuppress.Enable);
        }

        // Full fence (store-load): either the device sees interrupts enabled or we see its used descriptor.
        Interlocked.MemoryBarrier();
        return HasUsed;
    }

    /// <summary>
    /// Writes a chain into the ring at our next position under one free buffer id, the head's flags last (with
    /// release: that store hands the chain to the device). Returns the id, or -1 when there are not enough free
    /// descriptors or ids (nothing changed).
    /// </summary>
    public override int TryAdd(ReadOnlySpan<DriverBuffer> buffers, int token)
    {
        int n = buffers.Length;
        if (n == 0 || n > _freeCount || _freeIdCount == 0)
        {
            return -1;
        }

        ushort id = _freeIds[--_freeIdCount];
        ushort headPos = _nextAvail;
        ushort headFlags = 0;
        ushort pos = _nextAvail;
        bool wrap = _availWrap;
        for (int i = 0; i < n; i++)
        {
            ref readonly var b = ref buffers[i];
            ushort flags = (ushort)((b.Flags & (VirtqPackedDesc.FlagWrite | VirtqPackedDesc.FlagIndirect))
                | (i < n - 1 ? VirtqPackedDesc.FlagNext : 0)
                | (wrap ? VirtqPackedDesc.FlagAvail : VirtqPackedDesc.FlagUsed));
            VirtqPackedDesc* d = _ring + pos;
            d->Addr = b.Addr;
            d->Len = b.Length;
            d->Id = id;
            if (i == 0)
            {
                headFlags = flags;
            }
            else
            {
                d->Flags = flags;
            }

            if (++pos == _size)
            {
                pos = 0;
                wrap = !wrap;
            }
        }

        _nextAvail = pos;
        _availWrap = wrap;
        _chainLength[id] = (ushort)n;
        _token[id] = token;
        _freeCount -= n;
        _inFlight++;
        _addedSinceKick += n;

        // Release: the rest of the chain (and the request it points to) is visible before the head says "available".
        Volatile.Write(ref _ring[headPos].Flags, headFlags);
        return id;
    }

    /// <summary>Nothing to do: <see cref="TryAdd"/> hands each chain over with its head's flags.</summary>
    public override void Publish()
    {
    }

    /// <summary>
    /// Whether the device wants a kick for the descriptors added since the last call (device event flags:
    /// enable, disable, or with EVENT_IDX desc = kick when the event offset lies in what we added).
    /// </summary>
    public override bool NeedsKick()
    {
        int added = _addedSinceKick;
        if (added == 0)
        {
            return false;
        }

        _addedSinceKick = 0;

        // Full fence: our descriptor stores must be visible before we read the device's suppression area.
        Interlocked.MemoryBarrier();
        ushort flags = Volatile.Read(ref _deviceEvent->Flags);
        if (flags != VirtqEventSuppress.Desc || !_eventIdx)
        {
            return flags != VirtqEventSuppress.Disable;
        }

        ushort offWrap = Volatile.Read(ref _deviceEvent->OffWrap);
        int eventIdx = offWrap & 0x7FFF;
        if (((offWrap & 0x8000) != 0) != _availWrap)
        {
            eventIdx -= _size;
        }

        // As vring_need_event(event, new, old) in 16-bit arithmetic, positions taken in the current lap.
        ushort newIdx = _nextAvail;
        ushort oldIdx = (ushort)(newIdx - added);
        return SplitVirtqueue.NeedEvent((ushort)eventIdx, newIdx, oldIdx);
    }

    public override bool HasUsed => IsUsed(Volatile.Read(ref _ring[_lastUsed].Flags));

    /// <summary>Reaps the next used descriptor: the token of the chain its id names, the length the device wrote; frees the id and the chain's slots.</summary>
    public override UsedResult TryPopUsed(out int token, out uint length)
    {
        token = -1;
        length = 0;

        // Acquire: id and length are read only after the flags that published them.
        ushort flags = Volatile.Read(ref _ring[_lastUsed].Flags);
        if (!IsUsed(flags))
        {
            return UsedResult.Empty;
        }

        VirtqPackedDesc* d = _ring + _lastUsed;
        ushort id = d->Id;
        if (id >= _size || _chainLength[id] == 0)
        {
            return UsedResult.Broken;
        }

        int n = _chainLength[id];
        token = _token[id];
        length = d->Len;
        _chainLength[id] = 0;
        _token[id] = -1;
        _freeIds[_freeIdCount++] = id;
        _freeCount += n;
        _inFlight--;
        int next = _lastUsed + n;
        if (next >= _size)
        {
            next -= _size;
            _usedWrap = !_usedWrap;
        }

        _lastUsed = (ushort)next;
        return UsedResult.Popped;
    }

    /// <summary>A descriptor the device has used in the current lap: AVAIL and USED bits both equal our used wrap counter.</summary>
    private bool IsUsed(ushort flags)
    {
        bool avail = (flags & VirtqPackedDesc.FlagAvail) != 0;
        bool used = (flags & VirtqPackedDesc.FlagUsed) != 0;
        return avail == used && used == _usedWrap;
    }
}
