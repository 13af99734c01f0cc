using System.Text;

namespace VhostBackend.Scsi.Tests;

public sealed class InquiryTests : IAsyncLifetime
{
    private readonly ScsiHarness _h = new();
    private ScsiLun _lun = null!;

    public async Task InitializeAsync()
    {
        _h.AddMalloc("Malloc0", 2048, 512);
        _lun = await _h.AttachAsync("Malloc0");
    }

    public async Task DisposeAsync() => await _h.DisposeAsync();

    [Fact]
    public async Task StandardInquiry_HasLinuxRelevantFields()
    {
        var r = await _h.RunIn(Cdb.Inquiry(false, 0, 96), 96);
        r.AssertGood();
        var d = r.Data;
        Assert.Equal(96UL, r.DataTransferred);
        Assert.Equal(0x00, d[0]); // PQ 0, direct access
        Assert.Equal(0x00, d[1]); // not removable
        Assert.Equal(0x06, d[2]); // SPC-4
        Assert.Equal(0x02, d[3] & 0x0F); // response data format 2
        Assert.Equal(0x10, d[3] & 0x10); // HISUP
        Assert.Equal(91, d[4]); // additional length
        Assert.Equal(0x02, d[7] & 0x02); // CMDQUE
        Assert.Equal("VHOSTBE ", Encoding.ASCII.GetString(d, 8, 8));
        Assert.Equal("Malloc disk     ", Encoding.ASCII.GetString(d, 16, 16));
        Assert.Equal("0001", Encoding.ASCII.GetString(d, 32, 4));
        Assert.Equal(0x0460, Cdb.U16(d, 60)); // SPC-4 version descriptor
        Assert.Equal(0x04C0, Cdb.U16(d, 62)); // SBC-3
    }

    [Fact]
    public async Task StandardInquiry_TruncatesToAllocationLengthAndReportsResidual()
    {
        var r = await _h.RunIn(Cdb.Inquiry(false, 0, 36), 64);
        r.AssertGood();
        Assert.Equal(36UL, r.DataTransferred);
        Assert.Equal(28UL, r.Residual);
        Assert.Equal(91, r.Data[4]); // still announces the full length
        Assert.All(r.Data[36..], b => Assert.Equal(0, b));

        // Buffer smaller than the allocation length: capacity wins.
        r = await _h.RunIn(Cdb.Inquiry(false, 0, 255), 5);
        r.AssertGood();
        Assert.Equal(5UL, r.DataTransferred);
        Assert.Equal(0UL, r.Residual);
    }

    [Fact]
    public async Task Inquiry_PageCodeWithoutEvpd_IsInvalidField()
    {
        var r = await _h.RunIn(Cdb.Inquiry(false, 0x80, 96), 96);
        r.AssertSense(SenseKey.IllegalRequest, 0x24);
        Assert.Equal(0xC0, r.Sense[15]); // SKSV, C/D = CDB
        Assert.Equal(2, Cdb.U16(r.Sense, 16)); // field pointer: byte 2
    }

    [Fact]
    public async Task Vpd00_ListsSupportedPagesAscending()
    {
        var r = await _h.RunIn(Cdb.Inquiry(true, 0x00, 255), 255);
        r.AssertGood();
        var d = r.Data;
        Assert.Equal(0x00, d[0]);
        Assert.Equal(0x00, d[1]);
        int n = Cdb.U16(d, 2);
        Assert.Equal(new byte[] { 0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2 }, d[4..(4 + n)]);
        Assert.Equal((ulong)(4 + n), r.DataTransferred);
    }

    [Fact]
    public async Task Vpd_HeaderOnlyAllocation_ReturnsFullPageLength()
    {
        // Linux's scsi_get_vpd_size asks for 4 bytes first and sizes the buffer from the page length.
        var r = await _h.RunIn(Cdb.Inquiry(true, 0xB0, 4), 4);
        r.AssertGood();
        Assert.Equal(new byte[] { 0x00, 0xB0, 0x00, 0x3C }, r.Data);
    }

    [Fact]
    public async Task Vpd80_SerialIsBdevName()
    {
        var r = await _h.RunIn(Cdb.Inquiry(true, 0x80, 255), 255);
        r.AssertGood();
        Assert.Equal(0x80, r.Data[1]);
        int n = Cdb.U16(r.Data, 2);
        Assert.Equal("Malloc0", Encoding.ASCII.GetString(r.Data, 4, n));
    }

    [Fact]
    public async Task Vpd83_NaaAndT10DesignatorsFromUuid()
    {
        var r = await _h.RunIn(Cdb.Inquiry(true, 0x83, 255), 255);
        r.AssertGood();
        var d = r.Data;
        Assert.Equal(0x83, d[1]);
        int len = Cdb.U16(d, 2);
        Assert.Equal(12 + 48, len);

        // NAA designator: binary, LU association, type 3, 8 bytes, NAA 3 (locally assigned).
        Assert.Equal(0x01, d[4]);
        Assert.Equal(0x03, d[5]);
        Assert.Equal(8, d[7]);
        Assert.Equal(3, d[8] >> 4);

        // T10 vendor id designator: ASCII, LU association, type 1, vendor + UUID text.
        Assert.Equal(0x02, d[16]);
        Assert.Equal(0x01, d[17]);
        Assert.Equal(44, d[19]);
        Assert.Equal("VHOSTBE ", Encoding.ASCII.GetString(d, 20, 8));
        Assert.Equal(_lun.Bdev.Uuid.ToString(), Encoding.ASCII.GetString(d, 28, 36));

        // Stable: the same bdev gives the same NAA.
        var again = await _h.RunIn(Cdb.Inquiry(true, 0x83, 255), 255);
        Assert.Equal(d[8..16], again.Data[8..16]);
    }

    [Fact]
    public async Task VpdB0_BlockLimits()
    {
        var r = await _h.RunIn(Cdb.Inquiry(true, 0xB0, 64), 64);
        r.AssertGood();
        var d = r.Data;
        Assert.Equal(0x3C, Cdb.U16(d, 2));
        Assert.Equal(0x01, d[4] & 0x01); // WSNZ
        Assert.Equal(8, Cdb.U16(d, 6)); // optimal granularity: 4 KiB of 512-byte blocks
        Assert.Equal((4u << 20) / 512, Cdb.U32(d, 8)); // max transfer length
        Assert.Equal(4u * 1024 * 1024, Cdb.U32(d, 20)); // max unmap LBA count
        Assert.Equal(256u, Cdb.U32(d, 24)); // max unmap descriptors
        Assert.Equal(4UL * 1024 * 1024, Cdb.U64(d, 36)); // max write same length
    }

    [Fact]
    public async Task VpdB1_NonRotating()
    {
        var r = await _h.RunIn(Cdb.Inquiry(true, 0xB1, 64), 64);
        r.AssertGood();
        Assert.Equal(0xB1, r.Data[1]);
        Assert.Equal(0x3C, Cdb.U16(r.Data, 2));
        Assert.Equal(1, Cdb.U16(r.Data, 4));
    }

    [Fact]
    public async Task VpdB2_LogicalBlockProvisioning()
    {
        var r = await _h.RunIn(Cdb.Inquiry(true, 0xB2, 64), 64);
        r.AssertGood();
        Assert.Equal(0xB2, r.Data[1]);
        Assert.Equal(4, Cdb.U16(r.Data, 2));
        Assert.Equal(0x80, r.Data[5] & 0x80); // LBPU
        Assert.Equal(0x40, r.Data[5] & 0x40); // LBPWS
        Assert.Equal(0x20, r.Data[5] & 0x20); // LBPWS10
        Assert.Equal(8UL, r.DataTransferred);
    }

    [Fact]
    public async Task UnsupportedVpdPage_IsInvalidField()
    {
        var r = await _h.RunIn(Cdb.Inquiry(true, 0x89, 255), 255);
        r.AssertSense(SenseKey.IllegalRequest, 0x24);
    }

    [Fact]
    public async Task UnknownLun_InquiryHasQualifier3_OtherCommandsLunNotSupported()
    {
        var r = await _h.RunIn(Cdb.Inquiry(false, 0, 96), 96, lun: 5);
        r.AssertGood();
        Assert.Equal(0x7F, r.Data[0]);

        r = await _h.RunIn(Cdb.Tur(), 0, lun: 5);
        r.AssertSense(SenseKey.IllegalRequest, 0x25);

        r = await _h.RunIn(Cdb.RequestSense(), 252, lun: 5);
        r.AssertGood();
        Assert.Equal(0x05, r.Data[2] & 0x0F);
        Assert.Equal(0x25, r.Data[12]);
    }

    [Fact]
    public async Task ReportLuns_ListsAttachedLuns()
    {
        _h.AddMalloc("Malloc1", 64, 512);
        await _h.AttachAsync("Malloc1", lunId: 3);
        var r = await _h.RunIn(Cdb.ReportLuns(), 4096);
        r.AssertGood();
        Assert.Equal(16u, Cdb.U32(r.Data, 0));
        Assert.Equal(new byte[8], r.Data[8..16]);
        Assert.Equal(new byte[] { 0, 3, 0, 0, 0, 0, 0, 0 }, r.Data[16..24]);
        Assert.Equal(24UL, r.DataTransferred);

        // SELECT REPORT 1 (well-known LUs only): empty list.
        r = await _h.RunIn(Cdb.ReportLuns(select: 1), 4096);
        r.AssertGood();
        Assert.Equal(0u, Cdb.U32(r.Data, 0));

        // Reserved SELECT REPORT and an allocation length under 16 are rejected.
        (await _h.RunIn(Cdb.ReportLuns(select: 0x7), 4096)).AssertSense(SenseKey.IllegalRequest, 0x24);
        (await _h.RunIn(Cdb.ReportLuns(alloc: 8), 4096)).AssertSense(SenseKey.IllegalRequest, 0x24);

        // Also answered when addressed to a LUN that does not exist.
        r = await _h.RunIn(Cdb.ReportLuns(), 4096, lun: 9);
        r.AssertGood();
        Assert.Equal(16u, Cdb.U32(r.Data, 0));
    }

    [Fact]
    public async Task TestUnitReady_StartStop_AreGood()
    {
        (await _h.RunIn(Cdb.Tur(), 0)).AssertGood();
        (await _h.RunIn([ScsiOp.StartStopUnit, 0, 0, 0, 1, 0], 0)).AssertGood();
    }

    [Fact]
    public async Task UnsupportedOpcodes_InvalidCommandOperationCode()
    {
        foreach (byte op in new byte[] { ScsiOp.PersistentReserveIn, ScsiOp.PersistentReserveOut, ScsiOp.CompareAndWrite, 0xC5, ScsiOp.Reserve6 })
        {
            var cdb = new byte[16];
            cdb[0] = op;
            var r = await _h.RunIn(cdb, 64);
            r.AssertSense(SenseKey.IllegalRequest, 0x20);
            Assert.Equal(0UL, r.DataTransferred);
        }

        // REPORT SUPPORTED OPERATION CODES: MAINTENANCE IN is known, the service action is not.
        var rsoc = new byte[12];
        rsoc[0] = ScsiOp.MaintenanceIn;
        rsoc[1] = ScsiOp.SaReportSupportedOpCodes;
        (await _h.RunIn(rsoc, 512)).AssertSense(SenseKey.IllegalRequest, 0x24);
    }

    [Fact]
    public async Task RequestSense_NoPendingCondition_IsNoSense()
    {
        var r = await _h.RunIn(Cdb.RequestSense(18), 18);
        r.AssertGood();
        Assert.Equal(0x70, r.Data[0]);
        Assert.Equal(0, r.Data[2]);
        Assert.Equal(0, r.Data[12]);

        r = await _h.RunIn(Cdb.RequestSense(8, desc: true), 8);
        r.AssertGood();
        Assert.Equal(0x72, r.Data[0]);
    }

    [Fact]
    public async Task ShortCdbsAndRandomGarbage_NeverCrashAndAlwaysComplete()
    {
        // A 6-byte CDB carrying 16-byte opcodes: decoded against the zero-padded buffer.
        foreach (byte op in new byte[] { ScsiOp.Read16, ScsiOp.Write16, ScsiOp.WriteSame16, ScsiOp.ServiceActionIn16, ScsiOp.Verify16, ScsiOp.SynchronizeCache16, ScsiOp.Unmap, ScsiOp.ModeSense10, ScsiOp.ReportLuns })
        {
            var r = await _h.RunIn([op, 0, 0, 0, 0, 0], 512);
            Assert.True(r.Status is ScsiStatus.Good or ScsiStatus.CheckCondition);
        }

        var rnd = new Random(1234);
        for (int i = 0; i < 3000; i++)
        {
            var cdb = new byte[rnd.Next(1, 33)];
            rnd.NextBytes(cdb);
            var data = new byte[rnd.Next(0, 3) * 512];
            rnd.NextBytes(data);
            var dir = data.Length == 0 ? ScsiDataDirection.None : (rnd.Next(2) == 0 ? ScsiDataDirection.ToDevice : ScsiDataDirection.FromDevice);
            var r = await _h.Run(cdb, dir, data, rnd.Next(3) == 0 ? 1 : 0, rnd.Next(1, 4), 0).WaitAsync(TimeSpan.FromSeconds(5));
            Assert.True(r.Status is ScsiStatus.Good or ScsiStatus.CheckCondition, $"status {r.Status} for {Convert.ToHexString(cdb)}");
            Assert.True(r.DataTransferred <= (ulong)data.Length);
        }
    }
}
