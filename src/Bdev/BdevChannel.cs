using System.Diagnostics;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using VhostBackend.Platform;
using VhostBackend.Reactors;

namespace VhostBackend.Bdev;

/// <summary>
/// A reactor's channel to one bdev: the submit API. Owns a pre-allocated pool of <see cref="BdevIo"/> objects,
/// the module's channel, statistics, deferred completions, the I/O-wait queue, QoS queue and bounce buffers.
/// Used only on its reactor, so nothing here takes a lock.
///
/// Submission contract (like spdk_bdev_readv_blocks): a submit method returns 0 and the completion fires
/// exactly once later on this reactor (never inside the submit call), or it returns a negative errno and
/// the completion never fires. -ENOMEM means the pool is empty: park a <see cref="BdevIoWaitEntry"/> with
/// <see cref="QueueIoWait"/> and resubmit when it is called.
/// </summary>
public sealed class BdevChannel
{
    private const int MaxChildrenInFlight = 8;
    private const nuint MaxBounceBytes = 1 << 20;

    private readonly IoChannel _moduleChannel;
    private readonly Poller _poller;
    private BdevIo? _free;
    private int _freeCount;
    private BdevIo? _deferredHead;
    private BdevIo? _deferredTail;
    private int _submitDepth;
    private BdevIoWaitEntry? _waitHead;
    private BdevIoWaitEntry? _waitTail;
    private bool _resumingWaiters;
    private BdevIo? _qosHead;
    private BdevIo? _qosTail;
    private BdevIo? _splitWaitHead;
    private BdevIo? _splitWaitTail;
    private BdevIo? _nomemHead;
    private BdevIo? _nomemTail;
    private long _nomemRetryAt;
    private readonly List<AlignedBuffer> _bounceFree = new();
    private readonly List<AlignedBuffer> _bounceAll = new();
    internal BdevIoStats Stats;

    /// <summary>This channel's I/Os done by the remap fast path (<see cref="TryRemap"/>): accounted once, here, and
    /// counted in both bdevs' statistics (this bdev's <see cref="Bdev.GetStats"/> adds them to its own, the base's
    /// adds those of every channel remapping into it).</summary>
    internal BdevIoStats RemapStats;

    /// <summary>Latency histogram of <see cref="RemapStats"/> (empty without a remap).</summary>
    internal readonly long[] RemapLatency;

    // Forwarding into this channel's bdev (TryForward): what cannot change while the bdev exists, read once here so a
    // forward checks only what can (QoS, the descriptor, the size) and the I/O's own range and type.
    private readonly bool _acceptsForward;
    private readonly int _forwardTypes; // bit (1 << type) per I/O type the module supports
    private readonly bool _forwardDataWhole; // no transfer limit, boundary or alignment: a read/write is never split or bounced

    // This channel's bdev's remap fast path (Bdev.CreateRemap), null when it has none or its base cannot take it; and
    // what TryRemap needs of it per I/O, read once here (no chain of loads per I/O).
    private readonly BdevRemap? _remap;
    private readonly Bdev? _remapBaseBdev;
    private readonly IoChannel? _remapBaseModule;
    private readonly BdevDesc? _remapDesc;
    private readonly StrongBox<uint[]>? _remapMap; // the remap's extent map, or null
    private readonly int _remapShift;
    private readonly ulong _remapExtentMask; // blocks per extent - 1

    /// <summary>Latency histogram (<see cref="BdevLatencyHistogram"/>), written only on this reactor.</summary>
    internal readonly long[] Latency = new long[BdevLatencyHistogram.Length];

    internal BdevChannel(Bdev bdev, Reactor reactor)
    {
        Bdev = bdev;
        Reactor = reactor;
        _moduleChannel = bdev.GetModuleChannel(reactor);
        for (int i = 0; i < bdev.IoPoolSize; i++)
        {
            var io = new BdevIo(this) { Next = _free };
            _free = io;
            _freeCount++;
        }

        PoolSize = bdev.IoPoolSize;
        _acceptsForward = bdev.AcceptsForwardedIo;
        if (_acceptsForward)
        {
            foreach (var t in Enum.GetValues<BdevIoType>())
            {
                _forwardTypes |= bdev.SupportsIoType(t) ? 1 << (int)t : 0;
            }

            _forwardDataWhole = bdev.MaxTransferBlocks == 0 && bdev.OptimalIoBoundaryBlocks == 0 && bdev.RequiredAlignment <= 1;
        }

        if (bdev.CreateRemap(_moduleChannel) is { } remap && remap.Base.TakesRemap(bdev) && remap.BaseDesc.Bdev == remap.Base.Bdev)
        {
            _remap = remap;
            _remapBaseBdev = remap.Base.Bdev;
            _remapBaseModule = remap.Base._moduleChannel;
            _remapDesc = remap.BaseDesc;
            _remapMap = remap.ExtentMap;
            _remapShift = remap.ExtentShift;
            _remapExtentMask = (1UL << remap.ExtentShift) - 1;
            RemapLatency = new long[BdevLatencyHistogram.Length];
            remap.Base.Bdev.AddRemapSource(this);
        }
        else
        {
            RemapLatency = [];
        }

        _poller = reactor.RegisterPoller("bdev_channel:" + bdev.Name, static c => ((BdevChannel)c!).Poll(), this);
        reactor.SetPollerInterrupt(_poller, -1, static (c, arm) => arm && ((BdevChannel)c!).HasPendingWork);
    }

    public Bdev Bdev { get; }
    public Reactor Reactor { get; }
    internal IoChannel? IoChannel { get; set; }

    /// <summary>I/Os submitted and not yet completed to their callers.</summary>
    public int Outstanding { get; private set; }

    /// <summary>Of <see cref="Outstanding"/>, the I/Os remapped into the base (its <see cref="Bdev.QueueDepth"/> counts
    /// them; kept here, on the caller's channel, so a remapped I/O touches nothing of the base's channel). A module
    /// quiescing its remap waits for it through <see cref="Bdev.RemappedInFlight"/> (read off the reactor).</summary>
    internal int RemapOutstanding;

    public int PoolSize { get; }
    public int FreeIoCount => _freeCount;

    private bool HasPendingWork => _deferredHead is not null || _qosHead is not null || _nomemHead is not null;

    /// <summary>How long an I/O a module answered with NoMemory waits before it is retried when nothing else completes.</summary>
    private static readonly long NomemRetryTicks = Ticks.FromMicroseconds(1000);

    /// <summary>I/Os waiting for a retry after the module answered NoMemory (tests and statistics).</summary>
    public int NoMemoryQueued { get; private set; }

    public int Read(BdevDesc desc, ReadOnlySpan<IoVec> iovs, ulong offsetBlocks, ulong numBlocks, BdevIoCompletion cb, object? arg) =>
        SubmitData(BdevIoType.Read, desc, iovs, offsetBlocks, numBlocks, cb, arg);

    public int Write(BdevDesc desc, ReadOnlySpan<IoVec> iovs, ulong offsetBlocks, ulong numBlocks, BdevIoCompletion cb, object? arg) =>
        SubmitData(BdevIoType.Write, desc, iovs, offsetBlocks, numBlocks, cb, arg);

    public int Compare(BdevDesc desc, ReadOnlySpan<IoVec> iovs, ulong offsetBlocks, ulong numBlocks, BdevIoCompletion cb, object? arg) =>
        SubmitData(BdevIoType.Compare, desc, iovs, offsetBlocks, numBlocks, cb, arg);

    public int Flush(BdevDesc desc, ulong offsetBlocks, ulong numBlocks, BdevIoCompletion cb, object? arg) =>
        SubmitNoData(BdevIoType.Flush, desc, offsetBlocks, numBlocks, cb, arg);

    public int Unmap(BdevDesc desc, ulong offsetBlocks, ulong numBlocks, BdevIoCompletion cb, object? arg) =>
        SubmitNoData(BdevIoType.Unmap, desc, offsetBlocks, numBlocks, cb, arg);

    public int WriteZeroes(BdevDesc desc, ulong offsetBlocks, ulong numBlocks, BdevIoCompletion cb, object? arg) =>
        SubmitNoData(BdevIoType.WriteZeroes, desc, offsetBlocks, numBlocks, cb, arg);

    public int Reset(BdevDesc desc, BdevIoCompletion cb, object? arg) =>
        SubmitNoData(BdevIoType.Reset, desc, 0, 0, cb, arg);

    /// <summary>
    /// Forwarded submit: hands <paramref name="io"/>, an I/O of another bdev whose module is running it on this
    /// reactor (a vbdev: lvol, passthru), to this channel's bdev as the same object, at <paramref name="offsetBlocks"/>
    /// of this bdev, instead of a second <see cref="BdevIo"/> with its own submit, checks, callback and completion.
    /// The base module's completion goes straight to <paramref name="io"/>'s own channel (deferred there when it
    /// comes inside the submit, as any completion); on the way, before anything else (NoMemory retry, split
    /// accounting, the caller's callback), <paramref name="io"/> gets back its offset and the forwarding module's
    /// <see cref="BdevIo.ModuleContext"/> and <see cref="BdevIo.ModuleTag"/> (saved here while the base module uses
    /// them), the I/O is counted in this channel's statistics, and <paramref name="done"/> runs (e.g. a write count a
    /// quiesce waits on). The status is the base module's (NoMemory included: the caller's channel then retries
    /// through the forwarding module). Returns false, touching nothing, when the forward cannot be made: the base's
    /// module did not opt in (<see cref="Bdev.AcceptsForwardedIo"/>), QoS is set on the base, the block sizes
    /// differ, the descriptor is closed, read-only for a write or not of this bdev, the type is not supported, the
    /// range is out of bounds, the base would split it or need a bounce buffer, or <paramref name="io"/> is already
    /// forwarded; the caller then submits a regular I/O. Allocates nothing.
    /// </summary>
    public bool TryForward(BdevDesc desc, BdevIo io, ulong offsetBlocks, Action<BdevIo>? done = null)
    {
        Debug.Assert(Reactor.IsCurrent, "bdev I/O forwarded off its channel's reactor");
        var bdev = Bdev;
        var type = io.Type;
        // The module's consent, its supported types and its split/alignment limits were read when this channel was
        // made (they are fixed for an opted-in module, see Bdev.AcceptsForwardedIo); per I/O only what can change
        // is checked: QoS, the descriptor (closed, read-only), the size (a resize), and the I/O itself.
        if (!_acceptsForward || (_forwardTypes & (1 << (int)type)) == 0 || bdev.Qos is not null || io.ForwardChannel is not null || io.Remapped
            || desc.Bdev != bdev || desc.IsClosed || io.Channel == this || io.Channel.Bdev.BlockSize != bdev.BlockSize)
        {
            return false;
        }

        ulong numBlocks = io.NumBlocks;
        ulong count = bdev.BlockCount;
        if ((type != BdevIoType.Reset && ((numBlocks == 0 && type != BdevIoType.Flush) || offsetBlocks > count || numBlocks > count - offsetBlocks))
            || (type is BdevIoType.Write or BdevIoType.Unmap or BdevIoType.WriteZeroes && !desc.Writable))
        {
            return false;
        }

        ulong saved = io.OffsetBlocks;
        io.OffsetBlocks = offsetBlocks;
        if (!(_forwardDataWhole && type is BdevIoType.Read or BdevIoType.Write)
            && (NeedsSplit(io, out _) || (bdev.RequiredAlignment > 1 && Misaligned(io.Iovs, bdev.RequiredAlignment))))
        {
            io.OffsetBlocks = saved;
            return false;
        }

        io.ForwardChannel = this;
        io.ForwardSavedOffset = saved;
        if (io.ModuleContext is { } context)
        {
            io.ForwardSavedContext = context; // (a forwarding module that keeps its state in ModuleTag saves a store here)
            io.ModuleContext = null;
        }

        io.ForwardSavedTag = io.ModuleTag;
        if (done is not null)
        {
            io.ForwardDone = done; // null already otherwise (EndForward and Reset clear it): no store, no write barrier
        }

        io.ModuleTag = 0;
        Outstanding++;
        bdev.Submit(_moduleChannel, io);
        return true;
    }

    /// <summary>Whether this channel (a base) can take <paramref name="from"/>'s remapped reads and writes without
    /// ever splitting or bouncing them (all fixed while the bdev is registered, see <see cref="Bdev.AcceptsForwardedIo"/>).</summary>
    private bool TakesRemap(Bdev from) =>
        _acceptsForward && _forwardDataWhole && from != Bdev && from.BlockSize == Bdev.BlockSize
        && (_forwardTypes & ((1 << (int)BdevIoType.Read) | (1 << (int)BdevIoType.Write))) == ((1 << (int)BdevIoType.Read) | (1 << (int)BdevIoType.Write));

    /// <summary>Whether this channel has a remap fast path (tests).</summary>
    public bool HasRemap => _remap is not null;

    /// <summary>
    /// The remap fast path (<see cref="BdevRemap"/>): <paramref name="io"/>, checked and admitted on this channel,
    /// goes to the base's module in this same pass at the offset the remap gives (the base's completion comes back
    /// to this channel, <see cref="EndRemap"/> restores the I/O, and the completion accounts it once, in <see cref="RemapStats"/>, which both bdevs' statistics include).
    /// False when the remap says no or the base cannot take it now; nothing is changed then.
    /// </summary>
    /// <remarks>Always inlined into <see cref="Dispatch"/>: left to tiered PGO the JIT inlines it in some processes and
    /// not in others, and a remapped I/O then pays a call (a thin lvol over null, turn by turn against the base,
    /// 8 runs each: median 0.920 called, 0.958 inlined).</remarks>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private bool TryRemap(BdevRemap remap, BdevIo io)
    {
        var type = io.Type;
        var desc = _remapDesc!;
        var baseBdev = _remapBaseBdev!;
        if (type > BdevIoType.Write || baseBdev.Qos is not null || desc.IsClosed
            || (type == BdevIoType.Write && !desc.Writable))
        {
            return false;
        }

        // The extent map first (no call): one read of the published array, an int index. (The remap's answer goes
        // through a local of its own: `at` is not address-taken, so it stays in a register.)
        ulong at;
        uint extent;
        ulong offset = io.OffsetBlocks;
        ulong within = offset & _remapExtentMask;
        if (_remapMap is { } box && box.Value is { } map && within + io.NumBlocks <= _remapExtentMask + 1
            && offset >> _remapShift < (uint)map.Length && (extent = map[(int)(offset >> _remapShift)]) != 0)
        {
            at = ((ulong)extent << _remapShift) + within;
        }
        else if (remap.TryTranslate(io, out ulong translated))
        {
            at = translated;
        }
        else
        {
            return false;
        }

        ulong count = baseBdev.BlockCount;
        if (at > count || io.NumBlocks > count - at)
        {
            return false;
        }

        // No reference is stored in the I/O (no GC write barrier): its base channel is this channel's remap's. Its
        // ModuleTag and ModuleContext are a fresh I/O's (0, null): nothing of the bdev's own module to save.
        io.Remapped = true; // accounted once, in RemapStats, for both bdevs
        io.ForwardSavedOffset = io.OffsetBlocks;
        io.OffsetBlocks = at;
        RemapOutstanding++;
        _submitDepth++; // the base's inline completion is deferred on this channel like any other
        try
        {
            baseBdev.Submit(_remapBaseModule!, io);
        }
        finally
        {
            _submitDepth--;
        }

        return true;
    }

    /// <summary>A remapped I/O (<see cref="TryRemap"/>) came back from the base's module: give it back its offset and
    /// a fresh I/O's module state. A NoMemory is retried through this bdev's module, as a forward or a regular I/O,
    /// and counted there.</summary>
    /// <remarks>Always inlined into <see cref="Finish"/> and the deferred delivery, like <see cref="TryRemap"/>: tiered
    /// PGO left it a call of its own on every remapped completion.</remarks>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private void EndRemap(BdevIo io)
    {
        RemapOutstanding--;
        if (io.Status == BdevIoStatus.NoMemory)
        {
            io.Remapped = false;
        }

        io.OffsetBlocks = io.ForwardSavedOffset;
        if (io.ModuleContext is not null)
        {
            io.ModuleContext = null; // the base module's, if it used it
        }

        io.ModuleTag = 0;
    }

    /// <summary>A forwarded I/O (<see cref="TryForward"/>) came back from this channel's module: count it here and
    /// give it back to its own bdev's module.</summary>
    internal void EndForward(BdevIo io)
    {
        Outstanding--;
        if (io.Status == BdevIoStatus.Success)
        {
            Account(ref Stats, Latency, io, Reactor.Now - io.SubmitTicks);
        }
        else if (io.Status != BdevIoStatus.NoMemory)
        {
            Stats.NumErrors++;
        }

        io.ForwardChannel = null;
        io.OffsetBlocks = io.ForwardSavedOffset;
        if (io.ForwardSavedContext is { } context)
        {
            io.ModuleContext = context;
            io.ForwardSavedContext = null;
        }
        else
        {
            io.ModuleContext = null;
        }

        io.ModuleTag = io.ForwardSavedTag;
        if (io.ForwardDone is { } done)
        {
            io.ForwardDone = null;
            done(io);
        }
    }

    private static bool Misaligned(ReadOnlySpan<IoVec> iovs, nuint align)
    {
        nuint mask = align - 1;
        for (int i = 0; i < iovs.Length; i++)
        {
            if (((nuint)iovs[i].Base & mask) != 0 || (iovs[i].Length & mask) != 0)
            {
                return true;
            }
        }

        return false;
    }

    /// <summary>Parks <paramref name="entry"/> until an I/O object is free. Returns false if it is already queued.</summary>
    public bool QueueIoWait(BdevIoWaitEntry entry)
    {
        if (entry.Queued)
        {
            return false;
        }

        entry.Queued = true;
        entry.Next = null;
        if (_waitTail is null)
        {
            _waitHead = entry;
        }
        else
        {
            _waitTail.Next = entry;
        }

        _waitTail = entry;
        return true;
    }

    private int Check(BdevIoType type, BdevDesc desc, ulong offsetBlocks, ulong numBlocks)
    {
        if (desc.IsClosed || desc.Bdev != Bdev)
        {
            return -Errno.ENODEV;
        }

        if (type is BdevIoType.Write or BdevIoType.Unmap or BdevIoType.WriteZeroes && !desc.Writable)
        {
            return -Errno.EBADF; // as SPDK
        }

        // Every bdev reads (BdevManager.Register checks it): no virtual call for the commonest I/O.
        if (type != BdevIoType.Read && !Bdev.SupportsIoType(type))
        {
            return -Errno.ENOTSUP;
        }

        if (type == BdevIoType.Reset)
        {
            return 0;
        }

        ulong count = Bdev.BlockCount;
        if ((numBlocks == 0 && type != BdevIoType.Flush) || offsetBlocks > count || numBlocks > count - offsetBlocks)
        {
            return -Errno.EINVAL;
        }

        return 0;
    }

    private int SubmitData(BdevIoType type, BdevDesc desc, ReadOnlySpan<IoVec> iovs, ulong offsetBlocks, ulong numBlocks, BdevIoCompletion cb, object? arg)
    {
        Debug.Assert(Reactor.IsCurrent, "bdev I/O submitted off its channel's reactor");
        int rc = Check(type, desc, offsetBlocks, numBlocks);
        if (rc != 0)
        {
            return rc;
        }

        ulong total = 0;
        for (int i = 0; i < iovs.Length; i++)
        {
            ulong len = iovs[i].Length;
            if (len > ulong.MaxValue - total)
            {
                return -Errno.EINVAL; // a wrapping list must never pass as the right length
            }

            total += len;
        }

        if (total != numBlocks * Bdev.BlockSize)
        {
            return -Errno.EINVAL;
        }

        var io = Alloc();
        if (io is null)
        {
            return -Errno.ENOMEM;
        }

        io.Type = type;
        io.OffsetBlocks = offsetBlocks;
        io.NumBlocks = numBlocks;
        io.SetIovs(iovs);
        io.Callback = cb;
        io.CallbackArg = arg;
        Start(io);
        return 0;
    }

    private int SubmitNoData(BdevIoType type, BdevDesc desc, ulong offsetBlocks, ulong numBlocks, BdevIoCompletion cb, object? arg)
    {
        Debug.Assert(Reactor.IsCurrent, "bdev I/O submitted off its channel's reactor");
        int rc = Check(type, desc, offsetBlocks, numBlocks);
        if (rc != 0)
        {
            return rc;
        }

        var io = Alloc();
        if (io is null)
        {
            return -Errno.ENOMEM;
        }

        io.Type = type;
        io.OffsetBlocks = offsetBlocks;
        io.NumBlocks = numBlocks;
        io.SetIovs(default);
        io.Callback = cb;
        io.CallbackArg = arg;
        Start(io);
        return 0;
    }

    private BdevIo? Alloc()
    {
        var io = _free;
        if (io is null)
        {
            return null;
        }

        _free = io.Next;
        io.Next = null;
        _freeCount--;
        return io;
    }

    private void Start(BdevIo io)
    {
        io.SubmitTicks = Reactor.Now; // iteration clock: no clock read per I/O
        Outstanding++;
        // Queued I/O goes first: a new request may not overtake one already waiting for QoS tokens.
        if (Bdev.Qos is { } qos && (_qosHead is not null || !qos.TryAdmit(io, io.SubmitTicks)))
        {
            Append(ref _qosHead, ref _qosTail, io);
            return;
        }

        Dispatch(io);
    }

    private void Dispatch(BdevIo io)
    {
        if (_remap is { } remap && TryRemap(remap, io))
        {
            return;
        }

        if (NeedsSplit(io, out _))
        {
            io.SplitNextOffset = io.OffsetBlocks;
            io.SplitRemaining = io.NumBlocks;
            io.SplitIovIndex = 0;
            io.SplitIovOffset = 0;
            io.SplitOutstanding = 0;
            io.SplitFailed = false;
            SplitContinue(io);
            return;
        }

        SubmitToModule(io);
    }

    private void SubmitToModule(BdevIo io)
    {
        if (NeedsBounce(io))
        {
            SetupBounce(io);
        }

        _submitDepth++;
        try
        {
            Bdev.Submit(_moduleChannel, io);
        }
        finally
        {
            _submitDepth--;
        }
    }

    private bool NeedsSplit(BdevIo io, out ulong maxBlocks)
    {
        maxBlocks = 0;
        switch (io.Type)
        {
            case BdevIoType.Read:
            case BdevIoType.Write:
            case BdevIoType.Compare:
                maxBlocks = Bdev.MaxTransferBlocks;
                if (Bdev.RequiredAlignment > 1 && io.Length > MaxBounceBytes && NeedsBounce(io))
                {
                    ulong bounceBlocks = MaxBounceBytes / Bdev.BlockSize;
                    maxBlocks = maxBlocks == 0 ? bounceBlocks : Math.Min(maxBlocks, bounceBlocks);
                }

                ulong boundary = Bdev.OptimalIoBoundaryBlocks;
                return (maxBlocks > 0 && io.NumBlocks > maxBlocks)
                    || (boundary > 0 && WithinBoundary(io.OffsetBlocks, boundary) + io.NumBlocks > boundary);
            case BdevIoType.Unmap:
                maxBlocks = Bdev.MaxUnmapBlocks;
                return maxBlocks > 0 && io.NumBlocks > maxBlocks;
            case BdevIoType.WriteZeroes:
                maxBlocks = Bdev.MaxWriteZeroesBlocks;
                return maxBlocks > 0 && io.NumBlocks > maxBlocks;
            default:
                return false;
        }
    }

    // offset % boundary without a 64-bit division on every I/O when the boundary is a power of two (an lvol's cluster,
    // a raid strip: always, with SPDK's sizes).
    private static ulong WithinBoundary(ulong offset, ulong boundary) =>
        (boundary & (boundary - 1)) == 0 ? offset & (boundary - 1) : offset % boundary;

    private ulong ChildBlocks(BdevIo parent)
    {
        NeedsSplit(parent, out ulong max);
        ulong blocks = parent.SplitRemaining;
        if (max > 0)
        {
            blocks = Math.Min(blocks, max);
        }

        ulong boundary = Bdev.OptimalIoBoundaryBlocks;
        if (boundary > 0 && parent.Type is BdevIoType.Read or BdevIoType.Write or BdevIoType.Compare)
        {
            blocks = Math.Min(blocks, boundary - WithinBoundary(parent.SplitNextOffset, boundary));
        }

        return blocks;
    }

    private void SplitContinue(BdevIo parent)
    {
        bool hasData = parent.Type is BdevIoType.Read or BdevIoType.Write or BdevIoType.Compare;
        while (parent.SplitRemaining > 0 && parent.SplitOutstanding < MaxChildrenInFlight && !parent.SplitFailed)
        {
            var child = Alloc();
            if (child is null)
            {
                if (parent.SplitOutstanding == 0)
                {
                    Append(ref _splitWaitHead, ref _splitWaitTail, parent);
                }

                return; // resumes when a child completes or an I/O is freed
            }

            ulong blocks = ChildBlocks(parent);
            child.Type = parent.Type;
            child.Parent = parent;
            child.OffsetBlocks = parent.SplitNextOffset;
            child.NumBlocks = blocks;
            child.SubmitTicks = parent.SubmitTicks;
            if (hasData)
            {
                int index = parent.SplitIovIndex;
                nuint offset = parent.SplitIovOffset;
                child.SetIovsSlice(parent.CallerIovs, ref index, ref offset, (nuint)(blocks * Bdev.BlockSize));
                parent.SplitIovIndex = index;
                parent.SplitIovOffset = offset;
            }
            else
            {
                child.SetIovs(default);
            }

            parent.SplitNextOffset += blocks;
            parent.SplitRemaining -= blocks;
            parent.SplitOutstanding++;
            SubmitToModule(child);
        }
    }

    private void ChildDone(BdevIo parent, BdevIo child)
    {
        if (child.Status != BdevIoStatus.Success)
        {
            parent.SplitFailed = true;
            if (child.Status is BdevIoStatus.Miscompare or BdevIoStatus.Aborted)
            {
                parent.Status = child.Status;
            }

            parent.NvmeStatus = child.NvmeStatus;
        }

        parent.SplitOutstanding--;
        FreeIo(child);
        if (parent.SplitOutstanding > 0)
        {
            if (!parent.SplitFailed)
            {
                SplitContinue(parent);
            }

            return;
        }

        if (parent.SplitRemaining > 0 && !parent.SplitFailed)
        {
            SplitContinue(parent);
            return;
        }

        if (parent.Status == BdevIoStatus.Pending)
        {
            parent.Status = parent.SplitFailed ? BdevIoStatus.Failed : BdevIoStatus.Success;
        }

        CompleteToUser(parent);
    }

    private bool NeedsBounce(BdevIo io)
    {
        nuint align = Bdev.RequiredAlignment;
        if (align <= 1 || io.Type is not (BdevIoType.Read or BdevIoType.Write or BdevIoType.Compare))
        {
            return false;
        }

        var iovs = io.CallerIovs;
        nuint mask = align - 1;
        for (int i = 0; i < iovs.Length; i++)
        {
            if (((nuint)iovs[i].Base & mask) != 0 || (iovs[i].Length & mask) != 0)
            {
                return true;
            }
        }

        return false;
    }

    private void SetupBounce(BdevIo io)
    {
        nuint length = (nuint)io.Length;
        var buffer = GetBounce(length);
        if (io.Type is BdevIoType.Write or BdevIoType.Compare)
        {
            IoVecs.Gather(io.CallerIovs, buffer);
        }

        io.UseBounce(buffer, length);
    }

    private AlignedBuffer GetBounce(nuint length)
    {
        for (int i = 0; i < _bounceFree.Count; i++)
        {
            if (_bounceFree[i].Size >= length)
            {
                var b = _bounceFree[i];
                _bounceFree.RemoveAt(i);
                return b;
            }
        }

        // Warm-up only: the pool keeps every buffer it ever made.
        nuint size = (length + 4095) & ~(nuint)4095;
        var p = new AlignedBuffer(size, Math.Max(4096, Bdev.RequiredAlignment), zero: false);
        _bounceAll.Add(p);
        return p;
    }

    private void FinishBounce(BdevIo io)
    {
        var buffer = io.BounceBuffer!;
        if (io.Status == BdevIoStatus.Success && io.Type == BdevIoType.Read)
        {
            IoVecs.Scatter(buffer, 0, io.CallerIovs);
        }

        _bounceFree.Add(buffer);
        io.ClearBounce();
    }

    internal void OnModuleComplete(BdevIo io)
    {
        if (_submitDepth > 0)
        {
            // Completed inside Submit: defer so the caller's callback never runs inside its own submit call.
            Append(ref _deferredHead, ref _deferredTail, io);
            return;
        }

        Finish(io);
    }

    private void Finish(BdevIo io)
    {
        if (io.Remapped)
        {
            EndRemap(io);
        }
        else if (io.ForwardChannel is { } forwardedTo)
        {
            forwardedTo.EndForward(io);
        }

        if (io.BounceBuffer is not null)
        {
            FinishBounce(io);
        }

        if (io.Status == BdevIoStatus.NoMemory && io.Type != BdevIoType.Reset)
        {
            // SPDK's nomem_io: the module is out of a resource, not failing. The I/O waits and is submitted again
            // when another I/O of this channel completes (resources came back), or after a short delay when
            // nothing else is in flight; the submitter never sees the NoMemory.
            io.Status = BdevIoStatus.Pending;
            Append(ref _nomemHead, ref _nomemTail, io);
            NoMemoryQueued++;
            _nomemRetryAt = Reactor.Now + NomemRetryTicks;
            return;
        }

        if (_nomemHead is not null)
        {
            RetryNoMemory();
        }

        if (io.Parent is { } parent)
        {
            ChildDone(parent, io);
            return;
        }

        CompleteToUser(io);
    }

    /// <summary>Submits the I/Os that were answered NoMemory again, in order (a repeated NoMemory queues them again).</summary>
    private int RetryNoMemory()
    {
        var io = _nomemHead;
        _nomemHead = _nomemTail = null;
        int n = 0;
        while (io is not null)
        {
            var next = io.Next;
            io.Next = null;
            NoMemoryQueued--;
            SubmitToModule(io);
            io = next;
            n++;
        }

        return n;
    }

    private void CompleteToUser(BdevIo io)
    {
        Outstanding--;
        bool success = io.Status == BdevIoStatus.Success;
        if (io.Remapped)
        {
            if (success)
            {
                Account(ref RemapStats, RemapLatency, io, Reactor.Now - io.SubmitTicks);
            }
            else
            {
                RemapStats.NumErrors++;
            }
        }
        else if (success)
        {
            Account(ref Stats, Latency, io, Reactor.Now - io.SubmitTicks);
        }
        else
        {
            Stats.NumErrors++;
        }

        var cb = io.Callback!;
        var arg = io.CallbackArg;
        try
        {
            cb(io, success, arg);
        }
        finally
        {
            FreeIo(io);
        }
    }

    private static void Account(ref BdevIoStats stats, long[] latency, BdevIo io, long ticks)
    {
        long bytes = (long)io.Length;
        switch (io.Type)
        {
            case BdevIoType.Read:
                stats.NumReadOps++;
                stats.BytesRead += bytes;
                stats.ReadLatencyTicks += ticks;
                stats.MaxReadLatencyTicks = Math.Max(stats.MaxReadLatencyTicks, ticks);
                stats.MinReadLatencyTicks = stats.MinReadLatencyTicks == 0 ? ticks : Math.Min(stats.MinReadLatencyTicks, ticks);
                latency[BdevLatencyHistogram.BucketOf(ticks)]++;
                break;
            case BdevIoType.Write:
                stats.NumWriteOps++;
                stats.BytesWritten += bytes;
                stats.WriteLatencyTicks += ticks;
                stats.MaxWriteLatencyTicks = Math.Max(stats.MaxWriteLatencyTicks, ticks);
                stats.MinWriteLatencyTicks = stats.MinWriteLatencyTicks == 0 ? ticks : Math.Min(stats.MinWriteLatencyTicks, ticks);
                latency[BdevLatencyHistogram.Buckets + BdevLatencyHistogram.BucketOf(ticks)]++;
                break;
            case BdevIoType.Unmap:
                stats.NumUnmapOps++;
                stats.BytesUnmapped += bytes;
                stats.UnmapLatencyTicks += ticks;
                stats.MaxUnmapLatencyTicks = Math.Max(stats.MaxUnmapLatencyTicks, ticks);
                stats.MinUnmapLatencyTicks = stats.MinUnmapLatencyTicks == 0 ? ticks : Math.Min(stats.MinUnmapLatencyTicks, ticks);
                latency[(2 * BdevLatencyHistogram.Buckets) + BdevLatencyHistogram.BucketOf(ticks)]++;
                break;
            case BdevIoType.WriteZeroes:
                stats.NumWriteZeroesOps++;
                latency[(2 * BdevLatencyHistogram.Buckets) + BdevLatencyHistogram.BucketOf(ticks)]++;
                break;
            case BdevIoType.Flush:
                stats.NumFlushOps++;
                latency[(2 * BdevLatencyHistogram.Buckets) + BdevLatencyHistogram.BucketOf(ticks)]++;
                break;
        }
    }

    private void FreeIo(BdevIo io)
    {
        io.Reset();
        io.Next = _free;
        _free = io;
        _freeCount++;
        if ((_splitWaitHead is not null || _waitHead is not null) && !_resumingWaiters)
        {
            ResumeWaiters();
        }
    }

    private void ResumeWaiters()
    {
        _resumingWaiters = true;
        try
        {
            while (_splitWaitHead is not null && _free is not null)
            {
                var parent = _splitWaitHead;
                _splitWaitHead = parent.Next;
                if (_splitWaitHead is null)
                {
                    _splitWaitTail = null;
                }

                parent.Next = null;
                SplitContinue(parent);
            }

            while (_waitHead is not null && _free is not null)
            {
                var e = _waitHead;
                _waitHead = e.Next;
                if (_waitHead is null)
                {
                    _waitTail = null;
                }

                e.Next = null;
                e.Queued = false;
                e.Callback(e.Arg);
            }
        }
        finally
        {
            _resumingWaiters = false;
        }
    }

    /// <summary>
    /// Delivers now the completions of I/O that finished inside its own submit call (a RAM or null bdev; they are
    /// deferred so no callback runs inside its submit). A caller that has submitted a batch (a vhost queue's poll)
    /// calls this before publishing its results, so synchronous I/O completes in the same reactor iteration instead
    /// of waiting for the channel's poller; otherwise the poller delivers them. Not to be called from a submit or a
    /// completion callback of this channel.
    /// </summary>
    public int DeliverDeferred()
    {
        if (_deferredHead is null || _submitDepth > 0)
        {
            return 0;
        }

        int work = 0;
        var io = _deferredHead;
        _deferredHead = _deferredTail = null;
        while (io is not null)
        {
            var next = io.Next;
            io.Next = null;
            Finish(io);
            io = next;
            work++;
        }

        return work;
    }

    private int Poll()
    {
        int work = DeliverDeferred();
        if (_nomemHead is not null && Reactor.Now >= _nomemRetryAt)
        {
            work += RetryNoMemory();
        }

        if (_qosHead is not null && Bdev.Qos is var qos)
        {
            long now = Reactor.Now;
            while (_qosHead is not null && (qos is null || qos.TryAdmit(_qosHead, now)))
            {
                var io = _qosHead;
                _qosHead = io.Next;
                if (_qosHead is null)
                {
                    _qosTail = null;
                }

                io.Next = null;
                Dispatch(io);
                work++;
            }
        }

        return work;
    }

    private static void Append(ref BdevIo? head, ref BdevIo? tail, BdevIo io)
    {
        io.Next = null;
        if (tail is null)
        {
            head = io;
        }
        else
        {
            tail.Next = io;
        }

        tail = io;
    }

    internal void Destroy()
    {
        Poll(); // deliver completions already deferred
        Reactor.UnregisterPoller(_poller);
        _moduleChannel.Release();
        if (_remap is { } remap)
        {
            remap.Base.Bdev.RemoveRemapSource(this); // the base keeps what it was counted
        }

        Bdev.RetireStats(ref Stats, Latency);
        if (_remap is not null)
        {
            Bdev.RetireStats(ref RemapStats, RemapLatency);
        }
        if (Outstanding > 0)
        {
            // Released with I/O in flight (a caller bug): keep bounce buffers alive rather than free memory a module may still write.
            return;
        }

        foreach (var p in _bounceAll)
        {
            p.Dispose();
        }

        _bounceAll.Clear();
        _bounceFree.Clear();
    }
}
