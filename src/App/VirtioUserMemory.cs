using VhostBackend.BdevVirtio;

namespace VhostBackend.App;

/// <summary>What a host may do to the virtio-user controllers under its bdevs (hosts reach modules only through App).</summary>
public static class VirtioUserMemory
{
    /// <summary>
    /// Re-sends the memory table of every virtio-user controller behind <paramref name="bdevs"/> (each once), as QEMU
    /// does when a guest's memory layout changes: bdevperf's --remap-memory. Returns how many were sent.
    /// </summary>
    public static int ResendMemoryTables(IEnumerable<Bdev.Bdev> bdevs)
    {
        int n = 0;
        foreach (var c in bdevs.OfType<VirtioBlkBdev>().Select(b => b.Ctrl).Distinct())
        {
            c.ResendMemoryTable();
            n++;
        }

        return n;
    }
}
