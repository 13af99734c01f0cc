using System.Text.Json.Nodes;
using System.Text.Json.Serialization;
using VhostBackend.Platform;
using VhostBackend.Rpc;

namespace VhostBackend.Bdev.Rpc;

/// <summary>
/// The geometry parameters SPDK's RAM-like bdev modules share (malloc and null: <c>bdev_malloc_create</c>,
/// <c>bdev_null_create</c>), with their checks. Metadata and DIF are accepted by name but refused (-ENOTSUP).
/// </summary>
public class BdevGeometryParams : IRpcParams
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

    public virtual void Validate()
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

/// <summary><c>{"name": ...}</c>, the parameters of every module's delete method.</summary>
public sealed class BdevNameParams
{
    [JsonRequired]
    public string Name { get; set; } = "";
}

/// <summary>What every module's create and delete methods do the same way, with SPDK's errors.</summary>
public static class BdevCreateRpc
{
    /// <summary>
    /// Creates a bdev with <paramref name="create"/> and registers it: -EEXIST for a taken name, -EINVAL when the
    /// size overflows, -ENOMEM when it cannot be allocated. Returns the name (SPDK's result).
    /// </summary>
    public static JsonNode Register(BdevManager bdevs, string name, Func<string, Bdev> create)
    {
        if (bdevs.Find(name) is not null)
        {
            throw RpcException.Errno(Errno.EEXIST, $"Bdev name {name} already exists");
        }

        Bdev bdev;
        try
        {
            bdev = create(name);
        }
        catch (OverflowException)
        {
            throw RpcException.Errno(Errno.EINVAL, "num_blocks * block_size is too large");
        }
        catch (OutOfMemoryException)
        {
            throw RpcErrno.Error(Errno.ENOMEM, "num_blocks", "not enough memory for num_blocks * block_size");
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

    /// <summary>The first free name <paramref name="prefix"/>N (SPDK's Malloc0, Malloc1, ...).</summary>
    public static string NextName(BdevManager bdevs, string prefix)
    {
        for (int i = 0; ; i++)
        {
            if (bdevs.Find(prefix + i) is null)
            {
                return prefix + i;
            }
        }
    }

    /// <summary>Unregisters the bdev <paramref name="name"/> if this module (<typeparamref name="T"/>) owns it; -ENODEV otherwise.</summary>
    public static async Task<JsonNode?> DeleteAsync<T>(BdevManager bdevs, string name)
        where T : Bdev
    {
        if (bdevs.Find(name) is not T b)
        {
            throw RpcErrno.Error(Errno.ENODEV, "name", $"no {typeof(T).Name} named {name}");
        }

        await bdevs.UnregisterAsync(b).ConfigureAwait(true);
        return null;
    }
}
