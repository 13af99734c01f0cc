using System.Diagnostics;
using System.Text.Json.Nodes;
using VhostBackend.IntegrationTests.Infrastructure;
using Xunit;
using Xunit.Abstractions;

namespace VhostBackend.IntegrationTests;

/// <summary>
/// vhost-user-scsi against real QEMU (vhost-user-scsi-pci) and the guest's virtio_scsi + sd drivers, in one boot:
/// LUN discovery, VPD and capacity through sg3-utils, fio verify on two LUNs at once, unmap, a read-only LUN,
/// hot-add and hot-remove of targets (RPC and bdev deletion, with I/O in flight) and a bdev resize.
/// </summary>
public sealed class VhostScsiTests(ITestOutputHelper output)
{
    private static readonly TimeSpan Cmd = TimeSpan.FromSeconds(120);

    [Fact]
    public async Task Vhost_scsi_serves_a_guest_and_hotplugs_luns()
    {
        Tools.Require("qemu-system-x86_64", "qemu-system-x86");
        Tools.Require("fio");
        Tools.Require("sg_inq", "sg3-utils");

        var work = Directory.CreateTempSubdirectory("vb-scsi-").FullName;
        string backing = Path.Combine(work, "disk.img");
        using (var f = File.Create(backing))
        {
            f.SetLength(64 << 20);
        }

        await using var daemon = await VhostDaemon.StartAsync(work, output.WriteLine);
        await daemon.CallAsync("bdev_malloc_create", new JsonObject { ["name"] = "Malloc0", ["num_blocks"] = 131072, ["block_size"] = 512 });
        await daemon.CallAsync("bdev_uring_create", new JsonObject { ["filename"] = backing, ["name"] = "File0", ["block_size"] = 4096 });
        await daemon.CallAsync("bdev_malloc_create", new JsonObject { ["name"] = "MallocRo", ["num_blocks"] = 8192, ["block_size"] = 4096 });
        await daemon.CallAsync("bdev_malloc_create", new JsonObject { ["name"] = "Hot1", ["num_blocks"] = 32768, ["block_size"] = 512 });
        await daemon.CallAsync("bdev_malloc_create", new JsonObject { ["name"] = "Hot2", ["num_blocks"] = 16384, ["block_size"] = 512 });
        await daemon.CallAsync("bdev_null_create", new JsonObject { ["name"] = "Null0", ["num_blocks"] = 65536, ["block_size"] = 512 });

        await daemon.CallAsync("vhost_create_scsi_controller", new JsonObject { ["ctrlr"] = "vs.0" });
        Assert.Equal(0, (int)(await daemon.CallAsync("vhost_scsi_controller_add_target", new JsonObject { ["ctrlr"] = "vs.0", ["scsi_target_num"] = 0, ["bdev_name"] = "Malloc0" }))!);
        Assert.Equal(1, (int)(await daemon.CallAsync("vhost_scsi_controller_add_target", new JsonObject { ["ctrlr"] = "vs.0", ["scsi_target_num"] = -1, ["bdev_name"] = "File0" }))!);
        await daemon.CallAsync("vhost_scsi_controller_add_target", new JsonObject { ["ctrlr"] = "vs.0", ["scsi_target_num"] = 2, ["bdev_name"] = "MallocRo", ["readonly"] = true });

        // SPDK's error shapes: occupied slot (EEXIST), slot out of range (EINVAL), missing bdev (ENODEV), missing controller.
        await ExpectError(daemon, "vhost_scsi_controller_add_target", new JsonObject { ["ctrlr"] = "vs.0", ["scsi_target_num"] = 0, ["bdev_name"] = "Hot1" }, -32602, "File exists");
        await ExpectError(daemon, "vhost_scsi_controller_add_target", new JsonObject { ["ctrlr"] = "vs.0", ["scsi_target_num"] = 8, ["bdev_name"] = "Hot1" }, -32602, "Invalid argument");
        await ExpectError(daemon, "vhost_scsi_controller_add_target", new JsonObject { ["ctrlr"] = "vs.0", ["scsi_target_num"] = 5, ["bdev_name"] = "nope" }, -32602, "No such device");
        await ExpectError(daemon, "vhost_scsi_controller_add_target", new JsonObject { ["ctrlr"] = "nope", ["scsi_target_num"] = 5, ["bdev_name"] = "Hot1" }, -32602, "No such device");
        await ExpectError(daemon, "vhost_scsi_controller_remove_target", new JsonObject { ["ctrlr"] = "vs.0", ["scsi_target_num"] = 6 }, -32602, "No such device");
        await ExpectError(daemon, "vhost_create_scsi_controller", new JsonObject { ["ctrlr"] = "vs.0" }, -32602, "File exists");

        var ctrl = (JsonArray)(await daemon.CallAsync("vhost_get_controllers", new JsonObject { ["name"] = "vs.0" }))!;
        var targets = (JsonArray)ctrl[0]!["backend_specific"]!["scsi"]!;
        Assert.Equal(["Malloc0", "File0", "MallocRo"], targets.Select(t => (string)t!["luns"]![0]!["bdev_name"]!));

        var options = new QemuGuestOptions
        {
            Name = "vhost-scsi",
            Memory = "512M",
            Cpus = 2,
            ScsiDevices = [new VhostUserDevice(Path.Combine(work, "vs.0"), 2)],
            Log = output.WriteLine,
            BootTimeout = TimeSpan.FromSeconds(120),
        };

        await using var guest = await QemuGuest.StartAsync(options);

        // LUNs appear: targets 0, 1, 2 with the sizes and block sizes of their bdevs.
        string d0 = await WaitDisk(guest, 0, present: true);
        string d1 = await WaitDisk(guest, 1, present: true);
        string d2 = await WaitDisk(guest, 2, present: true);
        output.WriteLine(await Run(guest, "ls /sys/class/scsi_disk; cat /proc/partitions"));
        Assert.Equal("131072", (await Run(guest, $"cat /sys/block/{d0}/size")).Trim());
        Assert.Equal("4096", (await Run(guest, $"cat /sys/block/{d1}/queue/logical_block_size")).Trim());
        Assert.Equal("131072", (await Run(guest, $"cat /sys/block/{d1}/size")).Trim());
        Assert.Equal("1", (await Run(guest, $"cat /sys/block/{d2}/ro")).Trim());
        Assert.Equal("2", (await Run(guest, $"ls /sys/block/{d0}/mq | wc -l")).Trim());
        string lsblk = await RunHost(guest, $"lsblk -b -d -n -o NAME,SIZE,RO /dev/{d0} /dev/{d1} /dev/{d2}");
        output.WriteLine(lsblk);
        Assert.Contains($"{d0} 67108864 0", Squeeze(lsblk), StringComparison.Ordinal);
        Assert.Contains($"{d2} 33554432 1", Squeeze(lsblk), StringComparison.Ordinal);

        // VPD and capacity as sg3-utils sees them.
        string serial = await RunHost(guest, $"sg_inq -p 0x80 /dev/{d0}");
        Assert.Contains("Malloc0", serial, StringComparison.Ordinal);
        string std = await RunHost(guest, $"sg_inq /dev/{d1}");
        Assert.Contains("VHOSTBE", std, StringComparison.Ordinal);
        string devid = await RunHost(guest, $"sg_inq -p 0x83 /dev/{d0}");
        Assert.Contains("NAA", devid, StringComparison.Ordinal);
        string limits = await RunHost(guest, $"sg_inq -p 0xb0 /dev/{d0}");
        Assert.Contains("Maximum unmap LBA count", limits, StringComparison.Ordinal);
        string cap = await RunHost(guest, $"sg_readcap -l /dev/{d1}");
        Assert.Contains("Last LBA=16383", cap, StringComparison.Ordinal);
        Assert.Contains("Logical block length=4096 bytes", cap, StringComparison.Ordinal);

        // fio with verification on two LUNs at once (one job per LUN, both request queues busy).
        var fio = await guest.ExecHostAsync(
            $"fio --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 --size=16M --verify=crc32c --verify_fatal=1 --do_verify=1 " +
            $"--name=lun0 --filename=/dev/{d0} --name=lun1 --filename=/dev/{d1}",
            TimeSpan.FromSeconds(600));
        Assert.True(fio.ExitCode == 0, fio + "\n" + guest.ConsoleTail());

        // Writes land in the file bdev's backing file; unmap (blkdiscard) deallocates it to zeroes.
        await Run(guest, $"head -c 1048576 /dev/urandom > /tmp/pattern && dd if=/tmp/pattern of=/dev/{d1} bs=1M seek=40 oflag=direct conv=fsync 2>&1");
        string guestMd5 = (await Run(guest, "md5sum /tmp/pattern")).Split(' ')[0];
        Assert.Equal(guestMd5, Md5OfFileRange(backing, 40L << 20, 1 << 20));
        output.WriteLine(await RunHost(guest, $"cat /sys/block/{d1}/queue/discard_max_bytes; lsblk -D /dev/{d1}"));
        await RunHost(guest, $"blkdiscard -o {40 << 20} -l 1048576 /dev/{d1}");
        Assert.True(IsZero(backing, 40L << 20, 1 << 20), "unmap did not zero the backing file range");

        // The read-only LUN refuses writes with DATA PROTECT / WRITE PROTECTED; reads work.
        await Run(guest, $"dd if=/dev/{d2} of=/dev/null bs=64k count=16 iflag=direct 2>&1");
        var roWrite = await guest.ExecHostAsync($"sg_raw -R -v -s 4096 -i /dev/zero /dev/{d2} 2a 00 00 00 00 00 00 00 01 00", Cmd);
        output.WriteLine(roWrite.ToString());
        Assert.NotEqual(0, roWrite.ExitCode);
        Assert.Contains("Data protect", roWrite.Output, StringComparison.OrdinalIgnoreCase);
        Assert.Contains("Write protected", roWrite.Output, StringComparison.OrdinalIgnoreCase);

        // Hot-add: target 3 appears in the running guest without a rescan and takes I/O.
        Assert.Equal(3, (int)(await daemon.CallAsync("vhost_scsi_controller_add_target", new JsonObject { ["ctrlr"] = "vs.0", ["scsi_target_num"] = 3, ["bdev_name"] = "Hot1" }))!);
        string d3 = await WaitDisk(guest, 3, present: true);
        Assert.Equal("32768", (await Run(guest, $"cat /sys/block/{d3}/size")).Trim());
        var fio3 = await guest.ExecHostAsync(
            $"fio --name=hot --filename=/dev/{d3} --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=8 --size=4M --verify=crc32c --verify_fatal=1",
            TimeSpan.FromSeconds(300));
        Assert.True(fio3.ExitCode == 0, fio3 + "\n" + guest.ConsoleTail());

        // Hot-remove with I/O in flight: the disk goes away, the guest does not hang.
        await guest.ExecAsync($"(chroot /host fio --name=bg --filename=/dev/{d3} --ioengine=libaio --direct=1 --rw=randread --bs=4k --iodepth=16 --time_based --runtime=60 >/dev/null 2>&1 &) ; sleep 2; echo started", Cmd);
        await daemon.CallAsync("vhost_scsi_controller_remove_target", new JsonObject { ["ctrlr"] = "vs.0", ["scsi_target_num"] = 3 });
        await WaitDisk(guest, 3, present: false);
        Assert.Equal("alive", (await Run(guest, "echo alive")).Trim());
        await Run(guest, $"dd if=/dev/{d0} of=/dev/null bs=4k count=16 iflag=direct 2>&1");

        // Deleting the bdev behind a target hot-removes that target too.
        await daemon.CallAsync("vhost_scsi_controller_add_target", new JsonObject { ["ctrlr"] = "vs.0", ["scsi_target_num"] = 4, ["bdev_name"] = "Hot2" });
        await WaitDisk(guest, 4, present: true);
        await daemon.CallAsync("bdev_malloc_delete", new JsonObject { ["name"] = "Hot2" });
        await WaitDisk(guest, 4, present: false);
        ctrl = (JsonArray)(await daemon.CallAsync("vhost_get_controllers", new JsonObject { ["name"] = "vs.0" }))!;
        Assert.DoesNotContain(((JsonArray)ctrl[0]!["backend_specific"]!["scsi"]!), t => (int)t!["scsi_dev_num"]! == 4);

        // A resize reaches the guest (PARAM_CHANGE event, unit attention, sd rescans the capacity).
        await daemon.CallAsync("vhost_scsi_controller_add_target", new JsonObject { ["ctrlr"] = "vs.0", ["scsi_target_num"] = 5, ["bdev_name"] = "Null0" });
        string d5 = await WaitDisk(guest, 5, present: true);
        Assert.Equal("65536", (await Run(guest, $"cat /sys/block/{d5}/size")).Trim());
        await daemon.CallAsync("bdev_null_resize", new JsonObject { ["name"] = "Null0", ["new_size"] = 64 });
        await WaitFor(guest, $"cat /sys/block/{d5}/size", "131072");

        // The controller cannot be deleted while its guest is connected.
        await ExpectError(daemon, "vhost_delete_controller", new JsonObject { ["ctrlr"] = "vs.0" }, -32602, null);
    }

    private static string Squeeze(string s) => string.Join('\n', s.Split('\n').Select(l => string.Join(' ', l.Split(' ', StringSplitOptions.RemoveEmptyEntries))));

    private static async Task ExpectError(VhostDaemon daemon, string method, JsonObject p, int code, string? message)
    {
        var r = await daemon.CallRawAsync(method, p);
        Assert.True(r["error"] is not null, $"{method} {p.ToJsonString()} should fail: {r.ToJsonString()}");
        Assert.Equal(code, (int)r["error"]!["code"]!);
        if (message is not null)
        {
            // SPDK's strerror first, then the parameter at fault and the reason.
            Assert.StartsWith(message + ": ", (string)r["error"]!["message"]!);
        }
    }

    /// <summary>Waits until target <paramref name="target"/>'s LUN 0 is (or is no longer) a disk in the guest; returns its block device name.</summary>
    private async Task<string> WaitDisk(QemuGuest guest, int target, bool present)
    {
        var sw = Stopwatch.StartNew();
        string last = "";
        while (sw.Elapsed < TimeSpan.FromSeconds(60))
        {
            var r = await guest.ExecAsync($"for d in /sys/class/scsi_disk/*:0:{target}:0; do [ -d $d/device/block ] && ls $d/device/block; done 2>/dev/null", Cmd);
            last = r.Output.Trim();
            if (present && last.StartsWith("sd", StringComparison.Ordinal))
            {
                output.WriteLine($"target {target} is /dev/{last} after {sw.Elapsed.TotalSeconds:F1} s");
                return last;
            }

            if (!present && last.Length == 0)
            {
                output.WriteLine($"target {target} gone after {sw.Elapsed.TotalSeconds:F1} s");
                return "";
            }

            await Task.Delay(300);
        }

        Assert.Fail($"target {target} did not {(present ? "appear" : "disappear")} (last: '{last}')\n{guest.ConsoleTail()}");
        return "";
    }

    private static async Task WaitFor(QemuGuest guest, string cmd, string expected)
    {
        var sw = Stopwatch.StartNew();
        string last = "";
        while (sw.Elapsed < TimeSpan.FromSeconds(60))
        {
            last = (await guest.ExecAsync(cmd, Cmd)).Output.Trim();
            if (last == expected)
            {
                return;
            }

            await Task.Delay(300);
        }

        Assert.Fail($"'{cmd}' gave '{last}', expected '{expected}'\n{guest.ConsoleTail()}");
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

    private static string Md5OfFileRange(string path, long offset, int length)
    {
        using var f = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
        var buf = new byte[length];
        f.Position = offset;
        f.ReadExactly(buf);
        return Convert.ToHexStringLower(System.Security.Cryptography.MD5.HashData(buf));
    }

    private static bool IsZero(string path, long offset, int length)
    {
        using var f = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
        var buf = new byte[length];
        f.Position = offset;
        f.ReadExactly(buf);
        return buf.AsSpan().IndexOfAnyExcept((byte)0) < 0;
    }
}
