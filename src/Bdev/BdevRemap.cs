using System.Runtime.CompilerServices;

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

    /// <summary>
    /// A remap that also hands the layer its map of fixed-size extents, so that the common case costs no call:
    /// <paramref name="extentMap"/>'s <c>Value[i]</c> is the base extent behind the bdev's extent <c>i</c>, extents
    /// of <c>1 &lt;&lt; <paramref name="extentShift"/></c> blocks on both, 0 meaning "ask <see cref="TryTranslate"/>".
    /// The layer reads <c>Value</c> once per I/O, and for an I/O within one extent whose entry is non-zero it
    /// translates by itself; anything else (an entry of 0, past the map's end, across extents) it asks
    /// <see cref="TryTranslate"/>. The module may set entries in place and publish another array at any time; to
    /// quiesce it publishes an array in which nothing it must hold back is mapped (e.g. an empty one), then does
    /// what <see cref="TryTranslate"/> describes.
    /// </summary>
    protected BdevRemap(BdevDesc baseDesc, BdevChannel baseChannel, StrongBox<uint[]> extentMap, int extentShift)
        : this(baseDesc, baseChannel)
    {
        ArgumentNullException.ThrowIfNull(extentMap);
        ArgumentOutOfRangeException.ThrowIfNegative(extentShift);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(extentShift, 31);
        ExtentMap = extentMap;
        ExtentShift = extentShift;
    }

    /// <summary>The extent map the layer reads itself, or null (every I/O asks <see cref="TryTranslate"/>).</summary>
    public StrongBox<uint[]>? ExtentMap { get; }

    /// <summary>The log2 of an extent's size in blocks (with <see cref="ExtentMap"/>).</summary>
    public int ExtentShift { get; }

    /// <summary>The descriptor the module holds on the base (checked per I/O: closed, writable).</summary>
    public BdevDesc BaseDesc { get; }

    /// <summary>The base's channel on this reactor; every remapped I/O of this channel goes to it.</summary>
    public BdevChannel Base { get; }

    /// <summary>
    /// Called on the channel's reactor with a read or a write of the bdev that passed its checks (range, type,
    /// descriptor) and QoS, not yet split (it may cross the bdev's <see cref="Bdev.OptimalIoBoundaryBlocks"/>).
    /// Returns true when the whole range maps to <paramref name="baseOffsetBlocks"/> .. + <see cref="BdevIo.NumBlocks"/>
    /// of the base, contiguously; false to let the module do it. Must not change the I/O, allocate or block.
    /// <para>There is no per-I/O hook. A module that must quiesce (stop and wait for) its remapped I/O, e.g. before
    /// it changes its map, makes <see cref="TryTranslate"/> say no from then on, has every reactor of its channels
    /// run a message (so a pass that translated before the change has submitted), and waits for
    /// <see cref="Bdev.RemappedInFlight"/> on the base to reach zero for its bdev: the layer counts every remapped
    /// I/O on the caller's channel until the base gives it back.</para>
    /// </summary>
    public abstract bool TryTranslate(BdevIo io, out ulong baseOffsetBlocks);
}
