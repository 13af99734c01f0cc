using System.Diagnostics;
using System.Runtime.CompilerServices;
using VhostBackend.Platform;

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
    private const int StateConnecting = 3;
    private const int StateDeleting = 4;

    // Steps of the connect state machine (StartConnect / PollConnect).
    private const int StepDeleteSq = 0;
    private const int StepDeleteCq = 1;
    private const int StepCreateCq = 2;
    private const int StepCreateSq = 3;

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
    private int _state = StateDisconnected;

    // Connect/delete state machine. The step callbacks run on whichever thread reaps admin completions: they
    // write the status, then publish _stepDone (release); the owner reads _stepDone (acquire), then the status.
    private int _step;
    private bool _stepPending;
    private bool _restart;
    private int _stepDone;
    private NvmeStatus _stepStatus;
    private long _connectDeadline;
    private long _deviceGeneration = -1;
    private IDisposable? _disposeAfterDelete;

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

    /// <summary>The DMA memory of a queue pair of <paramref name="entries"/>: SQ, CQ, one PRP list page per command slot.</summary>
    internal static ulong DmaBytes(int entries, int pageSize) =>
        Align((ulong)entries * 64, (ulong)pageSize) + Align((ulong)entries * 16, (ulong)pageSize) + (ulong)(entries - 1) * (ulong)pageSize;

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
        _mem = _space.Allocate(DmaBytes(entries, pageSize), qid == 0 ? "vb-nvme-admin" : "vb-nvme-qpair");
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

    /// <summary>The interrupt vector of the completion queue (-1: interrupts off, polled only). Set before connecting.</summary>
    public int InterruptVector { get; init; } = -1;

    /// <summary>The eventfd this queue's completions signal (null: polled only): a reactor's wake source.</summary>
    public EventFd? InterruptFd => _ctrl.InterruptFd(InterruptVector);

    /// <summary>Whether the next completion queue entry is posted (phase-bit peek; owner thread; no side effect).</summary>
    public bool HasCompletion
    {
        get
        {
            if (_state >= StateDestroyed)
            {
                return false;
            }

            // SAFETY: _cqHead < Entries, inside the CQ ring allocated with the queue pair.
            return (Volatile.Read(ref (_cq + _cqHead)->StatusPhase) & 1) == _phase;
        }
    }

    /// <summary>
    /// Before the owner sleeps: consumes the interrupt eventfd's count, re-enables INTx, and returns whether a
    /// completion is already posted (then the owner must not sleep). A completion posted after the peek raises
    /// the interrupt, which wakes the owner.
    /// </summary>
    public bool ArmInterrupt()
    {
        InterruptFd?.Drain();
        _ctrl.UnmaskInterrupt();
        return HasCompletion;
    }

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

    internal void MarkDisconnected()
    {
        if (Interlocked.CompareExchange(ref _state, StateDisconnected, StateConnected) != StateConnected)
        {
            Interlocked.CompareExchange(ref _state, StateDisconnected, StateConnecting);
        }
    }

    /// <summary>Being (re)created on the controller: <see cref="PollConnect"/> advances it.</summary>
    public bool IsConnecting => Volatile.Read(ref _state) == StateConnecting;

    /// <summary>Being deleted on the controller after <see cref="BeginDestroy"/>.</summary>
    public bool IsDeleting => Volatile.Read(ref _state) == StateDeleting;

    /// <summary>Destroyed (its memory freed, or left to the controller when the device did not delete its queues).</summary>
    public bool IsDestroyed => Volatile.Read(ref _state) == StateDestroyed;

    /// <summary>Why the last connect failed (-errno), 0 when it did not.</summary>
    public int ConnectError { get; private set; }

    internal void MarkConnected() => Volatile.Write(ref _state, StateConnected);

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
        if (!IsConnected)
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

        if (_state >= StateDestroyed)
        {
            return 0; // destroyed, or the rings are being re-created or deleted: nothing of ours can be in them
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
        cb?.Invoke(arg, status, dw0); // null: the command was expired (timed out) and its caller already told
    }

    /// <summary>
    /// A command timed out: its callback fires now with <paramref name="status"/>, but its command id stays taken
    /// (the device may still complete it) until the device completes it or <see cref="FailOutstanding"/> (reset)
    /// frees it. Returns false when the command is not outstanding or already expired.
    /// </summary>
    internal bool ExpireCommand(ushort cid, NvmeStatus status)
    {
        if (cid >= _trackers.Length || !_trackers[cid].Active || _trackers[cid].Callback is null)
        {
            return false;
        }

        ref var t = ref _trackers[cid];
        var cb = t.Callback;
        var arg = t.Arg;
        t.Callback = null;
        t.Arg = null;
        cb!(arg, status, 0);
        return true;
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
    /// Owner thread: starts (re)creating the queues on the controller, without waiting: outstanding commands fail
    /// now with "aborted: SQ deletion" (retryable); if the queues may still exist on the controller (no reset since
    /// they were created) they are deleted first; then Create I/O CQ and Create I/O SQ. <see cref="PollConnect"/>
    /// advances it. Returns 0, or -EINVAL when the queue pair is destroyed. Calling it while a connect is under way
    /// restarts it once the admin command in flight completes.
    /// </summary>
    public int StartConnect()
    {
        int s = Volatile.Read(ref _state);
        if (s is StateDestroyed or StateDeleting || Id == 0)
        {
            return -Platform.Errno.EINVAL;
        }

        ConnectError = 0;
        _connectDeadline = Ticks.Now() + _ctrl.ConnectTimeoutTicks;
        if (_stepPending)
        {
            _restart = true;
            Volatile.Write(ref _state, StateConnecting);
            return 0;
        }

        BeginConnect();
        return 0;
    }

    private void BeginConnect()
    {
        MarkDisconnected();
        FailOutstanding(NvmeStatus.AbortedSqDeletion);
        _restart = false;
        _step = _ctrl.QueuesMayExist(_deviceGeneration) ? StepDeleteSq : StepCreateCq;
        Volatile.Write(ref _state, StateConnecting);
    }

    private static readonly NvmeCompletionCallback s_stepDone = static (arg, status, dw0) =>
    {
        var qp = (NvmeQueuePair)arg!;
        qp._stepStatus = status;
        Volatile.Write(ref qp._stepDone, 1);
    };

    /// <summary>
    /// Owner thread: advances a connect started by <see cref="StartConnect"/>; never waits. Returns 1 when the queue
    /// pair is connected, 0 while in progress, or -errno when the connect failed (-EIO: the controller refused a
    /// command or it timed out; -ENXIO: the controller is not usable; -ETIMEDOUT: no admin slot before the
    /// deadline). Reaps admin completions itself (non-blocking), so it makes progress without an admin poller.
    /// </summary>
    public int PollConnect()
    {
        int s = Volatile.Read(ref _state);
        if (s == StateConnected)
        {
            return 1;
        }

        if (s != StateConnecting)
        {
            return ConnectError != 0 ? ConnectError : -6;
        }

        _ctrl.ProcessAdminCompletions();
        for (int guard = 0; guard < 8; guard++)
        {
            if (_stepPending)
            {
                if (Volatile.Read(ref _stepDone) == 0)
                {
                    return 0; // an admin timeout completes it (expired) if the controller never answers
                }

                _stepPending = false;
                var st = _stepStatus;
                if (_restart)
                {
                    if (_step == StepCreateCq && st.IsSuccess)
                    {
                        _deviceGeneration = _ctrl.Generation;
                    }
                    else if (_step == StepDeleteCq && st.IsSuccess)
                    {
                        _deviceGeneration = -1;
                    }

                    BeginConnect();
                    continue;
                }

                switch (_step)
                {
                    case StepDeleteSq:
                        _step = StepDeleteCq; // errors are fine: the queue may be gone already
                        break;
                    case StepDeleteCq:
                        _deviceGeneration = -1;
                        _step = StepCreateCq;
                        break;
                    case StepCreateCq:
                        if (!st.IsSuccess)
                        {
                            return FailConnect(-Platform.Errno.EIO, st);
                        }

                        _deviceGeneration = _ctrl.Generation;
                        _step = StepCreateSq;
                        break;
                    default:
                        if (!st.IsSuccess)
                        {
                            return FailConnect(-Platform.Errno.EIO, st); // the CQ is deleted by the next connect or the destroy
                        }

                        Interlocked.CompareExchange(ref _state, StateConnected, StateConnecting);
                        return IsConnected ? 1 : -6;
                }
            }

            if (_step == StepCreateCq)
            {
                ResetRings(); // the device has no queues of ours now: the memory is ours alone
            }

            var cmd = MakeStepCommand(_step);
            Volatile.Write(ref _stepDone, 0);
            int rc = _ctrl.SubmitAdmin(ref cmd, s_stepDone, this);
            if (rc != 0)
            {
                // Admin queue full, or the controller is being reset: try again on the next poll, until the deadline
                // (no deadline while the controller resets: that has its own, CAP.TO).
                if ((rc == -6 && _ctrl.IsResetting) || (rc == -Platform.Errno.ENOMEM && Ticks.Now() - _connectDeadline < 0))
                {
                    return 0;
                }

                return FailConnect(rc == -Platform.Errno.ENOMEM ? -110 : rc, default);
            }

            _stepPending = true;
            _ctrl.ProcessAdminCompletions();
        }

        return 0;
    }

    private NvmeCommand MakeStepCommand(int step)
    {
        uint size = (uint)(Entries - 1) << 16;
        NvmeCommand cmd;
        switch (step)
        {
            case StepDeleteSq:
                return NvmeController.MakeCommand(NvmeAdminOpcode.DeleteIoSq, 0, Id);
            case StepDeleteCq:
                return NvmeController.MakeCommand(NvmeAdminOpcode.DeleteIoCq, 0, Id);
            case StepCreateCq:
                // PC; IEN with the vector in bits 31:16 when the controller has interrupts, else polled only.
                cmd = NvmeController.MakeCommand(NvmeAdminOpcode.CreateIoCq, 0, size | Id,
                    InterruptVector >= 0 ? 1u | 2u | ((uint)InterruptVector << 16) : 1u);
                cmd.Prp1 = CqIova;
                return cmd;
            default:
                cmd = NvmeController.MakeCommand(NvmeAdminOpcode.CreateIoSq, 0, size | Id, ((uint)Id << 16) | 1 /* PC */);
                cmd.Prp1 = SqIova;
                return cmd;
        }
    }

    private int FailConnect(int rc, NvmeStatus st)
    {
        ConnectError = rc;
        _ctrl.LogQueueFailure(this, _step, st, rc);
        Interlocked.CompareExchange(ref _state, StateDisconnected, StateConnecting);
        return rc;
    }

    /// <summary>
    /// Synchronous reconnect for tools and tests (never on a reactor that serves other I/O): <see cref="StartConnect"/>
    /// then <see cref="PollConnect"/> until done. Returns 0 or -errno.
    /// </summary>
    public int Reconnect()
    {
        int rc = StartConnect();
        if (rc != 0)
        {
            return rc;
        }

        while ((rc = PollConnect()) == 0)
        {
            Thread.Yield();
        }

        return rc > 0 ? 0 : rc;
    }

    /// <summary>Owner thread: stop using the queue pair (fails outstanding commands; the queues stay on the device until <see cref="Dispose"/>).</summary>
    public void Disconnect()
    {
        MarkDisconnected();
        FailOutstanding(NvmeStatus.AbortedSqDeletion);
    }

    private static readonly NvmeCompletionCallback s_deleteDone = static (arg, status, dw0) =>
    {
        var qp = (NvmeQueuePair)arg!;
        qp.OnDeleteStep(status);
    };

    /// <summary>
    /// Owner thread, last use: fails outstanding commands, then deletes the queues on the controller without waiting
    /// (Delete I/O SQ, then CQ, each submitted from the previous one's completion, reaped by whoever processes admin
    /// completions). When the controller confirms (or no queues exist since a reset), the memory is freed, the queue
    /// id released and <paramref name="disposeAfter"/> (e.g. the owner's bounce buffers, which the device may write
    /// until then) disposed. When the controller refuses or times out, the memory is kept until the controller is
    /// disposed (the device might still write it).
    /// </summary>
    public void BeginDestroy(IDisposable? disposeAfter = null)
    {
        int s = Volatile.Read(ref _state);
        if (s is StateDestroyed or StateDeleting)
        {
            disposeAfter?.Dispose();
            return;
        }

        _disposeAfterDelete = disposeAfter;
        MarkDisconnected();
        FailOutstanding(NvmeStatus.AbortedSqDeletion);
        Volatile.Write(ref _state, StateDeleting);
        if (Id == 0 || _stepPending)
        {
            // Admin queue (the controller frees it), or a create still in flight: the controller keeps it until dispose.
            _ctrl.Orphan(this);
            return;
        }

        if (!_ctrl.QueuesMayExist(_deviceGeneration))
        {
            Free();
            return;
        }

        _step = StepDeleteSq;
        var cmd = MakeStepCommand(StepDeleteSq);
        if (_ctrl.SubmitAdmin(ref cmd, s_deleteDone, this) != 0)
        {
            _ctrl.Orphan(this);
        }
    }

    private void OnDeleteStep(NvmeStatus status)
    {
        if (_step == StepDeleteSq)
        {
            _step = StepDeleteCq;
            var cmd = MakeStepCommand(StepDeleteCq);
            if (_ctrl.SubmitAdmin(ref cmd, s_deleteDone, this) != 0)
            {
                _ctrl.Orphan(this);
            }

            return;
        }

        if (status.IsSuccess || !_ctrl.QueuesMayExist(_deviceGeneration))
        {
            Free();
        }
        else
        {
            _ctrl.Orphan(this);
        }
    }

    /// <summary>Frees the memory and the queue id. Any thread, once the device no longer uses the queues.</summary>
    internal void Free()
    {
        if (Interlocked.Exchange(ref _state, StateDestroyed) == StateDestroyed)
        {
            return;
        }

        if (Id != 0)
        {
            _ctrl.ReleaseQueuePair(this);
        }

        _mem.Dispose();
        var after = Interlocked.Exchange(ref _disposeAfterDelete, null);
        after?.Dispose();
    }

    /// <summary>
    /// Synchronous destroy for tools and tests: <see cref="BeginDestroy"/>, then reaps admin completions until the
    /// queues are deleted (bounded by the admin timeout).
    /// </summary>
    public void Dispose()
    {
        if (Id == 0)
        {
            FailOutstanding(NvmeStatus.AbortedSqDeletion);
            Free();
            return;
        }

        BeginDestroy();
        long deadline = Ticks.Now() + _ctrl.ConnectTimeoutTicks;
        while (Volatile.Read(ref _state) == StateDeleting && Ticks.Now() - deadline < 0 && !_ctrl.IsOrphan(this))
        {
            _ctrl.ProcessAdminCompletions();
            Thread.Yield();
        }
    }
}
