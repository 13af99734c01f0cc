using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace VhostBackend.Platform;

/// <summary>
/// One scatter-gather element: exactly Linux's <c>struct iovec</c> (16 bytes), so arrays pass to preadv/io_uring as is.
/// Ownership: an IoVec owns nothing. Whoever creates one vouches that <c>[Base, Base + Length)</c> is mapped and
/// accessible for as long as the I/O that carries it is in flight (guest memory translated through the memory table,
/// an <see cref="AlignedBuffer"/>, a <see cref="PinnedArray{T}"/>). Every reader below trusts that and checks the
/// rest (lengths, offsets) before touching memory.
/// </summary>
[StructLayout(LayoutKind.Sequential)]
public struct IoVec
{
    public nint Base;
    public nuint Length;

    public IoVec(nint @base, nuint length)
    {
        Base = @base;
        Length = length;
    }

    /// <summary>The memory as a span. Throws if the length does not fit a span (over 2 GiB).</summary>
    public readonly unsafe Span<byte> AsSpan()
    {
        if (Length > int.MaxValue)
        {
            ThrowTooLong();
        }

        // SAFETY: the creator of this IoVec vouched for [Base, Base + Length) (see the type's comment).
        return new Span<byte>((void*)Base, (int)Length);
    }

    /// <summary><paramref name="length"/> bytes from <paramref name="offset"/>, bounds-checked against <see cref="Length"/>.</summary>
    public readonly unsafe Span<byte> AsSpan(nuint offset, int length)
    {
        if (length < 0 || offset > Length || (nuint)length > Length - offset)
        {
            ThrowRange();
        }

        // SAFETY: offset + length <= Length, checked above; the creator vouched for the whole range.
        return new Span<byte>((byte*)Base + offset, length);
    }

    public override readonly string ToString() => $"{Base:x}+{Length}";

    internal static void ThrowTooLong() => throw new ArgumentOutOfRangeException(nameof(Length), "iovec longer than 2 GiB");

    internal static void ThrowRange() => throw new ArgumentOutOfRangeException("offset", "range outside the iovec");
}

/// <summary>
/// Copies between iovec lists and other memory (the only pointer arithmetic over iovecs outside io_uring): every
/// copy is bounded by both sides' lengths. Allocation-free; safe to use on the data path.
/// </summary>
public static unsafe class IoVecs
{
    /// <summary>Sum of the lengths.</summary>
    public static ulong TotalLength(ReadOnlySpan<IoVec> iovs)
    {
        ulong total = 0;
        for (int i = 0; i < iovs.Length; i++)
        {
            total += iovs[i].Length;
        }

        return total;
    }

    /// <summary>
    /// Copies the iovecs' bytes, in order, into <paramref name="dst"/> at <paramref name="dstOffset"/>; stops at the end
    /// of the buffer. Returns the bytes copied.
    /// </summary>
    public static nuint Gather(ReadOnlySpan<IoVec> src, AlignedBuffer dst, nuint dstOffset = 0)
    {
        byte* d = dst.CheckedPointer(dstOffset, 0);
        nuint room = dst.Size - dstOffset;
        nuint done = 0;
        for (int i = 0; i < src.Length && done < room; i++)
        {
            nuint take = Math.Min(src[i].Length, room - done);
            // SAFETY: take <= the iovec's length (vouched for by its creator) and <= what is left of dst (checked).
            Buffer.MemoryCopy((void*)src[i].Base, d + done, take, take);
            done += take;
        }

        return done;
    }

    /// <summary>
    /// Copies from <paramref name="src"/> at <paramref name="srcOffset"/> into the iovecs, in order; stops at the end of
    /// the buffer. Returns the bytes copied.
    /// </summary>
    public static nuint Scatter(AlignedBuffer src, nuint srcOffset, ReadOnlySpan<IoVec> dst)
    {
        byte* s = src.CheckedPointer(srcOffset, 0);
        nuint left = src.Size - srcOffset;
        nuint done = 0;
        for (int i = 0; i < dst.Length && done < left; i++)
        {
            nuint take = Math.Min(dst[i].Length, left - done);
            // SAFETY: take <= the iovec's length and <= what is left of src (checked).
            Buffer.MemoryCopy(s + done, (void*)dst[i].Base, take, take);
            done += take;
        }

        return done;
    }

    /// <summary>Whether the iovecs' bytes equal <paramref name="buffer"/>'s from <paramref name="offset"/> (false if the buffer is shorter).</summary>
    public static bool SequenceEqual(ReadOnlySpan<IoVec> iovs, AlignedBuffer buffer, nuint offset)
    {
        for (int i = 0; i < iovs.Length; i++)
        {
            nuint len = iovs[i].Length;
            byte* b = buffer.CheckedPointer(offset, len);
            // Compare in span-sized pieces (a span holds at most 2 GiB).
            for (nuint pos = 0; pos < len;)
            {
                int n = (int)Math.Min(len - pos, (nuint)int.MaxValue);
                // SAFETY: b + pos .. + n lies inside the buffer (checked above); the iovec range is vouched for.
                if (!new ReadOnlySpan<byte>(b + pos, n).SequenceEqual(new ReadOnlySpan<byte>((byte*)iovs[i].Base + pos, n)))
                {
                    return false;
                }

                pos += (nuint)n;
            }

            offset += len;
        }

        return true;
    }

    /// <summary>
    /// Copies <paramref name="data"/> into the iovecs, at most <paramref name="limit"/> bytes and the iovecs' capacity.
    /// Returns the bytes copied.
    /// </summary>
    public static ulong CopyFrom(ReadOnlySpan<byte> data, ReadOnlySpan<IoVec> dst, ulong limit = ulong.MaxValue)
    {
        ulong want = Math.Min((ulong)data.Length, limit);
        ulong done = 0;
        for (int i = 0; i < dst.Length && done < want; i++)
        {
            int take = (int)Math.Min(dst[i].Length, want - done);
            data.Slice((int)done, take).CopyTo(dst[i].AsSpan(0, take));
            done += (ulong)take;
        }

        return done;
    }

    /// <summary>
    /// Fills <paramref name="dest"/> from the iovecs' bytes starting at <paramref name="offset"/>. False (nothing
    /// promised about <paramref name="dest"/>) if they hold fewer than offset + dest.Length bytes.
    /// </summary>
    public static bool CopyTo(ReadOnlySpan<IoVec> src, ulong offset, Span<byte> dest)
    {
        ulong pos = 0; // position in the iovec list
        int written = 0;
        for (int i = 0; i < src.Length && written < dest.Length; i++)
        {
            ulong len = src[i].Length;
            if (pos + len <= offset)
            {
                pos += len;
                continue;
            }

            ulong start = offset > pos ? offset - pos : 0;
            int take = (int)Math.Min(len - start, (ulong)(dest.Length - written));
            src[i].AsSpan((nuint)start, take).CopyTo(dest.Slice(written));
            written += take;
            pos += len;
        }

        return written == dest.Length;
    }
}

/// <summary>
/// Native memory with a chosen alignment (RAM disks, bounce buffers, load-tool buffers, DMA-able I/O buffers). Owns
/// its memory; freed on <see cref="Dispose"/> (or by the finalizer). Every access is bounds-checked against
/// <see cref="Size"/>. The caller must not dispose it while an I/O that points into it is in flight.
/// </summary>
public sealed unsafe class AlignedBuffer : IDisposable
{
    private nint _ptr;

    /// <param name="size">Bytes (more than 0).</param>
    /// <param name="alignment">A power of two.</param>
    /// <param name="zero">Clear the memory (otherwise its content is undefined).</param>
    public AlignedBuffer(nuint size, nuint alignment = 4096, bool zero = true)
    {
        if (size == 0)
        {
            throw new ArgumentOutOfRangeException(nameof(size), "size must be greater than 0");
        }

        if (alignment == 0 || (alignment & (alignment - 1)) != 0)
        {
            throw new ArgumentOutOfRangeException(nameof(alignment), "alignment must be a power of two");
        }

        _ptr = (nint)NativeMemory.AlignedAlloc(size, alignment);
        Size = size;
        if (zero)
        {
            NativeMemory.Clear((void*)_ptr, size);
        }
    }

    ~AlignedBuffer() => Free();

    public nuint Size { get; }

    /// <summary>The start address (for iovecs, DMA); 0 once disposed.</summary>
    public nint Address => Volatile.Read(ref _ptr);

    /// <summary>An iovec for <paramref name="length"/> bytes from <paramref name="offset"/> (bounds-checked).</summary>
    public IoVec ToIoVec(nuint offset, nuint length)
    {
        CheckedPointer(offset, length);
        return new IoVec(_ptr + (nint)offset, length);
    }

    /// <summary>The whole buffer as one iovec.</summary>
    public IoVec ToIoVec() => ToIoVec(0, Size);

    /// <summary><paramref name="length"/> bytes from <paramref name="offset"/> as a span (bounds-checked).</summary>
    public Span<byte> AsSpan(nuint offset, int length)
    {
        if (length < 0)
        {
            IoVec.ThrowRange();
        }

        byte* p = CheckedPointer(offset, (nuint)length);
        // SAFETY: offset + length <= Size, checked.
        return new Span<byte>(p, length);
    }

    /// <summary>Zeroes <paramref name="length"/> bytes from <paramref name="offset"/> (bounds-checked).</summary>
    public void Clear(nuint offset, nuint length)
    {
        byte* p = CheckedPointer(offset, length);
        // SAFETY: offset + length <= Size, checked.
        NativeMemory.Clear(p, length);
    }

    /// <summary>Copies this buffer's bytes from <paramref name="offset"/> into the iovecs, filling them. Bounds-checked.</summary>
    public void CopyTo(nuint offset, ReadOnlySpan<IoVec> dst)
    {
        for (int i = 0; i < dst.Length; i++)
        {
            nuint len = dst[i].Length;
            byte* p = CheckedPointer(offset, len);
            // SAFETY: the source range is checked; the iovec is vouched for by its creator.
            Buffer.MemoryCopy(p, (void*)dst[i].Base, len, len);
            offset += len;
        }
    }

    /// <summary>Copies the iovecs' bytes into this buffer from <paramref name="offset"/>. Bounds-checked.</summary>
    public void CopyFrom(nuint offset, ReadOnlySpan<IoVec> src)
    {
        for (int i = 0; i < src.Length; i++)
        {
            nuint len = src[i].Length;
            byte* p = CheckedPointer(offset, len);
            // SAFETY: the destination range is checked; the iovec is vouched for by its creator.
            Buffer.MemoryCopy((void*)src[i].Base, p, len, len);
            offset += len;
        }
    }

    /// <summary>Frees the memory (once). The caller guarantees no I/O points into it any more.</summary>
    public void Dispose()
    {
        Free();
        GC.SuppressFinalize(this);
    }

    internal byte* CheckedPointer(nuint offset, nuint length)
    {
        byte* p = (byte*)_ptr;
        if (p == null)
        {
            ThrowDisposed();
        }

        if (offset > Size || length > Size - offset)
        {
            IoVec.ThrowRange();
        }

        return p + offset;
    }

    private void Free()
    {
        byte* p = (byte*)Interlocked.Exchange(ref _ptr, 0);
        if (p != null)
        {
            NativeMemory.AlignedFree(p);
        }
    }

    private static void ThrowDisposed() => throw new ObjectDisposedException(nameof(AlignedBuffer));
}

/// <summary>
/// An array on the pinned object heap (it never moves), so its address may be handed to the kernel (an io_uring
/// iovec list) or kept in an iovec while the array is referenced. Pinned by construction: the only way to get one.
/// </summary>
public sealed unsafe class PinnedArray<T>
    where T : unmanaged
{
    private readonly T[] _array;

    public PinnedArray(int length)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(length);
        _array = GC.AllocateArray<T>(length, pinned: true);
    }

    public int Length => _array.Length;

    public Span<T> Span => _array;

    public ref T this[int index] => ref _array[index];

    /// <summary>The address of element 0 (stable: the array is pinned). Valid while this object is referenced.</summary>
    // SAFETY: the array lives on the pinned object heap, so the address never changes during its lifetime.
    public nint Address => (nint)Unsafe.AsPointer(ref MemoryMarshal.GetArrayDataReference(_array));

    /// <summary>An iovec over <paramref name="count"/> elements (bounds-checked). Valid while this object is referenced.</summary>
    public IoVec ToIoVec(int count)
    {
        if ((uint)count > (uint)_array.Length)
        {
            IoVec.ThrowRange();
        }

        return new IoVec(Address, (nuint)(count * sizeof(T)));
    }
}
