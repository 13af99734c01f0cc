using System.Text.Json.Nodes;
using System.Text.Json.Serialization;
using VhostBackend.Bdev.Rpc;
using System.Globalization;
using System.Net;
using System.Net.Sockets;
using VhostBackend.Nvme;
using VhostBackend.Nvme.Tcp;
using VhostBackend.Rpc;

namespace VhostBackend.BdevNvme;

/// <summary>
/// bdev_nvme_attach_controller params (SPDK v24.01's names). trtype PCIe or TCP; every parameter SPDK accepts is
/// decoded, and one that does not apply to the transport or that this module does not implement is an error naming
/// it (-EINVAL), never silently ignored.
/// </summary>
public sealed class AttachControllerParams : IRpcParams
{
    [JsonRequired] public string Name { get; set; } = "";
    [JsonRequired] public string Trtype { get; set; } = "";
    [JsonRequired] public string Traddr { get; set; } = "";
    public string? Adrfam { get; set; }
    public string? Trsvcid { get; set; }
    public string? Priority { get; set; }
    public string? Subnqn { get; set; }
    public string? Hostnqn { get; set; }
    public string? Hostaddr { get; set; }
    public string? Hostsvcid { get; set; }
    public bool? PrchkReftag { get; set; }
    public bool? PrchkGuard { get; set; }
    public bool? Hdgst { get; set; }
    public bool? Ddgst { get; set; }
    public ulong? FabricsConnectTimeoutUs { get; set; }
    public string? Multipath { get; set; }
    public int? NumIoQueues { get; set; }
    public int? CtrlrLossTimeoutSec { get; set; }
    public int? ReconnectDelaySec { get; set; }
    public int? FastIoFailTimeoutSec { get; set; }
    public string? Psk { get; set; }
    public int? MaxBdevs { get; set; }

    public bool IsTcp => string.Equals(Trtype, "TCP", StringComparison.OrdinalIgnoreCase);

    [JsonIgnore] public IPAddress? TcpAddress { get; private set; }
    [JsonIgnore] public int TcpPort { get; private set; } = 4420;
    [JsonIgnore] public IPAddress? HostAddress { get; private set; }
    [JsonIgnore] public int HostPort { get; private set; }

    private static RpcException Invalid(string msg) => RpcException.Errno(22, msg);

    private static int ParsePort(string value, string param) =>
        int.TryParse(value, NumberStyles.None, CultureInfo.InvariantCulture, out int port) && port is > 0 and <= 65535
            ? port
            : throw Invalid($"Failed to parse {param}: {value}");

    public void Validate()
    {
        if (string.IsNullOrWhiteSpace(Name) || Name.Length > 128 || Name.Any(c => char.IsWhiteSpace(c) || c == '/'))
        {
            throw Invalid("name must be a non-empty word");
        }

        // Not implemented on any transport: refuse rather than ignore.
        if (Priority is not null)
        {
            throw Invalid("priority is not supported");
        }

        if (PrchkReftag == true || PrchkGuard == true)
        {
            throw Invalid((PrchkReftag == true ? "prchk_reftag" : "prchk_guard") + " is not supported (no protection information)");
        }

        if (Psk is not null)
        {
            throw Invalid("psk is not supported (no TLS)");
        }

        if (Multipath is not null && !string.Equals(Multipath, "disable", StringComparison.OrdinalIgnoreCase))
        {
            throw Invalid($"multipath {Multipath} is not supported (only disable)");
        }

        if (MaxBdevs is < 1 or > 1024)
        {
            throw Invalid("max_bdevs must be between 1 and 1024");
        }

        if (NumIoQueues is < 1 or > 65535)
        {
            throw Invalid("num_io_queues must be between 1 and 65535");
        }

        if (IsTcp)
        {
            ValidateTcp();
            return;
        }

        if (!string.Equals(Trtype, "PCIe", StringComparison.OrdinalIgnoreCase))
        {
            throw Invalid($"Failed to parse trtype: {Trtype} (PCIe and TCP are supported)"); // SPDK: -EINVAL
        }

        if (!VfioPciDevice.TryNormalizeAddress(Traddr, out _))
        {
            throw Invalid($"Failed to parse traddr: {Traddr}");
        }

        foreach (var (param, given) in new[]
        {
            ("adrfam", Adrfam is not null), ("trsvcid", Trsvcid is not null), ("subnqn", Subnqn is not null),
            ("hostnqn", Hostnqn is not null), ("hostaddr", Hostaddr is not null), ("hostsvcid", Hostsvcid is not null),
            ("hdgst", Hdgst == true), ("ddgst", Ddgst == true), ("fabrics_connect_timeout_us", FabricsConnectTimeoutUs is not null),
            ("ctrlr_loss_timeout_sec", CtrlrLossTimeoutSec is not null and not 0), ("reconnect_delay_sec", ReconnectDelaySec is not null and not 0),
            ("fast_io_fail_timeout_sec", FastIoFailTimeoutSec is not null and not 0),
        })
        {
            if (given)
            {
                throw Invalid($"{param} is not supported for trtype PCIe");
            }
        }
    }

    private void ValidateTcp()
    {
        if (!IPAddress.TryParse(Traddr, out var addr))
        {
            throw Invalid($"Failed to parse traddr: {Traddr} (an IPv4 or IPv6 address)");
        }

        TcpAddress = addr;
        if (Adrfam is not null)
        {
            var fam = Adrfam.ToUpperInvariant() switch
            {
                "IPV4" => AddressFamily.InterNetwork,
                "IPV6" => AddressFamily.InterNetworkV6,
                _ => throw Invalid($"Failed to parse adrfam: {Adrfam} (IPv4 or IPv6)"),
            };
            if (fam != addr.AddressFamily)
            {
                throw Invalid($"adrfam {Adrfam} does not match traddr {Traddr}");
            }
        }

        if (Trsvcid is not null)
        {
            TcpPort = ParsePort(Trsvcid, "trsvcid");
        }

        if (Subnqn is null)
        {
            throw Invalid("subnqn is required for trtype TCP");
        }

        if (!NvmeFabrics.IsValidNqn(Subnqn) || Subnqn == NvmeFabrics.DiscoveryNqn)
        {
            throw Invalid($"Failed to parse subnqn: {Subnqn}");
        }

        if (Hostnqn is not null && !NvmeFabrics.IsValidNqn(Hostnqn))
        {
            throw Invalid($"Failed to parse hostnqn: {Hostnqn}");
        }

        if (Hostaddr is not null)
        {
            if (!IPAddress.TryParse(Hostaddr, out var h) || h.AddressFamily != addr.AddressFamily)
            {
                throw Invalid($"Failed to parse hostaddr: {Hostaddr}");
            }

            HostAddress = h;
        }

        if (Hostsvcid is not null)
        {
            HostPort = ParsePort(Hostsvcid, "hostsvcid");
        }

        if (FabricsConnectTimeoutUs is 0 or > 3_600_000_000)
        {
            throw Invalid("fabrics_connect_timeout_us must be between 1 and 3600000000");
        }
    }
}

/// <summary>
/// Module-wide options (bdev_nvme_set_options, SPDK v24.01 names and defaults). Implemented: the path-loss
/// defaults (ctrlr_loss_timeout_sec, reconnect_delay_sec, fast_io_fail_timeout_sec), keep_alive_timeout_ms,
/// timeout_us and timeout_admin_us with action_on_timeout none, reset or abort (both transports),
/// io_queue_requests (TCP controllers). Every other field must keep its default: another value is an error naming it.
/// </summary>
public sealed class NvmeBdevOptions : IRpcParams
{
    public string ActionOnTimeout { get; set; } = "none";
    public ulong TimeoutUs { get; set; }
    public ulong TimeoutAdminUs { get; set; }
    public uint KeepAliveTimeoutMs { get; set; } = 10000;
    public uint? RetryCount { get; set; }
    public uint ArbitrationBurst { get; set; }
    public uint LowPriorityWeight { get; set; }
    public uint MediumPriorityWeight { get; set; }
    public uint HighPriorityWeight { get; set; }
    public ulong NvmeAdminqPollPeriodUs { get; set; } = 10000;
    public ulong NvmeIoqPollPeriodUs { get; set; }
    public int IoQueueRequests { get; set; }
    public bool DelayCmdSubmit { get; set; } = true;
    public uint TransportRetryCount { get; set; } = 4;
    public int BdevRetryCount { get; set; } = 3;
    public byte TransportAckTimeout { get; set; }
    public int CtrlrLossTimeoutSec { get; set; }
    public int ReconnectDelaySec { get; set; }
    public int FastIoFailTimeoutSec { get; set; }
    public bool DisableAutoFailback { get; set; }
    public bool GenerateUuids { get; set; }
    public byte TransportTos { get; set; }
    public bool NvmeErrorStat { get; set; }
    public uint RdmaSrqSize { get; set; }
    public bool IoPathStat { get; set; }
    public bool AllowAccelSequence { get; set; }
    public uint RdmaMaxCqSize { get; set; }

    /// <summary>action_on_timeout as an enum (after <see cref="Validate"/>).</summary>
    [JsonIgnore] public NvmeTimeoutAction TimeoutActionValue => ActionOnTimeout switch
    {
        "reset" => NvmeTimeoutAction.Reset,
        "abort" => NvmeTimeoutAction.Abort,
        _ => NvmeTimeoutAction.None,
    };

    /// <summary>
    /// The admin command timeout SPDK registers: timeout_admin_us, or timeout_us when that is 0, only when timeout_us
    /// is set; null otherwise (the driver's own bound, 10 s, keeps the control path from hanging).
    /// </summary>
    [JsonIgnore] public TimeSpan? AdminTimeout => TimeoutUs == 0 ? null : TimeSpan.FromMicroseconds(TimeoutAdminUs != 0 ? TimeoutAdminUs : TimeoutUs);

    [JsonIgnore] public NvmePathLossPolicy Policy => new(CtrlrLossTimeoutSec, ReconnectDelaySec, FastIoFailTimeoutSec);

    [JsonIgnore] public bool IsDefault => ToJson().ToJsonString() == new NvmeBdevOptions().ToJson().ToJsonString();

    public void Validate()
    {
        string? unsupported =
            RetryCount is not null && RetryCount != 4 ? "retry_count"
            : ArbitrationBurst != 0 ? "arbitration_burst"
            : LowPriorityWeight != 0 ? "low_priority_weight"
            : MediumPriorityWeight != 0 ? "medium_priority_weight"
            : HighPriorityWeight != 0 ? "high_priority_weight"
            : NvmeAdminqPollPeriodUs != 10000 ? "nvme_adminq_poll_period_us"
            : NvmeIoqPollPeriodUs != 0 ? "nvme_ioq_poll_period_us"
            : !DelayCmdSubmit ? "delay_cmd_submit"
            : TransportRetryCount != 4 ? "transport_retry_count"
            : BdevRetryCount != 3 ? "bdev_retry_count"
            : TransportAckTimeout != 0 ? "transport_ack_timeout"
            : DisableAutoFailback ? "disable_auto_failback"
            : GenerateUuids ? "generate_uuids"
            : TransportTos != 0 ? "transport_tos"
            : NvmeErrorStat ? "nvme_error_stat"
            : RdmaSrqSize != 0 ? "rdma_srq_size"
            : IoPathStat ? "io_path_stat"
            : AllowAccelSequence ? "allow_accel_sequence"
            : RdmaMaxCqSize != 0 ? "rdma_max_cq_size"
            : null;
        if (unsupported is not null)
        {
            throw RpcException.Errno(22, $"{unsupported} is not supported by this bdev_nvme");
        }

        if (ActionOnTimeout is not ("none" or "reset" or "abort"))
        {
            throw RpcException.Errno(22, $"Invalid parameter value: action_on_timeout {ActionOnTimeout} (none, reset or abort)");
        }

        if (IoQueueRequests is < 0 or > 65535)
        {
            throw RpcException.Errno(22, "io_queue_requests must be between 0 and 65535");
        }

        if (KeepAliveTimeoutMs > 3_600_000)
        {
            throw RpcException.Errno(22, "keep_alive_timeout_ms must be at most 3600000");
        }

        if (TimeoutUs > 3_600_000_000 || TimeoutAdminUs > 3_600_000_000)
        {
            throw RpcException.Errno(22, (TimeoutUs > 3_600_000_000 ? "timeout_us" : "timeout_admin_us") + " must be at most 3600000000");
        }

        if (Policy.Check() is { } err)
        {
            throw RpcException.Errno(22, err);
        }
    }

    public void CopyFrom(NvmeBdevOptions o)
    {
        foreach (var prop in typeof(NvmeBdevOptions).GetProperties())
        {
            if (prop.CanWrite)
            {
                prop.SetValue(this, prop.GetValue(o));
            }
        }
    }

    public JsonObject ToJson() => new()
    {
        ["action_on_timeout"] = ActionOnTimeout,
        ["timeout_us"] = TimeoutUs,
        ["timeout_admin_us"] = TimeoutAdminUs,
        ["keep_alive_timeout_ms"] = KeepAliveTimeoutMs,
        ["transport_retry_count"] = TransportRetryCount,
        ["arbitration_burst"] = ArbitrationBurst,
        ["low_priority_weight"] = LowPriorityWeight,
        ["medium_priority_weight"] = MediumPriorityWeight,
        ["high_priority_weight"] = HighPriorityWeight,
        ["nvme_adminq_poll_period_us"] = NvmeAdminqPollPeriodUs,
        ["nvme_ioq_poll_period_us"] = NvmeIoqPollPeriodUs,
        ["io_queue_requests"] = IoQueueRequests,
        ["delay_cmd_submit"] = DelayCmdSubmit,
        ["bdev_retry_count"] = BdevRetryCount,
        ["transport_ack_timeout"] = TransportAckTimeout,
        ["ctrlr_loss_timeout_sec"] = CtrlrLossTimeoutSec,
        ["reconnect_delay_sec"] = ReconnectDelaySec,
        ["fast_io_fail_timeout_sec"] = FastIoFailTimeoutSec,
        ["disable_auto_failback"] = DisableAutoFailback,
        ["generate_uuids"] = GenerateUuids,
        ["transport_tos"] = TransportTos,
        ["nvme_error_stat"] = NvmeErrorStat,
        ["rdma_srq_size"] = RdmaSrqSize,
        ["io_path_stat"] = IoPathStat,
        ["allow_accel_sequence"] = AllowAccelSequence,
        ["rdma_max_cq_size"] = RdmaMaxCqSize,
    };
}

public sealed class DetachControllerParams
{
    [JsonRequired] public string Name { get; set; } = "";
    public string? Trtype { get; set; }
    public string? Traddr { get; set; }
    public string? Adrfam { get; set; }
    public string? Trsvcid { get; set; }
    public string? Subnqn { get; set; }
    public string? Hostaddr { get; set; }
    public string? Hostsvcid { get; set; }

    /// <summary>True when every trid field given matches the controller's path (SPDK compares the fields that are set).</summary>
    public bool Matches(NvmeBdevControllerBase c)
    {
        if (Trtype is not null && !string.Equals(Trtype, c.TrType, StringComparison.OrdinalIgnoreCase))
        {
            return false;
        }

        if (c is NvmeBdevController)
        {
            return Traddr is null || (VfioPciDevice.TryNormalizeAddress(Traddr, out var a) && a == c.TrAddr);
        }

        var t = ((NvmeTcpBdevController)c).Controller.TransportId;
        return (Traddr is null || (IPAddress.TryParse(Traddr, out var ip) && ip.Equals(t.Address)))
            && (Trsvcid is null || Trsvcid == t.Port.ToString(CultureInfo.InvariantCulture))
            && (Subnqn is null || Subnqn == t.SubNqn)
            && (Adrfam is null || string.Equals(Adrfam, t.Family == AddressFamily.InterNetworkV6 ? "IPv6" : "IPv4", StringComparison.OrdinalIgnoreCase))
            && (Hostaddr is null || (IPAddress.TryParse(Hostaddr, out var h) && h.Equals(t.HostAddress)))
            && (Hostsvcid is null || Hostsvcid == t.HostPort.ToString(CultureInfo.InvariantCulture));
    }
}

/// <summary>bdev_nvme_start_discovery params (SPDK v24.01 names; TCP only).</summary>
public sealed class StartDiscoveryParams : IRpcParams
{
    [JsonRequired] public string Name { get; set; } = "";
    [JsonRequired] public string Trtype { get; set; } = "";
    [JsonRequired] public string Traddr { get; set; } = "";
    public string? Adrfam { get; set; }
    public string? Trsvcid { get; set; }
    public string? Hostnqn { get; set; }
    public bool? WaitForAttach { get; set; }
    public ulong? AttachTimeoutMs { get; set; }
    public int? CtrlrLossTimeoutSec { get; set; }
    public int? ReconnectDelaySec { get; set; }
    public int? FastIoFailTimeoutSec { get; set; }

    [JsonIgnore] public IPAddress Address { get; private set; } = IPAddress.None;
    [JsonIgnore] public int Port { get; private set; } = 8009;

    public void Validate()
    {
        if (string.IsNullOrWhiteSpace(Name) || Name.Length > 120 || Name.Any(c => char.IsWhiteSpace(c) || c == '/'))
        {
            throw RpcException.Errno(22, "name must be a non-empty word");
        }

        if (!string.Equals(Trtype, "TCP", StringComparison.OrdinalIgnoreCase))
        {
            throw RpcException.Errno(22, $"trtype {Trtype} is not supported for discovery (TCP only)");
        }

        if (!IPAddress.TryParse(Traddr, out var a))
        {
            throw RpcException.Errno(22, $"Failed to parse traddr: {Traddr}");
        }

        Address = a;
        if (Adrfam is not null && !string.Equals(Adrfam, a.AddressFamily == AddressFamily.InterNetworkV6 ? "IPv6" : "IPv4", StringComparison.OrdinalIgnoreCase))
        {
            throw RpcException.Errno(22, $"adrfam {Adrfam} does not match traddr {Traddr}");
        }

        if (Trsvcid is not null)
        {
            Port = int.TryParse(Trsvcid, NumberStyles.None, CultureInfo.InvariantCulture, out int p) && p is > 0 and <= 65535 ? p : throw RpcException.Errno(22, $"Failed to parse trsvcid: {Trsvcid}");
        }

        if (Hostnqn is not null && !NvmeFabrics.IsValidNqn(Hostnqn))
        {
            throw RpcException.Errno(22, $"Failed to parse hostnqn: {Hostnqn}");
        }

        if (AttachTimeoutMs is > int.MaxValue)
        {
            throw RpcException.Errno(22, $"attach_timeout_ms {AttachTimeoutMs} is out of range");
        }
    }
}

public sealed class StopDiscoveryParams
{
    [JsonRequired] public string Name { get; set; } = "";
}

public sealed class GetControllersParams
{
    public string? Name { get; set; }
}

/// <summary>bdev_nvme_reset_controller params (SPDK's: the controller's name, optionally the cntlid of one of its paths).</summary>
public sealed class ResetControllerParams
{
    [JsonRequired] public string Name { get; set; } = "";
    public ushort? Cntlid { get; set; }
}

/// <summary>The NVMe bdev module's RPC methods (SPDK's module/bdev/nvme/bdev_nvme_rpc.c names, params and error codes).</summary>
internal static class NvmeBdevRpc
{
    /// <summary>
    /// Registers bdev_nvme_attach_controller, bdev_nvme_detach_controller, bdev_nvme_get_controllers and
    /// bdev_nvme_reset_controller on <paramref name="module"/> (called from <see cref="NvmeBdevModule.Init"/>).
    /// </summary>
    public static void Register(RpcRegistry rpc, NvmeBdevModule module)
    {
        rpc.Register("bdev_nvme_attach_controller", async r =>
        {
            var p = BdevRpc.Decode<AttachControllerParams>(r);
            IReadOnlyList<string> names;
            if (p.IsTcp)
            {
                var o = module.Options;
                var policy = new NvmePathLossPolicy(
                    p.CtrlrLossTimeoutSec ?? o.CtrlrLossTimeoutSec,
                    p.ReconnectDelaySec ?? o.ReconnectDelaySec,
                    p.FastIoFailTimeoutSec ?? o.FastIoFailTimeoutSec);
                if (policy.Check() is { } err)
                {
                    throw RpcException.Errno(22, err);
                }

                var trid = new NvmeTcpTransportId
                {
                    Address = p.TcpAddress!,
                    Port = p.TcpPort,
                    SubNqn = p.Subnqn!,
                    HostNqn = p.Hostnqn,
                    HostAddress = p.HostAddress,
                    HostPort = p.HostPort,
                    HeaderDigest = p.Hdgst ?? false,
                    DataDigest = p.Ddgst ?? false,
                };
                names = await module.AttachTcpAsync(p.Name, trid, policy, p.NumIoQueues,
                    p.FabricsConnectTimeoutUs is { } us ? TimeSpan.FromMicroseconds(us) : null, p.MaxBdevs ?? 128).ConfigureAwait(true);
            }
            else
            {
                names = await module.AttachAsync(p.Name, p.Traddr, p.NumIoQueues, p.MaxBdevs ?? 128).ConfigureAwait(true);
            }

            var arr = new JsonArray();
            foreach (var n in names)
            {
                arr.Add(n);
            }

            return arr;
        }, RpcStates.Both);

        rpc.Register("bdev_nvme_detach_controller", async r =>
        {
            var p = BdevRpc.Decode<DetachControllerParams>(r);
            if (module.FindController(p.Name) is { } c && !p.Matches(c))
            {
                throw RpcException.Errno(19, $"Controller {p.Name} has no path matching the given trid");
            }

            await module.DetachAsync(p.Name).ConfigureAwait(true);
            return (JsonNode?)true;
        }, RpcStates.Runtime);

        rpc.Register("bdev_nvme_set_options", r =>
        {
            var p = BdevRpc.Decode<NvmeBdevOptions>(r);
            if (module.HasControllers)
            {
                throw RpcException.Errno(1, "RPC not permitted with nvme controllers already attached"); // SPDK: -EPERM
            }

            module.Options.CopyFrom(p);
            return (JsonNode?)true;
        }, RpcStates.Both);

        rpc.Register("bdev_nvme_start_discovery", async r =>
        {
            var p = BdevRpc.Decode<StartDiscoveryParams>(r);
            var o = module.Options;
            var policy = new NvmePathLossPolicy(p.CtrlrLossTimeoutSec ?? o.CtrlrLossTimeoutSec, p.ReconnectDelaySec ?? o.ReconnectDelaySec, p.FastIoFailTimeoutSec ?? o.FastIoFailTimeoutSec);
            if (policy.Check() is { } err)
            {
                throw RpcException.Errno(22, err);
            }

            await module.StartDiscoveryAsync(p.Name, new NvmeTcpTransportId { Address = p.Address, Port = p.Port, HostNqn = p.Hostnqn }, policy,
                p.AttachTimeoutMs is > 0 and var ms ? TimeSpan.FromMilliseconds(ms) : null, p.WaitForAttach ?? false).ConfigureAwait(true);
            return (JsonNode?)true;
        }, RpcStates.Both);

        rpc.Register("bdev_nvme_stop_discovery", async r =>
        {
            await module.StopDiscoveryAsync(BdevRpc.Decode<StopDiscoveryParams>(r).Name).ConfigureAwait(true);
            return (JsonNode?)true;
        }, RpcStates.Runtime);

        rpc.Register("bdev_nvme_get_discovery_info", r =>
        {
            r.NoParams();
            return module.GetDiscoveryInfo();
        }, RpcStates.Runtime);

        rpc.Register("bdev_nvme_get_controllers", r => module.GetControllers(BdevRpc.Decode<GetControllersParams>(r).Name), RpcStates.Runtime);

        rpc.Register("bdev_nvme_reset_controller", async r =>
        {
            // Completes when the controller is reset and every channel's queue pair reconnected; no reactor waits.
            var p = BdevRpc.Decode<ResetControllerParams>(r);
            var c = module.FindController(p.Name);
            if (c is null || (p.Cntlid is { } id && id != (c is NvmeTcpBdevController t ? t.Controller.Cntlid : c.Data.ControllerId)))
            {
                throw RpcException.Errno(19, $"Failed to find NVMe controller {p.Name}" + (p.Cntlid is { } i ? $" with cntlid {i}" : ""));
            }

            try
            {
                await c.ResetAsync().ConfigureAwait(true);
            }
            catch (IOException e)
            {
                throw RpcException.Errno(5, e.Message);
            }

            return (JsonNode?)true;
        }, RpcStates.Runtime);
    }
}
