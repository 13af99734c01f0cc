using System.Diagnostics;
using VhostBackend.Bdev;
using VhostBackend.BdevDelay;
using VhostBackend.BdevError;
using VhostBackend.BdevPassthru;
using VhostBackend.Platform;
using Xunit;

namespace VhostBackend.BdevVbdev.Tests;

/// <summary>What the three vbdev modules share: forwarding with data, examine order, claims, base removal, no allocation per I/O.</summary>
public class VbdevCommonTests
{
    public static TheoryData<string> Modules => new() { "passthru", "delay", "error" };

    [Theory]
    [MemberData(nameof(Modules))]
    public async Task Io_Is_Forwarded_To_The_Base_With_Its_Data(string module)
    {
        await using var kit = new VbdevKit();
        var malloc = kit.AddMalloc();
        string name = kit.CreateVbdev(module, "M");
        var vbdev = kit.Bdevs.Find(name)!;
        Assert.Null(vbdev.ClaimedBy);
        Assert.Equal(module, malloc.ClaimedBy);
        Assert.Equal((malloc.BlockSize, malloc.BlockCount), (vbdev.BlockSize, vbdev.BlockCount));
        Assert.Throws<BdevClaimedException>(() => kit.Bdevs.Open("M", write: true));

        using var desc = kit.Bdevs.Open(name, write: true);
        using var baseDesc = kit.Bdevs.Open("M", write: false);
        using var src = new TestBuffer(4096);
        using var dst = new TestBuffer(4096);
        new Random(module.Length).NextBytes(src.Span);

        // A write through the vbdev (two segments) lands on the base; a read through it returns it.
        bool remap = false;
        Assert.Equal((0, BdevIoStatus.Success), await kit.Io(desc, (ch, cb) =>
        {
            remap = ch.HasRemap;
            return ch.Write(desc, src.Iov(0, 1000, 3096), 16, 8, cb, null);
        }));
        Assert.Equal((0, BdevIoStatus.Success), await kit.Io(baseDesc, (ch, cb) => ch.Read(baseDesc, dst.Whole(), 16, 8, cb, null)));
        Assert.True(src.Span.SequenceEqual(dst.Span));
        dst.Span.Clear();
        Assert.Equal((0, BdevIoStatus.Success), await kit.Io(desc, (ch, cb) => ch.Read(desc, dst.Iov(0, 512, 3584), 16, 8, cb, null)));
        Assert.True(src.Span.SequenceEqual(dst.Span));

        // Passthru over malloc resolves reads and writes in the caller's pass (a remap); delay and error act at the
        // base's completion and keep their own pass. Either way both bdevs' statistics count the I/O.
        Assert.Equal(module == "passthru", remap);
        Assert.Equal((1L, 1L), (vbdev.GetStats().NumWriteOps, vbdev.GetStats().NumReadOps));
        Assert.Equal((1L, 2L), (malloc.GetStats().NumWriteOps, malloc.GetStats().NumReadOps));

        // Write zeroes, unmap and flush are forwarded too (malloc zeroes unmapped blocks).
        Assert.Equal((0, BdevIoStatus.Success), await kit.Io(desc, (ch, cb) => ch.WriteZeroes(desc, 16, 4, cb, null)));
        Assert.Equal((0, BdevIoStatus.Success), await kit.Io(desc, (ch, cb) => ch.Unmap(desc, 20, 4, cb, null)));
        Assert.Equal((0, BdevIoStatus.Success), await kit.Io(desc, (ch, cb) => ch.Flush(desc, 0, 1024, cb, null)));
        Assert.Equal((0, BdevIoStatus.Success), await kit.Io(baseDesc, (ch, cb) => ch.Read(baseDesc, dst.Whole(), 16, 8, cb, null)));
        Assert.True(dst.Span.IndexOfAnyExcept((byte)0) < 0, "write zeroes / unmap did not reach the base");

        // A compare that differs comes back as Miscompare (the base's status, forwarded).
        if (vbdev.SupportsIoType(BdevIoType.Compare))
        {
            Assert.Equal((0, BdevIoStatus.Miscompare), await kit.Io(desc, (ch, cb) => ch.Compare(desc, src.Whole(), 16, 8, cb, null)));
        }

        Assert.Equal(0, (await kit.Io(desc, (ch, cb) => ch.Reset(desc, cb, null))).Rc);
    }

    [Theory]
    [MemberData(nameof(Modules))]
    public async Task Vbdev_Created_Before_Its_Base_Is_Built_When_The_Base_Appears(string module)
    {
        await using var kit = new VbdevKit();
        string name = kit.CreateVbdev(module, "Late");
        Assert.Null(kit.Bdevs.Find(name));

        var malloc = kit.AddMalloc("Late"); // examine builds it
        Assert.NotNull(kit.Bdevs.Find(name));
        Assert.Equal(module, malloc.ClaimedBy);

        using var desc = kit.Bdevs.Open(name, write: true);
        using var buf = new TestBuffer(512);
        Assert.Equal((0, BdevIoStatus.Success), await kit.Io(desc, (ch, cb) => ch.Write(desc, buf.Whole(), 3, 1, cb, null)));
    }

    [Theory]
    [MemberData(nameof(Modules))]
    public async Task Base_Removed_With_Io_In_Flight_Completes_It_And_Unregisters_The_Vbdev(string module)
    {
        await using var kit = new VbdevKit();
        var holding = new HoldingBdev("H");
        kit.Bdevs.Register(holding);
        string name = kit.CreateVbdev(module, "H", latencyUs: 50_000);

        var removed = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        using var desc = kit.Bdevs.Open(name, write: true, static (type, _, ctx) =>
        {
            if (type == BdevEventType.Remove)
            {
                ((TaskCompletionSource)ctx!).TrySetResult();
            }
        }, removed);
        using var buf = new TestBuffer(4096);
        var ios = await kit.Start(desc, 4, (ch, i, cb) => ch.Read(desc, buf.Iov(i * 1024, 1024), (ulong)i * 2, 2, cb, null));
        Assert.True(SpinWait.SpinUntil(() => holding.HeldCount == 4, 5000), "the I/Os did not reach the base");

        var unregister = kit.Bdevs.UnregisterAsync(holding, TimeSpan.FromSeconds(20));
        await removed.Task.WaitAsync(TimeSpan.FromSeconds(10)); // the vbdev's opener hears Remove
        Assert.False(unregister.IsCompleted); // the vbdev is still open: the base waits

        await kit.Main.InvokeAsync(holding.ReleaseAll);
        foreach (var io in ios)
        {
            Assert.Equal(BdevIoStatus.Success, await io.WaitAsync(TimeSpan.FromSeconds(10)));
        }

        desc.Dispose(); // the opener closes once its I/O is done
        await unregister.WaitAsync(TimeSpan.FromSeconds(10));
        Assert.Null(kit.Bdevs.Find(name));
        Assert.Null(kit.Bdevs.Find("H"));
    }

    [Theory]
    [MemberData(nameof(Modules))]
    public async Task Io_Waits_In_Order_When_The_Base_Runs_Out_Of_Io_Objects(string module)
    {
        await using var kit = new VbdevKit();
        var holding = new HoldingBdev("H", pool: 3);
        kit.Bdevs.Register(holding);
        string name = kit.CreateVbdev(module, "H");
        using var desc = kit.Bdevs.Open(name, write: true);
        using var buf = new TestBuffer(4096);

        // 8 I/Os through the vbdev, 3 base I/O objects: the base submit says -ENOMEM for the rest, which wait (no failure).
        var ios = await kit.Start(desc, 8, (ch, i, cb) => ch.Read(desc, buf.Iov(i * 512, 512), (ulong)i, 1, cb, null));
        Assert.True(SpinWait.SpinUntil(() => holding.HeldCount == 3, 5000));
        await Task.Delay(50);
        Assert.Equal(3, holding.HeldCount);
        Assert.DoesNotContain(ios, t => t.IsCompleted);

        for (int round = 0; round < 3; round++)
        {
            await kit.Main.InvokeAsync(holding.ReleaseAll); // each freed base I/O lets a waiting one through
        }

        foreach (var io in ios)
        {
            Assert.Equal(BdevIoStatus.Success, await io.WaitAsync(TimeSpan.FromSeconds(10)));
        }

        Assert.Equal(new ulong[] { 0, 1, 2, 3, 4, 5, 6, 7 }, holding.Offsets);
    }

    [Theory]
    [MemberData(nameof(Modules))]
    public async Task Delete_Releases_The_Base_And_An_Unknown_Name_Is_Refused(string module)
    {
        await using var kit = new VbdevKit();
        var malloc = kit.AddMalloc();
        string name = kit.CreateVbdev(module, "M");
        Assert.False(await kit.DeleteVbdevAsync(module, "nope"));
        Assert.True(await kit.DeleteVbdevAsync(module, name));
        Assert.Null(kit.Bdevs.Find(name));
        Assert.Null(malloc.ClaimedBy);
        kit.Bdevs.Open("M", write: true).Dispose();
        Assert.False(await kit.DeleteVbdevAsync(module, name));
    }

    [Theory]
    [MemberData(nameof(Modules))]
    public async Task Steady_State_Io_Allocates_Nothing(string module)
    {
        await using var kit = new VbdevKit();
        kit.AddMalloc();
        string name = kit.CreateVbdev(module, "M");
        using var desc = kit.Bdevs.Open(name, write: true);
        using var buf = new TestBuffer(4096);
        var loop = new IoLoop(desc, buf.Whole());
        long bytes = await kit.Main.InvokeAsync(async () =>
        {
            return await loop.SteadyStateAllocation(20_000, 100_000, 32);
        });
        Assert.True(bytes < 200, $"{module}: {bytes} bytes allocated over 100k I/Os");
    }

    [Fact]
    public async Task Passthru_And_Delay_Derive_Spdk_Uuids_From_The_Base_Unless_Given()
    {
        await using var kit = new VbdevKit();
        var baseUuid = Guid.Parse("11111111-2222-3333-4444-555555555555");
        kit.Bdevs.Register(new BdevMalloc.MallocBdev("U", 64, 512, baseUuid));
        kit.Bdevs.Register(new BdevMalloc.MallocBdev("V", 64, 512));

        // Expected values: RFC 4122 version-5 UUIDs of the module's namespace and the base UUID's 16 bytes,
        // computed independently (Python's uuid/hashlib), which is what spdk_uuid_generate_sha1 produces.
        Assert.Equal(Guid.Parse("93bb5d92-ae84-5565-b6db-dc77eeb5bd60"), kit.Passthru.Create("P", "U", null)!.Uuid);
        Assert.True(await kit.Passthru.DeleteAsync("P"));
        Assert.Equal(Guid.Parse("c2258f63-c588-585e-b2ea-ca0ac77ee1fd"), kit.Delay.Create("D", "U", null, new DelayLatencies(0, 0, 0, 0))!.Uuid);
        var given = Guid.NewGuid();
        Assert.Equal(given, kit.Passthru.Create("P2", "V", given)!.Uuid);
    }
}
