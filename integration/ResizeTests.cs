using System.Diagnostics;
using System.Text.Json.Nodes;
using VhostBackend.IntegrationTests.Infrastructure;
using Xunit;
using Xunit.Abstractions;

namespace VhostBackend.IntegrationTests;

/// <summary>
/// A bdev resize reaches a running Linux guest: bdev_null_resize and bdev_aio_rescan (the backing file grown with
/// truncate) change the vhost-blk config space capacity, the daemon sends VHOST_USER_BACKEND_CONFIG_CHANGE_MSG over
/// the back-end request channel, QEMU re-reads the config (GET_CONFIG) and raises a config interrupt, and the guest's
/// /sys/block/vdX/size follows; the new blocks are usable (data written past the old end reads back).
/// </summary>
public sealed class ResizeTests(ITestOutputHelper output)
{
    private static readonly TimeSpan Cmd = TimeSpan.FromSeconds(120);

    [Fact]
    public async Task Bdev_resize_reaches_the_guest()
    {
        Tools.Require("qemu-system-x86_64", "qemu-system-x86");

        var work = Directory.CreateTempSubdirectory("vb-resize-").FullName;
        string backing = Path.Combine(work, "disk.img");
        using (var f = File.Create(backing))
        {
            f.SetLength(32 << 20);
        }

        await using var daemon = await VhostDaemon.StartAsync(work, output.WriteLine);
        await daemon.CallAsync("bdev_null_create", new JsonObject { ["name"] = "Null0", ["num_blocks"] = 131072, ["block_size"] = 512 });
        await daemon.CallAsync("bdev_aio_create", new JsonObject { ["filename"] = backing, ["name"] = "Aio0", ["block_size"] = 512 });
        await daemon.CallAsync("vhost_create_blk_controller", new JsonObject { ["ctrlr"] = "vr.null", ["dev_name"] = "Null0" });
        await daemon.CallAsync("vhost_create_blk_controller", new JsonObject { ["ctrlr"] = "vr.aio", ["dev_name"] = "Aio0" });

        await using var guest = await QemuGuest.StartAsync(new QemuGuestOptions
        {
            Name = "vhost-resize",
            Memory = "256M",
            Cpus = 1,
            BlkDevices = [new VhostUserDevice(Path.Combine(work, "vr.null"), 1), new VhostUserDevice(Path.Combine(work, "vr.aio"), 1)],
            Log = output.WriteLine,
            BootTimeout = TimeSpan.FromSeconds(120),
        });

        Assert.Equal("131072", (await Run(guest, "cat /sys/block/vda/size")).Trim());
        Assert.Equal("65536", (await Run(guest, "cat /sys/block/vdb/size")).Trim());

        // We do not offer VIRTIO_BLK_F_CONFIG_WCE: the guest sees a fixed write-back cache (flush supported).
        Assert.Equal("write back", (await Run(guest, "cat /sys/block/vda/queue/write_cache")).Trim());

        // Null bdev: 64 MiB -> 128 MiB -> 160 MiB (two notifications in a row).
        await daemon.CallAsync("bdev_null_resize", new JsonObject { ["name"] = "Null0", ["new_size"] = 128 });
        await WaitForSize(guest, "vda", 262144);
        await daemon.CallAsync("bdev_null_resize", new JsonObject { ["name"] = "Null0", ["new_size"] = 160 });
        await WaitForSize(guest, "vda", 327680);
        // The guest can address the new end (a null bdev reads zeroes).
        Assert.Equal("0", (await Run(guest, "dd if=/dev/vda bs=4096 skip=40959 count=1 iflag=direct 2>/dev/null | tr -d '\\000' | wc -c")).Trim());

        // File bdev: the file grows to 48 MiB, bdev_aio_rescan picks it up.
        using (var f = new FileStream(backing, FileMode.Open, FileAccess.ReadWrite, FileShare.ReadWrite))
        {
            f.SetLength(48 << 20);
        }

        await daemon.CallAsync("bdev_aio_rescan", new JsonObject { ["name"] = "Aio0" });
        await WaitForSize(guest, "vdb", 98304);

        // Data written past the old end reaches the file and reads back.
        await Run(guest, "head -c 1048576 /dev/urandom > /tmp/p && dd if=/tmp/p of=/dev/vdb bs=1M seek=40 oflag=direct 2>&1 && " +
            "dd if=/dev/vdb of=/tmp/q bs=1M skip=40 count=1 iflag=direct 2>&1 && cmp /tmp/p /tmp/q");
        string guestMd5 = (await Run(guest, "md5sum /tmp/p")).Split(' ')[0];
        using (var f = new FileStream(backing, FileMode.Open, FileAccess.Read, FileShare.ReadWrite))
        {
            var buf = new byte[1 << 20];
            f.Position = 40L << 20;
            f.ReadExactly(buf);
            Assert.Equal(guestMd5, Convert.ToHexStringLower(System.Security.Cryptography.MD5.HashData(buf)));
        }

        // The controller listing reports the new size too (bdev_get_bdevs).
        var bdevs = (JsonArray)(await daemon.CallAsync("bdev_get_bdevs", new JsonObject { ["name"] = "Aio0" }))!;
        Assert.Equal(98304, (long)bdevs[0]!["num_blocks"]!);
    }

    private static async Task WaitForSize(QemuGuest guest, string disk, long sectors)
    {
        var sw = Stopwatch.StartNew();
        string seen = "";
        while (sw.Elapsed < TimeSpan.FromSeconds(60))
        {
            seen = (await Run(guest, $"cat /sys/block/{disk}/size")).Trim();
            if (seen == sectors.ToString(System.Globalization.CultureInfo.InvariantCulture))
            {
                return;
            }

            await Task.Delay(250);
        }

        var dmesg = await guest.ExecAsync("dmesg | tail -20", Cmd);
        Assert.Fail($"/sys/block/{disk}/size stayed {seen}, expected {sectors}; dmesg:\n{dmesg.Output}");
    }

    private static async Task<string> Run(QemuGuest guest, string cmd)
    {
        var r = await guest.ExecAsync(cmd, Cmd);
        Assert.True(r.ExitCode == 0, r + "\n" + guest.ConsoleTail());
        return r.Output;
    }
}
