using System.Text.Json.Nodes;
using System.Text.Json.Serialization;
using VhostBackend.Bdev;
using VhostBackend.Bdev.Rpc;
using VhostBackend.Platform;
using VhostBackend.Rpc;

namespace VhostBackend.BdevFile;

/// <summary>
/// SPDK's aio and uring bdev methods; both create a <see cref="FileBdev"/> (io_uring underneath). Errors as SPDK:
/// a params decoding failure is -32603 "spdk_json_decode_object failed"; bdev_aio_create reports -errno
/// (-2 ENOENT, -17 EEXIST, -22 EINVAL...), bdev_uring_create any failure as -32603 "Unable to create URING bdev.".
/// </summary>
public static class FileBdevRpc
{
    public sealed class CreateParams
    {
        [JsonRequired]
        public string Name { get; set; } = "";

        [JsonRequired]
        public string Filename { get; set; } = "";

        public uint BlockSize { get; set; }

        public bool Readonly { get; set; }

        public bool Fallocate { get; set; }

        public Guid? Uuid { get; set; }

        /// <summary>SPDK's RWF_NOWAIT hint; accepted, io_uring decides on its own.</summary>
        public bool Nowait { get; set; }
    }

    /// <summary>bdev_uring_create's params (no readonly/fallocate, unlike aio).</summary>
    public sealed class UringCreateParams
    {
        [JsonRequired]
        public string Name { get; set; } = "";

        [JsonRequired]
        public string Filename { get; set; } = "";

        public uint BlockSize { get; set; }

        public Guid? Uuid { get; set; }
    }

    public static void Register(RpcRegistry rpc, BdevManager bdevs)
    {
        rpc.Register("bdev_aio_create", r => Create(bdevs, BdevRpc.Decode<CreateParams>(r), "bdev_aio_create"), RpcStates.Runtime);
        rpc.Register("bdev_uring_create", r =>
        {
            var u = BdevRpc.Decode<UringCreateParams>(r);
            try
            {
                return Create(bdevs, new CreateParams { Name = u.Name, Filename = u.Filename, BlockSize = u.BlockSize, Uuid = u.Uuid }, "bdev_uring_create");
            }
            catch (RpcException e)
            {
                throw new RpcException(RpcErrorCodes.InternalError, $"Unable to create URING bdev. ({e.Message})");
            }
        }, RpcStates.Runtime);
        rpc.Register("bdev_aio_delete", r => BdevCreateRpc.DeleteAsync<FileBdev>(bdevs, BdevRpc.Decode<BdevNameParams>(r).Name), RpcStates.Runtime);
        rpc.Register("bdev_uring_delete", r => BdevCreateRpc.DeleteAsync<FileBdev>(bdevs, BdevRpc.Decode<BdevNameParams>(r).Name), RpcStates.Runtime);
        rpc.Register("bdev_aio_rescan", (Func<RpcRequest, JsonNode?>)(r =>
        {
            var name = BdevRpc.Decode<BdevNameParams>(r).Name;
            if (bdevs.Find(name) is not FileBdev f)
            {
                throw RpcErrno.Error(Errno.ENODEV, "name", $"no file bdev named {name}");
            }

            int rc = f.Rescan();
            if (rc != 0)
            {
                throw RpcErrno.Error(-rc, "name", $"rescanning the size of {name} failed");
            }

            return null;
        }), RpcStates.Runtime);
    }

    private static JsonNode Create(BdevManager bdevs, CreateParams p, string method)
    {
        if (string.IsNullOrEmpty(p.Name) || string.IsNullOrEmpty(p.Filename))
        {
            throw RpcErrno.Error(Errno.EINVAL, string.IsNullOrEmpty(p.Name) ? "name" : "filename", "must not be empty");
        }

        if (bdevs.Find(p.Name) is not null)
        {
            throw RpcException.Errno(Errno.EEXIST, $"Bdev name {p.Name} already exists");
        }

        FileBdev bdev;
        try
        {
            bdev = FileBdev.Open(p.Name, p.Filename, p.BlockSize, p.Readonly, p.Uuid, method);
        }
        catch (FileBdevException e)
        {
            throw RpcException.Errno(e.Errno, e.Message);
        }

        try
        {
            bdevs.Register(bdev);
        }
        catch (BdevExistsException e)
        {
            bdev.Close();
            throw RpcException.Errno(Errno.EEXIST, e.Message);
        }

        return JsonValue.Create(bdev.Name);
    }
}
