using System.Text.Json.Nodes;
using System.Text.Json.Serialization;
using VhostBackend.Bdev;
using VhostBackend.Bdev.Rpc;
using VhostBackend.Platform;
using VhostBackend.Rpc;

namespace VhostBackend.BdevError;

/// <summary>
/// bdev_error_create, bdev_error_delete and bdev_error_inject_error as in SPDK v24.01's vbdev_error_rpc.c: a decoding
/// failure, an io_type outside read|write|flush|unmap|all|clear or an error_type outside
/// failure|pending|corrupt_data|nomem is -32603 "spdk_json_decode_object failed"; create answers true (-EEXIST when
/// the base has an error vbdev already, -EPERM for a claimed base); inject answers -EINVAL for corrupt_data with a
/// zero corrupt_value, -ENODEV for a name that is not an error vbdev.
/// </summary>
public static class ErrorBdevRpc
{
    public sealed class CreateParams
    {
        [JsonRequired]
        public string BaseName { get; set; } = "";

        public Guid? Uuid { get; set; }
    }

    public sealed class InjectParams
    {
        [JsonRequired]
        public string Name { get; set; } = "";

        [JsonRequired]
        public string IoType { get; set; } = "";

        [JsonRequired]
        public string ErrorType { get; set; } = "";

        public uint Num { get; set; } = 1;

        public ulong QueueDepth { get; set; }

        public ulong CorruptOffset { get; set; }

        public byte CorruptValue { get; set; }
    }

    public static void Register(RpcRegistry rpc, BdevManager bdevs, ErrorBdevModule module)
    {
        rpc.Register("bdev_error_create", r => Create(module, BdevRpc.Decode<CreateParams>(r)), RpcStates.Runtime);
        rpc.Register("bdev_error_delete", r => DeleteAsync(module, BdevRpc.Decode<BdevNameParams>(r).Name), RpcStates.Runtime);
        rpc.Register("bdev_error_inject_error", r => Inject(bdevs, BdevRpc.Decode<InjectParams>(r)), RpcStates.Runtime);
    }

    private static JsonNode? Create(ErrorBdevModule module, CreateParams p)
    {
        try
        {
            module.Create(p.BaseName, p.Uuid is { } u && u != Guid.Empty ? u : null);
        }
        catch (BdevExistsException e)
        {
            throw RpcErrno.Error(Errno.EEXIST, "base_name", e.Message);
        }
        catch (BdevClaimException e)
        {
            throw RpcErrno.Error(e.Errno, "base_name", e.Message);
        }
        catch (ArgumentException e)
        {
            throw RpcErrno.Error(Errno.EINVAL, e, "uuid");
        }

        return null;
    }

    private static async Task<JsonNode?> DeleteAsync(ErrorBdevModule module, string name)
    {
        if (!await module.DeleteAsync(name).ConfigureAwait(true))
        {
            throw RpcErrno.Error(Errno.ENODEV, "name", $"no error bdev named {name}");
        }

        return null;
    }

    private static JsonNode? Inject(BdevManager bdevs, InjectParams p)
    {
        // SPDK decodes io_type and error_type with custom decoders: an unknown word fails the whole decode.
        BdevIoType? ioType = null;
        bool all = false, clear = false;
        switch (p.IoType)
        {
            case "read": ioType = BdevIoType.Read; break;
            case "write": ioType = BdevIoType.Write; break;
            case "flush": ioType = BdevIoType.Flush; break;
            case "unmap": ioType = BdevIoType.Unmap; break;
            case "all": all = true; break;
            case "clear": clear = true; break;
            default: throw DecodeFailed();
        }

        var errorType = p.ErrorType switch
        {
            "failure" => ErrorType.Failure,
            "pending" => ErrorType.Pending,
            "corrupt_data" => ErrorType.CorruptData,
            "nomem" => ErrorType.NoMemory,
            _ => throw DecodeFailed(),
        };

        if (errorType == ErrorType.CorruptData && p.CorruptValue == 0)
        {
            throw RpcErrno.Error(Errno.EINVAL, "corrupt_value", "corrupt_value should be non-zero (XOR with 0 corrupts nothing)");
        }

        if (bdevs.Find(p.Name) is not ErrorBdev b)
        {
            throw RpcErrno.Error(Errno.ENODEV, "name", $"no error bdev named {p.Name}");
        }

        if (clear)
        {
            b.ClearInjections();
        }
        else
        {
            b.Inject(all ? null : ioType, errorType, p.Num, p.QueueDepth, p.CorruptOffset, p.CorruptValue);
        }

        return null;
    }

    private static RpcException DecodeFailed() => new(RpcErrorCodes.InternalError, BdevRpc.DecodeFailed);
}
