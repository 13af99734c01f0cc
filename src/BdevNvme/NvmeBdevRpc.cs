using System.Text.Json.Nodes;
using System.Text.Json.Serialization;
using VhostBackend.Bdev.Rpc;
using VhostBackend.Nvme;
using VhostBackend.Rpc;

namespace VhostBackend.BdevNvme;

/// <summary>bdev_nvme_attach_controller params (SPDK's names; PCIe only, fabrics fields are accepted and must be empty).</summary>
public sealed class AttachControllerParams : IRpcParams
{
    [JsonRequired] public string Name { get; set; } = "";
    [JsonRequired] public string Trtype { get; set; } = "";
    [JsonRequired] public string Traddr { get; set; } = "";
    public string? Adrfam { get; set; }
    public string? Trsvcid { get; set; }
    public string? Priority { get; set; }
    public string? Subnqn { get; set; }
    public string? Hostnqn { get; set; }
    public string? Hostaddr { get; set; }
    public string? Hostsvcid { get; set; }
    public bool? PrchkReftag { get; set; }
    public bool? PrchkGuard { get; set; }
    public bool? Hdgst { get; set; }
    public bool? Ddgst { get; set; }
    public string? Multipath { get; set; }
    public int? NumIoQueues { get; set; }
    public int? CtrlrLossTimeoutSec { get; set; }
    public int? ReconnectDelaySec { get; set; }
    public int? FastIoFailTimeoutSec { get; set; }

    public void Validate()
    {
        if (string.IsNullOrWhiteSpace(Name) || Name.Length > 128 || Name.Any(c => char.IsWhiteSpace(c) || c == '/'))
        {
            throw RpcException.Errno(22, "name must be a non-empty word");
        }

        if (!string.Equals(Trtype, "PCIe", StringComparison.OrdinalIgnoreCase))
        {
            throw RpcException.Errno(22, $"Failed to parse trtype: {Trtype} (only PCIe is supported)"); // SPDK: -EINVAL
        }

        if (!VfioPciDevice.TryNormalizeAddress(Traddr, out _))
        {
            throw RpcException.Errno(22, $"Failed to parse traddr: {Traddr}");
        }

        if (NumIoQueues is < 1 or > 65535)
        {
            throw RpcException.Errno(22, "num_io_queues must be between 1 and 65535");
        }
    }
}

public sealed class DetachControllerParams
{
    [JsonRequired] public string Name { get; set; } = "";
    public string? Trtype { get; set; }
    public string? Traddr { get; set; }
    public string? Adrfam { get; set; }
    public string? Trsvcid { get; set; }
    public string? Subnqn { get; set; }
    public string? Hostaddr { get; set; }
    public string? Hostsvcid { get; set; }
}

public sealed class GetControllersParams
{
    public string? Name { get; set; }
}

/// <summary>bdev_nvme_reset_controller params (SPDK's: the controller's name, optionally the cntlid of one of its paths).</summary>
public sealed class ResetControllerParams
{
    [JsonRequired] public string Name { get; set; } = "";
    public ushort? Cntlid { get; set; }
}

/// <summary>The NVMe bdev module's RPC methods (SPDK's module/bdev/nvme/bdev_nvme_rpc.c names, params and error codes).</summary>
internal static class NvmeBdevRpc
{
    /// <summary>
    /// Registers bdev_nvme_attach_controller, bdev_nvme_detach_controller, bdev_nvme_get_controllers and
    /// bdev_nvme_reset_controller on <paramref name="module"/> (called from <see cref="NvmeBdevModule.Init"/>).
    /// </summary>
    public static void Register(RpcRegistry rpc, NvmeBdevModule module)
    {
        rpc.Register("bdev_nvme_attach_controller", async r =>
        {
            var p = BdevRpc.Decode<AttachControllerParams>(r);
            var names = await module.AttachAsync(p.Name, p.Traddr, p.NumIoQueues).ConfigureAwait(true);
            var arr = new JsonArray();
            foreach (var n in names)
            {
                arr.Add(n);
            }

            return arr;
        }, RpcStates.Both);

        rpc.Register("bdev_nvme_detach_controller", async r =>
        {
            var p = BdevRpc.Decode<DetachControllerParams>(r);
            if (module.Find(p.Name) is { } c && p.Traddr is not null
                && (!VfioPciDevice.TryNormalizeAddress(p.Traddr, out var a) || a != c.TrAddr))
            {
                throw RpcException.Errno(19, $"Controller {p.Name} has no path {p.Traddr}");
            }

            await module.DetachAsync(p.Name).ConfigureAwait(true);
            return (JsonNode?)true;
        }, RpcStates.Runtime);

        rpc.Register("bdev_nvme_get_controllers", r => module.GetControllers(BdevRpc.Decode<GetControllersParams>(r).Name), RpcStates.Runtime);

        rpc.Register("bdev_nvme_reset_controller", async r =>
        {
            // Completes when the controller is reset and every channel's queue pair reconnected; no reactor waits.
            var p = BdevRpc.Decode<ResetControllerParams>(r);
            var c = module.Find(p.Name);
            if (c is null || (p.Cntlid is { } id && id != c.Controller.Data.ControllerId))
            {
                throw RpcException.Errno(19, $"Failed to find NVMe controller {p.Name}" + (p.Cntlid is { } i ? $" with cntlid {i}" : ""));
            }

            try
            {
                await c.ResetAsync().ConfigureAwait(true);
            }
            catch (IOException e)
            {
                throw RpcException.Errno(5, e.Message);
            }

            return (JsonNode?)true;
        }, RpcStates.Runtime);
    }
}
