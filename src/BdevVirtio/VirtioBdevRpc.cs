using System.Text.Json.Nodes;
using System.Text.Json.Serialization;
using VhostBackend.Rpc;

namespace VhostBackend.BdevVirtio;

/// <summary>bdev_virtio_attach_controller params (SPDK's names; trtype "user", dev_type "blk" or "scsi").</summary>
public sealed class VirtioAttachParams : IRpcParams
{
    [JsonRequired] public string Name { get; set; } = "";
    [JsonRequired] public string Trtype { get; set; } = "";
    [JsonRequired] public string Traddr { get; set; } = "";
    [JsonRequired] public string DevType { get; set; } = "";
    public int? VqCount { get; set; }
    public int? VqSize { get; set; }

    /// <summary>Ours (SPDK's virtio-user drives split rings only): absent = packed when offered, true = required, false = split.</summary>
    public bool? PackedRing { get; set; }

    public void Validate()
    {
        if (string.IsNullOrWhiteSpace(Name) || Name.Length > 128 || Name.Any(c => char.IsWhiteSpace(c) || c == '/'))
        {
            throw RpcException.InvalidParams("Invalid parameters: name must be a non-empty word");
        }

        if (Trtype != "user")
        {
            // SPDK answers a bad trtype with the positive EINVAL code; pci and vfio-user need devices we do not drive.
            throw new RpcException(22, Trtype is "pci" or "vfio-user" ? $"trtype '{Trtype}' is not supported (only 'user')" : $"Invalid trtype '{Trtype}'");
        }

        if (DevType is not ("blk" or "scsi"))
        {
            throw new RpcException(22, $"Invalid dev_type '{DevType}'");
        }

        if (string.IsNullOrEmpty(Traddr))
        {
            throw RpcException.InvalidParams("traddr (the vhost-user socket path) is required");
        }

        if (VqCount is < 0 or > 256)
        {
            throw RpcException.InvalidParams("vq_count must be 1..256");
        }

        if (VqSize is < 0 or > 32768)
        {
            throw RpcException.InvalidParams("vq_size must be a power of two in 1..32768");
        }
    }
}

public sealed class VirtioDetachParams
{
    [JsonRequired] public string Name { get; set; } = "";
}

/// <summary>The virtio bdev module's RPC methods (SPDK's module/bdev/virtio/bdev_virtio_rpc.c names, params and error codes).</summary>
internal static class VirtioBdevRpc
{
    /// <summary>
    /// Registers bdev_virtio_attach_controller, bdev_virtio_detach_controller, bdev_virtio_scsi_get_devices and
    /// bdev_virtio_blk_get_devices (ours; SPDK lists only SCSI devices) on <paramref name="module"/> (called from <see cref="VirtioBdevModule.Init"/>).
    /// </summary>
    public static void Register(RpcRegistry rpc, VirtioBdevModule module)
    {
        rpc.Register("bdev_virtio_attach_controller", async r =>
        {
            var p = r.Bind<VirtioAttachParams>();
            int count = p.VqCount is null or 0 ? VirtioBdevModule.DefaultVqCount : p.VqCount.Value;
            int size = p.VqSize is null or 0 ? VirtioBdevModule.DefaultVqSize : p.VqSize.Value;
            var type = p.DevType == "scsi" ? VirtioDevType.Scsi : VirtioDevType.Blk;
            var names = await module.AttachAsync(p.Name, p.Traddr, count, size, p.PackedRing, type).ConfigureAwait(true);
            var arr = new JsonArray();
            foreach (var n in names)
            {
                arr.Add(n);
            }

            return arr;
        }, RpcStates.Both);

        rpc.Register("bdev_virtio_detach_controller", async r =>
        {
            var p = r.Bind<VirtioDetachParams>();
            await module.DetachAsync(p.Name).ConfigureAwait(true);
            return (JsonNode?)true;
        }, RpcStates.Runtime);

        rpc.Register("bdev_virtio_blk_get_devices", r => module.GetDevices(), RpcStates.Runtime);
        rpc.Register("bdev_virtio_scsi_get_devices", r => module.GetScsiDevices(), RpcStates.Runtime);
    }
}
