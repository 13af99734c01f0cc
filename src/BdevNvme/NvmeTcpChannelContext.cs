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
/// I/O that cannot start (no free slot, queue pair connecting or the path down) waits in the FIFO of
/// <see cref="NvmeChannelBase{TRequest}"/>. I/O that the
/// connection loss failed ("transient transport error") goes back to that FIFO and is sent again after the
/// reconnect, unless the controller's fast_io_fail_timeout_sec has passed or it was given up: then it fails.
/// </para>
/// </summary>
internal sealed class NvmeTcpChannelContext : NvmeChannelBase<NvmeTcpChannelContext.Request>
{
    private readonly NvmeTcpBdevController _ctrl;
    private readonly NvmeTcpQueuePair? _qp;
    private readonly IoVec[] _oneIov = new IoVec[1];
    private bool _reportedLoss;

    internal sealed class Request : NvmeChannelRequest
    {
        public PinnedArray<byte> Dsm = null!;
    }

    public NvmeTcpChannelContext(NvmeTcpBdevController ctrl, Reactor reactor, ILogger log)
        : base(ctrl, reactor, log)
    {
        _ctrl = ctrl;
        if (ctrl.IsRemoved)
        {
            Failed = true;
        }
        else
        {
            try
            {
                _qp = ctrl.Controller.CreateIoQueuePair(ctrl.IoQueueEntries);
                if (ctrl.IsPathUp)
                {
                    _qp.StartConnect(ctrl.Controller.Cntlid, 0);
                    Connecting = true;
                }
            }
            catch (InvalidOperationException e)
            {
                log.LogError("NVMe/TCP {Name}: no I/O queue pair for {Reactor}: {Error}", ctrl.CtrlName, reactor, e.Message);
                Failed = true;
            }
        }

        Start(_qp is null ? 1 : _qp.Entries - 1, "bdev_nvme_poll:" + ctrl.CtrlName);
    }

    public NvmeTcpQueuePair? QueuePair => _qp;

    protected override bool MustFail => Failed || _ctrl.IsRemoved || _ctrl.FastIoFailed;

    protected override bool HasQueuePair => _qp is not null;

    protected override bool QueueConnected => _qp!.IsConnected;

    protected override void InitRequest(Request req) => req.Dsm = new PinnedArray<byte>(16);

    protected override int SubmitCommand(Request req, BdevIo io, NvmeNamespace ns)
    {
        var qp = _qp!;
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

        return rc;
    }

    // The connection went away under it: send it again after the reconnect.
    protected override bool ShouldRetry(BdevIo io, NvmeStatus status) => status == NvmeStatus.TransientTransportError && !MustFail;

    protected override int PollQueue()
    {
        var qp = _qp!;
        int n = 0;
        if (!Connecting && !Failed && !_reportedLoss && _ctrl.IsPathUp && !qp.IsConnected && !qp.IsConnecting && !qp.IsFailed)
        {
            // Created while the controller was reconnecting, after the walk that reconnects channels took its
            // snapshot: nobody else will connect this queue pair, so do it once the path is back.
            long t0 = Ticks.Now();
            qp.StartConnect(_ctrl.Controller.Cntlid, 0); // PollConnect reports a failure
            RecordStep(t0);
            Connecting = true;
        }

        if (Connecting)
        {
            long t0 = Ticks.Now();
            int rc = qp.PollConnect();
            RecordStep(t0);
            if (rc == 0)
            {
                return -1;
            }

            Connecting = false;
            if (rc < 0)
            {
                Log.LogWarning("NVMe/TCP {Name}: I/O queue {Qid} connect failed: {Error}", _ctrl.CtrlName, qp.Id, qp.LastError);
                ReportLoss();
            }

            ReportReconnectDone();
        }
        else
        {
            n = qp.Poll();
            if (qp.IsFailed)
            {
                ReportLoss();
            }
        }

        return n;
    }

    protected override void CheckTimeouts(long now)
    {
        long timeout = _ctrl.IoTimeoutTicks;
        if (timeout > 0 && _qp!.CountTimedOut(now, timeout) > 0)
        {
            // A fabrics controller that does not answer: drop the connection (its commands are retried after the reconnect).
            Log.LogWarning("NVMe/TCP {Name}: I/O on queue {Qid} timed out; reconnecting", _ctrl.CtrlName, _qp.Id);
            _qp.Close(NvmeStatus.TransientTransportError);
            ReportLoss();
        }
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
        if (Connecting)
        {
            ReportReconnectDone();
        }

        Connecting = false;
        _reportedLoss = true; // the controller knows
        _qp?.Close(NvmeStatus.TransientTransportError);
    }

    /// <summary>On this reactor: the controller is back; connect this queue pair again and report when done.</summary>
    public void StartReconnect()
    {
        if (!BeginReconnect())
        {
            return;
        }

        _reportedLoss = false;
        long t0 = Ticks.Now();
        _qp!.StartConnect(_ctrl.Controller.Cntlid, 0); // PollConnect reports a failure
        RecordStep(t0);
    }

    /// <summary>fast_io_fail_timeout_sec passed: fail what waits (new I/O fails at submit until the path is back).</summary>
    public void FailQueued() => FailWaiting();

    /// <summary>The controller was given up: fail everything now and later.</summary>
    public void FailAll()
    {
        Failed = true;
        _qp?.Close(NvmeStatus.InternalDeviceError);
        FailWaiting();
        ReportReconnectDone();
    }

    public void Destroy()
    {
        StopPolling();
        ReportReconnectDone();
        if (_qp is not null)
        {
            _qp.Close(NvmeStatus.AbortedSqDeletion);
            _ctrl.Controller.ReleaseQueuePair(_qp);
        }

        FailWaiting();
    }
}
