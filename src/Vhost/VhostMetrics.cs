using System.Diagnostics.Metrics;

namespace VhostBackend.Vhost;

/// <summary>
/// The vhost controllers' instruments on the application's <see cref="Meter"/>. Observable only, read on the
/// collecting thread from control-plane state (session and queue lists, under the controller's own locks, which
/// queues take only when they start or stop) and from the queues' in-flight counts (racy reads of ints).
/// </summary>
public static class VhostMetrics
{
    /// <summary>Creates the controller instruments on <paramref name="meter"/> for every controller of <paramref name="manager"/>.</summary>
    public static void Register(Meter meter, VhostManager manager)
    {
        meter.CreateObservableUpDownCounter("vhost.controller.sessions", () => Sessions(manager), "{session}",
            "connected front ends (vhost-user sessions), by controller and type (vhost_blk, vhost_scsi)");
        meter.CreateObservableUpDownCounter("vhost.controller.queues", () => Queues(manager), "{queue}",
            "virtqueues running on a reactor, over all sessions, by controller and type");
        meter.CreateObservableUpDownCounter("vhost.controller.inflight", () => InFlight(manager), "{request}",
            "guest requests taken from the rings and not completed yet, by controller and type");
    }

    private static IEnumerable<Measurement<int>> Sessions(VhostManager manager)
    {
        foreach (var c in manager.Controllers)
        {
            yield return new(c.Sessions.Count, new("controller", c.Name), new("type", c.TypeName));
        }
    }

    private static IEnumerable<Measurement<int>> Queues(VhostManager manager)
    {
        foreach (var c in manager.Controllers)
        {
            yield return new(c.RunningQueues, new("controller", c.Name), new("type", c.TypeName));
        }
    }

    private static IEnumerable<Measurement<int>> InFlight(VhostManager manager)
    {
        foreach (var c in manager.Controllers)
        {
            int n = 0;
            foreach (var s in c.Sessions)
            {
                n += s.InFlight;
            }

            yield return new(n, new("controller", c.Name), new("type", c.TypeName));
        }
    }
}
