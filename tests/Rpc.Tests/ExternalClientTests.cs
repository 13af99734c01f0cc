using System.Diagnostics;
using System.Text.Json.Nodes;
using Xunit;

namespace VhostBackend.Rpc.Tests;

/// <summary>
/// Out-of-process clients against the in-process daemon: an rpc.py-style Python client (python3 required)
/// and the built vhostctl (tables, --json, -s, error messages and exit codes).
/// </summary>
public sealed class ExternalClientTests
{
    private static readonly string OutDir = AppContext.BaseDirectory;

    [Fact]
    public async Task RpcPyStyleClientTalksToTheServer()
    {
        // scripts/install-deps.sh installs python3: its absence is a broken setup, not a reason to pass.
        string? python = FindOnPath("python3");
        Assert.True(python is not null, "python3 is not on PATH (scripts/install-deps.sh installs it)");

        await using var app = await TestApp.StartAsync();
        var (code, stdout, stderr) = await RunAsync(python, Path.Combine(OutDir, "spdk_rpc_client.py"), app.RpcSocket,
            "spdk_get_version",
            "bdev_malloc_create", """{"name": "Py0", "num_blocks": 64, "block_size": 512}""",
            "bdev_get_bdevs", """{"name": "Py0"}""",
            "bdev_get_bdevs", """{"name": "missing"}""",
            "framework_get_config", """{"name": "bdev"}""");
        Assert.True(code == 0, stderr);
        var lines = stdout.Split('\n', StringSplitOptions.RemoveEmptyEntries).Select(l => JsonNode.Parse(l)!.AsObject()).ToList();
        Assert.Equal(5, lines.Count);
        Assert.StartsWith(ProductVersion.Name, (string?)lines[0]["result"]!["version"]);
        Assert.Equal("Py0", (string?)lines[1]["result"]);
        Assert.Equal(64, (long)lines[2]["result"]![0]!["num_blocks"]!);
        Assert.Equal(-19, (int)lines[3]["error"]!["code"]!);
        Assert.Contains(lines[4]["result"]!.AsArray(), e => (string?)e!["method"] == "bdev_malloc_create" && (string?)e["params"]!["name"] == "Py0");
    }

    [Fact]
    public async Task VhostctlPrintsTablesJsonAndErrors()
    {
        await using var app = await TestApp.StartAsync();
        string cli = Path.Combine(OutDir, "VhostBackend.Cli.dll");
        Assert.True(File.Exists(cli), $"vhostctl not built next to the tests: {cli}");
        string s = app.RpcSocket;

        var create = await RunAsync("dotnet", cli, "-s", s, "bdev_malloc_create", "-b", "Cli0", "8", "512");
        Assert.True(create.Code == 0, create.Stderr);
        Assert.Equal("Cli0", create.Stdout.Trim()); // like rpc.py: the created name, bare

        var table = await RunAsync("dotnet", cli, "bdev_get_bdevs", "-s", s);
        Assert.True(table.Code == 0, table.Stderr);
        var rows = table.Stdout.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.StartsWith("name", rows[0]);
        Assert.Contains("block_size", rows[0]);
        Assert.Contains(rows.Skip(1), r => r.StartsWith("Cli0 ", StringComparison.Ordinal) && r.Contains("16384") && r.Contains("Malloc disk"));

        var json = await RunAsync("dotnet", cli, "-s", s, "--json", "bdev_get_bdevs", "-b", "Cli0");
        Assert.True(json.Code == 0, json.Stderr);
        var parsed = JsonNode.Parse(json.Stdout)!.AsArray();
        Assert.Equal(512, (int)parsed.Single()!["block_size"]!);

        // A method error: message on stderr with SPDK's code, exit code 1, nothing on stdout.
        var missing = await RunAsync("dotnet", cli, "-s", s, "bdev_malloc_delete", "nope");
        Assert.Equal(1, missing.Code);
        Assert.Contains("-19", missing.Stderr);
        Assert.Contains("No such device", missing.Stderr);
        Assert.Equal("", missing.Stdout.Trim());

        // No daemon at the socket: a clear message, exit code 1.
        var down = await RunAsync("dotnet", cli, "-s", Path.Combine(app.Dir, "nobody.sock"), "spdk_get_version");
        Assert.Equal(1, down.Code);
        Assert.Contains("cannot connect", down.Stderr);

        // save_config prints a config the daemon itself would save.
        var save = await RunAsync("dotnet", cli, "-s", s, "save_config");
        Assert.True(save.Code == 0, save.Stderr);
        await using var c = await app.ConnectAsync();
        Assert.True(JsonNode.DeepEquals(JsonNode.Parse(save.Stdout), await ConfigRoundTripTests.SaveConfigAsync(c)));
    }

    [Fact]
    public async Task VhostctlDrivesEveryLvolVerb()
    {
        await using var app = await TestApp.StartAsync();
        string cli = Path.Combine(OutDir, "VhostBackend.Cli.dll");
        string s = app.RpcSocket;
        async Task<string> Ok(params string[] args)
        {
            var r = await RunAsync("dotnet", [cli, "-s", s, .. args]);
            Assert.True(r.Code == 0, $"vhostctl {string.Join(' ', args)}: {r.Stderr}");
            return r.Stdout;
        }

        await Ok("bdev_malloc_create", "-b", "LM0", "64", "512");
        string uuid = (await Ok("bdev_lvol_create_lvstore", "LM0", "lvs0", "-c", "1048576")).Trim().Trim('"');
        Assert.True(Guid.TryParse(uuid, out _), uuid);
        await Ok("bdev_lvol_create", "v0", "8", "-t", "-l", "lvs0");
        await Ok("bdev_lvol_create", "v1", "4", "-u", uuid, "-c", "none");
        await Ok("bdev_lvol_snapshot", "lvs0/v0", "s0");
        await Ok("bdev_lvol_clone", "lvs0/s0", "c0");
        await Ok("bdev_lvol_rename", "lvs0/v1", "v2");
        await Ok("bdev_lvol_resize", "lvs0/v2", "6");
        await Ok("bdev_lvol_set_read_only", "lvs0/v2");
        await Ok("bdev_malloc_create", "-b", "LD0", "8", "512");
        string started = await Ok("bdev_lvol_start_shallow_copy", "lvs0/v2", "LD0");
        string opId = System.Text.RegularExpressions.Regex.Match(started, "operation_id\\D+(\\d+)").Groups[1].Value;
        Assert.False(string.IsNullOrEmpty(opId), started);
        string copyState = "";
        for (int i = 0; i < 300; i++)
        {
            copyState = await Ok("bdev_lvol_check_shallow_copy", opId);
            if (!copyState.Contains("in progress", StringComparison.Ordinal))
            {
                break;
            }
            await Task.Delay(100);
        }
        Assert.Contains("complete", copyState, StringComparison.Ordinal);
        await Ok("bdev_lvol_inflate", "lvs0/c0");
        await Ok("bdev_lvol_decouple_parent", "lvs0/v0");
        await Ok("bdev_lvol_delete", "lvs0/c0");
        string table = await Ok("bdev_lvol_get_lvols", "-l", "lvs0");
        Assert.Contains(table.Split('\n'), l => l.StartsWith("lvs0/v2 ", StringComparison.Ordinal));
        Assert.DoesNotContain("lvs0/c0", table);
        await Ok("bdev_lvol_rename_lvstore", "lvs0", "lvs1");
        string stores = await Ok("bdev_lvol_get_lvstores");
        Assert.Contains(stores.Split('\n'), l => l.StartsWith("lvs1 ", StringComparison.Ordinal) && l.Contains("LM0"));
        var bad = await RunAsync("dotnet", cli, "-s", s, "bdev_lvol_create", "v0", "8", "-l", "lvs1");
        Assert.Equal(1, bad.Code);
        Assert.Contains("File exists", bad.Stderr + bad.Stdout);
        await Ok("bdev_lvol_delete_lvstore", "-l", "lvs1");
        Assert.Equal("[]", JsonNode.Parse(await Ok("--json", "bdev_lvol_get_lvstores"))!.ToJsonString());
    }

    [Fact]
    public async Task VhostctlDrivesEveryVirtualBdevVerb()
    {
        await using var app = await TestApp.StartAsync();
        string cli = Path.Combine(OutDir, "VhostBackend.Cli.dll");
        string s = app.RpcSocket;
        async Task<string> Ok(params string[] args)
        {
            var r = await RunAsync("dotnet", [cli, "-s", s, .. args]);
            Assert.True(r.Code == 0, $"vhostctl {string.Join(' ', args)}: {r.Stderr}");
            return r.Stdout;
        }

        await Ok("bdev_malloc_create", "-b", "M1", "8", "512");
        await Ok("bdev_malloc_create", "-b", "M2", "8", "512");
        await Ok("bdev_malloc_create", "-b", "M3", "8", "512");
        await Ok("bdev_raid_create", "-n", "R0", "-r", "raid0", "-z", "64", "-b", "M1 M2");
        string table = await Ok("bdev_raid_get_bdevs", "all");
        Assert.Contains(table.Split('\n'), l => l.StartsWith("R0 ", StringComparison.Ordinal) && l.Contains("online") && l.Contains("raid0"));
        await Ok("bdev_passthru_create", "-b", "R0", "-p", "P0");
        await Ok("bdev_error_create", "P0");
        await Ok("bdev_error_inject_error", "EE_P0", "write", "failure", "-n", "3");
        await Ok("bdev_delay_create", "-b", "M3", "-d", "D0", "-r", "100", "--p99_read_latency", "200", "-w", "100", "-n", "200");
        await Ok("bdev_delay_update_latency", "D0", "avg_read", "150");
        Assert.Equal(["D0p0", "D0p1"], JsonNode.Parse(await Ok("bdev_split_create", "D0", "2"))!.AsArray().Select(n => (string)n!));

        await using var c = await app.ConnectAsync();
        var names = ((JsonArray)await c.ResultAsync("bdev_get_bdevs")).Select(b => (string)b!["name"]!).ToHashSet();
        Assert.Superset(new HashSet<string> { "R0", "P0", "EE_P0", "D0", "D0p0", "D0p1" }, names);
        var delay = ((JsonArray)await c.ResultAsync("bdev_get_bdevs", new JsonObject { ["name"] = "D0" }))[0]!["driver_specific"]!["delay"]!;
        Assert.Equal(150, (long)delay["avg_read_latency"]!);

        // A bad verb argument is caught before the call; a refused call exits 1 with SPDK's code.
        var bad = await RunAsync("dotnet", cli, "-s", s, "bdev_raid_create", "-n", "R1", "-r", "raid1", "-b", "M1");
        Assert.Equal(1, bad.Code);
        Assert.NotEqual("", bad.Stderr.Trim());

        await Ok("bdev_split_delete", "D0");
        await Ok("bdev_delay_delete", "D0");
        await Ok("bdev_error_delete", "EE_P0");
        await Ok("bdev_passthru_delete", "P0");
        await Ok("bdev_raid_remove_base_bdev", "M2");
        await Ok("bdev_raid_delete", "R0");
        names = ((JsonArray)await c.ResultAsync("bdev_get_bdevs")).Select(b => (string)b!["name"]!).ToHashSet();
        Assert.Equal(new HashSet<string> { "M1", "M2", "M3" }, names);
    }

    [Fact]
    public async Task VhostctlLoadConfigReplaysIntoAWaitForRpcDaemon()
    {
        string cli = Path.Combine(OutDir, "VhostBackend.Cli.dll");
        JsonObject saved;
        string configFile;
        await using (var source = await TestApp.StartAsync())
        {
            await using var c = await source.ConnectAsync();
            await c.ResultAsync("bdev_null_create", new JsonObject { ["name"] = "L0", ["num_blocks"] = 64, ["block_size"] = 512 });
            await c.ResultAsync("bdev_set_qos_limit", new JsonObject { ["name"] = "L0", ["r_mbytes_per_sec"] = 7 });
            await c.ResultAsync("vhost_create_blk_controller", new JsonObject { ["ctrlr"] = "lc", ["dev_name"] = "L0" });
            saved = await ConfigRoundTripTests.SaveConfigAsync(c);
            configFile = Path.Combine(Path.GetTempPath(), $"rpct-{Guid.NewGuid():N}.json");
            await File.WriteAllTextAsync(configFile, saved.ToJsonString());
        }

        try
        {
            await using var target = await TestApp.StartAsync(waitForRpc: true);
            var load = await RunAsync("dotnet", cli, "-s", target.RpcSocket, "load_config", "-j", configFile);
            Assert.True(load.Code == 0, load.Stderr);
            Assert.Equal(VhostBackend.Rpc.RpcStates.Runtime, target.App.Dispatcher.State);
            await using var c = await target.ConnectAsync();
            Assert.True(JsonNode.DeepEquals(saved, await ConfigRoundTripTests.SaveConfigAsync(c)));

            // Loading the same config again fails on the first duplicate, with the method's error and exit code 1.
            var again = await RunAsync("dotnet", cli, "-s", target.RpcSocket, "load_config", "-j", configFile);
            Assert.Equal(1, again.Code);
            Assert.Contains("-17", again.Stderr);
        }
        finally
        {
            File.Delete(configFile);
        }
    }

    internal static string? FindOnPath(string name) =>
        (Environment.GetEnvironmentVariable("PATH") ?? "").Split(':').Select(d => Path.Combine(d, name)).FirstOrDefault(File.Exists);

    internal static async Task<(int Code, string Stdout, string Stderr)> RunAsync(string exe, params string[] args)
    {
        var psi = new ProcessStartInfo(exe) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (var a in args)
        {
            psi.ArgumentList.Add(a);
        }

        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(30));
        try
        {
            await p.WaitForExitAsync(cts.Token);
        }
        catch (OperationCanceledException)
        {
            p.Kill(entireProcessTree: true);
            throw;
        }

        return (p.ExitCode, await stdout, await stderr);
    }
}
