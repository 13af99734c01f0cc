using System.Text.Json.Nodes;
using VhostBackend.Bdev;
using VhostBackend.Reactors;

namespace VhostBackend.BdevRaid;

/// <summary>
/// The registered bdev of an online array ("Raid Volume"). Its geometry is fixed when the array comes online: raid0
/// is the smallest base rounded down to a strip, times the base count, with the strip as optimal I/O boundary so the
/// bdev layer splits reads and writes at strips (raid0 with one base needs no split, as in SPDK); concat is every base
/// rounded down to a strip, end to end, also split at strips (a strip never spans two bases); raid1 is the smallest
/// base. I/O is done by each reactor's <see cref="RaidChannel"/>.
/// </summary>
public sealed class RaidBdev : Bdev.Bdev
{
    private readonly RaidDevice _device;
    private readonly bool _flush;
    private readonly bool _unmap;
    private readonly bool _writeZeroes;

    internal RaidBdev(RaidArray array, uint blockSize, ulong blockCount, Guid uuid, ulong[] concatStarts, ulong[] concatLengths)
        : base(array.Name, "Raid Volume", blockSize, blockCount, uuid)
    {
        Array = array;
        Level = array.Level;
        SlotCount = array.Slots.Length;
        StripBlocks = array.StripBlocks;
        ConcatStarts = concatStarts;
        ConcatLengths = concatLengths;
        if (Level == RaidLevel.Concat || (Level == RaidLevel.Raid0 && SlotCount > 1))
        {
            OptimalIoBoundaryBlocks = (uint)StripBlocks;
        }

        uint align = 1;
        bool flush = true, unmap = true, wz = true;
        foreach (var s in array.Slots)
        {
            if (s.Attachment?.Desc.Bdev is { } b)
            {
                align = Math.Max(align, b.RequiredAlignment);
                flush &= b.SupportsIoType(BdevIoType.Flush);
                unmap &= b.SupportsIoType(BdevIoType.Unmap);
                wz &= b.SupportsIoType(BdevIoType.WriteZeroes);
            }
        }

        RequiredAlignment = align;

        // SPDK 24.01: flush and unmap need the level's null-payload path (raid0, concat; not raid1) and every base's support.
        _flush = flush && Level != RaidLevel.Raid1;
        _unmap = unmap && Level != RaidLevel.Raid1;
        _writeZeroes = wz;
        _device = new RaidDevice(this);
    }

    internal RaidArray Array { get; }
    internal RaidLevel Level { get; }
    internal int SlotCount { get; }
    internal ulong StripBlocks { get; }
    internal ulong[] ConcatStarts { get; }
    internal ulong[] ConcatLengths { get; }

    /// <summary>The I/O device whose per-reactor contexts are the <see cref="RaidChannel"/>s (membership changes walk them).</summary>
    internal IoDevice Device => _device;

    public override bool SupportsIoType(BdevIoType type) => type switch
    {
        BdevIoType.Read or BdevIoType.Write or BdevIoType.Reset => true,
        BdevIoType.Flush => _flush,
        BdevIoType.Unmap => _unmap,
        BdevIoType.WriteZeroes => _writeZeroes,
        _ => false,
    };

    /// <summary>
    /// A vbdev (lvol, passthru) may forward its own I/O here (<see cref="BdevChannel.TryForward"/>): the raid channel
    /// reads only the I/O's type, range and iovecs and this array's geometry and layout, keeps the I/O in its own
    /// per-I/O context (never its <see cref="BdevIo.ModuleContext"/>, bdev or channel), and ends with
    /// <see cref="BdevIo.Complete(BdevIoStatus)"/> on the reactor once its base I/Os are back.
    /// <see cref="SupportsIoType"/> is fixed when the array comes online. What the layer would split at a strip, or
    /// bounce for a base's alignment, it does not forward.
    /// </summary>
    public override bool AcceptsForwardedIo => true;

    protected override IoChannel GetModuleChannel(Reactor reactor) => reactor.GetIoChannel(_device);

    protected override void Submit(IoChannel moduleChannel, BdevIo io) => ((RaidChannel)moduleChannel.Context).Submit(io);

    /// <summary>SPDK's dump_info_json: <c>{"raid": {...}}</c>, the same object bdev_raid_get_bdevs lists.</summary>
    public override JsonObject DriverSpecific() => new() { ["raid"] = Array.Module.Info(Array, withName: false) };

    /// <summary>SPDK writes bdev_raid_create from the raid bdev's write_config_json (registered, i.e. online, raids only).</summary>
    public override JsonObject? ConfigCall() => Array.Module.ConfigCall(Array);

    private sealed class RaidDevice : IoDevice
    {
        private readonly RaidBdev _bdev;

        public RaidDevice(RaidBdev bdev)
            : base("raid:" + bdev.Name) => _bdev = bdev;

        protected override object CreateChannelContext(Reactor reactor) => new RaidChannel(_bdev, reactor);

        protected override void DestroyChannelContext(Reactor reactor, object context) => ((RaidChannel)context).Destroy();
    }
}
