using System.Text.Json.Nodes;
using VhostBackend.Bdev;

namespace VhostBackend.BdevFile;

/// <summary>
/// The file bdev module: regular files and block devices through io_uring, created by SPDK's bdev_aio_create and
/// bdev_uring_create (one implementation for both; SPDK's module/bdev/aio and module/bdev/uring).
/// </summary>
public sealed class FileBdevModule : BdevModule
{
    private BdevManager? _bdevs;

    public override string Name => "file";

    public override void Init(BdevModuleContext context)
    {
        _bdevs = context.Bdevs;
        FileBdevRpc.Register(context.Rpc, context.Bdevs);
    }

    /// <summary><c>{"bdevs": n, "o_direct": n}</c>: the module's bdevs, and how many of them bypass the page cache.</summary>
    public override JsonObject GetStats()
    {
        long count = 0, direct = 0;
        foreach (var b in _bdevs?.All ?? [])
        {
            if (b is FileBdev f)
            {
                count++;
                direct += f.Direct ? 1 : 0;
            }
        }

        return new JsonObject { ["bdevs"] = count, ["o_direct"] = direct };
    }
}
