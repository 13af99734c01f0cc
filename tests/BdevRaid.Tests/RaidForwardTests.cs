using VhostBackend.Bdev;
using VhostBackend.Platform;
using static VhostBackend.BdevRaid.Tests.RaidTestKit;

namespace VhostBackend.BdevRaid.Tests;

/// <summary>
/// A raid bdev accepts forwarded I/O (<see cref="BdevChannel.TryForward"/>): a vbdev on top of it (an lvol, a
/// passthru) hands its own I/O to the raid module at the translated offset. It lands on the right base(s), the raid
/// counts it, and an I/O the raid's layer would split at a strip is refused and takes the regular way.
/// </summary>
public sealed class RaidForwardTests
{
    private const uint Bs = 512;

    [Fact]
    public async Task Raid0_Takes_A_Forwarded_Io_Within_A_Strip_And_Refuses_One_Crossing_Strips()
    {
        await using var kit = new RaidTestKit();
        kit.Malloc("m0", 64);
        kit.Malloc("m1", 64);
        var a = await kit.CreateRaid("r0", RaidLevel.Raid0, 4, "m0", "m1"); // strips of 8 blocks
        Assert.True(a.Bdev!.AcceptsForwardedIo);
        using var raidDesc = kit.Bdevs.Open("r0", write: true);
        var shift = new ShiftVbdevModel("S", raidDesc, 16, 64); // vbdev block N = raid block N + 16
        kit.Bdevs.Register(shift);
        using var d = kit.Bdevs.Open("S", write: true);

        // Blocks 0..7 of S = raid 16..23 = strip 2 = m0's blocks 8..15: forwarded.
        Assert.True(await kit.Write(d, 0, Pattern(16, 8, Bs, 0xB1)));
        Assert.Equal((1, 0), (shift.Forwarded, shift.Regular));
        using var b0 = kit.Bdevs.Open("m0", write: false);
        var onBase = await kit.Read(b0, 8, 8);
        for (ulong k = 0; k < 8; k++)
        {
            Assert.Equal(16 + k, BlockTag(onBase, k, Bs));
        }

        // Blocks 4..11 of S = raid 20..27 cross the strip at 24: the raid's layer would split it, so it is refused.
        Assert.True(await kit.Write(d, 4, Pattern(20, 8, Bs, 0xB2)));
        Assert.Equal((1, 1), (shift.Forwarded, shift.Regular));

        // Read back through the vbdev (forwarded, one strip at a time) and through the raid itself.
        var back = await kit.Read(d, 8, 8); // raid 24..31 = strip 3 on m1
        Assert.Equal((2, 1), (shift.Forwarded, shift.Regular));
        for (ulong k = 0; k < 4; k++)
        {
            Assert.Equal(24 + k, BlockTag(back, k, Bs));
        }

        var viaRaid = await kit.Read(raidDesc, 16, 12);
        for (ulong k = 0; k < 12; k++)
        {
            Assert.Equal(16 + k, BlockTag(viaRaid, k, Bs));
        }

        var stats = a.Bdev.GetStats();
        Assert.Equal(2, stats.NumWriteOps); // the forwarded write and the regular one
        Assert.Equal(2, stats.NumReadOps);  // the forwarded read and the direct one
        Assert.Equal(0, a.Bdev.QueueDepth);
        Assert.False(shift.ModuleStateChanged, "the raid module left the vbdev's module state alone");
    }

    [Fact]
    public async Task Raid1_Mirrors_A_Forwarded_Write_And_Serves_A_Forwarded_Read()
    {
        await using var kit = new RaidTestKit();
        kit.Malloc("m0", 128);
        kit.Malloc("m1", 128);
        var a = await kit.CreateRaid("r1", RaidLevel.Raid1, 0, "m0", "m1");
        using var raidDesc = kit.Bdevs.Open("r1", write: true);
        var shift = new ShiftVbdevModel("S", raidDesc, 40, 64);
        kit.Bdevs.Register(shift);
        using var d = kit.Bdevs.Open("S", write: true);
        var data = new byte[32 * Bs];
        new Random(3).NextBytes(data);

        Assert.True(await kit.Write(d, 5, data));
        using var b0 = kit.Bdevs.Open("m0", write: false);
        using var b1 = kit.Bdevs.Open("m1", write: false);
        Assert.Equal(data, await kit.Read(b0, 45, 32));
        Assert.Equal(data, await kit.Read(b1, 45, 32));
        Assert.Equal(data, await kit.Read(d, 5, 32));
        Assert.Equal((2, 0), (shift.Forwarded, shift.Regular));
        Assert.Equal((1L, 1L), (a.Bdev!.GetStats().NumWriteOps, a.Bdev.GetStats().NumReadOps));
        Assert.Equal(1, shift.GetStats().NumWriteOps);
    }
}
