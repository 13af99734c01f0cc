namespace VhostBackend.Platform;

/// <summary>
/// Told about every memory range registered for DMA and every range withdrawn (a device driver: the NVMe driver's
/// DMA space maps the range into the IOMMU). Calls come under the registry's lock, in order, never concurrently;
/// a listener must not call back into the registry.
/// </summary>
public interface IDmaMemoryListener
{
    /// <summary>[va, va+length) may now be given to devices. Returns 0 or a negative errno (the range then stays registered: users bounce it).</summary>
    int OnRegister(nint va, ulong length);

    /// <summary>[va, va+length) is withdrawn: no device may touch it after this returns (the owner unmaps it next).</summary>
    void OnUnregister(nint va, ulong length);
}

/// <summary>
/// The process-wide registry of memory that may be the target of device DMA (SPDK's <c>spdk_mem_register</c> and
/// mem maps with their notify callbacks): the owners of memory (vhost guest memory regions, virtio-user shared
/// memory) register a mapping when they map it and unregister it before they unmap it, after the queues using
/// it drained; the device drivers subscribe and map/unmap their IOMMU. This keeps the layers apart: vhost knows
/// no NVMe driver, the driver knows no vhost.
/// <para>
/// Ranges are page aligned. Registering the same range again adds a reference (two owners of one mapping); a range
/// that partly overlaps a registered one is refused (-EEXIST). The listeners hear of a range once, on its first
/// registration, and of its removal once, when its last reference goes. A new listener is told about every range
/// registered before it subscribed.
/// </para>
/// <para>Threading: control plane only (a lock); nothing here is on an I/O path.</para>
/// </summary>
public sealed class DmaMemoryRegistry
{
    /// <summary>Page granularity of registrations.</summary>
    public const ulong PageSize = 4096;

    private readonly object _lock = new();
    private readonly List<Entry> _entries = new();
    private readonly List<IDmaMemoryListener> _listeners = new();

    private sealed class Entry
    {
        public nint Va;
        public ulong Length;
        public int Refs;
    }

    /// <summary>The registry of this process (what the daemon's layers share).</summary>
    public static DmaMemoryRegistry Process { get; } = new();

    /// <summary>Registered ranges (distinct, whatever their reference counts).</summary>
    public int Count
    {
        get
        {
            lock (_lock)
            {
                return _entries.Count;
            }
        }
    }

    public int ListenerCount
    {
        get
        {
            lock (_lock)
            {
                return _listeners.Count;
            }
        }
    }

    /// <summary>Rounds a mapping's length up to whole pages (a mapping of a non-multiple length still covers whole pages).</summary>
    public static ulong PageAlign(ulong length) => length > ulong.MaxValue - (PageSize - 1) ? 0 : (length + PageSize - 1) & ~(PageSize - 1);

    /// <summary>
    /// Registers [va, va+length) (both page aligned, no wrap). Returns 0 (first registration: the listeners were told;
    /// or another reference to the same range), -EINVAL (bad range) or -EEXIST (overlaps a different registered range).
    /// </summary>
    public int Register(nint va, ulong length)
    {
        if (!IsValidRange(va, length))
        {
            return -Errno.EINVAL;
        }

        lock (_lock)
        {
            foreach (var e in _entries)
            {
                if (e.Va == va && e.Length == length)
                {
                    e.Refs++;
                    return 0;
                }

                if (Overlaps(e.Va, e.Length, va, length))
                {
                    return -Errno.EEXIST;
                }
            }

            _entries.Add(new Entry { Va = va, Length = length, Refs = 1 });
            foreach (var l in _listeners)
            {
                l.OnRegister(va, length); // a listener that cannot map it reports nothing to the owner: users bounce
            }

            return 0;
        }
    }

    /// <summary>
    /// Drops a reference to [va, va+length); the last one withdraws it from every listener before this returns (the
    /// caller unmaps it afterwards). Returns 0 or -ENOENT (not registered with exactly this range).
    /// </summary>
    public int Unregister(nint va, ulong length)
    {
        lock (_lock)
        {
            for (int i = 0; i < _entries.Count; i++)
            {
                var e = _entries[i];
                if (e.Va != va || e.Length != length)
                {
                    continue;
                }

                if (--e.Refs > 0)
                {
                    return 0;
                }

                _entries.RemoveAt(i);
                foreach (var l in _listeners)
                {
                    l.OnUnregister(va, length);
                }

                return 0;
            }

            return -Errno.ENOENT;
        }
    }

    /// <summary>References held on exactly [va, va+length) (0 when not registered).</summary>
    public int References(nint va, ulong length)
    {
        lock (_lock)
        {
            foreach (var e in _entries)
            {
                if (e.Va == va && e.Length == length)
                {
                    return e.Refs;
                }
            }

            return 0;
        }
    }

    /// <summary>
    /// Adds a listener and tells it about every range registered so far. Disposing the result removes it and
    /// withdraws every range from it (it must not touch them afterwards).
    /// </summary>
    public IDisposable Subscribe(IDmaMemoryListener listener)
    {
        ArgumentNullException.ThrowIfNull(listener);
        lock (_lock)
        {
            if (_listeners.Contains(listener))
            {
                throw new InvalidOperationException("listener already subscribed");
            }

            _listeners.Add(listener);
            foreach (var e in _entries)
            {
                listener.OnRegister(e.Va, e.Length);
            }
        }

        return new Subscription(this, listener);
    }

    private void Unsubscribe(IDmaMemoryListener listener)
    {
        lock (_lock)
        {
            if (!_listeners.Remove(listener))
            {
                return;
            }

            foreach (var e in _entries)
            {
                listener.OnUnregister(e.Va, e.Length);
            }
        }
    }

    private static bool IsValidRange(nint va, ulong length) =>
        va != 0 && length != 0 && (ulong)va % PageSize == 0 && length % PageSize == 0 && (ulong)va + length > (ulong)va;

    private static bool Overlaps(nint a, ulong alen, nint b, ulong blen) =>
        (ulong)a < (ulong)b ? (ulong)b - (ulong)a < alen : (ulong)a - (ulong)b < blen;

    private sealed class Subscription(DmaMemoryRegistry registry, IDmaMemoryListener listener) : IDisposable
    {
        private int _disposed;

        public void Dispose()
        {
            if (Interlocked.Exchange(ref _disposed, 1) == 0)
            {
                registry.Unsubscribe(listener);
            }
        }
    }
}
