using System.Text.Json.Nodes;
using VhostBackend.Bdev;
using VhostBackend.Rpc;
using VhostBackend.Virtio.Blk;

namespace VhostBackend.BdevVirtio;

/// <summary>The disk behind a virtio-user blk controller, as a bdev named after the controller (SPDK: the blk bdev takes the attach name).</summary>
public sealed class VirtioBlkBdev : VirtioUserBdev
{
    internal VirtioBlkBdev(VirtioUserController ctrl, uint blockSize, ulong blockCount)
        : base(ctrl, ctrl.CtrlName, "VirtioBlk Disk", blockSize, blockCount)
    {
        var c = ctrl.Config;
        WriteCache = ctrl.Has(VirtioBlkFeature.Flush);
        uint maxBytes = VirtioUserController.MaxIoBytes;
        if (ctrl.Has(VirtioBlkFeature.SizeMax) && c.SizeMax >= blockSize)
        {
            maxBytes = Math.Min(maxBytes, c.SizeMax);
        }

        MaxTransferBlocks = Math.Max(1, maxBytes / blockSize);
        uint sectorsPerBlock = blockSize / VirtioBlkRequestType.SectorSize;
        MaxUnmapBlocks = ctrl.Has(VirtioBlkFeature.Discard) && c.MaxDiscardSectors > 0 ? c.MaxDiscardSectors / sectorsPerBlock : uint.MaxValue / sectorsPerBlock;
        MaxWriteZeroesBlocks = ctrl.Has(VirtioBlkFeature.WriteZeroes) && c.MaxWriteZeroesSectors > 0 ? c.MaxWriteZeroesSectors / sectorsPerBlock : uint.MaxValue / sectorsPerBlock;
        ReadOnly = ctrl.Has(VirtioBlkFeature.Ro);
    }

    /// <summary>The back end exported the disk read-only (VIRTIO_BLK_F_RO): writes are refused.</summary>
    public bool ReadOnly { get; }

    public override bool SupportsIoType(BdevIoType type) => type switch
    {
        BdevIoType.Read => true,
        BdevIoType.Write => !ReadOnly,
        BdevIoType.Flush => Ctrl.Has(VirtioBlkFeature.Flush),
        BdevIoType.Unmap => !ReadOnly && Ctrl.Has(VirtioBlkFeature.Discard),
        BdevIoType.WriteZeroes => !ReadOnly && Ctrl.Has(VirtioBlkFeature.WriteZeroes),
        _ => false,
    };

    public override JsonObject DriverSpecific() => new()
    {
        ["virtio_blk"] = new JsonObject
        {
            ["type"] = "user",
            ["socket"] = Ctrl.SocketPath,
            ["vq_count"] = Ctrl.VqCount,
            ["vq_size"] = Ctrl.VqSize,
            ["features"] = $"0x{Ctrl.Features:x}",
            ["packed_ring"] = Ctrl.PackedRing,
            ["protocol_features"] = $"0x{Ctrl.ProtocolFeatures:x}",
        },
    };

    /// <summary>SPDK's attach call; packed_ring (ours) only when the attach forced split or packed rings.</summary>
    public override JsonObject ConfigCall()
    {
        var p = new JsonObject
        {
            ["name"] = Ctrl.CtrlName,
            ["trtype"] = "user",
            ["traddr"] = Ctrl.SocketPath,
            ["dev_type"] = "blk",
            ["vq_count"] = Ctrl.VqCount,
            ["vq_size"] = Ctrl.VqSize,
        };
        if (Ctrl.PackedRingOption is { } packed)
        {
            p["packed_ring"] = packed;
        }

        return Subsystem.Call("bdev_virtio_attach_controller", p);
    }
}
