using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using VhostBackend.Platform;

namespace VhostBackend.Nvme;

/// <summary>
/// The DMA environment of a process: which of its memory devices may touch, and at which I/O virtual address.
/// Memory comes in two kinds: regions this class allocates (<see cref="Allocate"/>: hugepages, or locked 4 KiB
/// pages when none are reserved) and memory someone else owns, registered with <see cref="RegisterDmaMemory"/>
/// (e.g. vhost guest memory, so guest buffers go to the device without a copy).
/// <para>
/// IOVA policy: IOVA = virtual address when the IOMMU accepts that address (VFIO reports the valid IOVA ranges) and
/// no allocated IOVA is in the way; otherwise an IOVA is allocated first-fit (2 MiB aligned, above 4 GiB when the
/// range allows) from a valid range, so IOVA space freed by an unregistered region is reused. A guest IOMMU of 39
/// address bits (QEMU's intel-iommu default) cannot take 47-bit user addresses, so there allocation is the rule.
/// Either way <see cref="TryTranslate"/> is the one lookup.
/// </para>
/// <para>
/// Memory owned by other layers comes through the process's <see cref="DmaMemoryRegistry"/>: <see cref="ForVfio"/>
/// subscribes the shared space, so every range registered there (vhost guest memory, virtio-user shared memory) is
/// mapped once into the shared VFIO container, which every controller of the process uses: one mapping serves all
/// devices, and it stays until its owner unregisters it (the registry counts the owners' references).
/// </para>
/// <para>
/// Threading: registration takes a lock and publishes a new immutable region table; lookups read the current
/// table without a lock (hot path: a binary search, no allocation).
/// </para>
/// </summary>
public sealed unsafe class DmaSpace : IDmaMemoryListener
{
    public const ulong HugePageSize = 2 * 1024 * 1024;
    public const ulong SmallPageSize = 4096;

    private static DmaSpace? s_vfio;
    private static readonly object s_vfioLock = new();

    private readonly object _lock = new();
    private readonly IDmaMapper _mapper;
    private readonly ILogger _log;
    private Region[] _regions = Array.Empty<Region>();
    private bool _warnedNoHugePages;
    private bool _mapped;
    private long _externalRegistered;
    private long _externalFailed;

    public DmaSpace(IDmaMapper mapper, ILogger? logger = null)
    {
        _mapper = mapper;
        _log = logger ?? NullLogger.Instance;
        if (mapper is VfioContainer c)
        {
            // Subscribe first, then read: a group joining in between maps through the callback either way.
            c.OnIommuReady(OnIommuChanged);
            lock (_lock)
            {
                _mapped |= c.IsReady;
            }
        }
        else
        {
            _mapped = true;
        }
    }

    /// <summary>
    /// Whether <see cref="ForVfio"/> subscribes to the process's <see cref="DmaMemoryRegistry"/> (zero-copy from guest
    /// memory): on unless the environment has VHOSTBACKEND_NVME_ZERO_COPY=0 (then every guest buffer is bounced and
    /// counted, and no guest memory is pinned). See docs/DMA.md.
    /// </summary>
    public static bool ZeroCopyEnabled { get; } = Environment.GetEnvironmentVariable("VHOSTBACKEND_NVME_ZERO_COPY") != "0";

    /// <summary>The DMA space of the shared VFIO container (created on first use), subscribed to the process's <see cref="DmaMemoryRegistry"/> when <see cref="ZeroCopyEnabled"/>.</summary>
    public static DmaSpace ForVfio(ILogger? logger = null)
    {
        lock (s_vfioLock)
        {
            if (s_vfio is null)
            {
                s_vfio = new DmaSpace(VfioContainer.Shared, logger) { MapRegistrationsInBackground = true };
                if (ZeroCopyEnabled)
                {
                    s_vfio.SubscribeTo(DmaMemoryRegistry.Process);
                }
            }

            return s_vfio;
        }
    }

    /// <summary>
    /// Maps every range of <paramref name="registry"/>, now and as it is registered, and unmaps each as it is
    /// unregistered. Dispose the result to stop (everything it mapped is unmapped).
    /// </summary>
    public IDisposable SubscribeTo(DmaMemoryRegistry registry) => registry.Subscribe(this);

    /// <summary>Ranges registered through a <see cref="DmaMemoryRegistry"/> and mapped (the count since creation).</summary>
    public long ExternalRegistrations => Interlocked.Read(ref _externalRegistered);

    /// <summary>Registry ranges this space could not map (their I/O is bounced).</summary>
    public long ExternalFailures => Interlocked.Read(ref _externalFailed);

    private readonly object _backgroundLock = new();
    private Task _backgroundTail = Task.CompletedTask;

    // Background mode, under _lock: registry ranges whose map is queued or running (not yet published), and IOVA ranges
    // the worker is mapping or unmapping outside the lock (no other range may take them meanwhile).
    private readonly Dictionary<nint, PendingMap> _pendingMaps = new();
    private readonly List<Region> _busyIovas = new();
    private long _iommuGeneration;

    private sealed class PendingMap(nint va, ulong length)
    {
        public nint Va { get; } = va;

        public ulong Length { get; } = length;

        /// <summary>The owner withdrew the range before its map was published (under the space's lock).</summary>
        public bool Withdrawn { get; set; }
    }

    /// <summary>
    /// Registry ranges are mapped and unmapped on a background worker, in order, and the registry's callbacks never wait
    /// for the IOMMU: pinning a front end's whole memory can take seconds (under TCG with an emulated IOMMU more than a
    /// minute, longer than a vhost-user front end waits for its SET_MEM_TABLE reply), and a withdrawal must not hold a
    /// front end's reply (SET_MEM_TABLE, REM_MEM_REG) behind an earlier range's pinning either. Until a range's map is
    /// published, I/O to it is bounced. A withdrawal stops translation before it returns (a queued map is dropped, a map
    /// still running is not published, a published range leaves the lookup table), so no I/O is given an IOVA in it after
    /// its owner withdrew it; the IOMMU unmap follows on the worker (its IOVA stays reserved until then; the pages stay
    /// pinned by VFIO until then, so no device access can reach memory that was given back).
    /// <see cref="ForVfio"/> turns it on; off, registrations map and unmap synchronously (unit tests).
    /// </summary>
    public bool MapRegistrationsInBackground { get; set; }

    /// <summary>Registry ranges whose background map is queued or running (not yet translatable).</summary>
    public int PendingExternalMaps
    {
        get
        {
            lock (_lock)
            {
                return _pendingMaps.Count;
            }
        }
    }

    /// <summary>IOVA ranges the background worker is still mapping or unmapping.</summary>
    public int BusyIovaRanges
    {
        get
        {
            lock (_lock)
            {
                return _busyIovas.Count;
            }
        }
    }

    /// <summary>Waits until every queued background map and unmap ran (tests, shutdown).</summary>
    public Task DrainBackgroundAsync()
    {
        lock (_backgroundLock)
        {
            return _backgroundTail;
        }
    }

    int IDmaMemoryListener.OnRegister(nint va, ulong length)
    {
        if (!MapRegistrationsInBackground)
        {
            return MapExternal(va, length);
        }

        var pending = new PendingMap(va, length);
        lock (_lock)
        {
            _pendingMaps[va] = pending;
        }

        Enqueue(() => MapInBackground(pending));
        return 0;
    }

    void IDmaMemoryListener.OnUnregister(nint va, ulong length)
    {
        if (!MapRegistrationsInBackground)
        {
            UnregisterDmaMemory(va);
            return;
        }

        Region removed = default;
        long generation = 0;
        bool unmap = false;
        lock (_lock)
        {
            if (_pendingMaps.Remove(va, out var pending))
            {
                pending.Withdrawn = true; // queued: never mapped; running: not published, unmapped by the worker
            }

            for (int i = 0; i < _regions.Length; i++)
            {
                if (_regions[i].Va == (ulong)va && !_regions[i].Owned)
                {
                    removed = _regions[i];
                    var list = new List<Region>(_regions);
                    list.RemoveAt(i);
                    Volatile.Write(ref _regions, list.ToArray()); // lookups stop here: a racing submit bounces
                    if (_mapped)
                    {
                        unmap = true;
                        generation = _iommuGeneration;
                        _busyIovas.Add(removed);
                    }

                    break;
                }
            }
        }

        if (unmap)
        {
            Enqueue(() => UnmapInBackground(removed, generation));
        }
    }

    private void Enqueue(Action work)
    {
        lock (_backgroundLock)
        {
            _backgroundTail = _backgroundTail.ContinueWith(
                _ =>
                {
                    try
                    {
                        work();
                    }
                    catch (Exception e)
                    {
                        _log.LogError(e, "DMA background mapping failed");
                    }
                },
                CancellationToken.None,
                TaskContinuationOptions.None,
                TaskScheduler.Default);
        }
    }

    private void MapInBackground(PendingMap p)
    {
        ulong va = (ulong)p.Va, length = p.Length;
        ulong iova;
        long generation;
        bool mapped;
        int rc = 0;
        lock (_lock)
        {
            if (p.Withdrawn)
            {
                return; // withdrawn while queued: never mapped
            }

            foreach (var r in _regions)
            {
                if (va < r.End && r.Va < va + length)
                {
                    rc = -Platform.Errno.EEXIST;
                }
            }

            iova = rc == 0 ? ChooseIova(va, length, WithBusyIovas()) : ulong.MaxValue;
            if (rc == 0 && iova == ulong.MaxValue)
            {
                rc = -Platform.Errno.ENOSPC;
            }

            generation = _iommuGeneration;
            mapped = _mapped;
            if (rc == 0)
            {
                _busyIovas.Add(new Region(va, length, iova, owned: false));
            }
            else
            {
                _pendingMaps.Remove(p.Va);
            }
        }

        bool reserved = rc == 0;
        if (rc == 0 && mapped)
        {
            rc = _mapper.Map(p.Va, iova, length); // pinning: outside the lock, nobody waits for it
        }

        bool undo = false, published = false;
        lock (_lock)
        {
            if (reserved)
            {
                RemoveBusy(iova);
            }

            if (_pendingMaps.TryGetValue(p.Va, out var cur) && cur == p)
            {
                _pendingMaps.Remove(p.Va);
            }

            if (rc == 0 && (p.Withdrawn || generation != _iommuGeneration))
            {
                // Withdrawn while it was mapping (never published), or the IOMMU context changed under it: undo the map.
                undo = mapped && generation == _iommuGeneration;
                if (undo)
                {
                    _busyIovas.Add(new Region(va, length, iova, owned: false));
                }
            }
            else if (rc == 0)
            {
                var list = new List<Region>(_regions) { new Region(va, length, iova, owned: false) };
                list.Sort((x, y) => x.Va.CompareTo(y.Va));
                Volatile.Write(ref _regions, list.ToArray());
                published = true;
            }
        }

        if (undo)
        {
            _mapper.Unmap(iova, length);
            lock (_lock)
            {
                RemoveBusy(iova);
            }
        }

        if (!p.Withdrawn)
        {
            CountExternal(p.Va, length, published ? 0 : rc != 0 ? rc : -Platform.Errno.EAGAIN);
        }
    }

    private void UnmapInBackground(Region r, long generation)
    {
        bool sameContext;
        lock (_lock)
        {
            sameContext = generation == _iommuGeneration; // otherwise the context that held the mapping is gone
        }

        if (sameContext)
        {
            int rc = _mapper.Unmap(r.Iova, r.Length);
            if (rc != 0)
            {
                _log.LogWarning("DMA unmap of 0x{Va:x}+{Len} failed: {Err}", r.Va, r.Length, rc);
            }
        }

        lock (_lock)
        {
            RemoveBusy(r.Iova);
        }
    }

    /// <summary>Under the lock: the published regions and the IOVA ranges the worker holds (a list ChooseIova may sort).</summary>
    private List<Region> WithBusyIovas()
    {
        var used = new List<Region>(_regions);
        used.AddRange(_busyIovas);
        return used;
    }

    private void RemoveBusy(ulong iova)
    {
        int i = _busyIovas.FindIndex(b => b.Iova == iova);
        if (i >= 0)
        {
            _busyIovas.RemoveAt(i);
        }
    }

    private int MapExternal(nint va, ulong length)
    {
        int rc = RegisterDmaMemory(va, (nuint)length);
        CountExternal(va, length, rc);
        return rc;
    }

    private void CountExternal(nint va, ulong length, int rc)
    {
        if (rc != 0)
        {
            Interlocked.Increment(ref _externalFailed);
            _log.LogWarning("DMA registration of 0x{Va:x}+{Len} failed ({Err}): I/O to that memory is bounced", (ulong)va, length, rc);
        }
        else
        {
            Interlocked.Increment(ref _externalRegistered);
        }
    }

    /// <summary>The shared VFIO DMA space if it exists (vhost registers guest memory only when some device uses VFIO).</summary>
    public static DmaSpace? VfioIfCreated
    {
        get
        {
            lock (s_vfioLock)
            {
                return s_vfio;
            }
        }
    }

    public IDmaMapper Mapper => _mapper;

    /// <summary>Whether the last allocation fell back to locked 4 KiB pages.</summary>
    public bool UsingSmallPages { get; private set; }

    internal readonly struct Region
    {
        public Region(ulong va, ulong length, ulong iova, bool owned)
        {
            Va = va;
            Length = length;
            Iova = iova;
            Owned = owned;
        }

        public ulong Va { get; }
        public ulong Length { get; }
        public ulong Iova { get; }
        public bool Owned { get; }
        public ulong End => Va + Length;
    }

    public int RegionCount => Volatile.Read(ref _regions).Length;

    /// <summary>
    /// Translates [va, va+length) to a device address. The range must lie inside one registered region (then it
    /// is contiguous for the device too). No lock, no allocation.
    /// </summary>
    public bool TryTranslate(nint va, nuint length, out ulong iova)
    {
        var regions = Volatile.Read(ref _regions);
        ulong a = (ulong)va;
        int lo = 0, hi = regions.Length - 1;
        while (lo <= hi)
        {
            int mid = (lo + hi) >>> 1;
            ref readonly var r = ref regions[mid];
            if (a < r.Va)
            {
                hi = mid - 1;
            }
            else if (a >= r.End)
            {
                lo = mid + 1;
            }
            else
            {
                if ((ulong)length > r.End - a)
                {
                    break;
                }

                iova = r.Iova + (a - r.Va);
                return true;
            }
        }

        iova = 0;
        return false;
    }

    /// <summary>Reverse lookup for models: the process address behind an IOVA range (null when unmapped).</summary>
    public nint TranslateIova(ulong iova, ulong length)
    {
        foreach (var r in Volatile.Read(ref _regions))
        {
            if (iova >= r.Iova && iova < r.Iova + r.Length && length <= r.Iova + r.Length - iova)
            {
                return (nint)(r.Va + (iova - r.Iova));
            }
        }

        return 0;
    }

    /// <summary>
    /// Makes [ptr, ptr+length) reachable by devices. ptr and length must be 4 KiB aligned; the range must not
    /// overlap a registered one. Returns 0 or -errno (EINVAL, EEXIST, or the IOMMU's error).
    /// </summary>
    public int RegisterDmaMemory(nint ptr, nuint length) => Register((ulong)ptr, (ulong)length, owned: false);

    /// <summary>
    /// Removes a range registered with <see cref="RegisterDmaMemory"/> (by its start): it is unmapped from the IOMMU
    /// (and no longer translated) before this returns. Returns 0 or -ENOENT.
    /// </summary>
    public int UnregisterDmaMemory(nint ptr)
    {
        lock (_lock)
        {
            int i = -1;
            for (int k = 0; k < _regions.Length; k++)
            {
                if (_regions[k].Va == (ulong)ptr)
                {
                    i = k;
                    break;
                }
            }

            if (i < 0)
            {
                return -Platform.Errno.ENOENT;
            }

            var r = _regions[i];

            // Lookups stop first (a submit racing with this sees the region gone and bounces), then the IOMMU unmaps.
            var list = new List<Region>(_regions);
            list.RemoveAt(i);
            Volatile.Write(ref _regions, list.ToArray());
            if (_mapped)
            {
                int rc = _mapper.Unmap(r.Iova, r.Length);
                if (rc != 0)
                {
                    _log.LogWarning("DMA unmap of 0x{Va:x}+{Len} failed: {Err}", r.Va, r.Length, rc);
                }
            }

            return 0;
        }
    }

    private int Register(ulong va, ulong length, bool owned)
    {
        if (va == 0 || length == 0 || va % SmallPageSize != 0 || length % SmallPageSize != 0 || va + length < va)
        {
            return -Platform.Errno.EINVAL;
        }

        lock (_lock)
        {
            foreach (var r in _regions)
            {
                if (va < r.End && r.Va < va + length)
                {
                    return -Platform.Errno.EEXIST;
                }
            }

            ulong iova = ChooseIova(va, length, WithBusyIovas());
            if (iova == ulong.MaxValue)
            {
                return -Platform.Errno.ENOSPC;
            }

            if (_mapped)
            {
                int rc = _mapper.Map((nint)va, iova, length);
                if (rc != 0)
                {
                    return rc;
                }
            }

            var list = new List<Region>(_regions) { new Region(va, length, iova, owned) };
            list.Sort((x, y) => x.Va.CompareTo(y.Va));
            Volatile.Write(ref _regions, list.ToArray());
            return 0;
        }
    }

    /// <summary>
    /// The IOVA for [va, va+length): va itself when a valid range holds it and no region uses that IOVA space;
    /// else the first 2 MiB-aligned gap of a valid range (above 4 GiB when the range reaches past 8 GiB) that no
    /// region uses. ulong.MaxValue when nothing fits. Under the lock.
    /// </summary>
    private ulong ChooseIova(ulong va, ulong length, List<Region>? used = null)
    {
        var regions = used ?? new List<Region>(_regions);
        var ranges = _mapper.IovaRanges;
        foreach (var (start, end) in ranges)
        {
            if (va >= start && va + length - 1 <= end && IovaFree(regions, va, length))
            {
                return va; // IOVA = VA
            }
        }

        regions.Sort((x, y) => x.Iova.CompareTo(y.Iova));
        foreach (var (start, end) in ranges)
        {
            ulong cursor = end > (8UL << 30) ? Math.Max(start, 4UL << 30) : start;
            while (true)
            {
                cursor = (cursor + HugePageSize - 1) & ~(HugePageSize - 1);
                if (cursor < start || cursor + length < cursor || cursor + length - 1 > end)
                {
                    break;
                }

                ulong blockEnd = 0;
                foreach (var r in regions)
                {
                    if (r.Iova < cursor + length && cursor < r.Iova + r.Length)
                    {
                        blockEnd = Math.Max(blockEnd, r.Iova + r.Length);
                    }
                }

                if (blockEnd == 0)
                {
                    return cursor;
                }

                cursor = blockEnd;
            }
        }

        return ulong.MaxValue;
    }

    private static bool IovaFree(List<Region> regions, ulong iova, ulong length)
    {
        foreach (var r in regions)
        {
            if (r.Iova < iova + length && iova < r.Iova + r.Length)
            {
                return false;
            }
        }

        return true;
    }

    /// <summary>
    /// The container's IOMMU context was (re)created (ready: map every region again, choosing IOVAs afresh) or
    /// dropped with its last group (every mapping is gone: map nothing until it is back). Runs under the container's lock.
    /// </summary>
    private void OnIommuChanged(bool ready)
    {
        lock (_lock)
        {
            _mapped = ready;
            _iommuGeneration++;
            if (!ready)
            {
                return;
            }

            var list = new List<Region>(_regions.Length);
            foreach (var r in _regions)
            {
                var used = new List<Region>(list);
                used.AddRange(_busyIovas);
                ulong iova = ChooseIova(r.Va, r.Length, used);
                int rc = iova == ulong.MaxValue ? -Platform.Errno.ENOSPC : _mapper.Map((nint)r.Va, iova, r.Length);
                if (rc != 0)
                {
                    _log.LogError("DMA map of 0x{Va:x}+{Len} failed: {Err}", r.Va, r.Length, rc);
                    continue;
                }

                list.Add(new Region(r.Va, r.Length, iova, r.Owned));
            }

            list.Sort((x, y) => x.Va.CompareTo(y.Va));
            Volatile.Write(ref _regions, list.ToArray());
        }
    }

    /// <summary>
    /// Allocates zeroed DMA memory of at least <paramref name="size"/> bytes from hugepages (memfd MFD_HUGETLB),
    /// or, when none are reserved, from 4 KiB pages locked with mlock (logged once). The memory is registered.
    /// </summary>
    public DmaRegion Allocate(ulong size, string name = "vb-dma") => Allocate(size, name, fromReserve: true);

    private DmaRegion Allocate(ulong size, string name, bool fromReserve)
    {
        if (size == 0)
        {
            throw new ArgumentOutOfRangeException(nameof(size));
        }

        ulong key = (size + SmallPageSize - 1) & ~(SmallPageSize - 1);
        CachedRegion? cached = null;
        lock (_lock)
        {
            if (fromReserve && _cache.TryGetValue(key, out var stack) && stack.Count > 0)
            {
                cached = stack.Pop();
            }
        }

        if (cached is not null)
        {
            // Still registered (and mapped): no IOMMU call. Zeroed as a fresh allocation is.
            System.Runtime.InteropServices.NativeMemory.Clear((void*)cached.Va, (nuint)cached.Size);
            TryTranslate(cached.Va, (nuint)cached.Size, out ulong cachedIova);
            Interlocked.Increment(ref _cacheHits);
            return new DmaRegion(this, cached.Va, cachedIova, cached.Size, cached.HugePages, cached.Fd, key);
        }

        ulong hugeSize = (size + HugePageSize - 1) & ~(HugePageSize - 1);
        nint va = MapMemfd(name, hugeSize, NvmeNative.MFD_HUGETLB, out int fd);
        bool huge = va != 0;
        ulong mapped = hugeSize;
        if (!huge)
        {
            mapped = (size + SmallPageSize - 1) & ~(SmallPageSize - 1);
            va = MapMemfd(name, mapped, 0, out fd);
            if (va == 0)
            {
                throw new OutOfMemoryException($"cannot allocate {mapped} bytes of DMA memory: {NvmeNative.StrError(NvmeNative.Errno)}");
            }

            if (NvmeNative.mlock(va, (nuint)mapped) != 0 && !_warnedNoHugePages)
            {
                _log.LogWarning("mlock of DMA memory failed: {Err}", NvmeNative.StrError(NvmeNative.Errno));
            }

            UsingSmallPages = true;
            if (!_warnedNoHugePages)
            {
                _warnedNoHugePages = true;
                _log.LogWarning("no hugepages reserved: DMA memory uses locked 4 KiB pages (run scripts/setup.sh to reserve hugepages)");
            }
        }

        int rc = Register((ulong)va, mapped, owned: true);
        if (rc != 0)
        {
            NvmeNative.munmap(va, (nuint)mapped);
            NvmeNative.close(fd);
            throw new IOException($"DMA map of {mapped} bytes failed: {NvmeNative.StrError(-rc)}");
        }

        TryTranslate(va, (nuint)mapped, out ulong iova);
        return new DmaRegion(this, va, iova, mapped, huge, fd, key);
    }

    private sealed record CachedRegion(nint Va, ulong Size, bool HugePages, int Fd);

    // Freed regions of this space kept registered and mapped for the next allocation of the same size (under _lock).
    private readonly Dictionary<ulong, Stack<CachedRegion>> _cache = new();
    private readonly Dictionary<ulong, int> _reserved = new(); // regions per size the reserve keeps; other sizes are unmapped and freed at once
    private long _cacheHits;

    /// <summary>Allocations served from freed regions (no mapping call).</summary>
    public long CacheHits => Interlocked.Read(ref _cacheHits);

    /// <summary>
    /// Allocates <paramref name="count"/> regions of <paramref name="size"/> bytes now and keeps them, mapped, for later
    /// <see cref="Allocate"/> calls of that size; a region freed later goes back to this reserve. Used off the reactors
    /// (controller attach) so that a reactor creating an I/O channel (its queue pair, its bounce buffers) makes no
    /// VFIO call: a <c>VFIO_IOMMU_MAP_DMA</c> waits for the container's mutex, which a background map of a front end's
    /// memory may hold for a while. Freeing never unmaps while the reserve has room.
    /// <para>
    /// The reserve is counted per caller: dispose the returned reservation (off the reactors: it unmaps) when its owner
    /// goes (a controller detaching), and the reserve shrinks by its count again; regions beyond the new size that sit
    /// idle are unmapped and freed then, one at a time, and those still in use when they are freed. When the reserve
    /// cannot be filled (the allocation throws), its count is given back before the exception leaves.
    /// </para>
    /// </summary>
    public DmaReservation Reserve(ulong size, int count, string name = "vb-dma-reserve")
    {
        ulong key = (size + SmallPageSize - 1) & ~(SmallPageSize - 1);
        if (count <= 0)
        {
            return new DmaReservation(this, key, 0);
        }

        var reservation = new DmaReservation(this, key, count);
        var regions = new List<DmaRegion>(count);
        bool filled = false;
        try
        {
            lock (_lock)
            {
                _reserved[key] = _reserved.GetValueOrDefault(key) + count;
            }

            for (int i = 0; i < count; i++)
            {
                // New regions: idle ones another owner reserved stay theirs (each owner's channels find their own).
                regions.Add(Allocate(size, name, fromReserve: false));
            }

            filled = true;
        }
        finally
        {
            foreach (var r in regions)
            {
                r.Dispose(); // into the reserve
            }

            if (!filled)
            {
                reservation.Dispose();
            }
        }

        return reservation;
    }

    /// <summary>Regions of <paramref name="key"/> bytes the reserve keeps, over every reservation (under the lock: a snapshot).</summary>
    public int ReservedCount(ulong size)
    {
        ulong key = (size + SmallPageSize - 1) & ~(SmallPageSize - 1);
        lock (_lock)
        {
            return _reserved.GetValueOrDefault(key);
        }
    }

    /// <summary>Bytes of memory this space allocated that are still registered (in use or idle in the reserve).</summary>
    public ulong AllocatedBytes
    {
        get
        {
            ulong sum = 0;
            foreach (var r in Volatile.Read(ref _regions))
            {
                if (r.Owned)
                {
                    sum += r.Length;
                }
            }

            return sum;
        }
    }

    /// <summary>
    /// A reservation goes: the reserve of its size shrinks by <paramref name="count"/>, and idle regions beyond the new
    /// size are unmapped and freed (one at a time, none under the lock: a map elsewhere is not held up by all of them).
    /// </summary>
    internal void Unreserve(ulong key, int count)
    {
        List<CachedRegion>? idle = null;
        lock (_lock)
        {
            int keep = Math.Max(0, _reserved.GetValueOrDefault(key) - count);
            if (keep == 0)
            {
                _reserved.Remove(key);
            }
            else
            {
                _reserved[key] = keep;
            }

            if (_cache.TryGetValue(key, out var stack))
            {
                while (stack.Count > keep)
                {
                    (idle ??= new List<CachedRegion>()).Add(stack.Pop());
                }

                if (stack.Count == 0)
                {
                    _cache.Remove(key);
                }
            }
        }

        foreach (var c in idle ?? Enumerable.Empty<CachedRegion>())
        {
            Release(c.Va, c.Size, c.Fd);
        }
    }

    private static nint MapMemfd(string name, ulong size, uint extraFlags, out int fd)
    {
        fd = NvmeNative.memfd_create(name, NvmeNative.MFD_CLOEXEC | extraFlags);
        if (fd < 0)
        {
            return 0;
        }

        if (NvmeNative.ftruncate(fd, (long)size) != 0)
        {
            NvmeNative.close(fd);
            fd = -1;
            return 0;
        }

        // MAP_POPULATE: hugetlb reservations fail here (ENOMEM) rather than with SIGBUS on first touch.
        nint p = NvmeNative.mmap(0, (nuint)size, NvmeNative.PROT_READ | NvmeNative.PROT_WRITE, NvmeNative.MAP_SHARED | NvmeNative.MAP_POPULATE, fd, 0);
        if (p == NvmeNative.MAP_FAILED)
        {
            NvmeNative.close(fd);
            fd = -1;
            return 0;
        }

        return p;
    }

    internal void Free(DmaRegion region)
    {
        lock (_lock)
        {
            if (_reserved.TryGetValue(region.CacheKey, out int keep) && _regions.Any(r => r.Va == (ulong)region.Va && r.Owned))
            {
                if (!_cache.TryGetValue(region.CacheKey, out var stack))
                {
                    _cache[region.CacheKey] = stack = new Stack<CachedRegion>();
                }

                if (stack.Count < keep)
                {
                    stack.Push(new CachedRegion(region.Va, region.Size, region.HugePages, region.Fd));
                    return;
                }
            }
        }

        Release(region.Va, region.Size, region.Fd);
    }

    /// <summary>Unmaps (IOMMU, then the process mapping) and frees an owned region.</summary>
    private void Release(nint va, ulong size, int fd)
    {
        UnregisterDmaMemory(va);
        NvmeNative.munmap(va, (nuint)size);
        if (fd >= 0)
        {
            NvmeNative.close(fd);
        }
    }
}

/// <summary>
/// One owner's share of a <see cref="DmaSpace"/>'s reserve (<see cref="DmaSpace.Reserve"/>). Dispose it when the owner
/// goes, off the reactors (it may unmap): the reserve shrinks by its count. Disposing twice does nothing.
/// </summary>
public sealed class DmaReservation : IDisposable
{
    private readonly DmaSpace _space;
    private int _disposed;

    internal DmaReservation(DmaSpace space, ulong key, int count)
    {
        _space = space;
        Size = key;
        Count = count;
    }

    /// <summary>The size of each region (rounded up to 4 KiB).</summary>
    public ulong Size { get; }

    /// <summary>How many regions of <see cref="Size"/> the reserve keeps for this owner.</summary>
    public int Count { get; }

    public void Dispose()
    {
        if (Interlocked.Exchange(ref _disposed, 1) == 0 && Count > 0)
        {
            _space.Unreserve(Size, Count);
        }
    }
}

/// <summary>A block of DMA memory owned by whoever allocated it; <see cref="Dispose"/> returns it to its space (kept mapped for reuse while the space's reserve has room, else unmapped and freed).</summary>
public sealed class DmaRegion : IDisposable
{
    private readonly DmaSpace _space;
    private int _disposed;

    internal DmaRegion(DmaSpace space, nint va, ulong iova, ulong size, bool hugePages, int fd, ulong cacheKey)
    {
        _space = space;
        CacheKey = cacheKey;
        Va = va;
        Iova = iova;
        Size = size;
        HugePages = hugePages;
        Fd = fd;
    }

    public nint Va { get; }
    public ulong Iova { get; }
    public ulong Size { get; }
    public bool HugePages { get; }
    internal int Fd { get; }
    internal ulong CacheKey { get; }

    public void Dispose()
    {
        if (Interlocked.Exchange(ref _disposed, 1) == 0)
        {
            _space.Free(this);
        }
    }
}

/// <summary>
/// Fixed-size DMA buffers (bounce buffers, PRP lists, data buffers) carved from one region. Owned by one thread:
/// no lock; Get/Return allocate nothing.
/// </summary>
public sealed class DmaBufferPool : IDisposable
{
    private readonly DmaRegion _region;
    private readonly int[] _free;
    private int _freeCount;

    public DmaBufferPool(DmaSpace space, int count, int bufferSize, string name = "vb-dma-pool")
    {
        if (count <= 0 || bufferSize <= 0 || bufferSize % 4096 != 0)
        {
            throw new ArgumentException("buffer count must be > 0 and size a positive multiple of 4096");
        }

        BufferSize = bufferSize;
        Count = count;
        _region = space.Allocate((ulong)count * (ulong)bufferSize, name);
        _free = new int[count];
        for (int i = 0; i < count; i++)
        {
            _free[i] = count - 1 - i;
        }

        _freeCount = count;
    }

    public int BufferSize { get; }
    public int Count { get; }
    public int Available => _freeCount;

    public bool TryGet(out nint va, out ulong iova)
    {
        if (_freeCount == 0)
        {
            va = 0;
            iova = 0;
            return false;
        }

        int i = _free[--_freeCount];
        va = _region.Va + (i * BufferSize);
        iova = _region.Iova + ((ulong)i * (ulong)BufferSize);
        return true;
    }

    public void Return(nint va)
    {
        long off = va - _region.Va;
        if (off < 0 || off % BufferSize != 0 || off / BufferSize >= Count || _freeCount == Count)
        {
            throw new ArgumentException("buffer does not belong to this pool, or returned twice");
        }

        _free[_freeCount++] = (int)(off / BufferSize);
    }

    /// <summary>
    /// Gathers <paramref name="src"/> (in order) into <paramref name="buffer"/>, a buffer taken from this pool. The
    /// buffer is checked (it must be one of this pool's, and the elements must add up to at most
    /// <see cref="BufferSize"/>); the elements are the caller's own memory (e.g. iovecs the bdev layer validated).
    /// </summary>
    public void CopyIn(nint buffer, ReadOnlySpan<NvmeIoVec> src)
    {
        CheckBuffer(buffer, src);
        unsafe
        {
            byte* d = (byte*)buffer;
            foreach (var v in src)
            {
                // SAFETY: the destination stays inside the pool buffer (CheckBuffer); the source is the caller's.
                Buffer.MemoryCopy((void*)v.Base, d, (long)v.Length, (long)v.Length);
                d += v.Length;
            }
        }
    }

    /// <summary>Scatters <paramref name="buffer"/> (a buffer of this pool) into <paramref name="dst"/>; checked as <see cref="CopyIn"/>.</summary>
    public void CopyOut(nint buffer, ReadOnlySpan<NvmeIoVec> dst)
    {
        CheckBuffer(buffer, dst);
        unsafe
        {
            byte* s = (byte*)buffer;
            foreach (var v in dst)
            {
                // SAFETY: as in CopyIn, the other way round.
                Buffer.MemoryCopy(s, (void*)v.Base, (long)v.Length, (long)v.Length);
                s += v.Length;
            }
        }
    }

    private void CheckBuffer(nint buffer, ReadOnlySpan<NvmeIoVec> iovs)
    {
        long off = buffer - _region.Va;
        if (off < 0 || off % BufferSize != 0 || off / BufferSize >= Count)
        {
            throw new ArgumentException("buffer does not belong to this pool");
        }

        ulong total = 0;
        foreach (var v in iovs)
        {
            total += v.Length;
            if (v.Length > (ulong)BufferSize || total > (ulong)BufferSize || (v.Base == 0 && v.Length != 0))
            {
                throw new ArgumentException("buffers larger than the pool buffer");
            }
        }
    }

    public void Dispose() => _region.Dispose();
}
