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
