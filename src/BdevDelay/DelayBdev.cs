using System.Text.Json.Nodes;
using VhostBackend.Bdev;
using VhostBackend.Platform;
using VhostBackend.Reactors;

namespace VhostBackend.BdevDelay;

/// <summary>The latencies of a delay vbdev in microseconds (bdev_delay_create's params).</summary>
public sealed record DelayLatencies(ulong AvgReadUs, ulong P99ReadUs, ulong AvgWriteUs, ulong P99WriteUs);

/// <summary>
/// A delay vbdev (SPDK's module/bdev/delay): forwards every I/O to its base and completes reads and writes only once
/// their latency has passed after the base completed them; about 1 in 100 gets the p99 latency instead of the average
/// (chosen at submission, as SPDK). Other I/O types complete when the base completes them; a reset first aborts every
/// held I/O on every channel, then resets the base.
/// </summary>
public sealed class DelayBdev : Bdev.Bdev
{
    private readonly BdevDesc _base;
    private readonly Channels _device;
    private readonly ulong[] _us = new ulong[4];
    private readonly long[] _ticks = new long[4];

    internal DelayBdev(string name, BdevDesc baseDesc, Guid uuid, DelayLatencies latencies)
        : base(name, "delay", baseDesc.Bdev.BlockSize, baseDesc.Bdev.BlockCount, uuid)
    {
        _base = baseDesc;
        _device = new Channels(this, baseDesc);
        WriteCache = baseDesc.Bdev.WriteCache;
        RequiredAlignment = baseDesc.Bdev.RequiredAlignment;
        OptimalIoBoundaryBlocks = baseDesc.Bdev.OptimalIoBoundaryBlocks;
        SetLatency(DelayKind.AvgRead, latencies.AvgReadUs);
        SetLatency(DelayKind.P99Read, latencies.P99ReadUs);
        SetLatency(DelayKind.AvgWrite, latencies.AvgWriteUs);
        SetLatency(DelayKind.P99Write, latencies.P99WriteUs);
    }

    /// <summary>The bdev this one forwards to.</summary>
    public Bdev.Bdev BaseBdev => _base.Bdev;

    /// <summary>The current latencies in microseconds.</summary>
    public DelayLatencies Latencies => new(Volatile.Read(ref _us[0]), Volatile.Read(ref _us[1]), Volatile.Read(ref _us[2]), Volatile.Read(ref _us[3]));

    /// <summary>Set when the vbdev starts going away: held I/Os are released at once and new ones are not held.</summary>
    internal bool Removing { get; private set; }

    /// <summary>
    /// bdev_delay_update_latency: <paramref name="type"/> is avg_read, p99_read, avg_write or p99_write (false for
    /// anything else). Applies to I/Os whose base completes from now on; SPDK checks no p99 &gt;= avg order here.
    /// </summary>
    public bool UpdateLatency(string type, ulong us)
    {
        DelayKind? kind = type switch
        {
            "avg_read" => DelayKind.AvgRead,
            "p99_read" => DelayKind.P99Read,
            "avg_write" => DelayKind.AvgWrite,
            "p99_write" => DelayKind.P99Write,
            _ => null,
        };
        if (kind is not { } k)
        {
            return false;
        }

        SetLatency(k, us);
        return true;
    }

    internal long LatencyTicks(DelayKind kind) => Volatile.Read(ref _ticks[(int)kind]);

    public override bool SupportsIoType(BdevIoType type) => _base.Bdev.SupportsIoType(type);

    protected override IoChannel GetModuleChannel(Reactor reactor) => reactor.GetIoChannel(_device);

    protected override void Submit(IoChannel moduleChannel, BdevIo io)
    {
        var ch = (DelayChannel)moduleChannel.Context;
        switch (io.Type)
        {
            case BdevIoType.Read:
                io.ModuleTag = (long)(ch.NextIsP99() ? DelayKind.P99Read : DelayKind.AvgRead);
                break;
            case BdevIoType.Write:
                io.ModuleTag = (long)(ch.NextIsP99() ? DelayKind.P99Write : DelayKind.AvgWrite);
                break;
            case BdevIoType.Reset:
                io.ModuleTag = (long)DelayKind.None;
                Reset(ch, io);
                return;
            default:
                io.ModuleTag = (long)DelayKind.None;
                break;
        }

        ch.Forward(io);
    }

    /// <summary>SPDK's dump_info_json: <c>{"delay": {"name", "base_bdev_name", "uuid", latencies in µs}}</c>.</summary>
    public override JsonObject DriverSpecific() => new() { ["delay"] = ConfigParams() };

    /// <summary>SPDK's _delay_write_conf_values: the params of bdev_delay_create that rebuild this vbdev as it is now.</summary>
    internal JsonObject ConfigParams()
    {
        var l = Latencies;
        return new JsonObject
        {
            ["name"] = Name,
            ["base_bdev_name"] = _base.Bdev.Name,
            ["uuid"] = Uuid.ToString(),
            ["avg_read_latency"] = l.AvgReadUs,
            ["p99_read_latency"] = l.P99ReadUs,
            ["avg_write_latency"] = l.AvgWriteUs,
            ["p99_write_latency"] = l.P99WriteUs,
        };
    }

    /// <summary>The vbdev is being unregistered: release what every channel holds now, so its openers can drain and close.</summary>
    internal void BeginRemoval()
    {
        Removing = true;
        _device.ForEachChannel(static ch => ((DelayChannel)ch.Context).ReleaseAll(null), static () => { });
    }

    // A reset aborts the held I/Os of every channel (SPDK's vbdev_delay_reset_channel), then resets the base from
    // the submitting channel. Not a hot path: the closure is allowed here.
    private void Reset(DelayChannel origin, BdevIo io) =>
        _device.ForEachChannel(static ch => ((DelayChannel)ch.Context).ReleaseAll(BdevIoStatus.Aborted), () => origin.Forward(io));

    private void SetLatency(DelayKind kind, ulong us)
    {
        Volatile.Write(ref _us[(int)kind], us);
        Volatile.Write(ref _ticks[(int)kind], ToTicks(us));
    }

    // Saturates instead of overflowing: a latency of years is "never" either way.
    private static long ToTicks(ulong us)
    {
        const ulong Limit = 1_000_000_000_000_000; // about 31 years
        if (us >= Limit)
        {
            return long.MaxValue / 4;
        }

        return (long)(us / 1_000_000) * Ticks.Frequency + ((long)(us % 1_000_000) * Ticks.Frequency / 1_000_000);
    }

    private sealed class Channels : IoDevice
    {
        private readonly DelayBdev _bdev;
        private readonly BdevDesc _base;

        public Channels(DelayBdev bdev, BdevDesc baseDesc)
            : base("delay:" + bdev.Name)
        {
            _bdev = bdev;
            _base = baseDesc;
        }

        // Runs on the reactor that asked: the base channel and the release poller are that reactor's.
        protected override object CreateChannelContext(Reactor reactor) => new DelayChannel(_bdev, _base, reactor);

        protected override void DestroyChannelContext(Reactor reactor, object context) => ((DelayChannel)context).Close();
    }
}
