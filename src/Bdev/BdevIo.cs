using System.Diagnostics;
using VhostBackend.Platform;

namespace VhostBackend.Bdev;

/// <summary>
/// One I/O in flight. Owned by the pool of the <see cref="BdevChannel"/> it came from: valid from submit until its
/// completion callback returns, after which it is recycled (do not keep references to it). The iovec array is
/// pre-allocated with the I/O and grows only when a request has more segments than it ever had (then stays).
/// </summary>
public sealed class BdevIo
{
    internal const int InitialIovCapacity = 64;

    private IoVec[] _iovs = new IoVec[InitialIovCapacity];
    private readonly IoVec[] _bounceIov = new IoVec[1];
    private bool _bounced;

    internal BdevIo(BdevChannel channel) => Channel = channel;

    public BdevChannel Channel { get; }
    public Bdev Bdev => Channel.Bdev;
    public BdevIoType Type { get; internal set; }
    public ulong OffsetBlocks { get; internal set; }
    public ulong NumBlocks { get; internal set; }
    public BdevIoStatus Status { get; internal set; }

    /// <summary>Scatter-gather list the module reads or writes (the bounce buffer when the caller's buffers were misaligned).</summary>
    public ReadOnlySpan<IoVec> Iovs => _bounced ? _bounceIov : _iovs.AsSpan(0, IovCount);

    internal ReadOnlySpan<IoVec> CallerIovs => _iovs.AsSpan(0, IovCount);

    public int IovCount { get; private set; }

    /// <summary>Free for the module's per-I/O state (e.g. its own request object); cleared on recycle.</summary>
    public object? ModuleContext;

    /// <summary>Free for the module (e.g. an NVMe status word).</summary>
    public long ModuleTag;

    /// <summary>NVMe-style status for the submitter when a module reports one (SCT &lt;&lt; 8 | SC; 0 = none).</summary>
    public int NvmeStatus;

    internal BdevIoCompletion? Callback;
    internal object? CallbackArg;
    internal long SubmitTicks;
    internal BdevIo? Next; // intrusive queues (pool, deferred, qos)

    // Splitting: a parent keeps its cursor; children point at it.
    internal BdevIo? Parent;
    internal ulong SplitNextOffset;
    internal ulong SplitRemaining;
    internal int SplitIovIndex;
    internal nuint SplitIovOffset;
    internal int SplitOutstanding;
    internal bool SplitFailed;

    // Forwarded in place to a base bdev's module (BdevChannel.TryForward): the base channel, the caller's offset and
    // module state saved while the base module runs, and the forwarding module's completion hook.
    internal BdevChannel? ForwardChannel;
    internal ulong ForwardSavedOffset;
    internal object? ForwardSavedContext;
    internal long ForwardSavedTag;
    internal Action<BdevIo>? ForwardDone;
    // Remapped by the caller's channel's remap (BdevChannel.TryRemap): its base channel is that remap's, so no
    // ForwardChannel is stored; accounted in the caller channel's RemapStats.
    internal bool Remapped;

    // Bounce buffer in use, if any.
    internal AlignedBuffer? BounceBuffer;
    internal nuint BounceLength;

    public ulong Length => NumBlocks * Bdev.BlockSize;

    internal void SetIovs(ReadOnlySpan<IoVec> iovs)
    {
        if (iovs.Length > _iovs.Length)
        {
            _iovs = new IoVec[Math.Max(iovs.Length, _iovs.Length * 2)]; // grows once per size class, then reused
        }

        iovs.CopyTo(_iovs);
        IovCount = iovs.Length;
        _bounced = false;
    }

    /// <summary>Copies <paramref name="bytes"/> bytes of <paramref name="source"/> starting at (index, offset) into this I/O's list.</summary>
    internal void SetIovsSlice(ReadOnlySpan<IoVec> source, ref int index, ref nuint offset, nuint bytes)
    {
        int count = 0;
        while (bytes > 0)
        {
            if (index >= source.Length)
            {
                throw new InvalidOperationException("iovec list shorter than the I/O");
            }

            var src = source[index];
            nuint take = Math.Min(src.Length - offset, bytes);
            if (count == _iovs.Length)
            {
                Array.Resize(ref _iovs, _iovs.Length * 2);
            }

            _iovs[count++] = new IoVec(src.Base + (nint)offset, take);
            bytes -= take;
            offset += take;
            if (offset == src.Length)
            {
                index++;
                offset = 0;
            }
        }

        IovCount = count;
        _bounced = false;
    }

    internal void UseBounce(AlignedBuffer buffer, nuint length)
    {
        BounceBuffer = buffer;
        BounceLength = length;
        _bounceIov[0] = buffer.ToIoVec(0, length);
        _bounced = true;
    }

    internal void ClearBounce()
    {
        BounceBuffer = null;
        BounceLength = 0;
        _bounced = false;
    }

    internal void Reset()
    {
        IovCount = 0;
        _bounced = false;
        ModuleContext = null;
        ModuleTag = 0;
        NvmeStatus = 0;
        Callback = null;
        CallbackArg = null;
        Parent = null;
        ForwardChannel = null;
        ForwardSavedContext = null;
        ForwardDone = null;
        Remapped = false;
        SplitOutstanding = 0;
        SplitFailed = false;
        Status = BdevIoStatus.Pending;
        Next = null;
    }

    /// <summary>Reports the module's result. Exactly once, on the channel's reactor.</summary>
    public void Complete(BdevIoStatus status)
    {
        Debug.Assert(Status == BdevIoStatus.Pending, "I/O completed twice");
        Status = status;
        Channel.OnModuleComplete(this);
    }

    public void Complete(bool success) => Complete(success ? BdevIoStatus.Success : BdevIoStatus.Failed);
}
