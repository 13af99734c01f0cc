using VhostBackend.BdevFile;

namespace VhostBackend.Blob.Tests;

/// <summary>A <see cref="MemoryBlobDevice"/> whose writes wait while <see cref="Gate"/> is set (holds the
/// metadata serializer inside an operation).</summary>
internal sealed class GatedBlobDevice(MemoryBlobDevice inner) : IBlobDevice
{
    public volatile Task? Gate;

    /// <summary>Only writes below this offset wait (e.g. the md region).</summary>
    public ulong GateBelow = ulong.MaxValue;

    /// <summary>Completed when a write first waits at the gate.</summary>
    public TaskCompletionSource Hit { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);

    public MemoryBlobDevice Inner => inner;

    public int BlockSize => inner.BlockSize;

    public ulong BlockCount => inner.BlockCount;

    public ValueTask ReadAsync(ulong offset, Memory<byte> buffer) => inner.ReadAsync(offset, buffer);

    public async ValueTask WriteAsync(ulong offset, ReadOnlyMemory<byte> buffer)
    {
        var g = Gate;
        if (g != null && offset < GateBelow)
        {
            Hit.TrySetResult();
            await g;
        }
        await inner.WriteAsync(offset, buffer);
    }

    public ValueTask WriteZeroesAsync(ulong offset, ulong length) => inner.WriteZeroesAsync(offset, length);

    public ValueTask FlushAsync() => ValueTask.CompletedTask;
}

public class RobustnessTests
{
    private const int MiB = 1024 * 1024;

    [Fact]
    public async Task FirstWriteQueuedBehindASnapshotDoesNotDeadlockIt()
    {
        var gated = new GatedBlobDevice(new MemoryBlobDevice(512, 16 * MiB / 512));
        var lvs = await LvolStore.CreateAsync(gated, "lvs", 1 * MiB);
        var v = await lvs.CreateLvolAsync("v", 4 * MiB, true);
        var other = await lvs.CreateLvolAsync("o", 1 * MiB, true);
        var bs = lvs.BlobStore;

        // An md operation holds the serializer (its md write waits on the gate); the snapshot queues on the
        // serializer first, then a first write to v (counted in flight) queues behind it.
        var gate = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        gated.Gate = gate.Task;
        var holder = bs.SetXattrAsync(other.Blob.Id, "k", [1]);
        var snap = bs.CreateSnapshotAsync(v.Blob.Id, []);
        var data = GoldenImages.Pattern("W", 0, 4096);
        var write = bs.WriteAsync(v.Blob.Id, 0, data).AsTask();
        Assert.False(holder.IsCompleted);
        gated.Gate = null;
        gate.SetResult();

        await Task.WhenAll(holder, snap, write).WaitAsync(TimeSpan.FromSeconds(20));
        var s = await snap;
        // The write went after the snapshot: v has it, the snapshot reads zeroes there.
        var got = new byte[4096];
        await bs.ReadAsync(v.Blob.Id, 0, got);
        Assert.Equal(data, got);
        await bs.ReadAsync(s.Id, 0, got);
        Assert.True(got.AsSpan().IndexOfAnyExcept((byte)0) < 0);
        Assert.Equal(0, Volatile.Read(ref v.Blob.InFlightWrites));
        Assert.Null(bs.CheckMasks());
    }

    /// <summary>A store (left dirty) whose snapshot's md names a parent chosen by <paramref name="corrupt"/>,
    /// written through the store's own md path (valid CRCs), loaded again from a copy of the device.</summary>
    private static async Task<(LvolStore Lvs, ulong V, ulong S1, ulong S2)> CraftedParents(Func<ulong, ulong, ulong, ulong> corrupt)
    {
        var dev = new MemoryBlobDevice(512, 16 * MiB / 512);
        var lvs = await LvolStore.CreateAsync(dev, "lvs", 1 * MiB);
        var v = await lvs.CreateLvolAsync("v", 2 * MiB, true);
        await CompatTests.Write(lvs, v, "P", 0, 2 * MiB);
        var s1 = await lvs.SnapshotAsync(v, "s1");
        var s2 = await lvs.SnapshotAsync(v, "s2");
        // v -> s2 -> s1; s2's parent rewritten.
        ulong target = corrupt(v.Blob.Id, s1.Blob.Id, s2.Blob.Id);
        s2.Blob.SetParent(target);
        await lvs.BlobStore.SyncMdAsync(s2.Blob.Id);
        var copy = (byte[])dev.Data.Clone();
        var again = await LvolStore.LoadAsync(new MemoryBlobDevice(512, copy)).WaitAsync(TimeSpan.FromSeconds(20));
        Assert.True(again.BlobStore.LoadReport.Recovered);
        return (again, v.Blob.Id, s1.Blob.Id, s2.Blob.Id);
    }

    [Fact]
    public async Task ABlobThatIsItsOwnParentIsDroppedAndItsCloneDoesNotOpen()
    {
        var (lvs, v, s1, s2) = await CraftedParents((_, _, s2) => s2);
        var bs = lvs.BlobStore;
        Assert.Equal([(s2, Errno.EINVAL)], bs.LoadReport.Dropped);
        Assert.Null(bs.GetBlob(s2));
        // v names the dropped s2: kept on disk, not openable, not an lvol; no zeroes read in place of its data.
        Assert.True(bs.GetBlob(v)!.ParentMissing);
        Assert.Equal([v], bs.LoadReport.MissingParent);
        Assert.Null(lvs.FindByName("v"));
        var e = await Assert.ThrowsAsync<BlobException>(async () => await bs.ReadAsync(v, 0, new byte[4096]));
        Assert.Equal(Errno.ENOENT, e.Errno);
        e = await Assert.ThrowsAsync<BlobException>(async () => await bs.WriteAsync(v, 0, new byte[4096]));
        Assert.Equal(Errno.ENOENT, e.Errno);
        // s1 is untouched.
        var got = new byte[2 * MiB];
        await bs.ReadAsync(s1, 0, got);
        Assert.Equal(GoldenImages.Sha256(GoldenImages.Pattern("P", 0, 2 * MiB)), GoldenImages.Sha256(got));
        Assert.NotNull(lvs.FindByName("s1"));
    }

    [Fact]
    public async Task ATwoBlobParentLoopIsDropped()
    {
        // s2 -> v -> s2: both on the loop.
        var (lvs, v, s1, s2) = await CraftedParents((v, _, _) => v);
        var bs = lvs.BlobStore;
        Assert.Equal(new[] { s2, v }.Order().ToList(), bs.LoadReport.Dropped.Select(d => d.Id).Order().ToList());
        Assert.All(bs.LoadReport.Dropped, d => Assert.Equal(Errno.EINVAL, d.Errno));
        Assert.Null(lvs.FindByName("v"));
        Assert.Null(lvs.FindByName("s2"));
        Assert.NotNull(lvs.FindByName("s1"));
        Assert.Null(bs.CheckMasks());
    }

    [Fact]
    public async Task AParentIdNotInTheStoreMakesTheCloneUnopenable()
    {
        var (lvs, v, s1, s2) = await CraftedParents((_, _, _) => BlobFormat.PageToBlobId(3000));
        var bs = lvs.BlobStore;
        Assert.Empty(bs.LoadReport.Dropped);
        // s2 names a parent that does not exist; v reads through s2, so neither opens.
        Assert.Equal(new[] { v, s2 }.Order().ToList(), bs.LoadReport.MissingParent.Order().ToList());
        Assert.Null(lvs.FindByName("s2"));
        Assert.Null(lvs.FindByName("v"));
        Assert.NotNull(lvs.FindByName("s1"));
        var e = await Assert.ThrowsAsync<BlobException>(async () => await bs.ReadAsync(s2, 0, new byte[4096]));
        Assert.Equal(Errno.ENOENT, e.Errno);
        e = await Assert.ThrowsAsync<BlobException>(async () => await bs.ReadAsync(v, 0, new byte[4096]));
        Assert.Equal(Errno.ENOENT, e.Errno);
    }

    [Fact]
    public async Task ABdevReadPastItsParentsEndReadsZeroesNotTheGrandparent()
    {
        await OnFileLvstore(async kit =>
        {
            var v = (await kit.Call("bdev_lvol_create", new { lvs_name = "lvs", lvol_name = "v", size_in_mib = 2, thin_provision = true }))!.GetValue<string>();
            Assert.True(await kit.Write("lvs/v", 0, GoldenImages.Pattern("P", 0, 2 * MiB)));
            // v -> s2 (1 cluster) -> s1 (2 clusters, P): v's second cluster is past s2's end.
            await kit.Call("bdev_lvol_snapshot", new { lvol_name = "lvs/v", snapshot_name = "s1" });
            await kit.Call("bdev_lvol_resize", new { name = "lvs/v", size_in_mib = 1 });
            await kit.Call("bdev_lvol_snapshot", new { lvol_name = "lvs/v", snapshot_name = "s2" });
            await kit.Call("bdev_lvol_resize", new { name = "lvs/v", size_in_mib = 2 });
            var got = await kit.Read(v, MiB, 4096);
            Assert.True(got.AsSpan().IndexOfAnyExcept((byte)0) < 0, "the second cluster reads zeroes");
            Assert.Equal(GoldenImages.Pattern("P", 0, 4096), await kit.Read(v, 0, 4096));
        });
    }

    [Fact]
    public async Task DeletingAnLvolOrLvstoreWhoseBdevStaysOpenIsBusyAndFreesNothing()
    {
        await OnFileLvstore(async kit =>
        {
            await kit.Call("bdev_lvol_create", new { lvs_name = "lvs", lvol_name = "v", size_in_mib = 2 });
            var lvs = kit.Lvol.Stores.Single().Store;
            uint free = lvs.BlobStore.FreeClusters;
            // An opener that ignores the remove event keeps its descriptor: the unregister times out.
            using var desc = kit.Bdevs.Open("lvs/v", true, (_, _, _) => { });
            var busy = await kit.CallFails("bdev_lvol_delete", new { name = "lvs/v" });
            Assert.Equal(-32602, busy.Code);
            Assert.Contains("busy", busy.Message, StringComparison.OrdinalIgnoreCase);
            Assert.Equal(free, lvs.BlobStore.FreeClusters);
            Assert.NotNull(lvs.FindByName("v"));
            busy = await kit.CallFails("bdev_lvol_delete_lvstore", new { lvs_name = "lvs" });
            Assert.Equal(-32602, busy.Code);
            Assert.Contains("busy", busy.Message, StringComparison.OrdinalIgnoreCase);
            Assert.Single(kit.Lvol.Stores);
            Assert.Equal(free, lvs.BlobStore.FreeClusters);
        });
    }

    [Fact]
    public async Task AFirstWriteClusterIsVisibleToIoOnlyAfterItsCommit()
    {
        var gated = new GatedBlobDevice(new MemoryBlobDevice(512, 16 * MiB / 512));
        var lvs = await LvolStore.CreateAsync(gated, "lvs", 1 * MiB);
        var v = await lvs.CreateLvolAsync("v", 2 * MiB, true);
        var bs = lvs.BlobStore;
        uint free = bs.FreeClusters;
        var gate = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        gated.GateBelow = (ulong)bs.MdClusters * bs.ClusterSize;
        gated.Gate = gate.Task;
        var write = bs.WriteAsync(v.Blob.Id, 0, new byte[4096]).AsTask();
        // The cluster's data is written, its md commit waits: the fast path must not see the cluster yet.
        await gated.Hit.Task.WaitAsync(TimeSpan.FromSeconds(20));
        Assert.Equal(0u, v.Blob.ClusterAt(0));
        // The commit fails: the cluster is freed, and nobody wrote to it.
        gated.Gate = null;
        gate.SetException(new IOException("md write failed"));
        await Assert.ThrowsAsync<IOException>(() => write);
        Assert.Equal(0u, v.Blob.ClusterAt(0));
        Assert.Equal(free, bs.FreeClusters);
        // A retry commits and publishes.
        await bs.WriteAsync(v.Blob.Id, 0, GoldenImages.Pattern("R", 0, 4096));
        Assert.NotEqual(0u, v.Blob.ClusterAt(0));
        var got = new byte[4096];
        await bs.ReadAsync(v.Blob.Id, 0, got);
        Assert.Equal(GoldenImages.Pattern("R", 0, 4096), got);
    }

    /// <summary>Runs <paramref name="test"/> on an LvolKit with lvstore "lvs" (1 MiB clusters) on a 32 MiB sparse file bdev "aio0".</summary>
    private static async Task OnFileLvstore(Func<LvolKit, Task> test)
    {
        var path = Path.Combine(Path.GetTempPath(), $"lvoltest-{Guid.NewGuid():N}.img");
        FileBdev.CreateSparseIfMissing(path, 32 * MiB);
        try
        {
            await using var kit = new LvolKit();
            kit.Bdevs.Register(FileBdev.Open("aio0", path, 512, false, null, "bdev_aio_create"));
            await kit.Call("bdev_wait_for_examine");
            await kit.Call("bdev_lvol_create_lvstore", new { bdev_name = "aio0", lvs_name = "lvs", cluster_sz = MiB });
            await test(kit);
        }
        finally
        {
            File.Delete(path);
        }
    }
}
