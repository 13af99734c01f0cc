using System.Diagnostics;
using VhostBackend.BdevMalloc;
using VhostBackend.BdevNull;
using VhostBackend.Platform;
using VhostBackend.Reactors;
using Xunit;

namespace VhostBackend.Bdev.Tests.Core;

public class BdevLayerTests
{
    [Fact]
    public async Task Malloc_Write_Then_Read_Back_With_Scattered_Iovecs()
    {
        await using var kit = new BdevTestKit();
        kit.Bdevs.Register(new MallocBdev("Malloc0", 256, 512));
        using var desc = kit.Bdevs.Open("Malloc0", write: true);
        using var src = new NativeBuffer(4096);
        using var dst = new NativeBuffer(4096);
        new Random(1).NextBytes(src.Span[..4096]);
        var w = await kit.Io(desc, (ch, cb) => ch.Write(desc, src.Split(0, 512, 1536, 2048), 10, 8, cb, null));
        Assert.Equal((0, true), w);
        var r = await kit.Io(desc, (ch, cb) => ch.Read(desc, dst.Split(0, 100, 3996), 10, 8, cb, null));
        Assert.Equal((0, true), r);
        Assert.True(src.Span[..4096].SequenceEqual(dst.Span[..4096]));
        var stats = kit.Bdevs.Find("Malloc0")!.GetStats();
        Assert.Equal(1, stats.NumReadOps);
        Assert.Equal(1, stats.NumWriteOps);
        Assert.Equal(4096, stats.BytesRead);
    }

    [Fact]
    public async Task Compare_Detects_Miscompare()
    {
        await using var kit = new BdevTestKit();
        kit.Bdevs.Register(new MallocBdev("M", 16, 512));
        using var desc = kit.Bdevs.Open("M", true);
        using var buf = new NativeBuffer(512);
        buf.Span[..512].Fill(0);
        Assert.Equal((0, true), await kit.Io(desc, (ch, cb) => ch.Compare(desc, buf.Split(0, 512), 0, 1, cb, null)));
        buf.Span[3] = 1;
        Assert.Equal((0, false), await kit.Io(desc, (ch, cb) => ch.Compare(desc, buf.Split(0, 512), 0, 1, cb, null)));
    }

    [Theory]
    [InlineData(0UL, 0UL)]     // zero length
    [InlineData(250UL, 7UL)]   // past the end
    [InlineData(ulong.MaxValue, 2UL)] // overflow
    public async Task Out_Of_Range_Is_EINVAL_And_Never_Completes(ulong offset, ulong blocks)
    {
        await using var kit = new BdevTestKit();
        kit.Bdevs.Register(new MallocBdev("M", 256, 512));
        using var desc = kit.Bdevs.Open("M", true);
        using var buf = new NativeBuffer(8192);
        var r = await kit.Main.InvokeAsync(() =>
        {
            var ch = desc.GetIoChannel();
            bool fired = false;
            int rc = ch.Read(desc, buf.Split(0, (int)(blocks * 512)), offset, blocks, (_, _, _) => fired = true, null);
            BdevDesc.PutIoChannel(ch);
            return (rc, fired);
        });
        Assert.Equal((-22, false), r);
    }

    [Fact]
    public async Task Iovecs_Shorter_Than_Io_Are_EINVAL()
    {
        await using var kit = new BdevTestKit();
        kit.Bdevs.Register(new MallocBdev("M", 16, 512));
        using var desc = kit.Bdevs.Open("M", true);
        using var buf = new NativeBuffer(1024);
        Assert.Equal(-22, (await kit.Io(desc, (ch, cb) => ch.Read(desc, buf.Split(0, 512), 0, 2, cb, null))).Rc);
    }

    [Fact]
    public async Task ReadOnly_Descriptor_Refuses_Writes_With_EBADF()
    {
        await using var kit = new BdevTestKit();
        kit.Bdevs.Register(new MallocBdev("M", 16, 512));
        using var desc = kit.Bdevs.Open("M", write: false);
        using var buf = new NativeBuffer(512);
        Assert.Equal(-9, (await kit.Io(desc, (ch, cb) => ch.Write(desc, buf.Split(0, 512), 0, 1, cb, null))).Rc);
        Assert.Equal(-9, (await kit.Io(desc, (ch, cb) => ch.Unmap(desc, 0, 1, cb, null))).Rc);
        Assert.Equal((0, true), await kit.Io(desc, (ch, cb) => ch.Read(desc, buf.Split(0, 512), 0, 1, cb, null)));
    }

    [Fact]
    public async Task Large_Io_Is_Split_At_Max_Transfer_And_Boundary_With_Iovecs_Carved_Correctly()
    {
        await using var kit = new BdevTestKit();
        var bdev = new RecordingBdev("R", 512, 1024, maxTransfer: 8, boundary: 16);
        kit.Bdevs.Register(bdev);
        using var desc = kit.Bdevs.Open("R", true);
        using var buf = new NativeBuffer(40 * 512);
        // 30 blocks starting at 12: boundary at 16 and 32, max 8 => 12-15, 16-23, 24-31, 32-39, 40-41
        var iovs = buf.Split(0, 1000, 5000, 9360);
        Assert.Equal((0, true), await kit.Io(desc, (ch, cb) => ch.Write(desc, iovs, 12, 30, cb, null)));
        var seen = bdev.Seen.OrderBy(s => s.Offset).ToList();
        Assert.Equal(new ulong[] { 12, 16, 24, 32, 40 }, seen.Select(s => s.Offset));
        Assert.Equal(new ulong[] { 4, 8, 8, 8, 2 }, seen.Select(s => s.Blocks));
        nint expect = buf.Ptr;
        foreach (var s in seen)
        {
            Assert.Equal(s.Blocks * 512, (ulong)s.Iovs.Sum(v => (long)v.Length));
            Assert.Equal(expect, s.Iovs[0].Base);
            foreach (var v in s.Iovs)
            {
                Assert.Equal(expect, v.Base);
                expect += (nint)v.Length;
            }
        }

        Assert.Equal(1, bdev.GetStats().NumWriteOps);
    }

    [Fact]
    public async Task Split_Child_Failure_Fails_Parent_Once()
    {
        await using var kit = new BdevTestKit();
        var bdev = new RecordingBdev("R", 512, 1024, maxTransfer: 4) { Result = BdevIoStatus.Failed };
        kit.Bdevs.Register(bdev);
        using var desc = kit.Bdevs.Open("R", true);
        using var buf = new NativeBuffer(64 * 512);
        Assert.Equal((0, false), await kit.Io(desc, (ch, cb) => ch.Read(desc, buf.Split(0, 64 * 512), 0, 64, cb, null)));
        Assert.Equal(1, bdev.GetStats().NumErrors);
    }

    [Fact]
    public async Task Stats_Count_Every_Io_Exactly_Once_While_Its_Channel_Closes()
    {
        // Each Io() opens a channel, does one write and releases the channel; the channel's context is destroyed
        // one reactor iteration later. Reading stats in that window must neither lose nor double-count the write.
        await using var kit = new BdevTestKit();
        kit.Bdevs.Register(new MallocBdev("M", 16, 512));
        using var desc = kit.Bdevs.Open("M", true);
        using var buf = new NativeBuffer(512);
        var bdev = kit.Bdevs.Find("M")!;
        for (int i = 1; i <= 300; i++)
        {
            Assert.Equal((0, true), await kit.Io(desc, (ch, cb) => ch.Write(desc, buf.Split(0, 512), 0, 1, cb, null)));
            Assert.Equal(i, bdev.GetStats().NumWriteOps);
        }
    }

    [Fact]
    public async Task Synchronous_Completions_Are_Deferred_Past_Submit_And_Delivered_By_DeliverDeferred()
    {
        await using var kit = new BdevTestKit();
        kit.Bdevs.Register(new MallocBdev("M", 16, 512));
        using var desc = kit.Bdevs.Open("M", true);
        using var buf = new NativeBuffer(512);
        var (rc, duringSubmit, delivered, afterDeliver) = await kit.Main.InvokeAsync(() =>
        {
            var ch = desc.GetIoChannel();
            int completions = 0;
            int rc = ch.Read(desc, buf.Split(0, 512), 0, 1, (_, ok, _) => completions += ok ? 1 : 100, null);
            int during = completions;            // a RAM bdev finishes inside submit: the callback must not have run
            int delivered = ch.DeliverDeferred(); // the caller's batch is done: deliver now, not on the next poll
            int after = completions;
            BdevDesc.PutIoChannel(ch);
            return (rc, during, delivered, after);
        });
        Assert.Equal(0, rc);
        Assert.Equal(0, duringSubmit);
        Assert.Equal(1, delivered);
        Assert.Equal(1, afterDeliver);
    }

    [Fact]
    public async Task Misaligned_Buffers_Are_Bounced_For_Modules_That_Need_Alignment()
    {
        await using var kit = new BdevTestKit();
        var bdev = new RecordingBdev("R", 512, 1024, alignment: 512);
        kit.Bdevs.Register(bdev);
        using var desc = kit.Bdevs.Open("R", true);
        using var buf = new NativeBuffer(4096);
        Assert.Equal((0, true), await kit.Io(desc, (ch, cb) => ch.Write(desc, buf.Split(3, 1000, 24), 0, 2, cb, null)));
        Assert.Equal((0, true), await kit.Io(desc, (ch, cb) => ch.Write(desc, buf.Split(0, 512, 512), 0, 2, cb, null)));
        var bounced = bdev.Seen[0].Iovs;
        Assert.Single(bounced);
        Assert.Equal(0, bounced[0].Base % 512);
        Assert.Equal(buf.Ptr, bdev.Seen[1].Iovs[0].Base); // aligned: zero-copy
    }

    [Fact]
    public async Task Bounced_Read_Copies_Data_Back_To_Caller_Buffers()
    {
        await using var kit = new BdevTestKit();
        var file = new AlignedMalloc("A", 64, 512);
        kit.Bdevs.Register(file);
        using var desc = kit.Bdevs.Open("A", true);
        using var src = new NativeBuffer(2048);
        using var dst = new NativeBuffer(2048);
        new Random(2).NextBytes(src.Span[..2048]);
        Assert.Equal((0, true), await kit.Io(desc, (ch, cb) => ch.Write(desc, src.Split(0, 2048), 4, 4, cb, null)));
        Assert.Equal((0, true), await kit.Io(desc, (ch, cb) => ch.Read(desc, dst.Split(1, 7, 2041), 4, 4, cb, null)));
        Assert.True(src.Span[..2048].SequenceEqual(dst.Span.Slice(1, 2048)));
        Assert.True(file.SawOnlyAligned);
    }

    /// <summary>A malloc bdev that insists on 512-byte aligned buffers (a model of an O_DIRECT module).</summary>
    private sealed class AlignedMalloc : Bdev
    {
        private readonly MallocBdev _inner;

        public AlignedMalloc(string name, ulong blocks, uint bs)
            : base(name, "aligned", bs, blocks)
        {
            _inner = new MallocBdev(name + "_inner", blocks, bs);
            RequiredAlignment = 512;
        }

        public bool SawOnlyAligned { get; private set; } = true;

        public override bool SupportsIoType(BdevIoType type) => true;

        protected internal override IoChannel GetModuleChannel(Reactor reactor) => _inner.GetModuleChannel(reactor);

        protected internal override void Submit(IoChannel moduleChannel, BdevIo io)
        {
            foreach (var v in io.Iovs)
            {
                SawOnlyAligned &= v.Base % 512 == 0 && v.Length % 512 == 0;
            }

            _inner.Submit(moduleChannel, io);
        }
    }

    [Fact]
    public async Task Empty_Pool_Returns_ENOMEM_And_IoWait_Resumes()
    {
        await using var kit = new BdevTestKit();
        var bdev = new RecordingBdev("R", 512, 64, pool: 2) { Hold = true };
        kit.Bdevs.Register(bdev);
        using var desc = kit.Bdevs.Open("R", true);
        var result = await kit.Main.InvokeAsync(async () =>
        {
            var ch = desc.GetIoChannel();
            int done = 0;
            BdevIoCompletion cb = (_, ok, _) => done++;
            Assert.Equal(0, ch.Flush(desc, 0, 1, cb, null));
            Assert.Equal(0, ch.Flush(desc, 0, 1, cb, null));
            Assert.Equal(-12, ch.Flush(desc, 0, 1, cb, null));
            var resumed = new TaskCompletionSource<int>();
            var entry = new BdevIoWaitEntry(_ => resumed.SetResult(ch.Flush(desc, 0, 1, cb, null)), null);
            Assert.True(ch.QueueIoWait(entry));
            Assert.False(ch.QueueIoWait(entry));
            bdev.Hold = false;
            bdev.Held[0].Complete(BdevIoStatus.Success);
            int rc = await resumed.Task;
            bdev.Held[1].Complete(BdevIoStatus.Success);
            while (done < 3)
            {
                await Task.Yield();
            }

            BdevDesc.PutIoChannel(ch);
            return (rc, done);
        });
        Assert.Equal((0, 3), result);
    }

    [Fact]
    public async Task Inline_Completion_Is_Deferred_Past_The_Submit_Call()
    {
        await using var kit = new BdevTestKit();
        kit.Bdevs.Register(new RecordingBdev("R", 512, 64) { CompleteInline = true });
        using var desc = kit.Bdevs.Open("R", true);
        var firedInside = await kit.Main.InvokeAsync(async () =>
        {
            var ch = desc.GetIoChannel();
            bool fired = false;
            var tcs = new TaskCompletionSource();
            int rc = ch.Flush(desc, 0, 1, (_, _, _) => { fired = true; tcs.SetResult(); }, null);
            bool inside = fired;
            await tcs.Task;
            BdevDesc.PutIoChannel(ch);
            return (rc, inside);
        });
        Assert.Equal((0, false), firedInside);
    }

    [Fact]
    public async Task Resize_And_Remove_Events_Reach_The_Descriptor_And_Remove_Waits_For_Close()
    {
        await using var kit = new BdevTestKit();
        var bdev = new NullBdev("N", 100, 512);
        kit.Bdevs.Register(bdev);
        var events = new List<BdevEventType>();
        var gotRemove = new TaskCompletionSource();
        BdevDesc? desc = null;
        desc = await kit.Main.InvokeAsync(() => kit.Bdevs.Open("N", true, (t, b, _) =>
        {
            events.Add(t);
            if (t == BdevEventType.Remove)
            {
                gotRemove.SetResult();
            }
        }));
        bdev.Resize(200);
        Assert.Equal(200UL, bdev.BlockCount);
        var removal = kit.Bdevs.UnregisterAsync(bdev);
        await gotRemove.Task.WaitAsync(TimeSpan.FromSeconds(5));
        Assert.False(removal.IsCompleted);
        desc.Dispose();
        await removal.WaitAsync(TimeSpan.FromSeconds(5));
        Assert.Equal(new[] { BdevEventType.Resize, BdevEventType.Remove }, events);
        Assert.Null(kit.Bdevs.Find("N"));
        Assert.Throws<BdevNotFoundException>(() => kit.Bdevs.Open("N", false));
    }

    [Fact]
    public void Duplicate_Names_Are_Rejected()
    {
        var m = new BdevManager();
        m.Register(new NullBdev("N", 10, 512));
        Assert.Throws<BdevExistsException>(() => m.Register(new NullBdev("N", 10, 512)));
    }

    [Fact]
    public void A_Bdev_That_Does_Not_Read_Is_Rejected()
    {
        // The layer does not ask SupportsIoType per read (as SPDK's spdk_bdev_read): registration is where it is checked.
        var m = new BdevManager();
        var e = Assert.Throws<ArgumentException>(() => m.Register(new NoReads("W")));
        Assert.Contains("W", e.Message);
        Assert.Null(m.Find("W"));
    }

    private sealed class NoReads(string name) : Bdev(name, "no reads", 512, 8)
    {
        public override bool SupportsIoType(BdevIoType type) => type == BdevIoType.Write;

        protected internal override IoChannel GetModuleChannel(Reactor reactor) => reactor.GetIoChannel(StatelessDevice.Instance);

        protected internal override void Submit(IoChannel moduleChannel, BdevIo io) => io.Complete(BdevIoStatus.Failed);
    }

    [Theory]
    [InlineData(500u)]
    [InlineData(256u)]
    public void Bad_Block_Size_Is_Rejected(uint bs) => Assert.Throws<ArgumentException>(() => new NullBdev("x", 1, bs));

    [Fact]
    public async Task Qos_Iops_Limit_Throttles_And_Queues_Rather_Than_Fails()
    {
        await using var kit = new BdevTestKit();
        var bdev = new NullBdev("N", 1000, 512);
        kit.Bdevs.Register(bdev);
        bdev.SetQosLimits(rwIosPerSec: 2000, 0, 0, 0);
        using var desc = kit.Bdevs.Open("N", true);
        using var buf = new NativeBuffer(512);
        var (elapsed, ok) = await kit.Main.InvokeAsync(async () =>
        {
            var ch = desc.GetIoChannel();
            int done = 0, good = 0;
            var all = new TaskCompletionSource();
            var sw = Stopwatch.StartNew();
            for (int i = 0; i < 400; i++)
            {
                Assert.Equal(0, ch.Read(desc, buf.Split(0, 512), 0, 1, (_, s, _) =>
                {
                    good += s ? 1 : 0;
                    if (++done == 400)
                    {
                        all.SetResult();
                    }
                }, null));
            }

            await all.Task;
            BdevDesc.PutIoChannel(ch);
            return (sw.Elapsed, good);
        });
        Assert.Equal(400, ok);
        // 400 I/Os at 2000/s take about 200 ms; allow a wide margin for a loaded machine but not "unlimited".
        Assert.True(elapsed > TimeSpan.FromMilliseconds(120), $"QoS did not throttle: {elapsed.TotalMilliseconds} ms");
        Assert.Equal((2000UL, 0UL, 0UL, 0UL), bdev.QosLimits);
    }

    [Fact]
    public async Task Steady_State_Null_And_Malloc_Io_Allocates_Nothing()
    {
        await using var kit = new BdevTestKit();
        kit.Bdevs.Register(new NullBdev("N", 1 << 20, 512));
        kit.Bdevs.Register(new MallocBdev("M", 1024, 512));
        foreach (var name in new[] { "N", "M" })
        {
            using var desc = kit.Bdevs.Open(name, true);
            using var buf = new NativeBuffer(4096);
            var loop = new IoLoop(desc, buf.Split(0, 4096));
            long bytes = await kit.Main.InvokeAsync(async () =>
            {
                return await loop.SteadyStateAllocation(20_000, 200_000, 32);
            });
            Assert.True(bytes < 200, $"{name}: {bytes} bytes allocated over 200k I/Os");
        }
    }
}
