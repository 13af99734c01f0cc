using System.Text.Json;
using System.Text.Json.Nodes;
using Xunit;

namespace VhostBackend.Rpc.Tests;

/// <summary>
/// The split and raid methods over the real socket, against SPDK 24.01's vbdev_split_rpc.c and bdev_raid_rpc.c:
/// split answers every failure with -32602; raid decodes with -32700 "spdk_json_decode_object failed" (add_base_bdev
/// with -32603) and fails with -errno.
/// </summary>
public sealed class RaidSplitMethodTests
{
    private const int ParseError = -32700;
    private const int InvalidParams = -32602;
    private const int InternalError = -32603;
    private const int ENODEV = -19;
    private const int EEXIST = -17;
    private const int EINVAL = -22;
    private const int ENOTSUP = -95;

    private static JsonObject P(params (string Key, JsonNode? Value)[] members)
    {
        var o = new JsonObject();
        foreach (var (k, v) in members)
        {
            o[k] = v;
        }

        return o;
    }

    private static Task Malloc(RawClient c, string name, int blocks, int bs = 512) =>
        c.ResultAsync("bdev_malloc_create", P(("name", name), ("num_blocks", blocks), ("block_size", bs)));

    private static async Task<JsonObject?> Raid(RawClient c, string name, string category = "all")
    {
        foreach (var r in (JsonArray)await c.ResultAsync("bdev_raid_get_bdevs", P(("category", category))))
        {
            if ((string?)r!["name"] == name)
            {
                return r.AsObject();
            }
        }

        return null;
    }

    [Fact]
    public async Task SplitCreateDeleteAndErrors()
    {
        await using var app = await TestApp.StartAsync();
        await using var c = await app.ConnectAsync();
        await Malloc(c, "M", 8192); // 4 MiB
        var parts = (JsonArray)await c.ResultAsync("bdev_split_create", P(("base_bdev", "M"), ("split_count", 3), ("split_size_mb", 1)));
        Assert.Equal(["Mp0", "Mp1", "Mp2"], parts.Select(p => (string)p!).ToArray());
        var b = ((JsonArray)await c.ResultAsync("bdev_get_bdevs", P(("name", "Mp1"))))[0]!;
        Assert.Equal("Split Disk", (string?)b["product_name"]);
        Assert.Equal(2048, (long)b["num_blocks"]!);
        Assert.Equal("M", (string?)b["driver_specific"]!["split"]!["base_bdev"]);
        Assert.Equal(2048, (long)b["driver_specific"]!["split"]!["offset_blocks"]!);
        Assert.True((bool)((JsonArray)await c.ResultAsync("bdev_get_bdevs", P(("name", "M"))))[0]!["claimed"]!);

        var msg = await c.ErrorAsync("bdev_split_create", P(("base_bdev", "M"), ("split_count", 2)), InvalidParams);
        Assert.Equal("Failed to create 2 split bdevs from 'M': File exists", msg);
        Assert.StartsWith("Invalid parameters", await c.ErrorAsync("bdev_split_create", P(("base_bdev", "M")), InvalidParams));
        await c.ErrorAsync("bdev_split_create", P(("base_bdev", "M"), ("split_count", 2), ("bogus", 1)), InvalidParams);
        await c.ErrorAsync("bdev_split_create", P(("base_bdev", "M"), ("split_count", "2")), InvalidParams);

        // A base that does not exist yet: remembered, no parts now.
        Assert.Empty((JsonArray)await c.ResultAsync("bdev_split_create", P(("base_bdev", "Later"), ("split_count", 2))));
        await Malloc(c, "Later", 64);
        Assert.Equal(32, (long)((JsonArray)await c.ResultAsync("bdev_get_bdevs", P(("name", "Laterp1"))))[0]!["num_blocks"]!);

        Assert.True((bool)await c.ResultAsync("bdev_split_delete", P(("base_bdev", "M"))));
        await c.ErrorAsync("bdev_get_bdevs", P(("name", "Mp0")), ENODEV);
        Assert.Equal("No such file or directory", await c.ErrorAsync("bdev_split_delete", P(("base_bdev", "M")), InvalidParams));
        await c.ErrorAsync("bdev_split_delete", P(("name", "M")), InvalidParams);
        msg = await c.ErrorAsync("bdev_split_create", P(("base_bdev", "M"), ("split_count", 2), ("split_size_mb", 8)), InvalidParams);
        Assert.Equal("Failed to create 2 split bdevs from 'M': Invalid argument", msg);
    }

    [Fact]
    public async Task RaidCreateGetAddRemoveDelete()
    {
        await using var app = await TestApp.StartAsync();
        await using var c = await app.ConnectAsync();
        await Malloc(c, "A", 1024);
        await Malloc(c, "B", 1024);
        await Malloc(c, "C", 2048);
        var uuid = Guid.NewGuid().ToString();
        Assert.True((bool)await c.ResultAsync("bdev_raid_create", P(("name", "R1"), ("raid_level", "1"), ("base_bdevs", new JsonArray("A", "B")), ("uuid", uuid))));
        var r = (await Raid(c, "R1", "online"))!;
        Assert.Equal(uuid, (string?)r["uuid"]);
        Assert.Equal("raid1", (string?)r["raid_level"]);
        Assert.Equal("online", (string?)r["state"]);
        Assert.Equal(0, (int)r["strip_size_kb"]!);
        Assert.False((bool)r["superblock"]!);
        Assert.Equal(2, (int)r["num_base_bdevs"]!);
        Assert.Equal(2, (int)r["num_base_bdevs_discovered"]!);
        Assert.Equal(2, (int)r["num_base_bdevs_operational"]!);
        var list = r["base_bdevs_list"]!.AsArray();
        Assert.Equal("A", (string?)list[0]!["name"]);
        Assert.True((bool)list[0]!["is_configured"]!);
        Assert.Equal(0, (long)list[0]!["data_offset"]!);
        Assert.Equal(1024, (long)list[0]!["data_size"]!);
        var bdev = ((JsonArray)await c.ResultAsync("bdev_get_bdevs", P(("name", "R1"))))[0]!;
        Assert.Equal("Raid Volume", (string?)bdev["product_name"]);
        Assert.Equal("online", (string?)bdev["driver_specific"]!["raid"]!["state"]);

        // Degrade, then rebuild onto C.
        Assert.True((bool)await c.ResultAsync("bdev_raid_remove_base_bdev", P(("name", "B"))));
        r = (await Raid(c, "R1"))!;
        Assert.Equal(1, (int)r["num_base_bdevs_operational"]!);
        Assert.Equal(JsonValueKind.Null, r["base_bdevs_list"]![1]!["name"]?.GetValueKind() ?? JsonValueKind.Null);
        Assert.Equal("Failed to remove base bdev from raid bdev", await c.ErrorAsync("bdev_raid_remove_base_bdev", P(("name", "B")), ENODEV));
        await c.ErrorAsync("bdev_raid_remove_base_bdev", P(("name", "nope")), ENODEV);
        Assert.True((bool)await c.ResultAsync("bdev_raid_add_base_bdev", P(("base_bdev", "C"), ("raid_bdev", "R1"))));
        for (int i = 0; i < 500 && (await Raid(c, "R1"))!["process"] is not null; i++)
        {
            await Task.Delay(10);
        }

        r = (await Raid(c, "R1"))!;
        Assert.Null(r["process"]);
        Assert.Equal(2, (int)r["num_base_bdevs_operational"]!);
        Assert.Equal("C", (string?)r["base_bdevs_list"]![1]!["name"]);
        Assert.Equal("Failed to attach base bdev B to RAID bdev R1: Invalid argument", await c.ErrorAsync("bdev_raid_add_base_bdev", P(("base_bdev", "B"), ("raid_bdev", "R1")), EINVAL)); // no empty slot
        await c.ErrorAsync("bdev_raid_add_base_bdev", P(("base_bdev", "B"), ("raid_bdev", "nope")), ENODEV);
        await c.ErrorAsync("bdev_raid_add_base_bdev", P(("base_bdev", "nope"), ("raid_bdev", "R1")), ENODEV);
        Assert.StartsWith("spdk_json_decode_object failed", await c.ErrorAsync("bdev_raid_add_base_bdev", P(("base_bdev", "B")), InternalError));

        // raid0 over bases that do not exist yet: configuring, then online.
        Assert.True((bool)await c.ResultAsync("bdev_raid_create", P(("name", "R0"), ("raid_level", "raid0"), ("strip_size_kb", 64), ("base_bdevs", new JsonArray("X", "Y")))));
        Assert.Equal("configuring", (string?)(await Raid(c, "R0", "configuring"))!["state"]);
        Assert.Null(await Raid(c, "R0", "online"));
        await Malloc(c, "Y", 1024);
        await Malloc(c, "X", 1024);
        Assert.Equal("online", (string?)(await Raid(c, "R0"))!["state"]);
        Assert.Equal(2048, (long)((JsonArray)await c.ResultAsync("bdev_get_bdevs", P(("name", "R0"))))[0]!["num_blocks"]!);
        Assert.Equal(128, (int)((JsonArray)await c.ResultAsync("bdev_get_bdevs", P(("name", "R0"))))[0]!["optimal_io_boundary"]!);

        Assert.True((bool)await c.ResultAsync("bdev_raid_delete", P(("name", "R0"))));
        Assert.True((bool)await c.ResultAsync("bdev_raid_delete", P(("name", "R1"))));
        Assert.Empty((JsonArray)await c.ResultAsync("bdev_raid_get_bdevs", P(("category", "all"))));
        Assert.False((bool)((JsonArray)await c.ResultAsync("bdev_get_bdevs", P(("name", "A"))))[0]!["claimed"]!);
        Assert.Equal("raid bdev R1 not found", await c.ErrorAsync("bdev_raid_delete", P(("name", "R1")), ENODEV));
    }

    [Fact]
    public async Task RaidBadParamsGetSpdkCodes()
    {
        await using var app = await TestApp.StartAsync();
        await using var c = await app.ConnectAsync();
        await Malloc(c, "A", 1024);
        await Malloc(c, "B", 1024);
        JsonObject Create(string level, int strip, params string[] bases) =>
            P(("name", "R"), ("raid_level", level), ("strip_size_kb", strip), ("base_bdevs", new JsonArray(bases.Select(b => (JsonNode)b!).ToArray())));

        Assert.Equal("spdk_json_decode_object failed", (await c.ErrorAsync("bdev_raid_create", P(("name", "R")), ParseError))[..30]);
        await c.ErrorAsync("bdev_raid_create", Create("raid9", 64, "A"), ParseError);
        await c.ErrorAsync("bdev_raid_create", P(("name", "R"), ("raid_level", "0"), ("strip_size_kb", 64), ("base_bdevs", "A B")), ParseError); // SPDK decodes an array
        await c.ErrorAsync("bdev_raid_create", P(("name", "R"), ("raid_level", "0"), ("base_bdevs", new JsonArray("A")), ("bogus", 1)), ParseError);
        Assert.Equal("Failed to create RAID bdev R: Invalid argument", await c.ErrorAsync("bdev_raid_create", Create("raid1", 64, "A", "B"), EINVAL));
        await c.ErrorAsync("bdev_raid_create", Create("raid0", 0, "A"), EINVAL);
        await c.ErrorAsync("bdev_raid_create", Create("raid0", 48, "A"), EINVAL);
        await c.ErrorAsync("bdev_raid_create", Create("raid1", 0, "A"), EINVAL);
        await c.ErrorAsync("bdev_raid_create", Create("raid5f", 64, "A", "B", "A"), EINVAL);
        var sb = await c.ErrorAsync("bdev_raid_create", P(("name", "R"), ("raid_level", "1"), ("base_bdevs", new JsonArray("A", "B")), ("superblock", true)), ENOTSUP);
        Assert.Contains("superblock", sb);
        Assert.Empty((JsonArray)await c.ResultAsync("bdev_raid_get_bdevs", P(("category", "all"))));

        Assert.True((bool)await c.ResultAsync("bdev_raid_create", Create("CONCAT", 4, "A")));
        Assert.Equal("concat", (string?)(await Raid(c, "R"))!["raid_level"]);
        await c.ErrorAsync("bdev_raid_create", Create("raid0", 4, "B"), EEXIST);
        await c.ErrorAsync("bdev_raid_create", P(("name", "S"), ("raid_level", "0"), ("strip_size_kb", 4), ("base_bdevs", new JsonArray("A"))), -1); // A is claimed: -EPERM
        Assert.Null(await Raid(c, "S"));

        await c.ErrorAsync("bdev_raid_get_bdevs", P(("category", "bogus")), EINVAL);
        await c.ErrorAsync("bdev_raid_get_bdevs", P(), ParseError);
        await c.ErrorAsync("bdev_raid_delete", P(), ParseError);
        await c.ErrorAsync("bdev_raid_remove_base_bdev", P(("name", 5)), ParseError);
        await c.ErrorAsync("bdev_raid_set_options", P(("process_window_size_kb", 0)), EINVAL);
        await c.ErrorAsync("bdev_raid_set_options", P(("bogus", 0)), ParseError);
    }

    [Fact]
    public async Task SaveConfigReplaysRaidsAndSplitsIntoAFreshApp()
    {
        JsonObject saved;
        Dictionary<string, Guid> uuids;
        await using (var first = await TestApp.StartAsync())
        {
            await using var c = await first.ConnectAsync();
            await c.ResultAsync("bdev_raid_set_options", P(("process_window_size_kb", 256)));
            await c.ResultAsync("bdev_split_create", P(("base_bdev", "S"), ("split_count", 2))); // before its base
            await Malloc(c, "S", 4096);
            await Malloc(c, "A", 1024);
            await Malloc(c, "B", 1024);
            await c.ResultAsync("bdev_raid_create", P(("name", "R1"), ("raid_level", "raid1"), ("base_bdevs", new JsonArray("A", "B"))));
            await c.ResultAsync("bdev_raid_create", P(("name", "R0"), ("raid_level", "raid0"), ("strip_size_kb", 8), ("base_bdevs", new JsonArray("Sp0", "Sp1"))));
            saved = await ConfigRoundTripTests.SaveConfigAsync(c);
            uuids = first.App.Bdevs.All.ToDictionary(b => b.Name, b => b.Uuid);
        }

        var bdevCalls = saved["subsystems"]!.AsArray().First(s => (string?)s!["subsystem"] == "bdev")!["config"]!.AsArray();
        var methods = bdevCalls.Select(e => (string)e!["method"]!).ToList();
        Assert.Contains("bdev_split_create", methods);
        Assert.Contains("bdev_raid_set_options", methods);
        Assert.Equal(2, methods.Count(m => m == "bdev_raid_create"));
        var r0 = bdevCalls.First(e => (string?)e!["method"] == "bdev_raid_create" && (string?)e["params"]!["name"] == "R0")!["params"]!;
        Assert.Equal(8, (int)r0["strip_size_kb"]!);
        Assert.Equal("raid0", (string?)r0["raid_level"]);
        Assert.Equal(["Sp0", "Sp1"], r0["base_bdevs"]!.AsArray().Select(n => (string)n!).ToArray());

        await using var second = await TestApp.StartAsync(waitForRpc: true);
        await using (var c = await second.ConnectAsync())
        {
            await ConfigRoundTripTests.LoadConfigAsync(c, saved);
            var again = await ConfigRoundTripTests.SaveConfigAsync(c);
            Assert.True(JsonNode.DeepEquals(saved, again), $"before:\n{saved.ToJsonString()}\nreplayed:\n{again.ToJsonString()}");
            Assert.Equal("online", (string?)(await Raid(c, "R0"))!["state"]);
            Assert.Equal("online", (string?)(await Raid(c, "R1"))!["state"]);
        }

        Assert.Equal(uuids["R0"], second.App.Bdevs.Find("R0")!.Uuid);
        Assert.Equal(uuids["R1"], second.App.Bdevs.Find("R1")!.Uuid);
    }
}
