using System.Text.Json.Nodes;
using VhostBackend.Bdev;
using VhostBackend.Reactors;

namespace VhostBackend.BdevError;

/// <summary>
/// An error-injection vbdev, <c>EE_&lt;base&gt;</c> (SPDK's module/bdev/error): the base's geometry and I/O types;
/// each read, write, unmap and flush consults its type's injection (<see cref="ErrorInjection"/>) and fails, holds,
/// corrupts or answers NoMemory as told, else goes to the base. A reset is not forwarded: as in SPDK it fails every
/// held I/O (on every channel) and succeeds.
/// </summary>
public sealed class ErrorBdev : Bdev.Bdev
{
    private readonly BdevDesc _base;
    private readonly Channels _device;
    private readonly ErrorInjection[] _vector = [new(), new(), new(), new()];

    internal ErrorBdev(string name, BdevDesc baseDesc, Guid? uuid)
        : base(name, "Error Injection Disk", baseDesc.Bdev.BlockSize, baseDesc.Bdev.BlockCount, uuid)
    {
        _base = baseDesc;
        _device = new Channels(this, baseDesc);
        WriteCache = baseDesc.Bdev.WriteCache;
        RequiredAlignment = baseDesc.Bdev.RequiredAlignment;
        OptimalIoBoundaryBlocks = baseDesc.Bdev.OptimalIoBoundaryBlocks;
    }

    /// <summary>The bdev this one forwards to.</summary>
    public Bdev.Bdev BaseBdev => _base.Bdev;

    /// <summary>Set when the vbdev starts going away: held I/Os are aborted and no new one is held.</summary>
    internal bool Removing { get; private set; }

    /// <summary>The injection for read, write, unmap or flush.</summary>
    public ErrorInjection Injection(BdevIoType type) => _vector[ErrorInjection.IndexOf(type) is var i and >= 0 ? i : throw new ArgumentOutOfRangeException(nameof(type))];

    /// <summary>
    /// bdev_error_inject_error: <paramref name="ioType"/> null means "all" (every injectable type gets it), otherwise
    /// one of read, write, unmap, flush.
    /// </summary>
    public void Inject(BdevIoType? ioType, ErrorType type, uint num, ulong queueDepth, ulong corruptOffset, byte corruptValue)
    {
        foreach (var inj in ioType is { } t ? [Injection(t)] : _vector)
        {
            inj.Set(type, num, queueDepth, corruptOffset, corruptValue);
        }
    }

    /// <summary>bdev_error_inject_error with io_type "clear": no injection left on any type (the types stay, as SPDK).</summary>
    public void ClearInjections()
    {
        foreach (var inj in _vector)
        {
            inj.Clear();
        }
    }

    public override bool SupportsIoType(BdevIoType type) => _base.Bdev.SupportsIoType(type);

    protected override IoChannel GetModuleChannel(Reactor reactor) => reactor.GetIoChannel(_device);

    protected override void Submit(IoChannel moduleChannel, BdevIo io)
    {
        var ch = (ErrorChannel)moduleChannel.Context;
        if (io.Type == BdevIoType.Reset)
        {
            Reset(io);
            return;
        }

        int index = ErrorInjection.IndexOf(io.Type);
        if (index >= 0)
        {
            var inj = _vector[index];
            var type = inj.Num > 0 && ch.Inflight >= inj.QueueDepth ? inj.Type : ErrorType.None;
            switch (type)
            {
                case ErrorType.Failure when inj.TryConsume():
                    io.Complete(BdevIoStatus.Failed);
                    return;
                case ErrorType.NoMemory when inj.TryConsume():
                    io.Complete(BdevIoStatus.NoMemory);
                    return;
                case ErrorType.Pending when inj.TryConsume():
                    if (Removing)
                    {
                        io.Complete(BdevIoStatus.Aborted);
                    }
                    else
                    {
                        ch.Hold(io);
                    }

                    return;
                case ErrorType.CorruptData when io.Type == BdevIoType.Write && inj.TryConsume():
                    inj.Corrupt(io.Iovs);
                    break;
            }
        }

        ch.ForwardCounted(io);
    }

    /// <summary>SPDK's dump_info_json: <c>{"error_disk": {"base_bdev": name}}</c>.</summary>
    public override JsonObject DriverSpecific() => new()
    {
        ["error_disk"] = new JsonObject { ["base_bdev"] = _base.Bdev.Name },
    };

    /// <summary>The vbdev is being unregistered: abort every held I/O so its openers can drain and close.</summary>
    internal void BeginRemoval()
    {
        Removing = true;
        _device.ForEachChannel(static ch => ((ErrorChannel)ch.Context).CompletePending(BdevIoStatus.Aborted), static () => { });
    }

    // SPDK's vbdev_error_reset: held I/Os fail, the reset succeeds (the base is not reset). Not a hot path.
    private void Reset(BdevIo io) =>
        _device.ForEachChannel(static ch => ((ErrorChannel)ch.Context).CompletePending(BdevIoStatus.Failed), () => io.Complete(BdevIoStatus.Success));

    private sealed class Channels : IoDevice
    {
        private readonly ErrorBdev _bdev;
        private readonly BdevDesc _base;

        public Channels(ErrorBdev bdev, BdevDesc baseDesc)
            : base("error:" + bdev.Name)
        {
            _bdev = bdev;
            _base = baseDesc;
        }

        protected override object CreateChannelContext(Reactor reactor) => new ErrorChannel(_bdev, _base);

        protected override void DestroyChannelContext(Reactor reactor, object context) => ((ErrorChannel)context).Close();
    }
}
