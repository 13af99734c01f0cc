using System.Text.Json.Nodes;
using System.Text.Json.Serialization;
using VhostBackend.Rpc;

namespace VhostBackend.Bdev.Modules.File;

/// <summary>SPDK's aio and uring bdev methods; both create a <see cref="FileBdev"/> (io_uring underneath).</summary>
public static class FileBdevRpc
{
    public sealed class CreateParams : IRpcParams
    {
        [JsonRequired]
        public string Name { get; set; } = "";

        [JsonRequired]
        public string Filename { get; set; } = "";

        public uint BlockSize { get; set; }

        public bool Readonly { get; set; }

        public bool Fallocate { get; set; }

        public string? Uuid { get; set; }

        public void Validate()
        {
            if (string.IsNullOrEmpty(Name) || string.IsNullOrEmpty(Filename))
            {
                throw RpcException.InvalidParams("Invalid parameters: name and filename must not be empty");
            }

            if (Uuid is not null && !Guid.TryParse(Uuid, out _))
            {
                throw RpcException.InvalidParams($"Invalid parameters: uuid '{Uuid}' is not a UUID");
            }
        }
    }

    public sealed class NameParams
    {
        [JsonRequired]
        public string Name { get; set; } = "";
    }

    public static void Register(RpcRegistry rpc, BdevManager bdevs)
    {
        rpc.Register("bdev_aio_create", r => Create(bdevs, r.Bind<CreateParams>(), "bdev_aio_create"), RpcStates.Runtime);
        rpc.Register("bdev_uring_create", r => Create(bdevs, r.Bind<CreateParams>(), "bdev_uring_create"), RpcStates.Runtime);
        rpc.Register("bdev_aio_delete", r => DeleteAsync(bdevs, r.Bind<NameParams>().Name), RpcStates.Runtime);
        rpc.Register("bdev_uring_delete", r => DeleteAsync(bdevs, r.Bind<NameParams>().Name), RpcStates.Runtime);
        rpc.Register("bdev_aio_rescan", (Func<RpcRequest, JsonNode?>)(r =>
        {
            var name = r.Bind<NameParams>().Name;
            if (bdevs.Find(name) is not FileBdev f)
            {
                throw RpcErrno.Error(RpcErrno.ENODEV);
            }

            int rc = f.Rescan();
            if (rc != 0)
            {
                throw RpcErrno.Error(-rc);
            }

            return null;
        }), RpcStates.Runtime);
    }

    private static JsonNode Create(BdevManager bdevs, CreateParams p, string method)
    {
        if (bdevs.Find(p.Name) is not null)
        {
            throw RpcException.Errno(RpcErrno.EEXIST, $"Bdev name {p.Name} already exists");
        }

        FileBdev bdev;
        try
        {
            bdev = FileBdev.Open(p.Name, p.Filename, p.BlockSize, p.Readonly, p.Uuid is null ? null : Guid.Parse(p.Uuid), method);
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
            bdev.DestructAsync().AsTask().Wait();
            throw RpcException.Errno(RpcErrno.EEXIST, e.Message);
        }

        return JsonValue.Create(bdev.Name);
    }

    private static async Task<JsonNode?> DeleteAsync(BdevManager bdevs, string name)
    {
        if (bdevs.Find(name) is not FileBdev f)
        {
            throw RpcErrno.Error(RpcErrno.ENODEV);
        }

        await bdevs.UnregisterAsync(f).ConfigureAwait(true);
        return null;
    }
}
