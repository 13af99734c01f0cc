using System.Numerics;
using VhostBackend.Platform;

namespace VhostBackend.Bdev;

/// <summary>The I/O classes a channel keeps a latency histogram for.</summary>
public enum BdevLatencyClass
{
    Read = 0,
    Write = 1,

    /// <summary>Unmap, write zeroes and flush.</summary>
    Other = 2,
}

/// <summary>
/// The bdev layer's latency histogram (like SPDK's bdev histogram, without its sub-buckets): 64 buckets of
/// <see cref="Ticks"/>, bucket 0 for 0 ticks and bucket i for [2^(i-1), 2^i) ticks. Each channel keeps one per
/// <see cref="BdevLatencyClass"/> and increments it on its own reactor when an I/O completes successfully (one
/// leading-zero count and one increment: no allocation, no lock, no atomic). Other threads read the counters
/// racily but never torn (aligned 64-bit loads), like <see cref="Bdev.GetStats"/>.
/// </summary>
public static class BdevLatencyHistogram
{
    public const int Buckets = 64;

    /// <summary>Buckets of all classes, one after the other (a channel's array length).</summary>
    public const int Length = Buckets * 3;

    /// <summary>The bucket for a latency of <paramref name="ticks"/> (negative counts as 0).</summary>
    public static int BucketOf(long ticks) => Buckets - BitOperations.LeadingZeroCount((ulong)Math.Max(ticks, 0));

    /// <summary>The exclusive upper bound of <paramref name="bucket"/>, in ticks (2^bucket).</summary>
    public static double UpperBoundTicks(int bucket) => Math.ScaleB(1.0, bucket);

    /// <summary>The exclusive upper bound of <paramref name="bucket"/>, in microseconds.</summary>
    public static double UpperBoundMicroseconds(int bucket) => UpperBoundTicks(bucket) * 1_000_000.0 / Ticks.Frequency;
}
