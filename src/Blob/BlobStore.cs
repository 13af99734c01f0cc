using System.Buffers.Binary;

namespace VhostBackend.Blob;

/// <summary>What a load found (for logs and tests).</summary>
public sealed class BlobStoreLoadReport
{
    /// <summary>The super block said the store was not unloaded cleanly; masks were rebuilt from the metadata.</summary>
    public bool Recovered { get; internal set; }

    /// <summary>Chains that failed to parse (their blob was dropped), as blob id and errno.</summary>
    public List<(ulong Id, int Errno)> Dropped { get; } = [];

    /// <summary>Interrupted snapshot creations or removals finished or rolled back at load.</summary>
    public List<string> Repairs { get; } = [];

    /// <summary>Clean stores only: the on-disk masks differed from the ones the metadata implies.</summary>
    public bool MaskMismatch { get; internal set; }

    /// <summary>Clones whose parent (snapshot) is not in the store: kept on disk but they do not open (as in SPDK).</summary>
    public List<ulong> MissingParent { get; } = [];
}

/// <summary>Options for a new blob (SPDK's <c>struct spdk_blob_opts</c>).</summary>
public sealed class BlobCreateOptions
{
    public ulong NumClusters { get; init; }
    public bool ThinProvision { get; init; }
    /// <summary>0 default, 1 none, 2 unmap, 3 write zeroes (SPDK's <c>blob_clear_method</c>).</summary>
    public int ClearMethod { get; init; }
    public IReadOnlyList<KeyValuePair<string, byte[]>> Xattrs { get; init; } = [];
}

/// <summary>
/// SPDK's blobstore (v24.01 on-disk format) on an <see cref="IBlobDevice"/>.
/// <para>Threading: metadata operations (create, resize, snapshot, clone, delete, sync, cluster allocation)
/// are serialised by <see cref="_md"/>, the store's metadata "thread": every caller queues on it, so at most one
/// metadata update runs at a time, like SPDK's md thread. Data I/O to clusters already allocated goes straight to
/// the device without any lock; a write to an unallocated cluster of a thin blob queues an allocation on the
/// metadata serializer (the message to the md thread) and continues when it is committed.</para>
/// <para>Crash consistency: a blob's first md page (its id's page) is the commit point. An update writes new
/// extent pages and new continuation pages to free md pages first, then rewrites the first page in place, then
/// frees the old pages in memory. The masks are written only at unload with the clean flag; while the store is
/// open the super block says dirty, so a crash at any point loads by replaying the metadata (as SPDK's
/// <c>bs_recover</c>) to the last committed state.</para>
/// </summary>
public sealed class BlobStore
{
    private readonly IBlobDevice _dev;
    private readonly SemaphoreSlim _md = new(1, 1);
    private readonly System.Collections.Concurrent.ConcurrentDictionary<ulong, Blob> _blobs = new();
    private SuperBlock _sb;
    private BitSet _usedPages;
    private BitSet _usedBlobIds;
    private BitSet _usedClusters;
    private bool _closed;
    /// <summary>The cluster buffer of first-write allocations (used under <see cref="_md"/> only): one per store, not
    /// one large-object allocation per first write.</summary>
    private byte[]? _copyBuffer;
    /// <summary>A cluster of zeroes (never written), for write zeroes over a clone's unallocated clusters.</summary>
    private byte[]? _zeroCluster;

    private BlobStore(IBlobDevice dev, SuperBlock sb)
    {
        _dev = dev;
        _sb = sb;
        TotalClusters = (uint)(sb.Size / sb.ClusterSize);
        _usedPages = new BitSet((int)sb.MdLen);
        _usedBlobIds = new BitSet((int)sb.MdLen);
        _usedClusters = new BitSet((int)TotalClusters);
        MdClusters = (uint)BlobFormat.DivRoundUp(sb.MdStart + (long)sb.MdLen, sb.ClusterSize / BlobFormat.PageSize);
    }

    public IBlobDevice Device => _dev;

    public uint ClusterSize => _sb.ClusterSize;

    public uint IoUnitSize => _sb.IoUnitSize;

    public uint TotalClusters { get; private set; }

    /// <summary>Clusters taken by the super block, masks and md region.</summary>
    public uint MdClusters { get; }

    public uint TotalDataClusters => TotalClusters - MdClusters;

    public uint FreeClusters => TotalClusters - (uint)_usedClusters.Count();

    public ulong SuperBlobId => _sb.SuperBlob;

    public string BsType => _sb.BsTypeString;

    public SuperBlock SuperBlockCopy
    {
        get
        {
            var p = new byte[BlobFormat.PageSize];
            _sb.Write(p);
            SuperBlock.TryParse(p, out var c);
            return c;
        }
    }

    public BlobStoreLoadReport LoadReport { get; private set; } = new();

    public IReadOnlyCollection<Blob> Blobs => _blobs.Values.ToList();

    public BitSet UsedClusters => _usedClusters.Clone();

    public BitSet UsedPages => _usedPages.Clone();

    public BitSet UsedBlobIds => _usedBlobIds.Clone();

    public Blob? GetBlob(ulong id) => _blobs.GetValueOrDefault(id);

    private ulong MdPageOffset(uint page) => ((ulong)_sb.MdStart + page) * BlobFormat.PageSize;

    private ulong ClusterOffset(uint cluster) => (ulong)cluster * _sb.ClusterSize;

    // ---------------------------------------------------------------- init / load / unload

    /// <summary>Creates an empty blobstore (SPDK's <c>spdk_bs_init</c>): super block, masks, md region of one page
    /// per cluster unless <paramref name="mdPages"/> says otherwise; the data region is cleared per
    /// <paramref name="clearMethod"/> (0/2 unmap, 1 none, 3 write zeroes).</summary>
    public static async Task<BlobStore> InitAsync(IBlobDevice dev, uint clusterSize, string bsType, uint mdPages = 0, int clearMethod = 2)
    {
        ulong size = dev.BlockCount * (ulong)dev.BlockSize;
        if (clusterSize < BlobFormat.PageSize || clusterSize % BlobFormat.PageSize != 0 || clusterSize % dev.BlockSize != 0)
        {
            throw new BlobException(Errno.EINVAL, $"cluster size {clusterSize} must be a multiple of {BlobFormat.PageSize} and of the block size");
        }
        if (dev.BlockSize > BlobFormat.PageSize || BlobFormat.PageSize % dev.BlockSize != 0)
        {
            throw new BlobException(Errno.EINVAL, $"block size {dev.BlockSize} does not divide the 4 KiB page");
        }
        ulong totalClusters = size / clusterSize;
        if (totalClusters == 0 || totalClusters > int.MaxValue)
        {
            throw new BlobException(Errno.ENOSPC, "device too small for one cluster");
        }
        uint mdLen = mdPages != 0 ? mdPages : (uint)totalClusters;
        var sb = new SuperBlock
        {
            Version = BlobFormat.Version,
            Clean = 0,
            SuperBlob = BlobFormat.InvalidBlobId,
            ClusterSize = clusterSize,
            BsType = SuperBlock.MakeBsType(bsType),
            Size = size,
            IoUnitSize = (uint)dev.BlockSize,
        };
        uint n = 1;
        sb.UsedPageMaskStart = n;
        sb.UsedPageMaskLen = (uint)BlobFormat.MaskPages(mdLen);
        n += sb.UsedPageMaskLen;
        sb.UsedClusterMaskStart = n;
        sb.UsedClusterMaskLen = (uint)BlobFormat.MaskPages((long)totalClusters);
        n += (uint)Math.Max(BlobFormat.MaskPages(mdLen), (int)sb.UsedClusterMaskLen);
        sb.UsedBlobIdMaskStart = n;
        sb.UsedBlobIdMaskLen = (uint)BlobFormat.MaskPages(mdLen);
        n += sb.UsedBlobIdMaskLen;
        sb.MdStart = n;
        sb.MdLen = mdLen;
        n += mdLen;
        uint mdClusters = (uint)BlobFormat.DivRoundUp(n, clusterSize / BlobFormat.PageSize);
        if (mdClusters >= totalClusters)
        {
            throw new BlobException(Errno.ENOMEM, "device too small for the metadata");
        }
        var bs = new BlobStore(dev, sb);
        for (uint c = 0; c < bs.MdClusters; c++)
        {
            bs._usedClusters[c] = true;
        }
        // Zero the masks and md region, then clear the data region as asked, then the super block (dirty).
        await dev.WriteZeroesAsync(BlobFormat.PageSize, (ulong)(n - 1) * BlobFormat.PageSize).ConfigureAwait(false);
        if (clearMethod != 1)
        {
            ulong dataStart = (ulong)n * BlobFormat.PageSize;
            dataStart = (dataStart + (ulong)dev.BlockSize - 1) / (ulong)dev.BlockSize * (ulong)dev.BlockSize;
            if (dataStart < size)
            {
                // SPDK's spdk_bs_init: unmap (the default) or write zeroes over the data region.
                if (clearMethod == 3)
                {
                    await dev.WriteZeroesAsync(dataStart, size - dataStart).ConfigureAwait(false);
                }
                else
                {
                    await dev.UnmapAsync(dataStart, size - dataStart).ConfigureAwait(false);
                }
            }
        }
        await bs.WriteSuperAsync().ConfigureAwait(false);
        await dev.FlushAsync().ConfigureAwait(false);
        return bs;
    }

    private async Task WriteSuperAsync()
    {
        var p = new byte[BlobFormat.PageSize];
        _sb.Write(p);
        await _dev.WriteAsync(0, p).ConfigureAwait(false);
    }

    private async Task<byte[]> ReadPagesAsync(ulong offset, int pages)
    {
        var b = new byte[pages * BlobFormat.PageSize];
        await _dev.ReadAsync(offset, b).ConfigureAwait(false);
        return b;
    }

    /// <summary>Loads a blobstore (SPDK's <c>spdk_bs_load</c>): validates the super block, loads every blob's
    /// metadata, rebuilds the masks from it (a dirty store is recovered as SPDK's <c>bs_recover</c> does: every md
    /// page whose CRC is valid and whose sequence number is 0 at its own id's page starts a blob), finishes or
    /// rolls back interrupted snapshot operations, and marks the store dirty on disk while it is open.
    /// <paramref name="bsType"/>: when not null, the super block's bstype must match (-EXDEV in SPDK; here ENODEV).</summary>
    public static async Task<BlobStore> LoadAsync(IBlobDevice dev, string? bsType = null)
    {
        if (dev.BlockSize > BlobFormat.PageSize || BlobFormat.PageSize % dev.BlockSize != 0 || dev.BlockCount * (ulong)dev.BlockSize < BlobFormat.PageSize)
        {
            throw new BlobException(Errno.EINVAL, "device block size or size unusable for a blobstore");
        }
        var page0 = new byte[BlobFormat.PageSize];
        await dev.ReadAsync(0, page0).ConfigureAwait(false);
        int rc = SuperBlock.TryParse(page0, out var sb);
        if (rc != 0)
        {
            throw new BlobException(-rc, "no valid blobstore super block");
        }
        ulong devSize = dev.BlockCount * (ulong)dev.BlockSize;
        if (sb.Size == 0)
        {
            sb.Size = devSize;
        }
        if (sb.IoUnitSize == 0)
        {
            sb.IoUnitSize = BlobFormat.PageSize;
        }
        if (bsType != null && bsType.Length > 0 && sb.BsTypeString.Length > 0 && sb.BsTypeString != bsType)
        {
            throw new BlobException(Errno.ENODEV, $"blobstore type '{sb.BsTypeString}' is not '{bsType}'");
        }
        if (sb.Size > devSize || sb.ClusterSize < BlobFormat.PageSize || sb.ClusterSize % BlobFormat.PageSize != 0
            || sb.Size / sb.ClusterSize == 0 || sb.Size / sb.ClusterSize > int.MaxValue
            || sb.IoUnitSize % (uint)dev.BlockSize != 0 || sb.IoUnitSize > BlobFormat.PageSize
            || sb.MdLen == 0 || sb.MdLen > int.MaxValue / 2
            || ((ulong)sb.MdStart + sb.MdLen) * BlobFormat.PageSize > sb.Size
            || (ulong)sb.UsedPageMaskStart + sb.UsedPageMaskLen > sb.MdStart
            || (ulong)sb.UsedClusterMaskStart + sb.UsedClusterMaskLen > sb.MdStart
            || (ulong)sb.UsedBlobIdMaskStart + sb.UsedBlobIdMaskLen > sb.MdStart)
        {
            throw new BlobException(Errno.EILSEQ, "super block geometry is inconsistent with the device");
        }
        var bs = new BlobStore(dev, sb);
        var report = new BlobStoreLoadReport { Recovered = sb.Clean != 1 };
        bs.LoadReport = report;

        // Read the md region in pieces (a large store's region does not fit one array), keeping the pieces
        // that hold anything: a never-written piece reads as zeroes, which no md page is.
        var md = await MdRegion.ReadAsync(dev, bs.MdPageOffset(0), sb.MdLen).ConfigureAwait(false);
        var starts = new List<uint>();
        BitSet? diskPages = null, diskClusters = null, diskIds = null;
        if (!report.Recovered)
        {
            var pm = await bs.ReadPagesAsync((ulong)sb.UsedPageMaskStart * BlobFormat.PageSize, (int)sb.UsedPageMaskLen).ConfigureAwait(false);
            var cm = await bs.ReadPagesAsync((ulong)sb.UsedClusterMaskStart * BlobFormat.PageSize, (int)sb.UsedClusterMaskLen).ConfigureAwait(false);
            var im = sb.UsedBlobIdMaskLen > 0
                ? await bs.ReadPagesAsync((ulong)sb.UsedBlobIdMaskStart * BlobFormat.PageSize, (int)sb.UsedBlobIdMaskLen).ConfigureAwait(false)
                : [];
            bool ok = BlobFormat.TryReadMask(pm, BlobFormat.MaskUsedPages, (int)sb.MdLen, out diskPages)
                & BlobFormat.TryReadMask(cm, BlobFormat.MaskUsedClusters, (int)bs.TotalClusters, out diskClusters)
                & BlobFormat.TryReadMask(im, BlobFormat.MaskUsedBlobIds, (int)sb.MdLen, out diskIds);
            if (!ok)
            {
                throw new BlobException(Errno.EILSEQ, "clean blobstore with malformed masks");
            }
            for (uint p = 0; p < sb.MdLen; p++)
            {
                if (diskIds![p])
                {
                    starts.Add(p);
                }
            }
        }
        else
        {
            for (uint p = 0; p < sb.MdLen; p++)
            {
                if (!md.Holds(p))
                {
                    continue;
                }
                var pg = md.Page(p);
                if (MdCodec.CrcValid(pg) && MdCodec.PageSeq(pg) == 0 && MdCodec.PageId(pg) == BlobFormat.PageToBlobId(p))
                {
                    starts.Add(p);
                }
            }
        }

        foreach (var p in starts)
        {
            int err = bs.ParseBlob(md, p, out var blob);
            if (err != 0)
            {
                report.Dropped.Add((BlobFormat.PageToBlobId(p), -err));
                continue;
            }
            bs._blobs[blob!.Id] = blob;
        }
        // A parent chain that loops (a blob its own ancestor) would send readers round it forever: the blobs on
        // the loop are corrupt and dropped like any other.
        foreach (var id in bs.BlobsOnParentLoops())
        {
            bs._blobs.TryRemove(id, out _);
            report.Dropped.Add((id, Errno.EINVAL));
        }
        if (!report.Recovered && report.Dropped.Count > 0)
        {
            throw new BlobException(report.Dropped[0].Errno, $"blob 0x{report.Dropped[0].Id:x} metadata is corrupt");
        }
        bs.RebuildMasks();
        if (!report.Recovered && (!diskPages!.SameAs(bs._usedPages) || !diskClusters!.SameAs(bs._usedClusters) || !diskIds!.SameAs(bs._usedBlobIds)))
        {
            report.MaskMismatch = true;
        }

        // Mark dirty on disk while open (SPDK writes clean = 0 at load).
        bs._sb.Clean = 0;
        await bs.WriteSuperAsync().ConfigureAwait(false);
        await bs.RepairInterruptedAsync().ConfigureAwait(false);
        bs.ResolveParents();
        foreach (var b in bs._blobs.Values)
        {
            if (b.ParentMissing)
            {
                report.MissingParent.Add(b.Id);
            }
        }
        return bs;
    }

    /// <summary>Blobs that are their own ancestor (each walk bounded by the number of blobs).</summary>
    private List<ulong> BlobsOnParentLoops()
    {
        var loops = new List<ulong>();
        int n = _blobs.Count;
        foreach (var b in _blobs.Values)
        {
            ulong pid = b.ParentId;
            for (int depth = 0; depth <= n && pid != BlobFormat.InvalidBlobId; depth++)
            {
                if (pid == b.Id)
                {
                    loops.Add(b.Id);
                    break;
                }
                pid = _blobs.TryGetValue(pid, out var p) ? p.ParentId : BlobFormat.InvalidBlobId;
            }
        }
        return loops;
    }

    private int ParseBlob(MdRegion md, uint first, out Blob? blob)
    {
        blob = null;
        var b = new Blob(BlobFormat.PageToBlobId(first));
        var pages = new List<byte[]>();
        uint p = first;
        for (uint seq = 0; ; seq++)
        {
            if (p >= _sb.MdLen || seq >= _sb.MdLen || b.ChainPages.Contains(p))
            {
                return -Errno.EINVAL;
            }
            var pg = md.Page(p);
            if (!MdCodec.CrcValid(pg) || MdCodec.PageId(pg) != b.Id || MdCodec.PageSeq(pg) != seq)
            {
                return -Errno.EINVAL;
            }
            pages.Add(pg.ToArray());
            b.ChainPages.Add(p);
            p = MdCodec.PageNext(pg);
            if (p == BlobFormat.InvalidPage)
            {
                break;
            }
        }
        int rc = MdCodec.ParseChain(b, pages, TotalClusters);
        if (rc != 0)
        {
            return rc;
        }
        for (int k = 0; k < b.ExtentPages.Length; k++)
        {
            uint ep = b.ExtentPages[k];
            if (ep == 0)
            {
                continue;
            }
            if (ep >= _sb.MdLen)
            {
                return -Errno.EINVAL;
            }
            rc = MdCodec.ParseExtentPage(b, k, md.Page(ep), TotalClusters);
            if (rc != 0)
            {
                return rc;
            }
        }
        foreach (var c in b.Clusters)
        {
            if (c != 0 && c < MdClusters)
            {
                return -Errno.EINVAL;
            }
        }
        blob = b;
        return 0;
    }

    /// <summary>Rebuilds the three masks from the blobs in memory (md clusters always used).</summary>
    private void RebuildMasks()
    {
        _usedPages = new BitSet((int)_sb.MdLen);
        _usedBlobIds = new BitSet((int)_sb.MdLen);
        _usedClusters = new BitSet((int)TotalClusters);
        for (uint c = 0; c < MdClusters; c++)
        {
            _usedClusters[c] = true;
        }
        foreach (var b in _blobs.Values)
        {
            _usedBlobIds[b.FirstPage] = true;
            foreach (var p in b.ChainPages)
            {
                _usedPages[p] = true;
            }
            foreach (var p in b.ExtentPages)
            {
                if (p != 0)
                {
                    _usedPages[p] = true;
                }
            }
            foreach (var c in b.Clusters)
            {
                if (c != 0)
                {
                    _usedClusters[c] = true;
                }
            }
        }
    }

    /// <summary>Every cluster owned by more than one blob (after a consistent load: none, except a snapshot and the
    /// blob it was taken of while a snapshot creation is in flight).</summary>
    public List<uint> ClustersOwnedTwice()
    {
        var seen = new HashSet<uint>();
        var twice = new List<uint>();
        foreach (var b in _blobs.Values)
        {
            foreach (var c in b.Clusters)
            {
                if (c != 0 && !seen.Add(c))
                {
                    twice.Add(c);
                }
            }
        }
        return twice;
    }

    /// <summary>Checks that the in-memory masks equal what the metadata implies; a description of the first
    /// difference, or null.</summary>
    public string? CheckMasks()
    {
        var pages = _usedPages;
        var ids = _usedBlobIds;
        var clusters = _usedClusters;
        RebuildMasks();
        string? err = !pages.SameAs(_usedPages) ? "used-page mask" : !ids.SameAs(_usedBlobIds) ? "used-blobid mask" : !clusters.SameAs(_usedClusters) ? "used-cluster mask" : null;
        _usedPages = pages;
        _usedBlobIds = ids;
        _usedClusters = clusters;
        return err;
    }

    private async Task RepairInterruptedAsync()
    {
        foreach (var s in _blobs.Values.ToList())
        {
            if (s.TryGetXattr(BlobFormat.XattrSnapshotInProgress, true, out var v) && v.Length == 8)
            {
                ulong orig = BinaryPrimitives.ReadUInt64LittleEndian(v);
                if (_blobs.TryGetValue(orig, out var o) && o.ParentId == s.Id)
                {
                    s.RemoveXattr(BlobFormat.XattrSnapshotInProgress, true);
                    await PersistAsync(s, null).ConfigureAwait(false);
                    LoadReport.Repairs.Add($"snapshot 0x{s.Id:x} of 0x{orig:x}: finished");
                }
                else
                {
                    await DropBlobMdAsync(s).ConfigureAwait(false);
                    LoadReport.Repairs.Add($"snapshot 0x{s.Id:x} of 0x{orig:x}: rolled back");
                }
            }
            else if (s.TryGetXattr(BlobFormat.XattrSnapshotPendingRemoval, true, out _))
            {
                if (_blobs.Values.Any(b => b.ParentId == s.Id))
                {
                    s.RemoveXattr(BlobFormat.XattrSnapshotPendingRemoval, true);
                    await PersistAsync(s, null).ConfigureAwait(false);
                    LoadReport.Repairs.Add($"removal of snapshot 0x{s.Id:x}: rolled back");
                }
                else
                {
                    await DropBlobMdAsync(s).ConfigureAwait(false);
                    LoadReport.Repairs.Add($"removal of snapshot 0x{s.Id:x}: finished");
                }
            }
        }
        RebuildMasks();
    }

    /// <summary>Zeroes a blob's first page (the commit of its deletion) and forgets it; masks are the caller's.</summary>
    private async Task DropBlobMdAsync(Blob b)
    {
        await _dev.WriteAsync(MdPageOffset(b.FirstPage), new byte[BlobFormat.PageSize]).ConfigureAwait(false);
        _blobs.TryRemove(b.Id, out _);
    }

    /// <summary>Unloads (SPDK's <c>spdk_bs_unload</c>): writes the masks, then the super block with clean = 1.</summary>
    public async Task UnloadAsync()
    {
        await _md.WaitAsync().ConfigureAwait(false);
        try
        {
            if (_closed)
            {
                return;
            }
            await WriteMasksAsync().ConfigureAwait(false);
            await _dev.FlushAsync().ConfigureAwait(false);
            _sb.Clean = 1;
            await WriteSuperAsync().ConfigureAwait(false);
            await _dev.FlushAsync().ConfigureAwait(false);
            _closed = true;
        }
        finally
        {
            _md.Release();
        }
    }

    private async Task WriteMasksAsync()
    {
        var pm = new byte[_sb.UsedPageMaskLen * BlobFormat.PageSize];
        BlobFormat.WriteMask(pm, BlobFormat.MaskUsedPages, _usedPages);
        await _dev.WriteAsync((ulong)_sb.UsedPageMaskStart * BlobFormat.PageSize, pm).ConfigureAwait(false);
        var cm = new byte[_sb.UsedClusterMaskLen * BlobFormat.PageSize];
        BlobFormat.WriteMask(cm, BlobFormat.MaskUsedClusters, _usedClusters);
        await _dev.WriteAsync((ulong)_sb.UsedClusterMaskStart * BlobFormat.PageSize, cm).ConfigureAwait(false);
        if (_sb.UsedBlobIdMaskLen > 0)
        {
            var im = new byte[_sb.UsedBlobIdMaskLen * BlobFormat.PageSize];
            BlobFormat.WriteMask(im, BlobFormat.MaskUsedBlobIds, _usedBlobIds);
            await _dev.WriteAsync((ulong)_sb.UsedBlobIdMaskStart * BlobFormat.PageSize, im).ConfigureAwait(false);
        }
    }

    /// <summary>Destroys the store (SPDK's <c>spdk_bs_destroy</c>): zeroes the super block.</summary>
    public async Task DestroyAsync()
    {
        await _md.WaitAsync().ConfigureAwait(false);
        try
        {
            await _dev.WriteAsync(0, new byte[BlobFormat.PageSize]).ConfigureAwait(false);
            await _dev.FlushAsync().ConfigureAwait(false);
            _closed = true;
        }
        finally
        {
            _md.Release();
        }
    }

    // ---------------------------------------------------------------- metadata persistence

    /// <summary>
    /// Writes a blob's metadata atomically: extent pages (the listed ones, or all when null; a new extent page
    /// goes to a free md page), continuation pages to free md pages, then the first page in place (the commit),
    /// then releases the old continuation pages and extent pages no longer referenced. Runs under <see cref="_md"/>.
    /// </summary>
    private async Task PersistAsync(Blob b, IEnumerable<int>? extentPagesToWrite, bool relocateExtentPages = false)
    {
        // A full rewrite never touches a live extent page in place: the commit (first page) switches to new ones.
        relocateExtentPages |= extentPagesToWrite == null;
        var oldChain = b.ChainPages.ToList();
        var oldExtent = b.ExtentPages.Where(p => p != 0).ToHashSet();
        var newlyClaimed = new List<uint>();
        try
        {
            // 1. Extent pages: keep one for each 512-cluster group holding an allocated cluster.
            var toWrite = new HashSet<int>(extentPagesToWrite ?? Enumerable.Range(0, b.ExtentPages.Length));
            if (b.UseExtentTable)
            {
                for (int k = 0; k < b.ExtentPages.Length; k++)
                {
                    bool any = false;
                    int start = k * BlobFormat.ExtentsPerPage, end = Math.Min(b.Clusters.Length, start + BlobFormat.ExtentsPerPage);
                    for (int i = start; i < end && !any; i++)
                    {
                        any = b.MdClusterAt(i) != 0;
                    }
                    if (any && b.ExtentPages[k] != 0 && relocateExtentPages && toWrite.Contains(k))
                    {
                        // Copy-on-write of the extent page: the old one stays valid until the commit.
                        b.ExtentPages[k] = ClaimMdPage();
                        newlyClaimed.Add(b.ExtentPages[k]);
                    }
                    else if (any && b.ExtentPages[k] == 0)
                    {
                        b.ExtentPages[k] = ClaimMdPage();
                        newlyClaimed.Add(b.ExtentPages[k]);
                        toWrite.Add(k);
                    }
                    else if (!any && b.ExtentPages[k] != 0)
                    {
                        b.ExtentPages[k] = 0;
                    }
                }
                foreach (var k in toWrite)
                {
                    if (k < b.ExtentPages.Length && b.ExtentPages[k] != 0)
                    {
                        await _dev.WriteAsync(MdPageOffset(b.ExtentPages[k]), MdCodec.BuildExtentPage(b, k)).ConfigureAwait(false);
                    }
                }
            }

            // 2. The chain: continuation pages to fresh pages, then the first page.
            var pages = MdCodec.SerializeChain(b);
            var chain = new List<uint> { b.FirstPage };
            for (int i = 1; i < pages.Count; i++)
            {
                uint p = ClaimMdPage();
                newlyClaimed.Add(p);
                chain.Add(p);
            }
            for (int i = pages.Count - 1; i >= 0; i--)
            {
                MdCodec.WritePageHeader(pages[i], b.Id, (uint)i, i + 1 < pages.Count ? chain[i + 1] : BlobFormat.InvalidPage);
                MdCodec.SealPage(pages[i]);
                await _dev.WriteAsync(MdPageOffset(chain[i]), pages[i]).ConfigureAwait(false);
            }
            b.ChainPages = chain;
        }
        catch
        {
            foreach (var p in newlyClaimed)
            {
                _usedPages[p] = false;
            }
            throw;
        }

        // 3. Release what is no longer referenced.
        foreach (var p in oldChain.Skip(1))
        {
            _usedPages[p] = false;
        }
        var nowExtent = b.ExtentPages.Where(p => p != 0).ToHashSet();
        foreach (var p in oldExtent)
        {
            if (!nowExtent.Contains(p) && !ExtentPageReferencedElsewhere(p, b))
            {
                _usedPages[p] = false;
            }
        }
    }

    private bool ExtentPageReferencedElsewhere(uint page, Blob except)
    {
        foreach (var o in _blobs.Values)
        {
            if (o != except && Array.IndexOf(o.ExtentPages, page) >= 0)
            {
                return true;
            }
        }
        return false;
    }

    private uint ClaimMdPage()
    {
        int p = _usedPages.FindFirstClear();
        // Page indices that are someone's blob id page stay reserved for that blob.
        while (p >= 0 && _usedBlobIds[p])
        {
            p = _usedPages.FindFirstClear(p + 1);
        }
        if (p < 0)
        {
            throw new BlobException(Errno.ENOMEM, "no free metadata page");
        }
        _usedPages[p] = true;
        return (uint)p;
    }

    private uint ClaimCluster()
    {
        int c = _usedClusters.FindFirstClear((int)MdClusters);
        if (c < 0)
        {
            throw new BlobException(Errno.ENOSPC, "no free cluster");
        }
        _usedClusters[c] = true;
        return (uint)c;
    }

    private async Task<T> OnMdThread<T>(Func<Task<T>> fn)
    {
        await _md.WaitAsync().ConfigureAwait(false);
        try
        {
            if (_closed)
            {
                throw new BlobException(Errno.ENODEV, "blobstore is unloaded");
            }
            return await fn().ConfigureAwait(false);
        }
        finally
        {
            ResolveParents();
            _md.Release();
        }
    }

    /// <summary>Points every blob's <see cref="Blob.Parent"/> at its parent object.</summary>
    private void ResolveParents()
    {
        foreach (var b in _blobs.Values)
        {
            ulong pid = b.ParentId;
            var p = pid != BlobFormat.InvalidBlobId ? _blobs.GetValueOrDefault(pid) : null;
            b.Parent = p;
        }
        // SPDK fails to open a clone whose snapshot does not open (up the whole chain); it must not read zeroes
        // instead. Walks are bounded: chains are loop-free after load, the bound only guards.
        int n = _blobs.Count;
        foreach (var b in _blobs.Values)
        {
            bool missing = false;
            var cur = b;
            for (int depth = 0; depth <= n && cur != null; depth++)
            {
                if (cur.ParentId != BlobFormat.InvalidBlobId && cur.Parent == null)
                {
                    missing = true;
                    break;
                }
                cur = cur.Parent;
            }
            b.ParentMissing = missing || cur != null;
        }
    }

    private Task OnMdThread(Func<Task> fn) => OnMdThread(async () =>
    {
        await fn().ConfigureAwait(false);
        return 0;
    });

    private Blob Get(ulong id) => _blobs.TryGetValue(id, out var b) ? b : throw new BlobException(Errno.ENOENT, $"blob 0x{id:x} not found");

    /// <summary>A blob for I/O or for an operation reading its data: one whose parent is missing does not open.</summary>
    private Blob GetOpenable(ulong id)
    {
        var b = Get(id);
        return b.ParentMissing ? throw new BlobException(Errno.ENOENT, $"blob 0x{id:x}: its parent 0x{b.ParentId:x} is not found") : b;
    }

    // ---------------------------------------------------------------- blob operations

    /// <summary>Sets the super blob id (SPDK's <c>spdk_bs_set_super</c>, written to the super block now).</summary>
    public Task SetSuperBlobAsync(ulong id) => OnMdThread(async () =>
    {
        Get(id);
        _sb.SuperBlob = id;
        await WriteSuperAsync().ConfigureAwait(false);
    });

    /// <summary>Creates a blob (SPDK's <c>spdk_bs_create_blob_ext</c>): the first free md page is its id; thick
    /// blobs get their clusters now, cleared per the clear method.</summary>
    public Task<Blob> CreateBlobAsync(BlobCreateOptions opts) => OnMdThread(() => CreateLockedAsync(opts, BlobFormat.InvalidBlobId, []));

    private async Task<Blob> CreateLockedAsync(BlobCreateOptions opts, ulong parent, IReadOnlyList<KeyValuePair<string, byte[]>> internalXattrs)
    {
        if (opts.NumClusters > TotalClusters)
        {
            throw new BlobException(Errno.ENOSPC, "blob larger than the store");
        }
        int page = -1;
        for (int p = _usedPages.FindFirstClear(); p >= 0; p = _usedPages.FindFirstClear(p + 1))
        {
            if (!_usedBlobIds[p])
            {
                page = p;
                break;
            }
        }
        if (page < 0)
        {
            throw new BlobException(Errno.ENOMEM, "no free metadata page for a blob");
        }
        if (!opts.ThinProvision && opts.NumClusters > FreeClusters)
        {
            throw new BlobException(Errno.ENOSPC, "not enough free clusters");
        }
        var b = new Blob(BlobFormat.PageToBlobId((uint)page))
        {
            InvalidFlags = BlobFormat.FlagExtentTable | (opts.ThinProvision ? BlobFormat.FlagThinProv : 0),
            MdRoFlags = (ulong)(opts.ClearMethod & 3),
        };
        b.ChainPages.Add((uint)page);
        foreach (var kv in opts.Xattrs)
        {
            b.SetXattr(kv.Key, kv.Value, false);
        }
        foreach (var kv in internalXattrs)
        {
            b.SetXattr(kv.Key, kv.Value, true);
        }
        if (parent != BlobFormat.InvalidBlobId)
        {
            b.SetParent(parent);
        }
        b.ResizeMaps(opts.NumClusters);
        _usedPages[page] = true;
        _usedBlobIds[page] = true;
        var claimed = new List<uint>();
        try
        {
            if (!opts.ThinProvision)
            {
                for (int i = 0; i < b.Clusters.Length; i++)
                {
                    b.Clusters[i] = ClaimCluster();
                    claimed.Add(b.Clusters[i]);
                }
                await ClearClustersAsync(claimed, opts.ClearMethod).ConfigureAwait(false);
            }
            await PersistAsync(b, null).ConfigureAwait(false);
        }
        catch
        {
            foreach (var c in claimed)
            {
                _usedClusters[c] = false;
            }
            _usedPages[page] = false;
            _usedBlobIds[page] = false;
            throw;
        }
        _blobs[b.Id] = b;
        return b;
    }

    private async Task ClearClustersAsync(IEnumerable<uint> clusters, int clearMethod)
    {
        if (clearMethod == 1)
        {
            return;
        }
        // SPDK's bs_batch_clear_dev: default and unmap unmap (zeroes written when the device has no unmap),
        // write_zeroes writes zeroes.
        foreach (var c in clusters)
        {
            if (clearMethod == 3)
            {
                await _dev.WriteZeroesAsync(ClusterOffset(c), _sb.ClusterSize).ConfigureAwait(false);
            }
            else
            {
                await _dev.UnmapAsync(ClusterOffset(c), _sb.ClusterSize).ConfigureAwait(false);
            }
        }
    }

    /// <summary>Sets or removes (value null) a user xattr and syncs the metadata.</summary>
    public Task SetXattrAsync(ulong id, string name, byte[]? value) => OnMdThread(async () =>
    {
        var b = Get(id);
        if (value == null)
        {
            b.RemoveXattr(name, false);
        }
        else
        {
            if (name.Length == 0 || name.Length > ushort.MaxValue || value.Length > ushort.MaxValue)
            {
                throw new BlobException(Errno.EINVAL, "xattr name or value too long");
            }
            b.SetXattr(name, value, false);
        }
        await PersistAsync(b, []).ConfigureAwait(false);
    });

    /// <summary>Marks a blob read-only (SPDK's <c>spdk_blob_set_read_only</c> + sync).</summary>
    public Task SetReadOnlyAsync(ulong id) => OnMdThread(async () =>
    {
        var b = Get(id);
        ThrowIfLocked(id);
        b.DataRoFlags |= BlobFormat.DataRoReadOnly;
        await PersistAsync(b, []).ConfigureAwait(false);
    });

    /// <summary>Resizes a blob to <paramref name="clusters"/> clusters (SPDK's <c>spdk_blob_resize</c> + sync).</summary>
    public Task ResizeAsync(ulong id, ulong clusters) => OnMdThread(async () =>
    {
        var b = Get(id);
        ThrowIfLocked(id);
        if (b.IsReadOnly)
        {
            throw new BlobException(Errno.EPERM, "blob is read-only");
        }
        ulong old = b.NumClusters;
        if (clusters > TotalClusters)
        {
            throw new BlobException(Errno.ENOSPC, "size larger than the store");
        }
        if (clusters > old)
        {
            if (!b.IsThinProvisioned && clusters - old > FreeClusters)
            {
                throw new BlobException(Errno.ENOSPC, "not enough free clusters");
            }
            var oldClusters = b.Clusters;
            var oldPages = b.ExtentPages;
            b.ResizeMaps(clusters);
            var claimed = new List<uint>();
            try
            {
                if (!b.IsThinProvisioned)
                {
                    for (ulong i = old; i < clusters; i++)
                    {
                        b.Clusters[i] = ClaimCluster();
                        claimed.Add(b.Clusters[i]);
                    }
                    await ClearClustersAsync(claimed, b.ClearMethod).ConfigureAwait(false);
                }
                await PersistAsync(b, null).ConfigureAwait(false);
            }
            catch
            {
                foreach (var c in claimed)
                {
                    _usedClusters[c] = false;
                }
                b.Clusters = oldClusters;
                b.ExtentPages = oldPages;
                throw;
            }
        }
        else if (clusters < old)
        {
            var released = b.Clusters.AsSpan((int)clusters).ToArray();
            var oldClusters = b.Clusters;
            var oldPages = b.ExtentPages;
            b.ResizeMaps(clusters);
            try
            {
                // The commit names the smaller size; the trimmed extent pages follow it.
                await PersistAsync(b, null).ConfigureAwait(false);
            }
            catch
            {
                b.Clusters = oldClusters;
                b.ExtentPages = oldPages;
                throw;
            }
            foreach (var c in released)
            {
                if (c != 0)
                {
                    _usedClusters[c] = false;
                }
            }
            foreach (var p in oldPages)
            {
                if (p != 0 && Array.IndexOf(b.ExtentPages, p) < 0 && !ExtentPageReferencedElsewhere(p, b))
                {
                    _usedPages[p] = false;
                }
            }
        }
    });

    /// <summary>Blobs whose parent is <paramref name="id"/> (a snapshot's clones).</summary>
    public List<Blob> ClonesOf(ulong id) => _blobs.Values.Where(b => b.ParentId == id).OrderBy(b => b.Id).ToList();

    /// <summary>
    /// Deletes a blob (SPDK's <c>spdk_bs_delete_blob</c>). A snapshot with one clone is merged into it (the clone
    /// takes the snapshot's clusters it does not have and the snapshot's parent), marked SNAPRM first so a crash
    /// in between resolves at load; a snapshot with more than one clone cannot be deleted (-EBUSY).
    /// </summary>
    public Task DeleteBlobAsync(ulong id) => OnMdThread(async () =>
    {
        var b = Get(id);
        ThrowIfLocked(id);
        var clones = ClonesOf(id);
        if (clones.Count > 1)
        {
            throw new BlobException(Errno.EBUSY, "snapshot has more than one clone");
        }
        if (id == _sb.SuperBlob)
        {
            _sb.SuperBlob = BlobFormat.InvalidBlobId;
            await WriteSuperAsync().ConfigureAwait(false);
        }
        var keep = new HashSet<uint>();
        if (clones.Count == 1)
        {
            var c = clones[0];
            b.SetXattr(BlobFormat.XattrSnapshotPendingRemoval, [1], true);
            await PersistAsync(b, []).ConfigureAwait(false);
            await QuiesceAsync(c).ConfigureAwait(false);
            var oldClusters = (uint[])c.Clusters.Clone();
            var oldPages = (uint[])c.ExtentPages.Clone();
            try
            {
                for (int i = 0; i < c.Clusters.Length && i < b.Clusters.Length; i++)
                {
                    if (c.Clusters[i] == 0 && b.Clusters[i] != 0)
                    {
                        c.Clusters[i] = b.Clusters[i];
                        keep.Add(b.Clusters[i]);
                    }
                }
                c.SetParent(b.ParentId);
                if (b.ParentId == BlobFormat.InvalidBlobId && c.Clusters.All(x => x != 0))
                {
                    c.InvalidFlags &= ~BlobFormat.FlagThinProv;
                }
                // New extent pages: the clone must not name the snapshot's clusters before its commit.
                await PersistAsync(c, null, relocateExtentPages: true).ConfigureAwait(false);
            }
            catch
            {
                c.Clusters = oldClusters;
                c.ExtentPages = oldPages;
                c.SetParent(b.Id);
                throw;
            }
            finally
            {
                Unquiesce(c);
            }
        }
        await DropBlobMdAsync(b).ConfigureAwait(false);
        _usedBlobIds[b.FirstPage] = false;
        foreach (var p in b.ChainPages)
        {
            _usedPages[p] = false;
        }
        foreach (var p in b.ExtentPages)
        {
            if (p != 0 && !ExtentPageReferencedElsewhere(p, b))
            {
                _usedPages[p] = false;
            }
        }
        foreach (var c in b.Clusters)
        {
            if (c != 0 && !keep.Contains(c))
            {
                _usedClusters[c] = false;
            }
        }
    });

    /// <summary>
    /// Snapshots a blob (SPDK's <c>spdk_bs_create_snapshot</c>): a new read-only blob takes over the blob's
    /// clusters and extent pages and its parent; the blob becomes a thin clone of it. Writes to the blob are
    /// quiesced while it runs. Three commits: the snapshot (marked SNAPTMP), the blob (parent = snapshot),
    /// the snapshot without SNAPTMP; a crash in between is finished or rolled back at load.
    /// </summary>
    public Task<Blob> CreateSnapshotAsync(ulong id, IReadOnlyList<KeyValuePair<string, byte[]>> xattrs) => OnMdThread(async () =>
    {
        var o = GetOpenable(id);
        ThrowIfLocked(id);
        if (o.IsReadOnly && o.ParentId == BlobFormat.InvalidBlobId && ClonesOf(id).Count > 0)
        {
            throw new BlobException(Errno.EINVAL, "cannot snapshot a snapshot");
        }
        await QuiesceAsync(o).ConfigureAwait(false);
        try
        {
            var tmp = new byte[8];
            BinaryPrimitives.WriteUInt64LittleEndian(tmp, o.Id);
            var s = await CreateLockedAsync(new BlobCreateOptions { ThinProvision = true, NumClusters = 0, Xattrs = xattrs, ClearMethod = o.ClearMethod },
                o.ParentId, [new(BlobFormat.XattrSnapshotInProgress, tmp)]).ConfigureAwait(false);
            // Commit 1: the snapshot owns the blob's clusters and extent pages (shared for now).
            s.Clusters = (uint[])o.Clusters.Clone();
            s.ExtentPages = (uint[])o.ExtentPages.Clone();
            s.UseExtentTable = o.UseExtentTable;
            s.DataRoFlags |= BlobFormat.DataRoReadOnly;
            await PersistAsync(s, []).ConfigureAwait(false);
            // Commit 2: the blob is now an empty thin clone of the snapshot.
            var oc = o.Clusters;
            var op = o.ExtentPages;
            var of = o.InvalidFlags;
            o.Parent = s; // before the clusters go: a concurrent reader then finds them in the snapshot
            o.Clusters = new uint[oc.Length];
            o.ExtentPages = new uint[op.Length];
            o.InvalidFlags |= BlobFormat.FlagThinProv;
            o.SetParent(s.Id);
            try
            {
                await PersistAsync(o, null).ConfigureAwait(false);
            }
            catch
            {
                o.Clusters = oc;
                o.ExtentPages = op;
                o.InvalidFlags = of;
                o.SetParent(s.ParentId);
                o.Parent = s.Parent;
                throw;
            }
            // Commit 3.
            s.RemoveXattr(BlobFormat.XattrSnapshotInProgress, true);
            s.InvalidFlags |= BlobFormat.FlagThinProv;
            await PersistAsync(s, []).ConfigureAwait(false);
            return s;
        }
        finally
        {
            Unquiesce(o);
        }
    });

    /// <summary>Clones a read-only blob (SPDK's <c>spdk_bs_create_clone</c>): a thin blob reading through it.</summary>
    public Task<Blob> CreateCloneAsync(ulong snapshotId, IReadOnlyList<KeyValuePair<string, byte[]>> xattrs) => OnMdThread(() =>
    {
        var s = GetOpenable(snapshotId);
        if (!s.IsReadOnly)
        {
            throw new BlobException(Errno.EINVAL, "clone source must be read-only");
        }
        return CreateLockedAsync(new BlobCreateOptions { ThinProvision = true, NumClusters = s.NumClusters, Xattrs = xattrs, ClearMethod = s.ClearMethod },
            s.Id, []);
    });

    /// <summary>Inflates a blob (SPDK's <c>spdk_bs_inflate_blob</c>): every cluster allocated, copied from the
    /// backing chain (zeroes where none); no parent, not thin.</summary>
    public Task InflateAsync(ulong id) => CopyUpAsync(id, decouple: false);

    /// <summary>Decouples a blob from its parent (SPDK's <c>spdk_bs_blob_decouple_parent</c>): the clusters the
    /// parent holds are copied in; the parent's parent becomes the blob's parent.</summary>
    public Task DecoupleParentAsync(ulong id) => CopyUpAsync(id, decouple: true);

    /// <summary>
    /// Inflate and decouple as SPDK runs them: each cluster to copy is "touched" through the first-write path
    /// (allocated, filled from the backing chain and committed on its own, taking the metadata serializer for that
    /// cluster only), so the blob's I/O and other metadata operations go on during the copy; only the final step
    /// (the new parent and flags committed) quiesces the blob. While it runs the blob is locked against
    /// operations that would change it or its backing chain under the copy (snapshot, resize, delete, read-only,
    /// another inflate or decouple, deleting an ancestor): those fail with -EBUSY, as SPDK's
    /// <c>locked_operation_in_progress</c> makes them.
    /// </summary>
    private async Task CopyUpAsync(ulong id, bool decouple)
    {
        Blob b = null!;
        var need = new List<int>();
        await OnMdThread(() =>
        {
            b = GetOpenable(id);
            if (b.LockedOperation)
            {
                throw new BlobException(Errno.EBUSY, "another inflate or decouple_parent runs on the blob");
            }
            if (decouple && b.ParentId == BlobFormat.InvalidBlobId)
            {
                throw new BlobException(Errno.EINVAL, "blob has no parent");
            }
            if (b.IsReadOnly)
            {
                throw new BlobException(Errno.EPERM, "blob is read-only");
            }
            var parent = b.ParentId != BlobFormat.InvalidBlobId ? Get(b.ParentId) : null;
            for (int i = 0; i < b.Clusters.Length; i++)
            {
                if (b.Clusters[i] == 0 && (!decouple || parent!.ClusterAt((ulong)i) != 0))
                {
                    need.Add(i);
                }
            }
            if ((uint)need.Count > FreeClusters)
            {
                throw new BlobException(Errno.ENOSPC, "not enough free clusters");
            }
            b.LockedOperation = true;
            b.StartCopy(decouple ? "decouple_parent" : "inflate", need.Count);
            return Task.CompletedTask;
        }).ConfigureAwait(false);
        try
        {
            foreach (var i in need)
            {
                // A zero-length write at the cluster (SPDK's "touch"): allocates and copies it unless a guest
                // write got there first.
                await EnterWriteAsync(b).ConfigureAwait(false);
                try
                {
                    await AllocateAndWriteAsync(b, (ulong)i, 0, ReadOnlyMemory<byte>.Empty).ConfigureAwait(false);
                }
                finally
                {
                    Interlocked.Decrement(ref b.InFlightWrites);
                }
                b.CopiedCluster();
            }
            await OnMdThread(async () =>
            {
                if (!_blobs.TryGetValue(b.Id, out var live) || live != b)
                {
                    throw new BlobException(Errno.ENOENT, $"blob 0x{b.Id:x} was deleted");
                }
                await QuiesceAsync(b).ConfigureAwait(false);
                var oldFlags = b.InvalidFlags;
                var parent = b.ParentId != BlobFormat.InvalidBlobId ? Get(b.ParentId) : null;
                try
                {
                    // The chain is locked: every cluster the copy needed is now the blob's own.
                    for (int i = 0; i < b.Clusters.Length; i++)
                    {
                        if (b.Clusters[i] == 0 && (!decouple || parent!.ClusterAt((ulong)i) != 0))
                        {
                            throw new BlobException(Errno.EIO, $"cluster {i} of blob 0x{b.Id:x} was not copied");
                        }
                    }
                    var newParent = decouple ? parent!.ParentId : BlobFormat.InvalidBlobId;
                    b.SetParent(newParent);
                    if (!decouple || (newParent == BlobFormat.InvalidBlobId && b.Clusters.All(x => x != 0)))
                    {
                        b.InvalidFlags &= ~BlobFormat.FlagThinProv;
                    }
                    await PersistAsync(b, null).ConfigureAwait(false);
                }
                catch
                {
                    b.InvalidFlags = oldFlags;
                    if (parent != null)
                    {
                        b.SetParent(parent.Id);
                    }
                    throw;
                }
                finally
                {
                    Unquiesce(b);
                }
            }).ConfigureAwait(false);
        }
        finally
        {
            b.EndCopy();
            b.LockedOperation = false;
        }
    }

    /// <summary>
    /// Shallow copy (SPDK's <c>spdk_bs_blob_shallow_copy</c>, v24.05): the blob's own allocated clusters (not its
    /// parents') are copied to <paramref name="dst"/> at the same byte offsets; the rest of the destination is left
    /// alone. The blob must be read-only (-EPERM), the destination at least the blob's size and its block size a
    /// divisor of the store's (-EINVAL); another locked operation on the blob is -EBUSY. The blob is locked while
    /// the copy runs (delete, resize, snapshot fail with -EBUSY; being read-only its clusters cannot change), so
    /// the data is copied outside the metadata serializer: guest reads and other metadata operations go on.
    /// <paramref name="copied"/> is told the clusters copied so far after each one; progress also shows in
    /// <see cref="Blob.CopyProgress"/> as "shallow_copy". Returns the number of clusters copied.
    /// </summary>
    public async Task<long> ShallowCopyAsync(ulong id, IBlobDevice dst, Action<long>? copied = null)
    {
        ArgumentNullException.ThrowIfNull(dst);
        Blob b = null!;
        var own = new List<(ulong Index, uint Cluster)>();
        await OnMdThread(() =>
        {
            b = GetOpenable(id);
            if (!b.IsReadOnly)
            {
                throw new BlobException(Errno.EPERM, $"blob 0x{id:x} must be read-only for a shallow copy");
            }
            ulong size = b.NumClusters * _sb.ClusterSize;
            if (dst.BlockSize <= 0 || size > dst.BlockCount * (ulong)dst.BlockSize)
            {
                throw new BlobException(Errno.EINVAL, $"the destination ({dst.BlockCount} blocks of {dst.BlockSize} bytes) is smaller than the blob ({size} bytes)");
            }
            if (_dev.BlockSize % dst.BlockSize != 0)
            {
                throw new BlobException(Errno.EINVAL, $"the destination's block size {dst.BlockSize} does not divide the store's {_dev.BlockSize}");
            }
            if (b.LockedOperation)
            {
                throw new BlobException(Errno.EBUSY, "another operation runs on the blob");
            }
            for (int i = 0; i < b.Clusters.Length; i++)
            {
                if (b.Clusters[i] != 0)
                {
                    own.Add(((ulong)i, b.Clusters[i]));
                }
            }
            b.LockedOperation = true;
            b.StartCopy("shallow_copy", own.Count);
            return Task.CompletedTask;
        }).ConfigureAwait(false);
        long n = 0;
        try
        {
            var buf = own.Count > 0 ? GC.AllocateUninitializedArray<byte>((int)_sb.ClusterSize) : [];
            foreach (var (index, cluster) in own)
            {
                if (_closed)
                {
                    throw new BlobException(Errno.ENODEV, "blobstore is unloaded");
                }
                await _dev.ReadAsync(ClusterOffset(cluster), buf).ConfigureAwait(false);
                await dst.WriteAsync(index * _sb.ClusterSize, buf).ConfigureAwait(false);
                n++;
                b.CopiedCluster();
                copied?.Invoke(n);
            }
        }
        finally
        {
            b.EndCopy();
            b.LockedOperation = false;
        }
        return n;
    }

    /// <summary>Whether an inflate or decouple_parent runs on <paramref name="id"/> or on a blob whose backing
    /// chain holds it: deleting it, snapshotting it, resizing it or marking it read-only now fails with -EBUSY.</summary>
    public bool IsLocked(ulong id)
    {
        foreach (var l in _blobs.Values)
        {
            if (!l.LockedOperation)
            {
                continue;
            }
            int depth = 0;
            for (var x = l; x != null && depth <= _blobs.Count; x = x.Parent, depth++)
            {
                if (x.Id == id)
                {
                    return true;
                }
            }
        }
        return false;
    }

    private void ThrowIfLocked(ulong id)
    {
        if (IsLocked(id))
        {
            throw new BlobException(Errno.EBUSY, "an inflate or decouple_parent is in progress on the blob or a clone of it");
        }
    }

    /// <summary>Waits for every write the I/O layer admitted on its own fast path (not through this store's
    /// write methods) before the call, and for the blob's I/O resolved in the bdev layer's remap: set by the lvol
    /// bdev module. A quiesce calls it with the blob after marking it frozen.</summary>
    public Func<Blob, Task>? DrainFastWrites { get; set; }

    private async Task QuiesceAsync(Blob b)
    {
        var tcs = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        b.SetFrozen(tcs); // a full fence: the count below is read after the flag is visible
        while (Volatile.Read(ref b.InFlightWrites) != 0)
        {
            await Task.Delay(1).ConfigureAwait(false);
        }
        if (DrainFastWrites is { } drain)
        {
            await drain(b).ConfigureAwait(false);
        }
    }

    private static void Unquiesce(Blob b)
    {
        var tcs = b.SetFrozen(null);
        tcs?.TrySetResult();
    }

    private static async ValueTask EnterWriteAsync(Blob b)
    {
        while (true)
        {
            Interlocked.Increment(ref b.InFlightWrites);
            var f = Volatile.Read(ref b.Frozen);
            if (f == null)
            {
                return;
            }
            Interlocked.Decrement(ref b.InFlightWrites);
            await f.Task.ConfigureAwait(false);
        }
    }

    // ---------------------------------------------------------------- data path

    private void CheckRange(Blob b, ulong offset, int length)
    {
        if (offset % _sb.IoUnitSize != 0 || (uint)length % _sb.IoUnitSize != 0 || offset + (ulong)length > b.NumClusters * _sb.ClusterSize || offset + (ulong)length < offset)
        {
            throw new BlobException(Errno.EINVAL, $"I/O {offset}+{length} outside blob 0x{b.Id:x} or not in io units");
        }
    }

    /// <summary>Reads blob bytes (allocated clusters from the device, others through the backing chain, zeroes
    /// at the end of it).</summary>
    public ValueTask ReadAsync(ulong id, ulong offset, Memory<byte> buffer)
    {
        var b = GetOpenable(id);
        CheckRange(b, offset, buffer.Length);
        return ReadCoreAsync(b, offset, buffer);
    }

    private async ValueTask ReadCoreAsync(Blob b, ulong offset, Memory<byte> buffer)
    {
        ulong cs = _sb.ClusterSize;
        while (buffer.Length > 0)
        {
            ulong ci = offset / cs;
            int n = (int)Math.Min((ulong)buffer.Length, cs - offset % cs);
            uint c = b.ClusterAt(ci);
            if (c != 0)
            {
                await _dev.ReadAsync(ClusterOffset(c) + offset % cs, buffer[..n]).ConfigureAwait(false);
            }
            else
            {
                await ReadBackingAsync(b, offset, buffer[..n]).ConfigureAwait(false);
            }
            offset += (ulong)n;
            buffer = buffer[n..];
        }
    }

    /// <summary>Reads what the blob's backing (its parent chain) holds at the range; zeroes without a parent or
    /// past the parent's end.</summary>
    private async ValueTask ReadBackingAsync(Blob b, ulong offset, Memory<byte> buffer)
    {
        var p = b.Parent;
        if (p == null)
        {
            buffer.Span.Clear();
            return;
        }
        ulong end = p.NumClusters * _sb.ClusterSize;
        if (offset >= end)
        {
            buffer.Span.Clear();
            return;
        }
        int inside = (int)Math.Min((ulong)buffer.Length, end - offset);
        await ReadCoreAsync(p, offset, buffer[..inside]).ConfigureAwait(false);
        buffer.Span[inside..].Clear();
    }

    /// <summary>Writes blob bytes; a write to an unallocated cluster allocates it on the metadata serializer
    /// (copying the rest of the cluster from the backing chain) and returns once that is committed.</summary>
    public async ValueTask WriteAsync(ulong id, ulong offset, ReadOnlyMemory<byte> data)
    {
        var b = GetOpenable(id);
        CheckRange(b, offset, data.Length);
        if (b.IsReadOnly)
        {
            throw new BlobException(Errno.EPERM, "blob is read-only");
        }
        await EnterWriteAsync(b).ConfigureAwait(false);
        try
        {
            ulong cs = _sb.ClusterSize;
            while (data.Length > 0)
            {
                ulong ci = offset / cs;
                int n = (int)Math.Min((ulong)data.Length, cs - offset % cs);
                uint c = b.ClusterAt(ci);
                if (c != 0)
                {
                    await _dev.WriteAsync(ClusterOffset(c) + offset % cs, data[..n]).ConfigureAwait(false);
                }
                else
                {
                    await AllocateAndWriteAsync(b, ci, offset % cs, data[..n]).ConfigureAwait(false);
                }
                offset += (ulong)n;
                data = data[n..];
            }
        }
        finally
        {
            Interlocked.Decrement(ref b.InFlightWrites);
        }
    }

    private void CheckRange(Blob b, ulong offset, ulong length)
    {
        if (offset % _sb.IoUnitSize != 0 || length % _sb.IoUnitSize != 0 || offset + length > b.NumClusters * _sb.ClusterSize || offset + length < offset)
        {
            throw new BlobException(Errno.EINVAL, $"I/O {offset}+{length} outside blob 0x{b.Id:x} or not in io units");
        }
    }

    /// <summary>Writes zeroes as SPDK's <c>spdk_blob_io_write_zeroes</c>: an allocated cluster's range is zeroed on
    /// the device (its write zeroes); an unallocated cluster of a clone is allocated with zeroes (its parent's data
    /// must no longer show); an unallocated cluster of a blob without a parent already reads zeroes and stays
    /// unallocated.</summary>
    public async ValueTask WriteZeroesAsync(ulong id, ulong offset, ulong length)
    {
        var b = GetOpenable(id);
        CheckRange(b, offset, length);
        if (b.IsReadOnly)
        {
            throw new BlobException(Errno.EPERM, "blob is read-only");
        }
        await EnterWriteAsync(b).ConfigureAwait(false);
        try
        {
            ulong cs = _sb.ClusterSize;
            byte[]? zero = null;
            while (length > 0)
            {
                ulong ci = offset / cs;
                int n = (int)Math.Min(length, cs - offset % cs);
                uint c = b.ClusterAt(ci);
                if (c != 0)
                {
                    await _dev.WriteZeroesAsync(ClusterOffset(c) + offset % cs, (ulong)n).ConfigureAwait(false);
                }
                else if (b.ParentId != BlobFormat.InvalidBlobId)
                {
                    zero ??= _zeroCluster ??= new byte[cs];
                    await AllocateAndWriteAsync(b, ci, offset % cs, zero.AsMemory(0, n)).ConfigureAwait(false);
                }
                offset += (ulong)n;
                length -= (ulong)n;
            }
        }
        finally
        {
            Interlocked.Decrement(ref b.InFlightWrites);
        }
    }

    /// <summary>Unmap as SPDK's <c>spdk_blob_io_unmap</c>: the device range of every allocated cluster in the range
    /// is unmapped (a thick blob's clusters stay allocated; what they read afterwards is the device's unmap
    /// result); unallocated clusters are left alone (a clone still reads its parent there). A device without
    /// unmap gets zeroes written instead (<see cref="WriteZeroesAsync(ulong, ulong, ulong)"/>).</summary>
    public async ValueTask UnmapAsync(ulong id, ulong offset, ulong length)
    {
        if (!_dev.SupportsUnmap)
        {
            await WriteZeroesAsync(id, offset, length).ConfigureAwait(false);
            return;
        }
        var b = GetOpenable(id);
        CheckRange(b, offset, length);
        if (b.IsReadOnly)
        {
            throw new BlobException(Errno.EPERM, "blob is read-only");
        }
        await EnterWriteAsync(b).ConfigureAwait(false);
        try
        {
            ulong cs = _sb.ClusterSize;
            while (length > 0)
            {
                ulong ci = offset / cs;
                ulong n = Math.Min(length, cs - offset % cs);
                uint c = b.ClusterAt(ci);
                if (c != 0)
                {
                    await _dev.UnmapAsync(ClusterOffset(c) + offset % cs, n).ConfigureAwait(false);
                }
                offset += n;
                length -= n;
            }
        }
        finally
        {
            Interlocked.Decrement(ref b.InFlightWrites);
        }
    }

    /// <summary>The slow path of a write (the caller counts it in <see cref="Blob.InFlightWrites"/>). The write
    /// leaves the in-flight count while it waits for the metadata serializer: its holder may be quiescing this
    /// blob (snapshot, delete, inflate), which waits for the count to drain, so counting ourselves would deadlock
    /// both. Once the serializer is held nobody quiesces (quiescing happens only under it), so the write counts
    /// itself again and re-checks the cluster, which a snapshot may have moved meanwhile.</summary>
    private async Task AllocateAndWriteAsync(Blob b, ulong ci, ulong within, ReadOnlyMemory<byte> data)
    {
        Interlocked.Decrement(ref b.InFlightWrites);
        try
        {
            // Captures the caller's context: a first write on a reactor that waited behind another allocation
            // resumes on that reactor (one message), not on the thread pool, so its device I/O is submitted
            // inline there (see BdevBlobDevice) instead of hopping between threads.
            await _md.WaitAsync().ConfigureAwait(true);
        }
        finally
        {
            Interlocked.Increment(ref b.InFlightWrites);
        }
        try
        {
            if (_closed)
            {
                throw new BlobException(Errno.ENODEV, "blobstore is unloaded");
            }
            if (!_blobs.TryGetValue(b.Id, out var live) || live != b)
            {
                throw new BlobException(Errno.ENOENT, $"blob 0x{b.Id:x} was deleted");
            }
            uint c = b.ClusterAt(ci);
            if (c != 0)
            {
                if (!data.IsEmpty)
                {
                    await _dev.WriteAsync(ClusterOffset(c) + within, data).ConfigureAwait(false);
                }
                return;
            }
            c = ClaimCluster();
            var oldPages = (uint[])b.ExtentPages.Clone();
            try
            {
                bool full = within == 0 && (ulong)data.Length == _sb.ClusterSize;
                if (full)
                {
                    await _dev.WriteAsync(ClusterOffset(c), data).ConfigureAwait(false);
                }
                else if (_dev.SupportsWriteZeroes && BackingReadsZeroes(b, ci))
                {
                    // Nothing under the cluster (no parent, or no blob up the chain has it): SPDK copies nothing
                    // then (bs_allocate_and_copy_cluster with is_zeroes) and leaves the rest of the cluster as the
                    // device holds it; we zero it with the device's write zeroes (a command, no data moved), so a
                    // reused cluster never shows an old lvol's data, and write only the caller's bytes.
                    ulong at = ClusterOffset(c), tail = within + (ulong)data.Length;
                    if (within > 0)
                    {
                        await _dev.WriteZeroesAsync(at, within).ConfigureAwait(false);
                    }
                    await _dev.WriteAsync(at + within, data).ConfigureAwait(false);
                    if (tail < _sb.ClusterSize)
                    {
                        await _dev.WriteZeroesAsync(at + tail, _sb.ClusterSize - tail).ConfigureAwait(false);
                    }
                }
                else
                {
                    // One cluster buffer for the store: allocations run one at a time under the serializer.
                    var buf = _copyBuffer ??= GC.AllocateUninitializedArray<byte>((int)_sb.ClusterSize);
                    await ReadBackingAsync(b, ci * _sb.ClusterSize, buf).ConfigureAwait(false);
                    data.Span.CopyTo(buf.AsSpan((int)within));
                    await _dev.WriteAsync(ClusterOffset(c), buf).ConfigureAwait(false);
                }
                // The md names the cluster before I/O does: a fast-path write on another channel must not land
                // in (and be acknowledged from) a cluster a failed commit then frees. Until it is published,
                // such writes take the slow path and wait here.
                b.PendingCluster = c;
                b.PendingIndex = (long)ci;
                await PersistExtentAsync(b, (int)(ci / BlobFormat.ExtentsPerPage)).ConfigureAwait(false);
                b.PendingIndex = -1;
                b.Clusters[ci] = c;
            }
            catch
            {
                b.PendingIndex = -1;
                b.Clusters[ci] = 0;
                b.ExtentPages = oldPages;
                _usedClusters[c] = false;
                throw;
            }
        }
        finally
        {
            _md.Release();
        }
    }

    /// <summary>Whether blob cluster <paramref name="ci"/>'s backing reads zeroes: no blob up the parent chain
    /// has the cluster allocated (SPDK's back_bs_dev is_zeroes).</summary>
    private static bool BackingReadsZeroes(Blob b, ulong ci)
    {
        for (var p = b.Parent; p != null && ci < p.NumClusters; p = p.Parent)
        {
            if (p.ClusterAt(ci) != 0)
            {
                return false;
            }
        }
        return true;
    }

    /// <summary>After one cluster allocation: an existing extent page is rewritten in place (that write is the
    /// commit); a new one is written to a free page and then the chain (the extent table) commits it. Old-format
    /// (RLE) blobs rewrite the chain.</summary>
    private async Task PersistExtentAsync(Blob b, int k)
    {
        if (b.UseExtentTable && b.ExtentPages[k] != 0)
        {
            await _dev.WriteAsync(MdPageOffset(b.ExtentPages[k]), MdCodec.BuildExtentPage(b, k)).ConfigureAwait(false);
            return;
        }
        await PersistAsync(b, [k]).ConfigureAwait(false);
    }

    /// <summary>
    /// Grows the store to its device's current size (SPDK's <c>spdk_bs_grow_live</c>, used by
    /// <c>bdev_lvol_grow_lvstore</c> after the base bdev grew): the super block takes the new size and the
    /// used-cluster mask's new length, the new clusters become free. The mask must fit the room the store reserved
    /// for it at init (as much as the md region would need); a device smaller than the store or a mask that does
    /// not fit is -ENOSPC. Returns whether the store grew. The super block is the commit point; the masks are
    /// written at unload (a crash in between recovers them from the metadata).
    /// </summary>
    public Task<bool> GrowLiveAsync() => OnMdThread(async () =>
    {
        var page = new byte[BlobFormat.PageSize];
        await _dev.ReadAsync(0, page).ConfigureAwait(false);
        int rc = SuperBlock.TryParse(page, out var onDisk);
        if (rc != 0 || onDisk.ClusterSize != _sb.ClusterSize || onDisk.MdStart != _sb.MdStart)
        {
            throw new BlobException(rc != 0 ? -rc : Errno.EILSEQ, "the super block on the device is not this store's");
        }
        ulong devSize = _dev.BlockCount * (ulong)_dev.BlockSize;
        if (devSize == _sb.Size)
        {
            return false;
        }
        ulong total = devSize / _sb.ClusterSize;
        long maskLen = BlobFormat.MaskPages((long)total);
        long room = (long)_sb.UsedBlobIdMaskStart - _sb.UsedClusterMaskStart;
        if (devSize < _sb.Size || total < TotalClusters || total > int.MaxValue || maskLen > room)
        {
            throw new BlobException(Errno.ENOSPC, devSize < _sb.Size
                ? $"the device ({devSize} bytes) is smaller than the store ({_sb.Size} bytes)"
                : $"the used-cluster mask for {total} clusters does not fit the {room} page(s) reserved for it");
        }
        ulong oldSize = _sb.Size;
        uint oldMaskLen = _sb.UsedClusterMaskLen;
        _sb.Size = devSize;
        _sb.UsedClusterMaskLen = (uint)maskLen;
        _sb.Clean = 0;
        try
        {
            await WriteSuperAsync().ConfigureAwait(false);
        }
        catch
        {
            _sb.Size = oldSize;
            _sb.UsedClusterMaskLen = oldMaskLen;
            throw;
        }
        var grown = new BitSet((int)total);
        for (uint c = 0; c < TotalClusters; c++)
        {
            if (_usedClusters[c])
            {
                grown[c] = true;
            }
        }
        _usedClusters = grown;
        TotalClusters = (uint)total;
        return true;
    });

    /// <summary>Writes the blob's metadata as it is in memory (SPDK's <c>spdk_blob_sync_md</c>).</summary>
    public Task SyncMdAsync(ulong id) => OnMdThread(() => PersistAsync(Get(id), null));
}
