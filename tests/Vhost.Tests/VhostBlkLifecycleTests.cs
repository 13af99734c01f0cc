using System.Text.Json;
using VhostBackend.Platform;
using VhostBackend.Reactors;
using VhostBackend.Rpc;
using VhostBackend.Vhost.Blk;
using VhostBackend.Vhost.Rpc;
using VhostBackend.VhostUser;
using VhostBackend.Virtio;
using VhostBackend.Virtio.Blk;
using VhostBackend.Virtio.Tests;
using Xunit;

namespace VhostBackend.Vhost.Tests;

public sealed class VhostBlkLifecycleTests
{
    private const ulong WantProtocol = (1UL << VhostUserProtocolFeature.ReplyAck) | (1UL << VhostUserProtocolFeature.Config);
    private const ulong BaseFeatures = (1UL << VirtioFeatures.Version1) | (1UL << VhostUserConstants.ProtocolFeaturesBit);

    private static (FrontEndModel Fe, DriverRingModel M, BlkDriverModel Drv) Attach(VhostTestHost host, string ctrlr, ushort size = 16)
    {
        var fe = host.Connect(ctrlr);
        fe.Negotiate(WantProtocol);
        Assert.Equal(0UL, fe.SetU64(VhostUserRequest.SetFeatures, BaseFeatures));
        var m = new DriverRingModel(size);
        Assert.Equal(0UL, fe.SetMemTable(m));
        Assert.Equal(0UL, fe.SetupQueue(m, 0, null, null));
        return (fe, m, new BlkDriverModel(m));
    }

    [Fact]
    public async Task DataPathAllocatesNothingPerRequest()
    {
        await using var host = new VhostTestHost(reactors: 1);
        host.Vhost.CreateBlkController("z", "Malloc0", null, false);
        var (fe, m, drv) = Attach(host, "z", 64);
        using var _ = fe;
        using var __ = m;
        ulong buf = m.Alloc(4096, 4096);
        var reactor = host.Runtime.Main;

        async Task<long> RunBatch(int count)
        {
            long before = await reactor.InvokeAsync(() => GC.GetAllocatedBytesForCurrentThread());
            for (int i = 0; i < count; i++)
            {
                ushort target = (ushort)(m.UsedIdx + 1);
                drv.Post(i % 2 == 0 ? VirtioBlkRequestType.Out : VirtioBlkRequestType.In, (ulong)(i % 64) * 8, buf, 4096, i % 2 == 1);
                Assert.True(await VhostTestHost.WaitUntil(() => m.UsedIdx == target));
            }

            long after = await reactor.InvokeAsync(() => GC.GetAllocatedBytesForCurrentThread());
            return after - before;
        }

        await RunBatch(50); // warm up (JIT, tiering, first-use paths)
        long idle = await RunBatch(0);
        long busy = await RunBatch(500);

        // The two InvokeAsync round trips allocate a little; 500 requests must add (almost) nothing on top.
        Assert.True(busy - idle < 2048, $"reactor allocated {busy} bytes for 500 requests (baseline {idle})");
    }

    [Fact]
    public async Task CompletionsBeforeTheCallFdArrivesAreSignalledWhenItDoes()
    {
        // QEMU sends SET_VRING_CALL after the queue started and does not wait: the guest may submit first.
        await using var host = new VhostTestHost(reactors: 1, mode: ReactorMode.Interrupt);
        host.Vhost.CreateBlkController("c", "Malloc0", null, false);
        using var fe = host.Connect("c");
        fe.Negotiate(WantProtocol);
        Assert.Equal(0UL, fe.SetU64(VhostUserRequest.SetFeatures, BaseFeatures | (1UL << VirtioFeatures.RingEventIdx)));
        using var m = new DriverRingModel(16, eventIdx: true);
        Assert.Equal(0UL, fe.SetMemTable(m));
        using var kick = new EventFd();
        Assert.Equal(0UL, fe.SetupQueue(m, 0, kick, null));
        var drv = new BlkDriverModel(m);
        ulong buf = m.Alloc(512);
        drv.Post(VirtioBlkRequestType.In, 0, buf, 512, deviceWritesData: true);
        kick.Signal();
        Assert.True(await VhostTestHost.WaitUntil(() => m.UsedIdx == 1), "request not completed");

        using var call = new EventFd();
        Assert.Equal(0UL, fe.SetU64(VhostUserRequest.SetVringCall, 0, [call.Fd]));
        Assert.True(await VhostTestHost.WaitUntil(() => call.Drain(), 2000), "the completion published before SET_VRING_CALL was never signalled");
    }

    [Fact]
    public async Task HotRemovedBdevFailsIoAndControllerShowsNoBdev()
    {
        await using var host = new VhostTestHost();
        var ctrl = host.Vhost.CreateBlkController("hr", "Malloc0", null, false);
        var (fe, m, drv) = Attach(host, "hr");
        using var _ = fe;
        using var __ = m;
        ulong buf = m.Alloc(512);
        ulong st = drv.Post(VirtioBlkRequestType.In, 0, buf, 512, true);
        Assert.True(await VhostTestHost.WaitUntil(() => m.UsedIdx == 1));
        Assert.Equal(VirtioBlkRequestType.StatusOk, drv.Status(st));

        await host.Bdevs.UnregisterAsync(host.Bdev, TimeSpan.FromSeconds(5));
        Assert.Null(ctrl.BdevName);
        Assert.Null(ctrl.ToJson()["backend_specific"]!["block"]!["bdev"]);

        ulong st2 = drv.Post(VirtioBlkRequestType.In, 0, buf, 512, true);
        Assert.True(await VhostTestHost.WaitUntil(() => m.UsedIdx == 2));
        Assert.Equal(VirtioBlkRequestType.StatusIoErr, drv.Status(st2));
        Assert.Empty(VhostRpc.WriteConfig(host.Vhost, "vhost_blk"));
    }

    [Fact]
    public async Task RpcMethodsUseSpdkNamesParamsAndErrors()
    {
        await using var host = new VhostTestHost();
        var registry = new RpcRegistry();
        var subsystems = new SubsystemRegistry();
        VhostRpc.Register(registry, host.Vhost, subsystems);
        Assert.NotNull(subsystems.Find("vhost_blk"));

        async Task<System.Text.Json.Nodes.JsonNode?> Call(string method, string json)
        {
            Assert.True(registry.TryGet(method, out var handler, out _));
            using var doc = JsonDocument.Parse(json);
            return await handler(new RpcRequest(method, doc.RootElement.Clone()));
        }

        Assert.Equal(true, (bool?)await Call("vhost_create_blk_controller", """{"ctrlr":"r0","dev_name":"Malloc0","cpumask":"0x1","readonly":true}"""));
        var dup = await Assert.ThrowsAsync<RpcException>(() => Call("vhost_create_blk_controller", """{"ctrlr":"r0","dev_name":"Malloc0"}"""));
        Assert.Equal(-32602, dup.Code);
        Assert.StartsWith("File exists: ctrlr: ", dup.Message);
        var nodev = await Assert.ThrowsAsync<RpcException>(() => Call("vhost_create_blk_controller", """{"ctrlr":"r1","dev_name":"nope"}"""));
        Assert.Equal(-32602, nodev.Code);
        Assert.StartsWith("No such device: dev_name: ", nodev.Message);
        var missing = await Assert.ThrowsAsync<RpcException>(() => Call("vhost_create_blk_controller", """{"ctrlr":"r2"}"""));
        Assert.Equal(-32602, missing.Code);
        // SPDK decodes this method relaxed (spdk_json_decode_object_relaxed): unknown names are ignored.
        Assert.Equal(true, (bool?)await Call("vhost_create_blk_controller", """{"ctrlr":"r2","dev_name":"Malloc0","bogus":1}"""));
        Assert.Equal(true, (bool?)await Call("vhost_delete_controller", """{"ctrlr":"r2"}"""));
        // packed_ring (issue 19): accepted, VIRTIO_F_RING_PACKED offered only then.
        Assert.Equal(true, (bool?)await Call("vhost_create_blk_controller", """{"ctrlr":"r2","dev_name":"Malloc0","packed_ring":true}"""));
        Assert.Equal(true, (bool?)await Call("vhost_delete_controller", """{"ctrlr":"r2"}"""));

        var list = (System.Text.Json.Nodes.JsonArray)(await Call("vhost_get_controllers", "{}"))!;
        var c = Assert.Single(list)!;
        Assert.Equal("r0", (string?)c["ctrlr"]);
        Assert.Equal("0x1", (string?)c["cpumask"]);
        Assert.True((bool)c["backend_specific"]!["block"]!["readonly"]!);
        Assert.EndsWith("/r0", (string?)c["socket"]);
        var notFound = await Assert.ThrowsAsync<RpcException>(() => Call("vhost_get_controllers", """{"name":"zz"}"""));
        Assert.Equal(-32603, notFound.Code);

        Assert.Equal(true, (bool?)await Call("vhost_controller_set_coalescing", """{"ctrlr":"r0","delay_base_us":80,"iops_threshold":12000}"""));
        var badRate = await Assert.ThrowsAsync<RpcException>(() => Call("vhost_controller_set_coalescing", """{"ctrlr":"r0","delay_base_us":80,"iops_threshold":1}"""));
        Assert.Equal(-32602, badRate.Code);
        var config = subsystems.Find("vhost_blk")!.WriteConfig();
        Assert.Equal(2, config.Count);
        Assert.Equal(80u, (uint)config[1]!["params"]!["delay_base_us"]!);

        Assert.Equal(true, (bool?)await Call("vhost_delete_controller", """{"ctrlr":"r0"}"""));
        var gone = await Assert.ThrowsAsync<RpcException>(() => Call("vhost_delete_controller", """{"ctrlr":"r0"}"""));
        Assert.Equal(-32602, gone.Code);
        Assert.StartsWith("No such device: ctrlr: ", gone.Message);
    }

    [Fact]
    public async Task ConfigChangeIsSentOverTheBackendChannel()
    {
        await using var host = new VhostTestHost();
        var ctrl = host.Vhost.CreateBlkController("cc", "Malloc0", null, false);
        using var fe = host.Connect("cc");
        fe.Negotiate(WantProtocol | (1UL << VhostUserProtocolFeature.BackendReq));
        var (ours, theirs) = UnixConnection.CreatePair();
        using var backend = ours;
        fe.Send(VhostUserRequest.SetBackendReqFd, ReadOnlySpan<byte>.Empty, [theirs.FileDescriptor], needReply: true);
        Assert.Equal(0UL, fe.ReadU64Reply(VhostUserRequest.SetBackendReqFd));
        theirs.Dispose();
        Assert.True(await VhostTestHost.WaitUntil(() => ctrl.Sessions.Count == 1));
        Assert.True(ctrl.Sessions[0].SendConfigChange());
        var msg = new FrontEndModel(backend).ReadReply(reply: false);
        Assert.NotNull(msg);
        Assert.Equal((uint)VhostUserBackendRequest.ConfigChangeMsg, msg.Value.Header.Request);
        Assert.Equal(VhostUserConstants.Version, msg.Value.Header.Flags);
    }
}
