using Microsoft.Extensions.Logging;
using VhostBackend.Bdev;
using VhostBackend.Blob;
using VhostBackend.Reactors;
using BlobErrno = VhostBackend.Blob.Errno;

namespace VhostBackend.BdevLvol;

/// <summary>
/// The lvol module (SPDK's module/bdev/lvol, "lvol"): lvstores on any bdev, found by examine (no config needed to
/// bring them back: SPDK's lvol module writes nothing to save_config), and their lvols as bdevs. Operations run on
/// the main reactor (the RPC handlers' thread); the blobstore serialises its metadata updates.
/// </summary>
public sealed class LvolModule : BdevModule
{
    private readonly List<LvsEntry> _stores = [];
    private readonly List<Task> _examines = [];
    private BdevManager _bdevs = null!;
    private Reactor _main = null!;
    private ILogger _logger = null!;

    public override string Name => "lvol";

    public override void Init(BdevModuleContext context)
    {
        _bdevs = context.Bdevs;
        _main = context.Reactors.Main;
        _logger = context.LoggerFactory.CreateLogger("vbdev_lvol");
        LvolRpc.Register(context.Rpc, this);
    }

    internal IReadOnlyList<LvsEntry> Stores
    {
        get
        {
            lock (_stores)
            {
                return _stores.ToList();
            }
        }
    }

    /// <summary>Examine: every new bdev (not an lvol, not claimed) is probed for an lvstore, asynchronously
    /// (the probe reads the base through the bdev layer); <see cref="WaitForExamineAsync"/> waits for them.</summary>
    public override void Examine(Bdev.Bdev bdev)
    {
        if (bdev is LvolBdev || bdev.ClaimModule != null)
        {
            return;
        }
        Task t = _main.InvokeAsync(() => ExamineAsync(bdev));
        lock (_examines)
        {
            _examines.RemoveAll(x => x.IsCompleted);
            _examines.Add(t);
        }
    }

    /// <summary>Waits for the examines started so far (SPDK's bdev_wait_for_examine).</summary>
    public override async Task WaitForExamineAsync()
    {
        Task[] pending;
        lock (_examines)
        {
            pending = _examines.ToArray();
        }
        await Task.WhenAll(pending).ConfigureAwait(false);
    }

    private async Task<int> ExamineAsync(Bdev.Bdev bdev)
    {
        BdevDesc desc;
        var watch = new BaseWatch();
        try
        {
            desc = _bdevs.Open(bdev.Name, write: false, OnBaseEvent, watch);
        }
        catch (Exception)
        {
            return 0;
        }
        var dev = new BdevBlobDevice(desc, _main);
        LvolStore lvs;
        bool claimed = false;
        try
        {
            if (bdev.BlockCount * bdev.BlockSize < BlobFormat.PageSize || BlobFormat.PageSize % bdev.BlockSize != 0)
            {
                throw new BlobException(BlobErrno.EINVAL, "too small or block size over 4 KiB");
            }
            var page = new byte[BlobFormat.PageSize];
            await dev.ReadAsync(0, page).ConfigureAwait(true);
            if (!page.AsSpan(0, 8).SequenceEqual(SuperBlock.Signature))
            {
                await CloseAsync(dev, desc).ConfigureAwait(true);
                return 0;
            }
            // Loading writes (the dirty flag, a recovery): claim the base first, as SPDK's examine does.
            if (_bdevs.Claim(bdev, this, desc) != 0)
            {
                throw new BlobException(BlobErrno.EPERM, "base is claimed or open for writing");
            }
            claimed = true;
            lvs = await LvolStore.LoadAsync(dev).ConfigureAwait(true);
            if (FindStore(null, lvs.Name) != null)
            {
                throw new BlobException(BlobErrno.EEXIST, $"an lvstore named {lvs.Name} is already loaded");
            }
        }
        catch (Exception e)
        {
            _logger.LogInformation("lvol: no lvstore loaded from {Bdev}: {Error}", bdev.Name, e.Message);
            if (claimed)
            {
                _bdevs.ReleaseClaim(bdev, this);
            }
            await CloseAsync(dev, desc).ConfigureAwait(true);
            return 0;
        }
        if (lvs.BlobStore.LoadReport.Recovered)
        {
            _logger.LogWarning("lvol: lvstore {Name} on {Bdev} was not unloaded cleanly: recovered ({Repairs})", lvs.Name, bdev.Name,
                string.Join("; ", lvs.BlobStore.LoadReport.Repairs));
        }
        var entry = new LvsEntry(lvs, desc, dev);
        lock (_stores)
        {
            _stores.Add(entry);
        }
        foreach (var l in lvs.Lvols)
        {
            RegisterLvol(entry, l);
        }
        _logger.LogInformation("lvol: lvstore {Name} ({Uuid}) loaded from {Bdev} with {Count} lvols", lvs.Name, lvs.Uuid, bdev.Name, lvs.Lvols.Count);
        watch.Entry = entry;
        if (watch.Removed)
        {
            // The base went away while the store loaded.
            await HotRemoveAsync(entry).ConfigureAwait(true);
        }
        return 0;
    }

    private static async Task CloseAsync(BdevBlobDevice dev, BdevDesc desc)
    {
        await dev.CloseAsync().ConfigureAwait(true);
        desc.Dispose();
    }

    private LvolBdev RegisterLvol(LvsEntry lvs, Lvol l)
    {
        var b = new LvolBdev(lvs, l);
        _bdevs.Register(b);
        lvs.Bdevs[l] = b;
        return b;
    }

    internal LvsEntry? FindStore(string? uuid, string? name)
    {
        foreach (var s in Stores)
        {
            if ((uuid != null && Guid.TryParse(uuid, out var g) && s.Store.Uuid == g) || (name != null && s.Store.Name == name))
            {
                return s;
            }
        }
        return null;
    }

    /// <summary>An lvol by its bdev name, uuid or alias (lvs/lvol); null when none.</summary>
    internal LvolBdev? FindLvol(string name) => _bdevs.Find(name) as LvolBdev;

    internal LvsEntry StoreOf(LvolBdev b) => Stores.First(s => s.Bdevs.ContainsValue(b));

    /// <summary>bdev_lvol_create_lvstore. Returns the new store's uuid. <paramref name="mdPagesPerClusterRatio"/>:
    /// metadata pages per 100 clusters (SPDK's num_md_pages_per_cluster_ratio; 0 = the default 100).</summary>
    public async Task<Guid> CreateLvstoreAsync(string bdevName, string lvsName, uint clusterSize, string clearMethod, uint mdPagesPerClusterRatio = 0)
    {
        LvolStore.ValidateName(lvsName, "lvol store");
        if (FindStore(null, lvsName) != null)
        {
            throw new BlobException(BlobErrno.EEXIST, $"lvol store {lvsName} already exists");
        }
        if (clusterSize != 0 && (clusterSize < BlobFormat.PageSize || clusterSize % BlobFormat.PageSize != 0))
        {
            throw new BlobException(BlobErrno.EINVAL, "cluster_sz must be a multiple of 4096");
        }
        var bdev = _bdevs.Find(bdevName) ?? throw new BlobException(BlobErrno.ENODEV, $"bdev {bdevName} not found");
        var watch = new BaseWatch();
        BdevDesc desc;
        try
        {
            desc = _bdevs.Open(bdevName, write: false, OnBaseEvent, watch);
        }
        catch (BdevNotFoundException e)
        {
            throw new BlobException(BlobErrno.ENODEV, e.Message);
        }
        if (_bdevs.Claim(bdev, this, desc) != 0)
        {
            desc.Dispose();
            throw new BlobException(BlobErrno.EPERM, $"bdev {bdevName} is claimed or open for writing");
        }
        var dev = new BdevBlobDevice(desc, _main);
        LvolStore lvs;
        try
        {
            lvs = await LvolStore.CreateAsync(dev, lvsName, clusterSize == 0 ? LvolStore.DefaultClusterSize : clusterSize, clearMethod,
                mdPagesPerClusterRatio: mdPagesPerClusterRatio).ConfigureAwait(true);
        }
        catch
        {
            _bdevs.ReleaseClaim(bdev, this);
            await CloseAsync(dev, desc).ConfigureAwait(true);
            throw;
        }
        var entry = new LvsEntry(lvs, desc, dev);
        lock (_stores)
        {
            _stores.Add(entry);
        }
        watch.Entry = entry;
        if (watch.Removed)
        {
            await HotRemoveAsync(entry).ConfigureAwait(true);
        }
        return lvs.Uuid;
    }

    /// <summary>What a base descriptor's event callback knows: the store on it, once loaded or created.</summary>
    private sealed class BaseWatch
    {
        public volatile LvsEntry? Entry;
        public volatile bool Removed;
    }

    /// <summary>The base bdev of an lvstore is being removed (SPDK's vbdev_lvs_hotremove_cb): on the main reactor,
    /// the store's lvols are hot-removed and the store unloaded.</summary>
    private void OnBaseEvent(BdevEventType type, Bdev.Bdev bdev, object? context)
    {
        if (type != BdevEventType.Remove)
        {
            return;
        }
        var watch = (BaseWatch)context!;
        _ = _main.InvokeAsync(async () =>
        {
            watch.Removed = true;
            if (watch.Entry is { } e)
            {
                await HotRemoveAsync(e).ConfigureAwait(true);
            }
            return 0;
        });
    }

    /// <summary>
    /// Hot removal of an lvstore whose base goes away, as SPDK unloads it: every lvol bdev is unregistered (its
    /// openers get their remove event: a vhost controller drops the disk), then the store is unloaded (masks and
    /// clean flag written while the base still takes I/O; when it does not, the store simply stays dirty and is
    /// recovered at its next load), then the base is released so its removal completes.
    /// </summary>
    internal async Task HotRemoveAsync(LvsEntry e)
    {
        if (e.HotRemoved)
        {
            return;
        }
        e.HotRemoved = true;
        _logger.LogWarning("lvol: base bdev {Bdev} of lvstore {Name} is being removed: hot-removing its {Count} lvol(s)", e.Desc.Bdev.Name, e.Store.Name, e.Bdevs.Count);
        foreach (var b in e.Bdevs.Values.ToList())
        {
            if (_bdevs.Find(b.Name) == b)
            {
                await _bdevs.UnregisterAsync(b, TimeSpan.FromSeconds(10)).ConfigureAwait(true);
            }
        }
        e.Bdevs.Clear();
        try
        {
            await e.Store.UnloadAsync().WaitAsync(TimeSpan.FromSeconds(10)).ConfigureAwait(true);
        }
        catch (Exception ex)
        {
            _logger.LogWarning("lvol: lvstore {Name} could not be unloaded cleanly from its removed base ({Error}); it is recovered at its next load", e.Store.Name, ex.Message);
        }
        await ReleaseAsync(e).ConfigureAwait(true);
        _logger.LogInformation("lvol: lvstore {Name} unloaded: its base {Bdev} was removed", e.Store.Name, e.Desc.Bdev.Name);
    }

    /// <summary>bdev_lvol_delete_lvstore: its lvol bdevs unregistered, the store destroyed, the base released.</summary>
    public async Task DeleteLvstoreAsync(LvsEntry e)
    {
        foreach (var b in e.Bdevs.Values.ToList())
        {
            if (_bdevs.Find(b.Name) == b)
            {
                await _bdevs.UnregisterAsync(b, TimeSpan.FromSeconds(10)).ConfigureAwait(true);
            }
            if (b.Destructed)
            {
                e.Bdevs.Remove(b.Lvol);
            }
        }
        if (e.Bdevs.Count > 0)
        {
            // An unregister timed out with descriptors still open: destroying the store would free clusters an
            // opener may still read or write. Nothing is freed; the store stays loaded.
            throw new BlobException(BlobErrno.EBUSY, $"lvol bdev(s) {string.Join(", ", e.Bdevs.Values.Select(b => b.Name))} still open");
        }
        await e.Store.DestroyAsync().ConfigureAwait(true);
        await ReleaseAsync(e).ConfigureAwait(true);
    }

    private async Task ReleaseAsync(LvsEntry e)
    {
        lock (_stores)
        {
            if (!_stores.Remove(e))
            {
                return; // released already (a hot removal and a delete or shutdown crossing)
            }
        }
        _bdevs.ReleaseClaim(e.Desc.Bdev, this);
        await CloseAsync(e.Device, e.Desc).ConfigureAwait(true);
    }

    public async Task RenameLvstoreAsync(LvsEntry e, string newName)
    {
        if (e.Store.Name == newName)
        {
            return;
        }
        if (FindStore(null, newName) != null)
        {
            throw new BlobException(BlobErrno.EEXIST, $"lvol store {newName} already exists");
        }
        var old = e.Bdevs.ToDictionary(kv => kv.Value, kv => kv.Key.Alias);
        await e.Store.RenameAsync(newName).ConfigureAwait(true);
        foreach (var (b, oldAlias) in old)
        {
            _bdevs.RenameAlias(b, oldAlias, b.Lvol.Alias);
        }
    }

    public async Task<LvolBdev> CreateLvolAsync(LvsEntry e, string name, ulong sizeBytes, bool thin, int clearMethod)
    {
        var l = await e.Store.CreateLvolAsync(name, sizeBytes, thin, clearMethod).ConfigureAwait(true);
        return RegisterLvol(e, l);
    }

    public async Task<LvolBdev> SnapshotAsync(LvolBdev origin, string name)
    {
        var e = StoreOf(origin);
        var s = await e.Store.SnapshotAsync(origin.Lvol, name).ConfigureAwait(true);
        return RegisterLvol(e, s);
    }

    public async Task<LvolBdev> CloneAsync(LvolBdev snapshot, string name)
    {
        var e = StoreOf(snapshot);
        var c = await e.Store.CloneAsync(snapshot.Lvol, name).ConfigureAwait(true);
        return RegisterLvol(e, c);
    }

    public async Task RenameLvolAsync(LvolBdev b, string newName)
    {
        var old = b.Lvol.Alias;
        await StoreOf(b).Store.RenameLvolAsync(b.Lvol, newName).ConfigureAwait(true);
        _bdevs.RenameAlias(b, old, b.Lvol.Alias);
    }

    public async Task ResizeAsync(LvolBdev b, ulong sizeBytes)
    {
        await StoreOf(b).Store.ResizeLvolAsync(b.Lvol, sizeBytes).ConfigureAwait(true);
        b.Resized();
    }

    private readonly Dictionary<uint, ShallowCopyStatus> _shallowCopies = [];
    private uint _shallowCopyCount;

    /// <summary>
    /// bdev_lvol_start_shallow_copy (SPDK v24.05's vbdev_lvol_shallow_copy): claims <paramref name="dstBdevName"/>
    /// (-ENODEV when it does not exist, -EPERM when claimed or open for writing elsewhere), then copies the lvol's
    /// own allocated clusters to it in the background and returns the operation's status at once. Like SPDK, what
    /// the blobstore refuses (a writable lvol, a destination too small) shows up as the operation's error, not as
    /// the start's. The destination is released when the copy ends.
    /// </summary>
    public ShallowCopyStatus StartShallowCopy(LvolBdev src, string dstBdevName)
    {
        var entry = StoreOf(src);
        var bdev = _bdevs.Find(dstBdevName) ?? throw new BlobException(BlobErrno.ENODEV, $"bdev {dstBdevName} not found");
        BdevDesc desc;
        try
        {
            desc = _bdevs.Open(dstBdevName, write: false);
        }
        catch (BdevNotFoundException e)
        {
            throw new BlobException(BlobErrno.ENODEV, e.Message);
        }
        if (_bdevs.Claim(bdev, this, desc) != 0)
        {
            desc.Dispose();
            throw new BlobException(BlobErrno.EPERM, $"bdev {dstBdevName} is claimed or open for writing");
        }
        var dev = new BdevBlobDevice(desc, _main);
        ShallowCopyStatus status;
        lock (_shallowCopies)
        {
            status = new ShallowCopyStatus(++_shallowCopyCount, src.Lvol.AllocatedClusters);
            _shallowCopies[status.OperationId] = status;
        }
        status.Task = CopyAsync();
        return status;

        async Task CopyAsync()
        {
            int rc = 0;
            try
            {
                await entry.Store.BlobStore.ShallowCopyAsync(src.Lvol.Blob.Id, dev, n => status.CopiedClusters = n).ConfigureAwait(true);
            }
            catch (Exception e)
            {
                rc = e is BlobException be ? -be.Errno : -BlobErrno.EIO;
                _logger.LogError("lvol: shallow copy of {Lvol} to {Bdev} failed: {Error}", src.Lvol.Alias, dstBdevName, e.Message);
            }
            finally
            {
                try
                {
                    _bdevs.ReleaseClaim(bdev, this);
                    await CloseAsync(dev, desc).ConfigureAwait(true);
                }
                finally
                {
                    // Reported once the destination is released: "complete" or "error" means it is free again.
                    status.Result = rc;
                    status.Done = true;
                }
            }
        }
    }

    /// <summary>A shallow copy's status by id (null when unknown); one that ended is forgotten once reported,
    /// as SPDK's bdev_lvol_check_shallow_copy does.</summary>
    public ShallowCopyStatus? CheckShallowCopy(uint operationId, out bool ended)
    {
        lock (_shallowCopies)
        {
            ended = false;
            if (!_shallowCopies.TryGetValue(operationId, out var s))
            {
                return null;
            }
            ended = s.Done;
            if (ended)
            {
                _shallowCopies.Remove(operationId);
            }
            return s;
        }
    }

    public Task SetReadOnlyAsync(LvolBdev b) => StoreOf(b).Store.SetReadOnlyAsync(b.Lvol);

    public Task InflateAsync(LvolBdev b) => StoreOf(b).Store.InflateAsync(b.Lvol);

    public Task DecoupleParentAsync(LvolBdev b) => StoreOf(b).Store.DecoupleParentAsync(b.Lvol);

    /// <summary>bdev_lvol_delete: a snapshot with more than one clone is refused (-EBUSY) before its bdev goes.</summary>
    public async Task DeleteLvolAsync(LvolBdev b)
    {
        var e = StoreOf(b);
        if (b.Lvol.Clones.Count > 1)
        {
            throw new BlobException(BlobErrno.EBUSY, "snapshot has more than one clone");
        }
        if (e.Store.BlobStore.IsLocked(b.Lvol.Blob.Id))
        {
            // Checked before the bdev goes (the blobstore refuses the delete too).
            throw new BlobException(BlobErrno.EBUSY, "an inflate or decouple_parent is in progress on it or on a clone of it");
        }
        await _bdevs.UnregisterAsync(b, TimeSpan.FromSeconds(10)).ConfigureAwait(true);
        if (!b.Destructed)
        {
            // The unregister timed out with descriptors still open: deleting the blob would free clusters an
            // opener may still read or write. Nothing is freed (the bdev's name is gone, its lvol stays).
            throw new BlobException(BlobErrno.EBUSY, $"lvol bdev {b.Name} is still open");
        }
        e.Bdevs.Remove(b.Lvol);
        await e.Store.DeleteLvolAsync(b.Lvol).ConfigureAwait(true);
    }

    /// <summary>At shutdown: every lvstore's bdevs unregistered and the store unloaded cleanly (clean flag set).</summary>
    public override async Task FiniAsync()
    {
        foreach (var e in Stores)
        {
            try
            {
                await _main.InvokeAsync(async () =>
                {
                    foreach (var b in e.Bdevs.Values.ToList())
                    {
                        await _bdevs.UnregisterAsync(b, TimeSpan.FromSeconds(5)).ConfigureAwait(true);
                    }
                    e.Bdevs.Clear();
                    await e.Store.UnloadAsync().ConfigureAwait(true);
                    await ReleaseAsync(e).ConfigureAwait(true);
                    return 0;
                }).WaitAsync(TimeSpan.FromSeconds(15)).ConfigureAwait(false);
            }
            catch (Exception ex)
            {
                _logger.LogError(ex, "lvol: unloading lvstore {Name} failed", e.Store.Name);
            }
        }
    }
}

/// <summary>One shallow copy (SPDK's <c>rpc_shallow_copy_status</c>): its id, clusters copied of the total (the
/// lvol's allocated clusters when it started) and its result (0 running or done, else -errno).</summary>
public sealed class ShallowCopyStatus(uint operationId, long totalClusters)
{
    private long _copied;
    private volatile int _result;
    private volatile bool _done;

    public uint OperationId { get; } = operationId;

    public long TotalClusters { get; } = totalClusters;

    public long CopiedClusters
    {
        get => Interlocked.Read(ref _copied);
        internal set => Interlocked.Exchange(ref _copied, value);
    }

    /// <summary>0 while running or after success, the negative errno of a failure.</summary>
    public int Result
    {
        get => _result;
        internal set => _result = value;
    }

    /// <summary>The copy ended (the destination is released).</summary>
    public bool Done
    {
        get => _done;
        internal set => _done = value;
    }

    /// <summary>The copy; ends when <see cref="Done"/> is set (never faults).</summary>
    public Task Task { get; internal set; } = Task.CompletedTask;
}
