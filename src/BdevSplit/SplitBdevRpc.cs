using System.Text.Json.Nodes;
using System.Text.Json.Serialization;
using VhostBackend.Bdev;
using VhostBackend.Platform;
using VhostBackend.Rpc;

namespace VhostBackend.BdevSplit;

/// <summary>
/// bdev_split_create and bdev_split_delete with SPDK 24.01's params and errors (vbdev_split_rpc.c): every failure is
/// -32602, "Invalid parameters" for a decoding failure, "Failed to create N split bdevs from 'base': strerror" for a
/// refused create, strerror for a refused delete.
/// </summary>
public static class SplitBdevRpc
{
    public sealed class CreateParams
    {
        [JsonRequired]
        public string BaseBdev { get; set; } = "";

        [JsonRequired]
        public uint SplitCount { get; set; }

        public ulong SplitSizeMb { get; set; }
    }

    public sealed class DeleteParams
    {
        [JsonRequired]
        public string BaseBdev { get; set; } = "";
    }

    public static void Register(RpcRegistry rpc, SplitBdevModule module)
    {
        rpc.Register("bdev_split_create", r => Create(module, r.Bind<CreateParams>()), RpcStates.Runtime);
        rpc.Register("bdev_split_delete", r => DeleteAsync(module, r.Bind<DeleteParams>()), RpcStates.Runtime);
    }

    private static JsonNode Create(SplitBdevModule module, CreateParams p)
    {
        IReadOnlyList<string> names;
        try
        {
            names = module.Create(p.BaseBdev, p.SplitCount, p.SplitSizeMb);
        }
        catch (SplitException e)
        {
            throw RpcException.InvalidParams($"Failed to create {p.SplitCount} split bdevs from '{p.BaseBdev}': {Errno.Message(e.Errno)}");
        }
        catch (BdevNotFoundException)
        {
            // The base went away between the lookup and the open: as if it did not exist yet (the config waits).
            names = [];
        }

        var arr = new JsonArray();
        foreach (var n in names)
        {
            arr.Add(n);
        }

        return arr;
    }

    private static async Task<JsonNode?> DeleteAsync(SplitBdevModule module, DeleteParams p)
    {
        try
        {
            await module.DeleteAsync(p.BaseBdev).ConfigureAwait(true);
        }
        catch (SplitException e)
        {
            throw RpcException.InvalidParams(Errno.Message(e.Errno));
        }

        return null;
    }
}
