using System.Text.Json.Nodes;
using VhostBackend.Reactors;

namespace VhostBackend.Bdev;

/// <summary>
/// A block device. Modules derive from it, fill in the geometry and implement <see cref="GetModuleChannel"/> and
/// <see cref="Submit"/>. The bdev layer (<see cref="BdevChannel"/>) stands between users and the module: it owns
/// the per-thread I/O pools, splitting, bounce buffers, statistics and QoS, so modules see only I/O they can do.
/// </summary>
public abstract class Bdev
{
    private readonly List<BdevDesc> _descs = new();
    private readonly object _lock = new();
    private ulong _blockCount;
    private BdevIoStats _retiredStats;
    private readonly long[] _retiredLatency = new long[BdevLatencyHistogram.Length];
    private readonly List<BdevChannel> _remapSources = new(); // channels of other bdevs remapping I/O into this one

    protected Bdev(string name, string productName, uint blockSize, ulong blockCount, Guid? uuid = null)
    {
        if (string.IsNullOrWhiteSpace(name))
        {
            throw new ArgumentException("bdev name must not be empty");
        }

        if (blockSize < 512 || (blockSize & (blockSize - 1)) != 0)
        {
            throw new ArgumentException($"block size {blockSize} must be a power of two >= 512");
        }

        if (blockCount == 0)
        {
            throw new ArgumentException("block count must be > 0");
        }

        Name = name;
        ProductName = productName;
        BlockSize = blockSize;
        _blockCount = blockCount;
        Uuid = uuid ?? Guid.NewGuid();
        LayerDevice = new BdevLayerDevice(this);
    }

    public string Name { get; }
    public string ProductName { get; }
    public Guid Uuid { get; }
    public uint BlockSize { get; }
    public ulong BlockCount => Volatile.Read(ref _blockCount);
    public List<string> Aliases { get; } = new();

    /// <summary>Buffer alignment (bytes, power of two) the module needs; 1 = any. Misaligned requests are bounced.</summary>
    public uint RequiredAlignment { get; protected init; } = 1;

    /// <summary>Whether the device has a volatile write cache (flush matters).</summary>
    public bool WriteCache { get; protected init; }

    /// <summary>Largest read/write the module accepts, in blocks (0 = no limit); larger requests are split.</summary>
    public uint MaxTransferBlocks { get; protected init; }

    /// <summary>Requests crossing a multiple of this many blocks are split there (0 = no boundary).</summary>
    public uint OptimalIoBoundaryBlocks { get; protected init; }

    /// <summary>Largest unmap / write-zeroes the module accepts in one request, in blocks (0 = no limit).</summary>
    public ulong MaxUnmapBlocks { get; protected init; }

    public ulong MaxWriteZeroesBlocks { get; protected init; }

    /// <summary>I/O objects pre-allocated per channel.</summary>
    public int IoPoolSize { get; protected init; } = 1024;

    /// <summary>The module holding the exclusive write claim (<see cref="BdevManager.Claim"/>), or null.</summary>
    public BdevModule? ClaimModule { get; internal set; }

    /// <summary>The claiming module's name, or null.</summary>
    public string? ClaimedBy => ClaimModule?.Name;

    internal BdevLayerDevice LayerDevice { get; }

    internal BdevQos? Qos { get; set; }

    public abstract bool SupportsIoType(BdevIoType type);

    /// <summary>Returns the module's channel for the calling reactor (typically <c>reactor.GetIoChannel(device)</c>).</summary>
    protected internal abstract IoChannel GetModuleChannel(Reactor reactor);

    /// <summary>
    /// Starts one I/O. The module must eventually call <see cref="BdevIo.Complete"/> exactly once, on the same
    /// reactor. Completing inline is allowed (the layer defers the user's callback).
    /// </summary>
    protected internal abstract void Submit(IoChannel moduleChannel, BdevIo io);

    /// <summary>
    /// True when <see cref="Submit"/> may be handed another bdev's I/O (<see cref="BdevChannel.TryForward"/>: a vbdev
    /// forwarding its caller's <see cref="BdevIo"/> in place instead of submitting a second one). A module that says so
    /// reads only the I/O's type, offset, block count and <see cref="BdevIo.Iovs"/>, its own geometry (never
    /// <see cref="BdevIo.Bdev"/> or <see cref="BdevIo.Channel"/>), may use <see cref="BdevIo.ModuleContext"/> and
    /// <see cref="BdevIo.ModuleTag"/>, and ends with <see cref="BdevIo.Complete(BdevIoStatus)"/>. False by default.
    /// The layer reads this and <see cref="SupportsIoType"/> once per channel for forwarding: a module that says true
    /// must give both the same answers for as long as the bdev is registered.
    /// </summary>
    public virtual bool AcceptsForwardedIo => false;

    /// <summary>
    /// The bdev's remap fast path for a new channel on the reactor of <paramref name="moduleChannel"/> (the module's
    /// channel that <see cref="GetModuleChannel"/> gave it), or null (the default): see <see cref="BdevRemap"/>.
    /// Called once per <see cref="BdevChannel"/>, off the I/O path.
    /// </summary>
    protected internal virtual BdevRemap? CreateRemap(IoChannel moduleChannel) => null;

    /// <summary>Module-specific part of bdev_get_bdevs.</summary>
    public virtual JsonObject? DriverSpecific() => null;

    /// <summary>
    /// The module's own I/O statistics, reported as <c>driver_specific</c> in bdev_get_iostat (SPDK's
    /// <c>dump_device_stat_json</c>); null when it has none. Called off the I/O path (an RPC).
    /// </summary>
    public virtual JsonObject? DeviceStats() => null;

    /// <summary>The RPC call (<c>{"method","params"}</c>) that recreates this bdev, for save_config; null if not saved.</summary>
    public virtual JsonObject? ConfigCall() => null;

    /// <summary>Releases module resources after the bdev is unregistered and all descriptors are closed.</summary>
    protected internal virtual ValueTask DestructAsync() => ValueTask.CompletedTask;

    /// <summary>Changes the block count and tells every open descriptor (Resize event).</summary>
    protected void SetBlockCount(ulong blockCount)
    {
        Volatile.Write(ref _blockCount, blockCount);
        foreach (var d in Descriptors)
        {
            d.RaiseEvent(BdevEventType.Resize);
        }
    }

    internal IReadOnlyList<BdevDesc> Descriptors
    {
        get
        {
            lock (_lock)
            {
                return _descs.ToArray();
            }
        }
    }

    internal void AddDesc(BdevDesc d)
    {
        lock (_lock)
        {
            _descs.Add(d);
        }
    }

    internal int RemoveDesc(BdevDesc d)
    {
        lock (_lock)
        {
            _descs.Remove(d);
            return _descs.Count;
        }
    }

    /// <summary>A channel of another bdev now remaps I/O into this bdev (<see cref="BdevRemap"/>): its
    /// <see cref="BdevChannel.RemapStats"/> count in this bdev's statistics too.</summary>
    internal void AddRemapSource(BdevChannel channel)
    {
        lock (_lock)
        {
            _remapSources.Add(channel);
        }
    }

    /// <summary>The remapping channel is closing: what it counted for this bdev stays in the retired total.</summary>
    internal void RemoveRemapSource(BdevChannel channel)
    {
        lock (_lock)
        {
            if (_remapSources.Remove(channel))
            {
                _retiredStats.Add(channel.RemapStats);
                for (int i = 0; i < _retiredLatency.Length; i++)
                {
                    _retiredLatency[i] += channel.RemapLatency[i];
                }
            }
        }
    }

    /// <summary>Moves a closing channel's counters into the retired total and zeroes them, atomically with respect to <see cref="GetStats"/>.</summary>
    internal void RetireStats(ref BdevIoStats stats, long[] latency)
    {
        lock (_lock)
        {
            _retiredStats.Add(stats);
            stats = default;
            for (int i = 0; i < latency.Length; i++)
            {
                _retiredLatency[i] += latency[i];
                latency[i] = 0;
            }
        }
    }

    /// <summary>
    /// Adds the latency histogram of <paramref name="cls"/> (<see cref="BdevLatencyHistogram"/>: 64 buckets), summed
    /// over live and closed channels, into <paramref name="buckets"/>. Racy reads of live counters, never torn.
    /// </summary>
    public void GetLatencyHistogram(BdevLatencyClass cls, Span<long> buckets)
    {
        if (buckets.Length < BdevLatencyHistogram.Buckets)
        {
            throw new ArgumentException($"needs {BdevLatencyHistogram.Buckets} buckets", nameof(buckets));
        }

        int from = (int)cls * BdevLatencyHistogram.Buckets;
        lock (_lock)
        {
            var channels = LayerDevice.SnapshotChannels();
            for (int i = 0; i < BdevLatencyHistogram.Buckets; i++)
            {
                long n = _retiredLatency[from + i];
                foreach (var ch in channels)
                {
                    var bc = (BdevChannel)ch.Context;
                    n += Volatile.Read(ref bc.Latency[from + i]);
                    if (bc.RemapLatency.Length != 0)
                    {
                        n += Volatile.Read(ref bc.RemapLatency[from + i]);
                    }
                }

                foreach (var source in _remapSources)
                {
                    n += Volatile.Read(ref source.RemapLatency[from + i]);
                }

                buckets[i] += n;
            }
        }
    }

    /// <summary>I/Os submitted through the bdev layer and not yet completed, summed over channels (a racy snapshot).</summary>
    public int QueueDepth
    {
        get
        {
            int n = 0;
            foreach (var ch in LayerDevice.SnapshotChannels())
            {
                n += ((BdevChannel)ch.Context).Outstanding;
            }

            lock (_lock)
            {
                foreach (var source in _remapSources)
                {
                    n += source.RemapOutstanding; // remapped into this bdev: counted on the caller's channel
                }
            }

            return n;
        }
    }

    /// <summary>
    /// I/Os remapped into this bdev (<see cref="BdevRemap"/>) and not yet given back, summed over the remapping
    /// channels of the bdevs <paramref name="from"/> selects: what a module quiescing its remap waits on, after it
    /// stopped translating and every reactor of its channels ran a message (see <see cref="BdevRemap.TryTranslate"/>).
    /// Any thread; a racy but never torn snapshot of each channel's count.
    /// </summary>
    public int RemappedInFlight(Func<Bdev, bool> from)
    {
        ArgumentNullException.ThrowIfNull(from);
        int n = 0;
        lock (_lock)
        {
            foreach (var source in _remapSources)
            {
                if (from(source.Bdev))
                {
                    n += Volatile.Read(ref source.RemapOutstanding);
                }
            }
        }

        return n;
    }

    /// <summary>Statistics summed over live channels and those already closed (racy read of live counters; never torn).</summary>
    public BdevIoStats GetStats()
    {
        // Under the lock so a channel closing meanwhile is counted exactly once (retired or live, never neither or both).
        lock (_lock)
        {
            var total = _retiredStats;
            foreach (var ch in LayerDevice.SnapshotChannels())
            {
                var bc = (BdevChannel)ch.Context;
                total.Add(bc.Stats);
                total.Add(bc.RemapStats); // zero without a remap
            }

            foreach (var source in _remapSources)
            {
                total.Add(source.RemapStats);
            }

            return total;
        }
    }

    /// <summary>Sets QoS limits (0 = unlimited). IOPS are rounded like SPDK: multiples of 1000.</summary>
    public void SetQosLimits(ulong rwIosPerSec, ulong rwMBytesPerSec, ulong rMBytesPerSec, ulong wMBytesPerSec)
    {
        if (rwIosPerSec == 0 && rwMBytesPerSec == 0 && rMBytesPerSec == 0 && wMBytesPerSec == 0)
        {
            Qos = null;
            return;
        }

        Qos = new BdevQos(rwIosPerSec, rwMBytesPerSec, rMBytesPerSec, wMBytesPerSec);
    }

    public (ulong RwIos, ulong RwMBytes, ulong RMBytes, ulong WMBytes) QosLimits =>
        Qos is { } q ? (q.RwIosPerSec, q.RwMBytesPerSec, q.RMBytesPerSec, q.WMBytesPerSec) : (0, 0, 0, 0);

    public override string ToString() => Name;
}

/// <summary>The bdev layer's I/O device for one bdev: its channels are <see cref="BdevChannel"/>s.</summary>
internal sealed class BdevLayerDevice : IoDevice
{
    private readonly Bdev _bdev;

    public BdevLayerDevice(Bdev bdev)
        : base("bdev:" + bdev.Name) => _bdev = bdev;

    protected override object CreateChannelContext(Reactor reactor) => new BdevChannel(_bdev, reactor);

    protected override void DestroyChannelContext(Reactor reactor, object context) => ((BdevChannel)context).Destroy();

    public void MarkGone() => MarkUnregistered();
}
