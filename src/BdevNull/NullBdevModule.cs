using System.Text.Json.Nodes;
using VhostBackend.Bdev;

namespace VhostBackend.BdevNull;

/// <summary>The null bdev module (SPDK's module/bdev/null): bdevs that discard writes, created by bdev_null_create.</summary>
public sealed class NullBdevModule : BdevModule
{
    private BdevManager? _bdevs;

    public override string Name => "null";

    public override void Init(BdevModuleContext context)
    {
        _bdevs = context.Bdevs;
        NullBdevRpc.Register(context.Rpc, context.Bdevs);
    }

    /// <summary><c>{"bdevs": n}</c>: the module's bdevs.</summary>
    public override JsonObject GetStats()
    {
        long count = 0;
        foreach (var b in _bdevs?.All ?? [])
        {
            if (b is NullBdev)
            {
                count++;
            }
        }

        return new JsonObject { ["bdevs"] = count };
    }
}
