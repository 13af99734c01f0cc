using Microsoft.Extensions.Logging;
using VhostBackend.Bdev;
using VhostBackend.Nvme;
using VhostBackend.Platform;
using VhostBackend.Reactors;

namespace VhostBackend.BdevNvme;

/// <summary>
/// One outstanding command of a channel: the bdev I/O it carries. A transport adds what its commands need
/// (a bounce buffer, a DSM range); every request is made when the channel is, never per I/O.
/// </summary>
internal class NvmeChannelRequest
{
    public INvmeRequestOwner Owner = null!;
    public BdevIo? Io;

    /// <summary>The namespace bdev the I/O was submitted to: not <see cref="BdevIo.Bdev"/> for an I/O another bdev
    /// forwarded in place (<see cref="NvmeBdev.AcceptsForwardedIo"/>).</summary>
    public NvmeBdev? Bdev;
}

/// <summary>What a request's completion calls back into (its channel).</summary>
internal interface INvmeRequestOwner
{
    void OnComplete(NvmeChannelRequest req, NvmeStatus status);
}

/// <summary>
/// What a reactor's channel to a controller does whatever the transport (SPDK's nvme_qpair handling in bdev_nvme):
/// the pool of request objects (one per queue slot), the FIFO of I/O that cannot start yet (no free slot, queue pair
/// connecting or reconnecting, path down), submitting from it in order, retrying I/O the transport says to retry,
/// mapping NVMe status to bdev status, the once-a-second timeout check, and reporting a finished reconnect to the
/// controller. The transport (<see cref="NvmeChannelContext"/> for PCIe, <see cref="NvmeTcpChannelContext"/> for
/// TCP) builds and submits the commands and drives its queue pair's connection. Everything here runs on the
/// channel's reactor; nothing is allocated or locked per I/O.
/// </summary>
internal abstract class NvmeChannelBase<TRequest> : INvmeChannel, INvmeRequestOwner
    where TRequest : NvmeChannelRequest, new()
{
    private readonly NvmeBdevControllerBase _ctrl;
    private readonly Queue<(BdevIo Io, NvmeBdev Bdev)> _waiting = new(1024); // with its namespace bdev (see NvmeChannelRequest.Bdev)
    private TRequest[] _free = [];
    private int _freeCount;
    private Poller? _poller;
    private long _nextTimeoutCheck;
    private bool _reportReconnect;

    protected NvmeChannelBase(NvmeBdevControllerBase ctrl, Reactor reactor, ILogger log)
    {
        _ctrl = ctrl;
        Reactor = reactor;
        Log = log;
    }

    protected Reactor Reactor { get; }
    protected ILogger Log { get; }

    /// <summary>The channel fails its I/O (no queue pair, device gone, reset failed, destroyed).</summary>
    protected bool Failed { get; set; }

    /// <summary>The queue pair's connect state machine is being polled.</summary>
    protected bool Connecting { get; set; }

    /// <summary>A controller-driven reconnect is running on this channel: the controller hears when it ends.</summary>
    protected bool ReconnectReportPending => _reportReconnect;

    /// <summary>True when I/O must fail instead of waiting (the transport may add reasons).</summary>
    protected virtual bool MustFail => Failed;

    /// <summary>The channel has a queue pair at all.</summary>
    protected abstract bool HasQueuePair { get; }

    /// <summary>The queue pair takes commands now.</summary>
    protected abstract bool QueueConnected { get; }

    /// <summary>Makes the request pool (one per queue slot) and starts the poller: the end of a transport's constructor.</summary>
    protected void Start(int slots, string pollerName)
    {
        _free = new TRequest[slots];
        for (int i = 0; i < slots; i++)
        {
            var r = new TRequest { Owner = this };
            InitRequest(r);
            _free[i] = r;
        }

        _freeCount = slots;
        _poller = Reactor.RegisterPoller(pollerName, static c => ((NvmeChannelBase<TRequest>)c!).Poll(), this);
    }

    /// <summary>The channel's poller (after <see cref="Start"/>).</summary>
    protected Poller ChannelPoller => _poller!;

    /// <summary>I/O waits that a poll would start now (or fail now).</summary>
    protected bool HasStartableIo => _waiting.Count > 0 && (MustFail || !HasQueuePair || QueueConnected);

    /// <summary>
    /// Makes <paramref name="fd"/> (the queue pair's interrupt eventfd) the poller's wake source: in interrupt and
    /// adaptive mode the reactor sleeps until it fires; <see cref="ArmWake"/> runs before each sleep.
    /// </summary>
    protected void SetWakeSource(int fd) =>
        Reactor.SetPollerInterrupt(_poller!, fd, static (c, arm) => arm && ((NvmeChannelBase<TRequest>)c!).ArmWake());

    /// <summary>Before the reactor sleeps: re-enable the interrupt and say whether work is already there (then it does not sleep).</summary>
    protected virtual bool ArmWake() => false;

    /// <summary>Gives a new request what the transport needs (made once).</summary>
    protected virtual void InitRequest(TRequest req)
    {
    }

    public void Submit(NvmeBdev bdev, BdevIo io)
    {
        if (MustFail)
        {
            io.Complete(BdevIoStatus.Failed);
            return;
        }

        if (io.Type == BdevIoType.Reset)
        {
            _ctrl.ResetAsync().ContinueWith(
                static (t, s) =>
                {
                    var (ctx, bio) = ((NvmeChannelBase<TRequest>, BdevIo))s!;
                    bool ok = t.IsCompletedSuccessfully;
                    ctx.Reactor.Send(static x =>
                    {
                        var (b, success) = ((BdevIo, bool))x!;
                        b.Complete(success);
                    }, (bio, ok));
                },
                (this, io),
                CancellationToken.None,
                TaskContinuationOptions.ExecuteSynchronously,
                TaskScheduler.Default);
            return;
        }

        if (_waiting.Count > 0 || !TrySubmit(io, bdev))
        {
            _waiting.Enqueue((io, bdev)); // FIFO: nothing overtakes I/O already waiting
        }
    }

    /// <summary>The completion callback every command of every channel is submitted with (its argument is the request).</summary>
    protected static readonly NvmeCompletionCallback s_done = static (arg, status, dw0) =>
    {
        var req = (NvmeChannelRequest)arg!;
        req.Owner.OnComplete(req, status);
    };

    /// <summary>Starts the I/O or returns false when it must wait (no slot, no buffer, not connected).</summary>
    private bool TrySubmit(BdevIo io, NvmeBdev bdev)
    {
        if (!QueueConnected || _freeCount == 0)
        {
            return false;
        }

        var req = _free[--_freeCount];
        req.Io = io;
        req.Bdev = bdev;
        int rc = SubmitCommand(req, io, bdev.Namespace);
        if (rc == 0)
        {
            return true;
        }

        Release(req);
        if (rc is -Errno.ENOMEM or -Errno.ENXIO)
        {
            return false; // no slot / buffer, or reconnecting: wait
        }

        io.NvmeStatus = NvmeStatus.Make(NvmeSct.Generic, NvmeSc.InvalidField).SctSc;
        io.Complete(BdevIoStatus.Failed);
        return true;
    }

    /// <summary>
    /// Builds and submits the command for <paramref name="io"/> with <see cref="s_done"/> and <paramref name="req"/>:
    /// 0 when submitted, -ENOMEM or -ENXIO when it must wait, another negative errno when it is invalid.
    /// </summary>
    protected abstract int SubmitCommand(TRequest req, BdevIo io, NvmeNamespace ns);

    /// <summary>Gives back what the transport took for the request (a bounce buffer); the request is free after.</summary>
    protected virtual void ReleaseResources(TRequest req)
    {
    }

    private void Release(TRequest req)
    {
        ReleaseResources(req);
        req.Io = null;
        req.Bdev = null;
        _free[_freeCount++] = req;
    }

    /// <summary>True when the I/O that completed with <paramref name="status"/> should be sent again (it waits in the FIFO).</summary>
    protected abstract bool ShouldRetry(BdevIo io, NvmeStatus status);

    /// <summary>Before the request is released on a final completion (copy a bounce buffer out).</summary>
    protected virtual void Completing(TRequest req, NvmeStatus status)
    {
    }

    void INvmeRequestOwner.OnComplete(NvmeChannelRequest r, NvmeStatus status)
    {
        var req = (TRequest)r;
        var io = req.Io!;
        if (ShouldRetry(io, status))
        {
            var bdev = req.Bdev!;
            Release(req);
            _waiting.Enqueue((io, bdev));
            return;
        }

        Completing(req, status);
        Release(req);
        io.NvmeStatus = status.SctSc;
        io.Complete(status.IsSuccess ? BdevIoStatus.Success
            : status.IsCompareFailure ? BdevIoStatus.Miscompare
            : status == NvmeStatus.AbortRequested ? BdevIoStatus.Aborted
            : BdevIoStatus.Failed);
    }

    /// <summary>
    /// Drives the queue pair (connect state machine, completions): the completions reaped, or -1 while it is still
    /// connecting (nothing else is done in this poll then).
    /// </summary>
    protected abstract int PollQueue();

    /// <summary>Once a second while connected: looks for commands that took too long.</summary>
    protected abstract void CheckTimeouts(long now);

    private int Poll()
    {
        if (!HasQueuePair)
        {
            if (_waiting.Count > 0)
            {
                FailWaiting();
            }

            return 0;
        }

        int n = PollQueue();
        if (n < 0)
        {
            return 0;
        }

        while (_waiting.Count > 0 && QueueConnected && !MustFail)
        {
            var (next, nextBdev) = _waiting.Peek();
            if (!TrySubmit(next, nextBdev))
            {
                break;
            }

            _waiting.Dequeue();
            n++;
        }

        if (MustFail && _waiting.Count > 0)
        {
            FailWaiting();
        }

        if (QueueConnected)
        {
            long now = Reactor.Now;
            if (now >= _nextTimeoutCheck)
            {
                _nextTimeoutCheck = now + Ticks.Frequency;
                CheckTimeouts(now);
            }
        }

        return n;
    }

    /// <summary>
    /// A command outstanding longer than timeout_us (reported once per command): what action_on_timeout says, like
    /// SPDK's timeout_cb: nothing but a warning, a controller reset, or an Abort of the command that escalates to a
    /// reset when it cannot be sent, fails or finds nothing.
    /// </summary>
    protected void OnCommandTimeout(ushort qid, ushort cid)
    {
        switch (_ctrl.TimeoutAction)
        {
            case NvmeTimeoutAction.None:
                Log.LogWarning("NVMe {Name}: command {Cid} on queue {Qid} timed out (action_on_timeout none)", _ctrl.CtrlName, cid, qid);
                return;
            case NvmeTimeoutAction.Abort:
            {
                Log.LogWarning("NVMe {Name}: command {Cid} on queue {Qid} timed out; aborting it", _ctrl.CtrlName, cid, qid);
                int rc = _ctrl.SubmitAbort(qid, cid);
                if (rc == 0)
                {
                    return;
                }

                Log.LogError("NVMe {Name}: unable to send the abort ({Rc}); resetting the controller", _ctrl.CtrlName, rc);
                break;
            }

            default:
                Log.LogWarning("NVMe {Name}: command {Cid} on queue {Qid} timed out; resetting the controller", _ctrl.CtrlName, cid, qid);
                break;
        }

        _ctrl.RequestReset();
    }

    /// <summary>
    /// The common start of a controller-driven reconnect on this reactor: false when there is nothing to reconnect;
    /// otherwise the controller counts this channel until <see cref="ReportReconnectDone"/>.
    /// </summary>
    protected bool BeginReconnect()
    {
        if (!HasQueuePair || _ctrl.IsRemoved)
        {
            return false;
        }

        Failed = false; // failed by an earlier attempt that did not succeed: this one may
        _ctrl.AddPendingReconnect();
        _reportReconnect = true;
        Connecting = true;
        return true;
    }

    /// <summary>Tells the controller this channel's reconnect ended (once; nothing when none was running).</summary>
    protected void ReportReconnectDone()
    {
        if (_reportReconnect)
        {
            _reportReconnect = false;
            _ctrl.AdminReactor.Send(static c => ((NvmeBdevControllerBase)c!).ReconnectDone(), _ctrl);
        }
    }

    /// <summary>Fails every I/O waiting to start.</summary>
    protected void FailWaiting()
    {
        while (_waiting.TryDequeue(out var w))
        {
            w.Io.Complete(BdevIoStatus.Failed);
        }
    }

    /// <summary>On this reactor: the poller stops and the channel fails what waits (the transport then frees its queue pair).</summary>
    protected void StopPolling()
    {
        if (_poller is not null)
        {
            Reactor.UnregisterPoller(_poller);
            _poller = null;
        }

        Failed = true;
    }

    /// <summary>Records how long a control-path step that started at <paramref name="t0"/> held the reactor.</summary>
    protected void RecordStep(long t0) => _ctrl.RecordControlStep(Ticks.Now() - t0);
}
