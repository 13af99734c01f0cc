using System.Runtime.CompilerServices;

namespace VhostBackend.Virtio;

/// <summary>
/// Memory a front end (virtio-user) shares with its back end: one mapping whose offsets are the guest-physical
/// addresses the device sees. Every access is bounds-checked against the mapping, so driver code (rings' request
/// headers, status bytes, indirect tables, bounce buffers) needs no pointer of its own. The mapping must outlive
/// this view (its owner disposes it only after the queues are gone). Not synchronised: each queue's part is
/// touched by the one reactor that owns the queue.
/// </summary>
public sealed unsafe class DriverMemory
{
    private readonly nint _base;

    public DriverMemory(nint @base, ulong length)
    {
        ArgumentOutOfRangeException.ThrowIfZero(@base);
        _base = @base;
        Length = length;
    }

    public ulong Length { get; }

    /// <summary>Our virtual address of <paramref name="offset"/> (for ring setup and the memory table), checked.</summary>
    public nint Address(ulong offset, ulong length)
    {
        Check(offset, length);
        return _base + (nint)offset;
    }

    /// <summary>The bytes at [offset, offset + length).</summary>
    public Span<byte> Bytes(ulong offset, int length)
    {
        Check(offset, (ulong)length);

        // SAFETY: the range lies inside the mapping (checked above), which outlives this view.
        return new Span<byte>((void*)(_base + (nint)offset), length);
    }

    /// <summary>A wire struct at <paramref name="offset"/> (naturally aligned to its size, up to 8).</summary>
    public ref T Ref<T>(ulong offset)
        where T : unmanaged
    {
        Check(offset, (ulong)sizeof(T));
        if ((offset & (ulong)(Math.Min(sizeof(T), 8) - 1)) != 0 && sizeof(T) is 2 or 4 or 8 or 16)
        {
            throw new ArgumentOutOfRangeException(nameof(offset), "misaligned");
        }

        // SAFETY: inside the mapping (checked above).
        return ref Unsafe.AsRef<T>((void*)(_base + (nint)offset));
    }

    /// <summary>Writes a descriptor at <paramref name="offset"/> (an indirect table entry), skipping unchanged fields (see <see cref="SplitVirtqueueDriver.WriteDesc"/>).</summary>
    public void WriteDesc(ulong offset, ulong addr, uint len, ushort flags, ushort next)
    {
        ref var d = ref Ref<VirtqDesc>(offset);

        // SAFETY: d refers into the mapping (Ref checked it); the pointer does not escape this call.
        fixed (VirtqDesc* p = &d)
        {
            SplitVirtqueueDriver.WriteDesc(p, addr, len, flags, next);
        }
    }

    /// <summary>
    /// Writes a packed-ring indirect table entry at <paramref name="offset"/> (struct pvirtq_desc: the id is unused
    /// and the entries are sequential, so no NEXT flag; virtio 1.2, 2.8.19), skipping an unchanged entry.
    /// </summary>
    public void WritePackedDesc(ulong offset, ulong addr, uint len, ushort flags)
    {
        ref var d = ref Ref<VirtqPackedDesc>(offset);
        if (d.Addr != addr || d.Len != len || d.Flags != flags || d.Id != 0)
        {
            d.Addr = addr;
            d.Len = len;
            d.Id = 0;
            d.Flags = flags;
        }
    }

    /// <summary>
    /// Copies <paramref name="length"/> bytes from a host buffer into [offset, offset + length). The host buffer
    /// is the caller's (a bdev I/O's iovec, which the bdev layer validated against the I/O length).
    /// </summary>
    public void CopyFromHost(nint src, ulong offset, int length)
    {
        var dst = Bytes(offset, length);

        // SAFETY: the caller owns [src, src + length) for the duration of the call (bdev iovec contract).
        new ReadOnlySpan<byte>((void*)src, length).CopyTo(dst);
    }

    /// <summary>Copies [offset, offset + length) into a host buffer the caller owns (a bdev I/O's iovec).</summary>
    public void CopyToHost(ulong offset, nint dst, int length)
    {
        var src = Bytes(offset, length);

        // SAFETY: as in CopyFromHost.
        src.CopyTo(new Span<byte>((void*)dst, length));
    }

    private void Check(ulong offset, ulong length)
    {
        if (offset > Length || length > Length - offset)
        {
            ThrowOutOfRange();
        }
    }

    [System.Diagnostics.CodeAnalysis.DoesNotReturn]
    private static void ThrowOutOfRange() => throw new ArgumentOutOfRangeException("offset", "outside the shared memory");
}
