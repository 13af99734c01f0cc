using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json.Nodes;
using Microsoft.Extensions.Logging;
using VhostBackend.Bdev;
using VhostBackend.Platform;
using VhostBackend.Reactors;
using VhostBackend.VhostUser;
using VhostBackend.Virtio;
using VhostBackend.Virtio.Blk;

namespace VhostBackend.Vhost.Blk;

/// <summary>
/// A vhost-user-blk controller: one bdev exposed as a virtio-blk device to every front end that connects.
/// The bdev descriptor is opened at creation (on the main reactor, which receives its events); queues get
/// per-reactor channels when they start.
/// </summary>
public sealed class VhostBlkController : VhostController
{
    /// <summary>Queues per session (GET_QUEUE_NUM).</summary>
    public const int MaxQueuesPerSession = 32;

    /// <summary>Data segments per request we advertise (seg_max); the segment buffer adds room for header, status and region splits.</summary>
    public const uint SegMax = 126;

    public const uint SizeMax = 128 * 1024;
    public const uint MaxDiscardSectors = 65536;

    private BdevDesc? _desc;
    private readonly string _bdevName;

    internal VhostBlkController(string name, string socketPath, CpuSet cpumask, ReactorRuntime runtime, BdevManager bdevs, string bdevName, bool readOnly, ILogger logger, bool packedRing = false)
        : base(name, socketPath, cpumask, runtime, logger)
    {
        ReadOnly = readOnly;
        PackedRing = packedRing;
        _bdevName = bdevName;
        _desc = bdevs.Open(bdevName, !readOnly, static (type, bdev, ctx) => ((VhostBlkController)ctx!).OnBdevEvent(type), this);
        var bdev = _desc.Bdev;
        SupportsDiscard = bdev.SupportsIoType(BdevIoType.Unmap);
        SupportsWriteZeroes = bdev.SupportsIoType(BdevIoType.WriteZeroes);
        SupportsFlush = bdev.SupportsIoType(BdevIoType.Flush);
        BlockSize = bdev.BlockSize;

        // GET_ID: up to 20 bytes of the bdev name.
        var id = Encoding.ASCII.GetBytes(bdev.Name);
        SerialBytes = id.Length > VirtioBlkRequestType.IdBytes ? id[..VirtioBlkRequestType.IdBytes] : id;

        ulong f = VirtioFeatures.Bit(VirtioFeatures.Version1) | VirtioFeatures.Bit(VirtioFeatures.RingIndirectDesc)
            | VirtioFeatures.Bit(VirtioFeatures.RingEventIdx) | VirtioFeatures.Bit(VhostUserConstants.ProtocolFeaturesBit)
            | VirtioFeatures.Bit(VirtioBlkFeature.SizeMax) | VirtioFeatures.Bit(VirtioBlkFeature.SegMax)
            | VirtioFeatures.Bit(VirtioBlkFeature.BlkSize) | VirtioFeatures.Bit(VirtioBlkFeature.Topology)
            | VirtioFeatures.Bit(VirtioBlkFeature.Mq) | VirtioFeatures.Bit(VhostUserConstants.LogAllBit);
        if (SupportsFlush)
        {
            f |= VirtioFeatures.Bit(VirtioBlkFeature.Flush);
        }

        if (SupportsDiscard)
        {
            f |= VirtioFeatures.Bit(VirtioBlkFeature.Discard);
        }

        if (SupportsWriteZeroes)
        {
            f |= VirtioFeatures.Bit(VirtioBlkFeature.WriteZeroes);
        }

        if (readOnly)
        {
            f |= VirtioFeatures.Bit(VirtioBlkFeature.Ro);
        }

        // SPDK's packed_ring: offer VIRTIO_F_RING_PACKED (QEMU negotiates it only with packed=on).
        if (packedRing)
        {
            f |= VirtioFeatures.Bit(VirtioFeatures.RingPacked);
        }

        Features = f;
    }

    public bool ReadOnly { get; }

    /// <summary>vhost_create_blk_controller packed_ring: VIRTIO_F_RING_PACKED is offered.</summary>
    public bool PackedRing { get; }
    public bool SupportsDiscard { get; }
    public bool SupportsWriteZeroes { get; }
    public bool SupportsFlush { get; }
    public uint BlockSize { get; }
    internal byte[] SerialBytes { get; }

    /// <summary>The open descriptor, or null after the bdev was hot-removed.</summary>
    internal BdevDesc? Desc => Volatile.Read(ref _desc);

    public string? BdevName => Desc?.Bdev.Name;

    public override ulong Features { get; }

    public override ulong ProtocolFeatures { get; } =
        (1UL << VhostUserProtocolFeature.Mq) | (1UL << VhostUserProtocolFeature.ReplyAck) | (1UL << VhostUserProtocolFeature.Config)
        | (1UL << VhostUserProtocolFeature.BackendReq) | (1UL << VhostUserProtocolFeature.ConfigureMemSlots)
        | (1UL << VhostUserProtocolFeature.ResetDevice) | (1UL << VhostUserProtocolFeature.Status) | (1UL << VhostUserProtocolFeature.InflightShmfd)
        | (1UL << VhostUserProtocolFeature.LogShmfd);

    public override int MaxQueues => MaxQueuesPerSession;

    /// <summary>The current virtio_blk_config (capacity follows bdev resizes).</summary>
    public VirtioBlkConfig BuildConfig()
    {
        var desc = Desc;
        ulong blocks = desc?.Bdev.BlockCount ?? 0;
        uint bs = BlockSize;
        var c = new VirtioBlkConfig
        {
            Capacity = blocks * bs / VirtioBlkRequestType.SectorSize,
            SizeMax = SizeMax,
            SegMax = SegMax,
            BlkSize = bs,
            PhysicalBlockExp = 0,
            AlignmentOffset = 0,
            MinIoSize = 1,
            OptIoSize = 0,
            Writeback = SupportsFlush ? (byte)1 : (byte)0,
            NumQueues = MaxQueuesPerSession,
        };
        if (SupportsDiscard)
        {
            c.MaxDiscardSectors = MaxDiscardSectors;
            c.MaxDiscardSeg = 1;
            c.DiscardSectorAlignment = bs / VirtioBlkRequestType.SectorSize;
        }

        if (SupportsWriteZeroes)
        {
            c.MaxWriteZeroesSectors = MaxDiscardSectors;
            c.MaxWriteZeroesSeg = 1;
            c.WriteZeroesMayUnmap = 1;
        }

        return c;
    }

    public override int ReadConfig(uint offset, Span<byte> dest) => CopyConfigSpace(BuildConfig(), offset, dest);

    public override Task<IVhostQueueRunner> StartQueueAsync(VhostUserSession session, VhostUserReadyQueue q) =>
        StartQueueAsync(new BlkQueue(this, session, q.Index, q.Queue, q.Call, q.Kick, NextReactor()), q);

    private void OnBdevEvent(BdevEventType type)
    {
        switch (type)
        {
            case BdevEventType.Resize:
                Logger.LogInformation("vhost_blk {Name}: bdev resized to {Blocks} blocks; notifying front ends", Name, Desc?.Bdev.BlockCount);
                foreach (var s in Sessions)
                {
                    // Off the reactor: a socket send.
                    ThreadPool.UnsafeQueueUserWorkItem(static o => ((VhostUserSession)o!).SendConfigChange(), s);
                }

                break;
            case BdevEventType.Remove:
                _ = HandleRemoveAsync();
                break;
        }
    }

    /// <summary>Hot remove: every queue fails new requests with IOERR, in-flight ones drain, then the descriptor closes.</summary>
    private async Task HandleRemoveAsync()
    {
        Logger.LogWarning("vhost_blk {Name}: bdev {Bdev} is being removed; failing I/O", Name, _bdevName);
        var queues = Queues.OfType<BlkQueue>().ToArray();
        try
        {
            await Task.WhenAll(queues.Select(q => q.DetachBdevAsync())).ConfigureAwait(false);
        }
        finally
        {
            Interlocked.Exchange(ref _desc, null)?.Dispose();
        }
    }

    public override JsonObject BackendSpecific() => new()
    {
        ["block"] = new JsonObject
        {
            ["readonly"] = ReadOnly,
            ["bdev"] = BdevName,
            ["transport"] = "vhost_user_blk",
        },
    };

    public override IEnumerable<JsonObject> ConfigCalls()
    {
        if (BdevName is not { } bdev)
        {
            yield break;
        }

        var create = new JsonObject
        {
            ["ctrlr"] = Name,
            ["dev_name"] = bdev,
            ["cpumask"] = CpuMask.ToMaskString(),
            ["readonly"] = ReadOnly,
            ["transport"] = "vhost_user_blk",
        };
        if (PackedRing)
        {
            create["packed_ring"] = true;
        }

        if (ClientMode)
        {
            create["client"] = true;
        }

        yield return VhostBackend.Rpc.Subsystem.Call("vhost_create_blk_controller", create);
        foreach (var call in CoalescingConfigCalls())
        {
            yield return call;
        }
    }

    /// <summary>Closes the descriptor after all sessions are gone (controller deletion).</summary>
    internal void CloseBdev() => Interlocked.Exchange(ref _desc, null)?.Dispose();

    public override string TypeName => "vhost_blk";

    public override Task ReleaseAsync()
    {
        CloseBdev();
        return Task.CompletedTask;
    }
}
