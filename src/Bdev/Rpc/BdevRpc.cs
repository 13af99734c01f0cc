using System.Diagnostics;
using System.Text.Json.Nodes;
using System.Text.Json.Serialization;
using VhostBackend.Platform;
using VhostBackend.Rpc;

namespace VhostBackend.Bdev.Rpc;

/// <summary>The bdev layer's methods (SPDK's names, params and error codes) and the <c>bdev</c> config subsystem.</summary>
public static class BdevRpc
{
    public sealed class GetBdevsParams
    {
        public string? Name { get; set; }

        public uint Timeout { get; set; }
    }

    public sealed class IostatParams
    {
        /// <summary>Older SPDK's single-bdev filter.</summary>
        public string? Name { get; set; }

        /// <summary>Newer SPDK's filter (several bdevs).</summary>
        public string[]? Names { get; set; }

        public bool PerChannel { get; set; }

        /// <summary>Only "none" is supported (statistics are never reset by a read).</summary>
        public string? ResetMode { get; set; }
    }

    public sealed class QosParams
    {
        [JsonRequired]
        public string Name { get; set; } = "";

        public ulong? RwIosPerSec { get; set; }

        public ulong? RwMbytesPerSec { get; set; }

        public ulong? RMbytesPerSec { get; set; }

        public ulong? WMbytesPerSec { get; set; }
    }

    public sealed class NameParams
    {
        [JsonRequired]
        public string Name { get; set; } = "";
    }

    public sealed class SetOptionsParams
    {
        public uint BdevIoPoolSize { get; set; }

        public uint BdevIoCacheSize { get; set; }

        public bool BdevAutoExamine { get; set; } = true;

        public uint IobufSmallCacheSize { get; set; }

        public uint IobufLargeCacheSize { get; set; }
    }

    public sealed class ModuleStatsParams
    {
        /// <summary>Only this module (else every module that reports statistics).</summary>
        public string? Name { get; set; }
    }

    /// <summary>SPDK's bdev methods answer a params decoding failure with -32603 and this message.</summary>
    public const string DecodeFailed = "spdk_json_decode_object failed";

    /// <summary>Binds params the way SPDK's bdev methods decode them (failure: -32603 "spdk_json_decode_object failed").</summary>
    public static T Decode<T>(RpcRequest r)
        where T : class, new() => r.Bind<T>(RpcErrorCodes.InternalError, DecodeFailed);

    public static void Register(RpcRegistry rpc, SubsystemRegistry subsystems, BdevManager bdevs)
    {
        rpc.Register("bdev_get_bdevs", r => GetBdevs(bdevs, Decode<GetBdevsParams>(r)), RpcStates.Runtime);
        rpc.Register("bdev_get_iostat", r => GetIostat(bdevs, Decode<IostatParams>(r)), RpcStates.Runtime);
        rpc.Register("bdev_set_qos_limit", r => SetQos(bdevs, Decode<QosParams>(r)), RpcStates.Runtime);
        rpc.Register("bdev_set_options", r =>
        {
            r.Bind<SetOptionsParams>();
            return (JsonNode?)null; // accepted for config compatibility: our pools are per channel and sized per bdev
        }, RpcStates.Startup);
        rpc.Register("bdev_wait_for_examine", async r =>
        {
            r.NoParams();
            // Examine is synchronous for most modules; those that read the bdev (lvol) finish later.
            foreach (var m in bdevs.Modules)
            {
                await m.WaitForExamineAsync().ConfigureAwait(true);
            }
            return (JsonNode?)null;
        }, RpcStates.Runtime);
        rpc.Register("bdev_get_module_stats", r => GetModuleStats(bdevs, Decode<ModuleStatsParams>(r)), RpcStates.Runtime);
        rpc.Register("bdev_examine", r =>
        {
            r.Bind<NameParams>();
            return (JsonNode?)null;
        }, RpcStates.Runtime);

        subsystems.Add(new Subsystem("bdev", () => WriteConfig(bdevs)));
    }

    private static Bdev Find(BdevManager bdevs, string name) =>
        bdevs.Find(name) ?? throw RpcErrno.Error(Errno.ENODEV, "name", $"no bdev named {name}");

    private static JsonNode GetBdevs(BdevManager bdevs, GetBdevsParams p)
    {
        var list = p.Name is null ? bdevs.All : [Find(bdevs, p.Name)];
        var result = new JsonArray();
        foreach (var b in list)
        {
            var (rwIos, rwMb, rMb, wMb) = b.QosLimits;
            var types = new JsonObject();
            foreach (var (key, type) in new[]
            {
                ("read", BdevIoType.Read), ("write", BdevIoType.Write), ("unmap", BdevIoType.Unmap),
                ("write_zeroes", BdevIoType.WriteZeroes), ("flush", BdevIoType.Flush), ("reset", BdevIoType.Reset),
                ("compare", BdevIoType.Compare),
            })
            {
                types[key] = b.SupportsIoType(type);
            }

            types["compare_and_write"] = false;
            types["abort"] = false;
            types["nvme_admin"] = false;
            types["nvme_io"] = false;
            var o = new JsonObject
            {
                ["name"] = b.Name,
                ["aliases"] = new JsonArray(b.Aliases.Select(a => (JsonNode)JsonValue.Create(a)!).ToArray()),
                ["product_name"] = b.ProductName,
                ["block_size"] = b.BlockSize,
                ["num_blocks"] = b.BlockCount,
                ["uuid"] = b.Uuid.ToString(),
                ["assigned_rate_limits"] = new JsonObject
                {
                    ["rw_ios_per_sec"] = rwIos,
                    ["rw_mbytes_per_sec"] = rwMb,
                    ["r_mbytes_per_sec"] = rMb,
                    ["w_mbytes_per_sec"] = wMb,
                },
                ["claimed"] = b.ClaimedBy is not null,
                ["zoned"] = false,
                ["supported_io_types"] = types,
                ["driver_specific"] = b.DriverSpecific() ?? new JsonObject(),
            };
            if (b.RequiredAlignment > 1)
            {
                o["required_alignment"] = System.Numerics.BitOperations.Log2(b.RequiredAlignment);
            }

            if (b.OptimalIoBoundaryBlocks > 0)
            {
                o["optimal_io_boundary"] = b.OptimalIoBoundaryBlocks;
            }

            result.Add(o);
        }

        return result;
    }

    private static JsonNode GetIostat(BdevManager bdevs, IostatParams p)
    {
        if (p.ResetMode is not (null or "none"))
        {
            throw p.ResetMode is "all" or "maxmin" or "error"
                ? RpcErrno.Error(Errno.ENOTSUP, "reset_mode", $"'{p.ResetMode}' is not supported (only none)")
                : new RpcException(RpcErrorCodes.InternalError, $"{DecodeFailed}: reset_mode '{p.ResetMode}' is not one of all, maxmin, error, none");
        }

        string[]? names = p.Names ?? (p.Name is null ? null : [p.Name]);
        if (p.PerChannel && names is not { Length: 1 })
        {
            throw RpcErrno.Error(Errno.EINVAL, "per_channel", "Can't use per_channel with multiple bdevs (or none): give one name");
        }

        var list = names is null ? bdevs.All : names.Select(n => Find(bdevs, n)).ToArray();
        var arr = new JsonArray();
        foreach (var b in list)
        {
            var s = b.GetStats();
            var stat = new JsonObject
            {
                ["name"] = b.Name,
                ["bytes_read"] = s.BytesRead,
                ["num_read_ops"] = s.NumReadOps,
                ["bytes_written"] = s.BytesWritten,
                ["num_write_ops"] = s.NumWriteOps,
                ["bytes_unmapped"] = s.BytesUnmapped,
                ["num_unmap_ops"] = s.NumUnmapOps,
                ["bytes_copied"] = 0,
                ["num_copy_ops"] = 0,
                ["read_latency_ticks"] = s.ReadLatencyTicks,
                ["max_read_latency_ticks"] = s.MaxReadLatencyTicks,
                ["min_read_latency_ticks"] = s.MinReadLatencyTicks,
                ["write_latency_ticks"] = s.WriteLatencyTicks,
                ["max_write_latency_ticks"] = s.MaxWriteLatencyTicks,
                ["min_write_latency_ticks"] = s.MinWriteLatencyTicks,
                ["unmap_latency_ticks"] = s.UnmapLatencyTicks,
                ["max_unmap_latency_ticks"] = s.MaxUnmapLatencyTicks,
                ["min_unmap_latency_ticks"] = s.MinUnmapLatencyTicks,
                ["copy_latency_ticks"] = 0,
                ["max_copy_latency_ticks"] = 0,
                ["min_copy_latency_ticks"] = 0,
                ["io_error"] = new JsonObject { ["total"] = s.NumErrors },
                ["num_write_zeroes_ops"] = s.NumWriteZeroesOps,
                ["num_flush_ops"] = s.NumFlushOps,
            };
            if (b.DeviceStats() is { } ds)
            {
                stat["driver_specific"] = ds; // SPDK's dump_device_stat_json (e.g. nvme's bounce counters)
            }

            arr.Add(stat);
        }

        return new JsonObject
        {
            ["tick_rate"] = Ticks.Frequency,
            ["ticks"] = Ticks.Now(),
            ["bdevs"] = arr,
        };
    }

    private static JsonNode? SetQos(BdevManager bdevs, QosParams p)
    {
        // SPDK's order: open the bdev (-ENODEV), then require a limit (-EINVAL "No rate limits specified").
        var b = Find(bdevs, p.Name);
        if (p.RwIosPerSec is null && p.RwMbytesPerSec is null && p.RMbytesPerSec is null && p.WMbytesPerSec is null)
        {
            throw RpcException.Errno(Errno.EINVAL, "No rate limits specified");
        }

        // SPDK rounds an IOPS limit up to a multiple of 1000 (its minimum granularity) rather than failing.
        ulong? ios = p.RwIosPerSec is { } v && v % 1000 != 0 ? checked(v + (1000 - (v % 1000))) : p.RwIosPerSec;
        var (rwIos, rwMb, rMb, wMb) = b.QosLimits;
        b.SetQosLimits(ios ?? rwIos, p.RwMbytesPerSec ?? rwMb, p.RMbytesPerSec ?? rMb, p.WMbytesPerSec ?? wMb);
        return null;
    }

    /// <summary>
    /// bdev_get_module_stats (ours, not SPDK's): <c>[{"module": name, "stats": {...}}]</c> for every module whose
    /// <see cref="BdevModule.GetStats"/> reports something, in module registration order; with <c>name</c>, that
    /// module only (-ENODEV if unknown).
    /// </summary>
    private static JsonNode GetModuleStats(BdevManager bdevs, ModuleStatsParams p)
    {
        var arr = new JsonArray();
        if (p.Name is not null && bdevs.FindModule(p.Name) is null)
        {
            throw RpcException.Errno(Errno.ENODEV, $"No such bdev module: {p.Name}");
        }

        foreach (var m in bdevs.Modules)
        {
            if (p.Name is not null && m.Name != p.Name)
            {
                continue;
            }

            if (m.GetStats() is { } stats)
            {
                arr.Add(new JsonObject { ["module"] = m.Name, ["stats"] = stats });
            }
        }

        return arr;
    }

    /// <summary>
    /// The bdev subsystem's config in SPDK's order (spdk_bdev_subsystem_config_json): bdev_set_options; every
    /// module's module-level calls (module registration order); then per bdev, in registration order, the call that
    /// created it and its QoS limits; bdev_wait_for_examine last.
    /// </summary>
    private static JsonArray WriteConfig(BdevManager bdevs)
    {
        var calls = new JsonArray
        {
            Subsystem.Call("bdev_set_options", new JsonObject { ["bdev_auto_examine"] = true }),
        };
        foreach (var m in bdevs.Modules)
        {
            m.WriteConfig(calls);
        }

        foreach (var b in bdevs.All)
        {
            if (b.ConfigCall() is { } call)
            {
                calls.Add(call);
            }

            var (rwIos, rwMb, rMb, wMb) = b.QosLimits;
            if (rwIos != 0 || rwMb != 0 || rMb != 0 || wMb != 0)
            {
                calls.Add(Subsystem.Call("bdev_set_qos_limit", new JsonObject
                {
                    ["name"] = b.Name,
                    ["rw_ios_per_sec"] = rwIos,
                    ["rw_mbytes_per_sec"] = rwMb,
                    ["r_mbytes_per_sec"] = rMb,
                    ["w_mbytes_per_sec"] = wMb,
                }));
            }
        }

        calls.Add(Subsystem.Call("bdev_wait_for_examine", null));
        return calls;
    }
}
