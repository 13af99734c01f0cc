namespace VhostBackend.Reactors;

/// <summary>
/// A poller's body: does a bounded amount of work and returns how many items it handled
/// (0 = idle, &gt; 0 = busy). Runs on its reactor's thread only.
/// </summary>
public delegate int PollerFn(object? context);

/// <summary>
/// Arms or disarms a poller's interrupt source when its reactor switches mode. Arming returns true when work
/// arrived while arming (the reactor then does not sleep). Example: a virtqueue clears VRING_USED_F_NO_NOTIFY
/// on arm and re-checks its avail ring.
/// </summary>
public delegate bool PollerInterruptFn(object? context, bool arm);

/// <summary>A registered poller. Created by <see cref="Reactor.RegisterPoller"/>; owned by that reactor.</summary>
public sealed class Poller
{
    internal Poller(Reactor reactor, string name, PollerFn fn, object? context, long periodTicks)
    {
        Reactor = reactor;
        Name = name;
        Fn = fn;
        Context = context;
        PeriodTicks = periodTicks;
    }

    public Reactor Reactor { get; }
    public string Name { get; }
    internal PollerFn Fn { get; }
    public object? Context { get; }

    /// <summary>The period in <see cref="VhostBackend.Platform.Ticks"/> (0: runs every iteration).</summary>
    public long PeriodTicks { get; }
    internal long NextRunTicks;

    /// <summary>Period in microseconds; 0 for a poller that runs every iteration.</summary>
    public ulong PeriodMicroseconds => (ulong)Math.Round(VhostBackend.Platform.Ticks.ToMicroseconds(PeriodTicks));

    public long RunCount { get; internal set; }
    public long BusyCount { get; internal set; }
    public bool IsRegistered { get; internal set; }

    /// <summary>File descriptor that wakes the reactor in interrupt mode (-1: none).</summary>
    internal int InterruptFd = -1;
    internal PollerInterruptFn? InterruptFn;
}
