using System.Runtime.InteropServices;
using System.Text.Json.Nodes;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Hosting.Systemd;
using Serilog;
using Serilog.Events;
using VhostBackend.App;
using VhostBackend.Reactors;

namespace VhostBackend.Daemon;

public static class Program
{
    public static async Task<int> Main(string[] args)
    {
        DaemonOptions options;
        try
        {
            options = DaemonOptions.Parse(args);
        }
        catch (ApplicationConfigException e)
        {
            Console.Error.WriteLine($"vhostd: {e.Message}");
            return 1;
        }

        if (options.Help)
        {
            Console.WriteLine(DaemonOptions.Usage);
            return 0;
        }

        var logConfig = new LoggerConfiguration()
            .MinimumLevel.Is(options.LogLevel switch
            {
                "error" => LogEventLevel.Error,
                "warning" => LogEventLevel.Warning,
                "debug" => LogEventLevel.Debug,
                "trace" => LogEventLevel.Verbose,
                _ => LogEventLevel.Information,
            })
            .MinimumLevel.Override("Microsoft", LogEventLevel.Warning)
            // A start-up config error is reported once, by Main, without the host's "failed to start" stack trace.
            .Filter.ByExcluding(e => e.Exception is ApplicationConfigException && Serilog.Filters.Matching.FromSource("Microsoft.Extensions.Hosting")(e))
            .WriteTo.Console(outputTemplate: "[{Timestamp:HH:mm:ss.fff} {Level:u3}] {SourceContext}: {Message:lj}{NewLine}{Exception}", standardErrorFromLevel: LogEventLevel.Verbose);
        if (options.LogFile is { } logFile)
        {
            logConfig = logConfig.WriteTo.File(logFile);
        }

        Log.Logger = logConfig.CreateLogger();
        try
        {
            if (options.UseEmbeddedDefault)
            {
                options.App.Config = EmbeddedDefault.Prepare(options);
            }

            var builder = Host.CreateApplicationBuilder(new HostApplicationBuilderSettings { Args = [], DisableDefaults = true });
            builder.Services.AddSerilog();
            builder.Services.Configure<HostOptions>(h => h.ShutdownTimeout = TimeSpan.FromSeconds(30));
            builder.Services.AddSingleton(options);
            builder.Services.AddHostedService<DaemonService>();
            AddServiceManagerNotification(builder.Services);
            using var host = builder.Build();
            // SystemdLifetime (under NOTIFY_SOCKET) handles SIGTERM only: without these, Ctrl-C or `systemctl kill
            // -s INT` would end the process without the drain. With the console lifetime this is a second handler
            // of the same request, which is harmless.
            var lifetime = host.Services.GetRequiredService<IHostApplicationLifetime>();
            using var sigint = PosixSignalRegistration.Create(PosixSignal.SIGINT, c => { c.Cancel = true; lifetime.StopApplication(); });
            using var sigquit = PosixSignalRegistration.Create(PosixSignal.SIGQUIT, c => { c.Cancel = true; lifetime.StopApplication(); });
            await host.RunAsync().ConfigureAwait(false);
            return 0;
        }
        catch (ApplicationConfigException e)
        {
            Log.Error("vhostd: {Message}", e.Message);
            Console.Error.WriteLine($"vhostd: {e.Message}");
            return 1;
        }
        catch (Exception e)
        {
            Log.Fatal(e, "vhostd failed");
            return 1;
        }
        finally
        {
            await Log.CloseAndFlushAsync().ConfigureAwait(false);
        }
    }

    /// <summary>
    /// systemd Type=notify: the host's <see cref="SystemdLifetime"/> sends READY=1 when the host raises
    /// ApplicationStarted, which comes after every hosted service's StartAsync has returned, i.e. after
    /// <see cref="DaemonService"/> awaited <see cref="Application.StartAsync"/> (RPC socket listening, config
    /// applied, controllers' sockets listening); and STOPPING=1 on SIGTERM before the drain. UseSystemd/AddSystemd
    /// switches to it only when the parent process is systemd; a service started through a wrapper, or by any
    /// supervisor speaking sd_notify, is recognised by NOTIFY_SOCKET alone, as sd_notify(3) does.
    /// </summary>
    private static void AddServiceManagerNotification(IServiceCollection services)
    {
        services.AddSystemd();
        if (!SystemdHelpers.IsSystemdService() && !string.IsNullOrEmpty(Environment.GetEnvironmentVariable("NOTIFY_SOCKET")))
        {
            services.AddSingleton<ISystemdNotifier, SystemdNotifier>();
            services.AddSingleton<IHostLifetime, SystemdLifetime>();
        }
    }
}

/// <summary>Runs the application inside the generic host: start on host start, drain and stop on SIGTERM/SIGINT.</summary>
internal sealed class DaemonService : IHostedService
{
    private readonly DaemonOptions _options;
    private readonly Microsoft.Extensions.Logging.ILoggerFactory _loggerFactory;
    private Application? _app;

    public DaemonService(DaemonOptions options, Microsoft.Extensions.Logging.ILoggerFactory loggerFactory)
    {
        _options = options;
        _loggerFactory = loggerFactory;
    }

    public async Task StartAsync(CancellationToken cancellationToken)
    {
        var log = Log.ForContext("SourceContext", "vhostd");
        try
        {
            _app = new Application(_options.App, _loggerFactory);
            VhostBackend.Reactors.Reactor.UnhandledException += (r, e) => log.Error(e, "unhandled exception on {Reactor}", r.Name);
            StandardModules.Register(_app);
            await _app.StartAsync().ConfigureAwait(false);
            if (_options.UseEmbeddedDefault && !_options.App.WaitForRpc)
            {
                EmbeddedDefault.PrintUsage(_options, log);
            }

            log.Information("vhostd ready (pid {Pid})", Environment.ProcessId);
        }
        catch (ApplicationConfigException)
        {
            // Rethrown so the host never raises ApplicationStarted: under systemd no READY=1 is sent for a daemon
            // that failed to start (Main prints the error and exits 1).
            if (_app is not null)
            {
                await _app.StopAsync().ConfigureAwait(false);
                _app = null;
            }

            throw;
        }
    }

    public async Task StopAsync(CancellationToken cancellationToken)
    {
        if (_app is not null)
        {
            Log.Information("vhostd: stopping (draining outstanding I/O)");
            await _app.StopAsync().ConfigureAwait(false);
        }
    }
}
