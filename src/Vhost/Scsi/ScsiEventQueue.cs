using System.Buffers.Binary;
using Microsoft.Extensions.Logging;
using VhostBackend.Platform;
using VhostBackend.Reactors;
using VhostBackend.VhostUser;
using VhostBackend.Virtio;
using VhostBackend.Virtio.Scsi;

namespace VhostBackend.Vhost.Scsi;

/// <summary>
/// The virtio-scsi event queue of one session. Events (hot add/remove, parameter change) are queued on the
/// reactor and each one takes a buffer the driver posted; buffers are popped only when an event is waiting.
/// If more events arrive than the backlog holds, the next one delivered carries VIRTIO_SCSI_T_EVENTS_MISSED
/// (Linux then rescans the whole host).
/// </summary>
internal sealed class ScsiEventQueue : VhostQueue
{
    private const int Backlog = 32;

    private readonly (uint Type, int Target, uint Reason)[] _pending = new (uint, int, uint)[Backlog];
    private readonly DescSegment[] _segments = new DescSegment[8];
    private int _head;
    private int _count;
    private bool _missed;

    public ScsiEventQueue(VhostScsiController ctrlr, VhostUserSession session, int index, DeviceVirtqueue vq, EventFd? call, EventFd? kick, Reactor reactor)
        : base(ctrlr, session, index, vq, call, kick, reactor, "vhost_scsi_event")
    {
    }

    /// <summary>Events waiting for a buffer (racy read off the reactor).</summary>
    public int Pending => Volatile.Read(ref _count);

    protected override bool CanTakeRequest => _count > 0;

    /// <summary>Queues an event (from any thread: hops to the queue's reactor).</summary>
    public void Post(uint type, int target, uint reason) =>
        Reactor.Send(static s =>
        {
            var (q, t, tgt, r) = ((ScsiEventQueue, uint, int, uint))s!;
            q.Enqueue(t, tgt, r);
        }, (this, type, target, reason));

    private void Enqueue(uint type, int target, uint reason)
    {
        if (Stopping)
        {
            return;
        }

        if (_count == Backlog)
        {
            _missed = true;
            return;
        }

        _pending[(_head + _count) % Backlog] = (type, target, reason);
        _count++;
    }

    protected override void Process(ushort head)
    {
        var err = Vq.WalkChain(head, _segments, out var info);
        if (err != ChainError.None || info.WritableBytes < VirtioScsi.EventSize)
        {
            LogBadRequest(head, "event buffer needs 16 writable bytes", err, info.ReadableBytes, info.WritableBytes);
            Complete(head, 0, wasInFlight: false);
            return;
        }

        var (type, target, reason) = _pending[_head];
        _head = (_head + 1) % Backlog;
        _count--;
        if (_missed)
        {
            type |= VirtioScsi.EventsMissed;
            _missed = false;
        }

        var ev = new VirtioScsiEvent { Event = type, Reason = reason };
        VirtioScsi.EncodeLun(ev.Lun, target, 0);
        DescChain.Write(_segments.AsSpan(0, info.SegmentCount), info.FirstWritable, info.SegmentCount, 0, in ev);
        Vq.LogWrites(_segments, info.FirstWritable, info.SegmentCount);
        Logger.LogInformation("vhost_scsi {Session}: event 0x{Type:x} for target {Target} (reason 0x{Reason:x}) delivered", Session.Name, type, target, reason);
        Complete(head, VirtioScsi.EventSize, wasInFlight: false);
    }
}
