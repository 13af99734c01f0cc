using System.Diagnostics.Metrics;
using Microsoft.Extensions.Logging;
using VhostBackend.Bdev;
using VhostBackend.Platform;
using VhostBackend.Reactors;
using VhostBackend.Rpc;

namespace VhostBackend.App;

/// <summary>
/// The application framework shared by vhostd and bdevperf (SPDK's lib/event "app"): reactors on the core
/// mask, the bdev manager, the RPC method registry and subsystems, the JSON-RPC server and the JSON config.
/// Modules are registered explicitly by the host (<see cref="StandardModules"/>), never by reflection.
/// </summary>
public sealed class Application : IAsyncDisposable
{
    private readonly ILoggerFactory _loggerFactory;
    private readonly ILogger _logger;
    private readonly List<Func<Task>> _stopHooks = new();
    private JsonRpcServer? _server;
    private ConfigPersistence? _persistence;
    private bool _started;
    private readonly Lazy<SharedMemoryArena> _sharedMemory;

    public Application(ApplicationOptions options, ILoggerFactory loggerFactory)
    {
        Options = options;
        _sharedMemory = new(() => SharedMemoryArena.Create("vhostbackend-io", options.SharedMemoryBytes));
        _loggerFactory = loggerFactory;
        _logger = loggerFactory.CreateLogger("app");
        try
        {
            Reactors = new ReactorRuntime(options.CpuMask, options.Reactor);
        }
        catch (ArgumentException e)
        {
            throw new ApplicationConfigException($"-m/--cpumask: {e.Message}", e);
        }

        Bdevs = new BdevManager(loggerFactory.CreateLogger("bdev"));
        Meter = new Meter(MeterName, $"{ProductVersion.Major}.{ProductVersion.Minor}.{ProductVersion.Patch}");
        ReactorMetrics.Register(Meter, Reactors);
        BdevMetrics.Register(Meter, Bdevs);
        // Always start in the STARTUP state: the config's startup-time calls run first, then framework_start_init.
        Dispatcher = new RpcDispatcher(Rpc, Reactors.Main, RpcStates.Startup, loggerFactory.CreateLogger("rpc"));
    }

    public ApplicationOptions Options { get; }
    public ReactorRuntime Reactors { get; }
    public BdevManager Bdevs { get; }
    public RpcRegistry Rpc { get; } = new();
    public SubsystemRegistry Subsystems { get; } = new();
    public RpcDispatcher Dispatcher { get; }

    public ILoggerFactory LoggerFactory => _loggerFactory;

    /// <summary>The name of <see cref="Meter"/>: <c>dotnet-counters monitor -n vhostd --counters VhostBackend</c>.</summary>
    public const string MeterName = "VhostBackend";

    /// <summary>
    /// The application's instruments (System.Diagnostics.Metrics, all observable: reactors, bdevs, and what modules
    /// add, e.g. vhost controllers); see docs/OPERATIONS.md. Disposed at stop.
    /// </summary>
    public Meter Meter { get; }

    /// <summary>
    /// Memory for I/O buffers shared with vhost-user back ends (created on first use): what the virtio-user bdev
    /// sends in SET_MEM_TABLE so buffers allocated here (bdevperf's) go to the back end without a copy.
    /// </summary>
    public SharedMemoryArena SharedMemory => _sharedMemory.Value;

    /// <summary>The running-config file keeper when <see cref="ApplicationOptions.PersistConfigFile"/> is set.</summary>
    public ConfigPersistence? Persistence => _persistence;

    /// <summary>The JSON-RPC server while started with an RPC socket, else null.</summary>
    public JsonRpcServer? RpcServer => _server;

    /// <summary>
    /// Registers a bdev module (SPDK's SPDK_BDEV_MODULE_REGISTER, done explicitly): adds it to the bdev layer's
    /// examine and save_config lists, calls its <see cref="BdevModule.Init"/> (its RPC methods), and runs its
    /// <see cref="BdevModule.FiniAsync"/> at stop among the other stop hooks, in reverse registration order.
    /// </summary>
    public T AddBdevModule<T>(T module)
        where T : BdevModule
    {
        Bdevs.AddModule(module);
        module.Init(new BdevModuleContext(Bdevs, Reactors, Rpc, Subsystems, _loggerFactory));
        OnStop(module.FiniAsync);
        return module;
    }

    /// <summary>Runs at stop, in reverse registration order (controllers before bdevs).</summary>
    public void OnStop(Func<Task> hook) => _stopHooks.Add(hook);

    /// <summary>
    /// Starts reactors and the RPC server, then applies the config and initializes the framework (with
    /// --wait-for-rpc: the startup-time calls now, the rest after framework_start_init arrives over RPC).
    /// Config errors are thrown as <see cref="ApplicationConfigException"/>.
    /// </summary>
    public async Task StartAsync()
    {
        _started = true;
        Reactors.Start();
        _logger.LogInformation("{Count} reactor(s) started on cores {Mask} ({Mode} mode)", Reactors.Reactors.Count, Options.CpuMask, Options.Reactor.Mode);
        if (!string.IsNullOrEmpty(Options.RpcSocket))
        {
            _server = new JsonRpcServer(Dispatcher, _loggerFactory.CreateLogger("rpc")) { SocketOwnership = Options.SocketOwnership };
            try
            {
                await _server.StartAsync(Options.RpcSocket).ConfigureAwait(false);
            }
            catch (Exception e) when (e is IOException or InvalidOperationException or System.Net.Sockets.SocketException or UnauthorizedAccessException)
            {
                throw new ApplicationConfigException($"-r/--rpc-socket {Options.RpcSocket}: {e.Message}", e);
            }

            _logger.LogInformation("JSON-RPC listening on {Path}", Options.RpcSocket);
        }

        if (Options.PersistConfigFile is { } persist)
        {
            try
            {
                _persistence = new ConfigPersistence(persist, Dispatcher, Subsystems, _loggerFactory.CreateLogger("config"));
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException or ArgumentException or NotSupportedException)
            {
                throw new ApplicationConfigException($"--persist-config {persist}: {e.Message}", e);
            }

            if (File.Exists(_persistence.FilePath))
            {
                _logger.LogInformation("starting from the persisted config {Path}{Ignored}", _persistence.FilePath,
                    Options.ConfigFile is { } seed ? $" (not {seed}, which seeds the first start only)" : "");
                Options.ConfigFile = _persistence.FilePath;
                Options.Config = null;
            }
        }

        // Persistence is armed once the whole start-up config is in: the calls replayed from a config are not
        // changes, and a snapshot taken half-way would overwrite the persisted file with part of it. A config
        // that fails to apply never arms it (the file stays as it was).
        if (Options.ConfigFile is null && Options.Config is null)
        {
            if (!Options.WaitForRpc)
            {
                await Dispatcher.StartInitAsync().ConfigureAwait(false);
                await ArmPersistenceAsync().ConfigureAwait(false);
            }
            else
            {
                _ = Dispatcher.Initialized.ContinueWith(_ => ArmPersistenceAsync(), TaskScheduler.Default);
            }

            return;
        }

        Task load = Options.ConfigFile is { } path
            ? JsonConfig.LoadFileAsync(path, Dispatcher, Subsystems, startInit: !Options.WaitForRpc)
            : JsonConfig.LoadAsync(Options.Config, Dispatcher, Subsystems, startInit: !Options.WaitForRpc);
        Dispatcher.StartupConfig = load;
        if (Options.WaitForRpc)
        {
            _logger.LogInformation("waiting for framework_start_init over RPC");
            _ = load.ContinueWith(t => _logger.LogError(t.Exception!.GetBaseException(), "applying the config after framework_start_init failed"), TaskContinuationOptions.OnlyOnFaulted);
            _ = load.ContinueWith(_ => ArmPersistenceAsync(), TaskContinuationOptions.OnlyOnRanToCompletion);
            return;
        }

        try
        {
            await load.ConfigureAwait(false);
        }
        catch (JsonConfigException e)
        {
            throw new ApplicationConfigException(Options.ConfigFile is null ? $"embedded config: {e.Message}" : e.Message, e);
        }

        _logger.LogInformation("config applied ({Source})", Options.ConfigFile ?? "embedded default");
        await ArmPersistenceAsync().ConfigureAwait(false);
    }

    private Task ArmPersistenceAsync() => _persistence?.ArmAsync() ?? Task.CompletedTask;

    /// <summary>Stops controllers and modules (hooks), closes bdevs, stops the RPC server and the reactors.</summary>
    public async Task StopAsync()
    {
        if (!_started)
        {
            Meter.Dispose();
            return;
        }

        _started = false;
        if (_server is not null)
        {
            await _server.StopAsync().ConfigureAwait(false);
        }

        if (_persistence is not null)
        {
            // What shutdown removes is not a change to keep; a save still running finishes first.
            _persistence.Dispose();
            await _persistence.FlushAsync().ConfigureAwait(false);
        }

        for (int i = _stopHooks.Count - 1; i >= 0; i--)
        {
            try
            {
                await _stopHooks[i]().WaitAsync(TimeSpan.FromSeconds(20)).ConfigureAwait(false);
            }
            catch (Exception e)
            {
                _logger.LogError(e, "error while stopping");
            }
        }

        foreach (var bdev in Bdevs.All.Reverse())
        {
            try
            {
                // The Func<Task<T>> overload: the unregister itself is awaited, not just its start on the reactor.
                await Reactors.Main.InvokeAsync(async () =>
                {
                    await Bdevs.UnregisterAsync(bdev, TimeSpan.FromSeconds(10)).ConfigureAwait(true);
                    return true;
                }).ConfigureAwait(false);
            }
            catch (Exception e)
            {
                _logger.LogError(e, "error while removing bdev {Name}", bdev.Name);
            }
        }

        await Reactors.DisposeAsync().ConfigureAwait(false);
        Meter.Dispose();
        if (_sharedMemory.IsValueCreated)
        {
            _sharedMemory.Value.Dispose();
        }

        _logger.LogInformation("stopped");
    }

    public async ValueTask DisposeAsync() => await StopAsync().ConfigureAwait(false);
}
