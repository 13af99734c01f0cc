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
/// address. The slots, the FIFO of waiting I/O, polling and failure are <see cref="VirtioUserChannel"/>'s.
/// The response is the back end's: its response code, status, residual and sense length are checked before use.
/// </summary>
internal sealed class VirtioScsiChannel : VirtioUserChannel
{
    private LogRateLimiter _errorLog = new(burst: 16, perSecond: 1); // the back end decides how many I/O fail

    public VirtioScsiChannel(VirtioUserController ctrl, Reactor reactor)
        : base(ctrl, reactor, "bdev_virtio_scsi", "request queue")
    {
    }

    /// <summary>Commands that ended in an error (response code, SCSI status or residual); the sense is logged.</summary>
    public long Errors { get; private set; }

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

    protected override int BuildRequest(BdevIo io, VirtioUserQueue q, int slot, Span<DriverBuffer> bufs)
    {
        var disk = (VirtioScsiBdev)io.Bdev;
        ulong slotGpa = q.SlotGpa(slot);
        ulong bounceGpa = q.BounceGpa(slot);
        var cdb = BeginCommand(q, slot, disk.Target);
        bufs[0] = new DriverBuffer(slotGpa + VirtioUserQueue.ScsiReqOffset, VirtioScsi.CmdReqSize, 0);
        var resp = new DriverBuffer(slotGpa + VirtioUserQueue.ScsiRespOffset, VirtioScsi.CmdRespSize, VirtqDesc.FlagWrite);
        switch (io.Type)
        {
            case BdevIoType.Read:
            case BdevIoType.Write:
            {
                if (io.NumBlocks > ushort.MaxValue || !TryDataBuffer(io, slot, out var data))
                {
                    // The bdev layer splits at MaxTransferBlocks; a larger request is a bug upstream.
                    io.Complete(BdevIoStatus.Failed);
                    return 0;
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

                // Device-readable buffers first: request, data-out, response; or request, response, data-in.
                bufs[1] = read ? resp : data;
                bufs[2] = read ? data : resp;
                return 3;
            }

            case BdevIoType.Flush:
                // SYNCHRONIZE CACHE (10) with LBA 0 and 0 blocks: the whole medium.
                cdb[0] = ScsiCdb.SynchronizeCache10;
                bufs[1] = resp;
                return 2;
            case BdevIoType.Unmap:
            {
                // One block descriptor: MaxUnmapBlocks keeps every unmap within 32 bits of blocks.
                if (io.NumBlocks > uint.MaxValue)
                {
                    io.Complete(BdevIoStatus.Failed);
                    return 0;
                }

                var p = q.Memory.Bytes(bounceGpa, ScsiCdb.UnmapParamBytes);
                p.Clear();
                BinaryPrimitives.WriteUInt16BigEndian(p, ScsiCdb.UnmapParamBytes - 2);
                BinaryPrimitives.WriteUInt16BigEndian(p[2..], ScsiCdb.UnmapParamBytes - 8);
                BinaryPrimitives.WriteUInt64BigEndian(p[8..], io.OffsetBlocks);
                BinaryPrimitives.WriteUInt32BigEndian(p[16..], (uint)io.NumBlocks);
                cdb[0] = ScsiCdb.Unmap;
                BinaryPrimitives.WriteUInt16BigEndian(cdb[7..], ScsiCdb.UnmapParamBytes);
                bufs[1] = new DriverBuffer(bounceGpa, ScsiCdb.UnmapParamBytes, 0);
                bufs[2] = resp;
                return 3;
            }

            default:
                io.Complete(BdevIoStatus.Failed);
                return 0;
        }
    }

    /// <summary>
    /// Success only for response VIRTIO_SCSI_S_OK, status GOOD, no residual and a used length that covers the
    /// response header. Anything else fails the I/O and logs the response and sense (key, ASC, ASCQ).
    /// </summary>
    protected override bool Succeeded(BdevIo io, VirtioUserQueue q, int slot, uint usedLen)
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
            Ctrl.Logger.LogWarning("virtio-user {Name}: {Bdev} {Type} at block {Lba} x{Blocks} failed: response {Response}, status 0x{Status:x2}, residual {Resid}, sense key 0x{Sk:x}, ASC/ASCQ 0x{Asc:x2}/0x{Ascq:x2} (used length {Len}; {Suppressed} similar lines suppressed)",
                Ctrl.CtrlName, io.Bdev.Name, io.Type, io.OffsetBlocks, io.NumBlocks, resp.Response, resp.Status, resp.Resid, sk, asc, ascq, usedLen, suppressed);
        }

        return false;
    }
}
