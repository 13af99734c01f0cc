using System.Net.Sockets;
using System.Text;
using System.Text.Json.Nodes;

namespace VhostBackend.IntegrationTests.Infrastructure;

/// <summary>
/// A minimal QMP client over QEMU's monitor socket: greeting, qmp_capabilities, then one command at a time
/// (asynchronous events that arrive in between are skipped). For tests that stop/continue or migrate a guest.
/// </summary>
public sealed class Qmp : IAsyncDisposable
{
    private readonly Socket _socket;
    private readonly NetworkStream _stream;
    private readonly StreamReader _reader;

    private Qmp(Socket socket)
    {
        _socket = socket;
        _stream = new NetworkStream(socket, ownsSocket: true);
        _reader = new StreamReader(_stream, Encoding.UTF8);
    }

    public static async Task<Qmp> ConnectAsync(string path, TimeSpan timeout)
    {
        var deadline = DateTime.UtcNow + timeout;
        while (true)
        {
            var s = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            try
            {
                await s.ConnectAsync(new UnixDomainSocketEndPoint(path)).ConfigureAwait(false);
                var q = new Qmp(s);
                await q.ReadMessageAsync(TimeSpan.FromSeconds(30)).ConfigureAwait(false); // greeting
                await q.ExecuteAsync("qmp_capabilities").ConfigureAwait(false);
                return q;
            }
            catch (Exception) when (DateTime.UtcNow < deadline)
            {
                s.Dispose();
                await Task.Delay(200).ConfigureAwait(false);
            }
        }
    }

    /// <summary>Runs a command; returns its "return" value, throws on an "error" reply.</summary>
    public async Task<JsonNode?> ExecuteAsync(string command, JsonObject? arguments = null)
    {
        var msg = new JsonObject { ["execute"] = command };
        if (arguments is not null)
        {
            msg["arguments"] = arguments;
        }

        var bytes = Encoding.UTF8.GetBytes(msg.ToJsonString() + "\n");
        await _stream.WriteAsync(bytes).ConfigureAwait(false);
        while (true)
        {
            var reply = await ReadMessageAsync(TimeSpan.FromSeconds(60)).ConfigureAwait(false);
            if (reply["event"] is not null)
            {
                continue;
            }

            if (reply["error"] is { } err)
            {
                throw new InvalidOperationException($"QMP {command}: {err.ToJsonString()}");
            }

            return reply["return"];
        }
    }

    private async Task<JsonObject> ReadMessageAsync(TimeSpan timeout)
    {
        using var cts = new CancellationTokenSource(timeout);
        var line = await _reader.ReadLineAsync(cts.Token).ConfigureAwait(false) ?? throw new IOException("QMP socket closed");
        return (JsonObject)JsonNode.Parse(line)!;
    }

    public ValueTask DisposeAsync()
    {
        _reader.Dispose();
        _stream.Dispose();
        _socket.Dispose();
        return ValueTask.CompletedTask;
    }
}
