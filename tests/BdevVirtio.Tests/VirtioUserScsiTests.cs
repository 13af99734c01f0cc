using System.Text.Json;
using System.Text.Json.Nodes;
using VhostBackend.Bdev;
using VhostBackend.BdevMalloc;
using VhostBackend.Rpc;
using VhostBackend.Vhost;
using Xunit;

namespace VhostBackend.BdevVirtio.Tests;

/// <summary>
/// The virtio-user SCSI front end (dev_type "scsi") against our vhost-user-scsi controller (VhostManager, malloc
/// bdevs behind its targets, in process): scan, data, flush, unmap, hot remove over the back end's RPC, detach.
/// </summary>
public sealed partial class VirtioUserEndToEndTests
{
    [Fact]
    public async Task AgainstOurVhostScsi_ScanReadWriteFlushUnmapHotRemoveAndDetach()
    {
        var bdevs = new BdevManager();
        var malloc0 = new MallocBdev("Malloc0", Blocks, BlockSize);
        var malloc1 = new MallocBdev("Malloc1", 4096, 4096);
        bdevs.Register(malloc0);
        bdevs.Register(malloc1);
        await using var vhost = new VhostManager(_runtime, bdevs, _dir, _log);
        string socket = Path.Combine(_dir, "scsi.0");
        VhostController ctrlr = null!;
        await _runtime.Main.InvokeAsync(() =>
        {
            ctrlr = vhost.CreateScsiController("scsi.0", null);
            vhost.AddScsiTarget("scsi.0", 0, "Malloc0");
            vhost.AddScsiTarget("scsi.0", 3, "Malloc1");
        });
        var module = StartModule(bdevs);
        try
        {
            var names = await _runtime.Main.InvokeAsync(() => module.AttachAsync("VirtioScsi0", socket, vqCount: 2, vqSize: 64, devType: VirtioDevType.Scsi));
            Assert.Equal(["VirtioScsi0t0", "VirtioScsi0t3"], names);
            var t0 = Assert.IsType<VirtioScsiBdev>(bdevs.Find("VirtioScsi0t0"));
            var t3 = Assert.IsType<VirtioScsiBdev>(bdevs.Find("VirtioScsi0t3"));
            Assert.Equal((BlockSize, Blocks, 0), (t0.BlockSize, t0.BlockCount, t0.Target));
            Assert.Equal((4096u, 4096UL, 3), (t3.BlockSize, t3.BlockCount, t3.Target));
            Assert.Equal("Virtio SCSI Disk", t0.ProductName);
            Assert.True(t0.UnmapSupported && t0.SupportsIoType(BdevIoType.Unmap), "malloc supports unmap: the LBP VPD page should say LBPU");
            Assert.True(t0.SupportsIoType(BdevIoType.Flush));
            Assert.False(t0.SupportsIoType(BdevIoType.WriteZeroes));
            Assert.Equal(VirtioDevType.Scsi, t0.Ctrl.DevType);
            Assert.Equal(2, t0.Ctrl.VqCount);
            Assert.Equal(0UL, t0.Ctrl.Features & Virtio.VirtioFeatures.Bit(Virtio.Scsi.VirtioScsiFeature.InOut));
            Assert.NotEqual(0UL, t0.Ctrl.Features & Virtio.VirtioFeatures.Bit(Virtio.Scsi.VirtioScsiFeature.Hotplug));

            // save_config: one attach call for the controller (the module's), none per disk (SPDK).
            Assert.Null(t0.ConfigCall());
            var calls = new JsonArray();
            await _runtime.Main.InvokeAsync(() => module.WriteConfig(calls));
            var call = Assert.Single(calls)!;
            Assert.Equal("bdev_virtio_attach_controller", (string?)call["method"]);
            Assert.Equal("scsi", (string?)call["params"]!["dev_type"]);
            Assert.Equal("VirtioScsi0", (string?)call["params"]!["name"]);
            Assert.Equal(socket, (string?)call["params"]!["traddr"]);
            Assert.Equal(2, (int?)call["params"]!["vq_count"]);
            Assert.Equal(64, (int?)call["params"]!["vq_size"]);
            var dev = Assert.Single(module.GetScsiDevices())!;
            Assert.Equal("VirtioScsi0", (string?)dev["name"]);
            Assert.Equal(4, (int?)dev["virtio"]!["vq_count"]);
            Assert.Empty(module.GetDevices());

            using var desc = bdevs.Open("VirtioScsi0t0", true);
            var release = await HoldChannels(desc);

            // Each reactor's channel owns a request queue (2 and 3; 0 and 1 are the control and event queues).
            Assert.Equal([2, 3], ChannelQueues(t0.Ctrl));

            await WriteReadVerify(desc, perReactor: 40, seed: 7);

            // The data really is in the malloc bdevs behind the targets.
            await AssertDataReachesBacking(bdevs, desc, "Malloc0", fill: 42, lba: 100, bytes: 8192);

            using (var desc3 = bdevs.Open("VirtioScsi0t3", true))
            using (var w = new Buf(16384))
            using (var m = new Buf(16384))
            {
                w.Fill(3);
                Assert.True(await Write(R(0), desc3, w, 4092)); // the last 4 blocks
                using var mdesc = bdevs.Open("Malloc1", false);
                Assert.True(await Read(R(1), mdesc, m, 4092));
                Assert.True(m.Span.SequenceEqual(w.Span), "target 3's data is not on Malloc1");
                m.Span.Clear();
                Assert.True(await Read(R(1), desc3, m, 4092));
                Assert.True(m.Span.SequenceEqual(w.Span));
            }

            await FlushAndUnmap(desc);
            await AssertOutOfRangeRefused(desc);

            var stats = t0.GetStats();
            Assert.True(stats.NumWriteOps > 80 && stats.NumReadOps > 80);
            Assert.True(malloc0.GetStats().NumWriteOps >= stats.NumWriteOps);
            Assert.All(t0.Ctrl.SnapshotChannels(), c => Assert.Equal(0, ((VirtioScsiChannel)c.Context).Errors));

            // The back end removes target 3 (vhost_scsi_controller_remove_target): its REMOVED event hot-removes the bdev.
            await OnMain(() => vhost.RemoveScsiTargetAsync("scsi.0", 3));
            Assert.True(await WaitUntil(() => bdevs.Find("VirtioScsi0t3") is null), "the hot-removed target's bdev is still registered");
            Assert.NotNull(bdevs.Find("VirtioScsi0t0"));
            Assert.Contains(_log.Lines, l => l.Contains("target 3 removed by the back end"));

            // Target 0 still works after the event.
            using (var w = new Buf(4096))
            {
                w.Fill(11);
                Assert.True(await Write(R(0), desc, w, 7));
            }

            await ReleaseAndDetach(release, desc, ctrlr, module, bdevs, "VirtioScsi0", "VirtioScsi0t0");
        }
        catch
        {
            _out.WriteLine(_log.Dump());
            throw;
        }
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task AgainstOurVhostScsi_SplitAndPackedRings_NoTargetsAndQueueLimits(bool packed)
    {
        var bdevs = new BdevManager();
        bdevs.Register(new MallocBdev("Malloc0", Blocks, BlockSize));
        await using var vhost = new VhostManager(_runtime, bdevs, _dir, _log);
        await _runtime.Main.InvokeAsync(() => vhost.CreateScsiController("scsi.1", null));
        var module = StartModule(bdevs);
        string socket = Path.Combine(_dir, "scsi.1");

        // No target: the attach succeeds with no bdev (the controller stays attached, as SPDK's).
        var none = await _runtime.Main.InvokeAsync(() => module.AttachAsync("S0", socket, vqCount: 1, vqSize: 32, packedRing: packed, devType: VirtioDevType.Scsi));
        Assert.Empty(none);
        var c = Assert.Single(module.Controllers);
        Assert.Equal(packed, c.PackedRing);
        await OnMain(() => module.DetachAsync("S0"));

        // More request queues than the back end has.
        var e = await Assert.ThrowsAsync<RpcException>(() => _runtime.Main.InvokeAsync(() => module.AttachAsync("S1", socket, vqCount: 200, devType: VirtioDevType.Scsi)));
        Assert.Equal(RpcErrorCodes.InvalidParams, e.Code);
        Assert.Contains("request queue", e.Message);
        Assert.Empty(module.Controllers);

        // A target added after the attach; the front end sees it on the next attach.
        await _runtime.Main.InvokeAsync(() => vhost.AddScsiTarget("scsi.1", 5, "Malloc0"));
        var names = await _runtime.Main.InvokeAsync(() => module.AttachAsync("S2", socket, vqCount: 1, vqSize: 32, packedRing: packed, devType: VirtioDevType.Scsi));
        Assert.Equal(["S2t5"], names);
        using (var desc = bdevs.Open("S2t5", true))
        using (var w = new Buf(131072))
        using (var rb = new Buf(131072))
        {
            w.Fill(8);
            Assert.True(await Write(R(0), desc, w, 512));
            Assert.True(await Read(R(0), desc, rb, 512));
            Assert.True(rb.Span.SequenceEqual(w.Span));
        }

        await OnMain(() => module.DetachAsync("S2"));
        Assert.Null(bdevs.Find("S2t5"));

        // dev_type validation: blk and scsi are accepted, anything else is SPDK's EINVAL.
        new VirtioAttachParams { Name = "Y", Trtype = "user", Traddr = "/x", DevType = "scsi" }.Validate();
        var bad = new VirtioAttachParams { Name = "Y", Trtype = "user", Traddr = "/x", DevType = "SCSI" };
        Assert.Equal(22, Assert.Throws<RpcException>(bad.Validate).Code);
    }
}

/// <summary>The front end against a model back end that answers badly (<see cref="ModelScsiBackEnd"/>).</summary>
public sealed partial class VirtioUserEndToEndTests
{
    [Fact]
    public async Task AgainstAModelScsiBackEnd_BadGeometryAndBadResponsesAreRefused()
    {
        var bdevs = new BdevManager();
        string socket = Path.Combine(_dir, "model.0");
        var model = new ModelScsiBackEnd(socket, _runtime, _log.CreateLogger("model"));
        model.StartListening();
        var rpc = new RpcRegistry();
        var module = StartModule(bdevs, rpc: rpc);
        try
        {
            // Through the RPC method, as rpc.py sends it; the answer is SPDK's list of bdev names.
            var names = await CallRpc(rpc, "bdev_virtio_attach_controller", $$"""{"name":"M","trtype":"user","traddr":"{{socket}}","dev_type":"scsi","vq_count":1,"vq_size":16}""");

            // Target 0 only: 1 has a 520-byte block size, 2 never gets ready, 3 claims 2^64 blocks.
            Assert.Equal("""["Mt0"]""", names!.ToJsonString());
            var devices = await CallRpc(rpc, "bdev_virtio_scsi_get_devices", "{}");
            Assert.Equal("M", (string?)devices![0]!["name"]);
            Assert.Equal(3, (int?)devices[0]!["virtio"]!["vq_count"]);
            Assert.Equal(ModelScsiBackEnd.Blocks, bdevs.Find("Mt0")!.BlockCount);
            Assert.Contains(_log.Lines, l => l.Contains("invalid target 1"));
            Assert.Contains(_log.Lines, l => l.Contains("target 2 is present, but unavailable"));
            Assert.Contains(_log.Lines, l => l.Contains("invalid target 3"));
            Assert.Equal(5, model.Commands[2]); // the same INQUIRY 5 times, as SPDK
            Assert.Equal(1, model.Commands[63]); // every target up to 63 is asked
            Assert.Equal(0, model.Commands[64]);
            Assert.False(bdevs.Find("Mt0")!.SupportsIoType(BdevIoType.Unmap)); // no Logical Block Provisioning page

            using var desc = bdevs.Open("Mt0", true);
            var held = await R(0).InvokeAsync(() => desc.GetIoChannel()); // keeps the channel (and its error count)
            using var b = new Buf(512);
            Assert.True(await Read(R(0), desc, b, 0));
            Assert.True(b.Span.IndexOfAnyExcept((byte)0xAB) < 0);
            foreach (ulong lba in new ulong[] { 1, 2, 3, 4 })
            {
                b.Span.Clear();
                Assert.False(await Read(R(0), desc, b, lba), $"read at {lba} should fail");
                Assert.False(await Write(R(0), desc, b, lba), $"write at {lba} should fail");
            }

            Assert.True(await Write(R(0), desc, b, 5));
            Assert.Contains(_log.Lines, l => l.Contains("sense key 0x3, ASC/ASCQ 0x11/0x00"));
            Assert.Contains(_log.Lines, l => l.Contains("residual 512"));
            Assert.Contains(_log.Lines, l => l.Contains("used length 0"));
            var ch = Assert.Single(((VirtioScsiBdev)desc.Bdev).Ctrl.SnapshotChannels());
            Assert.Equal(8, ((VirtioScsiChannel)ch.Context).Errors);
            await R(0).InvokeAsync(() => BdevDesc.PutIoChannel(held));
            desc.Dispose();
            Assert.True((bool?)await CallRpc(rpc, "bdev_virtio_detach_controller", """{"name":"M"}"""));
            Assert.Null(bdevs.Find("Mt0"));
            Assert.Equal(-19, (await Assert.ThrowsAsync<RpcException>(() => CallRpc(rpc, "bdev_virtio_detach_controller", """{"name":"M"}"""))).Code);
        }
        catch
        {
            _out.WriteLine(_log.Dump());
            throw;
        }
        finally
        {
            await model.ShutdownAsync();
        }
    }

    private async Task<JsonNode?> CallRpc(RpcRegistry rpc, string method, string json)
    {
        Assert.True(rpc.TryGet(method, out var handler, out _));
        using var doc = JsonDocument.Parse(json);
        var req = new RpcRequest(method, doc.RootElement.Clone());
        return await _runtime.Main.InvokeAsync(() => handler(req));
    }
}
