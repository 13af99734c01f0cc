using System.Diagnostics;
using System.Text.Json.Nodes;
using VhostBackend.Rpc;
using Xunit;

namespace VhostBackend.Rpc.Tests;

/// <summary>
/// --persist-config: the running config is kept in a file after every change over RPC, and a restarted daemon
/// comes back from it (not from the seed config).
/// </summary>
public sealed class PersistConfigTests
{
    private static JsonObject Seed(string bdev) => new()
    {
        ["subsystems"] = new JsonArray(new JsonObject
        {
            ["subsystem"] = "bdev",
            ["config"] = new JsonArray(Subsystem.Call("bdev_malloc_create", new JsonObject { ["name"] = bdev, ["num_blocks"] = 128, ["block_size"] = 512 })),
        }),
    };

    [Fact]
    public async Task RunningConfigSurvivesARestart()
    {
        string dir = Directory.CreateTempSubdirectory("persist").FullName;
        string file = Path.Combine(dir, "running.json");
        try
        {
            await using (var app = await TestApp.StartAsync(config: Seed("Seed0"), persistConfig: file))
            {
                // Written once the seed config is applied.
                Assert.Contains("Seed0", await WaitForFile(file, "Seed0"));
                long writes = app.App.Persistence!.Writes;

                await using var c = await app.ConnectAsync();
                await c.ResultAsync("bdev_null_create", new JsonObject { ["name"] = "N0", ["num_blocks"] = 256, ["block_size"] = 512 });
                await c.ResultAsync("vhost_create_blk_controller", new JsonObject { ["ctrlr"] = "persist.0", ["dev_name"] = "N0" });
                await c.ResultAsync("bdev_set_qos_limit", new JsonObject { ["name"] = "N0", ["rw_ios_per_sec"] = 5000 });
                string text = await WaitForFile(file, "persist.0");
                await app.App.Persistence.FlushAsync();
                text = await File.ReadAllTextAsync(file);

                // The file is exactly what save_config reports, complete (never a torn write, no temp file left).
                Assert.True(JsonNode.DeepEquals(JsonNode.Parse(text), await ConfigRoundTripTests.SaveConfigAsync(c)), text);
                Assert.False(File.Exists(file + ".tmp"));

                // Getters and failed calls do not rewrite it.
                long before = app.App.Persistence.Writes;
                Assert.True(before > writes);
                await c.ResultAsync("bdev_get_bdevs");
                await c.ResultAsync("vhost_get_controllers");
                await c.ErrorAsync("bdev_malloc_delete", new JsonObject { ["name"] = "nope" }, -19);
                await Task.Delay(300);
                await app.App.Persistence.FlushAsync();
                Assert.Equal(before, app.App.Persistence.Writes);

                // A delete is a change too.
                await c.ResultAsync("bdev_malloc_delete", new JsonObject { ["name"] = "Seed0" });
                await WaitForFile(file, "Seed0", present: false);
            }

            // Shutdown (which unregisters everything) is not a change: the file still has the running state.
            string kept = await File.ReadAllTextAsync(file);
            Assert.Contains("persist.0", kept);
            Assert.Contains("N0", kept);

            // Restart with a different seed: the persisted state wins.
            await using (var again = await TestApp.StartAsync(config: Seed("Other"), persistConfig: file))
            {
                await using var c = await again.ConnectAsync();
                var n0 = (JsonArray)await c.ResultAsync("bdev_get_bdevs", new JsonObject { ["name"] = "N0" });
                Assert.Equal(5000, (long)n0[0]!["assigned_rate_limits"]!["rw_ios_per_sec"]!);
                await c.ErrorAsync("bdev_get_bdevs", new JsonObject { ["name"] = "Other" }, -19);
                await c.ErrorAsync("bdev_get_bdevs", new JsonObject { ["name"] = "Seed0" }, -19);
                var ctrls = (JsonArray)await c.ResultAsync("vhost_get_controllers");
                Assert.Contains(ctrls, x => (string?)x!["ctrlr"] == "persist.0");
                Assert.True(again.Logs.Contains("starting from the persisted config"));
            }
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    [Fact]
    public async Task AConfigThatFailsToApplyLeavesThePersistedFileAlone()
    {
        string dir = Directory.CreateTempSubdirectory("persist").FullName;
        string file = Path.Combine(dir, "running.json");
        try
        {
            // A persisted file naming a bdev twice cannot be applied: start fails and the file is not overwritten
            // with the half that was applied.
            var bad = Seed("Dup");
            bad["subsystems"]![0]!["config"]!.AsArray().Add(Subsystem.Call("bdev_malloc_create", new JsonObject { ["name"] = "Dup", ["num_blocks"] = 128, ["block_size"] = 512 }));
            string text = bad.ToJsonString();
            await File.WriteAllTextAsync(file, text);
            await Assert.ThrowsAnyAsync<Exception>(async () =>
            {
                await using var app = await TestApp.StartAsync(persistConfig: file);
            });
            Assert.Equal(text, await File.ReadAllTextAsync(file));
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    private static async Task<string> WaitForFile(string file, string text, bool present = true)
    {
        var sw = Stopwatch.StartNew();
        string last = "";
        while (sw.Elapsed < TimeSpan.FromSeconds(10))
        {
            if (File.Exists(file))
            {
                last = await File.ReadAllTextAsync(file);
                if (last.Contains(text, StringComparison.Ordinal) == present)
                {
                    return last;
                }
            }

            await Task.Delay(50);
        }

        Assert.Fail($"{file} {(present ? "never contained" : "still contains")} '{text}': {last}");
        return last;
    }
}
