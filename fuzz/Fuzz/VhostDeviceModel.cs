using VhostBackend.Platform;
using VhostBackend.VhostUser;
using VhostBackend.Virtio;

namespace VhostBackend.Fuzz;

/// <summary>
/// A model of a vhost-user device for the vhost-msg target (not a real device): it offers every feature the
/// session implements, so that every request path is reachable, and its queues run nothing. A started queue pops
/// and walks a few chains at once on the protocol thread (the ring checks the session made must hold for a real
/// reactor too) and hands back its last avail index when stopped.
/// </summary>
internal sealed class VhostDeviceModel : IVhostUserDevice
{
    private readonly DescSegment[] _segments = new DescSegment[64];

    public string Name => "fuzz";

    public ulong Features =>
        (1UL << VhostUserConstants.ProtocolFeaturesBit) | (1UL << VirtioFeatures.RingEventIdx) | (1UL << 32) | (1UL << 28) | (1UL << 9) | (1UL << 6);

    public ulong ProtocolFeatures =>
        (1UL << VhostUserProtocolFeature.Mq) | (1UL << VhostUserProtocolFeature.ReplyAck) | (1UL << VhostUserProtocolFeature.BackendReq)
        | (1UL << VhostUserProtocolFeature.Config) | (1UL << VhostUserProtocolFeature.InflightShmfd) | (1UL << VhostUserProtocolFeature.ResetDevice)
        | (1UL << VhostUserProtocolFeature.ConfigureMemSlots) | (1UL << VhostUserProtocolFeature.Status);

    public int MaxQueues => 2;

    public int ReadConfig(uint offset, Span<byte> dest)
    {
        dest.Clear();
        return 0;
    }

    public int WriteConfig(uint offset, ReadOnlySpan<byte> data) => offset < 64 ? 0 : -Errno.EINVAL;

    public Task<IVhostQueueRunner> StartQueueAsync(VhostUserSession session, VhostUserReadyQueue queue)
    {
        var q = queue.Queue;
        foreach (var head in queue.Resubmit ?? [])
        {
            Walk(q, head);
        }

        for (int i = 0; i < 4 && q.TryPop(out ushort h) == PopResult.Popped; i++)
        {
            queue.Inflight?.Begin(h);
            Walk(q, h);
        }

        return Task.FromResult<IVhostQueueRunner>(new Runner(q));
    }

    private void Walk(DeviceVirtqueue q, ushort head)
    {
        if (head >= q.Size)
        {
            throw new FuzzFindingException($"head {head} handed to the device for a ring of {q.Size}");
        }

        _ = q.WalkChain(head, _segments, out _);
    }

    public void MemoryUpdated(VhostUserSession session, GuestMemory memory)
    {
    }

    public void SessionOpened(VhostUserSession session)
    {
    }

    public void SessionClosed(VhostUserSession session)
    {
    }

    private sealed class Runner(DeviceVirtqueue queue) : IVhostQueueRunner
    {
        public int InFlight => 0;

        public Task<uint> StopAsync() => Task.FromResult(queue.VringBase);

        public Task SetCallAsync(EventFd? call) => Task.CompletedTask;
    }
}
