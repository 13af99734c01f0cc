using System.Text.Json.Nodes;

namespace VhostBackend.Daemon;

/// <summary>
/// What vhostd serves with no config: a sparse file-backed disk (created if missing) as bdev <c>Disk0</c>,
/// exported over vhost-user-blk as controller <c>vhost.0</c>; and the QEMU command line that attaches it.
/// </summary>
internal static class EmbeddedDefault
{
    public const string Controller = "vhost.0";
    public const string BdevName = "Disk0";

    public static JsonObject Prepare(DaemonOptions options)
    {
        string path = options.DefaultDiskPath;
        Directory.CreateDirectory(Path.GetDirectoryName(Path.GetFullPath(path))!);
        if (!File.Exists(path))
        {
            using var f = new FileStream(path, FileMode.CreateNew, FileAccess.Write);
            f.SetLength(options.DefaultDiskMiB * 1024 * 1024); // sparse: no blocks allocated until written
        }

        return new JsonObject
        {
            ["subsystems"] = new JsonArray
            {
                new JsonObject
                {
                    ["subsystem"] = "bdev",
                    ["config"] = new JsonArray
                    {
                        new JsonObject
                        {
                            ["method"] = "bdev_uring_create",
                            ["params"] = new JsonObject { ["name"] = BdevName, ["filename"] = Path.GetFullPath(path), ["block_size"] = 512 },
                        },
                    },
                },
                new JsonObject
                {
                    ["subsystem"] = "vhost_blk",
                    ["config"] = new JsonArray
                    {
                        new JsonObject
                        {
                            ["method"] = "vhost_create_blk_controller",
                            ["params"] = new JsonObject { ["ctrlr"] = Controller, ["dev_name"] = BdevName },
                        },
                    },
                },
            },
        };
    }

    public static void PrintUsage(DaemonOptions options, Serilog.ILogger log)
    {
        string socket = Path.Combine(options.App.SocketDir, Controller);
        string qemu = $"""
            qemu-system-x86_64 -machine q35 -accel kvm -cpu host -smp 2 -m 1G \
              -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \
              -chardev socket,id=vhost0,path={socket} \
              -device vhost-user-blk-pci,chardev=vhost0,num-queues=2 \
              -drive file=YOUR_OS_IMAGE.qcow2,if=virtio
            """;
        log.Information("serving {Disk} ({Bdev}) as vhost-user-blk controller {Ctrlr} on {Socket}", options.DefaultDiskPath, BdevName, Controller, socket);
        Console.Out.WriteLine($"""

            vhostd: default disk {options.DefaultDiskPath} exported as vhost-user-blk on {socket}
            Attach a VM with (shared guest memory is required by vhost-user):

            {qemu}

            """);
    }
}
