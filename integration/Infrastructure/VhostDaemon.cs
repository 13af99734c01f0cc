using System.Diagnostics;
using System.Net.Sockets;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace VhostBackend.IntegrationTests.Infrastructure;

/// <summary>A vhostd process on a private socket directory, and a minimal JSON-RPC client for its socket.</summary>
public sealed class VhostDaemon : IAsyncDisposable
{
    private readonly Process _process;
    private readonly string _rpcSocket;
    private int _id;

    private VhostDaemon(Process process, string rpcSocket)
    {
        _process = process;
        _rpcSocket = rpcSocket;
    }

    /// <summary>The daemon's JSON-RPC socket.</summary>
    public string RpcSocket => _rpcSocket;

    /// <summary>The daemon's process id (e.g. for its CPU time in /proc/PID/stat).</summary>
    public int ProcessId => _process.Id;

    /// <summary>Starts ./vhostd on two cores with its sockets in <paramref name="dir"/>, plus <paramref name="extraArgs"/>.</summary>
    public static async Task<VhostDaemon> StartAsync(string dir, Action<string> log, params string[] extraArgs)
    {
        string rpc = Path.Combine(dir, "rpc.sock");
        var psi = new ProcessStartInfo(Path.Combine(GuestImage.RepoRoot, "vhostd"))
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        foreach (var a in new[] { "-m", "0x3", "-S", dir, "-r", rpc }.Concat(extraArgs))
        {
            psi.ArgumentList.Add(a);
        }

        var p = Process.Start(psi)!;
        p.OutputDataReceived += (_, e) => { if (e.Data is not null) { log("vhostd: " + e.Data); } };
        p.ErrorDataReceived += (_, e) => { if (e.Data is not null) { log("vhostd: " + e.Data); } };
        p.BeginOutputReadLine();
        p.BeginErrorReadLine();
        var d = new VhostDaemon(p, rpc);
        var sw = Stopwatch.StartNew();
        while (sw.Elapsed < TimeSpan.FromSeconds(180))
        {
            if (p.HasExited)
            {
                throw new InvalidOperationException($"vhostd exited with {p.ExitCode}");
            }

            if (File.Exists(rpc))
            {
                try
                {
                    await d.CallAsync("spdk_get_version", null);
                    return d;
                }
                catch (SocketException)
                {
                }
            }

            await Task.Delay(200);
        }

        throw new TimeoutException("vhostd did not open its RPC socket");
    }

    public async Task<JsonObject> CallRawAsync(string method, JsonObject? parameters)
    {
        using var s = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        await s.ConnectAsync(new UnixDomainSocketEndPoint(_rpcSocket));
        var req = new JsonObject { ["jsonrpc"] = "2.0", ["method"] = method, ["id"] = Interlocked.Increment(ref _id) };
        if (parameters is not null)
        {
            req["params"] = parameters;
        }

        await s.SendAsync(Encoding.UTF8.GetBytes(req.ToJsonString()));
        var buf = new List<byte>();
        var chunk = new byte[65536];
        while (true)
        {
            int n = await s.ReceiveAsync(chunk);
            if (n == 0)
            {
                break;
            }

            buf.AddRange(chunk.AsSpan(0, n).ToArray());
            try
            {
                return (JsonObject)JsonNode.Parse(buf.ToArray())!;
            }
            catch (JsonException)
            {
                // incomplete: keep reading
            }
        }

        return (JsonObject)JsonNode.Parse(buf.ToArray())!;
    }

    public async Task<JsonNode?> CallAsync(string method, JsonObject? parameters)
    {
        var r = await CallRawAsync(method, parameters);
        if (r["error"] is { } e)
        {
            throw new InvalidOperationException($"{method} failed: {e.ToJsonString()}");
        }

        return r["result"];
    }

    /// <summary>
    /// Sends SIGTERM (what systemd and operators send) and waits for the exit; returns the exit code. Fails
    /// (TimeoutException) when the daemon is still running after <paramref name="timeout"/>.
    /// </summary>
    public async Task<int> TerminateAsync(TimeSpan timeout)
    {
        using (var kill = Process.Start("kill", ["-TERM", _process.Id.ToString(System.Globalization.CultureInfo.InvariantCulture)]))
        {
            await kill.WaitForExitAsync();
            if (kill.ExitCode != 0)
            {
                throw new InvalidOperationException($"kill -TERM {_process.Id} failed ({kill.ExitCode})");
            }
        }

        using var cts = new CancellationTokenSource(timeout);
        try
        {
            await _process.WaitForExitAsync(cts.Token);
        }
        catch (OperationCanceledException)
        {
            throw new TimeoutException($"vhostd still running {timeout.TotalSeconds} s after SIGTERM");
        }

        return _process.ExitCode;
    }

    /// <summary>SIGKILL (a crash: nothing is drained or closed cleanly) and waits for the process to be gone.</summary>
    public async Task KillAsync()
    {
        _process.Kill(entireProcessTree: true);
        await _process.WaitForExitAsync();
    }

    public async ValueTask DisposeAsync()
    {
        if (!_process.HasExited)
        {
            _process.Kill(entireProcessTree: true);
            await _process.WaitForExitAsync();
        }

        _process.Dispose();
    }
}
