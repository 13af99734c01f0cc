using System.Runtime.CompilerServices;
using VhostBackend.Bdev;
using VhostBackend.Reactors;

namespace VhostBackend.TestShared;

/// <summary>How a <see cref="ShiftVbdevModel"/> hands its I/O to its base.</summary>
internal enum ShiftVbdevPath
{
    /// <summary>
    /// Its module hands the caller's I/O to the base in place when the base takes it
    /// (<see cref="BdevChannel.TryForward"/>), else submits a regular base I/O.
    /// </summary>
    Forward,

    /// <summary>
    /// Its channels have a remap fast path (<see cref="Bdev.Bdev.CreateRemap"/>); its module submits a regular base I/O.
    /// </summary>
    Remap,
}

/// <summary>
/// A test model vbdev (not a product module), a probe of what reached its module and its remap: block N is the base's
/// block N + shift. With <see cref="ShiftVbdevPath.Forward"/> its module forwards the I/O when the base takes it
/// (its own module state set and checked on the way back) and counts <see cref="Forwarded"/> and <see cref="Regular"/>;
/// with <see cref="ShiftVbdevPath.Remap"/> its remap translates every read and write below <see cref="RefuseFrom"/>
/// (<see cref="Translated"/>). A source file linked
/// into the test projects that check forwarding and remapping (Bdev, BdevRaid).
/// </summary>
/// <remarks>
/// The bdev layer's hooks are <c>protected internal</c>: an override is <c>protected internal</c> in a project that
/// sees the layer's internals (Bdev.Tests defines BDEV_INTERNALS_VISIBLE) and <c>protected</c> elsewhere.
/// </remarks>
internal sealed class ShiftVbdevModel : Bdev.Bdev
{
    private static readonly BdevIoCompletion s_regularDone = static (_, ok, arg) => ((BdevIo)arg!).Complete(ok);
    private static readonly object s_mine = new();
    private const long MyTag = 77;
    private readonly BdevDesc _base;
    private readonly ulong _shift;
    private readonly ShiftVbdevPath _path;
    private readonly Channels _device;
    private bool _inSubmit;

    public ShiftVbdevModel(string name, BdevDesc baseDesc, ulong shift, ulong blocks, ShiftVbdevPath path = ShiftVbdevPath.Forward,
        int extentShift = -1)
        : base(name, "Shift model", baseDesc.Bdev.BlockSize, blocks)
    {
        _base = baseDesc;
        _shift = shift;
        _path = path;
        _device = new Channels(baseDesc, name);
        _extentShift = extentShift;
        ExtentMap = extentShift >= 0 ? new StrongBox<uint[]>([]) : null;
    }

    private readonly int _extentShift;

    /// <summary>With an extent shift, the remap's extent map (<see cref="BdevRemap.ExtentMap"/>): the layer maps an
    /// I/O within extent i whose entry is non-zero to that base extent without asking the remap; the rest is asked
    /// (and shifted as without a map).</summary>
    public StrongBox<uint[]>? ExtentMap { get; }

    /// <summary>Module submits (forwarded or regular).</summary>
    public int ModuleSubmits;

    /// <summary>Module submits forwarded to the base in place.</summary>
    public int Forwarded;

    /// <summary>Module submits done with a regular base I/O.</summary>
    public int Regular;

    /// <summary>A forwarded I/O came back inside the module's own submit.</summary>
    public bool CompletedInsideSubmit;

    /// <summary>A forwarded I/O came back without the module state this module had set on it.</summary>
    public bool ModuleStateChanged;

    /// <summary>The first block the remap says no to (the module's path does it).</summary>
    public ulong RefuseFrom = ulong.MaxValue;

    /// <summary>I/Os the remap translated.</summary>
    public int Translated;

    public override bool SupportsIoType(BdevIoType type) => type is BdevIoType.Read or BdevIoType.Write;

#if BDEV_INTERNALS_VISIBLE
    protected internal override IoChannel GetModuleChannel(Reactor reactor) => reactor.GetIoChannel(_device);

    protected internal override BdevRemap? CreateRemap(IoChannel moduleChannel) => NewRemap(moduleChannel);

    protected internal override void Submit(IoChannel moduleChannel, BdevIo io) => SubmitToBase(moduleChannel, io);
#else
    protected override IoChannel GetModuleChannel(Reactor reactor) => reactor.GetIoChannel(_device);

    protected override BdevRemap? CreateRemap(IoChannel moduleChannel) => NewRemap(moduleChannel);

    protected override void Submit(IoChannel moduleChannel, BdevIo io) => SubmitToBase(moduleChannel, io);
#endif

    private Remap? NewRemap(IoChannel moduleChannel)
        => _path != ShiftVbdevPath.Remap ? null
            : ExtentMap is { } map ? new Remap(this, (BdevChannel)moduleChannel.Context, map)
            : new Remap(this, (BdevChannel)moduleChannel.Context);

    private void SubmitToBase(IoChannel moduleChannel, BdevIo io)
    {
        ModuleSubmits++;
        var ch = (BdevChannel)moduleChannel.Context;
        ulong at = io.OffsetBlocks + _shift;
        _inSubmit = true;
        try
        {
            if (_path == ShiftVbdevPath.Forward)
            {
                io.ModuleContext = s_mine; // must come back untouched
                io.ModuleTag = MyTag;
                if (ch.TryForward(_base, io, at, s_forwardDone))
                {
                    Forwarded++;
                    return;
                }
            }

            Regular++;
            int rc = io.Type == BdevIoType.Read
                ? ch.Read(_base, io.Iovs, at, io.NumBlocks, s_regularDone, io)
                : ch.Write(_base, io.Iovs, at, io.NumBlocks, s_regularDone, io);
            if (rc != 0)
            {
                io.Complete(false);
            }
        }
        finally
        {
            _inSubmit = false;
        }
    }

    private static readonly Action<BdevIo> s_forwardDone = static io =>
    {
        var self = (ShiftVbdevModel)io.Bdev;
        self.CompletedInsideSubmit |= self._inSubmit;
        self.ModuleStateChanged |= io.ModuleContext != s_mine || io.ModuleTag != MyTag;
    };

    private sealed class Remap : BdevRemap
    {
        private readonly ShiftVbdevModel owner;

        public Remap(ShiftVbdevModel owner, BdevChannel baseChannel) : base(owner._base, baseChannel) => this.owner = owner;

        public Remap(ShiftVbdevModel owner, BdevChannel baseChannel, StrongBox<uint[]> map)
            : base(owner._base, baseChannel, map, owner._extentShift) => this.owner = owner;

        public override bool TryTranslate(BdevIo io, out ulong baseOffsetBlocks)
        {
            baseOffsetBlocks = io.OffsetBlocks + owner._shift;
            Xunit.Assert.Equal(0, io.ModuleTag); // a fresh I/O: nothing of the module's own yet
            if (io.OffsetBlocks >= owner.RefuseFrom)
            {
                return false;
            }

            owner.Translated++;
            return true;
        }
    }

    private sealed class Channels(BdevDesc baseDesc, string name) : IoDevice("shift:" + name)
    {
        protected override object CreateChannelContext(Reactor reactor) => baseDesc.GetIoChannel();

        protected override void DestroyChannelContext(Reactor reactor, object context) => BdevDesc.PutIoChannel((BdevChannel)context);
    }
}
