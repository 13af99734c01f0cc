using VhostBackend.BdevMalloc;

namespace VhostBackend.Blob.Tests;

/// <summary>The lvol bdev's fast path (writes counted per reactor, drained by message for a snapshot) and the
/// first-write path (only the needed bytes written, the rest of a cluster with nothing under it zeroed).</summary>
public class FastPathTests
{
    private const int MiB = 1024 * 1024;
    private const int Cluster = 64 * 1024;

    [Fact]
    public async Task SnapshotThroughTheModuleWaitsForFastPathWritesOnEveryReactor()
    {
        await using var kit = new LvolKit();
        kit.Bdevs.Register(new MallocBdev("M0", 32 * MiB / 512, 512));
        await kit.Call("bdev_lvol_create_lvstore", new { bdev_name = "M0", lvs_name = "lvs", cluster_sz = Cluster });
        await kit.Call("bdev_lvol_create", new { lvs_name = "lvs", lvol_name = "v", size_in_mib = 2 }); // thick: every write is a fast-path one
        const int blocks = 2 * MiB / 4096, half = blocks / 2;
        var started = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        int startedWriters = 0;
        async Task Writer(int first, Reactors.Reactor on)
        {
            var buf = new byte[4096];
            for (int i = first; i < first + half; i++)
            {
                buf.AsSpan().Fill((byte)(1 + (i % 250)));
                Assert.True(await kit.Write("lvs/v", (ulong)i * 4096, buf, on), $"write of block {i}");
                if (i == first + 32 && Interlocked.Increment(ref startedWriters) == 2)
                {
                    started.SetResult();
                }
            }
        }
        var writers = Task.WhenAll(Writer(0, kit.Runtime.Reactors[0]), Writer(half, kit.Runtime.Reactors[^1]));
        await started.Task.WaitAsync(TimeSpan.FromSeconds(60));
        await kit.Call("bdev_lvol_snapshot", new { lvol_name = "lvs/v", snapshot_name = "s" }).WaitAsync(TimeSpan.FromSeconds(60));
        await writers.WaitAsync(TimeSpan.FromSeconds(120));

        // The lvol holds every write; the snapshot, per writer, a prefix of its writes (none lost, none half in).
        var all = await kit.ReadAll("lvs/v");
        var snap = await kit.ReadAll("lvs/s");
        for (int i = 0; i < blocks; i++)
        {
            Assert.True(all.AsSpan(i * 4096, 4096).IndexOfAnyExcept((byte)(1 + (i % 250))) < 0, $"block {i} of the lvol");
        }
        foreach (int first in new[] { 0, half })
        {
            int prefix = first;
            while (prefix < first + half && snap[prefix * 4096] != 0)
            {
                prefix++;
            }
            Assert.InRange(prefix, first + 33, first + half);
            for (int i = first; i < first + half; i++)
            {
                byte want = i < prefix ? (byte)(1 + (i % 250)) : (byte)0;
                Assert.True(snap.AsSpan(i * 4096, 4096).IndexOfAnyExcept(want) < 0, $"block {i} of the snapshot (prefix to {prefix})");
            }
        }
    }

    [Fact]
    public async Task TheIoClusterMapIsTheBlobsMapAndEmptyWhileFrozen()
    {
        var dev = new MemoryBlobDevice(512, 16 * MiB / 512);
        var lvs = await LvolStore.CreateAsync(dev, "lvs", Cluster);
        var v = await lvs.CreateLvolAsync("v", 4 * Cluster, thinProvision: true);
        var b = v.Blob;
        Assert.Same(b.Clusters, b.IoClusters.Value);
        Assert.Equal(new uint[4], b.IoClusters.Value);

        await lvs.WriteAsync(v, Cluster, GoldenImages.Pattern("V", Cluster, 4096)); // a first write: set in place
        Assert.Same(b.Clusters, b.IoClusters.Value);
        Assert.NotEqual(0u, b.IoClusters.Value![1]);

        await lvs.ResizeLvolAsync(v, 8 * Cluster); // a new array, published
        Assert.Same(b.Clusters, b.IoClusters.Value);
        Assert.Equal(8, b.IoClusters.Value!.Length);

        // A snapshot freezes the origin: nothing is mapped for I/O while it drains, and its new map afterwards.
        uint moved = b.ClusterAt(1);
        int? lengthWhileFrozen = null;
        lvs.BlobStore.DrainFastWrites = frozen =>
        {
            if (frozen == b)
            {
                lengthWhileFrozen = frozen.IoClusters.Value!.Length;
            }
            return Task.CompletedTask;
        };
        var snap = await lvs.SnapshotAsync(v, "s");
        Assert.Equal(0, lengthWhileFrozen);
        Assert.False(b.IsFrozen);
        Assert.Same(b.Clusters, b.IoClusters.Value);
        Assert.Equal(new uint[8], b.IoClusters.Value); // the origin's clusters now belong to the snapshot
        Assert.Same(snap.Blob.Clusters, snap.Blob.IoClusters.Value);
        Assert.Equal(moved, snap.Blob.IoClusters.Value![1]);

        // A store loaded from the device publishes what it read.
        await lvs.UnloadAsync();
        var again = await LvolStore.LoadAsync(dev);
        var s2 = again.Lvols.Single(l => l.Name == "s").Blob;
        Assert.Same(s2.Clusters, s2.IoClusters.Value);
        Assert.Equal(moved, s2.IoClusters.Value![1]);
    }

    [Fact]
    public async Task AFirstWriteWithNothingUnderTheClusterWritesItsBytesAndZeroesTheRest()
    {
        var dev = new MemoryBlobDevice(512, 16 * MiB / 512);
        var lvs = await LvolStore.CreateAsync(dev, "lvs", Cluster, clearMethod: "none");
        var old = await lvs.CreateLvolAsync("old", Cluster, thinProvision: false, clearMethod: 1); // clear method none
        await lvs.WriteAsync(old, 0, GoldenImages.Pattern("O", 0, Cluster));
        uint freed = old.Blob.ClusterAt(0);
        await lvs.DeleteLvolAsync(old); // its data stays on the device (clear method none)

        var thin = await lvs.CreateLvolAsync("t", 2 * Cluster, thinProvision: true);
        long zeroedBefore = dev.ZeroedBytes;
        var data = GoldenImages.Pattern("T", 8192, 4096);
        await lvs.WriteAsync(thin, 8192, data);
        Assert.Equal(freed, thin.Blob.ClusterAt(0)); // the old lvol's cluster, still holding its pattern before the write
        Assert.Equal(Cluster - 4096, dev.ZeroedBytes - zeroedBefore); // the rest zeroed by the device, no buffer of zeroes
        var got = new byte[Cluster];
        await lvs.ReadAsync(thin, 0, got);
        var want = new byte[Cluster];
        data.CopyTo(want, 8192);
        Assert.Equal(GoldenImages.Sha256(want), GoldenImages.Sha256(got));
        var onDevice = dev.Data.AsSpan((int)(freed * (ulong)Cluster), Cluster);
        Assert.True(onDevice.SequenceEqual(want), "the device cluster holds the write and zeroes, not the old lvol's data");

        // A clone's first write still merges its parent's data.
        var snap = await lvs.SnapshotAsync(thin, "s");
        var clone = await lvs.CloneAsync(snap, "c");
        await lvs.WriteAsync(clone, 0, GoldenImages.Pattern("C", 0, 4096));
        await lvs.ReadAsync(clone, 0, got);
        GoldenImages.Pattern("C", 0, 4096).CopyTo(want, 0);
        Assert.Equal(GoldenImages.Sha256(want), GoldenImages.Sha256(got));
    }
}
