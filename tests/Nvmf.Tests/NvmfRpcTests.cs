using System.Text.Json.Nodes;
using VhostBackend.Rpc;
using Xunit;

namespace VhostBackend.Nvmf.Tests;

/// <summary>The nvmf_* methods: SPDK's params, JSON shapes and error codes, and the save_config replay.</summary>
public sealed class NvmfRpcTests : IAsyncLifetime
{
    private readonly NvmfTestTarget _t = new();

    public Task InitializeAsync() => _t.SetupAsync();

    public async Task DisposeAsync() => await _t.DisposeAsync();

    private const string Nqn = NvmfTestTarget.Nqn;

    [Fact]
    public async Task CreateTransportRefusesWhatItDoesNotImplementNamingTheOption()
    {
        await using var fresh = new NvmfTestTarget();
        var e1 = await fresh.CallError("nvmf_create_transport", """{"trtype":"TCP","num_cqe":64}""");
        Assert.Equal(RpcErrorCodes.InvalidParams, e1.Code);
        Assert.Contains("num_cqe", e1.Message, StringComparison.Ordinal);
        var e2 = await fresh.CallError("nvmf_create_transport", """{"trtype":"TCP","dif_insert_or_strip":true}""");
        Assert.Contains("dif_insert_or_strip", e2.Message, StringComparison.Ordinal);
        var e4 = await fresh.CallError("nvmf_create_transport", """{"trtype":"RDMA"}""");
        Assert.Equal(RpcErrorCodes.InvalidParams, e4.Code);
        var e5 = await fresh.CallError("nvmf_create_transport", """{"trtype":"TCP","max_io_size":1000}""");
        Assert.Contains("max_io_size", e5.Message, StringComparison.Ordinal);
        var e6 = await fresh.CallError("nvmf_create_transport", """{}""");
        Assert.Equal(RpcErrorCodes.InvalidParams, e6.Code);

        // A listener needs the transport.
        await fresh.Call("nvmf_create_subsystem", $$"""{"nqn":"{{Nqn}}"}""");
        var e7 = await fresh.CallError("nvmf_subsystem_add_listener", $$$"""{"nqn":"{{{Nqn}}}","listen_address":{"trtype":"TCP","traddr":"127.0.0.1","trsvcid":"4420"}}""");
        Assert.Contains("trtype", e7.Message, StringComparison.Ordinal);

        await fresh.Call("nvmf_create_transport", """{"trtype":"tcp","max_queue_depth":64,"c2h_success":false,"sock_priority":1}""");
        var e8 = await fresh.CallError("nvmf_create_transport", """{"trtype":"TCP"}""");
        Assert.Equal(RpcErrorCodes.InternalError, e8.Code);
        var tr = Assert.Single((JsonArray)(await fresh.Call("nvmf_get_transports", "{}"))!)!;
        Assert.Equal("TCP", tr["trtype"]!.GetValue<string>());
        Assert.Equal(64u, tr["max_queue_depth"]!.GetValue<uint>());
        Assert.False(tr["c2h_success"]!.GetValue<bool>());
        Assert.Equal(127u, tr["max_io_qpairs_per_ctrlr"]!.GetValue<uint>());
        Assert.Equal(131072u, tr["max_io_size"]!.GetValue<uint>());
    }

    [Fact]
    public async Task SubsystemsShapeAndErrors()
    {
        var all = (JsonArray)(await _t.Call("nvmf_get_subsystems", "{}"))!;
        Assert.Equal(2, all.Count);
        Assert.Equal("nqn.2014-08.org.nvmexpress.discovery", all[0]!["nqn"]!.GetValue<string>());
        Assert.Equal("Discovery", all[0]!["subtype"]!.GetValue<string>());
        var s = all[1]!;
        Assert.Equal(Nqn, s["nqn"]!.GetValue<string>());
        Assert.Equal("NVMe", s["subtype"]!.GetValue<string>());
        Assert.True(s["allow_any_host"]!.GetValue<bool>());
        Assert.Equal("SPDK00000000000001", s["serial_number"]!.GetValue<string>());
        Assert.Equal("SPDK bdev Controller", s["model_number"]!.GetValue<string>());
        var la = Assert.Single(s["listen_addresses"]!.AsArray())!;
        Assert.Equal("TCP", la["trtype"]!.GetValue<string>());
        Assert.Equal("IPv4", la["adrfam"]!.GetValue<string>());
        Assert.Equal("127.0.0.1", la["traddr"]!.GetValue<string>());
        var ns = Assert.Single(s["namespaces"]!.AsArray())!;
        Assert.Equal(1u, ns["nsid"]!.GetValue<uint>());
        Assert.Equal("Malloc0", ns["bdev_name"]!.GetValue<string>());
        Assert.NotNull(ns["uuid"]);

        Assert.Equal(-19, (await _t.CallError("nvmf_get_subsystems", """{"nqn":"nqn.2016-06.io.spdk:none"}""")).Code);
        Assert.Equal(RpcErrorCodes.InternalError, (await _t.CallError("nvmf_create_subsystem", $$"""{"nqn":"{{Nqn}}"}""")).Code);
        var sn = await _t.CallError("nvmf_create_subsystem", """{"nqn":"nqn.2016-06.io.spdk:cnode2","serial_number":"123456789012345678901234"}""");
        Assert.Equal(RpcErrorCodes.InvalidParams, sn.Code);
        Assert.Contains("Invalid SN", sn.Message, StringComparison.Ordinal);
        Assert.Equal(RpcErrorCodes.InvalidParams, (await _t.CallError("nvmf_create_subsystem", """{"serial_number":"1"}""")).Code);
        Assert.Equal(RpcErrorCodes.InvalidParams, (await _t.CallError("nvmf_delete_subsystem", """{"nqn":"nqn.2016-06.io.spdk:none"}""")).Code);

        var nb = await _t.CallError("nvmf_subsystem_add_ns", $$$"""{"nqn":"{{{Nqn}}}","namespace":{"bdev_name":"NoSuchBdev"}}""");
        Assert.Equal(RpcErrorCodes.InvalidParams, nb.Code);
        Assert.Contains("bdev_name", nb.Message, StringComparison.Ordinal);
        await _t.AddMalloc("Malloc9");
        var dup = await _t.CallError("nvmf_subsystem_add_ns", $$$"""{"nqn":"{{{Nqn}}}","namespace":{"bdev_name":"Malloc9","nsid":1}}""");
        Assert.Contains("nsid", dup.Message, StringComparison.Ordinal);
        Assert.Equal(RpcErrorCodes.InvalidParams, (await _t.CallError("nvmf_subsystem_remove_ns", $$"""{"nqn":"{{Nqn}}","nsid":7}""")).Code);
        var ptpl = await _t.CallError("nvmf_subsystem_add_ns", $$$"""{"nqn":"{{{Nqn}}}","namespace":{"bdev_name":"Malloc9","ptpl_file":"/tmp/x"}}""");
        Assert.Contains("ptpl_file", ptpl.Message, StringComparison.Ordinal);
        Assert.Equal(RpcErrorCodes.InvalidParams, (await _t.CallError("nvmf_subsystem_add_host", """{"nqn":"nqn.2016-06.io.spdk:none","host":"nqn.x"}""")).Code);
        var badAddr = await _t.CallError("nvmf_subsystem_add_listener", $$$"""{"nqn":"{{{Nqn}}}","listen_address":{"trtype":"TCP","traddr":"not-an-ip","trsvcid":"4420"}}""");
        Assert.Contains("traddr", badAddr.Message, StringComparison.Ordinal);
        // As SPDK: adding a listener the subsystem already has succeeds (and changes nothing).
        var dupL = await _t.Call("nvmf_subsystem_add_listener", $$$"""{"nqn":"{{{Nqn}}}","listen_address":{"trtype":"TCP","traddr":"127.0.0.1","trsvcid":"{{{_t.Port}}}"}}""");
        Assert.True(dupL!.GetValue<bool>());
        Assert.Single((await _t.Call("nvmf_get_subsystems", $$"""{"nqn":"{{Nqn}}"}"""))![0]!["listen_addresses"]!.AsArray());

        // Delete frees the bdev for others: the namespace's descriptor is closed.
        await _t.Call("nvmf_delete_subsystem", $$"""{"nqn":"{{Nqn}}"}""");
        Assert.Single((JsonArray)(await _t.Call("nvmf_get_subsystems", "{}"))!);
        var sw = System.Diagnostics.Stopwatch.StartNew();
        var bdev = _t.Bdevs.Find("Malloc0")!;
        await _t.Reactors.Main.InvokeAsync(() => _t.Bdevs.UnregisterAsync(bdev, TimeSpan.FromSeconds(5)));
        Assert.True(sw.Elapsed < TimeSpan.FromSeconds(4), "a descriptor of the deleted subsystem's namespace is still open");
    }

    [Fact]
    public async Task SaveConfigReplaysIntoAFreshTarget()
    {
        await _t.Call("nvmf_subsystem_add_host", $$"""{"nqn":"{{Nqn}}","host":"nqn.2014-08.org.example:h1"}""");
        await _t.Call("nvmf_subsystem_allow_any_host", $$"""{"nqn":"{{Nqn}}","allow_any_host":false}""");
        var calls = _t.Target.WriteConfig();
        Assert.Equal(
            new[] { "nvmf_create_transport", "nvmf_create_subsystem", "nvmf_subsystem_add_host", "nvmf_subsystem_add_listener", "nvmf_subsystem_add_ns" },
            calls.Select(c => c!["method"]!.GetValue<string>()).ToArray());

        // The listener's port is free once this target stops listening on it.
        await _t.Call("nvmf_subsystem_remove_listener", $$$"""{"nqn":"{{{Nqn}}}","listen_address":{"trtype":"TCP","adrfam":"IPv4","traddr":"127.0.0.1","trsvcid":"{{{_t.Port}}}"}}""");
        await using var other = new NvmfTestTarget();
        await other.AddMalloc("Malloc0");
        foreach (var c in calls)
        {
            await other.Call(c!["method"]!.GetValue<string>(), c["params"]!.ToJsonString());
        }

        Assert.Equal(calls.ToJsonString(), other.Target.WriteConfig().ToJsonString());
    }
}
