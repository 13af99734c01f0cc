using System.Text.Json.Nodes;
using System.Text.Json.Serialization;
using VhostBackend.Bdev;
using VhostBackend.Bdev.Rpc;
using VhostBackend.Platform;
using VhostBackend.Rpc;

namespace VhostBackend.BdevNull;

/// <summary>bdev_null_create, bdev_null_delete and bdev_null_resize (SPDK's names, params and errors: a decoding failure is -32603 "spdk_json_decode_object failed").</summary>
public static class NullBdevRpc
{
    public sealed class NullResizeParams
    {
        [JsonRequired]
        public string Name { get; set; } = "";

        [JsonRequired]
        public ulong NewSize { get; set; }
    }

    public sealed class NameParams
    {
        [JsonRequired]
        public string Name { get; set; } = "";
    }

    public static void Register(RpcRegistry rpc, BdevManager bdevs)
    {
        rpc.Register("bdev_null_create", r => Create(bdevs, BdevRpc.Decode<BdevGeometryParams>(r)), RpcStates.Runtime);
        rpc.Register("bdev_null_delete", r => BdevCreateRpc.DeleteAsync<NullBdev>(bdevs, BdevRpc.Decode<BdevNameParams>(r).Name), RpcStates.Runtime);
        rpc.Register("bdev_null_resize", r => Resize(bdevs, BdevRpc.Decode<NullResizeParams>(r)), RpcStates.Runtime);
    }

    private static JsonNode Create(BdevManager bdevs, BdevGeometryParams p)
    {
        if (p.Name is null)
        {
            throw new RpcException(RpcErrorCodes.InternalError, $"{BdevRpc.DecodeFailed}: missing required property 'name'"); // required for null bdevs
        }

        return BdevCreateRpc.Register(bdevs, p.Name, name => new NullBdev(name, p.NumBlocks, p.BlockSize, p.Uuid));
    }

    private static JsonNode? Resize(BdevManager bdevs, NullResizeParams p)
    {
        // SPDK: unknown bdev -ENODEV; a bdev of another module, or a size below the current one, -EINVAL.
        var found = bdevs.Find(p.Name) ?? throw RpcErrno.Error(Errno.ENODEV, "name", $"no bdev named {p.Name}");
        if (found is not NullBdev b)
        {
            throw RpcException.Errno(Errno.EINVAL, $"{p.Name} is not a null bdev");
        }

        ulong bytes = p.NewSize * 1024 * 1024;
        ulong currentMb = b.BlockCount * b.BlockSize / (1024 * 1024);
        if (p.NewSize < currentMb)
        {
            throw RpcException.Errno(Errno.EINVAL, "The new bdev size must not be smaller than current bdev size.");
        }

        if (p.NewSize == 0 || bytes / 1024 / 1024 != p.NewSize || bytes / b.BlockSize == 0)
        {
            throw RpcException.Errno(Errno.EINVAL, $"new_size {p.NewSize} MiB is not a valid size");
        }

        b.Resize(bytes / b.BlockSize);
        return null;
    }
}
