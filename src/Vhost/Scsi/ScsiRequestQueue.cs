using System.Buffers.Binary;
using VhostBackend.Bdev;
using VhostBackend.Platform;
using VhostBackend.Reactors;
using VhostBackend.Scsi;
using VhostBackend.VhostUser;
using VhostBackend.Virtio;
using VhostBackend.Virtio.Scsi;

namespace VhostBackend.Vhost.Scsi;

/// <summary>A pre-allocated virtio-scsi command: its SCSI task, segment and iovec arrays. Owned by one queue.</summary>
internal sealed class ScsiRequest
{
    public const int MaxSegments = 160;

    public ScsiRequest(ScsiRequestQueue queue)
    {
        Queue = queue;
        Task.SetCompletion(ScsiRequestQueue.TaskDone, this);
    }

    public ScsiRequestQueue Queue { get; }
    public ScsiTask Task { get; } = new();
    public DescSegment[] Segments { get; } = new DescSegment[MaxSegments];
    public IoVec[] Iovs { get; } = new IoVec[MaxSegments];
    public ushort Head;
    public int SegmentCount;
    public int FirstWritable;
    public bool DataIn;
    public ScsiRequest? NextFree;
}

/// <summary>
/// A virtio-scsi request queue of one session, on one reactor: decodes virtio_scsi_req_cmd, resolves the target
/// and LUN, runs the command on the SCSI layer with the guest's data buffers (zero copy), and writes
/// virtio_scsi_resp_cmd. Each target's LUN channel is taken on first use and kept until the target changes.
/// </summary>
internal sealed class ScsiRequestQueue : VhostQueue
{
    internal static readonly ScsiTaskCompletion TaskDone = static (t, s) => ((ScsiRequest)s!).Queue.OnTaskDone((ScsiRequest)s!);

    private const int MaxRetired = 32;

    private readonly VhostScsiController _ctrlr;
    private readonly ScsiRequest[] _pool;
    private readonly VhostScsiTarget?[] _cachedTargets = new VhostScsiTarget?[VhostScsiController.MaxTargets];
    private readonly ScsiLunChannel?[] _channels = new ScsiLunChannel?[VhostScsiController.MaxTargets];
    private readonly ScsiLunChannel?[] _retired = new ScsiLunChannel?[MaxRetired];
    private int _retiredCount;
    private ScsiRequest? _free;

    public ScsiRequestQueue(VhostScsiController ctrlr, VhostUserSession session, int index, DeviceVirtqueue vq, EventFd? call, EventFd? kick, Reactor reactor)
        : base(ctrlr, session, index, vq, call, kick, reactor, "vhost_scsi")
    {
        _ctrlr = ctrlr;
        int poolSize = Math.Min((int)vq.Size, 1024);
        _pool = new ScsiRequest[poolSize];
        for (int i = 0; i < poolSize; i++)
        {
            var r = new ScsiRequest(this) { NextFree = _free };
            _free = r;
            _pool[i] = r;
        }
    }

    protected override bool CanTakeRequest => _free is not null;

    protected override void OnStop()
    {
        for (int i = 0; i < _channels.Length; i++)
        {
            _channels[i]?.Release();
            _channels[i] = null;
            _cachedTargets[i] = null;
        }

        for (int i = 0; i < _retiredCount; i++)
        {
            _retired[i]!.Release();
            _retired[i] = null;
        }

        _retiredCount = 0;
    }

    /// <summary>Releases channels of removed targets once no task of this reactor runs on them.</summary>
    protected override int PollDevice()
    {
        if (_retiredCount == 0)
        {
            return 0;
        }

        for (int i = _retiredCount - 1; i >= 0; i--)
        {
            var ch = _retired[i]!;
            if (ch.Outstanding == 0)
            {
                ch.Release();
                _retired[i] = _retired[--_retiredCount];
                _retired[_retiredCount] = null;
            }
        }

        return 0;
    }

    /// <summary>This queue's channel to the target's LUN 0 (taken on first use; a replaced target's channel is retired).</summary>
    private ScsiLunChannel? ChannelFor(VhostScsiTarget target)
    {
        int id = target.Id;
        if (_cachedTargets[id] != target)
        {
            if (_channels[id] is { } old)
            {
                if (old.Outstanding == 0 || _retiredCount == MaxRetired)
                {
                    old.Release();
                }
                else
                {
                    _retired[_retiredCount++] = old;
                }
            }

            _cachedTargets[id] = target;
            _channels[id] = target.Lun.IsRemoved ? null : target.Lun.GetIoChannel();
        }

        return _channels[id];
    }

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
        if (err != ChainError.None || info.ReadableBytes < VirtioScsi.CmdReqSize || info.WritableBytes < VirtioScsi.CmdRespSize)
        {
            LogBadRequest(head, "a command needs a 51-byte request and a 108-byte response", err, info.ReadableBytes, info.WritableBytes);
            bool canRespond = err == ChainError.None && info.WritableBytes >= VirtioScsi.CmdRespHeaderSize;
            Respond(req, canRespond ? VirtioScsi.SFailure : (byte)0, canRespond, 0, wasInFlight: false);
            return;
        }

        DescChain.TryRead(segs, 0, info.FirstWritable, 0, out VirtioScsiCmdReq hdr); // ReadableBytes >= CmdReqSize was checked
        ulong tag = hdr.Tag;
        if (!VirtioScsi.TryDecodeLun(hdr.Lun, out int targetId, out int lunId) || _ctrlr.GetTarget(targetId) is not { } target)
        {
            Respond(req, VirtioScsi.SBadTarget, true, 0, wasInFlight: false);
            return;
        }

        // Data-out follows the command header in the readable part; data-in follows the response in the writable part.
        ulong dataOut = info.ReadableBytes - VirtioScsi.CmdReqSize;
        ulong dataIn = info.WritableBytes - VirtioScsi.CmdRespSize;
        if (dataOut != 0 && dataIn != 0)
        {
            // Bidirectional commands need VIRTIO_SCSI_F_INOUT, which we do not offer.
            LogBadRequest(head, "data in both directions (VIRTIO_SCSI_F_INOUT not negotiated)", err, info.ReadableBytes, info.WritableBytes);
            Respond(req, VirtioScsi.SFailure, true, 0, wasInFlight: false);
            return;
        }

        var task = req.Task;
        int n;
        ulong bytes;
        if (dataOut != 0)
        {
            n = GatherIovs(segs.AsSpan(0, info.SegmentCount), 0, info.FirstWritable, VirtioScsi.CmdReqSize, req.Iovs, out bytes);
            req.DataIn = false;
        }
        else
        {
            n = GatherIovs(segs.AsSpan(0, info.SegmentCount), info.FirstWritable, info.SegmentCount, VirtioScsi.CmdRespSize, req.Iovs, out bytes);
            req.DataIn = true;
        }

        if (n < 0 || !task.SetCdb(hdr.Cdb))
        {
            Respond(req, VirtioScsi.SFailure, true, 0, wasInFlight: false);
            return;
        }

        task.SetData(req.DataIn ? ScsiDataDirection.FromDevice : ScsiDataDirection.ToDevice, req.Iovs.AsSpan(0, n));
        task.LunId = lunId;
        task.Tag = tag;
        task.Channel = lunId == 0 ? ChannelFor(target) : null;
        BeginInFlight();
        target.Device.Execute(task);
    }

    private void OnTaskDone(ScsiRequest req)
    {
        var task = req.Task;
        Respond(req, task.Aborted ? VirtioScsi.SAborted : VirtioScsi.SOk, true, req.DataIn ? task.DataTransferred : 0, wasInFlight: true);
    }

    /// <summary>Writes virtio_scsi_resp_cmd (status, sense and residual from the task when it ran) and completes the head.</summary>
    private void Respond(ScsiRequest req, byte response, bool writeResponse, ulong dataInBytes, bool wasInFlight)
    {
        uint used = 0;
        if (writeResponse)
        {
            var resp = default(VirtioScsiCmdResp);
            if (wasInFlight)
            {
                var task = req.Task;
                var sense = task.Sense;
                int senseLen = Math.Min(sense.Length, VirtioScsi.SenseSize);
                resp.SenseLen = (uint)senseLen;
                resp.Resid = (uint)Math.Min(task.Residual, uint.MaxValue);
                resp.Status = (byte)task.Status;
                sense[..senseLen].CopyTo(resp.Sense);
            }

            resp.Response = response;
            var segs = req.Segments.AsSpan(0, req.SegmentCount);
            int len = DescChain.Write(segs, req.FirstWritable, segs.Length, 0, in resp);
            used = (uint)len + (uint)dataInBytes;
        }

        Vq.LogWrites(req.Segments, req.FirstWritable, req.SegmentCount); // live migration: data-in and the response
        ushort head = req.Head;
        req.NextFree = _free;
        _free = req;
        Complete(head, used, wasInFlight);
    }
}
