using VhostBackend.Platform;
using VhostBackend.Virtio;

namespace VhostBackend.VhostUser;

/// <summary>
/// A queue ready to run, as the session hands it to the device: the validated split ring (its addresses checked
/// against guest memory), and the kick and call eventfds (either may be null: no kick = poll only, no call = the
/// front end polls). The eventfds stay owned by the session. <paramref name="Inflight"/>: the queue's region of the
/// in-flight buffer when the front end set one up (INFLIGHT_SHMFD), to mark heads taken and completed;
/// <paramref name="Resubmit"/>: heads a previous back end took and never completed, oldest first, to process before
/// anything new from the avail ring (the ring's base already counts them).
/// </summary>
public readonly record struct VhostUserReadyQueue(int Index, DeviceVirtqueue Queue, EventFd? Call, EventFd? Kick, InflightTracker? Inflight = null, ushort[]? Resubmit = null);

/// <summary>
/// The device behind a vhost-user session (virtio-blk, virtio-scsi): what it offers and how its queues run. The
/// session handles the protocol; the device sees only validated, ready-to-run queues. Members are called on
/// the session's protocol thread.
/// </summary>
public interface IVhostUserDevice
{
    string Name { get; }

    /// <summary>Virtio feature bits offered (including <see cref="VhostUserConstants.ProtocolFeaturesBit"/>).</summary>
    ulong Features { get; }

    ulong ProtocolFeatures { get; }

    /// <summary>Queues a session may use (GET_QUEUE_NUM).</summary>
    int MaxQueues { get; }

    /// <summary>Copies config space [offset, offset+dest.Length) into dest (zeros past the device's struct). 0 or -errno.</summary>
    int ReadConfig(uint offset, Span<byte> dest);

    /// <summary>Writes config space (only writable fields). 0 or -errno.</summary>
    int WriteConfig(uint offset, ReadOnlySpan<byte> data);

    /// <summary>Starts polling a queue on one of the device's reactors.</summary>
    Task<IVhostQueueRunner> StartQueueAsync(VhostUserSession session, VhostUserReadyQueue queue);

    /// <summary>The guest memory view changed (every queue is stopped while it does).</summary>
    void MemoryUpdated(VhostUserSession session, GuestMemory memory);

    void SessionOpened(VhostUserSession session);

    void SessionClosed(VhostUserSession session);
}

/// <summary>A running queue, owned by its reactor. Methods are called from the protocol thread and hop to the reactor.</summary>
public interface IVhostQueueRunner
{
    /// <summary>Stops taking requests, waits for in-flight ones to complete, stops polling; returns the GET_VRING_BASE value (<see cref="DeviceVirtqueue.VringBase"/>).</summary>
    Task<uint> StopAsync();

    /// <summary>Switches the call eventfd (QEMU does this when the guest masks/unmasks the queue's interrupt).</summary>
    Task SetCallAsync(EventFd? call);

    /// <summary>Requests submitted and not yet completed (racy read, for statistics).</summary>
    int InFlight { get; }
}
