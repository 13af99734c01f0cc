using System.Diagnostics;
using VhostBackend.BdevMalloc;
using Xunit;

namespace VhostBackend.Bdev.Tests.Core;

/// <summary>
/// The remap fast path (<see cref="BdevRemap"/>, <see cref="Bdev.CreateRemap"/>): the caller's channel translates a
/// read or write and submits it to the base's module in its own pass. A test model vbdev (<see cref="ShiftVbdevModel"/>,
/// tests/Shared, with <see cref="ShiftVbdevPath.Remap"/>: its block N is the base's block N + shift; it says no from
/// <see cref="ShiftVbdevModel.RefuseFrom"/> on) records what its remap and its module were asked.
/// </summary>
public class RemapTests
{
    [Fact]
    public async Task Remap_Submits_Once_To_The_Base_Counts_Both_Bdevs_And_Completes_Outside_The_Submit()
    {
        await using var kit = new BdevTestKit();
        var malloc = new MallocBdev("M", 256, 512);
        kit.Bdevs.Register(malloc);
        using var baseDesc = kit.Bdevs.Open("M", write: true);
        var remap = new ShiftVbdevModel("R", baseDesc, 100, 64, ShiftVbdevPath.Remap);
        kit.Bdevs.Register(remap);
        using var desc = kit.Bdevs.Open("R", write: true);
        using var src = new NativeBuffer(4096);
        using var dst = new NativeBuffer(4096);
        new Random(7).NextBytes(src.Span[..4096]);

        bool insideSubmit = true;
        var (rc, ok) = await kit.Main.InvokeAsync(async () =>
        {
            var ch = desc.GetIoChannel();
            Assert.True(ch.HasRemap, "a remapping bdev over a base that takes forwarded I/O gets a remap");
            var tcs = new TaskCompletionSource<bool>(TaskCreationOptions.RunContinuationsAsynchronously);
            bool submitting = true;
            int r = ch.Write(desc, src.Split(0, 1000, 3096), 3, 8, (_, success, _) => { insideSubmit = submitting; tcs.SetResult(success); }, null);
            submitting = false;
            bool done = r == 0 && await tcs.Task;
            BdevDesc.PutIoChannel(ch);
            return (r, done);
        });
        Assert.Equal((0, true), (rc, ok));
        Assert.False(insideSubmit, "the caller's callback ran inside its own submit");
        Assert.Equal((1, 0), (remap.Translated, remap.ModuleSubmits));

        using var check = kit.Bdevs.Open("M", write: false);
        Assert.Equal((0, true), await kit.Io(check, (ch, cb) => ch.Read(check, dst.Split(0, 4096), 103, 8, cb, null)));
        Assert.True(src.Span[..4096].SequenceEqual(dst.Span[..4096]), "the data is at the translated offset of the base");
        Assert.Equal((0, true), await kit.Io(desc, (ch, cb) => ch.Read(desc, dst.Split(0, 512, 3584), 3, 8, cb, null)));
        Assert.True(src.Span[..4096].SequenceEqual(dst.Span[..4096]));
        Assert.Equal((2, 0), (remap.Translated, remap.ModuleSubmits));

        var b = malloc.GetStats();
        var r2 = remap.GetStats();
        Assert.Equal((1L, 2L, 4096L, 8192L), (b.NumWriteOps, b.NumReadOps, b.BytesWritten, b.BytesRead)); // + the check read
        Assert.Equal((1L, 1L, 4096L, 4096L), (r2.NumWriteOps, r2.NumReadOps, r2.BytesWritten, r2.BytesRead));
        Assert.Equal((2L, 1L), (Histogram(malloc, BdevLatencyClass.Read), Histogram(malloc, BdevLatencyClass.Write)));
        Assert.Equal((1L, 1L), (Histogram(remap, BdevLatencyClass.Read), Histogram(remap, BdevLatencyClass.Write)));

        // With the remapping channel open (its counts live, not retired) both bdevs see them as well.
        var open = await kit.Main.InvokeAsync(async () =>
        {
            var ch = desc.GetIoChannel();
            var tcs = new TaskCompletionSource<bool>(TaskCreationOptions.RunContinuationsAsynchronously);
            Assert.Equal(0, ch.Read(desc, dst.Split(0, 4096), 3, 8, (_, success, _) => tcs.SetResult(success), null));
            bool done = await tcs.Task;
            return (ch, done);
        });
        Assert.True(open.done);
        Assert.Equal((3L, 2L), (malloc.GetStats().NumReadOps, remap.GetStats().NumReadOps));
        Assert.Equal((3L, 2L), (Histogram(malloc, BdevLatencyClass.Read), Histogram(remap, BdevLatencyClass.Read)));
        await kit.Main.InvokeAsync(() => BdevDesc.PutIoChannel(open.ch));
        Assert.Equal((3L, 2L), (malloc.GetStats().NumReadOps, remap.GetStats().NumReadOps)); // retired, counted once
        Assert.Equal((3L, 2L), (Histogram(malloc, BdevLatencyClass.Read), Histogram(remap, BdevLatencyClass.Read)));
    }

    private static long Histogram(Bdev bdev, BdevLatencyClass cls)
    {
        var buckets = new long[BdevLatencyHistogram.Buckets];
        bdev.GetLatencyHistogram(cls, buckets);
        return buckets.Sum();
    }

    [Fact]
    public async Task A_Remap_No_Qos_On_The_Base_Or_A_Range_Past_Its_End_Take_The_Modules_Path()
    {
        await using var kit = new BdevTestKit();
        var malloc = new MallocBdev("M", 256, 512);
        kit.Bdevs.Register(malloc);
        using var baseDesc = kit.Bdevs.Open("M", write: true);
        var remap = new ShiftVbdevModel("R", baseDesc, 200, 100, ShiftVbdevPath.Remap) { RefuseFrom = 40 }; // blocks 56..99 map past the base's end
        kit.Bdevs.Register(remap);
        using var desc = kit.Bdevs.Open("R", write: true);
        using var buf = new NativeBuffer(4096);

        // The remap says no: the module does it.
        Assert.Equal((0, true), await kit.Io(desc, (ch, cb) => ch.Write(desc, buf.Split(0, 4096), 40, 8, cb, null)));
        Assert.Equal((0, 1), (remap.Translated, remap.ModuleSubmits));

        remap.RefuseFrom = ulong.MaxValue;
        // Translated past the base's end: the module's path decides (and its regular I/O fails the base's range check).
        Assert.Equal((0, false), await kit.Io(desc, (ch, cb) => ch.Write(desc, buf.Split(0, 4096), 60, 8, cb, null)));
        Assert.Equal((1, 2), (remap.Translated, remap.ModuleSubmits));

        // QoS on the base: the base's limits must apply, so the remap is not asked.
        malloc.SetQosLimits(rwIosPerSec: 100_000, 0, 0, 0);
        Assert.Equal((0, true), await kit.Io(desc, (ch, cb) => ch.Write(desc, buf.Split(0, 4096), 0, 8, cb, null)));
        Assert.Equal((1, 3), (remap.Translated, remap.ModuleSubmits));
        malloc.SetQosLimits(0, 0, 0, 0);
        Assert.Equal((0, true), await kit.Io(desc, (ch, cb) => ch.Write(desc, buf.Split(0, 4096), 0, 8, cb, null)));
        Assert.Equal((2, 3), (remap.Translated, remap.ModuleSubmits));

        // A descriptor closed under the remap (the base hot removed): the module's path.
        var closed = kit.Bdevs.Open("M", write: true);
        var remap2 = new ShiftVbdevModel("R2", closed, 0, 64, ShiftVbdevPath.Remap);
        kit.Bdevs.Register(remap2);
        using var d2 = kit.Bdevs.Open("R2", write: true);
        closed.Dispose();
        Assert.Equal((0, false), await kit.Io(d2, (ch, cb) => ch.Read(d2, buf.Split(0, 4096), 0, 8, cb, null)));
        Assert.Equal((0, 1), (remap2.Translated, remap2.ModuleSubmits));
    }

    [Fact]
    public async Task An_Extent_Map_Is_Looked_Up_By_The_Layer_And_The_Remap_Is_Asked_For_The_Rest()
    {
        await using var kit = new BdevTestKit();
        var malloc = new MallocBdev("M", 256, 512);
        kit.Bdevs.Register(malloc);
        using var baseDesc = kit.Bdevs.Open("M", write: true);
        // Extents of 8 blocks; the remap itself (asked) maps block N to N + 100, the map to extent map[N / 8].
        var remap = new ShiftVbdevModel("R", baseDesc, 100, 64, ShiftVbdevPath.Remap, extentShift: 3);
        kit.Bdevs.Register(remap);
        var box = remap.ExtentMap!;
        box.Value = [5, 0, 0, 0, 0, 0, 0, 0];
        using var desc = kit.Bdevs.Open("R", write: true);
        using var check = kit.Bdevs.Open("M", write: false);
        using var buf = new NativeBuffer(4096);
        byte fill = 0;

        async Task WriteAndFind(ulong offset, uint blocks, ulong expectedBaseBlock, (int Translated, int ModuleSubmits) expected)
        {
            fill++;
            buf.Span[..4096].Fill(fill);
            Assert.Equal((0, true), await kit.Io(desc, (ch, cb) => ch.Write(desc, buf.Split(0, (int)blocks * 512), offset, blocks, cb, null)));
            Assert.Equal(expected, (remap.Translated, remap.ModuleSubmits));
            buf.Span[..4096].Clear();
            Assert.Equal((0, true), await kit.Io(check, (ch, cb) => ch.Read(check, buf.Split(0, (int)blocks * 512), expectedBaseBlock, blocks, cb, null)));
            Assert.True(buf.Span[..((int)blocks * 512)].IndexOfAnyExcept(fill) < 0,
                $"a write of {blocks} blocks at {offset} was expected at base block {expectedBaseBlock}");
        }

        // Within a mapped extent: the layer translates, the remap is not asked.
        await WriteAndFind(3, 2, 5 * 8 + 3, (0, 0));
        Assert.Equal((0, true), await kit.Io(desc, (ch, cb) => ch.Read(desc, buf.Split(0, 1024), 3, 2, cb, null)));
        Assert.True(buf.Span[..1024].IndexOfAnyExcept(fill) < 0, "the read went through the map too");
        Assert.Equal((0, 0), (remap.Translated, remap.ModuleSubmits));
        // An entry of 0, and an I/O across two extents: the remap is asked.
        await WriteAndFind(8, 1, 108, (1, 0));
        await WriteAndFind(6, 4, 106, (2, 0));
        // An entry set in place, and another array published: both seen by the next I/O.
        box.Value[2] = 9;
        await WriteAndFind(16, 8, 72, (2, 0));
        box.Value = [11];
        await WriteAndFind(0, 1, 88, (2, 0));
        await WriteAndFind(16, 8, 116, (3, 0)); // past the new map's end
        // An empty map (a quiesce): everything is asked.
        box.Value = [];
        await WriteAndFind(0, 8, 100, (4, 0));
        // A map entry past the base's end: the module's path (its regular I/O at N + 100).
        box.Value = [32];
        await WriteAndFind(1, 1, 101, (4, 1));
        var stats = remap.GetStats();
        Assert.Equal((8L, 1L), (stats.NumWriteOps, stats.NumReadOps));
    }

    [Fact]
    public async Task No_Remap_Over_A_Base_That_Would_Split_Or_Does_Not_Take_Forwarded_Io()
    {
        await using var kit = new BdevTestKit();
        kit.Bdevs.Register(new RecordingBdev("Rec", 512, 256) { CompleteInline = true });
        kit.Bdevs.Register(new RecordingBdev("Split", 512, 256, boundary: 16) { CompleteInline = true });
        using var recDesc = kit.Bdevs.Open("Rec", write: true);
        var remap = new ShiftVbdevModel("R", recDesc, 0, 64, ShiftVbdevPath.Remap);
        kit.Bdevs.Register(remap);
        using var desc = kit.Bdevs.Open("R", write: true);
        using var buf = new NativeBuffer(4096);
        Assert.False(await kit.Main.InvokeAsync(() =>
        {
            var ch = desc.GetIoChannel();
            bool has = ch.HasRemap;
            BdevDesc.PutIoChannel(ch);
            return has;
        }));
        Assert.Equal((0, true), await kit.Io(desc, (ch, cb) => ch.Read(desc, buf.Split(0, 4096), 0, 8, cb, null)));
        Assert.Equal((0, 1), (remap.Translated, remap.ModuleSubmits));
    }

    [Fact]
    public async Task Qos_On_The_Remapping_Bdev_Still_Throttles_Remapped_Io()
    {
        await using var kit = new BdevTestKit();
        var malloc = new MallocBdev("M", 256, 512);
        kit.Bdevs.Register(malloc);
        using var baseDesc = kit.Bdevs.Open("M", write: true);
        var remap = new ShiftVbdevModel("R", baseDesc, 0, 64, ShiftVbdevPath.Remap);
        kit.Bdevs.Register(remap);
        remap.SetQosLimits(rwIosPerSec: 1000, 0, 0, 0); // one I/O per 1 ms slice
        using var desc = kit.Bdevs.Open("R", write: true);
        using var buf = new NativeBuffer(4096);
        const int n = 200;
        var sw = Stopwatch.StartNew();
        int failed = await kit.Main.InvokeAsync(async () =>
        {
            var ch = desc.GetIoChannel();
            int left = n, bad = 0;
            var tcs = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            for (int i = 0; i < n; i++)
            {
                Assert.Equal(0, ch.Read(desc, buf.Split(0, 4096), (ulong)(i % 8) * 8, 8, (_, ok, _) =>
                {
                    bad += ok ? 0 : 1;
                    if (--left == 0)
                    {
                        tcs.SetResult();
                    }
                }, null));
            }

            await tcs.Task;
            BdevDesc.PutIoChannel(ch);
            return bad;
        });
        sw.Stop();
        Assert.Equal(0, failed);
        Assert.Equal((n, 0), (remap.Translated, remap.ModuleSubmits));
        // 200 I/Os at one per millisecond: at least ~0.19 s (the first slice admits one at once, plus carried debt).
        Assert.True(sw.Elapsed >= TimeSpan.FromMilliseconds(150), $"{n} I/Os under a 1000 IOPS limit took {sw.Elapsed.TotalMilliseconds} ms");
    }
}
