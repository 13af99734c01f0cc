using System.Runtime.InteropServices;
using Microsoft.Extensions.Logging;
using VhostBackend.Platform;
using VhostBackend.Virtio;

namespace VhostBackend.VhostUser;

/// <summary>
/// The back-end side of one vhost-user connection (a front end such as QEMU): its protocol thread reads each
/// request through <see cref="VhostUserEndpoint"/> (framing, fd limits and <see cref="VhostUserRequestTable"/>
/// checks), checks the payload's own fields, and applies it to the negotiated features, the
/// <see cref="GuestMemoryTable"/> and one <see cref="VringState"/> per queue. A queue that becomes complete is
/// handed to the <see cref="IVhostUserDevice"/>; it is taken back (after in-flight requests drain) before
/// anything it uses changes.
///
/// Errors: a malformed message (framing, size, fds, flags, queue index, reserved bits) closes the connection; a
/// well-formed request we cannot honour (unsupported, feature not negotiated, a ring outside guest memory, a bad
/// queue size) gets a REPLY_ACK failure, or a log line when no reply was asked.
/// </summary>
public sealed class VhostUserSession
{
    private static int s_nextId;

    private readonly IVhostUserDevice _device;
    private readonly VhostUserEndpoint _ep;
    private readonly ILogger _log;
    private readonly VringState[] _vrings;
    private readonly GuestMemoryTable _memory = new(VhostUserConstants.MaxMemSlots);
    private readonly TaskCompletionSource _completion = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private readonly object _backendLock = new();
    private VhostUserEndpoint? _backend;
    private InflightBuffer? _inflight;
    private MappedRegion? _logMap;
    private DirtyLog? _dirtyLog;
    private bool _shrinkWarned;
    private bool _logShrinkWarned;
    private bool _packedInflightWarned;
    private ulong _features;
    private ulong _protocolFeatures;
    private bool _featuresSet;
    private ulong _status;
    private volatile bool _closing;

    // Refusals a front end can repeat at will are logged through this (checked before formatting).
    private LogRateLimiter _refusalLog = new(burst: 32, perSecond: 2);

    public VhostUserSession(IVhostUserDevice device, UnixConnection connection, ILogger logger)
    {
        _device = device;
        _ep = new VhostUserEndpoint(connection);
        _log = logger;
        Id = Interlocked.Increment(ref s_nextId);
        Name = device.Name + "_" + Id.ToString(System.Globalization.CultureInfo.InvariantCulture);
        _vrings = new VringState[Math.Max(1, device.MaxQueues)];
        for (int i = 0; i < _vrings.Length; i++)
        {
            _vrings[i] = new VringState(i);
        }
    }

    public int Id { get; }
    public string Name { get; }
    public ulong NegotiatedFeatures => Volatile.Read(ref _features);
    public ulong NegotiatedProtocolFeatures => Volatile.Read(ref _protocolFeatures);

    /// <summary>Completes when the connection is gone and every resource is released.</summary>
    public Task Completion => _completion.Task;

    /// <summary>Number of queues currently polled (racy read for statistics).</summary>
    public int StartedQueues
    {
        get
        {
            int n = 0;
            foreach (var v in _vrings)
            {
                n += v.Started ? 1 : 0;
            }

            return n;
        }
    }

    public bool Started => StartedQueues > 0;

    public int InFlight
    {
        get
        {
            int n = 0;
            foreach (var v in _vrings)
            {
                n += v.Runner?.InFlight ?? 0;
            }

            return n;
        }
    }

    public int MaxQueues => _vrings.Length;

    /// <summary>Messages handled (for tests and statistics).</summary>
    public long MessageCount { get; private set; }

    private bool Has(int protocolFeature) => (_protocolFeatures & (1UL << protocolFeature)) != 0;

    /// <summary>VIRTIO_F_RING_PACKED negotiated: rings use the packed layout.</summary>
    private bool Packed => (_features & (1UL << VirtioFeatures.RingPacked)) != 0;

    /// <summary>Starts the protocol thread.</summary>
    public void Start()
    {
        _device.SessionOpened(this);
        new Thread(Run) { Name = "vhost:" + Name, IsBackground = true }.Start();
    }

    /// <summary>Disconnects (any thread); <see cref="Completion"/> completes once queues are stopped and memory unmapped.</summary>
    public void Close()
    {
        _closing = true;
        _ep.Shutdown();
    }

    private void Run()
    {
        try
        {
            Loop();
        }
        catch (VhostProtocolException e)
        {
            _log.LogError("vhost session {Name}: protocol error, closing connection: {Request} {Error}", Name, e.Request, e.Error);
        }
        catch (Exception e)
        {
            _log.LogError(e, "vhost session {Name}: protocol thread failed", Name);
        }
        finally
        {
            try
            {
                StopAllQueues();
                foreach (var v in _vrings)
                {
                    v.Reset();
                }

                _memory.Dispose();
                _inflight?.Dispose();
                _inflight = null;
                _dirtyLog = null;
                _logMap?.Dispose();
                _logMap = null;
                lock (_backendLock)
                {
                    _backend?.Dispose();
                    _backend = null;
                }
            }
            catch (Exception e)
            {
                _log.LogError(e, "vhost session {Name}: cleanup failed", Name);
            }

            _ep.Dispose();
            _device.SessionClosed(this);
            _log.LogInformation("vhost session {Name} closed", Name);
            _completion.TrySetResult();
        }
    }

    private void Loop()
    {
        var payload = new byte[VhostUserConstants.MaxPayload];
        int[] fds = new int[UnixConnection.MaxFdsPerMessage];
        while (!_closing)
        {
            var e = _ep.ReceiveRequest(_protocolFeatures, out var hdr, payload, out int size, fds, out int fdCount);
            if (e is VhostUserError.Closed or VhostUserError.Io)
            {
                if (e == VhostUserError.Io)
                {
                    _log.LogWarning("vhost session {Name}: receive failed: errno {Errno}", Name, _ep.LastErrno);
                }

                return;
            }

            MessageCount++;
            var req = (VhostUserRequest)hdr.Request;
            if (e != VhostUserError.None)
            {
                if (!VhostUserRequestTable.IsRefusable(hdr.Request, e))
                {
                    throw new VhostProtocolException(req, e);
                }

                if (_refusalLog.TryAcquire(Ticks.Now(), out long suppressed))
                {
                    _log.LogWarning("vhost session {Name}: request {Request} refused: {Error} ({Suppressed} earlier refusals not logged)", Name, hdr.Request, e, suppressed);
                }

                Ack(hdr, ok: false);
                continue;
            }

            try
            {
                if (_log.IsEnabled(LogLevel.Debug))
                {
                    _log.LogDebug("vhost session {Name}: {Request} ({Size} bytes, {Fds} fds)", Name, req, size, fdCount);
                }

                Ack(hdr, Dispatch(req, payload.AsSpan(0, size), fds.AsSpan(0, fdCount)));
            }
            finally
            {
                // Whatever a handler did not take (it sets taken entries to -1) is closed here.
                Fd.CloseAll(fds.AsSpan(0, fdCount));
            }
        }
    }

    /// <summary>The REPLY_ACK of a request without a mandatory reply (when asked and negotiated).</summary>
    private void Ack(in VhostUserHeader hdr, bool ok)
    {
        if (VhostUserRequestTable.Get(hdr.Request).Reply == VhostUserReplyKind.Always)
        {
            return;
        }

        if (hdr.NeedReply && Has(VhostUserProtocolFeature.ReplyAck))
        {
            Reply(hdr.Request, ok ? 0UL : 1UL);
        }
        else if (!ok && _refusalLog.TryAcquire(Ticks.Now(), out long suppressed))
        {
            _log.LogWarning("vhost session {Name}: request {Request} failed, no reply was asked ({Suppressed} earlier refusals not logged)", Name, (VhostUserRequest)hdr.Request, suppressed);
        }
    }

    /// <summary>Handles one request that passed the table checks. Returns success (for REPLY_ACK).</summary>
    private bool Dispatch(VhostUserRequest req, ReadOnlySpan<byte> p, Span<int> fds)
    {
        switch (req)
        {
            case VhostUserRequest.GetFeatures:
                return Reply(req, _device.Features);
            case VhostUserRequest.GetProtocolFeatures:
                return Reply(req, _device.ProtocolFeatures);
            case VhostUserRequest.GetQueueNum:
                return Reply(req, (ulong)_vrings.Length);
            case VhostUserRequest.GetMaxMemSlots:
                return Reply(req, (ulong)_memory.MaxSlots);
            case VhostUserRequest.GetStatus:
                return Reply(req, _status);
            case VhostUserRequest.SetFeatures:
                return SetFeatures(MemoryMarshal.Read<ulong>(p));
            case VhostUserRequest.SetProtocolFeatures:
                return SetProtocolFeatures(MemoryMarshal.Read<ulong>(p));
            case VhostUserRequest.SetOwner:
                return true;
            case VhostUserRequest.ResetOwner:
            case VhostUserRequest.ResetDevice:
                ResetDevice();
                return true;
            case VhostUserRequest.SetStatus:
                _status = MemoryMarshal.Read<ulong>(p) & 0xFF;
                return true;
            case VhostUserRequest.SetMemTable:
                return SetMemTable(p, fds);
            case VhostUserRequest.AddMemReg:
            case VhostUserRequest.RemMemReg:
                return ChangeMemReg(req, MemoryMarshal.Read<VhostUserSingleMemoryRegion>(p), fds);
            case VhostUserRequest.SetVringNum:
            case VhostUserRequest.SetVringBase:
            case VhostUserRequest.SetVringEnable:
            case VhostUserRequest.GetVringBase:
                return HandleVringState(req, MemoryMarshal.Read<VhostUserVringState>(p));
            case VhostUserRequest.SetVringAddr:
                return SetVringAddr(MemoryMarshal.Read<VhostUserVringAddr>(p));
            case VhostUserRequest.SetVringKick:
            case VhostUserRequest.SetVringCall:
            case VhostUserRequest.SetVringErr:
                return SetVringFd(req, new VhostUserVringFile(MemoryMarshal.Read<ulong>(p)), fds);
            case VhostUserRequest.GetConfig:
                return GetConfig(p);
            case VhostUserRequest.SetConfig:
                return SetConfig(p);
            case VhostUserRequest.GetInflightFd:
                return GetInflightFd(ReadInflight(p));
            case VhostUserRequest.SetInflightFd:
                return SetInflightFd(ReadInflight(p), fds);
            case VhostUserRequest.SetLogBase:
                return SetLogBase(MemoryMarshal.Read<VhostUserLog>(p), fds);
            case VhostUserRequest.SetBackendReqFd:
                lock (_backendLock)
                {
                    _backend?.Dispose();
                    _backend = new VhostUserEndpoint(new UnixConnection(fds[0]));
                }

                fds[0] = -1; // taken
                return true;
            default:
                throw new VhostProtocolException(req, VhostUserError.Unsupported); // the table lists no other
        }
    }

    private bool Reply(uint request, ulong value) => Sent((VhostUserRequest)request, _ep.SendReply(request, in value));

    private bool Reply(VhostUserRequest request, ulong value) => Reply((uint)request, value);

    /// <summary>A reply that could not be sent ends the connection.</summary>
    private static bool Sent(VhostUserRequest request, int rc) => rc == 0 ? true : throw new VhostProtocolException(request, VhostUserError.Io);

    private bool Refuse<TWhat, TDetail>(TWhat what, int index, TDetail detail)
    {
        if (_refusalLog.TryAcquire(Ticks.Now(), out long suppressed))
        {
            _log.LogError("vhost session {Name}: {What} (queue or region {Index}): {Detail} ({Suppressed} earlier refusals not logged)", Name, what, index, detail, suppressed);
        }

        return false;
    }

    // ---- features ----------------------------------------------------------------------------------------

    private bool SetFeatures(ulong features)
    {
        if ((features & ~_device.Features) != 0)
        {
            return Refuse("SET_FEATURES", -1, features & ~_device.Features);
        }

        // VHOST_F_LOG_ALL may come before SET_LOG_BASE: QEMU's vhost_dev_start on a device started while migration
        // logging is on sends SET_FEATURES with it first and the log right after. Logging begins when the log
        // arrives (SET_LOG_BASE restarts the queues on it); until then there is nothing to log into.
        bool logAll = (features & (1UL << VhostUserConstants.LogAllBit)) != 0;
        bool logChanged = logAll != ((_features & (1UL << VhostUserConstants.LogAllBit)) != 0);
        Volatile.Write(ref _features, features);
        if (logChanged)
        {
            // Running queues pick the logging state up when they start: restart them (in-flight requests drain).
            _log.LogInformation("vhost session {Name}: dirty page logging {State}", Name, logAll ? "on" : "off");
            RestartQueues();
        }

        if (!_featuresSet)
        {
            // Without VHOST_USER_F_PROTOCOL_FEATURES rings start enabled; with it they wait for SET_VRING_ENABLE.
            _featuresSet = true;
            bool protocol = (features & (1UL << VhostUserConstants.ProtocolFeaturesBit)) != 0;
            foreach (var v in _vrings)
            {
                v.SetInitialEnable(!protocol);
            }
        }

        _log.LogInformation("vhost session {Name}: features 0x{Features:x}", Name, features);
        return true;
    }

    private bool SetProtocolFeatures(ulong features)
    {
        if ((features & ~_device.ProtocolFeatures) != 0)
        {
            return Refuse("SET_PROTOCOL_FEATURES", -1, features & ~_device.ProtocolFeatures);
        }

        Volatile.Write(ref _protocolFeatures, features);
        return true;
    }

    private void RestartQueues()
    {
        StopAllQueues();
        foreach (var v in _vrings)
        {
            TryStartQueue(v);
        }
    }

    // ---- dirty page log (live migration) -----------------------------------------------------------------

    /// <summary>
    /// SET_LOG_BASE (LOG_SHMFD): maps the front end's dirty log: its size and offset checked against the file, at
    /// most <see cref="VhostUserLog.MaxSize"/> bytes. Queues stop while the log is swapped (a resize replaces it
    /// while rings run) and restart on the new one; the old mapping goes only once nothing writes to it. The reply
    /// (a u64 0, or 1 when refused) tells the front end the log is in place.
    /// </summary>
    private bool SetLogBase(in VhostUserLog m, Span<int> fds)
    {
        MappedRegion? map = null;
        string error = "";
        if (!m.IsValid)
        {
            error = $"size {m.MmapSize} offset {m.MmapOffset}";
        }
        else if (Fd.GetFileSize(fds[0], out long fileSize, out bool regular) != 0 || !regular || (ulong)fileSize < m.MmapOffset + m.MmapSize)
        {
            error = $"the log fd is not a file of at least offset {m.MmapOffset} + size {m.MmapSize} bytes";
        }
        else
        {
            try
            {
                map = MappedRegion.Map(fds[0], m.MmapOffset + m.MmapSize);
            }
            catch (IOException e)
            {
                error = e.Message;
            }
        }

        if (map is null)
        {
            Refuse("SET_LOG_BASE", -1, error);
            Reply(VhostUserRequest.SetLogBase, 1);
            return false;
        }

        WarnIfShrinkable(fds[0], "dirty log", ref _logShrinkWarned);
        StopAllQueues();
        var old = _logMap;
        _logMap = map;
        _dirtyLog = new DirtyLog(map.Pointer + (nint)m.MmapOffset, m.MmapSize);
        old?.Dispose();
        foreach (var v in _vrings)
        {
            TryStartQueue(v);
        }

        _log.LogInformation("vhost session {Name}: dirty log of {Size} bytes mapped (covers {Covered} MiB of guest memory)", Name, m.MmapSize, _dirtyLog.CoveredBytes >> 20);
        return Reply(VhostUserRequest.SetLogBase, 0);
    }

    private void ResetDevice()
    {
        StopAllQueues();
        foreach (var v in _vrings)
        {
            v.Reset();
        }

        _featuresSet = false;
        _features = 0;
        _status = 0;
    }

    // ---- memory ------------------------------------------------------------------------------------------

    private bool SetMemTable(ReadOnlySpan<byte> p, Span<int> fds)
    {
        var mh = MemoryMarshal.Read<VhostUserMemoryHeader>(p);
        if (!mh.IsValid(p.Length) || fds.Length != mh.NRegions)
        {
            throw new VhostProtocolException(VhostUserRequest.SetMemTable, VhostUserError.InvalidPayload);
        }

        var regions = MemoryMarshal.Cast<byte, VhostUserMemoryRegion>(p[8..]);
        foreach (int fd in fds)
        {
            WarnIfShrinkable(fd, "guest memory", ref _shrinkWarned);
        }

        var e = GuestMemoryTable.TryMapAll(regions, fds, out var mapped, out int failed);
        if (e != MemoryRegionError.None)
        {
            return Refuse("SET_MEM_TABLE refused", failed, e);
        }

        // The fds are no longer needed once mapped (the mapping keeps the memory alive).
        StopAllQueues();
        _memory.ReplaceAll(mapped);
        PublishMemory();
        return true;
    }

    private bool ChangeMemReg(VhostUserRequest req, in VhostUserSingleMemoryRegion m, Span<int> fds)
    {
        if (!m.IsValid)
        {
            return Refuse("memory region refused", -1, MemoryRegionError.BadRange);
        }

        int index = req == VhostUserRequest.RemMemReg ? _memory.Find(m.Region) : -1;
        if (req == VhostUserRequest.RemMemReg && index < 0)
        {
            return Refuse("REM_MEM_REG refused", -1, MemoryRegionError.NotFound);
        }

        StopAllQueues();
        var e = MemoryRegionError.None;
        if (req == VhostUserRequest.AddMemReg)
        {
            WarnIfShrinkable(fds[0], "guest memory", ref _shrinkWarned);
            e = _memory.TryAdd(m.Region, fds[0]);
        }
        else
        {
            // Queues were drained and stopped, so no request references the region any more.
            _memory.RemoveAt(index);
        }

        PublishMemory();
        return e == MemoryRegionError.None || Refuse("ADD_MEM_REG refused", _memory.Count, e);
    }

    /// <summary>
    /// The size of a region was checked against its file when it was mapped; a memfd not sealed against
    /// shrinking can still be truncated by the front end afterwards, and touching the lost pages would fault
    /// (SIGBUS). QEMU seals its memfd backends by default (memory-backend-memfd seal=on); say so once per session
    /// when a front end's memory is not sealed, so an operator knows the daemon trusts that front end. The dirty
    /// log (SET_LOG_BASE) is mapped and written the same way and is checked the same way, with its own once flag.
    /// </summary>
    private void WarnIfShrinkable(int fd, string what, ref bool warned)
    {
        if (warned)
        {
            return;
        }

        int seals = Fd.GetSeals(fd);
        if (seals < 0 || (seals & Fd.SealShrink) == 0)
        {
            warned = true;
            _log.LogWarning("vhost session {Name}: {What} fd is not sealed against shrinking ({Reason}); a front end that truncates it could fault the daemon",
                Name, what, seals < 0 ? "not a memfd: " + Errno.Message(-seals) : "no F_SEAL_SHRINK");
        }
    }

    /// <summary>Tells the device about the new view and restarts every complete ring on it (a ring that cannot start is logged).</summary>
    private void PublishMemory()
    {
        _device.MemoryUpdated(this, _memory.Memory);
        if (_log.IsEnabled(LogLevel.Information))
        {
            _log.LogInformation("vhost session {Name}: guest memory has {Count} regions ({Regions})", Name, _memory.Count, string.Join("; ", _memory.Memory.Regions));
        }

        foreach (var v in _vrings)
        {
            TryStartQueue(v);
        }
    }

    // ---- vrings ------------------------------------------------------------------------------------------

    private VringState Vring(VhostUserRequest req, uint index) =>
        index < (uint)_vrings.Length ? _vrings[index] : throw new VhostProtocolException(req, VhostUserError.InvalidPayload);

    private bool HandleVringState(VhostUserRequest req, in VhostUserVringState s)
    {
        var v = Vring(req, s.Index);
        VringError e;
        switch (req)
        {
            case VhostUserRequest.SetVringNum:
                e = v.SetNum(s.Num);
                break;
            case VhostUserRequest.SetVringBase:
                e = v.SetBase(s.Num, Packed);
                break;
            case VhostUserRequest.GetVringBase:
                StopQueue(v);
                v.Suspend();
                return Sent(req, _ep.SendReply((uint)req, new VhostUserVringState { Index = s.Index, Num = v.Base }));
            default:
                e = v.SetEnable(s.Num);
                if (e == VringError.None && !v.Enabled)
                {
                    StopQueue(v);
                }

                break;
        }

        return e == VringError.None ? TryStartQueue(v) : Refuse(req, v.Index, e);
    }

    private bool SetVringAddr(in VhostUserVringAddr a)
    {
        var v = Vring(VhostUserRequest.SetVringAddr, a.Index);
        StopQueue(v);
        var e = v.SetAddress(a);
        bool started = TryStartQueue(v); // with the new addresses, or again with the old ones
        return e == VringError.None ? started : Refuse("SET_VRING_ADDR", v.Index, e);
    }

    private bool SetVringFd(VhostUserRequest req, VhostUserVringFile f, Span<int> fds)
    {
        if (!f.IsValid(_vrings.Length, fds.Length))
        {
            throw new VhostProtocolException(req, VhostUserError.InvalidPayload);
        }

        var v = _vrings[f.Index];
        int fd = f.NoFd ? -1 : fds[0];
        if (fd >= 0)
        {
            fds[0] = -1; // taken
            Fd.SetNonBlocking(fd);
        }

        switch (req)
        {
            case VhostUserRequest.SetVringCall:
                var call = fd >= 0 ? new EventFd(fd) : null;
                var old = v.SetCall(call);
                v.Runner?.SetCallAsync(call).GetAwaiter().GetResult();
                old?.Dispose();
                return true;
            case VhostUserRequest.SetVringErr:
                v.SetErr(fd);
                return true;
            default:
                StopQueue(v);
                v.SetKick(fd >= 0 ? new EventFd(fd) : null);
                return TryStartQueue(v);
        }
    }

    // ---- in-flight tracking (INFLIGHT_SHMFD) -------------------------------------------------------------

    private static VhostUserInflight ReadInflight(ReadOnlySpan<byte> p)
    {
        // 20 bytes of fields; the C struct's 4 bytes of tail padding may or may not be sent.
        Span<byte> buf = stackalloc byte[24];
        p[..Math.Min(p.Length, 24)].CopyTo(buf);
        return MemoryMarshal.Read<VhostUserInflight>(buf);
    }

    /// <summary>GET_INFLIGHT_FD: a fresh zeroed buffer for the queue count and size the front end gives, sent as an fd.</summary>
    private bool GetInflightFd(in VhostUserInflight m)
    {
        var reply = new VhostUserInflight { NumQueues = m.NumQueues, QueueSize = m.QueueSize };
        int fd = -1;
        if (!m.IsValidRequest(_vrings.Length))
        {
            Refuse("GET_INFLIGHT_FD", m.NumQueues, m.QueueSize);
        }
        else
        {
            try
            {
                var buffer = InflightBuffer.Create(m.NumQueues, m.QueueSize, Packed, out fd);
                StopAllQueues();
                _inflight?.Dispose();
                _inflight = buffer;
                reply.MmapSize = buffer.Size;
                _log.LogInformation("vhost session {Name}: in-flight buffer of {Size} bytes for {Queues} {Layout} queues of {QueueSize}", Name, buffer.Size, m.NumQueues, Packed ? "packed" : "split", m.QueueSize);
            }
            catch (IOException e)
            {
                _log.LogError("vhost session {Name}: GET_INFLIGHT_FD: {Error}", Name, e.Message);
            }
        }

        // A refusal is a reply with size 0 and no fd (the front end then runs without tracking).
        try
        {
            return Sent(VhostUserRequest.GetInflightFd, _ep.SendReply((uint)VhostUserRequest.GetInflightFd, VhostUserEndpoint.AsBytes(in reply), fd >= 0 ? [fd] : []))
                && reply.MmapSize != 0;
        }
        finally
        {
            Fd.Close(fd);
        }
    }

    /// <summary>
    /// SET_INFLIGHT_FD: the buffer to track in-flight requests in (after a reconnect: the one a previous back end
    /// filled). Its size is checked against the file; queues restart on it and resubmit what it records.
    /// </summary>
    private bool SetInflightFd(in VhostUserInflight m, Span<int> fds)
    {
        if (!m.IsValidBuffer(_vrings.Length))
        {
            return Refuse("SET_INFLIGHT_FD", m.NumQueues, $"size {m.MmapSize} offset {m.MmapOffset} queue size {m.QueueSize}");
        }

        var buffer = InflightBuffer.TryMap(m, fds[0], out string error, out bool shrinkable);
        if (buffer is null)
        {
            return Refuse("SET_INFLIGHT_FD", m.NumQueues, error);
        }

        if (shrinkable)
        {
            _log.LogWarning("vhost session {Name}: the in-flight buffer's memfd is not sealed against shrinking; the front end could still truncate it", Name);
        }

        StopAllQueues();
        _inflight?.Dispose();
        _inflight = buffer;
        foreach (var v in _vrings)
        {
            TryStartQueue(v);
        }

        return true;
    }

    /// <summary>Hands a complete ring to the device (no-op when it is not complete or already running). False if it failed to start.</summary>
    private bool TryStartQueue(VringState v)
    {
        if (_closing || !v.IsComplete(_memory.Count > 0))
        {
            return true;
        }

        var a = v.Address!.Value;
        bool eventIdx = (_features & (1UL << VirtioFeatures.RingEventIdx)) != 0;
        if (Packed)
        {
            return TryStartPacked(v, a, eventIdx);
        }

        var vq = SplitVirtqueue.Create(_memory.Memory, v.Num, a.DescUserAddr, a.AvailUserAddr, a.UsedUserAddr, eventIdx, (ushort)v.Base, out string error);
        if (vq is null)
        {
            return Refuse("queue not started", v.Index, error);
        }

        // In-flight tracking: requests a previous back end took and never completed are resubmitted first; the
        // ring's base then counts them (used.idx + in flight), whatever base the front end restored.
        var inflight = _inflight?.ForQueue(v.Index, v.Num);
        ushort[]? resubmit = null;
        if (inflight is not null)
        {
            resubmit = inflight.Recover(vq.LastUsedIdx, out bool reset);
            if (reset)
            {
                _log.LogWarning("vhost session {Name}: queue {Index}: in-flight region did not match the queue size; reset", Name, v.Index);
            }

            if (resubmit.Length > 0)
            {
                var rebased = SplitVirtqueue.Create(_memory.Memory, v.Num, a.DescUserAddr, a.AvailUserAddr, a.UsedUserAddr, eventIdx, (ushort)(vq.LastUsedIdx + resubmit.Length), out error);
                if (rebased is null)
                {
                    return Refuse("queue not started", v.Index, error);
                }

                _log.LogWarning("vhost session {Name}: queue {Index}: resubmitting {Count} requests left in flight (used {Used}, base {Base} -> {NewBase})",
                    Name, v.Index, resubmit.Length, vq.LastUsedIdx, v.Base, rebased.LastAvailIdx);
                vq = rebased;
            }
        }

        return StartRunner(v, vq, inflight, resubmit, eventIdx);
    }

    /// <summary>
    /// A packed ring (VIRTIO_F_RING_PACKED): avail = the driver event suppression area, used = the device's. With an
    /// in-flight buffer (QEMU's packed layout) the region is validated and repaired first; a region left by a previous
    /// back end decides the ring position (QEMU cannot restore a packed ring's indices after a back-end crash and
    /// sends a stale base) and its in-flight buffers are resubmitted first, walked from the copies the region keeps.
    /// A region that fails validation is refused: the queue does not start.
    /// </summary>
    private bool TryStartPacked(VringState v, in VhostUserVringAddr a, bool eventIdx)
    {
        var vq = PackedVirtqueue.Create(_memory.Memory, v.Num, a.DescUserAddr, a.AvailUserAddr, a.UsedUserAddr, eventIdx, v.Base, out string error);
        if (vq is null)
        {
            return Refuse("packed queue not started", v.Index, error);
        }

        var inflight = _inflight?.ForPackedQueue(v.Index, v.Num);
        if (_inflight is not null && inflight is null && !_packedInflightWarned)
        {
            _packedInflightWarned = true;
            _log.LogWarning("vhost session {Name}: the in-flight buffer ({Size} bytes, {Queues} queues of {QueueSize}) does not cover packed queue {Index} of size {Num}; requests in flight at a back-end crash are not recovered",
                Name, _inflight.Size, _inflight.NumQueues, _inflight.QueueSize, v.Index, v.Num);
        }

        ushort[]? resubmit = null;
        if (inflight is not null)
        {
            if (!inflight.TryRecover(vq, out var recovery, out error))
            {
                return Refuse("packed queue not started: in-flight region refused", v.Index, error);
            }

            if (!recovery.Fresh && recovery.VringBase != vq.VringBase)
            {
                var rebased = PackedVirtqueue.Create(_memory.Memory, v.Num, a.DescUserAddr, a.AvailUserAddr, a.UsedUserAddr, eventIdx, recovery.VringBase, out error);
                if (rebased is null)
                {
                    return Refuse("packed queue not started", v.Index, error);
                }

                _log.LogWarning("vhost session {Name}: queue {Index}: ring position from the in-flight region: base 0x{Base:x} -> 0x{NewBase:x}", Name, v.Index, v.Base, recovery.VringBase);
                vq = rebased;
            }

            inflight.Attach(vq, recovery);
            resubmit = recovery.Resubmit;
            if (resubmit.Length > 0)
            {
                _log.LogWarning("vhost session {Name}: queue {Index}: resubmitting {Count} requests left in flight (packed, used 0x{Used:x})",
                    Name, v.Index, resubmit.Length, vq.LastUsedIdx);
            }
        }

        return StartRunner(v, vq, inflight, resubmit, eventIdx);
    }

    private bool StartRunner(VringState v, DeviceVirtqueue vq, InflightTracker? inflight, ushort[]? resubmit, bool eventIdx)
    {
        // Live migration: with VHOST_F_LOG_ALL every device write into guest memory is logged; used ring writes
        // too when the ring's VHOST_VRING_F_LOG is set, at its log_guest_addr.
        var a = v.Address!.Value;
        if ((_features & (1UL << VhostUserConstants.LogAllBit)) != 0 && _dirtyLog is { } dirty)
        {
            vq.SetDirtyLog(dirty, (a.Flags & VhostUserVringAddr.FlagLog) != 0, a.LogGuestAddr);
        }

        try
        {
            v.MarkStarted(_device.StartQueueAsync(this, new VhostUserReadyQueue(v.Index, vq, v.Call, v.Kick, inflight, resubmit)).GetAwaiter().GetResult());
        }
        catch (Exception e)
        {
            _log.LogError(e, "vhost session {Name}: queue {Index} failed to start", Name, v.Index);
            return false;
        }

        _log.LogInformation("vhost session {Name}: queue {Index} started ({Layout}, size {Size}, base 0x{Base:x}, event_idx {EventIdx}, kick {Kick}, call {Call})",
            Name, v.Index, vq.IsPacked ? "packed" : "split", v.Num, v.Base, eventIdx, v.Kick is not null, v.Call is not null);
        return true;
    }

    private void StopQueue(VringState v)
    {
        if (v.Runner is { } runner)
        {
            v.MarkStopped(runner.StopAsync().GetAwaiter().GetResult());
            _log.LogInformation("vhost session {Name}: queue {Index} stopped at 0x{Base:x}", Name, v.Index, v.Base);
        }
    }

    private void StopAllQueues()
    {
        foreach (var v in _vrings)
        {
            StopQueue(v);
        }
    }

    // ---- config and backend channel ---------------------------------------------------------------------

    private bool GetConfig(ReadOnlySpan<byte> p)
    {
        var ch = MemoryMarshal.Read<VhostUserConfigHeader>(p);
        Span<byte> reply = stackalloc byte[12 + VhostUserConstants.ConfigSpaceMax];
        if (!ch.IsValid(p.Length) || _device.ReadConfig(ch.Offset, reply.Slice(12, (int)ch.Size)) != 0)
        {
            // Failure is a reply with an empty config payload (the front end sees the size mismatch).
            _log.LogError("vhost session {Name}: GET_CONFIG offset {Offset} size {Size} refused", Name, ch.Offset, ch.Size);
            ch.Size = 0;
        }

        MemoryMarshal.Write(reply, in ch);
        return Sent(VhostUserRequest.GetConfig, _ep.SendReply((uint)VhostUserRequest.GetConfig, reply[..(12 + (int)ch.Size)]));
    }

    private bool SetConfig(ReadOnlySpan<byte> p)
    {
        var ch = MemoryMarshal.Read<VhostUserConfigHeader>(p);
        if (!ch.IsValid(p.Length))
        {
            throw new VhostProtocolException(VhostUserRequest.SetConfig, VhostUserError.InvalidPayload);
        }

        return _device.WriteConfig(ch.Offset, p.Slice(12, (int)ch.Size)) == 0;
    }

    /// <summary>
    /// Tells the front end the config space changed (e.g. capacity after a resize) over the backend channel.
    /// Returns false when no backend channel was negotiated. Any thread; blocking send of a 12-byte message.
    /// </summary>
    public bool SendConfigChange()
    {
        lock (_backendLock)
        {
            if (_backend is null || !Has(VhostUserProtocolFeature.Config))
            {
                return false;
            }

            int rc = _backend.Send((uint)VhostUserBackendRequest.ConfigChangeMsg, VhostUserConstants.Version, ReadOnlySpan<byte>.Empty);
            if (rc != 0)
            {
                _log.LogWarning("vhost session {Name}: config change notification failed: errno {Errno}", Name, -rc);
                return false;
            }

            return true;
        }
    }
}
