using System.Text.Json.Nodes;
using VhostBackend.Bdev;
using VhostBackend.Platform;
using VhostBackend.Reactors;

namespace VhostBackend.BdevSplit;

/// <summary>
/// One part of a split base bdev (SPDK's <c>spdk_bdev_part</c>, product "Split Disk"): a window of
/// <see cref="Bdev.Bdev.BlockCount"/> blocks starting at <see cref="OffsetBlocks"/> of the base. The bdev layer
/// bounds-checks every request against the part's block count, so an I/O can never reach past the part's end; the
/// part only adds its offset. Every part of one base shares the base's per-reactor channel (<see cref="SplitBase"/>).
/// </summary>
public sealed class SplitBdev : Bdev.Bdev
{
    private static readonly BdevIoCompletion s_done = static (baseIo, ok, arg) =>
        ((BdevIo)arg!).Complete(ok ? BdevIoStatus.Success : baseIo.Status == BdevIoStatus.Miscompare ? BdevIoStatus.Miscompare : BdevIoStatus.Failed);

    private readonly SplitBase _base;

    internal SplitBdev(string name, SplitBase splitBase, ulong offsetBlocks, ulong numBlocks)
        : base(name, "Split Disk", splitBase.Desc.Bdev.BlockSize, numBlocks)
    {
        _base = splitBase;
        OffsetBlocks = offsetBlocks;
        var b = splitBase.Desc.Bdev;
        RequiredAlignment = b.RequiredAlignment;
        WriteCache = b.WriteCache;
    }

    /// <summary>Where the part starts on its base, in blocks.</summary>
    public ulong OffsetBlocks { get; }

    /// <summary>The base bdev's name.</summary>
    public string BaseName => _base.Desc.Bdev.Name;

    public override bool SupportsIoType(BdevIoType type) => _base.Desc.Bdev.SupportsIoType(type);

    protected override IoChannel GetModuleChannel(Reactor reactor) => reactor.GetIoChannel(_base);

    protected override void Submit(IoChannel moduleChannel, BdevIo io)
    {
        var ch = (SplitChannel)moduleChannel.Context;
        if (ch.Waiting.Count > 0)
        {
            ch.Waiting.Enqueue(io); // keep order behind I/O already waiting for the base's pool
            return;
        }

        Forward(ch, io);
    }

    /// <summary>Submits to the base at the translated offset; parks on the base's I/O-wait queue when its pool is empty.</summary>
    internal static bool Forward(SplitChannel ch, BdevIo io)
    {
        var part = (SplitBdev)io.Bdev;
        var desc = part._base.Desc;
        var b = ch.Base;
        ulong offset = io.OffsetBlocks + part.OffsetBlocks;
        int rc = io.Type switch
        {
            BdevIoType.Read => b.Read(desc, io.Iovs, offset, io.NumBlocks, s_done, io),
            BdevIoType.Write => b.Write(desc, io.Iovs, offset, io.NumBlocks, s_done, io),
            BdevIoType.Compare => b.Compare(desc, io.Iovs, offset, io.NumBlocks, s_done, io),
            BdevIoType.Flush => b.Flush(desc, offset, io.NumBlocks, s_done, io),
            BdevIoType.Unmap => b.Unmap(desc, offset, io.NumBlocks, s_done, io),
            BdevIoType.WriteZeroes => b.WriteZeroes(desc, offset, io.NumBlocks, s_done, io),
            _ => b.Reset(desc, s_done, io),
        };
        if (rc == -Errno.ENOMEM)
        {
            ch.Waiting.Enqueue(io);
            b.QueueIoWait(ch.WaitEntry);
            return false;
        }

        if (rc != 0)
        {
            io.Complete(BdevIoStatus.Failed);
        }

        return true;
    }

    public override JsonObject DriverSpecific() => new()
    {
        ["split"] = new JsonObject { ["base_bdev"] = BaseName, ["offset_blocks"] = OffsetBlocks },
    };
}

/// <summary>A reactor's channel for the parts of one base: the base's channel and the I/O waiting for its pool.</summary>
internal sealed class SplitChannel
{
    public SplitChannel(BdevChannel baseChannel)
    {
        Base = baseChannel;
        WaitEntry = new BdevIoWaitEntry(static c => ((SplitChannel)c!).Resume(), this);
    }

    public BdevChannel Base { get; }

    /// <summary>I/O the base refused with -ENOMEM, in order (grows to its high-water mark once, then reused).</summary>
    public Queue<BdevIo> Waiting { get; } = new(64);

    public BdevIoWaitEntry WaitEntry { get; }

    private void Resume()
    {
        while (Waiting.Count > 0)
        {
            var io = Waiting.Dequeue();
            if (!SplitBdev.Forward(this, io))
            {
                // Forward re-queued it at the tail: move it back to the head so order is kept.
                int n = Waiting.Count - 1;
                for (int i = 0; i < n; i++)
                {
                    Waiting.Enqueue(Waiting.Dequeue());
                }

                return;
            }
        }
    }
}

/// <summary>The claimed base of a split config: its descriptor, and the I/O device whose per-reactor context is the base's channel.</summary>
internal sealed class SplitBase : IoDevice
{
    public SplitBase(BdevDesc desc)
        : base("split:" + desc.Bdev.Name) => Desc = desc;

    public BdevDesc Desc { get; }

    // Runs on the reactor that asked: the base channel is that reactor's.
    protected override object CreateChannelContext(Reactor reactor) => new SplitChannel(Desc.GetIoChannel());

    protected override void DestroyChannelContext(Reactor reactor, object context) => BdevDesc.PutIoChannel(((SplitChannel)context).Base);
}
