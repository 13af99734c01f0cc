using System.Diagnostics.Metrics;
using System.Text.Json.Nodes;
using VhostBackend.App;
using Xunit;

namespace VhostBackend.Rpc.Tests;

/// <summary>The application's meter ("VhostBackend", what dotnet-counters monitors) carries the reactor, bdev and vhost instruments.</summary>
public sealed class AppMetricsTests
{
    [Fact]
    public async Task The_VhostBackend_Meter_Reports_Reactors_Bdevs_And_Controllers()
    {
        await using var app = await TestApp.StartAsync();
        await using var client = await app.ConnectAsync();
        await client.ResultAsync("bdev_malloc_create", new JsonObject { ["name"] = "Met0", ["num_blocks"] = 64, ["block_size"] = 512 });
        await client.ResultAsync("vhost_create_blk_controller", new JsonObject { ["ctrlr"] = "metc", ["dev_name"] = "Met0" });

        Assert.Equal("VhostBackend", Application.MeterName);
        Assert.Equal(Application.MeterName, app.App.Meter.Name);
        var seen = new List<string>();
        using var listener = new MeterListener
        {
            InstrumentPublished = (i, l) =>
            {
                if (ReferenceEquals(i.Meter, app.App.Meter))
                {
                    l.EnableMeasurementEvents(i);
                }
            },
        };
        void Add(Instrument i, ReadOnlySpan<KeyValuePair<string, object?>> tags)
        {
            string key = i.Name;
            foreach (var t in tags)
            {
                key += $"|{t.Key}={t.Value}";
            }

            lock (seen)
            {
                seen.Add(key);
            }
        }

        listener.SetMeasurementEventCallback<long>((i, _, t, _) => Add(i, t));
        listener.SetMeasurementEventCallback<int>((i, _, t, _) => Add(i, t));
        listener.SetMeasurementEventCallback<double>((i, _, t, _) => Add(i, t));
        listener.Start();
        listener.RecordObservableInstruments();

        Assert.Contains("vhost.reactor.time|reactor=reactor_0|state=busy", seen);
        Assert.Contains("vhost.bdev.operations|bdev=Met0|op=read", seen);
        Assert.Contains("vhost.bdev.queue_depth|bdev=Met0", seen);
        Assert.Contains("vhost.controller.sessions|controller=metc|type=vhost_blk", seen);
        Assert.Contains("vhost.controller.queues|controller=metc|type=vhost_blk", seen);

        // Stopping the application disposes the meter: nothing is reported any more.
        await app.StopAsync();
        seen.Clear();
        listener.RecordObservableInstruments();
        Assert.Empty(seen);
    }
}
