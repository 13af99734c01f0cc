using System.Text.Json.Nodes;
using Xunit;

namespace VhostBackend.Rpc.Tests;

/// <summary>
/// The bdev methods against SPDK's module/bdev/*_rpc.c and lib/bdev/bdev_rpc.c: a params decoding failure is
/// -32603 "spdk_json_decode_object failed" in these methods (not -32602), module errors are -errno.
/// </summary>
public sealed class BdevMethodTests
{
    private const int DecodeFailed = -32603;
    private const int ENOENT = -2;
    private const int EEXIST = -17;
    private const int ENODEV = -19;
    private const int EINVAL = -22;

    private static JsonObject P(params (string Key, JsonNode? Value)[] members)
    {
        var o = new JsonObject();
        foreach (var (k, v) in members)
        {
            o[k] = v;
        }

        return o;
    }

    [Fact]
    public async Task ModuleStatsReportEveryStandardModuleInRegistrationOrder()
    {
        await using var app = await TestApp.StartAsync();
        await using var c = await app.ConnectAsync();
        await c.ResultAsync("bdev_malloc_create", P(("name", "M1"), ("num_blocks", 256), ("block_size", 4096)));
        var all = (JsonArray)await c.ResultAsync("bdev_get_module_stats");
        Assert.Equal(new[] { "malloc", "null", "file" }, all.Select(m => (string)m!["module"]!).ToArray());
        var malloc = ((JsonArray)await c.ResultAsync("bdev_get_module_stats", P(("name", "malloc"))))[0]!["stats"]!;
        Assert.Equal(1, (long)malloc["bdevs"]!);
        Assert.Equal(256 * 4096, (long)malloc["bytes_allocated"]!);
        await c.ErrorAsync("bdev_get_module_stats", P(("name", "nope")), ENODEV);
        await c.ErrorAsync("bdev_get_module_stats", P(("bogus", 1)), DecodeFailed);
    }

    [Fact]
    public async Task MallocCreateGetDelete()
    {
        await using var app = await TestApp.StartAsync();
        await using var c = await app.ConnectAsync();
        var uuid = Guid.NewGuid().ToString();
        Assert.Equal("M1", (string?)await c.ResultAsync("bdev_malloc_create", P(("name", "M1"), ("num_blocks", 256), ("block_size", 4096), ("uuid", uuid))));
        // Without a name SPDK generates MallocN.
        Assert.Equal("Malloc0", (string?)await c.ResultAsync("bdev_malloc_create", P(("num_blocks", 16), ("block_size", 512))));

        var b = ((JsonArray)await c.ResultAsync("bdev_get_bdevs", P(("name", "M1"))))[0]!;
        Assert.Equal("M1", (string?)b["name"]);
        Assert.Equal("Malloc disk", (string?)b["product_name"]);
        Assert.Equal(4096, (int)b["block_size"]!);
        Assert.Equal(256, (long)b["num_blocks"]!);
        Assert.Equal(uuid, (string?)b["uuid"]);
        Assert.False((bool)b["claimed"]!);
        Assert.True((bool)b["supported_io_types"]!["read"]!);
        Assert.True((bool)b["supported_io_types"]!["write"]!);
        foreach (var k in new[] { "rw_ios_per_sec", "rw_mbytes_per_sec", "r_mbytes_per_sec", "w_mbytes_per_sec" })
        {
            Assert.Equal(0, (long)b["assigned_rate_limits"]![k]!);
        }

        Assert.IsType<JsonArray>(b["aliases"]);
        Assert.IsType<JsonObject>(b["driver_specific"]);
        Assert.Equal(2, ((JsonArray)await c.ResultAsync("bdev_get_bdevs")).Count);

        // Duplicate name: -EEXIST (spdk_bdev_register).
        await c.ErrorAsync("bdev_malloc_create", P(("name", "M1"), ("num_blocks", 16), ("block_size", 512)), EEXIST);
        // Module validation: -EINVAL.
        await c.ErrorAsync("bdev_malloc_create", P(("name", "X"), ("num_blocks", 16), ("block_size", 100)), EINVAL);
        await c.ErrorAsync("bdev_malloc_create", P(("name", "X"), ("num_blocks", 0), ("block_size", 512)), EINVAL);
        // Decoding: missing required, wrong type, out of range, unknown name, bad uuid, params not an object.
        Assert.StartsWith("spdk_json_decode_object failed", await c.ErrorAsync("bdev_malloc_create", P(("name", "X"), ("block_size", 512)), DecodeFailed));
        await c.ErrorAsync("bdev_malloc_create", P(("name", "X"), ("num_blocks", "16"), ("block_size", 512)), DecodeFailed);
        await c.ErrorAsync("bdev_malloc_create", P(("name", "X"), ("num_blocks", 16), ("block_size", 4294967296L)), DecodeFailed);
        await c.ErrorAsync("bdev_malloc_create", P(("name", "X"), ("num_blocks", -1), ("block_size", 512)), DecodeFailed);
        await c.ErrorAsync("bdev_malloc_create", P(("name", "X"), ("num_blocks", 16), ("block_size", 512), ("color", "red")), DecodeFailed);
        await c.ErrorAsync("bdev_malloc_create", P(("name", "X"), ("num_blocks", 16), ("block_size", 512), ("uuid", "not-a-uuid")), DecodeFailed);
        await c.ErrorAsync("bdev_malloc_create", new JsonArray(1, 2), DecodeFailed);
        await c.ErrorAsync("bdev_malloc_create", null, DecodeFailed);
        Assert.Null(app.App.Bdevs.Find("X"));

        // get_bdevs: unknown name -ENODEV, decoding -32603.
        Assert.Equal("No such device: name: no bdev named nope", await c.ErrorAsync("bdev_get_bdevs", P(("name", "nope")), ENODEV));
        await c.ErrorAsync("bdev_get_bdevs", P(("name", 1)), DecodeFailed);
        await c.ErrorAsync("bdev_get_bdevs", P(("nme", "M1")), DecodeFailed);

        // Delete: unknown or another module's bdev is -ENODEV.
        await c.ResultAsync("bdev_null_create", P(("name", "N"), ("num_blocks", 8), ("block_size", 512)));
        await c.ErrorAsync("bdev_malloc_delete", P(("name", "nope")), ENODEV);
        await c.ErrorAsync("bdev_malloc_delete", P(("name", "N")), ENODEV);
        await c.ErrorAsync("bdev_malloc_delete", null, DecodeFailed);
        await c.ErrorAsync("bdev_malloc_delete", P(("name", "M1"), ("force", true)), DecodeFailed);
        Assert.True((bool)(await c.ResultAsync("bdev_malloc_delete", P(("name", "M1"))))!);
        await c.ErrorAsync("bdev_get_bdevs", P(("name", "M1")), ENODEV);
    }

    [Fact]
    public async Task NullCreateDeleteResize()
    {
        await using var app = await TestApp.StartAsync();
        await using var c = await app.ConnectAsync();
        Assert.Equal("N1", (string?)await c.ResultAsync("bdev_null_create", P(("name", "N1"), ("num_blocks", 2048), ("block_size", 512))));
        var b = ((JsonArray)await c.ResultAsync("bdev_get_bdevs", P(("name", "N1"))))[0]!;
        Assert.Equal("Null disk", (string?)b["product_name"]);

        // SPDK requires a name for null bdevs (decode failure without it).
        await c.ErrorAsync("bdev_null_create", P(("num_blocks", 8), ("block_size", 512)), DecodeFailed);
        await c.ErrorAsync("bdev_null_create", P(("name", "N1"), ("num_blocks", 8), ("block_size", 512)), EEXIST);
        await c.ErrorAsync("bdev_null_create", P(("name", "N2"), ("num_blocks", 8), ("block_size", 513)), EINVAL);
        await c.ErrorAsync("bdev_null_create", P(("name", "N2"), ("num_blocks", 8), ("block_size", true)), DecodeFailed);

        // Resize (MiB): grows; smaller than current or another module's bdev is -EINVAL; unknown -ENODEV.
        Assert.True((bool)(await c.ResultAsync("bdev_null_resize", P(("name", "N1"), ("new_size", 4))))!);
        Assert.Equal(4 * 1024 * 1024 / 512, (long)((JsonArray)await c.ResultAsync("bdev_get_bdevs", P(("name", "N1"))))[0]!["num_blocks"]!);
        await c.ErrorAsync("bdev_null_resize", P(("name", "N1"), ("new_size", 2)), EINVAL);
        await c.ErrorAsync("bdev_null_resize", P(("name", "nope"), ("new_size", 8)), ENODEV);
        await c.ResultAsync("bdev_malloc_create", P(("name", "M"), ("num_blocks", 8), ("block_size", 512)));
        await c.ErrorAsync("bdev_null_resize", P(("name", "M"), ("new_size", 8)), EINVAL);
        await c.ErrorAsync("bdev_null_resize", P(("name", "N1")), DecodeFailed);
        await c.ErrorAsync("bdev_null_resize", P(("name", "N1"), ("new_size", -4)), DecodeFailed);

        await c.ErrorAsync("bdev_null_delete", P(("name", "M")), ENODEV);
        await c.ErrorAsync("bdev_null_delete", P(("name", "nope")), ENODEV);
        await c.ErrorAsync("bdev_null_delete", P(("name", 3)), DecodeFailed);
        Assert.True((bool)(await c.ResultAsync("bdev_null_delete", P(("name", "N1"))))!);
        Assert.Null(app.App.Bdevs.Find("N1"));
    }

    [Fact]
    public async Task AioAndUringCreateDelete()
    {
        await using var app = await TestApp.StartAsync();
        await using var c = await app.ConnectAsync();
        string file = Path.Combine(app.Dir, "disk.img");
        await using (var f = File.Create(file))
        {
            f.SetLength(1024 * 1024);
        }

        Assert.Equal("F1", (string?)await c.ResultAsync("bdev_aio_create", P(("name", "F1"), ("filename", file), ("block_size", 512))));
        var b = ((JsonArray)await c.ResultAsync("bdev_get_bdevs", P(("name", "F1"))))[0]!;
        Assert.Equal(2048, (long)b["num_blocks"]!);
        Assert.Equal(512, (int)b["block_size"]!);

        // aio reports -errno: missing file -ENOENT, duplicate -EEXIST, bad block size -EINVAL.
        Assert.Equal(ENOENT, await CodeOf(c, "bdev_aio_create", P(("name", "F2"), ("filename", file + ".missing"))));
        await c.ErrorAsync("bdev_aio_create", P(("name", "F1"), ("filename", file)), EEXIST);
        await c.ErrorAsync("bdev_aio_create", P(("name", "F2"), ("filename", file), ("block_size", 1000)), EINVAL);
        await c.ErrorAsync("bdev_aio_create", P(("name", "F2")), DecodeFailed);
        await c.ErrorAsync("bdev_aio_create", P(("name", "F2"), ("filename", file), ("readonly", "no")), DecodeFailed);

        // uring: SPDK answers every create failure with -32603 "Unable to create URING bdev.".
        Assert.Equal("U1", (string?)await c.ResultAsync("bdev_uring_create", P(("name", "U1"), ("filename", file))));
        Assert.StartsWith("Unable to create URING bdev.", await c.ErrorAsync("bdev_uring_create", P(("name", "U2"), ("filename", file + ".missing")), -32603));
        await c.ErrorAsync("bdev_uring_create", P(("name", "U1"), ("filename", file)), -32603);
        Assert.StartsWith("spdk_json_decode_object failed", await c.ErrorAsync("bdev_uring_create", P(("name", "U2"), ("filename", file), ("readonly", true)), -32603));

        await c.ErrorAsync("bdev_aio_delete", P(("name", "nope")), ENODEV);
        await c.ErrorAsync("bdev_uring_delete", P(("name", "nope")), ENODEV);
        await c.ErrorAsync("bdev_aio_delete", null, DecodeFailed);
        Assert.True((bool)(await c.ResultAsync("bdev_aio_delete", P(("name", "F1"))))!);
        Assert.True((bool)(await c.ResultAsync("bdev_uring_delete", P(("name", "U1"))))!);
        Assert.Empty((JsonArray)await c.ResultAsync("bdev_get_bdevs"));
    }

    [Fact]
    public async Task IostatAndQos()
    {
        await using var app = await TestApp.StartAsync();
        await using var c = await app.ConnectAsync();
        await c.ResultAsync("bdev_malloc_create", P(("name", "A"), ("num_blocks", 64), ("block_size", 512)));
        await c.ResultAsync("bdev_malloc_create", P(("name", "B"), ("num_blocks", 64), ("block_size", 512)));

        var io = await c.ResultAsync("bdev_get_iostat");
        Assert.True((long)io["tick_rate"]! > 0);
        Assert.True((long)io["ticks"]! > 0);
        var list = (JsonArray)io["bdevs"]!;
        Assert.Equal(new[] { "A", "B" }, list.Select(x => (string)x!["name"]!).Order());
        // No writes or unmaps yet; reads: at most the lvol module's examine of the super block (SPDK's examine reads too).
        foreach (var k in new[] { "bytes_written", "num_write_ops", "bytes_unmapped", "num_unmap_ops", "write_latency_ticks" })
        {
            Assert.Equal(0, (long)list[0]![k]!);
        }

        Assert.InRange((long)list[0]!["num_read_ops"]!, 0, 1);
        Assert.InRange((long)list[0]!["bytes_read"]!, 0, 4096);

        Assert.Equal("B", (string?)((JsonArray)(await c.ResultAsync("bdev_get_iostat", P(("name", "B"))))["bdevs"]!).Single()!["name"]);
        Assert.Single((JsonArray)(await c.ResultAsync("bdev_get_iostat", P(("names", new JsonArray("A")))))["bdevs"]!);
        await c.ErrorAsync("bdev_get_iostat", P(("name", "nope")), ENODEV);
        await c.ErrorAsync("bdev_get_iostat", P(("per_channel", true)), EINVAL); // per_channel needs exactly one bdev
        await c.ErrorAsync("bdev_get_iostat", P(("name", 7)), DecodeFailed);
        await c.ErrorAsync("bdev_get_iostat", P(("bogus", 7)), DecodeFailed);

        // QoS: limits are applied and reported; unset limits keep their value.
        Assert.True((bool)(await c.ResultAsync("bdev_set_qos_limit", P(("name", "A"), ("rw_ios_per_sec", 20000), ("r_mbytes_per_sec", 100))))!);
        await c.ResultAsync("bdev_set_qos_limit", P(("name", "A"), ("w_mbytes_per_sec", 50)));
        var limits = ((JsonArray)await c.ResultAsync("bdev_get_bdevs", P(("name", "A"))))[0]!["assigned_rate_limits"]!;
        Assert.Equal(20000, (long)limits["rw_ios_per_sec"]!);
        Assert.Equal(0, (long)limits["rw_mbytes_per_sec"]!);
        Assert.Equal(100, (long)limits["r_mbytes_per_sec"]!);
        Assert.Equal(50, (long)limits["w_mbytes_per_sec"]!);
        // SPDK rounds an IOPS limit up to a multiple of 1000.
        await c.ResultAsync("bdev_set_qos_limit", P(("name", "A"), ("rw_ios_per_sec", 1500)));
        Assert.Equal(2000, (long)((JsonArray)await c.ResultAsync("bdev_get_bdevs", P(("name", "A"))))[0]!["assigned_rate_limits"]!["rw_ios_per_sec"]!);

        Assert.Equal("No rate limits specified", await c.ErrorAsync("bdev_set_qos_limit", P(("name", "A")), EINVAL));
        // SPDK opens the bdev first: an unknown bdev is -ENODEV even without limits.
        await c.ErrorAsync("bdev_set_qos_limit", P(("name", "nope")), ENODEV);
        await c.ErrorAsync("bdev_set_qos_limit", P(("rw_ios_per_sec", 1000)), DecodeFailed);
        await c.ErrorAsync("bdev_set_qos_limit", P(("name", "A"), ("rw_ios_per_sec", -1)), DecodeFailed);
        await c.ErrorAsync("bdev_set_qos_limit", P(("name", "A"), ("iops", 1000)), DecodeFailed);
    }

    private static async Task<int> CodeOf(RawClient c, string method, JsonNode p)
    {
        var reply = await c.CallAsync(method, p);
        Assert.NotNull(reply["error"]);
        return (int)reply["error"]!["code"]!;
    }
}
