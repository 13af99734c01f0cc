using VhostBackend.BdevNull;

namespace VhostBackend.Scsi.Tests;

public sealed class AttentionAndTaskManagementTests : IAsyncLifetime
{
    private readonly ScsiHarness _h = new();

    public Task InitializeAsync() => Task.CompletedTask;

    public async Task DisposeAsync() => await _h.DisposeAsync();

    [Fact]
    public async Task Resize_RaisesEvent_AndUnitAttentionOnce()
    {
        var nb = new NullBdev("Null0", 1000, 512);
        _h.Manager.Register(nb);
        var lun = await _h.AttachAsync("Null0");
        int resized = 0;
        _h.Device.LunResized += (_, l) => Interlocked.Increment(ref resized);

        nb.Resize(2000);
        Assert.True(await ScsiHarness.WaitUntil(() => Volatile.Read(ref resized) == 1));
        Assert.True(lun.HasPendingUnitAttention);

        // INQUIRY and REPORT LUNS do not consume it.
        (await _h.RunIn(Cdb.Inquiry(false, 0, 36), 36)).AssertGood();
        (await _h.RunIn(Cdb.ReportLuns(), 64)).AssertGood();

        (await _h.RunIn(Cdb.Tur(), 0)).AssertSense(SenseKey.UnitAttention, 0x2A, 0x09);
        (await _h.RunIn(Cdb.Tur(), 0)).AssertGood();

        var cap = await _h.RunIn(Cdb.ReadCapacity16(), 32);
        cap.AssertGood();
        Assert.Equal(1999UL, Cdb.U64(cap.Data, 0));
    }

    [Fact]
    public async Task RequestSense_ReportsAndClearsUnitAttention()
    {
        var nb = new NullBdev("Null1", 1000, 512);
        _h.Manager.Register(nb);
        var lun = await _h.AttachAsync("Null1");
        nb.Resize(500);
        Assert.True(await ScsiHarness.WaitUntil(() => lun.HasPendingUnitAttention));
        var r = await _h.RunIn(Cdb.RequestSense(), 252);
        r.AssertGood();
        Assert.Equal(18UL, r.DataTransferred);
        Assert.Equal(0x06, r.Data[2] & 0x0F);
        Assert.Equal(0x2A, r.Data[12]);
        Assert.Equal(0x09, r.Data[13]);
        (await _h.RunIn(Cdb.Tur(), 0)).AssertGood();
    }

    [Fact]
    public async Task LunReset_WaitsForOutstanding_AbortsThem_SetsUnitAttention()
    {
        var model = new ParkingBdevModel("Park0");
        _h.Manager.Register(model);
        await _h.AttachAsync("Park0");
        var r1 = _h.Start(Cdb.Rw10(false, 0, 1), ScsiDataDirection.FromDevice, new byte[512], tag: 1);
        var r2 = _h.Start(Cdb.Rw10(false, 1, 1), ScsiDataDirection.FromDevice, new byte[512], tag: 2);
        Assert.True(await ScsiHarness.WaitUntil(() => model.ParkedCount == 2));

        var query = await _h.Device.TaskManagementAsync(ScsiTaskManagementFunction.QueryTask, 0, 2);
        Assert.Equal(ScsiTaskManagementResponse.Succeeded, query);
        query = await _h.Device.TaskManagementAsync(ScsiTaskManagementFunction.QueryTask, 0, 99);
        Assert.Equal(ScsiTaskManagementResponse.Complete, query);

        var reset = _h.Device.TaskManagementAsync(ScsiTaskManagementFunction.LogicalUnitReset, 0, 0);
        await Task.Delay(50);
        Assert.False(reset.IsCompleted); // the TMF completes only after the tasks it aborted
        Assert.False(r1.IsCompleted);

        await model.CompleteAllAsync(_h.Reactor);
        var a = await r1;
        var b = await r2;
        Assert.True(a.Aborted && b.Aborted);
        Assert.Equal(ScsiStatus.TaskAborted, a.Status);
        Assert.Equal(ScsiTaskManagementResponse.Complete, await reset);

        (await _h.RunIn(Cdb.Tur(), 0)).AssertSense(SenseKey.UnitAttention, 0x29, 0x00);
        (await _h.RunIn(Cdb.Tur(), 0)).AssertGood();
    }

    [Fact]
    public async Task AbortTask_AbortsOnlyTheTaggedTask()
    {
        var model = new ParkingBdevModel("Park1");
        _h.Manager.Register(model);
        await _h.AttachAsync("Park1");
        var r1 = _h.Start(Cdb.Rw10(false, 0, 1), ScsiDataDirection.FromDevice, new byte[512], tag: 10);
        var r2 = _h.Start(Cdb.Rw10(false, 1, 1), ScsiDataDirection.FromDevice, new byte[512], tag: 11);
        Assert.True(await ScsiHarness.WaitUntil(() => model.ParkedCount == 2));
        var abort = _h.Device.TaskManagementAsync(ScsiTaskManagementFunction.AbortTask, 0, 11);
        await model.CompleteAllAsync(_h.Reactor);
        Assert.Equal(ScsiTaskManagementResponse.Complete, await abort);
        (await r1).AssertGood();
        Assert.True((await r2).Aborted);

        // No unit attention after ABORT TASK.
        (await _h.RunIn(Cdb.Tur(), 0)).AssertGood();

        // Unknown LUN, unsupported function.
        Assert.Equal(ScsiTaskManagementResponse.IncorrectLun, await _h.Device.TaskManagementAsync(ScsiTaskManagementFunction.LogicalUnitReset, 7, 0));
        Assert.Equal(ScsiTaskManagementResponse.Rejected, await _h.Device.TaskManagementAsync(ScsiTaskManagementFunction.ClearAca, 0, 0));
    }

    [Fact]
    public async Task TargetReset_SetsUnitAttentionOnEveryLun()
    {
        _h.AddMalloc("M0", 64);
        _h.AddMalloc("M1", 64);
        await _h.AttachAsync("M0", 0);
        await _h.AttachAsync("M1", 1);
        Assert.Equal(ScsiTaskManagementResponse.Complete, await _h.Device.TaskManagementAsync(ScsiTaskManagementFunction.TargetReset, 0));
        (await _h.RunIn(Cdb.Tur(), 0, lun: 0)).AssertSense(SenseKey.UnitAttention, 0x29);
        (await _h.RunIn(Cdb.Tur(), 0, lun: 1)).AssertSense(SenseKey.UnitAttention, 0x29);
    }

    [Fact]
    public async Task HotRemove_DrainsInflight_ClosesDesc_RaisesEvent_FailsNewCommands()
    {
        var model = new ParkingBdevModel("Park2");
        _h.Manager.Register(model);
        var lun = await _h.AttachAsync("Park2");
        int removed = 0;
        _h.Device.LunRemoved += (_, _) => Interlocked.Increment(ref removed);

        var inflight = _h.Start(Cdb.Rw10(false, 0, 1), ScsiDataDirection.FromDevice, new byte[512]);
        Assert.True(await ScsiHarness.WaitUntil(() => model.ParkedCount == 1));

        var unregister = _h.Manager.UnregisterAsync(model);
        Assert.True(await ScsiHarness.WaitUntil(() => lun.IsRemoved));

        // New commands fail while the old one drains.
        (await _h.RunIn(Cdb.Rw10(false, 0, 1), 512)).AssertSense(SenseKey.IllegalRequest, 0x25);
        Assert.False(unregister.IsCompleted);
        Assert.Equal(0, Volatile.Read(ref removed));

        await model.CompleteAllAsync(_h.Reactor);
        (await inflight).AssertGood();
        await unregister.WaitAsync(TimeSpan.FromSeconds(5));
        Assert.True(lun.Desc.IsClosed);
        Assert.True(await ScsiHarness.WaitUntil(() => Volatile.Read(ref removed) == 1));
        Assert.Null(_h.Device.GetLun(0));

        var inq = await _h.RunIn(Cdb.Inquiry(false, 0, 36), 36);
        inq.AssertGood();
        Assert.Equal(0x7F, inq.Data[0]);
        var luns = await _h.RunIn(Cdb.ReportLuns(), 64);
        Assert.Equal(0u, Cdb.U32(luns.Data, 0));
        await _h.ReleaseChannelAsync(0);
    }
}
