using System.Text.Json;
using System.Text.Json.Nodes;
using Microsoft.Extensions.Logging;

namespace VhostBackend.Rpc;

/// <summary>A JSON config that cannot be loaded; the message names the subsystem, the entry index and the method.</summary>
public sealed class JsonConfigException : Exception
{
    public JsonConfigException(string message, string? subsystem = null, int index = -1, string? method = null, int code = 0)
        : base(message)
    {
        Subsystem = subsystem;
        Index = index;
        Method = method;
        Code = code;
    }

    public string? Subsystem { get; }
    public int Index { get; }
    public string? Method { get; }

    /// <summary>The RPC error code of the failed call (0 when the file itself is malformed).</summary>
    public int Code { get; }
}

/// <summary>
/// SPDK's JSON config (<c>{"subsystems":[{"subsystem":"bdev","config":[{"method":...,"params":...}]}]}</c>):
/// loading replays every call through the dispatcher (so the same validation, state rules and main-reactor
/// execution apply as over the socket); saving asks every subsystem for its calls (what save_config writes).
///
/// Load order: subsystems in the registry's init order (dependencies first; SPDK orders them by their
/// dependencies too), calls within a subsystem as written. While the RPC state is STARTUP the calls allowed at
/// startup run first, then framework_start_init (if <c>startInit</c>), then the runtime calls. Everything is
/// validated before the first call: an unknown subsystem (with calls), an unknown method or a malformed entry
/// fails the load without side effects.
/// </summary>
public static class JsonConfig
{
    private sealed record Call(string Subsystem, int Index, string Method, JsonNode? Params);

    /// <summary>Reads and loads a config file; see <see cref="LoadAsync(JsonNode?, RpcDispatcher, SubsystemRegistry, bool, CancellationToken)"/>.</summary>
    public static async Task LoadFileAsync(string path, RpcDispatcher dispatcher, SubsystemRegistry subsystems, bool startInit = true, CancellationToken cancellationToken = default)
    {
        string text;
        try
        {
            text = await File.ReadAllTextAsync(path, cancellationToken).ConfigureAwait(false);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new JsonConfigException($"cannot read JSON config {path}: {e.Message}");
        }

        JsonNode? root;
        try
        {
            root = JsonNode.Parse(text, documentOptions: new JsonDocumentOptions { AllowTrailingCommas = false, MaxDepth = 64 });
        }
        catch (JsonException e)
        {
            throw new JsonConfigException($"JSON config {path} is not valid JSON: {e.Message}");
        }

        try
        {
            await LoadAsync(root, dispatcher, subsystems, startInit, cancellationToken).ConfigureAwait(false);
        }
        catch (JsonConfigException e)
        {
            throw new JsonConfigException($"JSON config {path}: {e.Message}", e.Subsystem, e.Index, e.Method, e.Code);
        }
    }

    /// <summary>
    /// Replays a parsed config. With <paramref name="startInit"/> false and the state STARTUP, the runtime calls
    /// wait until someone sends framework_start_init (the returned task completes after they ran).
    /// </summary>
    public static async Task LoadAsync(JsonNode? config, RpcDispatcher dispatcher, SubsystemRegistry subsystems, bool startInit = true, CancellationToken cancellationToken = default)
    {
        var calls = Validate(config, dispatcher.Registry, subsystems);
        var deferred = new List<Call>();
        if (dispatcher.State == RpcStates.Startup)
        {
            foreach (var c in calls)
            {
                if (dispatcher.IsCallable(c.Method))
                {
                    await RunAsync(c, dispatcher, cancellationToken).ConfigureAwait(false);
                }
                else
                {
                    deferred.Add(c);
                }
            }

            if (startInit)
            {
                try
                {
                    await dispatcher.StartInitAsync().ConfigureAwait(false);
                }
                catch (RpcException e)
                {
                    throw new JsonConfigException($"framework initialization failed: {e.Message}", code: e.Code);
                }
            }
            else
            {
                await dispatcher.Initialized.WaitAsync(cancellationToken).ConfigureAwait(false);
            }
        }
        else
        {
            deferred = calls;
        }

        foreach (var c in deferred)
        {
            if (!dispatcher.IsCallable(c.Method))
            {
                dispatcher.Logger.LogWarning("JSON config: subsystem '{Subsystem}' config[{Index}]: {Method} may only be called before framework init; skipped", c.Subsystem, c.Index, c.Method);
                continue;
            }

            await RunAsync(c, dispatcher, cancellationToken).ConfigureAwait(false);
        }
    }

    private static async Task RunAsync(Call c, RpcDispatcher dispatcher, CancellationToken cancellationToken)
    {
        try
        {
            await dispatcher.CallAsync(c.Method, c.Params, cancellationToken).ConfigureAwait(false);
        }
        catch (RpcException e)
        {
            throw new JsonConfigException(
                $"subsystem '{c.Subsystem}' config[{c.Index}] {c.Method} failed: {e.Message} (error {e.Code})",
                c.Subsystem, c.Index, c.Method, e.Code);
        }
    }

    /// <summary>Checks the whole document and returns its calls in execution order.</summary>
    private static List<Call> Validate(JsonNode? config, RpcRegistry registry, SubsystemRegistry subsystems)
    {
        if (config is not JsonObject root)
        {
            throw new JsonConfigException("the top level must be an object with a \"subsystems\" array");
        }

        foreach (var (key, _) in root)
        {
            if (key != "subsystems")
            {
                throw new JsonConfigException($"unknown top-level member '{key}' (expected only \"subsystems\")");
            }
        }

        if (root["subsystems"] is not JsonArray list)
        {
            throw new JsonConfigException("\"subsystems\" must be an array");
        }

        var known = subsystems.All;
        var perSubsystem = new List<(int Order, int Position, List<Call> Calls)>();
        var seen = new HashSet<string>(StringComparer.Ordinal);
        for (int i = 0; i < list.Count; i++)
        {
            if (list[i] is not JsonObject entry)
            {
                throw new JsonConfigException($"subsystems[{i}] must be an object");
            }

            if (entry["subsystem"] is not JsonValue nameValue || !nameValue.TryGetValue(out string? name))
            {
                throw new JsonConfigException($"subsystems[{i}] has no \"subsystem\" name");
            }

            foreach (var (key, _) in entry)
            {
                if (key is not ("subsystem" or "config"))
                {
                    throw new JsonConfigException($"subsystem '{name}': unknown member '{key}'", name);
                }
            }

            if (!seen.Add(name))
            {
                throw new JsonConfigException($"subsystem '{name}' appears twice", name);
            }

            var configNode = entry["config"];
            if (configNode is not null and not JsonArray)
            {
                throw new JsonConfigException($"subsystem '{name}': \"config\" must be an array or null", name);
            }

            var calls = new List<Call>();
            var configArray = configNode as JsonArray;
            for (int j = 0; configArray is not null && j < configArray.Count; j++)
            {
                // Newer SPDK may group calls into batch arrays (framework_get_config with_batches); run them in order.
                if (configArray[j] is JsonArray batch)
                {
                    foreach (var item in batch)
                    {
                        calls.Add(ParseCall(name, j, item, registry));
                    }
                }
                else
                {
                    calls.Add(ParseCall(name, j, configArray[j], registry));
                }
            }

            int order = -1;
            for (int k = 0; k < known.Count; k++)
            {
                if (known[k].Name == name)
                {
                    order = k;
                }
            }

            if (order < 0)
            {
                if (calls.Count > 0)
                {
                    throw new JsonConfigException(
                        $"unknown subsystem '{name}' (known: {string.Join(", ", known.Select(s => s.Name))})", name, 0, calls[0].Method);
                }

                continue; // an empty section of a subsystem we don't have is harmless
            }

            perSubsystem.Add((order, i, calls));
        }

        return perSubsystem.OrderBy(s => s.Order).ThenBy(s => s.Position).SelectMany(s => s.Calls).ToList();
    }

    private static Call ParseCall(string subsystem, int index, JsonNode? node, RpcRegistry registry)
    {
        if (node is not JsonObject call)
        {
            throw new JsonConfigException($"subsystem '{subsystem}' config[{index}] must be an object with \"method\" and \"params\"", subsystem, index);
        }

        if (call["method"] is not JsonValue m || !m.TryGetValue(out string? method))
        {
            throw new JsonConfigException($"subsystem '{subsystem}' config[{index}] has no \"method\" string", subsystem, index);
        }

        foreach (var (key, _) in call)
        {
            if (key is not ("method" or "params"))
            {
                throw new JsonConfigException($"subsystem '{subsystem}' config[{index}] {method}: unknown member '{key}'", subsystem, index, method);
            }
        }

        var p = call["params"];
        if (p is not null and not JsonObject)
        {
            throw new JsonConfigException($"subsystem '{subsystem}' config[{index}] {method}: \"params\" must be an object", subsystem, index, method);
        }

        if (!registry.TryGet(method, out _, out _))
        {
            throw new JsonConfigException($"subsystem '{subsystem}' config[{index}]: unknown method '{method}'", subsystem, index, method, RpcErrorCodes.MethodNotFound);
        }

        return new Call(subsystem, index, method, p?.DeepClone());
    }

    /// <summary>The running configuration (what save_config writes), built on the main reactor.</summary>
    public static Task<JsonObject> SaveAsync(RpcDispatcher dispatcher, SubsystemRegistry subsystems) =>
        dispatcher.MainReactor.InvokeAsync(() => Save(subsystems));

    /// <summary>The running configuration; call on the main reactor.</summary>
    public static JsonObject Save(SubsystemRegistry subsystems) => new()
    {
        ["subsystems"] = new JsonArray(subsystems.All.Select(s => (JsonNode?)new JsonObject
        {
            ["subsystem"] = s.Name,
            ["config"] = s.WriteConfig(),
        }).ToArray()),
    };
}
