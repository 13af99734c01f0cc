using System.Diagnostics.Metrics;
using VhostBackend.Platform;

namespace VhostBackend.Reactors;

/// <summary>
/// The reactors' instruments on the application's <see cref="Meter"/>. Observable only: they read the statistics
/// each reactor already keeps for framework_get_reactors and thread_get_stats (written by the reactor thread, read
/// racily by the collecting thread: aligned 64-bit values, never torn), so a reactor's loop does nothing more.
/// </summary>
public static class ReactorMetrics
{
    /// <summary>Creates the reactor instruments on <paramref name="meter"/> for every reactor of <paramref name="runtime"/>.</summary>
    public static void Register(Meter meter, ReactorRuntime runtime)
    {
        meter.CreateObservableCounter("vhost.reactor.time", () => Time(runtime), "s",
            "time spent in loop iterations that did work (state=busy) or found none (state=idle, including sleep), by reactor; the busy rate is the reactor's load (1 = 100%)");
        meter.CreateObservableCounter("vhost.reactor.messages", () => Messages(runtime), "{message}",
            "messages run by the reactor, by reactor");
        meter.CreateObservableUpDownCounter("vhost.reactor.pollers", () => Pollers(runtime), "{poller}",
            "registered pollers, by reactor");
    }

    private static KeyValuePair<string, object?> Tag(Reactor r) => new("reactor", r.Name);

    private static IEnumerable<Measurement<double>> Time(ReactorRuntime runtime)
    {
        double f = Ticks.Frequency;
        foreach (var r in runtime.Reactors)
        {
            yield return new(r.BusyTicks / f, Tag(r), new("state", "busy"));
            yield return new(r.IdleTicks / f, Tag(r), new("state", "idle"));
        }
    }

    private static IEnumerable<Measurement<long>> Messages(ReactorRuntime runtime)
    {
        foreach (var r in runtime.Reactors)
        {
            yield return new(r.MessagesHandled, Tag(r));
        }
    }

    private static IEnumerable<Measurement<int>> Pollers(ReactorRuntime runtime)
    {
        foreach (var r in runtime.Reactors)
        {
            yield return new(r.Pollers.Count, Tag(r));
        }
    }
}
