using VhostBackend.Reactors;

namespace VhostBackend.Bdev;

/// <summary>An I/O device with no per-thread state, for modules that complete I/O inline (malloc, null).</summary>
public sealed class StatelessDevice : IoDevice
{
    public static readonly StatelessDevice Instance = new();

    private StatelessDevice()
        : base("stateless")
    {
    }

    protected override object CreateChannelContext(Reactor reactor) => this;

    protected override void DestroyChannelContext(Reactor reactor, object context)
    {
    }
}
