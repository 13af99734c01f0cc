using System.Buffers.Binary;
using Microsoft.Extensions.Logging;
using VhostBackend.Bdev;
using VhostBackend.Platform;
using VhostBackend.Reactors;
using VhostBackend.VhostUser;
using VhostBackend.Virtio;
using VhostBackend.Virtio.Scsi;

namespace VhostBackend.BdevVirtio;

/// <summary>
/// A reactor's channel to a virtio-user SCSI device (SPDK's bdev_virtio_scsi channel): it owns one request queue
/// (index 2 and up) and carries the I/O of every target bdev of the controller. Each request is a command request
/// (LUN = the target's LUN 0, a CDB), data and a response, all in the shared memory: the request and response in
/// the slot's metadata, the data in the slot's bounce buffer or, when the I/O buffer is in the shared arena, by
/// address. As <see cref="VirtioBlkChannel"/>: one reactor, nothing allocated or locked per I/O, I/O that finds no
/// slot or descriptor waits in a FIFO drained by the poller, a broken ring or a closed connection fails the queue.
/// The response is the back end's: its response code, status, residual and sense length are checked before use.
/// </summary>
internal sealed class VirtioScsiChannel
{
    private readonly VirtioUserController _ctrl;
    private readonly Reactor _reactor;
    private readonly VirtioUserQueue? _queue;
    private readonly VirtqueueDriver? _driver;
    private readonly BdevIo?[] _ios;
    private readonly bool[] _bounced;
    private readonly int[] _free;
    private readonly Queue<BdevIo> _waiting;
    private readonly Poller? _poller;
    private readonly Poller? _connPoller;
    private readonly bool _indirect;
    private int _freeCount;
    private bool _failed;
    private bool _inPoll;
    private bool _unpublished;
    private LogRateLimiter _errorLog = new(burst: 16, perSecond: 1); // the back end decides how many I/O fail

    public VirtioScsiChannel(VirtioUserController ctrl, Reactor reactor)
    {
        _ctrl = ctrl;
        _reactor = reactor;
        _queue = ctrl.ClaimQueue();
        _indirect = ctrl.Has(VirtioFeatures.RingIndirectDesc);
        int slots = _queue?.SlotCount ?? 1;
        _ios = new BdevIo?[slots];
        _bounced = new bool[slots];
        _free = new int[slots];
        _waiting = new Queue<BdevIo>(1024);
        if (_queue is null)
        {
            ctrl.Logger.LogError("virtio-user {Name}: no free request queue for {Reactor} (vq_count {Count} is less than the reactors using it); its I/O fails",
                ctrl.CtrlName, reactor, ctrl.VqCount);
            _failed = true;
            return;
        }

        _driver = _queue.Driver;
        for (int i = 0; i < slots; i++)
        {
            _free[i] = slots - 1 - i;
        }

        _freeCount = slots;
        _poller = reactor.RegisterPoller("bdev_virtio_scsi_poll:" + ctrl.CtrlName + ":q" + _queue.Index, static c => ((VirtioScsiChannel)c!).Poll(), this);
        reactor.SetPollerInterrupt(_poller, _queue.Call.Fd, static (c, arm) => ((VirtioScsiChannel)c!).Arm(arm));
        _connPoller = reactor.RegisterPoller("bdev_virtio_scsi_conn:" + ctrl.CtrlName + ":q" + _queue.Index, static c => ((VirtioScsiChannel)c!).CheckConnection(), this, 100_000);
    }

    /// <summary>The queue this channel owns (null: none was free).</summary>
    public int QueueIndex => _queue?.Index ?? -1;

    /// <summary>Commands that ended in an error (response code, SCSI status or residual); the sense is logged.</summary>
    public long Errors { get; private set; }

    private int CheckConnection()
    {
        if (_failed || !_ctrl.CheckConnection())
        {
            return 0;
        }

        FailQueue();
        return 1;
    }

    private bool Arm(bool arm)
    {
        var drv = _driver!;
        if (!arm)
        {
            drv.DisableInterrupts();
            return false;
        }

        _queue!.Call.Drain();
        if (_failed)
        {
            return _waiting.Count > 0;
        }

        return drv.EnableInterrupts() || (_waiting.Count > 0 && _freeCount > 0);
    }

    public void Submit(BdevIo io)
    {
        if (_failed)
        {
            io.Complete(BdevIoStatus.Failed);
            return;
        }

        if (_waiting.Count > 0 || !TryStart(io))
        {
            _waiting.Enqueue(io);
        }
    }

    /// <summary>
    /// Puts one request on <paramref name="q"/>'s ring: through the slot's indirect table when
    /// VIRTIO_F_RING_INDIRECT_DESC was negotiated, else as a direct chain. Returns the head, or -1 when the ring has
    /// no room. Not published.
    /// </summary>
    internal static int Add(VirtioUserQueue q, bool indirect, int slot, ReadOnlySpan<DriverBuffer> bufs)
    {
        var drv = q.Driver;
        if (!indirect)
        {
            return drv.TryAdd(bufs, slot);
        }

        ulong table = q.SlotGpa(slot) + VirtioUserQueue.TableOffset;
        for (int i = 0; i < bufs.Length; i++)
        {
            if (drv.IsPacked)
            {
                q.Memory.WritePackedDesc(table + (ulong)(16 * i), bufs[i].Addr, bufs[i].Length, bufs[i].Flags);
            }
            else
            {
                q.Memory.WriteDesc(table + (ulong)(16 * i), bufs[i].Addr, bufs[i].Length, (ushort)(bufs[i].Flags | (i < bufs.Length - 1 ? VirtqDesc.FlagNext : 0)), (ushort)(i + 1));
            }
        }

        var one = new DriverBuffer(table, (uint)(16 * bufs.Length), VirtqDesc.FlagIndirect);
        return drv.TryAdd(new ReadOnlySpan<DriverBuffer>(in one), slot);
    }

    /// <summary>Writes the command request header of <paramref name="slot"/> (LUN 0 of <paramref name="target"/>) and returns its CDB, zeroed.</summary>
    internal static Span<byte> BeginCommand(VirtioUserQueue q, int slot, int target)
    {
        ref var req = ref q.Memory.Ref<VirtioScsiCmdReq>(q.SlotGpa(slot) + VirtioUserQueue.ScsiReqOffset);
        req = default;
        Span<byte> lun = req.Lun;
        lun[0] = 1;
        lun[1] = (byte)target;
        req.Tag = (ulong)slot;

        // The response: a code no device sends, so a request the back end completes without writing it fails.
        ref var resp = ref q.Memory.Ref<VirtioScsiCmdResp>(q.SlotGpa(slot) + VirtioUserQueue.ScsiRespOffset);
        resp.SenseLen = 0;
        resp.Resid = 0;
        resp.Status = 0;
        resp.Response = 0xFF;
        return req.Cdb;
    }

    /// <summary>Starts the I/O, or returns false when it must wait for a slot or descriptors.</summary>
    private bool TryStart(BdevIo io)
    {
        if (_freeCount == 0)
        {
            return false;
        }

        var q = _queue!;
        int slot = _free[_freeCount - 1];
        var disk = (VirtioScsiBdev)io.Bdev;
        ulong slotGpa = q.SlotGpa(slot);
        ulong bounceGpa = q.BounceGpa(slot);
        var cdb = BeginCommand(q, slot, disk.Target);
        Span<DriverBuffer> bufs = stackalloc DriverBuffer[3];
        bufs[0] = new DriverBuffer(slotGpa + VirtioUserQueue.ScsiReqOffset, VirtioScsi.CmdReqSize, 0);
        var resp = new DriverBuffer(slotGpa + VirtioUserQueue.ScsiRespOffset, VirtioScsi.CmdRespSize, VirtqDesc.FlagWrite);
        int n;
        switch (io.Type)
        {
            case BdevIoType.Read:
            case BdevIoType.Write:
            {
                ulong len = io.Length;
                if (len > (ulong)q.BounceBytes || io.NumBlocks > ushort.MaxValue)
                {
                    // The bdev layer splits at MaxTransferBlocks; a larger request is a bug upstream.
                    io.Complete(BdevIoStatus.Failed);
                    return true;
                }

                bool read = io.Type == BdevIoType.Read;
                if (disk.Use16ByteCdb)
                {
                    cdb[0] = read ? ScsiCdb.Read16 : ScsiCdb.Write16;
                    BinaryPrimitives.WriteUInt64BigEndian(cdb[2..], io.OffsetBlocks);
                    BinaryPrimitives.WriteUInt32BigEndian(cdb[10..], (uint)io.NumBlocks);
                }
                else
                {
                    cdb[0] = read ? ScsiCdb.Read10 : ScsiCdb.Write10;
                    BinaryPrimitives.WriteUInt32BigEndian(cdb[2..], (uint)io.OffsetBlocks);
                    BinaryPrimitives.WriteUInt16BigEndian(cdb[7..], (ushort)io.NumBlocks);
                }

                DriverBuffer data;
                var iovs = io.Iovs;
                if (iovs.Length == 1 && _ctrl.Shared is { } shared && shared.TryTranslate(iovs[0].Base, len, out ulong sharedOffset))
                {
                    _bounced[slot] = false;
                    data = new DriverBuffer(VirtioUserController.SharedGpa + sharedOffset, (uint)len, read ? VirtqDesc.FlagWrite : (ushort)0);
                }
                else
                {
                    _bounced[slot] = true;
                    if (!read)
                    {
                        CopyIn(io, q.Memory, bounceGpa);
                    }

                    data = new DriverBuffer(bounceGpa, (uint)len, read ? VirtqDesc.FlagWrite : (ushort)0);
                }

                // Device-readable buffers first: request, data-out, response; or request, response, data-in.
                bufs[1] = read ? resp : data;
                bufs[2] = read ? data : resp;
                n = 3;
                break;
            }

            case BdevIoType.Flush:
                // SYNCHRONIZE CACHE (10) with LBA 0 and 0 blocks: the whole medium.
                cdb[0] = ScsiCdb.SynchronizeCache10;
                bufs[1] = resp;
                n = 2;
                break;
            case BdevIoType.Unmap:
            {
                // One block descriptor: MaxUnmapBlocks keeps every unmap within 32 bits of blocks.
                if (io.NumBlocks > uint.MaxValue)
                {
                    io.Complete(BdevIoStatus.Failed);
                    return true;
                }

                var p = q.Memory.Bytes(bounceGpa, ScsiCdb.UnmapParamBytes);
                p.Clear();
                BinaryPrimitives.WriteUInt16BigEndian(p, ScsiCdb.UnmapParamBytes - 2);
                BinaryPrimitives.WriteUInt16BigEndian(p[2..], ScsiCdb.UnmapParamBytes - 8);
                BinaryPrimitives.WriteUInt64BigEndian(p[8..], io.OffsetBlocks);
                BinaryPrimitives.WriteUInt32BigEndian(p[16..], (uint)io.NumBlocks);
                cdb[0] = ScsiCdb.Unmap;
                BinaryPrimitives.WriteUInt16BigEndian(cdb[7..], ScsiCdb.UnmapParamBytes);
                _bounced[slot] = false;
                bufs[1] = new DriverBuffer(bounceGpa, ScsiCdb.UnmapParamBytes, 0);
                bufs[2] = resp;
                n = 3;
                break;
            }

            default:
                io.Complete(BdevIoStatus.Failed);
                return true;
        }

        if (Add(q, _indirect, slot, bufs[..n]) < 0)
        {
            return false;
        }

        _freeCount--;
        _ios[slot] = io;
        if (_inPoll)
        {
            _unpublished = true;
        }
        else
        {
            PublishAndKick();
        }

        return true;
    }

    private void PublishAndKick()
    {
        var drv = _driver!;
        drv.Publish();
        if (drv.NeedsKick())
        {
            _queue!.Kick.Signal();
        }
    }

    private static void CopyIn(BdevIo io, DriverMemory memory, ulong dst)
    {
        foreach (var v in io.Iovs)
        {
            memory.CopyFromHost(v.Base, dst, (int)v.Length);
            dst += v.Length;
        }
    }

    private static void CopyOut(BdevIo io, DriverMemory memory, ulong src)
    {
        foreach (var v in io.Iovs)
        {
            memory.CopyToHost(src, v.Base, (int)v.Length);
            src += v.Length;
        }
    }

    private int Poll()
    {
        if (_failed)
        {
            FailWaiting();
            return 0;
        }

        var drv = _driver!;
        var q = _queue!;
        int done = 0;
        _inPoll = true;
        while (true)
        {
            var r = drv.TryPopUsed(out int slot, out uint usedLen);
            if (r == UsedResult.Empty)
            {
                break;
            }

            if (r == UsedResult.Broken || (uint)slot >= (uint)_ios.Length || _ios[slot] is null)
            {
                _ctrl.Logger.LogError("virtio-user {Name}: queue {Queue}: the back end broke the used ring (used idx past what is in flight, or an unknown head); failing the queue's I/O",
                    _ctrl.CtrlName, q.Index);
                _inPoll = false;
                FailQueue();
                return done + 1;
            }

            var io = _ios[slot]!;
            _ios[slot] = null;
            bool ok = CheckResponse(q, slot, usedLen, io);
            if (ok && io.Type == BdevIoType.Read && _bounced[slot])
            {
                CopyOut(io, q.Memory, q.BounceGpa(slot));
            }

            _free[_freeCount++] = slot;
            done++;
            io.Complete(ok ? BdevIoStatus.Success : BdevIoStatus.Failed);
        }

        while (_waiting.Count > 0 && !_failed)
        {
            if (!TryStart(_waiting.Peek()))
            {
                break;
            }

            _waiting.Dequeue();
            done++;
        }

        _inPoll = false;
        if (_unpublished)
        {
            _unpublished = false;
            PublishAndKick();
        }

        return done;
    }

    /// <summary>
    /// Success only for response VIRTIO_SCSI_S_OK, status GOOD, no residual and a used length that covers the
    /// response header. Anything else fails the I/O and logs the response and sense (key, ASC, ASCQ).
    /// </summary>
    private bool CheckResponse(VirtioUserQueue q, int slot, uint usedLen, BdevIo io)
    {
        ref var resp = ref q.Memory.Ref<VirtioScsiCmdResp>(q.SlotGpa(slot) + VirtioUserQueue.ScsiRespOffset);
        if (usedLen >= VirtioScsi.CmdRespHeaderSize && resp.Response == VirtioScsi.SOk && resp.Status == ScsiCdb.StatusGood && resp.Resid == 0)
        {
            return true;
        }

        Errors++;
        if (_errorLog.TryAcquire(Ticks.Now(), out long suppressed))
        {
            var (sk, asc, ascq) = ScsiCdb.Sense(ref resp);
            _ctrl.Logger.LogWarning("virtio-user {Name}: {Bdev} {Type} at block {Lba} x{Blocks} failed: response {Response}, status 0x{Status:x2}, residual {Resid}, sense key 0x{Sk:x}, ASC/ASCQ 0x{Asc:x2}/0x{Ascq:x2} (used length {Len}; {Suppressed} similar lines suppressed)",
                _ctrl.CtrlName, io.Bdev.Name, io.Type, io.OffsetBlocks, io.NumBlocks, resp.Response, resp.Status, resp.Resid, sk, asc, ascq, usedLen, suppressed);
        }

        return false;
    }

    private void FailQueue()
    {
        _failed = true;
        _queue!.Broken = true;
        for (int i = 0; i < _ios.Length; i++)
        {
            if (_ios[i] is { } io)
            {
                _ios[i] = null;
                io.Complete(BdevIoStatus.Failed);
            }
        }

        FailWaiting();
    }

    private void FailWaiting()
    {
        while (_waiting.TryDequeue(out var io))
        {
            io.Complete(BdevIoStatus.Failed);
        }
    }

    public void Destroy()
    {
        if (_poller is not null)
        {
            _reactor.UnregisterPoller(_poller);
        }

        if (_connPoller is not null)
        {
            _reactor.UnregisterPoller(_connPoller);
        }

        FailWaiting();
        if (_queue is not null)
        {
            _ctrl.ReleaseQueue(_queue);
        }
    }
}
