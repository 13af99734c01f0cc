using System.Text.Json.Nodes;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using VhostBackend.Bdev;
using VhostBackend.Platform;
using VhostBackend.Reactors;
using VhostBackend.Rpc;
using VhostBackend.Virtio.Blk;

namespace VhostBackend.BdevVirtio;

/// <summary>
/// The virtio-blk bdev module (SPDK's module/bdev/virtio/bdev_virtio_blk.c, module name "virtio_blk"): virtio-user
/// blk controllers by name (trtype "user"), one bdev each, named after the controller. RPC handlers run on the main
/// reactor; the blocking vhost-user handshake runs on the thread pool. save_config: each bdev's
/// <see cref="VirtioBlkBdev.ConfigCall"/> writes its attach call (SPDK's per-bdev write_config_json); the module
/// writes nothing of its own. At shutdown <see cref="FiniAsync"/> detaches every front end; the host registers the
/// module after the vhost layer so this runs while our own vhost back ends still serve.
/// </summary>
public sealed class VirtioBdevModule : BdevModule
{
    /// <summary>SPDK's defaults for virtio-user.</summary>
    public const int DefaultVqCount = 1;
    public const int DefaultVqSize = 512;

    private readonly Dictionary<string, VirtioUserController?> _ctrls = new(StringComparer.Ordinal);
    private readonly Func<SharedMemoryArena>? _sharedMemory;
    private BdevManager? _bdevs;
    private ReactorRuntime? _reactors;
    private ILogger _log = NullLogger.Instance;

    /// <param name="sharedMemory">The process's shared I/O memory, sent to back ends as a second region so buffers
    /// allocated there (bdevperf's) need no bounce copy; null: every I/O is bounced.</param>
    public VirtioBdevModule(Func<SharedMemoryArena>? sharedMemory = null)
    {
        _sharedMemory = sharedMemory;
    }

    public override string Name => "virtio_blk";

    private BdevManager Bdevs => _bdevs ?? throw new InvalidOperationException("the virtio_blk bdev module is not initialized (Init)");

    public override void Init(BdevModuleContext context)
    {
        _bdevs = context.Bdevs;
        _reactors = context.Reactors;
        _log = context.LoggerFactory.CreateLogger("bdev_virtio");
        VirtioBdevRpc.Register(context.Rpc, this);
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
    /// <param name="packedRing">VIRTIO_F_RING_PACKED: null when the back end offers it, true required, false split rings (ours; SPDK has no such parameter).</param>
    public async Task<IReadOnlyList<string>> AttachAsync(string name, string socketPath, int vqCount = DefaultVqCount, int vqSize = DefaultVqSize, bool? packedRing = null)
    {
        lock (_ctrls)
        {
            if (_ctrls.ContainsKey(name) || Bdevs.Find(name) is not null)
            {
                throw RpcException.Errno(17, $"A virtio device or bdev named {name} already exists");
            }

            _ctrls[name] = null; // reserve the name while connecting
        }

        VirtioUserController ctrl;
        try
        {
            var shared = _sharedMemory?.Invoke();
            ctrl = await Task.Run(() => VirtioUserController.Connect(name, socketPath, vqCount, vqSize, _log, shared, packedRing)).ConfigureAwait(true);
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
            Bdevs.Register(bdev);
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

    /// <summary>
    /// Unregisters the bdev (waiting for its users to close it), then stops the rings and disconnects: at once, or,
    /// while channels are still open, when the last one closes (the call returns after <see cref="DetachWait"/>).
    /// </summary>
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

        if (Bdevs.Find(name) is VirtioBlkBdev b && b.Ctrl == ctrl)
        {
            await Bdevs.UnregisterAsync(b).ConfigureAwait(true);
        }

        // The rings stop and the connection closes once no channel is left: now, or when the last one closes (a bdev
        // channel someone still holds), however long that takes; the RPC does not wait longer than DetachWait for it.
        var disposed = ctrl.DisposeWhenUnused();
        if (await Task.WhenAny(disposed, Task.Delay(DetachWait)).ConfigureAwait(true) != disposed)
        {
            _log.LogWarning("virtio-user {Name}: {Count} channel(s) still open {Seconds} s after detach; the connection closes when the last one does",
                name, ctrl.LiveChannels, DetachWait.TotalSeconds);
        }
    }

    /// <summary>How long <see cref="DetachAsync"/> waits for the teardown (open channels defer it) before it returns.</summary>
    internal TimeSpan DetachWait { get; set; } = TimeSpan.FromSeconds(5);

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

    /// <summary>Shutdown: disconnects every front end on the main reactor (before the vhost layer stops).</summary>
    public override async Task FiniAsync()
    {
        if (_reactors is null)
        {
            return;
        }

        await _reactors.Main.InvokeAsync(async () =>
        {
            await DetachAllAsync().ConfigureAwait(true);
            return true;
        }).ConfigureAwait(false);
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
                ["packed_ring"] = c.PackedRing,
                ["capacity_sectors"] = c.Config.Capacity,
            });
        }

        return list;
    }
}

