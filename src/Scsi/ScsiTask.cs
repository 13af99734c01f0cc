using VhostBackend.Bdev;
using VhostBackend.Platform;

namespace VhostBackend.Scsi;

/// <summary>Completion callback of a <see cref="ScsiTask"/>: fires exactly once per <see cref="ScsiLun.Execute"/>, on the executing reactor.</summary>
public delegate void ScsiTaskCompletion(ScsiTask task, object? state);

/// <summary>
/// One SCSI command: a pooled, reusable request object (the transport owns the pool; nothing is allocated per
/// command once a task has warmed up).
///
/// Ownership: the transport fills the inputs (<see cref="SetCdb"/>, <see cref="LunId"/>, <see cref="Tag"/>,
/// <see cref="SetData"/>, <see cref="SetCompletion"/>, <see cref="Channel"/>) and calls
/// <see cref="ScsiLun.Execute"/> (or <see cref="ScsiDevice.Execute"/>). From then until the completion callback
/// runs, the SCSI layer owns the task and reads/writes the data buffers (host pointers into guest memory, used
/// zero-copy for READ/WRITE); the transport must not touch either. In the callback the outputs are valid:
/// <see cref="Status"/>, <see cref="Sense"/>, <see cref="DataTransferred"/>, <see cref="Residual"/>,
/// <see cref="Aborted"/>. The completion never runs inside the Execute call.
/// </summary>
public sealed class ScsiTask
{
    public const int MaxCdbLength = 32;

    /// <summary>Room for fixed-format sense data (18 bytes used) and descriptor-format headers.</summary>
    public const int SenseBufferLength = 32;

    internal const int FixedSenseLength = 18;

    private readonly byte[] _cdb = new byte[MaxCdbLength];
    private readonly byte[] _sense = new byte[SenseBufferLength];
    private IoVec[] _iovs = new IoVec[8];
    private int _iovCount;
    private ScsiTaskCompletion? _completion;

    public ScsiTask()
    {
        WaitEntry = new BdevIoWaitEntry(static t => ScsiLun.Resume((ScsiTask)t!), this);
    }

    // ---- inputs -------------------------------------------------------------------------------------------

    /// <summary>The CDB (zero-padded to <see cref="MaxCdbLength"/>; length as given to <see cref="SetCdb"/>).</summary>
    public ReadOnlySpan<byte> Cdb => _cdb.AsSpan(0, CdbLength);

    public int CdbLength { get; private set; }

    /// <summary>The CDB buffer, always 32 bytes (zero padded), so decoding never reads past it whatever the opcode claims.</summary>
    internal ReadOnlySpan<byte> CdbPadded => _cdb;

    /// <summary>LUN the command addresses (decoded by the transport).</summary>
    public int LunId { get; set; }

    /// <summary>Initiator's task tag (for ABORT TASK / QUERY TASK).</summary>
    public ulong Tag { get; set; }

    public ScsiDataDirection Direction { get; private set; }

    /// <summary>The data buffer (data-out for <see cref="ScsiDataDirection.ToDevice"/>, data-in otherwise).</summary>
    public ReadOnlySpan<IoVec> Iovs => _iovs.AsSpan(0, _iovCount);

    /// <summary>Bytes the data buffer holds (sum of the iovecs): the expected data transfer length.</summary>
    public ulong TransferLength { get; private set; }

    /// <summary>The per-reactor LUN channel the task runs on (from <see cref="ScsiLun.GetIoChannel"/> on this reactor).</summary>
    public ScsiLunChannel? Channel { get; set; }

    /// <summary>The bdev channel the task's I/O goes through.</summary>
    public BdevChannel? BdevChannel => Channel?.BdevChannel;

    public object? CompletionState { get; private set; }

    // ---- outputs ------------------------------------------------------------------------------------------

    public ScsiStatus Status { get; internal set; }

    /// <summary>Sense data (fixed format) when <see cref="Status"/> is CHECK CONDITION; empty otherwise.</summary>
    public ReadOnlySpan<byte> Sense => _sense.AsSpan(0, SenseLength);

    public int SenseLength { get; private set; }

    /// <summary>Bytes moved through the data buffer.</summary>
    public ulong DataTransferred { get; internal set; }

    /// <summary>Bytes of the data buffer not transferred (residual count).</summary>
    public ulong Residual => TransferLength > DataTransferred ? TransferLength - DataTransferred : 0;

    /// <summary>The task was aborted by a task management function (status TASK ABORTED, no sense).</summary>
    public bool Aborted { get; internal set; }

    /// <summary>Sense key of the sense data, for tests and logs.</summary>
    public SenseKey SenseKey => SenseLength >= FixedSenseLength ? (SenseKey)(_sense[2] & 0x0F) : SenseKey.NoSense;

    public byte Asc => SenseLength >= FixedSenseLength ? _sense[12] : (byte)0;

    public byte Ascq => SenseLength >= FixedSenseLength ? _sense[13] : (byte)0;

    // ---- execution state (owned by the SCSI layer while the task runs) --------------------------------------

    internal readonly BdevIoWaitEntry WaitEntry;
    internal ScsiLun? Lun;
    internal TaskStep Step;
    internal ulong Lba;
    internal ulong Blocks;
    internal bool FlushAfterWrite;
    internal ulong PendingDataTransferred;
    internal IoVec[] Work = new IoVec[8];
    internal int WorkCount;
    internal (ulong Lba, ulong Count)[] Ranges = new (ulong, ulong)[1];
    internal int RangeCount;
    internal int RangeIndex;
    internal PinnedArray<byte>? BlockBuffer; // pinned: one logical block for WRITE SAME
    internal byte[]? Scratch; // parameter lists copied out of guest memory (validated once, never re-read)
    internal ScsiLunChannel? TrackedBy;
    internal ScsiTask? Prev;
    internal ScsiTask? Next;
    internal bool AbortRequested;
    internal List<ScsiTmfOperation>? TmfWaiters;
    internal bool Running;

    /// <summary>Copies the CDB in. Returns false (and leaves the task unchanged) if it is empty or longer than 32 bytes.</summary>
    public bool SetCdb(ReadOnlySpan<byte> cdb)
    {
        if (cdb.Length == 0 || cdb.Length > MaxCdbLength)
        {
            return false;
        }

        cdb.CopyTo(_cdb);
        _cdb.AsSpan(cdb.Length).Clear();
        CdbLength = cdb.Length;
        return true;
    }

    /// <summary>Sets the data buffer (copied; the array grows once per size class and is reused).</summary>
    public void SetData(ScsiDataDirection direction, ReadOnlySpan<IoVec> iovs)
    {
        iovs.CopyTo(PrepareData(direction, iovs.Length));
        ComputeTransferLength();
    }

    /// <summary>Sets no data buffer.</summary>
    public void SetNoData() => SetData(ScsiDataDirection.None, default);

    /// <summary>
    /// Returns room for <paramref name="count"/> iovecs for the transport to fill in place (no copy). The
    /// transfer length is computed when the task executes.
    /// </summary>
    public Span<IoVec> PrepareData(ScsiDataDirection direction, int count)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(count);
        if (count > _iovs.Length)
        {
            _iovs = new IoVec[Math.Max(count, _iovs.Length * 2)];
        }

        Direction = count == 0 ? ScsiDataDirection.None : direction;
        _iovCount = count;
        return _iovs.AsSpan(0, count);
    }

    public void SetCompletion(ScsiTaskCompletion completion, object? state)
    {
        _completion = completion;
        CompletionState = state;
    }

    private void ComputeTransferLength()
    {
        ulong total = 0;
        for (int i = 0; i < _iovCount; i++)
        {
            total += _iovs[i].Length;
        }

        TransferLength = total;
    }

    /// <summary>Resets outputs and execution state before a run.</summary>
    internal void Begin(ScsiLun? lun)
    {
        if (Running)
        {
            throw new InvalidOperationException("ScsiTask executed while still running");
        }

        Running = true;
        ComputeTransferLength();
        Lun = lun;
        Status = ScsiStatus.Good;
        SenseLength = 0;
        DataTransferred = 0;
        PendingDataTransferred = 0;
        Aborted = false;
        AbortRequested = false;
        Step = TaskStep.None;
        FlushAfterWrite = false;
        WorkCount = 0;
        RangeCount = 0;
        RangeIndex = 0;
    }

    internal void InvokeCompletion()
    {
        Running = false;
        var cb = _completion ?? throw new InvalidOperationException("ScsiTask has no completion callback");
        cb(this, CompletionState);
    }

    // ---- status helpers -----------------------------------------------------------------------------------

    internal void SetGood()
    {
        Status = ScsiStatus.Good;
        SenseLength = 0;
    }

    /// <summary>CHECK CONDITION with fixed-format sense data (current error).</summary>
    internal void SetCheckCondition(SenseKey key, byte asc, byte ascq, int fieldPointer = -1, bool inCdb = true)
    {
        Status = ScsiStatus.CheckCondition;
        WriteFixedSense(_sense, key, asc, ascq, fieldPointer, inCdb);
        SenseLength = FixedSenseLength;
    }

    internal void SetAborted()
    {
        Aborted = true;
        Status = ScsiStatus.TaskAborted;
        SenseLength = 0;
    }

    /// <summary>Fixed-format sense data (SPC-4 4.5.3), 18 bytes; optional sense-key-specific field pointer.</summary>
    internal static void WriteFixedSense(Span<byte> s, SenseKey key, byte asc, byte ascq, int fieldPointer = -1, bool inCdb = true)
    {
        s[..FixedSenseLength].Clear();
        s[0] = 0x70; // current error, fixed format, INFORMATION not valid
        s[2] = (byte)((byte)key & 0x0F);
        s[7] = FixedSenseLength - 8; // additional sense length
        s[12] = asc;
        s[13] = ascq;
        if (fieldPointer >= 0 && key == SenseKey.IllegalRequest)
        {
            s[15] = (byte)(0x80 | (inCdb ? 0x40 : 0)); // SKSV, C/D
            s[16] = (byte)(fieldPointer >> 8);
            s[17] = (byte)fieldPointer;
        }
    }

    // ---- data movement (SAFETY: the transport validated that every iovec maps guest memory it may access) ---

    /// <summary>Copies a response into the data-in buffer: at most <paramref name="limit"/> bytes and the buffer's capacity.</summary>
    internal ulong CopyToDataIn(ReadOnlySpan<byte> data, ulong limit)
    {
        if (Direction != ScsiDataDirection.FromDevice)
        {
            return 0;
        }

        return IoVecs.CopyFrom(data, _iovs.AsSpan(0, _iovCount), Math.Min(limit, TransferLength));
    }

    /// <summary>Copies <paramref name="dest"/>.Length bytes of the data-out buffer starting at <paramref name="offset"/>. False if it holds fewer.</summary>
    internal bool CopyFromDataOut(Span<byte> dest, ulong offset = 0)
    {
        if (Direction != ScsiDataDirection.ToDevice || offset > TransferLength || (ulong)dest.Length > TransferLength - offset)
        {
            return false;
        }

        return IoVecs.CopyTo(_iovs.AsSpan(0, _iovCount), offset, dest);
    }

    /// <summary>Fills <see cref="Work"/> with the prefix of the data buffer covering <paramref name="bytes"/> (which must fit).</summary>
    internal void BuildWorkPrefix(ulong bytes)
    {
        int n = 0;
        ulong left = bytes;
        for (int i = 0; i < _iovCount && left > 0; i++)
        {
            ulong take = Math.Min((ulong)_iovs[i].Length, left);
            if (take == 0)
            {
                continue;
            }

            EnsureWork(n + 1);
            Work[n++] = new IoVec(_iovs[i].Base, (nuint)take);
            left -= take;
        }

        WorkCount = n;
    }

    internal void EnsureWork(int count)
    {
        if (count > Work.Length)
        {
            Array.Resize(ref Work, Math.Max(count, Work.Length * 2));
        }
    }

    internal void EnsureRanges(int count)
    {
        if (count > Ranges.Length)
        {
            Ranges = new (ulong, ulong)[Math.Max(count, Ranges.Length * 2)];
        }
    }

    internal PinnedArray<byte> GetBlockBuffer(uint blockSize)
    {
        if (BlockBuffer is null || BlockBuffer.Length < blockSize)
        {
            BlockBuffer = new PinnedArray<byte>((int)blockSize);
        }

        return BlockBuffer;
    }

    internal byte[] GetScratch(int size)
    {
        if (Scratch is null || Scratch.Length < size)
        {
            Scratch = new byte[Math.Max(size, 512)];
        }

        return Scratch;
    }

    public override string ToString() => $"ScsiTask(op=0x{(_cdb[0]):x2}, lun={LunId}, tag={Tag}, status={Status})";
}

internal enum TaskStep : byte
{
    None,
    Read,
    Write,
    Flush,
    Unmap,
    WriteZeroes,
    WriteSameReplicate,
    Compare,
}
