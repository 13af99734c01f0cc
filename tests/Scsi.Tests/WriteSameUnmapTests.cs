namespace VhostBackend.Scsi.Tests;

public sealed class WriteSameUnmapTests : IAsyncLifetime
{
    private readonly ScsiHarness _h = new();

    public async Task InitializeAsync()
    {
        _h.AddMalloc("Malloc0", 4096, 512);
        await _h.AttachAsync("Malloc0");
    }

    public async Task DisposeAsync() => await _h.DisposeAsync();

    private async Task Fill(uint lba, ushort blocks, byte value)
    {
        var d = new byte[blocks * 512];
        Array.Fill(d, value);
        (await _h.RunOut(Cdb.Rw10(true, lba, blocks), d)).AssertGood();
    }

    private async Task<byte[]> Read(uint lba, ushort blocks)
    {
        var r = await _h.RunIn(Cdb.Rw10(false, lba, blocks), blocks * 512);
        r.AssertGood();
        return r.Data;
    }

    [Fact]
    public async Task WriteSame16_ReplicatesNonZeroBlock_AcrossChunks()
    {
        var block = new byte[512];
        for (int i = 0; i < 512; i++)
        {
            block[i] = (byte)(i * 7);
        }

        await Fill(0, 4, 0x11);
        var r = await _h.RunOut(Cdb.WriteSame16(1, 600), block, segments: 3);
        r.AssertGood();
        Assert.Equal(512UL, r.DataTransferred);
        var d = await Read(0, 602);
        Assert.All(d[..512], b => Assert.Equal(0x11, b));
        for (int blk = 1; blk <= 600; blk++)
        {
            Assert.Equal(block, d[(blk * 512)..((blk + 1) * 512)]);
        }

        Assert.All(d[(601 * 512)..], b => Assert.Equal(0, b));
    }

    [Fact]
    public async Task WriteSame10_ZeroBlock_UsesWriteZeroes()
    {
        await Fill(10, 8, 0xAB);
        var bdev = _h.Manager.Find("Malloc0")!;
        long before = bdev.GetStats().NumWriteZeroesOps;
        (await _h.RunOut(Cdb.WriteSame10(12, 4), new byte[512])).AssertGood();
        Assert.Equal(before + 1, bdev.GetStats().NumWriteZeroesOps);
        var d = await Read(10, 8);
        Assert.All(d[..1024], b => Assert.Equal(0xAB, b));
        Assert.All(d[1024..3072], b => Assert.Equal(0, b));
        Assert.All(d[3072..], b => Assert.Equal(0xAB, b));
    }

    [Fact]
    public async Task WriteSame_UnmapBit_Unmaps()
    {
        await Fill(20, 4, 0xCD);
        var bdev = _h.Manager.Find("Malloc0")!;
        long before = bdev.GetStats().NumUnmapOps;
        (await _h.RunOut(Cdb.WriteSame16(20, 4, unmap: true), new byte[512])).AssertGood();
        Assert.Equal(before + 1, bdev.GetStats().NumUnmapOps);
        Assert.All(await Read(20, 4), b => Assert.Equal(0, b)); // malloc zeroes unmapped blocks

        // NDOB: no data-out buffer.
        await Fill(30, 2, 0xEE);
        (await _h.RunIn(Cdb.WriteSame16(30, 2, ndob: true), 0)).AssertGood();
        Assert.All(await Read(30, 2), b => Assert.Equal(0, b));
    }

    [Fact]
    public async Task WriteSame_BadFields()
    {
        (await _h.RunOut(Cdb.WriteSame16(0, 0), new byte[512])).AssertSense(SenseKey.IllegalRequest, 0x24); // WSNZ
        var lbdata = Cdb.WriteSame10(0, 1);
        lbdata[1] = 0x02;
        (await _h.RunOut(lbdata, new byte[512])).AssertSense(SenseKey.IllegalRequest, 0x24);
        (await _h.RunOut(Cdb.WriteSame16(4095, 2), new byte[512])).AssertSense(SenseKey.IllegalRequest, 0x21);
        (await _h.RunOut(Cdb.WriteSame16(0, 1), new byte[100])).AssertSense(SenseKey.IllegalRequest, 0x24); // short data-out
    }

    [Fact]
    public async Task Unmap_MultipleDescriptors()
    {
        await Fill(0, 64, 0x5A);
        var p = Cdb.UnmapParams((2, 3), (10, 0), (40, 8));
        var r = await _h.RunOut(Cdb.Unmap((ushort)p.Length), p, segments: 3);
        r.AssertGood();
        Assert.Equal((ulong)p.Length, r.DataTransferred);
        var d = await Read(0, 64);
        for (int blk = 0; blk < 64; blk++)
        {
            bool unmapped = blk is >= 2 and < 5 or >= 40 and < 48;
            Assert.Equal(unmapped ? 0 : 0x5A, d[blk * 512]);
        }
    }

    [Fact]
    public async Task Unmap_ZeroParameterLength_IsNoop()
    {
        (await _h.RunIn(Cdb.Unmap(0), 0)).AssertGood();
    }

    [Fact]
    public async Task Unmap_MalformedLists()
    {
        // Parameter list length shorter than the header.
        (await _h.RunOut(Cdb.Unmap(6), new byte[6])).AssertSense(SenseKey.IllegalRequest, 0x1A);

        // Block descriptor length not a multiple of 16.
        var p = Cdb.UnmapParams((0, 1));
        Cdb.Be16(p, 2, 12);
        (await _h.RunOut(Cdb.Unmap((ushort)p.Length), p)).AssertSense(SenseKey.IllegalRequest, 0x1A);

        // Block descriptor length beyond the parameter list.
        p = Cdb.UnmapParams((0, 1));
        Cdb.Be16(p, 2, 32);
        (await _h.RunOut(Cdb.Unmap((ushort)p.Length), p)).AssertSense(SenseKey.IllegalRequest, 0x1A);

        // UNMAP DATA LENGTH beyond the parameter list.
        p = Cdb.UnmapParams((0, 1));
        Cdb.Be16(p, 0, 100);
        (await _h.RunOut(Cdb.Unmap((ushort)p.Length), p)).AssertSense(SenseKey.IllegalRequest, 0x1A);

        // Parameter list length larger than the data-out buffer.
        p = Cdb.UnmapParams((0, 1));
        (await _h.RunOut(Cdb.Unmap(200), p)).AssertSense(SenseKey.IllegalRequest, 0x24);

        // Descriptor out of range: nothing is unmapped (validated before any I/O).
        await Fill(0, 1, 0x77);
        p = Cdb.UnmapParams((0, 1), (4000, 200));
        (await _h.RunOut(Cdb.Unmap((ushort)p.Length), p)).AssertSense(SenseKey.IllegalRequest, 0x21);
        Assert.Equal(0x77, (await Read(0, 1))[0]);

        // Too many descriptors.
        var many = Enumerable.Range(0, 257).Select(i => ((ulong)i, 1u)).ToArray();
        p = Cdb.UnmapParams(many);
        var r = await _h.RunOut(Cdb.Unmap((ushort)p.Length), p);
        r.AssertSense(SenseKey.IllegalRequest, 0x26);
        Assert.Equal(0x80, r.Sense[15]); // SKSV, C/D = 0 (parameter list)

        // ANCHOR is not supported.
        var anchored = Cdb.Unmap(24);
        anchored[1] = 1;
        (await _h.RunOut(anchored, Cdb.UnmapParams((0, 1)))).AssertSense(SenseKey.IllegalRequest, 0x24);
    }

    [Fact]
    public async Task Unmap_TotalOverMaximumLbaCount_IsInvalidParameter()
    {
        _h.AddMalloc("Small", 256, 512);
        await _h.AttachAsync("Small", lunId: 1, options: new ScsiLunOptions { MaxUnmapLbaCount = 16 });
        var p = Cdb.UnmapParams((0, 10), (20, 10));
        (await _h.RunOut(Cdb.Unmap((ushort)p.Length), p, lun: 1)).AssertSense(SenseKey.IllegalRequest, 0x26);
    }
}
