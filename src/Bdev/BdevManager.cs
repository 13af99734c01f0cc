using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using VhostBackend.Platform;

namespace VhostBackend.Bdev;

/// <summary>
/// The registry of bdevs of one application. Registration, lookup and open are control-plane operations
/// (any thread, guarded by a lock); I/O never touches this type.
/// </summary>
public sealed class BdevManager
{
    private readonly Dictionary<string, Bdev> _bdevs = new(StringComparer.Ordinal);
    private readonly List<Bdev> _order = new();
    private readonly Dictionary<Bdev, TaskCompletionSource> _removing = new();
    private readonly List<BdevModule> _modules = new();

    public BdevManager(ILogger? logger = null) => Logger = logger ?? NullLogger.Instance;

    public ILogger Logger { get; }

    /// <summary>Raised after a bdev is registered (e.g. so the vhost layer can re-attach waiting controllers).</summary>
    public event Action<Bdev>? Registered;

    /// <summary>Raised when a bdev starts going away, before descriptors get their Remove event.</summary>
    public event Action<Bdev>? Unregistering;

    /// <summary>Raised when a bdev is gone (its name is free again), after the module destructed it.</summary>
    public event Action<Bdev>? Unregistered;

    /// <summary>The bdev modules in registration order.</summary>
    public IReadOnlyList<BdevModule> Modules
    {
        get
        {
            lock (_modules)
            {
                return _modules.ToArray();
            }
        }
    }

    /// <summary>
    /// Adds a module to the examine and save_config lists (the host then calls its <see cref="BdevModule.Init"/>).
    /// Throws if a module of that name is registered already.
    /// </summary>
    public void AddModule(BdevModule module)
    {
        lock (_modules)
        {
            foreach (var m in _modules)
            {
                if (m.Name == module.Name)
                {
                    throw new InvalidOperationException($"bdev module '{module.Name}' registered twice");
                }
            }

            _modules.Add(module);
        }
    }

    /// <summary>Finds a registered module by name.</summary>
    public BdevModule? FindModule(string name)
    {
        lock (_modules)
        {
            foreach (var m in _modules)
            {
                if (m.Name == name)
                {
                    return m;
                }
            }
        }

        return null;
    }

    /// <summary>
    /// Claims <paramref name="bdev"/> for <paramref name="module"/>: exclusive write access, like SPDK's
    /// spdk_bdev_module_claim_bdev. Returns 0, or -EPERM when another module claimed it already or it is open for
    /// write through a descriptor other than <paramref name="desc"/>. A read-only <paramref name="desc"/> (the
    /// claimer's own) becomes a writer. While claimed, nobody else can open the bdev for write (-EPERM).
    /// </summary>
    public int Claim(Bdev bdev, BdevModule module, BdevDesc? desc = null)
    {
        if (desc is not null && desc.Bdev != bdev)
        {
            throw new ArgumentException("the descriptor is not open on that bdev", nameof(desc));
        }

        lock (_bdevs)
        {
            if (bdev.ClaimModule is { } owner)
            {
                Logger.LogError("bdev {Name} already claimed by module {Module}", bdev.Name, owner.Name);
                return -Errno.EPERM;
            }

            foreach (var d in bdev.Descriptors)
            {
                if (d.Writable && d != desc)
                {
                    Logger.LogError("bdev {Name} already opened with write access", bdev.Name);
                    return -Errno.EPERM;
                }
            }

            desc?.MarkWritable();
            bdev.ClaimModule = module;
        }

        return 0;
    }

    /// <summary>Releases a claim taken with <see cref="Claim"/> (spdk_bdev_module_release_bdev).</summary>
    public void ReleaseClaim(Bdev bdev, BdevModule module)
    {
        lock (_bdevs)
        {
            if (bdev.ClaimModule != module)
            {
                throw new InvalidOperationException($"bdev {bdev.Name} is not claimed by module {module.Name}");
            }

            bdev.ClaimModule = null;
        }
    }

    public IReadOnlyList<Bdev> All
    {
        get
        {
            lock (_bdevs)
            {
                return _order.ToArray();
            }
        }
    }

    /// <summary>Adds a bdev; throws <see cref="BdevExistsException"/> if its name or an alias is taken.</summary>
    public void Register(Bdev bdev)
    {
        // The layer never asks a bdev per I/O whether it reads (as SPDK's spdk_bdev_read does not): every bdev must.
        if (!bdev.SupportsIoType(BdevIoType.Read))
        {
            throw new ArgumentException($"bdev {bdev.Name} does not support reads");
        }

        lock (_bdevs)
        {
            foreach (var n in bdev.Aliases.Prepend(bdev.Name).Append(bdev.Uuid.ToString()))
            {
                if (_bdevs.ContainsKey(n))
                {
                    throw new BdevExistsException($"Bdev name {n} already exists");
                }
            }

            _bdevs[bdev.Name] = bdev;
            _bdevs[bdev.Uuid.ToString()] = bdev;
            foreach (var a in bdev.Aliases)
            {
                _bdevs[a] = bdev;
            }

            _order.Add(bdev);
        }

        Logger.LogInformation("bdev {Name} registered: {Blocks} blocks of {BlockSize} bytes ({Product})", bdev.Name, bdev.BlockCount, bdev.BlockSize, bdev.ProductName);
        Registered?.Invoke(bdev);
        Examine(bdev);
    }

    // SPDK's examine_config: every module sees every new bdev, in module registration order, synchronously.
    private void Examine(Bdev bdev)
    {
        foreach (var m in Modules)
        {
            try
            {
                m.Examine(bdev);
            }
            catch (Exception e)
            {
                Logger.LogError(e, "bdev module {Module}: examine of {Name} failed", m.Name, bdev.Name);
            }
        }
    }

    /// <summary>Replaces one alias of a registered bdev (an lvol renamed); throws <see cref="BdevExistsException"/>
    /// when the new one is taken.</summary>
    public void RenameAlias(Bdev bdev, string oldAlias, string newAlias)
    {
        if (oldAlias == newAlias)
        {
            return;
        }

        lock (_bdevs)
        {
            if (_bdevs.ContainsKey(newAlias))
            {
                throw new BdevExistsException($"Bdev name {newAlias} already exists");
            }

            if (_bdevs.TryGetValue(oldAlias, out var b) && b == bdev)
            {
                _bdevs.Remove(oldAlias);
            }

            _bdevs[newAlias] = bdev;
            int i = bdev.Aliases.IndexOf(oldAlias);
            if (i >= 0)
            {
                bdev.Aliases[i] = newAlias;
            }
            else
            {
                bdev.Aliases.Add(newAlias);
            }
        }
    }

    /// <summary>Finds a bdev by name, alias or UUID.</summary>
    public Bdev? Find(string name)
    {
        lock (_bdevs)
        {
            return _bdevs.GetValueOrDefault(name);
        }
    }

    /// <summary>
    /// Opens a descriptor. Throws <see cref="BdevNotFoundException"/> (unknown, going away) or
    /// <see cref="BdevClaimedException"/> (write access to a bdev a module claimed: SPDK's -EPERM).
    /// </summary>
    public BdevDesc Open(string name, bool write, BdevEventCallback? eventCallback = null, object? context = null)
    {
        lock (_bdevs)
        {
            var bdev = _bdevs.GetValueOrDefault(name) ?? throw new BdevNotFoundException($"No such bdev: {name}");
            if (_removing.ContainsKey(bdev))
            {
                throw new BdevNotFoundException($"bdev {name} is being removed");
            }

            if (write && bdev.ClaimModule is { } owner)
            {
                Logger.LogError("Could not open {Name} - {Module} module already claimed it", name, owner.Name);
                throw new BdevClaimedException($"Could not open {name} - {owner.Name} module already claimed it");
            }

            var desc = new BdevDesc(bdev, write, eventCallback, context);
            bdev.AddDesc(desc);
            desc.Closed += OnDescClosed;
            return desc;
        }
    }

    private void OnDescClosed(BdevDesc desc)
    {
        TaskCompletionSource? tcs = null;
        lock (_bdevs)
        {
            if (desc.Bdev.Descriptors.Count == 0)
            {
                _removing.TryGetValue(desc.Bdev, out tcs);
            }
        }

        tcs?.TrySetResult();
    }

    /// <summary>
    /// Hot-removes a bdev: tells every descriptor (Remove event), waits until all are closed, then lets the
    /// module release its resources. Completes when the bdev is gone.
    /// </summary>
    public async Task UnregisterAsync(Bdev bdev, TimeSpan? timeout = null)
    {
        TaskCompletionSource tcs;
        lock (_bdevs)
        {
            if (!_order.Contains(bdev))
            {
                throw new BdevNotFoundException($"No such bdev: {bdev.Name}");
            }

            if (_removing.TryGetValue(bdev, out var existing))
            {
                tcs = existing;
            }
            else
            {
                tcs = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
                _removing[bdev] = tcs;
                bdev.LayerDevice.MarkGone();
            }
        }

        Unregistering?.Invoke(bdev);
        var descs = bdev.Descriptors;
        if (descs.Count == 0)
        {
            tcs.TrySetResult();
        }

        foreach (var d in descs)
        {
            d.RaiseEvent(BdevEventType.Remove);
        }

        try
        {
            await tcs.Task.WaitAsync(timeout ?? TimeSpan.FromSeconds(30)).ConfigureAwait(true);
        }
        catch (TimeoutException)
        {
            // Never free module memory under an open descriptor: drop the name, leak the bdev, say so.
            Logger.LogError("bdev {Name}: {Count} descriptor(s) still open {Timeout} after remove; unregistered without releasing its resources", bdev.Name, bdev.Descriptors.Count, timeout ?? TimeSpan.FromSeconds(30));
            DropNames(bdev);

            // No Unregistered event: it means "destructed", and a module that hears it releases what the bdev
            // stands on (a vbdev's claim and base descriptor) while the leaked bdev's openers can still send I/O.
            return;
        }

        DropNames(bdev);
        try
        {
            await bdev.DestructAsync().ConfigureAwait(true);
            Logger.LogInformation("bdev {Name} unregistered", bdev.Name);
        }
        finally
        {
            // Also after a failed destruct: its module must still release its claims, or the base stays held forever.
            Unregistered?.Invoke(bdev);
        }
    }

    private void DropNames(Bdev bdev)
    {
        lock (_bdevs)
        {
            _order.Remove(bdev);
            foreach (var key in _bdevs.Where(kv => kv.Value == bdev).Select(kv => kv.Key).ToList())
            {
                _bdevs.Remove(key);
            }

            _removing.Remove(bdev);
        }
    }
}

public sealed class BdevNotFoundException : Exception
{
    public BdevNotFoundException(string message)
        : base(message)
    {
    }
}

/// <summary>Write access to a bdev another module claimed (SPDK answers -EPERM).</summary>
public sealed class BdevClaimedException : InvalidOperationException
{
    public BdevClaimedException(string message)
        : base(message)
    {
    }

    public int Errno => Platform.Errno.EPERM;
}

public sealed class BdevExistsException : Exception
{
    public BdevExistsException(string message)
        : base(message)
    {
    }
}
