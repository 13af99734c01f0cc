using System.Text.Json;
using System.Text.Json.Nodes;
using VhostBackend.Bdev.Rpc;
using VhostBackend.Rpc;
using VhostBackend.Vhost.Rpc;

namespace VhostBackend.Fuzz;

/// <summary>
/// rpc-bind: the bytes a JSON-RPC client sends, through the server's <see cref="JsonStreamSplitter"/>, the
/// envelope checks the server makes (<see cref="JsonRpcServer"/>: object or batch, jsonrpc, method, params, id)
/// and the params binding of real methods: the registered handlers bind to the real parameter classes
/// (<see cref="BdevGeometryParams"/>, <see cref="VhostRpc.CreateBlkParams"/>...) exactly as the real methods do,
/// and do nothing else (no bdev or controller is created).
///
/// Input: byte 0 is the read size (1..256 bytes per receive: how the stream is cut), the rest is the stream. The
/// only exceptions a handler may throw are <see cref="RpcException"/> (an error reply); anything else is a finding.
/// Values are parsed and requests read by the server's own <see cref="JsonRpcServer.ParseValue"/> and
/// <see cref="JsonRpcServer.TryReadRequest"/>.
/// </summary>
internal sealed class RpcBindTarget : IFuzzTarget
{
    private readonly RpcRegistry _registry = new();

    public RpcBindTarget()
    {
        Bind<BdevGeometryParams>("bdev_malloc_create", BdevRpc.Decode<BdevGeometryParams>);
        Bind<BdevNameParams>("bdev_malloc_delete", BdevRpc.Decode<BdevNameParams>);
        Bind<BdevRpc.GetBdevsParams>("bdev_get_bdevs", BdevRpc.Decode<BdevRpc.GetBdevsParams>);
        Bind<BdevRpc.IostatParams>("bdev_get_iostat", BdevRpc.Decode<BdevRpc.IostatParams>);
        Bind<BdevRpc.QosParams>("bdev_set_qos_limit", BdevRpc.Decode<BdevRpc.QosParams>);
        Bind<BdevRpc.SetOptionsParams>("bdev_set_options", r => r.Bind<BdevRpc.SetOptionsParams>());
        Bind<VhostRpc.CreateBlkParams>("vhost_create_blk_controller", r => r.Bind<VhostRpc.CreateBlkParams>(RpcErrorCodes.InvalidParams, "Invalid argument", allowUnknownNames: true));
        Bind<VhostRpc.CreateScsiParams>("vhost_create_scsi_controller", r => r.Bind<VhostRpc.CreateScsiParams>());
        Bind<VhostRpc.AddTargetParams>("vhost_scsi_controller_add_target", r => r.Bind<VhostRpc.AddTargetParams>());
        Bind<VhostRpc.RemoveTargetParams>("vhost_scsi_controller_remove_target", r => r.Bind<VhostRpc.RemoveTargetParams>());
        Bind<VhostRpc.GetControllersParams>("vhost_get_controllers", r => r.Bind<VhostRpc.GetControllersParams>(RpcErrorCodes.InternalError, "Invalid argument"));
        Bind<VhostRpc.CtrlrParams>("vhost_delete_controller", r => r.Bind<VhostRpc.CtrlrParams>(RpcErrorCodes.InvalidParams, "Invalid argument"));
        Bind<VhostRpc.CoalescingParams>("vhost_controller_set_coalescing", r => r.Bind<VhostRpc.CoalescingParams>(RpcErrorCodes.InvalidParams, "Invalid argument"));
        _registry.Register("spdk_get_version", (Func<RpcRequest, JsonNode?>)(r =>
        {
            r.NoParams();
            return null;
        }));
    }

    private void Bind<T>(string method, Func<RpcRequest, T> bind)
        where T : class, new() =>
        _registry.Register(method, r => RpcRegistry.ToNode(bind(r)));

    public void Run(ReadOnlySpan<byte> input)
    {
        if (input.Length < 1)
        {
            return;
        }

        int chunk = input[0] + 1;
        input = input[1..];
        var splitter = new JsonStreamSplitter(64 * 1024, initialBuffer: 256);
        while (true)
        {
            while (true)
            {
                var r = splitter.TryNext(out var value);
                if (r == JsonStreamSplitter.Result.NeedMore)
                {
                    break;
                }

                if (r != JsonStreamSplitter.Result.Value)
                {
                    return; // the server answers a parse error and closes
                }

                HandleValue(value);
            }

            if (input.IsEmpty)
            {
                return;
            }

            var dest = splitter.GetWriteMemory().Span;
            int n = Math.Min(Math.Min(chunk, input.Length), dest.Length);
            input[..n].CopyTo(dest);
            input = input[n..];
            splitter.Advance(n);
        }
    }

    private void HandleValue(ReadOnlyMemory<byte> value)
    {
        using var doc = JsonRpcServer.ParseValue(value.Span);
        if (doc is null)
        {
            return; // the server answers a parse error and closes
        }

        var root = doc.RootElement;
        if (root.ValueKind == JsonValueKind.Object)
        {
            HandleRequest(root);
        }
        else if (root.ValueKind == JsonValueKind.Array)
        {
            foreach (var element in root.EnumerateArray())
            {
                if (element.ValueKind == JsonValueKind.Object)
                {
                    HandleRequest(element);
                }
            }
        }
    }

    /// <summary>The server's envelope rules, then the method's binding (<see cref="RpcException"/> is its error reply).</summary>
    private void HandleRequest(JsonElement request)
    {
        if (!JsonRpcServer.TryReadRequest(request, out var id, out string method, out var parameters))
        {
            _ = JsonRpcServer.ErrorReply(id, RpcErrorCodes.InvalidRequest, "Invalid request");
            return;
        }

        if (!_registry.TryGet(method, out var handler, out _))
        {
            _ = JsonRpcServer.ErrorReply(id, RpcErrorCodes.MethodNotFound, "Method not found");
            return;
        }

        try
        {
            JsonNode? result = handler(new RpcRequest(method, parameters is { ValueKind: JsonValueKind.Null } ? null : parameters)).GetAwaiter().GetResult();
            _ = result?.ToJsonString();
        }
        catch (RpcException e)
        {
            _ = JsonRpcServer.ErrorReply(id, e.Code, e.Message);
        }
    }
}
