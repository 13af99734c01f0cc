using System.Text.Json.Nodes;
using Microsoft.Extensions.Logging;
using VhostBackend.Bdev;
using VhostBackend.Platform;
using VhostBackend.Rpc;

namespace VhostBackend.BdevSplit;

/// <summary>
/// The split module (SPDK's module/bdev/split, "split"): cuts one base bdev into <c>split_count</c> parts named
/// <c>&lt;base&gt;p0</c>, <c>&lt;base&gt;p1</c>, ... The base is opened and claimed once for all its parts. A config
/// whose base does not exist yet is remembered and built when the base is registered (examine). As in SPDK
/// (the part base's free callback deletes the config), a hot-removed base takes its parts and its config with it.
/// </summary>
public sealed class SplitBdevModule : BdevModule
{
    private const ulong Mb = 1024 * 1024;
    private readonly List<SplitConfig> _configs = new();
    private readonly Dictionary<SplitBdev, SplitConfig> _owners = new(); // registered part -> its config (under _configs' lock)
    private BdevManager _bdevs = null!;
    private ILogger _logger = null!;

    public override string Name => "split";

    /// <summary>One <c>bdev_split_create</c>: the base's name, the request, and while built the claimed base and its parts.</summary>
    internal sealed class SplitConfig
    {
        public SplitConfig(string baseName, uint splitCount, ulong splitSizeMb)
        {
            BaseName = baseName;
            SplitCount = splitCount;
            SplitSizeMb = splitSizeMb;
        }

        public string BaseName { get; }
        public uint SplitCount { get; }
        public ulong SplitSizeMb { get; }
        public SplitBase? Base { get; set; }
        public List<SplitBdev> Parts { get; } = new();
        public int LiveParts;
    }

    public override void Init(BdevModuleContext context)
    {
        _bdevs = context.Bdevs;
        _logger = context.LoggerFactory.CreateLogger("vbdev_split");
        _bdevs.Unregistered += OnUnregistered;
        SplitBdevRpc.Register(context.Rpc, this);
    }

    /// <summary>
    /// bdev_split_create: remembers the config and builds the parts if the base exists. Returns the parts' names
    /// (empty while the base is missing). Throws <see cref="SplitException"/> with SPDK's errno.
    /// </summary>
    public IReadOnlyList<string> Create(string baseName, uint splitCount, ulong splitSizeMb)
    {
        if (splitCount == 0)
        {
            throw new SplitException(Errno.EINVAL, "split_count can't be 0");
        }

        var cfg = new SplitConfig(baseName, splitCount, splitSizeMb);
        lock (_configs)
        {
            if (_configs.Exists(c => c.BaseName == baseName))
            {
                throw new SplitException(Errno.EEXIST, $"Split bdev config for base bdev '{baseName}' already exist.");
            }

            _configs.Add(cfg);
        }

        if (_bdevs.Find(baseName) is not { } baseBdev)
        {
            _logger.LogInformation("split: base bdev {Base} not found yet, waiting for it", baseName);
            return [];
        }

        try
        {
            Build(cfg, baseBdev);
        }
        catch
        {
            // Deviation from SPDK 24.01, which keeps a config whose build failed (a retry then gets -EEXIST).
            lock (_configs)
            {
                _configs.Remove(cfg);
            }

            throw;
        }

        return cfg.Parts.Select(p => p.Name).ToArray();
    }

    /// <summary>bdev_split_delete: unregisters the parts and forgets the config; -ENOENT when there is none.</summary>
    public async Task DeleteAsync(string baseName)
    {
        SplitConfig? cfg;
        lock (_configs)
        {
            cfg = _configs.Find(c => c.BaseName == baseName);
            if (cfg is null)
            {
                throw new SplitException(Errno.ENOENT, $"Split configuration for '{baseName}' not found");
            }

            _configs.Remove(cfg);
        }

        await UnregisterPartsAsync(cfg).ConfigureAwait(true);
    }

    /// <summary>The configs in creation order (for tests and save_config).</summary>
    internal IReadOnlyList<SplitConfig> Configs
    {
        get
        {
            lock (_configs)
            {
                return _configs.ToArray();
            }
        }
    }

    public override void Examine(Bdev.Bdev bdev)
    {
        foreach (var cfg in Configs)
        {
            if (cfg.Base is null && cfg.BaseName == bdev.Name)
            {
                try
                {
                    Build(cfg, bdev);
                }
                catch (Exception e)
                {
                    _logger.LogError(e, "could not split bdev {Name}", bdev.Name);
                }
            }
        }
    }

    /// <summary>One <c>bdev_split_create</c> per config, built or waiting for its base (SPDK's vbdev_split_config_json).</summary>
    public override void WriteConfig(JsonArray calls)
    {
        foreach (var cfg in Configs)
        {
            calls.Add(Subsystem.Call("bdev_split_create", new JsonObject
            {
                ["base_bdev"] = cfg.BaseName,
                ["split_count"] = cfg.SplitCount,
                ["split_size_mb"] = cfg.SplitSizeMb,
            }));
        }
    }

    private void Build(SplitConfig cfg, Bdev.Bdev baseBdev)
    {
        // Geometry first (SPDK checks it after constructing the part base; the result is the same).
        ulong splitBlocks;
        if (cfg.SplitSizeMb != 0)
        {
            if (cfg.SplitSizeMb > ulong.MaxValue / Mb || cfg.SplitSizeMb * Mb % baseBdev.BlockSize != 0)
            {
                throw new SplitException(Errno.EINVAL, $"Split size {cfg.SplitSizeMb} MB is not possible with block size {baseBdev.BlockSize}");
            }

            splitBlocks = cfg.SplitSizeMb * Mb / baseBdev.BlockSize;
        }
        else
        {
            splitBlocks = baseBdev.BlockCount / cfg.SplitCount;
        }

        // SPDK clamps split_count to what fits; when not even one part fits (or the even share is 0 blocks) it would
        // create nothing (or divide by zero): refused here.
        ulong max = splitBlocks == 0 ? 0 : baseBdev.BlockCount / splitBlocks;
        if (max == 0)
        {
            throw new SplitException(Errno.EINVAL, $"Split size of {splitBlocks} blocks does not fit in base bdev {baseBdev.Name} ({baseBdev.BlockCount} blocks)");
        }

        ulong count = Math.Min(cfg.SplitCount, max);
        if (count < cfg.SplitCount)
        {
            _logger.LogWarning("Split count {Count} is greater than maximum possible split count {Max} - clamping", cfg.SplitCount, max);
        }

        var desc = _bdevs.Open(baseBdev.Name, write: false, static (type, _, ctx) => ((BaseEvent)ctx!).On(type), new BaseEvent(this, cfg));
        int rc = _bdevs.Claim(baseBdev, this, desc);
        if (rc != 0)
        {
            desc.Dispose();
            throw new SplitException(-rc, baseBdev.ClaimedBy is { } owner
                ? $"bdev {baseBdev.Name} already claimed by module {owner}"
                : $"bdev {baseBdev.Name} already opened with write access");
        }

        var sb = new SplitBase(desc);
        lock (_configs)
        {
            cfg.Base = sb;
        }

        try
        {
            for (ulong i = 0; i < count; i++)
            {
                var part = new SplitBdev($"{cfg.BaseName}p{i}", sb, i * splitBlocks, splitBlocks);
                lock (_configs)
                {
                    cfg.Parts.Add(part);
                    cfg.LiveParts++;
                    _owners[part] = cfg;
                }

                try
                {
                    _bdevs.Register(part);
                }
                catch
                {
                    lock (_configs)
                    {
                        cfg.Parts.Remove(part);
                        cfg.LiveParts--;
                        _owners.Remove(part);
                    }

                    throw;
                }
            }
        }
        catch (BdevExistsException e)
        {
            _ = UnregisterPartsAsync(cfg);
            throw new SplitException(Errno.EEXIST, e.Message);
        }

        if (cfg.Parts.Count == 0)
        {
            ReleaseBase(cfg);
        }

        _logger.LogInformation("split: {Base} split into {Count} parts of {Blocks} blocks", baseBdev.Name, count, splitBlocks);
    }

    private async Task UnregisterPartsAsync(SplitConfig cfg)
    {
        SplitBdev[] parts;
        lock (_configs)
        {
            parts = cfg.Parts.ToArray();
        }

        if (parts.Length == 0)
        {
            ReleaseBase(cfg);
            return;
        }

        var tasks = new List<Task>();
        foreach (var p in parts)
        {
            tasks.Add(UnregisterQuietlyAsync(p));
        }

        await Task.WhenAll(tasks).ConfigureAwait(true);
    }

    private async Task UnregisterQuietlyAsync(SplitBdev part)
    {
        try
        {
            await _bdevs.UnregisterAsync(part).ConfigureAwait(true);
        }
        catch (BdevNotFoundException)
        {
            // Already going (a delete and a hot-remove raced).
        }
        catch (Exception e)
        {
            _logger.LogError(e, "split: unregister of {Name} failed", part.Name);
        }
    }

    // The base is going away: every part goes, and (as in SPDK, whose part base free deletes the config) the config too.
    private void OnBaseRemoved(SplitConfig cfg)
    {
        lock (_configs)
        {
            _configs.Remove(cfg);
        }

        _logger.LogInformation("split: base bdev {Base} is going away: removing its parts", cfg.BaseName);
        _ = UnregisterPartsAsync(cfg);
    }

    // A part is gone: when it was the last, give the base back (claim, descriptor) so its removal can complete.
    private void OnUnregistered(Bdev.Bdev bdev)
    {
        if (bdev is not SplitBdev part)
        {
            return;
        }

        SplitConfig? cfg;
        lock (_configs)
        {
            // Configs already forgotten (deleted, hot-removed) still own their parts until these are gone.
            if (!_owners.Remove(part, out cfg))
            {
                return;
            }

            cfg.Parts.Remove(part);
            if (--cfg.LiveParts > 0)
            {
                return;
            }
        }

        ReleaseBase(cfg);
    }

    private void ReleaseBase(SplitConfig cfg)
    {
        SplitBase? sb;
        lock (_configs)
        {
            sb = cfg.Base;
            cfg.Base = null;
        }

        if (sb is null)
        {
            return;
        }

        if (sb.Desc.Bdev.ClaimModule == this)
        {
            _bdevs.ReleaseClaim(sb.Desc.Bdev, this);
        }

        sb.Desc.Dispose();
    }

    private sealed class BaseEvent
    {
        private readonly SplitBdevModule _module;
        private readonly SplitConfig _cfg;

        public BaseEvent(SplitBdevModule module, SplitConfig cfg)
        {
            _module = module;
            _cfg = cfg;
        }

        public void On(BdevEventType type)
        {
            if (type == BdevEventType.Remove)
            {
                _module.OnBaseRemoved(_cfg);
            }
        }
    }
}

/// <summary>A split operation failed with an errno (SPDK's <c>create_vbdev_split</c>/<c>vbdev_split_destruct</c> return codes).</summary>
public sealed class SplitException : Exception
{
    public SplitException(int errno, string message)
        : base(message) => Errno = Math.Abs(errno);

    public int Errno { get; }
}
