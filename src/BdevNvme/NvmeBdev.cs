using System.Security.Cryptography;
using System.Text;
using System.Text.Json.Nodes;
using VhostBackend.Bdev;
using VhostBackend.Nvme;
using VhostBackend.Reactors;

namespace VhostBackend.BdevNvme;

/// <summary>
/// A namespace of an attached controller as a bdev, named <c>&lt;controller&gt;n&lt;nsid&gt;</c> (Nvme0n1). It has no
/// <see cref="Bdev.Bdev.ConfigCall"/>: the module writes one attach call per controller (as SPDK's nvme bdevs write none).
/// </summary>
public sealed class NvmeBdev : Bdev.Bdev
{
    /// <summary>Largest read/write handed to the driver; bounce buffers are this size.</summary>
    public const uint MaxIoBytes = 128 * 1024;

    internal NvmeBdev(NvmeBdevControllerBase ctrl, NvmeNamespace ns)
        : base(ctrl.CtrlName + "n" + ns.Id.ToString(System.Globalization.CultureInfo.InvariantCulture), "NVMe disk", ns.BlockSize, ns.BlockCount, MakeUuid(ctrl, ns))
    {
        Ctrl = ctrl;
        Namespace = ns;
        var oncs = ctrl.Data.Oncs;
        WriteCache = ctrl.Data.HasVolatileWriteCache;
        MaxTransferBlocks = Math.Max(1, Math.Min(ctrl.MaxTransferBytes, MaxIoBytes) / ns.BlockSize);
        MaxWriteZeroesBlocks = (oncs & NvmeOncs.WriteZeroes) != 0 ? 65536UL : 0;
        MaxUnmapBlocks = uint.MaxValue;
    }

    public NvmeBdevControllerBase Ctrl { get; }

    /// <summary>The namespace as last identified (replaced when it is resized; read by the channels per I/O).</summary>
    public NvmeNamespace Namespace { get; private set; }

    /// <summary>The namespace was identified again with another size: I/O checks the new one, open descriptors hear Resize.</summary>
    internal void Resize(NvmeNamespace ns)
    {
        Namespace = ns;
        SetBlockCount(ns.BlockCount);
    }

    private long _bouncedIos;
    private long _bouncedBytes;

    /// <summary>Reads, writes and compares copied through a DMA bounce buffer (buffers the device cannot address or PRPs cannot describe).</summary>
    public long BouncedIos => Interlocked.Read(ref _bouncedIos);

    /// <summary>Bytes of those bounced I/Os.</summary>
    public long BouncedBytes => Interlocked.Read(ref _bouncedBytes);

    /// <summary>On a channel's reactor, when an I/O is bounced (not the zero-copy path: an atomic add only there).</summary>
    internal void CountBounce(ulong bytes)
    {
        Interlocked.Increment(ref _bouncedIos);
        Interlocked.Add(ref _bouncedBytes, (long)bytes);
    }

    /// <summary>bdev_get_iostat's driver_specific: how much I/O was bounced instead of going to the device zero-copy.</summary>
    /// <summary>
    /// bdev_get_iostat's driver_specific: how much I/O was bounced instead of going to the device zero-copy, and for a
    /// PCIe controller the state of its DMA space (front-end memory mapped, still being mapped, failed; channel memory
    /// reused from the reserve). Extension fields (SPDK's place for a module's device stats).
    /// </summary>
    public override JsonObject? DeviceStats()
    {
        var stats = new JsonObject
        {
            ["nvme_bounce"] = new JsonObject { ["bounced_ios"] = BouncedIos, ["bounced_bytes"] = BouncedBytes },
        };
        if (Ctrl is NvmeBdevController { Controller.Dma: var dma })
        {
            stats["nvme_dma"] = new JsonObject
            {
                ["zero_copy"] = DmaSpace.ZeroCopyEnabled && dma == DmaSpace.VfioIfCreated,
                ["mapped_ranges"] = dma.ExternalRegistrations,
                ["pending_maps"] = dma.PendingExternalMaps,
                ["failed_maps"] = dma.ExternalFailures,
                ["reserve_hits"] = dma.CacheHits,
            };
        }

        return stats;
    }

    private static Guid MakeUuid(NvmeBdevControllerBase ctrl, NvmeNamespace ns)
    {
        var nguid = ns.Data.Nguid;
        if (nguid.AsSpan().IndexOfAnyExcept((byte)0) >= 0)
        {
            return new Guid(nguid);
        }

        // No NGUID: a stable UUID from the serial number and namespace id, so save/load keeps the same one.
        var hash = SHA256.HashData(Encoding.UTF8.GetBytes($"{ctrl.Data.SerialNumber}/{ctrl.Data.ModelNumber}/{ns.Id}"));
        return new Guid(hash.AsSpan(0, 16));
    }

    /// <summary>
    /// Takes another bdev's I/O in place (an lvol's or passthru's, <see cref="BdevChannel.TryForward"/>). Audit: the
    /// channel (<see cref="NvmeChannelBase{TRequest}"/>, PCIe and TCP) reads the I/O's type, range and iovecs, keeps
    /// the namespace bdev it was given next to the I/O (its wait FIFO, its request: the namespace, the bounce count,
    /// the length) and never <see cref="BdevIo.Bdev"/>, writes only <see cref="BdevIo.ModuleTag"/> (the retry count)
    /// and <see cref="BdevIo.NvmeStatus"/>, and completes on the I/O's reactor. Its limits (the transfer size from
    /// MDTS) are fixed at attach; the layer splits at them and forwards only what fits. <see cref="SupportsIoType"/>
    /// follows the controller's ONCS, read at attach (a reconnect to a controller that dropped a command would fail
    /// such an I/O with the controller's status, as for any caller).
    /// </summary>
    public override bool AcceptsForwardedIo => true;

    public override bool SupportsIoType(BdevIoType type)
    {
        var oncs = Ctrl.Data.Oncs;
        return type switch
        {
            BdevIoType.Read or BdevIoType.Write or BdevIoType.Flush or BdevIoType.Reset => true,
            BdevIoType.Compare => (oncs & NvmeOncs.Compare) != 0,
            BdevIoType.Unmap => (oncs & NvmeOncs.DatasetManagement) != 0,
            BdevIoType.WriteZeroes => (oncs & NvmeOncs.WriteZeroes) != 0,
            _ => false,
        };
    }

    protected override IoChannel GetModuleChannel(Reactor reactor) => reactor.GetIoChannel(Ctrl);

    protected override void Submit(IoChannel moduleChannel, BdevIo io) => ((INvmeChannel)moduleChannel.Context).Submit(this, io);

    public override JsonObject DriverSpecific()
    {
        var c = Ctrl;
        var nvme = new JsonObject
        {
            ["trid"] = Ctrl.TridJson(),
            ["ctrlr_data"] = new JsonObject
            {
                ["cntlid"] = c.Data.ControllerId,
                ["vendor_id"] = $"0x{c.Data.VendorId:x4}",
                ["model_number"] = c.Data.ModelNumber,
                ["serial_number"] = c.Data.SerialNumber,
                ["firmware_revision"] = c.Data.FirmwareRevision,
                ["subnqn"] = c.Data.SubsystemNqn,
                ["oacs"] = new JsonObject { ["security"] = (c.Data.Oacs & 1) != 0 ? 1 : 0, ["format"] = (c.Data.Oacs & 2) != 0 ? 1 : 0, ["firmware"] = (c.Data.Oacs & 4) != 0 ? 1 : 0, ["ns_manage"] = (c.Data.Oacs & 8) != 0 ? 1 : 0 },
            },
            ["vs"] = new JsonObject { ["nvme_version"] = $"{c.Data.Version >> 16}.{(c.Data.Version >> 8) & 0xFF}" + ((c.Data.Version & 0xFF) != 0 ? $".{c.Data.Version & 0xFF}" : "") },
            ["ns_data"] = new JsonObject { ["id"] = Namespace.Id, ["can_share"] = false },
        };
        if (Ctrl is NvmeBdevController pcie)
        {
            nvme.Insert(0, "pci_address", pcie.TrAddr);
            ((JsonObject)nvme["vs"]!)["nvme_version"] = $"{pcie.Controller.Version >> 16}.{(pcie.Controller.Version >> 8) & 0xFF}" + ((pcie.Controller.Version & 0xFF) != 0 ? $".{pcie.Controller.Version & 0xFF}" : "");
        }

        return new JsonObject { ["nvme"] = new JsonArray { nvme } };
    }
}
