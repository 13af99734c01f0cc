using System.Text.Json;
using System.Text.Json.Nodes;
using Xunit;

namespace VhostBackend.Rpc.Tests;

/// <summary>
/// bdev_passthru_*, bdev_delay_* and bdev_error_* over the real socket, with SPDK v24.01's params, results and error
/// codes, and the save_config round trip (vbdev calls before their bases, a vbdev still waiting for its base).
/// </summary>
public sealed class VbdevSimpleMethodTests
{
    private const int DecodeFailed = -32603;
    private const int InvalidParams = -32602;
    private const int EPERM = -1;
    private const int EEXIST = -17;
    private const int ENODEV = -19;
    private const int EINVAL = -22;

    private static JsonObject Malloc(string name) => new() { ["name"] = name, ["num_blocks"] = 256, ["block_size"] = 512 };

    private static async Task<JsonNode> GetBdev(RawClient c, string name) => ((JsonArray)await c.ResultAsync("bdev_get_bdevs", new JsonObject { ["name"] = name }))[0]!;

    [Fact]
    public async Task PassthruCreateGetDelete()
    {
        await using var app = await TestApp.StartAsync();
        await using var c = await app.ConnectAsync();
        await c.ResultAsync("bdev_malloc_create", Malloc("M"));
        var uuid = Guid.NewGuid().ToString();
        Assert.Equal("PT", (string?)await c.ResultAsync("bdev_passthru_create", new JsonObject { ["base_bdev_name"] = "M", ["name"] = "PT", ["uuid"] = uuid }));

        var b = await GetBdev(c, "PT");
        Assert.Equal("passthru", (string?)b["product_name"]);
        Assert.Equal(uuid, (string?)b["uuid"]);
        Assert.Equal(256, (long)b["num_blocks"]!);
        Assert.Equal("M", (string?)b["driver_specific"]!["passthru"]!["base_bdev_name"]);
        Assert.Equal("PT", (string?)b["driver_specific"]!["passthru"]!["name"]);
        Assert.True((bool)(await GetBdev(c, "M"))["claimed"]!);

        // SPDK: a taken name -EEXIST, a claimed base -EPERM (strerror texts); decoding failures -32603.
        Assert.StartsWith("File exists: ", await c.ErrorAsync("bdev_passthru_create", new JsonObject { ["base_bdev_name"] = "M", ["name"] = "PT" }, EEXIST));
        Assert.StartsWith("Operation not permitted: ", await c.ErrorAsync("bdev_passthru_create", new JsonObject { ["base_bdev_name"] = "M", ["name"] = "PT2" }, EPERM));
        Assert.StartsWith("spdk_json_decode_object failed", await c.ErrorAsync("bdev_passthru_create", new JsonObject { ["name"] = "X" }, DecodeFailed));
        await c.ErrorAsync("bdev_passthru_create", new JsonObject { ["base_bdev_name"] = "M", ["name"] = "X", ["bogus"] = 1 }, DecodeFailed);
        await c.ErrorAsync("bdev_passthru_create", new JsonObject { ["base_bdev_name"] = "M", ["name"] = "X", ["uuid"] = "not-a-uuid" }, DecodeFailed);
        await c.ErrorAsync("bdev_passthru_create", new JsonObject { ["base_bdev_name"] = 5, ["name"] = "X" }, DecodeFailed);

        // A missing base is not an error: the vbdev appears with it.
        Assert.Equal("PT3", (string?)await c.ResultAsync("bdev_passthru_create", new JsonObject { ["base_bdev_name"] = "Later", ["name"] = "PT3" }));
        await c.ErrorAsync("bdev_get_bdevs", new JsonObject { ["name"] = "PT3" }, ENODEV);
        await c.ResultAsync("bdev_malloc_create", Malloc("Later"));
        Assert.Equal("Later", (string?)(await GetBdev(c, "PT3"))["driver_specific"]!["passthru"]!["base_bdev_name"]);

        Assert.StartsWith("No such device: ", await c.ErrorAsync("bdev_passthru_delete", new JsonObject { ["name"] = "nope" }, ENODEV));
        await c.ErrorAsync("bdev_passthru_delete", new JsonObject { ["name"] = "M" }, ENODEV); // not a passthru bdev
        await c.ErrorAsync("bdev_passthru_delete", new JsonObject(), DecodeFailed);
        Assert.True((bool)(await c.ResultAsync("bdev_passthru_delete", new JsonObject { ["name"] = "PT" }))!);
        Assert.False((bool)(await GetBdev(c, "M"))["claimed"]!);
        await c.ErrorAsync("bdev_passthru_delete", new JsonObject { ["name"] = "PT" }, ENODEV);
    }

    [Fact]
    public async Task DelayCreateUpdateDelete()
    {
        await using var app = await TestApp.StartAsync();
        await using var c = await app.ConnectAsync();
        await c.ResultAsync("bdev_malloc_create", Malloc("M"));
        var create = new JsonObject
        {
            ["base_bdev_name"] = "M", ["name"] = "D",
            ["avg_read_latency"] = 100, ["p99_read_latency"] = 1000, ["avg_write_latency"] = 200, ["p99_write_latency"] = 2000,
        };
        Assert.Equal("D", (string?)await c.ResultAsync("bdev_delay_create", create.DeepClone()));
        var ds = (await GetBdev(c, "D"))["driver_specific"]!["delay"]!;
        Assert.Equal("M", (string?)ds["base_bdev_name"]);
        Assert.Equal(100, (long)ds["avg_read_latency"]!);
        Assert.Equal(2000, (long)ds["p99_write_latency"]!);
        Assert.Equal((string?)(await GetBdev(c, "D"))["uuid"], (string?)ds["uuid"]);
        Assert.Equal("delay", (string?)(await GetBdev(c, "D"))["product_name"]);

        // Every latency is required; p99 below average is -EINVAL.
        var missing = (JsonObject)create.DeepClone();
        missing["name"] = "D2";
        missing.Remove("p99_write_latency");
        Assert.StartsWith("spdk_json_decode_object failed", await c.ErrorAsync("bdev_delay_create", missing, DecodeFailed));
        var negative = (JsonObject)create.DeepClone();
        negative["name"] = "D2";
        negative["avg_read_latency"] = -1;
        await c.ErrorAsync("bdev_delay_create", negative, DecodeFailed);
        var inverted = (JsonObject)create.DeepClone();
        inverted["name"] = "D2";
        inverted["p99_read_latency"] = 10;
        Assert.StartsWith("Invalid argument: ", await c.ErrorAsync("bdev_delay_create", inverted, EINVAL));
        Assert.StartsWith("File exists: ", await c.ErrorAsync("bdev_delay_create", create.DeepClone(), EEXIST));

        // update_latency: SPDK's own codes and texts.
        Assert.True((bool)(await c.ResultAsync("bdev_delay_update_latency", new JsonObject { ["delay_bdev_name"] = "D", ["latency_type"] = "avg_read", ["latency_us"] = 555 }))!);
        Assert.Equal(555, (long)(await GetBdev(c, "D"))["driver_specific"]!["delay"]!["avg_read_latency"]!);
        Assert.Equal("Please specify a valid latency type.", await c.ErrorAsync("bdev_delay_update_latency", new JsonObject { ["delay_bdev_name"] = "D", ["latency_type"] = "avg", ["latency_us"] = 1 }, InvalidParams));
        Assert.Equal("The requested bdev does not exist.", await c.ErrorAsync("bdev_delay_update_latency", new JsonObject { ["delay_bdev_name"] = "nope", ["latency_type"] = "p99_write", ["latency_us"] = 1 }, InvalidParams));
        await c.ErrorAsync("bdev_delay_update_latency", new JsonObject { ["delay_bdev_name"] = "M", ["latency_type"] = "p99_write", ["latency_us"] = 1 }, InvalidParams);
        await c.ErrorAsync("bdev_delay_update_latency", new JsonObject { ["delay_bdev_name"] = "D", ["latency_type"] = "avg_read" }, DecodeFailed);

        await c.ErrorAsync("bdev_delay_delete", new JsonObject { ["name"] = "M" }, ENODEV);
        Assert.True((bool)(await c.ResultAsync("bdev_delay_delete", new JsonObject { ["name"] = "D" }))!);
        Assert.StartsWith("No such device: ", await c.ErrorAsync("bdev_delay_delete", new JsonObject { ["name"] = "D" }, ENODEV));
    }

    [Fact]
    public async Task ErrorCreateInjectDelete()
    {
        await using var app = await TestApp.StartAsync();
        await using var c = await app.ConnectAsync();
        await c.ResultAsync("bdev_malloc_create", Malloc("M"));
        Assert.True((bool)(await c.ResultAsync("bdev_error_create", new JsonObject { ["base_name"] = "M" }))!);
        var b = await GetBdev(c, "EE_M");
        Assert.Equal("Error Injection Disk", (string?)b["product_name"]);
        Assert.Equal("M", (string?)b["driver_specific"]!["error_disk"]!["base_bdev"]);
        Assert.StartsWith("File exists: ", await c.ErrorAsync("bdev_error_create", new JsonObject { ["base_name"] = "M" }, EEXIST));
        await c.ErrorAsync("bdev_error_create", new JsonObject { ["name"] = "M" }, DecodeFailed);

        JsonObject Inject(string ioType, string errorType) => new() { ["name"] = "EE_M", ["io_type"] = ioType, ["error_type"] = errorType };
        foreach (var io in new[] { "read", "write", "unmap", "flush", "all", "clear" })
        {
            Assert.True((bool)(await c.ResultAsync("bdev_error_inject_error", Inject(io, "failure")))!);
        }

        foreach (var et in new[] { "failure", "pending", "nomem" })
        {
            Assert.True((bool)(await c.ResultAsync("bdev_error_inject_error", Inject("read", et)))!);
        }

        var full = Inject("write", "corrupt_data");
        full["num"] = 3;
        full["queue_depth"] = 4;
        full["corrupt_offset"] = 17;
        full["corrupt_value"] = 255;
        Assert.True((bool)(await c.ResultAsync("bdev_error_inject_error", full))!);

        // Unknown words in io_type / error_type fail the decode (SPDK's custom decoders); so do unknown or bad params.
        Assert.StartsWith("spdk_json_decode_object failed", await c.ErrorAsync("bdev_error_inject_error", Inject("write_zeroes", "failure"), DecodeFailed));
        await c.ErrorAsync("bdev_error_inject_error", Inject("read", "timeout"), DecodeFailed);
        await c.ErrorAsync("bdev_error_inject_error", new JsonObject { ["name"] = "EE_M", ["io_type"] = "read" }, DecodeFailed);
        var big = Inject("read", "corrupt_data");
        big["corrupt_value"] = 256;
        await c.ErrorAsync("bdev_error_inject_error", big, DecodeFailed);
        var extra = Inject("read", "failure");
        extra["bogus"] = true;
        await c.ErrorAsync("bdev_error_inject_error", extra, DecodeFailed);

        // corrupt_data needs a non-zero value (-EINVAL); the name must be an error bdev (-ENODEV).
        Assert.StartsWith("Invalid argument: ", await c.ErrorAsync("bdev_error_inject_error", Inject("read", "corrupt_data"), EINVAL));
        Assert.StartsWith("No such device: ", await c.ErrorAsync("bdev_error_inject_error", new JsonObject { ["name"] = "nope", ["io_type"] = "read", ["error_type"] = "failure" }, ENODEV));
        await c.ErrorAsync("bdev_error_inject_error", new JsonObject { ["name"] = "M", ["io_type"] = "read", ["error_type"] = "failure" }, ENODEV);

        await c.ErrorAsync("bdev_error_delete", new JsonObject { ["name"] = "M" }, ENODEV);
        Assert.True((bool)(await c.ResultAsync("bdev_error_delete", new JsonObject { ["name"] = "EE_M" }))!);
        Assert.False((bool)(await GetBdev(c, "M"))["claimed"]!);
        await c.ErrorAsync("bdev_error_delete", new JsonObject { ["name"] = "EE_M" }, ENODEV);

        // The config went with the vbdev (SPDK's destruct removes it): the base can get a new one.
        Assert.True((bool)(await c.ResultAsync("bdev_error_create", new JsonObject { ["base_name"] = "M" }))!);
    }

    [Fact]
    public async Task SavedVbdevsReplayIntoAFreshApp()
    {
        JsonObject saved;
        Dictionary<string, Guid> uuids;
        await using (var first = await TestApp.StartAsync())
        {
            await using var c = await first.ConnectAsync();

            // Vbdevs configured before their bases, a delay latency updated, and a passthru still waiting for its base.
            await c.ResultAsync("bdev_passthru_create", new JsonObject { ["base_bdev_name"] = "B1", ["name"] = "PT" });
            await c.ResultAsync("bdev_delay_create", new JsonObject
            {
                ["base_bdev_name"] = "B2", ["name"] = "D",
                ["avg_read_latency"] = 10, ["p99_read_latency"] = 20, ["avg_write_latency"] = 30, ["p99_write_latency"] = 40,
            });
            await c.ResultAsync("bdev_error_create", new JsonObject { ["base_name"] = "B3", ["uuid"] = "11111111-2222-3333-4444-555555555555" });
            await c.ResultAsync("bdev_passthru_create", new JsonObject { ["base_bdev_name"] = "Absent", ["name"] = "Waiting" });
            foreach (var n in new[] { "B1", "B2", "B3" })
            {
                await c.ResultAsync("bdev_malloc_create", Malloc(n));
            }

            await c.ResultAsync("bdev_delay_update_latency", new JsonObject { ["delay_bdev_name"] = "D", ["latency_type"] = "p99_write", ["latency_us"] = 4444 });
            saved = await ConfigRoundTripTests.SaveConfigAsync(c);
            uuids = first.App.Bdevs.All.ToDictionary(b => b.Name, b => b.Uuid);
        }

        // Where SPDK writes them: module-level calls, before the bases' own calls.
        var bdevCalls = saved["subsystems"]!.AsArray().First(s => (string)s!["subsystem"]! == "bdev")!["config"]!.AsArray();
        var methods = bdevCalls.Select(e => (string)e!["method"]!).ToList();
        Assert.True(methods.IndexOf("bdev_passthru_create") < methods.IndexOf("bdev_malloc_create"), string.Join(",", methods));
        Assert.True(methods.IndexOf("bdev_delay_create") < methods.IndexOf("bdev_malloc_create"));
        Assert.True(methods.IndexOf("bdev_error_create") < methods.IndexOf("bdev_malloc_create"));
        var delay = bdevCalls.First(e => (string)e!["method"]! == "bdev_delay_create")!["params"]!;
        Assert.Equal(4444, (long)delay["p99_write_latency"]!);
        Assert.Equal(uuids["D"].ToString(), (string?)delay["uuid"]);
        Assert.Equal("{\"base_name\":\"B3\",\"uuid\":\"11111111-2222-3333-4444-555555555555\"}",
            bdevCalls.First(e => (string)e!["method"]! == "bdev_error_create")!["params"]!.ToJsonString());

        await using var second = await TestApp.StartAsync(config: saved);
        await using (var c = await second.ConnectAsync())
        {
            var again = await ConfigRoundTripTests.SaveConfigAsync(c);
            Assert.True(JsonNode.DeepEquals(saved, again), $"before:\n{saved.ToJsonString()}\nafter:\n{again.ToJsonString()}");
            Assert.Equal(4444, (long)(await GetBdev(c, "D"))["driver_specific"]!["delay"]!["p99_write_latency"]!);
            await c.ErrorAsync("bdev_get_bdevs", new JsonObject { ["name"] = "Waiting" }, ENODEV);
        }

        Assert.Equal(uuids, second.App.Bdevs.All.ToDictionary(b => b.Name, b => b.Uuid));
        foreach (var n in new[] { "B1", "B2", "B3" })
        {
            Assert.NotNull(second.App.Bdevs.Find(n)!.ClaimedBy);
        }
    }
}
