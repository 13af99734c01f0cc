namespace VhostBackend.Virtio;

/// <summary>
/// The device side of a virtqueue, whatever its layout: split (<see cref="SplitVirtqueue"/>, virtio 1.2, 2.7) or
/// packed (<see cref="PackedVirtqueue"/>, 2.8). Device queues (src/Vhost) see only this: they pop a buffer id,
/// walk its chain into host segments, and return it as used. Owned by one reactor; the driver is hostile, so every
/// implementation validates what it reads from the rings and bounds every walk.
///
/// Contract shared by both layouts: <see cref="WalkChain"/> is called for a popped id before anything is completed
/// after it was popped (a packed ring's used descriptors overwrite the slots of chains already walked), and
/// <see cref="AddUsed"/> gets each popped id exactly once.
/// </summary>
public abstract class DeviceVirtqueue
{
    private DirtyLog? _dirtyLog;

    /// <summary>The dirty log this queue marks its writes in (live migration), or null.</summary>
    public DirtyLog? DirtyLog => _dirtyLog;

    /// <summary>Whether the ring's own writes (used entries, notification fields) are logged too (VHOST_VRING_F_LOG).</summary>
    private protected bool LogRing { get; private set; }

    /// <summary>The guest address the used area's writes are logged at (vhost_vring_addr.log_guest_addr).</summary>
    private protected ulong RingLogGpa { get; private set; }

    /// <summary>
    /// Turns dirty logging on before the queue starts (the session restarts queues when logging changes, so a
    /// running queue never sees this change).
    /// </summary>
    public void SetDirtyLog(DirtyLog? log, bool logRing, ulong ringLogGpa)
    {
        _dirtyLog = log;
        LogRing = log is not null && logRing;
        RingLogGpa = ringLogGpa;
        OnDirtyLogSet();
    }

    private protected virtual void OnDirtyLogSet()
    {
    }

    /// <summary>
    /// Marks the device-writable segments [<paramref name="from"/>, <paramref name="to"/>) of a chain as dirty: called
    /// once the device wrote them and before their buffer is returned as used. No-op when logging is off.
    /// </summary>
    public void LogWrites(ReadOnlySpan<DescSegment> segments, int from, int to)
    {
        if (_dirtyLog is not { } log)
        {
            return;
        }

        var memory = Memory;
        for (int i = Math.Max(0, from); i < to && i < segments.Length; i++)
        {
            if (segments[i].Writable && memory.TryHostToGpa(segments[i].Host, out ulong gpa))
            {
                log.Mark(gpa, segments[i].Length);
            }
        }
    }

    /// <summary>Logs a ring write at <paramref name="offset"/> bytes into the used area (split) when ring logging is on.</summary>
    private protected void LogUsedArea(ulong offset, ulong length)
    {
        if (LogRing)
        {
            _dirtyLog!.Mark(RingLogGpa + offset, length);
        }
    }

    /// <summary>Logs a ring write at a guest-physical address (packed: the descriptor ring) when ring logging is on.</summary>
    private protected void LogRingGpa(ulong gpa, ulong length)
    {
        if (LogRing)
        {
            _dirtyLog!.Mark(gpa, length);
        }
    }

    /// <summary>Descriptors in the ring (the split table size, or the packed ring size).</summary>
    public abstract ushort Size { get; }

    /// <summary>Whether VIRTIO_F_RING_EVENT_IDX was negotiated.</summary>
    public abstract bool EventIdx { get; }

    /// <summary>True for the packed layout.</summary>
    public abstract bool IsPacked { get; }

    public abstract GuestMemory Memory { get; }

    /// <summary>
    /// The value GET_VRING_BASE returns once the queue is stopped (vhost-user.rst): the next avail index for a split
    /// ring; for a packed ring bits 0-14 the next descriptor to process, bit 15 the driver ring wrap counter, bits
    /// 16-30 the next used slot, bit 31 the device ring wrap counter.
    /// </summary>
    public abstract uint VringBase { get; }

    /// <summary>Next used slot to fill (split: shadow of used.idx; packed: ring position).</summary>
    public abstract ushort LastUsedIdx { get; }

    /// <summary>Whether the driver has made buffers available that we have not consumed.</summary>
    public abstract bool HasAvailable { get; }

    /// <summary>Consumes the next available buffer, if any; <paramref name="head"/> is its id (split: the head index).</summary>
    public abstract PopResult TryPop(out ushort head);

    /// <summary>Walks the chain of a popped buffer into <paramref name="segments"/> (bounded, every address translated).</summary>
    public abstract ChainError WalkChain(ushort head, Span<DescSegment> segments, out ChainInfo info);

    /// <summary>Returns a buffer to the driver with <paramref name="length"/> bytes written; visible after <see cref="PublishUsed"/> at the latest.</summary>
    public abstract void AddUsed(ushort head, uint length);

    /// <summary>Makes every used buffer added so far visible to the driver.</summary>
    public abstract void PublishUsed();

    /// <summary>Returns <paramref name="head"/> as used and publishes it.</summary>
    public void PushUsed(ushort head, uint length)
    {
        AddUsed(head, length);
        PublishUsed();
    }

    /// <summary>Whether the driver wants an interrupt for the buffers published since the last call.</summary>
    public abstract bool NeedsNotify();

    /// <summary>Asks the driver to kick on new buffers; true when buffers arrived meanwhile (poll instead of sleeping).</summary>
    public abstract bool EnableNotify();

    /// <summary>Tells the driver not to kick (we poll).</summary>
    public abstract void DisableNotify();

    /// <summary>
    /// Appends the host segments of one guest buffer [<paramref name="addr"/>, +<paramref name="len"/>) (split where
    /// it crosses memory regions) and keeps the chain's running totals; the rules both layouts share: readable
    /// before writable, at most 4 GiB in all, no more segments than the caller's buffer.
    /// </summary>
    private protected static ChainError AppendBuffer(GuestMemory memory, ulong addr, uint len, bool writable, Span<DescSegment> segments, ref ChainInfo info, ref int count)
    {
        if (writable)
        {
            if (info.FirstWritable < 0)
            {
                info.FirstWritable = count;
            }

            info.WritableBytes += len;
        }
        else
        {
            if (info.FirstWritable >= 0)
            {
                return ChainError.ReadableAfterWritable;
            }

            info.ReadableBytes += len;
        }

        if (info.ReadableBytes + info.WritableBytes > uint.MaxValue)
        {
            return ChainError.TooLarge;
        }

        ulong left = len;
        while (left > 0)
        {
            ulong n = memory.TranslateGpaPrefix(addr, left, out nint host);
            if (n == 0)
            {
                return ChainError.AddressNotMapped;
            }

            if (count == segments.Length)
            {
                return ChainError.TooManySegments;
            }

            segments[count++] = new DescSegment(host, (uint)n, writable);
            addr += n;
            left -= n;
        }

        return ChainError.None;
    }
}
