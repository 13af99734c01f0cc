using System.Text.Json.Nodes;
using Microsoft.Extensions.Logging.Abstractions;
using VhostBackend.Reactors;
using VhostBackend.Rpc;

namespace VhostBackend.Bdev.Tests.Modules;

/// <summary>
/// A model of SPDK's passthru vbdev module (not a product module): each vbdev claims one base bdev and forwards every
/// I/O to it. It exists to prove the module contract's examine/claim path end to end.
/// </summary>
internal sealed class PassthruModel : VirtualBdevModule
{
    public override string Name => "passthru";

    /// <summary>Adds the module to <paramref name="bdevs"/> and initializes it, as the App's AddBdevModule does.</summary>
    public static PassthruModel Start(BdevManager bdevs, ReactorRuntime reactors)
    {
        var m = new PassthruModel();
        bdevs.AddModule(m);
        m.Init(new BdevModuleContext(bdevs, reactors, new RpcRegistry(), new SubsystemRegistry(), NullLoggerFactory.Instance));
        return m;
    }

    /// <summary>bdev_passthru_create: the vbdev, or null while its base is missing.</summary>
    public Bdev? Create(string name, string baseName) => AddVbdev(name, baseName, null);

    /// <summary>bdev_passthru_delete.</summary>
    public Task<bool> DeleteAsync(string name) => DeleteVbdevAsync(name);

    protected override void InitModule(BdevModuleContext context)
    {
        // A product module registers bdev_passthru_create/delete here; the tests call Create/DeleteAsync directly.
    }

    protected override Bdev CreateVbdev(Entry entry, BdevDesc baseDesc) => new PassthruBdev(entry.VbdevName, baseDesc);

    protected override JsonObject VbdevConfigCall(Entry entry) =>
        Subsystem.Call("bdev_passthru_create", new JsonObject { ["base_bdev_name"] = entry.BaseName, ["name"] = entry.VbdevName });
}

/// <summary>The passthru model's bdev: the base's geometry; each reactor's channel holds a channel to the base.</summary>
internal sealed class PassthruBdev : Bdev
{
    private static readonly BdevIoCompletion s_done = static (baseIo, ok, arg) =>
        ((BdevIo)arg!).Complete(ok ? BdevIoStatus.Success : baseIo.Status == BdevIoStatus.Miscompare ? BdevIoStatus.Miscompare : BdevIoStatus.Failed);

    private readonly BdevDesc _base;
    private readonly BaseChannels _device;

    public PassthruBdev(string name, BdevDesc baseDesc)
        : base(name, "passthru", baseDesc.Bdev.BlockSize, baseDesc.Bdev.BlockCount)
    {
        _base = baseDesc;
        _device = new BaseChannels(baseDesc, name);
    }

    public override bool SupportsIoType(BdevIoType type) => _base.Bdev.SupportsIoType(type);

    protected internal override IoChannel GetModuleChannel(Reactor reactor) => reactor.GetIoChannel(_device);

    protected internal override void Submit(IoChannel moduleChannel, BdevIo io)
    {
        var ch = (BdevChannel)moduleChannel.Context;
        int rc = io.Type switch
        {
            BdevIoType.Read => ch.Read(_base, io.Iovs, io.OffsetBlocks, io.NumBlocks, s_done, io),
            BdevIoType.Write => ch.Write(_base, io.Iovs, io.OffsetBlocks, io.NumBlocks, s_done, io),
            BdevIoType.Compare => ch.Compare(_base, io.Iovs, io.OffsetBlocks, io.NumBlocks, s_done, io),
            BdevIoType.Flush => ch.Flush(_base, io.OffsetBlocks, io.NumBlocks, s_done, io),
            BdevIoType.Unmap => ch.Unmap(_base, io.OffsetBlocks, io.NumBlocks, s_done, io),
            BdevIoType.WriteZeroes => ch.WriteZeroes(_base, io.OffsetBlocks, io.NumBlocks, s_done, io),
            _ => ch.Reset(_base, s_done, io),
        };
        if (rc != 0)
        {
            io.Complete(BdevIoStatus.Failed);
        }
    }

    private sealed class BaseChannels : IoDevice
    {
        private readonly BdevDesc _base;

        public BaseChannels(BdevDesc baseDesc, string name)
            : base("passthru:" + name) => _base = baseDesc;

        // Runs on the reactor that asked: the base channel is that reactor's.
        protected override object CreateChannelContext(Reactor reactor) => _base.GetIoChannel();

        protected override void DestroyChannelContext(Reactor reactor, object context) => BdevDesc.PutIoChannel((BdevChannel)context);
    }
}
