using System.Diagnostics.Metrics;
using Xunit;

namespace VhostBackend.Reactors.Tests;

/// <summary>The reactors' observable instruments (<see cref="ReactorMetrics"/>) read through a <see cref="MeterListener"/>.</summary>
public class ReactorMetricsTests
{
    [Fact]
    public async Task Busy_Idle_Time_Messages_And_Pollers_Are_Reported_Per_Reactor()
    {
        await using var rt = TestRuntime.Start(1);
        var r = rt.Main;
        using var meter = new Meter("test.reactor." + Guid.NewGuid());
        ReactorMetrics.Register(meter, rt);
        var values = new Dictionary<string, double>();
        using var listener = new MeterListener
        {
            InstrumentPublished = (i, l) =>
            {
                if (ReferenceEquals(i.Meter, meter))
                {
                    l.EnableMeasurementEvents(i);
                }
            },
        };
        void Add(Instrument i, double v, ReadOnlySpan<KeyValuePair<string, object?>> tags)
        {
            string key = i.Name;
            foreach (var t in tags)
            {
                key += $"|{t.Key}={t.Value}";
            }

            values[key] = v;
        }

        listener.SetMeasurementEventCallback<double>((i, v, t, _) => Add(i, v, t));
        listener.SetMeasurementEventCallback<long>((i, v, t, _) => Add(i, v, t));
        listener.SetMeasurementEventCallback<int>((i, v, t, _) => Add(i, v, t));
        listener.Start();

        listener.RecordObservableInstruments();
        string tag = "reactor=" + r.Name;
        double busy0 = values[$"vhost.reactor.time|{tag}|state=busy"];
        double idle0 = values[$"vhost.reactor.time|{tag}|state=idle"];
        double messages0 = values[$"vhost.reactor.messages|{tag}"];
        double pollers0 = values[$"vhost.reactor.pollers|{tag}"];

        // ~50 ms of a poller that always reports work, then 200 messages.
        long until = Environment.TickCount64 + 50;
        var poller = await r.InvokeAsync(() => r.RegisterPoller("busy", static s =>
        {
            Thread.SpinWait(200);
            return 1;
        }, null));
        listener.RecordObservableInstruments();
        Assert.Equal(pollers0 + 1, values[$"vhost.reactor.pollers|{tag}"]);
        while (Environment.TickCount64 < until)
        {
            await Task.Delay(5);
        }

        await r.InvokeAsync(() => r.UnregisterPoller(poller));
        for (int i = 0; i < 200; i++)
        {
            await r.InvokeAsync(() => { });
        }

        await Task.Delay(20); // idle iterations
        listener.RecordObservableInstruments();
        double busy = values[$"vhost.reactor.time|{tag}|state=busy"] - busy0;
        double idle = values[$"vhost.reactor.time|{tag}|state=idle"] - idle0;
        Assert.True(busy >= 0.03, $"busy time grew by {busy} s over ~50 ms of a busy poller");
        Assert.True(idle > 0, "idle time did not grow");
        Assert.True(busy + idle < 10, $"busy {busy} s + idle {idle} s: not seconds");
        Assert.True(values[$"vhost.reactor.messages|{tag}"] - messages0 >= 200);
        Assert.Equal(pollers0, values[$"vhost.reactor.pollers|{tag}"]);
    }
}
