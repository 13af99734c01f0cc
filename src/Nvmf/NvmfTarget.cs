using System.Buffers.Binary;
using System.Net;
using System.Net.Sockets;
using System.Runtime.CompilerServices;
using System.Text.Json.Nodes;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using VhostBackend.Bdev;
using VhostBackend.Nvme;
using VhostBackend.Nvme.Tcp;
using VhostBackend.Platform;
using VhostBackend.Reactors;

namespace VhostBackend.Nvmf;

/// <summary>An nvmf operation refused: the errno, the parameter at fault (or null) and why.</summary>
public sealed class NvmfException : Exception
{
    public NvmfException(int errno, string? param, string message)
        : base(message)
    {
        Errno = errno;
        Param = param;
    }

    public int Errno { get; }
    public string? Param { get; }
}

/// <summary>
/// The NVMe-oF target (SPDK's spdk_nvmf_tgt with its TCP transport): the transport options, the listening sockets
/// (accepted on the main reactor by a timed poller, every acceptor_poll_rate), one poll group per reactor (new
/// connections go round robin), the subsystems (the discovery subsystem always first) and the fabrics Connect that
/// creates controllers. Control operations run on the main reactor; connections run on their poll group's reactor.
/// </summary>
public sealed class NvmfTarget : IAsyncDisposable
{
    private readonly ReactorRuntime _reactors;
    private readonly BdevManager _bdevs;
    private readonly ILogger _log;
    private readonly List<NvmfSubsystem> _subsystems = new();
    private readonly List<ListenSocket> _listenSockets = new();
    private NvmfPollGroup[] _groups = Array.Empty<NvmfPollGroup>();
    private int _nextGroup;
    private Poller? _acceptor;
    private long _discoveryGeneration;
    private long _logWindowStart;
    private int _logsInWindow;
    private long _suppressedLogs;
    private long _protocolErrors;

    private sealed class ListenSocket
    {
        public required NvmfListenAddress Address;
        public required Socket Socket;
        public int Users;

        /// <summary>Open connections accepted on this socket (decremented by each connection when it closes).</summary>
        public readonly StrongBox<int> Connections = new(0);
    }

    /// <summary>Connections per listening socket at most; more are accepted and closed at once (a connect flood).</summary>
    public int MaxConnectionsPerListener { get; set; } = 1024;

    /// <summary>A connection that sent no ICReq this long after it was accepted is closed.</summary>
    public TimeSpan IcReqTimeout { get; set; } = TimeSpan.FromSeconds(10);

    /// <summary>A connection that did not Connect (admin or I/O queue) this long after it was accepted is closed.</summary>
    public TimeSpan ConnectTimeout { get; set; } = TimeSpan.FromSeconds(30);

    /// <summary>How long namespace removal waits for connections to give back their channels before it answers.</summary>
    public TimeSpan NamespaceReleaseTimeout { get; set; } = TimeSpan.FromSeconds(30);

    private long _refusedConnections;

    /// <summary>Connections closed at accept because their listener had <see cref="MaxConnectionsPerListener"/> already.</summary>
    public long RefusedConnections => Interlocked.Read(ref _refusedConnections);

    public NvmfTarget(ReactorRuntime reactors, BdevManager bdevs, ILoggerFactory? loggerFactory = null)
    {
        _reactors = reactors;
        _bdevs = bdevs;
        _log = loggerFactory?.CreateLogger("nvmf") ?? NullLogger.Instance;
        Discovery = new NvmfSubsystem(this, NvmeFabrics.DiscoveryNqn, discovery: true, "", "", 0, 1, 0xFFEF);
        _subsystems.Add(Discovery);
    }

    /// <summary>Guards subsystem membership (hosts, listeners, controllers, queue tables).</summary>
    public object Lock { get; } = new();

    public NvmfTransportOptions? TransportOptions { get; private set; }
    public NvmfSubsystem Discovery { get; }
    public ILogger Logger => _log;
    public long ProtocolErrors => Interlocked.Read(ref _protocolErrors);

    public IReadOnlyList<NvmfSubsystem> Subsystems
    {
        get
        {
            lock (Lock)
            {
                return _subsystems.ToArray();
            }
        }
    }

    public NvmfSubsystem? Find(string nqn)
    {
        lock (Lock)
        {
            return _subsystems.Find(s => s.Nqn == nqn);
        }
    }

    internal IReadOnlyList<NvmfPollGroup> Groups => _groups;

    // ---------------------------------------------------------------- transport

    /// <summary>Creates the TCP transport (once): a poll group on every reactor, the acceptor poller on the main one.</summary>
    public async Task CreateTransportAsync(NvmfTransportOptions options)
    {
        if (TransportOptions is not null)
        {
            throw new NvmfException(Errno.EEXIST, "trtype", "Transport type 'TCP' already exists");
        }

        if (options.Validate() is { } bad)
        {
            throw new NvmfException(Errno.EINVAL, bad.Param, bad.Reason);
        }

        TransportOptions = options;
        var groups = new NvmfPollGroup[_reactors.Reactors.Count];

        // Data buffer memory: SPDK's shared pool (num_shared_buffers x io_unit_size) split over the poll groups, and at
        // least four max_io_size transfers per group so that any single command fits.
        long pool = (long)options.NumSharedBuffers * options.IoUnitSize / groups.Length;
        long bufferLimit = Math.Max(pool, 4L * options.MaxIoSize);
        for (int i = 0; i < groups.Length; i++)
        {
            var g = new NvmfPollGroup(_reactors.Reactors[i], i) { BufferLimit = bufferLimit };
            groups[i] = g;
            await g.Reactor.InvokeAsync(g.Start).ConfigureAwait(true);
        }

        _groups = groups;
        await _reactors.Main.InvokeAsync(() =>
        {
            _acceptor = _reactors.Main.RegisterPoller("nvmf_tcp_accept", static c => ((NvmfTarget)c!).Accept(), this, options.AcceptorPollRate);
        }).ConfigureAwait(true);
        _log.LogInformation("TCP transport created (max_queue_depth {Depth}, in_capsule_data_size {Icd}, max_io_size {Mio})", options.MaxQueueDepth, options.InCapsuleDataSize, options.MaxIoSize);
    }

    private int Accept()
    {
        int n = 0;
        foreach (var l in _listenSockets)
        {
            while (n < 64)
            {
                Socket c;
                try
                {
                    if (!l.Socket.Poll(0, SelectMode.SelectRead))
                    {
                        break;
                    }

                    c = l.Socket.Accept();
                }
                catch (SocketException)
                {
                    break;
                }
                catch (ObjectDisposedException)
                {
                    break;
                }

                n++;
                if (Volatile.Read(ref l.Connections.Value) >= MaxConnectionsPerListener)
                {
                    Interlocked.Increment(ref _refusedConnections);
                    LogBadPeer(SafeRemote(c), 0, $"connection refused: {l.Address.TrAddr}:{l.Address.TrSvcId} has {MaxConnectionsPerListener} connections already");
                    c.Dispose();
                    continue;
                }

                try
                {
                    c.Blocking = false;
                    c.NoDelay = true;
                    if (TransportOptions!.SockPriority > 0)
                    {
                        c.SetRawSocketOption(1, 12, BitConverter.GetBytes((int)TransportOptions.SockPriority)); // SOL_SOCKET, SO_PRIORITY
                    }

                    var conn = new NvmfTcpConnection(this, c, l.Address) { ListenerConnections = l.Connections };
                    Interlocked.Increment(ref l.Connections.Value);
                    var g = _groups[_nextGroup++ % _groups.Length];
                    conn.Group = g;
                    g.Reactor.Send(static a =>
                    {
                        var cn = (NvmfTcpConnection)a!;
                        cn.Group!.Add(cn);
                    }, conn);
                }
                catch (SocketException e)
                {
                    _log.LogWarning("accepted connection dropped: {Error}", e.SocketErrorCode);
                    c.Dispose();
                }
            }
        }

        return n;
    }

    private static EndPoint? SafeRemote(Socket s)
    {
        try
        {
            return s.RemoteEndPoint;
        }
        catch (SocketException)
        {
            return null;
        }
    }

    // ---------------------------------------------------------------- subsystems

    public NvmfSubsystem CreateSubsystem(string nqn, string? serial, string? model, bool allowAnyHost, uint maxNamespaces, ushort minCntlid, ushort maxCntlid)
    {
        if (!NvmeFabrics.IsValidNqn(nqn) || !(nqn.StartsWith("nqn.", StringComparison.Ordinal) && nqn.Length > 12))
        {
            throw new NvmfException(Errno.EINVAL, "nqn", $"Unable to create subsystem {nqn}");
        }

        serial ??= "00000000000000000000";
        model ??= "VhostBackend NVMe-oF controller";
        if (serial.Length > 20 || serial.Any(ch => ch < 0x20 || ch > 0x7E))
        {
            throw new NvmfException(Errno.EINVAL, "serial_number", $"Invalid SN {serial}");
        }

        if (model.Length > 40 || model.Any(ch => ch < 0x20 || ch > 0x7E))
        {
            throw new NvmfException(Errno.EINVAL, "model_number", $"Invalid MN {model}");
        }

        if (minCntlid < 1 || maxCntlid > 0xFFEF || minCntlid > maxCntlid)
        {
            throw new NvmfException(Errno.EINVAL, "min_cntlid", $"Invalid cntlid range [{minCntlid}-{maxCntlid}]");
        }

        if (maxNamespaces > 1024)
        {
            throw new NvmfException(Errno.EINVAL, "max_namespaces", "at most 1024 namespaces");
        }

        lock (Lock)
        {
            if (_subsystems.Exists(s => s.Nqn == nqn))
            {
                throw new NvmfException(Errno.EEXIST, "nqn", $"Unable to create subsystem {nqn}");
            }

            // As SPDK (subsystem.c): 0 means the default of 32 namespaces, and 32 is what is reported and saved.
            uint slots = maxNamespaces == 0 ? NvmfSubsystem.DefaultMaxNamespaces : maxNamespaces;
            var sub = new NvmfSubsystem(this, nqn, discovery: false, serial, model, slots, minCntlid, maxCntlid) { AllowAnyHost = allowAnyHost };
            _subsystems.Add(sub);
            return sub;
        }
    }

    public async Task DeleteSubsystemAsync(string nqn)
    {
        var sub = Find(nqn);
        if (sub is null || sub.IsDiscovery)
        {
            throw new NvmfException(Errno.ENODEV, "nqn", $"Unable to find subsystem with NQN {nqn}");
        }

        lock (Lock)
        {
            sub.Deleted = true;
        }

        DestroyControllers(sub, _ => true);
        foreach (var ns in sub.NamespaceSnapshot)
        {
            if (ns is null)
            {
                continue;
            }

            try
            {
                await RemoveNamespaceAsync(sub, ns.Nsid, notify: false).ConfigureAwait(true);
            }
            catch (NvmfException e) when (e.Errno == Errno.ENOENT)
            {
                // Removed meanwhile (remove_ns, bdev hot-remove): that namespace is done.
            }
        }

        NvmfListenAddress[] listeners;
        lock (Lock)
        {
            listeners = sub.Listeners.ToArray();
            _subsystems.Remove(sub);
        }

        foreach (var l in listeners)
        {
            RemoveListener(sub, l);
        }

        DiscoveryChanged();
    }

    private static void DestroyControllers(NvmfSubsystem sub, Func<NvmfController, bool> which)
    {
        NvmfController[] ctrls;
        lock (sub.Target.Lock)
        {
            ctrls = sub.Controllers.Where(which).ToArray();
        }

        foreach (var c in ctrls)
        {
            c.AdminConnection.CloseAsync("controller removed");
        }
    }

    // ---------------------------------------------------------------- hosts

    public void AddHost(NvmfSubsystem sub, string host)
    {
        if (!NvmeFabrics.IsValidNqn(host))
        {
            throw new NvmfException(Errno.EINVAL, "host", $"Invalid host NQN {host}");
        }

        lock (Lock)
        {
            ThrowIfDeleted(sub);
            if (!sub.Hosts.Contains(host, StringComparer.Ordinal))
            {
                sub.Hosts.Add(host);
            }
        }

        DiscoveryChanged();
    }

    /// <summary>A subsystem being deleted takes no more hosts, listeners or namespaces (under <see cref="Lock"/>).</summary>
    private static void ThrowIfDeleted(NvmfSubsystem sub)
    {
        if (sub.Deleted)
        {
            throw new NvmfException(Errno.ENODEV, "nqn", $"subsystem {sub.Nqn} is being deleted");
        }
    }

    public void RemoveHost(NvmfSubsystem sub, string host)
    {
        lock (Lock)
        {
            sub.Hosts.Remove(host);
        }

        // As SPDK: the host's controllers are disconnected (unless any host may connect).
        if (!sub.AllowAnyHost)
        {
            DestroyControllers(sub, c => c.HostNqn == host);
        }

        DiscoveryChanged();
    }

    public void SetAllowAnyHost(NvmfSubsystem sub, bool allow)
    {
        lock (Lock)
        {
            sub.AllowAnyHost = allow;
        }

        DiscoveryChanged();
    }

    // ---------------------------------------------------------------- listeners

    public void AddListener(NvmfSubsystem sub, NvmfListenAddress address)
    {
        if (TransportOptions is null)
        {
            throw new NvmfException(Errno.EINVAL, "trtype", "Unable to find TCP transport: create it with nvmf_create_transport first");
        }

        lock (Lock)
        {
            ThrowIfDeleted(sub);
            if (sub.Listeners.Contains(address))
            {
                // As SPDK (nvmf_rpc_listen_paused): an existing listener is skipped and the call succeeds.
                return;
            }
        }

        var ls = _listenSockets.Find(l => l.Address == address);
        if (ls is null)
        {
            var s = new Socket(address.Family, SocketType.Stream, ProtocolType.Tcp) { Blocking = false };
            try
            {
                s.SetSocketOption(SocketOptionLevel.Socket, SocketOptionName.ReuseAddress, true);
                s.Bind(new IPEndPoint(address.Address, address.Port));
                s.Listen(512);
            }
            catch (SocketException e)
            {
                s.Dispose();
                throw new NvmfException(e.SocketErrorCode == SocketError.AddressAlreadyInUse ? Errno.EADDRINUSE : Errno.EINVAL, "listen_address", $"Unable to listen on {address.TrAddr}:{address.TrSvcId}: {e.SocketErrorCode}");
            }

            ls = new ListenSocket { Address = address, Socket = s };
            _listenSockets.Add(ls);
            _log.LogInformation("TCP target listening on {Addr} port {Port}", address.TrAddr, address.TrSvcId);
        }

        ls.Users++;
        lock (Lock)
        {
            sub.Listeners.Add(address);
            if (!_portIds.ContainsKey(address))
            {
                _portIds.Add(address, (ushort)Math.Min(_portIds.Count, 0xFFFE));
            }
        }

        DiscoveryChanged();
    }

    public void RemoveListener(NvmfSubsystem sub, NvmfListenAddress address)
    {
        lock (Lock)
        {
            if (!sub.Listeners.Remove(address))
            {
                throw new NvmfException(Errno.ENOENT, "listen_address", "Listener not found");
            }
        }

        // Queue pairs that came through this listener are disconnected (SPDK: the subsystem's qpairs on it).
        NvmfController[] ctrls;
        lock (Lock)
        {
            ctrls = sub.Controllers.ToArray();
        }

        foreach (var c in ctrls)
        {
            if (c.AdminConnection.Listener == address)
            {
                c.AdminConnection.CloseAsync("listener removed");
            }
        }

        var ls = _listenSockets.Find(l => l.Address == address);
        if (ls is not null && --ls.Users == 0)
        {
            _listenSockets.Remove(ls);
            ls.Socket.Dispose();
        }

        DiscoveryChanged();
    }

    /// <summary>Listen addresses with a socket (nvmf_get_stats, tests).</summary>
    public IReadOnlyList<NvmfListenAddress> ListenAddresses => _listenSockets.Select(l => l.Address).ToArray();

    // ---------------------------------------------------------------- namespaces

    /// <summary>Adds a namespace backed by <paramref name="bdevName"/> (opened for write); returns its nsid. Hosts connected get an AEN.</summary>
    public uint AddNamespace(NvmfSubsystem sub, string bdevName, uint nsid, Guid? uuid, byte[]? nguid, ulong eui64)
    {
        lock (Lock)
        {
            ThrowIfDeleted(sub);
        }

        var nss = sub.NamespaceSnapshot;
        if (nsid == 0)
        {
            nsid = (uint)(Array.IndexOf(nss, null) + 1);
            if (nsid == 0)
            {
                throw new NvmfException(Errno.ENOSPC, "nsid", "Unable to add ns: no free namespace id");
            }
        }
        else if (nsid > nss.Length || nsid == 0xFFFFFFFF)
        {
            throw new NvmfException(Errno.EINVAL, "nsid", $"Invalid nsid {nsid} (at most {nss.Length})");
        }
        else if (nss[nsid - 1] is not null)
        {
            throw new NvmfException(Errno.EEXIST, "nsid", $"Requested NSID {nsid} already in use");
        }

        foreach (var other in nss)
        {
            if (other is not null && other.Bdev.Name == bdevName)
            {
                throw new NvmfException(Errno.EEXIST, "bdev_name", $"bdev {bdevName} is already a namespace of {sub.Nqn}");
            }
        }

        BdevDesc desc;
        try
        {
            desc = _bdevs.Open(bdevName, write: true, static (type, bdev, ctx) =>
            {
                if (type == BdevEventType.Remove)
                {
                    var (t, s, id) = ((NvmfTarget, NvmfSubsystem, uint))ctx!;
                    _ = t.HotRemoveAsync(s, id, bdev);
                }
            }, (this, sub, nsid));
        }
        catch (BdevNotFoundException)
        {
            throw new NvmfException(Errno.ENODEV, "bdev_name", $"bdev {bdevName} not found");
        }
        catch (BdevClaimedException e)
        {
            throw new NvmfException(Errno.EPERM, "bdev_name", e.Message);
        }

        var b = desc.Bdev;
        if (b.BlockSize < 512 || (b.BlockSize & (b.BlockSize - 1)) != 0)
        {
            // Identify reports LBADS = log2(block size) and no metadata: as SPDK refuses bdevs with separate metadata,
            // a block size that is not a power of two (interleaved metadata) cannot be described, so it is refused.
            desc.Dispose();
            throw new NvmfException(Errno.EINVAL, "bdev_name", $"bdev {bdevName}: block size {b.BlockSize} is not a power of two >= 512 (metadata is not supported)");
        }

        var id = uuid ?? b.Uuid;
        var g = nguid ?? id.ToByteArray(bigEndian: true);
        var ns = new NvmfNamespace(nsid, desc, id, g, eui64);
        bool deleted;
        lock (Lock)
        {
            deleted = sub.Deleted;
            if (!deleted)
            {
                var next = (NvmfNamespace?[])sub.NamespaceSnapshot.Clone();
                next[nsid - 1] = ns;
                sub.Publish(next);
            }
        }

        if (deleted)
        {
            desc.Dispose();
            throw new NvmfException(Errno.ENODEV, "nqn", $"subsystem {sub.Nqn} is being deleted");
        }

        _log.LogInformation("subsystem {Nqn}: namespace {Nsid} = bdev {Bdev}", sub.Nqn, nsid, bdevName);
        NotifyNamespaceChanged(sub, nsid);
        return nsid;
    }

    private async Task HotRemoveAsync(NvmfSubsystem sub, uint nsid, Bdev.Bdev bdev)
    {
        var ns = nsid <= sub.NamespaceSnapshot.Length ? sub.NamespaceSnapshot[nsid - 1] : null;
        if (ns is null || ns.Bdev != bdev)
        {
            return;
        }

        _log.LogWarning("bdev {Bdev} removed: namespace {Nsid} of {Nqn} goes", bdev.Name, nsid, sub.Nqn);
        try
        {
            await RemoveNamespaceAsync(sub, nsid, notify: true).ConfigureAwait(true);
        }
        catch (NvmfException e) when (e.Errno == Errno.ENOENT)
        {
            // Removed meanwhile (RPC, subsystem deletion): nothing left to do.
        }
        catch (Exception e)
        {
            // Nobody awaits this task: everything is logged here.
            _log.LogError(e, "hot remove of bdev {Bdev} (namespace {Nsid} of {Nqn}) failed", bdev.Name, nsid, sub.Nqn);
        }
    }

    /// <summary>Removes a namespace: connections stop using it and give back their channels, then the bdev is closed; hosts get an AEN.</summary>
    public async Task RemoveNamespaceAsync(NvmfSubsystem sub, uint nsid, bool notify = true)
    {
        NvmfNamespace? ns;
        lock (Lock)
        {
            var nss = sub.NamespaceSnapshot;
            ns = nsid >= 1 && nsid <= nss.Length ? nss[nsid - 1] : null;
            if (ns is null)
            {
                throw new NvmfException(Errno.ENOENT, "nsid", $"Unable to remove namespace {nsid}: not found");
            }

            ns.Released = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            ns.Removed = true;
            var next = (NvmfNamespace?[])nss.Clone();
            next[nsid - 1] = null;
            sub.Publish(next);
        }

        foreach (var g in _groups)
        {
            await g.Reactor.InvokeAsync(() =>
            {
                foreach (var c in g.Connections)
                {
                    c.ReleaseNamespace(ns);
                }
            }).ConfigureAwait(true);
        }

        if (Volatile.Read(ref ns.PendingReleases) > 0)
        {
            try
            {
                await ns.Released.Task.WaitAsync(NamespaceReleaseTimeout).ConfigureAwait(true);
            }
            catch (TimeoutException)
            {
                // I/O is stuck in the bdev (or parked waiting for it): the namespace is gone for hosts already; the
                // descriptor is closed when the last channel is given back, never while one is still in use.
                _log.LogWarning("namespace {Nsid} of {Nqn}: I/O still in flight after {Timeout} s; bdev {Bdev} is closed when it completes",
                    nsid, sub.Nqn, NamespaceReleaseTimeout.TotalSeconds, ns.Bdev.Name);
                _ = DisposeWhenReleasedAsync(ns);
                if (notify)
                {
                    NotifyNamespaceChanged(sub, nsid);
                }

                return;
            }
        }

        ns.Desc.Dispose();
        if (notify)
        {
            NotifyNamespaceChanged(sub, nsid);
        }
    }

    private async Task DisposeWhenReleasedAsync(NvmfNamespace ns)
    {
        try
        {
            await ns.Released!.Task.ConfigureAwait(false);
            await _reactors.Main.InvokeAsync(ns.Desc.Dispose).ConfigureAwait(false);
            _log.LogInformation("namespace {Nsid}: bdev {Bdev} closed (its in-flight I/O completed)", ns.Nsid, ns.Bdev.Name);
        }
        catch (Exception e)
        {
            _log.LogError(e, "closing bdev {Bdev} of removed namespace {Nsid} failed", ns.Bdev.Name, ns.Nsid);
        }
    }

    private static void NotifyNamespaceChanged(NvmfSubsystem sub, uint nsid)
    {
        NvmfController[] ctrls;
        lock (sub.Target.Lock)
        {
            ctrls = sub.Controllers.ToArray();
        }

        foreach (var c in ctrls)
        {
            c.AdminConnection.Reactor?.Send(static a =>
            {
                var (ctrl, id) = ((NvmfController, uint))a!;
                ctrl.NamespaceChanged(id);
            }, (c, nsid));
        }
    }

    private void DiscoveryChanged()
    {
        Interlocked.Increment(ref _discoveryGeneration);
        NvmfController[] ctrls;
        lock (Lock)
        {
            ctrls = Discovery.Controllers.ToArray();
        }

        foreach (var c in ctrls)
        {
            c.AdminConnection.Reactor?.Send(static a => ((NvmfController)a!).DiscoveryLogChanged(), c);
        }
    }

    /// <summary>
    /// PORTID of each listen address in the discovery log: given when the address is first listened on and kept for the
    /// target's lifetime, so one port has one id in every entry, for every host and across generations. Under Lock.
    /// </summary>
    private readonly Dictionary<NvmfListenAddress, ushort> _portIds = new();

    /// <summary>The discovery log page for <paramref name="hostNqn"/>: every listener of every subsystem it may connect to.</summary>
    internal byte[] DiscoveryLog(string hostNqn)
    {
        var entries = new List<(NvmfListenAddress Addr, string Nqn, byte SubType, ushort PortId)>();
        lock (Lock)
        {
            foreach (var s in _subsystems)
            {
                if (s.IsDiscovery)
                {
                    foreach (var l in s.Listeners)
                    {
                        entries.Add((l, s.Nqn, NvmeDiscoveryEntry.SubTypeCurrentDiscovery, _portIds.GetValueOrDefault(l)));
                    }

                    continue;
                }

                if (!(s.AllowAnyHost || s.Hosts.Contains(hostNqn, StringComparer.Ordinal)))
                {
                    continue;
                }

                foreach (var l in s.Listeners)
                {
                    entries.Add((l, s.Nqn, NvmeDiscoveryEntry.SubTypeNvme, _portIds.GetValueOrDefault(l)));
                }
            }
        }

        var page = new byte[1024 * (entries.Count + 1)];
        BinaryPrimitives.WriteUInt64LittleEndian(page, (ulong)Interlocked.Read(ref _discoveryGeneration));
        BinaryPrimitives.WriteUInt64LittleEndian(page.AsSpan(8), (ulong)entries.Count);
        for (int i = 0; i < entries.Count; i++)
        {
            var (addr, nqn, subtype, portId) = entries[i];
            var e = page.AsSpan(1024 * (i + 1), 1024);
            new NvmeDiscoveryEntry(NvmeDiscoveryEntry.TrTypeTcp, addr.Family == AddressFamily.InterNetworkV6 ? NvmeDiscoveryEntry.AdrFamIpv6 : NvmeDiscoveryEntry.AdrFamIpv4,
                subtype, portId, 0xFFFF, addr.TrSvcId, nqn, addr.TrAddr).Write(e);
            e[3] = 0x02 | 0x04; // TREQ: secure channel not required, SQ flow control disable supported
            BinaryPrimitives.WriteUInt16LittleEndian(e[8..], (ushort)(TransportOptions?.MaxAqDepth ?? 128)); // ASQSZ
        }

        return page;
    }

    // ---------------------------------------------------------------- fabrics commands

    private static ushort ConnectStatus(int sc) => NvmeStatus.Make(NvmeSct.CommandSpecific, sc, dnr: true).Field;

    private static void InvalidParam(NvmfRequest req, bool inData, int offset)
    {
        req.Dw0 = (inData ? 1u : 0u) | ((uint)offset << 16);
        req.Conn.Complete(req, ConnectStatus(NvmeSc.ConnectInvalidParameters));
    }

    internal void HandleFabrics(NvmfTcpConnection conn, NvmfRequest req)
    {
        int fctype = NvmeFabrics.FctypeOf(in req.Cmd);
        var ctrl = conn.Controller;
        switch (fctype)
        {
            case NvmeFabrics.FctypeConnect:
                Connect(conn, req);
                return;
            case NvmeFabrics.FctypePropertyGet when ctrl is not null && conn.Qid == 0:
                ctrl.PropertyGet(req);
                return;
            case NvmeFabrics.FctypePropertySet when ctrl is not null && conn.Qid == 0:
                ctrl.PropertySet(req);
                return;
            case NvmeFabrics.FctypePropertyGet or NvmeFabrics.FctypePropertySet when ctrl is null:
                LogBadHost(conn, "Property Get/Set before Connect");
                conn.Complete(req, NvmeStatus.Make(NvmeSct.Generic, NvmeSc.CommandSequenceError, dnr: true).Field);
                return;
            default:
                conn.Complete(req, NvmeStatus.Make(NvmeSct.Generic, NvmeSc.InvalidOpcode, dnr: true).Field);
                return;
        }
    }

    /// <summary>Tests only: runs in Connect between the first checks and the lock that adds the controller (a race window).</summary>
    internal Action<NvmfSubsystem>? BeforeControllerAdded;

    /// <summary>Connect's subsystem, listener and host checks, under <see cref="Lock"/>; completes the request when refused.</summary>
    private bool ConnectRefusedLocked(NvmfTcpConnection conn, NvmfRequest req, NvmfSubsystem sub, string hostNqn)
    {
        if (sub.Deleted)
        {
            LogBadHost(conn, $"Connect to {sub.Nqn}, which is being deleted");
            InvalidParam(req, true, 256);
            return true;
        }

        if (!sub.IsDiscovery && !sub.Listeners.Contains(conn.Listener))
        {
            LogBadHost(conn, $"Connect to {sub.Nqn}, which no longer listens on {conn.Listener.TrAddr}:{conn.Listener.TrSvcId}");
            InvalidParam(req, true, 256);
            return true;
        }

        if (!sub.HostAllowed(hostNqn))
        {
            LogBadHost(conn, $"host {hostNqn} may no longer connect to {sub.Nqn}");
            conn.Complete(req, ConnectStatus(NvmeSc.ConnectInvalidHost));
            return true;
        }

        return false;
    }

    private void Connect(NvmfTcpConnection conn, NvmfRequest req)
    {
        ref var cmd = ref req.Cmd;
        if (conn.Controller is not null)
        {
            conn.Complete(req, NvmeStatus.Make(NvmeSct.Generic, NvmeSc.CommandSequenceError, dnr: true).Field);
            return;
        }

        if (!req.HostToController || req.DataLength < NvmeFabrics.ConnectDataSize)
        {
            conn.Complete(req, NvmeStatus.Make(NvmeSct.Generic, NvmeSc.DataSglLengthInvalid, dnr: true).Field);
            return;
        }

        if ((cmd.Cdw10 & 0xFFFF) != 0)
        {
            conn.Complete(req, ConnectStatus(NvmeSc.ConnectIncompatibleFormat));
            return;
        }

        ushort qid = (ushort)(cmd.Cdw10 >> 16);
        int entries = (int)(cmd.Cdw11 & 0xFFFF) + 1;
        byte cattr = (byte)(cmd.Cdw11 >> 16);
        uint kato = cmd.Cdw12;
        var (hostId, cntlid, subNqn, hostNqn) = NvmeFabrics.ReadConnectData(req.Span(0, NvmeFabrics.ConnectDataSize));
        var o = TransportOptions!;
        if (!NvmeFabrics.IsValidNqn(subNqn))
        {
            LogBadHost(conn, "Connect with an invalid subsystem NQN");
            InvalidParam(req, true, 256);
            return;
        }

        if (!NvmeFabrics.IsValidNqn(hostNqn))
        {
            LogBadHost(conn, "Connect with an invalid host NQN");
            InvalidParam(req, true, 512);
            return;
        }

        var sub = Find(subNqn);
        if (sub is null || sub.Deleted)
        {
            LogBadHost(conn, $"Connect to unknown subsystem {subNqn}");
            InvalidParam(req, true, 256);
            return;
        }

        if (!sub.IsDiscovery)
        {
            bool listening;
            lock (Lock)
            {
                listening = sub.Listeners.Contains(conn.Listener);
            }

            if (!listening)
            {
                LogBadHost(conn, $"Connect to {subNqn}, which does not listen on {conn.Listener.TrAddr}:{conn.Listener.TrSvcId}");
                InvalidParam(req, true, 256);
                return;
            }
        }

        if (!sub.HostAllowed(hostNqn))
        {
            LogBadHost(conn, $"host {hostNqn} may not connect to {subNqn}");
            conn.Complete(req, ConnectStatus(NvmeSc.ConnectInvalidHost));
            return;
        }

        if (entries < 2 || entries > (qid == 0 ? o.MaxAqDepth : o.MaxQueueDepth))
        {
            InvalidParam(req, false, 44);
            return;
        }

        if (qid == 0)
        {
            if (cntlid != NvmeFabrics.DynamicCntlid)
            {
                InvalidParam(req, true, 16);
                return;
            }

            BeforeControllerAdded?.Invoke(sub);
            NvmfController ctrl;
            lock (Lock)
            {
                // Re-checked in the lock that adds the controller: a delete, listener or host removal that ran since
                // the checks above has already taken its snapshot of the controllers and would miss this one.
                if (ConnectRefusedLocked(conn, req, sub, hostNqn))
                {
                    return;
                }

                ushort id = sub.AllocateCntlid();
                if (id == 0)
                {
                    conn.Complete(req, ConnectStatus(NvmeSc.ConnectControllerBusy));
                    return;
                }

                ctrl = new NvmfController(sub, id, hostNqn, hostId, kato, conn);
                sub.Controllers.Add(ctrl);
            }

            conn.Attach(ctrl, 0, entries, (cattr & NvmeFabrics.ConnectCattrDisableSqFlow) != 0);
            Interlocked.Increment(ref conn.Group!.AdminQpairs);
            _log.LogInformation("host {Host} connected to {Nqn} (controller {Cntlid}) from {Peer}", hostNqn, subNqn, ctrl.Cntlid, conn.PeerAddress);
            req.Dw0 = ctrl.Cntlid;
            conn.Complete(req, 0);
            return;
        }

        if (sub.IsDiscovery)
        {
            InvalidParam(req, false, 42);
            return;
        }

        NvmfController? c;
        lock (Lock)
        {
            c = sub.Controllers.Find(x => x.Cntlid == cntlid);
            if (c is null || c.Destroyed)
            {
                c = null;
            }
            else if (c.HostNqn != hostNqn)
            {
                c = null;
            }
        }

        if (c is null)
        {
            LogBadHost(conn, $"I/O queue Connect to unknown controller {cntlid} of {subNqn}");
            InvalidParam(req, true, 16);
            return;
        }

        if (!c.IsEnabled)
        {
            conn.Complete(req, NvmeStatus.Make(NvmeSct.Generic, NvmeSc.CommandSequenceError, dnr: true).Field);
            return;
        }

        lock (Lock)
        {
            if (ConnectRefusedLocked(conn, req, sub, hostNqn))
            {
                return;
            }

            if (qid > c.NumIoQueues || qid >= c.IoQueues.Length || c.IoQueues[qid] is not null || c.Destroyed)
            {
                InvalidParam(req, false, 42);
                return;
            }

            c.IoQueues[qid] = conn;
        }

        conn.Attach(c, qid, entries, (cattr & NvmeFabrics.ConnectCattrDisableSqFlow) != 0);
        Interlocked.Increment(ref conn.Group!.IoQpairs);
        req.Dw0 = c.Cntlid;
        conn.Complete(req, 0);
    }

    // ---------------------------------------------------------------- logging

    internal void CountProtocolError() => Interlocked.Increment(ref _protocolErrors);

    /// <summary>A rate-limited warning about a misbehaving host (at most 20 lines a second; the rest are counted).</summary>
    internal void LogBadHost(NvmfTcpConnection conn, string reason) => LogBadPeer(conn.PeerAddress, conn.Qid, reason);

    /// <summary>As <see cref="LogBadHost"/>, for a peer without a connection object (refused at accept).</summary>
    internal void LogBadPeer(EndPoint? peer, ushort qid, string reason)
    {
        long now = Ticks.Now();
        long start = Volatile.Read(ref _logWindowStart);
        if (now - start > Ticks.Frequency && Interlocked.CompareExchange(ref _logWindowStart, now, start) == start)
        {
            Volatile.Write(ref _logsInWindow, 0);
            long suppressed = Interlocked.Exchange(ref _suppressedLogs, 0);
            if (suppressed > 0)
            {
                _log.LogWarning("{Count} more host errors not logged", suppressed);
            }
        }

        if (Interlocked.Increment(ref _logsInWindow) > 20)
        {
            Interlocked.Increment(ref _suppressedLogs);
            return;
        }

        _log.LogWarning("host {Peer} (qid {Qid}): {Reason}", peer, qid, reason);
    }

    internal void LogKeepAliveTimeout(NvmfController c) =>
        _log.LogWarning("controller {Cntlid} of {Nqn} (host {Host}): keep alive timeout ({Kato} ms), destroying it", c.Cntlid, c.Subsystem.Nqn, c.HostNqn, c.KatoMs);

    // ---------------------------------------------------------------- stats, config

    /// <summary>nvmf_get_stats: per poll group counters, gathered on each group's reactor.</summary>
    public async Task<JsonObject> GetStatsAsync()
    {
        var groups = new JsonArray();
        foreach (var g in _groups)
        {
            var o = await g.Reactor.InvokeAsync(() =>
            {
                int admin = 0, io = 0;
                long completed = g.CompletedIo;
                foreach (var c in g.Connections)
                {
                    completed += c.CompletedIo;
                    if (c.Controller is not null && !c.IsClosed)
                    {
                        if (c.Qid == 0)
                        {
                            admin++;
                        }
                        else
                        {
                            io++;
                        }
                    }
                }

                return new JsonObject
                {
                    ["name"] = g.Name,
                    ["admin_qpairs"] = Interlocked.Read(ref g.AdminQpairs),
                    ["io_qpairs"] = Interlocked.Read(ref g.IoQpairs),
                    ["current_admin_qpairs"] = admin,
                    ["current_io_qpairs"] = io,
                    ["pending_bdev_io"] = 0,
                    ["completed_nvme_io"] = completed,
                    ["transports"] = new JsonArray(new JsonObject { ["trtype"] = NvmfTransportOptions.TrType }),
                };
            }).ConfigureAwait(true);
            groups.Add(o);
        }

        return new JsonObject { ["tick_rate"] = Ticks.Frequency, ["poll_groups"] = groups };
    }

    /// <summary>The "nvmf" subsystem's save_config calls, in SPDK's order.</summary>
    public JsonArray WriteConfig()
    {
        var calls = new JsonArray();
        if (TransportOptions is null)
        {
            return calls;
        }

        calls.Add(Rpc.Subsystem.Call("nvmf_create_transport", TransportOptions.ToJson()));
        foreach (var s in Subsystems)
        {
            NvmfListenAddress[] listeners;
            string[] hosts;
            lock (Lock)
            {
                listeners = s.Listeners.ToArray();
                hosts = s.Hosts.ToArray();
            }

            if (!s.IsDiscovery)
            {
                var p = new JsonObject
                {
                    ["nqn"] = s.Nqn,
                    ["allow_any_host"] = s.AllowAnyHost,
                    ["serial_number"] = s.SerialNumber,
                    ["model_number"] = s.ModelNumber,
                    ["max_namespaces"] = s.MaxNamespaces,
                    ["min_cntlid"] = (int)s.MinCntlid,
                    ["max_cntlid"] = (int)s.MaxCntlid,
                    ["ana_reporting"] = false,
                };

                calls.Add(Rpc.Subsystem.Call("nvmf_create_subsystem", p));
                foreach (var h in hosts)
                {
                    calls.Add(Rpc.Subsystem.Call("nvmf_subsystem_add_host", new JsonObject { ["nqn"] = s.Nqn, ["host"] = h }));
                }
            }

            foreach (var l in listeners)
            {
                calls.Add(Rpc.Subsystem.Call("nvmf_subsystem_add_listener", new JsonObject
                {
                    ["nqn"] = s.Nqn,
                    ["listen_address"] = l.ToJson(),
                    ["secure_channel"] = false,
                }));
            }

            foreach (var ns in s.NamespaceSnapshot)
            {
                if (ns is null)
                {
                    continue;
                }

                calls.Add(Rpc.Subsystem.Call("nvmf_subsystem_add_ns", new JsonObject
                {
                    ["nqn"] = s.Nqn,
                    ["namespace"] = ns.ToJson(includeName: false),
                }));
            }
        }

        return calls;
    }

    /// <summary>The listen addresses of a subsystem (nvmf_subsystem_get_listeners).</summary>
    public NvmfListenAddress[] ListenersOf(NvmfSubsystem sub)
    {
        lock (Lock)
        {
            return sub.Listeners.ToArray();
        }
    }

    /// <summary>All controllers of a subsystem (nvmf_subsystem_get_controllers).</summary>
    public NvmfController[] ControllersOf(NvmfSubsystem sub)
    {
        lock (Lock)
        {
            return sub.Controllers.ToArray();
        }
    }

    public async ValueTask DisposeAsync()
    {
        if (_acceptor is not null)
        {
            var p = _acceptor;
            _acceptor = null;
            await _reactors.Main.InvokeAsync(() => _reactors.Main.UnregisterPoller(p)).ConfigureAwait(false);
        }

        foreach (var l in _listenSockets)
        {
            l.Socket.Dispose();
        }

        _listenSockets.Clear();
        foreach (var g in _groups)
        {
            await g.Reactor.InvokeAsync(g.Stop).ConfigureAwait(false);
        }

        foreach (var s in Subsystems)
        {
            foreach (var ns in s.NamespaceSnapshot)
            {
                ns?.Desc.Dispose();
            }
        }
    }
}
