using VhostBackend.Platform;
using Xunit;

namespace VhostBackend.Virtio.Tests;

/// <summary>
/// Model tests: the driver side (<see cref="SplitVirtqueueDriver"/>) paired in-process with the existing device
/// side (<see cref="SplitVirtqueue"/>) over one memfd. The "device" here is the test calling the device API by
/// hand, not a vhost back end.
/// </summary>
public sealed unsafe class SplitVirtqueueDriverModelTests : IDisposable
{
    private const ulong Base = 0x10000;
    private const ulong Bytes = 1 << 20;
    private readonly int _fd;
    private readonly MappedRegion _map;
    private readonly GuestMemory _mem;

    public SplitVirtqueueDriverModelTests()
    {
        _fd = MappedRegion.CreateMemFd("driver-model-test", (long)Bytes);
        _map = MappedRegion.Map(_fd, Bytes);
        _mem = new GuestMemory([new GuestMemoryRegion(Base, Bytes, (ulong)_map.Pointer, 0, _map.Pointer)]);
    }

    public void Dispose()
    {
        _map.Dispose();
        Fd.Close(_fd);
    }

    private (SplitVirtqueueDriver Driver, SplitVirtqueue Device) Pair(ushort size, bool eventIdx = false)
    {
        var l = SplitVirtqueueDriver.Layout(size);
        var drv = new SplitVirtqueueDriver(_map.Pointer + (nint)l.Desc, _map.Pointer + (nint)l.Avail, _map.Pointer + (nint)l.Used, size, eventIdx);
        var dev = SplitVirtqueue.Create(_mem, size, (ulong)_map.Pointer + l.Desc, (ulong)_map.Pointer + l.Avail, (ulong)_map.Pointer + l.Used, eventIdx, 0, out var err);
        Assert.True(dev is not null, err);
        return (drv, dev!);
    }

    private byte* Host(ulong gpa) => (byte*)_map.Pointer + (nint)(gpa - Base);

    [Fact]
    public void LayoutIsAlignedAndFitsTheParts()
    {
        var l = SplitVirtqueueDriver.Layout(256);
        Assert.Equal(0UL, l.Desc);
        Assert.Equal(4096UL, l.Avail);
        Assert.Equal(0UL, l.Used % 4096);
        Assert.True(l.Used >= l.Avail + SplitVirtqueue.AvailRingBytes(256));
        Assert.True(l.Total >= l.Used + SplitVirtqueue.UsedRingBytes(256));
    }

    [Fact]
    public void ChainIsSeenByTheDeviceOnlyAfterPublish()
    {
        var (drv, dev) = Pair(16);
        ulong hdr = Base + 0x8000, data = Base + 0x9000, status = Base + 0xA000;
        *(uint*)Host(hdr) = 0xABCD;
        int head = drv.TryAdd([new(hdr, 16, 0), new(data, 4096, VirtqDesc.FlagWrite), new(status, 1, VirtqDesc.FlagWrite)], token: 42);
        Assert.True(head >= 0);
        Assert.Equal(13, drv.FreeCount);
        Assert.False(dev.HasAvailable);

        drv.Publish();
        Assert.Equal(PopResult.Popped, dev.TryPop(out ushort h));
        Assert.Equal(head, h);
        Span<DescSegment> segs = stackalloc DescSegment[8];
        Assert.Equal(ChainError.None, dev.WalkChain(h, segs, out var info));
        Assert.Equal(3, info.SegmentCount);
        Assert.Equal(1, info.FirstWritable);
        Assert.Equal(16UL, info.ReadableBytes);
        Assert.Equal(4097UL, info.WritableBytes);
        Assert.Equal(0xABCDu, *(uint*)segs[0].Host);
        Assert.Equal((nint)Host(data), segs[1].Host);

        Assert.Equal(UsedResult.Empty, drv.TryPopUsed(out _, out _));
        dev.PushUsed(h, 4097);
        Assert.Equal(UsedResult.Popped, drv.TryPopUsed(out int token, out uint len));
        Assert.Equal(42, token);
        Assert.Equal(4097u, len);
        Assert.Equal(16, drv.FreeCount);
        Assert.Equal(0, drv.InFlight);
    }

    [Fact]
    public void OutOfOrderCompletionsAndWrapAroundKeepTheFreeListConsistent()
    {
        var (drv, dev) = Pair(8);
        var rng = new Random(7);
        var heads = new List<ushort>();
        int nextToken = 0;
        var expected = new Dictionary<ushort, int>();
        int completed = 0;
        var segs = new DescSegment[8];

        // Many rounds so the 16-bit indices and the ring slots wrap; chains of 1..3 descriptors.
        for (int round = 0; round < 5000; round++)
        {
            int n = 1 + rng.Next(3);
            var bufs = new DriverBuffer[n];
            for (int i = 0; i < n; i++)
            {
                bufs[i] = new DriverBuffer(Base + 0x8000 + (ulong)(i * 512), 512, i == n - 1 ? VirtqDesc.FlagWrite : (ushort)0);
            }

            int head = drv.TryAdd(bufs, nextToken);
            if (head >= 0)
            {
                expected[(ushort)head] = nextToken++;
                drv.Publish();
                Assert.Equal(PopResult.Popped, dev.TryPop(out ushort h));
                Assert.Equal(head, h);
                Assert.Equal(ChainError.None, dev.WalkChain(h, segs, out var info));
                Assert.Equal(n, info.SegmentCount);
                heads.Add(h);
            }

            // Complete a random in-flight chain (out of order) about half the time, or when descriptors ran out.
            if (heads.Count > 0 && (head < 0 || rng.Next(2) == 0))
            {
                int k = rng.Next(heads.Count);
                ushort done = heads[k];
                heads.RemoveAt(k);
                dev.PushUsed(done, 1);
                Assert.Equal(UsedResult.Popped, drv.TryPopUsed(out int token, out _));
                Assert.Equal(expected[done], token);
                expected.Remove(done);
                completed++;
            }

            Assert.Equal(heads.Count, drv.InFlight);
        }

        Assert.True(completed > 1000, $"only {completed} completions");
        Assert.True(drv.FreeCount <= 8);
    }

    [Fact]
    public void AddFailsWithoutChangesWhenDescriptorsRunOut()
    {
        var (drv, _) = Pair(4);
        Assert.True(drv.TryAdd([new(Base, 1, 0), new(Base, 1, 0), new(Base, 1, 0)], 1) >= 0);
        Assert.Equal(-1, drv.TryAdd([new(Base, 1, 0), new(Base, 1, 0)], 2));
        Assert.Equal(1, drv.FreeCount);
        Assert.Equal(1, drv.InFlight);
        Assert.True(drv.TryAdd([new(Base, 1, 0)], 3) >= 0);
        Assert.Equal(0, drv.FreeCount);
    }

    [Fact]
    public void DeviceReturningAHeadNotInFlightIsReportedBroken()
    {
        var (drv, dev) = Pair(8);
        int head = drv.TryAdd([new(Base, 16, 0)], 1);
        drv.Publish();
        Assert.Equal(PopResult.Popped, dev.TryPop(out _));
        dev.PushUsed((ushort)((head + 1) % 8), 0); // a head we never handed out
        Assert.Equal(UsedResult.Broken, drv.TryPopUsed(out _, out _));
        Assert.Equal(1, drv.InFlight);
    }

    [Fact]
    public void DevicePublishingTooManyUsedEntriesIsReportedBroken()
    {
        var (drv, dev) = Pair(8);
        int head = drv.TryAdd([new(Base, 16, 0)], 1);
        drv.Publish();
        Assert.Equal(PopResult.Popped, dev.TryPop(out _));
        dev.PushUsed((ushort)head, 0);
        dev.PushUsed((ushort)head, 0); // twice: used.idx is two ahead with one chain in flight
        Assert.Equal(UsedResult.Broken, drv.TryPopUsed(out _, out _));
    }

    [Fact]
    public void KickFollowsNoNotifyFlagWithoutEventIdx()
    {
        var (drv, dev) = Pair(8);
        drv.TryAdd([new(Base, 16, 0)], 1);
        drv.Publish();
        Assert.True(drv.NeedsKick()); // device has notifications on by default
        Assert.False(drv.NeedsKick()); // nothing new published

        dev.DisableNotify(); // polling device sets VRING_USED_F_NO_NOTIFY
        drv.TryAdd([new(Base, 16, 0)], 2);
        drv.Publish();
        Assert.False(drv.NeedsKick());

        Assert.True(dev.EnableNotify()); // two unconsumed heads: the device must poll rather than sleep
        drv.TryAdd([new(Base, 16, 0)], 3);
        drv.Publish();
        Assert.True(drv.NeedsKick());
    }

    [Fact]
    public void KickFollowsAvailEventWithEventIdx()
    {
        var (drv, dev) = Pair(8, eventIdx: true);

        // The device arms notifications at avail index 0: the first publish crosses it.
        dev.EnableNotify();
        drv.TryAdd([new(Base, 16, 0)], 1);
        drv.Publish();
        Assert.True(drv.NeedsKick());

        // The device is polling (it stopped updating avail_event): the next publishes do not cross it.
        dev.DisableNotify();
        Assert.Equal(PopResult.Popped, dev.TryPop(out _));
        drv.TryAdd([new(Base, 16, 0)], 2);
        drv.Publish();
        Assert.False(drv.NeedsKick());

        // The device consumes what is there and re-arms at its position (2): the next publish crosses it again.
        Assert.Equal(PopResult.Popped, dev.TryPop(out _));
        Assert.False(dev.EnableNotify());
        drv.TryAdd([new(Base, 16, 0)], 3);
        drv.Publish();
        Assert.True(drv.NeedsKick());
    }

    [Fact]
    public void DisableInterruptsSuppressesTheDevicesNotification()
    {
        var (drv, dev) = Pair(8);
        drv.DisableInterrupts();
        int head = drv.TryAdd([new(Base, 16, 0)], 1);
        drv.Publish();
        Assert.Equal(PopResult.Popped, dev.TryPop(out _));
        dev.PushUsed((ushort)head, 0);
        Assert.False(dev.NeedsNotify());
    }
}
