using System.Text.Json.Nodes;
using VhostBackend.Bdev;
using VhostBackend.Rpc;

namespace VhostBackend.BdevPassthru;

/// <summary>
/// The passthru module (SPDK's vbdev_passthru): each vbdev claims one base and forwards its I/O. Configs are
/// module-level (SPDK's <c>config_json</c> writes one <c>bdev_passthru_create</c> per vbdev, and the bdevs'
/// <c>write_config_json</c> nothing), so <see cref="VirtualBdevModule.WriteConfig"/> writes them before the bases.
/// </summary>
public sealed class PassthruBdevModule : VirtualBdevModule
{
    /// <summary>SPDK's BDEV_PASSTHRU_NAMESPACE_UUID: the namespace of a passthru vbdev's derived UUID.</summary>
    private static readonly Guid s_namespace = Guid.Parse("7e25812e-c8c0-4d3f-8599-16d790555b85");

    public override string Name => "passthru";

    /// <summary>bdev_passthru_create: the vbdev, or null while its base is missing (it is built when the base appears).</summary>
    public Bdev.Bdev? Create(string name, string baseName, Guid? uuid) => AddVbdev(name, baseName, uuid);

    /// <summary>bdev_passthru_delete: false if no such passthru vbdev is configured.</summary>
    public Task<bool> DeleteAsync(string name) => DeleteVbdevAsync(name);

    protected override void InitModule(BdevModuleContext context) => PassthruBdevRpc.Register(context.Rpc, this);

    protected override Bdev.Bdev CreateVbdev(Entry entry, BdevDesc baseDesc) =>
        new PassthruBdev(entry.VbdevName, baseDesc, entry.Settings as Guid? ?? VbdevUuid.FromBase(s_namespace, baseDesc.Bdev.Uuid));

    protected override JsonObject VbdevConfigCall(Entry entry)
    {
        var p = new JsonObject { ["base_bdev_name"] = entry.BaseName, ["name"] = entry.VbdevName };
        if ((entry.Vbdev?.Uuid ?? entry.Settings as Guid?) is { } uuid)
        {
            p["uuid"] = uuid.ToString();
        }

        return Subsystem.Call("bdev_passthru_create", p);
    }
}
