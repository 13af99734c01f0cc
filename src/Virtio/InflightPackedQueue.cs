using System.Runtime.InteropServices;

namespace VhostBackend.Virtio;

/// <summary>
/// One packed queue's region of a vhost-user in-flight buffer: QEMU's vhost-user.rst "QueueRegionPacked" (a 32-byte
/// header: features, version, desc_num, free_head, old_free_head, used_idx, old_used_idx, used_wrap_counter,
/// old_used_wrap_counter) and one 32-byte <c>DescStatePacked</c> per ring slot (inflight, next, last, num, counter,
/// and a copy of a descriptor: id, flags, len, addr). Unlike the split ring, a packed ring's slots are overwritten
/// by used descriptors and reused by the driver while other buffers are still in flight, so the region keeps a copy
/// of every descriptor of every buffer taken, in entries taken from a free list; a restarted back end resubmits
/// from those copies and derives the ring position from the region, not from the front end (QEMU cannot restore a
/// packed ring's indices after a back-end crash and sends a stale base).
/// <para>
/// Protocol, per the spec: a pop takes <c>num</c> entries from the free list at old_free_head (the head entry gets
/// the next counter value and inflight = 1, its last / num describe the chain) and sets old_free_head once the whole
/// chain is recorded. A completion links its entries back to the free list and advances used_idx (and the wrap
/// counter) before the used descriptor's flags are written, then clears inflight and commits old_free_head,
/// old_used_idx and old_used_wrap_counter. One completion at a time, so a crash leaves at most one update half
/// done; recovery looks at the ring slot at old_used_idx to know whether its used descriptor reached the driver,
/// commits or rolls back accordingly, clears the free entries and resubmits the in-flight heads by counter.
/// </para>
/// <para>
/// Everything read back is front-end controlled and validated on a snapshot before anything is used or written:
/// the version, desc_num, every index below the ring size, wrap counters 0 or 1, a free list that visits each entry
/// at most once, chains of 1..size entries that stay inside the table and share no entry with the free list or with
/// each other, every entry accounted for, buffer ids below the ring size and unique, chain flags as a driver writes
/// them (NEXT on all but the last, INDIRECT alone). A region failing any check is refused with the reason.
/// </para>
/// Owned by the queue's reactor while the queue runs.
/// </summary>
public sealed unsafe class InflightPackedQueue : InflightTracker
{
    /// <summary>Region header bytes before the descriptor states.</summary>
    public const int HeaderBytes = 32;

    /// <summary>Bytes per descriptor state.</summary>
    public const int DescStateBytes = 32;

    /// <summary>The region version this layout is.</summary>
    public const ushort Version = 1;

    private const int Alignment = 64;
    private const ushort NoEntry = 0xFFFF;

    private readonly Header* _header;
    private readonly DescState* _desc;
    private readonly ushort _size;

    // Buffer id -> its head entry in the region (NoEntry when not tracked).
    private readonly ushort[] _entryOf;
    private PackedVirtqueue? _vq;
    private ulong _counter;

    /// <param name="region">Start of the queue's region; <see cref="RegionBytes"/>(<paramref name="size"/>) bytes must be mapped there.</param>
    /// <param name="size">The queue size (a power of two).</param>
    public InflightPackedQueue(nint region, ushort size)
    {
        if (region == 0 || !PackedVirtqueue.IsValidSize(size))
        {
            throw new ArgumentException("bad in-flight region");
        }

        _header = (Header*)region;
        _desc = (DescState*)(region + HeaderBytes);
        _size = size;
        _entryOf = new ushort[size];
        _entryOf.AsSpan().Fill(NoEntry);
    }

    /// <summary>Bytes one queue's region takes in the buffer, 64-byte aligned (the stride DPDK's vhost library uses).</summary>
    public static ulong RegionBytes(ushort size) => ((ulong)HeaderBytes + ((ulong)DescStateBytes * size) + Alignment - 1) & ~(ulong)(Alignment - 1);

    public ushort Size => _size;

    /// <summary>
    /// Validates the region when the queue starts (the ring <paramref name="vq"/> was created at the front end's base;
    /// it is only read here) and repairs the last half-done update. A fresh region (version 0, as GET_INFLIGHT_FD
    /// hands it out) is initialized from the ring's position. False with <paramref name="error"/> when the region
    /// cannot be trusted; nothing was written then.
    /// </summary>
    public bool TryRecover(PackedVirtqueue vq, out PackedInflightRecovery recovery, out string error)
    {
        ArgumentNullException.ThrowIfNull(vq);
        recovery = new PackedInflightRecovery(vq.VringBase, [], [], Fresh: true);
        error = "";
        if (vq.Size != _size)
        {
            error = $"ring size {vq.Size} is not the region's {_size}";
            return false;
        }

        Header h = *_header; // one snapshot: the front end could change the region under us
        if (h.Version == 0)
        {
            Initialize(vq);
            return true;
        }

        if (h.Version != Version)
        {
            error = $"version {h.Version} (expected {Version})";
            return false;
        }

        if (h.DescNum != _size)
        {
            error = $"desc_num {h.DescNum} is not the queue size {_size}";
            return false;
        }

        if (h.FreeHead > _size || h.OldFreeHead > _size || h.UsedIdx >= _size || h.OldUsedIdx >= _size || h.UsedWrap > 1 || h.OldUsedWrap > 1)
        {
            error = $"index out of range: free_head {h.FreeHead} old_free_head {h.OldFreeHead} used_idx {h.UsedIdx} old_used_idx {h.OldUsedIdx} " +
                $"wrap counters {h.UsedWrap}/{h.OldUsedWrap} (queue size {_size})";
            return false;
        }

        // The last update: if used_idx moved past old_used_idx, did its used descriptor reach the ring? The slot at
        // old_used_idx still holds the driver's available flags for that lap when it did not.
        ushort freeHead = h.OldFreeHead, usedIdx = h.OldUsedIdx;
        bool usedWrap = h.OldUsedWrap != 0;
        if (h.UsedIdx != h.OldUsedIdx || h.UsedWrap != h.OldUsedWrap)
        {
            ushort availFlags = usedWrap ? VirtqPackedDesc.FlagAvail : VirtqPackedDesc.FlagUsed;
            ushort flags = (ushort)(vq.RingFlags(h.OldUsedIdx) & (VirtqPackedDesc.FlagAvail | VirtqPackedDesc.FlagUsed));
            if (flags != availFlags)
            {
                freeHead = h.FreeHead;
                usedIdx = h.UsedIdx;
                usedWrap = h.UsedWrap != 0;
            }
        }

        var d = new DescState[_size];
        new ReadOnlySpan<DescState>(_desc, _size).CopyTo(d);

        // The free list: each entry at most once (a loop is refused, not followed), ended by any index >= size.
        var state = new byte[_size]; // 0 unaccounted, 1 free, 2 in an in-flight chain
        int free = 0;
        for (ushort e = freeHead; e < _size; e = d[e].Next)
        {
            if (state[e] != 0)
            {
                error = $"free list loops back to entry {e}";
                return false;
            }

            state[e] = 1;
            free++;
        }

        // In-flight heads: every entry not free whose inflight flag is set. Their chains follow next links from the
        // head for num entries and end at last.
        var heads = new List<ushort>();
        for (ushort i = 0; i < _size; i++)
        {
            if (d[i].Inflight > 1)
            {
                error = $"entry {i}: inflight {d[i].Inflight}";
                return false;
            }

            if (d[i].Inflight == 1 && state[i] == 0)
            {
                heads.Add(i);
            }
        }

        var ids = new ushort[heads.Count];
        var chains = new VirtqPackedDesc[heads.Count][];
        var counters = new ulong[heads.Count];
        var idSeen = new bool[_size];
        int taken = 0;
        ulong maxCounter = 0;
        for (int k = 0; k < heads.Count; k++)
        {
            ushort head = heads[k];
            if (state[head] != 0)
            {
                error = $"entry {head} is both an in-flight head and part of another chain";
                return false;
            }

            int num = d[head].Num;
            if (num == 0 || num > _size || d[head].Last >= _size)
            {
                error = $"entry {head}: chain of {num} entries ending at {d[head].Last}";
                return false;
            }

            var chain = new VirtqPackedDesc[num];
            ushort e = head;
            for (int j = 0; j < num; j++)
            {
                if (e >= _size || state[e] != 0)
                {
                    error = $"entry {head}: chain leaves the table or reaches an entry already used (at {e})";
                    return false;
                }

                state[e] = 2;
                chain[j] = new VirtqPackedDesc { Addr = d[e].Addr, Len = d[e].Len, Id = d[e].Id, Flags = d[e].Flags };
                bool lastOne = j == num - 1;
                bool next = (d[e].Flags & VirtqPackedDesc.FlagNext) != 0;
                bool indirect = (d[e].Flags & VirtqPackedDesc.FlagIndirect) != 0;
                if (lastOne ? next || e != d[head].Last : !next || indirect)
                {
                    error = $"entry {head}: descriptor {j} of {num} has flags 0x{d[e].Flags:x} or the chain does not end at last {d[head].Last}";
                    return false;
                }

                if (indirect && num != 1)
                {
                    error = $"entry {head}: an indirect descriptor in a chain of {num}";
                    return false;
                }

                if (!lastOne)
                {
                    e = d[e].Next;
                }
            }

            ushort id = chain[num - 1].Id;
            if (id >= _size || idSeen[id])
            {
                error = $"entry {head}: buffer id {id} is out of range or in flight twice";
                return false;
            }

            idSeen[id] = true;
            ids[k] = id;
            chains[k] = chain;
            counters[k] = d[head].Counter;
            maxCounter = Math.Max(maxCounter, d[head].Counter);
            taken += num;
        }

        if (free + taken != _size)
        {
            error = $"{free} free and {taken} in-flight entries do not account for the {_size} entries";
            return false;
        }

        // Resubmission order: the order they were taken (counter), ties by entry.
        var order = new int[heads.Count];
        for (int k = 0; k < order.Length; k++)
        {
            order[k] = k;
        }

        Array.Sort(order, (a, b) => counters[a] != counters[b] ? counters[a].CompareTo(counters[b]) : heads[a].CompareTo(heads[b]));

        // Every slot taken and not returned as used is in flight: the next slot to take follows them.
        uint avail = (uint)usedIdx + (uint)taken;
        bool availWrap = usedWrap;
        if (avail >= _size)
        {
            avail -= _size;
            availWrap = !availWrap;
        }

        uint vringBase = avail | (availWrap ? 0x8000u : 0) | ((uint)usedIdx << 16) | (usedWrap ? 0x8000_0000u : 0);

        // Trusted now: write the repaired state back.
        _header->FreeHead = freeHead;
        _header->OldFreeHead = freeHead;
        _header->UsedIdx = usedIdx;
        _header->OldUsedIdx = usedIdx;
        _header->UsedWrap = (byte)(usedWrap ? 1 : 0);
        _header->OldUsedWrap = _header->UsedWrap;
        for (int i = 0; i < _size; i++)
        {
            if (state[i] == 1)
            {
                _desc[i].Inflight = 0;
            }
        }

        _entryOf.AsSpan().Fill(NoEntry);
        var sortedIds = new ushort[order.Length];
        var sortedChains = new VirtqPackedDesc[order.Length][];
        for (int k = 0; k < order.Length; k++)
        {
            sortedIds[k] = ids[order[k]];
            sortedChains[k] = chains[order[k]];
            _entryOf[ids[order[k]]] = heads[order[k]];
        }

        _counter = heads.Count > 0 ? maxCounter + 1 : 0;
        recovery = new PackedInflightRecovery(vringBase, sortedIds, sortedChains, Fresh: false);
        return true;
    }

    /// <summary>
    /// Attaches the ring the queue runs on (created at <see cref="PackedInflightRecovery.VringBase"/>) and restores
    /// the recovered chains into it, so the device walks them from their copies.
    /// </summary>
    public void Attach(PackedVirtqueue vq, PackedInflightRecovery recovery)
    {
        ArgumentNullException.ThrowIfNull(vq);
        ArgumentNullException.ThrowIfNull(recovery);
        for (int k = 0; k < recovery.Resubmit.Length; k++)
        {
            vq.Restore(recovery.Resubmit[k], recovery.Chains[k]);
        }

        _vq = vq;
    }

    /// <summary>A buffer was popped: its descriptors are copied into free entries, the first becoming its in-flight head.</summary>
    public override void Begin(ushort head)
    {
        var vq = _vq;
        ushort h = _header->OldFreeHead;
        if (vq is null || head >= _size || h >= _size)
        {
            return;
        }

        int n = vq.ChainLength(head);
        var hd = _desc + h;
        hd->Num = 0;
        hd->Counter = _counter++;
        hd->Inflight = 1;
        ushort f = h;
        for (int i = 0; i < n && f < _size; i++)
        {
            var s = vq.ReadChainDesc(head, i);
            var e = _desc + f;
            e->Addr = s.Addr;
            e->Len = s.Len;
            e->Id = s.Id;
            e->Flags = s.Flags;
            hd->Num++;
            hd->Last = f;
            f = e->Next;
            _header->FreeHead = f;
        }

        Volatile.Write(ref _header->OldFreeHead, f);
        _entryOf[head] = h;
    }

    /// <summary>
    /// Before the used descriptor is written: the chain's entries go back to the free list and used_idx moves past
    /// it (so a crash after the descriptor reached the ring is seen as such by the next back end).
    /// </summary>
    public override void AddUsed(ushort head)
    {
        var vq = _vq;
        if (vq is null || head >= _size)
        {
            return;
        }

        ushort h = _entryOf[head];
        if (h >= _size)
        {
            return;
        }

        ushort last = _desc[h].Last;
        if (last < _size)
        {
            _desc[last].Next = _header->FreeHead;
            _header->FreeHead = h;
        }

        uint next = (uint)vq.LastUsedIdx + (uint)Math.Max(1, vq.ChainLength(head));
        bool wrap = vq.UsedWrapCounter;
        if (next >= _size)
        {
            next -= _size;
            wrap = !wrap;
        }

        _header->UsedWrap = (byte)(wrap ? 1 : 0);
        Volatile.Write(ref _header->UsedIdx, (ushort)next);
    }

    /// <summary>The used descriptor is in the ring: the buffer is no longer in flight; the update is committed.</summary>
    public override void UsedWritten(ushort head)
    {
        if (head >= _size)
        {
            return;
        }

        ushort h = _entryOf[head];
        if (h >= _size)
        {
            return;
        }

        _entryOf[head] = NoEntry;
        Volatile.Write(ref _desc[h].Inflight, 0);
        _header->OldFreeHead = _header->FreeHead;
        _header->OldUsedIdx = _header->UsedIdx;
        Volatile.Write(ref _header->OldUsedWrap, _header->UsedWrap);
    }

    /// <summary>Whether buffer id <paramref name="head"/> is tracked as in flight (tests).</summary>
    public override bool IsInflight(ushort head)
    {
        if (head >= _size)
        {
            return false;
        }

        ushort h = _entryOf[head];
        return h < _size && _desc[h].Inflight != 0;
    }

    /// <summary>Entries whose inflight flag is set (tests; a region a back end left behind).</summary>
    public int CountInflightEntries()
    {
        int n = 0;
        for (int i = 0; i < _size; i++)
        {
            n += _desc[i].Inflight != 0 ? 1 : 0;
        }

        return n;
    }

    private void Initialize(PackedVirtqueue vq)
    {
        new Span<byte>(_desc, DescStateBytes * _size).Clear();
        for (int i = 0; i < _size; i++)
        {
            _desc[i].Next = (ushort)(i + 1);
        }

        _header->Features = 0;
        _header->DescNum = _size;
        _header->FreeHead = 0;
        _header->OldFreeHead = 0;
        _header->UsedIdx = vq.LastUsedIdx;
        _header->OldUsedIdx = vq.LastUsedIdx;
        _header->UsedWrap = (byte)(vq.UsedWrapCounter ? 1 : 0);
        _header->OldUsedWrap = _header->UsedWrap;
        Volatile.Write(ref _header->Version, Version);
        _entryOf.AsSpan().Fill(NoEntry);
        _counter = 0;
    }

    [StructLayout(LayoutKind.Explicit, Size = HeaderBytes)]
    private struct Header
    {
        [FieldOffset(0)]
        public ulong Features;

        [FieldOffset(8)]
        public ushort Version;

        [FieldOffset(10)]
        public ushort DescNum;

        [FieldOffset(12)]
        public ushort FreeHead;

        [FieldOffset(14)]
        public ushort OldFreeHead;

        [FieldOffset(16)]
        public ushort UsedIdx;

        [FieldOffset(18)]
        public ushort OldUsedIdx;

        [FieldOffset(20)]
        public byte UsedWrap;

        [FieldOffset(21)]
        public byte OldUsedWrap;
    }

    [StructLayout(LayoutKind.Explicit, Size = DescStateBytes)]
    private struct DescState
    {
        [FieldOffset(0)]
        public byte Inflight;

        [FieldOffset(2)]
        public ushort Next;

        [FieldOffset(4)]
        public ushort Last;

        [FieldOffset(6)]
        public ushort Num;

        [FieldOffset(8)]
        public ulong Counter;

        [FieldOffset(16)]
        public ushort Id;

        [FieldOffset(18)]
        public ushort Flags;

        [FieldOffset(20)]
        public uint Len;

        [FieldOffset(24)]
        public ulong Addr;
    }
}

/// <summary>
/// What <see cref="InflightPackedQueue.TryRecover"/> found: the ring position to run from (GET_VRING_BASE format),
/// the buffer ids to resubmit in the order they were taken and their descriptor chains; <paramref name="Fresh"/>
/// when the region was new (the front end's base stands).
/// </summary>
public sealed record PackedInflightRecovery(uint VringBase, ushort[] Resubmit, VirtqPackedDesc[][] Chains, bool Fresh);
