using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Nodes;
using Microsoft.Extensions.Logging.Abstractions;
using VhostBackend.Bdev;
using VhostBackend.BdevNvme;
using VhostBackend.Rpc;
using Xunit;

namespace VhostBackend.Nvmf.Tests;

/// <summary>
/// The bdev_nvme module's discovery service (our initiator) against our target (a real peer, in process): it follows
/// Discovery Log Page Change notices, attaching subsystems that appear and detaching those that go away.
/// </summary>
public sealed class DiscoveryFollowTests : IAsyncLifetime
{
    private readonly NvmfTestTarget _t = new();
    private readonly BdevManager _hostBdevs = new();
    private readonly RpcRegistry _hostRpc = new();
    private readonly NvmeBdevModule _module = new();

    public async Task InitializeAsync()
    {
        await _t.SetupAsync();
        _hostBdevs.AddModule(_module);
        _module.Init(new BdevModuleContext(_hostBdevs, _t.Reactors, _hostRpc, new SubsystemRegistry(), NullLoggerFactory.Instance));
    }

    public async Task DisposeAsync()
    {
        await _t.Reactors.Main.InvokeAsync(async () =>
        {
            foreach (var c in _module.Controllers.ToList())
            {
                try
                {
                    await _module.DetachAsync(c.CtrlName);
                }
                catch (RpcException)
                {
                }
            }

            return true;
        });
        await _t.DisposeAsync();
    }

    private async Task<JsonNode?> Host(string method, string json)
    {
        Assert.True(_hostRpc.TryGet(method, out var handler, out _));
        using var doc = JsonDocument.Parse(json);
        var req = new RpcRequest(method, doc.RootElement.Clone());
        return await _t.Reactors.Main.InvokeAsync(() => handler(req));
    }

    private async Task<string[]> Attached()
    {
        var info = (await Host("bdev_nvme_get_discovery_info", "{}"))!.AsArray();
        return info.Count == 0 ? [] : info[0]!["attached"]!.AsArray().Select(a => a!.GetValue<string>()).ToArray();
    }

    private async Task<string[]> WaitAttached(Func<string[], bool> done)
    {
        var sw = Stopwatch.StartNew();
        string[] a;
        while (!done(a = await Attached()))
        {
            Assert.True(sw.Elapsed < TimeSpan.FromSeconds(20), $"attached after {sw.Elapsed}: [{string.Join(", ", a)}]");
            await Task.Delay(50);
        }

        return a;
    }

    [Fact]
    public async Task DiscoveryAttachesNewSubsystemsAndDetachesRemovedOnesOnLogChangeNotices()
    {
        Assert.True((await Host("bdev_nvme_start_discovery", $$"""{"name":"nvme","trtype":"TCP","adrfam":"IPv4","traddr":"127.0.0.1","trsvcid":"{{_t.Port}}","wait_for_attach":true}"""))!.GetValue<bool>());
        Assert.Equal(["nvme0"], await Attached());
        Assert.NotNull(_hostBdevs.Find("nvme0n1"));

        // A second subsystem appears on the target: its discovery controller sends a notice, the host attaches it.
        await _t.AddMalloc("Malloc1");
        const string nqn2 = "nqn.2016-06.io.spdk:cnode2";
        await _t.Call("nvmf_create_subsystem", $$"""{"nqn":"{{nqn2}}","allow_any_host":true}""");
        await _t.Call("nvmf_subsystem_add_ns", $$$"""{"nqn":"{{{nqn2}}}","namespace":{"bdev_name":"Malloc1"}}""");
        await _t.Call("nvmf_subsystem_add_listener", $$$"""{"nqn":"{{{nqn2}}}","listen_address":{"trtype":"TCP","adrfam":"IPv4","traddr":"127.0.0.1","trsvcid":"{{{_t.Port}}}"}}""");
        Assert.Equal(["nvme0", "nvme1"], await WaitAttached(a => a.Length == 2));
        var ctrl = _module.FindController("nvme1");
        Assert.NotNull(ctrl);
        Assert.Contains(nqn2, ctrl!.TridKey, StringComparison.Ordinal);
        Assert.NotNull(_hostBdevs.Find("nvme1n1"));

        // The first subsystem goes away: the host detaches its controller and its bdev.
        await _t.Call("nvmf_delete_subsystem", $$"""{"nqn":"{{NvmfTestTarget.Nqn}}"}""");
        Assert.Equal(["nvme1"], await WaitAttached(a => a.Length == 1));
        Assert.Null(_module.FindController("nvme0"));
        Assert.Null(_hostBdevs.Find("nvme0n1"));
        var info = (await Host("bdev_nvme_get_discovery_info", "{}"))!.AsArray();
        Assert.True(info[0]!["log_change_notices"]!.GetValue<int>() >= 2);

        // save_config still writes the discovery service only; stop detaches what it attached.
        var config = new JsonArray();
        _module.WriteConfig(config);
        Assert.Equal("bdev_nvme_start_discovery", Assert.Single(config)!["method"]!.GetValue<string>());
        Assert.True((await Host("bdev_nvme_stop_discovery", """{"name":"nvme"}"""))!.GetValue<bool>());
        Assert.Null(_module.FindController("nvme1"));
        Assert.Null(_hostBdevs.Find("nvme1n1"));
    }

    [Fact]
    public async Task WithoutWaitForAttachTheCallReturnsAndTheSubsystemsAreAttachedAfterIt()
    {
        // SPDK's default (wait_for_attach absent): the call does not wait for the attaches; they still happen, and
        // save_config writes the flag as it was given.
        Assert.True((await Host("bdev_nvme_start_discovery", $$"""{"name":"nvme","trtype":"TCP","adrfam":"IPv4","traddr":"127.0.0.1","trsvcid":"{{_t.Port}}"}"""))!.GetValue<bool>());
        Assert.Equal(["nvme0"], await WaitAttached(a => a.Length == 1));
        var sw = Stopwatch.StartNew();
        while (_hostBdevs.Find("nvme0n1") is null)
        {
            Assert.True(sw.Elapsed < TimeSpan.FromSeconds(20), "nvme0n1 never appeared");
            await Task.Delay(50);
        }

        var config = new JsonArray();
        _module.WriteConfig(config);
        Assert.False(Assert.Single(config)!["params"]!["wait_for_attach"]!.GetValue<bool>());

        // An unreachable discovery controller is still the call's error (not a silent background failure).
        var err = await Assert.ThrowsAsync<RpcException>(() => Host("bdev_nvme_start_discovery", """{"name":"d2","trtype":"TCP","traddr":"127.0.0.1","trsvcid":"1"}"""));
        Assert.Equal(-19, err.Code);
    }
}

/// <summary>
/// A Discovery Log Page Change notice that arrives while bdev_nvme_start_discovery is still attaching what the first
/// log listed: the subsystem the notice announces must end up attached (and stay attached).
/// </summary>
public sealed class DiscoveryStartRaceTests : IAsyncLifetime
{
    private const string Nqn2 = "nqn.2016-06.io.spdk:cnode2";
    private readonly NvmfTestTarget _t = new();
    private readonly BdevManager _hostBdevs = new();
    private readonly RpcRegistry _hostRpc = new();
    private readonly ManualResetEventSlim _gate = new(false);
    private readonly NvmeBdevModule _module;

    public DiscoveryStartRaceTests()
    {
        // The first subsystem's attach waits at the gate: start_discovery's first pass is still running.
        _module = NvmeBdevModule.WithAttachTcp((trid, opts, log) =>
        {
            if (trid.SubNqn == NvmfTestTarget.Nqn)
            {
                _gate.Wait(TimeSpan.FromSeconds(30));
            }

            return Nvme.Tcp.NvmeTcpController.Attach(trid, opts, log);
        });
    }

    public async Task InitializeAsync()
    {
        await _t.SetupAsync();
        _hostBdevs.AddModule(_module);
        _module.Init(new BdevModuleContext(_hostBdevs, _t.Reactors, _hostRpc, new SubsystemRegistry(), NullLoggerFactory.Instance));
    }

    public async Task DisposeAsync()
    {
        _gate.Set();
        await _t.Reactors.Main.InvokeAsync(async () =>
        {
            foreach (var c in _module.Controllers.ToList())
            {
                try
                {
                    await _module.DetachAsync(c.CtrlName);
                }
                catch (RpcException)
                {
                }
            }

            return true;
        });
        await _t.DisposeAsync();
    }

    private async Task<JsonNode?> Host(string method, string json)
    {
        Assert.True(_hostRpc.TryGet(method, out var handler, out _));
        using var doc = JsonDocument.Parse(json);
        var req = new RpcRequest(method, doc.RootElement.Clone());
        return await _t.Reactors.Main.InvokeAsync(() => handler(req));
    }

    private async Task<string[]> Attached()
    {
        var info = (await Host("bdev_nvme_get_discovery_info", "{}"))!.AsArray();
        return info.Count == 0 ? [] : info[0]!["attached"]!.AsArray().Select(a => a!.GetValue<string>()).OrderBy(a => a, StringComparer.Ordinal).ToArray();
    }

    [Fact]
    public async Task ANoticeDuringTheFirstAttachPassIsFollowedAndNotUndone()
    {
        var start = Host("bdev_nvme_start_discovery", $$"""{"name":"nvme","trtype":"TCP","adrfam":"IPv4","traddr":"127.0.0.1","trsvcid":"{{_t.Port}}","wait_for_attach":true}""");

        // Once the discovery controller is up (its AER outstanding: the target's discovery controller holds one),
        // a second subsystem appears while the first pass waits at the gate.
        var sw = Stopwatch.StartNew();
        while (!_t.Target.Subsystems.Where(s => s.IsDiscovery).SelectMany(_t.Target.ControllersOf).Any(c => c.PendingAsyncEventRequests > 0))
        {
            Assert.True(sw.Elapsed < TimeSpan.FromSeconds(20), "the discovery controller posted no AER");
            await Task.Delay(20);
        }

        await _t.AddMalloc("Malloc1");
        await _t.Call("nvmf_create_subsystem", $$"""{"nqn":"{{Nqn2}}","allow_any_host":true}""");
        await _t.Call("nvmf_subsystem_add_ns", $$$"""{"nqn":"{{{Nqn2}}}","namespace":{"bdev_name":"Malloc1"}}""");
        await _t.Call("nvmf_subsystem_add_listener", $$$"""{"nqn":"{{{Nqn2}}}","listen_address":{"trtype":"TCP","adrfam":"IPv4","traddr":"127.0.0.1","trsvcid":"{{{_t.Port}}}"}}""");

        // Give a refresh running beside the first pass time to attach the new subsystem (it must not be undone by
        // the first pass); serialized after the first pass, nothing is attached while the gate is closed.
        sw.Restart();
        while (!_module.Controllers.Any(c => c.TridKey.Contains(Nqn2, StringComparison.Ordinal)) && sw.Elapsed < TimeSpan.FromSeconds(3))
        {
            await Task.Delay(20);
        }

        _gate.Set();
        Assert.True((await start)!.GetValue<bool>());

        sw.Restart();
        string[] a;
        while ((a = await Attached()).Length != 2)
        {
            Assert.True(sw.Elapsed < TimeSpan.FromSeconds(20), $"attached: [{string.Join(", ", a)}]");
            await Task.Delay(50);
        }

        await Task.Delay(500);
        Assert.Equal(2, (await Attached()).Length);
        Assert.NotNull(_hostBdevs.Find("nvme0n1"));
        Assert.NotNull(_module.Controllers.FirstOrDefault(c => c.TridKey.Contains(Nqn2, StringComparison.Ordinal)));
    }
}

/// <summary>
/// The discovery controller's connection is lost (the target closed it): the discovery service reconnects, as SPDK's
/// discovery_poller does, and keeps following the log.
/// </summary>
public sealed class DiscoveryReconnectTests : IAsyncLifetime
{
    private const string Nqn2 = "nqn.2016-06.io.spdk:cnode2";
    private readonly NvmfTestTarget _t = new();
    private readonly BdevManager _hostBdevs = new();
    private readonly RpcRegistry _hostRpc = new();
    private readonly NvmeBdevModule _module = new();

    public async Task InitializeAsync()
    {
        await _t.SetupAsync();
        _hostBdevs.AddModule(_module);
        _module.Init(new BdevModuleContext(_hostBdevs, _t.Reactors, _hostRpc, new SubsystemRegistry(), NullLoggerFactory.Instance));
    }

    public async Task DisposeAsync()
    {
        await _t.Reactors.Main.InvokeAsync(async () =>
        {
            foreach (var c in _module.Controllers.ToList())
            {
                try
                {
                    await _module.DetachAsync(c.CtrlName);
                }
                catch (RpcException)
                {
                }
            }

            return true;
        });
        await _t.DisposeAsync();
    }

    private async Task<JsonNode?> Host(string method, string json)
    {
        Assert.True(_hostRpc.TryGet(method, out var handler, out _));
        using var doc = JsonDocument.Parse(json);
        var req = new RpcRequest(method, doc.RootElement.Clone());
        return await _t.Reactors.Main.InvokeAsync(() => handler(req));
    }

    private NvmfController[] DiscoveryControllers() =>
        _t.Target.Subsystems.Where(s => s.IsDiscovery).SelectMany(_t.Target.ControllersOf).ToArray();

    [Fact]
    public async Task TheDiscoveryControllerIsReconnectedAndFollowedAfterItsConnectionIsLost()
    {
        Assert.True((await Host("bdev_nvme_start_discovery", $$"""{"name":"nvme","trtype":"TCP","adrfam":"IPv4","traddr":"127.0.0.1","trsvcid":"{{_t.Port}}","wait_for_attach":true}"""))!.GetValue<bool>());
        Assert.NotNull(_module.FindController("nvme0"));
        var first = Assert.Single(DiscoveryControllers());

        // The target drops the discovery connection (as a target restart would).
        first.AdminConnection.CloseAsync("test: connection dropped");
        var sw = Stopwatch.StartNew();
        while (!DiscoveryControllers().Any(c => c != first && c.PendingAsyncEventRequests > 0))
        {
            Assert.True(sw.Elapsed < TimeSpan.FromSeconds(20), "the discovery controller was not reconnected (with an AER posted)");
            await Task.Delay(50);
        }

        // A subsystem added afterwards is attached: the log is followed again.
        await _t.AddMalloc("Malloc1");
        await _t.Call("nvmf_create_subsystem", $$"""{"nqn":"{{Nqn2}}","allow_any_host":true}""");
        await _t.Call("nvmf_subsystem_add_ns", $$$"""{"nqn":"{{{Nqn2}}}","namespace":{"bdev_name":"Malloc1"}}""");
        await _t.Call("nvmf_subsystem_add_listener", $$$"""{"nqn":"{{{Nqn2}}}","listen_address":{"trtype":"TCP","adrfam":"IPv4","traddr":"127.0.0.1","trsvcid":"{{{_t.Port}}}"}}""");
        sw.Restart();
        while (!_module.Controllers.Any(c => c.TridKey.Contains(Nqn2, StringComparison.Ordinal)))
        {
            Assert.True(sw.Elapsed < TimeSpan.FromSeconds(20), "the new subsystem was not attached");
            await Task.Delay(50);
        }

        Assert.NotNull(_module.FindController("nvme0"));
    }
}
