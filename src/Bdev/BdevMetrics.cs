using System.Diagnostics.Metrics;
using VhostBackend.Platform;

namespace VhostBackend.Bdev;

/// <summary>
/// The bdev layer's instruments on the application's <see cref="Meter"/> (System.Diagnostics.Metrics; read by
/// <c>dotnet-counters</c>, a <see cref="MeterListener"/> or an OpenTelemetry exporter). All are observable: they
/// read, at collection time and on the collecting thread, the counters the channels already keep for
/// bdev_get_iostat, so the I/O path neither allocates nor locks nor even checks whether anyone listens.
///
/// Threading: the collector reads each channel's 64-bit counters while its reactor writes them (no reactor
/// message, no lock against the reactor): the loads are aligned 64-bit loads, so a value is never torn, but
/// counters of one channel are not a consistent snapshot of each other (a read may be counted in operations
/// a moment before its bytes). Counters of closed channels are kept by the bdev (<see cref="Bdev.GetStats"/>,
/// under the bdev's control-plane lock, which the I/O path never takes), so a counter never goes backwards.
/// </summary>
public static class BdevMetrics
{
    /// <summary>Creates the bdev instruments on <paramref name="meter"/>, reporting every bdev of <paramref name="bdevs"/>.</summary>
    public static void Register(Meter meter, BdevManager bdevs)
    {
        meter.CreateObservableCounter("vhost.bdev.operations", () => Operations(bdevs), "{operation}",
            "I/Os completed successfully, by bdev and op (read, write, unmap, write_zeroes, flush); its rate is the IOPS");
        meter.CreateObservableCounter("vhost.bdev.bytes", () => Bytes(bdevs), "By",
            "bytes read, written and unmapped, by bdev and op");
        meter.CreateObservableCounter("vhost.bdev.errors", () => Errors(bdevs), "{operation}",
            "I/Os completed with an error, by bdev");
        meter.CreateObservableUpDownCounter("vhost.bdev.queue_depth", () => QueueDepth(bdevs), "{operation}",
            "I/Os submitted through the bdev layer and not completed yet, by bdev");
        meter.CreateObservableCounter("vhost.bdev.latency.time", () => LatencyTime(bdevs), "s",
            "sum of the latencies of completed I/Os, by bdev and op (read, write, unmap); divided by the operations it is the mean latency");
        meter.CreateObservableCounter("vhost.bdev.latency.bucket", () => LatencyBuckets(bdevs), "{operation}",
            "completed I/Os per latency bucket (log2 of ticks), by bdev, op (read, write, other) and lt_us, the bucket's exclusive upper bound in microseconds; only non-empty buckets");
    }

    private static KeyValuePair<string, object?> Tag(string key, object? value) => new(key, value);

    private static IEnumerable<Measurement<long>> Operations(BdevManager bdevs)
    {
        foreach (var b in bdevs.All)
        {
            var s = b.GetStats();
            var name = Tag("bdev", b.Name);
            yield return new(s.NumReadOps, name, Tag("op", "read"));
            yield return new(s.NumWriteOps, name, Tag("op", "write"));
            yield return new(s.NumUnmapOps, name, Tag("op", "unmap"));
            yield return new(s.NumWriteZeroesOps, name, Tag("op", "write_zeroes"));
            yield return new(s.NumFlushOps, name, Tag("op", "flush"));
        }
    }

    private static IEnumerable<Measurement<long>> Bytes(BdevManager bdevs)
    {
        foreach (var b in bdevs.All)
        {
            var s = b.GetStats();
            var name = Tag("bdev", b.Name);
            yield return new(s.BytesRead, name, Tag("op", "read"));
            yield return new(s.BytesWritten, name, Tag("op", "write"));
            yield return new(s.BytesUnmapped, name, Tag("op", "unmap"));
        }
    }

    private static IEnumerable<Measurement<long>> Errors(BdevManager bdevs)
    {
        foreach (var b in bdevs.All)
        {
            yield return new(b.GetStats().NumErrors, Tag("bdev", b.Name));
        }
    }

    private static IEnumerable<Measurement<int>> QueueDepth(BdevManager bdevs)
    {
        foreach (var b in bdevs.All)
        {
            yield return new(b.QueueDepth, Tag("bdev", b.Name));
        }
    }

    private static IEnumerable<Measurement<double>> LatencyTime(BdevManager bdevs)
    {
        double f = Ticks.Frequency;
        foreach (var b in bdevs.All)
        {
            var s = b.GetStats();
            var name = Tag("bdev", b.Name);
            yield return new(s.ReadLatencyTicks / f, name, Tag("op", "read"));
            yield return new(s.WriteLatencyTicks / f, name, Tag("op", "write"));
            yield return new(s.UnmapLatencyTicks / f, name, Tag("op", "unmap"));
        }
    }

    private static readonly string[] ClassNames = ["read", "write", "other"];

    /// <summary>Bucket upper bounds in microseconds, 4 significant digits ("0.8192", "1.638", ...).</summary>
    private static readonly string[] BucketLabels = Enumerable.Range(0, BdevLatencyHistogram.Buckets)
        .Select(i => BdevLatencyHistogram.UpperBoundMicroseconds(i).ToString("G4", System.Globalization.CultureInfo.InvariantCulture)).ToArray();

    private static IEnumerable<Measurement<long>> LatencyBuckets(BdevManager bdevs)
    {
        var buckets = new long[BdevLatencyHistogram.Buckets];
        foreach (var b in bdevs.All)
        {
            var name = Tag("bdev", b.Name);
            for (int c = 0; c < ClassNames.Length; c++)
            {
                Array.Clear(buckets);
                b.GetLatencyHistogram((BdevLatencyClass)c, buckets);
                for (int i = 0; i < buckets.Length; i++)
                {
                    if (buckets[i] != 0)
                    {
                        yield return new(buckets[i], name, Tag("op", ClassNames[c]), Tag("lt_us", BucketLabels[i]));
                    }
                }
            }
        }
    }
}
