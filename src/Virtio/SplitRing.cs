namespace VhostBackend.Virtio;

/// <summary>
/// The available and used areas of a split virtqueue as the virtio spec lays them out (1.1, 2.6.6 and 2.6.8),
/// shared by the device side (<see cref="SplitVirtqueue"/>) and the driver side (<see cref="SplitVirtqueueDriver"/>).
/// Plain field locations: callers choose the memory ordering of each access.
/// </summary>
internal readonly unsafe struct SplitRing
{
    private readonly byte* _avail;
    private readonly byte* _used;
    private readonly ushort _size;

    public SplitRing(byte* avail, byte* used, ushort size)
    {
        _avail = avail;
        _used = used;
        _size = size;
    }

    public ref ushort AvailFlags => ref *(ushort*)_avail;

    public ref ushort AvailIdx => ref *(ushort*)(_avail + 2);

    public ref ushort AvailRing(int slot) => ref *(ushort*)(_avail + 4 + (2 * slot));

    /// <summary>used_event (EVENT_IDX): written by the driver after the avail ring.</summary>
    public ref ushort UsedEvent => ref *(ushort*)(_avail + 4 + (2 * _size));

    public ref ushort UsedFlags => ref *(ushort*)_used;

    public ref ushort UsedIdx => ref *(ushort*)(_used + 2);

    public VirtqUsedElem* UsedRing => (VirtqUsedElem*)(_used + 4);

    /// <summary>avail_event (EVENT_IDX): written by the device after the used ring.</summary>
    public ref ushort AvailEvent => ref *(ushort*)(_used + 4 + (8 * _size));
}
