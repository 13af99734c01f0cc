using System.Runtime.InteropServices;
using Microsoft.Extensions.Logging;
using VhostBackend.Platform;
using VhostBackend.Virtio;

namespace VhostBackend.Vhost;

/// <summary>A message the front end got wrong badly enough that the connection is closed.</summary>
public sealed class VhostProtocolException : Exception
{
    public VhostProtocolException(string message)
        : base(message)
    {
    }
}

/// <summary>
/// One vhost-user connection (a front end such as QEMU) and its device state: negotiated features, the guest
/// memory map, and per-queue configuration. Its protocol thread (one per connection) reads and validates every
/// message and owns all of this state; queue state that a reactor uses is handed over when the queue starts and
/// taken back (after in-flight requests drain) when it stops.
///
/// Validation: header version must be 1 with no reply bit; the payload size must match the request exactly;
/// fds are accepted only on requests that carry them (and only as many as they carry); anything else closes the
/// connection. Semantically wrong but well-formed requests (a ring outside guest memory, a bad queue size)
/// are refused with a REPLY_ACK failure (or a log line when no reply was asked).
/// </summary>
public sealed class VhostUserSession
{
    private static int s_nextId;

    private readonly IVhostUserDevice _device;
    private readonly UnixConnection _conn;
    private readonly ILogger _log;
    private readonly Vring[] _vrings;
    private readonly List<(GuestMemoryRegion Region, MappedRegion Map)> _regions = new();
    private readonly TaskCompletionSource _completion = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private readonly object _backendLock = new();
    private GuestMemory _memory = GuestMemory.Empty;
    private UnixConnection? _backend;
    private Thread? _thread;
    private ulong _features;
    private ulong _protocolFeatures;
    private bool _featuresSet;
    private ulong _status;
    private volatile bool _closing;

    public VhostUserSession(IVhostUserDevice device, UnixConnection connection, ILogger logger)
    {
        _device = device;
        _conn = connection;
        _log = logger;
        Id = Interlocked.Increment(ref s_nextId);
        _vrings = new Vring[Math.Max(1, device.MaxQueues)];
        for (int i = 0; i < _vrings.Length; i++)
        {
            _vrings[i] = new Vring();
        }
    }

    public int Id { get; }
    public string Name => $"{_device.Name}_{Id}";
    public ulong NegotiatedFeatures => Volatile.Read(ref _features);
    public ulong NegotiatedProtocolFeatures => Volatile.Read(ref _protocolFeatures);

    /// <summary>Completes when the connection is gone and every resource is released.</summary>
    public Task Completion => _completion.Task;

    /// <summary>Number of queues currently polled (racy read for statistics).</summary>
    public int StartedQueues => _vrings.Count(v => v.Runner is not null);

    public bool Started => StartedQueues > 0;

    public int InFlight => _vrings.Sum(v => v.Runner?.InFlight ?? 0);

    public int MaxQueues => _vrings.Length;

    /// <summary>Messages handled (for tests and statistics).</summary>
    public long MessageCount { get; private set; }

    private bool HasProtocolFeature(int bit) => (_protocolFeatures & (1UL << bit)) != 0;

    private bool ProtocolFeaturesNegotiated => (_features & (1UL << VhostUserConstants.ProtocolFeaturesBit)) != 0;

    /// <summary>Starts the protocol thread.</summary>
    public void Start()
    {
        _device.SessionOpened(this);
        _thread = new Thread(Run) { Name = "vhost:" + Name, IsBackground = true };
        _thread.Start();
    }

    /// <summary>Disconnects (any thread); <see cref="Completion"/> completes once queues are stopped and memory unmapped.</summary>
    public void Close()
    {
        _closing = true;
        _conn.Shutdown();
    }

    private void Run()
    {
        try
        {
            Loop();
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
                ReleaseAll();
            }
            catch (Exception e)
            {
                _log.LogError(e, "vhost session {Name}: cleanup failed", Name);
            }

            _conn.Dispose();
            _device.SessionClosed(this);
            _log.LogInformation("vhost session {Name} closed", Name);
            _completion.TrySetResult();
        }
    }

    private void Loop()
    {
        Span<byte> header = stackalloc byte[12];
        var payload = new byte[VhostUserConstants.MaxPayload];
        int[] fds = new int[UnixConnection.MaxFdsPerMessage];
        while (!_closing)
        {
            int n = _conn.Receive(header, fds, out int fdCount, out bool truncated);
            if (n <= 0)
            {
                Fd.CloseAll(fds.AsSpan(0, fdCount));
                if (n < 0)
                {
                    _log.LogWarning("vhost session {Name}: receive failed: {Error}", Name, Native.StrError(-n));
                }

                return;
            }

            if (n < header.Length && !_conn.ReceiveExact(header[n..]))
            {
                Fd.CloseAll(fds.AsSpan(0, fdCount));
                return;
            }

            var hdr = MemoryMarshal.Read<VhostUserHeader>(header);
            try
            {
                if (truncated)
                {
                    throw new VhostProtocolException($"too many fds with request {hdr.Request}");
                }

                if ((hdr.Flags & VhostUserConstants.VersionMask) != VhostUserConstants.Version || (hdr.Flags & VhostUserConstants.FlagReply) != 0)
                {
                    throw new VhostProtocolException($"bad flags 0x{hdr.Flags:x} on request {hdr.Request}");
                }

                if (hdr.Size > VhostUserConstants.MaxPayload)
                {
                    throw new VhostProtocolException($"payload of {hdr.Size} bytes on request {hdr.Request} is too large");
                }

                if (hdr.Size > 0 && !_conn.ReceiveExact(payload.AsSpan(0, (int)hdr.Size)))
                {
                    Fd.CloseAll(fds.AsSpan(0, fdCount));
                    return;
                }

                MessageCount++;
                Dispatch(hdr, payload.AsSpan(0, (int)hdr.Size), fds.AsSpan(0, fdCount));
            }
            catch (VhostProtocolException e)
            {
                _log.LogError("vhost session {Name}: protocol error, closing connection: {Message}", Name, e.Message);
                return;
            }
            finally
            {
                // Whatever a handler did not take (it sets taken entries to -1) is closed here.
                Fd.CloseAll(fds.AsSpan(0, fdCount));
            }
        }
    }

    private void Dispatch(in VhostUserHeader hdr, ReadOnlySpan<byte> p, Span<int> fds)
    {
        var req = (VhostUserRequest)hdr.Request;
        bool needReply = (hdr.Flags & VhostUserConstants.FlagNeedReply) != 0 && HasProtocolFeature(VhostUserProtocolFeature.ReplyAck);
        int rc; // 0 = success, else failure reported by REPLY_ACK
        if (_log.IsEnabled(LogLevel.Debug))
        {
            _log.LogDebug("vhost session {Name}: {Request} ({Size} bytes, {Fds} fds{Index})", Name, req, hdr.Size, fds.Length,
                p.Length >= 4 && req is >= VhostUserRequest.SetVringNum and <= VhostUserRequest.SetVringErr or VhostUserRequest.SetVringEnable ? ", index " + (BitConverter.ToUInt32(p) & 0xFF) : "");
        }

        switch (req)
        {
            case VhostUserRequest.GetFeatures:
                ExpectGet(hdr, fds);
                ReplyU64(req, _device.Features);
                return;
            case VhostUserRequest.SetFeatures:
                rc = SetFeatures(ReadU64(hdr, p, fds));
                break;
            case VhostUserRequest.GetProtocolFeatures:
                ExpectGet(hdr, fds);
                ReplyU64(req, _device.ProtocolFeatures);
                return;
            case VhostUserRequest.SetProtocolFeatures:
                rc = SetProtocolFeatures(ReadU64(hdr, p, fds));
                break;
            case VhostUserRequest.SetOwner:
                ExpectSize(hdr, 0, 0, fds);
                rc = 0;
                break;
            case VhostUserRequest.ResetOwner:
            case VhostUserRequest.ResetDevice:
                ExpectSize(hdr, 0, 0, fds);
                ResetDevice();
                rc = 0;
                break;
            case VhostUserRequest.GetQueueNum:
                ExpectGet(hdr, fds);
                ReplyU64(req, (ulong)_vrings.Length);
                return;
            case VhostUserRequest.GetMaxMemSlots:
                ExpectGet(hdr, fds);
                ReplyU64(req, VhostUserConstants.MaxMemSlots);
                return;
            case VhostUserRequest.SetMemTable:
                rc = SetMemTable(hdr, p, fds);
                break;
            case VhostUserRequest.AddMemReg:
                rc = AddMemReg(hdr, p, fds);
                break;
            case VhostUserRequest.RemMemReg:
                rc = RemMemReg(hdr, p, fds);
                break;
            case VhostUserRequest.SetVringNum:
                rc = SetVringNum(ReadStruct<VhostUserVringState>(hdr, p, fds));
                break;
            case VhostUserRequest.SetVringAddr:
                rc = SetVringAddr(ReadStruct<VhostUserVringAddr>(hdr, p, fds));
                break;
            case VhostUserRequest.SetVringBase:
                rc = SetVringBase(ReadStruct<VhostUserVringState>(hdr, p, fds));
                break;
            case VhostUserRequest.GetVringBase:
                GetVringBase(ReadStruct<VhostUserVringState>(hdr, p, fds));
                return;
            case VhostUserRequest.SetVringKick:
            case VhostUserRequest.SetVringCall:
            case VhostUserRequest.SetVringErr:
                rc = SetVringFd(req, hdr, p, fds);
                break;
            case VhostUserRequest.SetVringEnable:
                rc = SetVringEnable(ReadStruct<VhostUserVringState>(hdr, p, fds));
                break;
            case VhostUserRequest.GetConfig:
                GetConfig(hdr, p, fds);
                return;
            case VhostUserRequest.SetConfig:
                rc = SetConfig(hdr, p, fds);
                break;
            case VhostUserRequest.SetBackendReqFd:
                rc = SetBackendReqFd(hdr, fds);
                break;
            case VhostUserRequest.SetStatus:
                if (!HasProtocolFeature(VhostUserProtocolFeature.Status))
                {
                    throw new VhostProtocolException("SET_STATUS without the STATUS protocol feature");
                }

                _status = ReadU64(hdr, p, fds) & 0xFF;
                rc = 0;
                break;
            case VhostUserRequest.GetStatus:
                if (!HasProtocolFeature(VhostUserProtocolFeature.Status))
                {
                    throw new VhostProtocolException("GET_STATUS without the STATUS protocol feature");
                }

                ExpectGet(hdr, fds);
                ReplyU64(req, _status);
                return;
            default:
                // Known but unsupported (logging, postcopy, inflight, IOTLB...) or unknown: refuse without dying.
                // Requests that expect a reply cannot be answered meaningfully: close the connection instead.
                if (req is VhostUserRequest.GetInflightFd or VhostUserRequest.PostcopyAdvise or VhostUserRequest.CreateCryptoSession)
                {
                    throw new VhostProtocolException($"unsupported request {req}");
                }

                _log.LogWarning("vhost session {Name}: unsupported request {Request} ({Size} bytes, {Fds} fds) refused", Name, hdr.Request, hdr.Size, fds.Length);
                rc = 1;
                break;
        }

        if (rc != 0 && !needReply)
        {
            _log.LogWarning("vhost session {Name}: request {Request} failed (no reply was asked)", Name, req);
        }

        if (needReply)
        {
            ReplyU64(req, rc == 0 ? 0UL : 1UL);
        }
    }

    // ---- validation helpers -------------------------------------------------------------------------------

    private static void ExpectSize(in VhostUserHeader hdr, int size, int maxFds, Span<int> fds)
    {
        if (hdr.Size != size)
        {
            throw new VhostProtocolException($"request {(VhostUserRequest)hdr.Request}: payload {hdr.Size} bytes, expected {size}");
        }

        if (fds.Length > maxFds)
        {
            throw new VhostProtocolException($"request {(VhostUserRequest)hdr.Request}: {fds.Length} fds, at most {maxFds} allowed");
        }
    }

    /// <summary>GET requests carry no payload (some front ends send an unused u64) and no fds.</summary>
    private static void ExpectGet(in VhostUserHeader hdr, Span<int> fds)
    {
        if (hdr.Size is not (0 or 8) || fds.Length != 0)
        {
            throw new VhostProtocolException($"request {(VhostUserRequest)hdr.Request}: unexpected payload {hdr.Size} bytes / {fds.Length} fds");
        }
    }

    private static ulong ReadU64(in VhostUserHeader hdr, ReadOnlySpan<byte> p, Span<int> fds)
    {
        ExpectSize(hdr, 8, 0, fds);
        return MemoryMarshal.Read<ulong>(p);
    }

    private static unsafe T ReadStruct<T>(in VhostUserHeader hdr, ReadOnlySpan<byte> p, Span<int> fds)
        where T : unmanaged
    {
        ExpectSize(hdr, sizeof(T), 0, fds);
        return MemoryMarshal.Read<T>(p);
    }

    private Vring GetVring(uint index, VhostUserRequest req)
    {
        if (index >= (uint)_vrings.Length)
        {
            throw new VhostProtocolException($"{req}: queue index {index} out of range (max {_vrings.Length})");
        }

        return _vrings[index];
    }

    // ---- replies -----------------------------------------------------------------------------------------

    private void Reply(VhostUserRequest req, ReadOnlySpan<byte> payload)
    {
        Span<byte> buf = stackalloc byte[12 + payload.Length];
        var h = new VhostUserHeader { Request = (uint)req, Flags = VhostUserConstants.Version | VhostUserConstants.FlagReply, Size = (uint)payload.Length };
        MemoryMarshal.Write(buf, in h);
        payload.CopyTo(buf[12..]);
        int rc = _conn.Send(buf);
        if (rc != 0)
        {
            throw new VhostProtocolException($"reply to {req} failed: {Native.StrError(-rc)}");
        }
    }

    private void ReplyU64(VhostUserRequest req, ulong value)
    {
        Span<byte> b = stackalloc byte[8];
        MemoryMarshal.Write(b, in value);
        Reply(req, b);
    }

    // ---- features ----------------------------------------------------------------------------------------

    private int SetFeatures(ulong features)
    {
        ulong unsupported = features & ~_device.Features;
        if (unsupported != 0)
        {
            _log.LogError("vhost session {Name}: front end set unsupported features 0x{Bits:x}", Name, unsupported);
            return 1;
        }

        bool hadProtocol = ProtocolFeaturesNegotiated;
        Volatile.Write(ref _features, features);
        if (!_featuresSet)
        {
            _featuresSet = true;

            // Without VHOST_USER_F_PROTOCOL_FEATURES rings start enabled; with it they wait for SET_VRING_ENABLE.
            foreach (var v in _vrings)
            {
                if (v.Runner is null)
                {
                    v.Enabled = !ProtocolFeaturesNegotiated;
                }
            }
        }
        else if (hadProtocol != ProtocolFeaturesNegotiated)
        {
            _log.LogWarning("vhost session {Name}: protocol-features bit changed after first SET_FEATURES", Name);
        }

        _log.LogInformation("vhost session {Name}: features 0x{Features:x}", Name, features);
        return 0;
    }

    private int SetProtocolFeatures(ulong features)
    {
        ulong unsupported = features & ~_device.ProtocolFeatures;
        if (unsupported != 0)
        {
            _log.LogError("vhost session {Name}: front end set unsupported protocol features 0x{Bits:x}", Name, unsupported);
            return 1;
        }

        Volatile.Write(ref _protocolFeatures, features);
        return 0;
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

    private int SetMemTable(in VhostUserHeader hdr, ReadOnlySpan<byte> p, Span<int> fds)
    {
        if (hdr.Size < 8)
        {
            throw new VhostProtocolException($"SET_MEM_TABLE: payload {hdr.Size} bytes");
        }

        var mh = MemoryMarshal.Read<VhostUserMemoryHeader>(p);
        if (mh.NRegions == 0 || mh.NRegions > VhostUserConstants.MaxMemTableRegions)
        {
            throw new VhostProtocolException($"SET_MEM_TABLE: {mh.NRegions} regions");
        }

        if (hdr.Size != 8 + (32 * mh.NRegions) || fds.Length != mh.NRegions)
        {
            throw new VhostProtocolException($"SET_MEM_TABLE: {mh.NRegions} regions but {hdr.Size} bytes and {fds.Length} fds");
        }

        var regions = MemoryMarshal.Cast<byte, VhostUserMemoryRegion>(p.Slice(8, 32 * (int)mh.NRegions));
        var mapped = new List<(GuestMemoryRegion, MappedRegion)>();
        for (int i = 0; i < regions.Length; i++)
        {
            if (!TryMap(regions[i], fds[i], mapped, out var m, out string error))
            {
                _log.LogError("vhost session {Name}: SET_MEM_TABLE region {Index}: {Error}", Name, i, error);
                foreach (var (_, map) in mapped)
                {
                    map.Dispose();
                }

                return 1;
            }

            mapped.Add(m);
        }

        // The fds are no longer needed once mapped (the mapping keeps the memory alive).
        var running = PauseQueues();
        foreach (var (_, map) in _regions)
        {
            map.Dispose();
        }

        _regions.Clear();
        _regions.AddRange(mapped);
        PublishMemory();
        ResumeQueues(running);
        return 0;
    }

    private bool TryMap(in VhostUserMemoryRegion r, int fd, List<(GuestMemoryRegion, MappedRegion)> others, out (GuestMemoryRegion, MappedRegion) result, out string error)
    {
        result = default;
        if (r.MemorySize == 0 || r.MemorySize > ulong.MaxValue - r.MmapOffset || r.GuestPhysAddr > ulong.MaxValue - r.MemorySize
            || r.UserspaceAddr > ulong.MaxValue - r.MemorySize || r.MemorySize + r.MmapOffset > long.MaxValue)
        {
            error = $"bad region gpa 0x{r.GuestPhysAddr:x} size 0x{r.MemorySize:x} uva 0x{r.UserspaceAddr:x} offset 0x{r.MmapOffset:x}";
            return false;
        }

        var probe = new GuestMemoryRegion(r.GuestPhysAddr, r.MemorySize, r.UserspaceAddr, r.MmapOffset, 0);
        foreach (var (o, _) in others)
        {
            if (GuestMemory.Overlaps(o, probe))
            {
                error = $"region {probe} overlaps {o}";
                return false;
            }
        }

        MappedRegion map;
        try
        {
            map = MappedRegion.Map(fd, r.MemorySize + r.MmapOffset);
        }
        catch (IOException e)
        {
            error = e.Message;
            return false;
        }

        error = "";
        result = (new GuestMemoryRegion(r.GuestPhysAddr, r.MemorySize, r.UserspaceAddr, r.MmapOffset, map.Pointer + (nint)r.MmapOffset), map);
        return true;
    }

    private int AddMemReg(in VhostUserHeader hdr, ReadOnlySpan<byte> p, Span<int> fds)
    {
        if (hdr.Size != 40 || fds.Length != 1)
        {
            throw new VhostProtocolException($"ADD_MEM_REG: {hdr.Size} bytes, {fds.Length} fds");
        }

        if (_regions.Count >= VhostUserConstants.MaxMemSlots)
        {
            _log.LogError("vhost session {Name}: ADD_MEM_REG: all {Max} slots used", Name, VhostUserConstants.MaxMemSlots);
            return 1;
        }

        var r = MemoryMarshal.Read<VhostUserSingleMemoryRegion>(p).Region;
        if (!TryMap(r, fds[0], _regions, out var m, out string error))
        {
            _log.LogError("vhost session {Name}: ADD_MEM_REG: {Error}", Name, error);
            return 1;
        }

        var running = PauseQueues();
        _regions.Add(m);
        PublishMemory();
        ResumeQueues(running);
        return 0;
    }

    private int RemMemReg(in VhostUserHeader hdr, ReadOnlySpan<byte> p, Span<int> fds)
    {
        // The spec tolerates one (ignored) fd for compatibility with front ends that send one.
        if (hdr.Size != 40 || fds.Length > 1)
        {
            throw new VhostProtocolException($"REM_MEM_REG: {hdr.Size} bytes, {fds.Length} fds");
        }

        var r = MemoryMarshal.Read<VhostUserSingleMemoryRegion>(p).Region;
        int index = _regions.FindIndex(x => x.Region.GuestPhysAddr == r.GuestPhysAddr && x.Region.Size == r.MemorySize && x.Region.UserAddr == r.UserspaceAddr);
        if (index < 0)
        {
            _log.LogError("vhost session {Name}: REM_MEM_REG: no region gpa 0x{Gpa:x} size 0x{Size:x}", Name, r.GuestPhysAddr, r.MemorySize);
            return 1;
        }

        var running = PauseQueues();
        var removed = _regions[index];
        _regions.RemoveAt(index);
        PublishMemory();

        // Queues were drained and stopped, so no request references the region any more.
        removed.Map.Dispose();
        ResumeQueues(running);
        return 0;
    }

    private void PublishMemory()
    {
        _memory = new GuestMemory(_regions.Select(r => r.Region));
        _log.LogInformation("vhost session {Name}: guest memory has {Count} regions ({Regions})", Name, _regions.Count, string.Join("; ", _regions.Select(r => r.Region.ToString())));
    }

    /// <summary>Stops every running queue (draining in-flight I/O) and returns which ones to restart.</summary>
    private List<int> PauseQueues()
    {
        var running = new List<int>();
        for (int i = 0; i < _vrings.Length; i++)
        {
            if (_vrings[i].Runner is not null)
            {
                StopQueue(i);
                running.Add(i);
            }
        }

        return running;
    }

    private void ResumeQueues(List<int> running)
    {
        foreach (int i in running)
        {
            TryStartQueue(i);
        }
    }

    // ---- vrings ------------------------------------------------------------------------------------------

    private int SetVringNum(in VhostUserVringState s)
    {
        var v = GetVring(s.Index, VhostUserRequest.SetVringNum);
        if (!SplitVirtqueue.IsValidSize(s.Num))
        {
            _log.LogError("vhost session {Name}: queue {Index}: bad size {Num}", Name, s.Index, s.Num);
            return 1;
        }

        if (v.Runner is not null)
        {
            _log.LogError("vhost session {Name}: queue {Index}: SET_VRING_NUM while running", Name, s.Index);
            return 1;
        }

        v.Num = s.Num;
        return 0;
    }

    private int SetVringAddr(in VhostUserVringAddr a)
    {
        var v = GetVring(a.Index, VhostUserRequest.SetVringAddr);
        if ((a.Flags & ~VhostUserVringAddr.FlagLog) != 0)
        {
            _log.LogError("vhost session {Name}: queue {Index}: unknown vring flags 0x{Flags:x}", Name, a.Index, a.Flags);
            return 1;
        }

        bool wasRunning = v.Runner is not null;
        if (wasRunning)
        {
            StopQueue((int)a.Index);
        }

        v.Addr = a;
        if (wasRunning || v.ReadyToStart(this))
        {
            return TryStartQueue((int)a.Index);
        }

        return 0;
    }

    private int SetVringBase(in VhostUserVringState s)
    {
        var v = GetVring(s.Index, VhostUserRequest.SetVringBase);
        if (v.Runner is not null)
        {
            _log.LogError("vhost session {Name}: queue {Index}: SET_VRING_BASE while running", Name, s.Index);
            return 1;
        }

        if (s.Num > ushort.MaxValue)
        {
            _log.LogError("vhost session {Name}: queue {Index}: base {Num} out of range", Name, s.Index, s.Num);
            return 1;
        }

        v.Base = (ushort)s.Num;
        return 0;
    }

    private void GetVringBase(in VhostUserVringState s)
    {
        var v = GetVring(s.Index, VhostUserRequest.GetVringBase);
        if (v.Runner is not null)
        {
            StopQueue((int)s.Index);
        }

        // The ring is stopped: a new SET_VRING_KICK is needed to start it again.
        v.KickReceived = false;
        v.Kick?.Dispose();
        v.Kick = null;
        Span<byte> b = stackalloc byte[8];
        var reply = new VhostUserVringState { Index = s.Index, Num = v.Base };
        MemoryMarshal.Write(b, in reply);
        Reply(VhostUserRequest.GetVringBase, b);
    }

    private int SetVringFd(VhostUserRequest req, in VhostUserHeader hdr, ReadOnlySpan<byte> p, Span<int> fds)
    {
        if (hdr.Size != 8)
        {
            throw new VhostProtocolException($"{req}: payload {hdr.Size} bytes");
        }

        ulong u = MemoryMarshal.Read<ulong>(p);
        bool noFd = (u & VhostUserConstants.VringNoFdMask) != 0;
        if ((u & ~(VhostUserConstants.VringIndexMask | VhostUserConstants.VringNoFdMask)) != 0)
        {
            throw new VhostProtocolException($"{req}: reserved bits set in 0x{u:x}");
        }

        if (fds.Length != (noFd ? 0 : 1))
        {
            throw new VhostProtocolException($"{req}: {fds.Length} fds with no-fd flag {noFd}");
        }

        int index = (int)(u & VhostUserConstants.VringIndexMask);
        var v = GetVring((uint)index, req);
        int fd = -1;
        if (!noFd)
        {
            fd = fds[0];
            fds[0] = -1; // taken
            Fd.SetNonBlocking(fd);
        }

        switch (req)
        {
            case VhostUserRequest.SetVringCall:
            {
                var old = v.Call;
                var call = fd >= 0 ? new EventFd(fd) : null;
                v.Call = call;
                if (v.Runner is not null)
                {
                    v.Runner.SetCallAsync(call).GetAwaiter().GetResult();
                }

                old?.Dispose();
                return 0;
            }

            case VhostUserRequest.SetVringErr:
                Fd.Close(v.ErrFd);
                v.ErrFd = fd;
                return 0;
            default:
            {
                if (v.Runner is not null)
                {
                    StopQueue(index);
                }

                v.Kick?.Dispose();
                v.Kick = fd >= 0 ? new EventFd(fd) : null;
                v.KickReceived = true;
                return v.ReadyToStart(this) ? TryStartQueue(index) : 0;
            }
        }
    }

    private int SetVringEnable(in VhostUserVringState s)
    {
        var v = GetVring(s.Index, VhostUserRequest.SetVringEnable);
        if (s.Num > 1)
        {
            _log.LogError("vhost session {Name}: queue {Index}: SET_VRING_ENABLE {Num}", Name, s.Index, s.Num);
            return 1;
        }

        v.Enabled = s.Num == 1;
        if (!v.Enabled && v.Runner is not null)
        {
            StopQueue((int)s.Index);
        }
        else if (v.Enabled && v.ReadyToStart(this))
        {
            return TryStartQueue((int)s.Index);
        }

        return 0;
    }

    private int TryStartQueue(int index)
    {
        var v = _vrings[index];
        if (v.Runner is not null || !v.ReadyToStart(this))
        {
            return 0;
        }

        var a = v.Addr!.Value;
        bool eventIdx = (_features & (1UL << Virtio.VirtioFeatures.RingEventIdx)) != 0;
        var vq = SplitVirtqueue.Create(_memory, v.Num, a.DescUserAddr, a.AvailUserAddr, a.UsedUserAddr, eventIdx, v.Base, out string error);
        if (vq is null)
        {
            _log.LogError("vhost session {Name}: queue {Index} not started: {Error}", Name, index, error);
            return 1;
        }

        try
        {
            v.Runner = _device.StartQueueAsync(this, index, vq, v.Call, v.Kick).GetAwaiter().GetResult();
        }
        catch (Exception e)
        {
            _log.LogError(e, "vhost session {Name}: queue {Index} failed to start", Name, index);
            return 1;
        }

        _log.LogInformation("vhost session {Name}: queue {Index} started (size {Size}, base {Base}, event_idx {EventIdx}, kick {Kick}, call {Call})",
            Name, index, v.Num, v.Base, eventIdx, v.Kick is not null, v.Call is not null);
        return 0;
    }

    private void StopQueue(int index)
    {
        var v = _vrings[index];
        var runner = v.Runner;
        if (runner is null)
        {
            return;
        }

        v.Base = runner.StopAsync().GetAwaiter().GetResult();
        v.Runner = null;
        _log.LogInformation("vhost session {Name}: queue {Index} stopped at {Base}", Name, index, v.Base);
    }

    private void StopAllQueues()
    {
        for (int i = 0; i < _vrings.Length; i++)
        {
            StopQueue(i);
        }
    }

    private void ReleaseAll()
    {
        foreach (var v in _vrings)
        {
            v.Reset();
        }

        foreach (var (_, map) in _regions)
        {
            map.Dispose();
        }

        _regions.Clear();
        _memory = GuestMemory.Empty;
        lock (_backendLock)
        {
            _backend?.Dispose();
            _backend = null;
        }
    }

    // ---- config and backend channel ---------------------------------------------------------------------

    private void GetConfig(in VhostUserHeader hdr, ReadOnlySpan<byte> p, Span<int> fds)
    {
        if (hdr.Size < 12 || fds.Length != 0)
        {
            throw new VhostProtocolException($"GET_CONFIG: {hdr.Size} bytes, {fds.Length} fds");
        }

        var ch = MemoryMarshal.Read<VhostUserConfigHeader>(p);
        if (hdr.Size != 12 + ch.Size)
        {
            throw new VhostProtocolException($"GET_CONFIG: size {ch.Size} but payload {hdr.Size} bytes");
        }

        Span<byte> reply = stackalloc byte[12 + VhostUserConstants.ConfigSpaceMax];
        bool ok = ch.Size <= VhostUserConstants.ConfigSpaceMax && ch.Offset <= VhostUserConstants.ConfigSpaceMax - ch.Size
            && _device.ReadConfig(ch.Offset, reply.Slice(12, (int)ch.Size)) == 0;
        if (!ok)
        {
            // Failure is a reply with an empty config payload (the front end sees the size mismatch).
            _log.LogError("vhost session {Name}: GET_CONFIG offset {Offset} size {Size} refused", Name, ch.Offset, ch.Size);
            var empty = new VhostUserConfigHeader { Offset = ch.Offset, Size = 0, Flags = ch.Flags };
            MemoryMarshal.Write(reply, in empty);
            Reply(VhostUserRequest.GetConfig, reply[..12]);
            return;
        }

        MemoryMarshal.Write(reply, in ch);
        Reply(VhostUserRequest.GetConfig, reply[..(12 + (int)ch.Size)]);
    }

    private int SetConfig(in VhostUserHeader hdr, ReadOnlySpan<byte> p, Span<int> fds)
    {
        if (hdr.Size < 12 || fds.Length != 0)
        {
            throw new VhostProtocolException($"SET_CONFIG: {hdr.Size} bytes, {fds.Length} fds");
        }

        var ch = MemoryMarshal.Read<VhostUserConfigHeader>(p);
        if (hdr.Size != 12 + ch.Size || ch.Size > VhostUserConstants.ConfigSpaceMax || ch.Offset > VhostUserConstants.ConfigSpaceMax - ch.Size)
        {
            throw new VhostProtocolException($"SET_CONFIG: offset {ch.Offset} size {ch.Size} payload {hdr.Size}");
        }

        return _device.WriteConfig(ch.Offset, p.Slice(12, (int)ch.Size)) == 0 ? 0 : 1;
    }

    private int SetBackendReqFd(in VhostUserHeader hdr, Span<int> fds)
    {
        if (hdr.Size is not (0 or 8) || fds.Length != 1)
        {
            throw new VhostProtocolException($"SET_BACKEND_REQ_FD: {hdr.Size} bytes, {fds.Length} fds");
        }

        if (!HasProtocolFeature(VhostUserProtocolFeature.BackendReq))
        {
            _log.LogError("vhost session {Name}: SET_BACKEND_REQ_FD without the BACKEND_REQ protocol feature", Name);
            return 1;
        }

        lock (_backendLock)
        {
            _backend?.Dispose();
            _backend = new UnixConnection(fds[0]);
        }

        fds[0] = -1;
        return 0;
    }

    /// <summary>
    /// Tells the front end the config space changed (e.g. capacity after a resize) over the backend channel.
    /// Returns false when no backend channel was negotiated. Any thread; blocking send of a 12-byte message.
    /// </summary>
    public bool SendConfigChange()
    {
        lock (_backendLock)
        {
            if (_backend is null || !HasProtocolFeature(VhostUserProtocolFeature.Config))
            {
                return false;
            }

            Span<byte> buf = stackalloc byte[12];
            var h = new VhostUserHeader { Request = (uint)VhostUserBackendRequest.ConfigChangeMsg, Flags = VhostUserConstants.Version, Size = 0 };
            MemoryMarshal.Write(buf, in h);
            int rc = _backend.Send(buf);
            if (rc != 0)
            {
                _log.LogWarning("vhost session {Name}: config change notification failed: {Error}", Name, Native.StrError(-rc));
                return false;
            }

            return true;
        }
    }

    private sealed class Vring
    {
        public uint Num;
        public VhostUserVringAddr? Addr;
        public ushort Base;
        public EventFd? Call;
        public EventFd? Kick;
        public bool KickReceived;
        public bool Enabled = true;
        public int ErrFd = -1;
        public IVhostQueueRunner? Runner;

        public bool ReadyToStart(VhostUserSession s) =>
            Num != 0 && Addr is not null && KickReceived && Enabled && s._regions.Count > 0 && !s._closing;

        public void Reset()
        {
            Num = 0;
            Addr = null;
            Base = 0;
            Call?.Dispose();
            Call = null;
            Kick?.Dispose();
            Kick = null;
            KickReceived = false;
            Enabled = true;
            Fd.Close(ErrFd);
            ErrFd = -1;
        }
    }
}
