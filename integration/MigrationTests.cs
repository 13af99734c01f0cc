using System.Diagnostics;
using System.Text.Json.Nodes;
using VhostBackend.IntegrationTests.Infrastructure;
using Xunit;
using Xunit.Abstractions;

namespace VhostBackend.IntegrationTests;

/// <summary>
/// Live migration of a guest with vhost-user disks served by one daemon: two QEMU TCG instances on this machine
/// (the destination started with <c>-incoming</c>), both connected to the same controller sockets. The guest runs
/// fio with verification on a vhost-blk disk (split ring) and a vhost-scsi LUN (packed ring) while QMP
/// <c>migrate</c> moves it; QEMU turns dirty logging on (SET_LOG_BASE, LOG_ALL, VHOST_VRING_F_LOG), stops the source's
/// rings at the switch-over (GET_VRING_BASE) and starts the destination's from those bases. fio must finish on the
/// destination with 0 errors: a read whose data pages or used entries were not logged would hand the destination a
/// stale buffer (a verify failure) or a lost completion (a hang).
///
/// The guest's host-root 9p mount blocks migration in QEMU, so fio and its libraries are copied into the guest's RAM
/// first and every 9p mount is dropped.
/// </summary>
public sealed class MigrationTests(ITestOutputHelper output)
{
    private static readonly TimeSpan Cmd = TimeSpan.FromSeconds(120);

    [Fact]
    public async Task Guest_with_vhost_disks_migrates_under_fio_verify()
    {
        Tools.Require("qemu-system-x86_64", "qemu-system-x86");
        Tools.Require("fio");

        var work = Directory.CreateTempSubdirectory("vb-mig-").FullName;
        await using var daemon = await VhostDaemon.StartAsync(work, output.WriteLine);
        await daemon.CallAsync("bdev_malloc_create", new JsonObject { ["name"] = "MigB", ["num_blocks"] = 131072, ["block_size"] = 512 });
        await daemon.CallAsync("bdev_malloc_create", new JsonObject { ["name"] = "MigS", ["num_blocks"] = 131072, ["block_size"] = 512 });
        await daemon.CallAsync("vhost_create_blk_controller", new JsonObject { ["ctrlr"] = "vm.blk", ["dev_name"] = "MigB" });
        await daemon.CallAsync("vhost_create_scsi_controller", new JsonObject { ["ctrlr"] = "vm.scsi" });
        await daemon.CallAsync("vhost_scsi_controller_add_target", new JsonObject { ["ctrlr"] = "vm.scsi", ["scsi_target_num"] = 0, ["bdev_name"] = "MigS" });

        string migSock = Path.Combine(work, "mig.sock");
        QemuGuestOptions Options(string name, string? incoming) => new()
        {
            Name = name,
            Memory = "256M",
            Cpus = 2,
            BlkDevices = [new VhostUserDevice(Path.Combine(work, "vm.blk"), 2)],
            ExtraQemuArgs =
            [
                "-chardev", $"socket,id=mscsi,path={Path.Combine(work, "vm.scsi")}",
                "-device", "vhost-user-scsi-pci,chardev=mscsi,num_queues=1,packed=on",
            ],
            Incoming = incoming,
            Log = output.WriteLine,
            BootTimeout = TimeSpan.FromSeconds(120),
        };

        await using var source = await QemuGuest.StartAsync(Options("mig-src", null));
        string sd = (await Run(source, "ls /sys/bus/scsi/devices/*/block/ | grep sd | head -1")).Trim();
        Assert.StartsWith("sd", sd, StringComparison.Ordinal);

        // fio into RAM, then no 9p mount left (QEMU refuses to migrate while one is mounted).
        await Run(source,
            "mkdir -p /fio/dev /fio/proc /fio/tmp && for f in $(chroot /host sh -c 'command -v fio; ldd $(command -v fio)' | grep -o '/[^ ]*'); do " +
            "mkdir -p /fio$(dirname $f) && chroot /host cat $f > /fio$f && chmod 755 /fio$f; done && " +
            "mount --bind /dev /fio/dev && mount -t proc proc /fio/proc && chroot /fio fio --version");
        await Run(source, "cd / && for m in $(awk '$2 ~ \"^/host\" {print $2}' /proc/mounts | sort -r); do umount $m || umount -l $m || exit 1; done; ! grep -q ' 9p ' /proc/mounts");

        // fio: random writes verified as it goes (verify_backlog) and in full at the end of each loop.
        const string job = "--ioengine=libaio --direct=1 --rw=randwrite --bsrange=4k-32k --iodepth=16 --size=24M --verify=crc32c " +
            "--verify_backlog=64 --verify_fatal=1 --do_verify=1 --verify_state_save=0 --loops=1000 --time_based --runtime=45";
        await Run(source, $"(chroot /fio fio {job} --name=blk --filename=/dev/vda --name=scsi --filename=/dev/{sd} > /tmp/mig.log 2>&1; echo $? > /tmp/mig.rc) & echo started");
        await WaitForIo(daemon, 300);

        await using var dest = await QemuGuest.StartAsync(Options("mig-dst", "unix:" + migSock));
        var listen = Stopwatch.StartNew();
        while (!File.Exists(migSock))
        {
            Assert.True(listen.Elapsed < TimeSpan.FromSeconds(60), "the destination never listened for the migration");
            await Task.Delay(100);
        }

        await using (var qmp = await Qmp.ConnectAsync(source.QmpSocketPath, TimeSpan.FromSeconds(10)))
        {
            await qmp.ExecuteAsync("migrate-set-parameters", new JsonObject { ["max-bandwidth"] = 4L << 30, ["downtime-limit"] = 2000 });
            long before = await Ops(daemon);
            var sw = Stopwatch.StartNew();
            await qmp.ExecuteAsync("migrate", new JsonObject { ["uri"] = "unix:" + migSock });
            string status = "";
            while (sw.Elapsed < TimeSpan.FromSeconds(300))
            {
                var info = await qmp.ExecuteAsync("query-migrate");
                status = (string?)info?["status"] ?? "";
                if (status is "completed" or "failed" or "cancelled")
                {
                    output.WriteLine($"migration {status} after {sw.Elapsed.TotalSeconds:F1} s: {info!.ToJsonString()}");
                    break;
                }

                await Task.Delay(500);
            }

            Assert.Equal("completed", status);
            long during = await Ops(daemon) - before;
            output.WriteLine($"{during} I/Os while migrating");
            Assert.True(during > 0, "no guest I/O while migrating");
        }

        // The source's rings were stopped at switch-over; the destination runs the guest and its I/O.
        var srcState = await dest.ExecAsync("echo on-destination", Cmd);
        Assert.Equal("on-destination", srcState.Output.Trim());
        long atSwitch = await Ops(daemon);
        await WaitForIo(daemon, 200, atSwitch);
        source.Kill();

        var done = Stopwatch.StartNew();
        string rc = "";
        while (done.Elapsed < TimeSpan.FromSeconds(300))
        {
            rc = (await dest.ExecAsync("cat /tmp/mig.rc 2>/dev/null", Cmd)).Output.Trim();
            if (rc.Length > 0)
            {
                break;
            }

            await Task.Delay(1000);
        }

        string log = (await dest.ExecAsync("cat /tmp/mig.log", Cmd)).Output;
        output.WriteLine(log);
        Assert.True(rc == "0", $"fio across the migration exited '{rc}':\n{log}\n{dest.ConsoleTail()}");
        Assert.Contains("err= 0", log, StringComparison.Ordinal);
    }

    private static async Task WaitForIo(VhostDaemon daemon, long ios, long? from = null)
    {
        long start = from ?? await Ops(daemon);
        var sw = Stopwatch.StartNew();
        while (await Ops(daemon) < start + ios)
        {
            Assert.True(sw.Elapsed < TimeSpan.FromSeconds(120), $"guest I/O did not reach {ios} operations");
            await Task.Delay(250);
        }
    }

    private static async Task<long> Ops(VhostDaemon daemon)
    {
        long n = 0;
        foreach (var name in new[] { "MigB", "MigS" })
        {
            var st = await daemon.CallAsync("bdev_get_iostat", new JsonObject { ["name"] = name });
            var b = ((JsonArray)st!["bdevs"]!)[0]!;
            n += (long)b["num_read_ops"]! + (long)b["num_write_ops"]!;
        }

        return n;
    }

    private static async Task<string> Run(QemuGuest guest, string cmd)
    {
        var r = await guest.ExecAsync(cmd, Cmd);
        Assert.True(r.ExitCode == 0, r + "\n" + guest.ConsoleTail());
        return r.Output;
    }
}
