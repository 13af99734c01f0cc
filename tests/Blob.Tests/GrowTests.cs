using VhostBackend.BdevFile;

namespace VhostBackend.Blob.Tests;

/// <summary>bdev_lvol_grow_lvstore (SPDK's spdk_bs_grow_live): the store takes its grown device's size.</summary>
public class GrowTests
{
    private const int MiB = 1024 * 1024;

    [Fact]
    public async Task TheStoreGrowsIntoTheNewSpaceAndKeepsItAcrossReloads()
    {
        var dev = new SparseBlobDevice(512, 32UL * MiB / 512);
        var lvs = await LvolStore.CreateAsync(dev, "lvs", MiB);
        var bs = lvs.BlobStore;
        uint total = bs.TotalClusters, free = bs.FreeClusters;
        Assert.Equal(32u, total);
        var v = await lvs.CreateLvolAsync("v", 8 * MiB, thinProvision: false);
        await lvs.WriteAsync(v, 0, GoldenImages.Pattern("G", 0, MiB));
        Assert.False(await lvs.GrowAsync()); // same size: nothing to do
        // Too big for the store: a 64 GiB device needs a used-cluster mask larger than the one page reserved.
        dev.BlockCount = 64UL * 1024 * MiB / 512;
        Assert.Equal(Errno.ENOSPC, (await Assert.ThrowsAsync<BlobException>(lvs.GrowAsync)).Errno);
        Assert.Equal(total, bs.TotalClusters);

        dev.BlockCount = 96UL * MiB / 512;
        Assert.True(await lvs.GrowAsync());
        Assert.Equal(96u, bs.TotalClusters);
        Assert.Equal(free - 8 + 64, bs.FreeClusters);
        Assert.Equal(96UL * MiB, bs.SuperBlockCopy.Size);
        // The new clusters are used.
        var big = await lvs.CreateLvolAsync("big", 70 * MiB, thinProvision: false);
        Assert.Contains(big.Blob.Clusters, c => c >= 32);
        await lvs.WriteAsync(big, 69 * MiB, GoldenImages.Pattern("B", 0, MiB));
        Assert.Null(bs.CheckMasks());

        // Dirty (a crash right after): recovered at the grown size.
        var dirty = await LvolStore.LoadAsync(dev);
        Assert.True(dirty.BlobStore.LoadReport.Recovered);
        Assert.Equal(96u, dirty.BlobStore.TotalClusters);
        await dirty.UnloadAsync();
        // Clean: the grown mask is read back.
        var clean = await LvolStore.LoadAsync(dev);
        Assert.False(clean.BlobStore.LoadReport.Recovered);
        Assert.False(clean.BlobStore.LoadReport.MaskMismatch);
        Assert.Equal(96u, clean.BlobStore.TotalClusters);
        var back = new byte[MiB];
        await clean.ReadAsync(clean.FindByName("big")!, 69 * MiB, back);
        Assert.Equal(GoldenImages.Pattern("B", 0, MiB), back);
        await clean.ReadAsync(clean.FindByName("v")!, 0, back);
        Assert.Equal(GoldenImages.Pattern("G", 0, MiB), back);
    }

    [Fact]
    public async Task GrowLvstoreRpcAfterTheBaseGrows()
    {
        var path = Path.Combine(Path.GetTempPath(), $"lvoltest-{Guid.NewGuid():N}.img");
        FileBdev.CreateSparseIfMissing(path, 32 * MiB);
        try
        {
            await using var kit = new LvolKit();
            var f = FileBdev.Open("aio0", path, 512, false, null, "bdev_aio_create");
            kit.Bdevs.Register(f);
            await kit.Call("bdev_wait_for_examine");
            await kit.Call("bdev_lvol_create_lvstore", new { bdev_name = "aio0", lvs_name = "lvs", cluster_sz = MiB });
            long Total(System.Text.Json.Nodes.JsonNode? n) => n!.AsArray()[0]!["total_data_clusters"]!.GetValue<uint>();
            long before = Total(await kit.Call("bdev_lvol_get_lvstores", new { lvs_name = "lvs" }));
            Assert.Equal(-28, (await kit.CallFails("bdev_lvol_create", new { lvs_name = "lvs", lvol_name = "x", size_in_mib = 48 })).Code);

            using (var fs = new FileStream(path, FileMode.Open, FileAccess.ReadWrite, FileShare.ReadWrite))
            {
                fs.SetLength(64 * MiB);
            }
            Assert.Equal(0, f.Rescan());
            Assert.True((await kit.Call("bdev_lvol_grow_lvstore", new { lvs_name = "lvs" }))!.GetValue<bool>());
            Assert.Equal(before + 32, Total(await kit.Call("bdev_lvol_get_lvstores", new { lvs_name = "lvs" })));
            await kit.Call("bdev_lvol_create", new { lvs_name = "lvs", lvol_name = "x", size_in_mib = 48 });
            var e = await kit.CallFails("bdev_lvol_grow_lvstore", new { lvs_name = "none" });
            Assert.Equal(-19, e.Code);
            Assert.StartsWith("No such device: lvs_name: ", e.Message, StringComparison.Ordinal);
        }
        finally
        {
            File.Delete(path);
        }
    }
}
