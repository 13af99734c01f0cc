using System.Buffers.Binary;
using System.Text;

namespace VhostBackend.Blob;

/// <summary>
/// Encodes and decodes a blob's metadata pages (<c>struct spdk_blob_md_page</c>: id u64, sequence_num u32,
/// reserved u32, 4072 bytes of descriptors, next u32, crc u32) and extent pages. Every length read from disk
/// is checked against the page before use: a corrupt page is an error, never an out-of-range read.
/// </summary>
public static class MdCodec
{
    public static void WritePageHeader(Span<byte> page, ulong id, uint seq, uint next)
    {
        BinaryPrimitives.WriteUInt64LittleEndian(page, id);
        BinaryPrimitives.WriteUInt32LittleEndian(page[8..], seq);
        BinaryPrimitives.WriteUInt32LittleEndian(page[12..], 0);
        BinaryPrimitives.WriteUInt32LittleEndian(page[BlobFormat.NextOffset..], next);
    }

    public static void SealPage(Span<byte> page) =>
        BinaryPrimitives.WriteUInt32LittleEndian(page[BlobFormat.CrcOffset..], Crc32C.PageCrc(page));

    public static bool CrcValid(ReadOnlySpan<byte> page) =>
        BinaryPrimitives.ReadUInt32LittleEndian(page[BlobFormat.CrcOffset..]) == Crc32C.PageCrc(page);

    public static ulong PageId(ReadOnlySpan<byte> page) => BinaryPrimitives.ReadUInt64LittleEndian(page);

    public static uint PageSeq(ReadOnlySpan<byte> page) => BinaryPrimitives.ReadUInt32LittleEndian(page[8..]);

    public static uint PageNext(ReadOnlySpan<byte> page) => BinaryPrimitives.ReadUInt32LittleEndian(page[BlobFormat.NextOffset..]);

    /// <summary>Walks the descriptors of a page; false on a malformed one.</summary>
    private static bool ForEachDescriptor(ReadOnlySpan<byte> page, List<(byte Type, int Offset, int Length)> into)
    {
        var desc = page.Slice(BlobFormat.DescriptorsOffset, BlobFormat.DescriptorsSize);
        int cur = 0;
        while (cur + 5 <= desc.Length)
        {
            byte type = desc[cur];
            uint len = BinaryPrimitives.ReadUInt32LittleEndian(desc[(cur + 1)..]);
            if (type == BlobFormat.DescPadding && len == 0)
            {
                break;
            }
            if (len > (uint)(desc.Length - cur - 5))
            {
                return false;
            }
            into.Add((type, BlobFormat.DescriptorsOffset + cur + 5, (int)len));
            cur += 5 + (int)len;
        }
        return true;
    }

    /// <summary>
    /// Decodes a blob's chain pages into <paramref name="blob"/> (flags, xattrs, cluster map or extent table).
    /// Returns 0 or a negative errno (-EINVAL malformed, -ENOTSUP unknown invalid flags).
    /// </summary>
    public static int ParseChain(Blob blob, IReadOnlyList<byte[]> pages, uint totalClusters)
    {
        var descs = new List<(byte Type, int Offset, int Length)>();
        var clusters = new List<uint>();
        var extentPages = new List<uint>();
        ulong etNumClusters = 0;
        bool sawRle = false, sawTable = false;
        foreach (var pageArr in pages)
        {
            var page = pageArr.AsSpan();
            descs.Clear();
            if (!ForEachDescriptor(page, descs))
            {
                return -Errno.EINVAL;
            }
            foreach (var (type, off, len) in descs)
            {
                var body = page.Slice(off, len);
                switch (type)
                {
                    case BlobFormat.DescPadding:
                        break;
                    case BlobFormat.DescFlags:
                        if (len != 24)
                        {
                            return -Errno.EINVAL;
                        }
                        blob.InvalidFlags = BinaryPrimitives.ReadUInt64LittleEndian(body);
                        blob.DataRoFlags = BinaryPrimitives.ReadUInt64LittleEndian(body[8..]);
                        blob.MdRoFlags = BinaryPrimitives.ReadUInt64LittleEndian(body[16..]);
                        break;
                    case BlobFormat.DescXattr:
                    case BlobFormat.DescXattrInternal:
                        {
                            if (len < 4)
                            {
                                return -Errno.EINVAL;
                            }
                            int nl = BinaryPrimitives.ReadUInt16LittleEndian(body);
                            int vl = BinaryPrimitives.ReadUInt16LittleEndian(body[2..]);
                            if (4 + nl + vl != len)
                            {
                                return -Errno.EINVAL;
                            }
                            string name = Encoding.UTF8.GetString(body.Slice(4, nl));
                            (type == BlobFormat.DescXattr ? blob.XattrList : blob.InternalXattrList)
                                .Add(new(name, body.Slice(4 + nl, vl).ToArray()));
                            break;
                        }
                    case BlobFormat.DescExtentRle:
                        {
                            if (len % 8 != 0)
                            {
                                return -Errno.EINVAL;
                            }
                            sawRle = true;
                            for (int i = 0; i < len; i += 8)
                            {
                                uint start = BinaryPrimitives.ReadUInt32LittleEndian(body[i..]);
                                uint n = BinaryPrimitives.ReadUInt32LittleEndian(body[(i + 4)..]);
                                if ((ulong)clusters.Count + n > totalClusters || (start != 0 && (ulong)start + n > totalClusters))
                                {
                                    return -Errno.EINVAL;
                                }
                                for (uint j = 0; j < n; j++)
                                {
                                    clusters.Add(start == 0 ? 0 : start + j);
                                }
                            }
                            break;
                        }
                    case BlobFormat.DescExtentTable:
                        {
                            if (len < 8 || (len - 8) % 8 != 0)
                            {
                                return -Errno.EINVAL;
                            }
                            sawTable = true;
                            etNumClusters = BinaryPrimitives.ReadUInt64LittleEndian(body);
                            if (etNumClusters > totalClusters)
                            {
                                return -Errno.EINVAL;
                            }
                            for (int i = 8; i < len; i += 8)
                            {
                                uint pageIdx = BinaryPrimitives.ReadUInt32LittleEndian(body[i..]);
                                uint n = BinaryPrimitives.ReadUInt32LittleEndian(body[(i + 4)..]);
                                if (pageIdx != 0)
                                {
                                    if (n != 1)
                                    {
                                        return -Errno.EINVAL;
                                    }
                                    extentPages.Add(pageIdx);
                                }
                                else
                                {
                                    if ((ulong)extentPages.Count + n > totalClusters)
                                    {
                                        return -Errno.EINVAL;
                                    }
                                    for (uint j = 0; j < n; j++)
                                    {
                                        extentPages.Add(0);
                                    }
                                }
                            }
                            break;
                        }
                    default:
                        return -Errno.EINVAL;
                }
            }
        }
        if ((blob.InvalidFlags & ~BlobFormat.KnownInvalidFlags) != 0 || (blob.InvalidFlags & BlobFormat.FlagExternalSnapshot) != 0)
        {
            return -Errno.ENOTSUP;
        }
        if (sawRle && sawTable)
        {
            return -Errno.EINVAL;
        }
        blob.UseExtentTable = (blob.InvalidFlags & BlobFormat.FlagExtentTable) != 0 || sawTable;
        if (blob.UseExtentTable)
        {
            blob.Clusters = new uint[etNumClusters];
            int needed = BlobFormat.DivRoundUp((long)etNumClusters, BlobFormat.ExtentsPerPage);
            if (extentPages.Count > needed)
            {
                return -Errno.EINVAL;
            }
            blob.ExtentPages = new uint[needed];
            extentPages.CopyTo(blob.ExtentPages);
        }
        else
        {
            blob.Clusters = [.. clusters];
            blob.ExtentPages = new uint[BlobFormat.DivRoundUp(clusters.Count, BlobFormat.ExtentsPerPage)];
        }
        return 0;
    }

    /// <summary>Fills the cluster map from extent page <paramref name="k"/> of the blob; 0 or -EINVAL.</summary>
    public static int ParseExtentPage(Blob blob, int k, ReadOnlySpan<byte> page, uint totalClusters)
    {
        if (!CrcValid(page) || PageNext(page) != BlobFormat.InvalidPage)
        {
            return -Errno.EINVAL;
        }
        var descs = new List<(byte Type, int Offset, int Length)>();
        if (!ForEachDescriptor(page, descs) || descs.Count != 1 || descs[0].Type != BlobFormat.DescExtentPage)
        {
            return -Errno.EINVAL;
        }
        var body = page.Slice(descs[0].Offset, descs[0].Length);
        if (body.Length <= 4 || (body.Length - 4) % 4 != 0)
        {
            return -Errno.EINVAL;
        }
        uint start = BinaryPrimitives.ReadUInt32LittleEndian(body);
        int n = (body.Length - 4) / 4;
        if (start != (uint)(k * BlobFormat.ExtentsPerPage) || n > BlobFormat.ExtentsPerPage)
        {
            return -Errno.EINVAL;
        }
        for (int i = 0; i < n; i++)
        {
            uint c = BinaryPrimitives.ReadUInt32LittleEndian(body[(4 + 4 * i)..]);
            if (c >= totalClusters)
            {
                return -Errno.EINVAL;
            }
            ulong idx = start + (ulong)i;
            if (idx < (ulong)blob.Clusters.Length)
            {
                blob.Clusters[idx] = c;
            }
        }
        return 0;
    }

    /// <summary>Builds extent page <paramref name="k"/> of the blob (one EXTENT_PAGE descriptor).</summary>
    public static byte[] BuildExtentPage(Blob blob, int k)
    {
        var page = new byte[BlobFormat.PageSize];
        WritePageHeader(page, blob.Id, 0, BlobFormat.InvalidPage);
        int start = k * BlobFormat.ExtentsPerPage;
        int n = Math.Min(BlobFormat.ExtentsPerPage, blob.Clusters.Length - start);
        var d = page.AsSpan(BlobFormat.DescriptorsOffset);
        d[0] = BlobFormat.DescExtentPage;
        BinaryPrimitives.WriteUInt32LittleEndian(d[1..], (uint)(4 + 4 * n));
        BinaryPrimitives.WriteUInt32LittleEndian(d[5..], (uint)start);
        for (int i = 0; i < n; i++)
        {
            BinaryPrimitives.WriteUInt32LittleEndian(d[(9 + 4 * i)..], blob.MdClusterAt(start + i));
        }
        SealPage(page);
        return page;
    }

    /// <summary>
    /// Serializes the blob's chain as SPDK orders it: flags, xattrs, internal xattrs, then the extent table (or
    /// RLE extents for an old-format blob). A descriptor that does not fit the rest of a page starts the next;
    /// the extent table and RLE lists are split into several descriptors across pages. Returns the page
    /// contents without header/next/crc (the caller assigns page numbers).
    /// </summary>
    public static List<byte[]> SerializeChain(Blob blob)
    {
        var pages = new List<byte[]>();
        byte[] cur = new byte[BlobFormat.PageSize];
        int used = 0;
        pages.Add(cur);

        Span<byte> Reserve(int bodyLen, ref byte[] page, ref int usedRef)
        {
            int need = 5 + bodyLen;
            if (need > BlobFormat.DescriptorsSize)
            {
                throw new BlobException(Errno.EINVAL, "descriptor larger than a metadata page");
            }
            if (usedRef + need > BlobFormat.DescriptorsSize)
            {
                page = new byte[BlobFormat.PageSize];
                pages.Add(page);
                usedRef = 0;
            }
            var s = page.AsSpan(BlobFormat.DescriptorsOffset + usedRef, need);
            usedRef += need;
            return s;
        }

        var f = Reserve(24, ref cur, ref used);
        f[0] = BlobFormat.DescFlags;
        BinaryPrimitives.WriteUInt32LittleEndian(f[1..], 24);
        BinaryPrimitives.WriteUInt64LittleEndian(f[5..], blob.InvalidFlags);
        BinaryPrimitives.WriteUInt64LittleEndian(f[13..], blob.DataRoFlags);
        BinaryPrimitives.WriteUInt64LittleEndian(f[21..], blob.MdRoFlags);

        foreach (var (list, type) in new[] { (blob.XattrList, BlobFormat.DescXattr), (blob.InternalXattrList, BlobFormat.DescXattrInternal) })
        {
            foreach (var kv in list)
            {
                byte[] name = Encoding.UTF8.GetBytes(kv.Key);
                int bodyLen = 4 + name.Length + kv.Value.Length;
                var x = Reserve(bodyLen, ref cur, ref used);
                x[0] = type;
                BinaryPrimitives.WriteUInt32LittleEndian(x[1..], (uint)bodyLen);
                BinaryPrimitives.WriteUInt16LittleEndian(x[5..], (ushort)name.Length);
                BinaryPrimitives.WriteUInt16LittleEndian(x[7..], (ushort)kv.Value.Length);
                name.CopyTo(x[9..]);
                kv.Value.CopyTo(x[(9 + name.Length)..]);
            }
        }

        // Run-length entries: (page or cluster, count).
        var runs = new List<(uint Start, uint Count)>();
        if (blob.UseExtentTable)
        {
            foreach (var p in blob.ExtentPages)
            {
                if (p != 0)
                {
                    runs.Add((p, 1));
                }
                else if (runs.Count > 0 && runs[^1].Start == 0)
                {
                    runs[^1] = (0, runs[^1].Count + 1);
                }
                else
                {
                    runs.Add((0, 1));
                }
            }
        }
        else
        {
            for (int i = 0; i < blob.Clusters.Length; i++)
            {
                uint c = blob.MdClusterAt(i);
                if (runs.Count > 0 && ((c == 0 && runs[^1].Start == 0) || (c != 0 && runs[^1].Start != 0 && runs[^1].Start + runs[^1].Count == c)))
                {
                    runs[^1] = (runs[^1].Start, runs[^1].Count + 1);
                }
                else
                {
                    runs.Add((c, 1));
                }
            }
        }
        int head = blob.UseExtentTable ? 8 : 0;
        int ri = 0;
        do
        {
            int room = BlobFormat.DescriptorsSize - used - 5 - head;
            if (room < 8 && ri < runs.Count || room < 0)
            {
                cur = new byte[BlobFormat.PageSize];
                pages.Add(cur);
                used = 0;
                room = BlobFormat.DescriptorsSize - 5 - head;
            }
            int n = Math.Min(runs.Count - ri, room / 8);
            if (!blob.UseExtentTable && n == 0)
            {
                break;
            }
            int bodyLen = head + 8 * n;
            var e = Reserve(bodyLen, ref cur, ref used);
            e[0] = blob.UseExtentTable ? BlobFormat.DescExtentTable : BlobFormat.DescExtentRle;
            BinaryPrimitives.WriteUInt32LittleEndian(e[1..], (uint)bodyLen);
            if (blob.UseExtentTable)
            {
                BinaryPrimitives.WriteUInt64LittleEndian(e[5..], (ulong)blob.Clusters.Length);
            }
            for (int i = 0; i < n; i++)
            {
                BinaryPrimitives.WriteUInt32LittleEndian(e[(5 + head + 8 * i)..], runs[ri + i].Start);
                BinaryPrimitives.WriteUInt32LittleEndian(e[(5 + head + 8 * i + 4)..], runs[ri + i].Count);
            }
            ri += n;
        }
        while (ri < runs.Count);
        return pages;
    }
}
