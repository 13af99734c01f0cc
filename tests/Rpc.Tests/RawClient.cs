using System.Net.Sockets;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using Xunit;

namespace VhostBackend.Rpc.Tests;

/// <summary>
/// A deliberately small JSON-RPC client for tests: raw bytes out, and replies read the way SPDK's rpc.py reads
/// them (receive until the buffer holds one complete JSON value; bytes after it stay for the next read).
/// </summary>
internal sealed class RawClient : IAsyncDisposable
{
    private readonly Socket _socket;
    private byte[] _buf = new byte[64 * 1024];
    private int _len;
    private int _nextId;

    private RawClient(Socket socket) => _socket = socket;

    public Socket Socket => _socket;

    public static async Task<RawClient> ConnectAsync(string path)
    {
        var s = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        await s.ConnectAsync(new UnixDomainSocketEndPoint(path));
        return new RawClient(s);
    }

    public async Task SendAsync(string text) => await SendAsync(Encoding.UTF8.GetBytes(text));

    public async Task SendAsync(byte[] data)
    {
        int sent = 0;
        while (sent < data.Length)
        {
            sent += await _socket.SendAsync(data.AsMemory(sent), SocketFlags.None);
        }
    }

    /// <summary>Builds an SPDK-style request: jsonrpc, method, id, and params only when given.</summary>
    public static string Request(string method, JsonNode? parameters, int id)
    {
        var o = new JsonObject { ["jsonrpc"] = "2.0", ["method"] = method, ["id"] = id };
        if (parameters is not null)
        {
            o["params"] = parameters.DeepClone();
        }

        return o.ToJsonString();
    }

    /// <summary>Sends one request and returns its reply (asserting the id echoes).</summary>
    public async Task<JsonObject> CallAsync(string method, JsonNode? parameters = null)
    {
        int id = ++_nextId;
        await SendAsync(Request(method, parameters, id));
        var reply = await ReadAsync();
        Assert.Equal("2.0", (string?)reply["jsonrpc"]);
        Assert.Equal(id, (int?)reply["id"]);
        return reply;
    }

    /// <summary>Calls a method that must succeed; returns its result.</summary>
    public async Task<JsonNode> ResultAsync(string method, JsonNode? parameters = null)
    {
        var reply = await CallAsync(method, parameters);
        Assert.True(reply["error"] is null, $"{method} failed: {reply.ToJsonString()}");
        Assert.True(reply.ContainsKey("result"), reply.ToJsonString());
        return reply["result"]!;
    }

    /// <summary>Calls a method that must fail with <paramref name="code"/>; returns the error message.</summary>
    public async Task<string> ErrorAsync(string method, JsonNode? parameters, int code)
    {
        var reply = await CallAsync(method, parameters);
        return AssertError(reply, code);
    }

    public static string AssertError(JsonObject reply, int code)
    {
        Assert.True(reply["error"] is JsonObject, $"expected error {code}, got {reply.ToJsonString()}");
        Assert.False(reply.ContainsKey("result"));
        Assert.Equal(code, (int)reply["error"]!["code"]!);
        var message = (string?)reply["error"]!["message"];
        Assert.False(string.IsNullOrEmpty(message));
        return message!;
    }

    /// <summary>Reads the next complete JSON value from the stream (fails after <paramref name="timeoutMs"/>).</summary>
    public async Task<JsonObject> ReadAsync(int timeoutMs = 10_000)
    {
        using var cts = new CancellationTokenSource(timeoutMs);
        while (true)
        {
            if (TryTake(out var node))
            {
                return Assert.IsType<JsonObject>(node);
            }

            if (_len == _buf.Length)
            {
                Array.Resize(ref _buf, _buf.Length * 2);
            }

            int n = await _socket.ReceiveAsync(_buf.AsMemory(_len), SocketFlags.None, cts.Token);
            if (n == 0)
            {
                throw new EndOfStreamException($"server closed the connection; pending: '{Encoding.UTF8.GetString(_buf, 0, _len)}'");
            }

            _len += n;
        }
    }

    /// <summary>Reads a value if one arrives, else null (used for notifications, which get no reply).</summary>
    public async Task<JsonObject?> TryReadAsync(int timeoutMs)
    {
        try
        {
            return await ReadAsync(timeoutMs);
        }
        catch (OperationCanceledException)
        {
            return null;
        }
    }

    /// <summary>True when the server closes the connection (EOF) within the timeout, with nothing else sent.</summary>
    public async Task<bool> ClosedByServerAsync(int timeoutMs = 5000)
    {
        using var cts = new CancellationTokenSource(timeoutMs);
        var one = new byte[256];
        try
        {
            int n = await _socket.ReceiveAsync(one, SocketFlags.None, cts.Token);
            return n == 0;
        }
        catch (SocketException)
        {
            return true;
        }
        catch (OperationCanceledException)
        {
            return false;
        }
    }

    private bool TryTake(out JsonNode? node)
    {
        node = null;
        int start = 0;
        while (start < _len && _buf[start] is (byte)' ' or (byte)'\n' or (byte)'\r' or (byte)'\t')
        {
            start++;
        }

        if (start == _len)
        {
            _len = 0;
            return false;
        }

        var reader = new Utf8JsonReader(_buf.AsSpan(start, _len - start), isFinalBlock: false, default);
        if (!JsonDocument.TryParseValue(ref reader, out var doc))
        {
            return false;
        }

        using (doc)
        {
            node = JsonNode.Parse(doc.RootElement.GetRawText());
        }

        int consumed = start + (int)reader.BytesConsumed;
        Buffer.BlockCopy(_buf, consumed, _buf, 0, _len - consumed);
        _len -= consumed;
        return true;
    }

    public ValueTask DisposeAsync()
    {
        _socket.Dispose();
        return ValueTask.CompletedTask;
    }
}
