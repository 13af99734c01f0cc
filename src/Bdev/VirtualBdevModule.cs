using System.Text.Json.Nodes;
using Microsoft.Extensions.Logging;

namespace VhostBackend.Bdev;

/// <summary>
/// A module whose bdevs each sit on one base bdev (SPDK's passthru pattern; also delay, crypto, ...). It does the
/// examine/claim bookkeeping every such module needs:
/// <list type="bullet">
/// <item>a configured vbdev is remembered (<see cref="AddVbdev"/>) and built as soon as its base exists: at once, or
/// when the base is registered later (<see cref="Examine"/>), so a config that lists the vbdev before its base
/// replays (save_config writes module-level calls, these included, before the bases' own calls, as SPDK does);</item>
/// <item>the base is opened and claimed (<see cref="BdevManager.Claim"/>) before the vbdev is registered;</item>
/// <item>hot-remove of the base unregisters the vbdev (its openers get their Remove event); when the vbdev is gone
/// the claim is released and the base descriptor closed, so the base's removal completes. The config stays: if the
/// base comes back, so does the vbdev (until <see cref="DeleteVbdevAsync"/>).</item>
/// </list>
/// Subclasses implement <see cref="CreateVbdev"/> (the bdev, given the open, claimed base descriptor) and
/// <see cref="VbdevConfigCall"/> (the replayable create call), and register their RPC methods in <see cref="InitModule"/>.
/// </summary>
public abstract class VirtualBdevModule : BdevModule
{
    private readonly List<Entry> _entries = new();
    private readonly Dictionary<Bdev, BdevDesc> _built = new(); // built vbdev -> its claimed base descriptor (under _entries' lock)

    protected BdevManager Bdevs { get; private set; } = null!;

    protected ILogger Logger { get; private set; } = null!;

    /// <summary>One configured vbdev: its name, its base's name, the module's own settings, and, while built, the bdevs.</summary>
    protected sealed class Entry
    {
        internal Entry(string vbdevName, string baseName, object? settings)
        {
            VbdevName = vbdevName;
            BaseName = baseName;
            Settings = settings;
        }

        public string VbdevName { get; }
        public string BaseName { get; }
        public object? Settings { get; }
        public Bdev? Vbdev { get; internal set; }
        public BdevDesc? BaseDesc { get; internal set; }
    }

    public sealed override void Init(BdevModuleContext context)
    {
        Bdevs = context.Bdevs;
        Logger = context.LoggerFactory.CreateLogger("bdev_" + Name);
        Bdevs.Unregistered += OnUnregistered;
        InitModule(context);
    }

    /// <summary>Registers the module's RPC methods.</summary>
    protected abstract void InitModule(BdevModuleContext context);

    /// <summary>Builds the vbdev on an open base descriptor this module has claimed. Called on the thread that registered the base or called <see cref="AddVbdev"/>.</summary>
    protected abstract Bdev CreateVbdev(Entry entry, BdevDesc baseDesc);

    /// <summary>The call that recreates a configured vbdev (written even while its base is missing).</summary>
    protected abstract JsonObject VbdevConfigCall(Entry entry);

    /// <summary>The configured vbdevs in creation order.</summary>
    protected IReadOnlyList<Entry> Entries
    {
        get
        {
            lock (_entries)
            {
                return _entries.ToArray();
            }
        }
    }

    /// <summary>
    /// Remembers a vbdev and builds it if its base exists. Returns the built vbdev, or null when the base is not
    /// there yet (not an error: SPDK keeps the name and builds it on examine). Throws
    /// <see cref="BdevExistsException"/> for a taken name; a failure to build (claimed base: <see cref="BdevClaimException"/>)
    /// forgets the config and propagates.
    /// </summary>
    protected Bdev? AddVbdev(string vbdevName, string baseName, object? settings)
    {
        var entry = new Entry(vbdevName, baseName, settings);
        lock (_entries)
        {
            if (Bdevs.Find(vbdevName) is not null || _entries.Exists(e => e.VbdevName == vbdevName))
            {
                throw new BdevExistsException($"Bdev name {vbdevName} already exists");
            }

            _entries.Add(entry);
        }

        if (Bdevs.Find(baseName) is not { } baseBdev)
        {
            Logger.LogInformation("vbdev {Name}: base bdev {Base} not found yet, waiting for it", vbdevName, baseName);
            return null;
        }

        try
        {
            return Build(entry, baseBdev);
        }
        catch
        {
            lock (_entries)
            {
                if (entry.Vbdev is { } built)
                {
                    return built; // examine built it first (the base registered meanwhile); ours lost the claim race
                }

                _entries.Remove(entry);
            }

            throw;
        }
    }

    /// <summary>Forgets a configured vbdev and unregisters it if built. False if no such vbdev is configured.</summary>
    protected async Task<bool> DeleteVbdevAsync(string vbdevName)
    {
        Entry? entry;
        lock (_entries)
        {
            entry = _entries.Find(e => e.VbdevName == vbdevName);
            if (entry is null)
            {
                return false;
            }

            _entries.Remove(entry);
        }

        if (entry.Vbdev is { } v)
        {
            await UnregisterQuietlyAsync(v).ConfigureAwait(true);
        }

        return true;
    }

    public override void Examine(Bdev bdev)
    {
        foreach (var entry in Entries)
        {
            if (entry.Vbdev is null && Bdevs.Find(entry.BaseName) == bdev) // by name, alias or UUID, as AddVbdev resolves it
            {
                try
                {
                    Build(entry, bdev);
                }
                catch (Exception e)
                {
                    Logger.LogError(e, "vbdev {Name}: could not build it on base bdev {Base}", entry.VbdevName, bdev.Name);
                }
            }
        }
    }

    public override void WriteConfig(JsonArray calls)
    {
        foreach (var entry in Entries)
        {
            calls.Add(VbdevConfigCall(entry));
        }
    }

    private Bdev Build(Entry entry, Bdev baseBdev)
    {
        var desc = Bdevs.Open(baseBdev.Name, write: false, static (type, _, ctx) => ((BaseEventContext)ctx!).OnEvent(type), new BaseEventContext(this, entry));
        int rc = Bdevs.Claim(baseBdev, this, desc);
        if (rc != 0)
        {
            desc.Dispose();
            throw new BdevClaimException(-rc, baseBdev.ClaimedBy is { } owner
                ? $"bdev {baseBdev.Name} already claimed by module {owner}"
                : $"bdev {baseBdev.Name} already opened with write access");
        }

        Bdev vbdev;
        try
        {
            vbdev = CreateVbdev(entry, desc);
            lock (_entries)
            {
                entry.BaseDesc = desc;
                entry.Vbdev = vbdev;
                _built[vbdev] = desc;
            }

            Bdevs.Register(vbdev);
        }
        catch
        {
            lock (_entries)
            {
                if (entry.Vbdev is { } v)
                {
                    _built.Remove(v);
                }

                entry.Vbdev = null;
                entry.BaseDesc = null;
            }

            Bdevs.ReleaseClaim(baseBdev, this);
            desc.Dispose();
            throw;
        }

        Logger.LogInformation("vbdev {Name} built on base bdev {Base}", entry.VbdevName, baseBdev.Name);
        return vbdev;
    }

    private void OnBaseRemoved(Entry entry)
    {
        if (entry.Vbdev is { } v)
        {
            Logger.LogInformation("base bdev {Base} is going away: removing vbdev {Name}", entry.BaseName, entry.VbdevName);
            _ = UnregisterQuietlyAsync(v);
        }
    }

    private async Task UnregisterQuietlyAsync(Bdev vbdev)
    {
        try
        {
            await Bdevs.UnregisterAsync(vbdev).ConfigureAwait(true);
        }
        catch (BdevNotFoundException)
        {
            // Already gone (a delete and a hot-remove raced).
        }
        catch (Exception e)
        {
            Logger.LogError(e, "vbdev {Name}: unregister failed", vbdev.Name);
        }
    }

    // The vbdev is gone (deleted, hot-removed, or at shutdown): give the base back.
    private void OnUnregistered(Bdev bdev)
    {
        BdevDesc? desc;
        lock (_entries)
        {
            if (!_built.Remove(bdev, out desc))
            {
                return; // not one of ours
            }

            foreach (var e in _entries)
            {
                if (e.Vbdev == bdev)
                {
                    e.Vbdev = null;
                    e.BaseDesc = null;
                }
            }
        }

        if (desc.Bdev.ClaimModule == this)
        {
            Bdevs.ReleaseClaim(desc.Bdev, this);
        }

        desc.Dispose();
    }

    private sealed class BaseEventContext
    {
        private readonly VirtualBdevModule _module;
        private readonly Entry _entry;

        public BaseEventContext(VirtualBdevModule module, Entry entry)
        {
            _module = module;
            _entry = entry;
        }

        public void OnEvent(BdevEventType type)
        {
            if (type == BdevEventType.Remove)
            {
                _module.OnBaseRemoved(_entry);
            }
        }
    }
}

/// <summary>A base bdev could not be claimed (SPDK's -EPERM).</summary>
public sealed class BdevClaimException : InvalidOperationException
{
    public BdevClaimException(int errno, string message)
        : base(message) => Errno = errno;

    public int Errno { get; }
}
