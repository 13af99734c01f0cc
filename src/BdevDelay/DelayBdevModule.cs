using System.Text.Json.Nodes;
using VhostBackend.Bdev;
using VhostBackend.Rpc;

namespace VhostBackend.BdevDelay;

/// <summary>
/// The delay module (SPDK's vbdev_delay): vbdevs that add a configured latency to their base's reads and writes.
/// Configs are module-level (SPDK's <c>config_json</c>), written with the vbdev's current latencies and UUID.
/// </summary>
public sealed class DelayBdevModule : VirtualBdevModule
{
    /// <summary>SPDK's BDEV_DELAY_NAMESPACE_UUID: the namespace of a delay vbdev's derived UUID.</summary>
    private static readonly Guid s_namespace = Guid.Parse("4009b574-6430-4f1b-bc40-ace811091027");

    public override string Name => "delay";

    /// <summary>
    /// bdev_delay_create: the vbdev, or null while its base is missing. Throws <see cref="ArgumentException"/> when a
    /// p99 latency is below its average (SPDK's -EINVAL).
    /// </summary>
    public Bdev.Bdev? Create(string name, string baseName, Guid? uuid, DelayLatencies latencies)
    {
        if (latencies.P99ReadUs < latencies.AvgReadUs || latencies.P99WriteUs < latencies.AvgWriteUs)
        {
            throw new ArgumentException("Unable to create a delay bdev where p99 latency is less than average latency.");
        }

        return AddVbdev(name, baseName, new Settings(uuid, latencies));
    }

    /// <summary>bdev_delay_delete: false if no such delay vbdev is configured.</summary>
    public Task<bool> DeleteAsync(string name) => DeleteVbdevAsync(name);

    protected override void InitModule(BdevModuleContext context)
    {
        context.Bdevs.Unregistering += static b =>
        {
            if (b is DelayBdev d)
            {
                d.BeginRemoval();
            }
        };
        DelayBdevRpc.Register(context.Rpc, context.Bdevs, this);
    }

    protected override Bdev.Bdev CreateVbdev(Entry entry, BdevDesc baseDesc)
    {
        var s = (Settings)entry.Settings!;
        return new DelayBdev(entry.VbdevName, baseDesc, s.Uuid ?? VbdevUuid.FromBase(s_namespace, baseDesc.Bdev.Uuid), s.Latencies);
    }

    protected override JsonObject VbdevConfigCall(Entry entry)
    {
        if (entry.Vbdev is DelayBdev d)
        {
            return Subsystem.Call("bdev_delay_create", d.ConfigParams());
        }

        // Not built yet (its base is missing): the call as it was made.
        var s = (Settings)entry.Settings!;
        var p = new JsonObject { ["name"] = entry.VbdevName, ["base_bdev_name"] = entry.BaseName };
        if (s.Uuid is { } uuid)
        {
            p["uuid"] = uuid.ToString();
        }

        p["avg_read_latency"] = s.Latencies.AvgReadUs;
        p["p99_read_latency"] = s.Latencies.P99ReadUs;
        p["avg_write_latency"] = s.Latencies.AvgWriteUs;
        p["p99_write_latency"] = s.Latencies.P99WriteUs;
        return Subsystem.Call("bdev_delay_create", p);
    }

    private sealed record Settings(Guid? Uuid, DelayLatencies Latencies);
}
