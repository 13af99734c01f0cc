using VhostBackend.Platform;
using VhostBackend.Virtio;

namespace VhostBackend.VhostUser;

/// <summary>Why a memory region was refused.</summary>
public enum MemoryRegionError
{
    None = 0,

    /// <summary>Empty, or a range that wraps (see <see cref="VhostUserMemoryRegion.IsValid"/>).</summary>
    BadRange,

    /// <summary>Overlaps another region in guest-physical or front-end virtual space.</summary>
    Overlap,

    /// <summary>fstat of the region's fd failed.</summary>
    StatFailed,

    /// <summary>The mmap offset plus the size lies past the end of the region's file.</summary>
    PastEndOfFile,

    /// <summary>mmap failed.</summary>
    MapFailed,

    /// <summary>ADD_MEM_REG with every slot used.</summary>
    NoFreeSlot,

    /// <summary>REM_MEM_REG of a region that is not in the table.</summary>
    NotFound,
}

/// <summary>A mapped region: what the front end described and the mapping that backs it.</summary>
public readonly record struct MappedGuestRegion(GuestMemoryRegion Region, MappedRegion Map);

/// <summary>
/// The guest memory table of one session: the regions the front end sent (SET_MEM_TABLE, ADD_MEM_REG,
/// REM_MEM_REG), their mappings, and the immutable <see cref="GuestMemory"/> view published to queues. Every
/// region is validated before it is mapped: ranges that wrap, overlaps, and a region larger than its file
/// (fstat) are refused, so a front end cannot make us touch a mapping past the end of a file (SIGBUS).
/// Owned by the session's protocol thread. Mappings are released only when the caller says no queue uses them.
/// </summary>
public sealed class GuestMemoryTable : IDisposable
{
    private readonly List<MappedGuestRegion> _regions = new();

    public GuestMemoryTable(int maxSlots) => MaxSlots = maxSlots;

    /// <summary>Most regions ADD_MEM_REG may build up (the answer to GET_MAX_MEM_SLOTS).</summary>
    public int MaxSlots { get; }

    public int Count => _regions.Count;

    /// <summary>The current view; replaced (never mutated) by every change.</summary>
    public GuestMemory Memory { get; private set; } = GuestMemory.Empty;

    public IReadOnlyList<MappedGuestRegion> Regions => _regions;

    /// <summary>Validates and maps one region of <paramref name="fd"/> (the fd is not taken: the mapping outlives it).</summary>
    public static MemoryRegionError TryMap(in VhostUserMemoryRegion r, int fd, IReadOnlyList<MappedGuestRegion> others, out MappedGuestRegion mapped)
    {
        mapped = default;
        if (!r.IsValid)
        {
            return MemoryRegionError.BadRange;
        }

        var probe = new GuestMemoryRegion(r.GuestPhysAddr, r.MemorySize, r.UserspaceAddr, r.MmapOffset, 0);
        for (int i = 0; i < others.Count; i++)
        {
            if (GuestMemory.Overlaps(others[i].Region, probe))
            {
                return MemoryRegionError.Overlap;
            }
        }

        if (Fd.GetFileSize(fd, out long fileSize, out bool regular) != 0)
        {
            return MemoryRegionError.StatFailed;
        }

        // Only regular files (memfd, hugetlbfs, tmpfs) have a meaningful size; IsValid bounded offset + size.
        if (regular && r.MmapOffset + r.MemorySize > (ulong)fileSize)
        {
            return MemoryRegionError.PastEndOfFile;
        }

        MappedRegion map;
        try
        {
            map = MappedRegion.Map(fd, r.MemorySize + r.MmapOffset, DmaMemoryRegistry.Process); // registered for device DMA until released (after the queues drained)
        }
        catch (IOException)
        {
            return MemoryRegionError.MapFailed;
        }

        mapped = new MappedGuestRegion(new GuestMemoryRegion(r.GuestPhysAddr, r.MemorySize, r.UserspaceAddr, r.MmapOffset, map.Pointer + (nint)r.MmapOffset), map);
        return MemoryRegionError.None;
    }

    /// <summary>
    /// Maps every region of a SET_MEM_TABLE into a new list (nothing changes on failure: the mapped ones are
    /// released and the index of the refused region is returned through <paramref name="failedIndex"/>).
    /// </summary>
    public static MemoryRegionError TryMapAll(ReadOnlySpan<VhostUserMemoryRegion> regions, ReadOnlySpan<int> fds, out List<MappedGuestRegion> mapped, out int failedIndex)
    {
        mapped = new List<MappedGuestRegion>(regions.Length);
        for (int i = 0; i < regions.Length; i++)
        {
            var e = TryMap(regions[i], fds[i], mapped, out var m);
            if (e != MemoryRegionError.None)
            {
                Release(mapped);
                failedIndex = i;
                return e;
            }

            mapped.Add(m);
        }

        failedIndex = -1;
        return MemoryRegionError.None;
    }

    /// <summary>Replaces the whole table (SET_MEM_TABLE). Call once no queue uses the old view: old mappings are unmapped.</summary>
    public void ReplaceAll(List<MappedGuestRegion> regions)
    {
        Release(_regions);
        _regions.AddRange(regions);
        Publish();
    }

    /// <summary>ADD_MEM_REG: validates and maps one more region. Call with no queue running (the view changes).</summary>
    public MemoryRegionError TryAdd(in VhostUserMemoryRegion r, int fd)
    {
        if (_regions.Count >= MaxSlots)
        {
            return MemoryRegionError.NoFreeSlot;
        }

        var e = TryMap(r, fd, _regions, out var m);
        if (e == MemoryRegionError.None)
        {
            _regions.Add(m);
            Publish();
        }

        return e;
    }

    /// <summary>Index of the region with the same guest address, size and user address, or -1 (REM_MEM_REG).</summary>
    public int Find(in VhostUserMemoryRegion r)
    {
        for (int i = 0; i < _regions.Count; i++)
        {
            var x = _regions[i].Region;
            if (x.GuestPhysAddr == r.GuestPhysAddr && x.Size == r.MemorySize && x.UserAddr == r.UserspaceAddr)
            {
                return i;
            }
        }

        return -1;
    }

    /// <summary>REM_MEM_REG: removes and unmaps a region. Call with no queue running.</summary>
    public void RemoveAt(int index)
    {
        var removed = _regions[index];
        _regions.RemoveAt(index);
        Publish();
        removed.Map.Dispose();
    }

    /// <summary>Unmaps everything (session end, with every queue stopped).</summary>
    public void Dispose()
    {
        Release(_regions);
        Memory = GuestMemory.Empty;
    }

    private void Publish()
    {
        var view = new GuestMemoryRegion[_regions.Count];
        for (int i = 0; i < view.Length; i++)
        {
            view[i] = _regions[i].Region;
        }

        Memory = new GuestMemory(view);
    }

    private static void Release(List<MappedGuestRegion> regions)
    {
        foreach (var r in regions)
        {
            r.Map.Dispose();
        }

        regions.Clear();
    }
}
