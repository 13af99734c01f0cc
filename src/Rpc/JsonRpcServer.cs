using System.Buffers;
using System.Net.Sockets;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using VhostBackend.Platform;

namespace VhostBackend.Rpc;

public sealed class JsonRpcServerOptions
{
    /// <summary>Largest request (one JSON value) accepted; a longer one gets a parse error and the connection is closed.</summary>
    public int MaxRequestBytes { get; set; } = 4 * 1024 * 1024;

    /// <summary>Connections served at once (SPDK: 64); more are closed right after accept.</summary>
    public int MaxConnections { get; set; } = 64;

    /// <summary>How long a reply may take to be written before the client is considered stuck and dropped.</summary>
    public TimeSpan SendTimeout { get; set; } = TimeSpan.FromSeconds(30);
}

/// <summary>
/// JSON-RPC 2.0 server on a Unix socket, in SPDK's wire format: no framing, one JSON value per request, replies
/// written as one compact JSON object followed by a newline. Socket I/O runs as thread-pool async code; methods
/// run on the main reactor through <see cref="RpcDispatcher"/>, so a slow or broken client never stalls a
/// reactor. Requests on one connection are answered in order; connections are independent.
///
/// Like SPDK: a result for a request without id (or with a null id) is not sent; errors are always sent; a parse
/// error is answered (id null) and the connection closed, since a byte stream cannot be resynchronized.
/// Another daemon on the same path is detected with a lock file (<c>PATH.lock</c>, flock) and a connect probe.
/// </summary>
public sealed class JsonRpcServer : IAsyncDisposable
{
    private static readonly byte[] s_newline = "\n"u8.ToArray();
    private static readonly JsonWriterOptions s_writerOptions = new() { Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping };

    private readonly RpcDispatcher _dispatcher;
    private readonly ILogger _logger;
    private readonly JsonRpcServerOptions _options;
    private readonly CancellationTokenSource _stop = new();
    private readonly HashSet<Socket> _connections = new();
    private readonly List<Task> _connectionTasks = new();
    private Socket? _listener;
    private FileStream? _lock;
    private Task? _acceptLoop;
    private int _nextConnectionId;

    public JsonRpcServer(RpcDispatcher dispatcher, ILogger? logger = null, JsonRpcServerOptions? options = null)
    {
        _dispatcher = dispatcher;
        _logger = logger ?? NullLogger.Instance;
        _options = options ?? new JsonRpcServerOptions();
    }

    /// <summary>The socket path while listening, else null.</summary>
    public string? Path { get; private set; }

    public int ConnectionCount
    {
        get
        {
            lock (_connections)
            {
                return _connections.Count;
            }
        }
    }

    /// <summary>
    /// Owner, group and mode given to the socket file before it listens (--socket-user/--socket-group/--socket-mode),
    /// so a management user other than root may connect; null leaves the socket as bind created it.
    /// </summary>
    public SocketOwnership? SocketOwnership { get; init; }

    /// <summary>
    /// Listens on <paramref name="path"/>. A stale socket file is removed; throws <see cref="IOException"/> when a
    /// live server already listens there, or the path is unusable.
    /// </summary>
    public Task StartAsync(string path, CancellationToken cancellationToken = default)
    {
        if (_listener is not null)
        {
            throw new InvalidOperationException("server already started");
        }

        if (string.IsNullOrEmpty(path) || Encoding.UTF8.GetByteCount(path) >= 108)
        {
            throw new IOException($"RPC listen address Unix socket path '{path}' is empty or too long");
        }

        string lockPath = path + ".lock";
        try
        {
            // FileShare.None makes .NET take flock(LOCK_EX | LOCK_NB) on Linux, the same lock SPDK takes.
            _lock = new FileStream(lockPath, FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.None);
        }
        catch (IOException)
        {
            throw new IOException($"RPC Unix domain socket path {path} in use. Specify another.");
        }
        catch (UnauthorizedAccessException e)
        {
            throw new IOException($"cannot open lock file {lockPath}: {e.Message}");
        }

        try
        {
            if (File.Exists(path) || Directory.Exists(path))
            {
                if (ProbeLive(path))
                {
                    throw new IOException($"RPC Unix domain socket path {path} in use. Specify another.");
                }

                _logger.LogInformation("removing stale RPC socket {Path}", path);
                File.Delete(path);
            }

            var listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            try
            {
                listener.Bind(new UnixDomainSocketEndPoint(path));
            }
            catch (SocketException e)
            {
                listener.Dispose();
                throw new IOException($"cannot listen on {path}: {e.Message}", e);
            }

            try
            {
                // Between bind and listen: no client connects before the owner and mode are right.
                SocketOwnership?.Apply(path);
                listener.Listen(128);
            }
            catch (Exception e) when (e is SocketException or IOException or UnauthorizedAccessException)
            {
                listener.Dispose();
                File.Delete(path);
                throw new IOException($"cannot listen on {path}: {e.Message}", e);
            }

            _listener = listener;
            Path = path;
        }
        catch
        {
            _lock.Dispose();
            _lock = null;
            throw;
        }

        _logger.LogInformation("JSON-RPC server listening on {Path}", path);
        _acceptLoop = Task.Run(AcceptLoopAsync, CancellationToken.None);
        return Task.CompletedTask;
    }

    private static bool ProbeLive(string path)
    {
        try
        {
            using var probe = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            probe.Connect(new UnixDomainSocketEndPoint(path));
            return true;
        }
        catch (SocketException)
        {
            return false;
        }
    }

    /// <summary>Stops listening, closes every connection, removes the socket and lock files.</summary>
    public async Task StopAsync()
    {
        if (_listener is null)
        {
            return;
        }

        await _stop.CancelAsync().ConfigureAwait(false);
        _listener.Dispose();
        Socket[] open;
        lock (_connections)
        {
            open = _connections.ToArray();
        }

        foreach (var s in open)
        {
            s.Dispose();
        }

        if (_acceptLoop is not null)
        {
            await _acceptLoop.ConfigureAwait(false);
        }

        Task[] tasks;
        lock (_connectionTasks)
        {
            tasks = _connectionTasks.ToArray();
        }

        await Task.WhenAll(tasks).WaitAsync(TimeSpan.FromSeconds(10)).ConfigureAwait(false);
        if (Path is { } p)
        {
            TryDelete(p);
            TryDelete(p + ".lock");
        }

        _lock?.Dispose();
        _lock = null;
        _listener = null;
        _logger.LogInformation("JSON-RPC server on {Path} stopped", Path);
        Path = null;
    }

    public async ValueTask DisposeAsync()
    {
        try
        {
            await StopAsync().ConfigureAwait(false);
        }
        catch (TimeoutException)
        {
            _logger.LogWarning("JSON-RPC connections did not finish within 10 s of stop");
        }

        _stop.Dispose();
    }

    private static void TryDelete(string path)
    {
        try
        {
            File.Delete(path);
        }
        catch (IOException)
        {
        }
        catch (UnauthorizedAccessException)
        {
        }
    }

    private async Task AcceptLoopAsync()
    {
        var listener = _listener!;
        while (!_stop.IsCancellationRequested)
        {
            Socket client;
            try
            {
                client = await listener.AcceptAsync(_stop.Token).ConfigureAwait(false);
            }
            catch (OperationCanceledException)
            {
                break;
            }
            catch (ObjectDisposedException)
            {
                break;
            }
            catch (SocketException e)
            {
                if (_stop.IsCancellationRequested)
                {
                    break;
                }

                _logger.LogWarning("RPC accept failed: {Error}", e.Message);
                await Task.Delay(10).ConfigureAwait(false);
                continue;
            }

            int id = Interlocked.Increment(ref _nextConnectionId);
            lock (_connections)
            {
                if (_connections.Count >= _options.MaxConnections)
                {
                    _logger.LogWarning("RPC connection {Id} refused: {Max} connections already open", id, _options.MaxConnections);
                    client.Dispose();
                    continue;
                }

                _connections.Add(client);
            }

            var task = Task.Run(() => ServeAsync(client, id));
            lock (_connectionTasks)
            {
                _connectionTasks.RemoveAll(t => t.IsCompleted);
                _connectionTasks.Add(task);
            }
        }
    }

    private async Task ServeAsync(Socket socket, int id)
    {
        _logger.LogDebug("RPC connection {Id} opened", id);
        var splitter = new JsonStreamSplitter(_options.MaxRequestBytes);
        var ct = _stop.Token;
        try
        {
            while (true)
            {
                // Answer every whole request already received, in order, before reading more.
                while (true)
                {
                    var r = splitter.TryNext(out var value);
                    if (r == JsonStreamSplitter.Result.NeedMore)
                    {
                        break;
                    }

                    if (r != JsonStreamSplitter.Result.Value)
                    {
                        _logger.LogWarning("RPC connection {Id}: {What}; closing", id, r == JsonStreamSplitter.Result.TooLarge ? $"request larger than {_options.MaxRequestBytes} bytes" : "JSON parse error");
                        await SendAsync(socket, ErrorReply(null, RpcErrorCodes.ParseError, "Parse error"), ct).ConfigureAwait(false);
                        return;
                    }

                    var (reply, close) = await HandleValueAsync(value, id, ct).ConfigureAwait(false);
                    if (reply is not null)
                    {
                        await SendAsync(socket, reply, ct).ConfigureAwait(false);
                    }

                    if (close)
                    {
                        return;
                    }
                }

                int n = await socket.ReceiveAsync(splitter.GetWriteMemory(), SocketFlags.None, ct).ConfigureAwait(false);
                if (n == 0)
                {
                    if (splitter.HasPartialValue)
                    {
                        // The client stopped sending mid-request (it may still read, after shutdown(SHUT_WR)).
                        _logger.LogDebug("RPC connection {Id}: end of stream inside a request", id);
                        await SendAsync(socket, ErrorReply(null, RpcErrorCodes.ParseError, "Parse error"), ct).ConfigureAwait(false);
                    }

                    return;
                }

                splitter.Advance(n);
            }
        }
        catch (OperationCanceledException)
        {
        }
        catch (ObjectDisposedException)
        {
        }
        catch (SocketException e)
        {
            _logger.LogDebug("RPC connection {Id}: {Error}", id, e.Message);
        }
        catch (TimeoutException)
        {
            _logger.LogWarning("RPC connection {Id}: client does not read its replies; closing", id);
        }
        catch (Exception e)
        {
            _logger.LogError(e, "RPC connection {Id} failed", id);
        }
        finally
        {
            lock (_connections)
            {
                _connections.Remove(socket);
            }

            try
            {
                socket.Shutdown(SocketShutdown.Both);
            }
            catch (Exception e) when (e is SocketException or ObjectDisposedException)
            {
            }

            socket.Dispose();
            _logger.LogDebug("RPC connection {Id} closed", id);
        }
    }

    private async Task SendAsync(Socket socket, byte[] data, CancellationToken ct)
    {
        using var timeout = CancellationTokenSource.CreateLinkedTokenSource(ct);
        timeout.CancelAfter(_options.SendTimeout);
        int sent = 0;
        try
        {
            while (sent < data.Length)
            {
                sent += await socket.SendAsync(data.AsMemory(sent), SocketFlags.None, timeout.Token).ConfigureAwait(false);
            }
        }
        catch (OperationCanceledException) when (!ct.IsCancellationRequested)
        {
            throw new TimeoutException();
        }
    }

    /// <summary>Handles one JSON value: a request object or a batch array. Returns the reply (null: none) and whether to close.</summary>
    private async Task<(byte[]? Reply, bool Close)> HandleValueAsync(ReadOnlyMemory<byte> value, int connectionId, CancellationToken ct)
    {
        var doc = ParseValue(value.Span);
        if (doc is null)
        {
            return (ErrorReply(null, RpcErrorCodes.ParseError, "Parse error"), true);
        }

        using (doc)
        {
            var root = doc.RootElement;
            if (root.ValueKind == JsonValueKind.Object)
            {
                return (await HandleRequestAsync(root, connectionId, ct).ConfigureAwait(false), false);
            }

            if (root.ValueKind != JsonValueKind.Array)
            {
                return (ErrorReply(null, RpcErrorCodes.InvalidRequest, "Invalid request"), false);
            }

            if (root.GetArrayLength() == 0)
            {
                return (ErrorReply(null, RpcErrorCodes.InvalidRequest, "Invalid request"), false);
            }

            // Batch: elements run in order; the replies form one array (none if all were notifications).
            var replies = new List<byte[]>();
            foreach (var element in root.EnumerateArray())
            {
                var r = element.ValueKind == JsonValueKind.Object
                    ? await HandleRequestAsync(element, connectionId, ct).ConfigureAwait(false)
                    : ErrorReply(null, RpcErrorCodes.InvalidRequest, "Invalid request");
                if (r is not null)
                {
                    replies.Add(r);
                }
            }

            if (replies.Count == 0)
            {
                return (null, false);
            }

            var ms = new MemoryStream();
            ms.WriteByte((byte)'[');
            for (int i = 0; i < replies.Count; i++)
            {
                if (i > 0)
                {
                    ms.WriteByte((byte)',');
                }

                ms.Write(replies[i], 0, replies[i].Length - 1); // without its newline
            }

            ms.Write("]\n"u8);
            return (ms.ToArray(), false);
        }
    }

    /// <summary>
    /// Parses one value the splitter cut (copied: the splitter's buffer is reused for the next read while a handler
    /// may still look at params). Null is a parse error: malformed JSON, nesting deeper than 64, bytes that are not
    /// UTF-8, or a \u escape that is an unpaired surrogate. SPDK's parser rejects the last two as well;
    /// System.Text.Json accepts them and throws only when the string is read, so without these checks a bad member
    /// name, method name or params string threw out of the request's handling and the connection closed without a
    /// reply (found by fuzzing, docs/RELIABILITY.md).
    /// </summary>
    public static JsonDocument? ParseValue(ReadOnlySpan<byte> value)
    {
        if (!System.Text.Unicode.Utf8.IsValid(value))
        {
            return null;
        }

        try
        {
            var reader = new Utf8JsonReader(value, new JsonReaderOptions { MaxDepth = 64 });
            while (reader.Read())
            {
                if (reader.TokenType is JsonTokenType.String or JsonTokenType.PropertyName && reader.ValueIsEscaped)
                {
                    _ = reader.GetString();
                }
            }

            return JsonDocument.Parse(value.ToArray(), new JsonDocumentOptions { MaxDepth = 64 });
        }
        catch (Exception e) when (e is JsonException or InvalidOperationException)
        {
            return null;
        }
    }

    /// <summary>
    /// Reads a request object's envelope by SPDK's rules (jsonrpc "2.0" if present, a string method, params an
    /// object, array or null, an id that is a string, number or null, no other member). False: an invalid request.
    /// </summary>
    public static bool TryReadRequest(JsonElement request, out JsonElement? id, out string method, out JsonElement? parameters)
    {
        id = null;
        parameters = null;
        method = "";
        JsonElement? m = null;
        bool valid = true;
        foreach (var p in request.EnumerateObject())
        {
            switch (p.Name)
            {
                case "jsonrpc":
                    valid &= p.Value.ValueKind == JsonValueKind.String && p.Value.ValueEquals("2.0");
                    break;
                case "method":
                    m = p.Value;
                    break;
                case "params":
                    parameters = p.Value;
                    break;
                case "id":
                    if (p.Value.ValueKind is JsonValueKind.String or JsonValueKind.Number or JsonValueKind.Null)
                    {
                        id = p.Value;
                    }
                    else
                    {
                        valid = false;
                    }

                    break;
                default:
                    valid = false; // SPDK decodes the request strictly: unknown members make it invalid
                    break;
            }
        }

        if (m is not { ValueKind: JsonValueKind.String } || parameters is { ValueKind: not (JsonValueKind.Object or JsonValueKind.Array or JsonValueKind.Null) })
        {
            return false;
        }

        method = m.Value.GetString()!;
        return valid;
    }

    /// <summary>Validates and runs one request object (SPDK's rules); returns the reply or null for a notification's result.</summary>
    private async Task<byte[]?> HandleRequestAsync(JsonElement request, int connectionId, CancellationToken ct)
    {
        if (!TryReadRequest(request, out var id, out string name, out var parameters))
        {
            return ErrorReply(id, RpcErrorCodes.InvalidRequest, "Invalid request");
        }

        bool notification = id is null || id.Value.ValueKind == JsonValueKind.Null;
        _logger.LogDebug("RPC connection {Id}: {Method}", connectionId, name);
        try
        {
            var result = await _dispatcher.CallAsync(name, parameters, ct).ConfigureAwait(false);
            return notification ? null : ResultReply(id, result);
        }
        catch (RpcException e)
        {
            if (e.Code != RpcErrorCodes.MethodNotFound)
            {
                _logger.LogInformation("RPC {Method} failed: {Code} {Message}", name, e.Code, e.Message);
            }

            return ErrorReply(id, e.Code, e.Message);
        }
    }

    private static byte[] ResultReply(JsonElement? id, JsonNode? result)
    {
        var buffer = new ArrayBufferWriter<byte>(256);
        using (var w = new Utf8JsonWriter(buffer, s_writerOptions))
        {
            WriteHeader(w, id);
            w.WritePropertyName("result");
            if (result is null)
            {
                w.WriteBooleanValue(true);
            }
            else
            {
                result.WriteTo(w);
            }

            w.WriteEndObject();
        }

        buffer.Write(s_newline);
        return buffer.WrittenSpan.ToArray();
    }

    /// <summary>An error reply, <c>{"jsonrpc":"2.0","id":...,"error":{"code":...,"message":...}}</c> plus a newline.</summary>
    public static byte[] ErrorReply(JsonElement? id, int code, string message)
    {
        var buffer = new ArrayBufferWriter<byte>(128);
        using (var w = new Utf8JsonWriter(buffer, s_writerOptions))
        {
            WriteHeader(w, id);
            w.WriteStartObject("error");
            w.WriteNumber("code", code);
            w.WriteString("message", message);
            w.WriteEndObject();
            w.WriteEndObject();
        }

        buffer.Write(s_newline);
        return buffer.WrittenSpan.ToArray();
    }

    private static void WriteHeader(Utf8JsonWriter w, JsonElement? id)
    {
        w.WriteStartObject();
        w.WriteString("jsonrpc", "2.0");
        w.WritePropertyName("id");
        if (id is { } i)
        {
            i.WriteTo(w);
        }
        else
        {
            w.WriteNullValue();
        }
    }
}
