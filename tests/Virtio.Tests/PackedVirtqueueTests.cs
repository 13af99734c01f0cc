using System.Runtime.InteropServices;
using Xunit;

namespace VhostBackend.Virtio.Tests;

/// <summary>The device side of the packed ring against <see cref="PackedDriverModel"/> (a model of Linux's packed driver).</summary>
public sealed unsafe class PackedVirtqueueTests
{
    [Fact]
    public void StructLayoutsMatchTheSpec()
    {
        Assert.Equal(16, sizeof(VirtqPackedDesc));
        Assert.Equal(8, (int)Marshal.OffsetOf<VirtqPackedDesc>(nameof(VirtqPackedDesc.Len)));
        Assert.Equal(12, (int)Marshal.OffsetOf<VirtqPackedDesc>(nameof(VirtqPackedDesc.Id)));
        Assert.Equal(14, (int)Marshal.OffsetOf<VirtqPackedDesc>(nameof(VirtqPackedDesc.Flags)));
        Assert.Equal(4, sizeof(VirtqEventSuppress));
        Assert.Equal(2, (int)Marshal.OffsetOf<VirtqEventSuppress>(nameof(VirtqEventSuppress.Flags)));
    }

    [Fact]
    public void ChainIsPoppedWalkedAndReturned()
    {
        using var m = new PackedDriverModel();
        var q = m.CreateDeviceQueue();
        Assert.False(q.HasAvailable);
        Assert.Equal(PopResult.Empty, q.TryPop(out _));
        ulong hdr = m.Alloc(16), data = m.Alloc(4096), status = m.Alloc(1);
        m.Add(5, (hdr, 16, false), (data, 4096, true), (status, 1, true));
        Assert.True(q.HasAvailable);
        Assert.Equal(PopResult.Popped, q.TryPop(out ushort id));
        Assert.Equal(5, id);
        Span<DescSegment> segs = stackalloc DescSegment[8];
        Assert.Equal(ChainError.None, q.WalkChain(id, segs, out var info));
        Assert.Equal(3, info.SegmentCount);
        Assert.Equal(1, info.FirstWritable);
        Assert.Equal(16UL, info.ReadableBytes);
        Assert.Equal(4097UL, info.WritableBytes);
        Assert.Equal((nint)m.Host(data), segs[1].Host);
        Assert.Equal(PopResult.Empty, q.TryPop(out _));

        Assert.False(m.TryGetUsed(out _, out _));
        q.PushUsed(id, 4097);
        Assert.True(m.TryGetUsed(out ushort usedId, out uint len));
        Assert.Equal((5, 4097u), (usedId, len));
        Assert.Equal(3, m.UsedPos); // skipped the chain's three slots
        Assert.False(m.TryGetUsed(out _, out _));
    }

    [Fact]
    public void IndirectTableIsFollowed()
    {
        using var m = new PackedDriverModel();
        var q = m.CreateDeviceQueue();
        ulong hdr = m.Alloc(16), data = m.Alloc(512), status = m.Alloc(1);
        m.AddIndirect(2, (hdr, 16, false), (data, 512, false), (status, 1, true));
        Assert.Equal(PopResult.Popped, q.TryPop(out ushort id));
        Assert.Equal(2, id);
        Span<DescSegment> segs = stackalloc DescSegment[8];
        Assert.Equal(ChainError.None, q.WalkChain(id, segs, out var info));
        Assert.Equal(3, info.SegmentCount);
        Assert.Equal(528UL, info.ReadableBytes);
        Assert.Equal(1UL, info.WritableBytes);
        Assert.Equal(2, info.FirstWritable);
        q.PushUsed(id, 1);
        Assert.True(m.TryGetUsed(out ushort u, out _));
        Assert.Equal(2, u);
        Assert.Equal(1, m.UsedPos);
    }

    [Fact]
    public void BufferCrossingRegionsIsSplit()
    {
        using var m = new PackedDriverModel();
        var q = m.CreateDeviceQueue();
        m.Add(0, (PackedDriverModel.GpaBase + PackedDriverModel.RegionSize - 4096, 8192, true));
        q.TryPop(out ushort id);
        Span<DescSegment> segs = stackalloc DescSegment[8];
        Assert.Equal(ChainError.None, q.WalkChain(id, segs, out var info));
        Assert.Equal(2, info.SegmentCount);
    }

    /// <summary>
    /// Many laps of a small ring with chains of 1..3 descriptors completed out of order: every id comes back once
    /// with its length, the wrap counters flip on both sides, and GET_VRING_BASE's value restarts a queue where the
    /// old one stopped.
    /// </summary>
    [Theory]
    [InlineData(4)]
    [InlineData(8)]
    [InlineData(16)]
    public void OutOfOrderCompletionsOverManyLaps(int size)
    {
        using var m = new PackedDriverModel((ushort)size);
        var q = m.CreateDeviceQueue();
        var rnd = new Random(size);
        var freeIds = new Queue<ushort>(Enumerable.Range(0, size).Select(i => (ushort)i));
        var inFlight = new List<(ushort Id, uint Len)>();
        var outstanding = new Dictionary<ushort, uint>();
        int freeSlots = size, completed = 0;
        var chainOf = new int[size];
        ulong buf = m.Alloc(64);
        Span<DescSegment> segs = stackalloc DescSegment[8];
        for (int step = 0; step < 2000; step++)
        {
            // Driver: add a chain while it has slots and ids.
            int n = rnd.Next(1, 4);
            if (n <= freeSlots && freeIds.Count > 0 && rnd.Next(3) != 0)
            {
                ushort id = freeIds.Dequeue();
                var bufs = Enumerable.Range(0, n).Select(i => (buf, (uint)(8 + i), i == n - 1)).ToArray();
                m.Add(id, bufs);
                chainOf[id] = n;
                freeSlots -= n;
                uint expect = (uint)rnd.Next(1, 1000);
                outstanding[id] = expect;
            }

            // Device: pop everything, complete a random one.
            while (q.TryPop(out ushort popped) == PopResult.Popped)
            {
                Assert.Equal(ChainError.None, q.WalkChain(popped, segs, out var info));
                Assert.Equal(chainOf[popped], info.Descriptors);
                inFlight.Add((popped, outstanding[popped]));
            }

            if (inFlight.Count > 0 && rnd.Next(2) == 0)
            {
                int k = rnd.Next(inFlight.Count);
                var (id, len) = inFlight[k];
                inFlight.RemoveAt(k);
                q.PushUsed(id, len);
            }

            // Driver: reap.
            while (m.TryGetUsed(out ushort id, out uint len))
            {
                Assert.True(outstanding.Remove(id, out uint expect), $"id {id} returned twice");
                Assert.Equal(expect, len);
                freeSlots += chainOf[id];
                freeIds.Enqueue(id);
                completed++;
            }

            // Now and then: stop with nothing in flight and restart from GET_VRING_BASE's value.
            if (inFlight.Count == 0 && outstanding.Count == 0 && rnd.Next(10) == 0)
            {
                uint vringBase = q.VringBase;
                Assert.Equal(m.AvailPos, (ushort)(vringBase & 0x7FFF));
                Assert.Equal(m.AvailWrap, (vringBase & 0x8000) != 0);
                Assert.Equal(m.UsedPos, (ushort)((vringBase >> 16) & 0x7FFF));
                Assert.Equal(m.UsedWrap, (vringBase & 0x8000_0000) != 0);
                q = m.CreateDeviceQueue(vringBase);
            }
        }

        Assert.True(completed > 300, $"only {completed} completions");
    }

    [Fact]
    public void HostileDriverIsRefusedWithoutCrashing()
    {
        Span<DescSegment> segs = stackalloc DescSegment[4];

        // An id beyond the ring.
        using (var m = new PackedDriverModel(8))
        {
            var q = m.CreateDeviceQueue();
            m.AddRaw(8, m.Alloc(16), 16, 0);
            Assert.Equal(PopResult.Broken, q.TryPop(out _));
        }

        // NEXT on every descriptor: a chain that never ends is bounded by the ring size.
        using (var m = new PackedDriverModel(8))
        {
            var q = m.CreateDeviceQueue();
            ulong b = m.Alloc(16);
            for (int i = 0; i < 8; i++)
            {
                m.AddRaw(1, b, 16, VirtqPackedDesc.FlagNext);
            }

            Assert.Equal(PopResult.Broken, q.TryPop(out _));
        }

        using (var m = new PackedDriverModel(8))
        {
            var q = m.CreateDeviceQueue();
            ulong b = m.Alloc(64);

            // Indirect tables: empty, not a multiple of 16, outside memory; indirect with NEXT.
            m.AddRaw(0, b, 0, VirtqPackedDesc.FlagIndirect);
            Assert.Equal(PopResult.Popped, q.TryPop(out ushort id));
            Assert.Equal(ChainError.BadIndirectLength, q.WalkChain(id, segs, out _));
            q.PushUsed(id, 0);
            m.AddRaw(1, b, 24, VirtqPackedDesc.FlagIndirect);
            Assert.Equal(PopResult.Popped, q.TryPop(out id));
            Assert.Equal(ChainError.BadIndirectLength, q.WalkChain(id, segs, out _));
            q.PushUsed(id, 0);
            m.AddRaw(2, 0x7000_0000, 32, VirtqPackedDesc.FlagIndirect);
            Assert.Equal(PopResult.Popped, q.TryPop(out id));
            Assert.Equal(ChainError.AddressNotMapped, q.WalkChain(id, segs, out _));
            q.PushUsed(id, 0);

            // A buffer outside guest memory; a readable buffer after a writable one.
            m.Add(3, (0x7000_0000, 16, false));
            Assert.Equal(PopResult.Popped, q.TryPop(out id));
            Assert.Equal(ChainError.AddressNotMapped, q.WalkChain(id, segs, out _));
            q.PushUsed(id, 0);
            m.Add(4, (b, 16, true), (b, 16, false));
            Assert.Equal(PopResult.Popped, q.TryPop(out id));
            Assert.Equal(ChainError.ReadableAfterWritable, q.WalkChain(id, segs, out _));
            q.PushUsed(id, 0);

            // More segments than the caller holds.
            m.Add(5, (b, 1, false), (b, 1, false), (b, 1, false), (b, 1, false), (b, 1, false));
            Assert.Equal(PopResult.Popped, q.TryPop(out id));
            Assert.Equal(ChainError.TooManySegments, q.WalkChain(id, segs, out _));
            q.PushUsed(id, 0);

            // Ids never popped are ignored by AddUsed and WalkChain (no out-of-range access).
            Assert.Equal(ChainError.IndexOutOfRange, q.WalkChain(100, segs, out _));
            q.AddUsed(100, 0);
        }

        // A base whose positions lie beyond the ring is taken modulo its size.
        using (var m = new PackedDriverModel(8))
        {
            var q = m.CreateDeviceQueue(0x7FFF_7FFF);
            Assert.Equal(7, q.LastAvailIdx);
            Assert.Equal(7, q.LastUsedIdx);
        }
    }

    [Fact]
    public void RingsOutsideMemoryOrMisalignedAreRefused()
    {
        using var m = new PackedDriverModel(8);
        Assert.Null(PackedVirtqueue.Create(m.Memory, 8, m.ToUva(m.RingGpa) + 8, m.ToUva(m.DriverEventGpa), m.ToUva(m.DeviceEventGpa), false, PackedVirtqueue.InitialBase, out _));
        Assert.Null(PackedVirtqueue.Create(m.Memory, 8, m.ToUva(m.RingGpa), m.ToUva(m.DriverEventGpa) + 2, m.ToUva(m.DeviceEventGpa), false, PackedVirtqueue.InitialBase, out _));
        Assert.Null(PackedVirtqueue.Create(m.Memory, 8, 0x1000, m.ToUva(m.DriverEventGpa), m.ToUva(m.DeviceEventGpa), false, PackedVirtqueue.InitialBase, out _));
        Assert.Null(PackedVirtqueue.Create(m.Memory, 6, m.ToUva(m.RingGpa), m.ToUva(m.DriverEventGpa), m.ToUva(m.DeviceEventGpa), false, PackedVirtqueue.InitialBase, out _));
        Assert.Null(PackedVirtqueue.Create(m.Memory, 8, PackedDriverModel.UvaBase + (2 * PackedDriverModel.RegionSize) - 64, m.ToUva(m.DriverEventGpa), m.ToUva(m.DeviceEventGpa), false, PackedVirtqueue.InitialBase, out _));
    }

    [Fact]
    public void DeviceEventSuppressionControlsKicks()
    {
        using var m = new PackedDriverModel(8);
        var q = m.CreateDeviceQueue();
        q.DisableNotify();
        Assert.Equal(VirtqEventSuppress.Disable, m.DeviceEventFlags);
        Assert.False(q.EnableNotify());
        Assert.Equal(VirtqEventSuppress.Enable, m.DeviceEventFlags);
        m.Add(0, (m.Alloc(16), 16, false));
        Assert.True(q.EnableNotify()); // a buffer arrived: poll, do not sleep
        q.DisableNotify();
        Assert.Equal(VirtqEventSuppress.Disable, m.DeviceEventFlags);
    }

    [Fact]
    public void DriverEventSuppressionControlsInterrupts()
    {
        using var m = new PackedDriverModel(8);
        var q = m.CreateDeviceQueue();
        ulong b = m.Alloc(16);
        void Complete(ushort id)
        {
            m.Add(id, (b, 16, true));
            Assert.Equal(PopResult.Popped, q.TryPop(out ushort p));
            q.PushUsed(p, 16);
            Assert.True(m.TryGetUsed(out _, out _));
        }

        m.SetDriverEvent(VirtqEventSuppress.Disable);
        Complete(0);
        Assert.False(q.NeedsNotify());
        m.SetDriverEvent(VirtqEventSuppress.Enable);
        Complete(1);
        Assert.True(q.NeedsNotify());
        // DESC without EVENT_IDX negotiated: treated as enabled.
        m.SetDriverEvent(VirtqEventSuppress.Desc, 5 | 0x8000);
        Complete(2);
        Assert.True(q.NeedsNotify());
    }

    [Fact]
    public void EventIdxInterruptsWhenTheDriversDescriptorIsUsed()
    {
        using var m = new PackedDriverModel(8, eventIdx: true);
        var q = m.CreateDeviceQueue();
        ulong b = m.Alloc(16);
        ushort next = 0;
        void Complete()
        {
            ushort id = (ushort)(next++ % 8);
            m.Add(id, (b, 16, true));
            Assert.Equal(PopResult.Popped, q.TryPop(out ushort p));
            q.PushUsed(p, 16);
            Assert.True(m.TryGetUsed(out _, out _));
        }

        // First signal always goes out.
        Complete();
        Assert.True(q.NeedsNotify());

        // The driver wants an interrupt once slot 3 of this lap (wrap 1) is used.
        m.SetDriverEvent(VirtqEventSuppress.Desc, 3 | 0x8000);
        Complete(); // slot 1
        Assert.False(q.NeedsNotify());
        Complete(); // slot 2
        Assert.False(q.NeedsNotify());
        Complete(); // slot 3
        Assert.True(q.NeedsNotify());

        // Across the wrap: the event at slot 1 of the next lap (wrap 0).
        m.SetDriverEvent(VirtqEventSuppress.Desc, 1);
        for (int i = 0; i < 5; i++)
        {
            Complete(); // slots 4..7, then 0 of the next lap
        }

        Assert.False(q.NeedsNotify());
        Complete(); // slot 1, wrap 0
        Assert.True(q.NeedsNotify());

        // Several completions at once crossing the wrap; the event lies among them.
        m.SetDriverEvent(VirtqEventSuppress.Desc, 0x8000 | 1); // slot 1 of the lap after
        for (int i = 0; i < 8; i++)
        {
            Complete(); // slots 2..7 (wrap 0), then 0, 1 (wrap 1)
        }

        Assert.True(q.NeedsNotify());
    }
}
