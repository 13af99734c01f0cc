using System.Buffers.Binary;
using System.Text;

namespace VhostBackend.Blob;

/// <summary>
/// SPDK's blobstore on-disk format (v24.01, <c>lib/blob/blobstore.h</c>), as constants and codecs. Everything is
/// little endian and packed. The device is cut into 4 KiB pages: page 0 the super block, then the used-page,
/// used-cluster and used-blobid masks, then <c>md_len</c> metadata pages; data clusters follow (the clusters the
/// metadata region touches are marked used). A blob id is <c>1 &lt;&lt; 32 | page index</c> of its first md page.
/// </summary>
public static class BlobFormat
{
    public const int PageSize = 4096;
    public const uint Version = 3;
    public const int DescriptorsOffset = 16;
    public const int DescriptorsSize = 4072;
    public const int NextOffset = 4088;
    public const int CrcOffset = 4092;
    public const uint InvalidPage = uint.MaxValue;
    public const ulong InvalidBlobId = ulong.MaxValue;
    public const ulong BlobIdHighBit = 1UL << 32;

    /// <summary>Cluster entries per extent page (SPDK_EXTENTS_PER_EP: the largest power of two that fits).</summary>
    public const int ExtentsPerPage = 512;

    public const byte DescPadding = 0;
    public const byte DescExtentRle = 1;
    public const byte DescXattr = 2;
    public const byte DescFlags = 3;
    public const byte DescXattrInternal = 4;
    public const byte DescExtentTable = 5;
    public const byte DescExtentPage = 6;

    public const byte MaskUsedPages = 0;
    public const byte MaskUsedClusters = 1;
    public const byte MaskUsedBlobIds = 2;

    // invalid_flags
    public const ulong FlagThinProv = 1UL << 0;
    public const ulong FlagInternalXattr = 1UL << 1;
    public const ulong FlagExtentTable = 1UL << 2;
    public const ulong FlagExternalSnapshot = 1UL << 3;
    public const ulong KnownInvalidFlags = FlagThinProv | FlagInternalXattr | FlagExtentTable | FlagExternalSnapshot;
    // data_ro_flags
    public const ulong DataRoReadOnly = 1UL << 0;
    // md_ro_flags: the clear method in bits 0..1
    public const ulong MdRoClearMethodMask = 3UL;

    /// <summary>Internal xattr of a clone: the blob id (u64) of its snapshot.</summary>
    public const string XattrSnapshot = "SNAP";
    /// <summary>Internal xattr of a snapshot being created: the id of the blob it snapshots.</summary>
    public const string XattrSnapshotInProgress = "SNAPTMP";
    /// <summary>Internal xattr of a snapshot being removed.</summary>
    public const string XattrSnapshotPendingRemoval = "SNAPRM";
    public const string XattrExternalSnapshot = "EXTSNAP";

    public static ulong PageToBlobId(uint page) => BlobIdHighBit | page;

    public static bool TryBlobIdToPage(ulong id, uint mdLen, out uint page)
    {
        page = (uint)id;
        return (id >> 32) == 1 && page < mdLen;
    }

    public static int DivRoundUp(long a, long b) => (int)((a + b - 1) / b);

    /// <summary>Pages a mask of <paramref name="bits"/> bits takes (5-byte header + bitmap).</summary>
    public static int MaskPages(long bits) => DivRoundUp(5 + DivRoundUp(bits, 8), PageSize);

    public static void WriteMask(Span<byte> dst, byte type, BitSet bits)
    {
        dst.Clear();
        dst[0] = type;
        BinaryPrimitives.WriteUInt32LittleEndian(dst[1..], (uint)bits.Length);
        bits.CopyTo(dst[5..]);
    }

    /// <summary>Reads a mask; false when its type or length does not match what the super block says.</summary>
    public static bool TryReadMask(ReadOnlySpan<byte> src, byte type, int expectBits, out BitSet bits)
    {
        bits = new BitSet(expectBits);
        if (src.Length < 5 || src[0] != type || BinaryPrimitives.ReadUInt32LittleEndian(src[1..]) != (uint)expectBits)
        {
            return false;
        }
        if (5 + DivRoundUp(expectBits, 8) > src.Length)
        {
            return false;
        }
        bits.CopyFrom(src[5..]);
        return true;
    }
}

/// <summary>The super block (page 0, <c>struct spdk_bs_super_block</c>, 4096 bytes).</summary>
public sealed class SuperBlock
{
    public static ReadOnlySpan<byte> Signature => "SPDKBLOB"u8;

    public uint Version { get; set; } = BlobFormat.Version;
    public uint Clean { get; set; }
    public ulong SuperBlob { get; set; } = BlobFormat.InvalidBlobId;
    public uint ClusterSize { get; set; }
    public uint UsedPageMaskStart { get; set; }
    public uint UsedPageMaskLen { get; set; }
    public uint UsedClusterMaskStart { get; set; }
    public uint UsedClusterMaskLen { get; set; }
    public uint MdStart { get; set; }
    public uint MdLen { get; set; }
    public byte[] BsType { get; set; } = new byte[16];
    public uint UsedBlobIdMaskStart { get; set; }
    public uint UsedBlobIdMaskLen { get; set; }
    public ulong Size { get; set; }
    public uint IoUnitSize { get; set; }

    /// <summary>The bstype as text (up to the first NUL), e.g. "LVOLSTORE".</summary>
    public string BsTypeString => Encoding.ASCII.GetString(BsType.AsSpan(0, Math.Max(0, Array.IndexOf(BsType, (byte)0) is var n && n < 0 ? 16 : n)));

    public static byte[] MakeBsType(string s)
    {
        var b = new byte[16];
        Encoding.ASCII.GetBytes(s.AsSpan(0, Math.Min(16, s.Length)), b);
        return b;
    }

    public void Write(Span<byte> page)
    {
        page[..BlobFormat.PageSize].Clear();
        Signature.CopyTo(page);
        BinaryPrimitives.WriteUInt32LittleEndian(page[8..], Version);
        BinaryPrimitives.WriteUInt32LittleEndian(page[12..], BlobFormat.PageSize);
        BinaryPrimitives.WriteUInt32LittleEndian(page[16..], Clean);
        BinaryPrimitives.WriteUInt64LittleEndian(page[20..], SuperBlob);
        BinaryPrimitives.WriteUInt32LittleEndian(page[28..], ClusterSize);
        BinaryPrimitives.WriteUInt32LittleEndian(page[32..], UsedPageMaskStart);
        BinaryPrimitives.WriteUInt32LittleEndian(page[36..], UsedPageMaskLen);
        BinaryPrimitives.WriteUInt32LittleEndian(page[40..], UsedClusterMaskStart);
        BinaryPrimitives.WriteUInt32LittleEndian(page[44..], UsedClusterMaskLen);
        BinaryPrimitives.WriteUInt32LittleEndian(page[48..], MdStart);
        BinaryPrimitives.WriteUInt32LittleEndian(page[52..], MdLen);
        BsType.AsSpan(0, 16).CopyTo(page[56..]);
        BinaryPrimitives.WriteUInt32LittleEndian(page[72..], UsedBlobIdMaskStart);
        BinaryPrimitives.WriteUInt32LittleEndian(page[76..], UsedBlobIdMaskLen);
        BinaryPrimitives.WriteUInt64LittleEndian(page[80..], Size);
        BinaryPrimitives.WriteUInt32LittleEndian(page[88..], IoUnitSize);
        BinaryPrimitives.WriteUInt32LittleEndian(page[BlobFormat.CrcOffset..], Crc32C.PageCrc(page));
    }

    /// <summary>Parses and validates a super block (signature, CRC, version, length); an errno on failure
    /// (SPDK's <c>bs_super_validate</c>: -EILSEQ for a bad signature or CRC, -EINVAL for a bad version).</summary>
    public static int TryParse(ReadOnlySpan<byte> page, out SuperBlock sb)
    {
        sb = new SuperBlock();
        if (page.Length < BlobFormat.PageSize || !page[..8].SequenceEqual(Signature))
        {
            return -Errno.EILSEQ;
        }
        if (BinaryPrimitives.ReadUInt32LittleEndian(page[BlobFormat.CrcOffset..]) != Crc32C.PageCrc(page))
        {
            return -Errno.EILSEQ;
        }
        sb.Version = BinaryPrimitives.ReadUInt32LittleEndian(page[8..]);
        if (sb.Version == 0 || sb.Version > BlobFormat.Version)
        {
            return -Errno.EILSEQ;
        }
        if (BinaryPrimitives.ReadUInt32LittleEndian(page[12..]) != BlobFormat.PageSize)
        {
            return -Errno.EILSEQ;
        }
        sb.Clean = BinaryPrimitives.ReadUInt32LittleEndian(page[16..]);
        sb.SuperBlob = BinaryPrimitives.ReadUInt64LittleEndian(page[20..]);
        sb.ClusterSize = BinaryPrimitives.ReadUInt32LittleEndian(page[28..]);
        sb.UsedPageMaskStart = BinaryPrimitives.ReadUInt32LittleEndian(page[32..]);
        sb.UsedPageMaskLen = BinaryPrimitives.ReadUInt32LittleEndian(page[36..]);
        sb.UsedClusterMaskStart = BinaryPrimitives.ReadUInt32LittleEndian(page[40..]);
        sb.UsedClusterMaskLen = BinaryPrimitives.ReadUInt32LittleEndian(page[44..]);
        sb.MdStart = BinaryPrimitives.ReadUInt32LittleEndian(page[48..]);
        sb.MdLen = BinaryPrimitives.ReadUInt32LittleEndian(page[52..]);
        sb.BsType = page.Slice(56, 16).ToArray();
        sb.UsedBlobIdMaskStart = BinaryPrimitives.ReadUInt32LittleEndian(page[72..]);
        sb.UsedBlobIdMaskLen = BinaryPrimitives.ReadUInt32LittleEndian(page[76..]);
        sb.Size = BinaryPrimitives.ReadUInt64LittleEndian(page[80..]);
        sb.IoUnitSize = BinaryPrimitives.ReadUInt32LittleEndian(page[88..]);
        if (sb.Version < 3)
        {
            sb.UsedBlobIdMaskStart = sb.Version < 2 ? 0 : sb.UsedBlobIdMaskStart;
            sb.UsedBlobIdMaskLen = sb.Version < 2 ? 0 : sb.UsedBlobIdMaskLen;
            sb.Size = 0;
            sb.IoUnitSize = 0;
        }
        return 0;
    }
}

/// <summary>A fixed-size bit array (SPDK's spdk_bit_array), stored little-endian bit order as on disk.</summary>
public sealed class BitSet
{
    private readonly byte[] _bytes;

    public BitSet(int length)
    {
        Length = length;
        _bytes = new byte[(length + 7) / 8];
    }

    public int Length { get; }

    public bool this[long i]
    {
        get => (ulong)i < (ulong)Length && (_bytes[i >> 3] & (1 << (int)(i & 7))) != 0;
        set
        {
            if ((ulong)i >= (ulong)Length)
            {
                throw new ArgumentOutOfRangeException(nameof(i));
            }
            if (value)
            {
                _bytes[i >> 3] |= (byte)(1 << (int)(i & 7));
            }
            else
            {
                _bytes[i >> 3] &= (byte)~(1 << (int)(i & 7));
            }
        }
    }

    public int FindFirstClear(int from = 0)
    {
        for (int i = from; i < Length; i++)
        {
            if (!this[i])
            {
                return i;
            }
        }
        return -1;
    }

    public int Count()
    {
        int n = 0;
        foreach (var b in _bytes)
        {
            n += System.Numerics.BitOperations.PopCount(b);
        }
        return n;
    }

    public void CopyTo(Span<byte> dst) => _bytes.CopyTo(dst);

    public void CopyFrom(ReadOnlySpan<byte> src)
    {
        src[.._bytes.Length].CopyTo(_bytes);
        int extra = _bytes.Length * 8 - Length;
        if (extra > 0)
        {
            _bytes[^1] &= (byte)(0xFF >> extra);
        }
    }

    public bool SameAs(BitSet other) => Length == other.Length && _bytes.AsSpan().SequenceEqual(other._bytes);

    public BitSet Clone()
    {
        var c = new BitSet(Length);
        _bytes.CopyTo(c._bytes, 0);
        return c;
    }
}

/// <summary>The errno values the blobstore answers with (Linux numbering, as SPDK's negative return codes).</summary>
public static class Errno
{
    public const int EPERM = 1;
    public const int ENOENT = 2;
    public const int EIO = 5;
    public const int ENOMEM = 12;
    public const int EBUSY = 16;
    public const int EEXIST = 17;
    public const int ENODEV = 19;
    public const int EINVAL = 22;
    public const int ENOSPC = 28;
    public const int ERANGE = 34;
    public const int ENAMETOOLONG = 36;
    public const int ENOTSUP = 95;
    public const int EILSEQ = 84;
}

/// <summary>A blobstore error carrying SPDK's errno.</summary>
public sealed class BlobException : Exception
{
    public BlobException(int errno, string message) : base(message) => Errno = errno;

    /// <summary>Positive errno (EINVAL, ENOSPC, ...).</summary>
    public int Errno { get; }

    /// <summary>The caller's option at fault when the failure is about one (e.g. "num_md_pages_per_cluster_ratio"), for its error reply.</summary>
    public string? Param { get; init; }
}
