namespace VhostBackend.Virtio;

/// <summary>One buffer of a chain handed to <see cref="SplitVirtqueueDriver.TryAdd"/>: a guest-physical address, a length and descriptor flags.</summary>
public readonly struct DriverBuffer
{
    public DriverBuffer(ulong addr, uint length, ushort flags)
    {
        Addr = addr;
        Length = length;
        Flags = flags;
    }

    public ulong Addr { get; }
    public uint Length { get; }

    /// <summary><see cref="VirtqDesc.FlagWrite"/> (device writes it) and/or <see cref="VirtqDesc.FlagIndirect"/>; NEXT is set by the driver.</summary>
    public ushort Flags { get; }
}

/// <summary>Outcome of <see cref="SplitVirtqueueDriver.TryPopUsed"/>.</summary>
public enum UsedResult
{
    Empty,
    Popped,

    /// <summary>The device published a used index more than the queue size ahead, or returned a head that was not in flight.</summary>
    Broken,
}

/// <summary>
/// The driver side of a split virtqueue (virtio 1.1, 2.6): what a guest's virtio driver does, for a vhost-user
/// front end. The ring lives in memory shared with the device; this type owns the descriptor free list and the
/// shadow indices. Owned by one thread (a reactor); no allocation after construction.
///
/// Memory ordering (the device runs concurrently on another CPU):
/// <list type="bullet">
/// <item>publish: descriptors and the avail ring entry are written, then avail.idx with release.</item>
/// <item>reap: used.idx is read with acquire, then the used element it covers.</item>
/// <item>kick decision: a full fence between our avail.idx store and the load of the device's avail_event /
/// used.flags (store-load), as the spec requires.</item>
/// </list>
/// The device is not trusted: a used index too far ahead or a head that is not in flight is reported as
/// <see cref="UsedResult.Broken"/> rather than corrupting the free list.
/// </summary>
public sealed unsafe class SplitVirtqueueDriver : VirtqueueDriver
{
    private const ushort NoHead = 0xFFFF;
    private readonly VirtqDesc* _desc;
    private readonly byte* _avail;
    private readonly byte* _used;
    private readonly SplitRing _ring;
    private readonly ushort _mask;
    private readonly ushort[] _next; // private free-list / chain links: the shared table is never trusted for them
    private readonly ushort[] _chainLength;
    private readonly int[] _token;
    private ushort _freeHead;
    private ushort _availIdx;
    private ushort _publishedIdx;
    private ushort _lastKickIdx;

    /// <param name="desc">Host address of the descriptor table (16 * size bytes, 16-aligned).</param>
    /// <param name="avail">Host address of the avail ring (6 + 2 * size bytes, 2-aligned).</param>
    /// <param name="used">Host address of the used ring (6 + 8 * size bytes, 4-aligned).</param>
    public SplitVirtqueueDriver(nint desc, nint avail, nint used, ushort size, bool eventIdx)
    {
        if (!SplitVirtqueue.IsValidSize(size))
        {
            throw new ArgumentException($"queue size {size} is not a power of two in 1..{SplitVirtqueue.MaxQueueSize}");
        }

        if ((desc & 15) != 0 || (avail & 1) != 0 || (used & 3) != 0)
        {
            throw new ArgumentException("misaligned ring parts");
        }

        Size = size;
        EventIdx = eventIdx;
        _mask = (ushort)(size - 1);
        _desc = (VirtqDesc*)desc;
        _avail = (byte*)avail;
        _used = (byte*)used;
        _ring = new SplitRing(_avail, _used, size);
        _next = new ushort[size];
        _chainLength = new ushort[size];
        _token = new int[size];
        Reset();
    }

    public override ushort Size { get; }
    public override bool EventIdx { get; }
    public override bool IsPacked => false;
    public override uint InitialVringBase => 0;

    /// <summary>Free descriptors.</summary>
    public override int FreeCount => _freeCount;

    private int _freeCount;

    /// <summary>Chains handed to the device and not yet returned.</summary>
    public override int InFlight => _inFlight;

    private int _inFlight;

    /// <summary>Next avail index to write (shadow of avail.idx).</summary>
    public ushort AvailIdx => _availIdx;

    /// <summary>Next used index to consume.</summary>
    public ushort LastUsedIdx { get; private set; }

    /// <summary>Ring bytes for a queue of <paramref name="size"/> entries laid out by <see cref="Layout"/> (used ring 4 KiB aligned like legacy virtio).</summary>
    public static ulong RingBytes(uint size) => Layout(size).Total;

    /// <summary>Offsets of the three parts inside one block: desc at 0, avail after it, used at the next 4 KiB boundary.</summary>
    public static (ulong Desc, ulong Avail, ulong Used, ulong Total) Layout(uint size)
    {
        ulong avail = SplitVirtqueue.DescTableBytes(size);
        ulong used = (avail + SplitVirtqueue.AvailRingBytes(size) + 4095) & ~4095UL;
        ulong total = (used + SplitVirtqueue.UsedRingBytes(size) + 4095) & ~4095UL;
        return (0, avail, used, total);
    }

    /// <summary>Zeroes the ring and rebuilds the free list (the queue must not be live on the device side).</summary>
    public void Reset()
    {
        new Span<byte>(_avail, (int)SplitVirtqueue.AvailRingBytes(Size)).Clear();
        new Span<byte>(_used, (int)SplitVirtqueue.UsedRingBytes(Size)).Clear();
        for (int i = 0; i < Size; i++)
        {
            _desc[i] = default;
            _next[i] = (ushort)(i + 1 < Size ? i + 1 : NoHead);
            _chainLength[i] = 0;
            _token[i] = -1;
        }

        _freeHead = 0;
        _freeCount = Size;
        _inFlight = 0;
        _availIdx = 0;
        _publishedIdx = 0;
        _lastKickIdx = 0;
        LastUsedIdx = 0;
    }

    /// <summary>
    /// Tells the device we poll the used ring and want no interrupts: VRING_AVAIL_F_NO_INTERRUPT, and with
    /// EVENT_IDX a used_event the device only crosses once every 65536 completions.
    /// </summary>
    public override void DisableInterrupts()
    {
        Volatile.Write(ref _ring.AvailFlags, SplitVirtqueue.AvailFlagNoInterrupt);
        if (EventIdx)
        {
            Volatile.Write(ref _ring.UsedEvent, (ushort)(LastUsedIdx - 1));
        }
    }

    /// <summary>
    /// Asks the device for an interrupt at the next used entry (a driver about to sleep): VRING_AVAIL_F_NO_INTERRUPT
    /// cleared and, with EVENT_IDX, used_event at the next index. Returns true when used entries arrived meanwhile:
    /// reap them instead of sleeping.
    /// </summary>
    public override bool EnableInterrupts()
    {
        if (EventIdx)
        {
            Volatile.Write(ref _ring.UsedEvent, LastUsedIdx);
        }

        Volatile.Write(ref _ring.AvailFlags, (ushort)0);

        // Full fence: the stores above must be visible before we re-read used.idx (store-load), so either the
        // device sees interrupts enabled or we see its entry.
        Interlocked.MemoryBarrier();
        return HasUsed;
    }

    /// <summary>
    /// Writes a chain of <paramref name="buffers"/> (device-readable first, then device-writable) into free
    /// descriptors and puts its head in the avail ring, unpublished until <see cref="Publish"/>. Returns the head,
    /// or -1 when there are not enough free descriptors (nothing changed).
    /// </summary>
    public override int TryAdd(ReadOnlySpan<DriverBuffer> buffers, int token)
    {
        if (buffers.Length == 0 || buffers.Length > FreeCount)
        {
            return -1;
        }

        ushort head = _freeHead;
        ushort idx = head;
        for (int i = 0; i < buffers.Length; i++)
        {
            ref readonly var b = ref buffers[i];
            VirtqDesc* d = _desc + idx;
            ushort next = _next[idx];
            bool last = i == buffers.Length - 1;
            WriteDesc(d, b.Addr, b.Length, (ushort)((b.Flags & (VirtqDesc.FlagWrite | VirtqDesc.FlagIndirect)) | (last ? 0 : VirtqDesc.FlagNext)), last ? (ushort)0 : next);
            if (last)
            {
                _freeHead = next;
            }
            else
            {
                idx = next;
            }
        }

        _freeCount -= buffers.Length;
        _chainLength[head] = (ushort)buffers.Length;
        _token[head] = token;
        // Compare before writing, as for descriptors: a reused head leaves the avail entry's line shared with the
        // device (at low queue depth the same head comes back every request).
        ref ushort entry = ref _ring.AvailRing(_availIdx & _mask);
        if (entry != head)
        {
            entry = head;
        }

        _availIdx++;
        _inFlight++;
        return head;
    }

    /// <summary>
    /// Writes a descriptor, skipping the store when it already holds these values: a reused head or slot then
    /// leaves its cache line shared with the device instead of pulling it back (one cache-line transfer less per
    /// request at low queue depth). Our own copy is authoritative; the device never writes descriptors.
    /// </summary>
    public static void WriteDesc(VirtqDesc* d, ulong addr, uint len, ushort flags, ushort next)
    {
        if (d->Addr != addr || d->Len != len || d->Flags != flags || d->Next != next)
        {
            d->Addr = addr;
            d->Len = len;
            d->Flags = flags;
            d->Next = next;
        }
    }

    /// <summary>Makes every chain added so far visible to the device (release store of avail.idx).</summary>
    public override void Publish()
    {
        if (_publishedIdx != _availIdx)
        {
            _publishedIdx = _availIdx;
            Volatile.Write(ref _ring.AvailIdx, _availIdx);
        }
    }

    /// <summary>
    /// Whether the device wants a kick for the heads published since the last call (EVENT_IDX: avail_event
    /// crossed; otherwise VRING_USED_F_NO_NOTIFY clear). Call after <see cref="Publish"/>.
    /// </summary>
    public override bool NeedsKick()
    {
        ushort newIdx = _publishedIdx;
        ushort old = _lastKickIdx;
        if (newIdx == old)
        {
            return false;
        }

        _lastKickIdx = newIdx;

        // Full fence: our avail.idx store must be visible before we read the device's suppression field.
        Interlocked.MemoryBarrier();
        if (EventIdx)
        {
            return SplitVirtqueue.NeedEvent(Volatile.Read(ref _ring.AvailEvent), newIdx, old);
        }

        return (Volatile.Read(ref _ring.UsedFlags) & SplitVirtqueue.UsedFlagNoNotify) == 0;
    }

    /// <summary>Whether the device has returned chains we have not reaped (acquire read of used.idx).</summary>
    public override bool HasUsed => Volatile.Read(ref _ring.UsedIdx) != LastUsedIdx;

    /// <summary>Reaps the next used chain: returns its token and the length the device wrote, and frees its descriptors.</summary>
    public override UsedResult TryPopUsed(out int token, out uint length)
    {
        token = -1;
        length = 0;

        // Acquire: the used element is read only after the index that published it.
        ushort usedIdx = Volatile.Read(ref _ring.UsedIdx);
        if (usedIdx == LastUsedIdx)
        {
            return UsedResult.Empty;
        }

        if ((ushort)(usedIdx - LastUsedIdx) > InFlight)
        {
            return UsedResult.Broken;
        }

        VirtqUsedElem e = _ring.UsedRing[LastUsedIdx & _mask];
        if (e.Id >= Size || _chainLength[e.Id] == 0)
        {
            return UsedResult.Broken;
        }

        ushort head = (ushort)e.Id;
        token = _token[head];
        length = e.Len;
        LastUsedIdx++;
        FreeChain(head);
        return UsedResult.Popped;
    }

    private void FreeChain(ushort head)
    {
        int n = _chainLength[head];
        _chainLength[head] = 0;
        _token[head] = -1;

        // Walk our own record of the chain (n links in _next), never the shared table.
        ushort idx = head;
        for (int i = 1; i < n; i++)
        {
            idx = _next[idx];
        }

        _next[idx] = _freeHead;
        _freeHead = head;
        _freeCount += n;
        _inFlight--;
    }
}
