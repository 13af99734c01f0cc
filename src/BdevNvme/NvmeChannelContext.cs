using System.Diagnostics;
using System.Runtime.InteropServices;
using Microsoft.Extensions.Logging;
using VhostBackend.Bdev;
using VhostBackend.Nvme;
using VhostBackend.Platform;
using VhostBackend.Reactors;

namespace VhostBackend.BdevNvme;

/// <summary>
/// A reactor's channel to one controller: its own I/O queue pair, completion poller, request objects and DMA
/// bounce buffers. Everything here runs on that reactor; nothing is allocated or locked per I/O.
/// <para>
/// Buffers go to the device as they are (zero copy) when they are registered DMA memory and meet the PRP rules
/// (<see cref="Prp.IsCompatible"/>); otherwise the data is bounced through this channel's DMA buffers.
/// I/O that cannot start now (no free command slot, no bounce buffer, queue pair connecting or reconnecting after
/// a reset) waits in a FIFO and is started by the poller. I/O aborted by a controller reset is retried (up to 3
/// times). Nothing here waits for the controller: the queue pair is created (and re-created after a reset) by
/// polling its connect state machine from this channel's poller, and deleted asynchronously on destroy.
/// </para>
/// </summary>
internal sealed class NvmeChannelContext : INvmeChannel
{
    private const int MaxRetries = 3;
    private readonly NvmeBdevController _ctrl;
    private readonly Reactor _reactor;
    private readonly ILogger _log;
    private readonly NvmeQueuePair? _qp;
    private readonly DmaBufferPool _bounce;
    private readonly Request[] _free;
    private int _freeCount;
    private readonly Queue<BdevIo> _waiting = new(1024);
    private readonly Poller _poller;
    private long _nextTimeoutCheck;
    private bool _failed;
    private bool _connecting;
    private bool _reportReconnect;

    private sealed class Request
    {
        public NvmeChannelContext Ctx = null!;
        public BdevIo? Io;
        public nint Bounce;
    }

    public NvmeChannelContext(NvmeBdevController ctrl, Reactor reactor, ILogger log)
    {
        _ctrl = ctrl;
        _reactor = reactor;
        _log = log;
        if (ctrl.IsRemoved)
        {
            _failed = true; // the device is gone: a channel that fails its I/O
        }
        else
        {
            try
            {
                // Allocated here, created on the controller by the poller (PollConnect): I/O waits until then.
                _qp = ctrl.Controller.CreateIoQueuePair();
                _qp.StartConnect();
                _connecting = true;
            }
            catch (Exception e) when (e is IOException or InvalidOperationException or ObjectDisposedException or OutOfMemoryException)
            {
                // No queue pair (controller failed, out of queues): a channel that fails its I/O.
                log.LogError("NVMe {Name}: no I/O queue pair for {Reactor}: {Error}", ctrl.CtrlName, reactor, e.Message);
                _failed = true;
            }
        }

        int slots = _qp is null ? 1 : _qp.Entries - 1;
        _free = new Request[slots];
        for (int i = 0; i < slots; i++)
        {
            _free[i] = new Request { Ctx = this };
        }

        _freeCount = slots;
        _bounce = new DmaBufferPool(ctrl.Controller.Dma, 32, (int)NvmeBdev.MaxIoBytes, "vb-nvme-bounce");
        _poller = reactor.RegisterPoller("bdev_nvme_poll:" + ctrl.CtrlName, static c => ((NvmeChannelContext)c!).Poll(), this);
    }

    public NvmeQueuePair? QueuePair => _qp;

    public void Submit(NvmeBdev bdev, BdevIo io)
    {
        if (_failed)
        {
            io.Complete(BdevIoStatus.Failed);
            return;
        }

        if (io.Type == BdevIoType.Reset)
        {
            _ctrl.ResetAsync().ContinueWith(
                static (t, s) =>
                {
                    var (ctx, bio) = ((NvmeChannelContext, BdevIo))s!;
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
            _waiting.Enqueue(io); // FIFO: nothing overtakes I/O already waiting
        }
    }

    private static readonly NvmeCompletionCallback s_done = static (arg, status, dw0) =>
    {
        var req = (Request)arg!;
        req.Ctx.OnComplete(req, status);
    };

    private static readonly NvmeTimeoutCallback s_timeout = static (c, qp, cid) => ((NvmeChannelContext)c!).OnTimeout(cid);

    /// <summary>Starts the I/O or returns false when it must wait (no slot, no bounce buffer, not connected).</summary>
    private bool TrySubmit(BdevIo io)
    {
        var qp = _qp!;
        if (!qp.IsConnected || _freeCount == 0)
        {
            return false;
        }

        var bdev = (NvmeBdev)io.Bdev;
        var ns = bdev.Namespace;
        var req = _free[--_freeCount];
        req.Io = io;
        req.Bounce = 0;
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
                var iovs = MemoryMarshal.Cast<IoVec, NvmeIoVec>(io.Iovs);
                rc = qp.SubmitIo(opcode, ns, io.OffsetBlocks, (uint)io.NumBlocks, iovs, 0, s_done, req);
                if (rc is -14 or -22)
                {
                    // Not DMA memory, or a layout PRPs cannot describe: bounce.
                    ulong len = io.Length;
                    if (len > (ulong)_bounce.BufferSize)
                    {
                        rc = -Errno.EINVAL;
                        break;
                    }

                    if (!_bounce.TryGet(out nint va, out _))
                    {
                        Release(req);
                        return false;
                    }

                    if (io.Type != BdevIoType.Read)
                    {
                        _bounce.CopyIn(va, iovs);
                    }

                    req.Bounce = va;
                    var one = new NvmeIoVec(va, (nuint)len);
                    rc = qp.SubmitIo(opcode, ns, io.OffsetBlocks, (uint)io.NumBlocks, new ReadOnlySpan<NvmeIoVec>(ref one), 0, s_done, req);
                }

                break;
            }

            case BdevIoType.Flush:
                rc = qp.Flush(ns, s_done, req);
                break;
            case BdevIoType.Unmap:
                rc = io.NumBlocks > uint.MaxValue ? -22 : qp.Deallocate(ns, io.OffsetBlocks, (uint)io.NumBlocks, s_done, req);
                break;
            case BdevIoType.WriteZeroes:
                rc = io.NumBlocks > 65536 ? -22 : qp.WriteZeroes(ns, io.OffsetBlocks, (uint)io.NumBlocks, false, s_done, req);
                break;
            default:
                rc = -Errno.ENOTSUP;
                break;
        }

        if (rc == 0)
        {
            return true;
        }

        Release(req);
        if (rc is -12 or -6)
        {
            return false; // no slot / reconnecting: wait
        }

        io.NvmeStatus = NvmeStatus.Make(NvmeSct.Generic, NvmeSc.InvalidField).SctSc;
        io.Complete(BdevIoStatus.Failed);
        return true;
    }

    private void Release(Request req)
    {
        if (req.Bounce != 0)
        {
            _bounce.Return(req.Bounce);
            req.Bounce = 0;
        }

        req.Io = null;
        _free[_freeCount++] = req;
    }

    private void OnComplete(Request req, NvmeStatus status)
    {
        var io = req.Io!;
        if (status == NvmeStatus.AbortedSqDeletion && !_failed && io.ModuleTag < MaxRetries)
        {
            // Aborted by a reset or queue deletion: retry once the queue pair is back.
            io.ModuleTag++;
            Release(req);
            _waiting.Enqueue(io);
            return;
        }

        if (req.Bounce != 0 && status.IsSuccess && io.Type == BdevIoType.Read)
        {
            _bounce.CopyOut(req.Bounce, MemoryMarshal.Cast<IoVec, NvmeIoVec>(io.Iovs));
        }

        Release(req);
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

        if (_connecting)
        {
            long t0 = Ticks.Now();
            int rc = _qp.PollConnect();
            _ctrl.RecordControlStep(Ticks.Now() - t0);
            if (rc == 0)
            {
                return 0;
            }

            ConnectFinished(rc);
        }

        int n = _qp.ProcessCompletions();
        while (_waiting.Count > 0 && _qp.IsConnected && !_failed)
        {
            if (!TrySubmit(_waiting.Peek()))
            {
                break;
            }

            _waiting.Dequeue();
            n++;
        }

        if (_failed && _waiting.Count > 0)
        {
            FailWaiting();
        }

        if (_qp.IsConnected)
        {
            long now = _reactor.Now;
            if (now >= _nextTimeoutCheck)
            {
                _nextTimeoutCheck = now + Ticks.Frequency;
                _qp.CheckTimeouts(now, s_timeout, this);
            }
        }

        return n;
    }

    private void ConnectFinished(int rc)
    {
        _connecting = false;
        if (rc < 0)
        {
            if (_ctrl.IsResetting && !_reportReconnect)
            {
                // Failed because a reset started (it aborts admin commands): the reset reconnects this channel.
                _log.LogInformation("NVMe {Name}: queue pair {Qid} connect interrupted by a reset ({Rc})", _ctrl.CtrlName, _qp!.Id, rc);
            }
            else
            {
                _log.LogError("NVMe {Name}: queue pair {Qid} could not be created ({Rc}); failing its I/O", _ctrl.CtrlName, _qp!.Id, rc);
                FailAll();
            }
        }

        if (_reportReconnect)
        {
            _reportReconnect = false;
            _ctrl.AdminReactor.Send(static c => ((NvmeBdevController)c!).ReconnectDone(), _ctrl);
        }
    }

    private static readonly NvmeCompletionCallback s_abortDone = static (arg, status, dw0) =>
    {
        // Runs where admin completions are reaped. A reset that fails the abort itself takes care of the command.
        if (status != NvmeStatus.AbortedSqDeletion && (!status.IsSuccess || (dw0 & 1) != 0))
        {
            // Abort failed or the controller did not find the command: escalate to a controller reset.
            ((NvmeController)arg!).RequestReset();
        }
    };

    private void OnTimeout(ushort cid)
    {
        ushort qid = _qp!.Id;
        _log.LogWarning("NVMe {Name}: command {Cid} on queue {Qid} timed out; aborting it", _ctrl.CtrlName, cid, qid);
        var c = _ctrl.Controller;
        if (c.SubmitAbort(qid, cid, s_abortDone, c) != 0)
        {
            c.RequestReset();
        }
    }

    /// <summary>
    /// On this reactor, after the controller was reset: starts re-creating the queue pair (the poller drives it; I/O
    /// that was outstanding is retried once it is connected) and reports to the controller when done.
    /// </summary>
    public void StartReconnect()
    {
        if (_qp is null || _ctrl.IsRemoved)
        {
            return;
        }

        _failed = false; // failed by an earlier reset that did not succeed: this one did
        _ctrl.AddPendingReconnect();
        _reportReconnect = true;
        _connecting = true;
        long t0 = Ticks.Now();
        int rc = _qp.StartConnect(); // fails what was outstanding (retried once connected)
        _ctrl.RecordControlStep(Ticks.Now() - t0);
        if (rc != 0)
        {
            ConnectFinished(-22);
        }
    }

    /// <summary>The device is gone or its reset failed: fail everything now and later.</summary>
    public void FailAll()
    {
        _failed = true;
        _qp?.FailOutstanding(NvmeStatus.InternalDeviceError);
        FailWaiting();
        if (_connecting)
        {
            ConnectFinished(-6);
        }
    }

    private void FailWaiting()
    {
        while (_waiting.TryDequeue(out var io))
        {
            io.Complete(BdevIoStatus.Failed);
        }
    }

    /// <summary>On this reactor: the poller stops, the queue pair is deleted on the controller in the background and the bounce buffers freed after it (the device may write them until then).</summary>
    public void Destroy()
    {
        _reactor.UnregisterPoller(_poller);
        _failed = true;
        FailWaiting();
        if (_reportReconnect)
        {
            ConnectFinished(-6);
        }

        if (_qp is not null)
        {
            _qp.BeginDestroy(_bounce);
        }
        else
        {
            _bounce.Dispose();
        }
    }
}
