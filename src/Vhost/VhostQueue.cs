using System.Diagnostics;
using System.Runtime.CompilerServices;
using Microsoft.Extensions.Logging;
using VhostBackend.Bdev;
using VhostBackend.Platform;
using VhostBackend.Reactors;
using VhostBackend.VhostUser;
using VhostBackend.Virtio;

namespace VhostBackend.Vhost;

/// <summary>
/// The device-independent part of one virtqueue of one session, polled on one reactor: the poller (and the kick
/// fd as its interrupt source), popping heads while the device has a free request, publishing used entries,
/// signalling the call eventfd only when the driver wants it (event idx) and as often as interrupt coalescing
/// allows, and draining in-flight requests on stop. Device queues (virtio-blk, virtio-scsi request, control and
/// event queues) derive from it and parse chains in <see cref="Process"/>. Everything here runs on the owning
/// reactor; the protocol thread reaches it only through <see cref="Reactor.InvokeAsync(Action)"/>.
/// </summary>
public abstract class VhostQueue : IVhostQueueRunner
{
    private const int PopBatch = 32;
    private const long StatsIntervalMs = 10;

    private static readonly PollerFn s_poll = static c => ((VhostQueue)c!).Poll();
    private static readonly PollerInterruptFn s_interrupt = static (c, arm) => ((VhostQueue)c!).OnInterruptMode(arm);

    private readonly EventFd? _kick;
    private readonly string _kind;
    private EventFd? _call;
    private Poller? _poller;
    private int _inFlight;
    private bool _stopping;
    private bool _broken;
    private bool _signalPending;
    private bool _signalOwed;
    private int _completedSincePoll;
    private TaskCompletionSource? _drained;
    private LogRateLimiter _badRequestLog = new(burst: 16, perSecond: 1);
    private readonly string _logName;

    // In-flight tracking (INFLIGHT_SHMFD): the queue's region, and heads a previous back end left in flight.
    private InflightTracker? _inflight;
    private ushort[] _resubmit = [];
    private int _resubmitNext;

    // Interrupt coalescing (vhost_controller_set_coalescing): SPDK's model, per queue.
    private long _delayBaseTicks;
    private uint _ioRateThreshold;
    private long _nextStatsCheck;
    private long _nextEventTime;
    private long _irqDelayTicks;
    private uint _usedReqCount;
    private uint _reqCount;
    private long _interrupts;

    protected VhostQueue(VhostController controller, VhostUserSession session, int index, DeviceVirtqueue vq, EventFd? call, EventFd? kick, Reactor reactor, string kind)
    {
        Controller = controller;
        Session = session;
        Index = index;
        Vq = vq;
        _call = call;
        _kick = kick;
        Reactor = reactor;
        _kind = kind;
        _logName = kind + " " + session.Name + " queue " + index.ToString(System.Globalization.CultureInfo.InvariantCulture);
    }

    public VhostController Controller { get; }
    public VhostUserSession Session { get; }
    public int Index { get; }
    public Reactor Reactor { get; }
    protected DeviceVirtqueue Vq { get; }
    protected ILogger Logger => Controller.Logger;

    /// <summary>Requests taken from the ring and not yet completed (racy read off the reactor).</summary>
    public int InFlight => Volatile.Read(ref _inFlight);

    protected bool Stopping => _stopping;

    /// <summary>True while the device can take another head (a free request object).</summary>
    protected abstract bool CanTakeRequest { get; }

    /// <summary>Handles one popped head: complete it now or later with <see cref="Complete"/>.</summary>
    protected abstract void Process(ushort head);

    /// <summary>Device-specific start (channels); runs on the reactor before the poller is registered.</summary>
    protected virtual void OnStart()
    {
    }

    /// <summary>Device-specific teardown (release channels); runs on the reactor after in-flight requests drained.</summary>
    protected virtual void OnStop()
    {
    }

    /// <summary>
    /// Runs after a batch of heads was processed and before the used entries are published: a device delivers
    /// here completions its bdevs finished synchronously, so they go out in this poll's single used.idx store.
    /// </summary>
    protected virtual int AfterBatch() => 0;

    /// <summary>Extra work each poll (e.g. delivering queued events); returns the amount done.</summary>
    protected virtual int PollDevice() => 0;

    /// <summary>Before start: the in-flight region to keep up to date, and the heads to resubmit first.</summary>
    internal void AttachInflight(InflightTracker? inflight, ushort[]? resubmit)
    {
        _inflight = inflight;
        _resubmit = resubmit ?? [];
        _resubmitNext = 0;
    }

    /// <summary>Heads recovered from the in-flight buffer that are still to be processed.</summary>
    public int PendingResubmits => _resubmit.Length - _resubmitNext;

    /// <summary>Registers the poller (and the kick fd as its interrupt source). Runs on the reactor.</summary>
    internal void StartOnReactor()
    {
        ApplyCoalescing(Controller.DelayBaseUs, Controller.IopsThreshold);
        OnStart();
        Vq.DisableNotify();
        _poller = Reactor.RegisterPoller($"{_kind}:{Session.Name}:q{Index}", s_poll, this);
        if (_kick is not null)
        {
            Reactor.SetPollerInterrupt(_poller, _kick.Fd, s_interrupt);
        }
    }

    public Task<uint> StopAsync() => Reactor.InvokeAsync(async () =>
    {
        _stopping = true;
        await WaitDrainedAsync().ConfigureAwait(true);
        Flush(force: true);
        if (_poller is not null)
        {
            Reactor.UnregisterPoller(_poller);
            _poller = null;
        }

        OnStop();
        Controller.UntrackQueue(this);
        return Vq.VringBase;
    });

    public Task SetCallAsync(EventFd? call) => Reactor.InvokeAsync(() =>
    {
        var old = _call;
        _call = call;
        if (call is not null && (_signalOwed || (old is not null && old != call)))
        {
            // Used entries were published while there was no call fd: QEMU sends SET_VRING_CALL after the
            // queue started, and the guest can submit (and we complete) in between. Interrupt now, or the
            // driver waits forever. A spurious interrupt is harmless.
            // Likewise when the fd changes: after a VM stop/cont QEMU tears down its guest notifiers (closing the
            // old call eventfd) and the queue restarts with the stale one until SET_VRING_CALL arrives; a
            // completion signalled in between went nowhere (found by the packed-ring stop/cont test, issue 19).
            _signalOwed = false;
            _signalPending = false;
            PublishUsed();
            Vq.NeedsNotify();
            call.Signal();
            Volatile.Write(ref _interrupts, _interrupts + 1);
        }
        else if (_signalPending)
        {
            Flush(force: true);
        }
    });

    /// <summary>
    /// Call eventfd writes (interrupts sent to the front end) since the queue started. Written only by the queue's
    /// reactor; any thread may read it (a torn read is impossible for an aligned long on 64-bit).
    /// </summary>
    public long Interrupts => Volatile.Read(ref _interrupts);

    internal Task SetCoalescingAsync(uint delayBaseUs, uint iopsThreshold) => Reactor.InvokeAsync(() => ApplyCoalescing(delayBaseUs, iopsThreshold));

    /// <summary>On the reactor: completes when no request is in flight.</summary>
    protected Task WaitDrainedAsync()
    {
        if (_inFlight == 0)
        {
            return Task.CompletedTask;
        }

        _drained ??= new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        return _drained.Task;
    }

    private void ApplyCoalescing(uint delayBaseUs, uint iopsThreshold)
    {
        _delayBaseTicks = Ticks.FromMicroseconds(delayBaseUs);
        _ioRateThreshold = Math.Max(1u, (uint)(iopsThreshold * StatsIntervalMs / 1000));
        _irqDelayTicks = 0;
        _nextEventTime = 0;
    }

    private int Poll()
    {
        int work = _completedSincePoll;
        _completedSincePoll = 0;
        if (!_stopping && !_broken)
        {
            int popped = 0;

            // Requests a previous back end took and never completed go first, in the order it took them.
            while (_resubmitNext < _resubmit.Length && popped < PopBatch && CanTakeRequest)
            {
                popped++;
                Process(_resubmit[_resubmitNext++]);
            }

            while (popped < PopBatch && CanTakeRequest && _resubmitNext == _resubmit.Length)
            {
                var r = Vq.TryPop(out ushort head);
                if (r == PopResult.Empty)
                {
                    break;
                }

                if (r == PopResult.Broken)
                {
                    _broken = true;
                    Logger.LogError("{Kind} {Session} queue {Index}: driver published an invalid avail index or head; queue stopped", _kind, Session.Name, Index);
                    break;
                }

                popped++;
                _inflight?.Begin(head);
                Process(head);
            }

            if (popped > 0)
            {
                work += AfterBatch();
            }

            work += popped;
            if (!_stopping)
            {
                work += PollDevice();
            }
        }

        Flush(force: false);
        return work;
    }

    private bool OnInterruptMode(bool arm)
    {
        if (!arm)
        {
            Vq.DisableNotify();
            return false;
        }

        _kick?.Drain();

        // Buffers the device cannot take now (an event queue with no event, an exhausted request pool) must not
        // keep the reactor awake: completions and posted events arrive as reactor messages and wake it.
        bool pending = (Vq.EnableNotify() || _resubmitNext < _resubmit.Length) && CanTakeRequest && !_stopping && !_broken;
        return pending || _signalPending || _completedSincePoll > 0;
    }

    /// <summary>
    /// Logs a malformed request: rate limited (a burst, then a few per second, with the count of suppressed lines)
    /// and checked before anything is formatted, so a hostile guest can neither flood the log nor make each bad
    /// request allocate. <paramref name="reason"/> must be a literal.
    /// </summary>
    protected void LogBadRequest(ushort head, string reason, ChainError error, ulong readable, ulong writable)
    {
        if (_badRequestLog.TryAcquire(Reactor.Now, out long suppressed))
        {
            s_badRequest(Logger, _logName, head, reason, error, readable, writable, null);
            if (suppressed > 0)
            {
                s_suppressed(Logger, _logName, suppressed, null);
            }
        }
    }

    private static readonly Action<ILogger, string, ushort, string, ChainError, ulong, ulong, Exception?> s_badRequest =
        LoggerMessage.Define<string, ushort, string, ChainError, ulong, ulong>(LogLevel.Error, new EventId(1, "VhostBadRequest"),
            "{Queue}: invalid request at head {Head}: {Reason} ({Error}, readable {Readable}, writable {Writable})");

    private static readonly Action<ILogger, string, long, Exception?> s_suppressed =
        LoggerMessage.Define<string, long>(LogLevel.Warning, new EventId(2, "VhostBadRequestSuppressed"), "{Queue}: {Count} more invalid requests were not logged");

    /// <summary>Marks a request as in flight (its completion will pass <c>wasInFlight: true</c>).</summary>
    protected void BeginInFlight() => _inFlight++;

    /// <summary>Publishes <paramref name="head"/> as used with <paramref name="usedLength"/> bytes written.</summary>
    protected void Complete(ushort head, uint usedLength, bool wasInFlight)
    {
        // Published in Flush, once per poll (or at once when forced): one used.idx store per batch.
        // In-flight buffer: the packed layout records the used position before the used descriptor is written
        // and commits after (each packed used descriptor is published by its own store); split links the head
        // into the batch cleared after used.idx is published.
        _inflight?.AddUsed(head);
        Vq.AddUsed(head, usedLength);
        _inflight?.UsedWritten(head);
        _usedReqCount++;
        _signalPending = true;
        _completedSincePoll++;
        if (wasInFlight && --_inFlight == 0 && _drained is { } d)
        {
            _drained = null;
            d.TrySetResult();
        }
    }

    /// <summary>Publishes used.idx, then marks the published batch as no longer in flight (this order survives a crash between the two).</summary>
    private void PublishUsed()
    {
        Vq.PublishUsed();
        _inflight?.CommitUsed(Vq.LastUsedIdx);
    }

    /// <summary>Signals the call eventfd for used entries published since the last signal, honouring coalescing.</summary>
    protected void Flush(bool force)
    {
        PublishUsed();
        if (!_signalPending)
        {
            return;
        }

        var call = _call;
        if (call is null)
        {
            // A polling front end, or a call fd still to come (see SetCallAsync).
            _signalPending = false;
            _signalOwed = true;
            return;
        }

        if (_delayBaseTicks == 0 || force)
        {
            _signalPending = false;
            if (Vq.NeedsNotify())
            {
                call.Signal();
                Volatile.Write(ref _interrupts, _interrupts + 1);
            }

            return;
        }

        long now = Reactor.Now;
        if (now >= _nextStatsCheck)
        {
            _nextStatsCheck = now + (StatsIntervalMs * Ticks.Frequency / 1000);
            // SPDK's session_vq_io_stats_update: the delay follows the last interval's rate, and each check opens
            // the gate (next event = now), so a guest waits at most about one interval plus one delay computed from
            // one interval's count. (Before: the gate stayed at last signal + a delay computed from every completion
            // since that signal, which grew without bound under load and held the last interrupt for seconds.)
            // Below the threshold there is no delay at all (SPDK keeps the previous one).
            uint reqs = _reqCount + _usedReqCount;
            _irqDelayTicks = reqs > _ioRateThreshold ? _delayBaseTicks * (reqs - _ioRateThreshold) / _ioRateThreshold : 0;
            _reqCount = 0;
            _nextEventTime = now;
        }

        if (now < _nextEventTime)
        {
            return; // stays pending; the poller retries next iteration
        }

        _signalPending = false;
        if (Vq.NeedsNotify())
        {
            call.Signal();
            Volatile.Write(ref _interrupts, _interrupts + 1);
            _reqCount += _usedReqCount;
            _usedReqCount = 0;
            _nextEventTime = now + _irqDelayTicks;
        }
    }

    /// <summary>Copies dst.Length device-readable bytes starting <paramref name="skip"/> bytes into the chain (they may span segments).</summary>
    protected static bool CopyFromChain(ReadOnlySpan<DescSegment> segs, int readableSegs, ulong skip, Span<byte> dst) =>
        DescChain.CopyFrom(segs, 0, readableSegs, skip, dst);

    /// <summary>Copies <paramref name="src"/> into the device-writable segments [first, count) starting <paramref name="skip"/> bytes in.</summary>
    protected static bool CopyToChain(ReadOnlySpan<DescSegment> segs, int firstWritable, int count, ulong skip, ReadOnlySpan<byte> src) =>
        DescChain.CopyTo(segs, firstWritable, count, skip, src);

    /// <summary>
    /// Fills <paramref name="iovs"/> with the bytes of segments [from, to) after skipping <paramref name="skip"/>
    /// bytes (a request header); returns the iovec count and total bytes, or -1 if there are too many segments.
    /// </summary>
    protected static int GatherIovs(ReadOnlySpan<DescSegment> segs, int from, int to, ulong skip, Span<IoVec> iovs, out ulong bytes)
    {
        int count = 0;
        bytes = 0;
        for (int i = from; i < to; i++)
        {
            ulong l = segs[i].Length;
            if (skip >= l)
            {
                skip -= l;
                continue;
            }

            if (count == iovs.Length)
            {
                return -1;
            }

            iovs[count++] = new IoVec(segs[i].Host + (nint)skip, (nuint)(l - skip));
            bytes += l - skip;
            skip = 0;
        }

        return count;
    }
}
