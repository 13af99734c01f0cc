using System.Runtime.CompilerServices;

namespace VhostBackend.Virtio;

/// <summary>Outcome of <see cref="SplitVirtqueue.TryPop"/>.</summary>
public enum PopResult
{
    Empty,
    Popped,

    /// <summary>The driver published an avail index more than the queue size ahead, or a head out of range: the queue is broken.</summary>
    Broken,
}

/// <summary>
/// The device side of a split virtqueue (virtio 1.1, 2.6) living in guest memory. Owned by one reactor: all
/// methods run on that thread. The driver (guest) is hostile: every index read from the rings is validated,
/// every descriptor is copied once before use, and every address is translated with bounds checks.
///
/// Memory ordering (the driver runs concurrently on other CPUs):
/// <list type="bullet">
/// <item>pop: read avail.idx with acquire, then the ring entry and descriptors (they were written before idx).</item>
/// <item>push: write the used element, then avail.idx with release (element visible before the index).</item>
/// <item>notify decision and re-arming: a full fence between our store (used.idx / avail_event / flags) and the
/// load of the driver's field (used_event / avail.flags / avail.idx), the store-load pairing the spec requires.</item>
/// </list>
/// </summary>
public sealed unsafe class SplitVirtqueue : DeviceVirtqueue
{
    public const int MaxQueueSize = 32768;
    public const ushort AvailFlagNoInterrupt = 1;
    public const ushort UsedFlagNoNotify = 1;

    private readonly VirtqDesc* _desc;
    private readonly SplitRing _ring;
    private readonly ushort _mask;
    private readonly GuestMemory _memory;
    private ushort _signalledUsed;
    private ushort _publishedUsed;
    private bool _signalledUsedValid;
    private bool _notifyEnabled;
    private ushort _lastUsed;

    private SplitVirtqueue(GuestMemory memory, ushort size, nint desc, nint avail, nint used, bool eventIdx, ushort lastAvail)
    {
        _memory = memory;
        Size = size;
        _mask = (ushort)(size - 1);
        _desc = (VirtqDesc*)desc;
        _ring = new SplitRing((byte*)avail, (byte*)used, size);
        EventIdx = eventIdx;
        LastAvailIdx = lastAvail;

        // The used index the driver sees is our starting point (equal to lastAvail after a clean stop).
        _lastUsed = Volatile.Read(ref _ring.UsedIdx);
        _publishedUsed = _lastUsed;
    }

    public override ushort Size { get; }
    public override bool EventIdx { get; }
    public override bool IsPacked => false;
    public override GuestMemory Memory => _memory;

    /// <summary>Next avail ring slot to consume (GET/SET_VRING_BASE).</summary>
    public ushort LastAvailIdx { get; private set; }

    /// <summary>Next used ring slot to fill (shadow of used.idx).</summary>
    public override ushort LastUsedIdx => _lastUsed;

    public override uint VringBase => LastAvailIdx;

    /// <summary>Byte sizes of the three parts for a queue of <paramref name="size"/> entries (with the event-idx fields).</summary>
    public static ulong DescTableBytes(uint size) => 16UL * size;

    public static ulong AvailRingBytes(uint size) => 6 + (2UL * size);

    public static ulong UsedRingBytes(uint size) => 6 + (8UL * size);

    public static bool IsValidSize(uint size) => size is > 0 and <= MaxQueueSize && (size & (size - 1)) == 0;

    /// <summary>
    /// Validates and maps a ring whose parts are given as front-end virtual addresses (SET_VRING_ADDR). Each part
    /// must be aligned as the spec requires (16 / 2 / 4) and lie entirely inside one mapped region.
    /// </summary>
    public static SplitVirtqueue? Create(GuestMemory memory, uint size, ulong descUva, ulong availUva, ulong usedUva, bool eventIdx, ushort lastAvailIdx, out string error)
    {
        if (!IsValidSize(size))
        {
            error = $"queue size {size} is not a power of two in 1..{MaxQueueSize}";
            return null;
        }

        if ((descUva & 15) != 0 || (availUva & 1) != 0 || (usedUva & 3) != 0)
        {
            error = $"misaligned ring addresses desc 0x{descUva:x} avail 0x{availUva:x} used 0x{usedUva:x}";
            return null;
        }

        if (!memory.TryTranslateUva(descUva, DescTableBytes(size), out nint desc)
            || !memory.TryTranslateUva(availUva, AvailRingBytes(size), out nint avail)
            || !memory.TryTranslateUva(usedUva, UsedRingBytes(size), out nint used))
        {
            error = $"ring addresses desc 0x{descUva:x} avail 0x{availUva:x} used 0x{usedUva:x} (size {size}) are not inside mapped guest memory";
            return null;
        }

        error = "";
        return new SplitVirtqueue(memory, (ushort)size, desc, avail, used, eventIdx, lastAvailIdx);
    }

    /// <summary>Like <see cref="Create"/> but with guest physical addresses (used by tests and front ends without a user address space).</summary>
    public static SplitVirtqueue? CreateFromGpa(GuestMemory memory, uint size, ulong descGpa, ulong availGpa, ulong usedGpa, bool eventIdx, ushort lastAvailIdx, out string error)
    {
        if (!IsValidSize(size) || (descGpa & 15) != 0 || (availGpa & 1) != 0 || (usedGpa & 3) != 0
            || !memory.TryTranslateGpa(descGpa, DescTableBytes(size), out nint desc)
            || !memory.TryTranslateGpa(availGpa, AvailRingBytes(size), out nint avail)
            || !memory.TryTranslateGpa(usedGpa, UsedRingBytes(size), out nint used))
        {
            error = "bad ring size, alignment or address";
            return null;
        }

        error = "";
        return new SplitVirtqueue(memory, (ushort)size, desc, avail, used, eventIdx, lastAvailIdx);
    }

    /// <summary>Whether the driver has published heads we have not consumed (acquire read of avail.idx).</summary>
    public override bool HasAvailable => Volatile.Read(ref _ring.AvailIdx) != LastAvailIdx;

    /// <summary>Consumes the next available head, if any.</summary>
    public override PopResult TryPop(out ushort head)
    {
        head = 0;

        // Acquire: the ring entry (and the descriptors) are read only after the index that published them.
        ushort availIdx = Volatile.Read(ref _ring.AvailIdx);
        if (availIdx == LastAvailIdx)
        {
            return PopResult.Empty;
        }

        if ((ushort)(availIdx - LastAvailIdx) > Size)
        {
            return PopResult.Broken;
        }

        ushort h = Volatile.Read(ref _ring.AvailRing(LastAvailIdx & _mask));
        if (h >= Size)
        {
            return PopResult.Broken;
        }

        LastAvailIdx++;
        if (EventIdx && _notifyEnabled)
        {
            // Keep asking for a kick at the next new head while notifications are armed.
            Volatile.Write(ref _ring.AvailEvent, LastAvailIdx);
            LogUsedArea(4 + (8UL * Size), 2);
        }

        head = h;
        return PopResult.Popped;
    }

    /// <summary>
    /// Walks the chain starting at <paramref name="head"/> into <paramref name="segments"/>, splitting buffers
    /// that cross memory regions. Bounded: at most one pass over the table (or the indirect table), no nested
    /// indirect tables, readable buffers before writable ones.
    /// </summary>
    public override ChainError WalkChain(ushort head, Span<DescSegment> segments, out ChainInfo info)
    {
        info = default;
        info.FirstWritable = -1;
        VirtqDesc* table = _desc;
        uint tableSize = Size;
        uint index = head;
        uint ttl = tableSize;
        bool inIndirect = false;
        ulong readable = 0;
        ulong writable = 0;
        int count = 0;
        while (true)
        {
            if (index >= tableSize)
            {
                return ChainError.IndexOutOfRange;
            }

            if (ttl == 0)
            {
                return ChainError.TooLong;
            }

            ttl--;

            // Copy once: the driver may change the descriptor under us; everything below uses the copy.
            VirtqDesc d = Unsafe.ReadUnaligned<VirtqDesc>(table + index);
            info.Descriptors++;
            if ((d.Flags & VirtqDesc.FlagIndirect) != 0)
            {
                if (inIndirect)
                {
                    return ChainError.NestedIndirect;
                }

                if ((d.Flags & VirtqDesc.FlagNext) != 0)
                {
                    return ChainError.IndirectWithNext;
                }

                if (d.Len == 0 || (d.Len & 15) != 0 || d.Len / 16 > MaxQueueSize)
                {
                    return ChainError.BadIndirectLength;
                }

                if (!_memory.TryTranslateGpa(d.Addr, d.Len, out nint t))
                {
                    return ChainError.AddressNotMapped;
                }

                table = (VirtqDesc*)t;
                tableSize = d.Len / 16;
                ttl = tableSize;
                index = 0;
                inIndirect = true;
                continue;
            }

            bool w = (d.Flags & VirtqDesc.FlagWrite) != 0;
            if (w)
            {
                if (info.FirstWritable < 0)
                {
                    info.FirstWritable = count;
                }

                writable += d.Len;
            }
            else
            {
                if (info.FirstWritable >= 0)
                {
                    return ChainError.ReadableAfterWritable;
                }

                readable += d.Len;
            }

            if (readable + writable > uint.MaxValue)
            {
                return ChainError.TooLarge;
            }

            ulong addr = d.Addr;
            ulong left = d.Len;
            while (left > 0)
            {
                ulong n = _memory.TranslateGpaPrefix(addr, left, out nint host);
                if (n == 0)
                {
                    return ChainError.AddressNotMapped;
                }

                if (count == segments.Length)
                {
                    return ChainError.TooManySegments;
                }

                segments[count++] = new DescSegment(host, (uint)n, w);
                addr += n;
                left -= n;
            }

            if ((d.Flags & VirtqDesc.FlagNext) == 0)
            {
                break;
            }

            index = d.Next;
        }

        info.SegmentCount = count;
        if (info.FirstWritable < 0)
        {
            info.FirstWritable = count;
        }

        info.ReadableBytes = readable;
        info.WritableBytes = writable;
        return ChainError.None;
    }

    /// <summary>
    /// Writes a used element without publishing it: the driver sees it after <see cref="PublishUsed"/>. Batching
    /// the index store saves a cache-line transfer to the polling driver per request.
    /// </summary>
    public override void AddUsed(ushort head, uint length)
    {
        // Compare before writing: a driver that reuses its heads (a polling driver at low queue depth reuses the
        // same one) finds the element unchanged, and the line stays shared in its cache instead of moving to us and
        // back: two cache-line transfers less per request. Skipping an equal store cannot change what the driver
        // reads; the used.idx release store in PublishUsed still orders what was written.
        var elem = _ring.UsedRing + (_lastUsed & _mask);
        if (elem->Id != head || elem->Len != length)
        {
            elem->Id = head;
            elem->Len = length;
            LogUsedArea(4 + (8UL * (ulong)(_lastUsed & _mask)), 8);
        }

        _lastUsed++;
    }

    /// <summary>Publishes every element added since the last call (one used.idx store).</summary>
    public override void PublishUsed()
    {
        if (_publishedUsed == _lastUsed)
        {
            return;
        }

        _publishedUsed = _lastUsed;

        // Release: the elements written before are visible to the driver before the index that publishes them.
        Volatile.Write(ref _ring.UsedIdx, _lastUsed);
        LogUsedArea(2, 2);
    }

    /// <summary>
    /// Whether the driver wants an interrupt for the used entries published since the last call (EVENT_IDX:
    /// used_event crossed; otherwise: VRING_AVAIL_F_NO_INTERRUPT clear).
    /// </summary>
    public override bool NeedsNotify()
    {
        // Full fence: our used.idx store must be visible before we read used_event / avail.flags, or the
        // driver could re-enable interrupts after our read and miss the entry (store-load ordering).
        Interlocked.MemoryBarrier();
        if (!EventIdx)
        {
            return (Volatile.Read(ref _ring.AvailFlags) & AvailFlagNoInterrupt) == 0;
        }

        ushort newIdx = LastUsedIdx;
        ushort old = _signalledUsed;
        bool valid = _signalledUsedValid;
        _signalledUsed = newIdx;
        _signalledUsedValid = true;
        if (!valid)
        {
            return true;
        }

        return NeedEvent(Volatile.Read(ref _ring.UsedEvent), newIdx, old);
    }

    /// <summary>The spec's vring_need_event: whether <paramref name="eventIdx"/> lies in (old, new].</summary>
    public static bool NeedEvent(ushort eventIdx, ushort newIdx, ushort oldIdx) =>
        (ushort)(newIdx - eventIdx - 1) < (ushort)(newIdx - oldIdx);

    /// <summary>
    /// Asks the driver to kick us on new heads (interrupt mode). Returns true when heads arrived meanwhile, in
    /// which case the caller must poll instead of sleeping.
    /// </summary>
    public override bool EnableNotify()
    {
        _notifyEnabled = true;
        if (EventIdx)
        {
            Volatile.Write(ref _ring.AvailEvent, LastAvailIdx);
            LogUsedArea(4 + (8UL * Size), 2);
        }
        else
        {
            Volatile.Write(ref _ring.UsedFlags, (ushort)(Volatile.Read(ref _ring.UsedFlags) & ~UsedFlagNoNotify));
            LogUsedArea(0, 2);
        }

        // Full fence: the store above must be visible before we re-read avail.idx (store-load), so either the
        // driver sees notifications enabled or we see its new head.
        Interlocked.MemoryBarrier();
        return HasAvailable;
    }

    /// <summary>Tells the driver not to kick (polling). With EVENT_IDX the stale avail_event already suppresses kicks.</summary>
    public override void DisableNotify()
    {
        _notifyEnabled = false;
        if (!EventIdx)
        {
            Volatile.Write(ref _ring.UsedFlags, (ushort)(Volatile.Read(ref _ring.UsedFlags) | UsedFlagNoNotify));
            LogUsedArea(0, 2);
        }
    }
}
