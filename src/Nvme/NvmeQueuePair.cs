using VhostBackend.Platform;
using System.Diagnostics;
using System.Runtime.CompilerServices;

namespace VhostBackend.Nvme;

/// <summary>A command's completion: fires exactly once per accepted submission, on the thread that polls the queue pair.</summary>
public delegate void NvmeCompletionCallback(object? arg, NvmeStatus status, uint dw0);

/// <summary>Called once for each command that has been outstanding longer than the timeout.</summary>
public delegate void NvmeTimeoutCallback(object? context, NvmeQueuePair qpair, ushort cid);

/// <summary>
/// One submission/completion queue pair. I/O queue pairs are owned by one thread (the bdev module gives each
/// reactor its own): submit and <see cref="ProcessCompletions"/> there only; nothing is locked or allocated per I/O.
/// <para>
/// Memory ordering: the SQ entry is written with plain stores, then a full barrier, then the SQ tail doorbell (the
/// device may fetch the entry as soon as it sees the doorbell). Completions are detected by the phase tag: the
/// status/phase word is read with acquire semantics before the rest of the entry is read.
/// </para>
/// Command ids are indexes into a pre-allocated tracker array; each tracker owns one page for its PRP list.
/// </summary>
public sealed unsafe class NvmeQueuePair : IDisposable
{
    private const int StateConnected = 0;
    private const int StateDisconnected = 1;
    private const int StateDestroyed = 2;

    private readonly NvmeController _ctrl;
    private readonly NvmeRegisters _regs;
    private readonly DmaSpace _space;
    private readonly DmaRegion _mem;
    private readonly NvmeCommand* _sq;
    private readonly NvmeCompletion* _cq;
    private readonly byte* _prpBase;
    private readonly ulong _prpBaseIova;
    private readonly int _pageSize;
    private readonly int _sqDoorbell;
    private readonly int _cqDoorbell;
    private readonly Tracker[] _trackers;
    private readonly ushort[] _free;
    private int _freeCount;
    private ushort _sqTail;
    private ushort _sqHead;
    private ushort _cqHead;
    private byte _phase;
    private int _state;

    private struct Tracker
    {
        public NvmeCompletionCallback? Callback;
        public object? Arg;
        public long SubmitTicks;
        public bool Active;
        public bool TimeoutReported;
        public bool NoTimeout;
        public byte Opcode;
    }

    internal NvmeQueuePair(NvmeController ctrl, ushort qid, int entries, int pageSize, int dstrd)
    {
        if (entries < 2 || entries > 65536)
        {
            throw new ArgumentOutOfRangeException(nameof(entries));
        }

        _ctrl = ctrl;
        _regs = ctrl.Registers;
        _space = ctrl.Dma;
        Id = qid;
        Entries = entries;
        _pageSize = pageSize;
        int trackers = entries - 1; // a full SQ holds entries - 1 commands
        ulong sqBytes = Align((ulong)entries * 64, (ulong)pageSize);
        ulong cqBytes = Align((ulong)entries * 16, (ulong)pageSize);
        ulong prpBytes = (ulong)trackers * (ulong)pageSize;
        _mem = _space.Allocate(sqBytes + cqBytes + prpBytes, qid == 0 ? "vb-nvme-admin" : "vb-nvme-qpair");
        _sq = (NvmeCommand*)_mem.Va;
        _cq = (NvmeCompletion*)(_mem.Va + (nint)sqBytes);
        _prpBase = (byte*)(_mem.Va + (nint)(sqBytes + cqBytes));
        SqIova = _mem.Iova;
        CqIova = _mem.Iova + sqBytes;
        _prpBaseIova = _mem.Iova + sqBytes + cqBytes;
        _sqDoorbell = NvmeReg.DoorbellOffset(qid, false, dstrd);
        _cqDoorbell = NvmeReg.DoorbellOffset(qid, true, dstrd);
        _trackers = new Tracker[trackers];
        _free = new ushort[trackers];
        ResetRings();
    }

    private static ulong Align(ulong v, ulong a) => (v + a - 1) & ~(a - 1);

    public NvmeController Controller => _ctrl;

    /// <summary>Queue id (0 = admin).</summary>
    public ushort Id { get; }

    public int Entries { get; }
    public ulong SqIova { get; }
    public ulong CqIova { get; }

    /// <summary>Commands submitted and not yet completed.</summary>
    public int Outstanding => _trackers.Length - _freeCount;

    /// <summary>Commands that can be submitted right now.</summary>
    public int FreeSlots => _freeCount;

    public bool IsConnected => Volatile.Read(ref _state) == StateConnected;

    /// <summary>Command timeout in <see cref="VhostBackend.Platform.Ticks"/> ticks (0 = none), checked by <see cref="CheckTimeouts"/>.</summary>
    public long TimeoutTicks { get; set; }

    /// <summary>Completions whose command id matched no outstanding command (a misbehaving device); ignored.</summary>
    public long SpuriousCompletions { get; private set; }

    /// <summary>Sets the ring indexes to their initial state and zeroes the CQ. Only when the device does not use the queue.</summary>
    internal void ResetRings()
    {
        _sqTail = 0;
        _sqHead = 0;
        _cqHead = 0;
        _phase = 1;
        new Span<byte>(_cq, Entries * 16).Clear();
        for (int i = 0; i < _trackers.Length; i++)
        {
            _trackers[i] = default;
            _free[i] = (ushort)(_trackers.Length - 1 - i);
        }

        _freeCount = _trackers.Length;
    }

    internal void MarkDisconnected() => Interlocked.CompareExchange(ref _state, StateDisconnected, StateConnected);

    internal void MarkConnected() => Volatile.Write(ref _state, StateConnected);

    internal void MarkDestroyed() => Volatile.Write(ref _state, StateDestroyed);

    /// <summary>Submits a Read of <paramref name="numBlocks"/> blocks into <paramref name="iovs"/>. Returns 0 or -errno (see <see cref="SubmitIo"/>).</summary>
    public int Read(NvmeNamespace ns, ulong lba, uint numBlocks, ReadOnlySpan<NvmeIoVec> iovs, NvmeCompletionCallback cb, object? arg, bool fua = false) =>
        SubmitIo(NvmeIoOpcode.Read, ns, lba, numBlocks, iovs, fua ? 1u << 30 : 0, cb, arg);

    public int Write(NvmeNamespace ns, ulong lba, uint numBlocks, ReadOnlySpan<NvmeIoVec> iovs, NvmeCompletionCallback cb, object? arg, bool fua = false) =>
        SubmitIo(NvmeIoOpcode.Write, ns, lba, numBlocks, iovs, fua ? 1u << 30 : 0, cb, arg);

    /// <summary>Compare: completes with a media error / compare failure status (<see cref="NvmeStatus.IsCompareFailure"/>) on a mismatch.</summary>
    public int Compare(NvmeNamespace ns, ulong lba, uint numBlocks, ReadOnlySpan<NvmeIoVec> iovs, NvmeCompletionCallback cb, object? arg) =>
        SubmitIo(NvmeIoOpcode.Compare, ns, lba, numBlocks, iovs, 0, cb, arg);

    public int Flush(NvmeNamespace ns, NvmeCompletionCallback cb, object? arg)
    {
        NvmeCommand cmd = default;
        cmd.Opcode = NvmeIoOpcode.Flush;
        cmd.Nsid = ns.Id;
        return Submit(ref cmd, cb, arg, noTimeout: false);
    }

    /// <summary>Write Zeroes of up to 65536 blocks; <paramref name="deallocate"/> sets DEAC.</summary>
    public int WriteZeroes(NvmeNamespace ns, ulong lba, uint numBlocks, bool deallocate, NvmeCompletionCallback cb, object? arg)
    {
        if (numBlocks == 0 || numBlocks > 65536 || !ns.InRange(lba, numBlocks))
        {
            return -Platform.Errno.EINVAL;
        }

        NvmeCommand cmd = default;
        cmd.Opcode = NvmeIoOpcode.WriteZeroes;
        cmd.Nsid = ns.Id;
        cmd.Cdw10 = (uint)lba;
        cmd.Cdw11 = (uint)(lba >> 32);
        cmd.Cdw12 = (numBlocks - 1) | (deallocate ? 1u << 25 : 0);
        return Submit(ref cmd, cb, arg, noTimeout: false);
    }

    /// <summary>Dataset Management with the deallocate attribute over one range (up to 2^32-1 blocks).</summary>
    public int Deallocate(NvmeNamespace ns, ulong lba, uint numBlocks, NvmeCompletionCallback cb, object? arg)
    {
        if (numBlocks == 0 || !ns.InRange(lba, numBlocks))
        {
            return -Platform.Errno.EINVAL;
        }

        if (!IsConnected)
        {
            return -6; // ENXIO
        }

        if (_freeCount == 0)
        {
            return -Platform.Errno.ENOMEM;
        }

        // The range list lives in the tracker's PRP page (a DMA page owned by this command until it completes).
        ushort cid = _free[_freeCount - 1];
        var range = (NvmeDsmRange*)(_prpBase + (cid * _pageSize));
        range->Attributes = 0;
        range->LengthBlocks = numBlocks;
        range->StartLba = lba;
        NvmeCommand cmd = default;
        cmd.Opcode = NvmeIoOpcode.DatasetManagement;
        cmd.Nsid = ns.Id;
        cmd.Prp1 = _prpBaseIova + ((ulong)cid * (ulong)_pageSize);
        cmd.Cdw10 = 0;        // NR: one range (0-based)
        cmd.Cdw11 = 1u << 2;  // AD: deallocate
        return Submit(ref cmd, cb, arg, noTimeout: false);
    }

    /// <summary>
    /// Read/Write/Compare with data. Returns 0 (the callback fires exactly once, later, from
    /// <see cref="ProcessCompletions"/>), or -EINVAL (bad range, length not numBlocks * block size, buffers breaking
    /// the PRP rules of <see cref="Prp"/>, larger than <see cref="NvmeController.MaxTransferBytes"/>), -EFAULT
    /// (buffers not registered DMA memory), -ENOMEM (no free command slot), -ENXIO (queue pair disconnected).
    /// </summary>
    public int SubmitIo(byte opcode, NvmeNamespace ns, ulong lba, uint numBlocks, ReadOnlySpan<NvmeIoVec> iovs, uint cdw12Flags, NvmeCompletionCallback cb, object? arg)
    {
        if (numBlocks == 0 || numBlocks > 65536 || !ns.InRange(lba, numBlocks))
        {
            return -Platform.Errno.EINVAL;
        }

        ulong bytes = (ulong)numBlocks * ns.BlockSize;
        if (bytes > _ctrl.MaxTransferBytes)
        {
            return -Platform.Errno.EINVAL;
        }

        ulong total = 0;
        for (int i = 0; i < iovs.Length; i++)
        {
            total += iovs[i].Length;
        }

        if (total != bytes)
        {
            return -Platform.Errno.EINVAL;
        }

        if (!IsConnected)
        {
            return -6; // ENXIO
        }

        if (_freeCount == 0)
        {
            return -Platform.Errno.ENOMEM;
        }

        ushort cid = _free[_freeCount - 1];
        NvmeCommand cmd = default;
        int rc = Prp.Build(_space, iovs, _pageSize, (ulong*)(_prpBase + (cid * _pageSize)), _prpBaseIova + ((ulong)cid * (ulong)_pageSize), _pageSize / 8, out cmd.Prp1, out cmd.Prp2);
        if (rc != 0)
        {
            return rc;
        }

        cmd.Opcode = opcode;
        cmd.Nsid = ns.Id;
        cmd.Cdw10 = (uint)lba;
        cmd.Cdw11 = (uint)(lba >> 32);
        cmd.Cdw12 = (numBlocks - 1) | cdw12Flags;
        return Submit(ref cmd, cb, arg, noTimeout: false);
    }

    /// <summary>
    /// Submits a prepared command (its CID is assigned here; PRPs must already point at DMA memory). For admin
    /// commands and pass-through. Returns 0, -ENOMEM or -ENXIO.
    /// </summary>
    public int Submit(ref NvmeCommand cmd, NvmeCompletionCallback cb, object? arg, bool noTimeout)
    {
        if (!IsConnected && Id != 0)
        {
            return -6; // ENXIO
        }

        if (_freeCount == 0)
        {
            return -Platform.Errno.ENOMEM;
        }

        ushort cid = _free[--_freeCount];
        ref var t = ref _trackers[cid];
        t.Callback = cb;
        t.Arg = arg;
        t.Active = true;
        t.TimeoutReported = false;
        t.NoTimeout = noTimeout;
        t.Opcode = cmd.Opcode;
        t.SubmitTicks = Ticks.Now();
        cmd.Cid = cid;

        // SAFETY: _sqTail < Entries; the slot is free: at most Entries - 1 commands are outstanding, and a slot the
        // device has not fetched yet belongs to an outstanding command.
        _sq[_sqTail] = cmd;
        ushort tail = (ushort)(_sqTail + 1 == Entries ? 0 : _sqTail + 1);
        _sqTail = tail;

        // Write barrier: the 64-byte entry must be globally visible before the device can observe the new tail.
        Interlocked.MemoryBarrier();
        _regs.Write32(_sqDoorbell, tail);
        return 0;
    }

    /// <summary>
    /// Reaps up to <paramref name="max"/> completions (0 = all available), calling each command's callback, then
    /// rings the CQ head doorbell once. Returns the number reaped.
    /// </summary>
    public int ProcessCompletions(int max = 0)
    {
        int n = 0;
        if (max <= 0)
        {
            max = int.MaxValue;
        }

        while (n < max)
        {
            var cqe = _cq + _cqHead;

            // Acquire read of the status/phase word: the other fields of this entry are read only after the
            // phase says the device finished writing it.
            ushort sp = Volatile.Read(ref cqe->StatusPhase);
            if ((sp & 1) != _phase)
            {
                break;
            }

            ushort cid = cqe->Cid;
            uint dw0 = cqe->Dw0;
            ushort sqhd = cqe->SqHead;
            if (++_cqHead == Entries)
            {
                _cqHead = 0;
                _phase ^= 1;
            }

            n++;
            if (sqhd < Entries)
            {
                _sqHead = sqhd;
            }

            if (cid >= _trackers.Length || !_trackers[cid].Active)
            {
                SpuriousCompletions++;
                continue;
            }

            CompleteTracker(cid, new NvmeStatus((ushort)(sp >> 1)), dw0);
        }

        if (n > 0)
        {
            // The CQ head doorbell releases the consumed entries to the device; no data depends on it.
            _regs.Write32(_cqDoorbell, _cqHead);
        }

        return n;
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private void CompleteTracker(ushort cid, NvmeStatus status, uint dw0)
    {
        ref var t = ref _trackers[cid];
        var cb = t.Callback;
        var arg = t.Arg;
        t.Callback = null;
        t.Arg = null;
        t.Active = false;
        _free[_freeCount++] = cid; // freed before the callback so it can submit again
        cb!(arg, status, dw0);
    }

    /// <summary>
    /// Reports each command outstanding longer than <see cref="TimeoutTicks"/> once. Returns how many were reported.
    /// </summary>
    public int CheckTimeouts(long nowTicks, NvmeTimeoutCallback cb, object? context)
    {
        if (TimeoutTicks <= 0 || _freeCount == _trackers.Length)
        {
            return 0;
        }

        int n = 0;
        for (int i = 0; i < _trackers.Length; i++)
        {
            ref var t = ref _trackers[i];
            if (t.Active && !t.NoTimeout && !t.TimeoutReported && nowTicks - t.SubmitTicks > TimeoutTicks)
            {
                t.TimeoutReported = true;
                n++;
                cb(context, this, (ushort)i);
            }
        }

        return n;
    }

    /// <summary>Whether a command id is outstanding, and its opcode.</summary>
    public bool IsOutstanding(ushort cid, out byte opcode)
    {
        opcode = 0;
        if (cid >= _trackers.Length || !_trackers[cid].Active)
        {
            return false;
        }

        opcode = _trackers[cid].Opcode;
        return true;
    }

    /// <summary>Completes every outstanding command with <paramref name="status"/> (queue deleted, reset, device gone). Owner thread only.</summary>
    public int FailOutstanding(NvmeStatus status, bool includeNoTimeout = true)
    {
        int n = 0;
        for (int i = 0; i < _trackers.Length; i++)
        {
            if (_trackers[i].Active && (includeNoTimeout || !_trackers[i].NoTimeout))
            {
                n++;
                CompleteTracker((ushort)i, status, 0);
            }
        }

        return n;
    }

    /// <summary>
    /// Owner thread: after a controller reset (or to recover a failed queue pair) fails what was outstanding with
    /// "aborted: SQ deletion" (retryable), and creates the queues on the controller again. Returns 0 or -errno.
    /// </summary>
    public int Reconnect()
    {
        if (Volatile.Read(ref _state) == StateDestroyed)
        {
            return -Platform.Errno.EINVAL;
        }

        MarkDisconnected();
        FailOutstanding(NvmeStatus.AbortedSqDeletion);
        _ctrl.DeleteIoQueues(this); // harmless when the controller was reset and they no longer exist
        ResetRings();
        return _ctrl.CreateIoQueues(this);
    }

    /// <summary>Owner thread: stop using the queue pair (fails outstanding commands, deletes the queues on the device).</summary>
    public void Disconnect()
    {
        MarkDisconnected();
        _ctrl.DeleteIoQueues(this);
        FailOutstanding(NvmeStatus.AbortedSqDeletion);
    }

    /// <summary>Deletes the queues on the device (if still connected), fails outstanding commands, frees memory. Owner thread.</summary>
    public void Dispose()
    {
        if (Volatile.Read(ref _state) == StateDestroyed)
        {
            return;
        }

        if (Id != 0)
        {
            Disconnect();
            _ctrl.ReleaseQueuePair(this);
        }
        else
        {
            FailOutstanding(NvmeStatus.AbortedSqDeletion);
        }

        MarkDestroyed();
        _mem.Dispose();
    }
}
