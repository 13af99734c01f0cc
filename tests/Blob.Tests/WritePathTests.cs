namespace VhostBackend.Blob.Tests;

public class WritePathTests
{
    private const int MiB = 1024 * 1024;

    private static async Task<byte[]> ReadAll(LvolStore lvs, Lvol l)
    {
        var d = new byte[l.SizeBytes];
        await lvs.ReadAsync(l, 0, d);
        return d;
    }

    private static async Task<Dictionary<string, string>> Hashes(LvolStore lvs)
    {
        var h = new Dictionary<string, string>();
        foreach (var l in lvs.Lvols)
        {
            h[l.Name] = GoldenImages.Sha256(await ReadAll(lvs, l));
        }
        return h;
    }

    private static async Task<LvolStore> Reload(MemoryBlobDevice dev, LvolStore lvs)
    {
        await lvs.UnloadAsync();
        var again = await LvolStore.LoadAsync(new MemoryBlobDevice(dev.BlockSize, dev.Data));
        Assert.False(again.BlobStore.LoadReport.Recovered);
        Assert.False(again.BlobStore.LoadReport.MaskMismatch);
        Assert.Null(again.BlobStore.CheckMasks());
        Assert.Empty(again.BlobStore.ClustersOwnedTwice());
        return again;
    }

    [Theory]
    [InlineData("lvs512.img.gz", 512)]
    [InlineData("lvs4k.img.gz", 4096)]
    public async Task OperationsOnAnSpdkImageKeepItConsistentAcrossReload(string file, int bs)
    {
        var dev = new MemoryBlobDevice(bs, GoldenImages.Decompress(file));
        var lvs = await LvolStore.LoadAsync(dev);
        var before = await Hashes(lvs);

        // Inflate clone0: every cluster its own, content unchanged, no longer a clone.
        var clone0 = lvs.FindByName("clone0")!;
        await lvs.InflateAsync(clone0);
        Assert.False(clone0.IsClone);
        Assert.False(clone0.IsThinProvisioned);
        Assert.Equal(32, clone0.AllocatedClusters);
        Assert.Equal(43u - 31, lvs.BlobStore.FreeClusters);
        Assert.Equal(["thin0"], lvs.FindByName("snap0")!.Clones.Select(c => c.Name));

        // Decouple thin0: takes snap0's two clusters, keeps its own, content unchanged, no parent left.
        var thin0 = lvs.FindByName("thin0")!;
        await lvs.DecoupleParentAsync(thin0);
        Assert.False(thin0.IsClone);
        Assert.Equal(3, thin0.AllocatedClusters);
        Assert.False(lvs.FindByName("snap0")!.IsSnapshot);
        Assert.Equal(before, await Hashes(lvs));

        // Delete the snapshot now nobody reads through it.
        uint free = lvs.BlobStore.FreeClusters;
        await lvs.DeleteLvolAsync(lvs.FindByName("snap0")!);
        Assert.Equal(free + 2, lvs.BlobStore.FreeClusters);

        // Resize thin0 up (the tail reads zeroes), thick0 is read-only.
        await lvs.ResizeLvolAsync(thin0, 40 * MiB);
        Assert.Equal(40ul * MiB, thin0.SizeBytes);
        var e = await Assert.ThrowsAsync<BlobException>(() => lvs.ResizeLvolAsync(lvs.FindByName("thick0")!, 32 * MiB));
        Assert.Equal(Errno.EPERM, e.Errno);
        await Assert.ThrowsAsync<BlobException>(async () => await lvs.WriteAsync(lvs.FindByName("thick0")!, 0, new byte[bs]));

        // A new thick lvol, written, renamed; the store renamed.
        var n1 = await lvs.CreateLvolAsync("new1", 8 * MiB, false);
        await CompatTests.Write(lvs, n1, "E", 0, 3 * MiB);
        await lvs.RenameLvolAsync(n1, "renamed1");
        await lvs.RenameAsync("lvsX");
        Assert.Equal("lvsX/renamed1", n1.Alias);

        var after = await Hashes(lvs);
        Assert.Equal(before["thin0"], GoldenImages.Sha256((await ReadAll(lvs, thin0)).AsSpan(0, 32 * MiB)));
        var again = await Reload(dev, lvs);
        Assert.Equal("lvsX", again.Name);
        Assert.Equal(after, await Hashes(again));
        Assert.Equal(lvs.BlobStore.FreeClusters, again.BlobStore.FreeClusters);
        Assert.Equal(GoldenImages.Sha256(GoldenImages.Pattern("E", 0, 3 * MiB)),
            GoldenImages.Sha256((await ReadAll(again, again.FindByName("renamed1")!)).AsSpan(0, 3 * MiB)));
    }

    [Fact]
    public async Task DeletingASnapshotWithOneCloneMergesItIntoTheClone()
    {
        var dev = new MemoryBlobDevice(512, GoldenImages.Decompress("lvs512.img.gz"));
        var lvs = await LvolStore.LoadAsync(dev);
        var before = await Hashes(lvs);
        var snap0 = lvs.FindByName("snap0")!;
        var e = await Assert.ThrowsAsync<BlobException>(() => lvs.DeleteLvolAsync(snap0));
        Assert.Equal(Errno.EBUSY, e.Errno);
        await lvs.DeleteLvolAsync(lvs.FindByName("clone0")!);
        await lvs.DeleteLvolAsync(snap0);
        var thin0 = lvs.FindByName("thin0")!;
        Assert.False(thin0.IsClone);
        Assert.Equal(3, thin0.AllocatedClusters);
        Assert.Equal(before["thin0"], GoldenImages.Sha256(await ReadAll(lvs, thin0)));
        Assert.Equal(43u + 1, lvs.BlobStore.FreeClusters);
        var again = await Reload(dev, lvs);
        Assert.Equal(["thick0", "thin0"], again.Lvols.Select(l => l.Name).Order());
        Assert.Equal(before["thin0"], GoldenImages.Sha256(await ReadAll(again, again.FindByName("thin0")!)));
    }

    [Fact]
    public async Task NamesAndReadOnlyFollowSpdksRules()
    {
        var dev = new MemoryBlobDevice(512, 16 * MiB / 512);
        var lvs = await LvolStore.CreateAsync(dev, "lvs", 1 * MiB);
        var a = await lvs.CreateLvolAsync("a", 1 * MiB, true);
        Assert.Equal(Errno.EEXIST, (await Assert.ThrowsAsync<BlobException>(() => lvs.CreateLvolAsync("a", MiB, true))).Errno);
        Assert.Equal(Errno.EINVAL, (await Assert.ThrowsAsync<BlobException>(() => lvs.CreateLvolAsync("", MiB, true))).Errno);
        Assert.Equal(Errno.EINVAL, (await Assert.ThrowsAsync<BlobException>(() => lvs.CreateLvolAsync(new string('x', 64), MiB, true))).Errno);
        Assert.Equal(Errno.ENOSPC, (await Assert.ThrowsAsync<BlobException>(() => lvs.CreateLvolAsync("big", 64 * MiB, false))).Errno);
        Assert.Equal(Errno.EINVAL, (await Assert.ThrowsAsync<BlobException>(() => lvs.CloneAsync(a, "c"))).Errno);
        var s = await lvs.SnapshotAsync(a, "s");
        Assert.True(s.IsReadOnly);
        Assert.Equal(Errno.EPERM, (await Assert.ThrowsAsync<BlobException>(async () => await lvs.WriteAsync(s, 0, new byte[512]))).Errno);
        Assert.Equal(Errno.EINVAL, (await Assert.ThrowsAsync<BlobException>(async () => await lvs.ReadAsync(a, MiB, new byte[512]))).Errno);
        Assert.Equal(Errno.EINVAL, (await Assert.ThrowsAsync<BlobException>(async () => await lvs.ReadAsync(a, 1, new byte[512]))).Errno);
    }

    [Fact]
    public async Task LargeBlobsUseSeveralExtentPagesAndChainedMdPages()
    {
        // 64 KiB clusters: a 1300-cluster blob needs three extent pages; 40 xattrs of 200 bytes need a chain.
        var dev = new MemoryBlobDevice(4096, 2048 * 16);
        var lvs = await LvolStore.CreateAsync(dev, "lvs", 64 * 1024);
        var big = await lvs.CreateLvolAsync("big", 1300ul * 64 * 1024, true);
        for (int i = 0; i < 40; i++)
        {
            await lvs.BlobStore.SetXattrAsync(big.Blob.Id, $"x{i}", Enumerable.Repeat((byte)i, 200).ToArray());
        }
        Assert.True(big.Blob.ChainPages.Count > 1);
        foreach (var c in new[] { 0, 511, 512, 1023, 1299 })
        {
            await lvs.WriteAsync(big, (ulong)c * 64 * 1024 + 4096, GoldenImages.Pattern("Z", c * 512, 4096));
        }
        Assert.Equal(3, big.Blob.ExtentPages.Count(p => p != 0));
        var thick = await lvs.CreateLvolAsync("thick", 600ul * 64 * 1024, false);
        var before = await Hashes(lvs);
        var again = await Reload(dev, lvs);
        Assert.Equal(before, await Hashes(again));
        var b2 = again.FindByName("big")!;
        Assert.Equal(5, b2.AllocatedClusters);
        Assert.True(b2.Blob.TryGetXattr("x39", false, out var v) && v.Length == 200 && v[0] == 39);
        // Shrink below an extent page boundary and grow back: the tail reads zeroes.
        await again.ResizeLvolAsync(b2, 600ul * 64 * 1024);
        await again.ResizeLvolAsync(b2, 1300ul * 64 * 1024);
        Assert.Equal(3, b2.AllocatedClusters);
        var third = await Reload(dev, again);
        var d = await ReadAll(third, third.FindByName("big")!);
        Assert.True(d.AsSpan(600 * 64 * 1024).IndexOfAnyExcept((byte)0) < 0);
    }

    [Fact]
    public async Task CloneCopiesTheRestOfAClusterFromItsSnapshotOnFirstWrite()
    {
        var dev = new MemoryBlobDevice(512, 16 * MiB / 512);
        var lvs = await LvolStore.CreateAsync(dev, "lvs", 1 * MiB);
        var a = await lvs.CreateLvolAsync("a", 2 * MiB, true);
        await CompatTests.Write(lvs, a, "P", 0, 2 * MiB);
        var s = await lvs.SnapshotAsync(a, "s");
        var c = await lvs.CloneAsync(s, "c");
        await lvs.WriteAsync(c, 4096, GoldenImages.Pattern("Q", 4096, 512));
        var expect = GoldenImages.Pattern("P", 0, 2 * MiB);
        GoldenImages.Pattern("Q", 4096, 512).CopyTo(expect, 4096);
        Assert.Equal(GoldenImages.Sha256(expect), GoldenImages.Sha256(await ReadAll(lvs, c)));
        Assert.Equal(1, c.AllocatedClusters);
        Assert.Equal(GoldenImages.Sha256(GoldenImages.Pattern("P", 0, 2 * MiB)), GoldenImages.Sha256(await ReadAll(lvs, a)));
    }

    [Fact]
    public async Task SnapshotTakenWhileWritesRunIsAPrefixOfThem()
    {
        // A writer fills 4 KiB blocks in order, one at a time; a snapshot in the middle must hold exactly a prefix
        // of those writes (writes are quiesced for the switch-over, none is lost or half in).
        var dev = new MemoryBlobDevice(512, 64 * MiB / 512);
        var lvs = await LvolStore.CreateAsync(dev, "lvs", 256 * 1024);
        var v = await lvs.CreateLvolAsync("v", 8 * MiB, true);
        int blocks = 8 * MiB / 4096;
        var started = new TaskCompletionSource();
        var writer = Task.Run(async () =>
        {
            var buf = new byte[4096];
            for (int i = 0; i < blocks; i++)
            {
                buf.AsSpan().Fill((byte)(1 + i % 250));
                await lvs.WriteAsync(v, (ulong)i * 4096, buf);
                if (i == 100)
                {
                    started.SetResult();
                }
            }
        });
        await started.Task;
        var s = await lvs.SnapshotAsync(v, "s");
        await writer;
        var snap = await ReadAll(lvs, s);
        int prefix = 0;
        while (prefix < blocks && snap[prefix * 4096] != 0)
        {
            prefix++;
        }
        Assert.InRange(prefix, 101, blocks);
        for (int i = 0; i < blocks; i++)
        {
            var blk = snap.AsSpan(i * 4096, 4096);
            byte want = i < prefix ? (byte)(1 + i % 250) : (byte)0;
            Assert.True(blk.IndexOfAnyExcept(want) < 0, $"block {i} of the snapshot (prefix {prefix})");
        }
        var all = await ReadAll(lvs, v);
        for (int i = 0; i < blocks; i++)
        {
            Assert.Equal((byte)(1 + i % 250), all[i * 4096]);
        }
    }
}
