using System.Text.Json.Nodes;
using VhostBackend.Bdev;

namespace VhostBackend.BdevVirtio;

/// <summary>What the scan learnt of one target's LUN 0.</summary>
internal readonly record struct VirtioScsiDiskInfo(int Target, uint BlockSize, ulong BlockCount, bool UnmapSupported, ulong MaxUnmapBlocks);

/// <summary>
/// LUN 0 of one target of a virtio-user SCSI controller, as a bdev named <c>&lt;controller&gt;t&lt;target&gt;</c>
/// (SPDK's virtio_scsi_disk, "Virtio SCSI Disk"). Its I/O goes through the controller's channels
/// (<see cref="VirtioScsiChannel"/>). save_config writes nothing per disk: the scan finds them again (SPDK).
/// </summary>
public sealed class VirtioScsiBdev : VirtioUserBdev
{
    internal VirtioScsiBdev(VirtioUserController ctrl, VirtioScsiDiskInfo info)
        : base(ctrl, ctrl.CtrlName + "t" + info.Target, "Virtio SCSI Disk", info.BlockSize, info.BlockCount)
    {
        Target = info.Target;
        UnmapSupported = info.UnmapSupported;
        MaxTransferBlocks = Math.Max(1, (uint)VirtioUserController.MaxIoBytes / info.BlockSize);
        MaxUnmapBlocks = Math.Clamp(info.MaxUnmapBlocks, 1UL, uint.MaxValue);

        // SPDK: READ/WRITE (16) only when the LBA may not fit READ/WRITE (10)'s 32 bits.
        Use16ByteCdb = info.BlockCount > (1UL << 32);
    }

    /// <summary>The SCSI target id (the LUN field's byte 1).</summary>
    public int Target { get; }

    /// <summary>The Logical Block Provisioning VPD page's LBPU bit: UNMAP is supported.</summary>
    public bool UnmapSupported { get; }

    internal bool Use16ByteCdb { get; }

    public override bool SupportsIoType(BdevIoType type) => type switch
    {
        BdevIoType.Read or BdevIoType.Write or BdevIoType.Flush => true,
        BdevIoType.Unmap => UnmapSupported,
        _ => false,
    };

    /// <summary>SPDK's virtio_dev_dump_json_info for a virtio-user device, plus the target.</summary>
    public override JsonObject DriverSpecific() => new()
    {
        ["virtio"] = new JsonObject
        {
            ["vq_count"] = Ctrl.VqCount,
            ["vq_size"] = Ctrl.VqSize,
            ["type"] = "user",
            ["socket"] = Ctrl.SocketPath,
            ["target"] = Target,
            ["features"] = $"0x{Ctrl.Features:x}",
            ["packed_ring"] = Ctrl.PackedRing,
        },
    };

    protected override ValueTask DestructAsync()
    {
        Ctrl.Scsi?.DiskGone(this);
        return ValueTask.CompletedTask;
    }
}
