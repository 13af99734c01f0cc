namespace VhostBackend.Blob.Tests;

/// <summary>Stores made here follow SPDK's format: the manifest's recipe replayed here gives SPDK's image.</summary>
public class CompatTests
{
    private const int MiB = 1024 * 1024;

    /// <summary>Runs the manifest's create_sequence (README "How the images were made") on a zeroed 64 MiB device,
    /// with the manifest's uuids.</summary>
    internal static async Task<(MemoryBlobDevice Dev, LvolStore Lvs)> ReplayRecipe(string file, bool unload = true)
    {
        var im = GoldenImages.Image(file);
        int bs = im.GetProperty("block_size").GetInt32();
        var ms = im.GetProperty("lvstore");
        Guid U(string name) => Guid.Parse(im.GetProperty("lvols").EnumerateArray().First(l => l.GetProperty("name").GetString() == name).GetProperty("uuid").GetString()!);
        var dev = new MemoryBlobDevice(bs, (ulong)(64 * MiB / bs));
        var lvs = await LvolStore.CreateAsync(dev, ms.GetProperty("name").GetString()!, 1 * MiB, "unmap", Guid.Parse(ms.GetProperty("uuid").GetString()!));
        var thick0 = await lvs.CreateLvolAsync("thick0", 16 * MiB, false, 0, U("thick0"));
        await Write(lvs, thick0, "A", 0, 4 * MiB);
        await lvs.SetReadOnlyAsync(thick0);
        var thin0 = await lvs.CreateLvolAsync("thin0", 32 * MiB, true, 0, U("thin0"));
        await Write(lvs, thin0, "B", 0, 1 * MiB);
        await Write(lvs, thin0, "B", 20 * MiB, 1 * MiB);
        var snap0 = await lvs.SnapshotAsync(thin0, "snap0");
        var clone0 = await lvs.CloneAsync(snap0, "clone0");
        await Write(lvs, clone0, "C", 1 * MiB, MiB / 2);
        await Write(lvs, thin0, "D", 8 * MiB, MiB / 4);
        if (unload)
        {
            await lvs.UnloadAsync();
        }
        return (dev, lvs);
    }

    internal static async Task Write(LvolStore lvs, Lvol l, string tag, long offset, long length)
    {
        for (long o = offset; o < offset + length; o += 65536)
        {
            await lvs.WriteAsync(l, (ulong)o, GoldenImages.Pattern(tag, o, 65536));
        }
    }

    [Theory]
    [InlineData("lvs512.img.gz")]
    [InlineData("lvs4k.img.gz")]
    public async Task RecipeGivesSpdksImageExceptTheSnapshotUuids(string file)
    {
        var (dev, _) = await ReplayRecipe(file);
        var golden = GoldenImages.Decompress(file);
        var ours = dev.Data;
        // Super block and masks: byte-identical.
        Assert.Equal(golden.AsSpan(0, 4 * BlobFormat.PageSize).ToArray(), ours.AsSpan(0, 4 * BlobFormat.PageSize).ToArray());
        // Data region: byte-identical.
        Assert.Equal(GoldenImages.Sha256(golden.AsSpan(MiB)), GoldenImages.Sha256(ours.AsSpan(MiB)));
        // Metadata pages: the same pages used by the same blobs with the same descriptors; only the uuids that SPDK
        // generated at snapshot/clone time differ (and so the CRCs of those two pages).
        for (int p = 0; p < 64; p++)
        {
            var g = golden.AsSpan((4 + p) * BlobFormat.PageSize, BlobFormat.PageSize);
            var o = ours.AsSpan((4 + p) * BlobFormat.PageSize, BlobFormat.PageSize);
            if (p is 5 or 6)
            {
                Assert.Equal(MdCodec.PageId(g), MdCodec.PageId(o));
                Assert.True(MdCodec.CrcValid(o));
                int diff = 0;
                for (int i = 0; i < BlobFormat.CrcOffset; i++)
                {
                    diff += g[i] != o[i] ? 1 : 0;
                }
                Assert.InRange(diff, 1, 36);
                continue;
            }
            Assert.True(g.SequenceEqual(o), $"md page {p} differs");
        }
        // And it reads back as the manifest says (the snapshot/clone uuids aside).
        var lvs = await LvolStore.LoadAsync(new MemoryBlobDevice(dev.BlockSize, ours));
        Assert.False(lvs.BlobStore.LoadReport.Recovered);
        Assert.False(lvs.BlobStore.LoadReport.MaskMismatch);
        foreach (var e in GoldenImages.Image(file).GetProperty("lvols").EnumerateArray())
        {
            var l = lvs.FindByName(e.GetProperty("name").GetString()!)!;
            var data = new byte[l.SizeBytes];
            await lvs.ReadAsync(l, 0, data);
            Assert.Equal(e.GetProperty("sha256").GetString(), GoldenImages.Sha256(data));
        }
    }
}
