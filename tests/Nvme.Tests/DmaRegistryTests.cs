using System.Globalization;
using VhostBackend.Platform;
using Xunit;

namespace VhostBackend.Nvme.Tests;

/// <summary>
/// The DMA-registration seam (<see cref="DmaMemoryRegistry"/>, SPDK's spdk_mem_register and mem maps) and the NVMe
/// driver's DMA space subscribed to it, against a model IOMMU.
/// </summary>
public sealed class DmaRegistryTests
{
    /// <summary>
    /// A model of a type1 IOMMU: an IOVA table that refuses overlapping maps (-EEXIST) and unmaps of ranges it does
    /// not hold (-ENOENT), as VFIO does; optionally a 39-bit IOVA space. Tests ask it what a device can reach.
    /// </summary>
    private sealed class ModelIommu(bool narrow = false) : IDmaMapper
    {
        private readonly List<(ulong Iova, nint Va, ulong Len)> _maps = new();

        public IReadOnlyList<(ulong Start, ulong End)> IovaRanges { get; } = narrow ? new[] { (0UL, 0x7fffffffffUL) } : new[] { (0UL, ulong.MaxValue - 1) };

        public int MapCalls { get; private set; }

        public int UnmapCalls { get; private set; }

        /// <summary>Runs inside each Unmap (before the mapping goes): lets a test look at the process at that moment.</summary>
        public Action<ulong, nint, ulong>? OnUnmap { get; set; }

        public int Mappings
        {
            get
            {
                lock (_maps)
                {
                    return _maps.Count;
                }
            }
        }

        /// <summary>How long each Map takes (pinning a large range).</summary>
        public int MapDelayMs { get; set; }

        public int Map(nint va, ulong iova, ulong length)
        {
            Thread.Sleep(MapDelayMs);
            lock (_maps)
            {
                return MapLocked(va, iova, length);
            }
        }

        private int MapLocked(nint va, ulong iova, ulong length)
        {
            foreach (var m in _maps)
            {
                if (m.Iova < iova + length && iova < m.Iova + m.Len)
                {
                    return -Errno.EEXIST;
                }
            }

            MapCalls++;
            _maps.Add((iova, va, length));
            return 0;
        }

        public int Unmap(ulong iova, ulong length)
        {
            lock (_maps)
            {
                return UnmapLocked(iova, length);
            }
        }

        private int UnmapLocked(ulong iova, ulong length)
        {
            int i = _maps.FindIndex(m => m.Iova == iova && m.Len == length);
            if (i < 0)
            {
                return -Errno.ENOENT;
            }

            UnmapCalls++;
            OnUnmap?.Invoke(iova, _maps[i].Va, length);
            _maps.RemoveAt(i);
            return 0;
        }

        /// <summary>The process address a device access to [iova, iova+len) lands on, or 0 (an IOMMU fault).</summary>
        public nint DeviceAccess(ulong iova, ulong len)
        {
            lock (_maps)
            {
                foreach (var m in _maps)
                {
                    if (iova >= m.Iova && iova - m.Iova < m.Len && len <= m.Len - (iova - m.Iova))
                    {
                        return m.Va + (nint)(iova - m.Iova);
                    }
                }
            }

            return 0;
        }
    }

    private sealed class RecordingListener : IDmaMemoryListener
    {
        public List<string> Events { get; } = new();

        public int OnRegister(nint va, ulong length)
        {
            Events.Add($"+{va:x}/{length}");
            return 0;
        }

        public void OnUnregister(nint va, ulong length) => Events.Add($"-{va:x}/{length}");
    }

    private static MappedRegion MapMemfd(ulong size, DmaMemoryRegistry registry)
    {
        int fd = MappedRegion.CreateMemFd("dma-registry-test", (long)size);
        try
        {
            return MappedRegion.Map(fd, size, registry);
        }
        finally
        {
            Fd.Close(fd);
        }
    }

    private static bool IsMappedInProcess(nint va)
    {
        foreach (var line in File.ReadLines("/proc/self/maps"))
        {
            int dash = line.IndexOf('-', StringComparison.Ordinal);
            int space = line.IndexOf(' ', StringComparison.Ordinal);
            ulong lo = ulong.Parse(line.AsSpan(0, dash), NumberStyles.HexNumber, CultureInfo.InvariantCulture);
            ulong hi = ulong.Parse(line.AsSpan(dash + 1, space - dash - 1), NumberStyles.HexNumber, CultureInfo.InvariantCulture);
            if ((ulong)va >= lo && (ulong)va < hi)
            {
                return true;
            }
        }

        return false;
    }

    [Fact]
    public void RegistryCountsReferencesAndTellsListenersOnceEachWay()
    {
        var registry = new DmaMemoryRegistry();
        var l = new RecordingListener();
        using var sub = registry.Subscribe(l);
        nint va = unchecked((nint)0x7f0000000000L);
        Assert.Equal(0, registry.Register(va, 8192));
        Assert.Equal(0, registry.Register(va, 8192)); // a second owner of the same mapping
        Assert.Equal(2, registry.References(va, 8192));
        Assert.Single(l.Events);
        Assert.Equal(0, registry.Unregister(va, 8192));
        Assert.Single(l.Events); // still referenced: still mapped
        Assert.Equal(0, registry.Unregister(va, 8192));
        Assert.Equal(new[] { $"+{va:x}/8192", $"-{va:x}/8192" }, l.Events);
        Assert.Equal(-Errno.ENOENT, registry.Unregister(va, 8192));
        Assert.Equal(0, registry.Count);
    }

    [Fact]
    public void RegistryRefusesBadAndPartlyOverlappingRanges()
    {
        var registry = new DmaMemoryRegistry();
        nint va = unchecked((nint)0x7f0000000000L);
        Assert.Equal(-Errno.EINVAL, registry.Register(0, 4096));
        Assert.Equal(-Errno.EINVAL, registry.Register(va + 1, 4096));
        Assert.Equal(-Errno.EINVAL, registry.Register(va, 100));
        Assert.Equal(-Errno.EINVAL, registry.Register(va, 0));
        Assert.Equal(-Errno.EINVAL, registry.Register(unchecked((nint)0xfffffffffffff000), 8192)); // wraps
        Assert.Equal(0, registry.Register(va, 4 * 4096));
        Assert.Equal(-Errno.EEXIST, registry.Register(va + 4096, 4096));
        Assert.Equal(-Errno.EEXIST, registry.Register(va - 4096, 2 * 4096));
        Assert.Equal(-Errno.ENOENT, registry.Unregister(va, 4096)); // only the exact range
        Assert.Equal(0, registry.Register(va + (4 * 4096), 4096)); // adjacent is fine
        Assert.Equal(2, registry.Count);
    }

    [Fact]
    public void LateSubscriberHearsOfEveryRangeAndUnsubscribingWithdrawsThem()
    {
        var registry = new DmaMemoryRegistry();
        nint a = unchecked((nint)0x7f0000000000L), b = unchecked((nint)0x7f0000100000L);
        registry.Register(a, 4096);
        registry.Register(b, 8192);
        var l = new RecordingListener();
        var sub = registry.Subscribe(l);
        Assert.Equal(new[] { $"+{a:x}/4096", $"+{b:x}/8192" }, l.Events);
        Assert.Throws<InvalidOperationException>(() => registry.Subscribe(l));
        sub.Dispose();
        sub.Dispose();
        Assert.Equal(4, l.Events.Count);
        Assert.Equal(0, registry.ListenerCount);
        registry.Unregister(a, 4096);
        Assert.Equal(4, l.Events.Count); // gone: hears nothing more
    }

    [Fact]
    public void GuestMappingIsReachableByTheDeviceUntilDisposedAndUnmappedFromTheIommuBeforeTheProcessUnmapsIt()
    {
        var registry = new DmaMemoryRegistry();
        var iommu = new ModelIommu();
        var space = new DmaSpace(iommu);
        using var sub = space.SubscribeTo(registry);
        var map = MapMemfd(3 * 4096 + 100, registry); // a length that is not whole pages: the whole mapping is registered
        Assert.True(map.DmaRegistered);
        Assert.Equal(1, registry.References(map.Pointer, 4 * 4096));
        Assert.True(space.TryTranslate(map.Pointer + 4096, 8192, out ulong iova));
        Assert.Equal((ulong)map.Pointer + 4096, iova); // IOVA = VA where the IOMMU can address it
        Assert.Equal(map.Pointer + 4096, iommu.DeviceAccess(iova, 8192));
        Assert.Equal(1, space.ExternalRegistrations);

        bool stillMappedAtUnmap = false;
        nint va = map.Pointer;
        iommu.OnUnmap = (_, v, _) => stillMappedAtUnmap = IsMappedInProcess(v);
        map.Dispose();
        Assert.True(stillMappedAtUnmap, "the IOMMU mapping outlived the process mapping");
        Assert.Equal(0, iommu.DeviceAccess((ulong)va + 4096, 8)); // a device access now faults
        Assert.False(space.TryTranslate(va + 4096, 8, out _)); // and the driver bounces
        Assert.Equal(0, registry.Count);
        Assert.Equal(0, iommu.Mappings);
    }

    [Fact]
    public void OneRegistrationIsMappedIntoEveryDevicesSpaceAndEachSpaceUnmapsItOnce()
    {
        var registry = new DmaMemoryRegistry();
        var iommu1 = new ModelIommu();
        var iommu2 = new ModelIommu(narrow: true);
        var space1 = new DmaSpace(iommu1);
        var space2 = new DmaSpace(iommu2);
        using var s1 = space1.SubscribeTo(registry);
        using var map = MapMemfd(16 * 4096, registry);
        Assert.Equal(0, registry.Register(map.Pointer, 16 * 4096)); // a second owner (another session sharing the mapping)
        using var s2 = space2.SubscribeTo(registry); // a controller attached later sees memory mapped before it
        Assert.True(space1.TryTranslate(map.Pointer, 4096, out _));
        Assert.True(space2.TryTranslate(map.Pointer, 4096, out ulong iova2));
        Assert.True(iova2 + (16 * 4096) - 1 <= 0x7fffffffffUL, "IOVA outside the 39-bit space");
        Assert.Equal(map.Pointer, iommu2.DeviceAccess(iova2, 4096));
        Assert.Equal(1, iommu1.MapCalls);
        Assert.Equal(1, iommu2.MapCalls);

        Assert.Equal(0, registry.Unregister(map.Pointer, 16 * 4096)); // the second owner leaves: still mapped
        Assert.Equal(0, iommu1.UnmapCalls);
        Assert.True(space2.TryTranslate(map.Pointer, 4096, out _));
        map.Dispose(); // the last owner
        Assert.Equal(1, iommu1.UnmapCalls);
        Assert.Equal(1, iommu2.UnmapCalls);
        Assert.False(space1.TryTranslate(map.Pointer, 4096, out _));
    }

    [Fact]
    public void AllocatedIovasAreReusedAfterUnregisterAndNeverOverlap()
    {
        var registry = new DmaMemoryRegistry();
        var iommu = new ModelIommu(narrow: true);
        var space = new DmaSpace(iommu);
        using var sub = space.SubscribeTo(registry);
        var a = MapMemfd(1 << 21, registry);
        using var b = MapMemfd(1 << 21, registry);
        Assert.True(space.TryTranslate(a.Pointer, 1, out ulong iovaA));
        Assert.True(space.TryTranslate(b.Pointer, 1, out ulong iovaB));
        Assert.True(iovaA + (1 << 21) <= iovaB || iovaB + (1 << 21) <= iovaA, "IOVA ranges overlap");
        a.Dispose();
        for (int i = 0; i < 50; i++)
        {
            // A memory table changing again and again: the freed IOVA is taken again, the space does not run out.
            using var c = MapMemfd(1 << 21, registry);
            Assert.True(space.TryTranslate(c.Pointer, 1, out ulong iovaC));
            Assert.Equal(iovaA, iovaC);
        }

        Assert.Equal(1, iommu.Mappings);
    }

    [Fact]
    public async Task BackgroundMappingHoldsNeitherTheOwnersRegistrationNorItsWithdrawal()
    {
        var registry = new DmaMemoryRegistry();
        var iommu = new ModelIommu { MapDelayMs = 400 }; // a slow pin (a large front end memory under TCG)
        var space = new DmaSpace(iommu) { MapRegistrationsInBackground = true };
        using var sub = space.SubscribeTo(registry);

        // Registered: the owner (a SET_MEM_TABLE being answered) does not wait for the IOMMU; I/O bounces until mapped.
        var sw = System.Diagnostics.Stopwatch.StartNew();
        var map = MapMemfd(4 * 4096, registry);
        Assert.True(sw.ElapsedMilliseconds < 300, $"registration waited {sw.ElapsedMilliseconds} ms for the IOMMU");
        Assert.False(space.TryTranslate(map.Pointer, 4096, out _));
        Assert.Equal(1, space.PendingExternalMaps);
        await space.DrainBackgroundAsync().WaitAsync(TimeSpan.FromSeconds(10));
        Assert.True(space.TryTranslate(map.Pointer, 4096, out ulong iova), "never mapped");
        Assert.Equal(map.Pointer, iommu.DeviceAccess(iova, 4096));

        // Withdrawn once published: translation stops before Dispose returns, the IOMMU unmap follows on the worker.
        nint va = map.Pointer;
        map.Dispose();
        Assert.False(space.TryTranslate(va, 1, out _));
        await space.DrainBackgroundAsync().WaitAsync(TimeSpan.FromSeconds(10));
        Assert.Equal(0, iommu.Mappings);
        Assert.Equal(0, space.BusyIovaRanges);

        // Withdrawn while its map is running (the pin takes 400 ms): the withdrawal does not wait for it (a second
        // SET_MEM_TABLE is answered at once), the range is never published, and the worker undoes the map.
        var slow = MapMemfd(4 * 4096, registry);
        nint slowVa = slow.Pointer;
        await Task.Delay(100); // the worker is inside Map now
        sw.Restart();
        slow.Dispose();
        Assert.True(sw.ElapsedMilliseconds < 200, $"withdrawal waited {sw.ElapsedMilliseconds} ms for a running map");
        Assert.False(space.TryTranslate(slowVa, 1, out _));

        // Withdrawn while its map is still queued (behind another): never mapped at all.
        using var next = MapMemfd(4 * 4096, registry);
        var queued = MapMemfd(4096, registry);
        nint queuedVa = queued.Pointer;
        queued.Dispose();
        Assert.False(space.TryTranslate(queuedVa, 1, out _));
        await space.DrainBackgroundAsync().WaitAsync(TimeSpan.FromSeconds(10));
        Assert.True(space.TryTranslate(next.Pointer, 4 * 4096, out ulong nextIova));
        Assert.Equal(1, iommu.Mappings); // only 'next': neither withdrawn range stayed mapped or was published
        Assert.Equal(next.Pointer, iommu.DeviceAccess(nextIova, 4 * 4096));
        Assert.Equal(1, space.RegionCount);
        Assert.Equal(3, iommu.MapCalls); // map, slow, next: the queued one never reached the IOMMU
        Assert.Equal(2, iommu.UnmapCalls);
        Assert.Equal(0, space.PendingExternalMaps);
        Assert.Equal(0, space.BusyIovaRanges);
        // map and next; 'slow' counts too when a loaded host ran its 400 ms pin to the end before the withdrawal (then it
        // was withdrawn as a published range: the same unmap, asserted above).
        Assert.InRange(space.ExternalRegistrations, 2, 3);
        Assert.Equal(0, space.ExternalFailures);
    }

    [Fact]
    public void MappingWithoutARegistryRegistersNothing()
    {
        var registry = new DmaMemoryRegistry();
        int fd = MappedRegion.CreateMemFd("dma-registry-test", 4096);
        using var map = MappedRegion.Map(fd, 4096);
        Fd.Close(fd);
        Assert.False(map.DmaRegistered);
        Assert.Equal(0, registry.Count);
    }
}
