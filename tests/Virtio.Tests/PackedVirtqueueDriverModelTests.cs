using VhostBackend.Platform;
using Xunit;

namespace VhostBackend.Virtio.Tests;

/// <summary>
/// Model tests: the packed driver side (<see cref="PackedVirtqueueDriver"/>) paired in-process with the device side
/// (<see cref="PackedVirtqueue"/>) over one memfd. The "device" is the test calling the device API by hand (and,
/// for hostile cases, writing the ring itself), not a vhost back end.
/// </summary>
public sealed unsafe class PackedVirtqueueDriverModelTests : IDisposable
{
    private const ulong Base = 0x10000;
    private const ulong Bytes = 1 << 20;
    private const ulong DriverArea = 0x4000;
    private const ulong DeviceArea = 0x4040;
    private readonly int _fd;
    private readonly MappedRegion _map;
    private readonly GuestMemory _mem;

    public PackedVirtqueueDriverModelTests()
    {
        _fd = MappedRegion.CreateMemFd("packed-driver-test", (long)Bytes);
        _map = MappedRegion.Map(_fd, Bytes);
        _mem = new GuestMemory([new GuestMemoryRegion(Base, Bytes, (ulong)_map.Pointer, 0, _map.Pointer)]);
    }

    public void Dispose()
    {
        _map.Dispose();
        Fd.Close(_fd);
    }

    private (PackedVirtqueueDriver Driver, PackedVirtqueue Device) Pair(ushort size, bool eventIdx = false)
    {
        var drv = new PackedVirtqueueDriver(_map.Pointer, _map.Pointer + (nint)DriverArea, _map.Pointer + (nint)DeviceArea, size, eventIdx);
        var dev = PackedVirtqueue.Create(_mem, size, (ulong)_map.Pointer, (ulong)_map.Pointer + DriverArea, (ulong)_map.Pointer + DeviceArea, eventIdx, drv.InitialVringBase, out var err);
        Assert.True(dev is not null, err);
        return (drv, dev!);
    }

    private byte* Host(ulong gpa) => (byte*)_map.Pointer + (nint)(gpa - Base);

    private VirtqPackedDesc* Ring => (VirtqPackedDesc*)_map.Pointer;

    private VirtqEventSuppress* DeviceEvent => (VirtqEventSuppress*)(_map.Pointer + (nint)DeviceArea);

    [Fact]
    public void ChainIsSeenByTheDeviceAndItsUsedDescriptorReturnsTheToken()
    {
        var (drv, dev) = Pair(16);
        Assert.True(drv.IsPacked);
        Assert.Equal(0x8000_8000u, dev.VringBase);
        ulong hdr = Base + 0x8000, data = Base + 0x9000, status = Base + 0xA000;
        *(uint*)Host(hdr) = 0xABCD;
        Assert.False(dev.HasAvailable);
        int id = drv.TryAdd([new(hdr, 16, 0), new(data, 4096, VirtqDesc.FlagWrite), new(status, 1, VirtqDesc.FlagWrite)], token: 42);
        Assert.True(id >= 0);
        Assert.Equal(13, drv.FreeCount);
        Assert.Equal(1, drv.InFlight);
        Assert.True(dev.HasAvailable);

        Assert.Equal(PopResult.Popped, dev.TryPop(out ushort h));
        Span<DescSegment> segs = stackalloc DescSegment[8];
        Assert.Equal(ChainError.None, dev.WalkChain(h, segs, out var info));
        Assert.Equal(3, info.SegmentCount);
        Assert.Equal(1, info.FirstWritable);
        Assert.Equal(4097UL, info.WritableBytes);
        Assert.Equal(0xABCDu, *(uint*)segs[0].Host);
        Assert.Equal((nint)Host(data), segs[1].Host);

        Assert.False(drv.HasUsed);
        Assert.Equal(UsedResult.Empty, drv.TryPopUsed(out _, out _));
        dev.PushUsed(h, 4097);
        Assert.True(drv.HasUsed);
        Assert.Equal(UsedResult.Popped, drv.TryPopUsed(out int token, out uint len));
        Assert.Equal(42, token);
        Assert.Equal(4097u, len);
        Assert.Equal(16, drv.FreeCount);
        Assert.Equal(0, drv.InFlight);
    }

    [Fact]
    public void OutOfOrderCompletionsAcrossManyLapsKeepIdsAndPositionsConsistent()
    {
        var (drv, dev) = Pair(8);
        var rng = new Random(11);
        var inFlight = new List<(ushort Head, int Token, int Length)>();
        int nextToken = 0;
        int completed = 0;
        var segs = new DescSegment[8];

        // Chains of 1..3 descriptors, completed in random order: the device's used descriptors land in ring order
        // while the chains they name are scattered, so both wrap counters flip many times.
        for (int round = 0; round < 5000; round++)
        {
            int n = 1 + rng.Next(3);
            var bufs = new DriverBuffer[n];
            for (int i = 0; i < n; i++)
            {
                bufs[i] = new DriverBuffer(Base + 0x8000 + (ulong)(i * 512), 512, i == n - 1 ? VirtqDesc.FlagWrite : (ushort)0);
            }

            int id = drv.TryAdd(bufs, nextToken);
            if (id >= 0)
            {
                Assert.Equal(PopResult.Popped, dev.TryPop(out ushort h));
                Assert.Equal(ChainError.None, dev.WalkChain(h, segs, out var info));
                Assert.Equal(n, info.SegmentCount);
                inFlight.Add((h, nextToken, n));
                nextToken++;
            }
            else
            {
                Assert.True(drv.FreeCount < n, "add failed with room in the ring");
            }

            if (inFlight.Count > 0 && (id < 0 || rng.Next(2) == 0))
            {
                int k = rng.Next(inFlight.Count);
                var done = inFlight[k];
                inFlight.RemoveAt(k);
                dev.PushUsed(done.Head, (uint)(round & 0xFFF));
                Assert.Equal(UsedResult.Popped, drv.TryPopUsed(out int token, out uint len));
                Assert.Equal(done.Token, token);
                Assert.Equal((uint)(round & 0xFFF), len);
                completed++;
            }

            Assert.Equal(inFlight.Count, drv.InFlight);
            Assert.Equal(8 - inFlight.Sum(c => c.Length), drv.FreeCount);
        }

        Assert.True(completed > 1000, $"only {completed} completions");
    }

    [Fact]
    public void UsedDescriptorNamingNoChainInFlightIsBroken()
    {
        var (drv, dev) = Pair(8);
        int id = drv.TryAdd([new(Base + 0x8000, 16, 0), new(Base + 0x9000, 1, VirtqDesc.FlagWrite)], token: 1);
        Assert.Equal(PopResult.Popped, dev.TryPop(out _));

        // A hostile device: a used descriptor (both flags = wrap 1) with an id out of range, then one not in flight.
        Ring[0].Id = 200;
        Volatile.Write(ref Ring[0].Flags, VirtqPackedDesc.FlagAvail | VirtqPackedDesc.FlagUsed);
        Assert.Equal(UsedResult.Broken, drv.TryPopUsed(out _, out _));
        Ring[0].Id = (ushort)((id + 1) % 8);
        Assert.Equal(UsedResult.Broken, drv.TryPopUsed(out _, out _));
        Assert.Equal(1, drv.InFlight);
        Ring[0].Id = (ushort)id;
        Assert.Equal(UsedResult.Popped, drv.TryPopUsed(out int token, out _));
        Assert.Equal(1, token);
    }

    [Fact]
    public void AddFailsWithoutChangesWhenDescriptorsRunOut()
    {
        var (drv, dev) = Pair(4);
        Assert.True(drv.TryAdd([new(Base + 0x8000, 16, 0), new(Base + 0x9000, 1, VirtqDesc.FlagWrite), new(Base + 0xA000, 1, VirtqDesc.FlagWrite)], 1) >= 0);
        Assert.Equal(-1, drv.TryAdd([new(Base + 0x8000, 16, 0), new(Base + 0x9000, 1, VirtqDesc.FlagWrite)], 2));
        Assert.Equal(1, drv.FreeCount);
        Assert.Equal(1, drv.InFlight);
        Assert.Equal(PopResult.Popped, dev.TryPop(out _));
        Assert.Equal(PopResult.Empty, dev.TryPop(out _));
        Assert.True(drv.TryAdd([new(Base + 0xB000, 1, VirtqDesc.FlagWrite)], 3) >= 0);
        Assert.Equal(PopResult.Popped, dev.TryPop(out _));
    }

    [Fact]
    public void KicksFollowTheDeviceEventSuppression()
    {
        var (drv, dev) = Pair(8);
        Assert.False(drv.NeedsKick()); // nothing added
        dev.DisableNotify();
        drv.TryAdd([new(Base + 0x8000, 1, VirtqDesc.FlagWrite)], 1);
        Assert.False(drv.NeedsKick());
        Assert.True(dev.EnableNotify()); // the chain added while kicks were off is found by the re-check
        drv.TryAdd([new(Base + 0x8000, 1, VirtqDesc.FlagWrite)], 2);
        Assert.True(drv.NeedsKick());
        Assert.False(drv.NeedsKick()); // once per batch
    }

    [Fact]
    public void EventIdxKicksOnlyWhenTheDeviceEventOffsetIsCrossed()
    {
        var (drv, _) = Pair(8, eventIdx: true);
        DeviceEvent->Flags = VirtqEventSuppress.Desc;

        // Event at position 3 of the first lap (wrap 1): adding positions 0-1 does not cross it, 2-3 does.
        DeviceEvent->OffWrap = 0x8000 | 3;
        drv.TryAdd([new(Base + 0x8000, 1, 0), new(Base + 0x9000, 1, VirtqDesc.FlagWrite)], 1);
        Assert.False(drv.NeedsKick());
        drv.TryAdd([new(Base + 0x8000, 1, 0), new(Base + 0x9000, 1, VirtqDesc.FlagWrite)], 2);
        Assert.True(drv.NeedsKick());

        // Event at position 1 of the second lap (wrap 0): positions 4-7 do not cross it, 0-1 of the next lap do.
        DeviceEvent->OffWrap = 1;
        drv.TryAdd([new(Base + 0x8000, 1, 0), new(Base + 0x9000, 1, VirtqDesc.FlagWrite)], 3);
        drv.TryAdd([new(Base + 0x8000, 1, 0), new(Base + 0x9000, 1, VirtqDesc.FlagWrite)], 4);
        Assert.False(drv.NeedsKick());
    }

    [Fact]
    public void InterruptsFollowTheDriverEventSuppression()
    {
        foreach (bool eventIdx in new[] { false, true })
        {
            var (drv, dev) = Pair(8, eventIdx);
            drv.DisableInterrupts();
            drv.TryAdd([new(Base + 0x9000, 1, VirtqDesc.FlagWrite)], 1);
            drv.TryAdd([new(Base + 0x9000, 1, VirtqDesc.FlagWrite)], 2);
            Assert.Equal(PopResult.Popped, dev.TryPop(out ushort h1));
            Assert.Equal(PopResult.Popped, dev.TryPop(out ushort h2));
            dev.PushUsed(h1, 1);
            Assert.False(dev.NeedsNotify());

            // Interrupts on: the used descriptor already there is reported (reap instead of sleeping).
            Assert.True(drv.EnableInterrupts());
            Assert.Equal(UsedResult.Popped, drv.TryPopUsed(out _, out _));
            Assert.False(drv.EnableInterrupts());
            dev.PushUsed(h2, 1);
            Assert.True(dev.NeedsNotify(), $"no interrupt with event_idx={eventIdx}");
            Assert.Equal(UsedResult.Popped, drv.TryPopUsed(out int t, out _));
            Assert.Equal(2, t);
        }
    }
}
