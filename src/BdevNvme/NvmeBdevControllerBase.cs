using System.Text.Json.Nodes;
using VhostBackend.Bdev;
using VhostBackend.Nvme;
using VhostBackend.Reactors;

namespace VhostBackend.BdevNvme;

/// <summary>
/// What the module and its bdevs need from an attached controller whatever its transport (SPDK's nvme_ctrlr): the
/// PCIe one (<see cref="NvmeBdevController"/>) and the NVMe/TCP one (<see cref="NvmeTcpBdevController"/>). Each is an
/// I/O device whose per-reactor channels own one queue pair.
/// </summary>
public abstract class NvmeBdevControllerBase : IoDevice
{
    protected NvmeBdevControllerBase(string name, Reactor adminReactor)
        : base("nvme:" + name)
    {
        CtrlName = name;
        AdminReactor = adminReactor;
    }

    public string CtrlName { get; }
    public Reactor AdminReactor { get; }
    public List<NvmeBdev> Bdevs { get; } = new();

    /// <summary>"PCIe" or "TCP" (SPDK's trtype strings).</summary>
    public abstract string TrType { get; }

    /// <summary>The transport address (PCI address, IP address).</summary>
    public abstract string TrAddr { get; }

    /// <summary>What makes two attachments the same controller path (trtype, address, port, subsystem).</summary>
    public abstract string TridKey { get; }

    public abstract NvmeControllerData Data { get; }

    public abstract uint MaxTransferBytes { get; }

    /// <summary>The device is gone or was given up: its I/O fails.</summary>
    public abstract bool IsRemoved { get; }

    /// <summary>SPDK's trid JSON object (bdev_nvme_get_controllers, bdev_get_bdevs driver_specific).</summary>
    public abstract JsonObject TridJson();

    /// <summary>One entry of bdev_nvme_get_controllers' ctrlrs array.</summary>
    public abstract JsonObject Describe();

    /// <summary>The params of the bdev_nvme_attach_controller call save_config writes.</summary>
    public abstract JsonObject ConfigParams();

    /// <summary>Resets (PCIe) or reconnects (TCP) the controller; completes when every channel is back, faults when it failed.</summary>
    public abstract Task ResetAsync();

    internal abstract void StartAdminPoller();

    internal abstract void StopAdminPoller();

    /// <summary>Closes the driver's controller (off the reactor: it may wait).</summary>
    internal abstract void DisposeDriver();

    internal void MarkGone() => MarkUnregistered();
}

/// <summary>A reactor's channel to a controller (the module's I/O channel context).</summary>
internal interface INvmeChannel
{
    void Submit(NvmeBdev bdev, BdevIo io);
}
