using System.Buffers.Binary;
using VhostBackend.Platform;
using VhostBackend.Reactors;
using VhostBackend.Scsi;
using VhostBackend.VhostUser;
using VhostBackend.Virtio;
using VhostBackend.Virtio.Scsi;

namespace VhostBackend.Vhost.Scsi;

/// <summary>
/// The virtio-scsi control queue of one session: task management functions (run on the SCSI layer, answered
/// after every task they aborted has completed) and asynchronous-notification queries/subscriptions (we report
/// no supported events).
/// </summary>
internal sealed class ScsiControlQueue : VhostQueue
{
    private const int PoolSize = 16;

    private static readonly ScsiTmfCompletion s_tmfDone = static (r, s) => ((ControlRequest)s!).Queue.OnTmfDone((ControlRequest)s!, r);

    private readonly VhostScsiController _ctrlr;
    private ControlRequest? _free;

    public ScsiControlQueue(VhostScsiController ctrlr, VhostUserSession session, int index, DeviceVirtqueue vq, EventFd? call, EventFd? kick, Reactor reactor)
        : base(ctrlr, session, index, vq, call, kick, reactor, "vhost_scsi_ctrl")
    {
        _ctrlr = ctrlr;
        for (int i = 0; i < PoolSize; i++)
        {
            _free = new ControlRequest(this) { NextFree = _free };
        }
    }

    protected override bool CanTakeRequest => _free is not null;

    protected override void Process(ushort head)
    {
        var req = _free!;
        _free = req.NextFree;
        req.NextFree = null;
        req.Head = head;
        var segs = req.Segments;
        var err = Vq.WalkChain(head, segs, out var info);
        req.SegmentCount = info.SegmentCount;
        req.FirstWritable = info.FirstWritable;
        if (err != ChainError.None || info.ReadableBytes < 4 || info.WritableBytes < 1)
        {
            LogBadRequest(head, "control request needs a type and a response byte", err, info.ReadableBytes, info.WritableBytes);
            Finish(req, 0, wasInFlight: false);
            return;
        }

        Span<byte> typeBytes = stackalloc byte[4];
        CopyFromChain(segs, info.FirstWritable, 0, typeBytes);
        uint type = BinaryPrimitives.ReadUInt32LittleEndian(typeBytes);
        switch (type)
        {
            case VirtioScsi.TTmf when info.ReadableBytes >= VirtioScsi.TmfReqSize:
                {
                    DescChain.TryRead(segs, 0, info.FirstWritable, 0, out VirtioScsiCtrlTmfReq tmf);
                    uint subtype = tmf.Subtype;
                    ulong tag = tmf.Tag;
                    if (!VirtioScsi.TryDecodeLun(tmf.Lun, out int target, out int lun) || _ctrlr.GetTarget(target) is not { } t)
                    {
                        WriteResponse(req, 0, VirtioScsi.SBadTarget);
                        Finish(req, 1, wasInFlight: false);
                        return;
                    }

                    if (subtype > (uint)ScsiTaskManagementFunction.QueryTaskSet)
                    {
                        WriteResponse(req, 0, VirtioScsi.SFunctionRejected);
                        Finish(req, 1, wasInFlight: false);
                        return;
                    }

                    BeginInFlight();
                    t.Device.TaskManagement((ScsiTaskManagementFunction)subtype, lun, tag, s_tmfDone, req);
                    return;
                }

            case VirtioScsi.TAnQuery or VirtioScsi.TAnSubscribe when info.ReadableBytes >= VirtioScsi.AnReqSize && info.WritableBytes >= VirtioScsi.AnRespSize:
                {
                    // event_actual = 0: no asynchronous notification classes are supported.
                    var resp = new VirtioScsiCtrlAnResp { EventActual = 0, Response = VirtioScsi.SOk };
                    DescChain.Write(segs, info.FirstWritable, info.SegmentCount, 0, in resp);
                    Finish(req, VirtioScsi.AnRespSize, wasInFlight: false);
                    return;
                }

            default:
                LogBadRequest(head, "control request type not supported (or too short for its type)", err, info.ReadableBytes, info.WritableBytes);
                WriteResponse(req, 0, VirtioScsi.SFailure);
                Finish(req, 1, wasInFlight: false);
                return;
        }
    }

    private void OnTmfDone(ControlRequest req, ScsiTaskManagementResponse response)
    {
        byte r = response switch
        {
            ScsiTaskManagementResponse.Complete => VirtioScsi.SOk, // VIRTIO_SCSI_S_FUNCTION_COMPLETE
            ScsiTaskManagementResponse.Succeeded => VirtioScsi.SFunctionSucceeded,
            ScsiTaskManagementResponse.IncorrectLun => VirtioScsi.SIncorrectLun,
            _ => VirtioScsi.SFunctionRejected,
        };
        WriteResponse(req, 0, r);
        Finish(req, 1, wasInFlight: true);
    }

    private void WriteResponse(ControlRequest req, int offset, byte response)
    {
        ReadOnlySpan<byte> b = [response];
        CopyToChain(req.Segments.AsSpan(0, req.SegmentCount), req.FirstWritable, req.SegmentCount, (ulong)offset, b);
    }

    private void Finish(ControlRequest req, uint used, bool wasInFlight)
    {
        Vq.LogWrites(req.Segments, req.FirstWritable, req.SegmentCount);
        ushort head = req.Head;
        req.NextFree = _free;
        _free = req;
        Complete(head, used, wasInFlight);
    }

    private sealed class ControlRequest
    {
        public ControlRequest(ScsiControlQueue queue) => Queue = queue;

        public ScsiControlQueue Queue { get; }
        public DescSegment[] Segments { get; } = new DescSegment[8];
        public ushort Head;
        public int SegmentCount;
        public int FirstWritable;
        public ControlRequest? NextFree;
    }
}
