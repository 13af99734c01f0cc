using VhostBackend.Nvme;
using Xunit;

namespace VhostBackend.Nvme.Tests;

public unsafe class DmaAndPrpTests
{
    /// <summary>A mapper that records calls and accepts only a 39-bit IOVA space (like QEMU's intel-iommu default).</summary>
    private sealed class NarrowMapper : IDmaMapper
    {
        public List<(nint Va, ulong Iova, ulong Len)> Maps { get; } = new();
        public List<(ulong Iova, ulong Len)> Unmaps { get; } = new();

        public IReadOnlyList<(ulong Start, ulong End)> IovaRanges { get; } = new[] { (0UL, 0xfedfffffUL), (0xfef00000UL, 0x7fffffffffUL) };

        public int Map(nint va, ulong iova, ulong length)
        {
            Maps.Add((va, iova, length));
            return 0;
        }

        public int Unmap(ulong iova, ulong length)
        {
            Unmaps.Add((iova, length));
            return 0;
        }
    }

    [Fact]
    public void AllocatedMemoryIsRegisteredAndTranslates()
    {
        var space = new DmaSpace(IdentityDmaMapper.Instance);
        using var r = space.Allocate(10000);
        Assert.True(r.Size >= 10000);
        Assert.True(space.TryTranslate(r.Va + 100, 200, out ulong iova));
        Assert.Equal((ulong)r.Va + 100, iova); // IOVA = VA
        Assert.False(space.TryTranslate(r.Va + (nint)r.Size - 8, 16, out _)); // runs off the end
        Assert.Equal(r.Va + 4096, space.TranslateIova(r.Iova + 4096, 8));
        r.Dispose();
        Assert.False(space.TryTranslate(r.Va, 1, out _));
        Assert.Equal(0, space.RegionCount);
    }

    [Fact]
    public void ReservedMemoryIsReusedWithoutMappingCallsAndComesBackZeroed()
    {
        var mapper = new NarrowMapper();
        var space = new DmaSpace(mapper);
        space.Reserve(3 * 4096, 2, "test-reserve");
        Assert.Equal(2, mapper.Maps.Count);
        Assert.Empty(mapper.Unmaps); // the reserve keeps them mapped
        int maps = mapper.Maps.Count;

        // A reactor's channel: allocations of the reserved size make no mapping call and come back zeroed.
        var a = space.Allocate(3 * 4096 - 100);
        var b = space.Allocate(3 * 4096);
        Assert.Equal(maps, mapper.Maps.Count);
        Assert.Equal(2, space.CacheHits);
        Assert.True(space.TryTranslate(a.Va, 3 * 4096, out ulong iova) && iova == a.Iova);
        new Span<byte>((void*)a.Va, 3 * 4096).Fill(0xAB);
        a.Dispose();
        b.Dispose();
        Assert.Empty(mapper.Unmaps); // back into the reserve, still mapped
        using var c = space.Allocate(3 * 4096);
        Assert.Equal(maps, mapper.Maps.Count);
        Assert.True(new Span<byte>((void*)c.Va, 3 * 4096).IndexOfAnyExcept((byte)0) < 0, "reused DMA memory not zeroed");

        // A third of that size (beyond the reserve) and another size map and unmap as before.
        using (var d = space.Allocate(3 * 4096))
        {
        }

        using (var e = space.Allocate(4096))
        {
        }

        Assert.Equal(maps + 1, mapper.Maps.Count); // d came from the reserve (c and d: the two reserved), e is new
        Assert.Single(mapper.Unmaps);
    }

    [Fact]
    public void DisposedReservationShrinksTheReserveAndUnmapsItsIdleRegions()
    {
        var mapper = new NarrowMapper();
        var space = new DmaSpace(mapper);

        // Two owners (two controllers on the shared container) reserve the same size.
        var first = space.Reserve(3 * 4096, 2, "test-a");
        var second = space.Reserve(3 * 4096, 1, "test-b");
        Assert.Equal(3, mapper.Maps.Count);
        Assert.Equal(3, space.ReservedCount(3 * 4096));
        ulong each = space.AllocatedBytes / 3; // 12 KiB, or a 2 MiB hugepage where they are reserved
        Assert.True(each >= 3 * 4096);
        Assert.Equal(3 * each, space.AllocatedBytes);

        // One region is in use when the first owner goes: the two idle ones beyond the remaining reserve (1) go now...
        var inUse = space.Allocate(3 * 4096);
        first.Dispose();
        Assert.Equal(1, space.ReservedCount(3 * 4096));
        Assert.Single(mapper.Unmaps);
        Assert.Equal(2 * each, space.AllocatedBytes);
        first.Dispose(); // twice: nothing more
        Assert.Equal(1, space.ReservedCount(3 * 4096));

        // ...the one in use is kept when freed only while the reserve wants it (it does: the second owner's one).
        inUse.Dispose();
        Assert.Equal(2, mapper.Unmaps.Count);
        Assert.Equal(each, space.AllocatedBytes);

        // The last owner goes: nothing stays mapped, and a later free of that size unmaps at once.
        second.Dispose();
        Assert.Equal(0, space.ReservedCount(3 * 4096));
        Assert.Equal(3, mapper.Unmaps.Count);
        Assert.Equal(0UL, space.AllocatedBytes);
        Assert.Equal(0, space.RegionCount);
        using (var later = space.Allocate(3 * 4096))
        {
        }

        Assert.Equal(4, mapper.Unmaps.Count);
        Assert.Equal(0UL, space.AllocatedBytes);
    }

    [Fact]
    public void ReserveAgainAfterReleaseMapsNoMoreThanOneSet()
    {
        var mapper = new NarrowMapper();
        var space = new DmaSpace(mapper);
        ulong oneSet = 0;
        for (int i = 0; i < 5; i++)
        {
            // Attach, detach: the reserve never holds more than one owner's set.
            using var r = space.Reserve(4096, 4, "test-cycle");
            Assert.Equal(4, space.ReservedCount(4096));
            oneSet = i == 0 ? space.AllocatedBytes : oneSet;
            Assert.Equal(oneSet, space.AllocatedBytes);
            Assert.Equal(4, space.RegionCount);
        }

        Assert.Equal(0UL, space.AllocatedBytes);
        Assert.Equal(mapper.Maps.Count, mapper.Unmaps.Count);
    }

    [Fact]
    public void WithoutReserveFreedMemoryIsUnmapped()
    {
        var mapper = new NarrowMapper();
        var space = new DmaSpace(mapper);
        using (var a = space.Allocate(4096))
        {
        }

        Assert.Single(mapper.Unmaps);
        Assert.Equal(0, space.RegionCount);
    }

    [Fact]
    public void VfioMapsLargeRangesInPiecesAndUndoesAFailedOne()
    {
        Assert.Equal(4UL << 20, VfioContainer.ChunkBytes(4096));
        Assert.Equal(4UL << 20, VfioContainer.ChunkBytes(512UL << 20));
        Assert.True(VfioContainer.ChunkBytes(1UL << 40) * 512 >= 1UL << 40); // a 1 TiB guest: at most 512 mappings
        Assert.Equal(0UL, VfioContainer.ChunkBytes(1UL << 40) % (2UL << 20));

        var maps = new List<(nint Va, ulong Iova, ulong Len)>();
        var unmaps = new List<(ulong Iova, ulong Len)>();
        int Map(nint va, ulong iova, ulong len)
        {
            maps.Add((va, iova, len));
            return 0;
        }

        int Unmap(ulong iova, ulong len)
        {
            unmaps.Add((iova, len));
            return 0;
        }

        ulong length = (10UL << 20) + 8192; // 4 + 4 + 2 MiB + 8 KiB
        Assert.Equal(0, VfioContainer.MapInChunks(Map, Unmap, 0x10000000, 0x40000000, length));
        Assert.Equal(3, maps.Count);
        Assert.Equal((nint)0x10000000 + (4 << 20), maps[1].Va);
        Assert.Equal(0x40000000UL + (8UL << 20), maps[2].Iova);
        Assert.Equal((2UL << 20) + 8192, maps[2].Len);
        Assert.Empty(unmaps);

        // Unmapped in the same pieces.
        Assert.Equal(0, VfioContainer.UnmapInChunks(Unmap, 0x40000000, length));
        Assert.Equal(maps.Select(m => (m.Iova, m.Len)), unmaps);

        // The third piece fails: the two mapped before are undone, the error is returned.
        maps.Clear();
        unmaps.Clear();
        int FailThird(nint va, ulong iova, ulong len) => maps.Count == 2 ? -12 : Map(va, iova, len);
        Assert.Equal(-12, VfioContainer.MapInChunks(FailThird, Unmap, 0x10000000, 0x40000000, length));
        Assert.Equal([(0x40000000UL, 8UL << 20)], unmaps);
    }

    [Fact]
    public void NarrowIommuGetsAllocatedIovasInsideItsRanges()
    {
        var mapper = new NarrowMapper();
        var space = new DmaSpace(mapper);
        using var a = space.Allocate(8192);
        using var b = space.Allocate(8192);
        Assert.Equal(2, mapper.Maps.Count);
        foreach (var (va, iova, len) in mapper.Maps)
        {
            Assert.True(iova + len - 1 <= 0x7fffffffffUL, $"IOVA 0x{iova:x} outside the 39-bit space");
            Assert.NotEqual((ulong)va, iova);
        }

        Assert.True(space.TryTranslate(b.Va + 10, 4, out ulong iovaB));
        Assert.Equal(b.Iova + 10, iovaB);
        Assert.True(a.Iova + a.Size <= b.Iova || b.Iova + b.Size <= a.Iova, "IOVA ranges overlap");
    }

    [Fact]
    public void RegisterValidatesAlignmentOverlapAndUnregisterUnmaps()
    {
        var mapper = new NarrowMapper();
        var space = new DmaSpace(mapper);
        nint mem = (nint)System.Runtime.InteropServices.NativeMemory.AlignedAlloc(3 * 4096, 4096);
        try
        {
            Assert.Equal(-22, space.RegisterDmaMemory(mem + 1, 4096));
            Assert.Equal(-22, space.RegisterDmaMemory(mem, 100));
            Assert.Equal(0, space.RegisterDmaMemory(mem, 2 * 4096));
            Assert.Equal(-17, space.RegisterDmaMemory(mem + 4096, 2 * 4096));
            Assert.True(space.TryTranslate(mem + 4100, 8, out _));
            Assert.Equal(0, space.UnregisterDmaMemory(mem));
            Assert.Single(mapper.Unmaps);
            Assert.Equal(-2, space.UnregisterDmaMemory(mem));
            Assert.False(space.TryTranslate(mem + 4100, 8, out _));
        }
        finally
        {
            System.Runtime.InteropServices.NativeMemory.AlignedFree((void*)mem);
        }
    }

    [Fact]
    public void BufferPoolHandsOutDistinctBuffersAndDetectsForeignReturns()
    {
        var space = new DmaSpace(IdentityDmaMapper.Instance);
        using var pool = new DmaBufferPool(space, 4, 8192);
        var got = new HashSet<nint>();
        while (pool.TryGet(out nint va, out ulong iova))
        {
            Assert.Equal((ulong)va, iova);
            Assert.True(got.Add(va));
        }

        Assert.Equal(4, got.Count);
        Assert.Equal(0, pool.Available);
        Assert.Throws<ArgumentException>(() => pool.Return(got.First() + 1));
        foreach (var va in got)
        {
            pool.Return(va);
        }

        Assert.Throws<ArgumentException>(() => pool.Return(got.First()));
    }

    private static (int Rc, ulong Prp1, ulong Prp2, ulong[] List) Build(DmaSpace space, NvmeIoVec[] iovs)
    {
        var list = new ulong[512];
        fixed (ulong* l = list)
        {
            int rc = Prp.Build(space, iovs, 4096, l, 0x5000_0000, 512, out ulong p1, out ulong p2);
            return (rc, p1, p2, list);
        }
    }

    [Fact]
    public void PrpSinglePageTwoPagesAndList()
    {
        var space = new DmaSpace(IdentityDmaMapper.Instance);
        using var r = space.Allocate(64 * 1024);
        ulong b = (ulong)r.Va;

        var (rc, p1, p2, _) = Build(space, new[] { new NvmeIoVec(r.Va, 4096) });
        Assert.Equal((0, b, 0UL), (rc, p1, p2));

        (rc, p1, p2, _) = Build(space, new[] { new NvmeIoVec(r.Va + 512, 4096) }); // crosses into a second page
        Assert.Equal((0, b + 512, b + 4096), (rc, p1, p2));

        (rc, p1, p2, var list) = Build(space, new[] { new NvmeIoVec(r.Va + 512, 3 * 4096) }); // 4 pages touched
        Assert.Equal(0, rc);
        Assert.Equal(b + 512, p1);
        Assert.Equal(0x5000_0000UL, p2);
        Assert.Equal(new[] { b + 4096, b + 8192, b + 12288 }, list[..3]);
    }

    [Fact]
    public void PrpScatterGatherFollowsTheRules()
    {
        var space = new DmaSpace(IdentityDmaMapper.Instance);
        using var r = space.Allocate(64 * 1024);
        ulong b = (ulong)r.Va;

        // Unaligned head ending on a page boundary, a whole page elsewhere, a short tail: fine.
        var iovs = new[] { new NvmeIoVec(r.Va + 3584, 512), new NvmeIoVec(r.Va + 8 * 4096, 4096), new NvmeIoVec(r.Va + 4 * 4096, 100 * 4) };
        var (rc, p1, p2, list) = Build(space, iovs);
        Assert.Equal(0, rc);
        Assert.Equal(b + 3584, p1);
        Assert.Equal(0x5000_0000UL, p2);
        Assert.Equal(new[] { b + (8 * 4096), b + (4 * 4096) }, list[..2]);
        Assert.True(Prp.IsCompatible(iovs));

        // A middle element starting inside a page: not PRP-compatible.
        var bad1 = new[] { new NvmeIoVec(r.Va, 4096), new NvmeIoVec(r.Va + 8192 + 8, 4088) };
        Assert.Equal(-22, Build(space, bad1).Rc);
        Assert.False(Prp.IsCompatible(bad1));

        // A first element not ending on a page boundary followed by another: not compatible.
        var bad2 = new[] { new NvmeIoVec(r.Va, 2048), new NvmeIoVec(r.Va + 8192, 2048) };
        Assert.Equal(-22, Build(space, bad2).Rc);
        Assert.False(Prp.IsCompatible(bad2));

        // Not dword aligned.
        Assert.Equal(-22, Build(space, new[] { new NvmeIoVec(r.Va + 2, 512) }).Rc);

        // Memory that is not registered for DMA.
        var heap = new byte[8192];
        fixed (byte* h = heap)
        {
            Assert.Equal(-14, Build(space, new[] { new NvmeIoVec((nint)h, 512) }).Rc);
        }
    }

    [Fact]
    public void PrpListCapacityIsEnforced()
    {
        var space = new DmaSpace(IdentityDmaMapper.Instance);
        using var r = space.Allocate(4 * 1024 * 1024);
        var list = new ulong[4];
        fixed (ulong* l = list)
        {
            var iov = new[] { new NvmeIoVec(r.Va, 5 * 4096) };
            Assert.Equal(0, Prp.Build(space, iov, 4096, l, 0x1000, 4, out _, out _));
            iov[0] = new NvmeIoVec(r.Va, 6 * 4096);
            Assert.Equal(-22, Prp.Build(space, iov, 4096, l, 0x1000, 4, out _, out _));
        }
    }
}
