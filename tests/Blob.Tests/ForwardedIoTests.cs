using VhostBackend.Bdev;
using VhostBackend.BdevMalloc;
using VhostBackend.Platform;
using VhostBackend.Reactors;

namespace VhostBackend.Blob.Tests;

/// <summary>
/// The lvol fast path hands its caller's I/O to the base in place (<see cref="BdevChannel.TryForward"/>): no second
/// bdev I/O, no allocation. The probe base (a test model of a module that opted in) records whose I/O it was given.
/// </summary>
public class ForwardedIoTests
{
    private const int MiB = 1024 * 1024;
    private const int Cluster = 64 * 1024;

    [Fact]
    public async Task ThickLvolReadsAndWritesReachTheBaseAsTheCallersOwnIoAndNoMemoryIsRetried()
    {
        await using var kit = new LvolKit();
        var probe = new ProbeBdev("P0", 16 * MiB / 512);
        kit.Bdevs.Register(probe);
        await kit.Call("bdev_lvol_create_lvstore", new { bdev_name = "P0", lvs_name = "lvs", cluster_sz = Cluster });
        await kit.Call("bdev_lvol_create", new { lvs_name = "lvs", lvol_name = "t", size_in_mib = 1 });
        var lvol = (BdevLvol.LvolBdev)kit.Bdevs.Find("lvs/t")!;
        Assert.True(probe.Forwarded == 0, "nothing forwarded before lvol I/O");

        var data = GoldenImages.Pattern("F", 0, 8192);
        Assert.True(await kit.Write("lvs/t", 3 * Cluster + 4096, data));
        Assert.Equal(1, probe.Forwarded); // one submit to the base, of the lvol's own I/O
        Assert.Equal(data, await kit.Read("lvs/t", 3 * Cluster + 4096, 8192));
        Assert.Equal(2, probe.Forwarded);
        ulong onBase = lvol.Lvol.Blob.ClusterAt(3) * (ulong)Cluster + 4096;
        Assert.Equal(data, probe.Data.AsSpan((int)onBase, 8192).ToArray()); // translated to the cluster's place

        // A write the base answers NoMemory is retried through the lvol (translated again, counted again) and
        // completes; its quiesce count is given back, so a snapshot's drain does not wait for it forever.
        probe.NoMemoryLeft = 1;
        var data2 = GoldenImages.Pattern("G", 0, 4096);
        Assert.True(await kit.Write("lvs/t", 5 * Cluster, data2));
        Assert.Equal(4, probe.Forwarded);
        Assert.Equal(data2, await kit.Read("lvs/t", 5 * Cluster, 4096));
        await kit.Call("bdev_lvol_snapshot", new { lvol_name = "lvs/t", snapshot_name = "s" }).WaitAsync(TimeSpan.FromSeconds(60));
        Assert.Equal(data, await kit.Read("lvs/s", 3 * Cluster + 4096, 8192));

        // The base module never saw the lvol's per-I/O state (the layer saved it and gave it back at completion).
        Assert.Equal(0, probe.ModuleStateMismatches);
    }

    [Fact]
    public async Task ThickLvolFastPathAllocatesNothingPerIo()
    {
        await using var kit = new LvolKit();
        kit.Bdevs.Register(new MallocBdev("M0", 16 * MiB / 512, 512));
        await kit.Call("bdev_lvol_create_lvstore", new { bdev_name = "M0", lvs_name = "lvs", cluster_sz = Cluster });
        await kit.Call("bdev_lvol_create", new { lvs_name = "lvs", lvol_name = "t", size_in_mib = 1 });
        using var desc = kit.Bdevs.Open("lvs/t", write: true);
        using var buf = new AlignedBuffer(4096);
        var loop = new IoLoop(desc, [buf.ToIoVec()], 2048);
        long bytes = await kit.Main.InvokeAsync(async () =>
        {
            long b = await loop.SteadyStateAllocation(20_000, 100_000, 32);
            loop.Release(); // on the reactor that owns the channel
            return b;
        });
        // A per-I/O allocation of even 8 bytes would be 800 KB here.
        Assert.True(bytes < 1000, $"{bytes} bytes allocated over 100k lvol I/Os");
    }

    /// <summary>A RAM model of a base module that accepts forwarded I/O; it clobbers the module state fields, as a
    /// module may, so the test sees the lvol get its own back.</summary>
    private sealed class ProbeBdev(string name, ulong blocks) : Bdev.Bdev(name, "Probe", 512, blocks)
    {
        public byte[] Data { get; } = new byte[blocks * 512];

        public int Forwarded;
        public int NoMemoryLeft;
        public int ModuleStateMismatches;

        public override bool AcceptsForwardedIo => true;

        public override bool SupportsIoType(BdevIoType type) => type is BdevIoType.Read or BdevIoType.Write or BdevIoType.Reset;

        protected override IoChannel GetModuleChannel(Reactor reactor) => reactor.GetIoChannel(StatelessDevice.Instance);

        protected override void Submit(IoChannel moduleChannel, BdevIo io)
        {
            if (io.Bdev != this)
            {
                Forwarded++;
                if (io.ModuleContext != null || io.ModuleTag != 0)
                {
                    ModuleStateMismatches++; // the forwarder's state must not leak into the base module's fields
                }
            }

            io.ModuleContext = this;
            io.ModuleTag = 77;
            if (NoMemoryLeft > 0)
            {
                NoMemoryLeft--;
                io.Complete(BdevIoStatus.NoMemory);
                return;
            }

            int at = checked((int)(io.OffsetBlocks * 512)), n = checked((int)(io.NumBlocks * 512));
            switch (io.Type)
            {
                case BdevIoType.Read:
                    IoVecs.CopyFrom(Data.AsSpan(at, n), io.Iovs);
                    break;
                case BdevIoType.Write:
                    IoVecs.CopyTo(io.Iovs, 0, Data.AsSpan(at, n));
                    break;
            }

            io.Complete(BdevIoStatus.Success);
        }
    }
}
