using System.Runtime.InteropServices;
using Xunit;

namespace VhostBackend.Virtio.Tests;

/// <summary>
/// The in-flight region protocol for packed rings (QEMU's QueueRegionPacked) against the packed driver model: the
/// layout, a crash at each step of a completion (before the used descriptor reached the ring: rolled back and
/// resubmitted; after: committed, not resubmitted), a full ring in flight, and the ring position derived from the
/// region whatever base the front end sends.
/// </summary>
public sealed unsafe class InflightPackedQueueTests : IDisposable
{
    private const ushort Size = 8;
    private readonly nint _mem = Marshal.AllocHGlobal((int)InflightPackedQueue.RegionBytes(Size));
    private readonly PackedDriverModel _p = new(Size);

    public InflightPackedQueueTests() => Bytes().Clear();

    public void Dispose()
    {
        Marshal.FreeHGlobal(_mem);
        _p.Dispose();
    }

    private Span<byte> Bytes() => new((void*)_mem, (int)InflightPackedQueue.RegionBytes(Size));

    private ushort U16(int offset) => MemoryMarshal.Read<ushort>(Bytes()[offset..]);

    [Fact]
    public void Layout_is_qemus_packed_region()
    {
        Assert.Equal(320UL, InflightPackedQueue.RegionBytes(8)); // 32 + 8 * 32, rounded up to 64
        Assert.Equal(4160UL, InflightPackedQueue.RegionBytes(128)); // 32 + 4096, rounded up to 64
        var (q, vq) = Fresh();
        Assert.Equal(1, U16(8)); // version
        Assert.Equal(Size, U16(10)); // desc_num
        Assert.Equal(1, Bytes()[20]); // used_wrap_counter
        Assert.Equal(1, U16(32 + 2)); // desc[0].next

        // One chain of two descriptors: entries 0 (head) and 1, free_head 2.
        _p.Add(5, (0x200000, 16, false), (0x201000, 1, true));
        Assert.Equal(PopResult.Popped, vq.TryPop(out ushort id));
        q.Begin(id);
        Assert.Equal(1, Bytes()[32]); // desc[0].inflight
        Assert.Equal(1, U16(32 + 4)); // desc[0].last
        Assert.Equal(2, U16(32 + 6)); // desc[0].num
        Assert.Equal(5, U16(64 + 16)); // desc[1].id
        Assert.Equal(0x201000UL, MemoryMarshal.Read<ulong>(Bytes()[(64 + 24)..])); // desc[1].addr
        Assert.Equal(2, U16(12)); // free_head
        Assert.Equal(2, U16(14)); // old_free_head

        q.AddUsed(5);
        vq.AddUsed(5, 1);
        q.UsedWritten(5);
        Assert.Equal(0, Bytes()[32]);
        Assert.Equal(0, U16(12)); // the chain is back at the head of the free list
        Assert.Equal(2, U16(16)); // used_idx
        Assert.Equal(2, U16(18)); // old_used_idx
    }

    [Fact]
    public void A_crash_before_the_used_descriptor_is_rolled_back_and_after_it_committed()
    {
        var (q, vq) = Fresh();
        _p.Add(0, (0x200000, 16, false), (0x201000, 1, true));
        _p.Add(1, (0x202000, 16, false));
        _p.Add(2, (0x203000, 16, false));
        for (int i = 0; i < 3; i++)
        {
            Assert.Equal(PopResult.Popped, vq.TryPop(out ushort id));
            q.Begin(id);
        }

        // id 1 completed out of order and the driver saw it; id 2's used descriptor reached the ring, but the
        // back end died before it committed (inflight still 1, old_used_idx behind).
        Complete(q, vq, 1);
        Assert.True(_p.TryGetUsed(out ushort got, out _));
        Assert.Equal(1, got);
        q.AddUsed(2);
        vq.AddUsed(2, 1);

        // The next back end, given a stale base: id 2 is committed (its used descriptor is in the ring), id 0 is
        // resubmitted from its copies; used = 2 slots past 0, avail = used + id 0's 2 slots.
        var vq2 = _p.CreateDeviceQueue();
        var q2 = new InflightPackedQueue(_mem, Size);
        Assert.True(q2.TryRecover(vq2, out var rec, out string error), error);
        Assert.False(rec.Fresh);
        Assert.Equal(new ushort[] { 0 }, rec.Resubmit);
        Assert.Equal(2, rec.Chains[0].Length);
        Assert.Equal(0x201000UL, rec.Chains[0][1].Addr);
        Assert.Equal(4u | 0x8000u | (2u << 16) | 0x8000_0000u, rec.VringBase);
        Assert.Equal(1, q2.CountInflightEntries());

        // The same crash one step earlier (the region says used, the ring has nothing): rolled back.
        var vq3 = _p.CreateDeviceQueue(rec.VringBase);
        q2.Attach(vq3, rec);
        q2.AddUsed(0);
        var q3 = new InflightPackedQueue(_mem, Size);
        Assert.True(q3.TryRecover(_p.CreateDeviceQueue(), out var rec3, out error), error);
        Assert.Equal(new ushort[] { 0 }, rec3.Resubmit);
        Assert.Equal(rec.VringBase, rec3.VringBase);

        // Resubmitted id 0 completes from its copies; nothing is left in flight.
        var vq4 = _p.CreateDeviceQueue(rec3.VringBase);
        q3.Attach(vq4, rec3);
        Span<DescSegment> segs = stackalloc DescSegment[4];
        Assert.Equal(ChainError.None, vq4.WalkChain(0, segs, out var info));
        Assert.Equal(16UL, info.ReadableBytes);
        Assert.Equal(1UL, info.WritableBytes);
        Complete(q3, vq4, 0);
        Assert.True(_p.TryGetUsed(out got, out _) && got == 2);
        Assert.True(_p.TryGetUsed(out got, out _) && got == 0);
        Assert.Equal(0, q3.CountInflightEntries());
    }

    [Fact]
    public void A_full_ring_in_flight_is_recovered()
    {
        var (q, vq) = Fresh();
        for (ushort id = 0; id < Size; id++)
        {
            _p.Add(id, ((ulong)(0x200000 + (id * 0x1000)), 16, false));
            Assert.Equal(PopResult.Popped, vq.TryPop(out ushort got));
            q.Begin(got);
        }

        Assert.Equal(Size, U16(12)); // free list empty: free_head = size
        var q2 = new InflightPackedQueue(_mem, Size);
        Assert.True(q2.TryRecover(_p.CreateDeviceQueue(), out var rec, out string error), error);
        Assert.Equal(Enumerable.Range(0, Size).Select(i => (ushort)i), rec.Resubmit);
        Assert.Equal((uint)(0 | (0 << 16) | 0x8000_0000), rec.VringBase); // avail wrapped once (counter 0), used at 0 (counter 1)
    }

    private (InflightPackedQueue Q, PackedVirtqueue Vq) Fresh()
    {
        var vq = _p.CreateDeviceQueue();
        var q = new InflightPackedQueue(_mem, Size);
        Assert.True(q.TryRecover(vq, out var rec, out string error), error);
        Assert.True(rec.Fresh);
        Assert.Equal(PackedVirtqueue.InitialBase, rec.VringBase);
        q.Attach(vq, rec);
        return (q, vq);
    }

    private static void Complete(InflightPackedQueue q, PackedVirtqueue vq, ushort id)
    {
        q.AddUsed(id);
        vq.AddUsed(id, 1);
        q.UsedWritten(id);
    }
}
