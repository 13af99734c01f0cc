using System.Text.Json.Nodes;
using System.Text.Json.Serialization;
using VhostBackend.Platform;
using VhostBackend.Rpc;
using VhostBackend.Vhost.Blk;
using VhostBackend.Vhost.Scsi;

namespace VhostBackend.Vhost.Rpc;

/// <summary>
/// The vhost RPC methods, with SPDK's names, params and errors (lib/vhost/vhost_rpc.c): failures of create,
/// delete and set_coalescing (params decoding included) are Invalid params (-32602) carrying strerror of the
/// errno ("File exists", "No such device"...); vhost_get_controllers fails (unknown name, bad params) with an
/// internal error (-32603). vhost_create_blk_controller decodes relaxed: unknown names are ignored (SPDK passes
/// them on to the transport).
/// </summary>
public static class VhostRpc
{
    public static void Register(RpcRegistry registry, VhostManager manager, SubsystemRegistry? subsystems = null)
    {
        registry.Register("vhost_create_blk_controller", r => CreateBlk(manager, r));
        registry.Register("vhost_get_controllers", r => GetControllers(manager, r));
        registry.Register("vhost_delete_controller", r => DeleteAsync(manager, r));
        registry.Register("vhost_controller_set_coalescing", r => SetCoalescingAsync(manager, r));
        registry.Register("vhost_create_scsi_controller", r => CreateScsi(manager, r));
        registry.Register("vhost_scsi_controller_add_target", r => AddTarget(manager, r));
        registry.Register("vhost_scsi_controller_remove_target", r => RemoveTargetAsync(manager, r));
        registry.Register("vhost_start_scsi_controller", r => StartScsi(manager, r));
        subsystems?.Add(new Subsystem("vhost_scsi", () => WriteConfig(manager, "vhost_scsi"), "bdev"));
        subsystems?.Add(new Subsystem("vhost_blk", () => WriteConfig(manager, "vhost_blk"), "bdev"));
    }

    /// <summary>A vhost subsystem's save_config: the calls that recreate each controller whose <see cref="VhostController.TypeName"/> is <paramref name="typeName"/>.</summary>
    public static JsonArray WriteConfig(VhostManager manager, string typeName)
    {
        var calls = new JsonArray();
        foreach (var c in manager.Controllers)
        {
            if (c.TypeName != typeName)
            {
                continue;
            }

            foreach (var call in c.ConfigCalls())
            {
                calls.Add(call);
            }
        }

        return calls;
    }

    /// <summary>SPDK's reply (Invalid params, strerror) with the parameter at fault and the reason appended.</summary>
    private static RpcException Error(VhostException e) =>
        new(RpcErrorCodes.InvalidParams, e.Param is { } param
            ? $"{Native.StrError(e.Errno)}: {param}: {e.Message}"
            : $"{Native.StrError(e.Errno)}: {e.Message}");

    private static JsonNode? CreateBlk(VhostManager manager, RpcRequest request)
    {
        var p = request.Bind<CreateBlkParams>(RpcErrorCodes.InvalidParams, Native.StrError(Errno.EINVAL), allowUnknownNames: true);
        try
        {
            manager.CreateBlkController(p.Ctrlr, p.DevName, p.Cpumask, p.Readonly, p.Client, p.PackedRing);
        }
        catch (VhostException e)
        {
            throw Error(e);
        }

        return true;
    }

    private static JsonNode? CreateScsi(VhostManager manager, RpcRequest request)
    {
        var p = request.Bind<CreateScsiParams>();
        try
        {
            manager.CreateScsiController(p.Ctrlr, p.Cpumask, p.Client, p.Delay);
        }
        catch (VhostException e)
        {
            throw Error(e);
        }

        return true;
    }

    private static JsonNode? StartScsi(VhostManager manager, RpcRequest request)
    {
        var p = request.Bind<CtrlrParams>();
        try
        {
            manager.StartScsiController(p.Ctrlr);
        }
        catch (VhostException e)
        {
            throw Error(e);
        }

        return true;
    }

    private static JsonNode? AddTarget(VhostManager manager, RpcRequest request)
    {
        var p = request.Bind<AddTargetParams>();
        try
        {
            return manager.AddScsiTarget(p.Ctrlr, p.ScsiTargetNum, p.BdevName, p.Readonly);
        }
        catch (VhostException e)
        {
            throw Error(e);
        }
    }

    private static async Task<JsonNode?> RemoveTargetAsync(VhostManager manager, RpcRequest request)
    {
        var p = request.Bind<RemoveTargetParams>();
        try
        {
            await manager.RemoveScsiTargetAsync(p.Ctrlr, (int)Math.Min(p.ScsiTargetNum, int.MaxValue)).ConfigureAwait(true);
        }
        catch (VhostException e)
        {
            throw Error(e);
        }

        return true;
    }

    private static JsonNode? GetControllers(VhostManager manager, RpcRequest request)
    {
        var p = request.Bind<GetControllersParams>(RpcErrorCodes.InternalError, Native.StrError(Errno.EINVAL));
        var result = new JsonArray();
        if (p.Name is not null)
        {
            var c = manager.Find(p.Name) ?? throw new RpcException(RpcErrorCodes.InternalError, $"{Native.StrError(Errno.ENODEV)}: name: no vhost controller {p.Name}");
            result.Add(c.ToJson());
            return result;
        }

        foreach (var c in manager.Controllers)
        {
            result.Add(c.ToJson());
        }

        return result;
    }

    private static async Task<JsonNode?> DeleteAsync(VhostManager manager, RpcRequest request)
    {
        var p = request.Bind<CtrlrParams>(RpcErrorCodes.InvalidParams, Native.StrError(Errno.EINVAL));
        try
        {
            await manager.DeleteControllerAsync(p.Ctrlr).ConfigureAwait(true);
        }
        catch (VhostException e)
        {
            throw Error(e);
        }

        return true;
    }

    private static async Task<JsonNode?> SetCoalescingAsync(VhostManager manager, RpcRequest request)
    {
        var p = request.Bind<CoalescingParams>(RpcErrorCodes.InvalidParams, Native.StrError(Errno.EINVAL));
        var c = manager.Find(p.Ctrlr) ?? throw new RpcException(RpcErrorCodes.InvalidParams, $"{Native.StrError(Errno.ENODEV)}: ctrlr: vhost controller {p.Ctrlr} does not exist");
        try
        {
            await c.SetCoalescingAsync(p.DelayBaseUs, p.IopsThreshold).ConfigureAwait(true);
        }
        catch (VhostException e)
        {
            throw Error(e);
        }

        return true;
    }

    public sealed class CreateBlkParams : IRpcParams
    {
        [JsonRequired]
        public string Ctrlr { get; set; } = "";

        [JsonRequired]
        public string DevName { get; set; } = "";

        public string? Cpumask { get; set; }

        public bool Readonly { get; set; }

        public bool PackedRing { get; set; }

        /// <summary>Our extension: connect to a socket the front end listens on (QEMU <c>server=on</c>), retrying.</summary>
        public bool Client { get; set; }

        public string? Transport { get; set; }

        public void Validate()
        {
            if (Transport is not null && !string.Equals(Transport, "vhost_user_blk", StringComparison.OrdinalIgnoreCase))
            {
                throw RpcException.InvalidParams($"{Native.StrError(Errno.EINVAL)}: transport: '{Transport}' is not a vhost-blk transport (vhost_user_blk)");
            }
        }
    }

    public sealed class CreateScsiParams
    {
        [JsonRequired]
        public string Ctrlr { get; set; } = "";

        public string? Cpumask { get; set; }

        /// <summary>SPDK: create without listening; vhost_start_scsi_controller starts it (after its targets are added).</summary>
        public bool Delay { get; set; }

        /// <summary>Our extension: connect to a socket the front end listens on (QEMU <c>server=on</c>), retrying.</summary>
        public bool Client { get; set; }
    }

    public sealed class AddTargetParams
    {
        [JsonRequired]
        public string Ctrlr { get; set; } = "";

        [JsonRequired]
        public int ScsiTargetNum { get; set; }

        [JsonRequired]
        public string BdevName { get; set; } = "";

        /// <summary>Our extension (SPDK has no read-only SCSI targets): LUN 0 refuses writes.</summary>
        public bool Readonly { get; set; }
    }

    public sealed class RemoveTargetParams
    {
        [JsonRequired]
        public string Ctrlr { get; set; } = "";

        [JsonRequired]
        public uint ScsiTargetNum { get; set; }
    }

    public sealed class GetControllersParams
    {
        public string? Name { get; set; }
    }

    public sealed class CtrlrParams
    {
        [JsonRequired]
        public string Ctrlr { get; set; } = "";
    }

    public sealed class CoalescingParams
    {
        [JsonRequired]
        public string Ctrlr { get; set; } = "";

        [JsonRequired]
        public uint DelayBaseUs { get; set; }

        [JsonRequired]
        public uint IopsThreshold { get; set; }
    }
}
