using System.Net;
using System.Net.Sockets;
using System.Text.Json;
using System.Text.Json.Nodes;
using Microsoft.Extensions.Logging.Abstractions;
using VhostBackend.Bdev;
using VhostBackend.BdevMalloc;
using VhostBackend.Platform;
using VhostBackend.Reactors;
using VhostBackend.Rpc;

namespace VhostBackend.Nvmf.Tests;

/// <summary>A real target (our NvmfTarget on two reactors) with malloc bdevs, driven through its RPC methods.</summary>
public sealed class NvmfTestTarget : IAsyncDisposable
{
    public const string Nqn = "nqn.2016-06.io.spdk:cnode1";
    public readonly BdevManager Bdevs = new();
    public readonly RpcRegistry Rpc = new();
    public readonly SubsystemRegistry Subsystems = new();
    public ReactorRuntime Reactors { get; }
    public NvmfTarget Target { get; }
    public int Port { get; private set; }

    public NvmfTestTarget()
    {
        var online = CpuSet.Online().Cores;
        Reactors = new ReactorRuntime(CpuSet.Of(online.Take(2).ToArray()), new ReactorOptions { Mode = ReactorMode.Poll, PinThreads = false });
        Reactors.Start();
        Target = new NvmfTarget(Reactors, Bdevs, NullLoggerFactory.Instance);
        NvmfRpc.Register(Rpc, Target, Subsystems);
    }

    public static int FreePort()
    {
        using var s = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        s.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        return ((IPEndPoint)s.LocalEndPoint!).Port;
    }

    public async Task<JsonNode?> Call(string method, string json)
    {
        if (!Rpc.TryGet(method, out var handler, out _))
        {
            throw new InvalidOperationException($"no method {method}");
        }

        using var doc = JsonDocument.Parse(json);
        var req = new RpcRequest(method, doc.RootElement.Clone());
        return await Reactors.Main.InvokeAsync(() => handler(req));
    }

    public async Task<RpcException> CallError(string method, string json)
    {
        try
        {
            await Call(method, json);
        }
        catch (RpcException e)
        {
            return e;
        }

        throw new Xunit.Sdk.XunitException($"{method} {json} succeeded");
    }

    public async Task AddMalloc(string name, ulong blocks = 8192, uint blockSize = 512) =>
        await Reactors.Main.InvokeAsync(() => Bdevs.Register(new MallocBdev(name, blocks, blockSize)));

    /// <summary>Transport (extra options), subsystem cnode1 (any host unless told), Malloc0 as namespace 1, a listener.</summary>
    public async Task SetupAsync(string transportExtra = "", bool allowAnyHost = true)
    {
        await AddMalloc("Malloc0");
        await Call("nvmf_create_transport", $$$"""{"trtype":"TCP"{{{transportExtra}}}}""");
        await Call("nvmf_create_subsystem", $$"""{"nqn":"{{Nqn}}","allow_any_host":{{(allowAnyHost ? "true" : "false")}},"serial_number":"SPDK00000000000001","model_number":"SPDK bdev Controller"}""");
        await Call("nvmf_subsystem_add_ns", $$$"""{"nqn":"{{{Nqn}}}","namespace":{"bdev_name":"Malloc0"}}""");
        Port = FreePort();
        await Call("nvmf_subsystem_add_listener", $$$"""{"nqn":"{{{Nqn}}}","listen_address":{"trtype":"TCP","adrfam":"IPv4","traddr":"127.0.0.1","trsvcid":"{{{Port}}}"}}""");
    }

    /// <summary>A host model connected, initialized and (optionally) with an enabled admin queue.</summary>
    public NvmfHostModel Host(bool hdgst = false, bool ddgst = false)
    {
        var h = new NvmfHostModel(Port);
        h.IcReq(hdgst, ddgst);
        return h;
    }

    public async ValueTask DisposeAsync()
    {
        await Target.DisposeAsync();
        await Reactors.DisposeAsync();
    }
}
