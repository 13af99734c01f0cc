using System.Text.Json.Nodes;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
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
            using var host = builder.Build();
            await host.RunAsync().ConfigureAwait(false);
            return DaemonService.ExitCode;
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
}

/// <summary>Runs the application inside the generic host: start on host start, drain and stop on SIGTERM/SIGINT.</summary>
internal sealed class DaemonService : IHostedService
{
    private readonly DaemonOptions _options;
    private readonly IHostApplicationLifetime _lifetime;
    private readonly Microsoft.Extensions.Logging.ILoggerFactory _loggerFactory;
    private Application? _app;

    public DaemonService(DaemonOptions options, IHostApplicationLifetime lifetime, Microsoft.Extensions.Logging.ILoggerFactory loggerFactory)
    {
        _options = options;
        _lifetime = lifetime;
        _loggerFactory = loggerFactory;
    }

    public static int ExitCode { get; private set; }

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
        catch (ApplicationConfigException e)
        {
            Console.Error.WriteLine($"vhostd: {e.Message}");
            log.Error("{Message}", e.Message);
            ExitCode = 1;
            if (_app is not null)
            {
                await _app.StopAsync().ConfigureAwait(false);
                _app = null;
            }

            _lifetime.StopApplication();
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
