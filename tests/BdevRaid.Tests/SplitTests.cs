using VhostBackend.Bdev;
using VhostBackend.BdevSplit;
using VhostBackend.Platform;
using static VhostBackend.BdevRaid.Tests.RaidTestKit;

namespace VhostBackend.BdevRaid.Tests;

public sealed class SplitTests
{
    private const uint Bs = 512;

    [Fact]
    public async Task Parts_Translate_Offsets_And_Stay_Inside_Their_Window()
    {
        await using var kit = new RaidTestKit();
        kit.Malloc("m", 8192 + 5); // 4 MiB and a bit
        var names = kit.Split.Create("m", 4, 0);
        Assert.Equal(["mp0", "mp1", "mp2", "mp3"], names);
        Assert.Equal("split", kit.Bdevs.Find("m")!.ClaimedBy);
        var p2 = (SplitBdev)kit.Bdevs.Find("mp2")!;
        Assert.Equal(2049UL, p2.BlockCount); // 8197 / 4
        Assert.Equal(4098UL, p2.OffsetBlocks);
        Assert.Equal("Split Disk", p2.ProductName);

        using var d = kit.Bdevs.Open("mp2", write: true);
        Assert.True(await kit.Write(d, 10, Pattern(10, 4, Bs, 0x22)));
        using var b = kit.Bdevs.Open("m", write: false);
        var onBase = await kit.Read(b, 4098 + 10, 4);
        for (ulong k = 0; k < 4; k++)
        {
            Assert.Equal(10 + k, BlockTag(onBase, k, Bs));
        }

        // The bdev layer bounds-checks against the part's block count: an I/O crossing its end never reaches the base.
        using var buf = new AlignedBuffer(4 * Bs);
        var (rc, _) = await kit.Io(d, (ch, cb) => ch.Write(d, [buf.ToIoVec()], 2047, 4, cb, null));
        Assert.Equal(-Errno.EINVAL, rc);
    }

    [Fact]
    public async Task Split_Size_Is_Checked_And_Count_Clamped_Like_Spdk()
    {
        await using var kit = new RaidTestKit();
        kit.Malloc("m", 8192); // 4 MiB
        Assert.Equal(["mp0", "mp1", "mp2", "mp3"], kit.Split.Create("m", 10, 1)); // clamped to what fits
        Assert.Equal(2048UL, kit.Bdevs.Find("mp3")!.BlockCount);
        Assert.Equal(Errno.EEXIST, Assert.Throws<SplitException>(() => kit.Split.Create("m", 2, 0)).Errno);
        await kit.Split.DeleteAsync("m");
        Assert.Null(kit.Bdevs.Find("mp0"));
        Assert.Null(kit.Bdevs.Find("m")!.ClaimedBy);

        Assert.Equal(Errno.EINVAL, Assert.Throws<SplitException>(() => kit.Split.Create("m", 2, 5)).Errno); // 5 MiB > 4 MiB
        Assert.Null(kit.Bdevs.Find("m")!.ClaimedBy);
        Assert.Equal(Errno.EINVAL, Assert.Throws<SplitException>(() => kit.Split.Create("m", 0, 0)).Errno);

        // 1 MiB is not a whole number of 2 MiB blocks.
        using var big = new FlakyDiskModel("big", 4, 2 * 1024 * 1024);
        kit.Bdevs.Register(big);
        Assert.Equal(Errno.EINVAL, Assert.Throws<SplitException>(() => kit.Split.Create("big", 2, 1)).Errno);
        Assert.Null(big.ClaimedBy);
        Assert.Equal(Errno.ENOENT, (await Assert.ThrowsAsync<SplitException>(() => kit.Split.DeleteAsync("big"))).Errno);
    }

    [Fact]
    public async Task Config_Waits_For_Its_Base_And_Base_Removal_Takes_The_Parts()
    {
        await using var kit = new RaidTestKit();
        Assert.Empty(kit.Split.Create("late", 2, 0));
        var m = kit.Malloc("late", 64);
        Assert.NotNull(kit.Bdevs.Find("latep0"));
        Assert.NotNull(kit.Bdevs.Find("latep1"));
        var removed = new TaskCompletionSource();
        var d = kit.Bdevs.Open("latep1", write: true, (t, _, _) => { if (t == BdevEventType.Remove) { removed.TrySetResult(); } });
        var going = kit.Bdevs.UnregisterAsync(m, TimeSpan.FromSeconds(10));
        await removed.Task.WaitAsync(TimeSpan.FromSeconds(5));
        d.Dispose();
        await going;
        Assert.Null(kit.Bdevs.Find("latep0"));
        Assert.Null(kit.Bdevs.Find("latep1"));

        // As in SPDK (the part base's free deletes the config), the config went with the base.
        kit.Malloc("late", 64);
        Assert.Null(kit.Bdevs.Find("latep0"));
    }

    [Fact]
    public async Task Base_Out_Of_Io_Objects_Is_Retried()
    {
        await using var kit = new RaidTestKit();
        using var f = new FlakyDiskModel("f", 512, pool: 2);
        kit.Bdevs.Register(f);
        kit.Split.Create("f", 2, 0);
        using var d = kit.Bdevs.Open("fp1", write: true);
        using var buf = new AlignedBuffer(32 * 8 * Bs);
        var expect = Pattern(0, 256, Bs, 0xE1);
        expect.CopyTo(buf.AsSpan(0, expect.Length));
        int good = await kit.Main.InvokeAsync(async () =>
        {
            var ch = d.GetIoChannel();
            int ok = 0, done = 0;
            var all = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            for (int i = 0; i < 32; i++)
            {
                Assert.Equal(0, ch.Write(d, [buf.ToIoVec((nuint)(i * 8 * Bs), 8 * Bs)], (ulong)i * 8, 8, (_, s, _) =>
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
        Assert.True(f.MaxInFlight <= 2);
        using var b = kit.Bdevs.Open("f", write: false);
        Assert.Equal(expect, await kit.Read(b, 256, 256));
    }

    [Fact]
    public async Task Steady_State_Split_Io_Allocates_Nothing()
    {
        await using var kit = new RaidTestKit();
        kit.Malloc("m", 4096);
        kit.Split.Create("m", 2, 0);
        using var d = kit.Bdevs.Open("mp1", write: true);
        using var buf = new AlignedBuffer(4096);
        var loop = new IoLoop(d, [buf.ToIoVec()], 1024);
        long bytes = await kit.Main.InvokeAsync(async () =>
        {
            long b = await loop.SteadyStateAllocation(20_000, 100_000, 32);
            loop.Release();
            return b;
        });
        Assert.True(bytes < 200, $"{bytes} bytes allocated over 100k I/Os");
    }
}
