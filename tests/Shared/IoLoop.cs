using VhostBackend.Bdev;
using VhostBackend.Platform;

namespace VhostBackend.TestShared;

/// <summary>
/// Keeps <c>depth</c> 4 KiB reads and writes (8 blocks of 512 bytes, alternating) in flight on one channel with a cached
/// callback, over the first <c>spanBlocks</c> blocks, and measures what the reactor thread allocated meanwhile. Run it
/// on a reactor; <see cref="Release"/> there too. A source file linked into the test projects that check the
/// zero-allocation data path (Bdev, BdevRaid, BdevVbdev, BdevVirtio, Blob).
/// </summary>
internal sealed class IoLoop
{
    private static readonly BdevIoCompletion s_done = static (io, ok, arg) => ((IoLoop)arg!).OnDone(ok);
    private readonly BdevDesc _desc;
    private readonly IoVec[] _iov;
    private readonly ulong _span;
    private BdevChannel? _ch;
    private int _remaining;
    private int _inflight;
    private long _start;
    private TaskCompletionSource<long>? _tcs;

    public IoLoop(BdevDesc desc, IoVec[] iov, ulong spanBlocks = 1024)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(spanBlocks, 8UL);
        _desc = desc;
        _iov = iov;
        _span = spanBlocks;
    }

    /// <summary>Runs <paramref name="count"/> I/Os, <paramref name="depth"/> at a time; the bytes allocated on this thread.</summary>
    public Task<long> Run(int count, int depth)
    {
        _ch ??= _desc.GetIoChannel();
        _tcs = new TaskCompletionSource<long>();
        _remaining = count;
        _start = GC.GetAllocatedBytesForCurrentThread();
        for (int i = 0; i < depth; i++)
        {
            Submit();
        }

        return _tcs.Task;
    }

    /// <summary>
    /// Warms up with <paramref name="warmup"/> I/Os, then measures windows of <paramref name="count"/> I/Os and returns
    /// the smaller of the first two (the first alone when it allocated nothing). A one-off first-time path (a type load,
    /// a tier-up stub, a timer the reactor runs once) can land in one window; an allocation per I/O lands in every
    /// window (count x at least 24 bytes), so the smaller window is the steady state.
    /// </summary>
    public async Task<long> SteadyStateAllocation(int warmup, int count, int depth)
    {
        await Run(warmup, depth);
        long first = await Run(count, depth);
        return first == 0 ? 0 : Math.Min(first, await Run(count, depth));
    }

    /// <summary>Releases the channel (on its reactor).</summary>
    public void Release()
    {
        if (_ch is { } ch)
        {
            BdevDesc.PutIoChannel(ch);
            _ch = null;
        }
    }

    private void Submit()
    {
        _remaining--;
        _inflight++;
        ulong lba = (ulong)_remaining % (_span / 8) * 8;
        int rc = (_remaining & 1) == 0 ? _ch!.Read(_desc, _iov, lba, 8, s_done, this) : _ch!.Write(_desc, _iov, lba, 8, s_done, this);
        if (rc != 0)
        {
            throw new InvalidOperationException($"submit failed {rc}");
        }
    }

    private void OnDone(bool ok)
    {
        if (!ok)
        {
            throw new InvalidOperationException("I/O failed");
        }

        _inflight--;
        if (_remaining > 0)
        {
            Submit();
        }
        else if (_inflight == 0)
        {
            _tcs!.SetResult(GC.GetAllocatedBytesForCurrentThread() - _start);
        }
    }
}
