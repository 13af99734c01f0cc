using VhostBackend.Bdev;
using VhostBackend.Reactors;
using VhostBackend.Virtio;
using VhostBackend.Virtio.Blk;

namespace VhostBackend.BdevVirtio;

/// <summary>
/// A reactor's channel to a virtio-user blk device (<see cref="VirtioUserChannel"/>: one virtqueue, its slots and
/// poller). Each request is an out header and a status byte in the slot's metadata, with the data (reads,
/// writes) or a discard/write-zeroes range between them.
/// </summary>
internal sealed class VirtioBlkChannel : VirtioUserChannel
{
    public VirtioBlkChannel(VirtioUserController ctrl, Reactor reactor)
        : base(ctrl, reactor, "bdev_virtio", "virtqueue")
    {
    }

    protected override int BuildRequest(BdevIo io, VirtioUserQueue q, int slot, Span<DriverBuffer> bufs)
    {
        ulong metaGpa = q.SlotGpa(slot);
        uint bs = io.Bdev.BlockSize;
        ulong sector = io.OffsetBlocks * (bs / VirtioBlkRequestType.SectorSize);
        ref var hdr = ref q.Header(slot);
        hdr.IoPrio = 0;
        hdr.Sector = sector;
        q.Status(slot) = 0xFF;

        bufs[0] = new DriverBuffer(q.HeaderGpa(slot), VirtioBlkOutHeader.Size, 0);
        var status = new DriverBuffer(q.StatusGpa(slot), 1, VirtqDesc.FlagWrite);
        switch (io.Type)
        {
            case BdevIoType.Read:
            case BdevIoType.Write:
                if (!TryDataBuffer(io, slot, out var data))
                {
                    io.Complete(BdevIoStatus.Failed);
                    return 0;
                }

                hdr.Type = io.Type == BdevIoType.Read ? VirtioBlkRequestType.In : VirtioBlkRequestType.Out;
                bufs[1] = data;
                bufs[2] = status;
                return 3;
            case BdevIoType.Flush:
                hdr.Type = VirtioBlkRequestType.Flush;
                hdr.Sector = 0;
                bufs[1] = status;
                return 2;
            case BdevIoType.Unmap:
            case BdevIoType.WriteZeroes:
            {
                ulong sectors = io.NumBlocks * (bs / VirtioBlkRequestType.SectorSize);
                if (sectors > uint.MaxValue)
                {
                    io.Complete(BdevIoStatus.Failed);
                    return 0;
                }

                hdr.Type = io.Type == BdevIoType.Unmap ? VirtioBlkRequestType.Discard : VirtioBlkRequestType.WriteZeroes;
                hdr.Sector = 0;
                ref var range = ref q.Memory.Ref<VirtioBlkDiscardWriteZeroes>(metaGpa + VirtioUserQueue.RangeOffset);
                range.Sector = sector;
                range.NumSectors = (uint)sectors;
                range.Flags = 0;
                bufs[1] = new DriverBuffer(metaGpa + VirtioUserQueue.RangeOffset, VirtioBlkDiscardWriteZeroes.Size, 0);
                bufs[2] = status;
                return 3;
            }

            default:
                io.Complete(BdevIoStatus.Failed);
                return 0;
        }
    }

    /// <summary>Success only for status VIRTIO_BLK_S_OK (the slot's status byte starts at 0xFF: a request completed without a status fails).</summary>
    protected override bool Succeeded(BdevIo io, VirtioUserQueue q, int slot, uint usedLen) => q.Status(slot) == VirtioBlkRequestType.StatusOk;
}
