using VhostBackend.Bdev;
using VhostBackend.BdevMalloc;

namespace VhostBackend.Blob.Tests;

/// <summary>Inflate/decouple copy cluster by cluster without quiescing the blob for the whole copy (SPDK's
/// touch-per-cluster), with the blob locked against conflicting operations (-EBUSY); unmap and write zeroes pass
/// to the device as SPDK's blob layer does (no zeroes written for an unmap when the device takes unmap).</summary>
public class CopyUpAndUnmapTests
{
    private const int MiB = 1024 * 1024;
    private const int Cluster = 64 * 1024;

    /// <summary>A RAM device whose whole-cluster writes wait on a gate while armed (a model of a slow disk).</summary>
    private sealed class GatedDevice(MemoryBlobDevice inner) : IBlobDevice
    {
        public SemaphoreSlim Gate { get; } = new(0);

        public volatile bool Armed;

        public volatile int Waiting;

        public int BlockSize => inner.BlockSize;

        public ulong BlockCount => inner.BlockCount;

        public ValueTask ReadAsync(ulong offset, Memory<byte> buffer) => inner.ReadAsync(offset, buffer);

        public async ValueTask WriteAsync(ulong offset, ReadOnlyMemory<byte> buffer)
        {
            if (Armed && buffer.Length == Cluster)
            {
                Interlocked.Increment(ref Waiting);
                Assert.True(await Gate.WaitAsync(TimeSpan.FromSeconds(30)), "gate never opened");
                Interlocked.Decrement(ref Waiting);
            }
            await inner.WriteAsync(offset, buffer);
        }

        public ValueTask WriteZeroesAsync(ulong offset, ulong length) => inner.WriteZeroesAsync(offset, length);

        public ValueTask FlushAsync() => inner.FlushAsync();
    }

    private static async Task WaitFor(Func<bool> condition, string what)
    {
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(20);
        while (!condition())
        {
            Assert.True(DateTime.UtcNow < deadline, what);
            await Task.Delay(5);
        }
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task InflateAndDecoupleDoNotQuiesceTheBlobForTheCopyAndLockItAgainstConflicts(bool decouple)
    {
        var dev = new GatedDevice(new MemoryBlobDevice(512, 16 * MiB / 512));
        var lvs = await LvolStore.CreateAsync(dev, "lvs", Cluster);
        var origin = await lvs.CreateLvolAsync("o", 4 * Cluster, thinProvision: true);
        await lvs.WriteAsync(origin, 0, GoldenImages.Pattern("P", 0, 4 * Cluster));
        var snap = await lvs.SnapshotAsync(origin, "s");
        var clone = await lvs.CloneAsync(snap, "c");
        var own = GoldenImages.Pattern("C", 3 * Cluster, Cluster);
        await lvs.WriteAsync(clone, 3 * Cluster, own); // the clone's own cluster 3
        var bs = lvs.BlobStore;

        dev.Armed = true;
        var op = decouple ? lvs.DecoupleParentAsync(clone) : lvs.InflateAsync(clone);
        await WaitFor(() => dev.Waiting == 1, "the copy of the first cluster never started");
        // Mid-copy: the blob is not quiesced; a write to its allocated cluster completes at once.
        Assert.False(clone.Blob.IsFrozen);
        var small = GoldenImages.Pattern("W", 3 * Cluster, 4096);
        await lvs.WriteAsync(clone, 3 * Cluster, small).AsTask().WaitAsync(TimeSpan.FromSeconds(5));
        Assert.Equal(3, clone.Blob.CopyProgress!.Value.Total);

        // Conflicting operations queued behind the cluster being copied run between two cluster copies and fail
        // with EBUSY (the serializer is not held across the copy).
        var snapTry = lvs.SnapshotAsync(clone, "s2");
        var resizeTry = bs.ResizeAsync(clone.Blob.Id, 2);
        var deleteParent = bs.DeleteBlobAsync(snap.Blob.Id);
        var again = bs.InflateAsync(clone.Blob.Id);
        var other = lvs.CreateLvolAsync("x", Cluster, thinProvision: true); // unrelated: goes through mid-copy
        dev.Gate.Release(1);
        Assert.Equal(Errno.EBUSY, (await Assert.ThrowsAsync<BlobException>(() => snapTry)).Errno);
        Assert.Equal(Errno.EBUSY, (await Assert.ThrowsAsync<BlobException>(() => resizeTry)).Errno);
        Assert.Equal(Errno.EBUSY, (await Assert.ThrowsAsync<BlobException>(() => deleteParent)).Errno);
        Assert.Equal(Errno.EBUSY, (await Assert.ThrowsAsync<BlobException>(() => again)).Errno);
        await other.WaitAsync(TimeSpan.FromSeconds(5));
        Assert.False(op.IsCompleted);
        Assert.True(bs.IsLocked(snap.Blob.Id));

        dev.Gate.Release(10);
        dev.Armed = false;
        await op.WaitAsync(TimeSpan.FromSeconds(30));
        Assert.False(bs.IsLocked(snap.Blob.Id));
        Assert.False(clone.IsClone);
        Assert.Null(clone.Blob.CopyProgress);
        var expect = GoldenImages.Pattern("P", 0, 4 * Cluster);
        own.CopyTo(expect, 3 * Cluster);
        small.CopyTo(expect, 3 * Cluster);
        var all = new byte[4 * Cluster];
        await lvs.ReadAsync(clone, 0, all);
        Assert.Equal(GoldenImages.Sha256(expect), GoldenImages.Sha256(all));
        Assert.Null(bs.CheckMasks());
        // Now the snapshot can go.
        await bs.DeleteBlobAsync(snap.Blob.Id);

        // The result survives a reload.
        var reloaded = await LvolStore.LoadAsync(dev);
        var c2 = reloaded.FindByName("c")!;
        Assert.False(c2.IsClone);
        await reloaded.ReadAsync(c2, 0, all);
        Assert.Equal(GoldenImages.Sha256(expect), GoldenImages.Sha256(all));
    }

    [Fact]
    public async Task UnmapOnAThickBlobUnmapsTheDeviceAndWritesNoZeroes()
    {
        var dev = new MemoryBlobDevice(512, 16 * MiB / 512);
        var lvs = await LvolStore.CreateAsync(dev, "lvs", Cluster);
        // The store's data region and a thick lvol's clusters are cleared by unmap (SPDK's default clear method).
        Assert.Equal(0, dev.ZeroedBytes - (long)lvs.BlobStore.SuperBlockCopy.MdStart * 4096 - ((long)lvs.BlobStore.SuperBlockCopy.MdLen * 4096) + 4096);
        Assert.True(dev.UnmappedBytes > 14 * MiB, $"{dev.UnmappedBytes} bytes unmapped at init");
        long beforeThick = dev.UnmappedBytes;
        var thick = await lvs.CreateLvolAsync("t", 4 * Cluster, thinProvision: false);
        Assert.Equal(4 * Cluster, dev.UnmappedBytes - beforeThick);
        await lvs.WriteAsync(thick, 0, GoldenImages.Pattern("T", 0, 4 * Cluster));
        var bs = lvs.BlobStore;
        long zeroed = dev.ZeroedBytes, unmappedBefore = dev.UnmappedBytes;
        int allocated = thick.Blob.AllocatedClusters;

        await bs.UnmapAsync(thick.Blob.Id, Cluster / 2, 2 * Cluster);
        Assert.Equal(2 * Cluster, dev.UnmappedBytes - unmappedBefore);
        Assert.Equal(zeroed, dev.ZeroedBytes);
        Assert.Equal(allocated, thick.Blob.AllocatedClusters); // clusters stay allocated (SPDK: thick stays thick)
        var all = new byte[4 * Cluster];
        await lvs.ReadAsync(thick, 0, all);
        var expect = GoldenImages.Pattern("T", 0, 4 * Cluster);
        expect.AsSpan(Cluster / 2, 2 * Cluster).Clear(); // the model's unmap zeroes
        Assert.Equal(GoldenImages.Sha256(expect), GoldenImages.Sha256(all));

        // Write zeroes on allocated clusters: the device's write zeroes, not data writes.
        await bs.WriteZeroesAsync(thick.Blob.Id, 3 * Cluster, Cluster);
        Assert.Equal(zeroed + Cluster, dev.ZeroedBytes);

        // A clone: unmap leaves its unallocated clusters alone (it still reads the snapshot there, as in SPDK);
        // write zeroes allocates them with zeroes.
        var snap = await lvs.SnapshotAsync(thick, "s");
        var clone = await lvs.CloneAsync(snap, "c");
        long unmapped = dev.UnmappedBytes;
        await bs.UnmapAsync(clone.Blob.Id, 0, Cluster);
        Assert.Equal(unmapped, dev.UnmappedBytes);
        var first = new byte[Cluster];
        await lvs.ReadAsync(clone, 0, first);
        Assert.Equal(GoldenImages.Sha256(expect.AsSpan(0, Cluster).ToArray()), GoldenImages.Sha256(first));
        await bs.WriteZeroesAsync(clone.Blob.Id, 0, Cluster);
        Assert.Equal(1, clone.Blob.AllocatedClusters);
        await lvs.ReadAsync(clone, 0, first);
        Assert.All(first, x => Assert.Equal(0, x));
        Assert.Null(bs.CheckMasks());
    }

    [Fact]
    public async Task LvolBdevUnmapGoesToTheBaseAsUnmap()
    {
        await using var kit = new LvolKit();
        var malloc = new MallocBdev("M0", 32 * MiB / 512, 512);
        kit.Bdevs.Register(malloc);
        await kit.Call("bdev_lvol_create_lvstore", new { bdev_name = "M0", lvs_name = "lvs", cluster_sz = MiB });
        var name = (await kit.Call("bdev_lvol_create", new { lvs_name = "lvs", lvol_name = "t", size_in_mib = 4 }))!.GetValue<string>();
        Assert.True(await kit.Write(name, 0, GoldenImages.Pattern("U", 0, 4 * MiB)));
        var before = malloc.GetStats();

        using (var desc = kit.Bdevs.Open(name, true))
        {
            // Within one cluster (fast path) and over three clusters (through the blobstore).
            var (rc, ok) = await kit.Io(desc, (ch, cb) => ch.Unmap(desc, 8, 16, cb, null));
            Assert.True(rc == 0 && ok);
            (rc, ok) = await kit.Io(desc, (ch, cb) => ch.Unmap(desc, MiB / 512 - 8, 2 * MiB / 512 + 16, cb, null));
            Assert.True(rc == 0 && ok);
        }
        var after = malloc.GetStats();
        Assert.Equal(before.NumWriteOps, after.NumWriteOps);
        Assert.True(after.NumUnmapOps - before.NumUnmapOps >= 4, $"{after.NumUnmapOps - before.NumUnmapOps} unmaps reached the base");
        Assert.Equal((16 + (2 * MiB / 512) + 16) * 512L, after.BytesUnmapped - before.BytesUnmapped);
        var data = await kit.ReadAll(name);
        var expect = GoldenImages.Pattern("U", 0, 4 * MiB);
        expect.AsSpan(8 * 512, 16 * 512).Clear();
        expect.AsSpan(MiB - (8 * 512), 2 * MiB + (16 * 512)).Clear();
        Assert.Equal(GoldenImages.Sha256(expect), GoldenImages.Sha256(data));
        Assert.True(kit.Bdevs.Find(name)!.SupportsIoType(BdevIoType.Unmap));
    }
}

/// <summary>The lvstore's base bdev is hot-removed: its lvols are hot-removed (openers get the remove event),
/// the store is unloaded and the base released, as SPDK's vbdev_lvs_hotremove_cb does.</summary>
public class LvolBaseHotRemoveTests
{
    private const int MiB = 1024 * 1024;

    [Fact]
    public async Task RemovingTheBaseHotRemovesTheLvolsAndTheStoreComesBackCleanFromTheSameMedium()
    {
        var path = Path.Combine(Path.GetTempPath(), $"lvoltest-{Guid.NewGuid():N}.img");
        VhostBackend.BdevFile.FileBdev.CreateSparseIfMissing(path, 32 * MiB);
        try
        {
            await using var kit = new LvolKit();
            kit.Bdevs.Register(VhostBackend.BdevFile.FileBdev.Open("aio0", path, 512, false, null, "bdev_aio_create"));
            await kit.Call("bdev_wait_for_examine");
            await kit.Call("bdev_lvol_create_lvstore", new { bdev_name = "aio0", lvs_name = "lvs", cluster_sz = MiB });
            var a = (await kit.Call("bdev_lvol_create", new { lvs_name = "lvs", lvol_name = "a", size_in_mib = 4, thin_provision = true }))!.GetValue<string>();
            await kit.Call("bdev_lvol_create", new { lvs_name = "lvs", lvol_name = "b", size_in_mib = 2 });
            Assert.True(await kit.Write(a, 0, GoldenImages.Pattern("H", 0, 64 * 1024)));
            await kit.Call("bdev_lvol_snapshot", new { lvol_name = "lvs/a", snapshot_name = "s" });

            // An opener of lvol a (as a vhost controller is) hears the remove and closes.
            var removed = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            BdevDesc? desc = null;
            desc = kit.Bdevs.Open("lvs/a", true, (type, _, _) =>
            {
                if (type == BdevEventType.Remove)
                {
                    desc!.Dispose();
                    removed.TrySetResult();
                }
            });

            var baseBdev = kit.Bdevs.Find("aio0")!;
            await kit.Main.InvokeAsync(async () =>
            {
                await kit.Bdevs.UnregisterAsync(baseBdev, TimeSpan.FromSeconds(20));
                return 0;
            }).WaitAsync(TimeSpan.FromSeconds(30));
            await removed.Task.WaitAsync(TimeSpan.FromSeconds(5));
            Assert.Null(kit.Bdevs.Find("aio0"));
            Assert.Null(kit.Bdevs.Find("lvs/a"));
            Assert.Null(kit.Bdevs.Find("lvs/b"));
            Assert.Null(kit.Bdevs.Find("lvs/s"));
            Assert.Empty((await kit.Call("bdev_lvol_get_lvstores"))!.AsArray());
            Assert.Equal(-19, (await kit.CallFails("bdev_lvol_create", new { lvs_name = "lvs", lvol_name = "c", size_in_mib = 1 })).Code);

            // The medium comes back: examine finds the store, unloaded cleanly (nothing to recover), all lvols.
            kit.Bdevs.Register(VhostBackend.BdevFile.FileBdev.Open("aio0", path, 512, false, null, "bdev_aio_create"));
            await kit.Call("bdev_wait_for_examine");
            var store = Assert.Single(kit.Lvol.Stores);
            Assert.False(store.Store.BlobStore.LoadReport.Recovered);
            Assert.Equal(["a", "b", "s"], (await kit.Call("bdev_lvol_get_lvols"))!.AsArray().Select(l => l!["name"]!.GetValue<string>()).Order());
            Assert.Equal(GoldenImages.Sha256(GoldenImages.Pattern("H", 0, 64 * 1024)), GoldenImages.Sha256(await kit.Read("lvs/s", 0, 64 * 1024)));
        }
        finally
        {
            File.Delete(path);
        }
    }
}
