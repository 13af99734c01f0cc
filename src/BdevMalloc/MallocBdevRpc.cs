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
    public sealed class CreateParams : IRpcParams
    {
        public string? Name { get; set; }

        [JsonRequired]
        public ulong NumBlocks { get; set; }

        [JsonRequired]
        public uint BlockSize { get; set; }

        public Guid? Uuid { get; set; }

        public uint OptimalIoBoundary { get; set; }

        public uint MdSize { get; set; }

        public bool MdInterleave { get; set; }

        public int DifType { get; set; }

        public bool DifIsHeadOfMd { get; set; }

        public uint PhysicalBlockSize { get; set; }

        public uint DifPiFormat { get; set; }

        public int NumaId { get; set; } = -1;

        public uint PreferredWriteAlignment { get; set; }

        public uint PreferredWriteGranularity { get; set; }

        public uint OptimalWriteSize { get; set; }

        public uint PreferredUnmapAlignment { get; set; }

        public uint PreferredUnmapGranularity { get; set; }

        public void Validate()
        {
            if (BlockSize < 512 || (BlockSize & (BlockSize - 1)) != 0 || BlockSize > 65536)
            {
                throw RpcException.Errno(Errno.EINVAL, $"block_size {BlockSize} must be a power of two between 512 and 65536");
            }

            if (NumBlocks == 0)
            {
                throw RpcException.Errno(Errno.EINVAL, "num_blocks must be greater than 0");
            }

            if (MdSize != 0 || DifType != 0)
            {
                throw RpcException.Errno(Errno.ENOTSUP, "metadata and DIF are not supported");
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
        rpc.Register("bdev_malloc_create", r => Create(bdevs, BdevRpc.Decode<CreateParams>(r)), RpcStates.Runtime);
        rpc.Register("bdev_malloc_delete", r => DeleteAsync(bdevs, BdevRpc.Decode<NameParams>(r).Name), RpcStates.Runtime);
    }

    private static JsonNode Create(BdevManager bdevs, CreateParams p)
    {
        string name = p.Name ?? NextName(bdevs, "Malloc");
        if (bdevs.Find(name) is not null)
        {
            throw RpcException.Errno(Errno.EEXIST, $"Bdev name {name} already exists");
        }

        MallocBdev bdev;
        try
        {
            bdev = new MallocBdev(name, p.NumBlocks, p.BlockSize, p.Uuid);
        }
        catch (OverflowException)
        {
            throw RpcException.Errno(Errno.EINVAL, "num_blocks * block_size is too large");
        }
        catch (OutOfMemoryException)
        {
            throw RpcErrno.Error(Errno.ENOMEM);
        }

        try
        {
            bdevs.Register(bdev);
        }
        catch (BdevExistsException e)
        {
            throw RpcException.Errno(Errno.EEXIST, e.Message);
        }

        return JsonValue.Create(name);
    }

    private static string NextName(BdevManager bdevs, string prefix)
    {
        for (int i = 0; ; i++)
        {
            if (bdevs.Find(prefix + i) is null)
            {
                return prefix + i;
            }
        }
    }

    private static async Task<JsonNode?> DeleteAsync(BdevManager bdevs, string name)
    {
        if (bdevs.Find(name) is not MallocBdev b)
        {
            throw RpcErrno.Error(Errno.ENODEV);
        }

        await bdevs.UnregisterAsync(b).ConfigureAwait(true);
        return null;
    }
}
