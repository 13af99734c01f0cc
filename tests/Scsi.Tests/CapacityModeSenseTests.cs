using VhostBackend.BdevNull;

namespace VhostBackend.Scsi.Tests;

public sealed class CapacityModeSenseTests : IAsyncLifetime
{
    private readonly ScsiHarness _h = new();

    public async Task InitializeAsync()
    {
        _h.AddMalloc("Malloc0", 2048, 4096);
        await _h.AttachAsync("Malloc0");
        _h.AddMalloc("RoDisk", 100, 512);
        await _h.AttachAsync("RoDisk", lunId: 1, readOnly: true);
    }

    public async Task DisposeAsync() => await _h.DisposeAsync();

    [Fact]
    public async Task ReadCapacity10_LastLbaAndBlockSize()
    {
        var r = await _h.RunIn(Cdb.ReadCapacity10(), 8);
        r.AssertGood();
        Assert.Equal(2047u, Cdb.U32(r.Data, 0));
        Assert.Equal(4096u, Cdb.U32(r.Data, 4));
    }

    [Fact]
    public async Task ReadCapacity10_SaturatesForHugeDisks()
    {
        var big = new NullBdev("Huge", 0x1_0000_0001UL, 512);
        _h.Manager.Register(big);
        await _h.AttachAsync("Huge", lunId: 2);
        var r = await _h.RunIn(Cdb.ReadCapacity10(), 8, lun: 2);
        r.AssertGood();
        Assert.Equal(0xFFFF_FFFFu, Cdb.U32(r.Data, 0));

        r = await _h.RunIn(Cdb.ReadCapacity16(), 32, lun: 2);
        r.AssertGood();
        Assert.Equal(0x1_0000_0000UL, Cdb.U64(r.Data, 0));
    }

    [Fact]
    public async Task ReadCapacity16_LbpmeWhenUnmapSupported()
    {
        var r = await _h.RunIn(Cdb.ReadCapacity16(), 32);
        r.AssertGood();
        Assert.Equal(2047UL, Cdb.U64(r.Data, 0));
        Assert.Equal(4096u, Cdb.U32(r.Data, 8));
        Assert.Equal(0x80, r.Data[14] & 0x80); // LBPME
        Assert.Equal(32UL, r.DataTransferred);

        // Read-only LUN: no unmap, no LBPME.
        r = await _h.RunIn(Cdb.ReadCapacity16(), 32, lun: 1);
        r.AssertGood();
        Assert.Equal(0, r.Data[14] & 0x80);

        // Allocation length truncates.
        r = await _h.RunIn(Cdb.ReadCapacity16(12), 32);
        Assert.Equal(12UL, r.DataTransferred);
        Assert.Equal(20UL, r.Residual);
    }

    [Fact]
    public async Task ServiceActionIn_OtherServiceAction_IsInvalidField()
    {
        var c = Cdb.ReadCapacity16();
        c[1] = 0x11;
        (await _h.RunIn(c, 32)).AssertSense(SenseKey.IllegalRequest, 0x24);
    }

    [Fact]
    public async Task ModeSense6_Caching_WithBlockDescriptor()
    {
        var r = await _h.RunIn(Cdb.ModeSense6(0x08), 255);
        r.AssertGood();
        var d = r.Data;
        int total = 4 + 8 + 20;
        Assert.Equal(total - 1, d[0]); // mode data length
        Assert.Equal(0, d[1]);
        Assert.Equal(0x10, d[2]); // DPOFUA, not write protected
        Assert.Equal(8, d[3]); // block descriptor length
        Assert.Equal(2048u, Cdb.U32(d, 4)); // number of blocks
        Assert.Equal(4096u, Cdb.U32(d, 8) & 0xFFFFFF); // block length
        Assert.Equal(0x08, d[12]);
        Assert.Equal(0x12, d[13]);
        Assert.Equal(0, d[14] & 0x04); // WCE: malloc has no volatile cache
        Assert.Equal((ulong)total, r.DataTransferred);
    }

    [Fact]
    public async Task ModeSense6_HeaderOnly_ReportsFullLength()
    {
        // Linux's sd first asks for the 4-byte header of page 0x3F to learn the length and the WP bit.
        var r = await _h.RunIn(Cdb.ModeSense6(0x3F, alloc: 4), 4);
        r.AssertGood();
        Assert.Equal(4 + 8 + 20 + 12 + 12 - 1, r.Data[0]);
        Assert.Equal(4UL, r.DataTransferred);
    }

    [Fact]
    public async Task ModeSense6_AllPages_Dbd_InOrder()
    {
        var r = await _h.RunIn(Cdb.ModeSense6(0x3F, dbd: true), 255);
        r.AssertGood();
        var d = r.Data;
        Assert.Equal(0, d[3]);
        Assert.Equal(0x08, d[4]);
        Assert.Equal(0x12, d[5]);
        Assert.Equal(0x0A, d[24]);
        Assert.Equal(0x0A, d[25]);
        Assert.Equal(0x10, d[27]); // control: QAM unrestricted
        Assert.Equal(0x1C, d[36]);
        Assert.Equal(0x0A, d[37]);
        Assert.Equal(0x08, d[38] & 0x08); // DEXCPT
        Assert.Equal(4 + 20 + 12 + 12 - 1, d[0]);
    }

    [Fact]
    public async Task ModeSense10_LongLbaDescriptor()
    {
        var r = await _h.RunIn(Cdb.ModeSense10(0x0A, llbaa: true), 512);
        r.AssertGood();
        var d = r.Data;
        int total = 8 + 16 + 12;
        Assert.Equal(total - 2, Cdb.U16(d, 0));
        Assert.Equal(1, d[4] & 1); // LONGLBA
        Assert.Equal(16, Cdb.U16(d, 6));
        Assert.Equal(2048UL, Cdb.U64(d, 8));
        Assert.Equal(4096u, Cdb.U32(d, 20));
        Assert.Equal(0x0A, d[24]);
    }

    [Fact]
    public async Task ModeSense_ChangeableValuesAreZero_SavedRejected_UnknownPageRejected()
    {
        var r = await _h.RunIn(Cdb.ModeSense6(0x1C, dbd: true, pc: 1), 255);
        r.AssertGood();
        Assert.Equal(0x1C, r.Data[4]);
        Assert.All(r.Data[6..16], b => Assert.Equal(0, b));

        (await _h.RunIn(Cdb.ModeSense6(0x08, pc: 3), 255)).AssertSense(SenseKey.IllegalRequest, 0x39);
        (await _h.RunIn(Cdb.ModeSense6(0x01), 255)).AssertSense(SenseKey.IllegalRequest, 0x24);
        (await _h.RunIn(Cdb.ModeSense6(0x0A, subpage: 0x05), 255)).AssertSense(SenseKey.IllegalRequest, 0x24);
    }

    [Fact]
    public async Task ReadOnlyLun_WriteProtectBit_AndDataProtectSense()
    {
        var r = await _h.RunIn(Cdb.ModeSense6(0x3F), 255, lun: 1);
        r.AssertGood();
        Assert.Equal(0x80, r.Data[2] & 0x80);

        r = await _h.RunIn(Cdb.ModeSense10(0x08), 512, lun: 1);
        Assert.Equal(0x80, r.Data[3] & 0x80);

        var w = await _h.RunOut(Cdb.Rw10(true, 0, 1), new byte[512], lun: 1);
        w.AssertSense(SenseKey.DataProtect, 0x27);
        (await _h.RunOut(Cdb.WriteSame16(0, 1), new byte[512], lun: 1)).AssertSense(SenseKey.DataProtect, 0x27);
        (await _h.RunOut(Cdb.Unmap(24), Cdb.UnmapParams((0, 1)), lun: 1)).AssertSense(SenseKey.DataProtect, 0x27);

        // Reads still work.
        (await _h.RunIn(Cdb.Rw10(false, 0, 1), 512, lun: 1)).AssertGood();
    }

    [Fact]
    public async Task ModeSelect_AcceptsCurrentCachingPage_RejectsChange()
    {
        // Take MODE SENSE(10) caching output, turn it into a MODE SELECT(10) parameter list (as sd's cache_type store does).
        var sense = await _h.RunIn(Cdb.ModeSense10(0x08, dbd: true), 512);
        sense.AssertGood();
        var p = sense.Data[..(8 + 20)];
        p[0] = p[1] = 0; // mode data length is reserved in MODE SELECT
        p[3] = 0;
        byte[] sel = [ScsiOp.ModeSelect10, 0x10, 0, 0, 0, 0, 0, 0, (byte)p.Length, 0];
        var r = await _h.RunOut(sel, p);
        r.AssertGood();
        Assert.Equal((ulong)p.Length, r.DataTransferred);

        p[8 + 2] |= 0x04; // ask for WCE on a device without a write cache
        (await _h.RunOut(sel, p)).AssertSense(SenseKey.IllegalRequest, 0x26);

        // Truncated page.
        p[8 + 2] &= 0xFB;
        byte[] shortSel = [ScsiOp.ModeSelect10, 0x10, 0, 0, 0, 0, 0, 0, 12, 0];
        (await _h.RunOut(shortSel, p[..12])).AssertSense(SenseKey.IllegalRequest, 0x1A);
    }
}
