using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using VhostBackend.Bdev;
using VhostBackend.Platform;
using VhostBackend.Reactors;
using VhostBackend.Vhost.Blk;
using VhostBackend.Vhost.Scsi;

namespace VhostBackend.Vhost;

/// <summary>
/// The vhost target: controllers by name, each listening on <c>&lt;SocketDirectory&gt;/&lt;name&gt;</c>. Control plane
/// (RPC handlers on the main reactor, the host at shutdown); the controller table is guarded by a lock.
/// </summary>
public sealed class VhostManager : IAsyncDisposable
{
    private readonly Dictionary<string, VhostController> _controllers = new(StringComparer.Ordinal);
    private readonly List<VhostController> _order = new();
    private readonly ReactorRuntime _runtime;
    private readonly BdevManager _bdevs;
    private readonly ILoggerFactory _loggerFactory;
    private readonly ILogger _log;

    public VhostManager(ReactorRuntime runtime, BdevManager bdevs, string socketDirectory, ILoggerFactory? loggerFactory = null)
    {
        _runtime = runtime;
        _bdevs = bdevs;
        SocketDirectory = Path.GetFullPath(socketDirectory);
        _loggerFactory = loggerFactory ?? NullLoggerFactory.Instance;
        _log = _loggerFactory.CreateLogger("vhost");
    }

    public string SocketDirectory { get; }

    /// <summary>
    /// Owner, group and mode every controller's socket gets right after it is created (vhostd's --socket-user,
    /// --socket-group, --socket-mode), so QEMU running as another user can connect to controllers created at any
    /// time over RPC; null leaves sockets as created. Client-mode controllers connect to QEMU's socket instead.
    /// </summary>
    public SocketOwnership? SocketOwnership { get; init; }

    public IReadOnlyList<VhostController> Controllers
    {
        get
        {
            lock (_controllers)
            {
                return _order.ToArray();
            }
        }
    }

    public VhostController? Find(string name)
    {
        lock (_controllers)
        {
            return _controllers.GetValueOrDefault(name);
        }
    }

    /// <summary>
    /// Creates a vhost-user-blk controller over <paramref name="bdevName"/> and starts listening. Errors as
    /// <see cref="VhostException"/> with SPDK's errno: EEXIST (name taken), ENODEV (no such bdev), EPERM (bdev
    /// claimed by a module), EINVAL (bad name or cpumask), EIO (socket).
    /// </summary>
    public VhostBlkController CreateBlkController(string name, string bdevName, string? cpumask, bool readOnly, bool client = false, bool packedRing = false)
    {
        var ctrlr = Create(name, cpumask, client, false, (path, mask) =>
        {
            try
            {
                return new VhostBlkController(name, path, mask, _runtime, _bdevs, bdevName, readOnly, _loggerFactory.CreateLogger("vhost_blk"), packedRing);
            }
            catch (BdevNotFoundException e)
            {
                throw new VhostException(Errno.ENODEV, "dev_name", e.Message);
            }
            catch (BdevClaimedException e)
            {
                // SPDK's spdk_vhost_blk_construct returns spdk_bdev_open_ext's -EPERM as is ("Operation not permitted").
                throw new VhostException(e.Errno, "dev_name", e.Message);
            }
        });
        _log.LogInformation("vhost-blk controller {Name} created on bdev {Bdev} (cpumask {Mask}, readonly {ReadOnly})", name, bdevName, ctrlr.CpuMask.ToMaskString(), readOnly);
        return ctrlr;
    }

    /// <summary>Creates a vhost-user-scsi controller with no targets (add them with <see cref="AddScsiTarget"/>). Errors as for blk.</summary>
    public VhostScsiController CreateScsiController(string name, string? cpumask, bool client = false, bool delay = false)
    {
        var ctrlr = Create(name, cpumask, client, delay, (path, mask) => new VhostScsiController(name, path, mask, _runtime, _bdevs, _loggerFactory.CreateLogger("vhost_scsi")));
        _log.LogInformation("vhost-scsi controller {Name} created (cpumask {Mask})", name, ctrlr.CpuMask.ToMaskString());
        return ctrlr;
    }

    /// <summary>vhost_start_scsi_controller: starts a controller created with <c>delay</c> (idempotent, as SPDK). ENODEV if unknown, EINVAL if not SCSI.</summary>
    public void StartScsiController(string name)
    {
        var ctrlr = Get(name);
        try
        {
            Directory.CreateDirectory(SocketDirectory);
            ctrlr.StartDelayed();
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or ArgumentException)
        {
            throw new VhostException(Errno.EIO, "ctrlr", $"cannot listen on {ctrlr.SocketPath}: {e.Message}");
        }
    }

    /// <summary>vhost_scsi_controller_add_target: ENODEV (no controller), EINVAL (not a SCSI controller), then as <see cref="VhostScsiController.AddTarget"/>.</summary>
    public int AddScsiTarget(string ctrlrName, int targetNum, string bdevName, bool readOnly = false) => Get(ctrlrName).AddScsiTarget(targetNum, bdevName, readOnly);

    /// <summary>vhost_scsi_controller_remove_target: as <see cref="VhostScsiController.RemoveTargetAsync"/>.</summary>
    public Task RemoveScsiTargetAsync(string ctrlrName, int targetNum) => Get(ctrlrName).RemoveScsiTargetAsync(targetNum);

    /// <summary>The longest path a Unix socket address (sun_path, 108 bytes with its NUL) holds.</summary>
    public const int MaxSocketPathBytes = 107;

    private VhostController Get(string name) => Find(name) ?? throw new VhostException(Errno.ENODEV, "ctrlr", $"vhost controller {name} does not exist");

    private T Create<T>(string name, string? cpumask, bool client, bool delay, Func<string, CpuSet, T> factory)
        where T : VhostController
    {
        if (string.IsNullOrEmpty(name) || name.Contains('/') || name is "." or "..")
        {
            throw new VhostException(Errno.EINVAL, "ctrlr", $"invalid controller name '{name}' (empty, '.', '..' or with '/')");
        }

        // A Unix socket address holds 107 bytes of path: a longer one cannot be listened on.
        string socketPath = Path.Combine(SocketDirectory, name);
        int pathBytes = System.Text.Encoding.UTF8.GetByteCount(socketPath);
        if (pathBytes > MaxSocketPathBytes)
        {
            throw new VhostException(Errno.EINVAL, "ctrlr",
                $"the socket path {socketPath} is {pathBytes} bytes; a Unix socket path holds at most {MaxSocketPathBytes} (shorten the name or the socket directory)");
        }

        CpuSet mask;
        if (cpumask is null)
        {
            mask = _runtime.CpuMask;
        }
        else if (!CpuSet.TryParse(cpumask, out mask, out string err) || mask.Cores.Any(c => !_runtime.CpuMask.Contains(c)))
        {
            throw new VhostException(Errno.EINVAL, "cpumask", $"{cpumask} is not a subset of the application's core mask {_runtime.CpuMask.ToMaskString()}{(err.Length > 0 ? " (" + err + ")" : string.Empty)}");
        }

        string path = Path.Combine(SocketDirectory, name);
        lock (_controllers)
        {
            if (_controllers.ContainsKey(name))
            {
                throw new VhostException(Errno.EEXIST, "ctrlr", $"vhost controller {name} already exists.");
            }

            T ctrlr = factory(path, mask);
            ctrlr.ClientMode = client;
            ctrlr.SocketOwnership = SocketOwnership;
            ctrlr.CreatedDelayed = delay;
            try
            {
                Directory.CreateDirectory(SocketDirectory);
                if (!delay)
                {
                    ctrlr.Start();
                }
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException or ArgumentException)
            {
                ctrlr.ReleaseAsync().GetAwaiter().GetResult();
                throw new VhostException(Errno.EIO, "ctrlr", $"cannot listen on {path}: {e.Message}");
            }

            _controllers.Add(name, ctrlr);
            _order.Add(ctrlr);
            return ctrlr;
        }
    }

    /// <summary>
    /// Deletes a controller: ENODEV if unknown; EBUSY while a front end is connected (SPDK refuses too);
    /// otherwise stops listening and closes the bdev.
    /// </summary>
    public async Task DeleteControllerAsync(string name)
    {
        VhostController ctrlr;
        lock (_controllers)
        {
            if (!_controllers.TryGetValue(name, out ctrlr!))
            {
                throw new VhostException(Errno.ENODEV, "ctrlr", $"vhost controller {name} does not exist");
            }

            if (ctrlr.Sessions.Count > 0)
            {
                throw new VhostException(Errno.EBUSY, "ctrlr", $"Controller {name} has still valid connection.");
            }

            if (ctrlr.DeleteBlocker is { } blocker)
            {
                throw new VhostException(Errno.EBUSY, "ctrlr", blocker);
            }

            _controllers.Remove(name);
            _order.Remove(ctrlr);
        }

        await ctrlr.ShutdownAsync().ConfigureAwait(false);
        await ctrlr.ReleaseAsync().ConfigureAwait(false);
        _log.LogInformation("vhost controller {Name} deleted", name);
    }

    /// <summary>Shutdown: disconnects every front end (draining I/O, unmapping memory) and removes the sockets.</summary>
    public async ValueTask DisposeAsync()
    {
        VhostController[] all;
        lock (_controllers)
        {
            all = _order.ToArray();
            _controllers.Clear();
            _order.Clear();
        }

        foreach (var c in all)
        {
            await c.ShutdownAsync().ConfigureAwait(false);
            await c.ReleaseAsync().ConfigureAwait(false);
        }
    }
}
