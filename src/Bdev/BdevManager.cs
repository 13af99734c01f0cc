using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;

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

    public BdevManager(ILogger? logger = null) => Logger = logger ?? NullLogger.Instance;

    public ILogger Logger { get; }

    /// <summary>Raised after a bdev is registered (e.g. so the vhost layer can re-attach waiting controllers).</summary>
    public event Action<Bdev>? Registered;

    /// <summary>Raised when a bdev starts going away, before descriptors get their Remove event.</summary>
    public event Action<Bdev>? Unregistering;

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
    }

    /// <summary>Finds a bdev by name, alias or UUID.</summary>
    public Bdev? Find(string name)
    {
        lock (_bdevs)
        {
            return _bdevs.GetValueOrDefault(name);
        }
    }

    /// <summary>Opens a descriptor. Throws <see cref="BdevNotFoundException"/> or <see cref="InvalidOperationException"/> (claimed, going away).</summary>
    public BdevDesc Open(string name, bool write, BdevEventCallback? eventCallback = null, object? context = null)
    {
        lock (_bdevs)
        {
            var bdev = _bdevs.GetValueOrDefault(name) ?? throw new BdevNotFoundException($"No such bdev: {name}");
            if (_removing.ContainsKey(bdev))
            {
                throw new BdevNotFoundException($"bdev {name} is being removed");
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
            lock (_bdevs)
            {
                _order.Remove(bdev);
                foreach (var key in _bdevs.Where(kv => kv.Value == bdev).Select(kv => kv.Key).ToList())
                {
                    _bdevs.Remove(key);
                }

                _removing.Remove(bdev);
            }

            return;
        }

        lock (_bdevs)
        {
            _order.Remove(bdev);
            foreach (var key in _bdevs.Where(kv => kv.Value == bdev).Select(kv => kv.Key).ToList())
            {
                _bdevs.Remove(key);
            }

            _removing.Remove(bdev);
        }

        await bdev.DestructAsync().ConfigureAwait(true);
        Logger.LogInformation("bdev {Name} unregistered", bdev.Name);
    }
}

public sealed class BdevNotFoundException : Exception
{
    public BdevNotFoundException(string message)
        : base(message)
    {
    }
}

public sealed class BdevExistsException : Exception
{
    public BdevExistsException(string message)
        : base(message)
    {
    }
}
