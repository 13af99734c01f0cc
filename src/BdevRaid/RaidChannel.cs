using System.Diagnostics;
using VhostBackend.Bdev;
using VhostBackend.Platform;
using VhostBackend.Reactors;

namespace VhostBackend.BdevRaid;

/// <summary>
/// One reactor's view of an online array: a channel to each attached base, the per-I/O contexts (a pool that grows to
/// its high-water mark once, then is reused: no allocation and no lock per I/O), the I/O waiting for a base's pool
/// (-ENOMEM) and, while a rebuild copies a window, the writes waiting for it.
///
/// Membership comes from the array's <see cref="RaidLayout"/>: the control path publishes a new one and then visits
/// every channel on its reactor (<see cref="ApplyLayout"/>); a channel also picks up a newer layout at its next
/// submit. A base leaving is first made unusable (no new I/O), and its base channel is released when the last I/O
/// the channel sent it completes; the control path closes the descriptor only when every channel let go
/// (<see cref="BaseAttachment"/>).
/// </summary>
internal sealed class RaidChannel
{
    private const int InitialPool = 128;

    private static readonly BdevIoCompletion s_subDone = static (baseIo, ok, arg) =>
    {
        var sub = (RaidSub)arg!;
        sub.Io.Channel.SubDone(sub, ok, baseIo.Status);
    };

    private readonly RaidBdev _bdev;
    private readonly RaidArray _array;
    private readonly int _n;
    private readonly BdevChannel?[] _base;
    private readonly BaseAttachment?[] _att;
    private readonly SlotMode[] _mode;
    private readonly bool[] _detaching;
    private readonly bool[] _failed;
    private readonly int[] _slotOutstanding;
    private readonly ulong[] _readBlocks;
    private readonly BdevIoWaitEntry[] _wait;
    private readonly List<RaidIo> _all = new(InitialPool);
    private readonly Stack<RaidIo> _free = new(InitialPool);
    private readonly Queue<RaidIo> _noMem = new(16);
    private readonly Queue<RaidIo> _windowQueue = new(16);
    private int _version = -1;
    private uint _readCursor;
    private ulong _lockStart;
    private ulong _lockEnd;
    private int _lockWaiters;
    private Action? _lockAck;
    private bool _destroyed;

    public RaidChannel(RaidBdev bdev, Reactor reactor)
    {
        _bdev = bdev;
        _array = bdev.Array;
        Reactor = reactor;
        _n = bdev.SlotCount;
        _base = new BdevChannel?[_n];
        _att = new BaseAttachment?[_n];
        _mode = new SlotMode[_n];
        _detaching = new bool[_n];
        _failed = new bool[_n];
        _slotOutstanding = new int[_n];
        _readBlocks = new ulong[_n];
        _wait = new BdevIoWaitEntry[_n];
        for (int i = 0; i < _n; i++)
        {
            _wait[i] = new BdevIoWaitEntry(static c => ((RaidChannel)c!).ResumeNoMem(), this);
        }

        for (int i = 0; i < InitialPool; i++)
        {
            Grow();
        }

        ApplyLayout();

        // A rebuild window locked before this channel existed (it was not among the channels visited): honour it.
        var (ls, le) = _array.CurrentWindow;
        _lockStart = ls;
        _lockEnd = le;
    }

    public Reactor Reactor { get; }

    private RaidIo Grow()
    {
        var io = new RaidIo(this, _n);
        _all.Add(io);
        _free.Push(io);
        return io;
    }

    // ---- submission -------------------------------------------------------------------------------------------

    public void Submit(BdevIo parent)
    {
        if (_array.LayoutVersion != _version)
        {
            ApplyLayout();
        }

        if (!_free.TryPop(out var io))
        {
            Grow();
            io = _free.Pop();
        }

        io.Start(parent);
        if (_bdev.Level == RaidLevel.Raid1)
        {
            if (IsWrite(parent.Type) && _lockEnd > _lockStart && Overlaps(parent, _lockStart, _lockEnd))
            {
                io.Queued = true;
                _windowQueue.Enqueue(io); // a rebuild is copying this range: wait for it (no stale data reaches the target)
                return;
            }

            if (parent.Type == BdevIoType.Read && !PickReadSlot(io))
            {
                Finish(io, BdevIoStatus.Failed);
                return;
            }
        }

        Continue(io);
    }

    private static bool IsWrite(BdevIoType t) => t is BdevIoType.Write or BdevIoType.Unmap or BdevIoType.WriteZeroes;

    private static bool Overlaps(BdevIo io, ulong start, ulong end) =>
        io.OffsetBlocks < end && io.OffsetBlocks + io.NumBlocks > start;

    /// <summary>Least outstanding read blocks among operational bases not tried yet; ties go round robin.</summary>
    private bool PickReadSlot(RaidIo io)
    {
        int best = -1;
        ulong min = ulong.MaxValue;
        uint start = _readCursor++;
        for (int k = 0; k < _n; k++)
        {
            int s = (int)((start + (uint)k) % (uint)_n);
            if (_mode[s] == SlotMode.Active && _base[s] is not null && !io.Tried[s] && _readBlocks[s] < min)
            {
                min = _readBlocks[s];
                best = s;
            }
        }

        if (best < 0)
        {
            return false;
        }

        io.ReadSlot = best;
        io.Tried[best] = true;
        io.NextSlot = 0;
        return true;
    }

    /// <summary>Submits the sub-I/Os from <see cref="RaidIo.NextSlot"/> on; stops (and parks) at a base that is out of I/O objects.</summary>
    private void Continue(RaidIo io)
    {
        var parent = io.Parent!;
        for (int s = io.NextSlot; s < _n; s++)
        {
            if (!Range(io, s, out ulong offset, out ulong blocks))
            {
                continue;
            }

            var ch = _base[s]!;
            var desc = _att[s]!.Desc;
            var sub = io.Subs[s];
            int rc = parent.Type switch
            {
                BdevIoType.Read => ch.Read(desc, parent.Iovs, offset, blocks, s_subDone, sub),
                BdevIoType.Write => ch.Write(desc, parent.Iovs, offset, blocks, s_subDone, sub),
                BdevIoType.Compare => ch.Compare(desc, parent.Iovs, offset, blocks, s_subDone, sub),
                BdevIoType.Flush => ch.Flush(desc, offset, blocks, s_subDone, sub),
                BdevIoType.Unmap => ch.Unmap(desc, offset, blocks, s_subDone, sub),
                BdevIoType.WriteZeroes => ch.WriteZeroes(desc, offset, blocks, s_subDone, sub),
                _ => ch.Reset(desc, s_subDone, sub),
            };
            if (rc == -Errno.ENOMEM)
            {
                io.NextSlot = s;
                _noMem.Enqueue(io);
                ch.QueueIoWait(_wait[s]);
                return;
            }

            if (rc != 0)
            {
                SubFailed(io, s, BdevIoStatus.Failed);
                if (parent.Type == BdevIoType.Read && _bdev.Level == RaidLevel.Raid1)
                {
                    if (PickReadSlot(io))
                    {
                        s = -1; // retry from the new read slot (the loop's s++ makes it 0)
                        continue;
                    }
                }

                continue;
            }

            io.Remaining++;
            _slotOutstanding[s]++;
            sub.Counts = _mode[s] == SlotMode.Active; // a rebuild target's success does not make a raid1 write succeed
            if (parent.Type == BdevIoType.Read && _bdev.Level == RaidLevel.Raid1)
            {
                _readBlocks[s] += blocks;
            }
        }

        io.NextSlot = _n;
        if (io.Remaining == 0)
        {
            Finish(io, Result(io));
        }
    }

    /// <summary>The part of the I/O that goes to slot <paramref name="s"/>, if any.</summary>
    private bool Range(RaidIo io, int s, out ulong offset, out ulong blocks)
    {
        var p = io.Parent!;
        offset = 0;
        blocks = 0;
        if (_base[s] is null || _mode[s] == SlotMode.Empty)
        {
            return false;
        }

        if (p.Type == BdevIoType.Reset)
        {
            return _mode[s] == SlotMode.Active || _bdev.Level != RaidLevel.Raid1;
        }

        switch (_bdev.Level)
        {
            case RaidLevel.Raid1:
                offset = p.OffsetBlocks;
                blocks = p.NumBlocks;
                return p.Type is BdevIoType.Read or BdevIoType.Compare ? s == io.ReadSlot : true;
            case RaidLevel.Raid0:
                return Raid0Range(p, s, out offset, out blocks);
            default:
                return ConcatRange(p, s, out offset, out blocks);
        }
    }

    private bool Raid0Range(BdevIo p, int s, out ulong offset, out ulong blocks)
    {
        ulong strip = _bdev.StripBlocks;
        ulong n = (ulong)_n;
        ulong start = p.OffsetBlocks;
        offset = 0;
        blocks = 0;
        if (p.NumBlocks == 0)
        {
            return true; // a flush of nothing: every base
        }

        if (p.Type is BdevIoType.Read or BdevIoType.Write or BdevIoType.Compare)
        {
            // The bdev layer split at strips (optimal I/O boundary), so this stays inside one strip.
            ulong stripIndex = start / strip;
            if (stripIndex % n != (ulong)s)
            {
                return false;
            }

            offset = (stripIndex / n * strip) + (start % strip);
            blocks = p.NumBlocks;
            return true;
        }

        // Unmap, write zeroes, flush: each base gets the contiguous run of its strips the request covers.
        ulong end = start + p.NumBlocks;
        ulong s0 = start / strip, s1 = (end - 1) / strip;
        ulong us = (ulong)s;
        ulong first = s0 + ((us + n - (s0 % n)) % n);
        if (first > s1)
        {
            return false;
        }

        ulong last = s1 - (((s1 % n) + n - us) % n);
        ulong baseStart = (first / n * strip) + (first == s0 ? start % strip : 0);
        ulong baseEnd = (last / n * strip) + (last == s1 ? ((end - 1) % strip) + 1 : strip);
        offset = baseStart;
        blocks = baseEnd - baseStart;
        return true;
    }

    private bool ConcatRange(BdevIo p, int s, out ulong offset, out ulong blocks)
    {
        ulong bs = _bdev.ConcatStarts[s], bl = _bdev.ConcatLengths[s];
        offset = 0;
        blocks = 0;
        if (p.NumBlocks == 0)
        {
            return true;
        }

        ulong start = Math.Max(p.OffsetBlocks, bs);
        ulong end = Math.Min(p.OffsetBlocks + p.NumBlocks, bs + bl);
        if (start >= end)
        {
            return false;
        }

        offset = start - bs;
        blocks = end - start;
        return true;
    }

    private void ResumeNoMem()
    {
        int count = _noMem.Count;
        for (int i = 0; i < count && _noMem.Count > 0; i++)
        {
            var io = _noMem.Dequeue();
            Continue(io);
        }
    }

    // ---- completion -------------------------------------------------------------------------------------------

    private void SubDone(RaidSub sub, bool ok, BdevIoStatus baseStatus)
    {
        var io = sub.Io;
        int s = sub.Slot;
        var parent = io.Parent!;
        io.Remaining--;
        _slotOutstanding[s]--;
        bool raid1 = _bdev.Level == RaidLevel.Raid1;
        if (raid1 && parent.Type == BdevIoType.Read)
        {
            _readBlocks[s] -= parent.NumBlocks;
        }

        if (ok)
        {
            if (sub.Counts)
            {
                io.Succeeded++;
            }
        }
        else
        {
            SubFailed(io, s, baseStatus);
        }

        if (_detaching[s] && _slotOutstanding[s] == 0)
        {
            ReleaseSlot(s);
        }

        if (!ok && raid1 && parent.Type == BdevIoType.Read && io.Remaining == 0)
        {
            // A failed read is retried on another operational base.
            if (PickReadSlot(io))
            {
                Continue(io);
                return;
            }
        }

        if (io.Remaining == 0 && io.NextSlot == _n)
        {
            Finish(io, Result(io));
        }
    }

    private void SubFailed(RaidIo io, int s, BdevIoStatus status)
    {
        io.Failed = true;
        if (status == BdevIoStatus.Miscompare)
        {
            io.Miscompare = true;
        }

        if (_bdev.Level == RaidLevel.Raid1 && _mode[s] != SlotMode.Empty)
        {
            // Stop using the base on this reactor now; the control path removes it from the array (degraded).
            bool target = _mode[s] == SlotMode.Rebuilding;
            _mode[s] = SlotMode.Empty;
            _failed[s] = true;
            _array.Module.ReportFailure(_array, _att[s]!, target);
        }
    }

    private BdevIoStatus Result(RaidIo io)
    {
        if (io.Miscompare)
        {
            return BdevIoStatus.Miscompare;
        }

        if (_bdev.Level != RaidLevel.Raid1)
        {
            return io.Failed ? BdevIoStatus.Failed : BdevIoStatus.Success;
        }

        // raid1: a write (or flush, reset) succeeds when at least one operational base took it; a read when one base answered.
        return io.Succeeded > 0 ? BdevIoStatus.Success : BdevIoStatus.Failed;
    }

    private void Finish(RaidIo io, BdevIoStatus status)
    {
        var parent = io.Parent!;
        if (io.InWindow)
        {
            io.InWindow = false;
            if (--_lockWaiters == 0 && _lockAck is { } ack)
            {
                _lockAck = null;
                ack();
            }
        }

        io.Parent = null;
        _free.Push(io);
        parent.Complete(status);
    }

    // ---- control path (messages on this channel's reactor) ------------------------------------------------------

    /// <summary>Brings the channel's base channels in line with the array's current layout.</summary>
    public void ApplyLayout()
    {
        if (_destroyed)
        {
            return;
        }

        var layout = _array.Layout;
        _version = layout.Version;
        for (int s = 0; s < _n; s++)
        {
            var att = layout.Slots[s];
            if (_att[s] is not null && _att[s] != att && !_detaching[s])
            {
                // Leaving: no new I/O; the base channel goes when the I/O already sent there is back.
                _mode[s] = SlotMode.Empty;
                _detaching[s] = true;
                if (_slotOutstanding[s] == 0)
                {
                    ReleaseSlot(s);
                }
            }

            if (att is not null && _att[s] is null)
            {
                BdevChannel ch;
                try
                {
                    ch = att.Desc.GetIoChannel();
                }
                catch (InvalidOperationException)
                {
                    continue; // the base is being hot-removed (no new channels): this channel never uses it; the layout drops it soon
                }

                att.AddRef();
                _att[s] = att;
                _base[s] = ch;
                _detaching[s] = false;
                _failed[s] = false;
            }

            if (att is not null && _att[s] == att && !_detaching[s])
            {
                // A base this channel saw fail stays unused until the layout drops it.
                _mode[s] = _failed[s] ? SlotMode.Empty : layout.Modes[s];
            }
        }
    }

    private void ReleaseSlot(int s)
    {
        var att = _att[s];
        if (_base[s] is { } ch)
        {
            BdevDesc.PutIoChannel(ch);
        }

        _base[s] = null;
        _att[s] = null;
        _mode[s] = SlotMode.Empty;
        _detaching[s] = false;
        _failed[s] = false;
        att?.Release();
    }

    /// <summary>Locks [start, end) for a rebuild window: new writes there wait; <paramref name="ack"/> runs when the writes already in flight there are done.</summary>
    public void LockWindow(ulong start, ulong end, Action ack)
    {
        _lockStart = start;
        _lockEnd = end;
        int waiters = 0;
        foreach (var io in _all)
        {
            if (io.Parent is { } p && !io.Queued && IsWrite(p.Type) && Overlaps(p, start, end))
            {
                io.InWindow = true;
                waiters++;
            }
        }

        _lockWaiters = waiters;
        if (waiters == 0)
        {
            ack();
        }
        else
        {
            _lockAck = ack;
        }
    }

    /// <summary>Ends the window lock and submits the writes that waited for it.</summary>
    public void UnlockWindow()
    {
        _lockStart = _lockEnd = 0;
        int count = _windowQueue.Count;
        for (int i = 0; i < count; i++)
        {
            var io = _windowQueue.Dequeue();
            io.Queued = false;
            if (_array.LayoutVersion != _version)
            {
                ApplyLayout();
            }

            Continue(io);
        }
    }

    public void Destroy()
    {
        Debug.Assert(_noMem.Count == 0 && _windowQueue.Count == 0, "raid channel destroyed with I/O waiting");
        for (int s = 0; s < _n; s++)
        {
            if (_att[s] is not null)
            {
                ReleaseSlot(s);
            }
        }

        _destroyed = true;
    }
}

/// <summary>Per-I/O state of a raid request (fan-out count, result, read retries), from its channel's pool.</summary>
internal sealed class RaidIo
{
    public RaidIo(RaidChannel channel, int slots)
    {
        Channel = channel;
        Tried = new bool[slots];
        Subs = new RaidSub[slots];
        for (int i = 0; i < slots; i++)
        {
            Subs[i] = new RaidSub(this, i);
        }
    }

    public RaidChannel Channel { get; }
    public RaidSub[] Subs { get; }
    public bool[] Tried { get; }
    public BdevIo? Parent;
    public int NextSlot;
    public int Remaining;
    public int Succeeded;
    public int ReadSlot;
    public bool Failed;
    public bool Miscompare;
    public bool Queued;
    public bool InWindow;

    public void Start(BdevIo parent)
    {
        Parent = parent;
        NextSlot = 0;
        Remaining = 0;
        Succeeded = 0;
        ReadSlot = -1;
        Failed = false;
        Miscompare = false;
        Queued = false;
        InWindow = false;
        System.Array.Clear(Tried);
    }
}

/// <summary>The completion argument of one base I/O: which raid I/O, which slot (preallocated with the raid I/O).</summary>
internal sealed class RaidSub
{
    public RaidSub(RaidIo io, int slot)
    {
        Io = io;
        Slot = slot;
    }

    public RaidIo Io { get; }
    public int Slot { get; }

    /// <summary>Whether this base was operational when the sub-I/O was sent (its success counts for a raid1 write).</summary>
    public bool Counts;
}
