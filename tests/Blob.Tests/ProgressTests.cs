namespace VhostBackend.Blob.Tests;

/// <summary>An inflate reports its cluster copy while it runs (what bdev_lvol_get_lvols shows as "progress").</summary>
public class ProgressTests
{
    private const int MiB = 1024 * 1024;

    /// <summary>A RAM device whose writes of whole clusters wait on a gate once armed (a model for a slow disk).</summary>
    private sealed class GatedDevice(MemoryBlobDevice inner, int clusterBytes) : IBlobDevice
    {
        public SemaphoreSlim Gate { get; } = new(0);

        public volatile bool Armed;

        public int BlockSize => inner.BlockSize;

        public ulong BlockCount => inner.BlockCount;

        public ValueTask ReadAsync(ulong offset, Memory<byte> buffer) => inner.ReadAsync(offset, buffer);

        public async ValueTask WriteAsync(ulong offset, ReadOnlyMemory<byte> buffer)
        {
            if (Armed && buffer.Length == clusterBytes)
            {
                await Gate.WaitAsync(TimeSpan.FromSeconds(30));
            }

            await inner.WriteAsync(offset, buffer);
        }

        public ValueTask WriteZeroesAsync(ulong offset, ulong length) => inner.WriteZeroesAsync(offset, length);

        public ValueTask FlushAsync() => inner.FlushAsync();
    }

    [Fact]
    public async Task InflateReportsClustersCopiedUntilItEnds()
    {
        const int cluster = 64 * 1024;
        var dev = new GatedDevice(new MemoryBlobDevice(512, 16 * MiB / 512), cluster);
        var lvs = await LvolStore.CreateAsync(dev, "lvs", cluster);
        var origin = await lvs.CreateLvolAsync("o", 4 * cluster, thinProvision: true);
        await lvs.WriteAsync(origin, 0, new byte[4 * cluster]);
        var snap = await lvs.SnapshotAsync(origin, "s");
        var clone = await lvs.CloneAsync(snap, "c");
        Assert.Null(clone.Blob.CopyProgress);

        dev.Armed = true;
        var inflate = lvs.InflateAsync(clone);
        await WaitFor(() => clone.Blob.CopyProgress is { Done: 0, Total: 4 });
        Assert.Equal("inflate", clone.Blob.CopyProgress!.Value.Operation);
        dev.Gate.Release(2);
        await WaitFor(() => clone.Blob.CopyProgress is { Done: 2, Total: 4 });
        dev.Gate.Release(2);
        dev.Armed = false;
        await inflate.WaitAsync(TimeSpan.FromSeconds(30));
        Assert.Null(clone.Blob.CopyProgress);
        Assert.False(clone.IsClone);
    }

    private static async Task WaitFor(Func<bool> condition)
    {
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(20);
        while (!condition())
        {
            Assert.True(DateTime.UtcNow < deadline, "progress never reached the expected state");
            await Task.Delay(10);
        }
    }
}
