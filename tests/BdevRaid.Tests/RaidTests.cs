using VhostBackend.Bdev;
using VhostBackend.Platform;
using VhostBackend.Reactors;
using static VhostBackend.BdevRaid.Tests.RaidTestKit;

namespace VhostBackend.BdevRaid.Tests;

public sealed class RaidTests
{
    private const uint Bs = 512;

    [Fact]
    public async Task Raid0_Puts_Each_Strip_On_The_Right_Base()
    {
        await using var kit = new RaidTestKit();
        kit.Malloc("m0", 68); // rounded down to 64 blocks: 8 strips of 8 blocks
        kit.Malloc("m1", 64);
        var a = await kit.CreateRaid("r0", RaidLevel.Raid0, 4, "m0", "m1");
        Assert.Equal(RaidState.Online, a.State);
        var raid = a.Bdev!;
        Assert.Equal(128UL, raid.BlockCount);
        Assert.Equal(8U, raid.OptimalIoBoundaryBlocks);

        using var d = kit.Bdevs.Open("r0", write: true);
        Assert.True(await kit.Write(d, 0, Pattern(0, 128, Bs, 0xA0))); // one write crossing every strip

        using var b0 = kit.Bdevs.Open("m0", write: false);
        using var b1 = kit.Bdevs.Open("m1", write: false);
        var base0 = await kit.Read(b0, 0, 64);
        var base1 = await kit.Read(b1, 0, 64);
        for (ulong k = 0; k < 64; k++)
        {
            Assert.Equal(((k / 8 * 2) + 0) * 8 + (k % 8), BlockTag(base0, k, Bs));
            Assert.Equal(((k / 8 * 2) + 1) * 8 + (k % 8), BlockTag(base1, k, Bs));
        }

        // A read crossing strips at an odd offset comes back in order.
        var back = await kit.Read(d, 5, 37);
        for (ulong k = 0; k < 37; k++)
        {
            Assert.Equal(5 + k, BlockTag(back, k, Bs));
        }
    }

    [Fact]
    public async Task Raid0_Unmap_And_Write_Zeroes_Spanning_Strips_Reach_Every_Base()
    {
        await using var kit = new RaidTestKit();
        kit.Malloc("m0", 64);
        kit.Malloc("m1", 64);
        kit.Malloc("m2", 64);
        var a = await kit.CreateRaid("r0", RaidLevel.Raid0, 4, "m0", "m1", "m2");
        using var d = kit.Bdevs.Open("r0", write: true);
        Assert.True(await kit.Write(d, 0, Pattern(0, 192, Bs, 0x11)));
        var (rc, ok) = await kit.Io(d, (ch, cb) => ch.Unmap(d, 5, 30, cb, null));
        Assert.Equal(0, rc);
        Assert.True(ok);
        (rc, ok) = await kit.Io(d, (ch, cb) => ch.WriteZeroes(d, 100, 50, cb, null));
        Assert.Equal(0, rc);
        Assert.True(ok);
        var all = await kit.Read(d, 0, 192);
        for (ulong k = 0; k < 192; k++)
        {
            bool zero = (k >= 5 && k < 35) || (k >= 100 && k < 150);
            Assert.Equal(zero ? 0UL : k, BlockTag(all, k, Bs));
        }
    }

    [Fact]
    public async Task Concat_Lays_Bases_End_To_End_Rounded_To_Strips()
    {
        await using var kit = new RaidTestKit();
        kit.Malloc("m0", 44); // 40 usable (5 strips of 8)
        kit.Malloc("m1", 72);
        var a = await kit.CreateRaid("c0", RaidLevel.Concat, 4, "m0", "m1");
        Assert.Equal(112UL, a.Bdev!.BlockCount);
        using var d = kit.Bdevs.Open("c0", write: true);
        Assert.True(await kit.Write(d, 0, Pattern(0, 112, Bs, 0xC0)));
        using var b0 = kit.Bdevs.Open("m0", write: false);
        using var b1 = kit.Bdevs.Open("m1", write: false);
        var base0 = await kit.Read(b0, 0, 40);
        var base1 = await kit.Read(b1, 0, 72);
        for (ulong k = 0; k < 40; k++)
        {
            Assert.Equal(k, BlockTag(base0, k, Bs));
        }

        for (ulong k = 0; k < 72; k++)
        {
            Assert.Equal(40 + k, BlockTag(base1, k, Bs));
        }

        // An unmap across the seam clears both sides.
        var (rc, ok) = await kit.Io(d, (ch, cb) => ch.Unmap(d, 36, 8, cb, null));
        Assert.True(rc == 0 && ok);
        var around = await kit.Read(d, 34, 12);
        for (ulong k = 0; k < 12; k++)
        {
            ulong lba = 34 + k;
            Assert.Equal(lba is >= 36 and < 44 ? 0UL : lba, BlockTag(around, k, Bs));
        }
    }

    [Fact]
    public async Task Raid1_Mirrors_Writes_And_Balances_Reads()
    {
        await using var kit = new RaidTestKit();
        kit.Malloc("m0", 256);
        kit.Malloc("m1", 300);
        var a = await kit.CreateRaid("r1", RaidLevel.Raid1, 0, "m0", "m1");
        Assert.Equal(256UL, a.Bdev!.BlockCount);
        using var d = kit.Bdevs.Open("r1", write: true);
        var data = new byte[256 * Bs];
        new Random(1).NextBytes(data);
        Assert.True(await kit.Write(d, 0, data));
        using var b0 = kit.Bdevs.Open("m0", write: false);
        using var b1 = kit.Bdevs.Open("m1", write: false);
        Assert.Equal(data, await kit.Read(b0, 0, 256));
        Assert.Equal(data, await kit.Read(b1, 0, 256));

        long r0 = kit.Bdevs.Find("m0")!.GetStats().NumReadOps, r1 = kit.Bdevs.Find("m1")!.GetStats().NumReadOps;
        var held = await kit.Main.InvokeAsync(() => d.GetIoChannel()); // one channel for all reads, as a real user keeps it
        for (int i = 0; i < 20; i++)
        {
            Assert.Equal(data.AsSpan(i * 8 * (int)Bs, 8 * (int)Bs).ToArray(), await kit.Read(d, (ulong)i * 8, 8));
        }

        await kit.Main.InvokeAsync(() => BdevDesc.PutIoChannel(held));
        Assert.True(kit.Bdevs.Find("m0")!.GetStats().NumReadOps - r0 >= 5, "base m0 served too few reads");
        Assert.True(kit.Bdevs.Find("m1")!.GetStats().NumReadOps - r1 >= 5, "base m1 served too few reads");
    }

    [Fact]
    public async Task Raid1_Base_Write_Failure_Degrades_And_Io_Keeps_Succeeding()
    {
        await using var kit = new RaidTestKit();
        kit.Malloc("m0", 128);
        using var flaky = new FlakyDiskModel("f1", 128);
        kit.Bdevs.Register(flaky);
        var a = await kit.CreateRaid("r1", RaidLevel.Raid1, 0, "m0", "f1");
        using var d = kit.Bdevs.Open("r1", write: true);
        flaky.FailWrites = true;
        var data = Pattern(0, 16, Bs, 0x5A);
        Assert.True(await kit.Write(d, 0, data)); // m0 took it: success
        await Until(() => a.Operational == 1 && a.Discovered == 1, "the failed base to leave the array");
        Assert.Equal(RaidState.Online, a.State);
        Assert.Null(kit.Bdevs.Find("f1")!.ClaimedBy); // its claim was released
        int writes = flaky.Writes;
        Assert.True(await kit.Write(d, 16, Pattern(16, 16, Bs, 0x5B)));
        Assert.Equal(writes, flaky.Writes); // the failed base gets nothing more
        Assert.Equal(data, await kit.Read(d, 0, 16));
        var info = kit.Raid.Info(a);
        Assert.Equal(1, (int)info["num_base_bdevs_operational"]!);
        Assert.False((bool)info["base_bdevs_list"]![1]!["is_configured"]!);
    }

    [Fact]
    public async Task Raid1_Failed_Read_Is_Retried_On_The_Other_Base()
    {
        await using var kit = new RaidTestKit();
        kit.Malloc("m0", 128);
        using var flaky = new FlakyDiskModel("f1", 128);
        kit.Bdevs.Register(flaky);
        var a = await kit.CreateRaid("r1", RaidLevel.Raid1, 0, "f1", "m0");
        using var d = kit.Bdevs.Open("r1", write: true);
        var data = Pattern(0, 64, Bs, 0x77);
        Assert.True(await kit.Write(d, 0, data));
        flaky.FailReads = true;
        for (int i = 0; i < 8; i++)
        {
            Assert.Equal(data.AsSpan(i * 8 * (int)Bs, 8 * (int)Bs).ToArray(), await kit.Read(d, (ulong)i * 8, 8));
        }

        Assert.True(flaky.Reads > 0, "the flaky base was never read from");
        await Until(() => a.Operational == 1, "the failed base to leave the array");
    }

    [Fact]
    public async Task Raid1_Remove_Base_And_Hot_Remove_Leave_It_Degraded()
    {
        await using var kit = new RaidTestKit();
        var m0 = kit.Malloc("m0", 128);
        kit.Malloc("m1", 128);
        kit.Malloc("m2", 128);
        var a = await kit.CreateRaid("r1", RaidLevel.Raid1, 0, "m0", "m1", "m2");
        using var d = kit.Bdevs.Open("r1", write: true);
        var data = Pattern(0, 32, Bs, 0x42);
        Assert.True(await kit.Write(d, 0, data));

        await kit.OnMain(() => kit.Raid.RemoveBaseAsync("m1"));
        Assert.Equal(2, a.Operational);
        Assert.Null(kit.Bdevs.Find("m1")!.ClaimedBy);
        await Assert.ThrowsAsync<RaidException>(() => kit.OnMain(() => kit.Raid.RemoveBaseAsync("m1")));

        await kit.Bdevs.UnregisterAsync(m0, TimeSpan.FromSeconds(10)); // hot-remove completes: the raid let go of it
        await Until(() => a.Operational == 1 && a.Discovered == 1, "hot-removed base to leave");
        Assert.Equal(RaidState.Online, a.State);
        Assert.Equal(data, await kit.Read(d, 0, 32));
        Assert.True(await kit.Write(d, 32, Pattern(32, 8, Bs, 1)));
    }

    [Fact]
    public async Task Raid1_Add_Base_Rebuilds_While_A_Writer_Keeps_Writing()
    {
        await using var kit = new RaidTestKit(reactors: 2, windowKb: 8);
        const ulong blocks = 4096;
        kit.Malloc("m0", blocks);
        kit.Malloc("m1", blocks);
        var a = await kit.CreateRaid("r1", RaidLevel.Raid1, 0, "m0", "m1");
        using var d = kit.Bdevs.Open("r1", write: true);
        var seed = new byte[blocks * Bs];
        new Random(7).NextBytes(seed);
        Assert.True(await kit.Write(d, 0, seed));
        await kit.OnMain(() => kit.Raid.RemoveBaseAsync("m1"));
        Assert.True(await kit.Write(d, 0, Pattern(0, 64, Bs, 9))); // degraded writes: m1 misses them

        var spare = kit.Malloc("spare", blocks + 100);
        using var writer = new RandomWriter(kit, d, blocks);
        writer.Start(kit.Other);
        await Until(() => writer.Completed > 50, "the writer to get going");

        var process = await kit.Main.InvokeAsync(() =>
        {
            kit.Raid.AddBase("r1", "spare");
            return kit.Raid.Info(a)["process"]?.ToJsonString();
        });
        Assert.NotNull(process);
        Assert.Contains("\"type\":\"rebuild\"", process);
        Assert.Contains("\"target\":\"spare\"", process);
        Assert.Equal(2, a.Operational);

        await Until(() => kit.Raid.Info(a)["process"] is null, "the rebuild to finish", 60_000);
        long during = writer.Completed;
        await Until(() => writer.Completed > during + 50, "the writer to go on after the rebuild");
        await writer.StopAsync();
        Assert.Equal(0, writer.Failed);

        using var b0 = kit.Bdevs.Open("m0", write: false);
        using var b2 = kit.Bdevs.Open("spare", write: false);
        var x = await kit.Read(b0, 0, blocks);
        var y = await kit.Read(b2, 0, blocks);
        Assert.True(x.AsSpan().SequenceEqual(y), "rebuilt base differs from the source");

        // Operational now: reads may come from it.
        var info = kit.Raid.Info(a);
        Assert.True((bool)info["base_bdevs_list"]![1]!["is_configured"]!);
        Assert.Equal("spare", (string)info["base_bdevs_list"]![1]!["name"]!);
    }

    [Fact]
    public async Task Rebuild_Window_Holds_A_Guest_Write_Until_The_Copy_Of_Its_Range_Landed()
    {
        await using var kit = new RaidTestKit(reactors: 2, windowKb: 8);
        Assert.True(kit.Runtime.Reactors.Count >= 2, "needs two reactors");
        kit.Malloc("m0", 64);
        kit.Malloc("m1", 64);
        var a = await kit.CreateRaid("r1", RaidLevel.Raid1, 0, "m0", "m1");
        using var d = kit.Bdevs.Open("r1", write: true);
        Assert.True(await kit.Write(d, 0, Pattern(0, 64, Bs, 1)));
        await kit.OnMain(() => kit.Raid.RemoveBaseAsync("m1"));

        // The target holds the rebuild's copy of window 0 (written from the main reactor); a guest write to that
        // window, from the other reactor, must not land before it (else the copy's old data overwrites it).
        using var target = new FlakyDiskModel("t", 64) { HoldWritesOn = kit.Main };
        kit.Bdevs.Register(target);
        await kit.Main.InvokeAsync(() => kit.Raid.AddBase("r1", "t"));
        await Until(() => target.HeldCount > 0, "the copy of window 0 to reach the target");
        var guest = kit.Write(d, 2, Pattern(2, 1, Bs, 0x99), kit.Other);
        await Task.Delay(100);
        Assert.False(guest.IsCompleted, "a guest write overlapping the window being copied went ahead of the copy");
        target.Release();
        Assert.True(await guest);
        await Until(() => kit.Raid.Info(a)["process"] is null, "the rebuild to finish");

        using var b0 = kit.Bdevs.Open("m0", write: false);
        using var bt = kit.Bdevs.Open("t", write: false);
        var x = await kit.Read(b0, 0, 64);
        var y = await kit.Read(bt, 0, 64);
        Assert.Equal(0x99, x[(2 * (int)Bs) + 100]);
        Assert.True(x.AsSpan().SequenceEqual(y), "rebuilt base differs from the source");
    }

    [Fact]
    public async Task Rebuild_Onto_A_Failing_Target_Aborts_And_The_Target_Leaves()
    {
        await using var kit = new RaidTestKit(windowKb: 8);
        kit.Malloc("m0", 256);
        kit.Malloc("m1", 256);
        var a = await kit.CreateRaid("r1", RaidLevel.Raid1, 0, "m0", "m1");
        using var d = kit.Bdevs.Open("r1", write: true);
        var data = Pattern(0, 256, Bs, 0x31);
        Assert.True(await kit.Write(d, 0, data));
        await kit.OnMain(() => kit.Raid.RemoveBaseAsync("m1"));
        using var bad = new FlakyDiskModel("bad", 256) { FailWrites = true };
        kit.Bdevs.Register(bad);
        await kit.Main.InvokeAsync(() => kit.Raid.AddBase("r1", "bad"));
        await Until(() => kit.Raid.Info(a)["process"] is null && a.Discovered == 1, "the rebuild to give up and the target to leave");
        Assert.Equal(1, a.Operational);
        Assert.Equal(RaidState.Online, a.State);
        Assert.Null(bad.ClaimedBy);
        Assert.Equal(data, await kit.Read(d, 0, 256));
        Assert.True(await kit.Write(d, 0, Pattern(0, 8, Bs, 0x32)));
    }

    [Fact]
    public async Task Losing_The_Last_Complete_Base_During_A_Rebuild_Takes_The_Array_Offline()
    {
        await using var kit = new RaidTestKit(windowKb: 8);
        var m0 = kit.Malloc("m0", 256);
        kit.Malloc("m1", 256);
        var a = await kit.CreateRaid("r1", RaidLevel.Raid1, 0, "m0", "m1");
        await kit.OnMain(() => kit.Raid.RemoveBaseAsync("m1"));
        using var slow = new FlakyDiskModel("slow", 256) { Hold = true };
        kit.Bdevs.Register(slow);
        await kit.Main.InvokeAsync(() => kit.Raid.AddBase("r1", "slow"));
        await Until(() => slow.HeldCount > 0, "the copy to reach the target");
        var going = kit.Bdevs.UnregisterAsync(m0, TimeSpan.FromSeconds(10));
        await Until(() => a.State == RaidState.Offline, "the array to go offline (a rebuild target holds no complete copy)");
        slow.Release();
        await going;
        await Until(() => kit.Bdevs.Find("r1") is null && kit.Raid.Info(a)["process"] is null, "raid bdev and rebuild gone");
        await kit.OnMain(() => kit.Raid.DeleteAsync("r1"));
        Assert.Null(slow.ClaimedBy);
    }

    [Fact]
    public async Task Raid0_Losing_A_Base_Unregisters_It_And_In_Flight_Io_Completes()
    {
        await using var kit = new RaidTestKit();
        using var held = new FlakyDiskModel("h0", 64);
        kit.Bdevs.Register(held);
        var m1 = kit.Malloc("m1", 64);
        var a = await kit.CreateRaid("r0", RaidLevel.Raid0, 4, "h0", "m1");
        var removed = new TaskCompletionSource();
        var d = kit.Bdevs.Open("r0", write: true, (t, _, _) => { if (t == BdevEventType.Remove) { removed.TrySetResult(); } });
        held.Hold = true;
        var inflight = kit.Write(d, 0, Pattern(0, 8, Bs, 3)); // strip 0: base h0, held
        await Until(() => held.MaxInFlight > 0, "the held write to reach the base");

        var going = kit.Bdevs.UnregisterAsync(m1, TimeSpan.FromSeconds(10));
        await removed.Task.WaitAsync(TimeSpan.FromSeconds(5));
        Assert.Equal(RaidState.Offline, a.State);
        held.Release();
        Assert.True(await inflight); // the in-flight write completes
        d.Dispose();
        await going;
        await Until(() => kit.Bdevs.Find("r0") is null, "raid bdev gone");
        Assert.Equal("raid", kit.Bdevs.Find("h0")!.ClaimedBy); // an offline array keeps its other bases (SPDK)
        await kit.OnMain(() => kit.Raid.DeleteAsync("r0"));
        Assert.Null(kit.Bdevs.Find("h0")!.ClaimedBy);
        Assert.Null(kit.Raid.Find("r0"));
    }

    [Fact]
    public async Task Raid_Created_Before_Its_Bases_Comes_Online_When_They_Appear()
    {
        await using var kit = new RaidTestKit();
        var a = await kit.CreateRaid("r1", RaidLevel.Raid1, 0, "late1", "late0");
        Assert.Equal(RaidState.Configuring, a.State);
        Assert.Null(kit.Bdevs.Find("r1"));
        kit.Malloc("late0", 64);
        Assert.Equal(RaidState.Configuring, a.State);
        Assert.Equal(1, a.Discovered);
        kit.Malloc("late1", 64);
        Assert.Equal(RaidState.Online, a.State);
        Assert.NotNull(kit.Bdevs.Find("r1"));
        Assert.Equal("raid", kit.Bdevs.Find("late0")!.ClaimedBy);

        await kit.OnMain(() => kit.Raid.DeleteAsync("r1"));
        Assert.Null(kit.Bdevs.Find("r1"));
        Assert.Null(kit.Bdevs.Find("late0")!.ClaimedBy);
        Assert.Null(kit.Bdevs.Find("late1")!.ClaimedBy);
    }

    [Fact]
    public async Task Base_Out_Of_Io_Objects_Is_Retried()
    {
        await using var kit = new RaidTestKit();
        using var f0 = new FlakyDiskModel("f0", 256, pool: 2);
        using var f1 = new FlakyDiskModel("f1", 256, pool: 2);
        kit.Bdevs.Register(f0);
        kit.Bdevs.Register(f1);
        await kit.CreateRaid("r1", RaidLevel.Raid1, 0, "f0", "f1");
        using var d = kit.Bdevs.Open("r1", write: true);
        using var buf = new AlignedBuffer(32 * 8 * Bs);
        var expect = Pattern(0, 256, Bs, 0xEE);
        expect.CopyTo(buf.AsSpan(0, expect.Length));
        int good = await kit.Main.InvokeAsync(async () =>
        {
            var ch = d.GetIoChannel();
            int ok = 0, done = 0;
            var all = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            for (int i = 0; i < 32; i++)
            {
                var iov = new[] { buf.ToIoVec((nuint)(i * 8 * Bs), 8 * Bs) };
                Assert.Equal(0, ch.Write(d, iov, (ulong)i * 8, 8, (_, s, _) =>
                {
                    ok += s ? 1 : 0;
                    if (++done == 32)
                    {
                        all.SetResult();
                    }
                }, null));
            }

            await all.Task;
            BdevDesc.PutIoChannel(ch);
            return ok;
        });
        Assert.Equal(32, good);
        Assert.True(f0.MaxInFlight <= 2);
        using var b0 = kit.Bdevs.Open("f0", write: false);
        using var b1 = kit.Bdevs.Open("f1", write: false);
        Assert.Equal(expect, await kit.Read(b0, 0, 256));
        Assert.Equal(expect, await kit.Read(b1, 0, 256));
    }

    [Theory]
    [InlineData(RaidLevel.Raid0)]
    [InlineData(RaidLevel.Raid1)]
    [InlineData(RaidLevel.Concat)]
    public async Task Steady_State_Raid_Io_Allocates_Nothing(RaidLevel level)
    {
        await using var kit = new RaidTestKit();
        kit.Malloc("m0", 1024);
        kit.Malloc("m1", 1024);
        await kit.CreateRaid("r", level, level == RaidLevel.Raid1 ? 0u : 4u, "m0", "m1");
        using var d = kit.Bdevs.Open("r", write: true);
        using var buf = new AlignedBuffer(4096);
        var loop = new IoLoop(d, [buf.ToIoVec()], 1024);
        long bytes = await kit.Main.InvokeAsync(async () =>
        {
            long b = await loop.SteadyStateAllocation(20_000, 100_000, 32);
            loop.Release();
            return b;
        });
        Assert.True(bytes < 200, $"{level}: {bytes} bytes allocated over 100k I/Os");
    }

    [Fact]
    public async Task Create_Checks_Like_Spdk()
    {
        await using var kit = new RaidTestKit();
        kit.Malloc("m0", 64);
        kit.Malloc("m1", 64, 4096);
        async Task<int> Errno(Func<Task> f)
        {
            var e = await Assert.ThrowsAsync<RaidException>(() => kit.OnMain(f));
            return e.Errno;
        }

        Assert.Equal(Platform.Errno.EINVAL, await Errno(() => kit.Raid.CreateAsync("x", RaidLevel.Raid1, 64, ["a", "b"], null)));
        Assert.Equal(Platform.Errno.EINVAL, await Errno(() => kit.Raid.CreateAsync("x", RaidLevel.Raid0, 3, ["a"], null)));
        Assert.Equal(Platform.Errno.EINVAL, await Errno(() => kit.Raid.CreateAsync("x", RaidLevel.Raid0, 0, ["a"], null)));
        Assert.Equal(Platform.Errno.EINVAL, await Errno(() => kit.Raid.CreateAsync("x", RaidLevel.Raid1, 0, ["a"], null)));
        Assert.Equal(Platform.Errno.EINVAL, await Errno(() => kit.Raid.CreateAsync("x", RaidLevel.Raid1, 0, ["m0", "m1"], null))); // block sizes differ
        Assert.Null(kit.Raid.Find("x"));
        Assert.Null(kit.Bdevs.Find("m0")!.ClaimedBy); // the failed create let go of m0
        await kit.CreateRaid("y", RaidLevel.Raid1, 0, "p", "q");
        Assert.Equal(Platform.Errno.EEXIST, await Errno(() => kit.Raid.CreateAsync("y", RaidLevel.Raid1, 0, ["a", "b"], null)));
    }

    /// <summary>Writes random data to random blocks from one reactor until stopped, one I/O at a time.</summary>
    private sealed class RandomWriter : IDisposable
    {
        private readonly RaidTestKit _kit;
        private readonly BdevDesc _desc;
        private readonly ulong _blocks;
        private readonly AlignedBuffer _buf = new(16 * 512);
        private readonly Random _rng = new(3);
        private readonly TaskCompletionSource _stopped = new(TaskCreationOptions.RunContinuationsAsynchronously);
        private BdevChannel? _ch;
        private volatile bool _stop;
        private long _completed;

        public RandomWriter(RaidTestKit kit, BdevDesc desc, ulong blocks)
        {
            _kit = kit;
            _desc = desc;
            _blocks = blocks;
        }

        public long Completed => Interlocked.Read(ref _completed);
        public int Failed;

        public void Start(Reactor on) => on.Send(static s => ((RandomWriter)s!).Next(), this);

        public async Task StopAsync()
        {
            _stop = true;
            await _stopped.Task.WaitAsync(TimeSpan.FromSeconds(10));
        }

        private void Next()
        {
            _ch ??= _desc.GetIoChannel();
            if (_stop)
            {
                BdevDesc.PutIoChannel(_ch);
                _stopped.TrySetResult();
                return;
            }

            ulong n = (ulong)_rng.Next(1, 17);
            ulong lba = (ulong)_rng.NextInt64(0, (long)(_blocks - n));
            _rng.NextBytes(_buf.AsSpan(0, (int)(n * 512)));
            int rc = _ch.Write(_desc, [_buf.ToIoVec(0, (nuint)(n * 512))], lba, n, static (_, ok, s) =>
            {
                var w = (RandomWriter)s!;
                if (!ok)
                {
                    Interlocked.Increment(ref w.Failed);
                }

                Interlocked.Increment(ref w._completed);
                w.Next();
            }, this);
            if (rc != 0)
            {
                Interlocked.Increment(ref Failed);
                _stopped.TrySetResult();
            }
        }

        public void Dispose() => _buf.Dispose();
    }
}
