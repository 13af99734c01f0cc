using System.Text.Json.Nodes;
using System.Text.Json.Serialization;
using VhostBackend.Bdev;
using VhostBackend.Bdev.Rpc;
using VhostBackend.Platform;
using VhostBackend.Rpc;

namespace VhostBackend.BdevPassthru;

/// <summary>
/// bdev_passthru_create and bdev_passthru_delete as in SPDK v24.01's vbdev_passthru_rpc.c: a decoding failure is
/// -32603 "spdk_json_decode_object failed"; other failures are -errno with strerror's text (a taken name -EEXIST, a
/// claimed base -EPERM, an unknown vbdev -ENODEV). Create answers the vbdev's name even while its base is missing.
/// </summary>
public static class PassthruBdevRpc
{
    public sealed class CreateParams
    {
        [JsonRequired]
        public string BaseBdevName { get; set; } = "";

        [JsonRequired]
        public string Name { get; set; } = "";

        public Guid? Uuid { get; set; }
    }

    public static void Register(RpcRegistry rpc, PassthruBdevModule module)
    {
        rpc.Register("bdev_passthru_create", r => Create(module, BdevRpc.Decode<CreateParams>(r)), RpcStates.Runtime);
        rpc.Register("bdev_passthru_delete", r => DeleteAsync(module, BdevRpc.Decode<BdevNameParams>(r).Name), RpcStates.Runtime);
    }

    private static JsonNode Create(PassthruBdevModule module, CreateParams p)
    {
        try
        {
            module.Create(p.Name, p.BaseBdevName, p.Uuid is { } u && u != Guid.Empty ? u : null);
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
            throw RpcErrno.Error(Errno.EINVAL, e, "name");
        }

        return JsonValue.Create(p.Name);
    }

    private static async Task<JsonNode?> DeleteAsync(PassthruBdevModule module, string name)
    {
        if (!await module.DeleteAsync(name).ConfigureAwait(true))
        {
            throw RpcErrno.Error(Errno.ENODEV, "name", $"no passthru bdev named {name}");
        }

        return null;
    }
}
