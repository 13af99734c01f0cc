using System.Diagnostics;
using System.Globalization;
using System.Net.Sockets;
using System.Text;
using System.Text.Json.Nodes;
using VhostBackend.Platform;
using Xunit;

namespace VhostBackend.Rpc.Tests;

/// <summary>
/// vhostd as a systemd Type=notify service, run as a real process (dotnet VhostBackend.Daemon.dll) with
/// NOTIFY_SOCKET pointing at a datagram socket of the test: READY=1 only once the RPC socket answers and the
/// configured controller's socket listens, STOPPING=1 on SIGTERM (and SIGINT, which systemd's lifetime alone would not drain), then the drain and exit 0.
/// </summary>
public sealed class DaemonNotifyTests : IDisposable
{
    private static readonly string Daemon = Path.Combine(AppContext.BaseDirectory, "VhostBackend.Daemon.dll");
    private readonly string _dir = Directory.CreateTempSubdirectory("vhd").FullName;

    public void Dispose()
    {
        try
        {
            Directory.Delete(_dir, recursive: true);
        }
        catch (IOException)
        {
        }
    }

    [Theory]
    [InlineData("TERM")]
    [InlineData("INT")]
    public async Task ReadyAfterStartThenStoppingOnSignalAndExitZero(string signal)
    {
        Assert.True(File.Exists(Daemon), $"{Daemon} not built next to the tests");
        Assert.True(SocketOwnership.TryResolveGroup("disk", out uint disk), "group 'disk' missing (Debian has gid 6)");
        string config = WriteConfig();
        using var notify = BindNotifySocket();
        using var daemon = StartDaemon(config, "--socket-group", "disk", "--socket-mode", "0660");
        var output = CollectOutput(daemon);

        string ready = await ReceiveAsync(notify, daemon, output);
        Assert.Equal("READY=1", ready);

        // At READY the RPC socket answers and the configured controller listens: nothing is still starting.
        string rpc = Path.Combine(_dir, "rpc.sock");
        string vhost = Path.Combine(_dir, "vhost.0");
        Assert.True(File.Exists(vhost), $"vhost.0 socket missing at READY=1\n{output}");
        await using (var client = await RawClient.ConnectAsync(rpc))
        {
            var version = await client.ResultAsync("spdk_get_version");
            Assert.False(string.IsNullOrEmpty((string?)version["version"]), version.ToJsonString());
        }

        using (var conn = UnixConnection.Connect(vhost))
        {
            Assert.NotNull(conn);
        }

        Assert.Equal(("660", disk), await StatAsync(rpc));
        Assert.Equal(("660", disk), await StatAsync(vhost));

        await SendSignalAsync(daemon, signal);
        Assert.Equal("STOPPING=1", await ReceiveAsync(notify, daemon, output));
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(60));
        await daemon.WaitForExitAsync(cts.Token);
        Assert.True(daemon.ExitCode == 0, $"exit code {daemon.ExitCode}\n{output}");
        Assert.False(File.Exists(vhost), "vhost.0 socket left behind after the drain");
    }

    [Fact]
    public async Task ConfigErrorExitsOneWithoutReady()
    {
        Assert.True(File.Exists(Daemon), $"{Daemon} not built next to the tests");
        string config = Path.Combine(_dir, "bad.json");
        File.WriteAllText(config, """{"subsystems":[{"subsystem":"bdev","config":[{"method":"bdev_no_such_method","params":{}}]}]}""");
        using var notify = BindNotifySocket();
        using var daemon = StartDaemon(config);
        var output = CollectOutput(daemon);
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(60));
        await daemon.WaitForExitAsync(cts.Token);
        Assert.True(daemon.ExitCode == 1, $"exit code {daemon.ExitCode}\n{output}");
        Assert.Equal(0, notify.Available);
        string text = output.ToString();
        Assert.Contains("vhostd: JSON config", text, StringComparison.Ordinal);
        Assert.DoesNotContain("Hosting failed to start", text, StringComparison.Ordinal);
    }

    private string WriteConfig()
    {
        string path = Path.Combine(_dir, "config.json");
        // 200 null bdevs before the controller: applying the config takes long enough that a READY=1 sent before
        // the start work finished would find the controller's socket missing.
        var bdevs = new JsonArray(new JsonObject
        {
            ["method"] = "bdev_malloc_create",
            ["params"] = new JsonObject { ["name"] = "Malloc0", ["num_blocks"] = 2048, ["block_size"] = 512 },
        });
        for (int i = 0; i < 200; i++)
        {
            bdevs.Add(new JsonObject
            {
                ["method"] = "bdev_null_create",
                ["params"] = new JsonObject { ["name"] = $"Null{i}", ["num_blocks"] = 1024, ["block_size"] = 512 },
            });
        }

        var config = new JsonObject
        {
            ["subsystems"] = new JsonArray(
                new JsonObject
                {
                    ["subsystem"] = "bdev",
                    ["config"] = bdevs,
                },
                new JsonObject
                {
                    ["subsystem"] = "vhost_blk",
                    ["config"] = new JsonArray(new JsonObject
                    {
                        ["method"] = "vhost_create_blk_controller",
                        ["params"] = new JsonObject { ["ctrlr"] = "vhost.0", ["dev_name"] = "Malloc0" },
                    }),
                }),
        };
        File.WriteAllText(path, config.ToJsonString());
        return path;
    }

    private Socket BindNotifySocket()
    {
        var s = new Socket(AddressFamily.Unix, SocketType.Dgram, ProtocolType.Unspecified);
        s.Bind(new UnixDomainSocketEndPoint(Path.Combine(_dir, "notify")));
        return s;
    }

    private Process StartDaemon(string config, params string[] extra)
    {
        var psi = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (string a in (string[])[Daemon, "-S", _dir, "-r", Path.Combine(_dir, "rpc.sock"), "-c", config, .. extra])
        {
            psi.ArgumentList.Add(a);
        }

        psi.Environment["NOTIFY_SOCKET"] = Path.Combine(_dir, "notify");
        return Process.Start(psi)!;
    }

    private static StringBuilder CollectOutput(Process p)
    {
        var text = new StringBuilder();
        p.OutputDataReceived += (_, e) =>
        {
            lock (text)
            {
                text.AppendLine(e.Data);
            }
        };
        p.ErrorDataReceived += (_, e) =>
        {
            lock (text)
            {
                text.AppendLine(e.Data);
            }
        };
        p.BeginOutputReadLine();
        p.BeginErrorReadLine();
        return text;
    }

    /// <summary>The next notification datagram; fails if the daemon exits first or nothing comes within 60 s.</summary>
    private static async Task<string> ReceiveAsync(Socket notify, Process daemon, StringBuilder output)
    {
        var buffer = new byte[4096];
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(60));
        var receive = notify.ReceiveAsync(buffer, SocketFlags.None, cts.Token).AsTask();
        var exited = daemon.WaitForExitAsync(cts.Token);
        var first = await Task.WhenAny(receive, exited);
        if (first != receive)
        {
            await cts.CancelAsync();
            Assert.Fail($"vhostd exited ({(daemon.HasExited ? daemon.ExitCode : -1)}) or timed out before a notification\n{output}");
        }

        return Encoding.UTF8.GetString(buffer, 0, await receive).Trim();
    }

    private static async Task SendSignalAsync(Process daemon, string signal)
    {
        using var kill = Process.Start("kill", ["-" + signal, daemon.Id.ToString(CultureInfo.InvariantCulture)]);
        await kill.WaitForExitAsync();
        Assert.Equal(0, kill.ExitCode);
    }

    /// <summary>Octal permission bits and gid of a file, from stat(1).</summary>
    internal static async Task<(string Mode, uint Gid)> StatAsync(string path)
    {
        var psi = new ProcessStartInfo("stat", ["-c", "%a %g", path]) { RedirectStandardOutput = true, UseShellExecute = false };
        using var p = Process.Start(psi)!;
        string text = await p.StandardOutput.ReadToEndAsync();
        await p.WaitForExitAsync();
        Assert.Equal(0, p.ExitCode);
        string[] parts = text.Trim().Split(' ');
        return (parts[0], uint.Parse(parts[1], CultureInfo.InvariantCulture));
    }
}
