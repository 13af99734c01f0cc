using System.Buffers.Binary;

namespace VhostBackend.Blob.Tests;

/// <summary>A <see cref="MemoryBlobDevice"/> whose writes wait while <see cref="Gate"/> is set (holds the
/// metadata serializer inside an operation).</summary>
internal sealed class GatedBlobDevice(MemoryBlobDevice inner) : IBlobDevice
{
    public volatile Task? Gate;

    public MemoryBlobDevice Inner => inner;

    public int BlockSize => inner.BlockSize;

    public ulong BlockCount => inner.BlockCount;

    public ValueTask ReadAsync(ulong offset, Memory<byte> buffer) => inner.ReadAsync(offset, buffer);

    public async ValueTask WriteAsync(ulong offset, ReadOnlyMemory<byte> buffer)
    {
        var g = Gate;
        if (g != null)
        {
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
}
