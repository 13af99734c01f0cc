using System.Runtime.InteropServices;
using VhostBackend.Platform;

namespace VhostBackend.Nvme;

/// <summary>One buffer segment: the same layout as Linux's struct iovec (and the bdev layer's IoVec), 16 bytes.</summary>
[StructLayout(LayoutKind.Sequential)]
public struct NvmeIoVec
{
    public nint Base;
    public nuint Length;

    public NvmeIoVec(nint @base, nuint length)
    {
        Base = @base;
        Length = length;
    }
}

/// <summary>
/// Builds PRP1/PRP2 and PRP lists (NVMe 1.4, 4.3) from scatter-gather buffers.
/// <para>
/// The rule callers must meet (else they must bounce): every element is translatable DMA memory; only the first
/// element may start inside a page (and then on a dword boundary); every element but the last ends on a page
/// boundary. Under these rules the data is a run of whole pages with a ragged head and tail, which is exactly
/// what a PRP list can describe.
/// </para>
/// </summary>
public static unsafe class Prp
{
    /// <summary>Checks the PRP rules on process addresses (page offsets are the same for IOVAs: regions are page aligned).</summary>
    public static bool IsCompatible(ReadOnlySpan<NvmeIoVec> iovs, int pageSize = 4096)
    {
        if (iovs.Length == 0)
        {
            return false;
        }

        ulong mask = (ulong)pageSize - 1;
        for (int i = 0; i < iovs.Length; i++)
        {
            ulong start = (ulong)iovs[i].Base;
            ulong len = iovs[i].Length;
            if (len == 0 || (i > 0 && (start & mask) != 0) || (i == 0 && (start & 3) != 0))
            {
                return false;
            }

            if (i < iovs.Length - 1 && ((start + len) & mask) != 0)
            {
                return false;
            }
        }

        return true;
    }

    /// <summary>
    /// Fills <paramref name="prp1"/>, <paramref name="prp2"/> and, when more than two pages are touched, the PRP
    /// list at <paramref name="list"/> (device address <paramref name="listIova"/>, <paramref name="listCapacity"/>
    /// entries; no chaining). Returns 0, -EINVAL (PRP rules broken or list too small) or -EFAULT (not DMA memory).
    /// </summary>
    public static int Build(DmaSpace space, ReadOnlySpan<NvmeIoVec> iovs, int pageSize, ulong* list, ulong listIova, int listCapacity, out ulong prp1, out ulong prp2)
    {
        prp1 = 0;
        prp2 = 0;
        if (iovs.Length == 0)
        {
            return -Platform.Errno.EINVAL;
        }

        ulong mask = (ulong)pageSize - 1;
        int count = 0; // entries after the first
        bool first = true;
        for (int i = 0; i < iovs.Length; i++)
        {
            ulong len = iovs[i].Length;
            if (len == 0)
            {
                return -Platform.Errno.EINVAL;
            }

            if (!space.TryTranslate(iovs[i].Base, iovs[i].Length, out ulong iova))
            {
                return -14; // EFAULT
            }

            ulong end = iova + len;
            if ((i > 0 && (iova & mask) != 0) || (i < iovs.Length - 1 && (end & mask) != 0) || (iova & 3) != 0)
            {
                return -Platform.Errno.EINVAL;
            }

            ulong page = iova;
            if (first)
            {
                prp1 = iova;
                first = false;
                page = (iova & ~mask) + (ulong)pageSize;
            }

            for (; page < end; page += (ulong)pageSize)
            {
                if (count == listCapacity)
                {
                    return -Platform.Errno.EINVAL;
                }

                // SAFETY: count < listCapacity, the list page holds listCapacity entries.
                list[count++] = page;
            }
        }

        if (count == 1)
        {
            prp2 = list[0];
        }
        else if (count > 1)
        {
            prp2 = listIova;
        }

        return 0;
    }
}
