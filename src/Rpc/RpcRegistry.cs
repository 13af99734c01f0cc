using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.Json.Serialization;

namespace VhostBackend.Rpc;

/// <summary>SPDK's JSON-RPC error codes (JSON-RPC 2.0 codes, plus negative errno values from the methods).</summary>
public static class RpcErrorCodes
{
    public const int ParseError = -32700;
    public const int InvalidRequest = -32600;
    public const int MethodNotFound = -32601;
    public const int InvalidParams = -32602;
    public const int InternalError = -32603;
    public const int InvalidState = -1;
}

/// <summary>A method's failure as the client sees it: a code and a message.</summary>
public sealed class RpcException : Exception
{
    public RpcException(int code, string message)
        : base(message) => Code = code;

    public int Code { get; }

    public static RpcException InvalidParams(string message) => new(RpcErrorCodes.InvalidParams, message);

    /// <summary>A method error reported as -errno, the way SPDK's methods report them (e.g. -19 ENODEV).</summary>
    public static RpcException Errno(int errno, string message) => new(-Math.Abs(errno), message);
}

/// <summary>When a method may be called: before framework_start_init (-S), after it, or both.</summary>
[Flags]
public enum RpcStates
{
    Startup = 1,
    Runtime = 2,
    Both = Startup | Runtime,
}

/// <summary>A method body. Runs on the main reactor; returns the JSON result (null is sent as true, like SPDK's bool replies).</summary>
public delegate Task<JsonNode?> RpcHandler(RpcRequest request);

/// <summary>One call: its method name and params, with strict binding to a parameter type.</summary>
public sealed class RpcRequest
{
    private static readonly JsonSerializerOptions s_bindOptions = new()
    {
        PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower,
        UnmappedMemberHandling = JsonUnmappedMemberHandling.Disallow,
        NumberHandling = JsonNumberHandling.Strict,
        RespectRequiredConstructorParameters = true,
        RespectNullableAnnotations = true,
    };

    // SPDK's spdk_json_decode_object_relaxed: unknown names are ignored (used where transports add their own params).
    private static readonly JsonSerializerOptions s_relaxedBindOptions = new(s_bindOptions)
    {
        UnmappedMemberHandling = JsonUnmappedMemberHandling.Skip,
    };

    public RpcRequest(string method, JsonElement? parameters)
    {
        Method = method;
        Params = parameters;
    }

    public string Method { get; }
    public JsonElement? Params { get; }

    /// <summary>
    /// Binds params to <typeparamref name="T"/> (snake_case names, unknown names rejected, required members
    /// enforced); any mismatch is an Invalid params error (-32602) naming the problem.
    /// </summary>
    public T Bind<T>()
        where T : class, new() => Bind<T>(RpcErrorCodes.InvalidParams, "Invalid parameters");

    /// <summary>
    /// Binds params like <see cref="Bind{T}()"/>, reporting a decoding failure (missing required member, wrong
    /// type, out-of-range number, unknown name, params not an object) with the method's own code and message:
    /// SPDK's methods differ here (most bdev modules answer -32603 "spdk_json_decode_object failed", the vhost
    /// methods -32602). The problem is appended to the message. <see cref="IRpcParams.Validate"/> errors pass as thrown.
    /// </summary>
    public T Bind<T>(int decodeErrorCode, string decodeErrorMessage, bool allowUnknownNames = false)
        where T : class, new()
    {
        var options = allowUnknownNames ? s_relaxedBindOptions : s_bindOptions;
        if (Params is not { } p || p.ValueKind == JsonValueKind.Null)
        {
            try
            {
                return JsonSerializer.Deserialize<T>("{}", options)!;
            }
            catch (JsonException e)
            {
                throw new RpcException(decodeErrorCode, $"{decodeErrorMessage}: {Describe(e)}");
            }
        }

        if (p.ValueKind != JsonValueKind.Object)
        {
            throw new RpcException(decodeErrorCode, $"{decodeErrorMessage}: params must be an object");
        }

        T value;
        try
        {
            value = p.Deserialize<T>(options) ?? throw new RpcException(decodeErrorCode, decodeErrorMessage);
        }
        catch (JsonException e)
        {
            throw new RpcException(decodeErrorCode, $"{decodeErrorMessage}: {Describe(e)}");
        }

        if (value is IRpcParams v)
        {
            v.Validate();
        }

        return value;
    }

    /// <summary>For methods that take no params: rejects any that are given.</summary>
    public void NoParams()
    {
        if (Params is { ValueKind: JsonValueKind.Object } p && p.EnumerateObject().Any())
        {
            throw RpcException.InvalidParams($"{Method} requires no parameters");
        }

        if (Params is { } q && q.ValueKind is not (JsonValueKind.Object or JsonValueKind.Null))
        {
            throw RpcException.InvalidParams($"{Method} requires no parameters");
        }
    }

    private static string Describe(JsonException e)
    {
        var msg = e.Message;
        int cut = msg.IndexOf(" Path:", StringComparison.Ordinal);
        string core = cut > 0 ? msg[..cut] : msg;
        return e.Path is { Length: > 2 } path ? $"{core} (at {path})" : core;
    }

    public static JsonSerializerOptions SerializerOptions => s_bindOptions;
}

/// <summary>Parameter types implement this to check ranges after binding (throw <see cref="RpcException"/>).</summary>
public interface IRpcParams
{
    void Validate();
}

/// <summary>The method table. Modules register their methods explicitly at host start-up.</summary>
public sealed class RpcRegistry
{
    private readonly Dictionary<string, (RpcHandler Handler, RpcStates States)> _methods = new(StringComparer.Ordinal);

    public void Register(string method, RpcHandler handler, RpcStates states = RpcStates.Runtime)
    {
        lock (_methods)
        {
            if (!_methods.TryAdd(method, (handler, states)))
            {
                throw new InvalidOperationException($"RPC method '{method}' registered twice");
            }
        }
    }

    /// <summary>Registers a synchronous method.</summary>
    public void Register(string method, Func<RpcRequest, JsonNode?> handler, RpcStates states = RpcStates.Runtime) =>
        Register(method, r => Task.FromResult(handler(r)), states);

    public bool TryGet(string method, out RpcHandler handler, out RpcStates states)
    {
        lock (_methods)
        {
            if (_methods.TryGetValue(method, out var m))
            {
                handler = m.Handler;
                states = m.States;
                return true;
            }
        }

        handler = null!;
        states = 0;
        return false;
    }

    public IReadOnlyList<string> Methods(RpcStates? state = null)
    {
        lock (_methods)
        {
            return _methods.Where(kv => state is null || (kv.Value.States & state.Value) != 0).Select(kv => kv.Key).Order(StringComparer.Ordinal).ToArray();
        }
    }

    /// <summary>Serializes a result object with the same snake_case conventions as params.</summary>
    public static JsonNode? ToNode<T>(T value) => JsonSerializer.SerializeToNode(value, RpcRequest.SerializerOptions);
}
