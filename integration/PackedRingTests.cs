using System.Diagnostics;
using System.Text.Json.Nodes;
using VhostBackend.IntegrationTests.Infrastructure;
using Xunit;
using Xunit.Abstractions;

namespace VhostBackend.IntegrationTests;

/// <summary>
/// Packed virtqueues (VIRTIO_F_RING_PACKED) with the Linux driver, one guest boot: QEMU <c>packed=on</c> on a
/// vhost-user-blk disk (indirect descriptors, the Linux default for multi-segment requests) and a vhost-user-scsi
/// controller with <c>indirect_desc=off</c> (direct descriptor chains); the guest must have negotiated the packed
/// layout (feature bit 34); fio verify on both; then QMP stop/cont cycles while fio runs: each stop is a
/// GET_VRING_BASE that must carry both wrap counters and indices, each cont a SET_VRING_BASE that resumes from them,
/// and fio must still finish with every block verified.
/// </summary>
public sealed class PackedRingTests(ITestOutputHelper output)
{
    private static readonly TimeSpan Cmd = TimeSpan.FromSeconds(120);

    [Fact]
    public async Task Packed_rings_serve_blk_and_scsi_guests()
    {
        Tools.Require("qemu-system-x86_64", "qemu-system-x86");
        Tools.Require("fio");

        var work = Directory.CreateTempSubdirectory("vb-packed-").FullName;
        await using var daemon = await VhostDaemon.StartAsync(work, output.WriteLine);
        await daemon.CallAsync("bdev_malloc_create", new JsonObject { ["name"] = "MallocB", ["num_blocks"] = 131072, ["block_size"] = 512 });
        await daemon.CallAsync("bdev_malloc_create", new JsonObject { ["name"] = "MallocS", ["num_blocks"] = 131072, ["block_size"] = 512 });
        await daemon.CallAsync("bdev_malloc_create", new JsonObject { ["name"] = "MallocC", ["num_blocks"] = 65536, ["block_size"] = 512 });
        await daemon.CallAsync("vhost_create_blk_controller", new JsonObject { ["ctrlr"] = "vp.blk", ["dev_name"] = "MallocB", ["packed_ring"] = true });
        await daemon.CallAsync("vhost_create_blk_controller", new JsonObject { ["ctrlr"] = "vp.split", ["dev_name"] = "MallocC" });
        await daemon.CallAsync("vhost_create_scsi_controller", new JsonObject { ["ctrlr"] = "vp.scsi" });
        await daemon.CallAsync("vhost_scsi_controller_add_target", new JsonObject { ["ctrlr"] = "vp.scsi", ["scsi_target_num"] = 0, ["bdev_name"] = "MallocS" });

        // save_config keeps packed_ring.
        var saved = (await daemon.CallAsync("framework_get_config", new JsonObject { ["name"] = "vhost_blk" }))!.ToJsonString();
        Assert.Contains("\"packed_ring\":true", saved, StringComparison.Ordinal);

        await using var guest = await QemuGuest.StartAsync(new QemuGuestOptions
        {
            Name = "vhost-packed",
            Memory = "512M",
            Cpus = 2,
            BlkDevices = [new VhostUserDevice(Path.Combine(work, "vp.split"), 1)], // vda: a split ring, for comparison
            ExtraQemuArgs =
            [
                "-chardev", $"socket,id=pblk,path={Path.Combine(work, "vp.blk")}",
                "-device", "vhost-user-blk-pci,chardev=pblk,num-queues=2,packed=on",
                "-chardev", $"socket,id=pscsi,path={Path.Combine(work, "vp.scsi")}",
                "-device", "vhost-user-scsi-pci,chardev=pscsi,num_queues=2,packed=on,indirect_desc=off",
            ],
            Log = output.WriteLine,
            BootTimeout = TimeSpan.FromSeconds(120),
        });

        // Both devices negotiated the packed layout (bit 34 of the virtio device's feature string); the blk disk also
        // indirect descriptors (bit 28), the SCSI controller not.
        Assert.Equal("1", (await Run(guest, "cut -c35 /sys/block/vdb/device/features")).Trim());
        Assert.Equal("1", (await Run(guest, "cut -c29 /sys/block/vdb/device/features")).Trim());
        string scsiFeatures = (await Run(guest, "cat /sys/bus/virtio/drivers/virtio_scsi/virtio*/features")).Trim();
        Assert.Equal('1', scsiFeatures[34]);
        Assert.Equal('0', scsiFeatures[28]);
        Assert.Equal("131072", (await Run(guest, "cat /sys/block/vdb/size")).Trim());
        string sd = (await Run(guest, "ls /sys/bus/scsi/devices/*/block/ | grep sd | head -1")).Trim();
        Assert.StartsWith("sd", sd, StringComparison.Ordinal);

        // fio verify on both, mixed block sizes (chains of varying length, many laps of the 128-entry rings).
        var fio = await guest.ExecHostAsync(
            "fio --ioengine=libaio --direct=1 --rw=randwrite --bsrange=4k-64k --iodepth=32 --size=24M --verify=crc32c " +
            $"--verify_fatal=1 --do_verify=1 --verify_state_save=0 --numjobs=2 --offset_increment=28M --group_reporting --name=blk --filename=/dev/vdb --name=scsi --filename=/dev/{sd}",
            TimeSpan.FromSeconds(900));
        Assert.True(fio.ExitCode == 0, fio + "\n" + guest.ConsoleTail());
        output.WriteLine(fio.Output);

        // Data round trip through each device.
        await Run(guest, $"head -c 1048576 /dev/urandom > /tmp/p && dd if=/tmp/p of=/dev/vdb bs=64k seek=7 oflag=direct 2>&1 && dd if=/dev/vdb of=/tmp/q bs=64k skip=7 count=16 iflag=direct 2>&1 && cmp /tmp/p /tmp/q");
        await Run(guest, $"dd if=/tmp/p of=/dev/{sd} bs=64k seek=9 oflag=direct 2>&1 && dd if=/dev/{sd} of=/tmp/r bs=64k skip=9 count=16 iflag=direct 2>&1 && cmp /tmp/p /tmp/r");

        // Stop/cont under I/O: GET_VRING_BASE at each stop (in-flight requests drained first), SET_VRING_BASE at cont.
        await guest.ExecAsync(
            "(chroot /host fio --ioengine=libaio --direct=1 --rw=randwrite --bsrange=4k-32k --iodepth=16 --size=16M --verify=crc32c " +
            $"--verify_fatal=1 --do_verify=1 --verify_state_save=0 --name=blk --filename=/dev/vdb --name=scsi --filename=/dev/{sd} --name=split --filename=/dev/vda > /tmp/bg.log 2>&1; echo $? > /tmp/bg.rc) & echo started", Cmd);
        await using (var qmp = await Qmp.ConnectAsync(guest.QmpSocketPath, TimeSpan.FromSeconds(10)))
        {
            long ops0 = await Ops(daemon, "MallocB") + await Ops(daemon, "MallocS");
            var sw = Stopwatch.StartNew();
            while (await Ops(daemon, "MallocB") + await Ops(daemon, "MallocS") < ops0 + 200 && sw.Elapsed < TimeSpan.FromSeconds(90))
            {
                await Task.Delay(200);
            }

            for (int i = 0; i < 6; i++)
            {
                await qmp.ExecuteAsync("stop");
                var status = await qmp.ExecuteAsync("query-status");
                Assert.Equal("paused", (string?)status!["status"]);
                await Task.Delay(300);
                await qmp.ExecuteAsync("cont");
                await Task.Delay(700);
            }
        }

        var done = Stopwatch.StartNew();
        string rc = "";
        while (done.Elapsed < TimeSpan.FromSeconds(600))
        {
            rc = (await guest.ExecAsync("cat /tmp/bg.rc 2>/dev/null", Cmd)).Output.Trim();
            if (rc.Length > 0)
            {
                break;
            }

            await Task.Delay(1000);
        }

        var log = (await guest.ExecAsync("cat /tmp/bg.log; grep . /sys/block/*/inflight", Cmd)).Output;
        Assert.True(rc == "0", $"fio across stop/cont exited '{rc}':\n{log}\n{guest.ConsoleTail()}");
        Assert.Contains("err= 0", log, StringComparison.Ordinal);
    }

    private static async Task<long> Ops(VhostDaemon daemon, string bdev)
    {
        var st = await daemon.CallAsync("bdev_get_iostat", new JsonObject { ["name"] = bdev });
        var b = ((JsonArray)st!["bdevs"]!)[0]!;
        return (long)b["num_read_ops"]! + (long)b["num_write_ops"]!;
    }

    private static async Task<string> Run(QemuGuest guest, string cmd)
    {
        var r = await guest.ExecAsync(cmd, Cmd);
        Assert.True(r.ExitCode == 0, r + "\n" + guest.ConsoleTail());
        return r.Output;
    }
}
