using VhostBackend.Platform;

namespace VhostBackend.Bdev;

/// <summary>
/// One reactor's path from a vbdev to its base bdev: the base's channel on this reactor and a queue of I/Os waiting
/// for a free base I/O object. A base submit that returns -ENOMEM parks the I/O here (linked through its
/// <see cref="BdevIo.ModuleContext"/>, so waiting allocates nothing) behind one wait entry per channel, and later
/// I/Os queue behind it so none overtakes. While forwarded, an I/O's ModuleContext is this forwarder, which is how
/// the base's completion finds its way back without a closure. Shared by the single-base vbdev modules (passthru,
/// delay, error): each derives from it or uses it as its channel context.
/// </summary>
public class BaseForwarder
{
    private static readonly BdevIoCompletion s_done = static (baseIo, _, arg) =>
    {
        var io = (BdevIo)arg!;
        ((BaseForwarder)io.ModuleContext!).OnBaseDone(io, baseIo.Status, baseIo.NvmeStatus);
    };

    private readonly BdevDesc _base;
    private readonly bool _inPlace;
    private readonly BdevIoWaitEntry _wait;
    private BdevIo? _waitHead;
    private BdevIo? _waitTail;

    /// <param name="baseDesc">The vbdev's descriptor of its base.</param>
    /// <param name="forwardInPlace">Hand each I/O to the base as the same object when the base allows it
    /// (<see cref="BdevChannel.TryForward"/>): for a vbdev that needs no hook at the base's completion
    /// (<see cref="OnBaseDone"/> is then not called: the base's status goes straight to the vbdev's caller).</param>
    public BaseForwarder(BdevDesc baseDesc, bool forwardInPlace = false)
    {
        _base = baseDesc;
        _inPlace = forwardInPlace;
        Base = baseDesc.GetIoChannel();
        _wait = new BdevIoWaitEntry(static s => ((BaseForwarder)s!).Resume(), this);
    }

    /// <summary>This reactor's channel to the base.</summary>
    public BdevChannel Base { get; }

    /// <summary>Sends <paramref name="io"/> to the base (same type, blocks and buffers); its completion comes to <see cref="OnBaseDone"/>.</summary>
    public void Forward(BdevIo io)
    {
        if (_waitHead is not null)
        {
            Enqueue(io);
            return;
        }

        Submit(io);
    }

    /// <summary>The base finished the I/O: forward its status (Miscompare, NoMemory and Aborted included) and NVMe status.</summary>
    protected virtual void OnBaseDone(BdevIo io, BdevIoStatus status, int nvmeStatus)
    {
        io.NvmeStatus = nvmeStatus;
        io.Complete(status);
    }

    /// <summary>The base refused the I/O with an error other than -ENOMEM.</summary>
    protected virtual void OnSubmitFailed(BdevIo io) => io.Complete(BdevIoStatus.Failed);

    /// <summary>Completes the I/Os still waiting for the base (the channel is going away) as aborted and drops the base channel.</summary>
    public virtual void Close()
    {
        while (Dequeue() is { } io)
        {
            io.Complete(BdevIoStatus.Aborted);
        }

        BdevDesc.PutIoChannel(Base);
    }

    private void Submit(BdevIo io)
    {
        if (_inPlace && Base.TryForward(_base, io, io.OffsetBlocks))
        {
            return;
        }

        io.ModuleContext = this;
        var ch = Base;
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
        if (rc == -Errno.ENOMEM)
        {
            // No base I/O object free on this reactor: wait for one (SPDK's spdk_bdev_queue_io_wait).
            io.ModuleContext = _waitHead;
            _waitHead = io;
            _waitTail ??= io;
            Base.QueueIoWait(_wait);
        }
        else if (rc != 0)
        {
            io.ModuleContext = null;
            OnSubmitFailed(io);
        }
    }

    private void Enqueue(BdevIo io)
    {
        io.ModuleContext = null;
        if (_waitTail is null)
        {
            _waitHead = io;
        }
        else
        {
            _waitTail.ModuleContext = io;
        }

        _waitTail = io;
    }

    private BdevIo? Dequeue()
    {
        var io = _waitHead;
        if (io is null)
        {
            return null;
        }

        _waitHead = io.ModuleContext as BdevIo;
        if (_waitHead is null)
        {
            _waitTail = null;
        }

        io.ModuleContext = null;
        return io;
    }

    // A base I/O object is free again: resubmit in order until the base runs out again (Submit then requeues at the front).
    private void Resume()
    {
        while (_waitHead is not null)
        {
            var io = Dequeue()!;
            Submit(io);
            if (_waitHead == io)
            {
                return;
            }
        }
    }
}
