using System.Text.Json;
using System.Text.Json.Nodes;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using VhostBackend.Platform;
using VhostBackend.Reactors;

namespace VhostBackend.Rpc;

/// <summary>
/// Runs method calls: finds the method, enforces the RPC state machine (STARTUP before framework_start_init,
/// RUNTIME after, like SPDK's -S/--wait-for-rpc), runs the handler on the main reactor and turns failures into
/// <see cref="RpcException"/>s. Shared by the socket server and the JSON config loader, so both behave alike.
/// </summary>
public sealed class RpcDispatcher
{
    /// <summary>SPDK's message when a runtime-only method is called before framework_start_init.</summary>
    public const string NotInitializedMessage =
        "Method may only be called after framework is initialized using framework_start_init RPC.";

    /// <summary>SPDK's message when a startup-only method is called after framework_start_init.</summary>
    public const string AlreadyInitializedMessage =
        "Method may only be called before framework is initialized. Use --wait-for-rpc command line parameter and then issue this RPC before the framework_start_init RPC.";

    private readonly TaskCompletionSource _initialized = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private readonly Reactor _main;
    private readonly SemaphoreSlim _initLock = new(1, 1);
    private int _state;

    /// <param name="registry">The method table.</param>
    /// <param name="mainReactor">Where handlers run.</param>
    /// <param name="initialState">Startup when the daemon waits for framework_start_init (-S), else Runtime.</param>
    public RpcDispatcher(RpcRegistry registry, Reactor mainReactor, RpcStates initialState = RpcStates.Runtime, ILogger? logger = null)
    {
        if (initialState is not (RpcStates.Startup or RpcStates.Runtime))
        {
            throw new ArgumentException("initial state must be Startup or Runtime", nameof(initialState));
        }

        Registry = registry;
        _main = mainReactor;
        _state = (int)initialState;
        Logger = logger ?? NullLogger.Instance;
        if (initialState == RpcStates.Runtime)
        {
            _initialized.SetResult();
        }
    }

    public RpcRegistry Registry { get; }
    public ILogger Logger { get; }
    public Reactor MainReactor => _main;

    /// <summary>The current RPC state: Startup until framework init completes, then Runtime.</summary>
    public RpcStates State => (RpcStates)Volatile.Read(ref _state);

    /// <summary>Completes when the framework is initialized (state Runtime).</summary>
    public Task Initialized => _initialized.Task;

    /// <summary>
    /// The start-up JSON config being applied (-c, --persist-config), or a completed task. framework_wait_init
    /// waits for it as well as for <see cref="Initialized"/>, as in SPDK, where the RPC state turns to Runtime
    /// only after the whole config file is loaded. Its failure is the application's to report.
    /// </summary>
    public Task StartupConfig { get; set; } = Task.CompletedTask;

    /// <summary>
    /// Raised after a method returned successfully (on the caller's thread, not the main reactor), with the
    /// method's name: what persists the running config after each change. Handler exceptions are logged.
    /// </summary>
    public event Action<string>? Succeeded;

    /// <summary>
    /// What framework_start_init does before the state turns to Runtime (the daemon's subsystem init). Runs on
    /// the main reactor. Null: nothing to do.
    /// </summary>
    public Func<Task>? InitHandler { get; set; }

    /// <summary>
    /// Initializes the framework: runs <see cref="InitHandler"/>, then switches to Runtime. Throws (-1) when
    /// already initialized, or the handler's failure as an internal error.
    /// </summary>
    public async Task StartInitAsync()
    {
        await _initLock.WaitAsync().ConfigureAwait(false);
        try
        {
            if (State == RpcStates.Runtime)
            {
                throw new RpcException(RpcErrorCodes.InvalidState, AlreadyInitializedMessage);
            }

            if (InitHandler is { } init)
            {
                try
                {
                    await _main.InvokeAsync<bool>(async () =>
                    {
                        await init().ConfigureAwait(true);
                        return true;
                    }).ConfigureAwait(false);
                }
                catch (Exception e) when (e is not RpcException)
                {
                    Logger.LogError(e, "framework initialization failed");
                    throw new RpcException(RpcErrorCodes.InternalError, "framework_initialization failed");
                }
            }

            Volatile.Write(ref _state, (int)RpcStates.Runtime);
            _initialized.TrySetResult();
            Logger.LogInformation("framework initialized; RPC state is RUNTIME");
        }
        finally
        {
            _initLock.Release();
        }
    }

    /// <summary>Whether <paramref name="method"/> exists and may be called in the current state.</summary>
    public bool IsCallable(string method) =>
        Registry.TryGet(method, out _, out var states) && (states & State) == State;

    /// <summary>
    /// Calls a method and returns its result (null handlers' results become <c>true</c>). Failures are thrown
    /// as <see cref="RpcException"/> with SPDK's code and message.
    /// </summary>
    public async Task<JsonNode?> CallAsync(string method, JsonElement? parameters, CancellationToken cancellationToken = default)
    {
        if (!Registry.TryGet(method, out var handler, out var states))
        {
            throw new RpcException(RpcErrorCodes.MethodNotFound, "Method not found");
        }

        var state = State;
        if ((states & state) != state)
        {
            throw new RpcException(
                RpcErrorCodes.InvalidState,
                state == RpcStates.Startup ? NotInitializedMessage : AlreadyInitializedMessage);
        }

        var request = new RpcRequest(method, parameters is { ValueKind: JsonValueKind.Null } ? null : parameters);
        try
        {
            var result = await _main.InvokeAsync<JsonNode?>(() => handler(request)).WaitAsync(cancellationToken).ConfigureAwait(false);
            RaiseSucceeded(method);
            return result ?? JsonValue.Create(true);
        }
        catch (RpcException)
        {
            throw;
        }
        catch (OperationCanceledException) when (cancellationToken.IsCancellationRequested)
        {
            throw;
        }
        catch (JsonException e)
        {
            throw RpcException.InvalidParams($"Invalid parameters: {e.Message}");
        }
        catch (ArgumentException e)
        {
            throw RpcException.Errno(Errno.EINVAL, e.Message);
        }
        catch (Exception e)
        {
            Logger.LogError(e, "RPC method {Method} failed", method);
            throw new RpcException(RpcErrorCodes.InternalError, $"Internal error: {e.Message}");
        }
    }

    private void RaiseSucceeded(string method)
    {
        try
        {
            Succeeded?.Invoke(method);
        }
        catch (Exception e)
        {
            Logger.LogError(e, "after RPC method {Method}", method);
        }
    }

    /// <summary>Convenience for callers holding params as a node (config loader, tests).</summary>
    public Task<JsonNode?> CallAsync(string method, JsonNode? parameters, CancellationToken cancellationToken = default)
    {
        JsonElement? p = parameters is null ? null : JsonSerializer.SerializeToElement(parameters);
        return CallAsync(method, p, cancellationToken);
    }
}

/// <summary>SPDK's error replies for errno values (<see cref="Errno"/> defines the values and texts).</summary>
public static class RpcErrno
{
    /// <summary>An error reply exactly like SPDK's <c>send_error_response(request, rc, spdk_strerror(-rc))</c>.</summary>
    public static RpcException Error(int errno) => RpcException.Errno(errno, Errno.Message(errno));

    /// <summary>
    /// SPDK's reply for <paramref name="errno"/> with the parameter at fault and the reason appended:
    /// <c>"File exists: name: a bdev named M0 already exists"</c>. The message still starts with SPDK's strerror
    /// and the code is SPDK's, so clients that match either keep working.
    /// </summary>
    public static RpcException Error(int errno, string param, string reason) =>
        RpcException.Errno(errno, $"{Errno.Message(errno)}: {param}: {reason}");

    /// <summary><see cref="Error(int, string, string)"/> for an <see cref="ArgumentException"/>: its parameter (or <paramref name="fallbackParam"/>) and its message.</summary>
    public static RpcException Error(int errno, ArgumentException e, string fallbackParam) =>
        Error(errno, e.ParamName ?? fallbackParam, e.ParamName is { } n ? e.Message.Replace($" (Parameter '{n}')", string.Empty, StringComparison.Ordinal) : e.Message);
}
