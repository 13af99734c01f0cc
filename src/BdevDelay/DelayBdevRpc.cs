using System.Text.Json.Nodes;
using System.Text.Json.Serialization;
using VhostBackend.Bdev;
using VhostBackend.Bdev.Rpc;
using VhostBackend.Platform;
using VhostBackend.Rpc;

namespace VhostBackend.BdevDelay;

/// <summary>
/// bdev_delay_create, bdev_delay_delete and bdev_delay_update_latency as in SPDK v24.01's vbdev_delay_rpc.c: a
/// decoding failure is -32603 "spdk_json_decode_object failed" (every latency is required, in µs); create answers
/// the name, -EINVAL when a p99 latency is below its average, -EEXIST for a taken name, -EPERM for a claimed base;
/// update_latency answers -32602 for an unknown latency type or a name that is not a built delay vbdev.
/// </summary>
public static class DelayBdevRpc
{
    public sealed class CreateParams
    {
        [JsonRequired]
        public string BaseBdevName { get; set; } = "";

        [JsonRequired]
        public string Name { get; set; } = "";

        public Guid? Uuid { get; set; }

        [JsonRequired]
        public ulong AvgReadLatency { get; set; }

        [JsonRequired]
        public ulong P99ReadLatency { get; set; }

        [JsonRequired]
        public ulong AvgWriteLatency { get; set; }

        [JsonRequired]
        public ulong P99WriteLatency { get; set; }
    }

    public sealed class UpdateLatencyParams
    {
        [JsonRequired]
        public string DelayBdevName { get; set; } = "";

        [JsonRequired]
        public string LatencyType { get; set; } = "";

        [JsonRequired]
        public ulong LatencyUs { get; set; }
    }

    public static void Register(RpcRegistry rpc, BdevManager bdevs, DelayBdevModule module)
    {
        rpc.Register("bdev_delay_create", r => Create(module, BdevRpc.Decode<CreateParams>(r)), RpcStates.Runtime);
        rpc.Register("bdev_delay_delete", r => DeleteAsync(module, BdevRpc.Decode<BdevNameParams>(r).Name), RpcStates.Runtime);
        rpc.Register("bdev_delay_update_latency", r => UpdateLatency(bdevs, BdevRpc.Decode<UpdateLatencyParams>(r)), RpcStates.Runtime);
    }

    private static JsonNode Create(DelayBdevModule module, CreateParams p)
    {
        try
        {
            module.Create(p.Name, p.BaseBdevName, p.Uuid is { } u && u != Guid.Empty ? u : null,
                new DelayLatencies(p.AvgReadLatency, p.P99ReadLatency, p.AvgWriteLatency, p.P99WriteLatency));
        }
        catch (BdevExistsException e)
        {
            throw RpcErrno.Error(Errno.EEXIST, "name", e.Message);
        }
        catch (BdevClaimException e)
        {
            throw RpcErrno.Error(e.Errno, "base_bdev_name", e.Message);
        }
        catch (ArgumentException e)
        {
            throw RpcErrno.Error(Errno.EINVAL, e, "p99_read_latency");
        }

        return JsonValue.Create(p.Name);
    }

    private static async Task<JsonNode?> DeleteAsync(DelayBdevModule module, string name)
    {
        if (!await module.DeleteAsync(name).ConfigureAwait(true))
        {
            throw RpcErrno.Error(Errno.ENODEV, "name", $"no delay bdev named {name}");
        }

        return null;
    }

    private static JsonNode? UpdateLatency(BdevManager bdevs, UpdateLatencyParams p)
    {
        // SPDK checks the type first, then looks the name up among built delay vbdevs only.
        if (p.LatencyType is not ("avg_read" or "p99_read" or "avg_write" or "p99_write"))
        {
            throw RpcException.InvalidParams("Please specify a valid latency type.");
        }

        if (bdevs.Find(p.DelayBdevName) is not DelayBdev d || d.Name != p.DelayBdevName)
        {
            throw RpcException.InvalidParams("The requested bdev does not exist.");
        }

        d.UpdateLatency(p.LatencyType, p.LatencyUs);
        return null;
    }
}
