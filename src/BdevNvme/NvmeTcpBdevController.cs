using System.Text.Json.Nodes;
using Microsoft.Extensions.Logging;
using VhostBackend.Nvme;
using VhostBackend.Nvme.Tcp;
using VhostBackend.Platform;
using VhostBackend.Reactors;

namespace VhostBackend.BdevNvme;

/// <summary>How a controller rides out a lost path (SPDK's bdev_nvme_ctrlr_opts: seconds; -1 = forever).</summary>
public readonly record struct NvmePathLossPolicy(int CtrlrLossTimeoutSec, int ReconnectDelaySec, int FastIoFailTimeoutSec)
{
    /// <summary>SPDK's bdev_nvme_check_io_error_resiliency_params; the message names the offending parameter.</summary>
    public string? Check()
    {
        if (CtrlrLossTimeoutSec < -1)
        {
            return "ctrlr_loss_timeout_sec can't be less than -1.";
        }

        if (ReconnectDelaySec < 0 || FastIoFailTimeoutSec < 0)
        {
            return ReconnectDelaySec < 0 ? "reconnect_delay_sec can't be negative." : "fast_io_fail_timeout_sec can't be negative.";
        }

        if (CtrlrLossTimeoutSec == 0)
        {
            return ReconnectDelaySec != 0 || FastIoFailTimeoutSec != 0
                ? "Both reconnect_delay_sec and fast_io_fail_timeout_sec must be 0 if ctrlr_loss_timeout_sec is 0."
                : null;
        }

        if (ReconnectDelaySec == 0)
        {
            return "reconnect_delay_sec can't be 0 if ctrlr_loss_timeout_sec is not 0.";
        }

        if (CtrlrLossTimeoutSec > 0 && ReconnectDelaySec > CtrlrLossTimeoutSec)
        {
            return "reconnect_delay_sec can't be more than ctrlr_loss_timeout_sec.";
        }

        if (FastIoFailTimeoutSec != 0 && FastIoFailTimeoutSec < ReconnectDelaySec)
        {
            return "reconnect_delay_sec can't be more than fast_io_fail_timeout_sec.";
        }

        if (CtrlrLossTimeoutSec > 0 && FastIoFailTimeoutSec > CtrlrLossTimeoutSec)
        {
            return "fast_io_fail_timeout_sec can't be more than ctrlr_loss_timeout_sec.";
        }

        return null;
    }
}

/// <summary>
/// An attached NVMe/TCP controller as the bdev module sees it: the driver's <see cref="NvmeTcpController"/>, its
/// namespaces' bdevs, the per-reactor channels (one TCP queue pair each) and the admin poller on the reactor that
/// attached it, which reaps admin completions, sends keep-alives and runs the path-loss policy.
/// <para>
/// Path loss (the admin connection or any channel's connection fails): every channel closes its connection (its
/// outstanding I/O goes back to its queue); reconnect attempts start at once and then every reconnect_delay_sec; I/O
/// waits meanwhile, and fails once fast_io_fail_timeout_sec has passed; after ctrlr_loss_timeout_sec the controller
/// is given up (SPDK deletes it: so does <see cref="GiveUp"/> through the module). With ctrlr_loss_timeout_sec 0 there
/// is one attempt; if it fails the controller stays failed (I/O fails) until bdev_nvme_reset_controller. Nothing here
/// blocks a reactor: the driver's reconnect is a state machine polled every 10 ms.
/// </para>
/// </summary>
public sealed class NvmeTcpBdevController : NvmeBdevControllerBase
{
    private const int StateEnabled = 0;
    private const int StateReconnecting = 1;
    private const int StateChannels = 2;
    private const int StateFailed = 3;

    private readonly ILogger _log;
    private readonly Action<NvmeTcpBdevController>? _onGiveUp;
    private Poller? _adminPoller;
    private volatile int _state;
    private volatile bool _removed;
    private volatile bool _fastIoFailed;
    private long _lostAt;
    private long _nextAttempt;
    private bool _attemptRunning;
    private bool _channelLost;

    internal NvmeTcpBdevController(string name, NvmeTcpController ctrl, NvmePathLossPolicy policy, int ioQueueEntries, long ioTimeoutTicks, Reactor adminReactor, ILogger log, Action<NvmeTcpBdevController>? onGiveUp)
        : base(name, adminReactor)
    {
        Controller = ctrl;
        Policy = policy;
        IoQueueEntries = ioQueueEntries;
        IoTimeoutTicks = ioTimeoutTicks;
        _log = log;
        _onGiveUp = onGiveUp;
    }

    public NvmeTcpController Controller { get; }
    public NvmePathLossPolicy Policy { get; }
    internal int IoQueueEntries { get; }
    internal long IoTimeoutTicks { get; }

    public override string TrType => "TCP";
    public override string TrAddr => Controller.TransportId.Address.ToString();
    public override string TridKey => $"TCP:{TrAddr}:{Controller.TransportId.Port}:{Controller.TransportId.SubNqn}";
    public override NvmeControllerData Data => Controller.Data;
    public override uint MaxTransferBytes => Controller.MaxTransferBytes;
    public override bool IsRemoved => _removed;

    /// <summary>Connected and not reconnecting.</summary>
    public bool IsPathUp => _state == StateEnabled;

    /// <summary>fast_io_fail_timeout_sec passed while the path is down: I/O fails instead of waiting.</summary>
    public bool FastIoFailed => _fastIoFailed;

    public int ReconnectCount { get; private set; }

    public override JsonObject TridJson()
    {
        var t = Controller.TransportId;
        return new JsonObject
        {
            ["trtype"] = "TCP",
            ["adrfam"] = t.Family == System.Net.Sockets.AddressFamily.InterNetworkV6 ? "IPv6" : "IPv4",
            ["traddr"] = TrAddr,
            ["trsvcid"] = t.Port.ToString(System.Globalization.CultureInfo.InvariantCulture),
            ["subnqn"] = t.SubNqn,
        };
    }

    public override JsonObject ConfigParams()
    {
        var t = Controller.TransportId;
        var p = new JsonObject { ["name"] = CtrlName };
        foreach (var kv in TridJson())
        {
            p[kv.Key] = kv.Value!.DeepClone();
        }

        p["hostnqn"] = t.EffectiveHostNqn;
        if (t.HostAddress is not null)
        {
            p["hostaddr"] = t.HostAddress.ToString();
        }

        if (t.HostPort != 0)
        {
            p["hostsvcid"] = t.HostPort.ToString(System.Globalization.CultureInfo.InvariantCulture);
        }

        p["hdgst"] = t.HeaderDigest;
        p["ddgst"] = t.DataDigest;
        p["ctrlr_loss_timeout_sec"] = Policy.CtrlrLossTimeoutSec;
        p["reconnect_delay_sec"] = Policy.ReconnectDelaySec;
        p["fast_io_fail_timeout_sec"] = Policy.FastIoFailTimeoutSec;
        return p;
    }

    public override JsonObject Describe()
    {
        var t = Controller.TransportId;
        return new JsonObject
        {
            ["state"] = _removed || _state == StateFailed ? "failed" : _state == StateEnabled ? "enabled" : "resetting",
            ["trid"] = TridJson(),
            ["cntlid"] = Controller.Cntlid,
            ["host"] = new JsonObject
            {
                ["nqn"] = t.EffectiveHostNqn,
                ["addr"] = t.HostAddress?.ToString() ?? "",
                ["svcid"] = t.HostPort != 0 ? t.HostPort.ToString(System.Globalization.CultureInfo.InvariantCulture) : "",
            },

            // Extension fields (not in SPDK).
            ["reset_count"] = ReconnectCount,
            ["hdgst"] = Controller.HeaderDigest,
            ["ddgst"] = Controller.DataDigest,
            ["max_control_step_us"] = Math.Round(MaxControlStepMicroseconds, 1),
        };
    }

    internal override void StartAdminPoller()
    {
        _adminPoller = AdminReactor.RegisterPoller("nvme_ctrlr_admin:" + CtrlName, static ctx => ((NvmeTcpBdevController)ctx!).PollAdmin(), this, 10_000);
    }

    internal override void StopAdminPoller()
    {
        if (_adminPoller is not null)
        {
            AdminReactor.UnregisterPoller(_adminPoller);
            _adminPoller = null;
        }

        _removed = true;
        FinishReset(false, "controller detached");
    }

    internal override void DisposeDriver() => Controller.Dispose();

    /// <summary>On the admin reactor: a channel's connection failed.</summary>
    internal void ChannelLost() => _channelLost = true;

    private int PollAdmin()
    {
        if (_removed)
        {
            return 0;
        }

        long now = Ticks.Now();
        switch (_state)
        {
            case StateEnabled:
            {
                int n = Controller.ProcessAdminCompletions();
                if (Controller.IsFailed || _channelLost)
                {
                    PathLost(Controller.IsFailed ? Controller.FailureReason : "an I/O connection failed");
                    return 1;
                }

                return n;
            }

            case StateChannels:
                Controller.ProcessAdminCompletions();
                return 0;
            case StateFailed:
                return 0;
        }

        // Reconnecting.
        long elapsed = now - _lostAt;
        if (!_fastIoFailed && Policy.FastIoFailTimeoutSec > 0 && elapsed >= Policy.FastIoFailTimeoutSec * Ticks.Frequency)
        {
            _fastIoFailed = true;
            _log.LogWarning("NVMe/TCP {Name}: path down for fast_io_fail_timeout_sec ({Sec} s): failing I/O until it is back", CtrlName, Policy.FastIoFailTimeoutSec);
            ForEachChannel(static ch => ((NvmeTcpChannelContext)ch.Context).FailQueued(), static () => { });
        }

        if (Policy.CtrlrLossTimeoutSec > 0 && elapsed >= Policy.CtrlrLossTimeoutSec * Ticks.Frequency)
        {
            GiveUp($"not reconnected within ctrlr_loss_timeout_sec ({Policy.CtrlrLossTimeoutSec} s)");
            return 1;
        }

        if (_attemptRunning)
        {
            long t0 = Ticks.Now();
            int rc = Controller.PollReconnect();
            RecordControlStep(Ticks.Now() - t0);
            if (rc == 0)
            {
                return 0;
            }

            _attemptRunning = false;
            if (rc < 0)
            {
                _log.LogWarning("NVMe/TCP {Name}: reconnect failed: {Error}", CtrlName, Controller.FailureReason);
                if (Policy.CtrlrLossTimeoutSec == 0)
                {
                    _state = StateFailed;
                    _fastIoFailed = true;
                    ForEachChannel(static ch => ((NvmeTcpChannelContext)ch.Context).FailQueued(), static () => { });
                    FinishReset(false, Controller.FailureReason ?? "reconnect failed");
                    return 1;
                }

                _nextAttempt = now + (Policy.ReconnectDelaySec * Ticks.Frequency);
                return 1;
            }

            // The admin queue is back (a new association): reconnect every channel's queue pair.
            _state = StateChannels;
            _channelLost = false;
            BeginReconnectWalk();
            ForEachChannel(static ch => ((NvmeTcpChannelContext)ch.Context).StartReconnect(), ReconnectDone);
            return 1;
        }

        if (now >= _nextAttempt)
        {
            long t0 = Ticks.Now();
            Controller.StartReconnect();
            RecordControlStep(Ticks.Now() - t0);
            _attemptRunning = true;
        }

        return 0;
    }

    private void PathLost(string? reason)
    {
        _log.LogWarning("NVMe/TCP {Name}: path lost ({Reason}); reconnecting", CtrlName, reason);
        _state = StateReconnecting;
        _lostAt = Ticks.Now();
        _nextAttempt = _lostAt;
        _attemptRunning = false;
        _channelLost = false;
        ForEachChannel(static ch => ((NvmeTcpChannelContext)ch.Context).Disconnect(), static () => { });
    }

    /// <summary>On the admin reactor: a channel finished reconnecting (or the walk over the channels ended).</summary>
    internal override void ReconnectDone()
    {
        if (!EndOneReconnect() || _state != StateChannels)
        {
            return;
        }

        if (_channelLost)
        {
            // A queue pair could not connect: the association is not usable; try again (the loss clock keeps running).
            _state = StateReconnecting;
            _channelLost = false;
            _nextAttempt = Ticks.Now() + (Math.Max(1, Policy.ReconnectDelaySec) * Ticks.Frequency);
            ForEachChannel(static ch => ((NvmeTcpChannelContext)ch.Context).Disconnect(), static () => { });
            return;
        }

        _state = StateEnabled;
        _fastIoFailed = false;
        ReconnectCount++;
        _log.LogInformation("NVMe/TCP {Name}: reconnected (cntlid {Cntlid})", CtrlName, Controller.Cntlid);
        FinishReset(true, null);
    }

    private void GiveUp(string reason)
    {
        _log.LogError("NVMe/TCP {Name}: giving the controller up: {Reason}", CtrlName, reason);
        _removed = true;
        _state = StateFailed;
        ForEachChannel(static ch => ((NvmeTcpChannelContext)ch.Context).FailAll(), static () => { });
        FinishReset(false, reason);
        _onGiveUp?.Invoke(this);
    }

    /// <summary>
    /// bdev_nvme_reset_controller for a fabrics controller (SPDK disconnects and reconnects it): closes every
    /// connection and runs the reconnect path at once. Completes when every channel is connected again.
    /// </summary>
    public override Task ResetAsync()
    {
        var tcs = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        AdminReactor.Send(static s =>
        {
            var (self, t) = ((NvmeTcpBdevController, TaskCompletionSource))s!;
            if (self._removed)
            {
                t.TrySetException(new IOException("controller was given up"));
                return;
            }

            self.AddResetWaiter(t);
            if (self._state is StateEnabled or StateFailed)
            {
                self._fastIoFailed = false;
                self.PathLost("reset requested");
            }
        }, (this, tcs));
        return tcs.Task;
    }

    private void FinishReset(bool ok, string? error) => CompleteResetWaiters(ok, error);

    protected override object CreateChannelContext(Reactor reactor) => new NvmeTcpChannelContext(this, reactor, _log);

    protected override void DestroyChannelContext(Reactor reactor, object context) => ((NvmeTcpChannelContext)context).Destroy();
}
