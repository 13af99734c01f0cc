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
        var ctrls = bdevs.Select(b => b switch
        {
            VirtioBlkBdev blk => blk.Ctrl,
            VirtioScsiBdev scsi => scsi.Ctrl,
            _ => null,
        }).OfType<VirtioUserController>().Distinct();
        foreach (var c in ctrls)
        {
            c.ResendMemoryTable();
            n++;
        }

        return n;
    }
}
