using VhostBackend.Bdev.Rpc;

namespace VhostBackend.App;

/// <summary>The modules vhostd and bdevperf ship with, registered explicitly (no reflection, no static constructors).</summary>
public static class StandardModules
{
    public static void Register(Application app)
    {
        FrameworkRpc.Register(app);
        BdevRpc.Register(app.Rpc, app.Subsystems, app.Bdevs);
    }
}
