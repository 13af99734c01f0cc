using System.Net;
using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.Json.Serialization;
using VhostBackend.Platform;
using VhostBackend.Rpc;

namespace VhostBackend.Nvmf;

/// <summary>
/// The nvmf RPC methods with SPDK v24.01's names, params and error codes (lib/nvmf/nvmf_rpc.c): decoding failures and
/// refused operations are -32602 "Invalid parameters" (with the parameter at fault and why appended), a missing
/// subsystem in nvmf_get_subsystems is -ENODEV, a second transport or a subsystem that cannot be created -32603. The
/// <c>nvmf</c> config subsystem replays the transport, subsystems, hosts, listeners and namespaces.
/// </summary>
public static class NvmfRpc
{
    private const string InvalidParameters = "Invalid parameters";

    /// <summary>nvmf_create_transport params SPDK knows but only its other transports use (RDMA, VFIOUSER).</summary>
    private static readonly string[] s_otherTransportOptions =
    {
        "max_srq_depth", "no_srq", "num_cqe", "acceptor_backlog", "no_wr_batching", "disable_mappable_bar0",
        "disable_adaptive_irq", "disable_shadow_doorbells", "ack_timeout", "data_wr_pool_size", "max_qpairs_per_ctrlr",
    };

    public static void Register(RpcRegistry registry, NvmfTarget target, SubsystemRegistry? subsystems = null)
    {
        registry.Register("nvmf_create_transport", r => CreateTransportAsync(target, r));
        registry.Register("nvmf_get_transports", r => GetTransports(target, r));
        registry.Register("nvmf_create_subsystem", r => CreateSubsystem(target, r));
        registry.Register("nvmf_delete_subsystem", r => DeleteSubsystemAsync(target, r));
        registry.Register("nvmf_get_subsystems", r => GetSubsystems(target, r));
        registry.Register("nvmf_subsystem_add_listener", r => Listener(target, r, add: true));
        registry.Register("nvmf_subsystem_remove_listener", r => Listener(target, r, add: false));
        registry.Register("nvmf_subsystem_add_ns", r => AddNs(target, r));
        registry.Register("nvmf_subsystem_remove_ns", r => RemoveNsAsync(target, r));
        registry.Register("nvmf_subsystem_add_host", r => Host(target, r, add: true));
        registry.Register("nvmf_subsystem_remove_host", r => Host(target, r, add: false));
        registry.Register("nvmf_subsystem_allow_any_host", r => AllowAnyHost(target, r));
        registry.Register("nvmf_get_stats", r => GetStatsAsync(target, r));
        registry.Register("nvmf_subsystem_get_controllers", r => GetControllers(target, r));
        registry.Register("nvmf_subsystem_get_qpairs", r => GetQpairsAsync(target, r));
        registry.Register("nvmf_subsystem_get_listeners", r => GetListeners(target, r));
        subsystems?.Add(new Subsystem("nvmf", target.WriteConfig, "bdev"));
    }

    private static RpcException Error(NvmfException e) =>
        new(RpcErrorCodes.InvalidParams, e.Param is { } p ? $"{InvalidParameters}: {p}: {e.Message}" : $"{InvalidParameters}: {e.Message}");

    private static T Bind<T>(RpcRequest r)
        where T : class, new() => r.Bind<T>(RpcErrorCodes.InvalidParams, InvalidParameters);

    /// <summary>
    /// SPDK's spdk_json_decode_object_relaxed (unknown names ignored), which v24.01 uses for exactly
    /// nvmf_create_transport, nvmf_subsystem_add_listener and nvmf_subsystem_add_host (transports read their own
    /// params from them); nested objects such as listen_address stay strict, as SPDK's sub-decoders are.
    /// </summary>
    private static T BindRelaxed<T>(RpcRequest r)
        where T : class, new() => r.Bind<T>(RpcErrorCodes.InvalidParams, InvalidParameters, allowUnknownNames: true);

    private static void CheckTarget(string? tgtName)
    {
        if (tgtName is not null)
        {
            throw new RpcException(RpcErrorCodes.InternalError, $"Unable to find a target. (tgt_name {tgtName}: only the default target exists)");
        }
    }

    private static NvmfSubsystem Subsystem(NvmfTarget target, string nqn, bool allowDiscovery = false)
    {
        var s = target.Find(nqn);
        if (s is null || (s.IsDiscovery && !allowDiscovery))
        {
            // SPDK answers "Invalid parameters" (and logs the NQN): we keep its message first and add why.
            throw new RpcException(RpcErrorCodes.InvalidParams, $"{InvalidParameters}: nqn: Unable to find subsystem with NQN {nqn}");
        }

        return s;
    }

    private static async Task<JsonNode?> CreateTransportAsync(NvmfTarget target, RpcRequest r)
    {
        if (r.Params is { ValueKind: JsonValueKind.Object } obj)
        {
            foreach (var prop in obj.EnumerateObject())
            {
                // SPDK's rpc.py always sends the other transports' flags (no_srq, no_wr_batching, disable_*: false),
                // and SPDK's TCP transport ignores them: only a value that asks for something is refused.
                if (Array.IndexOf(s_otherTransportOptions, prop.Name) >= 0 && prop.Value.ValueKind is not (JsonValueKind.False or JsonValueKind.Null))
                {
                    throw new RpcException(RpcErrorCodes.InvalidParams, $"{InvalidParameters}: {prop.Name}: not supported by the TCP transport");
                }
            }
        }

        var p = BindRelaxed<CreateTransportParams>(r);
        CheckTarget(p.TgtName);
        if (!string.Equals(p.Trtype, NvmfTransportOptions.TrType, StringComparison.OrdinalIgnoreCase))
        {
            throw new RpcException(RpcErrorCodes.InvalidParams, $"Invalid transport type '{p.Trtype}'");
        }

        if (target.TransportOptions is not null)
        {
            throw new RpcException(RpcErrorCodes.InternalError, $"Transport type '{NvmfTransportOptions.TrType}' already exists");
        }

        var o = new NvmfTransportOptions();
        o.MaxQueueDepth = p.MaxQueueDepth ?? o.MaxQueueDepth;
        o.MaxQpairsPerCtrlr = p.MaxIoQpairsPerCtrlr is { } q ? (q >= 65535 ? 65535 : q + 1) : o.MaxQpairsPerCtrlr;
        o.InCapsuleDataSize = p.InCapsuleDataSize ?? o.InCapsuleDataSize;
        o.MaxIoSize = p.MaxIoSize ?? o.MaxIoSize;
        o.IoUnitSize = p.IoUnitSize ?? o.IoUnitSize;
        o.MaxAqDepth = p.MaxAqDepth ?? o.MaxAqDepth;
        o.NumSharedBuffers = p.NumSharedBuffers ?? o.NumSharedBuffers;
        o.BufCacheSize = p.BufCacheSize ?? o.BufCacheSize;
        o.DifInsertOrStrip = p.DifInsertOrStrip ?? false;
        o.Zcopy = p.Zcopy ?? false;
        o.AbortTimeoutSec = p.AbortTimeoutSec ?? o.AbortTimeoutSec;
        o.AcceptorPollRate = p.AcceptorPollRate ?? o.AcceptorPollRate;
        o.C2hSuccess = p.C2hSuccess ?? o.C2hSuccess;
        o.SockPriority = p.SockPriority ?? o.SockPriority;
        o.ControlMsgNum = p.ControlMsgNum ?? o.ControlMsgNum;
        try
        {
            await target.CreateTransportAsync(o).ConfigureAwait(true);
        }
        catch (NvmfException e)
        {
            throw Error(e);
        }

        return true;
    }

    private static JsonNode? GetTransports(NvmfTarget target, RpcRequest r)
    {
        var p = Bind<GetTransportsParams>(r);
        CheckTarget(p.TgtName);
        var result = new JsonArray();
        if (p.Trtype is not null && !string.Equals(p.Trtype, NvmfTransportOptions.TrType, StringComparison.OrdinalIgnoreCase))
        {
            throw RpcErrno.Error(Errno.ENODEV);
        }

        if (target.TransportOptions is { } o)
        {
            result.Add(o.ToJson());
        }
        else if (p.Trtype is not null)
        {
            throw RpcErrno.Error(Errno.ENODEV);
        }

        return result;
    }

    private static JsonNode? CreateSubsystem(NvmfTarget target, RpcRequest r)
    {
        var p = Bind<CreateSubsystemParams>(r);
        CheckTarget(p.TgtName);
        if (p.AnaReporting == true)
        {
            throw new RpcException(RpcErrorCodes.InvalidParams, $"{InvalidParameters}: ana_reporting: ANA is not supported");
        }

        if (p.MaxDiscardSizeKib is > 0 || p.MaxWriteZeroesSizeKib is > 0)
        {
            throw new RpcException(RpcErrorCodes.InvalidParams, $"{InvalidParameters}: {(p.MaxDiscardSizeKib is > 0 ? "max_discard_size_kib" : "max_write_zeroes_size_kib")}: not supported");
        }

        try
        {
            target.CreateSubsystem(p.Nqn, p.SerialNumber, p.ModelNumber, p.AllowAnyHost ?? false, p.MaxNamespaces ?? 0, p.MinCntlid ?? 1, p.MaxCntlid ?? 0xFFEF);
        }
        catch (NvmfException e) when (e.Param == "nqn")
        {
            throw new RpcException(RpcErrorCodes.InternalError, e.Message);
        }
        catch (NvmfException e)
        {
            throw new RpcException(RpcErrorCodes.InvalidParams, e.Message);
        }

        return true;
    }

    private static async Task<JsonNode?> DeleteSubsystemAsync(NvmfTarget target, RpcRequest r)
    {
        var p = Bind<NqnParams>(r);
        CheckTarget(p.TgtName);
        try
        {
            await target.DeleteSubsystemAsync(p.Nqn).ConfigureAwait(true);
        }
        catch (NvmfException e)
        {
            throw Error(e);
        }

        return true;
    }

    private static JsonNode? GetSubsystems(NvmfTarget target, RpcRequest r)
    {
        var p = Bind<GetSubsystemsParams>(r);
        CheckTarget(p.TgtName);
        var result = new JsonArray();
        if (p.Nqn is not null)
        {
            var s = target.Find(p.Nqn) ?? throw RpcErrno.Error(Errno.ENODEV);
            result.Add(s.ToJson());
            return result;
        }

        foreach (var s in target.Subsystems)
        {
            result.Add(s.ToJson());
        }

        return result;
    }

    internal static NvmfListenAddress ParseAddress(ListenAddressParams a, string param)
    {
        string trtype = a.Trtype ?? a.Transport ?? throw new RpcException(RpcErrorCodes.InvalidParams, $"{InvalidParameters}: {param}.trtype: required");
        if (!string.Equals(trtype, NvmfTransportOptions.TrType, StringComparison.OrdinalIgnoreCase))
        {
            throw new RpcException(RpcErrorCodes.InvalidParams, $"{InvalidParameters}: {param}.trtype: only TCP is supported");
        }

        if (!IPAddress.TryParse(a.Traddr, out var ip))
        {
            throw new RpcException(RpcErrorCodes.InvalidParams, $"{InvalidParameters}: {param}.traddr: '{a.Traddr}' is not an IP address");
        }

        string adrfam = a.Adrfam ?? (ip.AddressFamily == System.Net.Sockets.AddressFamily.InterNetworkV6 ? "IPv6" : "IPv4");
        if (!string.Equals(adrfam, "IPv4", StringComparison.OrdinalIgnoreCase) && !string.Equals(adrfam, "IPv6", StringComparison.OrdinalIgnoreCase))
        {
            throw new RpcException(RpcErrorCodes.InvalidParams, $"{InvalidParameters}: {param}.adrfam: '{adrfam}' (IPv4 or IPv6)");
        }

        adrfam = adrfam.Equals("IPv6", StringComparison.OrdinalIgnoreCase) ? "IPv6" : "IPv4";
        if ((adrfam == "IPv6") != (ip.AddressFamily == System.Net.Sockets.AddressFamily.InterNetworkV6))
        {
            throw new RpcException(RpcErrorCodes.InvalidParams, $"{InvalidParameters}: {param}.adrfam: does not match traddr {a.Traddr}");
        }

        if (a.Trsvcid is null || !int.TryParse(a.Trsvcid, System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out int port) || port < 1 || port > 65535)
        {
            throw new RpcException(RpcErrorCodes.InvalidParams, $"{InvalidParameters}: {param}.trsvcid: a port number 1..65535 is required");
        }

        return new NvmfListenAddress(adrfam, a.Traddr, port.ToString(System.Globalization.CultureInfo.InvariantCulture));
    }

    private static JsonNode? Listener(NvmfTarget target, RpcRequest r, bool add)
    {
        var p = add ? BindRelaxed<ListenerParams>(r) : Bind<ListenerParams>(r);
        CheckTarget(p.TgtName);
        if (p.SecureChannel == true)
        {
            throw new RpcException(RpcErrorCodes.InvalidParams, $"{InvalidParameters}: secure_channel: TLS is not supported");
        }

        if (p.AnaState is not null)
        {
            throw new RpcException(RpcErrorCodes.InvalidParams, $"{InvalidParameters}: ana_state: ANA is not supported");
        }

        var sub = Subsystem(target, p.Nqn, allowDiscovery: true);
        var addr = ParseAddress(p.ListenAddress, "listen_address");
        try
        {
            if (add)
            {
                target.AddListener(sub, addr);
            }
            else
            {
                target.RemoveListener(sub, addr);
            }
        }
        catch (NvmfException e)
        {
            throw Error(e);
        }

        return true;
    }

    private static JsonNode? AddNs(NvmfTarget target, RpcRequest r)
    {
        var p = Bind<AddNsParams>(r);
        CheckTarget(p.TgtName);
        var ns = p.Namespace;
        if (ns.PtplFile is not null)
        {
            throw new RpcException(RpcErrorCodes.InvalidParams, $"{InvalidParameters}: namespace.ptpl_file: reservations are not supported");
        }

        if (ns.Anagrpid is > 0)
        {
            throw new RpcException(RpcErrorCodes.InvalidParams, $"{InvalidParameters}: namespace.anagrpid: ANA is not supported");
        }

        byte[]? nguid = null;
        if (ns.Nguid is not null)
        {
            string hex = ns.Nguid.Replace("-", string.Empty, StringComparison.Ordinal);
            try
            {
                nguid = Convert.FromHexString(hex);
            }
            catch (FormatException)
            {
                nguid = null;
            }

            if (nguid is null || nguid.Length != 16)
            {
                throw new RpcException(RpcErrorCodes.InvalidParams, $"{InvalidParameters}: namespace.nguid: 16 bytes of hex");
            }
        }

        ulong eui64 = 0;
        if (ns.Eui64 is not null && !ulong.TryParse(ns.Eui64.Replace("-", string.Empty, StringComparison.Ordinal), System.Globalization.NumberStyles.HexNumber, System.Globalization.CultureInfo.InvariantCulture, out eui64))
        {
            throw new RpcException(RpcErrorCodes.InvalidParams, $"{InvalidParameters}: namespace.eui64: 8 bytes of hex");
        }

        Guid? uuid = null;
        if (ns.Uuid is not null)
        {
            if (!Guid.TryParse(ns.Uuid, out var g))
            {
                throw new RpcException(RpcErrorCodes.InvalidParams, $"{InvalidParameters}: namespace.uuid: not a UUID");
            }

            // As SPDK: an all-zero uuid is "not given" (the bdev's uuid is used).
            uuid = g == Guid.Empty ? null : g;
        }

        var sub = Subsystem(target, p.Nqn);
        try
        {
            return target.AddNamespace(sub, ns.BdevName, ns.Nsid ?? 0, uuid, nguid, eui64);
        }
        catch (NvmfException e)
        {
            throw Error(e);
        }
    }

    private static async Task<JsonNode?> RemoveNsAsync(NvmfTarget target, RpcRequest r)
    {
        var p = Bind<RemoveNsParams>(r);
        CheckTarget(p.TgtName);
        var sub = Subsystem(target, p.Nqn);
        try
        {
            await target.RemoveNamespaceAsync(sub, p.Nsid).ConfigureAwait(true);
        }
        catch (NvmfException e)
        {
            throw Error(e);
        }

        return true;
    }

    private static JsonNode? Host(NvmfTarget target, RpcRequest r, bool add)
    {
        var p = add ? BindRelaxed<HostParams>(r) : Bind<HostParams>(r);
        CheckTarget(p.TgtName);
        if (p.Psk is not null)
        {
            throw new RpcException(RpcErrorCodes.InvalidParams, $"{InvalidParameters}: psk: TLS is not supported");
        }

        if (p.DhchapKey is not null || p.DhchapCtrlrKey is not null)
        {
            throw new RpcException(RpcErrorCodes.InvalidParams, $"{InvalidParameters}: {(p.DhchapKey is not null ? "dhchap_key" : "dhchap_ctrlr_key")}: authentication is not supported");
        }

        var sub = Subsystem(target, p.Nqn);
        try
        {
            if (add)
            {
                target.AddHost(sub, p.Host);
            }
            else
            {
                target.RemoveHost(sub, p.Host);
            }
        }
        catch (NvmfException e)
        {
            throw Error(e);
        }

        return true;
    }

    private static JsonNode? AllowAnyHost(NvmfTarget target, RpcRequest r)
    {
        var p = Bind<AllowAnyHostParams>(r);
        CheckTarget(p.TgtName);
        var sub = Subsystem(target, p.Nqn);
        target.SetAllowAnyHost(sub, p.AllowAnyHost);
        return true;
    }

    private static async Task<JsonNode?> GetStatsAsync(NvmfTarget target, RpcRequest r)
    {
        var p = Bind<TgtParams>(r);
        CheckTarget(p.TgtName);
        return await target.GetStatsAsync().ConfigureAwait(true);
    }

    private static JsonNode? GetControllers(NvmfTarget target, RpcRequest r)
    {
        var p = Bind<NqnParams>(r);
        CheckTarget(p.TgtName);
        var sub = Subsystem(target, p.Nqn, allowDiscovery: true);
        var result = new JsonArray();
        foreach (var c in target.ControllersOf(sub))
        {
            result.Add(new JsonObject
            {
                ["cntlid"] = (int)c.Cntlid,
                ["hostnqn"] = c.HostNqn,
                ["hostid"] = c.HostId.ToString(),
                ["num_io_qpairs"] = c.IoQueueCount,
            });
        }

        return result;
    }

    /// <summary>nvmf_subsystem_get_listeners: [{address {trtype, adrfam, traddr, trsvcid}}] (no ana_states: no ANA).</summary>
    private static JsonNode? GetListeners(NvmfTarget target, RpcRequest r)
    {
        var p = Bind<NqnParams>(r);
        CheckTarget(p.TgtName);
        var sub = Subsystem(target, p.Nqn, allowDiscovery: true);
        var result = new JsonArray();
        foreach (var l in target.ListenersOf(sub))
        {
            result.Add(new JsonObject { ["address"] = l.ToJson() });
        }

        return result;
    }

    private static JsonObject Address(System.Net.IPEndPoint? ep) => new()
    {
        ["trtype"] = NvmfTransportOptions.TrType,
        ["adrfam"] = ep?.AddressFamily == System.Net.Sockets.AddressFamily.InterNetworkV6 && !ep.Address.IsIPv4MappedToIPv6 ? "IPv6" : "IPv4",
        ["traddr"] = ep is null ? "" : (ep.Address.IsIPv4MappedToIPv6 ? ep.Address.MapToIPv4() : ep.Address).ToString(),
        ["trsvcid"] = ep?.Port.ToString(System.Globalization.CultureInfo.InvariantCulture) ?? "",
    };

    private static async Task<JsonNode?> GetQpairsAsync(NvmfTarget target, RpcRequest r)
    {
        var p = Bind<NqnParams>(r);
        CheckTarget(p.TgtName);
        var sub = Subsystem(target, p.Nqn, allowDiscovery: true);
        var result = new JsonArray();
        foreach (var g in target.Groups)
        {
            var items = await g.Reactor.InvokeAsync(() =>
            {
                var list = new List<JsonObject>();
                foreach (var c in g.Connections)
                {
                    if (c.Controller is { } ctrl && ctrl.Subsystem == sub && !c.IsClosed)
                    {
                        list.Add(new JsonObject
                        {
                            ["cntlid"] = (int)ctrl.Cntlid,
                            ["qid"] = (int)c.Qid,
                            ["state"] = "active",
                            ["thread"] = g.Name,
                            ["hostnqn"] = ctrl.HostNqn,
                            ["listen_address"] = c.Listener.ToJson(),
                            ["peer_address"] = Address(c.PeerAddress),
                        });
                    }
                }

                return list;
            }).ConfigureAwait(true);
            foreach (var i in items)
            {
                result.Add(i);
            }
        }

        return result;
    }

    // ---------------------------------------------------------------- params

    public sealed class TgtParams
    {
        public string? TgtName { get; set; }
    }

    public sealed class NqnParams
    {
        [JsonRequired]
        public string Nqn { get; set; } = "";
        public string? TgtName { get; set; }
    }

    public sealed class GetSubsystemsParams
    {
        public string? Nqn { get; set; }
        public string? TgtName { get; set; }
    }

    public sealed class GetTransportsParams
    {
        public string? Trtype { get; set; }
        public string? TgtName { get; set; }
    }

    public sealed class CreateTransportParams
    {
        [JsonRequired]
        public string Trtype { get; set; } = "";
        public string? TgtName { get; set; }
        public uint? MaxQueueDepth { get; set; }
        public uint? MaxIoQpairsPerCtrlr { get; set; }
        public uint? InCapsuleDataSize { get; set; }
        public uint? MaxIoSize { get; set; }
        public uint? IoUnitSize { get; set; }
        public uint? MaxAqDepth { get; set; }
        public uint? NumSharedBuffers { get; set; }
        public uint? BufCacheSize { get; set; }
        public bool? DifInsertOrStrip { get; set; }
        public uint? AbortTimeoutSec { get; set; }
        public bool? Zcopy { get; set; }
        public uint? AcceptorPollRate { get; set; }
        public bool? C2hSuccess { get; set; }
        public uint? SockPriority { get; set; }
        public uint? ControlMsgNum { get; set; }
    }

    public sealed class CreateSubsystemParams
    {
        [JsonRequired]
        public string Nqn { get; set; } = "";
        public string? SerialNumber { get; set; }
        public string? ModelNumber { get; set; }
        public string? TgtName { get; set; }
        public uint? MaxNamespaces { get; set; }
        public bool? AllowAnyHost { get; set; }
        public bool? AnaReporting { get; set; }
        public ushort? MinCntlid { get; set; }
        public ushort? MaxCntlid { get; set; }
        public ulong? MaxDiscardSizeKib { get; set; }
        public ulong? MaxWriteZeroesSizeKib { get; set; }
    }

    [JsonUnmappedMemberHandling(JsonUnmappedMemberHandling.Disallow)]
    public sealed class ListenAddressParams
    {
        public string? Transport { get; set; }
        public string? Trtype { get; set; }
        public string? Adrfam { get; set; }
        [JsonRequired]
        public string Traddr { get; set; } = "";
        public string? Trsvcid { get; set; }
    }

    public sealed class ListenerParams
    {
        [JsonRequired]
        public string Nqn { get; set; } = "";
        [JsonRequired]
        public ListenAddressParams ListenAddress { get; set; } = new();
        public string? TgtName { get; set; }
        public bool? SecureChannel { get; set; }
        public string? AnaState { get; set; }
    }

    public sealed class NamespaceParams
    {
        public uint? Nsid { get; set; }
        [JsonRequired]
        public string BdevName { get; set; } = "";
        public string? PtplFile { get; set; }
        public string? Nguid { get; set; }
        public string? Eui64 { get; set; }
        public string? Uuid { get; set; }
        public uint? Anagrpid { get; set; }
    }

    public sealed class AddNsParams
    {
        [JsonRequired]
        public string Nqn { get; set; } = "";
        [JsonRequired]
        public NamespaceParams Namespace { get; set; } = new();
        public string? TgtName { get; set; }
    }

    public sealed class RemoveNsParams
    {
        [JsonRequired]
        public string Nqn { get; set; } = "";
        [JsonRequired]
        public uint Nsid { get; set; }
        public string? TgtName { get; set; }
    }

    public sealed class HostParams
    {
        [JsonRequired]
        public string Nqn { get; set; } = "";
        [JsonRequired]
        public string Host { get; set; } = "";
        public string? TgtName { get; set; }
        public string? Psk { get; set; }
        public string? DhchapKey { get; set; }
        public string? DhchapCtrlrKey { get; set; }
    }

    public sealed class AllowAnyHostParams
    {
        [JsonRequired]
        public string Nqn { get; set; } = "";
        [JsonRequired]
        public bool AllowAnyHost { get; set; }
        public string? TgtName { get; set; }
    }
}
