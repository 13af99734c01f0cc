using System.Buffers.Binary;
using System.Runtime.CompilerServices;
using System.Text;

namespace VhostBackend.Blob;

/// <summary>
/// One blob's metadata in memory (SPDK's <c>struct spdk_blob</c>, active state): flags, xattrs, the cluster map
/// (<see cref="Clusters"/>: the device cluster of each blob cluster, 0 = unallocated) and, for blobs in the
/// extent-table format, the md page of each extent page (<see cref="ExtentPages"/>, one per 512 clusters,
/// 0 = none). Mutated only by its <see cref="BlobStore"/> under the metadata serializer.
/// </summary>
public sealed class Blob
{
    internal Blob(ulong id) => Id = id;

    public ulong Id { get; }

    internal uint FirstPage => (uint)Id;

    private uint[] _clusters = [];
    private readonly Lock _ioClustersLock = new();

    /// <summary>The cluster map (see the class); setting it publishes it to <see cref="IoClusters"/>.</summary>
    internal uint[] Clusters
    {
        get => _clusters;
        set
        {
            _clusters = value;
            PublishIoClusters();
        }
    }

    /// <summary>
    /// The cluster map as I/O threads may use it without asking the store: the same array as the blob's map
    /// (allocations appear in it in place, a resize or snapshot publishes a new one) while the blob takes fast-path
    /// I/O, and an empty one while it is frozen (<see cref="IsFrozen"/>), so a lookup then finds nothing and the I/O
    /// takes the module's path. Read once per I/O (the lvol's remap hands it to the bdev layer).
    /// </summary>
    public StrongBox<uint[]> IoClusters { get; } = new([]);

    // Every change of the map or of the frozen state publishes after making it; the lock makes the last publisher
    // see both (a thaw racing a map change cannot leave a stale map published).
    private void PublishIoClusters()
    {
        lock (_ioClustersLock)
        {
            Volatile.Write(ref IoClusters.Value, Volatile.Read(ref Frozen) == null ? _clusters : []);
        }
    }

    /// <summary>Freezes (a non-null <paramref name="frozen"/>) or thaws the blob's I/O; returns the previous state.</summary>
    internal TaskCompletionSource? SetFrozen(TaskCompletionSource? frozen)
    {
        var previous = Interlocked.Exchange(ref Frozen, frozen);
        PublishIoClusters();
        return previous;
    }
    internal uint[] ExtentPages = [];
    internal bool UseExtentTable = true;
    /// <summary>The md pages of the chain: [0] is the blob id's page, the rest continuation pages.</summary>
    internal List<uint> ChainPages = [];

    public ulong InvalidFlags { get; internal set; }
    public ulong DataRoFlags { get; internal set; }
    public ulong MdRoFlags { get; internal set; }

    internal readonly List<KeyValuePair<string, byte[]>> XattrList = [];
    internal readonly List<KeyValuePair<string, byte[]>> InternalXattrList = [];

    /// <summary>The parent blob object (kept equal to <see cref="ParentId"/> by the store), read by I/O threads
    /// without a lookup.</summary>
    internal volatile Blob? Parent;

    private long _copyDone;
    private long _copyTotal;
    private volatile string? _copyOperation;

    /// <summary>
    /// The cluster copy of an inflate or decouple running on this blob (operation, clusters copied, clusters to
    /// copy), or null: what <c>bdev_lvol_get_lvols</c> reports while the RPC waits. Written by the md thread,
    /// read from any thread.
    /// </summary>
    public (string Operation, long Done, long Total)? CopyProgress =>
        _copyOperation is { } op ? (op, Interlocked.Read(ref _copyDone), Interlocked.Read(ref _copyTotal)) : null;

    internal void StartCopy(string operation, long total)
    {
        Interlocked.Exchange(ref _copyDone, 0);
        Interlocked.Exchange(ref _copyTotal, total);
        _copyOperation = operation;
    }

    internal void CopiedCluster() => Interlocked.Increment(ref _copyDone);

    internal void EndCopy() => _copyOperation = null;

    /// <summary>An inflate or decouple_parent runs on the blob (SPDK's <c>locked_operation_in_progress</c>); md thread only.</summary>
    internal volatile bool LockedOperation;

    /// <summary>The blob names a parent that is not in the store: it does not open (no I/O, not listed as an lvol).</summary>
    public bool ParentMissing { get; internal set; }

    /// <summary>Writes in flight on the bdev path (see <see cref="Frozen"/>).</summary>
    internal int InFlightWrites;
    /// <summary>Set while the blob's writes are quiesced (snapshot, inflate); writers then wait on it. Changed only
    /// through <see cref="SetFrozen"/>.</summary>
    internal TaskCompletionSource? Frozen;

    /// <summary>True while writes are quiesced: a writer on the fast path takes the slow one.</summary>
    public bool IsFrozen => Volatile.Read(ref Frozen) != null;

    /// <summary>Counts a write on the fast path; false (nothing counted) when the blob is quiesced.</summary>
    public bool TryEnterFastWrite()
    {
        Interlocked.Increment(ref InFlightWrites);
        if (Volatile.Read(ref Frozen) == null)
        {
            return true;
        }
        Interlocked.Decrement(ref InFlightWrites);
        return false;
    }

    public void ExitFastWrite() => Interlocked.Decrement(ref InFlightWrites);

    /// <summary>The parent blob (allocation-free, for the I/O path).</summary>
    public Blob? ParentBlob => Parent;

    public ulong NumClusters => (ulong)Clusters.Length;

    public bool IsThinProvisioned => (InvalidFlags & BlobFormat.FlagThinProv) != 0;

    public bool IsReadOnly => DataRoFlags != 0;

    /// <summary>The clear method from md_ro_flags (0 default, 1 none, 2 unmap, 3 write zeroes).</summary>
    public int ClearMethod => (int)(MdRoFlags & BlobFormat.MdRoClearMethodMask);

    /// <summary>The snapshot this blob reads unallocated clusters from (internal xattr SNAP), or InvalidBlobId.</summary>
    public ulong ParentId => TryGetXattr(BlobFormat.XattrSnapshot, true, out var v) && v.Length == 8
        ? BinaryPrimitives.ReadUInt64LittleEndian(v) : BlobFormat.InvalidBlobId;

    public IReadOnlyList<KeyValuePair<string, byte[]>> Xattrs => XattrList;

    public IReadOnlyList<KeyValuePair<string, byte[]>> InternalXattrs => InternalXattrList;

    public int AllocatedClusters
    {
        get
        {
            int n = 0;
            foreach (var c in Clusters)
            {
                n += c != 0 ? 1 : 0;
            }
            return n;
        }
    }

    /// <summary>The device cluster behind blob cluster <paramref name="index"/> (0: not allocated, or past the end).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)] // the lvol remap's per-I/O lookup
    public uint ClusterAt(ulong index)
    {
        TryGetCluster(index, out uint cluster);
        return cluster;
    }

    /// <summary>Whether <paramref name="index"/> is within the blob, and if so the device cluster behind it
    /// (<paramref name="cluster"/>, 0: not allocated): one read of the map for both (a backing chain's walk).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public bool TryGetCluster(ulong index, out uint cluster)
    {
        // One read of the map (the md thread publishes a new array on a resize), an int index (no overflow check).
        var map = Clusters;
        if (index < (uint)map.Length)
        {
            cluster = map[(int)index];
            return true;
        }

        cluster = 0;
        return false;
    }

    /// <summary>A first-write allocation being committed: the md written names <see cref="PendingCluster"/> at
    /// <see cref="PendingIndex"/>, while <see cref="Clusters"/> (what I/O sees) shows it only after the commit.</summary>
    internal long PendingIndex = -1;
    internal uint PendingCluster;

    /// <summary>The cluster map as the metadata being written names it (<see cref="Clusters"/> plus the pending one).</summary>
    internal uint MdClusterAt(int index) => index == PendingIndex ? PendingCluster : Clusters[index];

    public bool TryGetXattr(string name, bool internalXattr, out byte[] value)
    {
        foreach (var kv in internalXattr ? InternalXattrList : XattrList)
        {
            if (kv.Key == name)
            {
                value = kv.Value;
                return true;
            }
        }
        value = [];
        return false;
    }

    /// <summary>An xattr read as a NUL-terminated string (lvol names and uuids), null when absent.</summary>
    public string? GetStringXattr(string name)
    {
        if (!TryGetXattr(name, false, out var v))
        {
            return null;
        }
        int n = Array.IndexOf(v, (byte)0);
        return Encoding.UTF8.GetString(v, 0, n < 0 ? v.Length : n);
    }

    internal void SetXattr(string name, byte[] value, bool internalXattr)
    {
        var list = internalXattr ? InternalXattrList : XattrList;
        for (int i = 0; i < list.Count; i++)
        {
            if (list[i].Key == name)
            {
                list[i] = new(name, value);
                return;
            }
        }
        list.Add(new(name, value));
        if (internalXattr)
        {
            InvalidFlags |= BlobFormat.FlagInternalXattr;
        }
    }

    internal bool RemoveXattr(string name, bool internalXattr)
    {
        var list = internalXattr ? InternalXattrList : XattrList;
        int i = list.FindIndex(kv => kv.Key == name);
        if (i < 0)
        {
            return false;
        }
        list.RemoveAt(i);
        if (internalXattr && list.Count == 0)
        {
            InvalidFlags &= ~BlobFormat.FlagInternalXattr;
        }
        return true;
    }

    internal void SetParent(ulong parentId)
    {
        if (parentId == BlobFormat.InvalidBlobId)
        {
            RemoveXattr(BlobFormat.XattrSnapshot, true);
            return;
        }
        var v = new byte[8];
        BinaryPrimitives.WriteUInt64LittleEndian(v, parentId);
        SetXattr(BlobFormat.XattrSnapshot, v, true);
    }

    internal void ResizeMaps(ulong clusters)
    {
        var map = _clusters;
        Array.Resize(ref map, checked((int)clusters));
        Clusters = map;
        Array.Resize(ref ExtentPages, BlobFormat.DivRoundUp((long)clusters, BlobFormat.ExtentsPerPage));
    }
}
