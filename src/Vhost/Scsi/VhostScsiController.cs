using System.Runtime.InteropServices;
using System.Text.Json.Nodes;
using Microsoft.Extensions.Logging;
using VhostBackend.Bdev;
using VhostBackend.Platform;
using VhostBackend.Reactors;
using VhostBackend.Scsi;
using VhostBackend.VhostUser;
using VhostBackend.Virtio;
using VhostBackend.Virtio.Scsi;

namespace VhostBackend.Vhost.Scsi;

/// <summary>
/// A target slot of a vhost-scsi controller: a SCSI device whose LUN 0 is a bdev (SPDK's model). Immutable once
/// published; removal replaces the slot with null.
/// </summary>
public sealed class VhostScsiTarget
{
    internal VhostScsiTarget(int id, ScsiDevice device, ScsiLun lun, string bdevName, bool readOnly)
    {
        ReadOnly = readOnly;
        Id = id;
        Device = device;
        Lun = lun;
        BdevName = bdevName;
    }

    public int Id { get; }
    public ScsiDevice Device { get; }
    public ScsiLun Lun { get; }
    public string BdevName { get; }

    /// <summary>LUN 0 refuses writes with DATA PROTECT / WRITE PROTECTED (our extension of SPDK's add_target).</summary>
    public bool ReadOnly { get; }

    internal int Removing;
}

/// <summary>
/// A vhost-user-scsi controller: targets 0..7, each a <see cref="ScsiDevice"/> with LUN 0 on a bdev; control,
/// event and request queues per session. Targets are added and removed at runtime (from the main reactor); the
/// guest learns of it through VIRTIO_SCSI_T_TRANSPORT_RESET events (RESCAN / REMOVED) when it negotiated
/// VIRTIO_SCSI_F_HOTPLUG, and of a bdev resize through VIRTIO_SCSI_T_PARAM_CHANGE (VIRTIO_SCSI_F_CHANGE).
/// The target table is written under a lock on the control plane and read lock-free by the request queues.
/// </summary>
public sealed class VhostScsiController : VhostController
{
    public const int MaxTargets = 8;
    public const int MaxRequestQueues = 16;
    public const uint SegMax = 126;
    public const uint MaxSectors = 8192;
    public const uint CmdPerLun = 128;

    private readonly VhostScsiTarget?[] _targets = new VhostScsiTarget?[MaxTargets];
    private readonly BdevManager _bdevs;

    internal VhostScsiController(string name, string socketPath, CpuSet cpumask, ReactorRuntime runtime, BdevManager bdevs, ILogger logger)
        : base(name, socketPath, cpumask, runtime, logger)
    {
        _bdevs = bdevs;
    }

    public override ulong Features { get; } =
        VirtioFeatures.Bit(VirtioFeatures.Version1) | VirtioFeatures.Bit(VirtioFeatures.RingIndirectDesc)
        | VirtioFeatures.Bit(VirtioFeatures.RingEventIdx) | VirtioFeatures.Bit(VhostUserConstants.ProtocolFeaturesBit)
        | VirtioFeatures.Bit(VirtioScsiFeature.Hotplug) | VirtioFeatures.Bit(VirtioScsiFeature.Change)
        | VirtioFeatures.Bit(VirtioFeatures.RingPacked) // SPDK has no packed_ring for SCSI; QEMU negotiates it only with packed=on
        | VirtioFeatures.Bit(VhostUserConstants.LogAllBit);

    public override ulong ProtocolFeatures { get; } =
        (1UL << VhostUserProtocolFeature.Mq) | (1UL << VhostUserProtocolFeature.ReplyAck) | (1UL << VhostUserProtocolFeature.Config)
        | (1UL << VhostUserProtocolFeature.ConfigureMemSlots) | (1UL << VhostUserProtocolFeature.ResetDevice)
        | (1UL << VhostUserProtocolFeature.Status) | (1UL << VhostUserProtocolFeature.InflightShmfd)
        | (1UL << VhostUserProtocolFeature.LogShmfd);

    /// <summary>Control + event + request queues.</summary>
    public override int MaxQueues => VirtioScsi.FirstRequestQueue + MaxRequestQueues;

    /// <summary>The target in slot <paramref name="id"/>, or null (lock-free read for the queues).</summary>
    public VhostScsiTarget? GetTarget(int id) => (uint)id < MaxTargets ? Volatile.Read(ref _targets[id]) : null;

    public IEnumerable<VhostScsiTarget> Targets
    {
        get
        {
            for (int i = 0; i < MaxTargets; i++)
            {
                if (GetTarget(i) is { } t)
                {
                    yield return t;
                }
            }
        }
    }

    public VirtioScsiConfig BuildConfig() => new()
    {
        NumQueues = MaxRequestQueues,
        SegMax = SegMax,
        MaxSectors = MaxSectors,
        CmdPerLun = CmdPerLun,
        EventInfoSize = VirtioScsi.EventSize,
        SenseSize = VirtioScsi.SenseSize,
        CdbSize = VirtioScsi.CdbSize,
        MaxChannel = 0,
        MaxTarget = MaxTargets - 1,
        MaxLun = 255,
    };

    public override int ReadConfig(uint offset, Span<byte> dest) => CopyConfigSpace(BuildConfig(), offset, dest);

    /// <summary>sense_size and cdb_size are driver-writable; we accept them only unchanged (fixed-size headers).</summary>
    public override int WriteConfig(uint offset, ReadOnlySpan<byte> data)
    {
        Span<byte> current = stackalloc byte[VirtioScsiConfig.Size];
        var c = BuildConfig();
        MemoryMarshal.Write(current, in c);
        if (offset < 20 || offset > 28 || (uint)data.Length > 28 - offset)
        {
            return -Errno.EINVAL;
        }

        return data.SequenceEqual(current.Slice((int)offset, data.Length)) ? 0 : -Errno.ENOTSUP;
    }

    public override Task<IVhostQueueRunner> StartQueueAsync(VhostUserSession session, VhostUserReadyQueue ready)
    {
        var reactor = NextReactor();
        var (index, queue, call, kick) = (ready.Index, ready.Queue, ready.Call, ready.Kick);
        VhostQueue q = index switch
        {
            VirtioScsi.ControlQueue => new ScsiControlQueue(this, session, index, queue, call, kick, reactor),
            VirtioScsi.EventQueue => new ScsiEventQueue(this, session, index, queue, call, kick, reactor),
            _ => new ScsiRequestQueue(this, session, index, queue, call, kick, reactor),
        };
        return StartQueueAsync(q, ready);
    }

    /// <summary>
    /// Adds a target over <paramref name="bdevName"/> (SPDK's vhost_scsi_dev_add_tgt): <paramref name="num"/> &lt; 0
    /// takes the first free slot. Call on the main reactor. Errors: EINVAL (slot out of range or none free),
    /// EEXIST (slot taken), ENODEV (no such bdev), EINVAL (bdev claimed by a module, as SPDK). Connected guests get
    /// a RESCAN event.
    /// </summary>
    public int AddTarget(int num, string bdevName, bool readOnly = false)
    {
        ScsiLun lun;
        VhostScsiTarget target;
        lock (_targets)
        {
            if (num < 0)
            {
                num = Array.IndexOf(_targets, null);
                if (num < 0)
                {
                    throw new VhostException(Errno.EINVAL, "scsi_target_num", $"Controller {Name} - all targets already in use");
                }
            }
            else if (num >= MaxTargets)
            {
                throw new VhostException(Errno.EINVAL, "scsi_target_num", $"Controller {Name} target {num} number too big (targets 0..{MaxTargets - 1})");
            }
            else if (_targets[num] is not null)
            {
                throw new VhostException(Errno.EEXIST, "scsi_target_num", $"Controller {Name} target {num} already occupied");
            }

            try
            {
                lun = ScsiLun.Open(_bdevs, bdevName, readOnly);
            }
            catch (BdevNotFoundException e)
            {
                throw new VhostException(Errno.ENODEV, "bdev_name", e.Message);
            }
            catch (BdevClaimedException e)
            {
                // Claimed by a module. SPDK's spdk_vhost_scsi_dev_add_tgt answers any failure to build the target
                // (the LUN's spdk_bdev_open_ext -EPERM included) with -EINVAL.
                throw new VhostException(Errno.EINVAL, "bdev_name", e.Message);
            }

            var device = new ScsiDevice($"Target {num}", num);
            device.AttachLun(0, lun);
            device.LunRemoved += OnLunRemoved;
            device.LunResized += OnLunResized;
            target = new VhostScsiTarget(num, device, lun, bdevName, readOnly);
            Volatile.Write(ref _targets[num], target);
        }

        Logger.LogInformation("vhost_scsi {Name}: target {Num} added on bdev {Bdev}", Name, num, bdevName);
        PostEvent(VirtioScsi.TTransportReset, num, VirtioScsi.EvtResetRescan, VirtioScsiFeature.Hotplug);
        return num;
    }

    /// <summary>
    /// Hot-removes target <paramref name="num"/>: in-flight I/O completes, new commands fail, the bdev is closed,
    /// the slot is freed and connected guests get a REMOVED event. Errors: EINVAL (out of range), ENODEV (empty
    /// slot), EBUSY (already being removed).
    /// </summary>
    public async Task RemoveTargetAsync(int num)
    {
        if ((uint)num >= MaxTargets)
        {
            throw new VhostException(Errno.EINVAL, "scsi_target_num", $"Controller {Name} target {num} number too big (targets 0..{MaxTargets - 1})");
        }

        var target = GetTarget(num) ?? throw new VhostException(Errno.ENODEV, "scsi_target_num", $"Controller {Name} target {num} is not occupied");
        if (Interlocked.Exchange(ref target.Removing, 1) != 0)
        {
            throw new VhostException(Errno.EBUSY, "scsi_target_num", $"Controller {Name} target {num} is already being removed");
        }

        Logger.LogInformation("vhost_scsi {Name}: removing target {Num}", Name, num);
        await target.Lun.RemoveAsync().ConfigureAwait(true);
    }

    /// <summary>Removes every target (controller deletion and shutdown, after the sessions are gone).</summary>
    internal async Task RemoveAllTargetsAsync()
    {
        foreach (var t in Targets.ToArray())
        {
            Interlocked.Exchange(ref t.Removing, 1);
            await t.Lun.RemoveAsync().ConfigureAwait(false);
        }
    }

    /// <summary>The LUN finished hot removal (RPC, or its bdev was deleted): free the slot and tell the guests.</summary>
    private void OnLunRemoved(ScsiDevice device, ScsiLun lun)
    {
        int num = device.Id;
        lock (_targets)
        {
            if (_targets[num] is { } t && t.Device == device)
            {
                Volatile.Write(ref _targets[num], null);
            }
        }

        Logger.LogInformation("vhost_scsi {Name}: target {Num} (bdev {Bdev}) removed", Name, num, lun.Bdev.Name);
        PostEvent(VirtioScsi.TTransportReset, num, VirtioScsi.EvtResetRemoved, VirtioScsiFeature.Hotplug);
    }

    private void OnLunResized(ScsiDevice device, ScsiLun lun)
    {
        Logger.LogInformation("vhost_scsi {Name}: target {Num} resized to {Blocks} blocks", Name, device.Id, lun.Bdev.BlockCount);
        PostEvent(VirtioScsi.TParamChange, device.Id, 0x2A | (0x09u << 8), VirtioScsiFeature.Change);
    }

    /// <summary>Queues an event on every session's event queue whose driver negotiated <paramref name="feature"/>.</summary>
    private void PostEvent(uint type, int target, uint reason, int feature)
    {
        foreach (var q in Queues.OfType<ScsiEventQueue>())
        {
            if ((q.Session.NegotiatedFeatures & VirtioFeatures.Bit(feature)) != 0)
            {
                q.Post(type, target, reason);
            }
        }
    }

    public override string TypeName => "vhost_scsi";

    public override string? DeleteBlocker
    {
        get
        {
            foreach (var t in Targets)
            {
                return $"{Name}: SCSI target {t.Id} is still present.";
            }

            return null;
        }
    }

    public override Task ReleaseAsync() => RemoveAllTargetsAsync();

    public override int AddScsiTarget(int targetNum, string bdevName, bool readOnly) => AddTarget(targetNum, bdevName, readOnly);

    public override Task RemoveScsiTargetAsync(int targetNum) => RemoveTargetAsync(targetNum);

    public override void StartDelayed() => Start();

    public override JsonObject BackendSpecific()
    {
        var scsi = new JsonArray();
        foreach (var t in Targets)
        {
            scsi.Add(new JsonObject
            {
                ["scsi_dev_num"] = t.Id,
                ["id"] = t.Id,
                ["target_name"] = t.Device.Name,
                ["luns"] = new JsonArray(new JsonObject { ["id"] = 0, ["bdev_name"] = t.BdevName }),
                ["readonly"] = t.ReadOnly,
            });
        }

        return new JsonObject { ["scsi"] = scsi };
    }

    public override IEnumerable<JsonObject> ConfigCalls()
    {
        var create = new JsonObject
        {
            ["ctrlr"] = Name,
            ["cpumask"] = CpuMask.ToMaskString(),
        };
        if (ClientMode)
        {
            create["client"] = true;
        }

        if (CreatedDelayed)
        {
            create["delay"] = true;
        }

        yield return VhostBackend.Rpc.Subsystem.Call("vhost_create_scsi_controller", create);
        foreach (var t in Targets)
        {
            if (Volatile.Read(ref t.Removing) != 0)
            {
                continue;
            }

            var p = new JsonObject
            {
                ["ctrlr"] = Name,
                ["scsi_target_num"] = t.Id,
                ["bdev_name"] = t.BdevName,
            };
            if (t.ReadOnly)
            {
                p["readonly"] = true;
            }

            yield return VhostBackend.Rpc.Subsystem.Call("vhost_scsi_controller_add_target", p);
        }

        if (CreatedDelayed && Started)
        {
            yield return VhostBackend.Rpc.Subsystem.Call("vhost_start_scsi_controller", new JsonObject { ["ctrlr"] = Name });
        }

        foreach (var call in CoalescingConfigCalls())
        {
            yield return call;
        }
    }
}
