using System.Text.Json.Nodes;
using VhostBackend.Bdev;
using VhostBackend.Reactors;

namespace VhostBackend.BdevPassthru;

/// <summary>
/// A passthru vbdev (SPDK's module/bdev/passthru): the base's geometry, write cache, alignment and I/O boundary, its
/// supported I/O types, and every I/O forwarded unchanged through this reactor's channel to the base.
/// </summary>
public sealed class PassthruBdev : Bdev.Bdev
{
    private readonly BdevDesc _base;
    private readonly Channels _device;

    internal PassthruBdev(string name, BdevDesc baseDesc, Guid uuid)
        : base(name, "passthru", baseDesc.Bdev.BlockSize, baseDesc.Bdev.BlockCount, uuid)
    {
        _base = baseDesc;
        _device = new Channels(baseDesc, name);
        WriteCache = baseDesc.Bdev.WriteCache;
        RequiredAlignment = baseDesc.Bdev.RequiredAlignment;
        OptimalIoBoundaryBlocks = baseDesc.Bdev.OptimalIoBoundaryBlocks;
    }

    /// <summary>The bdev this one forwards to.</summary>
    public Bdev.Bdev BaseBdev => _base.Bdev;

    public override bool SupportsIoType(BdevIoType type) => _base.Bdev.SupportsIoType(type);

    protected override IoChannel GetModuleChannel(Reactor reactor) => reactor.GetIoChannel(_device);

    protected override void Submit(IoChannel moduleChannel, BdevIo io) => ((BaseForwarder)moduleChannel.Context).Forward(io);

    /// <summary>Reads and writes resolved in the caller's pass (<see cref="BdevRemap"/>): the same blocks of the base, so
    /// a passthru costs its caller no second pass through the bdev layer. The layer takes the remap only over a base
    /// that accepts forwarded I/O and never splits or bounces; everything else comes to <see cref="Submit"/>.</summary>
    protected override BdevRemap? CreateRemap(IoChannel moduleChannel) => new Identity(_base, ((BaseForwarder)moduleChannel.Context).Base);

    /// <summary>SPDK's dump_info_json: <c>{"passthru": {"name", "base_bdev_name"}}</c>.</summary>
    public override JsonObject DriverSpecific() => new()
    {
        ["passthru"] = new JsonObject { ["name"] = Name, ["base_bdev_name"] = _base.Bdev.Name },
    };

    private sealed class Identity(BdevDesc baseDesc, BdevChannel baseChannel) : BdevRemap(baseDesc, baseChannel)
    {
        public override bool TryTranslate(BdevIo io, out ulong baseOffsetBlocks)
        {
            baseOffsetBlocks = io.OffsetBlocks;
            return true;
        }
    }

    private sealed class Channels : IoDevice
    {
        private readonly BdevDesc _base;

        public Channels(BdevDesc baseDesc, string name)
            : base("passthru:" + name) => _base = baseDesc;

        // Runs on the reactor that asked: the base channel is that reactor's.
        protected override object CreateChannelContext(Reactor reactor) => new BaseForwarder(_base, forwardInPlace: true);

        protected override void DestroyChannelContext(Reactor reactor, object context) => ((BaseForwarder)context).Close();
    }
}
