using System.Diagnostics;
using System.Text.Json.Nodes;
using VhostBackend.IntegrationTests.Infrastructure;
using Xunit;
using Xunit.Abstractions;

namespace VhostBackend.IntegrationTests;

/// <summary>
/// Virtual bdevs under a real Linux guest, one boot for all of them: raid1 over two file bdevs keeps serving a fio
/// verify while the error module fails one base, then rebuilds the re-added base under another verify (both
/// files byte-identical afterwards, reads balanced over both); raid0 and concat pass fio verify; a delay bdev's
/// latency shows in fio's percentiles, is changed at runtime, and the bdev is deleted under the guest (its disk
/// fails I/O, the others carry on); a SCSI LUN on a passthru bdev leaves the guest when the passthru's base goes.
/// Some vbdevs are configured before their bases (examine builds them when the bases appear).
/// </summary>
public sealed class VirtualBdevTests(ITestOutputHelper output)
{
    private static readonly TimeSpan Cmd = TimeSpan.FromSeconds(120);

    [Fact]
    public async Task Virtual_bdevs_serve_a_guest_through_vhost()
    {
        Tools.Require("qemu-system-x86_64", "qemu-system-x86");
        Tools.Require("fio");

        var work = Directory.CreateTempSubdirectory("vb-vbdev-").FullName;
        string file0 = Path.Combine(work, "f0.img"), file1 = Path.Combine(work, "f1.img");
        foreach (var f in new[] { file0, file1 })
        {
            using var s = File.Create(f);
            s.SetLength(64 << 20);
        }

        await using var daemon = await VhostDaemon.StartAsync(work, output.WriteLine);

        // Order on purpose: the concat array and the passthru are configured before their bases exist.
        await daemon.CallAsync("bdev_raid_create", new JsonObject { ["name"] = "C0", ["raid_level"] = "concat", ["strip_size_kb"] = 64, ["base_bdevs"] = new JsonArray("MC", "MD") });
        await daemon.CallAsync("bdev_passthru_create", new JsonObject { ["base_bdev_name"] = "MF", ["name"] = "P0" });
        var configuring = (JsonArray)(await daemon.CallAsync("bdev_raid_get_bdevs", new JsonObject { ["category"] = "configuring" }))!;
        Assert.Contains(configuring, r => (string?)r!["name"] == "C0");

        await daemon.CallAsync("bdev_uring_create", new JsonObject { ["filename"] = file0, ["name"] = "F0", ["block_size"] = 4096 });
        await daemon.CallAsync("bdev_uring_create", new JsonObject { ["filename"] = file1, ["name"] = "F1", ["block_size"] = 4096 });
        await daemon.CallAsync("bdev_error_create", new JsonObject { ["base_name"] = "F0" }); // SPDK names it EE_<base>
        await daemon.CallAsync("bdev_raid_create", new JsonObject { ["name"] = "R1", ["raid_level"] = "raid1", ["base_bdevs"] = new JsonArray("EE_F0", "F1") });
        foreach (var (name, mb) in new[] { ("MA", 32), ("MB", 32), ("MC", 16), ("MD", 24), ("ME", 16), ("MF", 16) })
        {
            await daemon.CallAsync("bdev_malloc_create", new JsonObject { ["name"] = name, ["num_blocks"] = mb * 2048, ["block_size"] = 512 });
        }

        await daemon.CallAsync("bdev_raid_create", new JsonObject { ["name"] = "R0", ["raid_level"] = "raid0", ["strip_size_kb"] = 64, ["base_bdevs"] = new JsonArray("MA", "MB") });
        await daemon.CallAsync("bdev_delay_create", new JsonObject
        {
            ["base_bdev_name"] = "ME", ["name"] = "D0",
            ["avg_read_latency"] = 30000, ["p99_read_latency"] = 30000, ["avg_write_latency"] = 0, ["p99_write_latency"] = 0,
        });
        var online = (JsonArray)(await daemon.CallAsync("bdev_raid_get_bdevs", new JsonObject { ["category"] = "online" }))!;
        Assert.Equal(["C0", "R0", "R1"], online.Select(r => (string)r!["name"]!).Order());
        Assert.NotNull(await daemon.CallAsync("bdev_get_bdevs", new JsonObject { ["name"] = "P0" }));

        foreach (var (ctrlr, bdev) in new[] { ("vb.r1", "R1"), ("vb.r0", "R0"), ("vb.c0", "C0"), ("vb.d0", "D0") })
        {
            await daemon.CallAsync("vhost_create_blk_controller", new JsonObject { ["ctrlr"] = ctrlr, ["dev_name"] = bdev });
        }

        await daemon.CallAsync("vhost_create_scsi_controller", new JsonObject { ["ctrlr"] = "vs.p0" });
        await daemon.CallAsync("vhost_scsi_controller_add_target", new JsonObject { ["ctrlr"] = "vs.p0", ["scsi_target_num"] = 0, ["bdev_name"] = "P0" });

        await using var guest = await QemuGuest.StartAsync(new QemuGuestOptions
        {
            Name = "vbdev",
            Memory = "512M",
            Cpus = 2,
            BlkDevices = [new VhostUserDevice(Path.Combine(work, "vb.r1"), 2), new VhostUserDevice(Path.Combine(work, "vb.r0"), 1),
                new VhostUserDevice(Path.Combine(work, "vb.c0"), 1), new VhostUserDevice(Path.Combine(work, "vb.d0"), 1)],
            ScsiDevices = [new VhostUserDevice(Path.Combine(work, "vs.p0"), 1)],
            Log = output.WriteLine,
            BootTimeout = TimeSpan.FromSeconds(120),
        });

        // Geometry: raid1 = one base (64 MiB), raid0 = two (64 MiB), concat = 16 + 24 MiB.
        Assert.Equal("131072", (await Run(guest, "cat /sys/block/vda/size")).Trim());
        Assert.Equal("131072", (await Run(guest, "cat /sys/block/vdb/size")).Trim());
        Assert.Equal("81920", (await Run(guest, "cat /sys/block/vdc/size")).Trim());
        Assert.Equal("32768", (await Run(guest, "cat /sys/block/vdd/size")).Trim());

        // raid0 and concat: fio verify over strip and base boundaries (64 KiB strips, 16 KiB-aligned 4-64 KiB I/O).
        var fio = await guest.ExecHostAsync(
            "fio --ioengine=libaio --direct=1 --rw=randwrite --bsrange=4k-64k --bs_unaligned=0 --iodepth=16 --verify=crc32c --verify_fatal=1 --do_verify=1 " +
            "--name=r0 --filename=/dev/vdb --size=24M --name=c0 --filename=/dev/vdc --offset=8M --size=24M",
            TimeSpan.FromSeconds(600));
        Assert.True(fio.ExitCode == 0, fio + "\n" + guest.ConsoleTail());
        long maOps = await Ops(daemon, "MA"), mbOps = await Ops(daemon, "MB"), mcOps = await Ops(daemon, "MC"), mdOps = await Ops(daemon, "MD");
        output.WriteLine($"raid0 base ops {maOps}/{mbOps}, concat base ops {mcOps}/{mdOps}");
        Assert.True(maOps > 0 && mbOps > 0, "raid0 did not stripe over both bases");
        Assert.True(mcOps > 0 && mdOps > 0, "concat I/O at 8-32 MiB did not reach both bases (16 + 24 MiB)");

        // raid1: a verify runs while the error module fails one write on base EE_F0: the array drops that base and
        // keeps serving (degraded), fio sees no error.
        await StartBackground(guest, "r1a", "fio --name=r1a --filename=/dev/vda --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 " +
            "--size=40M --verify=crc32c --verify_fatal=1 --do_verify=1");
        await WaitForIo(daemon, "R1", guest, "r1a");
        await daemon.CallAsync("bdev_error_inject_error", new JsonObject { ["name"] = "EE_F0", ["io_type"] = "write", ["error_type"] = "failure", ["num"] = 1 });
        await WaitRaid(daemon, "R1", r => (int)r["num_base_bdevs_operational"]! == 1, "raid1 did not drop the failing base");
        var degraded = await Raid(daemon, "R1");
        output.WriteLine("degraded: " + degraded.ToJsonString());
        Assert.Equal("online", (string?)degraded["state"]);
        await WaitBackground(guest, "r1a", TimeSpan.FromSeconds(600));

        // Re-added under another verify: the rebuild runs in the background, then the base is operational again.
        await StartBackground(guest, "r1b", "fio --name=r1b --filename=/dev/vda --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 " +
            "--offset=16M --size=40M --verify=crc32c --verify_fatal=1 --do_verify=1");
        await WaitForIo(daemon, "R1", guest, "r1b");
        await daemon.CallAsync("bdev_raid_add_base_bdev", new JsonObject { ["raid_bdev"] = "R1", ["base_bdev"] = "EE_F0" });
        bool sawProcess = false;
        await WaitRaid(daemon, "R1", r =>
        {
            sawProcess |= r["process"] is JsonObject;
            return (int)r["num_base_bdevs_operational"]! == 2 && r["process"] is null;
        }, "raid1 rebuild did not finish", TimeSpan.FromSeconds(600));
        output.WriteLine($"rebuild done (process seen in bdev_raid_get_bdevs: {sawProcess})");
        await WaitBackground(guest, "r1b", TimeSpan.FromSeconds(600));

        // Reads balance over both healthy bases.
        long r0 = await Ops(daemon, "EE_F0", reads: true), r1 = await Ops(daemon, "F1", reads: true);
        await Run(guest, "dd if=/dev/vda of=/dev/null bs=4k count=4096 iflag=direct 2>&1");
        long d0 = await Ops(daemon, "EE_F0", reads: true) - r0, d1 = await Ops(daemon, "F1", reads: true) - r1;
        output.WriteLine($"raid1 reads after rebuild: EE_F0 {d0}, F1 {d1}");
        Assert.True(d0 > 400 && d1 > 400, $"reads not balanced over both mirrors: {d0} / {d1}");

        // Both mirrors hold the same bytes (no superblock: the data starts at offset 0 on each base).
        await RunHost(guest, "sync");
        Assert.True(FilesEqual(file0, file1), "raid1 mirrors differ after the rebuild");

        // delay: fio sees the configured read latency, then not once it is changed to 0 at runtime.
        double slow = await ReadP50Ms(guest, "/dev/vdd");
        await daemon.CallAsync("bdev_delay_update_latency", new JsonObject { ["delay_bdev_name"] = "D0", ["latency_type"] = "avg_read", ["latency_us"] = 0 });
        await daemon.CallAsync("bdev_delay_update_latency", new JsonObject { ["delay_bdev_name"] = "D0", ["latency_type"] = "p99_read", ["latency_us"] = 0 });
        double fast = await ReadP50Ms(guest, "/dev/vdd");
        output.WriteLine($"delay bdev read p50: {slow:F2} ms at 30 ms configured, {fast:F2} ms at 0");
        Assert.True(slow >= 27, $"read p50 {slow:F2} ms below the 30 ms configured delay");
        Assert.True(fast < slow / 2, $"read p50 {fast:F2} ms did not drop after update_latency to 0 (was {slow:F2} ms)");

        // Deleting the delay bdev under the guest: its disk fails I/O, its base is released, the others carry on.
        await daemon.CallAsync("bdev_delay_delete", new JsonObject { ["name"] = "D0" });
        var dead = await guest.ExecAsync("dd if=/dev/vdd of=/dev/null bs=4k count=1 iflag=direct 2>&1", Cmd);
        Assert.NotEqual(0, dead.ExitCode);
        var me = ((JsonArray)(await daemon.CallAsync("bdev_get_bdevs", new JsonObject { ["name"] = "ME" }))!)[0]!;
        Assert.False((bool)me["claimed"]!);
        await Run(guest, "dd if=/dev/vdb of=/dev/null bs=64k count=64 iflag=direct 2>&1");

        // SCSI: the LUN on passthru P0 takes I/O, then leaves the guest when P0's base is deleted.
        string sd = await WaitScsiDisk(guest, present: true);
        await Run(guest, $"head -c 65536 /dev/urandom > /tmp/p && dd if=/tmp/p of=/dev/{sd} bs=64k seek=5 oflag=direct 2>&1 && dd if=/dev/{sd} of=/tmp/q bs=64k skip=5 count=1 iflag=direct 2>&1 && cmp /tmp/p /tmp/q");
        await daemon.CallAsync("bdev_malloc_delete", new JsonObject { ["name"] = "MF" });
        await WaitScsiDisk(guest, present: false);
        var p0 = await daemon.CallRawAsync("bdev_get_bdevs", new JsonObject { ["name"] = "P0" });
        Assert.Equal(-19, (int)p0["error"]!["code"]!);

        // The raid1 disk still serves.
        await Run(guest, "dd if=/dev/vda of=/dev/null bs=64k count=64 iflag=direct 2>&1");
    }

    private static async Task<long> Ops(VhostDaemon daemon, string bdev, bool reads = false)
    {
        var st = await daemon.CallAsync("bdev_get_iostat", new JsonObject { ["name"] = bdev });
        var b = ((JsonArray)st!["bdevs"]!)[0]!;
        return (long)b["num_read_ops"]! + (reads ? 0 : (long)b["num_write_ops"]!);
    }

    private static async Task<JsonObject> Raid(VhostDaemon daemon, string name)
    {
        var all = (JsonArray)(await daemon.CallAsync("bdev_raid_get_bdevs", new JsonObject { ["category"] = "all" }))!;
        return all.Single(r => (string?)r!["name"] == name)!.AsObject();
    }

    private async Task WaitRaid(VhostDaemon daemon, string name, Func<JsonObject, bool> done, string what, TimeSpan? timeout = null)
    {
        var sw = Stopwatch.StartNew();
        JsonObject last;
        do
        {
            last = await Raid(daemon, name);
            if (done(last))
            {
                output.WriteLine($"{name}: condition met after {sw.Elapsed.TotalSeconds:F1} s");
                return;
            }

            await Task.Delay(250);
        }
        while (sw.Elapsed < (timeout ?? TimeSpan.FromSeconds(120)));
        Assert.Fail($"{what}: {last.ToJsonString()}");
    }

    /// <summary>Starts a host program in the guest in the background; its exit code lands in /tmp/NAME.rc.</summary>
    private static async Task StartBackground(QemuGuest guest, string name, string hostCommand) =>
        await Run(guest, $"rm -f /tmp/{name}.rc; (chroot /host /bin/sh -c {Tools.ShellQuote(hostCommand)} >/tmp/{name}.log 2>&1; echo $? >/tmp/{name}.rc) >/dev/null 2>&1 & echo started");

    private static async Task WaitBackground(QemuGuest guest, string name, TimeSpan timeout)
    {
        var sw = Stopwatch.StartNew();
        while (sw.Elapsed < timeout)
        {
            var r = await guest.ExecAsync($"cat /tmp/{name}.rc 2>/dev/null", Cmd);
            if (r.ExitCode == 0 && r.Output.Trim().Length > 0)
            {
                string log = (await guest.ExecAsync($"tail -30 /tmp/{name}.log", Cmd)).Output;
                Assert.True(r.Output.Trim() == "0", $"{name} exited {r.Output.Trim()}:\n{log}");
                return;
            }

            await Task.Delay(1000);
        }

        Assert.Fail($"{name} still running after {timeout}: {(await guest.ExecAsync($"tail -30 /tmp/{name}.log", Cmd)).Output}");
    }

    /// <summary>Waits until the bdev's op count grows twice in a row (fio from the 9p root starts slowly under TCG).</summary>
    private static async Task WaitForIo(VhostDaemon daemon, string bdev, QemuGuest guest, string name)
    {
        long last = await Ops(daemon, bdev);
        int growing = 0;
        var sw = Stopwatch.StartNew();
        while (growing < 2 && sw.Elapsed < TimeSpan.FromSeconds(90))
        {
            await Task.Delay(300);
            long now = await Ops(daemon, bdev);
            growing = now > last ? growing + 1 : 0;
            last = now;
        }

        Assert.True(growing >= 2, $"{name}: no I/O on {bdev} after 90 s: {(await guest.ExecAsync($"cat /tmp/{name}.log", Cmd)).Output}");
    }

    private static async Task<double> ReadP50Ms(QemuGuest guest, string dev)
    {
        var r = await guest.ExecHostAsync(
            $"fio --name=lat --filename={dev} --ioengine=libaio --direct=1 --rw=randread --bs=4k --iodepth=1 --runtime=3 --time_based --size=8M --output-format=json",
            Cmd);
        Assert.True(r.ExitCode == 0, r.ToString());
        var json = JsonNode.Parse(r.Output[r.Output.IndexOf('{')..])!;
        var pct = json["jobs"]![0]!["read"]!["clat_ns"]!["percentile"]!;
        return (double)pct["50.000000"]! / 1e6;
    }

    private async Task<string> WaitScsiDisk(QemuGuest guest, bool present)
    {
        var sw = Stopwatch.StartNew();
        string last = "";
        while (sw.Elapsed < TimeSpan.FromSeconds(60))
        {
            last = (await guest.ExecAsync("for d in /sys/class/scsi_disk/*:0:0:0; do [ -d $d/device/block ] && ls $d/device/block; done 2>/dev/null", Cmd)).Output.Trim();
            if (present ? last.StartsWith("sd", StringComparison.Ordinal) : last.Length == 0)
            {
                output.WriteLine($"SCSI target 0 {(present ? "is /dev/" + last : "gone")} after {sw.Elapsed.TotalSeconds:F1} s");
                return last;
            }

            await Task.Delay(300);
        }

        Assert.Fail($"SCSI target 0 did not {(present ? "appear" : "disappear")} (last: '{last}')\n{guest.ConsoleTail()}");
        return "";
    }

    private static bool FilesEqual(string a, string b)
    {
        using var fa = new FileStream(a, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
        using var fb = new FileStream(b, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
        if (fa.Length != fb.Length)
        {
            return false;
        }

        var ba = new byte[1 << 20];
        var bb = new byte[1 << 20];
        int n;
        while ((n = fa.Read(ba)) > 0)
        {
            fb.ReadExactly(bb.AsSpan(0, n));
            if (!ba.AsSpan(0, n).SequenceEqual(bb.AsSpan(0, n)))
            {
                return false;
            }
        }

        return true;
    }

    private static async Task<string> Run(QemuGuest guest, string cmd)
    {
        var r = await guest.ExecAsync(cmd, Cmd);
        Assert.True(r.ExitCode == 0, r + "\n" + guest.ConsoleTail());
        return r.Output;
    }

    private static async Task<string> RunHost(QemuGuest guest, string cmd)
    {
        var r = await guest.ExecHostAsync(cmd, Cmd);
        Assert.True(r.ExitCode == 0, r.ToString());
        return r.Output;
    }
}
