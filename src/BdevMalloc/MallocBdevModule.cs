using System.Text.Json.Nodes;
using VhostBackend.Bdev;

namespace VhostBackend.BdevMalloc;

/// <summary>The malloc bdev module (SPDK's module/bdev/malloc): RAM disks created by bdev_malloc_create.</summary>
public sealed class MallocBdevModule : BdevModule
{
    private BdevManager? _bdevs;

    public override string Name => "malloc";

    public override void Init(BdevModuleContext context)
    {
        _bdevs = context.Bdevs;
        MallocBdevRpc.Register(context.Rpc, context.Bdevs);
    }

    /// <summary><c>{"bdevs": n, "bytes_allocated": n}</c>: the module's bdevs and the memory they hold.</summary>
    public override JsonObject GetStats()
    {
        long count = 0;
        ulong bytes = 0;
        foreach (var b in _bdevs?.All ?? [])
        {
            if (b is MallocBdev m)
            {
                count++;
                bytes += m.SizeBytes;
            }
        }

        return new JsonObject { ["bdevs"] = count, ["bytes_allocated"] = bytes };
    }
}
