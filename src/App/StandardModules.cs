using VhostBackend.Bdev.Rpc;
using VhostBackend.BdevDelay;
using VhostBackend.BdevError;
using VhostBackend.BdevFile;
using VhostBackend.BdevLvol;
using VhostBackend.BdevMalloc;
using VhostBackend.BdevNull;
using VhostBackend.BdevNvme;
using VhostBackend.BdevPassthru;
using VhostBackend.BdevRaid;
using VhostBackend.BdevSplit;
using VhostBackend.BdevVirtio;
using VhostBackend.Nvmf;
using VhostBackend.Rpc;
using VhostBackend.Vhost;
using VhostBackend.Vhost.Rpc;

namespace VhostBackend.App;

/// <summary>
/// The modules vhostd and bdevperf ship with, registered explicitly (no reflection, no static constructors).
/// Order matters for config: subsystems are initialized and saved in registration order (bdev before vhost), bdev
/// modules write their module-level config and examine new bdevs in registration order, and stop in reverse order.
/// Adding a bdev module: one <c>app.AddBdevModule(new XBdevModule())</c> line here (see docs/DEVELOPING.md).
/// </summary>
public static class StandardModules
{
    public static void Register(Application app)
    {
        FrameworkRpc.Register(app.Dispatcher, app.Subsystems, app.Reactors);
        BdevRpc.Register(app.Rpc, app.Subsystems, app.Bdevs);
        app.AddBdevModule(new MallocBdevModule());
        app.AddBdevModule(new NullBdevModule());
        app.AddBdevModule(new FileBdevModule());
        app.AddBdevModule(new NvmeBdevModule());
        app.AddBdevModule(new PassthruBdevModule());
        app.AddBdevModule(new DelayBdevModule());
        app.AddBdevModule(new ErrorBdevModule());
        app.AddBdevModule(new SplitBdevModule());
        app.AddBdevModule(new RaidBdevModule());
        // After every module whose bdevs can hold an lvstore (examine order), before vhost (stops after it: lvstores
        // are unloaded cleanly once no controller uses their lvols).
        app.AddBdevModule(new LvolModule());

        // The NVMe-oF/TCP target (SPDK's nvmf_tgt): exports bdevs; stops after vhost and before the bdev modules.
        var nvmf = new NvmfTarget(app.Reactors, app.Bdevs, app.LoggerFactory);
        NvmfRpc.Register(app.Rpc, nvmf, app.Subsystems);
        app.OnStop(async () => await nvmf.DisposeAsync().ConfigureAwait(false));

        var vhost = new VhostManager(app.Reactors, app.Bdevs, app.Options.SocketDir, app.LoggerFactory) { SocketOwnership = app.Options.SocketOwnership };
        VhostRpc.Register(app.Rpc, vhost, app.Subsystems);
        VhostMetrics.Register(app.Meter, vhost);
        app.OnStop(async () => await vhost.DisposeAsync().ConfigureAwait(false));

        // Registered after vhost so it stops first (stop hooks and module FiniAsync run in reverse): a virtio-user
        // front end attached to one of our own controllers disconnects before that controller shuts down.
        app.AddBdevModule(new VirtioBdevModule(sharedMemory: () => app.SharedMemory));
    }
}
