namespace VhostBackend.Virtio;

/// <summary>
/// The driver side of a virtqueue, split (<see cref="SplitVirtqueueDriver"/>) or packed
/// (<see cref="PackedVirtqueueDriver"/>), as a virtio-user front end drives it: chains are added with a token,
/// published, the device kicked when it asks to be, and used chains reaped with their token. Owned by one thread;
/// no allocation after construction. The device is not trusted: a used entry that names no chain in flight is
/// reported as <see cref="UsedResult.Broken"/>.
/// </summary>
public abstract class VirtqueueDriver
{
    /// <summary>Ring entries (a power of two).</summary>
    public abstract ushort Size { get; }

    /// <summary>VIRTIO_F_RING_EVENT_IDX negotiated.</summary>
    public abstract bool EventIdx { get; }

    /// <summary>The packed layout (VIRTIO_F_RING_PACKED).</summary>
    public abstract bool IsPacked { get; }

    /// <summary>Free ring descriptors.</summary>
    public abstract int FreeCount { get; }

    /// <summary>Chains handed to the device and not yet returned.</summary>
    public abstract int InFlight { get; }

    /// <summary>Whether the device has returned chains we have not reaped.</summary>
    public abstract bool HasUsed { get; }

    /// <summary>Adds a chain (device-readable buffers first); returns its id, or -1 when the ring is full (nothing changed).</summary>
    public abstract int TryAdd(ReadOnlySpan<DriverBuffer> buffers, int token);

    /// <summary>Makes every chain added so far visible to the device.</summary>
    public abstract void Publish();

    /// <summary>Whether the device wants a kick for what was published since the last call.</summary>
    public abstract bool NeedsKick();

    /// <summary>Reaps the next used chain: its token and the length the device wrote.</summary>
    public abstract UsedResult TryPopUsed(out int token, out uint length);

    /// <summary>Asks the device for no interrupts (we poll).</summary>
    public abstract void DisableInterrupts();

    /// <summary>Asks for an interrupt at the next used entry; true when used entries arrived meanwhile (reap, do not sleep).</summary>
    public abstract bool EnableInterrupts();

    /// <summary>The value for VHOST_USER_SET_VRING_BASE of a fresh ring (split: 0; packed: both wrap counters set).</summary>
    public abstract uint InitialVringBase { get; }
}
