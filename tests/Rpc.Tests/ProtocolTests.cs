using System.Net.Sockets;
using System.Text;
using System.Text.Json.Nodes;
using Xunit;

namespace VhostBackend.Rpc.Tests;

/// <summary>
/// The wire protocol against the real socket, checked against SPDK's lib/jsonrpc: no framing, one JSON value per
/// request, errors -32700/-32600/-32601, parse errors close the connection, misbehaving clients affect only themselves.
/// </summary>
public sealed class ProtocolTests
{
    [Fact]
    public async Task InvalidJsonIsParseErrorWithNullIdAndTheConnectionIsClosed()
    {
        await using var app = await TestApp.StartAsync();
        await using var c = await app.ConnectAsync();
        await c.SendAsync("{\"jsonrpc\":\"2.0\",\"method\":\"spdk_get_version\",\"id\":1,]");
        var reply = await c.ReadAsync();
        RawClient.AssertError(reply, -32700);
        Assert.Equal("null", JsonValueKind(reply["id"]));
        Assert.True(await c.ClosedByServerAsync(), "SPDK closes the connection after a parse error (no resync point)");
        Assert.True(app.Logs.Contains("JSON parse error"), "untrusted input is logged");

        // The server itself is fine.
        await using var d = await app.ConnectAsync();
        Assert.NotNull(await d.ResultAsync("spdk_get_version"));
    }

    /// <summary>
    /// Regression (fuzzing, rpc-bind): invalid UTF-8, or a \u escape that is an unpaired surrogate, in a member
    /// name, the method name or a params string used to throw out of the request's handling (System.Text.Json
    /// checks a string only when it is read), and the server closed the connection without a reply (or answered an
    /// internal error for params). It is a parse error, as in SPDK, whose parser rejects both. Inputs: AFL's first
    /// crash (a 0x88 byte in "method"), the same byte in the method name, an invalid sequence in a params string,
    /// AFL's unpaired low surrogate in a member name, an unpaired high surrogate in the method name.
    /// </summary>
    [Theory]
    [InlineData("7b226a7063223a22322e30222c226d6588686f64223a22626465765f6d616c6c6f625f637265617465222c226964223a312c22706172616d73223a7b226e616d65223a2242616c222c226e756d5f626c6c636b73223a332c22626c6f636b5f73697a65223a3531327d7d")]
    [InlineData("7b226a736f6e727063223a22322e30222c226d6574686f64223a227370646b5f6765745f76657273696f6e88222c226964223a317d")]
    [InlineData("7b226a736f6e727063223a22322e30222c226d6574686f64223a22626465765f6d616c6c6f635f637265617465222c226964223a312c22706172616d73223a7b226e616d65223a22c328222c226e756d5f626c6f636b73223a382c22626c6f636b5f73697a65223a3531327d7d")]
    [InlineData("7b226a736f6e727063223a22322e30222c226d6574686f64223a22626465765f6d616c6c6f635f64656c657465222c226964223a31342c227075643833645c756465306172616d73223a7b226e616d65223a2267227d7d")]
    [InlineData("7b226a736f6e727063223a22322e30222c226d6574686f64223a227370646b5f6765745f76657273696f6e5c7564383364222c226964223a317d")]
    public async Task InvalidUtf8IsParseErrorAndTheConnectionIsClosed(string hex)
    {
        await using var app = await TestApp.StartAsync();
        await using var c = await app.ConnectAsync();
        await c.SendAsync(Convert.FromHexString(hex));
        var reply = await c.ReadAsync();
        RawClient.AssertError(reply, -32700);
        Assert.True(await c.ClosedByServerAsync());
        Assert.DoesNotContain(app.Logs.Lines, l => l.Contains("RPC connection", StringComparison.Ordinal) && l.Contains(" failed", StringComparison.Ordinal));

        await using var d = await app.ConnectAsync();
        Assert.NotNull(await d.ResultAsync("spdk_get_version"));
    }

    [Theory]
    [InlineData("[1,2")] // mismatched bracket
    [InlineData("\u0001\u0002garbage")] // not JSON at all
    [InlineData("{'single':'quotes'")]
    public async Task GarbageGetsParseError(string first)
    {
        await using var app = await TestApp.StartAsync();
        await using var c = await app.ConnectAsync();
        await c.SendAsync(first + "}");
        RawClient.AssertError(await c.ReadAsync(), -32700);
        Assert.True(await c.ClosedByServerAsync());
    }

    [Theory]
    [InlineData("\"just a string\"")]
    [InlineData("42 ")]
    [InlineData("true")]
    [InlineData("{\"jsonrpc\":\"2.0\",\"id\":1}")] // no method
    [InlineData("{\"jsonrpc\":\"2.0\",\"method\":7,\"id\":1}")] // method not a string
    [InlineData("{\"jsonrpc\":\"1.0\",\"method\":\"spdk_get_version\",\"id\":1}")] // wrong version
    [InlineData("{\"jsonrpc\":\"2.0\",\"method\":\"spdk_get_version\",\"id\":{}}")] // id must be string/number/null
    [InlineData("{\"jsonrpc\":\"2.0\",\"method\":\"spdk_get_version\",\"params\":5,\"id\":1}")] // params must be object/array
    [InlineData("{\"jsonrpc\":\"2.0\",\"method\":\"spdk_get_version\",\"id\":1,\"extra\":1}")] // strict decode of the request
    [InlineData("[]")]
    public async Task InvalidRequestsGetMinus32600AndTheConnectionStaysUsable(string request)
    {
        await using var app = await TestApp.StartAsync();
        await using var c = await app.ConnectAsync();
        await c.SendAsync(request);
        var reply = await c.ReadAsync();
        Assert.Equal("Invalid request", RawClient.AssertError(reply, -32600));
        Assert.NotNull(await c.ResultAsync("spdk_get_version"));
    }

    [Fact]
    public async Task UnknownMethodIsMinus32601AndEchoesTheId()
    {
        await using var app = await TestApp.StartAsync();
        await using var c = await app.ConnectAsync();
        await c.SendAsync("{\"jsonrpc\":\"2.0\",\"method\":\"no_such_method\",\"id\":\"abc\"}");
        var reply = await c.ReadAsync();
        Assert.Equal("Method not found", RawClient.AssertError(reply, -32601));
        Assert.Equal("abc", (string?)reply["id"]);
    }

    [Fact]
    public async Task RequestWithoutJsonrpcMemberIsAccepted()
    {
        // SPDK's request decoder makes "jsonrpc" optional (validated only when present).
        await using var app = await TestApp.StartAsync();
        await using var c = await app.ConnectAsync();
        await c.SendAsync("{\"method\":\"spdk_get_version\",\"id\":9}");
        var reply = await c.ReadAsync();
        Assert.Equal(9, (int?)reply["id"]);
        Assert.NotNull(reply["result"]);
    }

    [Fact]
    public async Task NotificationsGetNoResultButErrorsAreSent()
    {
        await using var app = await TestApp.StartAsync();
        await using var c = await app.ConnectAsync();
        await c.SendAsync("{\"jsonrpc\":\"2.0\",\"method\":\"bdev_malloc_create\",\"params\":{\"name\":\"N0\",\"num_blocks\":16,\"block_size\":512}}");
        Assert.Null(await c.TryReadAsync(300));
        // The notification ran: the bdev exists.
        var bdevs = (JsonArray)await c.ResultAsync("bdev_get_bdevs", new JsonObject { ["name"] = "N0" });
        Assert.Single(bdevs);
        await c.SendAsync("{\"jsonrpc\":\"2.0\",\"method\":\"nope\"}");
        var err = await c.ReadAsync();
        RawClient.AssertError(err, -32601);
        Assert.Equal("null", JsonValueKind(err["id"]));
    }

    [Fact]
    public async Task RequestSplitAcrossManyWritesIsAnsweredOnce()
    {
        await using var app = await TestApp.StartAsync();
        await using var c = await app.ConnectAsync();
        byte[] req = Encoding.UTF8.GetBytes(RawClient.Request("bdev_malloc_create", new JsonObject { ["name"] = "Split", ["num_blocks"] = 64, ["block_size"] = 512 }, 5));
        foreach (var b in req)
        {
            await c.SendAsync([b]);
            await Task.Delay(1);
        }

        var reply = await c.ReadAsync();
        Assert.Equal(5, (int?)reply["id"]);
        Assert.Equal("Split", (string?)reply["result"]);
        Assert.Null(await c.TryReadAsync(200));
    }

    [Fact]
    public async Task SeveralRequestsInOneWriteAreAnsweredInOrder()
    {
        await using var app = await TestApp.StartAsync();
        await using var c = await app.ConnectAsync();
        string batch = RawClient.Request("bdev_null_create", new JsonObject { ["name"] = "A", ["num_blocks"] = 8, ["block_size"] = 512 }, 1)
            + RawClient.Request("bdev_get_bdevs", new JsonObject { ["name"] = "A" }, 2)
            + "\n  " + RawClient.Request("no_such", null, 3)
            + RawClient.Request("bdev_null_delete", new JsonObject { ["name"] = "A" }, 4);
        await c.SendAsync(batch);
        var r1 = await c.ReadAsync();
        var r2 = await c.ReadAsync();
        var r3 = await c.ReadAsync();
        var r4 = await c.ReadAsync();
        Assert.Equal([1, 2, 3, 4], new[] { r1, r2, r3, r4 }.Select(r => (int)r["id"]!));
        Assert.Equal("A", (string?)r1["result"]);
        Assert.Equal("A", (string?)r2["result"]![0]!["name"]);
        RawClient.AssertError(r3, -32601);
        Assert.True((bool)r4["result"]!);
    }

    [Fact]
    public async Task JsonRpcBatchArrayGetsAnArrayOfReplies()
    {
        await using var app = await TestApp.StartAsync();
        await using var c = await app.ConnectAsync();
        await c.SendAsync("[" + RawClient.Request("spdk_get_version", null, 1) + "," + RawClient.Request("nope", null, 2) + ",5]");
        var buf = new byte[4096];
        using var cts = new CancellationTokenSource(5000);
        var sb = new StringBuilder();
        JsonArray? arr = null;
        while (arr is null)
        {
            int n = await c.Socket.ReceiveAsync(buf, SocketFlags.None, cts.Token);
            Assert.True(n > 0);
            sb.Append(Encoding.UTF8.GetString(buf, 0, n));
            try
            {
                arr = JsonNode.Parse(sb.ToString()) as JsonArray;
            }
            catch (System.Text.Json.JsonException)
            {
            }
        }

        Assert.Equal(3, arr.Count);
        Assert.NotNull(arr[0]!["result"]);
        Assert.Equal(-32601, (int)arr[1]!["error"]!["code"]!);
        Assert.Equal(-32600, (int)arr[2]!["error"]!["code"]!);
    }

    [Fact]
    public async Task SeveralConcurrentClientsAreAllServed()
    {
        await using var app = await TestApp.StartAsync();
        var tasks = Enumerable.Range(0, 8).Select(async i =>
        {
            await using var c = await app.ConnectAsync();
            string name = $"C{i}";
            Assert.Equal(name, (string?)await c.ResultAsync("bdev_null_create", new JsonObject { ["name"] = name, ["num_blocks"] = 8, ["block_size"] = 512 }));
            for (int k = 0; k < 20; k++)
            {
                var list = (JsonArray)await c.ResultAsync("bdev_get_bdevs", new JsonObject { ["name"] = name });
                Assert.Equal(name, (string?)list[0]!["name"]);
            }

            Assert.True((bool)(await c.ResultAsync("bdev_null_delete", new JsonObject { ["name"] = name }))!);
        }).ToArray();
        await Task.WhenAll(tasks).WaitAsync(TimeSpan.FromSeconds(20));
        await using var check = await app.ConnectAsync();
        Assert.Empty((JsonArray)await check.ResultAsync("bdev_get_bdevs"));
    }

    [Fact]
    public async Task ClientDisconnectingMidRequestDoesNotDisturbOthers()
    {
        await using var app = await TestApp.StartAsync();
        await using var other = await app.ConnectAsync();
        for (int i = 0; i < 5; i++)
        {
            var c = await app.ConnectAsync();
            await c.SendAsync("{\"jsonrpc\":\"2.0\",\"method\":\"bdev_malloc_create\",\"params\":{\"name\":\"Hal");
            await c.DisposeAsync(); // gone mid-request
            Assert.NotNull(await other.ResultAsync("spdk_get_version"));
        }

        // A client that half-closes mid-request gets a parse error (the value can never complete).
        var h = await app.ConnectAsync();
        await h.SendAsync("{\"jsonrpc\":\"2.0\",\"meth");
        h.Socket.Shutdown(SocketShutdown.Send);
        RawClient.AssertError(await h.ReadAsync(), -32700);
        await h.DisposeAsync();

        // Disconnect while the reply is being produced: the server must not fail.
        var d = await app.ConnectAsync();
        await d.SendAsync(RawClient.Request("bdev_malloc_create", new JsonObject { ["name"] = "Gone", ["num_blocks"] = 2048, ["block_size"] = 512 }, 1));
        await d.DisposeAsync();
        await WaitUntil(async () => ((JsonArray)await other.ResultAsync("bdev_get_bdevs")).Count == 1);
        Assert.Equal("Gone", (string?)((JsonArray)await other.ResultAsync("bdev_get_bdevs"))[0]!["name"]);
        await WaitUntil(() => Task.FromResult(ConnectionCount(app) == 1)); // only "other" is left
    }

    [Fact]
    public async Task ClientThatNeverReadsDoesNotStallOtherClientsOrReactors()
    {
        await using var app = await TestApp.StartAsync();
        var greedy = await app.ConnectAsync();
        greedy.Socket.ReceiveBufferSize = 4096;
        // Flood requests with large replies and never read them; the socket buffers fill up.
        string req = RawClient.Request("rpc_get_methods", null, 1);
        var flood = Encoding.UTF8.GetBytes(string.Concat(Enumerable.Repeat(req, 2000)));
        var sending = greedy.SendAsync(flood); // may block once the server stops reading this connection
        await Task.Delay(300);

        await using var polite = await app.ConnectAsync();
        var sw = System.Diagnostics.Stopwatch.StartNew();
        for (int i = 0; i < 20; i++)
        {
            Assert.NotNull(await polite.ResultAsync("framework_get_reactors"));
        }

        Assert.True(sw.ElapsedMilliseconds < 5000, $"other client slowed down: {sw.ElapsedMilliseconds} ms");

        // The reactor still runs messages promptly.
        var ran = await app.App.Reactors.Main.InvokeAsync(() => true).WaitAsync(TimeSpan.FromSeconds(2));
        Assert.True(ran);
        await greedy.DisposeAsync();
        try
        {
            await sending.WaitAsync(TimeSpan.FromSeconds(5));
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException or OperationCanceledException)
        {
        }

        await WaitUntil(() => Task.FromResult(ConnectionCount(app) == 1));
    }

    [Fact]
    public async Task OversizedRequestIsRejectedWithParseError()
    {
        await using var app = await TestApp.StartAsync();
        await using var c = await app.ConnectAsync();
        // An unterminated string larger than the 4 MiB request limit.
        var big = new byte[5 * 1024 * 1024];
        Array.Fill(big, (byte)'a');
        var head = Encoding.UTF8.GetBytes("{\"jsonrpc\":\"2.0\",\"method\":\"x\",\"params\":{\"s\":\"");
        Buffer.BlockCopy(head, 0, big, 0, head.Length);
        try
        {
            await c.SendAsync(big);
        }
        catch (SocketException)
        {
            // the server may close before we finish writing
        }

        RawClient.AssertError(await c.ReadAsync(), -32700);
        await using var d = await app.ConnectAsync();
        Assert.NotNull(await d.ResultAsync("spdk_get_version"));
    }

    internal static int ConnectionCount(TestApp app) => app.App.RpcServer!.ConnectionCount;

    internal static async Task WaitUntil(Func<Task<bool>> condition, int timeoutMs = 5000)
    {
        var sw = System.Diagnostics.Stopwatch.StartNew();
        while (!await condition())
        {
            Assert.True(sw.ElapsedMilliseconds < timeoutMs, "condition not met in time");
            await Task.Delay(20);
        }
    }

    private static string JsonValueKind(JsonNode? n) => n is null ? "null" : n.GetValueKind().ToString();
}
