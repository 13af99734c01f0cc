using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using VhostBackend.Bdev;
using VhostBackend.Platform;
using Xunit;

namespace VhostBackend.Rpc.Tests;

/// <summary>
/// <c>vhostctl top</c> (the built CLI, a child process) against the in-process daemon while reads run on a malloc
/// bdev: its first screens under a real pseudo-terminal (tmux), 'q' restoring the terminal, and the --json snapshot.
/// </summary>
public sealed class TopTests
{
    private static readonly string Cli = Path.Combine(AppContext.BaseDirectory, "VhostBackend.Cli.dll");

    [Fact]
    public async Task Top_Shows_Reactors_Bdevs_Controllers_And_Pollers_Under_A_Terminal_And_Quits_On_Q()
    {
        // scripts/install-deps.sh installs tmux: its absence is a broken setup, not a reason to pass.
        string? tmux = ExternalClientTests.FindOnPath("tmux");
        Assert.True(tmux is not null, "tmux is not on PATH (scripts/install-deps.sh installs it); it provides the pseudo-terminal this test drives vhostctl top in");
        Assert.True(File.Exists(Cli), $"vhostctl not built next to the tests: {Cli}");

        await using var app = await TestApp.StartAsync();
        await using var io = await ReadLoad.StartAsync(app, "TopMal0", "topctl");
        string server = "vhostctl-top-" + Guid.NewGuid().ToString("N")[..8]; // a private tmux server, killed at the end
        try
        {
            // A plain shell in a 160x50 pane, then top in it: after 'q' the shell prints top's exit code.
            Assert.Equal(0, (await Tmux(tmux, server, "new-session", "-d", "-s", "t", "-x", "160", "-y", "50", "env", "PS1=shell$ ", "bash", "--norc", "--noprofile", "-i")).Code);
            await Tmux(tmux, server, "send-keys", "-t", "t", $"dotnet {Cli} -s {app.RpcSocket} top -d 0.5; echo top-exit=$?", "Enter");

            // The first screen already names everything; rates appear from the second refresh on.
            string screen = await WaitForScreen(tmux, server, s => s.Contains("REACTORS", StringComparison.Ordinal) && Iops(s, "TopMal0") > 0, "a refresh with TopMal0's IOPS above 0");
            foreach (string header in new[] { "REACTORS (1)", "BUSY%", "IDLE%", "BDEVS", "IOPS", "READ_MB/s", "AVG_LAT_us", "CONTROLLERS (1)", "SESSIONS", "POLLERS", "RUNS/s", "q: quit" })
            {
                Assert.True(screen.Contains(header, StringComparison.Ordinal), $"'{header}' missing from the screen:\n{screen}");
            }

            var lines = screen.Split('\n');
            Assert.Contains(lines, l => l.StartsWith("topctl ", StringComparison.Ordinal) && l.Contains("vhost_blk", StringComparison.Ordinal) && l.Contains("TopMal0", StringComparison.Ordinal));
            Assert.Contains(lines, l => l.StartsWith("reactor_0", StringComparison.Ordinal) && l.Contains("bdev_channel:TopMal0", StringComparison.Ordinal));
            Assert.True((await Tmux(tmux, server, "display-message", "-p", "-t", "t", "#{alternate_on}")).Stdout.Trim() == "1", "top did not switch to the alternate screen");

            await Tmux(tmux, server, "send-keys", "-t", "t", "q");
            string after = await WaitForScreen(tmux, server, s => Regex.IsMatch(s, @"^top-exit=\d", RegexOptions.Multiline), "the shell again after q");
            Assert.Matches(new Regex("^top-exit=0$", RegexOptions.Multiline), after);
            Assert.DoesNotContain("REACTORS", after, StringComparison.Ordinal); // the alternate screen is gone
            Assert.Contains("shell$ ", after, StringComparison.Ordinal);
            Assert.Equal("0", (await Tmux(tmux, server, "display-message", "-p", "-t", "t", "#{alternate_on}")).Stdout.Trim());
            Assert.Equal("1", (await Tmux(tmux, server, "display-message", "-p", "-t", "t", "#{cursor_flag}")).Stdout.Trim()); // cursor shown again
        }
        finally
        {
            await Tmux(tmux, server, "kill-server");
        }
    }

    [Fact]
    public async Task Top_Json_Prints_One_Snapshot_Of_Rates()
    {
        await using var app = await TestApp.StartAsync();
        await using var io = await ReadLoad.StartAsync(app, "TopMal1", "topctl1");
        var sw = Stopwatch.StartNew();
        var r = await ExternalClientTests.RunAsync("dotnet", Cli, "-s", app.RpcSocket, "top", "--json", "-d", "0.5");
        Assert.True(r.Code == 0, r.Stderr);
        var s = JsonNode.Parse(r.Stdout)!.AsObject();
        double interval = (double)s["interval_s"]!;
        Assert.InRange(interval, 0.45, sw.Elapsed.TotalSeconds);
        var reactor = Assert.Single(s["reactors"]!.AsArray())!;
        Assert.InRange((double)reactor["busy_pct"]!, 0, 100);
        Assert.Equal(100, (double)reactor["busy_pct"]! + (double)reactor["idle_pct"]!, 0);

        var bdev = s["bdevs"]!.AsArray().Single(b => (string?)b!["name"] == "TopMal1")!;
        double iops = (double)bdev["read_iops"]!;
        Assert.True(iops > 0, r.Stdout);
        Assert.Equal(0, (double)bdev["write_iops"]!);
        Assert.Equal(iops * 4096 / 1e6, (double)bdev["read_mbps"]!, 1); // 4 KiB reads
        Assert.True((double)bdev["avg_read_latency_us"]! >= 0, r.Stdout);
        Assert.Null(bdev["avg_write_latency_us"]);

        var ctrl = s["controllers"]!.AsArray().Single(c => (string?)c!["name"] == "topctl1")!;
        Assert.Equal("vhost_blk", (string?)ctrl["type"]);
        Assert.Equal("TopMal1", (string?)ctrl["devices"]![0]);
        Assert.Equal(0, (int)ctrl["sessions"]!);
        Assert.Contains(s["pollers"]!.AsArray(), p => (string?)p!["name"] == "bdev_channel:TopMal1" && (double)p["runs_per_s"]! > 0);
        Assert.Empty(s["unavailable"]!.AsArray());

        // Output not a terminal: each refresh as plain text; -n 2 = the first screen and two refreshes, then exit 0.
        var plain = await ExternalClientTests.RunAsync("dotnet", Cli, "-s", app.RpcSocket, "top", "-n", "2", "-d", "0.3");
        Assert.True(plain.Code == 0, plain.Stderr);
        Assert.Equal(3, Regex.Matches(plain.Stdout, "^REACTORS", RegexOptions.Multiline).Count);
        Assert.DoesNotContain("\e[", plain.Stdout, StringComparison.Ordinal);
        Assert.True(Iops(plain.Stdout, "TopMal1") > 0, plain.Stdout);

        var bad = await ExternalClientTests.RunAsync("dotnet", Cli, "-s", app.RpcSocket, "top", "-d", "0");
        Assert.Equal(1, bad.Code);
        Assert.Contains("-d/--delay", bad.Stderr, StringComparison.Ordinal);
    }

    /// <summary>The largest IOPS shown for <paramref name="bdev"/> in any frame, or -1 ("-" before the first interval, or no row).</summary>
    private static double Iops(string screen, string bdev) =>
        screen.Split('\n').Where(l => l.StartsWith(bdev + " ", StringComparison.Ordinal))
            .Select(l => l.Split(' ', StringSplitOptions.RemoveEmptyEntries))
            .Select(c => c.Length > 1 && double.TryParse(c[1], NumberStyles.Float, CultureInfo.InvariantCulture, out double v) ? v : -1)
            .DefaultIfEmpty(-1).Max();

    private static async Task<string> WaitForScreen(string tmux, string server, Func<string, bool> done, string what)
    {
        var deadline = Stopwatch.StartNew();
        string screen = "";
        while (deadline.Elapsed < TimeSpan.FromSeconds(60))
        {
            screen = (await Tmux(tmux, server, "capture-pane", "-p", "-t", "t")).Stdout;
            if (done(screen))
            {
                return screen;
            }

            await Task.Delay(200);
        }

        Assert.Fail($"timed out waiting for {what}; the pane shows:\n{screen}");
        return screen;
    }

    private static Task<(int Code, string Stdout, string Stderr)> Tmux(string tmux, string server, params string[] args) =>
        ExternalClientTests.RunAsync(tmux, ["-L", server, .. args]);

    /// <summary>A malloc bdev exported by a vhost-blk controller (over RPC) and 4 KiB reads on it in bursts of 16 every 5 ms (in-process, on the main reactor).</summary>
    private sealed class ReadLoad : IAsyncDisposable
    {
        private static readonly BdevIoCompletion s_done = static (_, _, arg) => ((ReadLoad)arg!)._inflight--;
        private readonly TestApp _app;
        private readonly byte[] _buffer = GC.AllocateArray<byte>(4096, pinned: true);
        private readonly IoVec[] _iov;
        private readonly BdevDesc _desc;
        private readonly CancellationTokenSource _stop = new();
        private BdevChannel? _ch;
        private int _inflight;
        private Task? _loop;

        private ReadLoad(TestApp app, BdevDesc desc)
        {
            _app = app;
            _desc = desc;
            _iov = [new IoVec(Marshal.UnsafeAddrOfPinnedArrayElement(_buffer, 0), 4096)];
        }

        public static async Task<ReadLoad> StartAsync(TestApp app, string bdev, string ctrlr)
        {
            await using var client = await app.ConnectAsync();
            await client.ResultAsync("bdev_malloc_create", new JsonObject { ["name"] = bdev, ["num_blocks"] = 256, ["block_size"] = 512 });
            await client.ResultAsync("vhost_create_blk_controller", new JsonObject { ["ctrlr"] = ctrlr, ["dev_name"] = bdev });
            var load = new ReadLoad(app, app.App.Bdevs.Open(bdev, write: false));
            load._loop = load.RunAsync();
            return load;
        }

        private async Task RunAsync()
        {
            var reactor = _app.App.Reactors.Main;
            while (!_stop.IsCancellationRequested)
            {
                await reactor.InvokeAsync(() =>
                {
                    _ch ??= _desc.GetIoChannel();
                    for (int i = 0; i < 16 && _inflight < 64; i++)
                    {
                        if (_ch.Read(_desc, _iov, (ulong)(i * 8), 8, s_done, this) == 0)
                        {
                            _inflight++;
                        }
                    }
                });
                await Task.Delay(5);
            }
        }

        public async ValueTask DisposeAsync()
        {
            _stop.Cancel();
            await _loop!;
            var reactor = _app.App.Reactors.Main;
            Assert.True(await SpinUntil(async () => await reactor.InvokeAsync(() => _inflight) == 0), "reads did not drain");
            await reactor.InvokeAsync(() =>
            {
                if (_ch is not null)
                {
                    BdevDesc.PutIoChannel(_ch);
                }
            });
            _desc.Dispose();
        }

        private static async Task<bool> SpinUntil(Func<Task<bool>> cond)
        {
            for (int i = 0; i < 500; i++)
            {
                if (await cond())
                {
                    return true;
                }

                await Task.Delay(10);
            }

            return false;
        }
    }
}
