using VhostBackend.Platform;
using VhostBackend.Virtio;

namespace VhostBackend.VhostUser;

/// <summary>
/// A session's in-flight tracking buffer (GET/SET_INFLIGHT_FD): one region per queue, laid end to end in a memfd
/// (<see cref="InflightQueue"/>'s split layout, or <see cref="InflightPackedQueue"/>'s packed one when the session
/// negotiated VIRTIO_F_RING_PACKED: the stride is the layout's region size, as DPDK lays them out) the front end keeps across our restarts. Created by us on GET_INFLIGHT_FD (sealed
/// against shrinking, zeroed), or mapped from the fd a front end hands back with SET_INFLIGHT_FD after checking
/// that the file really holds the size it declares. Unmapped on dispose, only after every queue using it stopped.
/// </summary>
public sealed class InflightBuffer : IDisposable
{
    private readonly MappedRegion _map;
    private readonly ulong _offset;

    private InflightBuffer(MappedRegion map, ulong offset, ushort numQueues, ushort queueSize, ulong size)
    {
        _map = map;
        _offset = offset;
        NumQueues = numQueues;
        QueueSize = queueSize;
        Size = size;
    }

    public ushort NumQueues { get; }
    public ushort QueueSize { get; }
    public ulong Size { get; }

    /// <summary>
    /// Creates a fresh, zeroed buffer for GET_INFLIGHT_FD sized for the ring layout (QEMU sends SET_FEATURES before
    /// it, so the layout is known); <paramref name="fd"/> is ours to send and then close.
    /// </summary>
    public static InflightBuffer Create(ushort numQueues, ushort queueSize, bool packed, out int fd)
    {
        ulong size = numQueues * (packed ? InflightPackedQueue.RegionBytes(queueSize) : InflightQueue.RegionBytes(queueSize));
        fd = MappedRegion.CreateMemFd("vhost-inflight", (long)size, @sealed: true);
        try
        {
            return new InflightBuffer(MappedRegion.Map(fd, size), 0, numQueues, queueSize, size);
        }
        catch
        {
            Fd.Close(fd);
            fd = -1;
            throw;
        }
    }

    /// <summary>
    /// Maps the buffer a front end sent with SET_INFLIGHT_FD (the fd is not taken). Null with a reason when the
    /// file is smaller than offset + size (mapping it would fault) or cannot be mapped; <paramref name="shrinkable"/>
    /// says whether the front end could still shrink it later (no F_SEAL_SHRINK: worth a log line).
    /// </summary>
    public static InflightBuffer? TryMap(in VhostUserInflight m, int fd, out string error, out bool shrinkable)
    {
        error = "";
        shrinkable = false;
        if (Fd.GetFileSize(fd, out long fileSize, out bool regular) != 0 || !regular)
        {
            error = "not a regular file (memfd)";
            return null;
        }

        if ((ulong)fileSize < m.MmapOffset + m.MmapSize)
        {
            error = $"file has {fileSize} bytes, less than offset {m.MmapOffset} + size {m.MmapSize}";
            return null;
        }

        int seals = Fd.GetSeals(fd);
        shrinkable = seals < 0 || (seals & Fd.SealShrink) == 0;
        try
        {
            return new InflightBuffer(MappedRegion.Map(fd, m.MmapOffset + m.MmapSize), m.MmapOffset, m.NumQueues, m.QueueSize, m.MmapSize);
        }
        catch (IOException e)
        {
            error = e.Message;
            return null;
        }
    }

    /// <summary>The region of queue <paramref name="index"/> if the buffer covers it at this ring size, else null (no tracking).</summary>
    public InflightQueue? ForQueue(int index, uint size)
    {
        if (index < 0 || index >= NumQueues || size != QueueSize)
        {
            return null;
        }

        return new InflightQueue(_map.Pointer + (nint)_offset + (nint)((ulong)index * InflightQueue.RegionBytes(QueueSize)), QueueSize);
    }

    /// <summary>
    /// The packed-layout region of queue <paramref name="index"/> if the buffer covers it at this ring size (a buffer
    /// sized for split rings is too small: null, no tracking), else null.
    /// </summary>
    public InflightPackedQueue? ForPackedQueue(int index, uint size)
    {
        if (index < 0 || index >= NumQueues || size != QueueSize || NumQueues * InflightPackedQueue.RegionBytes(QueueSize) > Size)
        {
            return null;
        }

        return new InflightPackedQueue(_map.Pointer + (nint)_offset + (nint)((ulong)index * InflightPackedQueue.RegionBytes(QueueSize)), QueueSize);
    }

    public void Dispose() => _map.Dispose();
}
