using System.Buffers.Binary;
using System.Text.Json;
using System.Text.Json.Nodes;
using VhostBackend.BdevMalloc;
using VhostBackend.Nvme;
using VhostBackend.Nvme.Tcp;
using VhostBackend.Rpc;
using Xunit;

namespace VhostBackend.Nvmf.Tests;

/// <summary>
/// The target's fixes for the review of issue 17 (findings 5-10, 13, 14): races between Connect and the control path,
/// a delete racing a namespace removal, reconnect after a controller reset, Identify CMIC/NMIC/VWC, discovery PORTIDs
/// and UTF-8 NQNs, KATO granularity, Set Features SV and Get Log Page offsets. Over a real loopback socket with the
/// host MODEL.
/// </summary>
public sealed class ReviewFixTests : IAsyncLifetime
{
    private const string Nqn = NvmfTestTarget.Nqn;
    private readonly NvmfTestTarget _t = new();

    public Task InitializeAsync() => _t.SetupAsync();

    public async Task DisposeAsync() => await _t.DisposeAsync();

    private NvmfSubsystem Sub => _t.Target.Find(Nqn)!;

    private (NvmfHostModel Admin, ushort Cntlid) AdminWithId(uint kato = 0)
    {
        var h = _t.Host();
        var r = h.Connect(Nqn, kato: kato);
        Assert.Equal(0, r.Status);
        h.Enable();
        return (h, (ushort)r.Completion.Dw0);
    }

    private static Task<JsonNode?> Start(NvmfTestTarget t, string method, string json)
    {
        Assert.True(t.Rpc.TryGet(method, out var handler, out _));
        using var doc = JsonDocument.Parse(json);
        try
        {
            return handler(new RpcRequest(method, doc.RootElement.Clone()));
        }
        catch (Exception e)
        {
            return Task.FromException<JsonNode?>(e);
        }
    }

    // ---------------------------------------------------------------- 5: Connect re-checks under the lock

    [Fact]
    public async Task ConnectRefusedWhenTheHostIsRemovedBeforeTheControllerIsAdded()
    {
        await _t.Call("nvmf_subsystem_allow_any_host", $$"""{"nqn":"{{Nqn}}","allow_any_host":false}""");
        await _t.Call("nvmf_subsystem_add_host", $$"""{"nqn":"{{Nqn}}","host":"{{NvmfHostModel.HostNqn}}"}""");

        // remove_host runs after Connect's first checks and before the controller is added (the race window).
        _t.Target.BeforeControllerAdded = s => _t.Target.RemoveHost(s, NvmfHostModel.HostNqn);
        using var h = _t.Host();
        var r = h.Connect(Nqn);
        Assert.Equal(NvmeSct.CommandSpecific, NvmfHostModel.Sct(r.Status));
        Assert.Equal(NvmeSc.ConnectInvalidHost, NvmfHostModel.Sc(r.Status));
        Assert.Empty(_t.Target.ControllersOf(Sub));
    }

    [Fact]
    public void ConnectRefusedWhenTheListenerGoesBeforeTheControllerIsAdded()
    {
        // The first step of remove_listener (the address leaves the subsystem) in the race window.
        _t.Target.BeforeControllerAdded = s =>
        {
            lock (_t.Target.Lock)
            {
                s.Listeners.Clear();
            }
        };
        using var h = _t.Host();
        var r = h.Connect(Nqn);
        Assert.Equal(NvmeSc.ConnectInvalidParameters, NvmfHostModel.Sc(r.Status));
        Assert.Equal(256u, r.Completion.Dw0 >> 16);
        Assert.Empty(_t.Target.ControllersOf(Sub));
    }

    [Fact]
    public void ConnectRefusedWhenTheSubsystemIsDeletedBeforeTheControllerIsAdded()
    {
        // The first step of nvmf_delete_subsystem (Deleted, then the controllers' snapshot) in the race window.
        _t.Target.BeforeControllerAdded = s =>
        {
            lock (_t.Target.Lock)
            {
                s.Deleted = true;
            }
        };
        using var h = _t.Host();
        var r = h.Connect(Nqn);
        Assert.Equal(NvmeSc.ConnectInvalidParameters, NvmfHostModel.Sc(r.Status));
        Assert.Empty(_t.Target.ControllersOf(Sub));
        lock (_t.Target.Lock)
        {
            Sub.Deleted = false;
        }
    }

    // ---------------------------------------------------------------- 6: delete vs concurrent namespace changes

    [Fact]
    public async Task DeleteCompletesWhenANamespaceIsRemovedMeanwhileAndRefusesAdditions()
    {
        await _t.AddMalloc("Malloc1");
        await _t.AddMalloc("Malloc2");
        await _t.Call("nvmf_subsystem_add_ns", $$$"""{"nqn":"{{{Nqn}}}","namespace":{"bdev_name":"Malloc1","nsid":2}}""");

        // On the main reactor, in this order: the delete starts (it marks the subsystem, snapshots the namespaces and
        // awaits the first removal on the poll groups); remove_ns takes namespace 2 away meanwhile; add_ns, add_host
        // and add_listener arrive while the delete is under way.
        var tasks = await _t.Reactors.Main.InvokeAsync(() => new[]
        {
            Start(_t, "nvmf_delete_subsystem", $$"""{"nqn":"{{Nqn}}"}"""),
            Start(_t, "nvmf_subsystem_remove_ns", $$"""{"nqn":"{{Nqn}}","nsid":2}"""),
            Start(_t, "nvmf_subsystem_add_ns", $$$"""{"nqn":"{{{Nqn}}}","namespace":{"bdev_name":"Malloc2","nsid":3}}"""),
            Start(_t, "nvmf_subsystem_add_host", $$"""{"nqn":"{{Nqn}}","host":"nqn.2014-08.org.example:late"}"""),
            Start(_t, "nvmf_subsystem_add_listener", $$$"""{"nqn":"{{{Nqn}}}","listen_address":{"trtype":"TCP","traddr":"127.0.0.1","trsvcid":"{{{NvmfTestTarget.FreePort()}}}"}}"""),
        });

        Assert.True((await tasks[0])!.GetValue<bool>()); // the delete finished
        Assert.True((await tasks[1])!.GetValue<bool>());
        foreach (var late in tasks[2..])
        {
            var e = await Assert.ThrowsAsync<RpcException>(() => late);
            Assert.Equal(RpcErrorCodes.InvalidParams, e.Code);
            Assert.StartsWith("Invalid parameters", e.Message, StringComparison.Ordinal);
        }

        Assert.Single((JsonArray)(await _t.Call("nvmf_get_subsystems", "{}"))!);
        Assert.Empty(_t.Target.ListenAddresses); // the delete closed the listener; the late one never opened

        // No bdev is left open: all three unregister at once.
        foreach (var name in new[] { "Malloc0", "Malloc1", "Malloc2" })
        {
            var sw = System.Diagnostics.Stopwatch.StartNew();
            var bdev = _t.Bdevs.Find(name)!;
            await _t.Reactors.Main.InvokeAsync(() => _t.Bdevs.UnregisterAsync(bdev, TimeSpan.FromSeconds(5)));
            Assert.True(sw.Elapsed < TimeSpan.FromSeconds(4), $"{name} is still open");
        }
    }

    // ---------------------------------------------------------------- 7: reconnect right after a reset

    [Fact]
    public void ResetFreesTheIoQueueSlotsSoTheSameQidReconnectsAtOnce()
    {
        var (admin, cntlid) = AdminWithId();
        using var _ = admin;
        using var io = _t.Host();
        Assert.Equal(0, io.Connect(Nqn, 1, cntlid).Status);

        var ctrl = Assert.Single(_t.Target.ControllersOf(Sub));
        NvmfTcpConnection ioConn;
        lock (_t.Target.Lock)
        {
            ioConn = ctrl.IoQueues[1]!;
        }

        // Hold the I/O queue's reactor, so its close (and the slot release in ConnectionClosed) cannot run yet.
        var ioReactor = ioConn.Reactor!;
        Assert.NotSame(ctrl.AdminConnection.Reactor, ioReactor);
        Assert.NotSame(_t.Reactors.Main, ioReactor); // the acceptor must keep running
        using var gate = new ManualResetEventSlim();
        using var held = new ManualResetEventSlim();
        ioReactor.Send(_ => { held.Set(); gate.Wait(10000); }, null);
        try
        {
            Assert.True(held.Wait(5000));
            Assert.Equal(0, admin.Execute(NvmeFabrics.PropertySet(NvmeReg.Cc, 0)).Status); // reset
            Assert.Equal(0, ctrl.IoQueueCount);
            admin.Enable();

            // The next accepted connection goes to the other poll group (round robin), which is not held.
            using var again = _t.Host();
            var r = again.Connect(Nqn, 1, cntlid);
            Assert.Equal(0, r.Status);
        }
        finally
        {
            gate.Set();
        }

        Assert.True(io.ClosedByTarget(3000));
    }

    // ---------------------------------------------------------------- 8, 9: Identify CMIC, NMIC, VWC

    [Fact]
    public void IdentifyDeclaresMultiControllerSharedNamespacesAndNoBroadcastFlush()
    {
        var (h, _) = AdminWithId();
        using var _h = h;
        var (id, r, _) = h.Read(NvmfHostModel.Identify(1), 4096);
        Assert.Equal(0, r!.Status);
        Assert.Equal(0x03, id[76]); // CMIC: multi-port, multi-controller
        Assert.Equal(1, id[525] & 1); // VWC present
        Assert.Equal(2, (id[525] >> 1) & 3); // flush with NSID FFFFFFFFh: not supported

        var (ns, r2, _) = h.Read(NvmfHostModel.Identify(0, 1), 4096);
        Assert.Equal(0, r2!.Status);
        Assert.Equal(1, ns[30]); // NMIC: shareable

        // A second controller of the same host to the same subsystem (what Linux does for a second path).
        var (h2, c2) = AdminWithId();
        using var _h2 = h2;
        Assert.Equal(2, _t.Target.ControllersOf(Sub).Length);
        Assert.NotEqual(0, c2);
    }

    [Fact]
    public void DiscoveryControllerHasNoCmic()
    {
        using var h = _t.Host();
        Assert.Equal(0, h.Connect(NvmeFabrics.DiscoveryNqn).Status);
        h.Enable();
        var (id, _, _) = h.Read(NvmfHostModel.Identify(1), 4096);
        Assert.Equal(0, id[76]);
        Assert.Equal(0, id[525]);
    }

    // ---------------------------------------------------------------- 10: block size / metadata

    [Fact]
    public void BdevsWithMetadataOrOddBlockSizesCannotExist()
    {
        // add_ns refuses a block size that is not a power of two >= 512 (interleaved metadata), naming the bdev; the
        // bdev layer refuses to create one in the first place (it has no metadata), which this pins down.
        Assert.Throws<ArgumentException>(() => new MallocBdev("Md520", 64, 520));
        Assert.Throws<ArgumentException>(() => new MallocBdev("Md4160", 64, 4160));
    }

    // ---------------------------------------------------------------- 13: discovery log

    private static List<NvmeDiscoveryEntry> Entries(byte[] page)
    {
        ulong n = BinaryPrimitives.ReadUInt64LittleEndian(page.AsSpan(8));
        var list = new List<NvmeDiscoveryEntry>();
        for (int i = 0; i < (int)n; i++)
        {
            list.Add(NvmeDiscoveryEntry.Parse(page.AsSpan(1024 * (i + 1), 1024)));
        }

        return list;
    }

    private static byte[] DiscoveryPage(NvmfHostModel h)
    {
        var log = new NvmeCommand { Opcode = NvmeAdminOpcode.GetLogPage, Cdw10 = NvmeLogPage.Discovery | ((8192u / 4 - 1) << 16) };
        var (page, r, _) = h.Read(log, 8192);
        Assert.Equal(0, r!.Status);
        return page;
    }

    [Fact]
    public async Task DiscoveryPortIdIsStablePerListenerAndNqnsAreUtf8()
    {
        const string utf8Nqn = "nqn.2016-06.io.spdk:cnodé-ü";
        int port2 = NvmfTestTarget.FreePort();
        string Listen(string nqn, int port) => $$$"""{"nqn":"{{{nqn}}}","listen_address":{"trtype":"TCP","adrfam":"IPv4","traddr":"127.0.0.1","trsvcid":"{{{port}}}"}}""";
        await _t.Call("nvmf_create_subsystem", $$"""{"nqn":"{{utf8Nqn}}","allow_any_host":true}""");
        await _t.Call("nvmf_subsystem_add_listener", Listen(utf8Nqn, _t.Port));
        await _t.Call("nvmf_subsystem_add_listener", Listen(utf8Nqn, port2));
        await _t.Call("nvmf_subsystem_add_listener", Listen(NvmeFabrics.DiscoveryNqn, port2));

        using var h = _t.Host();
        Assert.Equal(0, h.Connect(NvmeFabrics.DiscoveryNqn).Status);
        h.Enable();
        var entries = Entries(DiscoveryPage(h));
        Assert.Equal(4, entries.Count);
        string p1 = _t.Port.ToString(System.Globalization.CultureInfo.InvariantCulture);
        string p2 = port2.ToString(System.Globalization.CultureInfo.InvariantCulture);
        var onPort1 = entries.Where(e => e.TrSvcId == p1).ToList();
        var onPort2 = entries.Where(e => e.TrSvcId == p2).ToList();
        Assert.Equal(2, onPort1.Count);
        Assert.Equal(2, onPort2.Count);
        Assert.Single(onPort1.Select(e => e.PortId).Distinct()); // one port, one id, whatever the subsystem
        Assert.Single(onPort2.Select(e => e.PortId).Distinct());
        Assert.NotEqual(onPort1[0].PortId, onPort2[0].PortId);
        Assert.Contains(entries, e => e.SubNqn == utf8Nqn); // written as UTF-8, not '?'

        // The ids survive other changes (a generation later, cnode1 gone from the log).
        await _t.Call("nvmf_subsystem_remove_listener", Listen(Nqn, _t.Port));
        var later = Entries(DiscoveryPage(h));
        Assert.Equal(3, later.Count);
        Assert.All(later.Where(e => e.TrSvcId == p1), e => Assert.Equal(onPort1[0].PortId, e.PortId));
        Assert.All(later.Where(e => e.TrSvcId == p2), e => Assert.Equal(onPort2[0].PortId, e.PortId));

        // The UTF-8 NQN from the log connects.
        using var c = _t.Host();
        Assert.Equal(0, c.Connect(utf8Nqn).Status);
    }

    // ---------------------------------------------------------------- 14: KATO, SV, log page offset

    [Fact]
    public void KatoIsRoundedUpToTheKeepAliveGranularity()
    {
        var (h, _) = AdminWithId(kato: 120001);
        using var _h = h;
        var get = new NvmeCommand { Opcode = NvmeAdminOpcode.GetFeatures, Cdw10 = NvmeFeature.KeepAliveTimer };
        Assert.Equal(120100u, h.Execute(get).Completion.Dw0); // Connect's KATO, rounded up to 100 ms (KAS 1)
        Assert.Equal(0, h.Execute(new NvmeCommand { Opcode = NvmeAdminOpcode.SetFeatures, Cdw10 = NvmeFeature.KeepAliveTimer, Cdw11 = 1501 }).Status);
        Assert.Equal(1600u, h.Execute(get).Completion.Dw0);
        Assert.Equal(0, h.Execute(new NvmeCommand { Opcode = NvmeAdminOpcode.SetFeatures, Cdw10 = NvmeFeature.KeepAliveTimer, Cdw11 = 15000 }).Status);
        Assert.Equal(15000u, h.Execute(get).Completion.Dw0);
        Assert.Equal(0u, NvmfController.RoundKato(0));
        Assert.Equal(100u, NvmfController.RoundKato(1));
        Assert.Equal(uint.MaxValue / 100 * 100, NvmfController.RoundKato(uint.MaxValue));
    }

    [Fact]
    public void SetFeaturesWithSaveIsNotSaveable()
    {
        var (h, _) = AdminWithId();
        using var _h = h;
        var r = h.Execute(new NvmeCommand { Opcode = NvmeAdminOpcode.SetFeatures, Cdw10 = NvmeFeature.AsyncEventConfiguration | (1u << 31), Cdw11 = 0x100 });
        Assert.Equal(NvmeSct.CommandSpecific, NvmfHostModel.Sct(r.Status));
        Assert.Equal(0x0D, NvmfHostModel.Sc(r.Status)); // Feature Identifier Not Saveable
        Assert.Equal(0u, h.Execute(new NvmeCommand { Opcode = NvmeAdminOpcode.GetFeatures, Cdw10 = NvmeFeature.AsyncEventConfiguration }).Completion.Dw0);
    }

    [Fact]
    public void GetLogPageOffsetPastThePageIsInvalidField()
    {
        var (h, _) = AdminWithId();
        using var _h = h;
        NvmeCommand Smart(ulong offset) => new()
        {
            Opcode = NvmeAdminOpcode.GetLogPage,
            Cdw10 = NvmeLogPage.SmartHealth | ((512u / 4 - 1) << 16),
            Cdw12 = (uint)offset,
            Cdw13 = (uint)(offset >> 32),
        };
        Assert.Equal(0, h.Read(Smart(256), 512).Resp!.Status);
        var past = h.Read(Smart(1024), 512).Resp!;
        Assert.Equal(NvmeSct.Generic, NvmfHostModel.Sct(past.Status));
        Assert.Equal(NvmeSc.InvalidField, NvmfHostModel.Sc(past.Status));
        Assert.Equal(NvmeSc.InvalidField, NvmfHostModel.Sc(h.Read(Smart(1UL << 40), 512).Resp!.Status));

        // NUMD asking for more than the command's buffer is Invalid Field (SPDK's answer), not clamped to the buffer.
        var tooLong = h.Read(Smart(0), 256).Resp!;
        Assert.Equal(NvmeSct.Generic, NvmfHostModel.Sct(tooLong.Status));
        Assert.Equal(NvmeSc.InvalidField, NvmfHostModel.Sc(tooLong.Status));
    }
}
