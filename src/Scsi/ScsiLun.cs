using System.Buffers.Binary;
using VhostBackend.Bdev;
using VhostBackend.Platform;
using VhostBackend.Reactors;

namespace VhostBackend.Scsi;

/// <summary>Tunables of a logical unit (what the Block Limits VPD page advertises, and the INQUIRY strings).</summary>
public sealed class ScsiLunOptions
{
    public string Vendor { get; init; } = "VHOSTBE";
    public string Revision { get; init; } = "0001";

    /// <summary>Largest READ/WRITE/VERIFY in bytes (MAXIMUM TRANSFER LENGTH); larger commands get INVALID FIELD IN CDB.</summary>
    public uint MaxTransferBytes { get; init; } = 4 << 20;

    public uint MaxUnmapLbaCount { get; init; } = 4 * 1024 * 1024;
    public uint MaxUnmapDescriptors { get; init; } = 256;
    public ulong MaxWriteSameBlocks { get; init; } = 4 * 1024 * 1024;

    internal static readonly ScsiLunOptions Default = new();
}

/// <summary>
/// A logical unit backed by a bdev (SPDK's spdk_scsi_lun): holds a <see cref="BdevDesc"/> opened read-write or
/// read-only and emulates an SBC-3 direct-access block device on it.
///
/// Threading: <see cref="Execute"/> runs on any reactor with a <see cref="ScsiLunChannel"/> taken on that
/// reactor; the task completes on the same reactor. Shared state (removed flag, pending unit attentions) is
/// touched with atomics only. Bdev events (hot remove, resize) arrive on the reactor that opened the LUN, and
/// <see cref="Removed"/>/<see cref="Resized"/> are raised there.
/// </summary>
public sealed partial class ScsiLun
{

    private static readonly BdevIoCompletion s_ioDone = static (io, ok, arg) => IoDone(io, ok, (ScsiTask)arg!);
    private static readonly Action<object?> s_finish = static t => Finish((ScsiTask)t!);

    private readonly LunIoDevice _ioDevice;
    private readonly Reactor? _owner;
    private int _removed;
    private int _uaReset;
    private int _uaCapacity;
    private TaskCompletionSource? _removedTcs;

    private ScsiLun(BdevManager manager, string bdevName, bool readOnly, ScsiLunOptions? options)
    {
        Options = options ?? ScsiLunOptions.Default;
        ReadOnly = readOnly;
        _owner = Reactor.Current;
        Desc = manager.Open(bdevName, !readOnly, static (type, _, ctx) => ((ScsiLun)ctx!).OnBdevEvent(type), this);
        Bdev = Desc.Bdev;
        _ioDevice = new LunIoDevice(this);
        uint maxBlocks = Options.MaxTransferBytes / Bdev.BlockSize;
        MaxTransferBlocks = Math.Max(1u, maxBlocks);
        SupportsUnmap = !readOnly && Bdev.SupportsIoType(BdevIoType.Unmap);
    }

    /// <summary>
    /// Opens <paramref name="bdevName"/> and returns a LUN on it. Call on a reactor (normally the main one): bdev
    /// events and the LUN's events are delivered there. Throws <see cref="BdevNotFoundException"/> if absent.
    /// </summary>
    public static ScsiLun Open(BdevManager manager, string bdevName, bool readOnly = false, ScsiLunOptions? options = null) =>
        new(manager, bdevName, readOnly, options);

    public Bdev.Bdev Bdev { get; }
    public BdevDesc Desc { get; }
    public bool ReadOnly { get; }
    public ScsiLunOptions Options { get; }

    /// <summary>The device and LUN id it is attached as (set by <see cref="ScsiDevice.AttachLun"/>).</summary>
    public ScsiDevice? Device { get; internal set; }

    public int Id { get; internal set; } = -1;

    public bool IsRemoved => Volatile.Read(ref _removed) != 0;

    /// <summary>Raised (on the opening reactor) after a hot remove drained and closed the descriptor.</summary>
    public event Action<ScsiLun>? Removed;

    /// <summary>Raised (on the opening reactor) when the bdev's block count changed; a unit attention is pending.</summary>
    public event Action<ScsiLun>? Resized;

    internal uint MaxTransferBlocks { get; }
    internal bool SupportsUnmap { get; }

    /// <summary>This reactor's channel to the LUN (reference counted; create it once per queue and reuse it).</summary>
    public ScsiLunChannel GetIoChannel()
    {
        var reactor = Reactor.Current ?? throw new InvalidOperationException("GetIoChannel must be called on a reactor");
        var ch = reactor.GetIoChannel(_ioDevice);
        var lch = (ScsiLunChannel)ch.Context;
        lch.IoChannel = ch;
        return lch;
    }

    /// <summary>Unit attention POWER ON, RESET, OR BUS DEVICE RESET OCCURRED for the next command.</summary>
    internal void SetResetUnitAttention() => Volatile.Write(ref _uaReset, 1);

    /// <summary>Unit attention CAPACITY DATA HAS CHANGED for the next command.</summary>
    internal void SetCapacityUnitAttention() => Volatile.Write(ref _uaCapacity, 1);

    /// <summary>The pending unit attention, consumed (highest priority first), or false if none.</summary>
    private bool TryConsumeUnitAttention(out byte asc, out byte ascq)
    {
        if (Volatile.Read(ref _uaReset) != 0 && Interlocked.Exchange(ref _uaReset, 0) != 0)
        {
            asc = Asc.PowerOnOrReset;
            ascq = 0;
            return true;
        }

        if (Volatile.Read(ref _uaCapacity) != 0 && Interlocked.Exchange(ref _uaCapacity, 0) != 0)
        {
            asc = Asc.ParametersChanged;
            ascq = Asc.AscqCapacityDataHasChanged;
            return true;
        }

        asc = ascq = 0;
        return false;
    }

    private bool PeekUnitAttention(out byte asc, out byte ascq)
    {
        if (Volatile.Read(ref _uaReset) != 0)
        {
            asc = Asc.PowerOnOrReset;
            ascq = 0;
            return true;
        }

        if (Volatile.Read(ref _uaCapacity) != 0)
        {
            asc = Asc.ParametersChanged;
            ascq = Asc.AscqCapacityDataHasChanged;
            return true;
        }

        asc = ascq = 0;
        return false;
    }

    // ---- execution ----------------------------------------------------------------------------------------

    /// <summary>
    /// Executes <paramref name="task"/> on the calling reactor, which must own <c>task.Channel</c> (a channel of
    /// this LUN). The completion fires exactly once, later, on this reactor.
    /// </summary>
    public void Execute(ScsiTask task)
    {
        var ch = task.Channel;
        if (ch is null || ch.Lun != this || !ch.Reactor.IsCurrent)
        {
            throw new InvalidOperationException("ScsiTask.Channel must be a channel of this LUN taken on the calling reactor");
        }

        task.Begin(this);
        ch.Track(task);
        if (IsRemoved || ch.BdevChannel is null)
        {
            ScsiDevice.ExecuteNoLun(task, Device);
            Defer(task);
            return;
        }

        Dispatch(task);
    }

    private void Dispatch(ScsiTask task)
    {
        var cdb = task.CdbPadded;
        byte op = cdb[0];
        if (op is not (ScsiOp.Inquiry or ScsiOp.ReportLuns or ScsiOp.RequestSense) && TryConsumeUnitAttention(out byte uaAsc, out byte uaAscq))
        {
            task.SetCheckCondition(SenseKey.UnitAttention, uaAsc, uaAscq);
            Defer(task);
            return;
        }

        switch (op)
        {
            case ScsiOp.Read6:
            case ScsiOp.Write6:
                {
                    ulong lba = ((ulong)(cdb[1] & 0x1F) << 16) | ((ulong)cdb[2] << 8) | cdb[3];
                    ulong n = cdb[4] == 0 ? 256UL : cdb[4];
                    ReadWrite(task, op == ScsiOp.Write6, lba, n, fua: false, protect: 0);
                    return;
                }

            case ScsiOp.Read10:
            case ScsiOp.Write10:
                ReadWrite(task, op == ScsiOp.Write10, BinaryPrimitives.ReadUInt32BigEndian(cdb[2..]),
                    BinaryPrimitives.ReadUInt16BigEndian(cdb[7..]), (cdb[1] & 0x08) != 0, cdb[1] >> 5);
                return;
            case ScsiOp.Read12:
            case ScsiOp.Write12:
                ReadWrite(task, op == ScsiOp.Write12, BinaryPrimitives.ReadUInt32BigEndian(cdb[2..]),
                    BinaryPrimitives.ReadUInt32BigEndian(cdb[6..]), (cdb[1] & 0x08) != 0, cdb[1] >> 5);
                return;
            case ScsiOp.Read16:
            case ScsiOp.Write16:
                ReadWrite(task, op == ScsiOp.Write16, BinaryPrimitives.ReadUInt64BigEndian(cdb[2..]),
                    BinaryPrimitives.ReadUInt32BigEndian(cdb[10..]), (cdb[1] & 0x08) != 0, cdb[1] >> 5);
                return;
            case ScsiOp.WriteSame10:
                WriteSame(task, BinaryPrimitives.ReadUInt32BigEndian(cdb[2..]), BinaryPrimitives.ReadUInt16BigEndian(cdb[7..]), cdb[1], ndob: false);
                return;
            case ScsiOp.WriteSame16:
                WriteSame(task, BinaryPrimitives.ReadUInt64BigEndian(cdb[2..]), BinaryPrimitives.ReadUInt32BigEndian(cdb[10..]), cdb[1], ndob: (cdb[1] & 0x01) != 0);
                return;
            case ScsiOp.Unmap:
                UnmapCommand(task);
                return;
            case ScsiOp.SynchronizeCache10:
                SynchronizeCache(task, BinaryPrimitives.ReadUInt32BigEndian(cdb[2..]), BinaryPrimitives.ReadUInt16BigEndian(cdb[7..]));
                return;
            case ScsiOp.SynchronizeCache16:
                SynchronizeCache(task, BinaryPrimitives.ReadUInt64BigEndian(cdb[2..]), BinaryPrimitives.ReadUInt32BigEndian(cdb[10..]));
                return;
            case ScsiOp.Verify10:
                Verify(task, BinaryPrimitives.ReadUInt32BigEndian(cdb[2..]), BinaryPrimitives.ReadUInt16BigEndian(cdb[7..]), cdb[1]);
                return;
            case ScsiOp.Verify16:
                Verify(task, BinaryPrimitives.ReadUInt64BigEndian(cdb[2..]), BinaryPrimitives.ReadUInt32BigEndian(cdb[10..]), cdb[1]);
                return;
            default:
                ExecuteNonIo(task, op);
                Defer(task);
                return;
        }
    }

    private bool CheckRange(ScsiTask task, ulong lba, ulong blocks)
    {
        ulong count = Bdev.BlockCount;
        if (lba > count || blocks > count - lba)
        {
            task.SetCheckCondition(SenseKey.IllegalRequest, Asc.LbaOutOfRange, 0);
            return false;
        }

        return true;
    }

    private void ReadWrite(ScsiTask task, bool write, ulong lba, ulong blocks, bool fua, int protect)
    {
        if (protect != 0)
        {
            FailDeferred(task, SenseKey.IllegalRequest, Asc.InvalidFieldInCdb, 1);
            return;
        }

        if (write && ReadOnly)
        {
            FailDeferred(task, SenseKey.DataProtect, Asc.WriteProtected, -1);
            return;
        }

        if (!CheckRange(task, lba, blocks))
        {
            Defer(task);
            return;
        }

        if (blocks == 0)
        {
            Defer(task);
            return;
        }

        if (blocks > MaxTransferBlocks)
        {
            FailDeferred(task, SenseKey.IllegalRequest, Asc.InvalidFieldInCdb, -1);
            return;
        }

        ulong bytes = blocks * Bdev.BlockSize;
        if (task.Direction != (write ? ScsiDataDirection.ToDevice : ScsiDataDirection.FromDevice) || task.TransferLength < bytes)
        {
            // The initiator's buffer cannot hold the transfer the CDB asks for.
            FailDeferred(task, SenseKey.IllegalRequest, Asc.InvalidFieldInCdb, -1);
            return;
        }

        task.BuildWorkPrefix(bytes);
        task.Lba = lba;
        task.Blocks = blocks;
        task.PendingDataTransferred = bytes;
        task.Step = write ? TaskStep.Write : TaskStep.Read;
        task.FlushAfterWrite = write && fua && Bdev.WriteCache && Bdev.SupportsIoType(BdevIoType.Flush);
        Submit(task);
    }

    private void WriteSame(ScsiTask task, ulong lba, ulong blocks, byte flags, bool ndob)
    {
        // flags: WRPROTECT(7-5) ANCHOR(4) UNMAP(3) obsolete PBDATA(2) LBDATA(1) [NDOB(0) for the 16-byte form]
        if ((flags & 0xF6) != 0)
        {
            FailDeferred(task, SenseKey.IllegalRequest, Asc.InvalidFieldInCdb, 1);
            return;
        }

        bool unmap = (flags & 0x08) != 0;
        if (ReadOnly)
        {
            FailDeferred(task, SenseKey.DataProtect, Asc.WriteProtected, -1);
            return;
        }

        if (blocks == 0 || blocks > Options.MaxWriteSameBlocks)
        {
            FailDeferred(task, SenseKey.IllegalRequest, Asc.InvalidFieldInCdb, task.CdbPadded[0] == ScsiOp.WriteSame16 ? 10 : 7);
            return;
        }

        if (!CheckRange(task, lba, blocks))
        {
            Defer(task);
            return;
        }

        uint bs = Bdev.BlockSize;
        bool zero = true;
        if (!ndob)
        {
            var span = task.GetBlockBuffer(bs).Span[..(int)bs];
            if (!task.CopyFromDataOut(span))
            {
                FailDeferred(task, SenseKey.IllegalRequest, Asc.InvalidFieldInCdb, -1);
                return;
            }

            zero = !span.ContainsAnyExcept((byte)0);
            task.DataTransferred = bs;
        }

        task.Lba = lba;
        task.Blocks = blocks;
        if (unmap && SupportsUnmap)
        {
            task.EnsureRanges(1);
            task.Ranges[0] = (lba, blocks);
            task.RangeCount = 1;
            task.RangeIndex = 0;
            task.Step = TaskStep.Unmap;
        }
        else if (zero && Bdev.SupportsIoType(BdevIoType.WriteZeroes))
        {
            task.Step = TaskStep.WriteZeroes;
        }
        else
        {
            if (ndob)
            {
                task.GetBlockBuffer(bs).Span[..(int)bs].Clear();
            }

            task.Step = TaskStep.WriteSameReplicate;
        }

        Submit(task);
    }

    private void UnmapCommand(ScsiTask task)
    {
        var cdb = task.CdbPadded;
        if ((cdb[1] & 0x01) != 0)
        {
            FailDeferred(task, SenseKey.IllegalRequest, Asc.InvalidFieldInCdb, 1); // ANCHOR
            return;
        }

        if (ReadOnly)
        {
            FailDeferred(task, SenseKey.DataProtect, Asc.WriteProtected, -1);
            return;
        }

        if (!SupportsUnmap)
        {
            FailDeferred(task, SenseKey.IllegalRequest, Asc.InvalidCommandOperationCode, 0);
            return;
        }

        int paramLen = BinaryPrimitives.ReadUInt16BigEndian(cdb[7..]);
        if (paramLen == 0)
        {
            Defer(task);
            return;
        }

        if (paramLen < 8)
        {
            FailDeferred(task, SenseKey.IllegalRequest, Asc.ParameterListLengthError, -1);
            return;
        }

        if (task.Direction != ScsiDataDirection.ToDevice || task.TransferLength < (ulong)paramLen)
        {
            FailDeferred(task, SenseKey.IllegalRequest, Asc.InvalidFieldInCdb, 7);
            return;
        }

        Span<byte> header = stackalloc byte[8];
        task.CopyFromDataOut(header);
        int dataLen = BinaryPrimitives.ReadUInt16BigEndian(header);
        int bdLen = BinaryPrimitives.ReadUInt16BigEndian(header[2..]);
        if (dataLen + 2 > paramLen || bdLen + 8 > paramLen || (bdLen & 15) != 0)
        {
            FailDeferred(task, SenseKey.IllegalRequest, Asc.ParameterListLengthError, -1);
            return;
        }

        int count = bdLen / 16;
        if (count > Options.MaxUnmapDescriptors)
        {
            FailDeferred(task, SenseKey.IllegalRequest, Asc.InvalidFieldInParameterList, 2, inCdb: false);
            return;
        }

        // Copy the descriptors out of guest memory once; validate and use only this copy.
        var buf = task.GetScratch(bdLen);
        var descs = buf.AsSpan(0, bdLen);
        task.CopyFromDataOut(descs, 8);
        task.DataTransferred = (ulong)paramLen;
        task.EnsureRanges(count);
        ulong capacity = Bdev.BlockCount;
        ulong total = 0;
        int n = 0;
        for (int i = 0; i < count; i++)
        {
            var d = descs.Slice(i * 16, 16);
            ulong lba = BinaryPrimitives.ReadUInt64BigEndian(d);
            ulong num = BinaryPrimitives.ReadUInt32BigEndian(d[8..]);
            if (lba > capacity || num > capacity - lba)
            {
                task.SetCheckCondition(SenseKey.IllegalRequest, Asc.LbaOutOfRange, 0);
                Defer(task);
                return;
            }

            total += num;
            if (total > Options.MaxUnmapLbaCount)
            {
                FailDeferred(task, SenseKey.IllegalRequest, Asc.InvalidFieldInParameterList, 8 + (i * 16) + 8, inCdb: false);
                return;
            }

            if (num != 0)
            {
                task.Ranges[n++] = (lba, num);
            }
        }

        if (n == 0)
        {
            Defer(task);
            return;
        }

        task.RangeCount = n;
        task.RangeIndex = 0;
        task.Step = TaskStep.Unmap;
        Submit(task);
    }

    private void SynchronizeCache(ScsiTask task, ulong lba, ulong blocks)
    {
        if (!CheckRange(task, lba, blocks))
        {
            Defer(task);
            return;
        }

        if (!Bdev.SupportsIoType(BdevIoType.Flush))
        {
            Defer(task);
            return;
        }

        task.Lba = lba;
        task.Blocks = blocks == 0 ? Bdev.BlockCount - lba : blocks;
        task.Step = TaskStep.Flush;
        Submit(task);
    }

    private void Verify(ScsiTask task, ulong lba, ulong blocks, byte flags)
    {
        // flags: VRPROTECT(7-5) DPO(4) BYTCHK(2-1)
        int bytchk = (flags >> 1) & 3;
        if ((flags & 0xE0) != 0 || bytchk >= 2)
        {
            FailDeferred(task, SenseKey.IllegalRequest, Asc.InvalidFieldInCdb, 1);
            return;
        }

        if (!CheckRange(task, lba, blocks))
        {
            Defer(task);
            return;
        }

        if (bytchk == 0 || blocks == 0)
        {
            Defer(task); // no medium to verify beyond the range: the data is there
            return;
        }

        if (blocks > MaxTransferBlocks || !Bdev.SupportsIoType(BdevIoType.Compare))
        {
            FailDeferred(task, SenseKey.IllegalRequest, Asc.InvalidFieldInCdb, 1);
            return;
        }

        ulong bytes = blocks * Bdev.BlockSize;
        if (task.Direction != ScsiDataDirection.ToDevice || task.TransferLength < bytes)
        {
            FailDeferred(task, SenseKey.IllegalRequest, Asc.InvalidFieldInCdb, -1);
            return;
        }

        task.BuildWorkPrefix(bytes);
        task.Lba = lba;
        task.Blocks = blocks;
        task.PendingDataTransferred = bytes;
        task.Step = TaskStep.Compare;
        Submit(task);
    }

    // ---- bdev submission state machine -------------------------------------------------------------------

    internal static void Resume(ScsiTask task) => Submit(task);

    private static void Submit(ScsiTask task)
    {
        var lun = task.Lun!;
        if (task.AbortRequested)
        {
            task.SetAborted();
            Finish(task);
            return;
        }

        var ch = task.Channel?.BdevChannel;
        if (ch is null)
        {
            task.SetCheckCondition(SenseKey.IllegalRequest, Asc.LogicalUnitNotSupported, 0);
            Defer(task);
            return;
        }

        var desc = lun.Desc;
        int rc;
        switch (task.Step)
        {
            case TaskStep.Read:
                rc = ch.Read(desc, task.Work.AsSpan(0, task.WorkCount), task.Lba, task.Blocks, s_ioDone, task);
                break;
            case TaskStep.Write:
                rc = ch.Write(desc, task.Work.AsSpan(0, task.WorkCount), task.Lba, task.Blocks, s_ioDone, task);
                break;
            case TaskStep.Compare:
                rc = ch.Compare(desc, task.Work.AsSpan(0, task.WorkCount), task.Lba, task.Blocks, s_ioDone, task);
                break;
            case TaskStep.Flush:
                rc = ch.Flush(desc, task.Lba, task.Blocks, s_ioDone, task);
                break;
            case TaskStep.WriteZeroes:
                rc = ch.WriteZeroes(desc, task.Lba, task.Blocks, s_ioDone, task);
                break;
            case TaskStep.Unmap:
                {
                    var (lba, num) = task.Ranges[task.RangeIndex];
                    rc = ch.Unmap(desc, lba, num, s_ioDone, task);
                    break;
                }

            case TaskStep.WriteSameReplicate:
                {
                    // One block buffer referenced by every iovec: the bdev writes it to each block of the chunk.
                    const int chunk = 256;
                    int n = (int)Math.Min(task.Blocks, chunk);
                    task.EnsureWork(n);
                    uint bs = lun.Bdev.BlockSize;
                    var block = task.GetBlockBuffer(bs).ToIoVec((int)bs);
                    for (int i = 0; i < n; i++)
                    {
                        task.Work[i] = block;
                    }

                    task.WorkCount = n;
                    rc = ch.Write(desc, task.Work.AsSpan(0, n), task.Lba, (ulong)n, s_ioDone, task);
                    break;
                }

            default:
                task.SetCheckCondition(SenseKey.HardwareError, Asc.InternalTargetFailure, 0);
                Defer(task);
                return;
        }

        if (rc == 0)
        {
            return;
        }

        if (rc == -Errno.ENOMEM)
        {
            ch.QueueIoWait(task.WaitEntry);
            return;
        }

        switch (-rc)
        {
            case Errno.EINVAL:
                task.SetCheckCondition(SenseKey.IllegalRequest, Asc.LbaOutOfRange, 0); // capacity shrank under us
                break;
            case Errno.EBADF:
                task.SetCheckCondition(SenseKey.DataProtect, Asc.WriteProtected, 0);
                break;
            case Errno.ENODEV:
                task.SetCheckCondition(SenseKey.IllegalRequest, Asc.LogicalUnitNotSupported, 0);
                break;
            default:
                task.SetCheckCondition(SenseKey.IllegalRequest, Asc.InvalidFieldInCdb, 0);
                break;
        }

        Defer(task);
    }

    private static void IoDone(BdevIo io, bool success, ScsiTask task)
    {
        if (!success)
        {
            SetIoError(task, io);
            Finish(task);
            return;
        }

        switch (task.Step)
        {
            case TaskStep.Read:
            case TaskStep.Compare:
                task.DataTransferred = task.PendingDataTransferred;
                break;
            case TaskStep.Write:
                task.DataTransferred = task.PendingDataTransferred;
                if (task.FlushAfterWrite)
                {
                    task.Step = TaskStep.Flush;
                    Submit(task);
                    return;
                }

                break;
            case TaskStep.Unmap:
                if (++task.RangeIndex < task.RangeCount)
                {
                    Submit(task);
                    return;
                }

                break;
            case TaskStep.WriteSameReplicate:
                {
                    ulong done = (ulong)task.WorkCount;
                    task.Lba += done;
                    task.Blocks -= done;
                    if (task.Blocks > 0)
                    {
                        Submit(task);
                        return;
                    }

                    break;
                }
        }

        Finish(task);
    }

    /// <summary>Maps a failed bdev I/O to sense data (NVMe statuses translated as SPDK's scsi_nvme does).</summary>
    private static void SetIoError(ScsiTask task, BdevIo io)
    {
        if (io.Status == BdevIoStatus.Miscompare)
        {
            task.SetCheckCondition(SenseKey.Miscompare, Asc.MiscompareDuringVerify, 0);
            return;
        }

        if (io.Status == BdevIoStatus.Aborted)
        {
            task.SetCheckCondition(SenseKey.AbortedCommand, Asc.NoAdditionalSense, 0);
            return;
        }

        if (io.NvmeStatus != 0)
        {
            int sct = (io.NvmeStatus >> 8) & 0x7;
            int sc = io.NvmeStatus & 0xFF;
            switch (sct, sc)
            {
                case (0, 0x06): // internal device error
                    task.SetCheckCondition(SenseKey.HardwareError, Asc.InternalTargetFailure, 0);
                    return;
                case (0, 0x80): // LBA out of range
                    task.SetCheckCondition(SenseKey.IllegalRequest, Asc.LbaOutOfRange, 0);
                    return;
                case (0, 0x07) or (0, 0x08): // aborted by request / SQ deletion
                    task.SetCheckCondition(SenseKey.AbortedCommand, Asc.NoAdditionalSense, 0);
                    return;
                case (2, 0x81): // unrecovered read error
                    task.SetCheckCondition(SenseKey.MediumError, Asc.UnrecoveredReadError, 0);
                    return;
                case (2, 0x80): // write fault
                    task.SetCheckCondition(SenseKey.MediumError, 0x03, 0x00);
                    return;
                case (2, 0x85): // compare failure
                    task.SetCheckCondition(SenseKey.Miscompare, Asc.MiscompareDuringVerify, 0);
                    return;
                case (2, 0x86): // access denied
                    task.SetCheckCondition(SenseKey.DataProtect, 0x20, 0x02);
                    return;
                case (2, _):
                    task.SetCheckCondition(SenseKey.MediumError, Asc.NoAdditionalSense, 0);
                    return;
            }
        }

        switch (io.Type)
        {
            case BdevIoType.Read:
            case BdevIoType.Compare:
                task.SetCheckCondition(SenseKey.MediumError, Asc.UnrecoveredReadError, 0);
                break;
            case BdevIoType.Write:
                task.SetCheckCondition(SenseKey.MediumError, Asc.WriteError, 0);
                break;
            default:
                task.SetCheckCondition(SenseKey.HardwareError, Asc.InternalTargetFailure, 0);
                break;
        }
    }

    private static void FailDeferred(ScsiTask task, SenseKey key, byte asc, int fieldPointer, bool inCdb = true)
    {
        task.SetCheckCondition(key, asc, 0, fieldPointer, inCdb);
        Defer(task);
    }

    /// <summary>Completes the task from a fresh reactor turn (never inside <see cref="Execute"/>).</summary>
    internal static void Defer(ScsiTask task)
    {
        var reactor = task.TrackedBy?.Reactor ?? Reactor.Current;
        if (reactor is null)
        {
            throw new InvalidOperationException("SCSI tasks run on reactors");
        }

        reactor.Send(s_finish, task);
    }

    /// <summary>Completes the task to the transport: untracks it, applies a pending abort, wakes TMF waiters.</summary>
    internal static void Finish(ScsiTask task)
    {
        if (task.AbortRequested && !task.Aborted)
        {
            task.SetAborted();
        }

        task.TrackedBy?.Untrack(task);
        if (task.TmfWaiters is { Count: > 0 } waiters)
        {
            foreach (var op in waiters)
            {
                op.Release();
            }

            waiters.Clear();
        }

        task.InvokeCompletion();
    }

    // ---- events, removal, task management -------------------------------------------------------------------

    private void OnBdevEvent(BdevEventType type)
    {
        if (type == BdevEventType.Resize)
        {
            SetCapacityUnitAttention();
            Resized?.Invoke(this);
            Device?.RaiseLunResized(this);
        }
        else
        {
            _ = RemoveAsync();
        }
    }

    /// <summary>
    /// Removes the LUN (hot remove, or detach by the control plane): new commands fail with LOGICAL UNIT NOT
    /// SUPPORTED, running tasks complete, every reactor's bdev channel is released, the descriptor is closed,
    /// the LUN leaves its device and <see cref="Removed"/> is raised. Idempotent.
    /// </summary>
    public Task RemoveAsync()
    {
        lock (_ioDevice)
        {
            if (_removedTcs is not null)
            {
                return _removedTcs.Task;
            }

            _removedTcs = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        }

        Volatile.Write(ref _removed, 1);
        var channels = _ioDevice.SnapshotChannels();
        var op = new ScsiRemoveOperation(channels.Length + 1, () =>
        {
            if (_owner is not null && !_owner.IsCurrent)
            {
                _owner.Send(static l => ((ScsiLun)l!).FinishRemove(), this);
            }
            else
            {
                FinishRemove();
            }
        });

        foreach (var ch in channels)
        {
            ch.Reactor.Send(static s =>
            {
                var (c, o) = ((ScsiLunChannel, ScsiRemoveOperation))s!;
                c.BeginDrain(o);
            }, ((ScsiLunChannel)ch.Context, op));
        }

        op.Signal();
        return _removedTcs.Task;
    }

    private void FinishRemove()
    {
        Desc.Dispose();
        Device?.DetachLun(this);
        Removed?.Invoke(this);
        _removedTcs!.TrySetResult();
    }

    /// <summary>Applies <paramref name="op"/> to the tasks on every reactor's channel of this LUN.</summary>
    internal void ApplyTmf(ScsiTmfOperation op)
    {
        foreach (var ch in _ioDevice.SnapshotChannels())
        {
            op.AddPending();
            ch.Reactor.Send(static s =>
            {
                var (c, o) = ((ScsiLunChannel, ScsiTmfOperation))s!;
                c.ApplyTmf(o);
                o.Release();
            }, ((ScsiLunChannel)ch.Context, op));
        }
    }

    public override string ToString() => $"LUN{Id}({Bdev.Name})";

    private sealed class LunIoDevice : IoDevice
    {
        private readonly ScsiLun _lun;

        public LunIoDevice(ScsiLun lun)
            : base("scsi_lun:" + lun.Bdev.Name) => _lun = lun;

        protected override object CreateChannelContext(Reactor reactor) => new ScsiLunChannel(_lun, reactor);

        protected override void DestroyChannelContext(Reactor reactor, object context) => ((ScsiLunChannel)context).Destroy();
    }
}
