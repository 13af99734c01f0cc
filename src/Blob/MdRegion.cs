namespace VhostBackend.Blob;

/// <summary>
/// The metadata region as a load reads it: in pieces of <see cref="ChunkPages"/> pages, each read into one
/// reused buffer and kept only when it holds a non-zero byte. A store's region can be larger than one array
/// (2^19 pages and more is 2 GiB); a piece never written reads as zeroes and is not kept, so the memory a load
/// takes follows the metadata in use, not the region's length. A page of a piece not kept reads as zeroes, as
/// on disk.
/// </summary>
internal sealed class MdRegion
{
    /// <summary>Pages per piece (1 MiB).</summary>
    public const int ChunkPages = 256;

    private static readonly byte[] s_zeroPage = new byte[BlobFormat.PageSize];

    private readonly byte[]?[] _chunks;

    private MdRegion(uint pages)
    {
        Pages = pages;
        _chunks = new byte[]?[(pages + ChunkPages - 1) / ChunkPages];
    }

    /// <summary>The region's length in pages.</summary>
    public uint Pages { get; }

    /// <summary>Pieces kept in memory (for tests).</summary>
    public int ChunksHeld => _chunks.Count(c => c != null);

    public static async Task<MdRegion> ReadAsync(IBlobDevice dev, ulong offset, uint pages)
    {
        var r = new MdRegion(pages);
        var buf = new byte[Math.Min(pages, (uint)ChunkPages) * BlobFormat.PageSize];
        for (int c = 0; c < r._chunks.Length; c++)
        {
            uint first = (uint)c * ChunkPages;
            int n = (int)Math.Min(ChunkPages, pages - first);
            var piece = buf.AsMemory(0, n * BlobFormat.PageSize);
            await dev.ReadAsync(offset + ((ulong)first * BlobFormat.PageSize), piece).ConfigureAwait(false);
            if (piece.Span.IndexOfAnyExcept((byte)0) >= 0)
            {
                r._chunks[c] = piece.ToArray();
            }
        }
        return r;
    }

    /// <summary>Whether page <paramref name="p"/> lies in a piece holding data (a page of another piece is zeroes).</summary>
    public bool Holds(uint p) => p < Pages && _chunks[p / ChunkPages] != null;

    /// <summary>Page <paramref name="p"/> (&lt; <see cref="Pages"/>); zeroes when its piece held nothing.</summary>
    public ReadOnlySpan<byte> Page(uint p)
    {
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(p, Pages);
        var chunk = _chunks[p / ChunkPages];
        return chunk == null ? s_zeroPage : chunk.AsSpan((int)(p % ChunkPages) * BlobFormat.PageSize, BlobFormat.PageSize);
    }
}
