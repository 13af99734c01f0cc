namespace VhostBackend.Blob.Tests;

/// <summary>A sparse <see cref="IBlobDevice"/> model: 4 KiB pages held only once written non-zero; anything else
/// reads as zeroes. Large geometries (many GiB) cost only what is written.</summary>
internal sealed class SparseBlobDevice(int blockSize, ulong blockCount) : IBlobDevice
{
    private ulong _blockCount = blockCount;

    private const int Page = 4096;
    private readonly Dictionary<ulong, byte[]> _pages = [];

    public int BlockSize => blockSize;

    /// <summary>Settable: a test grows the "disk" under the store.</summary>
    public ulong BlockCount
    {
        get => _blockCount;
        set => _blockCount = value;
    }

    public long BytesRead { get; private set; }

    public int LargestRead { get; private set; }

    public int PagesHeld
    {
        get
        {
            lock (_pages)
            {
                return _pages.Count;
            }
        }
    }

    private void Check(ulong offset, ulong length)
    {
        if (offset % (ulong)blockSize != 0 || length % (ulong)blockSize != 0 || offset + length > _blockCount * (ulong)blockSize)
        {
            throw new BlobException(Errno.EINVAL, $"I/O {offset}+{length} outside the device or unaligned");
        }
    }

    public ValueTask ReadAsync(ulong offset, Memory<byte> buffer)
    {
        Check(offset, (ulong)buffer.Length);
        lock (_pages)
        {
            BytesRead += buffer.Length;
            LargestRead = Math.Max(LargestRead, buffer.Length);
            for (int done = 0; done < buffer.Length;)
            {
                ulong at = offset + (ulong)done;
                int inPage = (int)(at % Page);
                int n = Math.Min(Page - inPage, buffer.Length - done);
                var dst = buffer.Span.Slice(done, n);
                if (_pages.TryGetValue(at / Page, out var p))
                {
                    p.AsSpan(inPage, n).CopyTo(dst);
                }
                else
                {
                    dst.Clear();
                }
                done += n;
            }
        }
        return ValueTask.CompletedTask;
    }

    public ValueTask WriteAsync(ulong offset, ReadOnlyMemory<byte> buffer)
    {
        Check(offset, (ulong)buffer.Length);
        lock (_pages)
        {
            for (int done = 0; done < buffer.Length;)
            {
                ulong at = offset + (ulong)done;
                int inPage = (int)(at % Page);
                int n = Math.Min(Page - inPage, buffer.Length - done);
                var src = buffer.Span.Slice(done, n);
                if (!_pages.TryGetValue(at / Page, out var p))
                {
                    if (src.IndexOfAnyExcept((byte)0) < 0)
                    {
                        done += n;
                        continue;
                    }
                    p = new byte[Page];
                    _pages[at / Page] = p;
                }
                src.CopyTo(p.AsSpan(inPage, n));
                done += n;
            }
        }
        return ValueTask.CompletedTask;
    }

    public ValueTask WriteZeroesAsync(ulong offset, ulong length)
    {
        Check(offset, length);
        lock (_pages)
        {
            ulong end = offset + length;
            // Whole pages dropped; partial pages cleared in place.
            foreach (var k in _pages.Keys.Where(k => k * Page < end && (k + 1) * Page > offset).ToList())
            {
                ulong ps = k * Page;
                if (ps >= offset && ps + Page <= end)
                {
                    _pages.Remove(k);
                }
                else
                {
                    ulong s = Math.Max(ps, offset), e = Math.Min(ps + Page, end);
                    _pages[k].AsSpan((int)(s - ps), (int)(e - s)).Clear();
                }
            }
        }
        return ValueTask.CompletedTask;
    }

    public ValueTask FlushAsync() => ValueTask.CompletedTask;
}

public class LargeMdTests
{
    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public async Task AStoreWithMoreThanTwoToTheNineteenMdPagesLoadsInPieces(bool dirty)
    {
        // 2^19 + 4096 clusters of 16 KiB (8.06 GiB, sparse): SPDK's default md region of one page per cluster is
        // over 2 GiB, more than one array holds.
        const uint cluster = 16 * 1024;
        const ulong clusters = (1UL << 19) + 4096;
        var dev = new SparseBlobDevice(512, clusters * cluster / 512);
        var lvs = await LvolStore.CreateAsync(dev, "big", cluster);
        Assert.True(lvs.BlobStore.SuperBlockCopy.MdLen >= 1u << 19);
        var v = await lvs.CreateLvolAsync("v", 64 * cluster, thinProvision: false);
        var t = await lvs.CreateLvolAsync("t", 1024 * cluster, thinProvision: true);
        var data = GoldenImages.Pattern("L", 0, 8192);
        await lvs.BlobStore.WriteAsync(t.Blob.Id, 500 * (ulong)cluster, data);
        await lvs.BlobStore.WriteAsync(v.Blob.Id, 0, data);
        var snap = await lvs.SnapshotAsync(t, "s");
        if (!dirty)
        {
            await lvs.UnloadAsync();
        }

        long before = dev.BytesRead;
        var again = await LvolStore.LoadAsync(dev);
        Assert.Equal(dirty, again.BlobStore.LoadReport.Recovered);
        Assert.False(again.BlobStore.LoadReport.MaskMismatch);
        Assert.Empty(again.BlobStore.LoadReport.Dropped);
        Assert.Null(again.BlobStore.CheckMasks());
        Assert.Equal(["v", "t", "s"], again.Lvols.OrderBy(l => l.Blob.Id).Select(l => l.Name));
        Assert.True(dev.LargestRead <= MdRegion.ChunkPages * 4096, $"largest read {dev.LargestRead}");
        Assert.True(dev.BytesRead - before >= (long)again.BlobStore.SuperBlockCopy.MdLen * 4096, "the whole md region was read");
        var back = new byte[8192];
        await again.BlobStore.ReadAsync(again.FindByName("t")!.Blob.Id, 500 * (ulong)cluster, back);
        Assert.Equal(data, back);
        await again.BlobStore.ReadAsync(again.FindByName("s")!.Blob.Id, 500 * (ulong)cluster, back);
        Assert.Equal(data, back);
        await again.BlobStore.ReadAsync(again.FindByName("v")!.Blob.Id, 0, back);
        Assert.Equal(data, back);
        Assert.Equal(snap.Blob.Id, again.FindByName("s")!.Blob.Id);
    }
}
