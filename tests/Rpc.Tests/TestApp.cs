using System.Collections.Concurrent;
using System.Text.Json.Nodes;
using Microsoft.Extensions.Logging;
using VhostBackend.App;
using VhostBackend.Platform;
using VhostBackend.Reactors;

namespace VhostBackend.Rpc.Tests;

/// <summary>
/// A real in-process <see cref="Application"/> with the standard modules, listening on a private RPC socket,
/// with its own vhost socket directory (everything under one temp directory, removed on dispose).
/// </summary>
internal sealed class TestApp : IAsyncDisposable
{
    private TestApp(Application app, string dir)
    {
        App = app;
        Dir = dir;
    }

    public Application App { get; }

    /// <summary>The private temp directory (RPC socket, vhost sockets, scratch files).</summary>
    public string Dir { get; }

    public string RpcSocket => App.Options.RpcSocket!;

    public TestLogs Logs => (TestLogs)App.LoggerFactory;

    /// <summary>
    /// Starts an application; <paramref name="dir"/> reuses a directory (a restart), else a fresh one;
    /// <paramref name="configure"/> registers more modules after the standard ones (test models).
    /// </summary>
    public static async Task<TestApp> StartAsync(bool waitForRpc = false, JsonObject? config = null, string? configFile = null, string? dir = null, Action<Application>? configure = null, string? persistConfig = null, SocketOwnership? socketOwnership = null)
    {
        dir ??= Directory.CreateTempSubdirectory("rpct").FullName;
        Directory.CreateDirectory(Path.Combine(dir, "vhost"));
        var options = new ApplicationOptions
        {
            CpuMask = CpuSet.Of(0),
            Reactor = new ReactorOptions { Mode = ReactorMode.Interrupt, PinThreads = false },
            RpcSocket = Path.Combine(dir, "rpc.sock"),
            SocketDir = Path.Combine(dir, "vhost"),
            WaitForRpc = waitForRpc,
            Config = config,
            ConfigFile = configFile,
            PersistConfigFile = persistConfig,
            SocketOwnership = socketOwnership,
        };
        var app = new Application(options, new TestLogs());
        StandardModules.Register(app);
        configure?.Invoke(app);
        try
        {
            await app.StartAsync();
        }
        catch
        {
            await app.DisposeAsync();
            throw;
        }

        return new TestApp(app, dir);
    }

    public Task<RawClient> ConnectAsync() => RawClient.ConnectAsync(RpcSocket);

    /// <summary>Stops the application but keeps the directory (for a restart in the same place).</summary>
    public Task StopAsync() => App.StopAsync();

    public async ValueTask DisposeAsync()
    {
        await App.DisposeAsync();
        try
        {
            Directory.Delete(Dir, recursive: true);
        }
        catch (IOException)
        {
        }
    }
}

/// <summary>Collects log lines in memory (tests assert on them and print them on failure).</summary>
internal sealed class TestLogs : ILoggerFactory, ILogger
{
    public ConcurrentQueue<string> Lines { get; } = new();

    public void AddProvider(ILoggerProvider provider)
    {
    }

    public ILogger CreateLogger(string categoryName) => this;

    public void Dispose()
    {
    }

    public IDisposable? BeginScope<TState>(TState state)
        where TState : notnull => null;

    public bool IsEnabled(LogLevel logLevel) => logLevel >= LogLevel.Debug;

    public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter) =>
        Lines.Enqueue($"{logLevel}: {formatter(state, exception)}{(exception is null ? "" : " " + exception)}");

    public bool Contains(string text) => Lines.Any(l => l.Contains(text, StringComparison.Ordinal));
}
