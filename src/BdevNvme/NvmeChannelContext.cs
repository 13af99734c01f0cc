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
/// a reset) waits in the FIFO of <see cref="NvmeChannelBase{TRequest}"/> and is started by the poller. I/O aborted
/// by a controller reset is retried (up to 3 times). Nothing here waits for the controller: the queue pair is created (and re-created after a reset) by
/// polling its connect state machine from this channel's poller, and deleted asynchronously on destroy.
/// </para>
/// </summary>
internal sealed class NvmeChannelContext : NvmeChannelBase<NvmeChannelContext.Request>
{
    private const int MaxRetries = 3;
    private const int BounceBuffers = 32;

    /// <summary>A channel's bounce memory (reserved per reactor at attach: <see cref="DmaSpace.Reserve"/>).</summary>
    internal const ulong BounceBytes = BounceBuffers * (ulong)NvmeBdev.MaxIoBytes;
    private readonly NvmeBdevController _ctrl;
    private readonly NvmeQueuePair? _qp;
    private readonly DmaBufferPool _bounce;

    internal sealed class Request : NvmeChannelRequest
    {
        public nint Bounce;
    }

    public NvmeChannelContext(NvmeBdevController ctrl, Reactor reactor, ILogger log)
        : base(ctrl, reactor, log)
    {
        _ctrl = ctrl;
        if (ctrl.IsRemoved)
        {
            Failed = true; // the device is gone: a channel that fails its I/O
        }
        else
        {
            try
            {
                // Allocated here, created on the controller by the poller (PollConnect): I/O waits until then.
                _qp = ctrl.Controller.CreateIoQueuePair();
                _qp.StartConnect();
                Connecting = true;
            }
            catch (Exception e) when (e is IOException or InvalidOperationException or ObjectDisposedException or OutOfMemoryException)
            {
                // No queue pair (controller failed, out of queues): a channel that fails its I/O.
                log.LogError("NVMe {Name}: no I/O queue pair for {Reactor}: {Error}", ctrl.CtrlName, reactor, e.Message);
                Failed = true;
            }
        }

        _bounce = new DmaBufferPool(ctrl.Controller.Dma, BounceBuffers, (int)NvmeBdev.MaxIoBytes, "vb-nvme-bounce");
        Start(_qp is null ? 1 : _qp.Entries - 1, "bdev_nvme_poll:" + ctrl.CtrlName);
        if (_qp?.InterruptFd is { } irq)
        {
            SetWakeSource(irq.Fd); // the queue's MSI-X vector (or INTx): the reactor may sleep until a completion
        }
    }

    /// <summary>Connecting: keep polling (the connect steps complete on the admin queue); else arm the queue's interrupt.</summary>
    protected override bool ArmWake() => Connecting || (_qp is not null && _qp.ArmInterrupt());

    public NvmeQueuePair? QueuePair => _qp;

    protected override bool HasQueuePair => _qp is not null;

    protected override bool QueueConnected => _qp!.IsConnected;

    private static readonly NvmeTimeoutCallback s_timeout = static (c, qp, cid) => ((NvmeChannelContext)c!).OnCommandTimeout(qp.Id, cid);

    protected override int SubmitCommand(Request req, BdevIo io, NvmeNamespace ns)
    {
        var qp = _qp!;
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
                    ulong len = io.NumBlocks * req.Bdev!.BlockSize; // (io.Length reads io.Bdev: another bdev's when forwarded)
                    if (len > (ulong)_bounce.BufferSize)
                    {
                        rc = -Errno.EINVAL;
                        break;
                    }

                    if (!_bounce.TryGet(out nint va, out _))
                    {
                        return -Errno.ENOMEM; // wait for a bounce buffer
                    }

                    if (io.Type != BdevIoType.Read)
                    {
                        _bounce.CopyIn(va, iovs);
                    }

                    req.Bounce = va;
                    req.Bdev.CountBounce(len);
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

        return rc;
    }

    protected override void ReleaseResources(Request req)
    {
        if (req.Bounce != 0)
        {
            _bounce.Return(req.Bounce);
            req.Bounce = 0;
        }
    }

    protected override bool ShouldRetry(BdevIo io, NvmeStatus status)
    {
        if (status == NvmeStatus.AbortedSqDeletion && !Failed && io.ModuleTag < MaxRetries)
        {
            // Aborted by a reset or queue deletion: retry once the queue pair is back.
            io.ModuleTag++;
            return true;
        }

        return false;
    }

    protected override void Completing(Request req, NvmeStatus status)
    {
        if (req.Bounce != 0 && status.IsSuccess && req.Io!.Type == BdevIoType.Read)
        {
            _bounce.CopyOut(req.Bounce, MemoryMarshal.Cast<IoVec, NvmeIoVec>(req.Io.Iovs));
        }
    }

    protected override int PollQueue()
    {
        if (Connecting)
        {
            long t0 = Ticks.Now();
            int rc = _qp!.PollConnect();
            RecordStep(t0);
            if (rc == 0)
            {
                return -1;
            }

            ConnectFinished(rc);
        }

        return _qp!.ProcessCompletions();
    }

    protected override void CheckTimeouts(long now) => _qp!.CheckTimeouts(now, s_timeout, this);

    private void ConnectFinished(int rc)
    {
        Connecting = false;
        if (rc < 0)
        {
            if (_ctrl.IsResetting && !ReconnectReportPending)
            {
                // Failed because a reset started (it aborts admin commands): the reset reconnects this channel.
                Log.LogInformation("NVMe {Name}: queue pair {Qid} connect interrupted by a reset ({Rc})", _ctrl.CtrlName, _qp!.Id, rc);
            }
            else
            {
                Log.LogError("NVMe {Name}: queue pair {Qid} could not be created ({Rc}); failing its I/O", _ctrl.CtrlName, _qp!.Id, rc);
                FailAll();
            }
        }

        ReportReconnectDone();
    }

    /// <summary>
    /// On this reactor, after the controller was reset: starts re-creating the queue pair (the poller drives it; I/O
    /// that was outstanding is retried once it is connected) and reports to the controller when done.
    /// </summary>
    public void StartReconnect()
    {
        if (!BeginReconnect())
        {
            return;
        }

        long t0 = Ticks.Now();
        int rc = _qp!.StartConnect(); // fails what was outstanding (retried once connected)
        RecordStep(t0);
        if (rc != 0)
        {
            ConnectFinished(-22);
        }
    }

    /// <summary>The device is gone or its reset failed: fail everything now and later.</summary>
    public void FailAll()
    {
        Failed = true;
        _qp?.FailOutstanding(NvmeStatus.InternalDeviceError);
        FailWaiting();
        if (Connecting)
        {
            ConnectFinished(-6);
        }
    }

    /// <summary>On this reactor: the poller stops, the queue pair is deleted on the controller in the background and the bounce buffers freed after it (the device may write them until then).</summary>
    public void Destroy()
    {
        StopPolling();
        FailWaiting();
        if (ReconnectReportPending)
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
