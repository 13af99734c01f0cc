using VhostBackend.Bdev;
using VhostBackend.BdevLvol;
using VhostBackend.BdevMalloc;
using VhostBackend.Platform;
using VhostBackend.Reactors;

namespace VhostBackend.Blob.Tests;

/// <summary>
/// The lvol resolved in the caller's pass (<see cref="BdevRemap"/>, session 27): a read or write of an allocated
/// cluster goes from the caller's channel straight to the base's module, never through the lvol module's Submit
/// (counted by <see cref="LvsChannel.ModuleIos"/>); everything the fast path cannot do still goes there.
/// </summary>
public class LvolRemapTests
{
    private const int MiB = 1024 * 1024;
    private const int Cluster = 64 * 1024;

    [Fact]
    public async Task ThickLvolIoIsResolvedInTheCallersPassAndCountedOnBothBdevs()
    {
        await using var kit = new LvolKit();
        var malloc = new MallocBdev("M0", 16 * MiB / 512, 512);
        kit.Bdevs.Register(malloc);
        var lvol = await CreateLvol(kit, "M0", "t");
        await using var module = await ModuleProbe.Hold(kit, lvol);
        var base0 = malloc.GetStats();

        var data = GoldenImages.Pattern("R", 0, 8192);
        Assert.True(await kit.Write("lvs/t", 3 * Cluster + 4096, data));
        Assert.Equal(data, await kit.Read("lvs/t", 3 * Cluster + 4096, 8192));
        Assert.Equal(0, await module.Ios()); // neither came to the lvol module
        ulong onBase = lvol.Lvol.Blob.ClusterAt(3) * (ulong)Cluster + 4096;
        Assert.Equal(data, await kit.Read("M0", onBase, 8192)); // at the cluster's place on the base

        var l = lvol.GetStats();
        var b = malloc.GetStats();
        Assert.Equal((1L, 1L, 8192L, 8192L), (l.NumWriteOps, l.NumReadOps, l.BytesWritten, l.BytesRead));
        // The base counted the lvol's write and read (and the check read above) as its own.
        Assert.Equal((1L, 2L), (b.NumWriteOps - base0.NumWriteOps, b.NumReadOps - base0.NumReadOps));
        Assert.Equal((8192L, 16384L), (b.BytesWritten - base0.BytesWritten, b.BytesRead - base0.BytesRead));

        // Across a cluster boundary the layer splits as before and the module does each piece.
        var wide = GoldenImages.Pattern("W", 0, 8192);
        Assert.True(await kit.Write("lvs/t", 5 * Cluster - 4096, wide));
        Assert.Equal(wide, await kit.Read("lvs/t", 5 * Cluster - 4096, 8192));
        Assert.True(await module.Ios() >= 2, "I/O across clusters went to the module");
    }

    [Fact]
    public async Task ThinFirstWritesAndZeroReadsFallBackThenTheAllocatedClusterIsResolvedInPlace()
    {
        await using var kit = new LvolKit();
        kit.Bdevs.Register(new MallocBdev("M0", 16 * MiB / 512, 512));
        var lvol = await CreateLvol(kit, "M0", "thin", thin: true);
        await using var module = await ModuleProbe.Hold(kit, lvol);

        Assert.Equal(new byte[4096], await kit.Read("lvs/thin", 2 * Cluster, 4096)); // nothing there: zeroes, by the module
        Assert.Equal(1, await module.Ios());
        var first = GoldenImages.Pattern("A", 0, 4096);
        Assert.True(await kit.Write("lvs/thin", 2 * Cluster, first)); // first write: allocation, by the module
        Assert.Equal(2, await module.Ios());
        Assert.NotEqual(0u, lvol.Lvol.Blob.ClusterAt(2));
        var second = GoldenImages.Pattern("B", 0, 4096);
        Assert.True(await kit.Write("lvs/thin", 2 * Cluster + 8192, second)); // allocated now: in the caller's pass
        Assert.Equal(first, await kit.Read("lvs/thin", 2 * Cluster, 4096));
        Assert.Equal(second, await kit.Read("lvs/thin", 2 * Cluster + 8192, 4096));
        Assert.Equal(new byte[4096], await kit.Read("lvs/thin", 2 * Cluster + 4096, 4096)); // the rest of the cluster zeroed
        Assert.Equal(2, await module.Ios());
    }

    [Fact]
    public async Task ASnapshotTurningAThickLvolIntoACloneSendsItsWritesBackToTheModule()
    {
        await using var kit = new LvolKit();
        kit.Bdevs.Register(new MallocBdev("M0", 16 * MiB / 512, 512));
        var lvol = await CreateLvol(kit, "M0", "t");
        await using var module = await ModuleProbe.Hold(kit, lvol);
        var before = GoldenImages.Pattern("S", 0, 4096);
        Assert.True(await kit.Write("lvs/t", Cluster, before));
        Assert.True(await kit.Write("lvs/t", 4 * Cluster, before));
        Assert.Equal(0, await module.Ios());

        await kit.Call("bdev_lvol_snapshot", new { lvol_name = "lvs/t", snapshot_name = "s" }).WaitAsync(TimeSpan.FromSeconds(60));
        Assert.Equal(0u, lvol.Lvol.Blob.ClusterAt(1)); // the clusters moved to the snapshot

        // A write to the clone's unallocated cluster must not land on the snapshot's cluster: the module allocates.
        var after = GoldenImages.Pattern("T", 0, 4096);
        Assert.True(await kit.Write("lvs/t", Cluster, after));
        Assert.Equal(1, await module.Ios());
        Assert.Equal(after, await kit.Read("lvs/t", Cluster, 4096));
        Assert.Equal(before, await kit.Read("lvs/s", Cluster, 4096));
        // A read of a cluster the clone does not have goes to the snapshot's cluster, still in the caller's pass.
        Assert.Equal(before, await kit.Read("lvs/t", 4 * Cluster, 4096));
        Assert.Equal(1, await module.Ios()); // the clone's cluster 1 (allocated now) and the snapshot's reads too
    }

    [Fact]
    public async Task AQuiesceWaitsForIoHeldInTheBaseAndIoDuringItGoesToTheModule()
    {
        await using var kit = new LvolKit();
        var hold = new HoldingBdev("H0", 16 * MiB / 512);
        kit.Bdevs.Register(hold);
        var lvol = await CreateLvol(kit, "H0", "t");
        await using var module = await ModuleProbe.Hold(kit, lvol);

        hold.HoldForwarded = true;
        var first = GoldenImages.Pattern("Q1", 0, 4096);
        var w1 = kit.Write("lvs/t", 2 * Cluster, first);
        var r1 = kit.Read("lvs/t", 3 * Cluster, 4096);
        await WaitFor(() => Task.FromResult(hold.HeldCount == 2));
        Assert.Equal(0, await module.Ios()); // the held write and read were resolved in the caller's pass
        Assert.Equal(2, hold.QueueDepth); // the base's queue depth counts the I/O remapped into it
        Assert.Equal(2, lvol.QueueDepth);
        Assert.Equal(2, hold.RemappedInFlight(b => b == lvol)); // what a quiesce waits on
        Assert.Equal(0, hold.RemappedInFlight(b => b != lvol));
        var snapshot = kit.Call("bdev_lvol_snapshot", new { lvol_name = "lvs/t", snapshot_name = "s" });
        await Task.Delay(300);
        Assert.False(snapshot.IsCompleted, "the snapshot did not wait for the I/O in flight");
        Assert.False(w1.IsCompleted);

        var second = GoldenImages.Pattern("Q2", 0, 4096);
        var r2 = kit.Read("lvs/t", 3 * Cluster, 4096); // while quiesced: to the module (reads are not held back there)
        await WaitFor(async () => await module.Ios() == 1);
        var w2 = kit.Write("lvs/t", 2 * Cluster + 4096, second); // while quiesced: to the module, which waits
        await WaitFor(async () => await module.Ios() == 2);
        Assert.Equal(2, hold.RemappedInFlight(b => b == lvol));
        hold.HoldForwarded = false;
        await kit.Main.InvokeAsync(hold.ReleaseHeld);
        Assert.True(await w1.WaitAsync(TimeSpan.FromSeconds(60)));
        Assert.Equal(new byte[4096], await r1.WaitAsync(TimeSpan.FromSeconds(60)));
        Assert.Equal(new byte[4096], await r2.WaitAsync(TimeSpan.FromSeconds(60)));
        await snapshot.WaitAsync(TimeSpan.FromSeconds(60));
        Assert.True(await w2.WaitAsync(TimeSpan.FromSeconds(60)));
        Assert.Equal(0, hold.RemappedInFlight(_ => true));

        Assert.Equal(first, await kit.Read("lvs/s", 2 * Cluster, 4096)); // the snapshot holds the write it waited for
        Assert.Equal(new byte[4096], await kit.Read("lvs/s", 2 * Cluster + 4096, 4096)); // not the one after it
        Assert.Equal(first, await kit.Read("lvs/t", 2 * Cluster, 4096));
        Assert.Equal(second, await kit.Read("lvs/t", 2 * Cluster + 4096, 4096));
    }

    [Fact]
    public async Task ResizeAndReadOnlyAreSeenByTheFastPath()
    {
        await using var kit = new LvolKit();
        kit.Bdevs.Register(new MallocBdev("M0", 16 * MiB / 512, 512));
        var lvol = await CreateLvol(kit, "M0", "t");
        await using var module = await ModuleProbe.Hold(kit, lvol);

        await kit.Call("bdev_lvol_resize", new { name = "lvs/t", size_in_mib = 2 });
        var data = GoldenImages.Pattern("G", 0, 4096);
        Assert.True(await kit.Write("lvs/t", (ulong)(MiB + (3 * Cluster)), data)); // a grown thick lvol's new cluster
        Assert.Equal(data, await kit.Read("lvs/t", (ulong)(MiB + (3 * Cluster)), 4096));
        Assert.Equal(0, await module.Ios());

        await kit.Call("bdev_lvol_resize", new { name = "lvs/t", size_in_mib = 1 });
        using (var desc = kit.Bdevs.Open("lvs/t", true))
        using (var buf = new AlignedBuffer(4096))
        {
            var iov = new[] { buf.ToIoVec() };
            var (rc, _) = await kit.Io(desc, (ch, cb) => ch.Read(desc, iov, (ulong)(MiB + (3 * Cluster)) / 512, 8, cb, null));
            Assert.Equal(-Errno.EINVAL, rc); // past the shrunk end
        }

        await kit.Call("bdev_lvol_set_read_only", new { name = "lvs/t" });
        Assert.False(await kit.Write("lvs/t", 0, data));
        Assert.Equal(new byte[4096], await kit.Read("lvs/t", 0, 4096));
        Assert.Equal(0, await module.Ios()); // the read was still resolved in place
    }

    [Fact]
    public async Task QosOnTheLvolStillThrottlesResolvedIo()
    {
        await using var kit = new LvolKit();
        kit.Bdevs.Register(new MallocBdev("M0", 16 * MiB / 512, 512));
        var lvol = await CreateLvol(kit, "M0", "t");
        await using var module = await ModuleProbe.Hold(kit, lvol);
        await kit.Call("bdev_set_qos_limit", new { name = "lvs/t", rw_ios_per_sec = 1000 });
        using var desc = kit.Bdevs.Open("lvs/t", true);
        using var buf = new AlignedBuffer(4096);
        const int n = 200;
        var sw = System.Diagnostics.Stopwatch.StartNew();
        var loop = new IoLoop(desc, [buf.ToIoVec()], 2048);
        await kit.Main.InvokeAsync(async () =>
        {
            long b = await loop.Run(n, 16);
            loop.Release();
            return b;
        });
        sw.Stop();
        Assert.Equal(0, await module.Ios());
        Assert.True(sw.Elapsed >= TimeSpan.FromMilliseconds(150), $"{n} I/Os under a 1000 IOPS limit took {sw.Elapsed.TotalMilliseconds} ms");
        Assert.Equal(n, lvol.GetStats().NumReadOps + lvol.GetStats().NumWriteOps);
    }

    [Fact]
    public async Task AFullyAllocatedThinLvolsFastPathAllocatesNothingPerIo()
    {
        await using var kit = new LvolKit();
        kit.Bdevs.Register(new MallocBdev("M0", 16 * MiB / 512, 512));
        var lvol = await CreateLvol(kit, "M0", "thin", thin: true);
        for (int c = 0; c < MiB / Cluster; c++)
        {
            Assert.True(await kit.Write("lvs/thin", (ulong)(c * Cluster), new byte[4096]));
        }

        await using var module = await ModuleProbe.Hold(kit, lvol);
        using var desc = kit.Bdevs.Open("lvs/thin", write: true);
        using var buf = new AlignedBuffer(4096);
        var loop = new IoLoop(desc, [buf.ToIoVec()], 2048);
        long bytes = await kit.Main.InvokeAsync(async () =>
        {
            long b = await loop.SteadyStateAllocation(20_000, 100_000, 32);
            loop.Release();
            return b;
        });
        Assert.True(bytes < 1000, $"{bytes} bytes allocated over 100k thin lvol I/Os");
        Assert.Equal(0, await module.Ios());
    }

    private static async Task WaitFor(Func<Task<bool>> condition)
    {
        var until = DateTime.UtcNow + TimeSpan.FromSeconds(30);
        while (!await condition())
        {
            Assert.True(DateTime.UtcNow < until, "timed out waiting");
            await Task.Delay(5);
        }
    }

    /// <summary>Holds the main reactor's lvstore channel (so its count lives as long as the test) and reads how
    /// many I/Os came to the lvol module's Submit there.</summary>
    /// <summary>An lvstore "lvs" (cluster <see cref="Cluster"/>) on <paramref name="baseName"/> and a 1 MiB lvol <paramref name="name"/> in it.</summary>
    private static async Task<LvolBdev> CreateLvol(LvolKit kit, string baseName, string name, bool thin = false)
    {
        await kit.Call("bdev_lvol_create_lvstore", new { bdev_name = baseName, lvs_name = "lvs", cluster_sz = Cluster });
        await kit.Call("bdev_lvol_create", new { lvs_name = "lvs", lvol_name = name, size_in_mib = 1, thin_provision = thin });
        return (LvolBdev)kit.Bdevs.Find("lvs/" + name)!;
    }

    private sealed class ModuleProbe : IAsyncDisposable
    {
        private readonly Reactor _reactor;
        private readonly IoChannel _channel;
        private readonly long _start;

        private ModuleProbe(Reactor reactor, IoChannel channel)
        {
            _reactor = reactor;
            _channel = channel;
            _start = ((LvsChannel)channel.Context).ModuleIos;
        }

        public static Task<ModuleProbe> Hold(LvolKit kit, LvolBdev lvol) =>
            kit.Main.InvokeAsync(() => new ModuleProbe(kit.Main, kit.Main.GetIoChannel(lvol.Store.IoDevice)));

        public Task<int> Ios() => _reactor.InvokeAsync(() => (int)(((LvsChannel)_channel.Context).ModuleIos - _start));

        public async ValueTask DisposeAsync() => await _reactor.InvokeAsync(_channel.Release);
    }

    /// <summary>A RAM model of a base module that accepts forwarded I/O and can hold forwarded I/O (another bdev's)
    /// until <see cref="ReleaseHeld"/>; its own I/O (the blobstore's metadata) is never held.</summary>
    private sealed class HoldingBdev(string name, ulong blocks) : Bdev.Bdev(name, "Holding", 512, blocks)
    {
        private readonly List<BdevIo> _held = [];
        private readonly byte[] _data = new byte[blocks * 512];

        public volatile bool HoldForwarded;

        public int HeldCount
        {
            get
            {
                lock (_held)
                {
                    return _held.Count;
                }
            }
        }

        public override bool AcceptsForwardedIo => true;

        public override bool SupportsIoType(BdevIoType type) => type is BdevIoType.Read or BdevIoType.Write or BdevIoType.Reset;

        protected override IoChannel GetModuleChannel(Reactor reactor) => reactor.GetIoChannel(StatelessDevice.Instance);

        protected override void Submit(IoChannel moduleChannel, BdevIo io)
        {
            if (HoldForwarded && io.Bdev != this)
            {
                lock (_held)
                {
                    _held.Add(io);
                }

                return;
            }

            Do(io);
        }

        public void ReleaseHeld()
        {
            BdevIo[] held;
            lock (_held)
            {
                held = [.. _held];
                _held.Clear();
            }

            foreach (var io in held)
            {
                Do(io);
            }
        }

        private void Do(BdevIo io)
        {
            int at = checked((int)(io.OffsetBlocks * 512)), n = checked((int)(io.NumBlocks * 512));
            switch (io.Type)
            {
                case BdevIoType.Read:
                    IoVecs.CopyFrom(_data.AsSpan(at, n), io.Iovs);
                    break;
                case BdevIoType.Write:
                    IoVecs.CopyTo(io.Iovs, 0, _data.AsSpan(at, n));
                    break;
            }

            io.Complete(BdevIoStatus.Success);
        }
    }
}
