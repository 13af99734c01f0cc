using System.Diagnostics;
using Microsoft.Extensions.Logging;
using VhostBackend.Nvme;
using VhostBackend.Reactor;

namespace VhostBackend.BdevNvme;

/// <summary>
/// One attached NVMe controller as the bdev module sees it (SPDK's nvme_ctrlr): the driver's controller, its
/// namespaces' bdevs, the I/O device whose per-reactor channels own one queue pair each, and the admin poller
/// (asynchronous events, health, resets) on the reactor that attached it.
/// </summary>
public sealed class NvmeBdevController : IoDevice
{
    private readonly ILogger _log;
    private readonly List<TaskCompletionSource> _resetWaiters = new();
    private Poller? _adminPoller;
    private bool _resetting;

    internal NvmeBdevController(string name, string traddr, NvmeController ctrl, Reactor.Reactor adminReactor, ILogger log)
        : base("nvme:" + name)
    {
        CtrlName = name;
        TrAddr = traddr;
        Controller = ctrl;
        AdminReactor = adminReactor;
        _log = log;
    }

    public string CtrlName { get; }
    public string TrAddr { get; }
    public NvmeController Controller { get; }
    public Reactor.Reactor AdminReactor { get; }
    public List<NvmeBdev> Bdevs { get; } = new();
    public bool IsResetting => _resetting;
    public bool IsRemoved { get; private set; }

    /// <summary>Starts the admin poller (every 10 ms) on the calling reactor.</summary>
    internal void StartAdminPoller()
    {
        _adminPoller = AdminReactor.RegisterPoller("nvme_ctrlr_admin:" + CtrlName, static ctx => ((NvmeBdevController)ctx!).PollAdmin(), this, 10_000);
    }

    internal void StopAdminPoller()
    {
        if (_adminPoller is not null)
        {
            AdminReactor.UnregisterPoller(_adminPoller);
            _adminPoller = null;
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
            IsRemoved = true;
            _log.LogError("NVMe controller {Name} ({Addr}) was removed: failing its I/O", CtrlName, TrAddr);
            ForEachChannel(static ch => ((NvmeChannelContext)ch.Context).FailAll(), static () => { });
            return 1;
        }

        if (Controller.NeedsReset && !_resetting)
        {
            _ = ResetAsync();
            return 1;
        }

        return n;
    }

    /// <summary>
    /// Resets the controller (on the admin reactor): controller reset, then every channel reconnects its queue pair
    /// on its own reactor; I/O that was outstanding is retried there. Concurrent callers share one reset.
    /// </summary>
    public Task ResetAsync()
    {
        var tcs = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        AdminReactor.Send(static s =>
        {
            var (self, t) = ((NvmeBdevController, TaskCompletionSource))s!;
            self._resetWaiters.Add(t);
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
        var sw = Stopwatch.StartNew();
        bool ok = true;
        try
        {
            Controller.Reset();
        }
        catch (Exception e) when (e is IOException or TimeoutException)
        {
            _log.LogError("NVMe controller {Name}: reset failed: {Error}", CtrlName, e.Message);
            ok = false;
        }

        ForEachChannel(
            static ch => ((NvmeChannelContext)ch.Context).Reconnect(),
            () =>
            {
                _resetting = false;
                _log.LogInformation("NVMe controller {Name}: reset {Result} in {Ms} ms", CtrlName, ok ? "done" : "failed", sw.ElapsedMilliseconds);
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
                        w.TrySetException(new IOException("controller reset failed"));
                    }
                }
            });
    }

    protected override object CreateChannelContext(Reactor.Reactor reactor) => new NvmeChannelContext(this, reactor, _log);

    protected override void DestroyChannelContext(Reactor.Reactor reactor, object context) => ((NvmeChannelContext)context).Destroy();

    internal void MarkGone() => MarkUnregistered();
}
