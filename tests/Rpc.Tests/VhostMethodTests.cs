using System.Text.Json.Nodes;
using Xunit;

namespace VhostBackend.Rpc.Tests;

/// <summary>
/// The vhost-blk methods against SPDK's lib/vhost/vhost_rpc.c: create/delete/set_coalescing fail with -32602 and
/// strerror text; vhost_get_controllers fails with -32603; create decodes relaxed (unknown names ignored).
/// </summary>
public sealed class VhostMethodTests
{
    [Fact]
    public async Task CreateListCoalesceDelete()
    {
        await using var app = await TestApp.StartAsync();
        await using var c = await app.ConnectAsync();
        await c.ResultAsync("bdev_malloc_create", new JsonObject { ["name"] = "Disk", ["num_blocks"] = 128, ["block_size"] = 512 });

        Assert.True((bool)(await c.ResultAsync("vhost_create_blk_controller", new JsonObject { ["ctrlr"] = "vb0", ["dev_name"] = "Disk", ["cpumask"] = "0x1", ["readonly"] = true }))!);
        string socket = Path.Combine(app.App.Options.SocketDir, "vb0");
        Assert.True(File.Exists(socket), "the vhost-user socket is created in the socket directory");

        var list = (JsonArray)await c.ResultAsync("vhost_get_controllers");
        var ctrl = Assert.Single(list)!;
        Assert.Equal("vb0", (string?)ctrl["ctrlr"]);
        Assert.Equal("0x1", (string?)ctrl["cpumask"]);
        Assert.Equal(socket, (string?)ctrl["socket"]);
        Assert.Empty((JsonArray)ctrl["sessions"]!);
        Assert.Equal("Disk", (string?)ctrl["backend_specific"]!["block"]!["bdev"]);
        Assert.True((bool)ctrl["backend_specific"]!["block"]!["readonly"]!);
        // SPDK's vhost-blk opens its bdev without claiming it.
        Assert.False((bool)((JsonArray)await c.ResultAsync("bdev_get_bdevs", new JsonObject { ["name"] = "Disk" }))[0]!["claimed"]!);

        // by name
        Assert.Single((JsonArray)await c.ResultAsync("vhost_get_controllers", new JsonObject { ["name"] = "vb0" }));
        Named("No such device", "name", await c.ErrorAsync("vhost_get_controllers", new JsonObject { ["name"] = "nope" }, -32603));
        await c.ErrorAsync("vhost_get_controllers", new JsonObject { ["name"] = 1 }, -32603);
        await c.ErrorAsync("vhost_get_controllers", new JsonObject { ["bogus"] = "x" }, -32603);

        // coalescing
        Assert.True((bool)(await c.ResultAsync("vhost_controller_set_coalescing", new JsonObject { ["ctrlr"] = "vb0", ["delay_base_us"] = 50, ["iops_threshold"] = 60000 }))!);
        ctrl = ((JsonArray)await c.ResultAsync("vhost_get_controllers", new JsonObject { ["name"] = "vb0" }))[0]!;
        Assert.Equal(50, (int)ctrl["delay_base_us"]!);
        Assert.Equal(60000, (int)ctrl["iops_threshold"]!);
        Named("No such device", "ctrlr", await c.ErrorAsync("vhost_controller_set_coalescing", new JsonObject { ["ctrlr"] = "nope", ["delay_base_us"] = 1, ["iops_threshold"] = 1000 }, -32602));
        Named("Invalid argument", "iops_threshold", await c.ErrorAsync("vhost_controller_set_coalescing", new JsonObject { ["ctrlr"] = "vb0", ["delay_base_us"] = 1, ["iops_threshold"] = 1 }, -32602));
        await c.ErrorAsync("vhost_controller_set_coalescing", new JsonObject { ["ctrlr"] = "vb0", ["delay_base_us"] = 1 }, -32602);
        await c.ErrorAsync("vhost_controller_set_coalescing", new JsonObject { ["ctrlr"] = "vb0", ["delay_base_us"] = -1, ["iops_threshold"] = 1000 }, -32602);
        await c.ErrorAsync("vhost_controller_set_coalescing", new JsonObject { ["ctrlr"] = "vb0", ["delay_base_us"] = 1, ["iops_threshold"] = 1000, ["x"] = 1 }, -32602);

        // delete
        Named("No such device", "ctrlr", await c.ErrorAsync("vhost_delete_controller", new JsonObject { ["ctrlr"] = "nope" }, -32602));
        await c.ErrorAsync("vhost_delete_controller", null, -32602);
        await c.ErrorAsync("vhost_delete_controller", new JsonObject { ["ctrlr"] = "vb0", ["x"] = 1 }, -32602);
        Assert.True((bool)(await c.ResultAsync("vhost_delete_controller", new JsonObject { ["ctrlr"] = "vb0" }))!);
        Assert.Empty((JsonArray)await c.ResultAsync("vhost_get_controllers"));
        Assert.False(File.Exists(socket), "the socket is removed with the controller");
        // The bdev is free again.
        Assert.True((bool)(await c.ResultAsync("bdev_malloc_delete", new JsonObject { ["name"] = "Disk" }))!);
    }

    [Fact]
    public async Task CreateErrorsAreInvalidParamsWithStrerror()
    {
        await using var app = await TestApp.StartAsync();
        await using var c = await app.ConnectAsync();
        await c.ResultAsync("bdev_null_create", new JsonObject { ["name"] = "Disk", ["num_blocks"] = 128, ["block_size"] = 512 });

        Named("No such device", "dev_name", await c.ErrorAsync("vhost_create_blk_controller", new JsonObject { ["ctrlr"] = "v", ["dev_name"] = "nope" }, -32602));
        Named("Invalid argument", "cpumask", await c.ErrorAsync("vhost_create_blk_controller", new JsonObject { ["ctrlr"] = "v", ["dev_name"] = "Disk", ["cpumask"] = "0x4" }, -32602));
        Named("Invalid argument", "transport", await c.ErrorAsync("vhost_create_blk_controller", new JsonObject { ["ctrlr"] = "v", ["dev_name"] = "Disk", ["transport"] = "bogus" }, -32602));
        string missing = await c.ErrorAsync("vhost_create_blk_controller", new JsonObject { ["ctrlr"] = "v" }, -32602);
        Assert.StartsWith("Invalid argument", missing);
        Assert.Contains("dev_name", missing);

        // A name whose socket path cannot fit a Unix socket address (used to answer "Input/output error").
        string tooLong = await c.ErrorAsync("vhost_create_blk_controller", new JsonObject { ["ctrlr"] = new string('x', 120), ["dev_name"] = "Disk" }, -32602);
        Named("Invalid argument", "ctrlr", tooLong);
        Assert.Contains("at most 107", tooLong);
        await c.ErrorAsync("vhost_create_blk_controller", new JsonObject { ["ctrlr"] = "v", ["dev_name"] = 5 }, -32602);
        await c.ErrorAsync("vhost_create_blk_controller", new JsonObject { ["ctrlr"] = "v", ["dev_name"] = "Disk", ["readonly"] = "yes" }, -32602);
        Assert.Empty((JsonArray)await c.ResultAsync("vhost_get_controllers"));

        // Relaxed decoding, as SPDK: an unknown (transport-specific) name does not fail the call.
        Assert.True((bool)(await c.ResultAsync("vhost_create_blk_controller", new JsonObject { ["ctrlr"] = "v", ["dev_name"] = "Disk", ["some_transport_opt"] = 1 }))!);
        Named("File exists", "ctrlr", await c.ErrorAsync("vhost_create_blk_controller", new JsonObject { ["ctrlr"] = "v", ["dev_name"] = "Disk" }, -32602));
        Assert.Single((JsonArray)await c.ResultAsync("vhost_get_controllers"));
    }

    [Fact]
    public async Task ClaimedBdevIsRefusedAsSpdkDoes()
    {
        // The product passthru module claims its base (it replaced a test model of the claim here).
        await using var app = await TestApp.StartAsync();
        await using var c = await app.ConnectAsync();
        await c.ResultAsync("bdev_malloc_create", new JsonObject { ["name"] = "Base", ["num_blocks"] = 128, ["block_size"] = 512 });
        await c.ResultAsync("vhost_create_scsi_controller", new JsonObject { ["ctrlr"] = "s0" });
        Assert.Equal("PT", (string?)await c.ResultAsync("bdev_passthru_create", new JsonObject { ["base_bdev_name"] = "Base", ["name"] = "PT" }));
        Assert.True((bool)((JsonArray)await c.ResultAsync("bdev_get_bdevs", new JsonObject { ["name"] = "Base" }))[0]!["claimed"]!);

        // vhost-blk: spdk_vhost_blk_construct returns spdk_bdev_open_ext's -EPERM, which vhost_rpc.c answers
        // as every create failure: -32602 with strerror.
        Named("Operation not permitted", "dev_name", await c.ErrorAsync("vhost_create_blk_controller", new JsonObject { ["ctrlr"] = "vb0", ["dev_name"] = "Base" }, -32602));
        Assert.True(app.Logs.Contains("Could not open Base - passthru module already claimed it"));

        // vhost-scsi: spdk_vhost_scsi_dev_add_tgt turns a target it cannot build (the LUN's open failed) into -EINVAL.
        Named("Invalid argument", "bdev_name", await c.ErrorAsync("vhost_scsi_controller_add_target", new JsonObject { ["ctrlr"] = "s0", ["scsi_target_num"] = 0, ["bdev_name"] = "Base" }, -32602));
        var ctrls = (JsonArray)await c.ResultAsync("vhost_get_controllers");
        Assert.Equal("s0", (string?)Assert.Single(ctrls)!["ctrlr"]);
        Assert.Empty((JsonArray)ctrls[0]!["backend_specific"]!["scsi"]!);

        // Released: both work.
        Assert.True((bool)(await c.ResultAsync("bdev_passthru_delete", new JsonObject { ["name"] = "PT" }))!);
        Assert.True((bool)(await c.ResultAsync("vhost_create_blk_controller", new JsonObject { ["ctrlr"] = "vb0", ["dev_name"] = "Base" }))!);
        Assert.True((bool)(await c.ResultAsync("vhost_delete_controller", new JsonObject { ["ctrlr"] = "vb0" }))!);
        Assert.Equal(0, (int)(await c.ResultAsync("vhost_scsi_controller_add_target", new JsonObject { ["ctrlr"] = "s0", ["scsi_target_num"] = 0, ["bdev_name"] = "Base" }))!);
    }

    [Fact]
    public async Task ScsiControllerTargetsAndErrors()
    {
        await using var app = await TestApp.StartAsync();
        await using var c = await app.ConnectAsync();
        await c.ResultAsync("bdev_null_create", new JsonObject { ["name"] = "N0", ["num_blocks"] = 128, ["block_size"] = 512 });
        await c.ResultAsync("bdev_null_create", new JsonObject { ["name"] = "N1", ["num_blocks"] = 256, ["block_size"] = 4096 });

        Assert.True((bool)(await c.ResultAsync("vhost_create_scsi_controller", new JsonObject { ["ctrlr"] = "s0" }))!);
        Named("File exists", "ctrlr", await c.ErrorAsync("vhost_create_scsi_controller", new JsonObject { ["ctrlr"] = "s0" }, -32602));
        Named("Invalid argument", "cpumask", await c.ErrorAsync("vhost_create_scsi_controller", new JsonObject { ["ctrlr"] = "s1", ["cpumask"] = "0x10" }, -32602));
        await c.ErrorAsync("vhost_create_scsi_controller", new JsonObject(), -32602);

        Assert.Equal(3, (int)(await c.ResultAsync("vhost_scsi_controller_add_target", new JsonObject { ["ctrlr"] = "s0", ["scsi_target_num"] = 3, ["bdev_name"] = "N0" }))!);
        Assert.Equal(0, (int)(await c.ResultAsync("vhost_scsi_controller_add_target", new JsonObject { ["ctrlr"] = "s0", ["scsi_target_num"] = -1, ["bdev_name"] = "N1" }))!);
        Named("File exists", "scsi_target_num", await c.ErrorAsync("vhost_scsi_controller_add_target", new JsonObject { ["ctrlr"] = "s0", ["scsi_target_num"] = 3, ["bdev_name"] = "N1" }, -32602));
        Named("Invalid argument", "scsi_target_num", await c.ErrorAsync("vhost_scsi_controller_add_target", new JsonObject { ["ctrlr"] = "s0", ["scsi_target_num"] = 8, ["bdev_name"] = "N1" }, -32602));
        Named("No such device", "bdev_name", await c.ErrorAsync("vhost_scsi_controller_add_target", new JsonObject { ["ctrlr"] = "s0", ["scsi_target_num"] = 4, ["bdev_name"] = "nope" }, -32602));
        Named("No such device", "ctrlr", await c.ErrorAsync("vhost_scsi_controller_add_target", new JsonObject { ["ctrlr"] = "zz", ["scsi_target_num"] = 4, ["bdev_name"] = "N1" }, -32602));
        await c.ErrorAsync("vhost_scsi_controller_add_target", new JsonObject { ["ctrlr"] = "s0", ["scsi_target_num"] = "4", ["bdev_name"] = "N1" }, -32602);
        await c.ErrorAsync("vhost_scsi_controller_add_target", new JsonObject { ["ctrlr"] = "s0", ["bdev_name"] = "N1" }, -32602);

        var list = (JsonArray)(await c.ResultAsync("vhost_get_controllers", new JsonObject { ["name"] = "s0" }))!;
        var targets = (JsonArray)list[0]!["backend_specific"]!["scsi"]!;
        Assert.Equal([0, 3], targets.Select(t => (int)t!["scsi_dev_num"]!));
        Assert.Equal("N1", (string)targets[0]!["luns"]![0]!["bdev_name"]!);

        // A blk controller is not a SCSI controller; remove errors; delete refuses while targets remain.
        await c.ResultAsync("bdev_null_create", new JsonObject { ["name"] = "N2", ["num_blocks"] = 128, ["block_size"] = 512 });
        await c.ResultAsync("vhost_create_blk_controller", new JsonObject { ["ctrlr"] = "b0", ["dev_name"] = "N2" });
        Named("Invalid argument", "ctrlr", await c.ErrorAsync("vhost_scsi_controller_add_target", new JsonObject { ["ctrlr"] = "b0", ["scsi_target_num"] = 1, ["bdev_name"] = "N1" }, -32602));
        Named("No such device", "scsi_target_num", await c.ErrorAsync("vhost_scsi_controller_remove_target", new JsonObject { ["ctrlr"] = "s0", ["scsi_target_num"] = 5 }, -32602));
        Named("Invalid argument", "scsi_target_num", await c.ErrorAsync("vhost_scsi_controller_remove_target", new JsonObject { ["ctrlr"] = "s0", ["scsi_target_num"] = 9 }, -32602));
        await c.ErrorAsync("vhost_scsi_controller_remove_target", new JsonObject { ["ctrlr"] = "s0", ["scsi_target_num"] = -1 }, -32602);
        Named("Device or resource busy", "ctrlr", await c.ErrorAsync("vhost_delete_controller", new JsonObject { ["ctrlr"] = "s0" }, -32602));

        Assert.True((bool)(await c.ResultAsync("vhost_scsi_controller_remove_target", new JsonObject { ["ctrlr"] = "s0", ["scsi_target_num"] = 3 }))!);
        // Deleting the bdev behind target 0 removes that target too.
        await c.ResultAsync("bdev_null_delete", new JsonObject { ["name"] = "N1" });
        list = (JsonArray)(await c.ResultAsync("vhost_get_controllers", new JsonObject { ["name"] = "s0" }))!;
        Assert.Empty((JsonArray)list[0]!["backend_specific"]!["scsi"]!);
        Assert.True((bool)(await c.ResultAsync("vhost_delete_controller", new JsonObject { ["ctrlr"] = "s0" }))!);
        Assert.False(File.Exists(Path.Combine(app.App.Options.SocketDir, "s0")));

        // delay: no socket until vhost_start_scsi_controller (idempotent); save_config replays create(delay), targets, start.
        string delayed = Path.Combine(app.App.Options.SocketDir, "sd");
        Assert.True((bool)(await c.ResultAsync("vhost_create_scsi_controller", new JsonObject { ["ctrlr"] = "sd", ["delay"] = true }))!);
        Assert.False(File.Exists(delayed));
        await c.ResultAsync("bdev_null_create", new JsonObject { ["name"] = "N3", ["num_blocks"] = 128, ["block_size"] = 512 });
        await c.ResultAsync("vhost_scsi_controller_add_target", new JsonObject { ["ctrlr"] = "sd", ["scsi_target_num"] = 0, ["bdev_name"] = "N3" });
        Assert.True((bool)(await c.ResultAsync("vhost_start_scsi_controller", new JsonObject { ["ctrlr"] = "sd" }))!);
        Assert.True(File.Exists(delayed));
        Assert.True((bool)(await c.ResultAsync("vhost_start_scsi_controller", new JsonObject { ["ctrlr"] = "sd" }))!);
        Named("No such device", "ctrlr", await c.ErrorAsync("vhost_start_scsi_controller", new JsonObject { ["ctrlr"] = "nope" }, -32602));
        var calls = ((JsonArray)(await c.ResultAsync("framework_get_config", new JsonObject { ["name"] = "vhost_scsi" }))!).Select(n => (string)n!["method"]!).ToArray();
        Assert.Equal(["vhost_create_scsi_controller", "vhost_scsi_controller_add_target", "vhost_start_scsi_controller"], calls);
    }

    /// <summary>SPDK's message (strerror) first, then the parameter at fault and the reason.</summary>
    private static void Named(string strerror, string param, string actual) =>
        Assert.StartsWith($"{strerror}: {param}: ", actual);
}
