using System.Text.Json.Nodes;
using System.Text.Json.Serialization;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using VhostBackend.Bdev;
using VhostBackend.Bdev.Rpc;
using VhostBackend.Nvme;
using VhostBackend.Reactors;
using VhostBackend.Rpc;

namespace VhostBackend.BdevNvme;

/// <summary>bdev_nvme_attach_controller params (SPDK's names; PCIe only, fabrics fields are accepted and must be empty).</summary>
public sealed class AttachControllerParams : IRpcParams
{
    [JsonRequired] public string Name { get; set; } = "";
    [JsonRequired] public string Trtype { get; set; } = "";
    [JsonRequired] public string Traddr { get; set; } = "";
    public string? Adrfam { get; set; }
    public string? Trsvcid { get; set; }
    public string? Priority { get; set; }
    public string? Subnqn { get; set; }
    public string? Hostnqn { get; set; }
    public string? Hostaddr { get; set; }
    public string? Hostsvcid { get; set; }
    public bool? PrchkReftag { get; set; }
    public bool? PrchkGuard { get; set; }
    public bool? Hdgst { get; set; }
    public bool? Ddgst { get; set; }
    public string? Multipath { get; set; }
    public int? NumIoQueues { get; set; }
    public int? CtrlrLossTimeoutSec { get; set; }
    public int? ReconnectDelaySec { get; set; }
    public int? FastIoFailTimeoutSec { get; set; }

    public void Validate()
    {
        if (string.IsNullOrWhiteSpace(Name) || Name.Length > 128 || Name.Any(c => char.IsWhiteSpace(c) || c == '/'))
        {
            throw RpcException.Errno(22, "name must be a non-empty word");
        }

        if (!string.Equals(Trtype, "PCIe", StringComparison.OrdinalIgnoreCase))
        {
            throw RpcException.Errno(22, $"Failed to parse trtype: {Trtype} (only PCIe is supported)"); // SPDK: -EINVAL
        }

        if (!VfioPciDevice.TryNormalizeAddress(Traddr, out _))
        {
            throw RpcException.Errno(22, $"Failed to parse traddr: {Traddr}");
        }

        if (NumIoQueues is < 1 or > 65535)
        {
            throw RpcException.Errno(22, "num_io_queues must be between 1 and 65535");
        }
    }
}

public sealed class DetachControllerParams
{
    [JsonRequired] public string Name { get; set; } = "";
    public string? Trtype { get; set; }
    public string? Traddr { get; set; }
    public string? Adrfam { get; set; }
    public string? Trsvcid { get; set; }
    public string? Subnqn { get; set; }
    public string? Hostaddr { get; set; }
    public string? Hostsvcid { get; set; }
}

public sealed class GetControllersParams
{
    public string? Name { get; set; }
}

/// <summary>bdev_nvme_reset_controller params (SPDK's: the controller's name, optionally the cntlid of one of its paths).</summary>
public sealed class ResetControllerParams
{
    [JsonRequired] public string Name { get; set; } = "";
    public ushort? Cntlid { get; set; }
}

/// <summary>
/// The NVMe bdev module: attached controllers by name and their RPC methods (bdev_nvme_attach_controller,
/// bdev_nvme_detach_controller, bdev_nvme_get_controllers, bdev_nvme_reset_controller). Handlers run on the main reactor.
/// </summary>
public sealed class NvmeBdevModule
{
    private readonly Dictionary<string, NvmeBdevController> _ctrls = new(StringComparer.Ordinal);
    private readonly BdevManager _bdevs;
    private readonly ILogger _log;
    private readonly Func<string, NvmeControllerOptions, ILogger, NvmeController> _attach;

    /// <param name="attach">How a controller is attached (default: <see cref="NvmeController.AttachPci"/>; tests pass a model).</param>
    public NvmeBdevModule(BdevManager bdevs, ILogger? log = null, Func<string, NvmeControllerOptions, ILogger, NvmeController>? attach = null)
    {
        _bdevs = bdevs;
        _log = log ?? bdevs.Logger ?? NullLogger.Instance;
        _attach = attach ?? ((addr, opts, l) => NvmeController.AttachPci(addr, opts, l));
    }

    public IReadOnlyList<NvmeBdevController> Controllers
    {
        get
        {
            lock (_ctrls)
            {
                return _ctrls.Values.ToArray();
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
        var reactor = Reactor.Current ?? throw new InvalidOperationException("attach must run on a reactor");
        traddr = VfioPciDevice.NormalizeAddress(traddr);
        lock (_ctrls)
        {
            if (_ctrls.ContainsKey(name))
            {
                throw RpcException.Errno(17, $"A controller named {name} already exists");
            }

            if (_ctrls.Values.Any(c => c.TrAddr == traddr))
            {
                throw RpcException.Errno(17, $"A controller with the same trid {traddr} already exists");
            }

            _ctrls[name] = null!; // reserve the name while attaching
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
                _bdevs.Register(b);
                names.Add(b.Name);
            }
        }
        catch (BdevExistsException e)
        {
            foreach (var n in names)
            {
                if (_bdevs.Find(n) is { } b)
                {
                    await _bdevs.UnregisterAsync(b).ConfigureAwait(true);
                }
            }

            await Task.Run(ctrl.Dispose).ConfigureAwait(true); // shutdown waits up to CAP.TO: not on the reactor
            lock (_ctrls)
            {
                _ctrls.Remove(name);
            }

            throw RpcException.Errno(17, e.Message);
        }

        bc.StartAdminPoller();
        lock (_ctrls)
        {
            _ctrls[name] = bc;
        }

        return names;
    }

    /// <summary>Unregisters the controller's bdevs (waiting for their users to close them), then detaches it.</summary>
    public async Task DetachAsync(string name)
    {
        NvmeBdevController? bc;
        lock (_ctrls)
        {
            bc = _ctrls.GetValueOrDefault(name);
            if (bc is null)
            {
                throw RpcException.Errno(19, $"Failed to find NVMe controller {name}");
            }

            _ctrls.Remove(name);
        }

        foreach (var b in bc.Bdevs)
        {
            if (_bdevs.Find(b.Name) == b)
            {
                await _bdevs.UnregisterAsync(b).ConfigureAwait(true);
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

    public JsonArray GetControllers(string? name)
    {
        var list = new JsonArray();
        foreach (var c in Controllers.Where(c => c is not null).OrderBy(c => c.CtrlName, StringComparer.Ordinal))
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
                        ["state"] = c.IsRemoved ? "failed" : c.IsResetting ? "resetting" : "enabled",
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

/// <summary>Registers the NVMe bdev module's RPC methods.</summary>
public static class NvmeBdevRpc
{
    /// <summary>
    /// Registers bdev_nvme_attach_controller, bdev_nvme_detach_controller, bdev_nvme_get_controllers and
    /// bdev_nvme_reset_controller. The bdevs' <see cref="NvmeBdev.ConfigCall"/> write the attach calls into the
    /// bdev subsystem's config, so <paramref name="subsystems"/> is not needed (kept for symmetry with other modules).
    /// </summary>
    public static NvmeBdevModule Register(RpcRegistry rpc, SubsystemRegistry? subsystems, BdevManager bdevs, NvmeBdevModule? module = null)
    {
        _ = subsystems;
        module ??= new NvmeBdevModule(bdevs);
        rpc.Register("bdev_nvme_attach_controller", async r =>
        {
            var p = BdevRpc.Decode<AttachControllerParams>(r);
            var names = await module.AttachAsync(p.Name, p.Traddr, p.NumIoQueues).ConfigureAwait(true);
            var arr = new JsonArray();
            foreach (var n in names)
            {
                arr.Add(n);
            }

            return arr;
        }, RpcStates.Both);

        rpc.Register("bdev_nvme_detach_controller", async r =>
        {
            var p = BdevRpc.Decode<DetachControllerParams>(r);
            if (module.Find(p.Name) is { } c && p.Traddr is not null
                && (!VfioPciDevice.TryNormalizeAddress(p.Traddr, out var a) || a != c.TrAddr))
            {
                throw RpcException.Errno(19, $"Controller {p.Name} has no path {p.Traddr}");
            }

            await module.DetachAsync(p.Name).ConfigureAwait(true);
            return (JsonNode?)true;
        }, RpcStates.Runtime);

        rpc.Register("bdev_nvme_get_controllers", r => module.GetControllers(BdevRpc.Decode<GetControllersParams>(r).Name), RpcStates.Runtime);

        rpc.Register("bdev_nvme_reset_controller", async r =>
        {
            // Completes when the controller is reset and every channel's queue pair reconnected; no reactor waits.
            var p = BdevRpc.Decode<ResetControllerParams>(r);
            var c = module.Find(p.Name);
            if (c is null || (p.Cntlid is { } id && id != c.Controller.Data.ControllerId))
            {
                throw RpcException.Errno(19, $"Failed to find NVMe controller {p.Name}" + (p.Cntlid is { } i ? $" with cntlid {i}" : ""));
            }

            try
            {
                await c.ResetAsync().ConfigureAwait(true);
            }
            catch (IOException e)
            {
                throw RpcException.Errno(5, e.Message);
            }

            return (JsonNode?)true;
        }, RpcStates.Runtime);

        return module;
    }
}
