using VhostBackend.Platform;
using Xunit;

namespace VhostBackend.Virtio.Tests;

/// <summary>The live-migration dirty log: bit layout, bounds, and what the rings and device writes mark.</summary>
public sealed unsafe class DirtyLogTests
{
    private sealed class LogBuffer : IDisposable
    {
        private readonly int _fd;
        private readonly MappedRegion _map;
        private readonly ulong _bytes;
        private readonly ulong _offset;

        public LogBuffer(ulong bytes, ulong offset = 0)
        {
            _fd = MappedRegion.CreateMemFd("dirty-log", (long)(bytes + offset + 8));
            _map = MappedRegion.Map(_fd, bytes + offset + 8);
            _bytes = bytes;
            _offset = offset;
            Log = new DirtyLog(_map.Pointer + (nint)offset, bytes);
        }

        public DirtyLog Log { get; }
        public Span<byte> Raw => new((byte*)_map.Pointer + _offset, (int)_bytes);
        public Span<byte> Guard => new((byte*)_map.Pointer + _offset + _bytes, 8);
        public Span<byte> Before => new((byte*)_map.Pointer, (int)_offset);

        public void Dispose()
        {
            _map.Dispose();
            Fd.Close(_fd);
        }
    }

    [Theory]
    [InlineData(0UL)]
    [InlineData(1UL)]
    [InlineData(3UL)]
    public void PagesMapToBitsAsVhostUserSays(ulong offset)
    {
        using var b = new LogBuffer(16, offset);
        b.Log.Mark(0, 1);                       // page 0: byte 0 bit 0
        b.Log.Mark((9 << 12) + 100, 1);         // page 9: byte 1 bit 1
        b.Log.Mark((20 << 12) + 4095, 2);       // pages 20 and 21: byte 2 bits 4, 5
        Assert.Equal(0x01, b.Raw[0]);
        Assert.Equal(0x02, b.Raw[1]);
        Assert.Equal(0x30, b.Raw[2]);
        Assert.True(b.Log.IsDirty(21 << 12));
        Assert.False(b.Log.IsDirty(22 << 12));

        // A range over many pages, and pages past the log (ignored, nothing written outside it).
        b.Log.Mark(64UL << 12, 16UL << 12);     // pages 64..79: bytes 8, 9
        Assert.Equal(0xFF, b.Raw[8]);
        Assert.Equal(0xFF, b.Raw[9]);
        b.Log.Mark(128UL << 12, 1UL << 30);
        b.Log.Mark(ulong.MaxValue - 10, 100);   // wraps: clamped, past the log
        Assert.All(b.Guard.ToArray(), x => Assert.Equal(0, x));
        Assert.All(b.Before.ToArray(), x => Assert.Equal(0, x));
        Assert.Equal(16UL * 8 * 4096, b.Log.CoveredBytes);
    }

    [Fact]
    public void SplitRingLogsUsedWritesAtLogGuestAddrAndDataWrites()
    {
        using var m = new DriverRingModel(16);
        var q = m.CreateDeviceQueue();
        using var b = new LogBuffer(512); // covers 16 MiB
        q.SetDirtyLog(b.Log, logRing: true, ringLogGpa: m.UsedGpa);
        ulong hdr = m.Alloc(16), data = m.Alloc(8192, 4096), status = m.Alloc(1);
        m.SetDesc(0, hdr, 16, VirtqDesc.FlagNext, 1);
        m.SetDesc(1, data, 8192, VirtqDesc.FlagNext | VirtqDesc.FlagWrite, 2);
        m.SetDesc(2, status, 1, VirtqDesc.FlagWrite);
        m.Publish(0);
        Assert.Equal(PopResult.Popped, q.TryPop(out ushort head));
        Span<DescSegment> segs = stackalloc DescSegment[8];
        Assert.Equal(ChainError.None, q.WalkChain(head, segs, out var info));
        Assert.False(b.Log.IsDirty(data));
        q.LogWrites(segs, info.FirstWritable, info.SegmentCount);
        Assert.True(b.Log.IsDirty(data));
        Assert.True(b.Log.IsDirty(data + 4096));
        Assert.True(b.Log.IsDirty(status));
        Assert.False(b.Log.IsDirty(data + 8192 + 4096 + 4096));
        Assert.False(b.Log.IsDirty(m.UsedGpa));
        q.PushUsed(head, 8193);
        Assert.True(b.Log.IsDirty(m.UsedGpa));

        // Without VHOST_VRING_F_LOG the ring is not logged (data still is).
        using var b2 = new LogBuffer(512);
        q.SetDirtyLog(b2.Log, logRing: false, ringLogGpa: m.UsedGpa);
        m.Publish(0);
        q.TryPop(out head);
        q.WalkChain(head, segs, out info);
        q.LogWrites(segs, info.FirstWritable, info.SegmentCount);
        q.PushUsed(head, 1);
        Assert.False(b2.Log.IsDirty(m.UsedGpa));
        Assert.True(b2.Log.IsDirty(data));
    }

    [Fact]
    public void PackedRingLogsUsedDescriptorsAndDataWrites()
    {
        using var m = new PackedDriverModel(8);
        var q = m.CreateDeviceQueue();
        using var b = new LogBuffer(512);
        q.SetDirtyLog(b.Log, logRing: true, ringLogGpa: m.DeviceEventGpa);
        ulong data = m.Alloc(4096, 4096);
        m.Add(3, (data, 4096, true));
        Assert.Equal(PopResult.Popped, q.TryPop(out ushort id));
        Span<DescSegment> segs = stackalloc DescSegment[4];
        q.WalkChain(id, segs, out var info);
        q.LogWrites(segs, info.FirstWritable, info.SegmentCount);
        Assert.True(b.Log.IsDirty(data));
        Assert.False(b.Log.IsDirty(m.RingGpa));
        q.PushUsed(id, 4096);
        Assert.True(b.Log.IsDirty(m.RingGpa));
        q.DisableNotify();
        Assert.True(b.Log.IsDirty(m.DeviceEventGpa));
    }
}
