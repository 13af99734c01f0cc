namespace VhostBackend.Platform;

/// <summary>
/// Process memory for I/O buffers that can be shared with another process: one sparse memfd mapping (pages are
/// allocated on first touch), carved into aligned blocks. A vhost-user front end hands the memfd to its back end
/// in SET_MEM_TABLE, so buffers allocated here travel by address, not by copy (SPDK's env memory plays this role
/// for its virtio-user driver). Allocation is a control-plane operation (a lock); the data path only calls
/// <see cref="TryTranslate"/>, which is lock-free.
/// </summary>
public sealed class SharedMemoryArena : IDisposable
{
    private readonly MappedRegion _map;
    private readonly Dictionary<ulong, Stack<nint>> _freeBySize = new();
    private readonly Dictionary<nint, ulong> _sizes = new();
    private ulong _next;

    private SharedMemoryArena(string name, ulong size)
    {
        // Sealed (back ends can trust its size), 2 MiB-aligned in size and address, huge pages when enough are free
        // (see MappedRegion.CreateShared: SPDK's vhost target wants that layout).
        _map = MappedRegion.CreateShared(name, size, out int fd, out bool hugePages, DmaMemoryRegistry.Process); // device DMA may target its buffers
        Fd = fd;
        HugePages = hugePages;
        Size = _map.Length;
    }

    /// <summary>
    /// Creates an arena of at least <paramref name="size"/> bytes (rounded up to 2 MiB; virtual with an ordinary
    /// memfd, memory being committed as it is touched; reserved whole when huge pages back it).
    /// </summary>
    public static SharedMemoryArena Create(string name, ulong size)
    {
        ArgumentOutOfRangeException.ThrowIfZero(size);
        return new SharedMemoryArena(name, size);
    }

    /// <summary>Whether the arena lives in huge pages (reserved whole at creation) rather than a sparse memfd.</summary>
    public bool HugePages { get; }

    /// <summary>The memfd backing the arena (offset 0 = <see cref="Base"/>).</summary>
    public int Fd { get; }

    public nint Base => _map.Pointer;

    public ulong Size { get; }

    /// <summary>
    /// Allocates <paramref name="size"/> bytes aligned to <paramref name="alignment"/> (a power of two, at most 4096).
    /// Throws <see cref="OutOfMemoryException"/> when the arena is exhausted.
    /// </summary>
    public nint Allocate(ulong size, ulong alignment = 4096)
    {
        ArgumentOutOfRangeException.ThrowIfZero(size);
        if (alignment == 0 || alignment > 4096 || (alignment & (alignment - 1)) != 0)
        {
            throw new ArgumentOutOfRangeException(nameof(alignment), "alignment must be a power of two up to 4096");
        }

        // Blocks are page-size classes, so any alignment up to a page holds and freed blocks are reusable.
        ulong rounded = (size + 4095) & ~4095UL;
        lock (_sizes)
        {
            if (_freeBySize.TryGetValue(rounded, out var stack) && stack.Count > 0)
            {
                return stack.Pop();
            }

            if (rounded > Size - _next)
            {
                throw new OutOfMemoryException($"shared memory arena exhausted ({Size >> 20} MiB): cannot allocate {size} bytes");
            }

            nint p = Base + (nint)_next;
            _next += rounded;
            _sizes[p] = rounded;
            return p;
        }
    }

    /// <summary>Returns a block to the arena. Throws if <paramref name="p"/> was not allocated here.</summary>
    public void Free(nint p)
    {
        lock (_sizes)
        {
            if (!_sizes.TryGetValue(p, out ulong size))
            {
                throw new ArgumentException("pointer was not allocated from this arena", nameof(p));
            }

            if (!_freeBySize.TryGetValue(size, out var stack))
            {
                _freeBySize[size] = stack = new Stack<nint>();
            }

            stack.Push(p);
        }
    }

    /// <summary>The offset of [p, p+length) in the arena, if it lies entirely inside.</summary>
    public bool TryTranslate(nint p, ulong length, out ulong offset)
    {
        offset = (ulong)(p - Base);
        return p >= Base && offset <= Size && length <= Size - offset;
    }

    public void Dispose()
    {
        _map.Dispose();
        VhostBackend.Platform.Fd.Close(Fd);
    }
}
