using System.Runtime.InteropServices;
using System.Text.Json.Nodes;
using Microsoft.Extensions.Logging;
using VhostBackend.Platform;
using VhostBackend.Reactors;
using VhostBackend.VhostUser;
using VhostBackend.Virtio;

namespace VhostBackend.Vhost;

/// <summary>
/// A vhost-user controller: a named Unix socket that front ends connect to, a cpumask of reactors its queues
/// run on, coalescing settings and the sessions of connected front ends. Device types derive from it.
/// Control-plane object: its methods run on the main reactor or protocol threads and guard shared lists with a lock.
/// </summary>
public abstract class VhostController : IVhostUserDevice
{
    private readonly List<VhostUserSession> _sessions = new();
    private readonly List<VhostQueue> _queues = new();
    private readonly Reactor[] _reactors;
    private readonly ReactorRuntime _runtime;
    private UnixSocketListener? _listener;
    private Thread? _acceptThread;
    private CancellationTokenSource? _clientStop;
    private uint _delayBaseUs;
    private uint _iopsThreshold = DefaultIopsThreshold;

    /// <summary>SPDK's defaults: coalescing off, 60000 IOPS threshold.</summary>
    public const uint DefaultDelayBaseUs = 0;
    public const uint DefaultIopsThreshold = 60000;

    protected VhostController(string name, string socketPath, CpuSet cpumask, ReactorRuntime runtime, ILogger logger)
    {
        Name = name;
        SocketPath = socketPath;
        CpuMask = cpumask;
        _runtime = runtime;
        _reactors = runtime.Select(cpumask);
        Logger = logger;
    }

    public string Name { get; }
    public string SocketPath { get; }
    public CpuSet CpuMask { get; }
    public ILogger Logger { get; }
    public uint DelayBaseUs => Volatile.Read(ref _delayBaseUs);
    public uint IopsThreshold => Volatile.Read(ref _iopsThreshold);

    public IReadOnlyList<VhostUserSession> Sessions
    {
        get
        {
            lock (_sessions)
            {
                return _sessions.ToArray();
            }
        }
    }

    public abstract ulong Features { get; }
    public abstract ulong ProtocolFeatures { get; }
    public abstract int MaxQueues { get; }

    public abstract int ReadConfig(uint offset, Span<byte> dest);

    public virtual int WriteConfig(uint offset, ReadOnlySpan<byte> data) => -Errno.ENOTSUP;

    /// <summary>
    /// Copies [offset, offset+dest.Length) of a config space holding <paramref name="config"/> followed by zeros
    /// (front ends ask for different sizes: QEMU the struct's, SPDK's virtio-user 256 bytes). 0 or -EINVAL.
    /// </summary>
    protected static int CopyConfigSpace<T>(in T config, uint offset, Span<byte> dest)
        where T : unmanaged
    {
        Span<byte> space = stackalloc byte[VhostUserConstants.ConfigSpaceMax];
        space.Clear();
        MemoryMarshal.Write(space, in config);
        if (offset > (uint)space.Length || (uint)dest.Length > (uint)space.Length - offset)
        {
            return -Errno.EINVAL;
        }

        space.Slice((int)offset, dest.Length).CopyTo(dest);
        return 0;
    }

    public abstract Task<IVhostQueueRunner> StartQueueAsync(VhostUserSession session, VhostUserReadyQueue queue);

    /// <summary>Queues read guest memory through the view their ring was created with; nothing else to update.</summary>
    public virtual void MemoryUpdated(VhostUserSession session, GuestMemory memory)
    {
    }

    /// <summary>Starts <paramref name="queue"/> on its reactor and tracks it (coalescing changes, hot remove).</summary>
    /// <remarks>
    /// The task completes on the reactor itself (the queue is tracked there right after it started), so the
    /// vhost-user thread blocked on it to answer SET_VRING_ENABLE (or SET_VRING_KICK, SET_MEM_TABLE) needs no
    /// thread-pool thread: with an async continuation here a starved pool delayed that reply past a front end's
    /// timeout (Vhost.Tests InflightTests saw "no reply to SetVringEnable" within 5 s, twice in CI).
    /// </remarks>
    protected Task<IVhostQueueRunner> StartQueueAsync(VhostQueue queue, VhostUserReadyQueue ready)
    {
        queue.AttachInflight(ready.Inflight, ready.Resubmit);
        return queue.Reactor.InvokeAsync<IVhostQueueRunner>(() =>
        {
            queue.StartOnReactor();
            lock (_queues)
            {
                _queues.Add(queue);
            }

            return queue;
        });
    }

    internal void UntrackQueue(VhostQueue queue)
    {
        lock (_queues)
        {
            if (_queues.Remove(queue))
            {
                _retiredInterrupts += queue.Interrupts;
            }
        }
    }

    private long _retiredInterrupts;

    /// <summary>
    /// Call eventfd writes (interrupts to front ends) by every queue of every session since the controller was
    /// created: stopped queues' counts plus the running ones' (ours; for measuring interrupt coalescing).
    /// </summary>
    public long Interrupts
    {
        get
        {
            lock (_queues)
            {
                long n = _retiredInterrupts;
                foreach (var q in _queues)
                {
                    n += q.Interrupts;
                }

                return n;
            }
        }
    }

    /// <summary>How many queues of all sessions run (started on their reactors).</summary>
    public int RunningQueues
    {
        get
        {
            lock (_queues)
            {
                return _queues.Count;
            }
        }
    }

    /// <summary>The running queues of every session.</summary>
    protected VhostQueue[] Queues
    {
        get
        {
            lock (_queues)
            {
                return _queues.ToArray();
            }
        }
    }

    /// <summary>The reactor for the next queue: round-robin over the controller's cpumask.</summary>
    protected Reactor NextReactor() => _runtime.NextRoundRobin(_reactors);

    /// <summary>The controller type as RPCs and save_config name it: its subsystem ("vhost_blk", "vhost_scsi").</summary>
    public abstract string TypeName { get; }

    /// <summary>Why the controller cannot be deleted yet besides connected front ends (SPDK: SCSI targets left), or null.</summary>
    public virtual string? DeleteBlocker => null;

    /// <summary>
    /// Releases what the device holds once no front end can connect any more (after <see cref="ShutdownAsync"/>,
    /// or when creation failed): the blk bdev descriptor, the SCSI targets.
    /// </summary>
    public virtual Task ReleaseAsync() => Task.CompletedTask;

    /// <summary>The SCSI target operations (vhost_scsi_controller_*): EINVAL "not a vhost-scsi controller" unless overridden.</summary>
    public virtual int AddScsiTarget(int targetNum, string bdevName, bool readOnly) => throw NotScsi();

    /// <inheritdoc cref="AddScsiTarget"/>
    public virtual Task RemoveScsiTargetAsync(int targetNum) => throw NotScsi();

    /// <summary>vhost_start_scsi_controller: starts a controller created with delay (SCSI only).</summary>
    public virtual void StartDelayed() => throw NotScsi();

    private VhostException NotScsi() => new(Errno.EINVAL, "ctrlr", $"{Name} is not a vhost-scsi controller");

    /// <summary>Device-specific part of vhost_get_controllers ("backend_specific").</summary>
    public abstract JsonObject BackendSpecific();

    /// <summary>The calls that recreate this controller (save_config).</summary>
    public abstract IEnumerable<JsonObject> ConfigCalls();

    public virtual void SessionOpened(VhostUserSession session)
    {
        lock (_sessions)
        {
            _sessions.Add(session);
        }
    }

    public virtual void SessionClosed(VhostUserSession session)
    {
        lock (_sessions)
        {
            _sessions.Remove(session);
        }
    }

    /// <summary>vhost_controller_set_coalescing for save_config, when the settings are not SPDK's defaults.</summary>
    protected IEnumerable<JsonObject> CoalescingConfigCalls()
    {
        if (DelayBaseUs != DefaultDelayBaseUs || IopsThreshold != DefaultIopsThreshold)
        {
            yield return VhostBackend.Rpc.Subsystem.Call("vhost_controller_set_coalescing", new JsonObject
            {
                ["ctrlr"] = Name,
                ["delay_base_us"] = DelayBaseUs,
                ["iops_threshold"] = IopsThreshold,
            });
        }
    }

    /// <summary>Validates and applies interrupt coalescing (like SPDK: delay must fit, threshold must give a rate &gt; 0).</summary>
    public Task SetCoalescingAsync(uint delayBaseUs, uint iopsThreshold)
    {
        if ((ulong)delayBaseUs * (ulong)VhostBackend.Platform.Ticks.Frequency / 1_000_000UL >= uint.MaxValue)
        {
            throw new VhostException(Errno.EINVAL, "delay_base_us", $"Delay time of {delayBaseUs} is too big");
        }

        if (iopsThreshold * 10UL / 1000UL == 0)
        {
            throw new VhostException(Errno.EINVAL, "iops_threshold", $"IOPS rate of {iopsThreshold} is too low. Min is 100");
        }

        Volatile.Write(ref _delayBaseUs, delayBaseUs);
        Volatile.Write(ref _iopsThreshold, iopsThreshold);
        return Task.WhenAll(Queues.Select(q => q.SetCoalescingAsync(delayBaseUs, iopsThreshold)));
    }

    /// <summary>True once the controller listens (or connects, in client mode); false while created with delay.</summary>
    public bool Started => Volatile.Read(ref _acceptThread) is not null;

    /// <summary>Created with SPDK's <c>delay</c> (started later by vhost_start_scsi_controller).</summary>
    public bool CreatedDelayed { get; internal set; }

    /// <summary>Starts serving in the controller's mode (<see cref="ClientMode"/>); no-op when already started.</summary>
    internal void Start()
    {
        if (Started)
        {
            return;
        }

        if (ClientMode)
        {
            StartConnecting();
        }
        else
        {
            StartListening();
        }
    }

    /// <summary>Starts listening on <see cref="SocketPath"/> and accepting front ends on a dedicated thread.</summary>
    public void StartListening()
    {
        _listener = UnixSocketListener.Listen(SocketPath, ownership: SocketOwnership);
        var listener = _listener;
        _acceptThread = new Thread(() => AcceptLoop(listener)) { Name = "vhost-accept:" + Name, IsBackground = true };
        _acceptThread.Start();
        Logger.LogInformation("vhost controller {Name}: listening on {Path}", Name, SocketPath);
    }

    private void AcceptLoop(UnixSocketListener listener)
    {
        while (!listener.IsDisposed)
        {
            var conn = listener.Accept();
            if (conn is null)
            {
                continue;
            }

            Logger.LogInformation("vhost controller {Name}: front end connected", Name);
            var session = new VhostUserSession(this, conn, Logger);
            session.Start();
        }
    }

    /// <summary>
    /// Client mode (QEMU's <c>-chardev socket,server=on</c>): connects to <see cref="SocketPath"/>, retrying every
    /// second until the front end listens, and again after each disconnect, until shutdown.
    /// </summary>
    public void StartConnecting()
    {
        ClientMode = true;
        var stop = _clientStop = new CancellationTokenSource();
        _acceptThread = new Thread(() => ConnectLoop(stop.Token)) { Name = "vhost-connect:" + Name, IsBackground = true };
        _acceptThread.Start();
        Logger.LogInformation("vhost controller {Name}: connecting to front end socket {Path} (client mode)", Name, SocketPath);
    }

    /// <summary>True when the controller connects to the front end's socket instead of listening.</summary>
    public bool ClientMode { get; internal set; }

    /// <summary>Owner, group and mode the listening socket gets before it accepts (from the manager); null: as created.</summary>
    public SocketOwnership? SocketOwnership { get; internal set; }

    private void ConnectLoop(CancellationToken stop)
    {
        bool warned = false;
        while (!stop.IsCancellationRequested)
        {
            UnixConnection conn;
            try
            {
                conn = UnixConnection.Connect(SocketPath);
            }
            catch (IOException e)
            {
                if (!warned)
                {
                    Logger.LogInformation("vhost controller {Name}: {Error}; retrying every second", Name, e.Message);
                    warned = true;
                }

                stop.WaitHandle.WaitOne(TimeSpan.FromSeconds(1));
                continue;
            }

            warned = false;
            Logger.LogInformation("vhost controller {Name}: connected to front end", Name);
            var session = new VhostUserSession(this, conn, Logger);
            session.Start();
            WaitHandle.WaitAny([((IAsyncResult)session.Completion).AsyncWaitHandle, stop.WaitHandle]);
            if (!stop.IsCancellationRequested)
            {
                // Give a restarting front end time to listen again.
                stop.WaitHandle.WaitOne(TimeSpan.FromSeconds(1));
            }
        }
    }

    /// <summary>Stops listening (or connecting) and disconnects every session; completes when they have released everything.</summary>
    public virtual async Task ShutdownAsync()
    {
        _clientStop?.Cancel();
        _listener?.Dispose();
        var sessions = Sessions;
        foreach (var s in sessions)
        {
            s.Close();
        }

        await Task.WhenAll(sessions.Select(s => s.Completion)).ConfigureAwait(false);
        _acceptThread?.Join(TimeSpan.FromSeconds(2));
    }

    public JsonObject ToJson()
    {
        var sessions = new JsonArray();
        foreach (var s in Sessions)
        {
            sessions.Add(new JsonObject
            {
                ["vid"] = s.Id,
                ["id"] = s.Id,
                ["name"] = s.Name,
                ["started"] = s.Started,
                ["max_queues"] = s.MaxQueues,
                ["inflight_task_cnt"] = s.InFlight,
            });
        }

        return new JsonObject
        {
            ["ctrlr"] = Name,
            ["cpumask"] = CpuMask.ToMaskString(),
            ["delay_base_us"] = DelayBaseUs,
            ["iops_threshold"] = IopsThreshold,
            ["interrupts"] = Interrupts,
            ["socket"] = SocketPath,
            ["client"] = ClientMode,
            ["sessions"] = sessions,
            ["backend_specific"] = BackendSpecific(),
        };
    }
}

/// <summary>A vhost control-plane failure with SPDK's errno.</summary>
public sealed class VhostException : Exception
{
    public VhostException(int errno, string message)
        : base(message) => Errno = errno;

    /// <param name="errno">SPDK's errno for the failure.</param>
    /// <param name="param">The RPC parameter at fault (named in the error reply).</param>
    /// <param name="message">The reason.</param>
    public VhostException(int errno, string param, string message)
        : base(message)
    {
        Errno = errno;
        Param = param;
    }

    public int Errno { get; }

    /// <summary>The RPC parameter the failure is about, when there is one.</summary>
    public string? Param { get; }
}
