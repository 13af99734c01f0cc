using System.Text;

namespace VhostBackend.Blob;

/// <summary>One logical volume: a blob with SPDK lvol's "name" (64 bytes, NUL padded) and "uuid" (37 bytes) xattrs.</summary>
public sealed class Lvol
{
    internal Lvol(LvolStore store, Blob blob, string name, Guid uuid)
    {
        Store = store;
        Blob = blob;
        Name = name;
        Uuid = uuid;
    }

    public LvolStore Store { get; }

    public Blob Blob { get; }

    public string Name { get; internal set; }

    public Guid Uuid { get; }

    /// <summary>SPDK's alias: <c>lvs_name/lvol_name</c>.</summary>
    public string Alias => $"{Store.Name}/{Name}";

    public ulong SizeBytes => Blob.NumClusters * Store.ClusterSize;

    public bool IsThinProvisioned => Blob.IsThinProvisioned;

    public bool IsReadOnly => Blob.IsReadOnly;

    /// <summary>SPDK's <c>spdk_blob_is_snapshot</c>: some blob reads through this one.</summary>
    public bool IsSnapshot => Store.BlobStore.ClonesOf(Blob.Id).Count > 0;

    public bool IsClone => Blob.ParentId != BlobFormat.InvalidBlobId;

    public Lvol? Parent => Store.FindByBlobId(Blob.ParentId);

    public IReadOnlyList<Lvol> Clones => Store.BlobStore.ClonesOf(Blob.Id).Select(b => Store.FindByBlobId(b.Id)).OfType<Lvol>().ToList();

    public int AllocatedClusters => Blob.AllocatedClusters;

    public int ClearMethod => Blob.ClearMethod;
}

/// <summary>
/// An lvol store (SPDK's <c>lib/lvol</c>) on a blobstore of bstype "LVOLSTORE": the super blob carries the store's
/// "uuid" and "name" xattrs; every other blob is an lvol. Names follow SPDK's rules: 1..63 bytes, unique in the store.
/// </summary>
public sealed class LvolStore
{
    public const string BsTypeName = "LVOLSTORE";
    public const int NameMax = 64;
    public const uint DefaultClusterSize = 4 * 1024 * 1024;

    private readonly List<Lvol> _lvols = [];

    private LvolStore(BlobStore bs, string name, Guid uuid)
    {
        BlobStore = bs;
        Name = name;
        Uuid = uuid;
    }

    public BlobStore BlobStore { get; }

    public string Name { get; private set; }

    public Guid Uuid { get; }

    public uint ClusterSize => BlobStore.ClusterSize;

    public IReadOnlyList<Lvol> Lvols => _lvols;

    public Lvol? FindByBlobId(ulong id) => _lvols.FirstOrDefault(l => l.Blob.Id == id);

    public Lvol? FindByName(string name) => _lvols.FirstOrDefault(l => l.Name == name);

    public Lvol? FindByUuid(Guid uuid) => _lvols.FirstOrDefault(l => l.Uuid == uuid);

    /// <summary>Checks an lvstore or lvol name as SPDK does (-EINVAL empty or 64 bytes and more).</summary>
    public static void ValidateName(string name, string what)
    {
        int n = Encoding.UTF8.GetByteCount(name);
        if (n == 0 || n >= NameMax || name.Contains('\0'))
        {
            throw new BlobException(Errno.EINVAL, $"{what} name must be 1..{NameMax - 1} bytes");
        }
    }

    private static byte[] UuidXattr(Guid g)
    {
        var v = new byte[37];
        Encoding.ASCII.GetBytes(g.ToString("D"), v);
        return v;
    }

    private static byte[] LvolNameXattr(string name)
    {
        var v = new byte[NameMax];
        Encoding.UTF8.GetBytes(name, v);
        return v;
    }

    private static byte[] LvsNameXattr(string name)
    {
        var b = Encoding.UTF8.GetBytes(name);
        Array.Resize(ref b, b.Length + 1);
        return b;
    }

    /// <summary>Creates an lvstore (SPDK's <c>spdk_lvs_init</c>): a blobstore of bstype LVOLSTORE with one md page per
    /// cluster and a super blob holding uuid and name. <paramref name="clearMethod"/>: "unmap" (default),
    /// "write_zeroes" or "none" for the data region.</summary>
    public static async Task<LvolStore> CreateAsync(IBlobDevice dev, string name, uint clusterSize = DefaultClusterSize, string clearMethod = "unmap", Guid? uuid = null,
        uint mdPagesPerClusterRatio = 0)
    {
        ValidateName(name, "lvol store");
        int cm = clearMethod switch
        {
            "unmap" => 2,
            "write_zeroes" => 3,
            "none" => 1,
            _ => throw new BlobException(Errno.EINVAL, $"clear_method '{clearMethod}' is not unmap, write_zeroes or none"),
        };
        var bs = await BlobStore.InitAsync(dev, clusterSize, BsTypeName, MdPagesFor(dev, clusterSize, mdPagesPerClusterRatio), cm).ConfigureAwait(false);
        var id = uuid ?? Guid.NewGuid();
        var super = await bs.CreateBlobAsync(new BlobCreateOptions
        {
            Xattrs = [new("uuid", UuidXattr(id)), new("name", LvsNameXattr(name))],
        }).ConfigureAwait(false);
        await bs.SetSuperBlobAsync(super.Id).ConfigureAwait(false);
        return new LvolStore(bs, name, id);
    }

    /// <summary>
    /// The md region's length for <paramref name="ratio"/> md pages per 100 clusters, as SPDK's spdk_lvs_init computes
    /// it: ratio * (blocks / blocks per cluster) / 100 (0 = the default ratio 100, one page per cluster). A ratio
    /// so small the region would be empty is refused (SPDK's bs_opts_verify: -EINVAL).
    /// </summary>
    public static uint MdPagesFor(IBlobDevice dev, uint clusterSize, uint ratio)
    {
        if (ratio == 0 || clusterSize < dev.BlockSize)
        {
            return 0;
        }
        ulong totalClusters = dev.BlockCount / (clusterSize / (ulong)dev.BlockSize);
        ulong pages = ratio * totalClusters / 100;
        if (pages == 0)
        {
            throw new BlobException(Errno.EINVAL, $"{ratio} leaves no metadata page for {totalClusters} clusters") { Param = "num_md_pages_per_cluster_ratio" };
        }
        return pages > uint.MaxValue ? throw new BlobException(Errno.ENOMEM, $"{ratio} makes the metadata region too large") { Param = "num_md_pages_per_cluster_ratio" } : (uint)pages;
    }

    /// <summary>Loads an lvstore (SPDK's <c>spdk_lvs_load</c>, used by examine): the blobstore (recovered when dirty),
    /// the super blob's uuid and name, then every other blob as an lvol.</summary>
    public static async Task<LvolStore> LoadAsync(IBlobDevice dev)
    {
        var bs = await BlobStore.LoadAsync(dev, BsTypeName).ConfigureAwait(false);
        var super = bs.GetBlob(bs.SuperBlobId) ?? throw new BlobException(Errno.ENODEV, "lvstore has no super blob");
        string? name = super.GetStringXattr("name");
        string? uuidText = super.GetStringXattr("uuid");
        if (name == null || uuidText == null || !Guid.TryParse(uuidText, out var uuid))
        {
            throw new BlobException(Errno.EINVAL, "lvstore super blob lacks a valid name or uuid");
        }
        var lvs = new LvolStore(bs, name, uuid);
        foreach (var b in bs.Blobs.OrderBy(b => b.Id))
        {
            if (b.Id == bs.SuperBlobId || b.ParentMissing)
            {
                continue;
            }
            string? ln = b.GetStringXattr("name");
            string? lu = b.GetStringXattr("uuid");
            if (ln == null || lu == null || !Guid.TryParse(lu, out var lg))
            {
                continue;
            }
            lvs._lvols.Add(new Lvol(lvs, b, ln, lg));
        }
        return lvs;
    }

    private void CheckNewLvolName(string name)
    {
        ValidateName(name, "lvol");
        if (FindByName(name) != null)
        {
            throw new BlobException(Errno.EEXIST, $"lvol '{name}' already exists in lvstore '{Name}'");
        }
    }

    public ulong ClustersFor(ulong sizeBytes) => (sizeBytes + ClusterSize - 1) / ClusterSize;

    /// <summary>Creates an lvol (SPDK's <c>spdk_lvol_create</c>); the size is rounded up to clusters.
    /// <paramref name="clearMethod"/>: 0 default, 1 none, 2 unmap, 3 write zeroes.</summary>
    public async Task<Lvol> CreateLvolAsync(string name, ulong sizeBytes, bool thinProvision, int clearMethod = 0, Guid? uuid = null)
    {
        CheckNewLvolName(name);
        var id = uuid ?? Guid.NewGuid();
        var b = await BlobStore.CreateBlobAsync(new BlobCreateOptions
        {
            NumClusters = ClustersFor(sizeBytes),
            ThinProvision = thinProvision,
            ClearMethod = clearMethod,
            Xattrs = [new("name", LvolNameXattr(name)), new("uuid", UuidXattr(id))],
        }).ConfigureAwait(false);
        var l = new Lvol(this, b, name, id);
        _lvols.Add(l);
        return l;
    }

    public async Task<Lvol> SnapshotAsync(Lvol origin, string name)
    {
        CheckNewLvolName(name);
        var id = Guid.NewGuid();
        var b = await BlobStore.CreateSnapshotAsync(origin.Blob.Id, [new("name", LvolNameXattr(name)), new("uuid", UuidXattr(id))]).ConfigureAwait(false);
        var l = new Lvol(this, b, name, id);
        _lvols.Add(l);
        return l;
    }

    public async Task<Lvol> CloneAsync(Lvol snapshot, string name)
    {
        CheckNewLvolName(name);
        var id = Guid.NewGuid();
        var b = await BlobStore.CreateCloneAsync(snapshot.Blob.Id, [new("name", LvolNameXattr(name)), new("uuid", UuidXattr(id))]).ConfigureAwait(false);
        var l = new Lvol(this, b, name, id);
        _lvols.Add(l);
        return l;
    }

    public async Task RenameLvolAsync(Lvol lvol, string newName)
    {
        if (lvol.Name == newName)
        {
            return;
        }
        CheckNewLvolName(newName);
        await BlobStore.SetXattrAsync(lvol.Blob.Id, "name", LvolNameXattr(newName)).ConfigureAwait(false);
        lvol.Name = newName;
    }

    public async Task RenameAsync(string newName)
    {
        ValidateName(newName, "lvol store");
        await BlobStore.SetXattrAsync(BlobStore.SuperBlobId, "name", LvsNameXattr(newName)).ConfigureAwait(false);
        Name = newName;
    }

    public Task ResizeLvolAsync(Lvol lvol, ulong sizeBytes) => BlobStore.ResizeAsync(lvol.Blob.Id, ClustersFor(sizeBytes));

    public Task SetReadOnlyAsync(Lvol lvol) => BlobStore.SetReadOnlyAsync(lvol.Blob.Id);

    /// <summary>bdev_lvol_grow_lvstore: the store takes its base's current size (SPDK's <c>spdk_lvs_grow_live</c>).</summary>
    public Task<bool> GrowAsync() => BlobStore.GrowLiveAsync();

    public Task InflateAsync(Lvol lvol) => BlobStore.InflateAsync(lvol.Blob.Id);

    public Task DecoupleParentAsync(Lvol lvol) => BlobStore.DecoupleParentAsync(lvol.Blob.Id);

    public async Task DeleteLvolAsync(Lvol lvol)
    {
        await BlobStore.DeleteBlobAsync(lvol.Blob.Id).ConfigureAwait(false);
        _lvols.Remove(lvol);
    }

    public ValueTask ReadAsync(Lvol lvol, ulong offset, Memory<byte> buffer) => BlobStore.ReadAsync(lvol.Blob.Id, offset, buffer);

    public ValueTask WriteAsync(Lvol lvol, ulong offset, ReadOnlyMemory<byte> data) => BlobStore.WriteAsync(lvol.Blob.Id, offset, data);

    public Task UnloadAsync() => BlobStore.UnloadAsync();

    /// <summary>Destroys the store (SPDK's <c>spdk_lvs_destroy</c>): every lvol deleted, then the super block zeroed.</summary>
    public async Task DestroyAsync()
    {
        foreach (var l in _lvols.OrderByDescending(l => l.IsSnapshot ? 0 : 1).ToList())
        {
            _lvols.Remove(l);
        }
        await BlobStore.DestroyAsync().ConfigureAwait(false);
    }
}
