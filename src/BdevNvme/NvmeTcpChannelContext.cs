using System.Buffers.Binary;
using Microsoft.Extensions.Logging;
using VhostBackend.Bdev;
using VhostBackend.Nvme;
using VhostBackend.Nvme.Tcp;
using VhostBackend.Platform;
using VhostBackend.Reactors;

namespace VhostBackend.BdevNvme;

/// <summary>
/// A reactor's channel to an NVMe/TCP controller: its own queue pair (its own TCP connection), polled by this
/// channel's poller; request objects made up front, nothing allocated or locked per I/O. Data goes between the
/// socket and the bdev buffers directly (no bounce: TCP needs no DMA memory).
/// <para>
/// I/O that cannot start (no free slot, queue pair connecting or the path down) waits in a FIFO. I/O that the
/// connection loss failed ("transient transport error") goes back to that FIFO and is sent again after the
/// reconnect, unless the controller's fast_io_fail_timeout_sec has passed or it was given up: then it fails.
/// </para>
/// </summary>
internal sealed class NvmeTcpChannelContext : INvmeChannel
{
    private readonly NvmeTcpBdevController _ctrl;
    private readonly Reactor _reactor;
    private readonly ILogger _log;
    private readonly NvmeTcpQueuePair? _qp;
    private readonly Request[] _free;
    private int _freeCount;
    private readonly Queue<BdevIo> _waiting = new(1024);
    private readonly Poller _poller;
    private readonly IoVec[] _oneIov = new IoVec[1];
    private bool _connecting;
    private bool _reportReconnect;
    private bool _reportedLoss;
    private bool _failed;
    private long _nextTimeoutCheck;

    private sealed class Request
    {
        public NvmeTcpChannelContext Ctx = null!;
        public BdevIo? Io;
        public PinnedArray<byte> Dsm = null!;
    }

    public NvmeTcpChannelContext(NvmeTcpBdevController ctrl, Reactor reactor, ILogger log)
    {
        _ctrl = ctrl;
        _reactor = reactor;
        _log = log;
        if (ctrl.IsRemoved)
        {
            _failed = true;
        }
        else
        {
            try
            {
                _qp = ctrl.Controller.CreateIoQueuePair(ctrl.IoQueueEntries);
                if (ctrl.IsPathUp)
                {
                    _qp.StartConnect(ctrl.Controller.Cntlid, 0);
                    _connecting = true;
                }
            }
            catch (InvalidOperationException e)
            {
                log.LogError("NVMe/TCP {Name}: no I/O queue pair for {Reactor}: {Error}", ctrl.CtrlName, reactor, e.Message);
                _failed = true;
            }
        }

        int slots = _qp is null ? 1 : _qp.Entries - 1;
        _free = new Request[slots];
        for (int i = 0; i < slots; i++)
        {
            _free[i] = new Request { Ctx = this, Dsm = new PinnedArray<byte>(16) };
        }

        _freeCount = slots;
        _poller = reactor.RegisterPoller("bdev_nvme_poll:" + ctrl.CtrlName, static c => ((NvmeTcpChannelContext)c!).Poll(), this);
    }

    public NvmeTcpQueuePair? QueuePair => _qp;

    private bool MustFail => _failed || _ctrl.IsRemoved || _ctrl.FastIoFailed;

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
                    var (ctx, bio) = ((NvmeTcpChannelContext, BdevIo))s!;
                    bool ok = t.IsCompletedSuccessfully;
                    ctx._reactor.Send(static x =>
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

        if (_waiting.Count > 0 || !TrySubmit(io))
        {
            _waiting.Enqueue(io);
        }
    }

    private static readonly NvmeCompletionCallback s_done = static (arg, status, dw0) =>
    {
        var req = (Request)arg!;
        req.Ctx.OnComplete(req, status);
    };

    private bool TrySubmit(BdevIo io)
    {
        var qp = _qp!;
        if (!qp.IsConnected || _freeCount == 0)
        {
            return false;
        }

        var ns = ((NvmeBdev)io.Bdev).Namespace;
        var req = _free[--_freeCount];
        req.Io = io;
        int rc;
        switch (io.Type)
        {
            case BdevIoType.Read:
            case BdevIoType.Write:
            case BdevIoType.Compare:
            {
                byte opcode = io.Type switch
                {
                    BdevIoType.Read => NvmeIoOpcode.Read,
                    BdevIoType.Write => NvmeIoOpcode.Write,
                    _ => NvmeIoOpcode.Compare,
                };
                rc = io.NumBlocks > uint.MaxValue ? -Errno.EINVAL : qp.SubmitIo(opcode, ns, io.OffsetBlocks, (uint)io.NumBlocks, io.Iovs, 0, s_done, req);
                break;
            }

            case BdevIoType.Flush:
            {
                var cmd = new NvmeCommand { Opcode = NvmeIoOpcode.Flush, Nsid = ns.Id };
                rc = qp.Submit(ref cmd, default, 0, false, s_done, req);
                break;
            }

            case BdevIoType.Unmap:
            {
                if (io.NumBlocks > uint.MaxValue || !ns.InRange(io.OffsetBlocks, io.NumBlocks))
                {
                    rc = -Errno.EINVAL;
                    break;
                }

                var r = req.Dsm.Span;
                BinaryPrimitives.WriteUInt32LittleEndian(r, 0);
                BinaryPrimitives.WriteUInt32LittleEndian(r[4..], (uint)io.NumBlocks);
                BinaryPrimitives.WriteUInt64LittleEndian(r[8..], io.OffsetBlocks);
                var cmd = new NvmeCommand { Opcode = NvmeIoOpcode.DatasetManagement, Nsid = ns.Id, Cdw10 = 0, Cdw11 = 1 << 2 };
                _oneIov[0] = req.Dsm.ToIoVec(16);
                rc = qp.Submit(ref cmd, _oneIov, 16, true, s_done, req);
                break;
            }

            case BdevIoType.WriteZeroes:
            {
                if (io.NumBlocks is 0 or > 65536 || !ns.InRange(io.OffsetBlocks, io.NumBlocks))
                {
                    rc = -Errno.EINVAL;
                    break;
                }

                var cmd = new NvmeCommand { Opcode = NvmeIoOpcode.WriteZeroes, Nsid = ns.Id, Cdw10 = (uint)io.OffsetBlocks, Cdw11 = (uint)(io.OffsetBlocks >> 32), Cdw12 = (uint)io.NumBlocks - 1 };
                rc = qp.Submit(ref cmd, default, 0, false, s_done, req);
                break;
            }

            default:
                rc = -Errno.ENOTSUP;
                break;
        }

        if (rc == 0)
        {
            return true;
        }

        Release(req);
        if (rc is -Errno.ENOMEM or -Errno.ENXIO)
        {
            return false;
        }

        io.NvmeStatus = NvmeStatus.Make(NvmeSct.Generic, NvmeSc.InvalidField).SctSc;
        io.Complete(BdevIoStatus.Failed);
        return true;
    }

    private void Release(Request req)
    {
        req.Io = null;
        _free[_freeCount++] = req;
    }

    private void OnComplete(Request req, NvmeStatus status)
    {
        var io = req.Io!;
        Release(req);
        if (status == NvmeStatus.TransientTransportError && !MustFail)
        {
            // The connection went away under it: send it again after the reconnect.
            _waiting.Enqueue(io);
            return;
        }

        io.NvmeStatus = status.SctSc;
        io.Complete(status.IsSuccess ? BdevIoStatus.Success
            : status.IsCompareFailure ? BdevIoStatus.Miscompare
            : status == NvmeStatus.AbortRequested ? BdevIoStatus.Aborted
            : BdevIoStatus.Failed);
    }

    private int Poll()
    {
        if (_qp is null)
        {
            if (_waiting.Count > 0)
            {
                FailWaiting();
            }

            return 0;
        }

        int n = 0;
        if (!_connecting && !_failed && !_reportedLoss && _ctrl.IsPathUp && !_qp.IsConnected && !_qp.IsConnecting && !_qp.IsFailed)
        {
            // Created while the controller was reconnecting, after the walk that reconnects channels took its
            // snapshot: nobody else will connect this queue pair, so do it once the path is back.
            long t0 = Ticks.Now();
            _qp.StartConnect(_ctrl.Controller.Cntlid, 0); // PollConnect reports a failure
            _ctrl.RecordControlStep(Ticks.Now() - t0);
            _connecting = true;
        }

        if (_connecting)
        {
            long t0 = Ticks.Now();
            int rc = _qp.PollConnect();
            _ctrl.RecordControlStep(Ticks.Now() - t0);
            if (rc == 0)
            {
                return 0;
            }

            _connecting = false;
            if (rc < 0)
            {
                _log.LogWarning("NVMe/TCP {Name}: I/O queue {Qid} connect failed: {Error}", _ctrl.CtrlName, _qp.Id, _qp.LastError);
                ReportLoss();
            }

            if (_reportReconnect)
            {
                _reportReconnect = false;
                _ctrl.AdminReactor.Send(static c => ((NvmeTcpBdevController)c!).ReconnectDone(), _ctrl);
            }
        }
        else
        {
            n = _qp.Poll();
            if (_qp.IsFailed)
            {
                ReportLoss();
            }
        }

        while (_waiting.Count > 0 && _qp.IsConnected && !MustFail)
        {
            if (!TrySubmit(_waiting.Peek()))
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

        long timeout = _ctrl.IoTimeoutTicks;
        if (timeout > 0 && _qp.IsConnected)
        {
            long now = _reactor.Now;
            if (now >= _nextTimeoutCheck)
            {
                _nextTimeoutCheck = now + Ticks.Frequency;
                if (_qp.CountTimedOut(now, timeout) > 0)
                {
                    // A fabrics controller that does not answer: drop the connection (its commands are retried after the reconnect).
                    _log.LogWarning("NVMe/TCP {Name}: I/O on queue {Qid} timed out; reconnecting", _ctrl.CtrlName, _qp.Id);
                    _qp.Close(NvmeStatus.TransientTransportError);
                    ReportLoss();
                }
            }
        }

        return n;
    }

    private void ReportLoss()
    {
        if (!_reportedLoss)
        {
            _reportedLoss = true;
            _ctrl.AdminReactor.Send(static c => ((NvmeTcpBdevController)c!).ChannelLost(), _ctrl);
        }
    }

    /// <summary>On this reactor: the path is down; close the connection (outstanding I/O waits for the reconnect).</summary>
    public void Disconnect()
    {
        if (_connecting && _reportReconnect)
        {
            _reportReconnect = false;
            _ctrl.AdminReactor.Send(static c => ((NvmeTcpBdevController)c!).ReconnectDone(), _ctrl);
        }

        _connecting = false;
        _reportedLoss = true; // the controller knows
        _qp?.Close(NvmeStatus.TransientTransportError);
    }

    /// <summary>On this reactor: the controller is back; connect this queue pair again and report when done.</summary>
    public void StartReconnect()
    {
        if (_qp is null || _ctrl.IsRemoved)
        {
            return;
        }

        _failed = false;
        _ctrl.AddPendingReconnect();
        _reportReconnect = true;
        _reportedLoss = false;
        _connecting = true;
        long t0 = Ticks.Now();
        if (_qp.StartConnect(_ctrl.Controller.Cntlid, 0) != 0)
        {
            // PollConnect reports the failure.
        }

        _ctrl.RecordControlStep(Ticks.Now() - t0);
    }

    /// <summary>fast_io_fail_timeout_sec passed: fail what waits (new I/O fails at submit until the path is back).</summary>
    public void FailQueued() => FailWaiting();

    /// <summary>The controller was given up: fail everything now and later.</summary>
    public void FailAll()
    {
        _failed = true;
        _qp?.Close(NvmeStatus.InternalDeviceError);
        FailWaiting();
        if (_reportReconnect)
        {
            _reportReconnect = false;
            _ctrl.AdminReactor.Send(static c => ((NvmeTcpBdevController)c!).ReconnectDone(), _ctrl);
        }
    }

    private void FailWaiting()
    {
        while (_waiting.TryDequeue(out var io))
        {
            io.Complete(BdevIoStatus.Failed);
        }
    }

    public void Destroy()
    {
        _reactor.UnregisterPoller(_poller);
        _failed = true;
        if (_reportReconnect)
        {
            _reportReconnect = false;
            _ctrl.AdminReactor.Send(static c => ((NvmeTcpBdevController)c!).ReconnectDone(), _ctrl);
        }

        if (_qp is not null)
        {
            _qp.Close(NvmeStatus.AbortedSqDeletion);
            _ctrl.Controller.ReleaseQueuePair(_qp);
        }

        FailWaiting();
    }
}
