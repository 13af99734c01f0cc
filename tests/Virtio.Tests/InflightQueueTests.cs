using System.Runtime.InteropServices;
using VhostBackend.Virtio;
using Xunit;

namespace VhostBackend.Virtio.Tests;

/// <summary>The in-flight region protocol (QEMU's split layout): marking, batches, and recovery after a crash at each step.</summary>
public sealed class InflightQueueTests : IDisposable
{
    private const ushort Size = 8;
    private readonly nint _mem = Marshal.AllocHGlobal((int)InflightQueue.RegionBytes(Size));

    public InflightQueueTests() => new Span<byte>(new byte[InflightQueue.RegionBytes(Size)]).CopyTo(Bytes());

    public void Dispose() => Marshal.FreeHGlobal(_mem);

    private unsafe Span<byte> Bytes() => new((void*)_mem, (int)InflightQueue.RegionBytes(Size));

    [Fact]
    public void LayoutIsQemusSplitRegion()
    {
        Assert.Equal(192UL, InflightQueue.RegionBytes(8)); // 16 + 8 * 16, rounded up to 64
        Assert.Equal(2112UL, InflightQueue.RegionBytes(128)); // 16 + 2048, rounded up to 64
        var q = new InflightQueue(_mem, Size);
        Assert.Empty(q.Recover(0, out bool reset));
        Assert.False(reset);
        Assert.Equal(1, MemoryMarshal.Read<ushort>(Bytes()[8..])); // version
        Assert.Equal(Size, MemoryMarshal.Read<ushort>(Bytes()[10..])); // desc_num
        q.Begin(5);
        Assert.Equal(1, Bytes()[16 + (16 * 5)]); // desc[5].inflight
    }

    [Fact]
    public void CompletedBatchesAreClearedOnlyAfterThePublish()
    {
        var q = new InflightQueue(_mem, Size);
        q.Recover(0, out _);
        q.Begin(3);
        q.Begin(1);
        q.Begin(6);
        q.AddUsed(1);
        q.AddUsed(6);
        Assert.True(q.IsInflight(1)); // used entry written, used.idx not yet published

        // Crash here (used.idx never published): all three are resubmitted, oldest first.
        var before = new InflightQueue(_mem, Size);
        Assert.Equal(new ushort[] { 3, 1, 6 }, Snapshot().Recover(0, out _));

        // Published (used.idx = 2) but the flags not cleared yet when the back end died: recovery clears the batch.
        Restore();
        Assert.Equal(new ushort[] { 3 }, new InflightQueue(_mem, Size).Recover(2, out _));

        // Normal path: the commit clears them; a later restart finds only 3, and new heads keep the order going.
        Restore();
        q.CommitUsed(2);
        Assert.False(q.IsInflight(1) || q.IsInflight(6));
        var r = new InflightQueue(_mem, Size);
        Assert.Equal(new ushort[] { 3 }, r.Recover(2, out _));
        r.Begin(0);
        Assert.Equal(new ushort[] { 3, 0 }, new InflightQueue(_mem, Size).Recover(2, out _));
        GC.KeepAlive(before);
    }

    [Fact]
    public void AMismatchedOrGarbageRegionIsBounded()
    {
        // desc_num of another queue size: reset, nothing resubmitted.
        Bytes().Fill(0xFF);
        MemoryMarshal.Write(Bytes()[8..], (ushort)1);
        MemoryMarshal.Write(Bytes()[10..], (ushort)64);
        Assert.Empty(new InflightQueue(_mem, Size).Recover(0, out bool reset));
        Assert.True(reset);

        // Right size, garbage content: heads are all in range, the batch walk ends at a head past the ring.
        Bytes().Fill(0xFF);
        MemoryMarshal.Write(Bytes()[8..], (ushort)1);
        MemoryMarshal.Write(Bytes()[10..], Size);
        var heads = new InflightQueue(_mem, Size).Recover(7, out _);
        Assert.All(heads, h => Assert.True(h < Size));
        Assert.Throws<ArgumentException>(() => new InflightQueue(_mem, 100));
    }

    private byte[]? _saved;

    // Saves the region (the state a crash would leave) and returns a fresh view on it.
    private InflightQueue Snapshot()
    {
        _saved = Bytes().ToArray();
        return new InflightQueue(_mem, Size);
    }

    private void Restore() => _saved.AsSpan().CopyTo(Bytes());
}
