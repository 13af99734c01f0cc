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
/// What the discovery tests share: our target (a real peer, in process) and, as the host, the bdev_nvme module with its
/// own bdev layer and RPC registry, driven through its RPC handlers on the target's main reactor.
/// </summary>
public abstract class DiscoveryTestBase : IAsyncLifetime
{
    protected const string Nqn2 = "nqn.2016-06.io.spdk:cnode2";

    protected DiscoveryTestBase(NvmeBdevModule? module = null) => Module = module ?? new NvmeBdevModule();

    protected NvmfTestTarget T { get; } = new();
    protected BdevManager HostBdevs { get; } = new();
    protected RpcRegistry HostRpc { get; } = new();
    protected NvmeBdevModule Module { get; }

    public async Task InitializeAsync()
    {
        await T.SetupAsync();
        HostBdevs.AddModule(Module);
        Module.Init(new BdevModuleContext(HostBdevs, T.Reactors, HostRpc, new SubsystemRegistry(), NullLoggerFactory.Instance));
    }

    /// <summary>Before the teardown (a test holding the module back lets it go here).</summary>
    protected virtual void BeforeDispose()
    {
    }

    public async Task DisposeAsync()
    {
        BeforeDispose();
        await T.Reactors.Main.InvokeAsync(async () =>
        {
            foreach (var c in Module.Controllers.ToList())
            {
                try
                {
                    await Module.DetachAsync(c.CtrlName);
                }
                catch (RpcException)
                {
                }
            }

            return true;
        });
        await T.DisposeAsync();
    }

    protected async Task<JsonNode?> Host(string method, string json)
    {
        Assert.True(HostRpc.TryGet(method, out var handler, out _));
        using var doc = JsonDocument.Parse(json);
        var req = new RpcRequest(method, doc.RootElement.Clone());
        return await T.Reactors.Main.InvokeAsync(() => handler(req));
    }

    /// <summary>bdev_nvme_start_discovery "nvme" against the target (wait_for_attach as given; absent when null).</summary>
    protected Task<JsonNode?> StartDiscovery(bool? waitForAttach = true)
    {
        string wait = waitForAttach switch
        {
            true => ""","wait_for_attach":true""",
            false => ""","wait_for_attach":false""",
            null => "",
        };
        return Host("bdev_nvme_start_discovery", $$"""{"name":"nvme","trtype":"TCP","adrfam":"IPv4","traddr":"127.0.0.1","trsvcid":"{{T.Port}}"{{wait}}}""");
    }

    /// <summary>The names the discovery service attached, sorted.</summary>
    protected async Task<string[]> Attached()
    {
        var info = (await Host("bdev_nvme_get_discovery_info", "{}"))!.AsArray();
        return info.Count == 0 ? [] : info[0]!["attached"]!.AsArray().Select(a => a!.GetValue<string>()).OrderBy(a => a, StringComparer.Ordinal).ToArray();
    }

    protected async Task<string[]> WaitAttached(Func<string[], bool> done)
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

    /// <summary>A second subsystem appears on the target (Malloc1 as its namespace, on the same listener).</summary>
    protected async Task AddSecondSubsystem()
    {
        await T.AddMalloc("Malloc1");
        await T.Call("nvmf_create_subsystem", $$"""{"nqn":"{{Nqn2}}","allow_any_host":true}""");
        await T.Call("nvmf_subsystem_add_ns", $$$"""{"nqn":"{{{Nqn2}}}","namespace":{"bdev_name":"Malloc1"}}""");
        await T.Call("nvmf_subsystem_add_listener", $$$"""{"nqn":"{{{Nqn2}}}","listen_address":{"trtype":"TCP","adrfam":"IPv4","traddr":"127.0.0.1","trsvcid":"{{{T.Port}}}"}}""");
    }

    /// <summary>The target's controllers of its discovery subsystem.</summary>
    protected NvmfController[] DiscoveryControllers() =>
        T.Target.Subsystems.Where(s => s.IsDiscovery).SelectMany(T.Target.ControllersOf).ToArray();

    protected async Task WaitFor(Func<bool> cond, string what)
    {
        var sw = Stopwatch.StartNew();
        while (!cond())
        {
            Assert.True(sw.Elapsed < TimeSpan.FromSeconds(20), what);
            await Task.Delay(50);
        }
    }
}

/// <summary>
/// The bdev_nvme module's discovery service (our initiator) against our target (a real peer, in process): it follows
/// Discovery Log Page Change notices, attaching subsystems that appear and detaching those that go away.
/// </summary>
public sealed class DiscoveryFollowTests : DiscoveryTestBase
{
    [Fact]
    public async Task DiscoveryAttachesNewSubsystemsAndDetachesRemovedOnesOnLogChangeNotices()
    {
        Assert.True((await StartDiscovery())!.GetValue<bool>());
        Assert.Equal(["nvme0"], await Attached());
        Assert.NotNull(HostBdevs.Find("nvme0n1"));

        // A second subsystem appears on the target: its discovery controller sends a notice, the host attaches it.
        await AddSecondSubsystem();
        Assert.Equal(["nvme0", "nvme1"], await WaitAttached(a => a.Length == 2));
        var ctrl = Module.FindController("nvme1");
        Assert.NotNull(ctrl);
        Assert.Contains(Nqn2, ctrl!.TridKey, StringComparison.Ordinal);
        Assert.NotNull(HostBdevs.Find("nvme1n1"));

        // The first subsystem goes away: the host detaches its controller and its bdev.
        await T.Call("nvmf_delete_subsystem", $$"""{"nqn":"{{NvmfTestTarget.Nqn}}"}""");
        Assert.Equal(["nvme1"], await WaitAttached(a => a.Length == 1));
        Assert.Null(Module.FindController("nvme0"));
        Assert.Null(HostBdevs.Find("nvme0n1"));
        var info = (await Host("bdev_nvme_get_discovery_info", "{}"))!.AsArray();
        Assert.True(info[0]!["log_change_notices"]!.GetValue<int>() >= 2);

        // save_config still writes the discovery service only; stop detaches what it attached.
        var config = new JsonArray();
        Module.WriteConfig(config);
        Assert.Equal("bdev_nvme_start_discovery", Assert.Single(config)!["method"]!.GetValue<string>());
        Assert.True((await Host("bdev_nvme_stop_discovery", """{"name":"nvme"}"""))!.GetValue<bool>());
        Assert.Null(Module.FindController("nvme1"));
        Assert.Null(HostBdevs.Find("nvme1n1"));
    }

    [Fact]
    public async Task WithoutWaitForAttachTheCallReturnsAndTheSubsystemsAreAttachedAfterIt()
    {
        // SPDK's default (wait_for_attach absent): the call does not wait for the attaches; they still happen, and
        // save_config writes the flag as it was given.
        Assert.True((await StartDiscovery(waitForAttach: null))!.GetValue<bool>());
        Assert.Equal(["nvme0"], await WaitAttached(a => a.Length == 1));
        await WaitFor(() => HostBdevs.Find("nvme0n1") is not null, "nvme0n1 never appeared");

        var config = new JsonArray();
        Module.WriteConfig(config);
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
public sealed class DiscoveryStartRaceTests : DiscoveryTestBase
{
    private readonly ManualResetEventSlim _gate;

    public DiscoveryStartRaceTests()
        : this(new ManualResetEventSlim(false))
    {
    }

    // The first subsystem's attach waits at the gate: start_discovery's first pass is still running.
    private DiscoveryStartRaceTests(ManualResetEventSlim gate)
        : base(NvmeBdevModule.WithAttachTcp((trid, opts, log) =>
        {
            if (trid.SubNqn == NvmfTestTarget.Nqn)
            {
                gate.Wait(TimeSpan.FromSeconds(30));
            }

            return Nvme.Tcp.NvmeTcpController.Attach(trid, opts, log);
        }))
    {
        _gate = gate;
    }

    protected override void BeforeDispose() => _gate.Set();

    [Fact]
    public async Task ANoticeDuringTheFirstAttachPassIsFollowedAndNotUndone()
    {
        var start = StartDiscovery();

        // Once the discovery controller is up (its AER outstanding: the target's discovery controller holds one),
        // a second subsystem appears while the first pass waits at the gate.
        await WaitFor(() => DiscoveryControllers().Any(c => c.PendingAsyncEventRequests > 0), "the discovery controller posted no AER");
        await AddSecondSubsystem();

        // Give a refresh running beside the first pass time to attach the new subsystem (it must not be undone by
        // the first pass); serialized after the first pass, nothing is attached while the gate is closed.
        var sw = Stopwatch.StartNew();
        while (!Module.Controllers.Any(c => c.TridKey.Contains(Nqn2, StringComparison.Ordinal)) && sw.Elapsed < TimeSpan.FromSeconds(3))
        {
            await Task.Delay(20);
        }

        _gate.Set();
        Assert.True((await start)!.GetValue<bool>());
        await WaitAttached(a => a.Length == 2);
        await Task.Delay(500);
        Assert.Equal(2, (await Attached()).Length);
        Assert.NotNull(HostBdevs.Find("nvme0n1"));
        Assert.NotNull(Module.Controllers.FirstOrDefault(c => c.TridKey.Contains(Nqn2, StringComparison.Ordinal)));
    }
}

/// <summary>
/// The discovery controller's connection is lost (the target closed it): the discovery service reconnects, as SPDK's
/// discovery_poller does, and keeps following the log.
/// </summary>
public sealed class DiscoveryReconnectTests : DiscoveryTestBase
{
    [Fact]
    public async Task TheDiscoveryControllerIsReconnectedAndFollowedAfterItsConnectionIsLost()
    {
        Assert.True((await StartDiscovery())!.GetValue<bool>());
        Assert.NotNull(Module.FindController("nvme0"));
        var first = Assert.Single(DiscoveryControllers());

        // The target drops the discovery connection (as a target restart would).
        first.AdminConnection.CloseAsync("test: connection dropped");
        await WaitFor(() => DiscoveryControllers().Any(c => c != first && c.PendingAsyncEventRequests > 0), "the discovery controller was not reconnected (with an AER posted)");

        // A subsystem added afterwards is attached: the log is followed again.
        await AddSecondSubsystem();
        await WaitFor(() => Module.Controllers.Any(c => c.TridKey.Contains(Nqn2, StringComparison.Ordinal)), "the new subsystem was not attached");
        Assert.NotNull(Module.FindController("nvme0"));
    }
}
