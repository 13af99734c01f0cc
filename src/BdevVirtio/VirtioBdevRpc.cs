using System.Text.Json.Nodes;
using System.Text.Json.Serialization;
using Microsoft.Extensions.Logging;
using VhostBackend.Bdev;
using VhostBackend.Platform;
using VhostBackend.Rpc;
using VhostBackend.Virtio.Blk;

namespace VhostBackend.BdevVirtio;

/// <summary>bdev_virtio_attach_controller params (SPDK's names; trtype "user" and dev_type "blk" are supported).</summary>
public sealed class VirtioAttachParams : IRpcParams
{
    [JsonRequired] public string Name { get; set; } = "";
    [JsonRequired] public string Trtype { get; set; } = "";
    [JsonRequired] public string Traddr { get; set; } = "";
    [JsonRequired] public string DevType { get; set; } = "";
    public int? VqCount { get; set; }
    public int? VqSize { get; set; }

    public void Validate()
    {
        if (string.IsNullOrWhiteSpace(Name) || Name.Length > 128 || Name.Any(c => char.IsWhiteSpace(c) || c == '/'))
        {
            throw RpcException.InvalidParams("Invalid parameters: name must be a non-empty word");
        }

        if (Trtype != "user")
        {
            // SPDK answers a bad trtype with the positive EINVAL code; pci and vfio-user need devices we do not drive.
            throw new RpcException(22, Trtype is "pci" or "vfio-user" ? $"trtype '{Trtype}' is not supported (only 'user')" : $"Invalid trtype '{Trtype}'");
        }

        if (DevType != "blk")
        {
            throw new RpcException(22, DevType == "scsi" ? "dev_type 'scsi' is not supported (only 'blk')" : $"Invalid dev_type '{DevType}'");
        }

        if (string.IsNullOrEmpty(Traddr))
        {
            throw RpcException.InvalidParams("traddr (the vhost-user socket path) is required");
        }

        if (VqCount is < 0 or > 256)
        {
            throw RpcException.InvalidParams("vq_count must be 1..256");
        }

        if (VqSize is < 0 or > 32768)
        {
            throw RpcException.InvalidParams("vq_size must be a power of two in 1..32768");
        }
    }
}

public sealed class VirtioDetachParams
{
    [JsonRequired] public string Name { get; set; } = "";
}

/// <summary>
/// The virtio bdev module: virtio-user blk controllers by name (SPDK's bdev_virtio with trtype "user").
/// RPC handlers run on the main reactor; the blocking vhost-user handshake runs on the thread pool.
/// </summary>
public sealed class VirtioBdevModule
{
    /// <summary>SPDK's defaults for virtio-user.</summary>
    public const int DefaultVqCount = 1;
    public const int DefaultVqSize = 512;

    private readonly Dictionary<string, VirtioUserController?> _ctrls = new(StringComparer.Ordinal);
    private readonly BdevManager _bdevs;
    private readonly ILogger _log;
    private readonly Func<SharedMemoryArena>? _sharedMemory;

    /// <param name="sharedMemory">The process's shared I/O memory, sent to back ends as a second region so buffers
    /// allocated there (bdevperf's) need no bounce copy; null: every I/O is bounced.</param>
    public VirtioBdevModule(BdevManager bdevs, ILogger? log = null, Func<SharedMemoryArena>? sharedMemory = null)
    {
        _bdevs = bdevs;
        _log = log ?? bdevs.Logger;
        _sharedMemory = sharedMemory;
    }

    public IReadOnlyList<VirtioUserController> Controllers
    {
        get
        {
            lock (_ctrls)
            {
                return _ctrls.Values.OfType<VirtioUserController>().ToArray();
            }
        }
    }

    /// <summary>Connects to the vhost-user-blk socket and registers the bdev (named <paramref name="name"/>). Returns the bdev names.</summary>
    public async Task<IReadOnlyList<string>> AttachAsync(string name, string socketPath, int vqCount = DefaultVqCount, int vqSize = DefaultVqSize)
    {
        lock (_ctrls)
        {
            if (_ctrls.ContainsKey(name) || _bdevs.Find(name) is not null)
            {
                throw RpcException.Errno(17, $"A virtio device or bdev named {name} already exists");
            }

            _ctrls[name] = null; // reserve the name while connecting
        }

        VirtioUserController ctrl;
        try
        {
            var shared = _sharedMemory?.Invoke();
            ctrl = await Task.Run(() => VirtioUserController.Connect(name, socketPath, vqCount, vqSize, _log, shared)).ConfigureAwait(true);
        }
        catch (Exception e) when (e is IOException or ArgumentException or UnauthorizedAccessException)
        {
            lock (_ctrls)
            {
                _ctrls.Remove(name);
            }

            _log.LogError("bdev_virtio_attach_controller {Name} {Path} failed: {Error}", name, socketPath, e.Message);
            throw RpcException.InvalidParams($"Failed to attach virtio-user device {name} at {socketPath}: {e.Message}");
        }

        uint bs = ctrl.Has(VirtioBlkFeature.BlkSize) ? ctrl.Config.BlkSize : 512;
        var bdev = new VirtioBlkBdev(ctrl, bs, ctrl.Config.Capacity * 512 / bs);
        try
        {
            _bdevs.Register(bdev);
        }
        catch (BdevExistsException e)
        {
            await Task.Run(ctrl.Dispose).ConfigureAwait(true);
            lock (_ctrls)
            {
                _ctrls.Remove(name);
            }

            throw RpcException.Errno(17, e.Message);
        }

        lock (_ctrls)
        {
            _ctrls[name] = ctrl;
        }

        return [bdev.Name];
    }

    /// <summary>Unregisters the bdev (waiting for its users to close it), then stops the rings and disconnects.</summary>
    public async Task DetachAsync(string name)
    {
        VirtioUserController? ctrl;
        lock (_ctrls)
        {
            ctrl = _ctrls.GetValueOrDefault(name);
            if (ctrl is null)
            {
                throw RpcException.Errno(19, $"Failed to find virtio device {name}");
            }

            _ctrls.Remove(name);
        }

        if (_bdevs.Find(name) is VirtioBlkBdev b && b.Ctrl == ctrl)
        {
            await _bdevs.UnregisterAsync(b).ConfigureAwait(true);
        }

        ctrl.MarkGone();
        for (int i = 0; i < 500 && ctrl.SnapshotChannels().Length > 0; i++)
        {
            await Task.Delay(10).ConfigureAwait(true);
        }

        if (ctrl.SnapshotChannels().Length > 0)
        {
            _log.LogError("virtio-user {Name}: channels still open after detach; connection left open", name);
            return;
        }

        await Task.Run(ctrl.Dispose).ConfigureAwait(true);
        _log.LogInformation("virtio-user {Name}: detached", name);
    }

    /// <summary>Disconnects every controller (shutdown).</summary>
    public async Task DetachAllAsync()
    {
        foreach (var c in Controllers)
        {
            try
            {
                await DetachAsync(c.CtrlName).ConfigureAwait(true);
            }
            catch (RpcException)
            {
            }
        }
    }

    public JsonArray GetDevices()
    {
        var list = new JsonArray();
        foreach (var c in Controllers.OrderBy(c => c.CtrlName, StringComparer.Ordinal))
        {
            list.Add(new JsonObject
            {
                ["name"] = c.CtrlName,
                ["trtype"] = "user",
                ["traddr"] = c.SocketPath,
                ["dev_type"] = "blk",
                ["vq_count"] = c.VqCount,
                ["vq_size"] = c.VqSize,
                ["features"] = $"0x{c.Features:x}",
                ["capacity_sectors"] = c.Config.Capacity,
            });
        }

        return list;
    }
}

/// <summary>Registers the virtio bdev module's RPC methods.</summary>
public static class VirtioBdevRpc
{
    /// <summary>
    /// Registers bdev_virtio_attach_controller, bdev_virtio_detach_controller and bdev_virtio_blk_get_devices (ours;
    /// SPDK lists only SCSI devices). The bdevs' <see cref="VirtioBlkBdev.ConfigCall"/> put the attach calls into
    /// the bdev subsystem's saved config.
    /// </summary>
    public static VirtioBdevModule Register(RpcRegistry rpc, BdevManager bdevs, VirtioBdevModule? module = null)
    {
        module ??= new VirtioBdevModule(bdevs);
        rpc.Register("bdev_virtio_attach_controller", async r =>
        {
            var p = r.Bind<VirtioAttachParams>();
            int count = p.VqCount is null or 0 ? VirtioBdevModule.DefaultVqCount : p.VqCount.Value;
            int size = p.VqSize is null or 0 ? VirtioBdevModule.DefaultVqSize : p.VqSize.Value;
            var names = await module.AttachAsync(p.Name, p.Traddr, count, size).ConfigureAwait(true);
            var arr = new JsonArray();
            foreach (var n in names)
            {
                arr.Add(n);
            }

            return arr;
        }, RpcStates.Both);

        rpc.Register("bdev_virtio_detach_controller", async r =>
        {
            var p = r.Bind<VirtioDetachParams>();
            await module.DetachAsync(p.Name).ConfigureAwait(true);
            return (JsonNode?)true;
        }, RpcStates.Runtime);

        rpc.Register("bdev_virtio_blk_get_devices", r => module.GetDevices(), RpcStates.Runtime);
        return module;
    }
}
