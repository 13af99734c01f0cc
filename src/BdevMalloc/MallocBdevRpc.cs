using System.Text.Json.Nodes;
using System.Text.Json.Serialization;
using VhostBackend.Bdev;
using VhostBackend.Bdev.Rpc;
using VhostBackend.Platform;
using VhostBackend.Rpc;

namespace VhostBackend.BdevMalloc;

/// <summary>bdev_malloc_create and bdev_malloc_delete (SPDK's names, params and errors: a decoding failure is -32603 "spdk_json_decode_object failed").</summary>
public static class MallocBdevRpc
{
    public static void Register(RpcRegistry rpc, BdevManager bdevs)
    {
        rpc.Register("bdev_malloc_create", r => Create(bdevs, BdevRpc.Decode<BdevGeometryParams>(r)), RpcStates.Runtime);
        rpc.Register("bdev_malloc_delete", r => BdevCreateRpc.DeleteAsync<MallocBdev>(bdevs, BdevRpc.Decode<BdevNameParams>(r).Name), RpcStates.Runtime);
    }

    private static JsonNode Create(BdevManager bdevs, BdevGeometryParams p) =>
        BdevCreateRpc.Register(bdevs, p.Name ?? BdevCreateRpc.NextName(bdevs, "Malloc"), name => new MallocBdev(name, p.NumBlocks, p.BlockSize, p.Uuid));
}
