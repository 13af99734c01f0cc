using System.Text.Json.Nodes;
using Microsoft.Extensions.Logging;
using VhostBackend.Nvme;
using VhostBackend.Platform;
using VhostBackend.Reactors;

namespace VhostBackend.BdevNvme;

/// <summary>
/// One attached NVMe controller as the bdev module sees it (SPDK's nvme_ctrlr): the driver's controller, its
/// namespaces' bdevs, the I/O device whose per-reactor channels own one queue pair each, and the admin poller
/// (asynchronous events, health, resets) on the reactor that attached it.
/// </summary>
public sealed class NvmeBdevController : NvmeBdevControllerBase
{
    private readonly ILogger _log;
    private Poller? _adminPoller;
    private Poller? _adminIrqPoller;
    private Poller? _resetPoller;
    private Poller? _removalPoller;
    private volatile bool _resetting;
    private bool _recoveryReset;
    private long _resetStartTicks;
    private long _lastResetTicks;

    internal NvmeBdevController(string name, string traddr, NvmeController ctrl, Reactor adminReactor, ILogger log)
        : base(name, adminReactor)
    {
        _traddr = traddr;
        Controller = ctrl;
        _log = log;
        ctrl.AsyncEvent = (_, dw0) => OnAsyncEvent(dw0);
    }

    private readonly string _traddr;

    public override string TrType => "PCIe";
    public override string TrAddr => _traddr;
    public override string TridKey => "PCIe:" + _traddr;
    public override NvmeControllerData Data => Controller.Data;
    public override uint MaxTransferBytes => Controller.MaxTransferBytes;
    public NvmeController Controller { get; }

    public override JsonObject TridJson() => new() { ["trtype"] = "PCIe", ["traddr"] = TrAddr };

    public override JsonObject ConfigParams() => new() { ["name"] = CtrlName, ["trtype"] = "PCIe", ["traddr"] = TrAddr };

    public override JsonObject Describe() => new()
    {
        ["state"] = IsRemoved ? "deleting" : Controller.ResetError is not null ? "failed" : IsResetting ? "resetting" : "enabled",
        ["trid"] = TridJson(),
        ["cntlid"] = Controller.Data.ControllerId,
        ["host"] = new JsonObject { ["nqn"] = "", ["addr"] = "", ["svcid"] = "" },

        // Extension fields (not in SPDK): resets done, how long the last took, and the longest single
        // control-path step on a reactor since it started.
        ["reset_count"] = Controller.ResetCount,
        ["last_reset_us"] = Math.Round(LastResetMicroseconds, 1),
        ["max_control_step_us"] = Math.Round(MaxControlStepMicroseconds, 1),
    };

    internal override void DisposeDriver() => Controller.Dispose();

    /// <summary>Hot removal: gives the VFIO device back to the kernel (off the reactor: closing it resets the function).</summary>
    internal override void ReleaseDevice() => Controller.ReleaseDevice(RemovedReason ?? "detached");

    internal override int SubmitAbort(ushort qid, ushort cid) => Controller.SubmitAbort(qid, cid, s_abortDone, Controller);

    internal override void RequestReset() => Controller.RequestReset();

    internal override IReadOnlyList<NvmeNamespace> RescanNamespaces()
    {
        Span<byte> log = stackalloc byte[4096];
        var st = Controller.GetLogPage(NvmeLogPage.ChangedNamespaceList, log);
        if (!st.IsSuccess)
        {
            _log.LogWarning("NVMe {Name}: Get Log Page (changed namespaces) failed: {Status}", CtrlName, st);
        }

        Controller.ScanNamespaces();
        return Controller.Namespaces;
    }

    private static readonly NvmeCompletionCallback s_abortDone = static (arg, status, dw0) =>
    {
        // Runs where admin completions are reaped. A reset that fails the abort itself takes care of the command.
        if (status != NvmeStatus.AbortedSqDeletion && (!status.IsSuccess || (dw0 & 1) != 0))
        {
            // Abort failed or the controller did not find the command: escalate to a controller reset.
            ((NvmeController)arg!).RequestReset();
        }
    };

    /// <summary>From the start of a reset until every channel has reconnected (any thread).</summary>
    public bool IsResetting => _resetting;
    public override bool IsRemoved => Volatile.Read(ref _removed);
    private bool _removed;

    /// <summary>Why the controller was hot-removed (null while it was not).</summary>
    public string? RemovedReason { get; private set; }

    /// <summary>Duration of the last completed reset (start to every channel reconnected), microseconds.</summary>
    public double LastResetMicroseconds => Ticks.ToMicroseconds(Volatile.Read(ref _lastResetTicks));

    /// <summary>
    /// Starts the admin poller (every 10 ms) on the calling reactor and, when the controller has interrupts, the admin
    /// queue's vector as a wake source: a poller that reaps admin completions (AERs) as soon as one is posted (a
    /// phase-bit peek per iteration) and lets the reactor sleep until vector 0 fires.
    /// </summary>
    internal override void StartAdminPoller()
    {
        _adminPoller = AdminReactor.RegisterPoller("nvme_ctrlr_admin:" + CtrlName, static ctx => ((NvmeBdevController)ctx!).PollAdmin(), this, 10_000);
        if (Controller.InterruptFd(0) is { } fd)
        {
            _adminIrqPoller = AdminReactor.RegisterPoller("nvme_ctrlr_admin_irq:" + CtrlName,
                static ctx => ((NvmeBdevController)ctx!).Controller.AdminCompletionPending ? ((NvmeBdevController)ctx!).Controller.ProcessAdminCompletions() : 0, this);
            AdminReactor.SetPollerInterrupt(_adminIrqPoller, fd.Fd, static (ctx, arm) =>
            {
                var c = ((NvmeBdevController)ctx!).Controller;
                if (!arm)
                {
                    return false;
                }

                c.InterruptFd(0)?.Drain();
                c.UnmaskInterrupt();
                return c.AdminCompletionPending;
            });
        }

        if (Controller.RemovalRequestFd is { } req)
        {
            // The kernel's device request (unbind, remove): read by a 100 ms poller whose wake source is the request
            // eventfd, so a sleeping admin reactor wakes for it; one non-blocking read per run.
            _removalPoller = AdminReactor.RegisterPoller("nvme_ctrlr_remove:" + CtrlName, static ctx => ((NvmeBdevController)ctx!).PollRemoval(), this, 100_000);
            AdminReactor.SetPollerInterrupt(_removalPoller, req.Fd, static (_, _) => false);
        }
    }

    private int PollRemoval()
    {
        if (IsRemoved || !Controller.PollRemovalRequest())
        {
            return 0;
        }

        BeginHotRemove("the kernel asked for the device back (VFIO device request: unbind or removal)");
        return 1;
    }

    /// <summary>
    /// On the admin reactor: the controller is gone (device request, registers reading all ones, or a recovery reset
    /// that failed). Nothing is sent to the device any more, every channel fails its outstanding and new I/O, then the
    /// module hot-removes the controller (<see cref="NvmeBdevControllerBase.HotRemoved"/>): releases the device,
    /// unregisters every namespace bdev (their openers get the bdev layer's remove event) and frees the name.
    /// </summary>
    internal void BeginHotRemove(string why)
    {
        if (IsRemoved)
        {
            return;
        }

        RemovedReason = why;
        Volatile.Write(ref _removed, true);
        _log.LogError("NVMe controller {Name} ({Addr}) is gone: {Why}; failing its I/O and removing its bdevs", CtrlName, TrAddr, why);
        Controller.MarkRemoved(why);
        if (_resetPoller is not null)
        {
            AdminReactor.UnregisterPoller(_resetPoller);
            _resetPoller = null;
            FinishReset(false);
        }

        ForEachChannel(static ch => ((NvmeChannelContext)ch.Context).FailAll(), () => HotRemoved?.Invoke(this));
    }

    internal override void StopAdminPoller()
    {
        if (_resetPoller is not null)
        {
            // Detached in the middle of a reset: it will not finish; its callers hear so.
            AdminReactor.UnregisterPoller(_resetPoller);
            _resetPoller = null;
            FinishReset(false);
        }

        if (_adminPoller is not null)
        {
            AdminReactor.UnregisterPoller(_adminPoller);
            _adminPoller = null;
        }

        if (_adminIrqPoller is not null)
        {
            AdminReactor.UnregisterPoller(_adminIrqPoller);
            _adminIrqPoller = null;
        }

        if (_removalPoller is not null)
        {
            AdminReactor.UnregisterPoller(_removalPoller);
            _removalPoller = null;
        }
    }

    private int PollAdmin()
    {
        if (IsRemoved)
        {
            return 0;
        }

        int n = Controller.ProcessAdminCompletions();
        if (Controller.CheckHealth() == NvmeHealth.Removed)
        {
            BeginHotRemove("registers read all ones (surprise removal)");
            return 1;
        }

        if (Controller.NeedsReset && !_resetting)
        {
            // Recovery (fatal status, a command that timed out): if this reset fails the controller is gone.
            _recoveryReset = true;
            _ = ResetAsync();
            return 1;
        }

        return n;
    }

    /// <summary>
    /// Resets the controller without blocking any reactor (SPDK bdev_nvme's disconnect/reconnect): on the admin
    /// reactor the driver's reset state machine (<see cref="NvmeController.StartReset"/>) is advanced by a poller,
    /// then every channel reconnects its queue pair on its own reactor, again by polling. I/O submitted meanwhile
    /// waits in its channel's queue, and I/O that was outstanding on a queue pair is retried (up to 3 times) once it
    /// is reconnected, like SPDK. The task completes when every channel is reconnected (or failed); it faults when the
    /// controller could not be reset (its I/O then fails). Concurrent callers share one reset.
    /// </summary>
    public override Task ResetAsync()
    {
        var tcs = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        AdminReactor.Send(static s =>
        {
            var (self, t) = ((NvmeBdevController, TaskCompletionSource))s!;
            self.AddResetWaiter(t);
            if (!self._resetting)
            {
                self.StartReset();
            }
        }, (this, tcs));
        return tcs.Task;
    }

    private void StartReset()
    {
        _resetting = true;
        _resetStartTicks = Ticks.Now();
        ClearMaxControlStep();
        bool started = Controller.StartReset();
        RecordControlStep(Ticks.Now() - _resetStartTicks);
        if (!started)
        {
            FinishReset(false);
            return;
        }

        _resetPoller = AdminReactor.RegisterPoller("nvme_ctrlr_reset:" + CtrlName, static c => ((NvmeBdevController)c!).PollReset(), this);
    }

    private int PollReset()
    {
        long t0 = Ticks.Now();
        var st = Controller.PollReset();
        RecordControlStep(Ticks.Now() - t0);
        if (st == NvmeResetState.InProgress)
        {
            return 0;
        }

        AdminReactor.UnregisterPoller(_resetPoller!);
        _resetPoller = null;
        if (st != NvmeResetState.Succeeded)
        {
            bool gone = _recoveryReset || Controller.IsRemoved || Controller.CheckHealth() == NvmeHealth.Removed;
            _log.LogError("NVMe controller {Name}: reset failed: {Error}; failing its I/O", CtrlName, Controller.ResetError);
            if (gone)
            {
                // A controller that failed and could not be reset back (or whose device is gone): hot-remove it,
                // so the devices above see a clean removal and the name is free to attach again.
                string why = "reset failed: " + Controller.ResetError;
                FinishReset(false);
                BeginHotRemove(why);
                return 1;
            }

            ForEachChannel(static ch => ((NvmeChannelContext)ch.Context).FailAll(), () => FinishReset(false));
            return 1;
        }

        // One count for the walk itself, one per channel that starts reconnecting (each reports back here).
        BeginReconnectWalk();
        ForEachChannel(static ch => ((NvmeChannelContext)ch.Context).StartReconnect(), ReconnectDone);
        return 1;
    }

    /// <summary>On the admin reactor: a channel finished reconnecting (or the walk over channels ended).</summary>
    internal override void ReconnectDone()
    {
        if (EndOneReconnect() && _resetting)
        {
            FinishReset(true);
        }
    }

    private void FinishReset(bool ok)
    {
        _resetting = false;
        _recoveryReset = false;
        Volatile.Write(ref _lastResetTicks, Ticks.Now() - _resetStartTicks);
        _log.LogInformation("NVMe controller {Name}: reset {Result} in {Us} us", CtrlName, ok ? "done" : "failed", Ticks.ToMicroseconds(Ticks.Now() - _resetStartTicks));
        CompleteResetWaiters(ok, Controller.ResetError);
    }

    protected override object CreateChannelContext(Reactor reactor) => new NvmeChannelContext(this, reactor, _log);

    protected override void DestroyChannelContext(Reactor reactor, object context) => ((NvmeChannelContext)context).Destroy();
}
