using System.Runtime.InteropServices;

namespace VhostBackend.Virtio;

/// <summary>
/// One split queue's region of a vhost-user in-flight buffer (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD, the
/// "QueueRegionSplit" layout of QEMU's vhost-user.rst): a 16-byte header (features, version, desc_num,
/// last_batch_head, used_idx) and one 16-byte <c>DescStateSplit</c> per descriptor (inflight flag, next,
/// counter). The buffer lives in a memfd the front end keeps, so what is written here survives the daemon: a
/// restarted daemon finds the requests it had taken and not completed, and resubmits them in the order it took
/// them.
/// <para>
/// Protocol, per the spec: a head taken from the avail ring gets the next counter value and inflight = 1; a
/// completed head is linked into the "last batch" list (next = last_batch_head, last_batch_head = head) before
/// used.idx is published; after the publish, every head of the batch gets inflight = 0 and used_idx takes
/// used.idx. A crash between the publish and the clearing leaves used_idx behind used.idx, and recovery clears
/// that batch. Plain stores are enough: the memory is shared with the front end, which outlives our process,
/// and nothing reads it concurrently.
/// </para>
/// <para>
/// Everything read back is front-end controlled: heads are bounded by the queue size, the batch walk by the queue
/// size, and the region by the mapping (checked by the owner against the memfd's size).
/// </para>
/// Owned by the queue's reactor while the queue runs.
/// </summary>
public sealed unsafe class InflightQueue : InflightTracker
{
    /// <summary>Region header bytes before the descriptor states.</summary>
    public const int HeaderBytes = 16;

    /// <summary>Bytes per descriptor state.</summary>
    public const int DescStateBytes = 16;

    /// <summary>The region version this layout is.</summary>
    public const ushort Version = 1;

    private const int Alignment = 64;

    private readonly Header* _header;
    private readonly DescState* _desc;
    private readonly ushort _size;
    private ulong _counter;

    /// <param name="region">Start of the queue's region; <see cref="RegionBytes"/>(<paramref name="size"/>) bytes must be mapped there.</param>
    /// <param name="size">The queue size (a power of two).</param>
    public InflightQueue(nint region, ushort size)
    {
        if (region == 0 || !SplitVirtqueue.IsValidSize(size))
        {
            throw new ArgumentException("bad in-flight region");
        }

        _header = (Header*)region;
        _desc = (DescState*)(region + HeaderBytes);
        _size = size;
    }

    /// <summary>
    /// Bytes one queue's region takes in the buffer, 64-byte aligned so each queue starts on its own cache
    /// line (the layout DPDK's vhost library uses, so a buffer SPDK created maps the same way).
    /// </summary>
    public static ulong RegionBytes(ushort size) => ((ulong)HeaderBytes + ((ulong)DescStateBytes * size) + Alignment - 1) & ~(ulong)(Alignment - 1);

    public ushort Size => _size;

    /// <summary>
    /// Prepares the region when the queue starts and returns the heads to resubmit, oldest first (empty for a
    /// fresh or cleanly stopped queue). <paramref name="usedIdx"/> is used.idx in the ring now.
    /// A region whose desc_num is not the queue size is reset (its content cannot be interpreted).
    /// </summary>
    public ushort[] Recover(ushort usedIdx, out bool reset)
    {
        reset = false;
        if (_header->Version == 0 || _header->DescNum != _size)
        {
            reset = _header->Version != 0;
            new Span<byte>(_desc, DescStateBytes * _size).Clear();
            _header->Features = 0;
            _header->DescNum = _size;
            _header->LastBatchHead = 0;
            _header->UsedIdx = usedIdx;
            _header->Version = Version;
            _counter = 0;
            return [];
        }

        // The last batch was published but its in-flight flags not cleared yet: clear them now.
        ClearBatch(usedIdx);

        int count = 0;
        ulong maxCounter = 0;
        for (int i = 0; i < _size; i++)
        {
            if (_desc[i].Inflight != 0)
            {
                count++;
                maxCounter = Math.Max(maxCounter, _desc[i].Counter);
            }
        }

        var heads = new ushort[count];
        var counters = new ulong[count];
        int n = 0;
        for (int i = 0; i < _size; i++)
        {
            if (_desc[i].Inflight != 0)
            {
                heads[n] = (ushort)i;
                counters[n] = _desc[i].Counter;
                n++;
            }
        }

        Array.Sort(counters, heads);
        _counter = maxCounter + 1;
        return heads;
    }

    /// <summary>A head was taken from the avail ring.</summary>
    public override void Begin(ushort head)
    {
        if (head < _size)
        {
            var d = _desc + head;
            d->Counter = _counter++;
            d->Inflight = 1;
        }
    }

    /// <summary>A head's used element is written (before used.idx is published).</summary>
    public override void AddUsed(ushort head)
    {
        if (head < _size)
        {
            _desc[head].Next = _header->LastBatchHead;
            _header->LastBatchHead = head;
        }
    }

    /// <summary>used.idx now is <paramref name="usedIdx"/> (published): the batch is no longer in flight.</summary>
    public override void CommitUsed(ushort usedIdx) => ClearBatch(usedIdx);

    /// <summary>Whether <paramref name="head"/> is marked in flight (tests).</summary>
    public override bool IsInflight(ushort head) => head < _size && _desc[head].Inflight != 0;

    private void ClearBatch(ushort usedIdx)
    {
        int batch = (ushort)(usedIdx - _header->UsedIdx);
        if (batch == 0)
        {
            return;
        }

        // Bounded: a batch is at most the queue size (a longer one means a corrupt region; clear what we can).
        ushort head = _header->LastBatchHead;
        for (int i = 0; i < Math.Min(batch, (int)_size) && head < _size; i++)
        {
            _desc[head].Inflight = 0;
            head = _desc[head].Next;
        }

        _header->UsedIdx = usedIdx;
    }

    [StructLayout(LayoutKind.Sequential, Size = HeaderBytes)]
    private struct Header
    {
        public ulong Features;
        public ushort Version;
        public ushort DescNum;
        public ushort LastBatchHead;
        public ushort UsedIdx;
    }

    [StructLayout(LayoutKind.Explicit, Size = DescStateBytes)]
    private struct DescState
    {
        [FieldOffset(0)]
        public byte Inflight;

        [FieldOffset(6)]
        public ushort Next;

        [FieldOffset(8)]
        public ulong Counter;
    }
}
