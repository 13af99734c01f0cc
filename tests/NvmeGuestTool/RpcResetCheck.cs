using System.Diagnostics;
using System.Globalization;
using System.Net.Sockets;
using System.Text;
using System.Text.Json.Nodes;

namespace VhostBackend.NvmeGuestTool;

/// <summary>
/// "--rpc-reset-check SOCKET": a JSON-RPC client for a running bdevperf (or vhostd) whose reactor does bdev I/O on
/// an NVMe controller. It alternates windows of equal length: a baseline window (no reset) and a window with one
/// <c>bdev_nvme_reset_controller</c>, starting each with <c>framework_reset_max_iteration</c> and ending it with
/// <c>framework_get_reactors</c> (the reactors' <c>max_iteration_us</c>), and checks that I/O keeps completing
/// (<c>bdev_get_iostat</c>) and the controller is enabled afterwards. Prints "PASS/FAIL rpc-reset-*" lines and one
/// "MEASURE" line with the numbers.
/// </summary>
internal static class RpcResetCheck
{
    public static async Task RunAsync(string socket, string ctrl, string bdev, int rounds, int windowMs, Action<string, string?> pass, Action<string, string> fail)
    {
        using var rpc = await RpcClient.ConnectAsync(socket, TimeSpan.FromSeconds(120));
        pass("rpc-connect", socket);

        // Wait for the bdev to exist and the front end's I/O to flow: the count must grow across consecutive samples
        // (a bare "ops > 0" is satisfied by the daemon's own examine read before the front end has even connected).
        ulong ops0 = 0;
        ulong last = 0;
        int growing = 0;
        var wait = Stopwatch.StartNew();
        while (wait.Elapsed < TimeSpan.FromSeconds(120) && growing < 3)
        {
            try
            {
                ulong now = await OpsAsync(rpc, bdev);
                growing = now > last && last > 0 ? growing + 1 : 0;
                last = now;
                ops0 = now;
            }
            catch (InvalidOperationException)
            {
                // not there yet
            }

            await Task.Delay(250);
        }

        if (growing < 3)
        {
            fail("rpc-io-running", $"no steady I/O on {bdev} within 120 s (ops {ops0})");
            return;
        }

        // A settle window: JIT and first-use costs of the RPC methods themselves.
        await rpc.CallAsync("framework_reset_max_iteration");
        await Task.Delay(windowMs);
        await MaxIterationAsync(rpc);

        // A first (cold) reset: its window includes compiling the reset and reconnect paths on the reactor (JIT, a
        // one-time cost per process); reported on its own, not mixed into the measured rounds.
        await rpc.CallAsync("framework_reset_max_iteration");
        var cold = Stopwatch.StartNew();
        var coldReset = await rpc.TryCallAsync("bdev_nvme_reset_controller", new JsonObject { ["name"] = ctrl });
        double coldResetMs = cold.Elapsed.TotalMilliseconds;
        await Task.Delay(Math.Max(0, windowMs - (int)coldResetMs));
        double coldMax = await MaxIterationAsync(rpc);
        double coldStep = await ControlStepAsync(rpc, ctrl);
        if (coldReset.Error is not null)
        {
            fail("rpc-reset-cold", coldReset.Error);
            return;
        }

        var baseline = new List<double>();
        var during = new List<double>();
        var resetMs = new List<double>();
        var steps = new List<double>();
        bool allOk = true;
        string errors = "";
        for (int round = 0; round < rounds; round++)
        {
            await rpc.CallAsync("framework_reset_max_iteration");
            await Task.Delay(windowMs);
            baseline.Add(await MaxIterationAsync(rpc));

            ulong before = await OpsAsync(rpc, bdev);
            await rpc.CallAsync("framework_reset_max_iteration");
            var sw = Stopwatch.StartNew();
            var r = await rpc.TryCallAsync("bdev_nvme_reset_controller", new JsonObject { ["name"] = ctrl });
            double ms = sw.Elapsed.TotalMilliseconds;
            resetMs.Add(ms);
            if (r.Error is not null)
            {
                allOk = false;
                errors += $" reset {round}: {r.Error};";
            }

            int left = windowMs - (int)ms;
            if (left > 0)
            {
                await Task.Delay(left);
            }

            during.Add(await MaxIterationAsync(rpc));
            steps.Add(await ControlStepAsync(rpc, ctrl));
            ulong after = await OpsAsync(rpc, bdev);
            if (after <= before)
            {
                allOk = false;
                errors += $" round {round}: no I/O completed across the reset ({before} -> {after});";
            }
        }

        var ctrls = await rpc.CallAsync("bdev_nvme_get_controllers", new JsonObject { ["name"] = ctrl });
        string state = ctrls?[0]?["ctrlrs"]?[0]?["state"]?.GetValue<string>() ?? "?";
        ulong opsEnd = await OpsAsync(rpc, bdev);
        string F(IEnumerable<double> v) => string.Join(",", v.Select(x => x.ToString("F0", CultureInfo.InvariantCulture)));
        Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"MEASURE max_iteration_us baseline=[{F(baseline)}] max {baseline.Max():F0}; during reset=[{F(during)}] max {during.Max():F0}; reset rpc ms=[{F(resetMs)}]; max_control_step_us=[{F(steps)}]; cold first reset: max_iteration_us {coldMax:F0}, max_control_step_us {coldStep:F0}, rpc {coldResetMs:F0} ms; windows {windowMs} ms; ops {ops0} -> {opsEnd}"));
        if (allOk && state == "enabled")
        {
            pass("rpc-reset-under-io", $"{rounds} resets, I/O completed after each, controller {state}");
        }
        else
        {
            fail("rpc-reset-under-io", $"controller {state};{errors}");
        }
    }

    private static async Task<ulong> OpsAsync(RpcClient rpc, string bdev)
    {
        var r = await rpc.CallAsync("bdev_get_iostat", new JsonObject { ["name"] = bdev });
        var b = r?["bdevs"]?[0] ?? throw new InvalidOperationException("no iostat");
        return b["num_read_ops"]!.GetValue<ulong>() + b["num_write_ops"]!.GetValue<ulong>();
    }

    /// <summary>bdev_nvme_get_controllers' max_control_step_us: the longest single reset/reconnect step of the last reset.</summary>
    private static async Task<double> ControlStepAsync(RpcClient rpc, string ctrl)
    {
        var r = await rpc.CallAsync("bdev_nvme_get_controllers", new JsonObject { ["name"] = ctrl });
        return r![0]!["ctrlrs"]![0]!["max_control_step_us"]!.GetValue<double>();
    }

    /// <summary>The largest max_iteration_us over all reactors.</summary>
    private static async Task<double> MaxIterationAsync(RpcClient rpc)
    {
        var r = await rpc.CallAsync("framework_get_reactors");
        double max = 0;
        foreach (var reactor in r!["reactors"]!.AsArray())
        {
            max = Math.Max(max, reactor!["max_iteration_us"]!.GetValue<double>());
        }

        return max;
    }

    /// <summary>A minimal JSON-RPC 2.0 client over a Unix socket (one request at a time).</summary>
    private sealed class RpcClient : IDisposable
    {
        private readonly Socket _socket;
        private readonly byte[] _buf = new byte[1 << 20];
        private int _id;

        private RpcClient(Socket s) => _socket = s;

        public static async Task<RpcClient> ConnectAsync(string path, TimeSpan timeout)
        {
            var sw = Stopwatch.StartNew();
            while (true)
            {
                var s = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
                try
                {
                    await s.ConnectAsync(new UnixDomainSocketEndPoint(path));
                    return new RpcClient(s);
                }
                catch (SocketException) when (sw.Elapsed < timeout)
                {
                    s.Dispose();
                    await Task.Delay(200);
                }
            }
        }

        public async Task<JsonNode?> CallAsync(string method, JsonObject? p = null)
        {
            var (result, error) = await TryCallAsync(method, p);
            return error is null ? result : throw new InvalidOperationException($"{method}: {error}");
        }

        public async Task<(JsonNode? Result, string? Error)> TryCallAsync(string method, JsonObject? p = null)
        {
            var req = new JsonObject { ["jsonrpc"] = "2.0", ["id"] = ++_id, ["method"] = method };
            if (p is not null)
            {
                req["params"] = p;
            }

            await _socket.SendAsync(Encoding.UTF8.GetBytes(req.ToJsonString()), SocketFlags.None);
            int len = 0;
            while (true)
            {
                int n = await _socket.ReceiveAsync(_buf.AsMemory(len), SocketFlags.None);
                if (n == 0)
                {
                    throw new IOException("RPC connection closed");
                }

                len += n;
                JsonNode? resp;
                try
                {
                    resp = JsonNode.Parse(_buf.AsSpan(0, len));
                }
                catch (System.Text.Json.JsonException)
                {
                    continue; // incomplete
                }

                return resp!["error"] is { } e ? (null, e.ToJsonString()) : (resp["result"], null);
            }
        }

        public void Dispose() => _socket.Dispose();
    }
}
