using System.Text.Json;
using System.Text.Json.Nodes;
using Xunit;

namespace VhostBackend.Rpc.Tests;

/// <summary>
/// save_config / load_config / -c: state built over RPC is saved (framework_get_subsystems + framework_get_config,
/// as rpc.py's save_config does), a daemon restarted from it comes back identical, and replaying it into a
/// --wait-for-rpc daemon the way rpc.py's load_config does yields the same configuration again.
/// </summary>
public sealed class ConfigRoundTripTests
{
    [Fact]
    public async Task SavedConfigRestartsIdenticallyAndReplays()
    {
        var first = await TestApp.StartAsync();
        string dir = first.Dir;
        string file = Path.Combine(dir, "disk.img");
        await using (var f = File.Create(file))
        {
            f.SetLength(2 * 1024 * 1024);
        }

        await using (var f = File.Create(file + ".u"))
        {
            f.SetLength(1024 * 1024);
        }

        JsonObject saved;
        await using (var c = await first.ConnectAsync())
        {
            await c.ResultAsync("bdev_malloc_create", new JsonObject { ["name"] = "Mal", ["num_blocks"] = 1024, ["block_size"] = 4096 });
            await c.ResultAsync("bdev_null_create", new JsonObject { ["name"] = "Nul", ["num_blocks"] = 4096, ["block_size"] = 512 });
            await c.ResultAsync("bdev_aio_create", new JsonObject { ["name"] = "Fil", ["filename"] = file, ["block_size"] = 512 });
            await c.ResultAsync("bdev_uring_create", new JsonObject { ["name"] = "Uri", ["filename"] = file + ".u" });
            await c.ResultAsync("bdev_set_qos_limit", new JsonObject { ["name"] = "Mal", ["rw_ios_per_sec"] = 10000, ["w_mbytes_per_sec"] = 20 });
            await c.ResultAsync("vhost_create_blk_controller", new JsonObject { ["ctrlr"] = "blk0", ["dev_name"] = "Mal", ["cpumask"] = "0x1" });
            await c.ResultAsync("vhost_create_blk_controller", new JsonObject { ["ctrlr"] = "blk1", ["dev_name"] = "Fil", ["readonly"] = true });
            await c.ResultAsync("vhost_controller_set_coalescing", new JsonObject { ["ctrlr"] = "blk0", ["delay_base_us"] = 80, ["iops_threshold"] = 50000 });
            await c.ResultAsync("vhost_create_scsi_controller", new JsonObject { ["ctrlr"] = "scsi0", ["cpumask"] = "0x1" });
            await c.ResultAsync("vhost_scsi_controller_add_target", new JsonObject { ["ctrlr"] = "scsi0", ["scsi_target_num"] = 2, ["bdev_name"] = "Nul" });
            await c.ResultAsync("vhost_scsi_controller_add_target", new JsonObject { ["ctrlr"] = "scsi0", ["scsi_target_num"] = -1, ["bdev_name"] = "Uri", ["readonly"] = true });
            saved = await SaveConfigAsync(c);
        }

        // The RPC view equals the in-process save (the same subsystems, the same calls).
        Assert.True(JsonNode.DeepEquals(saved, await JsonConfig.SaveAsync(first.App.Dispatcher, first.App.Subsystems)), saved.ToJsonString());
        var methods = saved["subsystems"]!.AsArray().SelectMany(s => s!["config"]!.AsArray()).Select(e => (string)e!["method"]!).ToList();
        foreach (var m in new[] { "bdev_malloc_create", "bdev_null_create", "bdev_aio_create", "bdev_uring_create", "bdev_set_qos_limit", "vhost_create_blk_controller", "vhost_controller_set_coalescing", "vhost_create_scsi_controller", "vhost_scsi_controller_add_target" })
        {
            Assert.Contains(m, methods);
        }

        var uuids = first.App.Bdevs.All.ToDictionary(b => b.Name, b => b.Uuid);
        string configPath = Path.Combine(dir, "saved.json");
        await File.WriteAllTextAsync(configPath, saved.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
        await first.StopAsync();

        // Restart from the file (-c): identical.
        var second = await TestApp.StartAsync(configFile: configPath, dir: dir);
        JsonObject again;
        await using (var c = await second.ConnectAsync())
        {
            again = await SaveConfigAsync(c);
            var limits = ((JsonArray)await c.ResultAsync("bdev_get_bdevs", new JsonObject { ["name"] = "Mal" }))[0]!["assigned_rate_limits"]!;
            Assert.Equal(10000, (long)limits["rw_ios_per_sec"]!);
            var ctrl = ((JsonArray)await c.ResultAsync("vhost_get_controllers", new JsonObject { ["name"] = "blk0" }))[0]!;
            Assert.Equal(80, (int)ctrl["delay_base_us"]!);
        }

        Assert.True(JsonNode.DeepEquals(saved, again), $"before:\n{saved.ToJsonString()}\nafter:\n{again.ToJsonString()}");
        Assert.Equal(uuids, second.App.Bdevs.All.ToDictionary(b => b.Name, b => b.Uuid));
        Assert.True(File.Exists(Path.Combine(second.App.Options.SocketDir, "blk1")));
        await second.StopAsync();

        // load_config as rpc.py does it, into a --wait-for-rpc daemon: startup-time calls, framework_start_init, the rest.
        await using var third = await TestApp.StartAsync(waitForRpc: true, dir: dir);
        await using (var c = await third.ConnectAsync())
        {
            await LoadConfigAsync(c, saved);
            var replayed = await SaveConfigAsync(c);
            Assert.True(JsonNode.DeepEquals(saved, replayed), $"before:\n{saved.ToJsonString()}\nreplayed:\n{replayed.ToJsonString()}");
        }
    }

    [Fact]
    public async Task BadConfigFileFailsStartWithTheEntryNamed()
    {
        string dir = Directory.CreateTempSubdirectory("rpct").FullName;
        try
        {
            string path = Path.Combine(dir, "bad.json");
            await File.WriteAllTextAsync(path, """
                {"subsystems":[{"subsystem":"bdev","config":[
                  {"method":"bdev_malloc_create","params":{"name":"A","num_blocks":8,"block_size":512}},
                  {"method":"bdev_malloc_create","params":{"name":"A","num_blocks":8,"block_size":512}}]}]}
                """);
            var e = await Assert.ThrowsAsync<VhostBackend.App.ApplicationConfigException>(() => TestApp.StartAsync(configFile: path, dir: dir));
            Assert.Contains("config[1]", e.Message);
            Assert.Contains("bdev_malloc_create", e.Message);
            Assert.Contains("-17", e.Message);
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    /// <summary>rpc.py save_config: framework_get_subsystems, then framework_get_config for each.</summary>
    internal static async Task<JsonObject> SaveConfigAsync(RawClient c)
    {
        var subsystems = new JsonArray();
        foreach (var s in (JsonArray)await c.ResultAsync("framework_get_subsystems"))
        {
            string name = (string)s!["subsystem"]!;
            subsystems.Add(new JsonObject { ["subsystem"] = name, ["config"] = (await c.ResultAsync("framework_get_config", new JsonObject { ["name"] = name })).DeepClone() });
        }

        return new JsonObject { ["subsystems"] = subsystems };
    }

    /// <summary>rpc.py load_config: calls allowed now (rpc_get_methods current), framework_start_init if needed, then the rest.</summary>
    internal static async Task LoadConfigAsync(RawClient c, JsonObject config)
    {
        var pending = config["subsystems"]!.AsArray().SelectMany(s => s!["config"]!.AsArray()).Select(e => e!.AsObject()).ToList();
        while (true)
        {
            var allowed = ((JsonArray)await c.ResultAsync("rpc_get_methods", new JsonObject { ["current"] = true })).Select(n => (string)n!).ToHashSet();
            foreach (var call in pending.Where(e => allowed.Contains((string)e["method"]!)).ToList())
            {
                await c.ResultAsync((string)call["method"]!, call["params"]);
                pending.Remove(call);
            }

            if (!allowed.Contains("framework_start_init"))
            {
                break;
            }

            await c.ResultAsync("framework_start_init");
        }

        Assert.Empty(pending);
    }
}
