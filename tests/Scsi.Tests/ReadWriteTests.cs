using VhostBackend.Bdev;
using VhostBackend.BdevMalloc;
using VhostBackend.BdevNull;

namespace VhostBackend.Scsi.Tests;

public sealed class ReadWriteTests : IAsyncLifetime
{
    private readonly ScsiHarness _h = new();
    private MallocBdev _malloc = null!;

    public async Task InitializeAsync()
    {
        _malloc = _h.AddMalloc("Malloc0", 4096, 512);
        await _h.AttachAsync("Malloc0");
    }

    public async Task DisposeAsync() => await _h.DisposeAsync();

    private static byte[] Pattern(int length, int seed)
    {
        var b = new byte[length];
        new Random(seed).NextBytes(b);
        return b;
    }

    [Theory]
    [InlineData(1)]
    [InlineData(3)]
    [InlineData(7)]
    public async Task Write10Read10_RoundTrip_MultiIovec(int segments)
    {
        var data = Pattern(8 * 512, segments);
        var w = await _h.RunOut(Cdb.Rw10(true, 100, 8), data, segments: segments);
        w.AssertGood();
        Assert.Equal(4096UL, w.DataTransferred);
        Assert.Equal(0UL, w.Residual);

        var r = await _h.RunIn(Cdb.Rw10(false, 100, 8), 4096, segments: segments + 2);
        r.AssertGood();
        Assert.Equal(data, r.Data);
    }

    [Fact]
    public async Task AllCdbSizes_AddressTheSameBlocks()
    {
        var a = Pattern(512, 1);
        var b = Pattern(512, 2);
        var c = Pattern(1024, 3);
        (await _h.RunOut(Cdb.Rw6(true, 0x0ABC, 1), a)).AssertGood();
        (await _h.RunOut(Cdb.Rw12(true, 10, 1), b)).AssertGood();
        (await _h.RunOut(Cdb.Rw16(true, 4094, 2), c)).AssertGood();

        Assert.Equal(a, (await _h.RunIn(Cdb.Rw16(false, 0x0ABC, 1), 512)).Data);
        Assert.Equal(b, (await _h.RunIn(Cdb.Rw6(false, 10, 1), 512)).Data);
        Assert.Equal(c, (await _h.RunIn(Cdb.Rw12(false, 4094, 2), 1024)).Data);
    }

    [Fact]
    public async Task Read_LargerBuffer_ReportsResidual()
    {
        var r = await _h.RunIn(Cdb.Rw10(false, 0, 2), 4096, segments: 3);
        r.AssertGood();
        Assert.Equal(1024UL, r.DataTransferred);
        Assert.Equal(3072UL, r.Residual);
    }

    [Fact]
    public async Task Read_BufferTooSmallOrWrongDirection_IsRejected()
    {
        (await _h.RunIn(Cdb.Rw10(false, 0, 4), 1024)).AssertSense(SenseKey.IllegalRequest, 0x24);
        (await _h.RunOut(Cdb.Rw10(false, 0, 1), new byte[512])).AssertSense(SenseKey.IllegalRequest, 0x24);
        (await _h.RunIn(Cdb.Rw10(true, 0, 1), 512)).AssertSense(SenseKey.IllegalRequest, 0x24);
    }

    [Fact]
    public async Task ZeroLengthTransfer_IsGood()
    {
        var r = await _h.RunIn(Cdb.Rw10(false, 4096, 0), 0);
        r.AssertGood();
        Assert.Equal(0UL, r.DataTransferred);
    }

    [Fact]
    public async Task OutOfRange_LbaOutOfRangeSense()
    {
        (await _h.RunIn(Cdb.Rw10(false, 4095, 2), 1024)).AssertSense(SenseKey.IllegalRequest, 0x21);
        (await _h.RunIn(Cdb.Rw16(false, ulong.MaxValue, 1), 512)).AssertSense(SenseKey.IllegalRequest, 0x21);
        (await _h.RunOut(Cdb.Rw10(true, 4096, 1), new byte[512])).AssertSense(SenseKey.IllegalRequest, 0x21);
        (await _h.RunIn(Cdb.Rw10(false, 4097, 0), 0)).AssertSense(SenseKey.IllegalRequest, 0x21);
        (await _h.RunIn(Cdb.SyncCache10(5000), 0)).AssertSense(SenseKey.IllegalRequest, 0x21);
        (await _h.RunIn(Cdb.Verify10(4090, 10, 0), 0)).AssertSense(SenseKey.IllegalRequest, 0x21);
    }

    [Fact]
    public async Task ProtectionFields_AreInvalidField()
    {
        var c = Cdb.Rw10(false, 0, 1);
        c[1] = 0x20; // RDPROTECT 1
        var r = await _h.RunIn(c, 512);
        r.AssertSense(SenseKey.IllegalRequest, 0x24);
        Assert.Equal(1, Cdb.U16(r.Sense, 16));
    }

    [Fact]
    public async Task TransferOverMaximum_IsInvalidField()
    {
        _h.Manager.Register(new NullBdev("BigNull", 1 << 20, 512));
        await _h.AttachAsync("BigNull", lunId: 3);
        var c = Cdb.Rw16(false, 0, (4 << 20) / 512 + 1);
        (await _h.RunIn(c, (4 << 20) + 512, lun: 3)).AssertSense(SenseKey.IllegalRequest, 0x24);
        c = Cdb.Rw16(false, 0, (4 << 20) / 512);
        (await _h.RunIn(c, 4 << 20, lun: 3)).AssertGood();
    }

    [Fact]
    public async Task SynchronizeCache_IsGood()
    {
        (await _h.RunIn(Cdb.SyncCache10(), 0)).AssertGood();
        (await _h.RunIn(Cdb.SyncCache10(10, 20), 0)).AssertGood();
        var c16 = new byte[16];
        c16[0] = ScsiOp.SynchronizeCache16;
        (await _h.RunIn(c16, 0)).AssertGood();
    }

    [Fact]
    public async Task Verify_ByteCheck0_RangeOnly_ByteCheck1_Compares()
    {
        (await _h.RunIn(Cdb.Verify10(0, 8, 0), 0)).AssertGood();

        var data = Pattern(1024, 9);
        (await _h.RunOut(Cdb.Rw10(true, 50, 2), data)).AssertGood();
        var ok = await _h.RunOut(Cdb.Verify10(50, 2, 1), data, segments: 2);
        ok.AssertGood();
        Assert.Equal(1024UL, ok.DataTransferred);

        data[700] ^= 0xFF;
        (await _h.RunOut(Cdb.Verify10(50, 2, 1), data)).AssertSense(SenseKey.Miscompare, 0x1D);

        (await _h.RunOut(Cdb.Verify10(50, 1, 3), new byte[512])).AssertSense(SenseKey.IllegalRequest, 0x24);
    }

    [Fact]
    public async Task WriteFua_OnWriteCacheBdev_WritesThenFlushes()
    {
        var model = new ParkingBdevModel("Park0");
        _h.Manager.Register(model);
        await _h.AttachAsync("Park0", lunId: 1);
        var pending = _h.Start(Cdb.Rw10(true, 0, 1, fua: true), ScsiDataDirection.ToDevice, new byte[512], lun: 1);
        Assert.True(await ScsiHarness.WaitUntil(() => model.ParkedCount == 1));
        await model.CompleteAllAsync(_h.Reactor); // the write
        Assert.True(await ScsiHarness.WaitUntil(() => model.ParkedCount == 1)); // then the flush
        Assert.False(pending.IsCompleted);
        await model.CompleteAllAsync(_h.Reactor);
        (await pending).AssertGood();
        Assert.Equal(1, model.GetStats().NumFlushOps);
        Assert.Equal(1, model.GetStats().NumWriteOps);
    }

    [Theory]
    [InlineData(false, BdevIoStatus.Failed, 0, SenseKey.MediumError, 0x11)]
    [InlineData(true, BdevIoStatus.Failed, 0, SenseKey.MediumError, 0x0C)]
    [InlineData(false, BdevIoStatus.Failed, 0x0006, SenseKey.HardwareError, 0x44)]
    [InlineData(false, BdevIoStatus.Failed, 0x0281, SenseKey.MediumError, 0x11)]
    [InlineData(false, BdevIoStatus.Aborted, 0, SenseKey.AbortedCommand, 0x00)]
    public async Task BdevFailure_MapsToSense(bool write, BdevIoStatus status, int nvme, SenseKey key, byte asc)
    {
        var model = new ParkingBdevModel("Fail" + (int)status + nvme + write);
        _h.Manager.Register(model);
        await _h.AttachAsync(model.Name, lunId: 2);
        var pending = write
            ? _h.Start(Cdb.Rw10(true, 0, 1), ScsiDataDirection.ToDevice, new byte[512], lun: 2)
            : _h.Start(Cdb.Rw10(false, 0, 1), ScsiDataDirection.FromDevice, new byte[512], lun: 2);
        Assert.True(await ScsiHarness.WaitUntil(() => model.ParkedCount == 1));
        await model.CompleteAllAsync(_h.Reactor, status, nvme);
        (await pending).AssertSense(key, asc);
    }
}
