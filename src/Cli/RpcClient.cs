using System.Net.Sockets;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace VhostBackend.Cli;

/// <summary>A JSON-RPC 2.0 client in SPDK's wire format: one JSON object per request, the reply read until it parses.</summary>
public sealed class RpcClient : IDisposable
{
    private readonly Socket _socket;
    private int _nextId;

    private RpcClient(Socket socket) => _socket = socket;

    public static RpcClient Connect(string path, TimeSpan timeout)
    {
        var s = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        try
        {
            s.Connect(new UnixDomainSocketEndPoint(path));
        }
        catch (SocketException e)
        {
            s.Dispose();
            throw new RpcClientException($"cannot connect to {path}: {e.Message} (is vhostd running? use -s SOCKET)");
        }

        s.ReceiveTimeout = s.SendTimeout = (int)timeout.TotalMilliseconds;
        return new RpcClient(s);
    }

    public JsonNode? Call(string method, JsonNode? parameters)
    {
        var request = new JsonObject { ["jsonrpc"] = "2.0", ["method"] = method, ["id"] = ++_nextId };
        if (parameters is not null)
        {
            request["params"] = parameters;
        }

        _socket.Send(Encoding.UTF8.GetBytes(request.ToJsonString()));
        var buffer = new MemoryStream();
        var chunk = new byte[65536];
        while (true)
        {
            int n;
            try
            {
                n = _socket.Receive(chunk);
            }
            catch (SocketException e)
            {
                throw new RpcClientException($"no reply to {method}: {e.Message}");
            }

            if (n == 0)
            {
                throw new RpcClientException($"connection closed before the reply to {method}");
            }

            buffer.Write(chunk, 0, n);
            var reader = new Utf8JsonReader(buffer.GetBuffer().AsSpan(0, (int)buffer.Length));
            try
            {
                if (!JsonDocument.TryParseValue(ref reader, out var doc))
                {
                    continue;
                }

                using (doc)
                {
                    var reply = JsonNode.Parse(doc.RootElement.GetRawText())!.AsObject();
                    if (reply["error"] is JsonObject err)
                    {
                        throw new RpcErrorException((int?)err["code"] ?? 0, (string?)err["message"] ?? "");
                    }

                    return reply["result"]?.DeepClone();
                }
            }
            catch (JsonException)
            {
                continue; // incomplete: read more
            }
        }
    }

    public void Dispose() => _socket.Dispose();
}

public class RpcClientException : Exception
{
    public RpcClientException(string message)
        : base(message)
    {
    }
}

public sealed class RpcErrorException : RpcClientException
{
    public RpcErrorException(int code, string message)
        : base(message) => Code = code;

    public int Code { get; }
}
