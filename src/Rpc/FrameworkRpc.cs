using System.Diagnostics;
using System.Globalization;
using System.Text.Json.Nodes;
using System.Text.Json.Serialization;
using VhostBackend.Platform;
using VhostBackend.Reactors;

namespace VhostBackend.Rpc;

/// <summary>Our product's version, reported by spdk_get_version in SPDK's shape.</summary>
public static class ProductVersion
{
    public const string Name = "VhostBackend";
    public const int Major = 0;
    public const int Minor = 1;
    public const int Patch = 0;
    public const string Suffix = "-pre";

    public static string Text => $"{Name} v{Major}.{Minor}.{Patch}{Suffix}";
}

/// <summary>
/// The framework methods (SPDK's lib/rpc, lib/init, lib/event RPCs): rpc_get_methods, spdk_get_version,
/// framework_start_init / framework_wait_init, framework_get_subsystems / framework_get_config, reactor and
/// thread statistics, and framework_set_scheduler / framework_get_scheduler mapped onto reactor modes.
/// In our model each reactor runs exactly one SPDK-style "thread", named like the reactor.
/// </summary>
public static class FrameworkRpc
{
    /// <summary>Registers the framework methods and the <c>scheduler</c> subsystem (reactor mode, for save_config).</summary>
    public static void Register(RpcDispatcher dispatcher, SubsystemRegistry subsystems, ReactorRuntime runtime)
    {
        var rpc = dispatcher.Registry;
        long startTicks = Ticks.Now();

        rpc.Register("rpc_get_methods", r =>
        {
            var p = r.Bind<GetMethodsParams>();
            var state = dispatcher.State;
            var names = p.Current ? rpc.Methods(state) : rpc.Methods();
            return new JsonArray(names.Select(n => (JsonNode?)JsonValue.Create(n)).ToArray());
        }, RpcStates.Both);

        rpc.Register("spdk_get_version", r =>
        {
            NoParams(r);
            return new JsonObject
            {
                ["version"] = ProductVersion.Text,
                ["fields"] = new JsonObject
                {
                    ["major"] = ProductVersion.Major,
                    ["minor"] = ProductVersion.Minor,
                    ["patch"] = ProductVersion.Patch,
                    ["suffix"] = ProductVersion.Suffix,
                },
            };
        }, RpcStates.Both);

        rpc.Register("framework_start_init", async r =>
        {
            NoParams(r);
            await dispatcher.StartInitAsync().ConfigureAwait(true);
            return JsonValue.Create(true);
        }, RpcStates.Startup);

        rpc.Register("framework_wait_init", async r =>
        {
            // SPDK ignores this method's params.
            await dispatcher.Initialized.ConfigureAwait(true);
            await dispatcher.StartupConfig.ContinueWith(_ => { }, TaskScheduler.Default).ConfigureAwait(true);
            return JsonValue.Create(true);
        }, RpcStates.Both);

        rpc.Register("framework_get_subsystems", r =>
        {
            NoParams(r);
            var all = subsystems.All;
            return new JsonArray(all.Select(s => (JsonNode?)new JsonObject
            {
                ["subsystem"] = s.Name,
                ["depends_on"] = new JsonArray(s.DependsOn.Select(d => (JsonNode?)JsonValue.Create(d)).ToArray()),
            }).ToArray());
        }, RpcStates.Runtime);

        rpc.Register("framework_get_config", r =>
        {
            var p = r.Bind<GetConfigParams>(RpcErrorCodes.InvalidParams, "Invalid arguments");
            var s = subsystems.Find(p.Name) ?? throw RpcException.InvalidParams($"Subsystem '{p.Name}' not found");
            return s.WriteConfig();
        }, RpcStates.Runtime);

        rpc.Register("framework_get_reactors", r =>
        {
            NoParams(r);
            long now = Ticks.Now();
            var cpu = ReadProcStat();
            var reactors = new JsonArray();
            foreach (var reactor in runtime.Reactors)
            {
                var o = new JsonObject
                {
                    ["lcore"] = reactor.Core,
                    ["tid"] = reactor.ThreadId,
                    ["busy"] = reactor.BusyTicks,
                    ["idle"] = reactor.IdleTicks,
                    // SPDK: whether the reactor runs in interrupt mode (not whether it happens to sleep right now,
                    // which the main reactor, answering this call, never does); adaptive reactors: while asleep.
                    ["in_interrupt"] = reactor.Mode == ReactorMode.Interrupt || reactor.IsInInterrupt,
                };
                if (cpu.TryGetValue(reactor.Core, out var c))
                {
                    o["irq"] = c.Irq;
                    o["sys"] = c.Sys;
                    o["usr"] = c.Usr;
                }

                o["lw_threads"] = new JsonArray(new JsonObject
                {
                    ["name"] = reactor.Name,
                    ["id"] = reactor.Id + 1,
                    ["cpumask"] = CoreMask(reactor.Core),
                    ["elapsed"] = now - startTicks,
                });
                o["allocated_bytes"] = reactor.AllocatedBytes;
                o["gen2_collections"] = reactor.Gen2Collections;
                o["mode"] = reactor.Mode.ToString().ToLowerInvariant();
                o["sleep_count"] = reactor.SleepCount; // ours: times the reactor slept in epoll (interrupt/adaptive)
                AddMaxIteration(o, reactor);
                reactors.Add(o);
            }

            // Process-wide allocation and GC counters (extra fields; the perf script computes bytes per I/O from them).
            return new JsonObject
            {
                ["tick_rate"] = Ticks.Frequency,
                ["pid"] = Environment.ProcessId,
                ["reactors"] = reactors,
                ["total_allocated_bytes"] = GC.GetTotalAllocatedBytes(precise: true),
                ["gen0_collections"] = GC.CollectionCount(0),
                ["gen1_collections"] = GC.CollectionCount(1),
                ["gen2_collections"] = GC.CollectionCount(2),
            };
        }, RpcStates.Runtime);

        rpc.Register("thread_get_stats", r =>
        {
            NoParams(r);
            var threads = new JsonArray();
            foreach (var reactor in runtime.Reactors)
            {
                var pollers = reactor.Pollers;
                var t = new JsonObject
                {
                    ["name"] = reactor.Name,
                    ["id"] = reactor.Id + 1,
                    ["cpumask"] = CoreMask(reactor.Core),
                    ["busy"] = reactor.BusyTicks,
                    ["idle"] = reactor.IdleTicks,
                    ["active_pollers_count"] = pollers.Count(p => p.PeriodMicroseconds == 0),
                    ["timed_pollers_count"] = pollers.Count(p => p.PeriodMicroseconds != 0),
                    ["paused_pollers_count"] = 0,
                };
                AddMaxIteration(t, reactor);
                threads.Add(t);
            }

            return new JsonObject { ["tick_rate"] = Ticks.Frequency, ["threads"] = threads };
        }, RpcStates.Runtime);

        // Extension (not in SPDK): starts a new window for the max_iteration_ticks/_us fields above, on every reactor.
        rpc.Register("framework_reset_max_iteration", r =>
        {
            NoParams(r);
            foreach (var reactor in runtime.Reactors)
            {
                reactor.ResetMaxIteration();
            }

            return (JsonNode?)true;
        }, RpcStates.Runtime);

        rpc.Register("thread_get_pollers", r =>
        {
            NoParams(r);
            var threads = new JsonArray();
            foreach (var reactor in runtime.Reactors)
            {
                var pollers = reactor.Pollers;
                int id = 0;
                JsonNode? Poller(Poller p)
                {
                    var o = new JsonObject
                    {
                        ["name"] = p.Name,
                        ["id"] = ++id,
                        ["state"] = "waiting",
                        ["run_count"] = p.RunCount,
                        ["busy_count"] = p.BusyCount,
                    };
                    if (p.PeriodMicroseconds != 0)
                    {
                        o["period_ticks"] = p.PeriodTicks;
                    }

                    return o;
                }

                threads.Add(new JsonObject
                {
                    ["name"] = reactor.Name,
                    ["id"] = reactor.Id + 1,
                    ["active_pollers"] = new JsonArray(pollers.Where(p => p.PeriodMicroseconds == 0).Select(Poller).ToArray()),
                    ["timed_pollers"] = new JsonArray(pollers.Where(p => p.PeriodMicroseconds != 0).Select(Poller).ToArray()),
                    ["paused_pollers"] = new JsonArray(),
                });
            }

            return new JsonObject { ["tick_rate"] = Ticks.Frequency, ["threads"] = threads };
        }, RpcStates.Runtime);

        ulong schedulerPeriod = 1_000_000;
        rpc.Register("framework_set_scheduler", r =>
        {
            var p = r.Bind<SetSchedulerParams>();
            var mode = ParseScheduler(p.Name)
                ?? throw RpcException.InvalidParams($"Invalid parameters: unknown scheduler '{p.Name}' (static|poll, dynamic|adaptive, interrupt)");
            if (p.Period is { } period)
            {
                schedulerPeriod = period;
            }

            foreach (var reactor in runtime.Reactors)
            {
                reactor.SetMode(mode);
            }

            return JsonValue.Create(true);
        }, RpcStates.Both);

        rpc.Register("framework_get_scheduler", r =>
        {
            NoParams(r);
            return new JsonObject
            {
                ["scheduler_name"] = SchedulerName(runtime.Main.Mode),
                ["scheduler_period"] = schedulerPeriod,
                ["isolated_core_mask"] = string.Empty,
                ["scheduling_core"] = runtime.Main.Core,
                ["reactor_mode"] = runtime.Main.Mode.ToString().ToLowerInvariant(),
            };
        }, RpcStates.Both);

        subsystems.Add(new Subsystem("scheduler", () => new JsonArray(
            Subsystem.Call("framework_set_scheduler", new JsonObject
            {
                ["name"] = SchedulerName(runtime.Main.Mode),
                ["period"] = schedulerPeriod,
            }))));
    }

    /// <summary>SPDK's no-params rule, relaxed for an empty object (some clients always send params).</summary>
    internal static void NoParams(RpcRequest r)
    {
        if (r.Params is { ValueKind: System.Text.Json.JsonValueKind.Object } p && !p.EnumerateObject().Any())
        {
            return;
        }

        if (r.Params is not null)
        {
            throw RpcException.InvalidParams($"'{r.Method}' requires no arguments");
        }
    }

    /// <summary>Maps SPDK scheduler names (and our mode names) onto reactor modes.</summary>
    public static ReactorMode? ParseScheduler(string name) => name switch
    {
        "static" or "poll" => ReactorMode.Poll,
        "dynamic" or "adaptive" => ReactorMode.Adaptive,
        "interrupt" => ReactorMode.Interrupt,
        _ => null,
    };

    public static string SchedulerName(ReactorMode mode) => mode switch
    {
        ReactorMode.Poll => "static",
        ReactorMode.Adaptive => "dynamic",
        _ => "interrupt",
    };

    /// <summary>
    /// Extension fields (not in SPDK): the reactor's longest loop iteration since start or the last
    /// framework_reset_max_iteration, in ticks (of tick_rate) and in microseconds.
    /// </summary>
    private static void AddMaxIteration(JsonObject o, Reactor reactor)
    {
        long ticks = reactor.MaxIterationTicks;
        o["max_iteration_ticks"] = ticks;
        o["max_iteration_us"] = Math.Round(Ticks.ToMicroseconds(ticks), 1);
    }

    private static string CoreMask(int core) => core < 64 ? (1UL << core).ToString("x", CultureInfo.InvariantCulture) : "0";

    private static Dictionary<int, (long Usr, long Sys, long Irq)> ReadProcStat()
    {
        var result = new Dictionary<int, (long, long, long)>();
        try
        {
            foreach (var line in File.ReadLines("/proc/stat"))
            {
                if (!line.StartsWith("cpu", StringComparison.Ordinal) || line.Length < 4 || !char.IsDigit(line[3]))
                {
                    continue;
                }

                var f = line.Split(' ', StringSplitOptions.RemoveEmptyEntries);
                if (f.Length > 6
                    && int.TryParse(f[0].AsSpan(3), NumberStyles.None, CultureInfo.InvariantCulture, out int cpu)
                    && long.TryParse(f[1], NumberStyles.None, CultureInfo.InvariantCulture, out long usr)
                    && long.TryParse(f[3], NumberStyles.None, CultureInfo.InvariantCulture, out long sys)
                    && long.TryParse(f[6], NumberStyles.None, CultureInfo.InvariantCulture, out long irq))
                {
                    result[cpu] = (usr, sys, irq);
                }
            }
        }
        catch (IOException)
        {
        }

        return result;
    }

    private sealed class GetMethodsParams
    {
        public bool Current { get; set; }
        public bool IncludeAliases { get; set; }
    }

    private sealed class GetConfigParams
    {
        [JsonRequired]
        public string Name { get; set; } = string.Empty;

        public bool WithBatches { get; set; }
    }

    private sealed class SetSchedulerParams
    {
        [JsonRequired]
        public string Name { get; set; } = string.Empty;

        public ulong? Period { get; set; }
        public byte? LoadLimit { get; set; }
        public byte? CoreLimit { get; set; }
        public byte? CoreBusy { get; set; }
        public string? Mappings { get; set; }
    }
}
