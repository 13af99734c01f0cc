using System.Buffers.Binary;
using System.Runtime.InteropServices;
using VhostBackend.Virtio;

namespace VhostBackend.Fuzz;

/// <summary>
/// desc-chain: a split ring in guest memory built from the input, popped and walked the way a vhost queue does.
/// Input: byte 0 queue size (1 &lt;&lt; (b % 9)), byte 1 options (bit 0 EVENT_IDX, bit 1 map the ring through user
/// addresses, bits 4-7 pops - 1), bytes 2-3 the first avail index (little endian), then the guest memory image from
/// its first byte: descriptor table at <see cref="GpaBase"/>, avail ring right after it, used ring after that
/// (4-aligned), buffers and indirect tables anywhere. Guest memory is two adjacent regions so buffers can straddle
/// them. Findings: an exception, a walk longer than the table allows, a segment outside guest memory, byte counts
/// that disagree with the segments.
/// </summary>
internal sealed class DescChainTarget : IFuzzTarget
{
    public const ulong GpaBase = 0x10000;
    public const ulong UvaBase = 0x7f00_0000_0000;
    public const int RegionSize = 32 * 1024;

    private readonly byte[] _memory = GC.AllocateArray<byte>(2 * RegionSize, pinned: true);
    private readonly nint _host;
    private readonly GuestMemory _guest;
    private readonly DescSegment[] _segments = new DescSegment[64];
    private readonly byte[] _scratch = new byte[4096];

    public DescChainTarget()
    {
        _host = Marshal.UnsafeAddrOfPinnedArrayElement(_memory, 0);
        _guest = new GuestMemory(
        [
            new GuestMemoryRegion(GpaBase, RegionSize, UvaBase, 0, _host),
            new GuestMemoryRegion(GpaBase + RegionSize, RegionSize, UvaBase + RegionSize, RegionSize, _host + RegionSize),
        ]);
    }

    /// <summary>Where the rings of a queue of <paramref name="size"/> lie (guest physical addresses).</summary>
    public static (ulong Desc, ulong Avail, ulong Used) Layout(uint size)
    {
        ulong desc = GpaBase;
        ulong avail = desc + SplitVirtqueue.DescTableBytes(size);
        ulong used = (avail + SplitVirtqueue.AvailRingBytes(size) + 3) & ~3UL;
        return (desc, avail, used);
    }

    public void Run(ReadOnlySpan<byte> input)
    {
        if (input.Length < 4)
        {
            return;
        }

        uint size = 1u << (input[0] % 9);
        bool eventIdx = (input[1] & 1) != 0;
        bool byUva = (input[1] & 2) != 0;
        int pops = (input[1] >> 4) + 1;
        ushort lastAvail = BinaryPrimitives.ReadUInt16LittleEndian(input[2..]);
        Array.Clear(_memory);
        var image = input[4..];
        image[..Math.Min(image.Length, _memory.Length)].CopyTo(_memory);

        var (desc, avail, used) = Layout(size);
        var q = byUva
            ? SplitVirtqueue.Create(_guest, size, desc - GpaBase + UvaBase, avail - GpaBase + UvaBase, used - GpaBase + UvaBase, eventIdx, lastAvail, out _)
            : SplitVirtqueue.CreateFromGpa(_guest, size, desc, avail, used, eventIdx, lastAvail, out _);
        if (q is null)
        {
            throw new FuzzFindingException($"a ring of size {size} inside guest memory was refused");
        }

        if (eventIdx)
        {
            q.EnableNotify();
        }

        for (int i = 0; i < pops; i++)
        {
            var r = q.TryPop(out ushort head);
            if (r != PopResult.Popped)
            {
                break;
            }

            if (head >= size)
            {
                throw new FuzzFindingException($"popped head {head} of a ring of {size}");
            }

            var e = q.WalkChain(head, _segments, out var info);
            if (e == ChainError.None)
            {
                Check(info, size);
                Exercise(info);
            }

            q.PushUsed(head, e == ChainError.None ? (uint)Math.Min(info.WritableBytes, 64) : 0);
            _ = q.NeedsNotify();
        }

        q.DisableNotify();
    }

    /// <summary>The walk's own accounting against the segments it produced, and every segment inside guest memory.</summary>
    private void Check(in ChainInfo info, uint size)
    {
        if (info.SegmentCount is < 0 || info.SegmentCount > _segments.Length || info.FirstWritable < 0 || info.FirstWritable > info.SegmentCount)
        {
            throw new FuzzFindingException($"chain info out of range: {info.SegmentCount} segments, first writable {info.FirstWritable}");
        }

        // One pass over the ring's table plus one over an indirect table (at most 32768 entries).
        if (info.Descriptors > size + SplitVirtqueue.MaxQueueSize + 1)
        {
            throw new FuzzFindingException($"walked {info.Descriptors} descriptors of a table of {size}");
        }

        ulong readable = 0;
        ulong writable = 0;
        for (int i = 0; i < info.SegmentCount; i++)
        {
            var s = _segments[i];
            if (s.Length == 0 || s.Host < _host || s.Host + (nint)s.Length > _host + _memory.Length)
            {
                throw new FuzzFindingException($"segment {i} ({s}) is outside guest memory");
            }

            if (s.Writable != (i >= info.FirstWritable))
            {
                throw new FuzzFindingException($"segment {i} writable={s.Writable} but the first writable is {info.FirstWritable}");
            }

            if (s.Writable)
            {
                writable += s.Length;
            }
            else
            {
                readable += s.Length;
            }
        }

        if (readable != info.ReadableBytes || writable != info.WritableBytes)
        {
            throw new FuzzFindingException($"byte counts {info.ReadableBytes}/{info.WritableBytes} but segments hold {readable}/{writable}");
        }
    }

    /// <summary>The copy helpers request handlers use on the chain (header read, data copy, status write).</summary>
    private void Exercise(in ChainInfo info)
    {
        ReadOnlySpan<DescSegment> segs = _segments.AsSpan(0, info.SegmentCount);
        int n = (int)Math.Min(info.ReadableBytes, (ulong)_scratch.Length);
        if (!DescChain.CopyFrom(segs, 0, info.FirstWritable, 0, _scratch.AsSpan(0, n)))
        {
            throw new FuzzFindingException($"could not copy {n} of {info.ReadableBytes} readable bytes");
        }

        _ = DescChain.TryRead<ulong>(segs, 0, info.FirstWritable, 1, out _);
        if (info.WritableBytes > 0)
        {
            int room = DescChain.Room(segs, info.FirstWritable, info.SegmentCount, 0, 4096);
            if (room != (int)Math.Min(info.WritableBytes, 4096))
            {
                throw new FuzzFindingException($"room {room} for {info.WritableBytes} writable bytes");
            }

            _ = DescChain.CopyTo(segs, info.FirstWritable, info.SegmentCount, info.WritableBytes - 1, _scratch.AsSpan(0, 1));
            _ = DescChain.Write(segs, info.FirstWritable, info.SegmentCount, 0, 0xABCDUL, maxBytes: 3);
        }
    }
}
