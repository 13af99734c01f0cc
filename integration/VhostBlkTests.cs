using System.Diagnostics;
using System.Net.Sockets;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using VhostBackend.IntegrationTests.Infrastructure;
using Xunit;
using Xunit.Abstractions;

namespace VhostBackend.IntegrationTests;

/// <summary>
/// vhost-user-blk against real QEMU: one guest boot carries most checks (disk geometry, multi-queue fio verify,
/// data landing in the backing file, discard / write zeroes, read-only disk); then QEMU is killed mid-I/O and a
/// second guest must be served by the same daemon and sockets.
/// </summary>
public sealed class VhostBlkTests(ITestOutputHelper output)
{
    private static readonly TimeSpan Cmd = TimeSpan.FromSeconds(120);

    [Fact]
    public async Task Vhost_blk_serves_guests_end_to_end()
    {
        Tools.Require("qemu-system-x86_64", "qemu-system-x86");
        Tools.Require("fio");

        var work = Directory.CreateTempSubdirectory("vb-blk-").FullName;
        string backing = Path.Combine(work, "disk.img");
        using (var f = File.Create(backing))
        {
            f.SetLength(64 << 20);
        }

        await using var daemon = await VhostDaemon.StartAsync(work, output.WriteLine);
        await daemon.CallAsync("bdev_uring_create", new JsonObject { ["filename"] = backing, ["name"] = "File0", ["block_size"] = 4096 });
        await daemon.CallAsync("bdev_malloc_create", new JsonObject { ["name"] = "Malloc0", ["num_blocks"] = 65536, ["block_size"] = 512 });
        await daemon.CallAsync("vhost_create_blk_controller", new JsonObject { ["ctrlr"] = "vb.file", ["dev_name"] = "File0" });
        await daemon.CallAsync("vhost_create_blk_controller", new JsonObject { ["ctrlr"] = "vb.ro", ["dev_name"] = "Malloc0", ["readonly"] = true });

        // SPDK's error shape for a duplicate and a missing bdev.
        var dup = await daemon.CallRawAsync("vhost_create_blk_controller", new JsonObject { ["ctrlr"] = "vb.file", ["dev_name"] = "File0" });
        Assert.Equal(-32602, (int)dup["error"]!["code"]!);
        var nodev = await daemon.CallRawAsync("vhost_create_blk_controller", new JsonObject { ["ctrlr"] = "vb.x", ["dev_name"] = "nope" });
        Assert.Equal(-32602, (int)nodev["error"]!["code"]!);

        string fileSock = Path.Combine(work, "vb.file");
        string roSock = Path.Combine(work, "vb.ro");
        var options = new QemuGuestOptions
        {
            Name = "vhost-blk",
            Memory = "512M",
            Cpus = 2,
            BlkDevices = [new VhostUserDevice(fileSock, 2), new VhostUserDevice(roSock, 1)],
            Log = output.WriteLine,
            BootTimeout = TimeSpan.FromSeconds(120),
        };

        var guest = await QemuGuest.StartAsync(options);
        try
        {
            // vda = file bdev (64 MiB, 4 KiB blocks), vdb = read-only malloc (32 MiB, 512 B blocks).
            Assert.Equal("131072", (await Run(guest, "cat /sys/block/vda/size")).Trim());
            Assert.Equal("4096", (await Run(guest, "cat /sys/block/vda/queue/logical_block_size")).Trim());
            Assert.Equal("65536", (await Run(guest, "cat /sys/block/vdb/size")).Trim());
            Assert.Equal("1", (await Run(guest, "cat /sys/block/vdb/ro")).Trim());
            Assert.Equal("2", (await Run(guest, "ls /sys/block/vda/mq | wc -l")).Trim());

            // fio verify, QD32, two jobs (one per vCPU, so both hardware queues carry I/O).
            var fio = await guest.ExecHostAsync(
                "fio --name=verify --filename=/dev/vda --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=32 " +
                "--size=16M --numjobs=2 --offset_increment=24M --verify=crc32c --verify_fatal=1 --do_verify=1 --group_reporting",
                TimeSpan.FromSeconds(600));
            Assert.True(fio.ExitCode == 0, fio + "\n" + guest.ConsoleTail());

            // Data written in the guest lands in the backing file.
            await Run(guest, "head -c 1048576 /dev/urandom > /tmp/pattern && dd if=/tmp/pattern of=/dev/vda bs=1M seek=50 oflag=direct conv=fsync 2>&1");
            string guestMd5 = (await Run(guest, "md5sum /tmp/pattern")).Split(' ')[0];
            Assert.Equal(guestMd5, Md5OfFileRange(backing, 50L << 20, 1 << 20));

            // Discard and write zeroes.
            await RunHost(guest, "blkdiscard -o 0 -l 1048576 /dev/vda");
            await RunHost(guest, "blkdiscard -z -o 52428800 -l 1048576 /dev/vda");
            Assert.Equal(new string('0', 32), Md5Zero(backing, 50L << 20, 1 << 20));

            // The read-only disk refuses writes; reads work.
            var roWrite = await guest.ExecAsync("dd if=/dev/zero of=/dev/vdb bs=4096 count=1 oflag=direct 2>&1", Cmd);
            Assert.NotEqual(0, roWrite.ExitCode);
            await Run(guest, "dd if=/dev/vdb of=/dev/null bs=1M count=4 iflag=direct 2>&1");

            var ctrls = (JsonArray)(await daemon.CallAsync("vhost_get_controllers", null))!;
            Assert.Equal(2, ctrls.Count);
            Assert.All(ctrls, c => Assert.Single((JsonArray)c!["sessions"]!));

            // QEMU dies mid-I/O.
            await guest.ExecAsync("(chroot /host fio --name=bg --filename=/dev/vda --ioengine=libaio --direct=1 --rw=randrw --bs=4k --iodepth=32 --size=32M --time_based --runtime=120 >/dev/null 2>&1 &) ; sleep 3; echo started", Cmd);
            guest.Kill();
            await guest.WaitForExitAsync(TimeSpan.FromSeconds(30));
        }
        finally
        {
            await guest.DisposeAsync();
        }

        // The daemon frees the sessions and serves a second guest on the same sockets.
        var deadline = Stopwatch.StartNew();
        while (true)
        {
            var list = (JsonArray)(await daemon.CallAsync("vhost_get_controllers", null))!;
            if (list.All(c => ((JsonArray)c!["sessions"]!).Count == 0))
            {
                break;
            }

            Assert.True(deadline.Elapsed < TimeSpan.FromSeconds(30), "sessions not released after QEMU was killed: " + list.ToJsonString());
            await Task.Delay(200);
        }

        // The second guest also has a disk in the other direction: QEMU listens (server=on) and the daemon's
        // client-mode controller connects to it, retrying until QEMU is up.
        await daemon.CallAsync("bdev_malloc_create", new JsonObject { ["name"] = "Malloc1", ["num_blocks"] = 8192, ["block_size"] = 512 });
        string srvSock = Path.Combine(work, "vb.srv");
        await daemon.CallAsync("vhost_create_blk_controller", new JsonObject { ["ctrlr"] = "vb.srv", ["dev_name"] = "Malloc1", ["client"] = true });
        await using (var second = await QemuGuest.StartAsync(new QemuGuestOptions
        {
            Name = "vhost-blk-2",
            Memory = "512M",
            Cpus = 2,
            BlkDevices = [new VhostUserDevice(fileSock, 2)],
            ExtraQemuArgs = ["-chardev", $"socket,id=srv0,path={srvSock},server=on,wait=off", "-device", "vhost-user-blk-pci,chardev=srv0,num-queues=1"],
            Log = output.WriteLine,
            BootTimeout = TimeSpan.FromSeconds(120),
        }))
        {
            Assert.Equal("131072", (await Run(second, "cat /sys/block/vda/size")).Trim());
            Assert.Equal("8192", (await Run(second, "cat /sys/block/vdb/size")).Trim());
            await Run(second, "head -c 65536 /dev/urandom > /tmp/p && dd if=/tmp/p of=/dev/vdb bs=64k seek=3 oflag=direct 2>&1 && dd if=/dev/vdb of=/tmp/q bs=64k skip=3 count=1 iflag=direct 2>&1 && cmp /tmp/p /tmp/q");
            var fio2 = await second.ExecHostAsync(
                "fio --name=again --filename=/dev/vda --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 --size=4M --verify=crc32c --verify_fatal=1",
                TimeSpan.FromSeconds(300));
            Assert.True(fio2.ExitCode == 0, fio2 + "\n" + second.ConsoleTail());

            // Deleting a controller that has no session works while the others serve a guest.
            await daemon.CallAsync("vhost_delete_controller", new JsonObject { ["ctrlr"] = "vb.ro" });
            Assert.False(File.Exists(roSock));

            // SIGTERM under guest I/O: the daemon stops its queues (in-flight requests drained), closes the
            // sessions and exits 0 within the stop budget, instead of hanging or dying on a signal.
            await second.ExecAsync("(chroot /host fio --name=bg2 --filename=/dev/vda --ioengine=libaio --direct=1 --rw=randrw --bs=4k --iodepth=32 --size=32M --time_based --runtime=120 >/tmp/bg2.log 2>&1 &) ; sleep 3; echo started", Cmd);
            // fio starts from the 9p host root, which takes a while in a loaded TCG guest: wait until the op count
            // grows in two consecutive samples (I/O is running now), for up to 90 s.
            long ops0 = await FileOps(daemon), ops1 = ops0;
            int growing = 0;
            var wait = Stopwatch.StartNew();
            while (growing < 2 && wait.Elapsed < TimeSpan.FromSeconds(90))
            {
                await Task.Delay(300);
                long now = await FileOps(daemon);
                growing = now > ops1 ? growing + 1 : 0;
                ops1 = now;
            }

            if (growing < 2)
            {
                var log = await second.ExecAsync("cat /tmp/bg2.log; ps", Cmd);
                Assert.Fail($"no guest I/O running before SIGTERM ({ops0} -> {ops1} ops in {wait.Elapsed.TotalSeconds:F0} s); fio: {log.Output}");
            }
            var stop = Stopwatch.StartNew();
            int rc = await daemon.TerminateAsync(TimeSpan.FromSeconds(60));
            output.WriteLine($"vhostd exited {rc} {stop.Elapsed.TotalSeconds:F1} s after SIGTERM under I/O ({ops1} ops done)");
            Assert.Equal(0, rc);
        }
    }

    private static async Task<long> FileOps(VhostDaemon daemon)
    {
        var st = await daemon.CallAsync("bdev_get_iostat", new JsonObject { ["name"] = "File0" });
        var b = ((JsonArray)st!["bdevs"]!)[0]!;
        return (long)b["num_read_ops"]! + (long)b["num_write_ops"]!;
    }

    private static async Task<string> Run(QemuGuest guest, string cmd)
    {
        var r = await guest.ExecAsync(cmd, Cmd);
        Assert.True(r.ExitCode == 0, r + "\n" + guest.ConsoleTail());
        return r.Output;
    }

    private static async Task RunHost(QemuGuest guest, string cmd)
    {
        var r = await guest.ExecHostAsync(cmd, Cmd);
        Assert.True(r.ExitCode == 0, r.ToString());
    }

    private static string Md5OfFileRange(string path, long offset, int length)
    {
        using var f = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
        var buf = new byte[length];
        f.Position = offset;
        f.ReadExactly(buf);
        return Convert.ToHexStringLower(MD5.HashData(buf));
    }

    /// <summary>All-zero ranges hash to a marker so the assertion message stays short.</summary>
    private static string Md5Zero(string path, long offset, int length)
    {
        using var f = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
        var buf = new byte[length];
        f.Position = offset;
        f.ReadExactly(buf);
        return buf.AsSpan().IndexOfAnyExcept((byte)0) < 0 ? new string('0', 32) : "not zero";
    }
}
