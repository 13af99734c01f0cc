using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace VhostBackend.Cli;

/// <summary>
/// <c>vhostctl top</c>: a live view of a running vhostd like SPDK's spdk_top, built only from JSON-RPC calls
/// (framework_get_reactors, thread_get_pollers, bdev_get_iostat, vhost_get_controllers; each used only if the
/// daemon lists it in rpc_get_methods). Rates are deltas between two samples divided by the time between them.
/// </summary>
internal static class Top
{
    private static readonly string[] Methods = ["spdk_get_version", "framework_get_reactors", "thread_get_pollers", "bdev_get_iostat", "vhost_get_controllers"];

    /// <summary>Raw results of one round of calls, and when it was taken (client clock).</summary>
    internal sealed class Sample
    {
        public long Timestamp { get; init; }
        public Dictionary<string, JsonNode?> Results { get; } = new();

        public JsonNode? this[string method] => Results.GetValueOrDefault(method);
    }

    /// <summary>The interactive loop (or one JSON snapshot). Returns the process exit code.</summary>
    public static int Run(RpcClient client, double delaySeconds, int iterations, bool json, string server)
    {
        var available = AvailableMethods(client);
        var prev = TakeSample(client, available);
        if (json)
        {
            Thread.Sleep(TimeSpan.FromSeconds(delaySeconds));
            var cur = TakeSample(client, available);
            Console.WriteLine(Compute(prev, cur).ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
            return 0;
        }

        return Interactive(client, available, prev, delaySeconds, iterations, server);
    }

    private static int Interactive(RpcClient client, HashSet<string> available, Sample first, double delaySeconds, int iterations, string server)
    {
        bool tty = !Console.IsOutputRedirected;
        bool keys = !Console.IsInputRedirected;
        bool quit = false;
        void Quit(PosixSignalContext c)
        {
            c.Cancel = true;
            Volatile.Write(ref quit, true);
        }

        // SIGINT, SIGTERM, SIGHUP end the loop normally, so the terminal is restored in the finally block below.
        using var sigint = PosixSignalRegistration.Create(PosixSignal.SIGINT, Quit);
        using var sigterm = PosixSignalRegistration.Create(PosixSignal.SIGTERM, Quit);
        using var sighup = PosixSignalRegistration.Create(PosixSignal.SIGHUP, Quit);
        var output = new StringBuilder();
        if (tty)
        {
            Console.Out.Write("\e[?1049h\e[?25l"); // alternate screen, cursor hidden
            Console.Out.Flush();
        }

        try
        {
            var prev = first;
            var snapshot = Compute(null, first);
            for (int frame = 0; ; frame++)
            {
                Draw(snapshot, tty, delaySeconds, server);
                if ((iterations > 0 && frame >= iterations) || Volatile.Read(ref quit))
                {
                    return 0;
                }

                if (WaitForQuit(TimeSpan.FromSeconds(delaySeconds), keys, () => Volatile.Read(ref quit)))
                {
                    return 0;
                }

                Sample cur;
                try
                {
                    cur = TakeSample(client, available);
                }
                catch (Exception e) when (e is RpcClientException or IOException or System.Net.Sockets.SocketException or JsonException)
                {
                    if (tty)
                    {
                        Console.Out.Write("\e[?25h\e[?1049l");
                        tty = false;
                    }

                    Console.Error.WriteLine($"vhostctl top: {e.Message} (did the daemon stop?)");
                    return 1;
                }

                snapshot = Compute(prev, cur);
                prev = cur;
            }
        }
        finally
        {
            if (tty)
            {
                Console.Out.Write("\e[?25h\e[?1049l"); // cursor shown, back to the normal screen
                Console.Out.Flush();
            }
        }
    }

    /// <summary>Waits <paramref name="delay"/>; true if 'q' was typed (raw console input) or a signal asked to quit.</summary>
    private static bool WaitForQuit(TimeSpan delay, bool keys, Func<bool> quitRequested)
    {
        var sw = Stopwatch.StartNew();
        while (sw.Elapsed < delay)
        {
            if (quitRequested())
            {
                return true;
            }

            if (keys)
            {
                try
                {
                    while (Console.KeyAvailable)
                    {
                        var k = Console.ReadKey(intercept: true);
                        if (k.KeyChar is 'q' or 'Q')
                        {
                            return true;
                        }
                    }
                }
                catch (InvalidOperationException)
                {
                    keys = false; // no console input after all
                }
            }

            Thread.Sleep(20);
        }

        return false;
    }

    private static void Draw(JsonObject snapshot, bool tty, double delaySeconds, string server)
    {
        int width = tty ? SafeWindow(() => Console.WindowWidth, 120) : 200;
        int height = tty ? SafeWindow(() => Console.WindowHeight, 50) : int.MaxValue;
        var lines = Render(snapshot, width, height, delaySeconds, server);
        var sb = new StringBuilder();
        if (tty)
        {
            sb.Append("\e[H\e[2J");
        }

        foreach (var l in lines)
        {
            sb.Append(l).Append(tty ? "\r\n" : "\n");
        }

        if (!tty)
        {
            sb.Append('\n');
        }

        Console.Out.Write(sb.ToString());
        Console.Out.Flush();
    }

    private static int SafeWindow(Func<int> get, int fallback)
    {
        try
        {
            int v = get();
            return v > 0 ? v : fallback;
        }
        catch (IOException)
        {
            return fallback;
        }
    }

    private static HashSet<string> AvailableMethods(RpcClient client)
    {
        var all = client.Call("rpc_get_methods", null) as JsonArray ?? [];
        return all.Select(n => (string?)n).Where(n => n is not null && Methods.Contains(n)).ToHashSet()!;
    }

    private static Sample TakeSample(RpcClient client, HashSet<string> available)
    {
        var s = new Sample { Timestamp = Stopwatch.GetTimestamp() };
        foreach (var m in Methods)
        {
            if (available.Contains(m))
            {
                s.Results[m] = client.Call(m, null);
            }
        }

        return s;
    }

    private static long L(JsonNode? n) => n is JsonValue v && v.TryGetValue(out long x) ? x : 0;

    private static double? Rate(long delta, double seconds) => seconds > 0 ? Math.Max(0, delta) / seconds : null;

    /// <summary>
    /// The view's data: reactors (busy/idle share of the interval), pollers (runs and busy runs per second),
    /// bdevs (IOPS, MB/s, mean latency over the interval), controllers. Without <paramref name="prev"/> every rate is null.
    /// </summary>
    internal static JsonObject Compute(Sample? prev, Sample cur)
    {
        double seconds = prev is null ? 0 : Stopwatch.GetElapsedTime(prev.Timestamp, cur.Timestamp).TotalSeconds;
        var result = new JsonObject
        {
            ["version"] = (string?)cur["spdk_get_version"]?["version"],
            ["interval_s"] = prev is null ? null : Math.Round(seconds, 3),
        };

        // Reactors: busy and idle tick deltas (their ratio does not depend on the interval's measurement).
        var reactors = new JsonArray();
        var oldReactors = (prev?["framework_get_reactors"]?["reactors"] as JsonArray ?? []).ToDictionary(r => L(r?["lcore"]));
        foreach (var r in cur["framework_get_reactors"]?["reactors"] as JsonArray ?? [])
        {
            long lcore = L(r?["lcore"]);
            var o = new JsonObject { ["lcore"] = lcore, ["mode"] = (string?)r?["mode"], ["in_interrupt"] = r?["in_interrupt"]?.DeepClone() };
            double? busyPct = null;
            if (oldReactors.TryGetValue(lcore, out var old))
            {
                long busy = L(r?["busy"]) - L(old?["busy"]);
                long idle = L(r?["idle"]) - L(old?["idle"]);
                if (busy >= 0 && idle >= 0 && busy + idle > 0)
                {
                    busyPct = 100.0 * busy / (busy + idle);
                }
            }

            o["busy_pct"] = Round(busyPct, 1);
            o["idle_pct"] = Round(100 - busyPct, 1);
            reactors.Add(o);
        }

        result["reactors"] = reactors;

        // Pollers: matched by thread, kind, name and occurrence (names repeat, e.g. one channel poller per bdev per thread).
        var pollers = new JsonArray();
        var oldPollers = PollerMap(prev?["thread_get_pollers"]);
        foreach (var (key, p) in PollerMap(cur["thread_get_pollers"]))
        {
            oldPollers.TryGetValue(key, out var old);
            long runs = L(p["run_count"]) - (old is null ? 0 : L(old["run_count"]));
            long busy = L(p["busy_count"]) - (old is null ? 0 : L(old["busy_count"]));
            pollers.Add(new JsonObject
            {
                ["thread"] = key.Thread,
                ["name"] = (string?)p["name"],
                ["type"] = key.Kind,
                ["run_count"] = L(p["run_count"]),
                ["busy_count"] = L(p["busy_count"]),
                ["runs_per_s"] = Round(prev is null ? null : Rate(runs, seconds), 1),
                ["busy_per_s"] = Round(prev is null ? null : Rate(busy, seconds), 1),
                ["period_us"] = p["period_ticks"] is null ? null : Round(L(p["period_ticks"]) * 1e6 / Math.Max(1, L(cur["thread_get_pollers"]?["tick_rate"])), 0),
            });
        }

        result["pollers"] = pollers;

        // Bdevs: operation, byte and latency-tick deltas.
        var bdevs = new JsonArray();
        var iostat = cur["bdev_get_iostat"];
        double tickRate = Math.Max(1, L(iostat?["tick_rate"]));
        var oldBdevs = (prev?["bdev_get_iostat"]?["bdevs"] as JsonArray ?? []).ToDictionary(b => (string?)b?["name"] ?? "");
        foreach (var b in iostat?["bdevs"] as JsonArray ?? [])
        {
            string name = (string?)b?["name"] ?? "";
            oldBdevs.TryGetValue(name, out var old); // a bdev created since the last sample: its counters started at 0
            long D(string field) => L(b?[field]) - (old is null ? 0 : L(old[field]));
            long reads = D("num_read_ops"), writes = D("num_write_ops");
            long other = D("num_unmap_ops") + D("num_write_zeroes_ops") + D("num_flush_ops");
            long errors = L(b?["io_error"]?["total"]) - (old is null ? 0 : L(old["io_error"]?["total"]));
            double? Lat(long ops, long ticks) => prev is null || ops <= 0 ? null : ticks * 1e6 / tickRate / ops;
            bool have = prev is not null;
            bdevs.Add(new JsonObject
            {
                ["name"] = name,
                ["iops"] = Round(have ? Rate(reads + writes + other, seconds) : null, 1),
                ["read_iops"] = Round(have ? Rate(reads, seconds) : null, 1),
                ["write_iops"] = Round(have ? Rate(writes, seconds) : null, 1),
                ["read_mbps"] = Round(have ? Rate(D("bytes_read"), seconds) / 1e6 : null, 3),
                ["write_mbps"] = Round(have ? Rate(D("bytes_written"), seconds) / 1e6 : null, 3),
                ["avg_latency_us"] = Round(Lat(reads + writes, D("read_latency_ticks") + D("write_latency_ticks")), 2),
                ["avg_read_latency_us"] = Round(Lat(reads, D("read_latency_ticks")), 2),
                ["avg_write_latency_us"] = Round(Lat(writes, D("write_latency_ticks")), 2),
                ["errors_per_s"] = Round(have ? Rate(errors, seconds) : null, 1),
                ["num_read_ops"] = L(b?["num_read_ops"]),
                ["num_write_ops"] = L(b?["num_write_ops"]),
            });
        }

        result["bdevs"] = bdevs;

        var controllers = new JsonArray();
        foreach (var c in cur["vhost_get_controllers"] as JsonArray ?? [])
        {
            var backend = c?["backend_specific"];
            string type = backend?["block"] is not null ? "vhost_blk" : backend?["scsi"] is not null ? "vhost_scsi" : "?";
            List<string> devices = backend?["block"] is { } blk
                ? [(string?)blk["bdev"] ?? ""]
                : (backend?["scsi"] as JsonArray ?? []).SelectMany(t => (t?["luns"] as JsonArray ?? []).Select(l => $"{L(t?["scsi_dev_num"])}:{(string?)l?["bdev_name"]}")).ToList();
            var sessions = c?["sessions"] as JsonArray ?? [];
            controllers.Add(new JsonObject
            {
                ["name"] = (string?)c?["ctrlr"],
                ["type"] = type,
                ["devices"] = new JsonArray(devices.Select(d => (JsonNode?)JsonValue.Create(d)).ToArray()),
                ["sessions"] = sessions.Count,
                ["inflight"] = sessions.Sum(s => L(s?["inflight_task_cnt"])),
                ["cpumask"] = (string?)c?["cpumask"],
                ["socket"] = (string?)c?["socket"],
            });
        }

        result["controllers"] = controllers;
        result["unavailable"] = new JsonArray(Methods.Where(m => !cur.Results.ContainsKey(m)).Select(m => (JsonNode?)JsonValue.Create(m)).ToArray());
        return result;
    }

    private static double? Round(double? v, int digits) => v is { } x && double.IsFinite(x) ? Math.Round(x, digits) : null;

    private static List<((string Thread, string Kind, string Name, int Nth) Key, JsonNode Poller)> PollerList(JsonNode? result)
    {
        var list = new List<((string, string, string, int), JsonNode)>();
        foreach (var t in result?["threads"] as JsonArray ?? [])
        {
            string thread = (string?)t?["name"] ?? "";
            foreach (var kind in new[] { "active", "timed", "paused" })
            {
                var seen = new Dictionary<string, int>();
                foreach (var p in t?[kind + "_pollers"] as JsonArray ?? [])
                {
                    if (p is null)
                    {
                        continue;
                    }

                    string name = (string?)p["name"] ?? "";
                    int nth = seen[name] = seen.GetValueOrDefault(name) + 1;
                    list.Add(((thread, kind, name, nth), p));
                }
            }
        }

        return list;
    }

    private static Dictionary<(string Thread, string Kind, string Name, int Nth), JsonNode> PollerMap(JsonNode? result) =>
        PollerList(result).ToDictionary(x => x.Key, x => x.Poller);

    /// <summary>The screen: header, reactors, bdevs, controllers, then the busiest pollers in what height is left.</summary>
    internal static List<string> Render(JsonObject s, int width, int height, double delaySeconds, string server)
    {
        var lines = new List<string>
        {
            $"vhostctl top - {(string?)s["version"] ?? "vhostd"} on {server}   refresh {delaySeconds.ToString("0.###", CultureInfo.InvariantCulture)} s   {DateTime.Now:HH:mm:ss}   q: quit",
            "",
        };

        static string F(JsonNode? n, string format = "0.0") => n is JsonValue v && v.TryGetValue(out double d) ? d.ToString(format, CultureInfo.InvariantCulture) : "-";

        var reactors = s["reactors"] as JsonArray ?? [];
        lines.Add($"REACTORS ({reactors.Count})");
        lines.Add(Row(("LCORE", 6), ("MODE", 10), ("BUSY%", -7), ("IDLE%", -7), ("IN_INTERRUPT", -13)));
        foreach (var r in reactors)
        {
            lines.Add(Row((L(r?["lcore"]).ToString(CultureInfo.InvariantCulture), 6), ((string?)r?["mode"] ?? "-", 10), (F(r?["busy_pct"]), -7), (F(r?["idle_pct"]), -7), (r?["in_interrupt"]?.ToString() ?? "-", -13)));
        }

        var bdevs = s["bdevs"] as JsonArray ?? [];
        lines.Add("");
        lines.Add($"BDEVS ({bdevs.Count})");
        lines.Add(Row(("NAME", 24), ("IOPS", -10), ("READ_IOPS", -10), ("WRITE_IOPS", -10), ("READ_MB/s", -10), ("WRITE_MB/s", -10), ("AVG_LAT_us", -11), ("ERR/s", -7)));
        foreach (var b in bdevs)
        {
            lines.Add(Row(((string?)b?["name"] ?? "", 24), (F(b?["iops"]), -10), (F(b?["read_iops"]), -10), (F(b?["write_iops"]), -10), (F(b?["read_mbps"], "0.00"), -10), (F(b?["write_mbps"], "0.00"), -10), (F(b?["avg_latency_us"], "0.00"), -11), (F(b?["errors_per_s"]), -7)));
        }

        var controllers = s["controllers"] as JsonArray ?? [];
        lines.Add("");
        lines.Add($"CONTROLLERS ({controllers.Count})");
        lines.Add(Row(("NAME", 20), ("TYPE", 11), ("SESSIONS", -9), ("INFLIGHT", -9), ("CPUMASK", 10), ("DEVICES", 30)));
        foreach (var c in controllers)
        {
            string devices = string.Join(",", (c?["devices"] as JsonArray ?? []).Select(d => (string?)d));
            lines.Add(Row(((string?)c?["name"] ?? "", 20), ((string?)c?["type"] ?? "", 11), (L(c?["sessions"]).ToString(CultureInfo.InvariantCulture), -9), (L(c?["inflight"]).ToString(CultureInfo.InvariantCulture), -9), ((string?)c?["cpumask"] ?? "", 10), (devices, 30)));
        }

        var pollers = (s["pollers"] as JsonArray ?? []).OrderByDescending(p => (double?)p?["busy_per_s"] ?? 0).ThenBy(p => (string?)p?["name"]).ToList();
        lines.Add("");
        lines.Add($"POLLERS ({pollers.Count}, busiest first)");
        lines.Add(Row(("THREAD", 12), ("TYPE", 7), ("NAME", 40), ("RUNS/s", -11), ("BUSY/s", -11), ("PERIOD_us", -10)));
        int room = height - 1 - lines.Count;
        foreach (var p in pollers.Take(Math.Max(0, pollers.Count > room ? room - 1 : room)))
        {
            lines.Add(Row(((string?)p?["thread"] ?? "", 12), ((string?)p?["type"] ?? "", 7), ((string?)p?["name"] ?? "", 40), (F(p?["runs_per_s"]), -11), (F(p?["busy_per_s"]), -11), (F(p?["period_us"], "0"), -10)));
        }

        if (pollers.Count > room && room > 0)
        {
            lines.Add($"... {pollers.Count - Math.Max(0, room - 1)} more pollers (a taller terminal shows them)");
        }

        if (s["unavailable"] is JsonArray { Count: > 0 } missing && lines.Count < height)
        {
            lines.Add("not served by this daemon: " + string.Join(", ", missing.Select(m => (string?)m)));
        }

        return lines.Take(Math.Max(1, height)).Select(l => l.Length > width ? l[..width] : l).ToList();
    }

    /// <summary>Cells padded to their width (negative: right-aligned), one space between.</summary>
    private static string Row(params (string Text, int Width)[] cells)
    {
        var sb = new StringBuilder();
        foreach (var (text, w) in cells)
        {
            string t = text.Length > Math.Abs(w) ? text[..Math.Abs(w)] : text;
            sb.Append(w < 0 ? t.PadLeft(-w) : t.PadRight(w)).Append(' ');
        }

        return sb.ToString().TrimEnd();
    }
}
