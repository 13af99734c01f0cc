using System.Text.Json.Nodes;
using VhostBackend.BdevMalloc;

namespace VhostBackend.Blob.Tests;

/// <summary>Shallow copy (SPDK v24.05's spdk_bs_blob_shallow_copy and bdev_lvol_start/check_shallow_copy): only
/// the lvol's own allocated clusters reach the destination, at their offsets; the lvol must be read-only; the
/// destination big enough; the lvol is locked while the copy runs.</summary>
public class ShallowCopyTests
{
    private const int MiB = 1024 * 1024;
    private const int Cluster = 64 * 1024;

    /// <summary>A RAM destination whose writes wait on a gate while armed (a model of a slow destination).</summary>
    private sealed class GatedDevice(MemoryBlobDevice inner) : IBlobDevice
    {
        public SemaphoreSlim Gate { get; } = new(0);

        public volatile bool Armed;

        public volatile int Waiting;

        public MemoryBlobDevice Inner => inner;

        public int BlockSize => inner.BlockSize;

        public ulong BlockCount => inner.BlockCount;

        public ValueTask ReadAsync(ulong offset, Memory<byte> buffer) => inner.ReadAsync(offset, buffer);

        public async ValueTask WriteAsync(ulong offset, ReadOnlyMemory<byte> buffer)
        {
            if (Armed)
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

    /// <summary>A snapshot (clusters 0..3 written) and its clone with its own clusters 1 and 3, made read-only.</summary>
    private static async Task<(LvolStore Lvs, Lvol Snap, Lvol Clone)> SnapshotAndClone(IBlobDevice dev)
    {
        var lvs = await LvolStore.CreateAsync(dev, "lvs", Cluster);
        var origin = await lvs.CreateLvolAsync("o", 6 * Cluster, thinProvision: true);
        await lvs.WriteAsync(origin, 0, GoldenImages.Pattern("P", 0, 4 * Cluster));
        var snap = await lvs.SnapshotAsync(origin, "s");
        var clone = await lvs.CloneAsync(snap, "c");
        await lvs.WriteAsync(clone, 1 * Cluster, GoldenImages.Pattern("C", Cluster, 4096));
        await lvs.WriteAsync(clone, 3 * Cluster, GoldenImages.Pattern("C", 3 * Cluster, Cluster));
        await lvs.SetReadOnlyAsync(clone);
        return (lvs, snap, clone);
    }

    [Fact]
    public async Task CopiesOnlyTheLvolsOwnClustersAtTheirOffsets()
    {
        var (lvs, _, clone) = await SnapshotAndClone(new MemoryBlobDevice(512, 16 * MiB / 512));
        var dst = new MemoryBlobDevice(512, 8 * Cluster / 512);
        dst.Data.AsSpan().Fill(0xEE);
        var seen = new List<long>();
        long n = await lvs.BlobStore.ShallowCopyAsync(clone.Blob.Id, dst, seen.Add);
        Assert.Equal(2, n);
        Assert.Equal([1L, 2L], seen);

        var content = new byte[6 * Cluster];
        await lvs.ReadAsync(clone, 0, content);
        for (int c = 0; c < 8; c++)
        {
            var got = dst.Data.AsSpan(c * Cluster, Cluster);
            if (c is 1 or 3)
            {
                Assert.True(got.SequenceEqual(content.AsSpan(c * Cluster, Cluster)), $"cluster {c} is the clone's");
            }
            else
            {
                Assert.True(got.IndexOfAnyExcept((byte)0xEE) < 0, $"cluster {c} (the parent's or unallocated) is left alone");
            }
        }
        Assert.False(lvs.BlobStore.IsLocked(clone.Blob.Id));
        Assert.Null(clone.Blob.CopyProgress);
    }

    [Fact]
    public async Task RefusesAWritableLvolASmallDestinationAndABlockSizeThatDoesNotDivide()
    {
        var (lvs, _, clone) = await SnapshotAndClone(new MemoryBlobDevice(512, 16 * MiB / 512));
        var bs = lvs.BlobStore;
        var writable = await lvs.CreateLvolAsync("w", Cluster, thinProvision: false);
        var e = await Assert.ThrowsAsync<BlobException>(() => bs.ShallowCopyAsync(writable.Blob.Id, new MemoryBlobDevice(512, 16 * Cluster / 512)));
        Assert.Equal(Errno.EPERM, e.Errno);
        e = await Assert.ThrowsAsync<BlobException>(() => bs.ShallowCopyAsync(clone.Blob.Id, new MemoryBlobDevice(512, (6 * Cluster / 512) - 1)));
        Assert.Equal(Errno.EINVAL, e.Errno);
        e = await Assert.ThrowsAsync<BlobException>(() => bs.ShallowCopyAsync(clone.Blob.Id, new MemoryBlobDevice(4096, 16 * Cluster / 4096)));
        Assert.Equal(Errno.EINVAL, e.Errno);
        e = await Assert.ThrowsAsync<BlobException>(() => bs.ShallowCopyAsync(0xdead, new MemoryBlobDevice(512, 16 * Cluster / 512)));
        Assert.Equal(Errno.ENOENT, e.Errno);
        // A destination of exactly the lvol's size is enough; nothing stayed locked.
        Assert.Equal(2, await bs.ShallowCopyAsync(clone.Blob.Id, new MemoryBlobDevice(512, 6 * Cluster / 512)));
        Assert.False(bs.IsLocked(clone.Blob.Id));
    }

    [Fact]
    public async Task TheLvolIsLockedWhileTheCopyRunsAndReadsGoOn()
    {
        var (lvs, snap, clone) = await SnapshotAndClone(new MemoryBlobDevice(512, 16 * MiB / 512));
        var bs = lvs.BlobStore;
        var dst = new GatedDevice(new MemoryBlobDevice(512, 6 * Cluster / 512)) { Armed = true };
        var copy = bs.ShallowCopyAsync(clone.Blob.Id, dst);
        var deadline = DateTime.UtcNow.AddSeconds(20);
        while (dst.Waiting == 0)
        {
            Assert.True(DateTime.UtcNow < deadline, "the copy never started");
            await Task.Delay(5);
        }
        Assert.Equal(("shallow_copy", 0L, 2L), clone.Blob.CopyProgress!.Value);
        Assert.Equal(Errno.EBUSY, (await Assert.ThrowsAsync<BlobException>(() => bs.DeleteBlobAsync(clone.Blob.Id))).Errno);
        Assert.Equal(Errno.EBUSY, (await Assert.ThrowsAsync<BlobException>(() => bs.ShallowCopyAsync(clone.Blob.Id, new MemoryBlobDevice(512, 6 * Cluster / 512)))).Errno);
        var buf = new byte[Cluster];
        await lvs.ReadAsync(clone, 0, buf).AsTask().WaitAsync(TimeSpan.FromSeconds(5));
        Assert.False(copy.IsCompleted);

        dst.Armed = false;
        dst.Gate.Release(10);
        Assert.Equal(2, await copy.WaitAsync(TimeSpan.FromSeconds(30)));
        Assert.False(bs.IsLocked(clone.Blob.Id));
        await bs.DeleteBlobAsync(clone.Blob.Id);
        Assert.Null(bs.CheckMasks());
        Assert.NotNull(snap);
    }

    [Fact]
    public async Task RpcsStartAndCheckAsSpdk()
    {
        await using var kit = new LvolKit();
        kit.Bdevs.Register(new MallocBdev("M0", 32 * MiB / 512, 512));
        kit.Bdevs.Register(new MallocBdev("D0", 8 * MiB / 512, 512));
        kit.Bdevs.Register(new MallocBdev("Small", MiB / 512, 512));
        await kit.Call("bdev_lvol_create_lvstore", new { bdev_name = "M0", lvs_name = "lvs", cluster_sz = MiB });
        await kit.Call("bdev_lvol_create", new { lvs_name = "lvs", lvol_name = "v", size_in_mib = 4, thin_provision = true });
        var data = GoldenImages.Pattern("V", 2 * MiB, 64 * 1024);
        Assert.True(await kit.Write("lvs/v", 2 * MiB, data));

        // Params and names: SPDK's codes.
        var e = await kit.CallFails("bdev_lvol_start_shallow_copy", new { src_lvol_name = "lvs/v" });
        Assert.Equal(-32603, e.Code);
        e = await kit.CallFails("bdev_lvol_start_shallow_copy", new { src_lvol_name = "lvs/none", dst_bdev_name = "D0" });
        Assert.Equal(-19, e.Code);
        Assert.StartsWith("No such device: src_lvol_name: ", e.Message, StringComparison.Ordinal);
        e = await kit.CallFails("bdev_lvol_start_shallow_copy", new { src_lvol_name = "lvs/v", dst_bdev_name = "none" });
        Assert.Equal(-32602, e.Code);
        Assert.StartsWith("No such device: dst_bdev_name: ", e.Message, StringComparison.Ordinal);
        e = await kit.CallFails("bdev_lvol_start_shallow_copy", new { src_lvol_name = "lvs/v", dst_bdev_name = "M0" }); // claimed by lvol
        Assert.Equal(-32602, e.Code);
        Assert.StartsWith("Operation not permitted: dst_bdev_name: ", e.Message, StringComparison.Ordinal);
        e = await kit.CallFails("bdev_lvol_check_shallow_copy", new { operation_id = 77 });
        Assert.Equal(-19, e.Code);
        e = await kit.CallFails("bdev_lvol_check_shallow_copy", new { operation_id = "x" });
        Assert.Equal(-32603, e.Code);

        // A writable lvol: the start answers an id, the check the error (as SPDK: the blobstore refuses it later).
        var bad = await Check(kit, await Start(kit, "lvs/v", "D0"));
        Assert.Equal("error", bad["state"]!.GetValue<string>());
        Assert.Equal("Operation not permitted", bad["error"]!.GetValue<string>());
        Assert.Null(kit.Bdevs.Find("D0")!.ClaimedBy); // the destination is released

        await kit.Call("bdev_lvol_set_read_only", new { name = "lvs/v" });
        var small = await Check(kit, await Start(kit, "lvs/v", "Small"));
        Assert.Equal("error", small["state"]!.GetValue<string>());
        Assert.Equal("Invalid argument", small["error"]!.GetValue<string>());

        uint id = await Start(kit, "lvs/v", "D0");
        var done = await Check(kit, id);
        Assert.Equal("complete", done["state"]!.GetValue<string>());
        Assert.Equal(1, done["copied_clusters"]!.GetValue<long>());
        Assert.Equal(1, done["total_clusters"]!.GetValue<long>());
        Assert.Null(done["error"]);
        // Reported once, then forgotten (SPDK frees the status).
        Assert.Equal(-19, (await kit.CallFails("bdev_lvol_check_shallow_copy", new { operation_id = id })).Code);

        var copied = await kit.Read("D0", 0, 4 * MiB);
        var expect = new byte[4 * MiB];
        data.CopyTo(expect, 2 * MiB);
        Assert.Equal(GoldenImages.Sha256(expect), GoldenImages.Sha256(copied));
        Assert.Null(kit.Bdevs.Find("D0")!.ClaimedBy);
    }

    private static async Task<uint> Start(LvolKit kit, string src, string dst)
    {
        var r = await kit.Call("bdev_lvol_start_shallow_copy", new { src_lvol_name = src, dst_bdev_name = dst });
        return r!["operation_id"]!.GetValue<uint>();
    }

    /// <summary>Polls bdev_lvol_check_shallow_copy until the copy leaves "in progress".</summary>
    private static async Task<JsonNode> Check(LvolKit kit, uint id)
    {
        var deadline = DateTime.UtcNow.AddSeconds(30);
        while (true)
        {
            var r = (await kit.Call("bdev_lvol_check_shallow_copy", new { operation_id = id }))!;
            if (r["state"]!.GetValue<string>() != "in progress")
            {
                return r;
            }
            Assert.True(DateTime.UtcNow < deadline, "the shallow copy never ended");
            await Task.Delay(10);
        }
    }
}
