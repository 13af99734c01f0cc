using System.Text.Json.Nodes;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using VhostBackend.Bdev;
using VhostBackend.Nvme;
using VhostBackend.Nvme.Tcp;
using VhostBackend.Platform;
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

    /// <summary>How long a hot removal waits for a namespace bdev's openers to close it before dropping it.</summary>
    internal static TimeSpan HotRemoveUnregisterTimeout { get; set; } = TimeSpan.FromSeconds(10);

    private readonly Dictionary<string, NvmeBdevControllerBase?> _ctrls = new(StringComparer.Ordinal); // null: name reserved while attaching
    private readonly List<NvmeBdevControllerBase> _attached = new(); // attach order (under _ctrls' lock)
    private readonly HashSet<string> _attaching = new(StringComparer.Ordinal); // trid keys being attached (under _ctrls' lock)
    private Func<string, NvmeControllerOptions, ILogger, NvmeController> _attach = NvmeController.AttachPci;
    private Func<NvmeTcpTransportId, NvmeTcpControllerOptions, ILogger, NvmeTcpController> _attachTcp = NvmeTcpController.Attach;
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

    /// <summary>The module with another way to attach an NVMe/TCP controller (tests wrap <see cref="NvmeTcpController.Attach"/>).</summary>
    public static NvmeBdevModule WithAttachTcp(Func<NvmeTcpTransportId, NvmeTcpControllerOptions, ILogger, NvmeTcpController> attach) => new() { _attachTcp = attach };

    /// <summary>Module-wide options (bdev_nvme_set_options).</summary>
    public NvmeBdevOptions Options { get; } = new();

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
    public IReadOnlyList<NvmeBdevControllerBase> Controllers
    {
        get
        {
            lock (_ctrls)
            {
                return _attached.ToArray();
            }
        }
    }

    /// <summary>The PCIe controller named <paramref name="name"/> (null when there is none or it is another transport).</summary>
    public NvmeBdevController? Find(string name) => FindController(name) as NvmeBdevController;

    /// <summary>The controller named <paramref name="name"/>, any transport.</summary>
    public NvmeBdevControllerBase? FindController(string name)
    {
        lock (_ctrls)
        {
            return _ctrls.GetValueOrDefault(name);
        }
    }

    /// <summary>True while any controller is attached or attaching (bdev_nvme_set_options is refused then).</summary>
    public bool HasControllers
    {
        get
        {
            lock (_ctrls)
            {
                return _ctrls.Count > 0;
            }
        }
    }

    /// <summary>Attaches a PCIe controller and registers a bdev per active namespace. Must run on a reactor (the admin poller lives there).</summary>
    public Task<IReadOnlyList<string>> AttachAsync(string name, string traddr, int? numIoQueues = null, int maxBdevs = 128)
    {
        traddr = VfioPciDevice.NormalizeAddress(traddr);
        var reactor = Reactor.Current ?? throw new InvalidOperationException("attach must run on a reactor");
        var o = Options;
        var action = o.TimeoutActionValue;
        var admin = o.AdminTimeout;
        return AttachCoreAsync(name, "PCIe:" + traddr, traddr, maxBdevs, async () =>
        {
            var opts = new NvmeControllerOptions { IoTimeout = TimeSpan.FromMicroseconds(o.TimeoutUs) };
            if (admin is { } a)
            {
                opts.AdminTimeout = a;
            }

            if (numIoQueues is { } q)
            {
                opts.IoQueuesRequested = q;
            }

            // Bring-up blocks for a while (CAP.TO bounded): keep it off the reactor.
            int channels = _reactors?.Reactors.Count ?? 1;
            var ctrl = await Task.Run(() =>
            {
                var c = _attach(traddr, opts, _log);

                // Channel memory (a queue pair and bounce buffers per reactor) mapped now: a reactor opening a channel
                // then makes no VFIO call (docs/DMA.md), and channels closed and opened again reuse it. The controller
                // gives it back when it detaches (NvmeController.Dispose).
                try
                {
                    c.ReserveIoQueueMemory(channels);
                    c.ReserveDma(NvmeChannelContext.BounceBytes, channels, "vb-nvme-bounce");
                }
                catch (Exception e) when (e is IOException or OutOfMemoryException)
                {
                    _log.LogWarning("NVMe {Name}: reserving channel DMA memory failed ({Error}): channels allocate it when they open", name, e.Message);
                }

                return c;
            }).ConfigureAwait(true);
            var bc = new NvmeBdevController(name, traddr, ctrl, reactor, _log) { TimeoutAction = action, IoTimeoutTicks = (long)(o.TimeoutUs / 1e6 * Ticks.Frequency) };
            return (bc, ctrl.Namespaces);
        });
    }

    /// <summary>Attaches an NVMe/TCP controller (connect, enable, identify off the reactor) and registers a bdev per active namespace.</summary>
    public Task<IReadOnlyList<string>> AttachTcpAsync(string name, NvmeTcpTransportId trid, NvmePathLossPolicy policy, int? numIoQueues = null, TimeSpan? connectTimeout = null, int maxBdevs = 128)
    {
        var reactor = Reactor.Current ?? throw new InvalidOperationException("attach must run on a reactor");
        var o = Options;
        var opts = new NvmeTcpControllerOptions
        {
            KeepAliveTimeoutMs = o.KeepAliveTimeoutMs,
            IoQueuesRequested = numIoQueues ?? 1024,
            IoQueueEntries = o.IoQueueRequests > 0 ? o.IoQueueRequests + 1 : 128,
        };
        if (o.AdminTimeout is { } admin)
        {
            opts.AdminTimeout = admin;
        }

        if (connectTimeout is { } ct)
        {
            opts.ConnectTimeout = ct;
        }

        var action = o.TimeoutActionValue;
        long ioTimeout = (long)(o.TimeoutUs / 1e6 * Ticks.Frequency);
        string key = $"TCP:{trid.Address}:{trid.Port}:{trid.SubNqn}";
        return AttachCoreAsync(name, key, trid.ToString(), maxBdevs, async () =>
        {
            var ctrl = await Task.Run(() =>
            {
                var c = _attachTcp(trid, opts, _log);
                c.EnableAsyncEvents(); // namespace attribute notices (posted by the admin poller)
                return c;
            }).ConfigureAwait(true);
            var bc = new NvmeTcpBdevController(name, ctrl, policy, opts.IoQueueEntries, reactor, _log, OnGiveUp) { TimeoutAction = action, IoTimeoutTicks = ioTimeout };
            return (bc, ctrl.Namespaces);
        });
    }

    private sealed class DiscoveryService
    {
        public required string Name;
        public required NvmeTcpTransportId Trid;
        public required NvmePathLossPolicy Policy;
        public NvmeTcpController? Controller;
        public Poller? Poller;
        public readonly List<string> Attached = new();          // controller names, attach order (under _ctrls)
        public readonly Dictionary<string, string> ByEntry = new(StringComparer.Ordinal); // entry key -> controller name
        public int NextIndex;
        public ulong Generation;
        public bool RefreshRunning;
        public bool RefreshAgain;
        public bool Stopped;
        public int LogChanges;
        public bool WaitForAttach;

        // The discovery controller's connection was lost: reconnect attempts (on the poller's reactor).
        public required NvmeBdevModule Module;
        public bool Reconnecting;
        public bool AttemptRunning;
        public long NextAttempt;
    }

    private readonly Dictionary<string, DiscoveryService?> _discovery = new(StringComparer.Ordinal); // null: starting

    /// <summary>
    /// bdev_nvme_start_discovery: connects to the discovery controller at <paramref name="trid"/>, reads its log page and
    /// attaches every NVM subsystem it lists over TCP as controller <c>&lt;name&gt;&lt;n&gt;</c> (SPDK's naming). Entries
    /// that fail to attach are logged and skipped. The discovery controller stays connected (keep-alive) until
    /// <see cref="StopDiscoveryAsync"/>, with Discovery Log Page Change notices enabled: on each notice the log is read
    /// again, new entries are attached and controllers whose entry is gone are detached (SPDK's discovery_aer_cb).
    /// </summary>
    /// With <paramref name="attachTimeout"/> (attach_timeout_ms) a discovery controller that cannot be reached or read
    /// is retried until it passes, then the call fails with ETIMEDOUT (SPDK's behaviour); without it one attempt is made.
    /// With <paramref name="waitForAttach"/> false the call completes once the discovery controller is connected and its
    /// log read (a failure there is still the call's error); the subsystems it lists are attached after it returns
    /// (SPDK returns even earlier, before connecting; we keep the connection error for the caller).
    public async Task StartDiscoveryAsync(string name, NvmeTcpTransportId trid, NvmePathLossPolicy policy, TimeSpan? attachTimeout = null, bool waitForAttach = true)
    {
        var reactor = Reactor.Current ?? throw new InvalidOperationException("discovery must run on a reactor");
        trid = trid with { SubNqn = NvmeFabrics.DiscoveryNqn };
        lock (_ctrls)
        {
            if (_discovery.ContainsKey(name))
            {
                throw RpcException.Errno(17, $"Discovery service {name} already exists");
            }

            if (_discovery.Values.Any(d => d is not null && d.Trid.Address.Equals(trid.Address) && d.Trid.Port == trid.Port))
            {
                throw RpcException.Errno(17, $"Discovery service for {trid.Address}:{trid.Port} already exists");
            }

            _discovery[name] = null;
        }

        var svc = new DiscoveryService { Name = name, Trid = trid, Policy = policy, Module = this, WaitForAttach = waitForAttach };
        IReadOnlyList<NvmeDiscoveryEntry> entries;
        long deadline = attachTimeout is { } at ? Environment.TickCount64 + (long)at.TotalMilliseconds : 0;
        while (true)
        {
            try
            {
                var opts = new NvmeTcpControllerOptions { KeepAliveTimeoutMs = Options.KeepAliveTimeoutMs };
                svc.Controller = await Task.Run(() => _attachTcp(trid, opts, _log)).ConfigureAwait(true);
                entries = await Task.Run(() =>
                {
                    // Notices on before the first read: a target (SPDK's) drops a Discovery Log Page Change while the
                    // AEC bit is off, so a change between this read and the poller's Set Features would be missed.
                    var dc = svc.Controller;
                    var aec = new NvmeCommand { Opcode = NvmeAdminOpcode.SetFeatures, Cdw10 = NvmeFeature.AsyncEventConfiguration, Cdw11 = NvmeAsyncEvent.DiscoveryLogChangeNotices };
                    if (dc.ExecuteAdmin(aec, null, 0) is { IsSuccess: false } st)
                    {
                        _log.LogWarning("discovery {Name}: Set Features (asynchronous event configuration) failed: {Status}", name, st);
                    }

                    return dc.GetDiscoveryLog(out svc.Generation);
                }).ConfigureAwait(true);
                break;
            }
            catch (Exception e) when (e is IOException or System.Net.Sockets.SocketException or InvalidOperationException)
            {
                if (svc.Controller is { } dc)
                {
                    svc.Controller = null;
                    await Task.Run(dc.Dispose).ConfigureAwait(true);
                }

                if (deadline != 0 && Environment.TickCount64 < deadline)
                {
                    await Task.Delay(TimeSpan.FromMilliseconds(Math.Min(100, Math.Max(1, deadline - Environment.TickCount64)))).ConfigureAwait(true);
                    continue;
                }

                lock (_ctrls)
                {
                    _discovery.Remove(name);
                }

                throw deadline != 0
                    ? RpcException.Errno(110, $"Discovery {name} at {trid.Address}:{trid.Port} not attached within attach_timeout_ms: {e.Message}")
                    : RpcException.Errno(19, $"Failed to start discovery {name} at {trid.Address}:{trid.Port}: {e.Message}");
            }
        }

        // The first apply counts as a running refresh: a notice during it makes a refresh run after it. Run beside
        // it, a refresh attaching an entry new in the log was undone by this apply, which works from the older log
        // (the new controller looked "gone" from it and was detached).
        svc.RefreshRunning = true;

        // Discovery Log Page Change notices: the AER completes on the poller's reactor under the admin lock; the
        // refresh runs on the main reactor (reading the log again re-arms the notice).
        var dctrl = svc.Controller;
        dctrl.AsyncEvent = (ctrl, dw0) =>
        {
            if (NvmeAsyncEvent.IsDiscoveryLogChanged(dw0))
            {
                _reactors?.Main.Send(static st =>
                {
                    var (m, d) = ((NvmeBdevModule, DiscoveryService))st!;
                    _ = m.RefreshDiscoveryAsync(d);
                }, (this, svc));
            }
        };
        dctrl.EnableAsyncEvents(1, NvmeAsyncEvent.DiscoveryLogChangeNotices);

        svc.Poller = reactor.RegisterPoller("bdev_nvme_discovery:" + name, static c => ((DiscoveryService)c!).Module.PollDiscovery((DiscoveryService)c!), svc, 10_000);
        lock (_ctrls)
        {
            _discovery[name] = svc;
        }

        var first = FirstApplyAsync(svc, entries);
        if (waitForAttach)
        {
            await first.ConfigureAwait(true);
        }
    }

    private async Task FirstApplyAsync(DiscoveryService svc, IReadOnlyList<NvmeDiscoveryEntry> entries)
    {
        try
        {
            await ApplyDiscoveryLogAsync(svc, entries).ConfigureAwait(true);
        }
        catch (Exception e) when (!svc.WaitForAttach)
        {
            // Nobody waits for this pass: an unexpected failure is logged (each entry's attach failure already is).
            _log.LogError(e, "discovery {Name}: attaching the subsystems of the first log failed", svc.Name);
        }
        finally
        {
            svc.RefreshRunning = false;
        }

        if (svc.RefreshAgain)
        {
            _ = RefreshDiscoveryAsync(svc);
        }
    }

    /// <summary>
    /// The discovery controller's poller: admin completions (keep-alive, the change notice). A lost connection (the
    /// target restarted or closed it) is reconnected, one attempt a second until it is back, as SPDK's
    /// discovery_poller does; then the log is read again, since no notice could reach us meanwhile.
    /// </summary>
    private int PollDiscovery(DiscoveryService svc)
    {
        var dc = svc.Controller;
        if (dc is null || svc.Stopped)
        {
            return 0;
        }

        if (!svc.Reconnecting)
        {
            if (!dc.IsFailed)
            {
                return dc.ProcessAdminCompletions();
            }

            _log.LogWarning("discovery {Name}: the discovery controller was lost ({Reason}); reconnecting", svc.Name, dc.FailureReason ?? "connection closed");
            svc.Reconnecting = true;
            svc.NextAttempt = 0;
        }

        if (!svc.AttemptRunning)
        {
            if (Ticks.Now() < svc.NextAttempt)
            {
                return 0;
            }

            dc.StartReconnect();
            svc.AttemptRunning = true;
        }

        int rc = dc.PollReconnect();
        if (rc == 0)
        {
            return 0;
        }

        svc.AttemptRunning = false;
        if (rc < 0)
        {
            svc.NextAttempt = Ticks.Now() + Ticks.Frequency;
            return 1;
        }

        svc.Reconnecting = false;
        _log.LogInformation("discovery {Name}: the discovery controller is back (cntlid {Cntlid}); reading the log again", svc.Name, dc.Cntlid);
        _reactors?.Main.Send(static st =>
        {
            var (m, d) = ((NvmeBdevModule, DiscoveryService))st!;
            _ = m.RefreshDiscoveryAsync(d);
        }, (this, svc));
        return 1;
    }

    /// <summary>The key of a discovery log entry: the same subsystem at the same address is the same controller.</summary>
    private static string EntryKey(NvmeDiscoveryEntry e) => $"{e.SubNqn}\n{e.TrAddr}\n{e.TrSvcId}";

    /// <summary>
    /// On the main reactor: attaches the NVM subsystem entries of <paramref name="entries"/> not attached yet and detaches
    /// the controllers this service attached whose entry is no longer listed.
    /// </summary>
    private async Task ApplyDiscoveryLogAsync(DiscoveryService svc, IReadOnlyList<NvmeDiscoveryEntry> entries)
    {
        var listed = new HashSet<string>(StringComparer.Ordinal);
        foreach (var e in entries)
        {
            if (e.SubType != NvmeDiscoveryEntry.SubTypeNvme)
            {
                continue; // referrals and discovery subsystems are not attached
            }

            if (e.TrType != NvmeDiscoveryEntry.TrTypeTcp || !System.Net.IPAddress.TryParse(e.TrAddr, out var addr)
                || !int.TryParse(e.TrSvcId, System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out int port) || port is < 1 or > 65535
                || !NvmeFabrics.IsValidNqn(e.SubNqn))
            {
                _log.LogWarning("discovery {Name}: skipping entry trtype {TrType} traddr '{Addr}' trsvcid '{Svc}' subnqn '{Nqn}'", svc.Name, e.TrType, e.TrAddr, e.TrSvcId, e.SubNqn);
                continue;
            }

            string key = EntryKey(e);
            listed.Add(key);
            lock (_ctrls)
            {
                if (svc.Stopped || svc.ByEntry.ContainsKey(key))
                {
                    continue;
                }
            }

            string ctrlName = svc.Name + svc.NextIndex.ToString(System.Globalization.CultureInfo.InvariantCulture);
            svc.NextIndex++;
            try
            {
                await AttachTcpAsync(ctrlName, svc.Trid with { Address = addr, Port = port, SubNqn = e.SubNqn }, svc.Policy).ConfigureAwait(true);
                bool stopped;
                lock (_ctrls)
                {
                    stopped = svc.Stopped;
                    if (!stopped)
                    {
                        svc.Attached.Add(ctrlName);
                        svc.ByEntry[key] = ctrlName;
                    }
                }

                if (stopped)
                {
                    await DetachAsync(ctrlName).ConfigureAwait(true); // the service stopped while this attach ran
                }
            }
            catch (RpcException ex)
            {
                _log.LogWarning("discovery {Name}: could not attach {Nqn} at {Addr}:{Port}: {Error}", svc.Name, e.SubNqn, addr, port, ex.Message);
            }
        }

        List<KeyValuePair<string, string>> gone;
        lock (_ctrls)
        {
            gone = svc.Stopped ? [] : svc.ByEntry.Where(kv => !listed.Contains(kv.Key)).ToList();
            foreach (var kv in gone)
            {
                svc.ByEntry.Remove(kv.Key);
                svc.Attached.Remove(kv.Value);
            }
        }

        foreach (var kv in gone)
        {
            _log.LogInformation("discovery {Name}: {Ctrl} is no longer in the discovery log; detaching it", svc.Name, kv.Value);
            if (FindController(kv.Value) is not null)
            {
                try
                {
                    await DetachAsync(kv.Value).ConfigureAwait(true);
                }
                catch (RpcException ex)
                {
                    _log.LogWarning("discovery {Name}: detaching {Ctrl} failed: {Error}", svc.Name, kv.Value, ex.Message);
                }
            }
        }
    }

    /// <summary>On the main reactor, after a Discovery Log Page Change notice: reads the log again and applies it; notices during a refresh make it run once more.</summary>
    private async Task RefreshDiscoveryAsync(DiscoveryService svc)
    {
        if (svc.RefreshRunning)
        {
            svc.RefreshAgain = true;
            return;
        }

        svc.RefreshRunning = true;
        try
        {
            do
            {
                svc.RefreshAgain = false;
                if (svc.Stopped || svc.Controller is not { } dc)
                {
                    return;
                }

                svc.LogChanges++;
                IReadOnlyList<NvmeDiscoveryEntry> entries;
                try
                {
                    entries = await Task.Run(() => dc.GetDiscoveryLog(out svc.Generation)).ConfigureAwait(true);
                }
                catch (Exception e) when (e is IOException or TimeoutException or InvalidOperationException or ObjectDisposedException)
                {
                    _log.LogWarning("discovery {Name}: reading the discovery log after a change notice failed: {Error}", svc.Name, e.Message);
                    return;
                }

                await ApplyDiscoveryLogAsync(svc, entries).ConfigureAwait(true);
            }
            while (svc.RefreshAgain);
        }
        finally
        {
            svc.RefreshRunning = false;
        }
    }

    /// <summary>bdev_nvme_stop_discovery: detaches the controllers the service attached and closes the discovery controller.</summary>
    public async Task StopDiscoveryAsync(string name)
    {
        DiscoveryService? svc;
        List<string> attached;
        lock (_ctrls)
        {
            svc = _discovery.GetValueOrDefault(name);
            if (svc is null)
            {
                throw RpcException.Errno(19, $"Discovery service {name} does not exist");
            }

            _discovery.Remove(name);
            svc.Stopped = true;
            attached = svc.Attached.ToList();
        }

        foreach (var c in attached)
        {
            if (FindController(c) is not null)
            {
                try
                {
                    await DetachAsync(c).ConfigureAwait(true);
                }
                catch (RpcException)
                {
                    // detached meanwhile
                }
            }
        }

        if (svc.Poller is { } p)
        {
            Reactor.Current!.UnregisterPoller(p);
        }

        if (svc.Controller is { } dc)
        {
            await Task.Run(dc.Dispose).ConfigureAwait(true);
        }
    }

    /// <summary>bdev_nvme_get_discovery_info (SPDK's shape: name, trid, referrals).</summary>
    public JsonArray GetDiscoveryInfo()
    {
        var list = new JsonArray();
        lock (_ctrls)
        {
            foreach (var d in _discovery.Values)
            {
                if (d is null)
                {
                    continue;
                }

                list.Add(new JsonObject
                {
                    ["name"] = d.Name,
                    ["trid"] = new JsonObject
                    {
                        ["trtype"] = "TCP",
                        ["adrfam"] = d.Trid.Family == System.Net.Sockets.AddressFamily.InterNetworkV6 ? "IPv6" : "IPv4",
                        ["traddr"] = d.Trid.Address.ToString(),
                        ["trsvcid"] = d.Trid.Port.ToString(System.Globalization.CultureInfo.InvariantCulture),
                        ["subnqn"] = NvmeFabrics.DiscoveryNqn,
                    },
                    ["referrals"] = new JsonArray(),
                    ["attached"] = new JsonArray(d.Attached.Select(a => (JsonNode?)a).ToArray()), // extension fields
                    ["log_change_notices"] = d.LogChanges,
                });
            }
        }

        return list;
    }

    private void OnNamespacesChanged(NvmeBdevControllerBase c) => _reactors?.Main.Send(static s =>
    {
        var (m, bc) = ((NvmeBdevModule, NvmeBdevControllerBase))s!;
        _ = m.RefreshNamespacesAsync(bc);
    }, (this, c));

    /// <summary>
    /// On the main reactor, after a namespace attribute notice (SPDK's nvme_ctrlr_populate_namespaces): identifies
    /// the namespaces again off the reactor, then unregisters the bdevs of namespaces that are gone (or changed block
    /// size), resizes those whose size changed and registers a bdev for each new one (up to max_bdevs). Notices that
    /// arrive while a refresh runs make it run once more.
    /// </summary>
    internal async Task RefreshNamespacesAsync(NvmeBdevControllerBase bc)
    {
        if (bc.RefreshRunning)
        {
            bc.RefreshAgain = true;
            return;
        }

        bc.RefreshRunning = true;
        try
        {
            do
            {
                bc.RefreshAgain = false;
                IReadOnlyList<NvmeNamespace> found;
                try
                {
                    found = await Task.Run(bc.RescanNamespaces).ConfigureAwait(true);
                }
                catch (Exception e) when (e is IOException or TimeoutException or InvalidOperationException or ObjectDisposedException or ArgumentException)
                {
                    _log.LogWarning("NVMe {Name}: namespace rescan failed: {Error}", bc.CtrlName, e.Message);
                    return;
                }

                await ApplyNamespacesAsync(bc, found).ConfigureAwait(true);
            }
            while (bc.RefreshAgain);
        }
        finally
        {
            bc.RefreshRunning = false;
        }
    }

    private async Task ApplyNamespacesAsync(NvmeBdevControllerBase bc, IReadOnlyList<NvmeNamespace> found)
    {
        var bdevs = Bdevs;
        var byId = new Dictionary<uint, NvmeNamespace>();
        foreach (var ns in found)
        {
            byId.TryAdd(ns.Id, ns);
        }

        foreach (var b in bc.Bdevs.ToArray())
        {
            if (FindController(bc.CtrlName) != bc || bc.Removing)
            {
                return; // detached meanwhile: the detach unregisters the rest
            }

            if (!byId.TryGetValue(b.Namespace.Id, out var ns) || ns.BlockSize != b.BlockSize)
            {
                _log.LogInformation("NVMe {Name}: namespace {Nsid} removed: unregistering {Bdev}", bc.CtrlName, b.Namespace.Id, b.Name);
                bc.Bdevs.Remove(b);
                if (bdevs.Find(b.Name) == b)
                {
                    await bdevs.UnregisterAsync(b).ConfigureAwait(true);
                }
            }
            else if (ns.BlockCount != b.BlockCount)
            {
                _log.LogInformation("NVMe {Name}: namespace {Nsid} resized: {Old} -> {New} blocks", bc.CtrlName, ns.Id, b.BlockCount, ns.BlockCount);
                b.Resize(ns);
            }
        }

        foreach (var ns in found)
        {
            if (FindController(bc.CtrlName) != bc || bc.Removing)
            {
                return;
            }

            if (bc.Bdevs.Exists(b => b.Namespace.Id == ns.Id))
            {
                continue;
            }

            if (bc.Bdevs.Count >= bc.MaxBdevs)
            {
                _log.LogWarning("NVMe {Name}: namespace {Nsid} gets no bdev: max_bdevs ({Max}) reached", bc.CtrlName, ns.Id, bc.MaxBdevs);
                continue;
            }

            var nb = new NvmeBdev(bc, ns);
            try
            {
                bdevs.Register(nb);
            }
            catch (BdevExistsException e)
            {
                _log.LogWarning("NVMe {Name}: namespace {Nsid}: {Error}", bc.CtrlName, ns.Id, e.Message);
                continue;
            }

            bc.Bdevs.Add(nb);
            _log.LogInformation("NVMe {Name}: namespace {Nsid} added as {Bdev}", bc.CtrlName, ns.Id, nb.Name);
        }
    }

    private void OnGiveUp(NvmeTcpBdevController c)
    {
        // SPDK deletes a controller that stayed lost for ctrlr_loss_timeout_sec.
        _reactors?.Main.Send(static s =>
        {
            var (m, name) = ((NvmeBdevModule, string))s!;
            _ = m.DetachAsync(name).ContinueWith(static _ => { }, TaskScheduler.Default);
        }, (this, c.CtrlName));
    }

    private async Task<IReadOnlyList<string>> AttachCoreAsync(string name, string tridKey, string where, int maxBdevs, Func<Task<(NvmeBdevControllerBase Ctrl, IReadOnlyList<NvmeNamespace> Namespaces)>> attach)
    {
        var bdevs = Bdevs;
        lock (_ctrls)
        {
            if (_ctrls.ContainsKey(name))
            {
                throw RpcException.Errno(17, $"A controller named {name} already exists");
            }

            if (_attaching.Contains(tridKey) || _attached.Any(c => c.TridKey == tridKey))
            {
                throw RpcException.Errno(17, $"A controller with the same trid {where} already exists");
            }

            _ctrls[name] = null; // reserve the name and the address while attaching
            _attaching.Add(tridKey);
        }

        NvmeBdevControllerBase bc;
        IReadOnlyList<NvmeNamespace> namespaces;
        try
        {
            (bc, namespaces) = await attach().ConfigureAwait(true);
        }
        catch (Exception e) when (e is IOException or TimeoutException or UnauthorizedAccessException or ArgumentException or OutOfMemoryException or System.Net.Sockets.SocketException or InvalidOperationException)
        {
            lock (_ctrls)
            {
                _ctrls.Remove(name);
                _attaching.Remove(tridKey);
            }

            _log.LogError("bdev_nvme_attach_controller {Name} {Addr} failed: {Error}", name, where, e.Message);
            throw RpcException.Errno(19, $"Failed to attach controller {name} at {where}: {e.Message}");
        }

        var names = new List<string>();
        try
        {
            if (namespaces.Count > maxBdevs)
            {
                throw new BdevExistsException($"Maximum number of namespaces supported per NVMe controller is {maxBdevs} (max_bdevs); the controller has {namespaces.Count}");
            }

            foreach (var ns in namespaces)
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

            await Task.Run(bc.DisposeDriver).ConfigureAwait(true); // shutdown may wait: not on the reactor
            lock (_ctrls)
            {
                _ctrls.Remove(name);
                _attaching.Remove(tridKey);
            }

            throw RpcException.Errno(e.Message.StartsWith("Maximum number", StringComparison.Ordinal) ? 22 : 17, e.Message);
        }

        bc.MaxBdevs = maxBdevs;
        bc.NamespacesChanged = OnNamespacesChanged;
        bc.HotRemoved = OnHotRemoved;
        bc.StartAdminPoller();
        lock (_ctrls)
        {
            _ctrls[name] = bc;
            _attaching.Remove(tridKey);
            _attached.Add(bc);
        }

        return names;
    }

    /// <summary>Unregisters the controller's bdevs (waiting for their users to close them), then detaches it.</summary>
    public Task DetachAsync(string name) => DetachAsync(name, unregisterTimeout: null);

    private void OnHotRemoved(NvmeBdevControllerBase c) => _reactors?.Main.Send(static s =>
    {
        var (m, bc) = ((NvmeBdevModule, NvmeBdevControllerBase))s!;
        _ = m.HotRemoveAsync(bc);
    }, (this, c));

    /// <summary>Completes when the hot removal of controller <paramref name="name"/> (started by the controller) has finished; at once when there is none.</summary>
    public Task WaitHotRemovedAsync(string name)
    {
        lock (_ctrls)
        {
            return _hotRemovals.GetValueOrDefault(name)?.Task ?? Task.CompletedTask;
        }
    }

    private readonly Dictionary<string, TaskCompletionSource> _hotRemovals = new(StringComparer.Ordinal); // under _ctrls' lock

    /// <summary>
    /// On the main reactor: the controller is gone (its I/O already fails). SPDK's remove_cb → bdev_nvme_delete_ctrlr:
    /// the device is given back to the kernel first (so an unbind blocked on it completes whatever the openers do),
    /// then every namespace bdev is unregistered (openers get the remove event: vhost-blk fails its queues' requests
    /// with IOERR, vhost-scsi removes the LUN and tells the guest), the name and address are freed (the same
    /// bdev_nvme_attach_controller works again) and the driver's memory is freed once every channel is gone.
    /// </summary>
    internal async Task HotRemoveAsync(NvmeBdevControllerBase bc)
    {
        TaskCompletionSource done;
        lock (_ctrls)
        {
            if (bc.Removing || _ctrls.GetValueOrDefault(bc.CtrlName) != bc)
            {
                return; // detached meanwhile, or already being removed
            }

            done = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            _hotRemovals[bc.CtrlName] = done;
        }

        try
        {
            _log.LogWarning("NVMe controller {Name}: hot removal: releasing the device, unregistering {Count} bdev(s)", bc.CtrlName, bc.Bdevs.Count);
            try
            {
                await Task.Run(bc.ReleaseDevice).ConfigureAwait(true);
            }
            catch (Exception e) when (e is IOException or InvalidOperationException or ObjectDisposedException)
            {
                _log.LogError("NVMe controller {Name}: releasing the device failed: {Error}", bc.CtrlName, e.Message);
            }

            await DetachAsync(bc.CtrlName, HotRemoveUnregisterTimeout).ConfigureAwait(true);
        }
        catch (RpcException)
        {
            // Detached meanwhile.
        }
        finally
        {
            lock (_ctrls)
            {
                if (_hotRemovals.GetValueOrDefault(bc.CtrlName) == done)
                {
                    _hotRemovals.Remove(bc.CtrlName);
                }
            }

            done.TrySetResult();
        }
    }

    private async Task DetachAsync(string name, TimeSpan? unregisterTimeout)
    {
        var bdevs = Bdevs;
        NvmeBdevControllerBase? bc;
        lock (_ctrls)
        {
            bc = _ctrls.GetValueOrDefault(name);
            if (bc is null || bc.Removing)
            {
                throw RpcException.Errno(19, $"Failed to find NVMe controller {name}");
            }

            bc.Removing = true;
        }

        foreach (var b in bc.Bdevs.ToArray()) // a namespace refresh may change the list meanwhile
        {
            if (bdevs.Find(b.Name) == b)
            {
                await bdevs.UnregisterAsync(b, unregisterTimeout).ConfigureAwait(true);
            }
        }

        // The bdevs are gone: the name and the address are free (a re-attach may follow at once).
        lock (_ctrls)
        {
            if (_ctrls.GetValueOrDefault(name) == bc)
            {
                _ctrls.Remove(name);
            }

            _attached.Remove(bc);
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

        await Task.Run(bc.DisposeDriver).ConfigureAwait(true);
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
            List<string> services;
            lock (_ctrls)
            {
                services = _discovery.Keys.ToList();
            }

            foreach (var d in services)
            {
                try
                {
                    await StopDiscoveryAsync(d).ConfigureAwait(true);
                }
                catch (RpcException)
                {
                    // Stopped meanwhile.
                }
            }

            foreach (var c in Controllers.Reverse())
            {
                try
                {
                    await DetachAsync(c.CtrlName, FiniUnregisterTimeout).ConfigureAwait(true);
                }
                catch (RpcException)
                {
                    // Detached meanwhile (an RPC raced the shutdown), or being hot-removed: let that finish.
                    await Task.WhenAny(WaitHotRemovedAsync(c.CtrlName), Task.Delay(HotRemoveUnregisterTimeout + FiniUnregisterTimeout)).ConfigureAwait(true);
                }
            }

            return true;
        }).ConfigureAwait(false);
    }

    /// <summary>One bdev_nvme_attach_controller per attached controller, in attach order (SPDK's bdev_nvme_config_json).</summary>
    public override void WriteConfig(JsonArray calls)
    {
        if (!Options.IsDefault)
        {
            calls.Add(Subsystem.Call("bdev_nvme_set_options", Options.ToJson()));
        }

        HashSet<string> discovered;
        List<DiscoveryService> services;
        lock (_ctrls)
        {
            services = _discovery.Values.OfType<DiscoveryService>().ToList();
            discovered = services.SelectMany(d => d.Attached).ToHashSet(StringComparer.Ordinal);
        }

        foreach (var c in Controllers)
        {
            if (!discovered.Contains(c.CtrlName))
            {
                calls.Add(Subsystem.Call("bdev_nvme_attach_controller", c.ConfigParams()));
            }
        }

        // Discovery services (SPDK writes these and not the controllers they attached).
        foreach (var d in services)
        {
            calls.Add(Subsystem.Call("bdev_nvme_start_discovery", new JsonObject
            {
                ["name"] = d.Name,
                ["trtype"] = "TCP",
                ["adrfam"] = d.Trid.Family == System.Net.Sockets.AddressFamily.InterNetworkV6 ? "IPv6" : "IPv4",
                ["traddr"] = d.Trid.Address.ToString(),
                ["trsvcid"] = d.Trid.Port.ToString(System.Globalization.CultureInfo.InvariantCulture),
                ["hostnqn"] = d.Trid.EffectiveHostNqn,
                ["wait_for_attach"] = d.WaitForAttach,
                ["ctrlr_loss_timeout_sec"] = d.Policy.CtrlrLossTimeoutSec,
                ["reconnect_delay_sec"] = d.Policy.ReconnectDelaySec,
                ["fast_io_fail_timeout_sec"] = d.Policy.FastIoFailTimeoutSec,
            }));
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
                ["ctrlrs"] = new JsonArray { c.Describe() },
            });
        }

        if (name is not null && list.Count == 0)
        {
            throw RpcException.Errno(19, $"Controller {name} does not exist");
        }

        return list;
    }
}
