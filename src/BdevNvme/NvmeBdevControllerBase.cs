using System.Text.Json.Nodes;
using VhostBackend.Bdev;
using VhostBackend.Nvme;
using VhostBackend.Platform;
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

    /// <summary>Hot removal: gives the device back at once (PCIe: the VFIO device; off the reactor). Default: nothing to give back.</summary>
    internal virtual void ReleaseDevice()
    {
    }

    /// <summary>Set by the module: called on the admin reactor when the controller is gone and must be hot-removed.</summary>
    internal Action<NvmeBdevControllerBase>? HotRemoved { get; set; }

    /// <summary>The module started removing this controller (hot removal or detach; under the module's lock).</summary>
    internal bool Removing { get; set; }

    internal void MarkGone() => MarkUnregistered();

    /// <summary>bdev_nvme_set_options' action_on_timeout when the controller was attached.</summary>
    public NvmeTimeoutAction TimeoutAction { get; init; }

    /// <summary>bdev_nvme_set_options' timeout_us when the controller was attached, in <see cref="Ticks"/> (0 = no I/O timeout).</summary>
    public long IoTimeoutTicks { get; init; }

    /// <summary>
    /// Submits an Abort of command <paramref name="cid"/> on queue <paramref name="qid"/> (any reactor); when the
    /// abort fails or the controller did not abort the command, the controller is reset (SPDK's nvme_abort_cpl).
    /// Returns 0 or a negative errno when it could not be submitted.
    /// </summary>
    internal abstract int SubmitAbort(ushort qid, ushort cid);

    /// <summary>max_bdevs of the attach call: namespaces added later get no bdev beyond it.</summary>
    internal int MaxBdevs { get; set; } = 128;

    /// <summary>Set by the module: called (any thread) when the controller reports a namespace attribute change.</summary>
    internal Action<NvmeBdevControllerBase>? NamespacesChanged { get; set; }

    /// <summary>On the main reactor: a namespace refresh is running / another was asked for meanwhile.</summary>
    internal bool RefreshRunning { get; set; }

    internal bool RefreshAgain { get; set; }

    /// <summary>The driver's asynchronous event callback: a namespace attribute notice starts a refresh (SPDK's aer_cb).</summary>
    protected void OnAsyncEvent(uint dw0)
    {
        if (NvmeAsyncEvent.IsNamespaceAttributeChanged(dw0))
        {
            NamespacesChanged?.Invoke(this);
        }
    }

    /// <summary>
    /// Off the reactor (it waits for admin commands): reads the Changed Namespace List (which re-arms the notice) and
    /// identifies the active namespaces again (SPDK's nvme_ctrlr_populate_namespaces input).
    /// </summary>
    internal abstract IReadOnlyList<NvmeNamespace> RescanNamespaces();

    /// <summary>A command timed out and the action asks for a reset (any reactor; the admin poller starts it).</summary>
    internal abstract void RequestReset();

    private readonly List<TaskCompletionSource> _resetWaiters = new();
    private long _maxControlStepTicks;
    private int _pendingReconnects;

    /// <summary>The longest single control-path step on a reactor (reset poll, reconnect start, connect poll) since it was last cleared, microseconds.</summary>
    public double MaxControlStepMicroseconds => Ticks.ToMicroseconds(Volatile.Read(ref _maxControlStepTicks));

    /// <summary>Records one control-path step's duration (any reactor; control path only, never per I/O).</summary>
    internal void RecordControlStep(long ticks)
    {
        long cur;
        while (ticks > (cur = Volatile.Read(ref _maxControlStepTicks)))
        {
            if (Interlocked.CompareExchange(ref _maxControlStepTicks, ticks, cur) == cur)
            {
                return;
            }
        }
    }

    protected void ClearMaxControlStep() => Volatile.Write(ref _maxControlStepTicks, 0);

    /// <summary>A channel started reconnecting (any reactor): the controller waits for its <see cref="ReconnectDone"/>.</summary>
    internal void AddPendingReconnect() => Interlocked.Increment(ref _pendingReconnects);

    /// <summary>Starts counting reconnecting channels: one count for the walk over them, one per channel that starts.</summary>
    protected void BeginReconnectWalk() => Volatile.Write(ref _pendingReconnects, 1);

    /// <summary>Takes one count back; true when it was the last (every channel reconnected and the walk ended).</summary>
    protected bool EndOneReconnect() => Interlocked.Decrement(ref _pendingReconnects) == 0;

    /// <summary>On the admin reactor: a channel finished reconnecting (or the walk over the channels ended).</summary>
    internal abstract void ReconnectDone();

    /// <summary>On the admin reactor: a reset caller waits for the reset under way.</summary>
    protected void AddResetWaiter(TaskCompletionSource waiter) => _resetWaiters.Add(waiter);

    /// <summary>On the admin reactor: completes every reset caller (faulted with <paramref name="error"/> when it failed).</summary>
    protected void CompleteResetWaiters(bool ok, string? error)
    {
        var waiters = _resetWaiters.ToArray();
        _resetWaiters.Clear();
        foreach (var w in waiters)
        {
            if (ok)
            {
                w.TrySetResult();
            }
            else
            {
                w.TrySetException(new IOException("controller reset failed: " + error));
            }
        }
    }
}

/// <summary>A reactor's channel to a controller (the module's I/O channel context).</summary>
internal interface INvmeChannel
{
    void Submit(NvmeBdev bdev, BdevIo io);
}

/// <summary>What bdev_nvme does with a command that timed out (bdev_nvme_set_options' action_on_timeout).</summary>
public enum NvmeTimeoutAction
{
    /// <summary>"none": log it and keep waiting.</summary>
    None,

    /// <summary>"reset": reset the controller (a fabrics controller disconnects and reconnects).</summary>
    Reset,

    /// <summary>"abort": send an Abort for the command; reset when the abort fails or finds nothing.</summary>
    Abort,
}
