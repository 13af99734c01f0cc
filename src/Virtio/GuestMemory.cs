namespace VhostBackend.Virtio;

/// <summary>One guest memory region as the front end described it, and where it is mapped here.</summary>
public readonly struct GuestMemoryRegion
{
    public GuestMemoryRegion(ulong guestPhysAddr, ulong size, ulong userAddr, ulong mmapOffset, nint host)
    {
        GuestPhysAddr = guestPhysAddr;
        Size = size;
        UserAddr = userAddr;
        MmapOffset = mmapOffset;
        Host = host;
    }

    /// <summary>Guest physical address of the first byte.</summary>
    public ulong GuestPhysAddr { get; }

    public ulong Size { get; }

    /// <summary>The front end's (QEMU's) virtual address of the first byte; ring addresses are given in this space.</summary>
    public ulong UserAddr { get; }

    /// <summary>Offset of the region inside the mapped fd.</summary>
    public ulong MmapOffset { get; }

    /// <summary>Our virtual address of the first byte (mapping base + mmap offset).</summary>
    public nint Host { get; }

    public override string ToString() => $"gpa 0x{GuestPhysAddr:x} size 0x{Size:x} uva 0x{UserAddr:x} off 0x{MmapOffset:x}";
}

/// <summary>
/// An immutable view of the guest's memory map: translates guest physical and front-end virtual addresses to
/// host pointers with bounds checks that cannot overflow. It does not own the mappings: whoever built it (the
/// vhost session) keeps them alive while any queue or request uses this view, then unmaps them.
/// Shared read-only between the protocol thread and reactors (publication by the message that hands it over).
/// </summary>
public sealed class GuestMemory
{
    private readonly GuestMemoryRegion[] _regions;

    public GuestMemory(IEnumerable<GuestMemoryRegion> regions)
    {
        _regions = regions.ToArray();
    }

    public static GuestMemory Empty { get; } = new([]);

    public IReadOnlyList<GuestMemoryRegion> Regions => _regions;

    /// <summary>Whether [start, start+size) of two regions overlap in guest-physical or user space.</summary>
    public static bool Overlaps(in GuestMemoryRegion a, in GuestMemoryRegion b) =>
        RangesOverlap(a.GuestPhysAddr, a.Size, b.GuestPhysAddr, b.Size) || RangesOverlap(a.UserAddr, a.Size, b.UserAddr, b.Size);

    private static bool RangesOverlap(ulong a, ulong alen, ulong b, ulong blen) =>
        a < b ? b - a < alen : a - b < blen;

    /// <summary>Translates a guest physical range that lies entirely inside one region.</summary>
    public bool TryTranslateGpa(ulong gpa, ulong length, out nint host)
    {
        var regions = _regions;
        for (int i = 0; i < regions.Length; i++)
        {
            ref readonly var r = ref regions[i];
            if (gpa >= r.GuestPhysAddr)
            {
                ulong off = gpa - r.GuestPhysAddr;
                if (off < r.Size && length <= r.Size - off)
                {
                    host = r.Host + (nint)off;
                    return true;
                }
            }
        }

        host = 0;
        return false;
    }

    /// <summary>
    /// Translates the longest prefix of [gpa, gpa+length) that is contiguous in one region: returns its host
    /// address and length (0 when gpa is in no region). Callers loop to split a buffer that crosses regions.
    /// </summary>
    public ulong TranslateGpaPrefix(ulong gpa, ulong length, out nint host)
    {
        var regions = _regions;
        for (int i = 0; i < regions.Length; i++)
        {
            ref readonly var r = ref regions[i];
            if (gpa >= r.GuestPhysAddr)
            {
                ulong off = gpa - r.GuestPhysAddr;
                if (off < r.Size)
                {
                    host = r.Host + (nint)off;
                    return Math.Min(length, r.Size - off);
                }
            }
        }

        host = 0;
        return 0;
    }

    /// <summary>Translates a front-end virtual range that lies entirely inside one region (ring addresses).</summary>
    public bool TryTranslateUva(ulong uva, ulong length, out nint host)
    {
        var regions = _regions;
        for (int i = 0; i < regions.Length; i++)
        {
            ref readonly var r = ref regions[i];
            if (uva >= r.UserAddr)
            {
                ulong off = uva - r.UserAddr;
                if (off < r.Size && length <= r.Size - off)
                {
                    host = r.Host + (nint)off;
                    return true;
                }
            }
        }

        host = 0;
        return false;
    }

    /// <summary>
    /// The guest-physical address of a host pointer inside one of the regions (a segment a chain walk produced):
    /// for the dirty log, which is indexed by guest-physical page. False when no region holds it.
    /// </summary>
    public bool TryHostToGpa(nint host, out ulong gpa)
    {
        var regions = _regions;
        for (int i = 0; i < regions.Length; i++)
        {
            ref readonly var r = ref regions[i];
            if (host >= r.Host && (ulong)(host - r.Host) < r.Size)
            {
                gpa = r.GuestPhysAddr + (ulong)(host - r.Host);
                return true;
            }
        }

        gpa = 0;
        return false;
    }
}
