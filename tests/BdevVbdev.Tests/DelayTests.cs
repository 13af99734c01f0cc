using VhostBackend.Bdev;
using VhostBackend.BdevDelay;
using VhostBackend.Platform;
using Xunit;

namespace VhostBackend.BdevVbdev.Tests;

/// <summary>The delay vbdev's timing: lower bounds only (this machine is slow and noisy), and the p99 share.</summary>
public class DelayTests
{
    [Fact]
    public async Task Reads_And_Writes_Take_At_Least_Their_Latency_And_Update_Latency_Takes_Effect()
    {
        await using var kit = new VbdevKit();
        kit.AddMalloc();
        var d = (DelayBdev)kit.Delay.Create("D", "M", null, new DelayLatencies(20_000, 20_000, 40_000, 40_000))!;
        using var desc = kit.Bdevs.Open("D", write: true);
        using var buf = new TestBuffer(4096);

        Assert.True(await Measure(kit, desc, buf, write: false) >= Ticks.FromMicroseconds(20_000));
        Assert.True(await Measure(kit, desc, buf, write: true) >= Ticks.FromMicroseconds(40_000));

        Assert.True(d.UpdateLatency("avg_read", 80_000));
        Assert.True(d.UpdateLatency("p99_read", 80_000));
        Assert.False(d.UpdateLatency("avg_rd", 1));
        Assert.Equal(new DelayLatencies(80_000, 80_000, 40_000, 40_000), d.Latencies);
        Assert.True(await Measure(kit, desc, buf, write: false) >= Ticks.FromMicroseconds(80_000));
        Assert.True(await Measure(kit, desc, buf, write: true) >= Ticks.FromMicroseconds(40_000)); // writes unchanged
    }

    [Fact]
    public async Task About_One_In_A_Hundred_Reads_Gets_The_P99_Latency()
    {
        await using var kit = new VbdevKit();
        kit.AddMalloc();
        kit.Delay.Create("D", "M", null, new DelayLatencies(0, 30_000, 0, 0));
        using var desc = kit.Bdevs.Open("D", write: true);
        using var buf = new TestBuffer(512 * 64);
        const int Count = 3000;
        long threshold = Ticks.FromMicroseconds(30_000);
        int slow = await kit.Main.InvokeAsync(async () =>
        {
            var ch = desc.GetIoChannel();
            var done = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            int completed = 0, slowCount = 0, next = 0;
            void Submit()
            {
                int i = next++;
                long t0 = Ticks.Now();
                int rc = ch.Read(desc, buf.Iov((i % 64) * 512, 512), (ulong)(i % 1024), 1, (_, _, _) =>
                {
                    if (Ticks.Now() - t0 >= threshold)
                    {
                        slowCount++;
                    }

                    if (++completed == Count)
                    {
                        done.SetResult();
                    }
                    else if (next < Count)
                    {
                        Submit();
                    }
                }, null);
                Assert.Equal(0, rc);
            }

            for (int i = 0; i < 32; i++)
            {
                Submit();
            }

            await done.Task;
            BdevDesc.PutIoChannel(ch);
            return slowCount;
        });

        // Binomial(3000, 1%): mean 30, sd 5.4. A wide band still fails "never" and "always".
        Assert.InRange(slow, 5, 150);
    }

    [Fact]
    public async Task Removal_Releases_Held_Io_At_Once_And_Reset_Aborts_It()
    {
        await using var kit = new VbdevKit();
        kit.AddMalloc();
        const ulong TenSeconds = 10_000_000;
        kit.Delay.Create("D", "M", null, new DelayLatencies(TenSeconds, TenSeconds, TenSeconds, TenSeconds));
        using var buf = new TestBuffer(4096);

        // Reset: held I/Os are aborted (SPDK), the reset itself succeeds.
        using (var desc = kit.Bdevs.Open("D", write: true))
        {
            var reads = await kit.Start(desc, 2, (ch, i, cb) => ch.Read(desc, buf.Iov(i * 512, 512), (ulong)i, 1, cb, null));
            await Task.Delay(50);
            Assert.False(reads[0].IsCompleted);
            var reset = await kit.Start(desc, 1, (ch, _, cb) => ch.Reset(desc, cb, null));
            Assert.Equal(BdevIoStatus.Aborted, await reads[0].WaitAsync(TimeSpan.FromSeconds(5)));
            Assert.Equal(BdevIoStatus.Aborted, await reads[1].WaitAsync(TimeSpan.FromSeconds(5)));
            Assert.Equal(BdevIoStatus.Success, await reset[0].WaitAsync(TimeSpan.FromSeconds(5)));
        }

        // Delete with a write held for 10 s: released at once with its status, the delete completes.
        var removed = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var d2 = kit.Bdevs.Open("D", write: true, static (t, _, c) => ((TaskCompletionSource)c!).TrySetResult(), removed);
        var write = await kit.Start(d2, 1, (ch, _, cb) => ch.Write(d2, buf.Iov(0, 512), 7, 1, cb, null));
        await Task.Delay(50);
        var sw = System.Diagnostics.Stopwatch.StartNew();
        var delete = kit.Delay.DeleteAsync("D");
        await removed.Task.WaitAsync(TimeSpan.FromSeconds(5));
        Assert.Equal(BdevIoStatus.Success, await write[0].WaitAsync(TimeSpan.FromSeconds(5)));
        d2.Dispose();
        Assert.True(await delete.WaitAsync(TimeSpan.FromSeconds(5)));
        Assert.True(sw.Elapsed < TimeSpan.FromSeconds(8), $"delete waited {sw.Elapsed} for a 10 s latency");
        Assert.Null(kit.Bdevs.Find("D"));
    }

    [Fact]
    public void P99_Below_Average_Is_Refused()
    {
        var m = new DelayBdevModule();
        Assert.Throws<ArgumentException>(() => m.Create("D", "M", null, new DelayLatencies(10, 5, 0, 0)));
        Assert.Throws<ArgumentException>(() => m.Create("D", "M", null, new DelayLatencies(0, 0, 10, 9)));
    }

    private static Task<long> Measure(VbdevKit kit, BdevDesc desc, TestBuffer buf, bool write) =>
        MeasureIo(kit, desc, (ch, cb) => write ? ch.Write(desc, buf.Whole(), 0, 8, cb, null) : ch.Read(desc, buf.Whole(), 0, 8, cb, null));

    /// <summary>One I/O's latency in ticks, measured on the reactor from before the submit to the completion.</summary>
    private static Task<long> MeasureIo(VbdevKit kit, BdevDesc desc, Func<BdevChannel, BdevIoCompletion, int> submit) =>
        kit.Main.InvokeAsync(async () =>
        {
            var ch = desc.GetIoChannel();
            var tcs = new TaskCompletionSource<long>(TaskCreationOptions.RunContinuationsAsynchronously);
            long t0 = Ticks.Now();
            Assert.Equal(0, submit(ch, (io, _, _) => tcs.SetResult(io.Status == BdevIoStatus.Success ? Ticks.Now() - t0 : -1)));
            long ticks = await tcs.Task;
            BdevDesc.PutIoChannel(ch);
            Assert.True(ticks >= 0, "I/O failed");
            return ticks;
        });
}
