namespace VhostBackend.BdevPerf;

/// <summary>
/// Log-linear latency histogram (like HdrHistogram with 3 significant bits): 16 buckets per power of two
/// of <see cref="VhostBackend.Platform.Ticks"/> ticks. Pre-allocated; recording is two shifts and an increment; owned by one reactor.
/// </summary>
public sealed class LatencyHistogram
{
    private const int SubBits = 5;
    private const int SubBuckets = 1 << SubBits;
    private readonly long[] _counts = new long[64 * SubBuckets];

    public long Count { get; private set; }
    public long Sum { get; private set; }
    public long Min { get; private set; } = long.MaxValue;
    public long Max { get; private set; }

    public void Record(long ticks)
    {
        if (ticks < 0)
        {
            ticks = 0;
        }

        _counts[Index(ticks)]++;
        Count++;
        Sum += ticks;
        if (ticks < Min)
        {
            Min = ticks;
        }

        if (ticks > Max)
        {
            Max = ticks;
        }
    }

    private static int Index(long v)
    {
        if (v < SubBuckets)
        {
            return (int)v;
        }

        int msb = 63 - System.Numerics.BitOperations.LeadingZeroCount((ulong)v);
        int shift = msb - SubBits + 1;
        int sub = (int)(v >> shift) & (SubBuckets - 1);
        return (shift * SubBuckets) + sub; // sub is in [16, 31]: 16 buckets per octave
    }

    private static long UpperBound(int index)
    {
        int shift = index / SubBuckets;
        int sub = index % SubBuckets;
        if (shift == 0)
        {
            return sub;
        }

        // The bucket holds the values v with v >> shift == sub.
        return ((long)(sub + 1) << shift) - 1;
    }

    public void Merge(LatencyHistogram other)
    {
        for (int i = 0; i < _counts.Length; i++)
        {
            _counts[i] += other._counts[i];
        }

        Count += other.Count;
        Sum += other.Sum;
        Min = Math.Min(Min, other.Min);
        Max = Math.Max(Max, other.Max);
    }

    /// <summary>The non-empty buckets in order: the range of values each holds and its count (reports only).</summary>
    public IEnumerable<(long Lower, long Upper, long Count)> Buckets()
    {
        for (int i = 0; i < _counts.Length; i++)
        {
            if (_counts[i] != 0)
            {
                int shift = i / SubBuckets;
                long lower = shift == 0 ? i % SubBuckets : (long)(i % SubBuckets) << shift;
                yield return (lower, Math.Min(UpperBound(i), Max), _counts[i]);
            }
        }
    }

    /// <summary>Value at the given percentile (0-100), as the upper bound of its bucket (at most 1/16 above the truth).</summary>
    public long Percentile(double p)
    {
        if (Count == 0)
        {
            return 0;
        }

        long target = (long)Math.Ceiling(Count * p / 100.0);
        target = Math.Clamp(target, 1, Count);
        long seen = 0;
        for (int i = 0; i < _counts.Length; i++)
        {
            seen += _counts[i];
            if (seen >= target)
            {
                return Math.Min(UpperBound(i), Max);
            }
        }

        return Max;
    }
}
