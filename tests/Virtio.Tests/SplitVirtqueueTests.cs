using System.Runtime.InteropServices;
using Xunit;

namespace VhostBackend.Virtio.Tests;

public sealed unsafe class SplitVirtqueueTests
{
    [Fact]
    public void StructSizesMatchTheSpec()
    {
        Assert.Equal(16, sizeof(VirtqDesc));
        Assert.Equal(0, (int)Marshal.OffsetOf<VirtqDesc>(nameof(VirtqDesc.Len)) - 8);
        Assert.Equal(12, (int)Marshal.OffsetOf<VirtqDesc>(nameof(VirtqDesc.Flags)));
        Assert.Equal(14, (int)Marshal.OffsetOf<VirtqDesc>(nameof(VirtqDesc.Next)));
        Assert.Equal(8, sizeof(VirtqUsedElem));
        Assert.Equal(6UL + (2 * 256), SplitVirtqueue.AvailRingBytes(256));
        Assert.Equal(6UL + (8 * 256), SplitVirtqueue.UsedRingBytes(256));
    }

    [Fact]
    public void ChainedRequestIsWalkedAndReturned()
    {
        using var m = new DriverRingModel();
        var q = m.CreateDeviceQueue();
        ulong hdr = m.Alloc(16), data = m.Alloc(4096), status = m.Alloc(1);
        m.SetDesc(3, hdr, 16, VirtqDesc.FlagNext, 5);
        m.SetDesc(5, data, 4096, VirtqDesc.FlagNext | VirtqDesc.FlagWrite, 7);
        m.SetDesc(7, status, 1, VirtqDesc.FlagWrite);
        Assert.Equal(PopResult.Empty, q.TryPop(out _));
        m.Publish(3);
        Assert.Equal(PopResult.Popped, q.TryPop(out ushort head));
        Assert.Equal(3, head);
        Span<DescSegment> segs = stackalloc DescSegment[8];
        Assert.Equal(ChainError.None, q.WalkChain(head, segs, out var info));
        Assert.Equal(3, info.SegmentCount);
        Assert.Equal(1, info.FirstWritable);
        Assert.Equal(16UL, info.ReadableBytes);
        Assert.Equal(4097UL, info.WritableBytes);
        Assert.Equal((nint)m.Host(data), segs[1].Host);
        Assert.True(segs[1].Writable);
        Assert.False(segs[0].Writable);

        q.PushUsed(head, 4097);
        Assert.Equal(1, m.UsedIdx);
        Assert.Equal((3u, 4097u), m.Used(0));
        Assert.Equal(PopResult.Empty, q.TryPop(out _));
    }

    [Fact]
    public void IndirectTableIsFollowed()
    {
        using var m = new DriverRingModel();
        var q = m.CreateDeviceQueue();
        ulong table = m.Alloc(48), hdr = m.Alloc(16), data = m.Alloc(512), status = m.Alloc(1);
        DriverRingModel.SetDescAt(m.Host(table), 0, hdr, 16, VirtqDesc.FlagNext, 2);
        DriverRingModel.SetDescAt(m.Host(table), 2, data, 512, VirtqDesc.FlagNext, 1);
        DriverRingModel.SetDescAt(m.Host(table), 1, status, 1, VirtqDesc.FlagWrite);
        m.SetDesc(0, table, 48, VirtqDesc.FlagIndirect);
        m.Publish(0);
        Assert.Equal(PopResult.Popped, q.TryPop(out ushort head));
        Span<DescSegment> segs = stackalloc DescSegment[8];
        Assert.Equal(ChainError.None, q.WalkChain(head, segs, out var info));
        Assert.Equal(3, info.SegmentCount);
        Assert.Equal(528UL, info.ReadableBytes);
        Assert.Equal(1UL, info.WritableBytes);
        Assert.Equal(2, info.FirstWritable);
    }

    [Fact]
    public void BufferCrossingRegionsIsSplit()
    {
        using var m = new DriverRingModel();
        var q = m.CreateDeviceQueue();
        ulong data = m.AllocAcrossRegions(8192);
        m.SetDesc(0, data, 8192, VirtqDesc.FlagWrite);
        m.Publish(0);
        q.TryPop(out ushort head);
        Span<DescSegment> segs = stackalloc DescSegment[8];
        Assert.Equal(ChainError.None, q.WalkChain(head, segs, out var info));
        Assert.Equal(2, info.SegmentCount);
        Assert.Equal(4096u, segs[0].Length);
        Assert.Equal(4096u, segs[1].Length);
        Assert.Equal((nint)m.Host(data), segs[0].Host);
        Assert.Equal((nint)m.Host(data + 4096), segs[1].Host);

        // Too few segments in the caller's buffer: refused, not overrun.
        Assert.Equal(ChainError.TooManySegments, q.WalkChain(head, segs[..1], out _));
    }

    [Theory]
    [InlineData("loop", ChainError.TooLong)]
    [InlineData("self", ChainError.TooLong)]
    [InlineData("next-out-of-range", ChainError.IndexOutOfRange)]
    [InlineData("nested-indirect", ChainError.NestedIndirect)]
    [InlineData("indirect-with-next", ChainError.IndirectWithNext)]
    [InlineData("indirect-zero", ChainError.BadIndirectLength)]
    [InlineData("indirect-odd", ChainError.BadIndirectLength)]
    [InlineData("indirect-loop", ChainError.TooLong)]
    [InlineData("addr-unmapped", ChainError.AddressNotMapped)]
    [InlineData("addr-past-end", ChainError.AddressNotMapped)]
    [InlineData("addr-overflow", ChainError.AddressNotMapped)]
    [InlineData("read-after-write", ChainError.ReadableAfterWritable)]
    [InlineData("indirect-unmapped", ChainError.AddressNotMapped)]
    public void MalformedChainsAreRefused(string kind, ChainError expected)
    {
        using var m = new DriverRingModel();
        var q = m.CreateDeviceQueue();
        ulong buf = m.Alloc(4096);
        ulong table = m.Alloc(64);
        byte* t = m.Host(table);
        switch (kind)
        {
            case "loop":
                m.SetDesc(0, buf, 16, VirtqDesc.FlagNext, 1);
                m.SetDesc(1, buf, 16, VirtqDesc.FlagNext, 0);
                break;
            case "self":
                m.SetDesc(0, buf, 16, VirtqDesc.FlagNext, 0);
                break;
            case "next-out-of-range":
                m.SetDesc(0, buf, 16, VirtqDesc.FlagNext, 16);
                break;
            case "nested-indirect":
                DriverRingModel.SetDescAt(t, 0, table, 32, VirtqDesc.FlagIndirect);
                m.SetDesc(0, table, 32, VirtqDesc.FlagIndirect);
                break;
            case "indirect-with-next":
                m.SetDesc(0, table, 32, VirtqDesc.FlagIndirect | VirtqDesc.FlagNext, 1);
                break;
            case "indirect-zero":
                m.SetDesc(0, table, 0, VirtqDesc.FlagIndirect);
                break;
            case "indirect-odd":
                m.SetDesc(0, table, 24, VirtqDesc.FlagIndirect);
                break;
            case "indirect-loop":
                DriverRingModel.SetDescAt(t, 0, buf, 16, VirtqDesc.FlagNext, 1);
                DriverRingModel.SetDescAt(t, 1, buf, 16, VirtqDesc.FlagNext, 0);
                m.SetDesc(0, table, 32, VirtqDesc.FlagIndirect);
                break;
            case "addr-unmapped":
                m.SetDesc(0, 0x1000, 16, 0);
                break;
            case "addr-past-end":
                m.SetDesc(0, DriverRingModel.GpaBase + (2 * DriverRingModel.RegionSize) - 8, 16, 0);
                break;
            case "addr-overflow":
                m.SetDesc(0, ulong.MaxValue - 4, 16, 0);
                break;
            case "read-after-write":
                m.SetDesc(0, buf, 16, VirtqDesc.FlagWrite | VirtqDesc.FlagNext, 1);
                m.SetDesc(1, buf, 16, 0);
                break;
            case "indirect-unmapped":
                m.SetDesc(0, 0x2000, 32, VirtqDesc.FlagIndirect);
                break;
        }

        m.Publish(0);
        Assert.Equal(PopResult.Popped, q.TryPop(out ushort head));
        Span<DescSegment> segs = stackalloc DescSegment[64];
        Assert.Equal(expected, q.WalkChain(head, segs, out _));
    }

    [Fact]
    public void AvailIndexTooFarAheadOrBadHeadBreaksQueue()
    {
        using var m = new DriverRingModel();
        var q = m.CreateDeviceQueue();
        m.SetAvailIdxRaw(17);
        Assert.Equal(PopResult.Broken, q.TryPop(out _));

        using var m2 = new DriverRingModel();
        var q2 = m2.CreateDeviceQueue();
        m2.Publish(16); // head index == size
        Assert.Equal(PopResult.Broken, q2.TryPop(out _));
    }

    [Fact]
    public void RingSetupIsValidated()
    {
        using var m = new DriverRingModel();
        Assert.Null(SplitVirtqueue.Create(m.Memory, 12, m.ToUva(m.DescGpa), m.ToUva(m.AvailGpa), m.ToUva(m.UsedGpa), false, 0, out _));
        Assert.Null(SplitVirtqueue.Create(m.Memory, 65536, m.ToUva(m.DescGpa), m.ToUva(m.AvailGpa), m.ToUva(m.UsedGpa), false, 0, out _));
        Assert.Null(SplitVirtqueue.Create(m.Memory, 16, m.ToUva(m.DescGpa) + 8, m.ToUva(m.AvailGpa), m.ToUva(m.UsedGpa), false, 0, out _));
        Assert.Null(SplitVirtqueue.Create(m.Memory, 16, m.ToUva(m.DescGpa), m.ToUva(m.AvailGpa) + 1, m.ToUva(m.UsedGpa), false, 0, out _));
        Assert.Null(SplitVirtqueue.Create(m.Memory, 16, m.ToUva(m.DescGpa), m.ToUva(m.AvailGpa), m.ToUva(m.UsedGpa) + 2, false, 0, out _));
        Assert.Null(SplitVirtqueue.Create(m.Memory, 16, 0x1000, m.ToUva(m.AvailGpa), m.ToUva(m.UsedGpa), false, 0, out _));

        // A used ring whose last bytes fall off the end of memory.
        ulong end = DriverRingModel.UvaBase + (2 * DriverRingModel.RegionSize);
        Assert.Null(SplitVirtqueue.Create(m.Memory, 16, m.ToUva(m.DescGpa), m.ToUva(m.AvailGpa), end - 64, false, 0, out var err));
        Assert.Contains("not inside", err);
        Assert.NotNull(SplitVirtqueue.Create(m.Memory, 16, m.ToUva(m.DescGpa), m.ToUva(m.AvailGpa), m.ToUva(m.UsedGpa), false, 0, out _));
    }

    [Fact]
    public void NoInterruptFlagSuppressesNotify()
    {
        using var m = new DriverRingModel();
        var q = m.CreateDeviceQueue();
        m.SetDesc(0, m.Alloc(16), 16, VirtqDesc.FlagWrite);
        m.Publish(0);
        q.TryPop(out ushort h);
        q.PushUsed(h, 1);
        Assert.True(q.NeedsNotify());
        m.AvailFlags = SplitVirtqueue.AvailFlagNoInterrupt;
        Assert.False(q.NeedsNotify());
    }

    [Fact]
    public void EventIdxMath()
    {
        // event in (old, new] => notify
        Assert.True(SplitVirtqueue.NeedEvent(5, 6, 5));
        Assert.False(SplitVirtqueue.NeedEvent(6, 6, 5));
        Assert.True(SplitVirtqueue.NeedEvent(3, 10, 0));
        Assert.False(SplitVirtqueue.NeedEvent(10, 10, 0));
        Assert.True(SplitVirtqueue.NeedEvent(65535, 1, 65534)); // wrap-around
        Assert.False(SplitVirtqueue.NeedEvent(1, 1, 65534));
    }

    [Fact]
    public void EventIdxDrivesNotificationsBothWays()
    {
        using var m = new DriverRingModel(eventIdx: true);
        var q = m.CreateDeviceQueue();
        ulong b = m.Alloc(16);
        for (ushort i = 0; i < 4; i++)
        {
            m.SetDesc(i, b, 16, VirtqDesc.FlagWrite);
            m.Publish(i);
        }

        // Driver wants an interrupt once used.idx passes 2 (used_event = 2 means "after entry 2 is used").
        m.UsedEvent = 2;
        for (int i = 0; i < 4; i++)
        {
            q.TryPop(out _);
        }

        q.PushUsed(0, 1);
        Assert.True(q.NeedsNotify()); // first notify is always sent
        q.PushUsed(1, 1);
        Assert.False(q.NeedsNotify()); // used.idx 2: event 2 not yet crossed
        q.PushUsed(2, 1);
        Assert.True(q.NeedsNotify()); // used.idx 3 crosses event 2
        q.PushUsed(3, 1);
        Assert.False(q.NeedsNotify());

        // Arming writes avail_event = last_avail_idx and re-checks.
        Assert.False(q.EnableNotify());
        Assert.Equal(4, m.AvailEvent);
        m.SetDesc(4, b, 16, VirtqDesc.FlagWrite);
        m.Publish(4);
        Assert.True(q.EnableNotify()); // work arrived: caller must not sleep
    }

    [Fact]
    public void NoNotifyFlagTogglesWithoutEventIdx()
    {
        using var m = new DriverRingModel();
        var q = m.CreateDeviceQueue();
        q.DisableNotify();
        Assert.Equal(SplitVirtqueue.UsedFlagNoNotify, m.UsedFlags);
        Assert.False(q.EnableNotify());
        Assert.Equal(0, m.UsedFlags);
    }

    [Fact]
    public void GuestMemoryTranslationIsBoundsChecked()
    {
        using var m = new DriverRingModel();
        var mem = m.Memory;
        Assert.True(mem.TryTranslateGpa(DriverRingModel.GpaBase, 16, out var h));
        Assert.Equal(m.HostBase, h);
        Assert.False(mem.TryTranslateGpa(DriverRingModel.GpaBase - 1, 1, out _));
        Assert.False(mem.TryTranslateGpa(DriverRingModel.GpaBase + DriverRingModel.RegionSize - 8, 16, out _)); // crosses regions
        Assert.False(mem.TryTranslateGpa(DriverRingModel.GpaBase, ulong.MaxValue, out _));
        Assert.False(mem.TryTranslateUva(ulong.MaxValue - 1, 4, out _));
        Assert.Equal(8UL, mem.TranslateGpaPrefix(DriverRingModel.GpaBase + DriverRingModel.RegionSize - 8, 16, out _));
        var a = new GuestMemoryRegion(0, 0x1000, 0x10000, 0, 0);
        var b = new GuestMemoryRegion(0xfff, 0x10, 0x20000, 0, 0);
        var c = new GuestMemoryRegion(0x1000, 0x10, 0x20000, 0, 0);
        Assert.True(GuestMemory.Overlaps(a, b));
        Assert.False(GuestMemory.Overlaps(a, c));
    }
}
