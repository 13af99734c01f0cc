namespace VhostBackend.Architecture.Tests;

/// <summary>
/// The rules of the layer graph that hold whatever the table in docs/ARCHITECTURE.md says (loosening the table
/// does not loosen these). Checked on the transitive closure: "reaches" means through any path.
/// </summary>
public static class LayerRules
{
    private static readonly string[] Hosts = ["Daemon", "BdevPerf"];
    private static readonly string[] Bridges = ["Vhost", "BdevVirtio"];

    /// <summary>Bdev modules: Bdev&lt;Name&gt; projects (the bdev core is "Bdev" itself).</summary>
    public static bool IsBdevModule(string p) => p.StartsWith("Bdev", StringComparison.Ordinal) && p.Length > 4 && p != "BdevPerf";

    public static List<string> Violations(IReadOnlyDictionary<string, SortedSet<string>> graph)
    {
        var errors = new List<string>();
        var reach = graph.Keys.ToDictionary(p => p, p => LayerGraph.Reach(graph, p), StringComparer.Ordinal);
        SortedSet<string> R(string p) => reach.TryGetValue(p, out var r) ? r : [];

        void Only(string from, params string[] allowed)
        {
            foreach (string t in R(from).Where(t => !allowed.Contains(t)))
            {
                errors.Add($"{from} reaches {t}: it may reach only {(allowed.Length == 0 ? "nothing" : string.Join(", ", allowed))}");
            }
        }

        void Never(string from, Func<string, bool> forbidden, string why)
        {
            foreach (string t in R(from).Where(forbidden))
            {
                errors.Add($"{from} reaches {t}: {why}");
            }
        }

        Only("Platform");
        Only("Cli");
        Only("Reactors", "Platform");
        Only("Nvme", "Platform");                       // the NVMe driver knows neither threads nor bdevs
        Only("Virtio", "Platform");                     // rings and guest memory: no vhost, bdev, scsi, reactor
        Only("VhostUser", "Virtio", "Platform");        // the protocol layer: no bdev, scsi, reactor
        Only("Rpc", "Reactors", "Platform");
        Never("Bdev", p => IsBdevModule(p) || p is "Vhost" or "VhostUser" or "Virtio" or "Scsi" or "Nvme" or "App",
            "the bdev core reaches no module, device or driver");
        Never("Scsi", p => IsBdevModule(p) || p is "Vhost" or "VhostUser" or "Virtio" or "Nvme" or "App",
            "SCSI emulation sits on the bdev layer only");
        foreach (string m in graph.Keys.Where(IsBdevModule))
        {
            Never(m, p => IsBdevModule(p) || p is "Vhost" or "App" or "Scsi",
                "a bdev module reaches no other module, no device back end and no application");
        }
        // Only device back ends bridge the vhost/virtio side and the bdev/scsi side.
        foreach (var (p, r) in reach)
        {
            bool virtioSide = r.Contains("VhostUser") || r.Contains("Virtio") || p is "VhostUser" or "Virtio";
            bool blockSide = r.Contains("Bdev") || r.Contains("Scsi") || p is "Bdev" or "Scsi";
            if (virtioSide && blockSide && !Bridges.Contains(p) && !Hosts.Contains(p) && p != "App")
            {
                errors.Add($"{p} bridges vhost/virtio and bdev/scsi: only {string.Join(", ", Bridges)} may");
            }
        }
        // Only the hosts reach the application framework; hosts are thin (App plus the primitives they configure).
        foreach (string p in graph.Keys.Where(p => R(p).Contains("App") && !Hosts.Contains(p)))
        {
            errors.Add($"{p} reaches App: only the hosts ({string.Join(", ", Hosts)}) may");
        }
        foreach (string h in Hosts)
        {
            if (graph.TryGetValue(h, out var direct))
            {
                foreach (string t in direct.Where(t => t is not ("App" or "Platform" or "Reactors" or "Rpc" or "Bdev")))
                {
                    errors.Add($"host {h} references {t} directly: hosts reach modules and devices only through App");
                }
            }
        }
        return errors;
    }
}
