using System.Text.Json.Nodes;
using VhostBackend.Bdev;
using VhostBackend.Rpc;

namespace VhostBackend.BdevError;

/// <summary>
/// The error-injection module (SPDK's vbdev_error): one vbdev <c>EE_&lt;base&gt;</c> per configured base. Configs are
/// module-level and keyed by the base, written whether built or waiting, with the UUID only if one was given (SPDK's
/// g_error_config). As in SPDK, a config lives as long as its vbdev: deleting the vbdev, or the removal of its base,
/// forgets it (vbdev_error_destruct removes the config).
/// </summary>
public sealed class ErrorBdevModule : VirtualBdevModule
{
    public override string Name => "error";

    /// <summary>The vbdev name for a base (SPDK: "EE_%s").</summary>
    public static string VbdevName(string baseName) => "EE_" + baseName;

    /// <summary>bdev_error_create: the vbdev, or null while its base is missing.</summary>
    public Bdev.Bdev? Create(string baseName, Guid? uuid) => AddVbdev(VbdevName(baseName), baseName, uuid);

    /// <summary>bdev_error_delete: false if no such error vbdev is configured.</summary>
    public Task<bool> DeleteAsync(string name) => DeleteVbdevAsync(name);

    protected override void InitModule(BdevModuleContext context)
    {
        context.Bdevs.Unregistering += static b =>
        {
            if (b is ErrorBdev e)
            {
                e.BeginRemoval();
            }
        };

        // Runs after the base class gave the base back (it subscribed first), so the entry is no longer built.
        context.Bdevs.Unregistered += b =>
        {
            if (b is ErrorBdev e)
            {
                _ = DeleteVbdevAsync(e.Name);
            }
        };
        ErrorBdevRpc.Register(context.Rpc, context.Bdevs, this);
    }

    protected override Bdev.Bdev CreateVbdev(Entry entry, BdevDesc baseDesc) => new ErrorBdev(entry.VbdevName, baseDesc, entry.Settings as Guid?);

    protected override JsonObject VbdevConfigCall(Entry entry)
    {
        var p = new JsonObject { ["base_name"] = entry.BaseName };
        if (entry.Settings is Guid uuid)
        {
            p["uuid"] = uuid.ToString();
        }

        return Subsystem.Call("bdev_error_create", p);
    }
}
