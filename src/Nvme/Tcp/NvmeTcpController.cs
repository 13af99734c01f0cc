using System.Buffers.Binary;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using VhostBackend.Platform;

namespace VhostBackend.Nvme.Tcp;

/// <summary>Options of an NVMe/TCP controller (SPDK's spdk_nvme_ctrlr_opts fields that apply).</summary>
public sealed class NvmeTcpControllerOptions
{
    public int AdminQueueEntries { get; set; } = 32;

    /// <summary>Entries of each I/O queue (io_queue_requests + 1 at most what the controller allows).</summary>
    public int IoQueueEntries { get; set; } = 128;

    public int IoQueuesRequested { get; set; } = 16;

    /// <summary>Keep-alive timeout sent in the admin Connect (keep_alive_timeout_ms); Keep Alive goes out every half of it.</summary>
    public uint KeepAliveTimeoutMs { get; set; } = 10000;

    public TimeSpan AdminTimeout { get; set; } = TimeSpan.FromSeconds(10);

    /// <summary>How long one queue pair's connection and initialization may take.</summary>
    public TimeSpan ConnectTimeout { get; set; } = TimeSpan.FromSeconds(10);
}

/// <summary>
/// An NVMe over TCP controller (the fabrics side of the driver, beside the PCIe <see cref="NvmeController"/>): the
/// admin queue pair, fabrics Connect and Property Get/Set bring-up (CAP, VS, CC.EN, CSTS.RDY), Identify, the active
/// namespaces, keep-alive, and I/O queue pairs (each its own TCP connection, owned by one thread).
/// <para>
/// The admin queue is driven by <see cref="ProcessAdminCompletions"/> (the owner's poller; it only tries the admin
/// lock) and by the synchronous helpers, which poll it and are for control threads. A lost connection fails the
/// controller (<see cref="IsFailed"/>); <see cref="StartReconnect"/> / <see cref="PollReconnect"/> build a new
/// association (a new admin connection and controller id, enable, ready), after which the owner reconnects its I/O
/// queue pairs with <see cref="NvmeTcpQueuePair.StartConnect"/> and <see cref="Cntlid"/>.
/// </para>
/// </summary>
public sealed class NvmeTcpController : IDisposable
{
    private readonly ILogger _log;
    private readonly NvmeTcpControllerOptions _opts;
    private readonly object _adminLock = new();
    private readonly NvmeTcpQueuePair _admin;
    private readonly bool[] _qids;
    private long _nextKeepAlive;
    private bool _keepAliveOutstanding;
    private int _reconnectStep;
    private long _reconnectDeadline;
    private volatile bool _failed;
    private bool _disposed;
    private int _aersWanted;
    private int _aersOutstanding;
    private uint _aecValue = NvmeAsyncEvent.NamespaceAttributeNotices;
    private bool _aecPending;

    private NvmeTcpController(NvmeTcpTransportId trid, NvmeTcpControllerOptions opts, ILogger log)
    {
        TransportId = trid;
        _opts = opts;
        _log = log;
        _admin = new NvmeTcpQueuePair(trid, 0, opts.AdminQueueEntries, 8192)
        {
            ConnectTimeoutTicks = (long)(opts.ConnectTimeout.TotalSeconds * Ticks.Frequency),
        };
        _qids = new bool[Math.Max(2, opts.IoQueuesRequested + 1)];
    }

    public NvmeTcpTransportId TransportId { get; }
    public string Name => TransportId.ToString();
    public NvmeCap Cap { get; private set; }
    public uint Version { get; private set; }
    public NvmeControllerData Data { get; private set; } = null!;
    public IReadOnlyList<NvmeNamespace> Namespaces { get; private set; } = Array.Empty<NvmeNamespace>();

    /// <summary>Controller id of the current association.</summary>
    public ushort Cntlid => _admin.Cntlid;

    public uint MaxTransferBytes { get; private set; }
    public int MaxIoQueuePairs { get; private set; }
    public int IoQueueEntries { get; private set; }

    /// <summary>In-capsule data the I/O queues accept (IOCCSZ * 16 - 64).</summary>
    public int IoInCapsuleDataSize { get; private set; }

    /// <summary>The connection to the controller is lost or it failed (keep-alive, fatal status): reconnect or detach.</summary>
    public bool IsFailed => _failed || _admin.IsFailed;

    public string? FailureReason { get; private set; }
    public int ReconnectCount { get; private set; }
    public bool HeaderDigest => _admin.HeaderDigest;
    public bool DataDigest => _admin.DataDigest;

    /// <summary>Connects, enables and identifies the controller. Blocks (bounded by the connect and ready timeouts): not for a reactor.</summary>
    public static NvmeTcpController Attach(NvmeTcpTransportId trid, NvmeTcpControllerOptions? opts = null, ILogger? log = null)
    {
        var c = new NvmeTcpController(trid, opts ?? new NvmeTcpControllerOptions(), log ?? NullLogger.Instance);
        try
        {
            c.StartReconnect();
            while (true)
            {
                int rc = c.PollReconnect();
                if (rc > 0)
                {
                    break;
                }

                if (rc < 0)
                {
                    throw new IOException($"{c.Name}: {c.FailureReason}");
                }

                Thread.Sleep(1);
            }

            c.ReconnectCount = 0;
            c.Identify();
            return c;
        }
        catch
        {
            c.Dispose();
            throw;
        }
    }

    private void Identify()
    {
        var buf = new PinnedArray<byte>(4096);
        var st = ExecuteAdmin(MakeIdentify(1, 0), buf, 4096);
        if (!st.IsSuccess)
        {
            throw new IOException($"{Name}: Identify Controller failed: {st}");
        }

        Data = NvmeControllerData.Parse(buf.Span);
        uint ioccsz = BinaryPrimitives.ReadUInt32LittleEndian(buf.Span[1792..]);
        IoInCapsuleDataSize = ioccsz >= 4 ? (int)Math.Min((ioccsz * 16) - 64, 1 << 20) : 0;
        uint mps = 4096;
        MaxTransferBytes = Data.Mdts == 0 ? 1u << 20 : (uint)Math.Min(1UL << 20, (ulong)mps << Data.Mdts);
        IoQueueEntries = Math.Min(_opts.IoQueueEntries, Cap.MaxQueueEntries);

        uint want = (uint)Math.Max(1, _opts.IoQueuesRequested);
        st = ExecuteAdmin(new NvmeCommand { Opcode = NvmeAdminOpcode.SetFeatures, Cdw10 = NvmeFeature.NumberOfQueues, Cdw11 = (want - 1) | ((want - 1) << 16) }, null, 0, out uint dw0);
        MaxIoQueuePairs = st.IsSuccess ? (int)Math.Min(want, Math.Min((dw0 & 0xFFFF) + 1, (dw0 >> 16) + 1)) : (int)want;
        if (MaxIoQueuePairs + 1 > _qids.Length)
        {
            MaxIoQueuePairs = _qids.Length - 1;
        }

        ScanNamespaces(buf);
    }

    /// <summary>
    /// Identifies the active namespaces again (control threads only; SPDK's nvme_ctrlr_identify_active_ns): after a
    /// namespace attribute notice. Replaces <see cref="Namespaces"/> and returns it.
    /// </summary>
    public IReadOnlyList<NvmeNamespace> ScanNamespaces() => ScanNamespaces(new PinnedArray<byte>(4096));

    private IReadOnlyList<NvmeNamespace> ScanNamespaces(PinnedArray<byte> buf)
    {
        var ids = new List<uint>();
        buf.Span.Clear();
        var st = ExecuteAdmin(MakeIdentify(2, 0), buf, 4096);
        if (st.IsSuccess)
        {
            for (int i = 0; i < 1024; i++)
            {
                uint id = BinaryPrimitives.ReadUInt32LittleEndian(buf.Span[(i * 4)..]);
                if (id == 0)
                {
                    break;
                }

                ids.Add(id);
            }
        }
        else
        {
            for (uint id = 1; id <= Math.Min(Data.NamespaceCount, 1024u); id++)
            {
                ids.Add(id);
            }
        }

        var list = new List<NvmeNamespace>();
        foreach (uint id in ids)
        {
            buf.Span.Clear();
            st = ExecuteAdmin(MakeIdentify(0, id), buf, 4096);
            if (!st.IsSuccess)
            {
                _log.LogWarning("NVMe/TCP {Name}: Identify Namespace {Nsid} failed: {Status}", Name, id, st);
                continue;
            }

            var d = NvmeNamespaceData.Parse(id, buf.Span);
            if (!d.IsActive)
            {
                continue;
            }

            if (d.BlockSize < 512 || d.BlockSize > 65536 || d.MetadataSize != 0)
            {
                _log.LogWarning("NVMe/TCP {Name}: namespace {Nsid} skipped (block size {Bs}, metadata {Ms})", Name, id, d.BlockSize, d.MetadataSize);
                continue;
            }

            list.Add(new NvmeNamespace(null, d));
        }

        Namespaces = list;
        return list;
    }

    /// <summary>
    /// Called (on the thread that reaps admin completions, under the admin lock: post work elsewhere, never wait)
    /// with DW0 of each asynchronous event.
    /// </summary>
    public Action<NvmeTcpController, uint>? AsyncEvent { get; set; }

    /// <summary>
    /// Turns on the notices in <paramref name="notices"/> (Set Features AEC: namespace attribute notices by default,
    /// <see cref="NvmeAsyncEvent.DiscoveryLogChangeNotices"/> on a discovery controller) and keeps up to
    /// <paramref name="requests"/> (capped by AERL + 1) Asynchronous Event Requests outstanding; the admin poll posts
    /// them, and again after each reconnect.
    /// </summary>
    public void EnableAsyncEvents(int requests = 4, uint notices = NvmeAsyncEvent.NamespaceAttributeNotices)
    {
        lock (_adminLock)
        {
            _aersWanted = Math.Max(0, Math.Min(requests, Data.AsyncEventLimit + 1));
            _aecValue = notices;
            _aecPending = _aersWanted > 0;
        }
    }

    /// <summary>Asynchronous Event Requests outstanding now.</summary>
    public int AsyncEventRequestsOutstanding => Volatile.Read(ref _aersOutstanding);

    /// <summary>
    /// Reads the Changed Namespace List log page (control threads only): the namespace ids that changed since it was
    /// last read (one id 0xFFFFFFFF: more than 1024). Reading it re-arms the namespace attribute notice.
    /// </summary>
    public IReadOnlyList<uint> ReadChangedNamespaces()
    {
        var buf = new PinnedArray<byte>(4096);
        var cmd = MakeGetLogPage(NvmeLogPage.ChangedNamespaceList, 4096);
        cmd.Nsid = 0xFFFFFFFF;
        var st = ExecuteAdmin(cmd, buf, 4096);
        if (!st.IsSuccess)
        {
            throw new IOException($"{Name}: Get Log Page (changed namespaces) failed: {st}");
        }

        var ids = new List<uint>();
        for (int i = 0; i < 1024; i++)
        {
            uint id = BinaryPrimitives.ReadUInt32LittleEndian(buf.Span[(i * 4)..]);
            if (id == 0)
            {
                break;
            }

            ids.Add(id);
        }

        return ids;
    }

    private static readonly NvmeCompletionCallback s_aerDone = static (arg, status, dw0) =>
    {
        var c = (NvmeTcpController)arg!;
        c._aersOutstanding--;
        if (status.IsSuccess)
        {
            c._log.LogInformation("NVMe/TCP {Name}: asynchronous event 0x{Dw0:x8}", c.Name, dw0);
            c.AsyncEvent?.Invoke(c, dw0);
        }
        else if (status.Sct == NvmeSct.CommandSpecific && status.Sc == 0x05)
        {
            c._aersWanted = c._aersOutstanding; // AER limit exceeded: keep what is posted
        }

        // Re-posted by the admin poll (a lost connection's AERs are posted again after the reconnect).
    };

    private static readonly NvmeCompletionCallback s_aecDone = static (arg, status, dw0) =>
    {
        var c = (NvmeTcpController)arg!;
        if (!status.IsSuccess && status != NvmeStatus.TransientTransportError)
        {
            c._log.LogWarning("NVMe/TCP {Name}: Set Features (asynchronous event configuration) failed: {Status}", c.Name, status);
        }
    };

    /// <summary>Under the admin lock, connected: turns notices on and tops up the AERs.</summary>
    private void PostAsyncEventRequests()
    {
        if (_aecPending)
        {
            var aec = new NvmeCommand { Opcode = NvmeAdminOpcode.SetFeatures, Cdw10 = NvmeFeature.AsyncEventConfiguration, Cdw11 = _aecValue };
            if (_admin.Submit(ref aec, default, 0, false, s_aecDone, this) != 0)
            {
                return;
            }

            _aecPending = false;
        }

        while (_aersOutstanding < _aersWanted)
        {
            var cmd = new NvmeCommand { Opcode = NvmeAdminOpcode.AsyncEventRequest };
            if (_admin.Submit(ref cmd, default, 0, false, s_aerDone, this) != 0)
            {
                return;
            }

            _aersOutstanding++;
        }
    }

    /// <summary>
    /// Reads the discovery log page (0x70) of a discovery controller (control threads only): the generation counter
    /// and at most <paramref name="maxEntries"/> entries, each validated (strings trimmed of NUL and space padding).
    /// </summary>
    public IReadOnlyList<NvmeDiscoveryEntry> GetDiscoveryLog(out ulong generation, int maxEntries = 64)
    {
        var head = new PinnedArray<byte>(1024);
        var st = ExecuteAdmin(MakeGetLogPage(NvmeDiscoveryEntry.LogPageId, 1024), head, 1024);
        if (!st.IsSuccess)
        {
            throw new IOException($"{Name}: Get Log Page (discovery) failed: {st}");
        }

        generation = BinaryPrimitives.ReadUInt64LittleEndian(head.Span);
        ulong numrec = BinaryPrimitives.ReadUInt64LittleEndian(head.Span[8..]);
        int n = (int)Math.Min(numrec, (ulong)Math.Max(0, maxEntries));
        var list = new List<NvmeDiscoveryEntry>(n);
        if (n == 0)
        {
            return list;
        }

        int len = 1024 * (n + 1);
        var all = new PinnedArray<byte>(len);
        st = ExecuteAdmin(MakeGetLogPage(NvmeDiscoveryEntry.LogPageId, len), all, len);
        if (!st.IsSuccess)
        {
            throw new IOException($"{Name}: Get Log Page (discovery) failed: {st}");
        }

        generation = BinaryPrimitives.ReadUInt64LittleEndian(all.Span);
        for (int i = 0; i < n; i++)
        {
            list.Add(NvmeDiscoveryEntry.Parse(all.Span.Slice(1024 * (i + 1), 1024)));
        }

        return list;
    }

    private static NvmeCommand MakeGetLogPage(byte lid, int bytes)
    {
        uint numd = (uint)(bytes / 4) - 1;
        return new NvmeCommand { Opcode = NvmeAdminOpcode.GetLogPage, Cdw10 = lid | ((numd & 0xFFFF) << 16), Cdw11 = numd >> 16 };
    }

    private static NvmeCommand MakeIdentify(byte cns, uint nsid) => new() { Opcode = NvmeAdminOpcode.Identify, Nsid = nsid, Cdw10 = cns };

    /// <summary>Submits an admin command (any thread). Returns 0 or a negative errno (-ENXIO when disconnected).</summary>
    public int SubmitAdmin(ref NvmeCommand cmd, ReadOnlySpan<IoVec> data, uint dataLength, bool hostToController, NvmeCompletionCallback cb, object? arg)
    {
        lock (_adminLock)
        {
            return _admin.Submit(ref cmd, data, dataLength, hostToController, cb, arg);
        }
    }

    private sealed class Waiter
    {
        public bool Done;
        public NvmeStatus Status;
        public uint Dw0;
    }

    private static readonly NvmeCompletionCallback s_wake = static (arg, status, dw0) =>
    {
        var w = (Waiter)arg!;
        w.Status = status;
        w.Dw0 = dw0;
        w.Done = true;
    };

    /// <summary>Runs an admin command to completion by polling the admin queue (control threads only).</summary>
    public NvmeStatus ExecuteAdmin(NvmeCommand cmd, PinnedArray<byte>? data, int length, bool hostToController = false) =>
        ExecuteAdmin(cmd, data, length, out _, hostToController);

    public NvmeStatus ExecuteAdmin(NvmeCommand cmd, PinnedArray<byte>? data, int length, out uint dw0, bool hostToController = false)
    {
        var w = new Waiter();
        var iov = data is null ? default : data.ToIoVec(length);
        int rc;
        lock (_adminLock)
        {
            rc = _admin.Submit(ref cmd, data is null ? ReadOnlySpan<IoVec>.Empty : new ReadOnlySpan<IoVec>(ref iov), data is null ? 0 : (uint)length, hostToController, s_wake, w);
        }

        if (rc != 0)
        {
            throw new IOException($"{Name}: admin command 0x{cmd.Opcode:x2} not submitted ({rc})");
        }

        long deadline = Ticks.Now() + (long)(_opts.AdminTimeout.TotalSeconds * Ticks.Frequency);
        while (!w.Done)
        {
            lock (_adminLock)
            {
                _admin.Poll();
            }

            if (!w.Done && Ticks.Now() > deadline)
            {
                Fail("admin command timed out");
                lock (_adminLock)
                {
                    _admin.Close(NvmeStatus.AbortRequested);
                }
            }

            if (!w.Done)
            {
                Thread.Sleep(0);
            }
        }

        dw0 = w.Dw0;
        return w.Status;
    }

    /// <summary>
    /// The owner's admin poll (a poller, every few ms): reaps admin completions, sends Keep Alive every half KATO,
    /// fails the controller when the connection is lost. Only tries the admin lock. Returns completions reaped.
    /// </summary>
    public int ProcessAdminCompletions()
    {
        if (!Monitor.TryEnter(_adminLock))
        {
            return 0;
        }

        try
        {
            if (_reconnectStep != 0 || _disposed)
            {
                return 0;
            }

            int n = _admin.Poll();
            if (_admin.IsFailed)
            {
                Fail(_admin.LastError ?? "admin connection failed");
                return n;
            }

            long now = Ticks.Now();
            if (_opts.KeepAliveTimeoutMs > 0 && _admin.IsConnected && now >= _nextKeepAlive && !_keepAliveOutstanding)
            {
                _nextKeepAlive = now + (long)(_opts.KeepAliveTimeoutMs / 2000.0 * Ticks.Frequency);
                var cmd = new NvmeCommand { Opcode = NvmeAdminOpcode.KeepAlive };
                if (_admin.Submit(ref cmd, default, 0, false, s_keepAliveDone, this) == 0)
                {
                    _keepAliveOutstanding = true;
                }
            }

            if (_admin.IsConnected && _aersWanted > 0)
            {
                PostAsyncEventRequests();
            }

            if (_admin.CountTimedOut(now, (long)(_opts.AdminTimeout.TotalSeconds * Ticks.Frequency)) > 0)
            {
                _admin.Close(NvmeStatus.AbortRequested);
                Fail("admin command timed out");
            }

            return n;
        }
        finally
        {
            Monitor.Exit(_adminLock);
        }
    }

    private static readonly NvmeCompletionCallback s_keepAliveDone = static (arg, status, dw0) =>
    {
        var c = (NvmeTcpController)arg!;
        c._keepAliveOutstanding = false;
        if (!status.IsSuccess && status != NvmeStatus.TransientTransportError && status != NvmeStatus.AbortedSqDeletion)
        {
            c._log.LogWarning("NVMe/TCP {Name}: Keep Alive failed: {Status}", c.Name, status);
        }
    };

    private void Fail(string reason)
    {
        if (!_failed)
        {
            FailureReason = reason;
            _failed = true;
            _log.LogError("NVMe/TCP {Name}: controller failed: {Reason}", Name, reason);
        }
    }

    /// <summary>Starts a new association: closes the admin connection and connects it again (any thread; then poll <see cref="PollReconnect"/>).</summary>
    public void StartReconnect()
    {
        lock (_adminLock)
        {
            _failed = true;
            _reconnectStep = 1;
            _reconnectDeadline = Ticks.Now() + (long)((_opts.ConnectTimeout.TotalSeconds + _opts.AdminTimeout.TotalSeconds) * Ticks.Frequency);
            _keepAliveOutstanding = false;
            _admin.Close(NvmeStatus.TransientTransportError);
            _admin.ConnectTimeoutTicks = (long)(_opts.ConnectTimeout.TotalSeconds * Ticks.Frequency);
            if (_admin.StartConnect(NvmeFabrics.DynamicCntlid, _opts.KeepAliveTimeoutMs) != 0)
            {
                _reconnectStep = -1;
                FailureReason = _admin.LastError;
            }
        }
    }

    private sealed class PropertyOp
    {
        public bool Done;
        public NvmeStatus Status;
        public ulong Value;
    }

    private readonly PropertyOp _prop = new();

    private static readonly NvmeCompletionCallback s_propDone = static (arg, status, dw0) =>
    {
        var p = (PropertyOp)arg!;
        p.Status = status;
        p.Value = dw0;
        p.Done = true;
    };

    /// <summary>
    /// Advances a reconnect: connect, Property Get CAP and VS, Property Set CC (EN=1, 64/16-byte entries, 4 KiB pages),
    /// poll CSTS.RDY. Returns 0 while in progress, 1 when the controller is ready, a negative errno when it failed
    /// (<see cref="FailureReason"/>); a failed attempt can be started again.
    /// </summary>
    public int PollReconnect()
    {
        lock (_adminLock)
        {
            if (_reconnectStep < 0)
            {
                return -Errno.EIO;
            }

            if (_reconnectStep == 0)
            {
                return 1;
            }

            if (Ticks.Now() > _reconnectDeadline)
            {
                return ReconnectFailed("controller did not become ready in time", -Errno.ETIMEDOUT);
            }

            if (_reconnectStep == 1)
            {
                int rc = _admin.PollConnect();
                if (rc < 0)
                {
                    return ReconnectFailed(_admin.LastError ?? "connect failed", rc);
                }

                if (rc == 0)
                {
                    return 0;
                }

                _reconnectStep = 2;
                return SubmitProperty(NvmeFabrics.PropertyGet(NvmeReg.Cap, true));
            }

            _admin.Poll();
            if (_admin.IsFailed)
            {
                return ReconnectFailed(_admin.LastError ?? "connection failed", -Errno.ECONNRESET);
            }

            if (!_prop.Done)
            {
                return 0;
            }

            if (!_prop.Status.IsSuccess)
            {
                return ReconnectFailed($"property access failed at step {_reconnectStep}: {_prop.Status}", -Errno.EIO);
            }

            switch (_reconnectStep)
            {
                case 2:
                    Cap = new NvmeCap(_prop.Value);
                    if (Cap.MaxQueueEntries < 2)
                    {
                        // MQES is at least 1 (two entries): a queue pair of one entry cannot hold a command.
                        return ReconnectFailed($"CAP.MQES {Cap.MaxQueueEntries - 1}: the controller allows fewer than 2 queue entries", -Errno.EIO);
                    }

                    _reconnectStep = 3;
                    return SubmitProperty(NvmeFabrics.PropertyGet(NvmeReg.Vs, false));
                case 3:
                    Version = (uint)_prop.Value;
                    _reconnectStep = 4;
                    _reconnectDeadline = Math.Min(_reconnectDeadline, Ticks.Now() + (long)(Cap.Timeout.TotalSeconds * Ticks.Frequency)) + Ticks.Frequency;
                    return SubmitProperty(NvmeFabrics.PropertySet(NvmeReg.Cc, NvmeReg.CcEn | (6u << 16) | (4u << 20)));
                case 4:
                case 5:
                    if (_reconnectStep == 5)
                    {
                        uint csts = (uint)_prop.Value;
                        if ((csts & NvmeReg.CstsCfs) != 0)
                        {
                            return ReconnectFailed("controller fatal status (CSTS.CFS)", -Errno.EIO);
                        }

                        if ((csts & NvmeReg.CstsRdy) != 0)
                        {
                            _reconnectStep = 0;
                            _failed = false;
                            FailureReason = null;
                            ReconnectCount++;
                            _nextKeepAlive = 0;
                            _aecPending = _aersWanted > 0; // a new association: notices are off again
                            return 1;
                        }
                    }

                    _reconnectStep = 5;
                    return SubmitProperty(NvmeFabrics.PropertyGet(NvmeReg.Csts, false));
            }

            return 0;
        }
    }

    private int SubmitProperty(NvmeCommand cmd)
    {
        _prop.Done = false;
        int rc = _admin.Submit(ref cmd, default, 0, false, s_propDone, _prop);
        return rc == 0 ? 0 : ReconnectFailed($"property command not submitted ({rc})", rc);
    }

    private int ReconnectFailed(string reason, int rc)
    {
        FailureReason = reason;
        _reconnectStep = -1;
        _failed = true;
        _admin.Close(NvmeStatus.TransientTransportError);
        return rc < 0 ? rc : -Errno.EIO;
    }

    /// <summary>A new I/O queue pair with a free queue id (not connected: the owner calls StartConnect(Cntlid, 0) and polls).</summary>
    public NvmeTcpQueuePair CreateIoQueuePair(int entries = 0)
    {
        lock (_qids)
        {
            for (int q = 1; q <= MaxIoQueuePairs && q < _qids.Length; q++)
            {
                if (!_qids[q])
                {
                    _qids[q] = true;
                    return new NvmeTcpQueuePair(TransportId, (ushort)q, entries > 0 ? Math.Min(entries, IoQueueEntries) : IoQueueEntries, IoInCapsuleDataSize)
                    {
                        ConnectTimeoutTicks = (long)(_opts.ConnectTimeout.TotalSeconds * Ticks.Frequency),
                    };
                }
            }
        }

        throw new InvalidOperationException($"{Name}: all {MaxIoQueuePairs} I/O queue pairs are in use");
    }

    /// <summary>Closes an I/O queue pair and frees its queue id.</summary>
    public void ReleaseQueuePair(NvmeTcpQueuePair qp)
    {
        qp.Dispose();
        lock (_qids)
        {
            if (qp.Id < _qids.Length)
            {
                _qids[qp.Id] = false;
            }
        }
    }

    /// <summary>Shutdown notification (CC.SHN normal, best effort and bounded) and close.</summary>
    public void Dispose()
    {
        if (_disposed)
        {
            return;
        }

        if (_admin.IsConnected && !_failed)
        {
            try
            {
                ExecuteAdmin(NvmeFabrics.PropertySet(NvmeReg.Cc, NvmeReg.CcEn | (6u << 16) | (4u << 20) | (1u << 14)), null, 0);
            }
            catch (IOException)
            {
                // going away anyway
            }
        }

        _disposed = true;
        lock (_adminLock)
        {
            _admin.Dispose();
        }
    }
}

/// <summary>One discovery log page entry (NVMe-oF 1.1, figure 38), the fields a host uses.</summary>
public sealed record NvmeDiscoveryEntry(byte TrType, byte AdrFam, byte SubType, ushort PortId, ushort Cntlid, string TrSvcId, string SubNqn, string TrAddr)
{
    public const byte LogPageId = 0x70;
    public const byte TrTypeTcp = 3;
    public const byte AdrFamIpv4 = 1;
    public const byte AdrFamIpv6 = 2;

    /// <summary>Subtype of a referral to another discovery service.</summary>
    public const byte SubTypeReferral = 1;

    /// <summary>Subtype of an NVM subsystem.</summary>
    public const byte SubTypeNvme = 2;

    /// <summary>Subtype of the current discovery subsystem.</summary>
    public const byte SubTypeCurrentDiscovery = 3;

    public static NvmeDiscoveryEntry Parse(ReadOnlySpan<byte> e) => new(
        e[0], e[1], e[2],
        BinaryPrimitives.ReadUInt16LittleEndian(e[4..]),
        BinaryPrimitives.ReadUInt16LittleEndian(e[6..]),
        Text(e.Slice(32, 32)), Text(e.Slice(256, 256)), Text(e.Slice(512, 256)));

    private static string Text(ReadOnlySpan<byte> b)
    {
        int end = b.IndexOf((byte)0);
        var s = System.Text.Encoding.UTF8.GetString(end >= 0 ? b[..end] : b).Trim();
        return s.Any(char.IsControl) ? "" : s;
    }

    /// <summary>Writes the entry (a target's discovery service, and tests).</summary>
    public void Write(Span<byte> e)
    {
        e[..1024].Clear();
        e[0] = TrType;
        e[1] = AdrFam;
        e[2] = SubType;
        BinaryPrimitives.WriteUInt16LittleEndian(e[4..], PortId);
        BinaryPrimitives.WriteUInt16LittleEndian(e[6..], Cntlid);
        // UTF-8, like the NQNs in Connect data and Identify (an NQN is UTF-8, at most 223 bytes; SPDK copies its bytes).
        System.Text.Encoding.UTF8.GetBytes(TrSvcId, e.Slice(32, 32));
        System.Text.Encoding.UTF8.GetBytes(SubNqn, e.Slice(256, 256));
        System.Text.Encoding.UTF8.GetBytes(TrAddr, e.Slice(512, 256));
    }
}
