using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace VhostBackend.Virtio;

/// <summary>
/// Safe access to the bytes of a descriptor chain. The segments come from <see cref="SplitVirtqueue.WalkChain"/>,
/// which translated every descriptor through <see cref="GuestMemory"/> (each segment lies inside one mapped region),
/// so the spans made here stay inside guest memory; they are valid while the session keeps that memory mapped,
/// i.e. until the request completes. Device code (src/Vhost) needs no pointer of its own.
/// </summary>
public static class DescChain
{
    /// <summary>
    /// <paramref name="length"/> guest bytes of one segment from <paramref name="offset"/>, bounds-checked. A segment
    /// may be longer than a span can be (a guest descriptor of 2 GiB or more): only the part asked for is made a span,
    /// never the whole length cast to int.
    /// </summary>
    public static unsafe Span<byte> AsSpan(in DescSegment segment, ulong offset, int length)
    {
        if (length < 0 || offset > segment.Length || (ulong)length > segment.Length - offset)
        {
            throw new ArgumentOutOfRangeException(nameof(length));
        }

        // SAFETY: WalkChain produced Host/Length by translating a descriptor that lies entirely inside one mapped
        // region, and [offset, offset + length) was just checked to lie inside the segment.
        return new((void*)(segment.Host + (nint)offset), length);
    }

    /// <summary>A sub-range of one segment, bounds-checked (e.g. the status byte at its end).</summary>
    public static DescSegment Slice(in DescSegment segment, uint offset, uint length)
    {
        if (offset > segment.Length || length > segment.Length - offset)
        {
            throw new ArgumentOutOfRangeException(nameof(offset));
        }

        return new DescSegment(segment.Host + (nint)offset, length, segment.Writable);
    }

    /// <summary>Copies dst.Length bytes of segments [from, to), starting <paramref name="skip"/> bytes in. False if they hold fewer.</summary>
    public static bool CopyFrom(ReadOnlySpan<DescSegment> segs, int from, int to, ulong skip, Span<byte> dst)
    {
        for (int i = from; i < to && !dst.IsEmpty; i++)
        {
            ulong l = segs[i].Length;
            if (skip >= l)
            {
                skip -= l;
                continue;
            }

            int n = (int)Math.Min((ulong)dst.Length, l - skip);
            AsSpan(segs[i], skip, n).CopyTo(dst);
            dst = dst[n..];
            skip = 0;
        }

        return dst.IsEmpty;
    }

    /// <summary>Copies <paramref name="src"/> into segments [from, to), starting <paramref name="skip"/> bytes in. False if they hold fewer bytes.</summary>
    public static bool CopyTo(ReadOnlySpan<DescSegment> segs, int from, int to, ulong skip, ReadOnlySpan<byte> src)
    {
        for (int i = from; i < to && !src.IsEmpty; i++)
        {
            ulong l = segs[i].Length;
            if (skip >= l)
            {
                skip -= l;
                continue;
            }

            int n = (int)Math.Min((ulong)src.Length, l - skip);
            src[..n].CopyTo(AsSpan(segs[i], skip, n));
            src = src[n..];
            skip = 0;
        }

        return src.IsEmpty;
    }

    /// <summary>Reads a wire struct from segments [from, to) at <paramref name="skip"/> (it may span segments). False (value zeroed) if they hold fewer bytes.</summary>
    public static bool TryRead<T>(ReadOnlySpan<DescSegment> segs, int from, int to, ulong skip, out T value)
        where T : unmanaged
    {
        value = default;
        if (CopyFrom(segs, from, to, skip, MemoryMarshal.AsBytes(new Span<T>(ref value))))
        {
            return true;
        }

        value = default; // no half-read struct
        return false;
    }

    /// <summary>Writes a wire struct into segments [from, to) at <paramref name="skip"/>; at most <paramref name="maxBytes"/> of it. Returns bytes written.</summary>
    public static int Write<T>(ReadOnlySpan<DescSegment> segs, int from, int to, ulong skip, in T value, int maxBytes = int.MaxValue)
        where T : unmanaged
    {
        var bytes = MemoryMarshal.AsBytes(new ReadOnlySpan<T>(in value));
        int room = Room(segs, from, to, skip, Math.Min(bytes.Length, maxBytes));
        CopyTo(segs, from, to, skip, bytes[..room]);
        return room;
    }

    /// <summary>Bytes available in segments [from, to) after <paramref name="skip"/>, capped at <paramref name="max"/>.</summary>
    public static int Room(ReadOnlySpan<DescSegment> segs, int from, int to, ulong skip, int max)
    {
        ulong room = 0;
        for (int i = from; i < to && room < skip + (ulong)max; i++)
        {
            room += segs[i].Length;
        }

        return room <= skip ? 0 : (int)Math.Min(room - skip, (ulong)max);
    }

    /// <summary>Size of a wire struct.</summary>
    public static int SizeOf<T>()
        where T : unmanaged => Unsafe.SizeOf<T>();
}
