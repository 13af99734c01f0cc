using System.Text.Json;

namespace VhostBackend.Blob.Tests;

/// <summary>The SPDK-written lvstores open here with every lvol intact (listing, relations, sha256 of contents).</summary>
public class GoldenImageTests
{
    public static TheoryData<string> Images => new() { "lvs512.img.gz", "lvs4k.img.gz", "lvs512-dirty.img.gz" };

    private static async Task<byte[]> ReadAll(LvolStore lvs, Lvol l)
    {
        var data = new byte[l.SizeBytes];
        // In 64 KiB pieces like spdk_dd --bs 65536.
        for (ulong o = 0; o < l.SizeBytes; o += 65536)
        {
            await lvs.ReadAsync(l, o, data.AsMemory((int)o, 65536));
        }
        return data;
    }

    internal static async Task CheckAgainstManifest(LvolStore lvs, JsonElement im)
    {
        var ms = im.GetProperty("lvstore");
        Assert.Equal(ms.GetProperty("name").GetString(), lvs.Name);
        Assert.Equal(Guid.Parse(ms.GetProperty("uuid").GetString()!), lvs.Uuid);
        Assert.Equal(ms.GetProperty("cluster_size").GetUInt32(), lvs.ClusterSize);
        Assert.Equal(ms.GetProperty("total_data_clusters").GetUInt32(), lvs.BlobStore.TotalDataClusters);
        Assert.Equal(ms.GetProperty("free_clusters").GetUInt32(), lvs.BlobStore.FreeClusters);
        var expected = im.GetProperty("lvols").EnumerateArray().ToList();
        Assert.Equal(expected.Select(e => e.GetProperty("name").GetString()).Order(), lvs.Lvols.Select(l => l.Name).Order());
        foreach (var e in expected)
        {
            var name = e.GetProperty("name").GetString()!;
            var l = lvs.FindByName(name)!;
            Assert.Equal(e.GetProperty("alias").GetString(), l.Alias);
            Assert.Equal(Guid.Parse(e.GetProperty("uuid").GetString()!), l.Uuid);
            Assert.Equal(e.GetProperty("size_bytes").GetUInt64(), l.SizeBytes);
            Assert.Equal(e.GetProperty("thin_provisioned").GetBoolean(), l.IsThinProvisioned);
            Assert.Equal(e.GetProperty("is_snapshot").GetBoolean(), l.IsSnapshot);
            Assert.Equal(e.GetProperty("is_clone").GetBoolean(), l.IsClone);
            Assert.Equal(e.GetProperty("read_only").GetBoolean(), l.IsReadOnly);
            var cloneOf = e.GetProperty("clone_of");
            Assert.Equal(cloneOf.ValueKind == JsonValueKind.Null ? null : cloneOf.GetString(), l.Parent?.Name);
            Assert.Equal(e.GetProperty("snapshot_of_clones").EnumerateArray().Select(x => x.GetString()), l.Clones.Select(c => c.Name));
            Assert.Equal(e.GetProperty("expected_allocated_clusters").GetInt32(), l.AllocatedClusters);
            var indices = e.GetProperty("expected_allocated_cluster_indices").EnumerateArray().Select(x => x.GetInt32()).ToList();
            Assert.Equal(indices, Enumerable.Range(0, (int)l.Blob.NumClusters).Where(i => l.Blob.ClusterAt((ulong)i) != 0));
            Assert.Equal(e.GetProperty("sha256").GetString(), GoldenImages.Sha256(await ReadAll(lvs, l)));
        }
        Assert.Null(lvs.BlobStore.CheckMasks());
        Assert.Empty(lvs.BlobStore.ClustersOwnedTwice());
    }

    [Theory]
    [MemberData(nameof(Images))]
    public async Task SpdkImageOpensWithEveryLvolIntact(string file)
    {
        var im = GoldenImages.Image(file);
        int bs = im.GetProperty("block_size").GetInt32();
        var bytes = GoldenImages.Decompress(file);
        Assert.Equal(im.GetProperty("uncompressed_sha256").GetString(), GoldenImages.Sha256(bytes));
        var path = Path.Combine(Path.GetTempPath(), $"blobtest-{Guid.NewGuid():N}.img");
        await File.WriteAllBytesAsync(path, bytes);
        try
        {
            using (var dev = new FileBlobDevice(path, bs))
            {
                var lvs = await LvolStore.LoadAsync(dev);
                Assert.Equal(file.Contains("dirty"), lvs.BlobStore.LoadReport.Recovered);
                Assert.False(lvs.BlobStore.LoadReport.MaskMismatch);
                Assert.Empty(lvs.BlobStore.LoadReport.Dropped);
                await CheckAgainstManifest(lvs, im);
                await lvs.UnloadAsync();
            }
            // After our unload the store is clean and loads the same again (masks from disk, no recovery).
            using (var dev = new FileBlobDevice(path, bs))
            {
                var lvs = await LvolStore.LoadAsync(dev);
                Assert.False(lvs.BlobStore.LoadReport.Recovered);
                Assert.False(lvs.BlobStore.LoadReport.MaskMismatch);
                await CheckAgainstManifest(lvs, im);
                await lvs.UnloadAsync();
            }
            if (!file.Contains("dirty"))
            {
                // A clean SPDK image loaded and unloaded without changes is byte-identical, as in SPDK (README).
                Assert.Equal(im.GetProperty("uncompressed_sha256").GetString(), GoldenImages.Sha256(await File.ReadAllBytesAsync(path)));
            }
        }
        finally
        {
            File.Delete(path);
        }
    }

    [Fact]
    public async Task DirtyImageRecoversTheMasksSpdkWritesOnItsUnload()
    {
        // The dirty image recovered and unloaded here has the masks of a clean store: the used pages, clusters
        // and blob ids of the five blobs SPDK lists.
        var bytes = GoldenImages.Decompress("lvs512-dirty.img.gz");
        var dev = new MemoryBlobDevice(512, bytes);
        var lvs = await LvolStore.LoadAsync(dev);
        Assert.True(lvs.BlobStore.LoadReport.Recovered);
        Assert.Equal([0, 1, 3, 5, 6, 9], Enumerable.Range(0, 64).Where(i => lvs.BlobStore.UsedBlobIds[i]));
        await lvs.UnloadAsync();
        Assert.Equal(1u, BitConverter.ToUInt32(bytes, 16));
        var again = await LvolStore.LoadAsync(new MemoryBlobDevice(512, bytes));
        Assert.False(again.BlobStore.LoadReport.Recovered);
        Assert.False(again.BlobStore.LoadReport.MaskMismatch);
    }
}
