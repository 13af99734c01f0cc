using System.Text.Json.Nodes;
using VhostBackend.Rpc;
using Xunit;

namespace VhostBackend.Nvmf.Tests;

/// <summary>
/// SPDK v24.01 nvmf RPC compatibility (review findings 15-17, lib/nvmf/nvmf_rpc.c and nvmf.c): idempotent add_listener,
/// max_namespaces / nguid / eui64 / uuid in nvmf_get_subsystems and save_config, relaxed decoding exactly where SPDK
/// decodes relaxed, max_queue_depth as a uint16 and SPDK's "Invalid parameters" for an unknown subsystem.
/// </summary>
public sealed class RpcCompatTests : IAsyncLifetime
{
    private const string Nqn = NvmfTestTarget.Nqn;
    private readonly NvmfTestTarget _t = new();

    public Task InitializeAsync() => _t.SetupAsync();

    public async Task DisposeAsync() => await _t.DisposeAsync();

    private string ListenerJson(string extra = "", string addressExtra = "") =>
        $$$"""{"nqn":"{{{Nqn}}}","listen_address":{"trtype":"TCP","adrfam":"IPv4","traddr":"127.0.0.1","trsvcid":"{{{_t.Port}}}"{{{addressExtra}}}}{{{extra}}}}""";

    [Fact]
    public async Task AddingAnExistingListenerSucceedsAndChangesNothing()
    {
        var gen0 = await _t.Call("nvmf_get_subsystems", $$"""{"nqn":"{{Nqn}}"}""");
        Assert.True((await _t.Call("nvmf_subsystem_add_listener", ListenerJson()))!.GetValue<bool>());
        Assert.True((await _t.Call("nvmf_subsystem_add_listener", ListenerJson()))!.GetValue<bool>());
        var s = (await _t.Call("nvmf_get_subsystems", $$"""{"nqn":"{{Nqn}}"}"""))![0]!;
        Assert.Single(s["listen_addresses"]!.AsArray());
        Assert.Equal(gen0!.ToJsonString(), new JsonArray(s.DeepClone()).ToJsonString());
        Assert.Single(_t.Target.ListenAddresses);

        // One remove takes it away (the socket is not counted twice).
        Assert.True((await _t.Call("nvmf_subsystem_remove_listener", ListenerJson()))!.GetValue<bool>());
        Assert.Empty(_t.Target.ListenAddresses);
    }

    [Fact]
    public async Task MaxNamespacesAndNamespaceIdsAreReportedAsSpdk()
    {
        await _t.AddMalloc("Malloc1");
        await _t.AddMalloc("Malloc2");
        await _t.Call("nvmf_subsystem_add_ns", $$$"""{"nqn":"{{{Nqn}}}","namespace":{"bdev_name":"Malloc1","nsid":2,"eui64":"0123456789ABCDEF","uuid":"6a1e2a3b-1111-2222-3333-444455556666"}}""");
        await _t.Call("nvmf_subsystem_add_ns", $$$"""{"nqn":"{{{Nqn}}}","namespace":{"bdev_name":"Malloc2","nsid":3,"uuid":"00000000-0000-0000-0000-000000000000"}}""");

        var s = (await _t.Call("nvmf_get_subsystems", $$"""{"nqn":"{{Nqn}}"}"""))![0]!;
        Assert.Equal(32u, s["max_namespaces"]!.GetValue<uint>()); // created without: SPDK's default, reported
        var nss = s["namespaces"]!.AsArray();
        Assert.Equal(3, nss.Count);
        var ns1 = nss[0]!.AsObject();
        Assert.NotNull(ns1["nguid"]);
        Assert.NotNull(ns1["uuid"]);
        Assert.False(ns1.ContainsKey("eui64")); // zero: not written
        var ns2 = nss[1]!.AsObject();
        Assert.Equal("0123456789ABCDEF", ns2["eui64"]!.GetValue<string>());
        Assert.Equal("6a1e2a3b-1111-2222-3333-444455556666", ns2["uuid"]!.GetValue<string>());
        Assert.Equal(new[] { "nsid", "bdev_name", "name", "nguid", "eui64", "uuid" }, ns2.Select(kv => kv.Key).ToArray());
        var ns3 = nss[2]!.AsObject();
        Assert.Equal(_t.Bdevs.Find("Malloc2")!.Uuid.ToString(), ns3["uuid"]!.GetValue<string>()); // a zero uuid: the bdev's, as SPDK

        // save_config: max_namespaces 32, eui64 kept; a replay into a fresh target writes the same config.
        var calls = _t.Target.WriteConfig();
        var create = calls.First(c => c!["method"]!.GetValue<string>() == "nvmf_create_subsystem")!;
        Assert.Equal(32u, create["params"]!["max_namespaces"]!.GetValue<uint>());
        var addNs = calls.Where(c => c!["method"]!.GetValue<string>() == "nvmf_subsystem_add_ns").Select(c => c!["params"]!["namespace"]!.AsObject()).ToArray();
        Assert.Equal("0123456789ABCDEF", addNs[1]["eui64"]!.GetValue<string>());
        Assert.False(addNs[0].ContainsKey("eui64"));

        await _t.Call("nvmf_subsystem_remove_listener", ListenerJson());
        await using var other = new NvmfTestTarget();
        foreach (var b in new[] { "Malloc0", "Malloc1", "Malloc2" })
        {
            await other.AddMalloc(b);
        }

        foreach (var c in calls)
        {
            await other.Call(c!["method"]!.GetValue<string>(), c["params"]!.ToJsonString());
        }

        Assert.Equal(calls.ToJsonString(), other.Target.WriteConfig().ToJsonString());

        // An all-zero NGUID given explicitly is not written either.
        await _t.AddMalloc("Malloc3");
        await _t.Call("nvmf_subsystem_add_ns", $$$"""{"nqn":"{{{Nqn}}}","namespace":{"bdev_name":"Malloc3","nsid":4,"nguid":"00000000000000000000000000000000"}}""");
        var ns4 = (await _t.Call("nvmf_get_subsystems", $$"""{"nqn":"{{Nqn}}"}"""))![0]!["namespaces"]!.AsArray()[3]!.AsObject();
        Assert.Equal(new[] { "nsid", "bdev_name", "name", "uuid" }, ns4.Select(kv => kv.Key).ToArray());
    }

    [Fact]
    public async Task UnknownKeysAreIgnoredExactlyWhereSpdkDecodesRelaxed()
    {
        // Relaxed in v24.01: nvmf_create_transport, nvmf_subsystem_add_listener, nvmf_subsystem_add_host.
        await using (var fresh = new NvmfTestTarget())
        {
            Assert.True((await fresh.Call("nvmf_create_transport", """{"trtype":"TCP","some_future_option":7}"""))!.GetValue<bool>());
        }

        Assert.True((await _t.Call("nvmf_subsystem_add_listener", ListenerJson(extra: ",\"sock_impl\":\"posix\"")))!.GetValue<bool>());
        Assert.True((await _t.Call("nvmf_subsystem_add_host", $$"""{"nqn":"{{Nqn}}","host":"nqn.2014-08.org.example:h1","future":true}"""))!.GetValue<bool>());

        // Strict everywhere else, including listen_address inside a relaxed add_listener.
        async Task Refused(string method, string json)
        {
            var e = await _t.CallError(method, json);
            Assert.Equal(RpcErrorCodes.InvalidParams, e.Code);
            Assert.StartsWith("Invalid parameters", e.Message, StringComparison.Ordinal);
        }

        await Refused("nvmf_subsystem_add_listener", ListenerJson(addressExtra: ",\"bogus\":1"));
        await Refused("nvmf_subsystem_remove_listener", ListenerJson(extra: ",\"bogus\":1"));
        await Refused("nvmf_subsystem_remove_host", $$"""{"nqn":"{{Nqn}}","host":"nqn.2014-08.org.example:h1","bogus":1}""");
        await Refused("nvmf_create_subsystem", """{"nqn":"nqn.2016-06.io.spdk:cnode9","bogus":1}""");
        await Refused("nvmf_subsystem_add_ns", $$$"""{"nqn":"{{{Nqn}}}","namespace":{"bdev_name":"Malloc0","bogus":1}}""");
        await Refused("nvmf_subsystem_allow_any_host", $$"""{"nqn":"{{Nqn}}","allow_any_host":true,"bogus":1}""");
        await Refused("nvmf_delete_subsystem", $$"""{"nqn":"{{Nqn}}","bogus":1}""");

        // The explicit refusals by name stay, relaxed or not.
        var rdma = await _t.CallError("nvmf_create_transport", """{"trtype":"TCP","num_cqe":64}""");
        Assert.Contains("num_cqe", rdma.Message, StringComparison.Ordinal);
        var psk = await _t.CallError("nvmf_subsystem_add_host", $$"""{"nqn":"{{Nqn}}","host":"nqn.2014-08.org.example:h2","psk":"/tmp/k"}""");
        Assert.Contains("psk", psk.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task RpcPyCreateTransportRequestIsAccepted()
    {
        // Exactly what SPDK v24.01's scripts/rpc.py sends for `nvmf_create_transport -t TCP -q 128 -o` (it always adds
        // the RDMA/VFIOUSER flags as false): refusing them by name made rpc.py unusable.
        await using (var fresh = new NvmfTestTarget())
        {
            Assert.True((await fresh.Call("nvmf_create_transport", """{"trtype":"TCP","max_queue_depth":128,"zcopy":false,"no_srq":false,"c2h_success":false,"dif_insert_or_strip":false,"no_wr_batching":false,"disable_mappable_bar0":false,"disable_adaptive_irq":false,"disable_shadow_doorbells":false}"""))!.GetValue<bool>());
            var tr = Assert.Single((JsonArray)(await fresh.Call("nvmf_get_transports", "{}"))!)!;
            Assert.False(tr["c2h_success"]!.GetValue<bool>());

            // rpc.py's other requests as it writes them (lower-case trtype/adrfam, secure_channel false, max_namespaces).
            int port = NvmfTestTarget.FreePort();
            await fresh.AddMalloc("Malloc0");
            Assert.True((await fresh.Call("nvmf_create_subsystem", $$"""{"nqn":"{{Nqn}}","serial_number":"SPDK00000000000001","model_number":"SPDK bdev Controller","allow_any_host":true,"max_namespaces":16,"min_cntlid":1,"max_cntlid":100}"""))!.GetValue<bool>());
            Assert.Equal(1u, (await fresh.Call("nvmf_subsystem_add_ns", $$$"""{"nqn":"{{{Nqn}}}","namespace":{"bdev_name":"Malloc0","nsid":1,"nguid":"0123456789ABCDEF0123456789ABCDEF","eui64":"0011223344556677","uuid":"11111111-2222-3333-4444-555555555555"}}"""))!.GetValue<uint>());
            string listener = $$$"""{"nqn":"{{{Nqn}}}","secure_channel":false,"listen_address":{"trtype":"tcp","traddr":"127.0.0.1","trsvcid":"{{{port}}}","adrfam":"ipv4"}}""";
            Assert.True((await fresh.Call("nvmf_subsystem_add_listener", listener))!.GetValue<bool>());
            Assert.True((await fresh.Call("nvmf_subsystem_add_listener", listener))!.GetValue<bool>());
            string removal = $$$"""{"nqn":"{{{Nqn}}}","listen_address":{"trtype":"tcp","traddr":"127.0.0.1","trsvcid":"{{{port}}}","adrfam":"ipv4"}}""";
            Assert.True((await fresh.Call("nvmf_subsystem_remove_listener", removal))!.GetValue<bool>());
        }

        // Asking for one of them is still refused by name.
        await using var other = new NvmfTestTarget();
        var e = await other.CallError("nvmf_create_transport", """{"trtype":"TCP","no_srq":true}""");
        Assert.Equal(RpcErrorCodes.InvalidParams, e.Code);
        Assert.Contains("no_srq", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task GetListenersAsSpdk()
    {
        var l = Assert.Single((JsonArray)(await _t.Call("nvmf_subsystem_get_listeners", $$"""{"nqn":"{{Nqn}}"}"""))!)!.AsObject();
        Assert.Equal(new[] { "address" }, l.Select(kv => kv.Key).ToArray());
        var a = l["address"]!;
        Assert.Equal("TCP", a["trtype"]!.GetValue<string>());
        Assert.Equal("IPv4", a["adrfam"]!.GetValue<string>());
        Assert.Equal("127.0.0.1", a["traddr"]!.GetValue<string>());
        Assert.Equal(_t.Port.ToString(System.Globalization.CultureInfo.InvariantCulture), a["trsvcid"]!.GetValue<string>());
        Assert.Empty((JsonArray)(await _t.Call("nvmf_subsystem_get_listeners", """{"nqn":"nqn.2014-08.org.nvmexpress.discovery"}"""))!);
        var e = await _t.CallError("nvmf_subsystem_get_listeners", """{"nqn":"nqn.2016-06.io.spdk:none"}""");
        Assert.Equal(RpcErrorCodes.InvalidParams, e.Code);
    }

    [Fact]
    public async Task MaxQueueDepthIsAUint16()
    {
        await using var fresh = new NvmfTestTarget();
        var e = await fresh.CallError("nvmf_create_transport", """{"trtype":"TCP","max_queue_depth":65536}""");
        Assert.Equal(RpcErrorCodes.InvalidParams, e.Code);
        Assert.Contains("max_queue_depth", e.Message, StringComparison.Ordinal);
        Assert.True((await fresh.Call("nvmf_create_transport", """{"trtype":"TCP","max_queue_depth":65535}"""))!.GetValue<bool>());
    }

    [Fact]
    public async Task AnUnknownSubsystemIsInvalidParametersEverywhere()
    {
        const string none = "nqn.2016-06.io.spdk:none";
        var calls = new (string Method, string Json)[]
        {
            ("nvmf_delete_subsystem", $$"""{"nqn":"{{none}}"}"""),
            ("nvmf_subsystem_add_listener", $$$"""{"nqn":"{{{none}}}","listen_address":{"trtype":"TCP","traddr":"127.0.0.1","trsvcid":"4420"}}"""),
            ("nvmf_subsystem_remove_listener", $$$"""{"nqn":"{{{none}}}","listen_address":{"trtype":"TCP","traddr":"127.0.0.1","trsvcid":"4420"}}"""),
            ("nvmf_subsystem_add_ns", $$$"""{"nqn":"{{{none}}}","namespace":{"bdev_name":"Malloc0"}}"""),
            ("nvmf_subsystem_remove_ns", $$"""{"nqn":"{{none}}","nsid":1}"""),
            ("nvmf_subsystem_add_host", $$"""{"nqn":"{{none}}","host":"nqn.x"}"""),
            ("nvmf_subsystem_remove_host", $$"""{"nqn":"{{none}}","host":"nqn.x"}"""),
            ("nvmf_subsystem_allow_any_host", $$"""{"nqn":"{{none}}","allow_any_host":true}"""),
            ("nvmf_subsystem_get_controllers", $$"""{"nqn":"{{none}}"}"""),
            ("nvmf_subsystem_get_qpairs", $$"""{"nqn":"{{none}}"}"""),
            ("nvmf_subsystem_get_listeners", $$"""{"nqn":"{{none}}"}"""),
        };
        foreach (var (method, json) in calls)
        {
            var e = await _t.CallError(method, json);
            Assert.Equal(RpcErrorCodes.InvalidParams, e.Code);
            Assert.StartsWith("Invalid parameters", e.Message, StringComparison.Ordinal);
            Assert.Contains(none, e.Message, StringComparison.Ordinal);
        }

        // nvmf_get_subsystems with an unknown nqn stays -ENODEV, as SPDK.
        Assert.Equal(-19, (await _t.CallError("nvmf_get_subsystems", $$"""{"nqn":"{{none}}"}""")).Code);
    }
}
