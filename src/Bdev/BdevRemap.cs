namespace VhostBackend.Bdev;

/// <summary>
/// A bdev's remap fast path, one per <see cref="BdevChannel"/> (<see cref="Bdev.CreateRemap"/>): a module whose
/// reads and writes are, in the common case, the same I/O at another offset of one base bdev (an lvol's allocated
/// cluster) lets the bdev layer resolve that in the caller's own pass. After the caller's channel has checked the
/// I/O and admitted it through QoS, and before it would split it or hand it to the module, it asks
/// <see cref="TryTranslate"/>; on yes it submits the same <see cref="BdevIo"/> to the base's module at the
/// translated offset (no second I/O, no second pass through the module), counts it in the base's statistics and in
/// the bdev's own, and completes it once to the caller. On no (or when the base cannot take it: QoS on the base,
/// its descriptor closed or read-only for a write, the range past its end) the I/O takes the module's regular path.
/// <para>The layer takes a remap only when it can never need a split or a bounce buffer at the base, i.e. the base's
/// module accepts forwarded I/O (<see cref="Bdev.AcceptsForwardedIo"/>) with no transfer limit, I/O boundary or
/// alignment, supports read and write, and has the bdev's block size; otherwise the channel has no remap. For a bdev
/// without a remap the cost is one branch per I/O.</para>
/// </summary>
public abstract class BdevRemap
{
    protected BdevRemap(BdevDesc baseDesc, BdevChannel baseChannel)
    {
        ArgumentNullException.ThrowIfNull(baseDesc);
        ArgumentNullException.ThrowIfNull(baseChannel);
        BaseDesc = baseDesc;
        Base = baseChannel;
    }

    /// <summary>The descriptor the module holds on the base (checked per I/O: closed, writable).</summary>
    public BdevDesc BaseDesc { get; }

    /// <summary>The base's channel on this reactor; every remapped I/O of this channel goes to it.</summary>
    public BdevChannel Base { get; }

    /// <summary>
    /// Called on the channel's reactor with a read or a write of the bdev that passed its checks (range, type,
    /// descriptor) and QoS, not yet split (it may cross the bdev's <see cref="Bdev.OptimalIoBoundaryBlocks"/>).
    /// Returns true when the whole range maps to <paramref name="baseOffsetBlocks"/> .. + <see cref="BdevIo.NumBlocks"/>
    /// of the base, contiguously; false (nothing changed) to let the module do it. On true the implementation may
    /// have set <see cref="BdevIo.ModuleTag"/> and asked for <see cref="Done"/> (<paramref name="done"/>): the layer
    /// then calls it exactly once with the tag restored, when the base gives the I/O back (before a NoMemory retry,
    /// which then goes through the module, and before the caller's callback), or at once when it could not submit
    /// to the base after all. Must not allocate, block or touch <see cref="BdevIo.ModuleContext"/>.
    /// </summary>
    public abstract bool TryTranslate(BdevIo io, out ulong baseOffsetBlocks, out bool done);

    /// <summary>The hook a <see cref="TryTranslate"/> that answered <c>done = true</c> gets, once per such I/O (e.g. the
    /// write count a quiesce waits on). A virtual call, not a delegate stored in the I/O: no per-I/O reference store.</summary>
    protected internal virtual void Done(BdevIo io)
    {
    }
}
