using System.Text.Json.Nodes;
using Microsoft.Extensions.Logging;
using VhostBackend.Reactors;
using VhostBackend.Rpc;

namespace VhostBackend.Bdev;

/// <summary>
/// What a bdev module gets at <see cref="BdevModule.Init"/>: the application's bdev manager, reactors, RPC method
/// registry, config subsystems and logger factory. Anything else a module needs (a shared memory arena, a device
/// attach function for tests) is passed to its constructor by the host.
/// </summary>
public sealed class BdevModuleContext
{
    public BdevModuleContext(BdevManager bdevs, ReactorRuntime reactors, RpcRegistry rpc, SubsystemRegistry subsystems, ILoggerFactory loggerFactory)
    {
        Bdevs = bdevs;
        Reactors = reactors;
        Rpc = rpc;
        Subsystems = subsystems;
        LoggerFactory = loggerFactory;
    }

    public BdevManager Bdevs { get; }
    public ReactorRuntime Reactors { get; }
    public RpcRegistry Rpc { get; }
    public SubsystemRegistry Subsystems { get; }
    public ILoggerFactory LoggerFactory { get; }
}

/// <summary>
/// A bdev module: SPDK's <c>struct spdk_bdev_module</c>. The host registers each module explicitly, in order
/// (<see cref="BdevManager.AddModule"/>, done by the App's <c>AddBdevModule</c>); the bdev layer then:
/// <list type="bullet">
/// <item><see cref="Init"/> once, at registration, before any config is applied: register RPC methods, create state.</item>
/// <item><see cref="Examine"/> for every bdev registered afterwards (any module's), in module registration order
/// (SPDK's examine_config): a virtual bdev module claims bases here and builds its bdevs on them.</item>
/// <item><see cref="WriteConfig"/> for save_config, in module registration order, into the <c>bdev</c> subsystem:
/// module-level calls (options, controllers, vbdev configs). The layer then writes each registered bdev's own
/// <see cref="Bdev.ConfigCall"/> and its QoS, in bdev registration order, then <c>bdev_wait_for_examine</c>.</item>
/// <item><see cref="FiniAsync"/> at shutdown, in reverse registration order, interleaved with the host's other
/// stop hooks (a module registered after the vhost layer stops before it: the virtio-user module detaches its
/// front ends while their back ends still run). Bdevs still registered afterwards are unregistered by the host.</item>
/// <item><see cref="GetStats"/> for <c>bdev_get_module_stats</c> (ours, not SPDK's).</item>
/// </list>
/// Everything here is control plane (main reactor or thread pool); nothing is called per I/O.
/// </summary>
public abstract class BdevModule
{
    /// <summary>The module's name (SPDK's: "malloc", "null", "aio", "nvme", "passthru"); used as the claim owner.</summary>
    public abstract string Name { get; }

    /// <summary>Registers the module's RPC methods (and anything else it needs) with the application.</summary>
    public abstract void Init(BdevModuleContext context);

    /// <summary>
    /// Releases module-wide state at shutdown (detach controllers, close connections). Called off the reactors:
    /// bdev work goes to the main reactor (<see cref="ReactorRuntime.Main"/>); keep waits bounded (the host gives
    /// each stop hook 20 s).
    /// </summary>
    public virtual Task FiniAsync() => Task.CompletedTask;

    /// <summary>
    /// Appends module-level replayable calls (SPDK's module <c>config_json</c>) to the <c>bdev</c> subsystem config.
    /// Per-bdev calls belong in <see cref="Bdev.ConfigCall"/>. Runs on the main reactor.
    /// </summary>
    public virtual void WriteConfig(JsonArray calls)
    {
    }

    /// <summary>
    /// Called once for every newly registered bdev (SPDK's examine_config), synchronously, after the bdev is
    /// visible. A virtual bdev module claims the bdev (<see cref="BdevManager.Claim"/>) if it is a configured base.
    /// Exceptions are logged and do not stop other modules' examine.
    /// </summary>
    public virtual void Examine(Bdev bdev)
    {
    }

    /// <summary>
    /// Completes when the examines this module started asynchronously are done (a module that must read a bdev
    /// to examine it, such as lvol, cannot finish inside <see cref="Examine"/>). <c>bdev_wait_for_examine</c>
    /// waits for every module's.
    /// </summary>
    public virtual Task WaitForExamineAsync() => Task.CompletedTask;

    /// <summary>Module-specific counters for <c>bdev_get_module_stats</c>; null = none.</summary>
    public virtual JsonObject? GetStats() => null;

    public override string ToString() => Name;
}
