using System.Diagnostics;
using System.Text.Json.Nodes;
using Xunit;

namespace VhostBackend.Rpc.Tests;

/// <summary>The reactors' longest loop iteration (max_iteration_us) and framework_reset_max_iteration (our extensions).</summary>
public sealed class MaxIterationTests
{
    private static double MaxUs(JsonNode reactorsResult) =>
        ((JsonArray)reactorsResult["reactors"]!).Max(r => (double)r!["max_iteration_us"]!);

    [Fact]
    public async Task A_Long_Iteration_Shows_Up_And_A_Reset_Starts_A_New_Window()
    {
        await using var app = await TestApp.StartAsync();
        await using var c = await app.ConnectAsync();

        // One message that keeps the main reactor busy for 50 ms: that iteration is at least 50 ms long.
        await app.App.Reactors.Main.InvokeAsync(() =>
        {
            var sw = Stopwatch.StartNew();
            while (sw.ElapsedMilliseconds < 50)
            {
                Thread.SpinWait(100);
            }
        });
        // The value covers finished iterations: an RPC handled in the same message batch as the spin still sees the
        // old one, so ask until the iteration has ended (a tracker that records nothing never gets there).
        var r = await c.ResultAsync("framework_get_reactors");
        for (int i = 0; i < 50 && MaxUs(r) < 45_000; i++)
        {
            await Task.Delay(20);
            r = await c.ResultAsync("framework_get_reactors");
        }

        Assert.True(MaxUs(r) >= 45_000, $"max_iteration_us {MaxUs(r)} after a 50 ms iteration");
        foreach (var reactor in (JsonArray)r["reactors"]!)
        {
            Assert.True((long)reactor!["max_iteration_ticks"]! >= 0);
        }

        var threads = (JsonArray)(await c.ResultAsync("thread_get_stats"))["threads"]!;
        Assert.Contains(threads, t => t!["max_iteration_us"] is not null);

        Assert.True((bool)(await c.ResultAsync("framework_reset_max_iteration"))!);
        var after = MaxUs(await c.ResultAsync("framework_get_reactors"));
        Assert.True(after < 45_000, $"max_iteration_us {after} after framework_reset_max_iteration");

        await c.ErrorAsync("framework_reset_max_iteration", new JsonObject { ["x"] = 1 }, -32602);
    }
}
