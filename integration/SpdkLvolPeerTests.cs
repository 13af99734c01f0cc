using System.Globalization;
using System.Net;
using System.Net.Sockets;
using System.Text.Json.Nodes;
using VhostBackend.IntegrationTests.Infrastructure;
using Xunit;
using Xunit.Abstractions;

namespace VhostBackend.IntegrationTests;

/// <summary>
/// Issue 15's "an lvstore written here opens in SPDK", shown with SPDK v24.01 itself (the anchor build, see
/// <see cref="SpdkPeerTests"/>): ./vhostd makes an lvstore on an aio bdev (a file), a thick and a thin lvol, writes
/// data into them through our NVMe-oF/TCP target (SPDK's spdk_dd is the host), takes a snapshot and a clone by RPC and
/// writes the clone; then, ./vhostd stopped, SPDK's spdk_tgt examines the file and must list the same lvstore and lvols
/// (names, uuids, sizes, thin/snapshot/clone relations) and SPDK's spdk_dd must read every lvol byte for byte as
/// written (unwritten thin ranges as zeroes). The other direction too: SPDK writes into our store (a cluster allocation
/// in a clone, an overwrite of the thick lvol); ./vhostd opens it again by examine and reads SPDK's data back through
/// our target; and a store left dirty by a SIGKILLed ./vhostd is recovered by SPDK's load.
/// Skipped (never passed) without an SPDK build (SPDK_DIR, default /tmp/anchor-spdk/spdk).
/// </summary>
public sealed class SpdkLvolPeerTests(ITestOutputHelper output)
{
    private const int MiB = 1024 * 1024;
    private const int Bs = 65536; // spdk_dd's I/O unit here; every offset and length below is a multiple of it
    private const string Nqn = "nqn.2016-06.io.spdk:lvol";

    private static int FreePort()
    {
        var l = new TcpListener(IPAddress.Loopback, 0);
        l.Start();
        int port = ((IPEndPoint)l.LocalEndpoint).Port;
        l.Stop();
        return port;
    }

    private static string WorkDir(string name)
    {
        string dir = Path.Combine(GuestImage.RepoRoot, ".build", $"spdk-lvol-{name}-{Environment.ProcessId}");
        if (Directory.Exists(dir))
        {
            Directory.Delete(dir, recursive: true);
        }

        Directory.CreateDirectory(dir);
        return dir;
    }

    private static byte[] Random(int seed, int length)
    {
        var b = new byte[length];
        new Random(seed).NextBytes(b);
        return b;
    }

    /// <summary>SPDK's rpc.py (unmodified) against <paramref name="socket"/>; fails the test on a non-zero exit.</summary>
    private async Task<string> Rpc(string socket, params string[] args)
    {
        var r = await Tools.RunAsync("python3", new[] { Path.Combine(SpdkPeerTests.SpdkDir, "scripts", "rpc.py"), "-s", socket }.Concat(args), TimeSpan.FromMinutes(1));
        output.WriteLine($"rpc.py {string.Join(' ', args)} -> {r.ExitCode}\n{r.Output}");
        Assert.True(r.ExitCode == 0, $"rpc.py {string.Join(' ', args)}: {r.Output}");
        return r.Output;
    }

    /// <summary>SPDK's spdk_dd (core 1, no PCI, 256 MiB) with <paramref name="args"/>; fails the test on a non-zero exit.</summary>
    private async Task Dd(params string[] args)
    {
        SpdkApp.EnsureHugePages();
        string lib = Path.Combine(SpdkPeerTests.SpdkDir, "build", "lib");
        string dd = Path.Combine(SpdkPeerTests.SpdkDir, "build", "bin", "spdk_dd");
        var r = await Tools.RunAsync("env", new[] { "LD_LIBRARY_PATH=" + lib, dd, "-m", "0x2", "-u", "-s", "256", "--disable-cpumask-locks", "--bs", Bs.ToString(CultureInfo.InvariantCulture) }.Concat(args), TimeSpan.FromMinutes(3));
        output.WriteLine($"--- spdk_dd {string.Join(' ', args)} (exit {r.ExitCode}, {r.Duration.TotalSeconds:F1} s) ---\n{r.Output}");
        Assert.True(r.ExitCode == 0, $"spdk_dd {string.Join(' ', args)}: {r.Output}");
    }

    /// <summary>Writes <paramref name="data"/> at byte <paramref name="offset"/> of bdev <paramref name="bdev"/> with spdk_dd and applies it to <paramref name="model"/>.</summary>
    private async Task DdWrite(string dir, string json, string bdev, long offset, byte[] data, byte[] model)
    {
        string f = Path.Combine(dir, $"w-{bdev.Replace('/', '_')}-{offset}.bin");
        await File.WriteAllBytesAsync(f, data);
        await Dd("--if", f, "--ob", bdev, "--json", json, "--seek", (offset / Bs).ToString(CultureInfo.InvariantCulture));
        data.CopyTo(model, offset);
    }

    /// <summary>Reads all of <paramref name="bdev"/> with spdk_dd and requires it to equal <paramref name="expected"/> byte for byte.</summary>
    private async Task DdVerify(string dir, string json, string bdev, byte[] expected, string label)
    {
        string f = Path.Combine(dir, $"r-{label}-{bdev.Replace('/', '_')}.bin");
        File.Delete(f);
        await Dd("--ib", bdev, "--of", f, "--json", json);
        byte[] got = await File.ReadAllBytesAsync(f);
        Assert.True(got.Length == expected.Length, $"{label} {bdev}: read {got.Length} bytes, expected {expected.Length}");
        int first = got.AsSpan().CommonPrefixLength(expected);
        Assert.True(first == expected.Length, $"{label} {bdev}: first difference at byte {first} (got {(first < got.Length ? got[first] : -1)}, expected {(first < expected.Length ? expected[first] : -1)})");
        output.WriteLine($"{label} {bdev}: {got.Length} bytes equal");
    }

    private static string NvmeJson(string dir, int port)
    {
        string cfg = Path.Combine(dir, "attach.json");
        File.WriteAllText(cfg, $$$"""
            {"subsystems": [{"subsystem": "bdev", "config": [
              {"method": "bdev_nvme_attach_controller", "params": {"name": "Nvme0", "trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": "{{{port}}}", "subnqn": "{{{Nqn}}}"}}
            ]}]}
            """);
        return cfg;
    }

    private static string AioJson(string dir, string image)
    {
        string cfg = Path.Combine(dir, "aio.json");
        File.WriteAllText(cfg, $$$"""
            {"subsystems": [{"subsystem": "bdev", "config": [
              {"method": "bdev_aio_create", "params": {"name": "aio0", "filename": "{{{image}}}", "block_size": 4096}},
              {"method": "bdev_wait_for_examine"}
            ]}]}
            """);
        return cfg;
    }

    /// <summary>Exports <paramref name="lvols"/> (nsid 1, 2, ...) of our daemon on a new NVMe-oF/TCP subsystem; returns spdk_dd's attach config.</summary>
    private async Task<string> Export(VhostDaemon daemon, string dir, params string[] lvols)
    {
        int port = FreePort();
        await Rpc(daemon.RpcSocket, "nvmf_create_transport", "-t", "TCP");
        await Rpc(daemon.RpcSocket, "nvmf_create_subsystem", Nqn, "-a", "-s", "SPDK00000000000001");
        for (int i = 0; i < lvols.Length; i++)
        {
            await Rpc(daemon.RpcSocket, "nvmf_subsystem_add_ns", Nqn, lvols[i], "-n", (i + 1).ToString(CultureInfo.InvariantCulture));
        }

        await Rpc(daemon.RpcSocket, "nvmf_subsystem_add_listener", Nqn, "-t", "tcp", "-a", "127.0.0.1", "-s", port.ToString(CultureInfo.InvariantCulture));
        return NvmeJson(dir, port);
    }

    /// <summary>bdev_lvol_get_lvols keyed by uuid.</summary>
    private static Dictionary<string, JsonNode> ByUuid(string json) =>
        JsonNode.Parse(json)!.AsArray().ToDictionary(n => (string)n!["uuid"]!, n => n!);

    /// <summary>The facts of an lvol bdev that both implementations report in bdev_get_bdevs: size, lvol flags and relations (clones sorted).</summary>
    private async Task<JsonObject> BdevFacts(string socket, string name)
    {
        var b = JsonNode.Parse(await Rpc(socket, "bdev_get_bdevs", "-b", name))!.AsArray().Single()!;
        var lvol = b["driver_specific"]!["lvol"]!;
        return new JsonObject
        {
            ["name"] = (string)b["name"]!,
            ["aliases"] = b["aliases"]!.DeepClone(),
            ["block_size"] = (int)b["block_size"]!,
            ["num_blocks"] = (long)b["num_blocks"]!,
            ["lvol_store_uuid"] = (string)lvol["lvol_store_uuid"]!,
            ["thin_provision"] = (bool)lvol["thin_provision"]!,
            ["snapshot"] = (bool)lvol["snapshot"]!,
            ["clone"] = (bool)lvol["clone"]!,
            ["base_snapshot"] = (string?)lvol["base_snapshot"],
            ["clones"] = lvol["clones"] is JsonArray c ? new JsonArray(c.Select(n => (JsonNode?)JsonValue.Create((string)n!)).Order(Comparer<JsonNode?>.Create((a, b) => string.CompareOrdinal((string)a!, (string)b!))).ToArray()) : null,
        };
    }

    /// <summary>A sparse file of <paramref name="bytes"/> bytes in <paramref name="dir"/>: the lvstore's base (an aio bdev).</summary>
    private static string CreateImage(string dir, long bytes)
    {
        string image = Path.Combine(dir, "lvs.img");
        using var f = File.Create(image);
        f.SetLength(bytes);
        return image;
    }

    /// <summary>On daemon socket <paramref name="s"/>: aio0 on the image, lvstore lvs0 (1 MiB clusters), a thick and a thin lvol.</summary>
    private async Task CreateStore(string s, string image, int thickMiB, int thinMiB)
    {
        await Rpc(s, "bdev_aio_create", image, "aio0", "4096");
        await Rpc(s, "bdev_lvol_create_lvstore", "aio0", "lvs0", "-c", MiB.ToString(CultureInfo.InvariantCulture));
        await Rpc(s, "bdev_lvol_create", "-l", "lvs0", "thick", thickMiB.ToString(CultureInfo.InvariantCulture));
        await Rpc(s, "bdev_lvol_create", "-l", "lvs0", "-t", "thin", thinMiB.ToString(CultureInfo.InvariantCulture));
    }

    /// <summary>
    /// In a running spdk_tgt (socket <paramref name="s"/>): the image as aio0, examined; its lvstore and its
    /// <paramref name="lvolCount"/> lvols must equal what our daemon reported (<paramref name="ourStores"/>,
    /// <paramref name="ourLvols"/>: bdev_lvol_get_lvstores / bdev_lvol_get_lvols output).
    /// </summary>
    private async Task AssertSpdkSeesOurStore(SpdkApp spdk, string s, string image, string ourStores, string ourLvols, int lvolCount)
    {
        await Rpc(s, "bdev_aio_create", image, "aio0", "4096");
        await Rpc(s, "bdev_wait_for_examine");
        string spdkStores = await Rpc(s, "bdev_lvol_get_lvstores");
        Assert.True(JsonNode.DeepEquals(JsonNode.Parse(ourStores), JsonNode.Parse(spdkStores)), $"lvstores differ:\nours {ourStores}\nSPDK {spdkStores}\n{spdk.LogTail()}");
        var ours = ByUuid(ourLvols);
        var theirs = ByUuid(await Rpc(s, "bdev_lvol_get_lvols"));
        Assert.Equal(lvolCount, ours.Count);
        Assert.Equal(ours.Keys.Order(), theirs.Keys.Order());
        foreach (var (uuid, lvol) in ours)
        {
            Assert.True(JsonNode.DeepEquals(lvol, theirs[uuid]), $"lvol {uuid} differs:\nours {lvol.ToJsonString()}\nSPDK {theirs[uuid].ToJsonString()}");
        }
    }

    [SpdkPeerFact]
    public async Task An_lvstore_written_here_opens_in_spdk_with_every_lvol_intact_and_spdk_writes_read_back_here()
    {
        string dir = WorkDir("ours");
        string image = CreateImage(dir, 64L * MiB);

        string[] names = ["thick", "thin", "snap", "clone"];
        var model = new Dictionary<string, byte[]>();
        string ourStores, ourLvols;
        var ourFacts = new Dictionary<string, JsonObject>();

        // 1-2. Our daemon: lvstore (1 MiB clusters), thick 8 MiB, thin 16 MiB; data written through our NVMe/TCP target.
        await using (var daemon = await VhostDaemon.StartAsync(dir, output.WriteLine))
        {
            string s = daemon.RpcSocket;
            await CreateStore(s, image, thickMiB: 8, thinMiB: 16);
            string json = await Export(daemon, dir, "lvs0/thick", "lvs0/thin");

            model["thick"] = new byte[8 * MiB];
            model["thin"] = new byte[16 * MiB];
            await DdWrite(dir, json, "Nvme0n1", 0, Random(1, 8 * MiB), model["thick"]);
            // Thin: clusters 0-1 (a write straddling them), 9 (a partial one); the other 13 clusters stay unallocated.
            await DdWrite(dir, json, "Nvme0n2", 128 * 1024, Random(2, MiB), model["thin"]);
            await DdWrite(dir, json, "Nvme0n2", (9 * MiB) + (256 * 1024), Random(3, 256 * 1024), model["thin"]);

            // Snapshot of the thin lvol (it becomes a clone of it), a clone of the snapshot; both written afterwards.
            await Rpc(s, "bdev_lvol_snapshot", "lvs0/thin", "snap");
            await Rpc(s, "bdev_lvol_clone", "lvs0/snap", "clone");
            model["snap"] = (byte[])model["thin"].Clone();
            model["clone"] = (byte[])model["thin"].Clone();
            await Rpc(s, "nvmf_subsystem_add_ns", Nqn, "lvs0/clone", "-n", "3");
            await DdWrite(dir, json, "Nvme0n2", 12 * MiB, Random(4, 128 * 1024), model["thin"]); // unallocated in the snapshot
            await DdWrite(dir, json, "Nvme0n3", 512 * 1024, Random(5, 128 * 1024), model["clone"]); // copy-on-write of cluster 0
            await DdWrite(dir, json, "Nvme0n3", (4 * MiB) - (64 * 1024), Random(6, 192 * 1024), model["clone"]); // clusters 3-4, unallocated below

            // Our own reads first (through our target), so a later mismatch in SPDK is not a write that never happened.
            await DdVerify(dir, json, "Nvme0n1", model["thick"], "ours");
            await DdVerify(dir, json, "Nvme0n2", model["thin"], "ours");
            await DdVerify(dir, json, "Nvme0n3", model["clone"], "ours");

            ourStores = await Rpc(s, "bdev_lvol_get_lvstores");
            ourLvols = await Rpc(s, "bdev_lvol_get_lvols");
            foreach (var n in names)
            {
                ourFacts[n] = await BdevFacts(s, "lvs0/" + n);
            }

            // 3. A clean stop (SIGTERM): the store is unloaded, clean flag set.
            Assert.Equal(0, await daemon.TerminateAsync(TimeSpan.FromSeconds(60)));
        }

        var store = JsonNode.Parse(ourStores)!.AsArray().Single()!;
        Assert.Equal(63, (int)store["total_data_clusters"]!);
        // thick 8 + thin's 3 (now the snapshot's) + thin's 1 after the snapshot + clone's 3 (cluster 0, 3, 4).
        Assert.Equal(63 - 8 - 3 - 1 - 3, (int)store["free_clusters"]!);

        // SPDK's spdk_tgt examines the file: the same lvstore and lvols.
        string aio = AioJson(dir, image);
        await using (var spdk = await SpdkApp.StartAsync("build/bin/spdk_tgt", dir, output.WriteLine))
        {
            string s = Path.Combine(dir, "spdk.sock");
            await AssertSpdkSeesOurStore(spdk, s, image, ourStores, ourLvols, lvolCount: 4);
            foreach (var n in names)
            {
                var facts = await BdevFacts(s, "lvs0/" + n);
                Assert.True(JsonNode.DeepEquals(ourFacts[n], facts), $"{n} differs:\nours {ourFacts[n].ToJsonString()}\nSPDK {facts.ToJsonString()}");
            }

            // The relations as SPDK sees them: thin and clone are clones of snap, snap has both as clones.
            var bdevs = JsonNode.Parse(await Rpc(s, "bdev_get_bdevs"))!.AsArray()
                .Where(b => b!["driver_specific"]?["lvol"] is not null)
                .ToDictionary(b => (string)b!["aliases"]![0]!, b => b!["driver_specific"]!["lvol"]!);
            Assert.Equal("snap", (string?)bdevs["lvs0/thin"]["base_snapshot"]);
            Assert.Equal("snap", (string?)bdevs["lvs0/clone"]["base_snapshot"]);
            Assert.Equal(new[] { "clone", "thin" }, bdevs["lvs0/snap"]["clones"]!.AsArray().Select(c => (string)c!).Order());
            Assert.True((bool)bdevs["lvs0/thin"]["thin_provision"]! && (bool)bdevs["lvs0/clone"]["thin_provision"]!);
            Assert.False((bool)bdevs["lvs0/thick"]["thin_provision"]!);
            Assert.True(spdk.IsRunning, "spdk_tgt exited:\n" + spdk.LogTail());
        }

        // SPDK reads every lvol byte for byte.
        foreach (var n in names)
        {
            await DdVerify(dir, aio, "lvs0/" + n, model[n], "spdk");
        }

        // 4. SPDK writes into our store: a new cluster in the clone (cluster 6, unallocated in it and in the snapshot)
        // and an overwrite of the thick lvol; our daemon finds the store by examine and reads SPDK's data back.
        await DdWrite(dir, aio, "lvs0/clone", (6 * MiB) + (128 * 1024), Random(7, 256 * 1024), model["clone"]);
        await DdWrite(dir, aio, "lvs0/thick", 3 * MiB, Random(8, 512 * 1024), model["thick"]);
        await using (var daemon = await VhostDaemon.StartAsync(dir, output.WriteLine))
        {
            string s = daemon.RpcSocket;
            await Rpc(s, "bdev_aio_create", image, "aio0", "4096");
            await Rpc(s, "bdev_wait_for_examine");
            var st = JsonNode.Parse(await Rpc(s, "bdev_lvol_get_lvstores"))!.AsArray().Single()!;
            Assert.Equal((int)store["free_clusters"]! - 1, (int)st["free_clusters"]!);
            var lv = ByUuid(await Rpc(s, "bdev_lvol_get_lvols"));
            Assert.Equal(ByUuid(ourLvols).Keys.Order(), lv.Keys.Order());
            string json = await Export(daemon, dir, "lvs0/thick", "lvs0/thin", "lvs0/snap", "lvs0/clone");
            for (int i = 0; i < names.Length; i++)
            {
                await DdVerify(dir, json, $"Nvme0n{i + 1}", model[names[i]], "ours-after-spdk");
            }

            Assert.Equal(0, await daemon.TerminateAsync(TimeSpan.FromSeconds(60)));
        }
    }

    [SpdkPeerFact]
    public async Task A_store_left_dirty_by_a_killed_vhostd_is_recovered_by_spdk_with_every_committed_write()
    {
        string dir = WorkDir("dirty");
        string image = CreateImage(dir, 32L * MiB);

        var model = new Dictionary<string, byte[]> { ["thick"] = new byte[4 * MiB], ["thin"] = new byte[8 * MiB] };
        string ourStores, ourLvols;
        await using (var daemon = await VhostDaemon.StartAsync(dir, output.WriteLine))
        {
            string s = daemon.RpcSocket;
            await CreateStore(s, image, thickMiB: 4, thinMiB: 8);
            string json = await Export(daemon, dir, "lvs0/thick", "lvs0/thin");
            await DdWrite(dir, json, "Nvme0n1", 0, Random(11, 4 * MiB), model["thick"]);
            await DdWrite(dir, json, "Nvme0n2", 3 * MiB, Random(12, 1536 * 1024), model["thin"]); // clusters 3-4
            await Rpc(s, "bdev_lvol_snapshot", "lvs0/thin", "snap");
            model["snap"] = (byte[])model["thin"].Clone();
            await DdWrite(dir, json, "Nvme0n2", 7 * MiB, Random(13, 64 * 1024), model["thin"]); // cluster 7, after the snapshot
            await DdWrite(dir, json, "Nvme0n2", 3 * MiB, Random(14, 64 * 1024), model["thin"]); // copy-on-write of cluster 3
            ourStores = await Rpc(s, "bdev_lvol_get_lvstores");
            ourLvols = await Rpc(s, "bdev_lvol_get_lvols");

            // A crash: nothing is unloaded, the super block stays dirty.
            await daemon.KillAsync();
        }

        Assert.Equal(31 - 4 - 2 - 2, (int)JsonNode.Parse(ourStores)!.AsArray().Single()!["free_clusters"]!);
        string aio = AioJson(dir, image);
        await using (var spdk = await SpdkApp.StartAsync("build/bin/spdk_tgt", dir, output.WriteLine))
        {
            string s = Path.Combine(dir, "spdk.sock");
            await AssertSpdkSeesOurStore(spdk, s, image, ourStores, ourLvols, lvolCount: 3);
            Assert.Contains("Performing recovery on blobstore", spdk.LogTail(), StringComparison.Ordinal);
        }

        foreach (var n in new[] { "thick", "thin", "snap" })
        {
            await DdVerify(dir, aio, "lvs0/" + n, model[n], "spdk-recovered");
        }
    }
}
