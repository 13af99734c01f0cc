using VhostBackend.Bdev;
using VhostBackend.Reactors;

namespace VhostBackend.BdevVirtio;

/// <summary>
/// A bdev whose I/O goes through a virtio-user controller's per-reactor channels (<see cref="VirtioUserChannel"/>):
/// <see cref="VirtioBlkBdev"/> (the blk disk) and <see cref="VirtioScsiBdev"/> (LUN 0 of a SCSI target).
/// An I/O type the disk does not support fails here, before it reaches the queue.
/// </summary>
public abstract class VirtioUserBdev : Bdev.Bdev
{
    private protected VirtioUserBdev(VirtioUserController ctrl, string name, string productName, uint blockSize, ulong blockCount)
        : base(name, productName, blockSize, blockCount)
    {
        Ctrl = ctrl;
        IoPoolSize = Math.Max(1024, ctrl.VqSize * 2);
    }

    public VirtioUserController Ctrl { get; }

    protected override IoChannel GetModuleChannel(Reactor reactor) => reactor.GetIoChannel(Ctrl);

    protected override void Submit(IoChannel moduleChannel, BdevIo io)
    {
        if (!SupportsIoType(io.Type))
        {
            io.Complete(BdevIoStatus.Failed);
            return;
        }

        ((VirtioUserChannel)moduleChannel.Context).Submit(io);
    }
}
