namespace VhostBackend.Bdev;

public enum BdevIoType
{
    Read,
    Write,
    Flush,
    Unmap,
    WriteZeroes,
    Reset,
    Compare,
}

public enum BdevIoStatus
{
    Pending = 0,
    Success = 1,
    Failed = -1,
    NoMemory = -4,
    Aborted = -5,
    Miscompare = -6,
}

public enum BdevEventType
{
    /// <summary>The bdev is going away: close the descriptor (after draining I/O).</summary>
    Remove,

    /// <summary>The block count changed.</summary>
    Resize,
}

/// <summary>Completion callback for a bdev I/O. Fires exactly once, on the submitting reactor; the I/O returns to its pool afterwards.</summary>
public delegate void BdevIoCompletion(BdevIo io, bool success, object? callbackArg);

/// <summary>Event callback of an open descriptor (hot remove, resize).</summary>
public delegate void BdevEventCallback(BdevEventType type, Bdev bdev, object? context);

/// <summary>
/// A caller-owned entry for <see cref="BdevChannel.QueueIoWait"/>: when a submit returned -ENOMEM the caller
/// parks one of these and is called back (on the same reactor) when an I/O object is free again.
/// </summary>
public sealed class BdevIoWaitEntry
{
    public BdevIoWaitEntry(Action<object?> callback, object? arg)
    {
        Callback = callback;
        Arg = arg;
    }

    public Action<object?> Callback { get; }
    public object? Arg { get; }
    internal BdevIoWaitEntry? Next;
    internal bool Queued;
}

/// <summary>Per-bdev I/O statistics, summed over channels. Latencies in <see cref="VhostBackend.Platform.Ticks"/> ticks.</summary>
public struct BdevIoStats
{
    public long BytesRead;
    public long NumReadOps;
    public long BytesWritten;
    public long NumWriteOps;
    public long BytesUnmapped;
    public long NumUnmapOps;
    public long NumWriteZeroesOps;
    public long NumFlushOps;
    public long NumErrors;
    public long ReadLatencyTicks;
    public long WriteLatencyTicks;
    public long UnmapLatencyTicks;
    public long MaxReadLatencyTicks;
    public long MaxWriteLatencyTicks;
    public long MaxUnmapLatencyTicks;
    public long MinReadLatencyTicks;
    public long MinWriteLatencyTicks;
    public long MinUnmapLatencyTicks;

    public void Add(in BdevIoStats o)
    {
        BytesRead += o.BytesRead;
        NumReadOps += o.NumReadOps;
        BytesWritten += o.BytesWritten;
        NumWriteOps += o.NumWriteOps;
        BytesUnmapped += o.BytesUnmapped;
        NumUnmapOps += o.NumUnmapOps;
        NumWriteZeroesOps += o.NumWriteZeroesOps;
        NumFlushOps += o.NumFlushOps;
        NumErrors += o.NumErrors;
        ReadLatencyTicks += o.ReadLatencyTicks;
        WriteLatencyTicks += o.WriteLatencyTicks;
        UnmapLatencyTicks += o.UnmapLatencyTicks;
        MaxReadLatencyTicks = Math.Max(MaxReadLatencyTicks, o.MaxReadLatencyTicks);
        MaxWriteLatencyTicks = Math.Max(MaxWriteLatencyTicks, o.MaxWriteLatencyTicks);
        MaxUnmapLatencyTicks = Math.Max(MaxUnmapLatencyTicks, o.MaxUnmapLatencyTicks);
        MinReadLatencyTicks = MinNonZero(MinReadLatencyTicks, o.MinReadLatencyTicks);
        MinWriteLatencyTicks = MinNonZero(MinWriteLatencyTicks, o.MinWriteLatencyTicks);
        MinUnmapLatencyTicks = MinNonZero(MinUnmapLatencyTicks, o.MinUnmapLatencyTicks);
    }

    private static long MinNonZero(long a, long b) => a == 0 ? b : b == 0 ? a : Math.Min(a, b);
}
