namespace VhostBackend.Virtio;

/// <summary>
/// One queue's region of a vhost-user in-flight buffer (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), whatever the ring
/// layout: <see cref="InflightQueue"/> (QEMU's QueueRegionSplit) or <see cref="InflightPackedQueue"/>
/// (QueueRegionPacked). The device queue calls, on its reactor: <see cref="Begin"/> for each id it pops,
/// <see cref="AddUsed"/> just before the used element of an id is written, <see cref="UsedWritten"/> just after,
/// and <see cref="CommitUsed"/> once a batch of used elements was published. Each layout uses the hooks its
/// protocol needs; all are allocation free.
/// </summary>
public abstract class InflightTracker
{
    /// <summary>Buffer <paramref name="head"/> (split: the head index; packed: the buffer id) was taken from the ring.</summary>
    public abstract void Begin(ushort head);

    /// <summary>The used element of <paramref name="head"/> is about to be written (published later or by its own store).</summary>
    public abstract void AddUsed(ushort head);

    /// <summary>The used element of <paramref name="head"/> was written (packed: it is visible to the driver now).</summary>
    public virtual void UsedWritten(ushort head)
    {
    }

    /// <summary>The used index published to the driver is now <paramref name="usedIdx"/> (split).</summary>
    public virtual void CommitUsed(ushort usedIdx)
    {
    }

    /// <summary>Whether <paramref name="head"/> is marked in flight (tests).</summary>
    public abstract bool IsInflight(ushort head);
}
