using System.Buffers.Binary;
using System.Diagnostics;
using Microsoft.Extensions.Logging;
using VhostBackend.Bdev;
using VhostBackend.Reactors;
using VhostBackend.Virtio;
using VhostBackend.Virtio.Scsi;

namespace VhostBackend.BdevVirtio;

/// <summary>
/// The SCSI side of a virtio-user scsi controller (SPDK's virtio_scsi_dev): the target scan run at attach, the
/// disks it found and the event queue that hot-removes them.
/// <para>
/// Scan (SPDK's order, on the first request queue before any channel exists, one command at a time, each bounded
/// by <see cref="CommandTimeoutMs"/>): for targets 0..63, INQUIRY; a target answering BAD_TARGET / INCORRECT_LUN
/// is absent; then TEST UNIT READY (START STOP UNIT when not ready), the supported VPD pages, Logical Block
/// Provisioning (LBPU = UNMAP supported), Block Limits (ours: the UNMAP limit), READ CAPACITY (10), and (16) when
/// (10) says 0xFFFFFFFF. A command answered with a response other than OK or a CHECK CONDITION other than ILLEGAL
/// REQUEST (a UNIT ATTENTION, say) is sent again, 5 times at most, as SPDK does.
/// </para>
/// <para>
/// Event queue: 16 buffers (SPDK's count) posted at attach and reaped by a 5 ms poller on the main reactor.
/// TRANSPORT_RESET/REMOVED for a target unregisters its bdev. RESCAN (a target added) and EVENTS_MISSED are logged,
/// not acted on: a rescan while channels own the request queues would need the scan to run through a channel;
/// detach and attach again to pick up a new target.
/// </para>
/// </summary>
internal sealed class VirtioScsiDevice
{
    public const int MaxTargets = 64;
    public const int ScanPayloadBytes = 256;
    public const int ScanRetries = 5;
    public const int EventBuffers = 16;
    public const ulong EventPollPeriodUs = 5_000;

    private readonly VirtioUserController _ctrl;
    private readonly ILogger _log;
    private readonly Dictionary<int, VirtioScsiBdev> _disks = new();
    private BdevManager? _bdevs;
    private Reactor? _eventReactor;
    private Poller? _eventPoller;
    private bool _eventsBroken;
    private int _eventCount;

    public VirtioScsiDevice(VirtioUserController ctrl, ILogger log)
    {
        _ctrl = ctrl;
        _log = log;
    }

    /// <summary>Longest wait for one scan command's response.</summary>
    public int CommandTimeoutMs { get; set; } = 5_000;

    /// <summary>Events received (any type).</summary>
    public int EventsReceived => Volatile.Read(ref _eventCount);

    public VirtioScsiBdev[] Disks
    {
        get
        {
            lock (_disks)
            {
                return _disks.Values.OrderBy(d => d.Target).ToArray();
            }
        }
    }

    internal void DiskGone(VirtioScsiBdev disk)
    {
        lock (_disks)
        {
            if (_disks.TryGetValue(disk.Target, out var d) && d == disk)
            {
                _disks.Remove(disk.Target);
            }
        }
    }

    internal void AddDisk(VirtioScsiBdev disk)
    {
        lock (_disks)
        {
            _disks[disk.Target] = disk;
        }
    }

    /// <summary>
    /// Scans targets 0..63 (blocking; call before any channel exists). Returns what was found. Throws
    /// <see cref="IOException"/> when the back end stops answering or breaks the ring.
    /// </summary>
    public List<VirtioScsiDiskInfo> Scan()
    {
        var found = new List<VirtioScsiDiskInfo>();
        var q = _ctrl.Queue(_ctrl.FixedQueues);
        for (int t = 0; t < MaxTargets; t++)
        {
            if (ScanTarget(q, t) is { } info)
            {
                _log.LogInformation("virtio-user {Name}: target {Target}: {Blocks} blocks of {Bs} bytes, unmap {Unmap}", _ctrl.CtrlName, t, info.BlockCount, info.BlockSize, info.UnmapSupported);
                found.Add(info);
            }
        }

        return found;
    }

    private VirtioScsiDiskInfo? ScanTarget(VirtioUserQueue q, int target)
    {
        Span<byte> cdb = stackalloc byte[16];
        Span<byte> data = stackalloc byte[ScanPayloadBytes];
        byte op = ScsiCdb.Inquiry;
        byte page = 0;
        bool evpd = false;
        bool unmap = false;
        bool hasBlockLimits = false;
        ulong maxUnmap = uint.MaxValue;
        int retries = ScanRetries;
        while (true)
        {
            cdb.Clear();
            int dataLen = 0;
            cdb[0] = op;
            switch (op)
            {
                case ScsiCdb.Inquiry:
                    cdb[1] = evpd ? (byte)1 : (byte)0;
                    cdb[2] = page;
                    BinaryPrimitives.WriteUInt16BigEndian(cdb[3..], ScanPayloadBytes);
                    dataLen = ScanPayloadBytes;
                    break;
                case ScsiCdb.StartStopUnit:
                    cdb[4] = 1; // START
                    break;
                case ScsiCdb.ReadCapacity10:
                    dataLen = 8;
                    break;
                case ScsiCdb.ServiceActionIn16:
                    cdb[1] = ScsiCdb.SaReadCapacity16;
                    BinaryPrimitives.WriteUInt32BigEndian(cdb[10..], 32);
                    dataLen = 32;
                    break;
            }

            var resp = Run(q, target, cdb, data[..dataLen]);
            if (resp.Response is VirtioScsi.SBadTarget or VirtioScsi.SIncorrectLun)
            {
                return null;
            }

            var (sk, asc, _) = ScsiCdb.Sense(ref resp);
            if (resp.Response != VirtioScsi.SOk || (resp.Status == ScsiCdb.StatusCheckCondition && sk != ScsiCdb.SenseIllegalRequest))
            {
                if (--retries == 0)
                {
                    _log.LogWarning("virtio-user {Name}: target {Target} is present, but unavailable (opcode 0x{Op:x2}: response {Response}, status 0x{Status:x2}, sense key 0x{Sk:x}, ASC 0x{Asc:x2})",
                        _ctrl.CtrlName, target, op, resp.Response, resp.Status, sk, asc);
                    return null;
                }

                continue; // the same command again
            }

            retries = ScanRetries;
            bool good = resp.Status == ScsiCdb.StatusGood;
            switch (op)
            {
                case ScsiCdb.Inquiry when !evpd:
                    // Peripheral qualifier 0 (connected), device type 0 (direct access block device).
                    if (!good || data[0] != 0)
                    {
                        if (good)
                        {
                            _log.LogWarning("virtio-user {Name}: target {Target}: unsupported peripheral device type 0x{Type:x2} (qualifier {Q})", _ctrl.CtrlName, target, data[0] & 0x1F, data[0] >> 5);
                        }

                        return null;
                    }

                    op = ScsiCdb.TestUnitReady;
                    break;
                case ScsiCdb.TestUnitReady:
                case ScsiCdb.StartStopUnit:
                    if (good)
                    {
                        (op, evpd, page) = (ScsiCdb.Inquiry, true, ScsiCdb.VpdSupportedPages);
                    }
                    else if (op == ScsiCdb.TestUnitReady && resp.Status == ScsiCdb.StatusCheckCondition && sk == ScsiCdb.SenseUnitAttention && asc == ScsiCdb.AscLogicalUnitNotReady)
                    {
                        op = ScsiCdb.StartStopUnit;
                    }
                    else
                    {
                        return null;
                    }

                    break;
                case ScsiCdb.Inquiry when page == ScsiCdb.VpdSupportedPages:
                {
                    bool provisioning = false;
                    if (good)
                    {
                        int count = Math.Min((int)BinaryPrimitives.ReadUInt16BigEndian(data[2..]), ScanPayloadBytes - 4);
                        provisioning = data.Slice(4, count).Contains(ScsiCdb.VpdLogicalBlockProvisioning);
                        hasBlockLimits = data.Slice(4, count).Contains(ScsiCdb.VpdBlockLimits);
                    }

                    (op, page) = provisioning ? (ScsiCdb.Inquiry, ScsiCdb.VpdLogicalBlockProvisioning) : (ScsiCdb.ReadCapacity10, (byte)0);
                    break;
                }

                case ScsiCdb.Inquiry when page == ScsiCdb.VpdLogicalBlockProvisioning:
                    unmap = good && (data[5] & 0x80) != 0; // LBPU
                    (op, page) = unmap && hasBlockLimits ? (ScsiCdb.Inquiry, ScsiCdb.VpdBlockLimits) : (ScsiCdb.ReadCapacity10, (byte)0);
                    break;
                case ScsiCdb.Inquiry when page == ScsiCdb.VpdBlockLimits:
                    // MAXIMUM UNMAP LBA COUNT (bytes 20-23; 0 = none given, 0xFFFFFFFF = no limit) when the page is long enough.
                    if (good && BinaryPrimitives.ReadUInt16BigEndian(data[2..]) >= 0x3C)
                    {
                        uint m = BinaryPrimitives.ReadUInt32BigEndian(data[20..]);
                        maxUnmap = m == 0 ? uint.MaxValue : m;
                    }

                    op = ScsiCdb.ReadCapacity10;
                    break;
                case ScsiCdb.ReadCapacity10:
                {
                    if (!good)
                    {
                        _log.LogError("virtio-user {Name}: READ CAPACITY (10) failed for target {Target}", _ctrl.CtrlName, target);
                        return null;
                    }

                    uint maxLba = BinaryPrimitives.ReadUInt32BigEndian(data);
                    if (maxLba == uint.MaxValue)
                    {
                        op = ScsiCdb.ServiceActionIn16;
                        break;
                    }

                    return Disk(target, BinaryPrimitives.ReadUInt32BigEndian(data[4..]), (ulong)maxLba + 1, unmap, maxUnmap);
                }

                case ScsiCdb.ServiceActionIn16:
                {
                    if (!good)
                    {
                        _log.LogError("virtio-user {Name}: READ CAPACITY (16) failed for target {Target}", _ctrl.CtrlName, target);
                        return null;
                    }

                    ulong maxLba = BinaryPrimitives.ReadUInt64BigEndian(data);
                    return maxLba == ulong.MaxValue ? Invalid(target, 0, 0) : Disk(target, BinaryPrimitives.ReadUInt32BigEndian(data[8..]), maxLba + 1, unmap, maxUnmap);
                }

                default:
                    return null;
            }
        }
    }

    /// <summary>The geometry the back end reported, if usable: a power-of-two block size of 512 B..64 KiB and a size in bytes that fits 64 bits.</summary>
    private VirtioScsiDiskInfo? Disk(int target, uint blockSize, ulong blocks, bool unmap, ulong maxUnmap)
    {
        if (blockSize < 512 || blockSize > 65536 || (blockSize & (blockSize - 1)) != 0 || blocks == 0 || blocks > ulong.MaxValue / blockSize)
        {
            return Invalid(target, blockSize, blocks);
        }

        return new VirtioScsiDiskInfo(target, blockSize, blocks, unmap, maxUnmap);
    }

    private VirtioScsiDiskInfo? Invalid(int target, uint blockSize, ulong blocks)
    {
        _log.LogError("virtio-user {Name}: invalid target {Target}: bs={Bs} blocks={Blocks}", _ctrl.CtrlName, target, blockSize, blocks);
        return null;
    }

    /// <summary>
    /// Runs one command on slot 0 of <paramref name="q"/> and waits for it (bounded). Data-in lands in the slot's
    /// bounce buffer and is copied to <paramref name="data"/> (zero-filled first, so a short answer reads as zeros).
    /// </summary>
    private VirtioScsiCmdResp Run(VirtioUserQueue q, int target, ReadOnlySpan<byte> cdb, Span<byte> data)
    {
        const int slot = 0;
        var cmd = VirtioScsiChannel.BeginCommand(q, slot, target);
        cdb.CopyTo(cmd);
        ulong slotGpa = q.SlotGpa(slot);
        var dataBytes = q.Memory.Bytes(q.BounceGpa(slot), Math.Max(data.Length, 1));
        dataBytes.Clear();
        Span<DriverBuffer> bufs = stackalloc DriverBuffer[3];
        bufs[0] = new DriverBuffer(slotGpa + VirtioUserQueue.ScsiReqOffset, VirtioScsi.CmdReqSize, 0);
        bufs[1] = new DriverBuffer(slotGpa + VirtioUserQueue.ScsiRespOffset, VirtioScsi.CmdRespSize, VirtqDesc.FlagWrite);
        bufs[2] = new DriverBuffer(q.BounceGpa(slot), (uint)data.Length, VirtqDesc.FlagWrite);
        if (VirtioUserChannel.Add(q, _ctrl.Has(VirtioFeatures.RingIndirectDesc), slot, bufs[..(data.Length > 0 ? 3 : 2)]) < 0)
        {
            throw new IOException($"virtio-user {_ctrl.CtrlName}: no room on request queue {q.Index} for a scan command");
        }

        q.Driver.Publish();
        q.Kick.Signal();
        var sw = Stopwatch.StartNew();
        var spin = default(SpinWait);
        while (true)
        {
            var r = q.Driver.TryPopUsed(out int token, out _);
            if (r == UsedResult.Broken || (r == UsedResult.Popped && token != slot))
            {
                q.Broken = true;
                throw new IOException($"virtio-user {_ctrl.CtrlName}: the back end broke request queue {q.Index} during the target scan");
            }

            if (r == UsedResult.Popped)
            {
                break;
            }

            if (sw.ElapsedMilliseconds > CommandTimeoutMs || _ctrl.CheckConnection())
            {
                throw new IOException($"virtio-user {_ctrl.CtrlName}: no answer to scan command 0x{cdb[0]:x2} for target {target} within {CommandTimeoutMs} ms");
            }

            spin.SpinOnce(sleep1Threshold: 30);
        }

        dataBytes[..data.Length].CopyTo(data);
        return q.Memory.Ref<VirtioScsiCmdResp>(slotGpa + VirtioUserQueue.ScsiRespOffset);
    }

    /// <summary>Posts the event buffers (blocking part of the attach, before the poller runs).</summary>
    public void PostEventBuffers()
    {
        var q = _ctrl.Queue(VirtioScsi.EventQueue);
        int n = Math.Min(q.SlotCount, EventBuffers);
        for (int i = 0; i < n; i++)
        {
            PostEvent(q, i);
        }

        q.Driver.Publish();
        q.Kick.Signal();
    }

    private static void PostEvent(VirtioUserQueue q, int slot)
    {
        ulong gpa = q.SlotGpa(slot) + VirtioUserQueue.ScsiRespOffset;
        q.Memory.Bytes(gpa, VirtioScsi.EventSize).Clear();
        var b = new DriverBuffer(gpa, VirtioScsi.EventSize, VirtqDesc.FlagWrite);
        q.Driver.TryAdd(new ReadOnlySpan<DriverBuffer>(in b), slot);
    }

    /// <summary>Starts reaping events on <paramref name="reactor"/> (call on it).</summary>
    public void StartEvents(Reactor reactor, BdevManager bdevs)
    {
        _bdevs = bdevs;
        _eventReactor = reactor;
        _eventPoller = reactor.RegisterPoller("bdev_virtio_scsi_mgmt:" + _ctrl.CtrlName, static c => ((VirtioScsiDevice)c!).PollEvents(), this, EventPollPeriodUs);
    }

    /// <summary>Stops reaping events (call on the event reactor).</summary>
    public void StopEvents()
    {
        if (_eventPoller is not null)
        {
            _eventReactor!.UnregisterPoller(_eventPoller);
            _eventPoller = null;
        }
    }

    private int PollEvents()
    {
        if (_eventsBroken || _ctrl.Disconnected)
        {
            return 0;
        }

        var q = _ctrl.Queue(VirtioScsi.EventQueue);
        int n = 0;
        while (true)
        {
            var r = q.Driver.TryPopUsed(out int slot, out uint len);
            if (r == UsedResult.Empty)
            {
                break;
            }

            if (r == UsedResult.Broken || (uint)slot >= (uint)Math.Min(q.SlotCount, EventBuffers))
            {
                _eventsBroken = true;
                _log.LogError("virtio-user {Name}: the back end broke the event queue; hot-remove events are no longer received", _ctrl.CtrlName);
                return n + 1;
            }

            n++;
            Interlocked.Increment(ref _eventCount);
            var ev = q.Memory.Ref<VirtioScsiEvent>(q.SlotGpa(slot) + VirtioUserQueue.ScsiRespOffset);
            if (len < VirtioScsi.EventSize)
            {
                _log.LogWarning("virtio-user {Name}: event of {Len} bytes ignored", _ctrl.CtrlName, len);
            }
            else
            {
                Handle(ev);
            }

            PostEvent(q, slot);
        }

        if (n > 0)
        {
            q.Driver.Publish();
            if (q.Driver.NeedsKick())
            {
                q.Kick.Signal();
            }
        }

        return n;
    }

    private void Handle(VirtioScsiEvent ev)
    {
        ReadOnlySpan<byte> lun = ev.Lun;
        if (lun[0] != 1)
        {
            _log.LogWarning("virtio-user {Name}: event 0x{Event:x} with an invalid LUN layout ignored", _ctrl.CtrlName, ev.Event);
            return;
        }

        int target = lun[1];
        uint type = ev.Event;
        if ((type & VirtioScsi.EventsMissed) != 0)
        {
            type &= ~VirtioScsi.EventsMissed;
            _log.LogWarning("virtio-user {Name}: the back end missed events; rescanning is not supported (detach and attach to pick up new targets)", _ctrl.CtrlName);
        }

        if (type != VirtioScsi.TTransportReset)
        {
            return;
        }

        if (ev.Reason == VirtioScsi.EvtResetRemoved)
        {
            VirtioScsiBdev? disk;
            lock (_disks)
            {
                disk = _disks.GetValueOrDefault(target);
            }

            if (disk is not null && _bdevs is { } bdevs)
            {
                _log.LogInformation("virtio-user {Name}: target {Target} removed by the back end; unregistering {Bdev}", _ctrl.CtrlName, target, disk.Name);
                _ = UnregisterAsync(bdevs, disk);
            }
        }
        else if (ev.Reason == VirtioScsi.EvtResetRescan)
        {
            _log.LogInformation("virtio-user {Name}: target {Target} added by the back end; not scanned (rescan is not supported: detach and attach again)", _ctrl.CtrlName, target);
        }
    }

    private async Task UnregisterAsync(BdevManager bdevs, VirtioScsiBdev disk)
    {
        try
        {
            await bdevs.UnregisterAsync(disk).ConfigureAwait(true);
        }
        catch (BdevNotFoundException)
        {
            // Already gone (detach or an earlier event).
        }
    }
}
