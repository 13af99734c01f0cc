using System.Diagnostics;
using System.Text.Json.Nodes;
using VhostBackend.IntegrationTests.Infrastructure;
using Xunit;
using Xunit.Abstractions;

namespace VhostBackend.IntegrationTests;

/// <summary>
/// Logical volumes under a real Linux guest, one boot: the guest writes a known pattern to a thin lvol through
/// vhost-blk, then runs a fio verify on another part of it while bdev_lvol_snapshot, bdev_lvol_clone and
/// bdev_lvol_inflate run over RPC; the guest then overwrites the pattern. The snapshot must hold the pattern as it
/// was when it was taken (a consistent point in time): a clone of it, hot-added to the guest as a SCSI LUN, reads
/// the pattern back, while the lvol itself reads the overwrite. fio's verify passes across all of it.
/// </summary>
public sealed class LvolGuestTests(ITestOutputHelper output)
{
    private static readonly TimeSpan Cmd = TimeSpan.FromSeconds(120);

    [Fact]
    public async Task Snapshot_clone_and_inflate_under_a_writing_guest_are_consistent()
    {
        Tools.Require("qemu-system-x86_64", "qemu-system-x86");
        Tools.Require("fio");

        var work = Directory.CreateTempSubdirectory("vb-lvol-").FullName;
        await using var daemon = await VhostDaemon.StartAsync(work, output.WriteLine);
        await daemon.CallAsync("bdev_malloc_create", new JsonObject { ["name"] = "M0", ["num_blocks"] = 160 * 2048, ["block_size"] = 512 });
        await daemon.CallAsync("bdev_lvol_create_lvstore", new JsonObject { ["bdev_name"] = "M0", ["lvs_name"] = "lvs", ["cluster_sz"] = 1 << 20 });
        await daemon.CallAsync("bdev_lvol_create", new JsonObject { ["lvs_name"] = "lvs", ["lvol_name"] = "v", ["size_in_mib"] = 32, ["thin_provision"] = true });
        await daemon.CallAsync("vhost_create_blk_controller", new JsonObject { ["ctrlr"] = "vb.lv", ["dev_name"] = "lvs/v" });
        await daemon.CallAsync("vhost_create_scsi_controller", new JsonObject { ["ctrlr"] = "vs.0" });

        await using var guest = await QemuGuest.StartAsync(new QemuGuestOptions
        {
            Name = "lvol",
            Memory = "512M",
            Cpus = 2,
            BlkDevices = [new VhostUserDevice(Path.Combine(work, "vb.lv"), 2)],
            ScsiDevices = [new VhostUserDevice(Path.Combine(work, "vs.0"), 1)],
            Log = output.WriteLine,
            BootTimeout = TimeSpan.FromSeconds(300), // TCG on a loaded 2-vCPU machine
        });
        Assert.Equal("65536", (await Run(guest, "cat /sys/block/vda/size")).Trim());

        // Pattern A on the first 16 MiB (thin: first writes allocate clusters).
        string a = (await Run(guest, "head -c 16777216 /dev/urandom > /tmp/a && dd if=/tmp/a of=/dev/vda bs=1M oflag=direct 2>/dev/null && md5sum < /tmp/a")).Trim();
        output.WriteLine($"pattern A {a}");

        // fio verify on the last 16 MiB while the lvol operations run.
        await StartBackground(guest, "fio", "fio --name=lv --filename=/dev/vda --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 " +
            "--offset=16M --size=16M --loops=2 --verify=crc32c --verify_fatal=1 --do_verify=1");
        await WaitForWrites(daemon, "lvs/v", guest);

        var snap = (string)(await daemon.CallAsync("bdev_lvol_snapshot", new JsonObject { ["lvol_name"] = "lvs/v", ["snapshot_name"] = "snap1" }))!;
        var clone = (string)(await daemon.CallAsync("bdev_lvol_clone", new JsonObject { ["snapshot_name"] = "lvs/snap1", ["clone_name"] = "c1" }))!;
        output.WriteLine($"snapshot {snap}, clone {clone} taken under I/O");

        // Overwrite A with B through the lvol: first writes after the snapshot allocate (copy-on-write).
        string b = (await Run(guest, "head -c 16777216 /dev/urandom > /tmp/b && dd if=/tmp/b of=/dev/vda bs=1M oflag=direct 2>/dev/null && md5sum < /tmp/b")).Trim();
        Assert.NotEqual(a, b);

        // Inflate the lvol (its parent is the snapshot) while fio still writes: the copy runs cluster by cluster
        // beside the guest's I/O.
        var lvols = (JsonArray)(await daemon.CallAsync("bdev_lvol_get_lvols", new JsonObject { ["lvs_name"] = "lvs" }))!;
        Assert.True((bool)lvols.Single(l => (string?)l!["name"] == "v")!["is_clone"]!);
        var sw = Stopwatch.StartNew();
        await daemon.CallAsync("bdev_lvol_inflate", new JsonObject { ["name"] = "lvs/v" });
        output.WriteLine($"inflate took {sw.Elapsed.TotalSeconds:F1} s under guest I/O");
        lvols = (JsonArray)(await daemon.CallAsync("bdev_lvol_get_lvols", new JsonObject { ["lvs_name"] = "lvs" }))!;
        var v = lvols.Single(l => (string?)l!["name"] == "v")!;
        Assert.False((bool)v["is_clone"]!);
        Assert.False((bool)v["is_thin_provisioned"]!);

        await WaitBackground(guest, "fio", TimeSpan.FromSeconds(600));

        // The lvol reads B; the snapshot (through its clone, hot-added as a SCSI LUN) reads A.
        Assert.Equal(b, (await Run(guest, "dd if=/dev/vda bs=1M count=16 iflag=direct 2>/dev/null | md5sum")).Trim());
        await daemon.CallAsync("vhost_scsi_controller_add_target", new JsonObject { ["ctrlr"] = "vs.0", ["scsi_target_num"] = 0, ["bdev_name"] = "lvs/c1" });
        string sd = await WaitScsiDisk(guest);
        Assert.Equal(a, (await Run(guest, $"dd if=/dev/{sd} bs=1M count=16 iflag=direct 2>/dev/null | md5sum")).Trim());

        // Writing the clone leaves the snapshot alone: decouple the clone, then a second clone still reads A.
        await Run(guest, $"dd if=/dev/zero of=/dev/{sd} bs=1M count=2 oflag=direct 2>/dev/null");
        await daemon.CallAsync("bdev_lvol_decouple_parent", new JsonObject { ["name"] = "lvs/c1" });
        await daemon.CallAsync("bdev_lvol_clone", new JsonObject { ["snapshot_name"] = "lvs/snap1", ["clone_name"] = "c2" });
        await daemon.CallAsync("vhost_scsi_controller_remove_target", new JsonObject { ["ctrlr"] = "vs.0", ["scsi_target_num"] = 0 });
        await WaitScsiGone(guest);
        await daemon.CallAsync("vhost_scsi_controller_add_target", new JsonObject { ["ctrlr"] = "vs.0", ["scsi_target_num"] = 0, ["bdev_name"] = "lvs/c2" });
        sd = await WaitScsiDisk(guest);
        Assert.Equal(a, (await Run(guest, $"dd if=/dev/{sd} bs=1M count=16 iflag=direct 2>/dev/null | md5sum")).Trim());
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

    private static async Task<long> Writes(VhostDaemon daemon, string bdev)
    {
        var st = await daemon.CallAsync("bdev_get_iostat", new JsonObject { ["name"] = bdev });
        return (long)((JsonArray)st!["bdevs"]!)[0]!["num_write_ops"]!;
    }

    /// <summary>Waits until the bdev's write count grows twice in a row (fio from the 9p root starts slowly under TCG).</summary>
    private static async Task WaitForWrites(VhostDaemon daemon, string bdev, QemuGuest guest)
    {
        long last = await Writes(daemon, bdev);
        int growing = 0;
        var sw = Stopwatch.StartNew();
        while (growing < 2 && sw.Elapsed < TimeSpan.FromSeconds(90))
        {
            await Task.Delay(300);
            long now = await Writes(daemon, bdev);
            growing = now > last ? growing + 1 : 0;
            last = now;
        }

        Assert.True(growing >= 2, $"no writes on {bdev} after 90 s: {(await guest.ExecAsync("cat /tmp/fio.log", Cmd)).Output}");
    }

    private async Task<string> WaitScsiDisk(QemuGuest guest)
    {
        var sw = Stopwatch.StartNew();
        string last = "";
        while (sw.Elapsed < TimeSpan.FromSeconds(60))
        {
            last = (await guest.ExecAsync("for d in /sys/class/scsi_disk/*:0:0:0; do [ -d $d/device/block ] && ls $d/device/block; done 2>/dev/null", Cmd)).Output.Trim();
            if (last.StartsWith("sd", StringComparison.Ordinal))
            {
                output.WriteLine($"SCSI target 0 is /dev/{last} after {sw.Elapsed.TotalSeconds:F1} s");
                return last;
            }

            await Task.Delay(300);
        }

        Assert.Fail($"SCSI target 0 did not appear (last: '{last}')\n{guest.ConsoleTail()}");
        return "";
    }

    private static async Task WaitScsiGone(QemuGuest guest)
    {
        var sw = Stopwatch.StartNew();
        while (sw.Elapsed < TimeSpan.FromSeconds(60))
        {
            var last = (await guest.ExecAsync("for d in /sys/class/scsi_disk/*:0:0:0; do [ -d $d/device/block ] && ls $d/device/block; done 2>/dev/null", Cmd)).Output.Trim();
            if (last.Length == 0)
            {
                return;
            }

            await Task.Delay(300);
        }

        Assert.Fail("SCSI target 0 did not leave the guest");
    }

    private static async Task<string> Run(QemuGuest guest, string cmd)
    {
        var r = await guest.ExecAsync(cmd, Cmd);
        Assert.True(r.ExitCode == 0, r + "\n" + guest.ConsoleTail());
        return r.Output;
    }
}
