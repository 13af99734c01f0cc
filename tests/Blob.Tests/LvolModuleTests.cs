using System.Text.Json;
using System.Text.Json.Nodes;
using Microsoft.Extensions.Logging.Abstractions;
using VhostBackend.Bdev;
using VhostBackend.Bdev.Rpc;
using VhostBackend.BdevFile;
using VhostBackend.BdevLvol;
using VhostBackend.BdevMalloc;
using VhostBackend.Platform;
using VhostBackend.Reactors;
using VhostBackend.Rpc;

namespace VhostBackend.Blob.Tests;

/// <summary>Reactors, a bdev manager with the bdev RPCs and the lvol module, as the App hosts them.</summary>
internal sealed class LvolKit : IAsyncDisposable
{
    public LvolKit(int reactors = 2)
    {
        var online = CpuSet.Online().Cores;
        Runtime = new ReactorRuntime(CpuSet.Of(online.Take(Math.Min(reactors, online.Count)).ToArray()), new ReactorOptions { Mode = ReactorMode.Interrupt, PinThreads = false });
        Runtime.Start();
        var subsystems = new SubsystemRegistry();
        BdevRpc.Register(Rpc, subsystems, Bdevs);
        Lvol = new LvolModule();
        Bdevs.AddModule(Lvol);
        Lvol.Init(new BdevModuleContext(Bdevs, Runtime, Rpc, subsystems, NullLoggerFactory.Instance));
    }

    public ReactorRuntime Runtime { get; }
    public BdevManager Bdevs { get; } = new();
    public RpcRegistry Rpc { get; } = new();
    public LvolModule Lvol { get; }
    public Reactor Main => Runtime.Main;

    public async ValueTask DisposeAsync()
    {
        await Lvol.FiniAsync();
        foreach (var b in Bdevs.All.Reverse())
        {
            await Main.InvokeAsync(() => Bdevs.UnregisterAsync(b, TimeSpan.FromSeconds(5)));
        }
        await Runtime.DisposeAsync();
    }

    public Task<JsonNode?> Call(string method, object? p = null)
    {
        Assert.True(Rpc.TryGet(method, out var h, out _), method);
        JsonElement? el = p == null ? null : JsonSerializer.SerializeToElement(p);
        return Main.InvokeAsync(() => h(new RpcRequest(method, el)));
    }

    public async Task<RpcException> CallFails(string method, object? p)
    {
        return await Assert.ThrowsAsync<RpcException>(() => Call(method, p));
    }

    public Task<(int Rc, bool Ok)> Io(BdevDesc desc, Func<BdevChannel, BdevIoCompletion, int> submit, Reactor? on = null) =>
        (on ?? Main).InvokeAsync(async () =>
        {
            var ch = desc.GetIoChannel();
            var tcs = new TaskCompletionSource<bool>(TaskCreationOptions.RunContinuationsAsynchronously);
            int rc = submit(ch, (io, ok, _) => tcs.SetResult(ok));
            bool ok = rc == 0 && await tcs.Task;
            BdevDesc.PutIoChannel(ch);
            return (rc, ok);
        });

    public async Task<bool> Write(string bdev, ulong offset, byte[] data, Reactor? on = null)
    {
        using var desc = Bdevs.Open(bdev, true);
        using var buf = new AlignedBuffer((nuint)data.Length);
        data.CopyTo(buf.AsSpan(0, data.Length));
        var iov = new[] { buf.ToIoVec() };
        uint bs = desc.Bdev.BlockSize;
        var (rc, ok) = await Io(desc, (ch, cb) => ch.Write(desc, iov, offset / bs, (ulong)data.Length / bs, cb, null), on);
        return rc == 0 && ok;
    }

    public async Task<byte[]> Read(string bdev, ulong offset, int length, Reactor? on = null)
    {
        using var desc = Bdevs.Open(bdev, false);
        using var buf = new AlignedBuffer((nuint)length);
        var iov = new[] { buf.ToIoVec() };
        uint bs = desc.Bdev.BlockSize;
        var (rc, ok) = await Io(desc, (ch, cb) => ch.Read(desc, iov, offset / bs, (ulong)length / bs, cb, null), on);
        Assert.True(rc == 0 && ok, $"read {length} at {offset} of {bdev}");
        return buf.AsSpan(0, length).ToArray();
    }

    public async Task<byte[]> ReadAll(string bdev)
    {
        var b = Bdevs.Find(bdev)!;
        ulong size = b.BlockCount * b.BlockSize;
        var all = new byte[size];
        for (ulong o = 0; o < size; o += 65536)
        {
            (await Read(bdev, o, 65536, Runtime.Reactors[^1])).CopyTo(all, (int)o);
        }
        return all;
    }
}

public class LvolModuleTests
{
    private const int MiB = 1024 * 1024;

    private static string TempImage(string file)
    {
        var path = Path.Combine(Path.GetTempPath(), $"lvoltest-{Guid.NewGuid():N}.img");
        File.WriteAllBytes(path, GoldenImages.Decompress(file));
        return path;
    }

    [Theory]
    [InlineData("lvs512.img.gz")]
    [InlineData("lvs4k.img.gz")]
    [InlineData("lvs512-dirty.img.gz")]
    public async Task ExamineFindsTheSpdkLvstoreOnAnAioBdevAndListsItAsSpdkDid(string file)
    {
        var im = GoldenImages.Image(file);
        var path = TempImage(file);
        try
        {
            await using (var kit = new LvolKit())
            {
                kit.Bdevs.Register(FileBdev.Open("aio0", path, im.GetProperty("block_size").GetUInt32(), false, null, "bdev_aio_create"));
                await kit.Call("bdev_wait_for_examine");
                var spdk = im.GetProperty("spdk_after_reload");
                Assert.Equal(JsonNode.Parse(spdk.GetProperty("bdev_lvol_get_lvstores").GetRawText())!.ToJsonString(), (await kit.Call("bdev_lvol_get_lvstores"))!.ToJsonString());
                Assert.Equal(JsonNode.Parse(spdk.GetProperty("bdev_lvol_get_lvols").GetRawText())!.ToJsonString(), (await kit.Call("bdev_lvol_get_lvols"))!.ToJsonString());
                Assert.Equal("lvol", kit.Bdevs.Find("aio0")!.ClaimedBy);
                foreach (var e in im.GetProperty("lvols").EnumerateArray())
                {
                    var b = kit.Bdevs.Find(e.GetProperty("alias").GetString()!)!;
                    Assert.Equal(e.GetProperty("uuid").GetString(), b.Name);
                    Assert.Equal("Logical Volume", b.ProductName);
                    Assert.Equal(e.GetProperty("bdev_num_blocks").GetUInt64(), b.BlockCount);
                    Assert.Equal(!e.GetProperty("read_only").GetBoolean(), b.SupportsIoType(BdevIoType.Write));
                    Assert.Equal(e.GetProperty("sha256").GetString(), GoldenImages.Sha256(await kit.ReadAll(b.Name)));
                }
            }
            // Our shutdown unloaded it cleanly: the clean flag is set.
            var head = new byte[20];
            using (var f = File.OpenRead(path))
            {
                f.ReadExactly(head);
            }
            Assert.Equal(1u, BitConverter.ToUInt32(head, 16));
        }
        finally
        {
            File.Delete(path);
        }
    }

    [Fact]
    public async Task RpcsCreateWriteSnapshotCloneAndTheStoreComesBackByExamine()
    {
        var path = Path.Combine(Path.GetTempPath(), $"lvoltest-{Guid.NewGuid():N}.img");
        FileBdev.CreateSparseIfMissing(path, 64 * MiB);
        try
        {
            string snapData;
            await using (var kit = new LvolKit())
            {
                kit.Bdevs.Register(FileBdev.Open("aio0", path, 512, false, null, "bdev_aio_create"));
                await kit.Call("bdev_wait_for_examine");
                Assert.Empty((await kit.Call("bdev_lvol_get_lvstores"))!.AsArray());
                var uuid = (await kit.Call("bdev_lvol_create_lvstore", new { bdev_name = "aio0", lvs_name = "lvs", cluster_sz = MiB }))!.GetValue<string>();
                Assert.True(Guid.TryParse(uuid, out _));
                Assert.Equal(-17, (await kit.CallFails("bdev_lvol_create_lvstore", new { bdev_name = "aio0", lvs_name = "lvs" })).Code);
                Assert.Equal(-32603, (await kit.CallFails("bdev_lvol_create_lvstore", new { bdev_name = "aio0" })).Code);
                Assert.Equal(-22, (await kit.CallFails("bdev_lvol_create_lvstore", new { bdev_name = "aio0", lvs_name = "x", clear_method = "bogus" })).Code);
                var thin = (await kit.Call("bdev_lvol_create", new { lvs_name = "lvs", lvol_name = "thin", size_in_mib = 8, thin_provision = true }))!.GetValue<string>();
                Assert.Equal(-17, (await kit.CallFails("bdev_lvol_create", new { lvs_name = "lvs", lvol_name = "thin", size_in_mib = 8 })).Code);
                Assert.Equal(-19, (await kit.CallFails("bdev_lvol_create", new { lvs_name = "nope", lvol_name = "x", size_in_mib = 8 })).Code);
                Assert.Equal(-32602, (await kit.CallFails("bdev_lvol_create", new { lvs_name = "lvs", lvol_name = "x" })).Code);
                Assert.Equal(-32603, (await kit.CallFails("bdev_lvol_create", new { lvs_name = "lvs", lvol_name = "x", size_in_mib = 8, bogus = 1 })).Code);

                // Writes through the bdev: first write to a cluster allocates (slow path), then the fast path.
                Assert.True(await kit.Write("lvs/thin", 0, GoldenImages.Pattern("A", 0, 2 * MiB)));
                Assert.True(await kit.Write("lvs/thin", 4096, GoldenImages.Pattern("B", 4096, 4096), kit.Runtime.Reactors[^1]));
                var expect = GoldenImages.Pattern("A", 0, 8 * MiB);
                expect.AsSpan(2 * MiB).Clear();
                GoldenImages.Pattern("B", 4096, 4096).CopyTo(expect, 4096);
                Assert.Equal(GoldenImages.Sha256(expect), GoldenImages.Sha256(await kit.ReadAll(thin)));

                var snap = (await kit.Call("bdev_lvol_snapshot", new { lvol_name = "lvs/thin", snapshot_name = "snap" }))!.GetValue<string>();
                var clone = (await kit.Call("bdev_lvol_clone", new { snapshot_name = "lvs/snap", clone_name = "clone" }))!.GetValue<string>();
                Assert.Equal(-19, (await kit.CallFails("bdev_lvol_snapshot", new { lvol_name = "lvs/none", snapshot_name = "s" })).Code);
                Assert.False(kit.Bdevs.Find(snap)!.SupportsIoType(BdevIoType.Write));
                Assert.False(await kit.Write(snap, 0, new byte[512]));
                // Writes after the snapshot land in the lvol only; the clone reads the snapshot.
                Assert.True(await kit.Write("lvs/thin", 0, GoldenImages.Pattern("C", 0, 512)));
                snapData = GoldenImages.Sha256(expect);
                Assert.Equal(snapData, GoldenImages.Sha256(await kit.ReadAll(clone)));
                Assert.Equal(snapData, GoldenImages.Sha256(await kit.ReadAll(snap)));
                Assert.Equal(JsonValue.Create(true)!.ToJsonString(), (await kit.Call("bdev_lvol_resize", new { name = "lvs/clone", size_in_mib = 16 }))!.ToJsonString());
                Assert.Equal(16ul * MiB / 512, kit.Bdevs.Find(clone)!.BlockCount);
                await kit.Call("bdev_lvol_rename", new { old_name = "lvs/clone", new_name = "clone2" });
                Assert.NotNull(kit.Bdevs.Find("lvs/clone2"));
                Assert.Null(kit.Bdevs.Find("lvs/clone"));
                await kit.Call("bdev_lvol_create", new { lvs_name = "lvs", lvol_name = "thick", size = 2 * MiB });
                await kit.Call("bdev_lvol_set_read_only", new { name = "lvs/thick" });
                Assert.False(await kit.Write("lvs/thick", 0, new byte[512]));
                await kit.Call("bdev_lvol_create", new { lvs_name = "lvs", lvol_name = "gone", size = 2 * MiB });
                await kit.Call("bdev_lvol_delete", new { name = "lvs/gone" });
                Assert.Null(kit.Bdevs.Find("lvs/gone"));
                Assert.Equal(-32602, (await kit.CallFails("bdev_lvol_delete", new { name = snap })).Code); // two clones
                var lvols = (await kit.Call("bdev_lvol_get_lvols", new { lvs_name = "lvs" }))!.AsArray();
                Assert.Equal(["thin", "snap", "clone2", "thick"], lvols.Select(l => l!["name"]!.GetValue<string>()));
                Assert.True(lvols[1]!["is_snapshot"]!.GetValue<bool>());
                // bdev_get_bdevs names the relations as SPDK's vbdev_lvol_dump_info_json does.
                var snapInfo = (await kit.Call("bdev_get_bdevs", new { name = "lvs/snap" }))!.AsArray().Single()!["driver_specific"]!["lvol"]!;
                Assert.Equal(["thin", "clone2"], snapInfo["clones"]!.AsArray().Select(c => c!.GetValue<string>()));
                Assert.Null(snapInfo["base_snapshot"]);
                var cloneInfo = (await kit.Call("bdev_get_bdevs", new { name = "lvs/clone2" }))!.AsArray().Single()!["driver_specific"]!["lvol"]!;
                Assert.Equal("snap", cloneInfo["base_snapshot"]!.GetValue<string>());
                Assert.Null(cloneInfo["clones"]);
            }
            // A new daemon: examine brings everything back.
            await using (var kit = new LvolKit())
            {
                kit.Bdevs.Register(FileBdev.Open("aio0", path, 512, false, null, "bdev_aio_create"));
                await kit.Call("bdev_wait_for_examine");
                var stores = (await kit.Call("bdev_lvol_get_lvstores"))!.AsArray();
                Assert.Single(stores);
                Assert.Equal("lvs", stores[0]!["name"]!.GetValue<string>());
                Assert.Equal(snapData, GoldenImages.Sha256(await kit.ReadAll("lvs/snap")));
                Assert.Equal(snapData, GoldenImages.Sha256((await kit.ReadAll("lvs/clone2")).AsSpan(0, 8 * MiB)));
                Assert.Equal(GoldenImages.Sha256(GoldenImages.Pattern("C", 0, 512)), GoldenImages.Sha256(await kit.Read("lvs/thin", 0, 512)));
                await kit.Call("bdev_lvol_inflate", new { name = "lvs/clone2" });
                await kit.Call("bdev_lvol_decouple_parent", new { name = "lvs/thin" });
                await kit.Call("bdev_lvol_rename_lvstore", new { old_name = "lvs", new_name = "lvs2" });
                Assert.NotNull(kit.Bdevs.Find("lvs2/thin"));
                await kit.Call("bdev_lvol_delete_lvstore", new { lvs_name = "lvs2" });
                Assert.Null(kit.Bdevs.Find("lvs2/thin"));
                Assert.Null(kit.Bdevs.Find("aio0")!.ClaimedBy);
                Assert.Equal(-19, (await kit.CallFails("bdev_lvol_get_lvstores", new { lvs_name = "lvs2" })).Code);
            }
        }
        finally
        {
            File.Delete(path);
        }
    }
}
