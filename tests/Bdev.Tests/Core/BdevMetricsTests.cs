using System.Diagnostics.Metrics;
using System.Globalization;
using VhostBackend.BdevMalloc;
using VhostBackend.BdevNull;
using Xunit;

namespace VhostBackend.Bdev.Tests.Core;

/// <summary>The bdev layer's observable instruments (<see cref="BdevMetrics"/>) read through a <see cref="MeterListener"/>.</summary>
public class BdevMetricsTests
{
    [Fact]
    public async Task Counters_And_Histogram_Move_By_The_Io_Done()
    {
        await using var kit = new BdevTestKit();
        kit.Bdevs.Register(new MallocBdev("M0", 1024, 512));
        using var meter = new Meter("test.bdev." + Guid.NewGuid());
        BdevMetrics.Register(meter, kit.Bdevs);
        using var m = new MetricsCollector(meter);
        using var desc = kit.Bdevs.Open("M0", true);
        using var buf = new NativeBuffer(4096);

        m.Collect();
        Assert.Equal(0, m.Sum("vhost.bdev.operations", "bdev=M0"));
        Assert.Empty(m.All("vhost.bdev.latency.bucket"));

        // Channels taken and released per I/O: their counters are retired into the bdev when each closes.
        for (int i = 0; i < 10; i++)
        {
            Assert.Equal((0, true), await kit.Io(desc, (ch, cb) => ch.Read(desc, buf.Split(0, 4096), (ulong)i * 8, 8, cb, null)));
        }

        for (int i = 0; i < 6; i++)
        {
            Assert.Equal((0, true), await kit.Io(desc, (ch, cb) => ch.Write(desc, buf.Split(0, 4096), (ulong)i * 8, 8, cb, null)));
        }

        Assert.Equal((0, true), await kit.Io(desc, (ch, cb) => ch.Unmap(desc, 0, 16, cb, null)));
        buf.Span[0] ^= 0xff; // now differs from block 0 (written above): a miscompare is an error completion
        Assert.Equal((0, false), await kit.Io(desc, (ch, cb) => ch.Compare(desc, buf.Split(0, 512), 40, 1, cb, null)));

        // A channel kept open: its live counters are read racily from this (non-reactor) thread.
        var loop = new IoLoop(desc, buf.Split(0, 4096));
        await kit.Main.InvokeAsync(() => loop.Run(1000, 4)); // 500 reads, 500 writes of 4 KiB

        m.Collect();
        Assert.Equal(510, m.Sum("vhost.bdev.operations", "bdev=M0", "op=read"));
        Assert.Equal(506, m.Sum("vhost.bdev.operations", "bdev=M0", "op=write"));
        Assert.Equal(1, m.Sum("vhost.bdev.operations", "bdev=M0", "op=unmap"));
        Assert.Equal(510 * 4096, m.Sum("vhost.bdev.bytes", "bdev=M0", "op=read"));
        Assert.Equal(506 * 4096, m.Sum("vhost.bdev.bytes", "bdev=M0", "op=write"));
        Assert.Equal(16 * 512, m.Sum("vhost.bdev.bytes", "bdev=M0", "op=unmap"));
        Assert.Equal(1, m.Sum("vhost.bdev.errors", "bdev=M0"));
        Assert.Equal(0, m.Sum("vhost.bdev.queue_depth", "bdev=M0"));

        // The histogram counts every successful I/O once, in its class; bounds are increasing powers of two of a tick.
        Assert.Equal(510, m.Sum("vhost.bdev.latency.bucket", "bdev=M0", "op=read"));
        Assert.Equal(506, m.Sum("vhost.bdev.latency.bucket", "bdev=M0", "op=write"));
        Assert.Equal(1, m.Sum("vhost.bdev.latency.bucket", "bdev=M0", "op=other"));
        var bounds = m.All("vhost.bdev.latency.bucket").Select(b => double.Parse(b.Tags["lt_us"]!, CultureInfo.InvariantCulture)).ToList();
        Assert.All(bounds, b => Assert.True(b > 0));

        // The mean latency from the histogram's buckets cannot exceed their upper bounds: check the time counter agrees.
        var st = kit.Bdevs.Find("M0")!.GetStats();
        double readSeconds = m.Sum("vhost.bdev.latency.time", "bdev=M0", "op=read");
        Assert.Equal(st.ReadLatencyTicks / (double)Platform.Ticks.Frequency, readSeconds, 9);
        double upper = m.All("vhost.bdev.latency.bucket").Where(b => b.Tags["op"] == "read")
            .Sum(b => b.Value * double.Parse(b.Tags["lt_us"]!, CultureInfo.InvariantCulture)) / 1e6;
        Assert.True(readSeconds <= upper * 1.001, $"latency sum {readSeconds} s above the buckets' bound {upper} s");

        // Queue depth while I/Os are in flight: collected on the reactor between submit and completion.
        double depth = await kit.Main.InvokeAsync(async () =>
        {
            var ch = desc.GetIoChannel();
            int done = 0;
            var all = new TaskCompletionSource();
            for (int i = 0; i < 5; i++)
            {
                Assert.Equal(0, ch.Read(desc, buf.Split(0, 512), (ulong)i, 1, (_, _, _) =>
                {
                    if (++done == 5)
                    {
                        all.SetResult();
                    }
                }, null));
            }

            m.Collect();
            double d = m.Sum("vhost.bdev.queue_depth", "bdev=M0");
            await all.Task;
            BdevDesc.PutIoChannel(ch);
            return d;
        });
        Assert.Equal(5, depth);
    }

    [Fact]
    public async Task Io_Path_Still_Allocates_Nothing_With_A_Listener_Collecting()
    {
        await using var kit = new BdevTestKit();
        kit.Bdevs.Register(new NullBdev("N", 1 << 20, 512));
        kit.Bdevs.Register(new MallocBdev("M", 1024, 512));
        using var meter = new Meter("test.bdev." + Guid.NewGuid());
        BdevMetrics.Register(meter, kit.Bdevs);
        using var m = new MetricsCollector(meter);
        using var stop = new CancellationTokenSource();
        int collections = 0;
        var collector = Task.Run(async () =>
        {
            while (!stop.IsCancellationRequested)
            {
                m.Collect();
                collections++;
                await Task.Delay(1);
            }
        });

        foreach (var name in new[] { "N", "M" })
        {
            using var desc = kit.Bdevs.Open(name, true);
            using var buf = new NativeBuffer(4096);
            var loop = new IoLoop(desc, buf.Split(0, 4096));
            long bytes = await kit.Main.InvokeAsync(async () =>
            {
                return await loop.SteadyStateAllocation(20_000, 200_000, 32);
            });
            Assert.True(bytes < 200, $"{name}: {bytes} bytes allocated over 200k I/Os with a listener collecting");
        }

        stop.Cancel();
        await collector;
        Assert.True(collections > 0, "the listener never collected");
        m.Collect();
        Assert.True(m.Sum("vhost.bdev.operations", "bdev=M") >= 220_000);
        Assert.True(m.Sum("vhost.bdev.latency.bucket", "bdev=N") >= 220_000);
    }
}
