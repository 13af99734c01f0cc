using System.Text.Json.Nodes;
using Xunit;

namespace VhostBackend.Rpc.Tests;

/// <summary>--wait-for-rpc: the STARTUP state (SPDK lib/rpc state masks, error -1 with SPDK's messages), then framework_start_init.</summary>
public sealed class WaitForRpcTests
{
    [Fact]
    public async Task StartupStateGatesMethodsUntilFrameworkStartInit()
    {
        await using var app = await TestApp.StartAsync(waitForRpc: true);
        await using var c = await app.ConnectAsync();

        // Runtime-only methods are refused with SPDK's INVALID_STATE (-1) and message.
        Assert.Equal(RpcDispatcher.NotInitializedMessage, await c.ErrorAsync("bdev_get_bdevs", null, -1));
        Assert.Equal(RpcDispatcher.NotInitializedMessage, await c.ErrorAsync("bdev_malloc_create", new JsonObject { ["num_blocks"] = 8, ["block_size"] = 512 }, -1));
        Assert.Equal(RpcDispatcher.NotInitializedMessage, await c.ErrorAsync("framework_get_config", new JsonObject { ["name"] = "bdev" }, -1));
        // Unknown methods are still -32601, not a state error.
        await c.ErrorAsync("no_such_method", null, -32601);

        // Startup and both-state methods work.
        var current = ((JsonArray)await c.ResultAsync("rpc_get_methods", new JsonObject { ["current"] = true })).Select(n => (string)n!).ToHashSet();
        Assert.Contains("framework_start_init", current);
        Assert.Contains("bdev_set_options", current);
        Assert.DoesNotContain("bdev_get_bdevs", current);
        Assert.NotNull(await c.ResultAsync("spdk_get_version"));
        Assert.True((bool)(await c.ResultAsync("bdev_set_options", new JsonObject { ["bdev_auto_examine"] = true }))!);
        await c.ErrorAsync("framework_start_init", new JsonObject { ["x"] = 1 }, -32602);

        // framework_wait_init from another client blocks until init; it must not block this connection or the reactor.
        await using var waiter = await app.ConnectAsync();
        var wait = waiter.CallAsync("framework_wait_init");
        await Task.Delay(200);
        Assert.False(wait.IsCompleted, "framework_wait_init returned before framework_start_init");

        Assert.True((bool)(await c.ResultAsync("framework_start_init"))!);
        var waited = await wait.WaitAsync(TimeSpan.FromSeconds(5));
        Assert.True((bool)waited["result"]!);

        // Now RUNTIME: roles reversed.
        Assert.Empty((JsonArray)await c.ResultAsync("bdev_get_bdevs"));
        Assert.Equal(RpcDispatcher.AlreadyInitializedMessage, await c.ErrorAsync("framework_start_init", null, -1));
        Assert.Equal(RpcDispatcher.AlreadyInitializedMessage, await c.ErrorAsync("bdev_set_options", new JsonObject(), -1));
    }

    [Fact]
    public async Task ConfigGivenWithWaitForRpcRunsItsRuntimePartAfterStartInit()
    {
        var config = new JsonObject
        {
            ["subsystems"] = new JsonArray(new JsonObject
            {
                ["subsystem"] = "bdev",
                ["config"] = new JsonArray(
                    new JsonObject { ["method"] = "bdev_set_options", ["params"] = new JsonObject { ["bdev_auto_examine"] = true } },
                    new JsonObject { ["method"] = "bdev_null_create", ["params"] = new JsonObject { ["name"] = "Late", ["num_blocks"] = 8, ["block_size"] = 512 } }),
            }),
        };
        await using var app = await TestApp.StartAsync(waitForRpc: true, config: config);
        await using var c = await app.ConnectAsync();
        Assert.Empty(app.App.Bdevs.All);
        await c.ResultAsync("framework_start_init");
        // framework_wait_init returns once the whole config is in (SPDK: Runtime only after the config file is loaded).
        Assert.True((bool)(await c.ResultAsync("framework_wait_init"))!);
        Assert.NotNull(app.App.Bdevs.Find("Late"));
        Assert.Equal("Late", (string?)((JsonArray)await c.ResultAsync("bdev_get_bdevs"))[0]!["name"]);
    }
}
