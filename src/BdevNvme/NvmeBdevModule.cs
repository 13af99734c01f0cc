using System.Text.Json.Nodes;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using VhostBackend.Bdev;
using VhostBackend.Nvme;
using VhostBackend.Reactors;
using VhostBackend.Rpc;

namespace VhostBackend.BdevNvme;

/// <summary>
/// The NVMe bdev module (SPDK's module/bdev/nvme, module name "nvme"): attached controllers by name, a bdev per
/// active namespace, and their RPC methods (bdev_nvme_attach_controller, bdev_nvme_detach_controller,
/// bdev_nvme_get_controllers, bdev_nvme_reset_controller). Handlers run on the main reactor.
/// save_config writes one bdev_nvme_attach_controller per controller from <see cref="WriteConfig"/> (SPDK's
/// bdev_nvme_config_json; its namespace bdevs write nothing), so a controller is saved whatever its namespaces.
/// At shutdown <see cref="FiniAsync"/> detaches every controller (SPDK's bdev_nvme_library_fini).
/// </summary>
public sealed class NvmeBdevModule : BdevModule
{
    private static readonly TimeSpan FiniUnregisterTimeout = TimeSpan.FromSeconds(5);

    private readonly Dictionary<string, NvmeBdevController?> _ctrls = new(StringComparer.Ordinal); // null: name reserved while attaching
    private readonly List<NvmeBdevController> _attached = new(); // attach order (under _ctrls' lock)
    private readonly HashSet<string> _attaching = new(StringComparer.Ordinal); // traddrs being attached (under _ctrls' lock)
    private Func<string, NvmeControllerOptions, ILogger, NvmeController> _attach = NvmeController.AttachPci;
    private BdevManager? _bdevs;
    private ReactorRuntime? _reactors;
    private ILogger _log = NullLogger.Instance;

    /// <summary>The module over real devices: controllers are attached with <see cref="NvmeController.AttachPci"/>.</summary>
    public NvmeBdevModule()
    {
    }

    /// <summary>
    /// The module with another way to attach a controller (tests pass a controller model). A factory, not a
    /// constructor overload, so hosts that only say <c>new NvmeBdevModule()</c> need no reference to the driver.
    /// </summary>
    public static NvmeBdevModule WithAttach(Func<string, NvmeControllerOptions, ILogger, NvmeController> attach) => new() { _attach = attach };

    public override string Name => "nvme";

    private BdevManager Bdevs => _bdevs ?? throw new InvalidOperationException("the nvme bdev module is not initialized (Init)");

    public override void Init(BdevModuleContext context)
    {
        _bdevs = context.Bdevs;
        _reactors = context.Reactors;
        _log = context.LoggerFactory.CreateLogger("bdev_nvme");
        NvmeBdevRpc.Register(context.Rpc, this);
    }

    /// <summary>The attached controllers, in attach order (controllers still attaching are not listed).</summary>
    public IReadOnlyList<NvmeBdevController> Controllers
    {
        get
        {
            lock (_ctrls)
            {
                return _attached.ToArray();
            }
        }
    }

    public NvmeBdevController? Find(string name)
    {
        lock (_ctrls)
        {
            return _ctrls.GetValueOrDefault(name);
        }
    }

    /// <summary>Attaches a controller and registers a bdev per active namespace. Must run on a reactor (the admin poller lives there).</summary>
    public async Task<IReadOnlyList<string>> AttachAsync(string name, string traddr, int? numIoQueues = null)
    {
        var bdevs = Bdevs;
        var reactor = Reactor.Current ?? throw new InvalidOperationException("attach must run on a reactor");
        traddr = VfioPciDevice.NormalizeAddress(traddr);
        lock (_ctrls)
        {
            if (_ctrls.ContainsKey(name))
            {
                throw RpcException.Errno(17, $"A controller named {name} already exists");
            }

            if (_attaching.Contains(traddr) || _attached.Any(c => c.TrAddr == traddr))
            {
                throw RpcException.Errno(17, $"A controller with the same trid {traddr} already exists");
            }

            _ctrls[name] = null; // reserve the name and the address while attaching
            _attaching.Add(traddr);
        }

        NvmeController ctrl;
        try
        {
            var opts = new NvmeControllerOptions();
            if (numIoQueues is { } q)
            {
                opts.IoQueuesRequested = q;
            }

            // Bring-up blocks for a while (CAP.TO bounded): keep it off the reactor.
            ctrl = await Task.Run(() => _attach(traddr, opts, _log)).ConfigureAwait(true);
        }
        catch (Exception e) when (e is IOException or TimeoutException or UnauthorizedAccessException or ArgumentException or OutOfMemoryException)
        {
            lock (_ctrls)
            {
                _ctrls.Remove(name);
                _attaching.Remove(traddr);
            }

            _log.LogError("bdev_nvme_attach_controller {Name} {Addr} failed: {Error}", name, traddr, e.Message);
            throw RpcException.Errno(19, $"Failed to attach controller {name} at {traddr}: {e.Message}");
        }

        var bc = new NvmeBdevController(name, traddr, ctrl, reactor, _log);
        var names = new List<string>();
        try
        {
            foreach (var ns in ctrl.Namespaces)
            {
                var b = new NvmeBdev(bc, ns);
                bc.Bdevs.Add(b);
            }

            foreach (var b in bc.Bdevs)
            {
                bdevs.Register(b);
                names.Add(b.Name);
            }
        }
        catch (BdevExistsException e)
        {
            foreach (var n in names)
            {
                if (bdevs.Find(n) is { } b)
                {
                    await bdevs.UnregisterAsync(b).ConfigureAwait(true);
                }
            }

            await Task.Run(ctrl.Dispose).ConfigureAwait(true); // shutdown waits up to CAP.TO: not on the reactor
            lock (_ctrls)
            {
                _ctrls.Remove(name);
                _attaching.Remove(traddr);
            }

            throw RpcException.Errno(17, e.Message);
        }

        bc.StartAdminPoller();
        lock (_ctrls)
        {
            _ctrls[name] = bc;
            _attaching.Remove(traddr);
            _attached.Add(bc);
        }

        return names;
    }

    /// <summary>Unregisters the controller's bdevs (waiting for their users to close them), then detaches it.</summary>
    public Task DetachAsync(string name) => DetachAsync(name, unregisterTimeout: null);

    private async Task DetachAsync(string name, TimeSpan? unregisterTimeout)
    {
        var bdevs = Bdevs;
        NvmeBdevController? bc;
        lock (_ctrls)
        {
            bc = _ctrls.GetValueOrDefault(name);
            if (bc is null)
            {
                throw RpcException.Errno(19, $"Failed to find NVMe controller {name}");
            }

            _ctrls.Remove(name);
            _attached.Remove(bc);
        }

        foreach (var b in bc.Bdevs)
        {
            if (bdevs.Find(b.Name) == b)
            {
                await bdevs.UnregisterAsync(b, unregisterTimeout).ConfigureAwait(true);
            }
        }

        bc.MarkGone();

        // Channels are released on their reactors once the bdev channels above them are gone.
        for (int i = 0; i < 500 && bc.SnapshotChannels().Length > 0; i++)
        {
            await Task.Delay(10).ConfigureAwait(true);
        }

        bc.StopAdminPoller();
        if (bc.SnapshotChannels().Length > 0)
        {
            _log.LogError("NVMe controller {Name}: channels still open after detach; controller left enabled", name);
            return;
        }

        await Task.Run(bc.Controller.Dispose).ConfigureAwait(true);
    }

    /// <summary>
    /// Shutdown: detaches every controller on the main reactor, newest first (the vhost layer, registered later,
    /// has stopped already, so nothing should hold the namespaces open; a bdev still open after a few seconds is
    /// dropped as the host would).
    /// </summary>
    public override async Task FiniAsync()
    {
        if (_reactors is null)
        {
            return;
        }

        await _reactors.Main.InvokeAsync(async () =>
        {
            foreach (var c in Controllers.Reverse())
            {
                try
                {
                    await DetachAsync(c.CtrlName, FiniUnregisterTimeout).ConfigureAwait(true);
                }
                catch (RpcException)
                {
                    // Detached meanwhile (an RPC raced the shutdown).
                }
            }

            return true;
        }).ConfigureAwait(false);
    }

    /// <summary>One bdev_nvme_attach_controller per attached controller, in attach order (SPDK's bdev_nvme_config_json).</summary>
    public override void WriteConfig(JsonArray calls)
    {
        foreach (var c in Controllers)
        {
            calls.Add(Subsystem.Call("bdev_nvme_attach_controller", new JsonObject { ["name"] = c.CtrlName, ["trtype"] = "PCIe", ["traddr"] = c.TrAddr }));
        }
    }

    public JsonArray GetControllers(string? name)
    {
        var list = new JsonArray();
        foreach (var c in Controllers.OrderBy(c => c.CtrlName, StringComparer.Ordinal))
        {
            if (name is not null && c.CtrlName != name)
            {
                continue;
            }

            list.Add(new JsonObject
            {
                ["name"] = c.CtrlName,
                ["ctrlrs"] = new JsonArray
                {
                    new JsonObject
                    {
                        ["state"] = c.IsRemoved || c.Controller.ResetError is not null ? "failed" : c.IsResetting ? "resetting" : "enabled",
                        ["trid"] = new JsonObject { ["trtype"] = "PCIe", ["traddr"] = c.TrAddr },
                        ["cntlid"] = c.Controller.Data.ControllerId,
                        ["host"] = new JsonObject { ["nqn"] = "", ["addr"] = "", ["svcid"] = "" },

                        // Extension fields (not in SPDK): resets done, how long the last took, and the longest single
                        // control-path step on a reactor since it started.
                        ["reset_count"] = c.Controller.ResetCount,
                        ["last_reset_us"] = Math.Round(c.LastResetMicroseconds, 1),
                        ["max_control_step_us"] = Math.Round(c.MaxControlStepMicroseconds, 1),
                    },
                },
            });
        }

        if (name is not null && list.Count == 0)
        {
            throw RpcException.Errno(19, $"Controller {name} does not exist");
        }

        return list;
    }
}
