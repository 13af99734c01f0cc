using System.Text.Json.Nodes;
using Xunit;

namespace VhostBackend.Rpc.Tests;

/// <summary>The framework methods (SPDK lib/rpc, lib/init, lib/event app_rpc): results, shapes and param errors.</summary>
public sealed class FrameworkMethodTests
{
    [Fact]
    public async Task RpcGetMethodsListsEveryIssueMethodAndHonoursCurrent()
    {
        await using var app = await TestApp.StartAsync();
        await using var c = await app.ConnectAsync();
        var all = ((JsonArray)await c.ResultAsync("rpc_get_methods")).Select(n => (string)n!).ToHashSet();
        foreach (var m in new[]
        {
            "rpc_get_methods", "spdk_get_version", "framework_get_reactors", "thread_get_stats", "bdev_get_bdevs",
            "bdev_get_iostat", "bdev_set_qos_limit", "bdev_malloc_create", "bdev_malloc_delete", "bdev_null_create",
            "bdev_null_delete", "bdev_aio_create", "bdev_aio_delete", "bdev_uring_create", "bdev_uring_delete",
            "bdev_null_resize", "vhost_create_blk_controller", "vhost_get_controllers", "vhost_delete_controller",
            "vhost_controller_set_coalescing", "framework_get_subsystems", "framework_get_config",
            "framework_wait_init", "framework_start_init",
        })
        {
            Assert.Contains(m, all);
        }

        // In RUNTIME, current=true leaves out startup-only methods.
        var current = ((JsonArray)await c.ResultAsync("rpc_get_methods", new JsonObject { ["current"] = true })).Select(n => (string)n!).ToHashSet();
        Assert.DoesNotContain("framework_start_init", current);
        Assert.DoesNotContain("bdev_set_options", current);
        Assert.Contains("bdev_get_bdevs", current);
        Assert.True(current.IsSubsetOf(all));

        // SPDK: rpc_get_methods decode failure is -32602.
        await c.ErrorAsync("rpc_get_methods", new JsonObject { ["current"] = "yes" }, -32602);
        await c.ErrorAsync("rpc_get_methods", new JsonObject { ["bogus"] = true }, -32602);
    }

    [Fact]
    public async Task SpdkGetVersionHasSpdkShapeAndRejectsParams()
    {
        await using var app = await TestApp.StartAsync();
        await using var c = await app.ConnectAsync();
        var v = await c.ResultAsync("spdk_get_version");
        var fields = v["fields"]!;
        Assert.Equal($"{ProductVersion.Name} v{(int)fields["major"]!}.{(int)fields["minor"]!}.{(int)fields["patch"]!}{(string)fields["suffix"]!}", (string?)v["version"]);
        await c.ErrorAsync("spdk_get_version", new JsonObject { ["x"] = 1 }, -32602);
    }

    [Fact]
    public async Task FrameworkGetReactorsAndThreadGetStatsDescribeTheReactors()
    {
        await using var app = await TestApp.StartAsync();
        await using var c = await app.ConnectAsync();
        var r = await c.ResultAsync("framework_get_reactors");
        Assert.True((long)r["tick_rate"]! > 0);
        Assert.Equal(Environment.ProcessId, (int)r["pid"]!);
        var reactors = (JsonArray)r["reactors"]!;
        Assert.Equal(app.App.Reactors.Reactors.Count, reactors.Count);
        var r0 = reactors[0]!;
        Assert.Equal(0, (int)r0["lcore"]!);
        Assert.True((long)r0["busy"]! >= 0 && (long)r0["idle"]! >= 0);
        Assert.True((bool)r0["in_interrupt"]!); // the test app runs its reactor in interrupt mode
        var lw = (JsonArray)r0["lw_threads"]!;
        Assert.Equal("1", (string?)lw[0]!["cpumask"]);
        Assert.False(string.IsNullOrEmpty((string?)lw[0]!["name"]));

        var t = await c.ResultAsync("thread_get_stats");
        var threads = (JsonArray)t["threads"]!;
        Assert.Equal(reactors.Count, threads.Count);
        Assert.Equal((string?)lw[0]!["name"], (string?)threads[0]!["name"]);
        foreach (var key in new[] { "id", "cpumask", "busy", "idle", "active_pollers_count", "timed_pollers_count", "paused_pollers_count" })
        {
            Assert.NotNull(threads[0]![key]);
        }

        await c.ErrorAsync("framework_get_reactors", new JsonObject { ["x"] = 1 }, -32602);
        await c.ErrorAsync("thread_get_stats", new JsonObject { ["x"] = 1 }, -32602);
    }

    [Fact]
    public async Task FrameworkGetSubsystemsAndGetConfig()
    {
        await using var app = await TestApp.StartAsync();
        await using var c = await app.ConnectAsync();
        var subs = (JsonArray)await c.ResultAsync("framework_get_subsystems");
        var names = subs.Select(s => (string)s!["subsystem"]!).ToList();
        Assert.Contains("bdev", names);
        Assert.Contains("vhost_blk", names);
        Assert.True(names.IndexOf("bdev") < names.IndexOf("vhost_blk"), "dependencies first");
        var vhostBlk = subs.First(s => (string)s!["subsystem"]! == "vhost_blk")!;
        Assert.Contains("bdev", ((JsonArray)vhostBlk["depends_on"]!).Select(d => (string)d!));

        await c.ResultAsync("bdev_malloc_create", new JsonObject { ["name"] = "M", ["num_blocks"] = 32, ["block_size"] = 512 });
        var bdevCfg = (JsonArray)await c.ResultAsync("framework_get_config", new JsonObject { ["name"] = "bdev" });
        var create = bdevCfg.Single(e => (string)e!["method"]! == "bdev_malloc_create")!;
        Assert.Equal("M", (string?)create["params"]!["name"]);
        Assert.Equal(32, (long)create["params"]!["num_blocks"]!);

        Assert.Equal("Subsystem 'nope' not found", await c.ErrorAsync("framework_get_config", new JsonObject { ["name"] = "nope" }, -32602));
        Assert.StartsWith("Invalid arguments", await c.ErrorAsync("framework_get_config", null, -32602));
        await c.ErrorAsync("framework_get_config", new JsonObject { ["name"] = 5 }, -32602);
        await c.ErrorAsync("framework_get_config", new JsonObject { ["name"] = "bdev", ["bogus"] = 1 }, -32602);
        await c.ErrorAsync("framework_get_subsystems", new JsonObject { ["x"] = 1 }, -32602);
    }

    [Fact]
    public async Task InRuntimeStartInitIsAStateErrorAndWaitInitReturnsAtOnce()
    {
        await using var app = await TestApp.StartAsync();
        await using var c = await app.ConnectAsync();
        Assert.StartsWith("Method may only be called before framework is initialized", await c.ErrorAsync("framework_start_init", null, -1));
        Assert.True((bool)(await c.ResultAsync("framework_wait_init"))!);
    }
}
