using System.Text.Json.Nodes;
using Microsoft.Extensions.Logging;
using VhostBackend.Bdev;
using VhostBackend.Platform;
using VhostBackend.Reactors;
using VhostBackend.Rpc;

namespace VhostBackend.BdevRaid;

/// <summary>
/// The raid module (SPDK's module/bdev/raid, "raid"): raid0, raid1 and concat arrays over base bdevs, with SPDK
/// 24.01's states and rules. An array is created configuring and its bases are opened and claimed as they appear
/// (now, or on examine, in any order); when every expected base is there it comes online (its bdev is registered).
/// Losing a base: raid1 keeps serving, degraded, while one base is left; raid0 and concat go offline (the bdev is
/// unregistered; the remaining bases stay claimed until delete, as in SPDK). An I/O error on a raid1 base removes
/// that base (ours: SPDK 24.01 only fails the I/O). A base added to an empty slot of an online raid1 is rebuilt
/// (<see cref="RaidRebuild"/>). The on-disk superblock is not supported.
/// All control work is serialized by one lock; channels learn of membership changes by messages (<see cref="RaidChannel"/>).
/// </summary>
public sealed class RaidBdevModule : BdevModule
{
    /// <summary>SPDK's RAID_BDEV_SB_NAME_SIZE: a raid name must be shorter.</summary>
    private const int MaxNameLength = 64;

    private readonly object _lock = new();
    private readonly List<RaidArray> _arrays = new();
    private BdevManager _bdevs = null!;
    private Reactor _main = null!;
    private ILogger _logger = null!;

    public override string Name => "raid";

    /// <summary>bdev_raid_set_options' process_window_size_kb (SPDK's default 1024): the rebuild's copy window.</summary>
    public uint ProcessWindowSizeKb { get; set; } = 1024;

    public override void Init(BdevModuleContext context)
    {
        _bdevs = context.Bdevs;
        _main = context.Reactors.Main;
        _logger = context.LoggerFactory.CreateLogger("bdev_raid");
        _bdevs.Unregistered += OnUnregistered;
        RaidBdevRpc.Register(context.Rpc, this);
    }

    /// <summary>The arrays in creation order.</summary>
    public IReadOnlyList<RaidArray> Arrays
    {
        get
        {
            lock (_lock)
            {
                return _arrays.ToArray();
            }
        }
    }

    public RaidArray? Find(string name)
    {
        lock (_lock)
        {
            return _arrays.Find(a => a.Name == name);
        }
    }

    // ---- create ---------------------------------------------------------------------------------------------------

    /// <summary>
    /// bdev_raid_create: checks like SPDK's raid_bdev_create, then adds each base (a missing one is waited for). A base
    /// that cannot be added (claimed, other block size) fails the whole create and the array is deleted again.
    /// Throws <see cref="RaidException"/>.
    /// </summary>
    public async Task<RaidArray> CreateAsync(string name, RaidLevel? level, uint stripSizeKb, IReadOnlyList<string> baseNames, Guid? uuid)
    {
        if (name.Length >= MaxNameLength)
        {
            throw new RaidException(Errno.EINVAL, $"Raid bdev name '{name}' exceeds {MaxNameLength - 1} characters");
        }

        if (level is not { } lvl)
        {
            throw new RaidException(Errno.EINVAL, "Unsupported raid level");
        }

        if (lvl == RaidLevel.Raid1)
        {
            if (stripSizeKb != 0)
            {
                throw new RaidException(Errno.EINVAL, "Strip size is not supported by raid1");
            }
        }
        else if (stripSizeKb == 0 || (stripSizeKb & (stripSizeKb - 1)) != 0)
        {
            throw new RaidException(Errno.EINVAL, $"Invalid strip size {stripSizeKb}");
        }

        int min = lvl == RaidLevel.Raid1 ? 2 : 1;
        if (baseNames.Count < min)
        {
            throw new RaidException(Errno.EINVAL, $"At least {min} base devices required for {lvl.ToSpdk()}");
        }

        if (baseNames.Count > 255)
        {
            throw new RaidException(Errno.EINVAL, "At most 255 base devices");
        }

        RaidArray array;
        lock (_lock)
        {
            if (_arrays.Exists(a => a.Name == name))
            {
                throw new RaidException(Errno.EEXIST, $"Duplicate raid bdev name found: {name}");
            }

            // raid1 stays up while one base is left; raid0 and concat need all of them (SPDK's constraints).
            array = new RaidArray(this, name, lvl, stripSizeKb, uuid ?? Guid.Empty, baseNames.Count, lvl == RaidLevel.Raid1 ? 1 : baseNames.Count);
            for (int i = 0; i < baseNames.Count; i++)
            {
                array.Slots[i].Name = baseNames[i];
            }

            _arrays.Add(array);
        }

        for (int i = 0; i < baseNames.Count; i++)
        {
            try
            {
                lock (_lock)
                {
                    if (_bdevs.Find(baseNames[i]) is { } b && array.Slots[i].Attachment is null)
                    {
                        ConfigureBase(array, i, b);
                    }
                }
            }
            catch (RaidException)
            {
                await DeleteAsync(array).ConfigureAwait(true);
                throw;
            }
        }

        return array;
    }

    /// <summary>Opens, claims and checks a base for slot <paramref name="slot"/>; may bring the array online or start a rebuild. Under the lock.</summary>
    private void ConfigureBase(RaidArray array, int slot, Bdev.Bdev bdev)
    {
        var s = array.Slots[slot];
        var ev = new BaseEvent(this, array, slot);
        BdevDesc desc;
        try
        {
            desc = _bdevs.Open(bdev.Name, write: false, static (type, _, ctx) => ((BaseEvent)ctx!).On(type), ev);
        }
        catch (BdevNotFoundException)
        {
            throw new RaidException(Errno.ENODEV, $"bdev {bdev.Name} not found");
        }

        int rc = _bdevs.Claim(bdev, this, desc);
        if (rc != 0)
        {
            desc.Dispose();
            throw new RaidException(-rc, "Unable to claim this bdev as it is already claimed");
        }

        void Fail(string message)
        {
            _bdevs.ReleaseClaim(bdev, this);
            desc.Dispose();
            throw new RaidException(Errno.EINVAL, message);
        }

        if (s.DataSize != 0 && s.DataOffset + s.DataSize > bdev.BlockCount)
        {
            Fail($"Data offset and size exceeds base bdev capacity {bdev.BlockCount} on bdev '{bdev.Name}'");
        }

        if (array.Discovered > 0 && array.BlockSize != bdev.BlockSize)
        {
            Fail($"Raid bdev '{array.Name}' blocklen {array.BlockSize} differs from base bdev '{bdev.Name}' blocklen {bdev.BlockSize}");
        }

        if (array.Discovered == 0)
        {
            array.BlockSize = bdev.BlockSize;
        }

        var att = new BaseAttachment(desc, slot, x => Finalize(array, x));
        ev.Attachment = att;
        s.Name = bdev.Name;
        s.Uuid = bdev.Uuid;
        s.Attachment = att;
        s.IsConfigured = true;
        s.RemoveScheduled = false;
        s.Mode = SlotMode.Active;
        if (s.DataSize == 0)
        {
            s.DataSize = bdev.BlockCount - s.DataOffset;
        }

        s.Removed = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        array.Discovered++;
        _logger.LogInformation("raid {Name}: base bdev {Base} configured in slot {Slot}", array.Name, bdev.Name, slot);

        if (array.State == RaidState.Configuring && array.Discovered == array.Operational)
        {
            Configure(array);
        }
        else if (array.State == RaidState.Online && array.Discovered > array.Operational)
        {
            array.Operational++;
            StartRebuild(array, slot);
        }
    }

    /// <summary>SPDK's raid_bdev_configure: geometry from the bases, then the bdev is registered (online).</summary>
    private void Configure(RaidArray array)
    {
        array.StripBlocks = (ulong)array.StripSizeKb * 1024 / array.BlockSize;
        if (array.StripBlocks == 0 && array.Level != RaidLevel.Raid1)
        {
            _logger.LogError("raid {Name}: strip size cannot be smaller than the device block size", array.Name);
            throw new RaidException(Errno.EINVAL, "Strip size cannot be smaller than the device block size");
        }

        if (array.Level != RaidLevel.Raid1 && array.StripBlocks > uint.MaxValue)
        {
            throw new RaidException(Errno.EINVAL, $"Invalid strip size {array.StripSizeKb}");
        }

        int n = array.Slots.Length;
        var starts = new ulong[n];
        var lengths = new ulong[n];
        ulong count;
        ulong min = ulong.MaxValue;
        foreach (var s in array.Slots)
        {
            min = Math.Min(min, s.DataSize);
        }

        switch (array.Level)
        {
            case RaidLevel.Raid0:
                ulong per = min / array.StripBlocks * array.StripBlocks;
                foreach (var s in array.Slots)
                {
                    s.DataSize = per;
                }

                count = per * (ulong)n;
                break;
            case RaidLevel.Concat:
                count = 0;
                for (int i = 0; i < n; i++)
                {
                    var s = array.Slots[i];
                    s.DataSize = s.DataSize / array.StripBlocks * array.StripBlocks;
                    starts[i] = count;
                    lengths[i] = s.DataSize;
                    count += s.DataSize;
                }

                break;
            default:
                foreach (var s in array.Slots)
                {
                    s.DataSize = min;
                }

                count = min;
                break;
        }

        if (count == 0)
        {
            throw new RaidException(Errno.EINVAL, $"raid {array.Name}: the bases hold not even one strip");
        }

        if (array.Uuid == Guid.Empty)
        {
            array.Uuid = Guid.NewGuid(); // SPDK's spdk_bdev_register gives a null UUID a random one
        }

        array.PublishLayout();
        var bdev = new RaidBdev(array, array.BlockSize, count, array.Uuid, starts, lengths);
        array.Bdev = bdev;
        array.State = RaidState.Online;
        array.Unregistered = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        try
        {
            _bdevs.Register(bdev);
        }
        catch (BdevExistsException e)
        {
            array.Bdev = null;
            array.State = RaidState.Configuring;
            throw new RaidException(Errno.EEXIST, e.Message);
        }

        _logger.LogInformation("raid {Name} ({Level}) online: {Blocks} blocks", array.Name, array.Level.ToSpdk(), count);
    }

    public override void Examine(Bdev.Bdev bdev)
    {
        if (bdev is RaidBdev)
        {
            return;
        }

        lock (_lock)
        {
            foreach (var a in _arrays)
            {
                if (a.DestroyStarted || a.State != RaidState.Configuring)
                {
                    continue;
                }

                for (int i = 0; i < a.Slots.Length; i++)
                {
                    var s = a.Slots[i];
                    if (s.Attachment is null && !s.IsConfigured && s.Name == bdev.Name)
                    {
                        try
                        {
                            ConfigureBase(a, i, bdev);
                        }
                        catch (Exception e)
                        {
                            _logger.LogError(e, "raid {Name}: could not add base bdev {Base}", a.Name, bdev.Name);
                        }

                        return;
                    }
                }
            }
        }
    }

    // ---- removal --------------------------------------------------------------------------------------------------

    /// <summary>bdev_raid_remove_base_bdev: the base leaves its array; -ENODEV if it is in none (or already leaving).</summary>
    public Task RemoveBaseAsync(string baseName)
    {
        lock (_lock)
        {
            foreach (var a in _arrays)
            {
                for (int i = 0; i < a.Slots.Length; i++)
                {
                    var s = a.Slots[i];
                    if (s.Attachment is { } att && att.Desc.Bdev.Name == baseName)
                    {
                        return RemoveSlot(a, i) ?? throw new RaidException(Errno.ENODEV, $"base bdev {baseName} is already being removed");
                    }
                }
            }
        }

        throw new RaidException(Errno.ENODEV, $"bdev to remove '{baseName}' not found");
    }

    /// <summary>SPDK's _raid_bdev_remove_base_bdev. Under the lock. Null if the slot is already leaving.</summary>
    private Task? RemoveSlot(RaidArray a, int slot)
    {
        var s = a.Slots[slot];
        if (s.RemoveScheduled || s.Attachment is not { } att)
        {
            return null;
        }

        s.RemoveScheduled = true;
        var removed = s.Removed!.Task;
        if (a.State != RaidState.Online)
        {
            // Not registered (configuring, or offline already): nothing uses the base, let it go now.
            att.Detach();
            return removed;
        }

        // A rebuild target counts as operational (SPDK) but holds no complete copy: without another active base the array is lost.
        bool anyActive = false;
        for (int i = 0; i < a.Slots.Length; i++)
        {
            var o = a.Slots[i];
            anyActive |= i != slot && o.Attachment is not null && !o.RemoveScheduled && o.Mode == SlotMode.Active;
        }

        bool last = a.Operational == a.MinOperational || !anyActive;
        a.Operational--;
        if (last)
        {
            _logger.LogWarning("raid {Name}: base bdev {Base} removed, not enough bases left: going offline", a.Name, att.Desc.Bdev.Name);
            return Deconfigure(a).ContinueWith(_ => removed, TaskScheduler.Default).Unwrap();
        }

        if (a.Process is { } p && p.Target == att)
        {
            p.Abort();
        }

        _logger.LogWarning("raid {Name}: base bdev {Base} removed from slot {Slot}: degraded", a.Name, att.Desc.Bdev.Name, slot);
        PublishAndApply(a, att.Detach);
        return removed;
    }

    /// <summary>Publishes the array's layout and visits every channel with it; then <paramref name="done"/>.</summary>
    private static void PublishAndApply(RaidArray a, Action? done)
    {
        a.PublishLayout();
        if (a.Bdev is not { } bdev)
        {
            done?.Invoke();
            return;
        }

        bdev.Device.ForEachChannel(static ch => ((RaidChannel)ch.Context).ApplyLayout(), () => done?.Invoke());
    }

    /// <summary>SPDK's raid_bdev_deconfigure: offline, and the bdev is unregistered (openers get their Remove event). Under the lock.</summary>
    private Task Deconfigure(RaidArray a)
    {
        if (a.State != RaidState.Online || a.Bdev is not { } bdev)
        {
            return Task.CompletedTask;
        }

        a.State = RaidState.Offline;
        a.Process?.Abort();
        var unregistered = a.Unregistered!.Task;
        _ = UnregisterQuietlyAsync(bdev);
        return unregistered;
    }

    private async Task UnregisterQuietlyAsync(RaidBdev bdev)
    {
        try
        {
            await _bdevs.UnregisterAsync(bdev).ConfigureAwait(false);
        }
        catch (BdevNotFoundException)
        {
            // Already going.
        }
        catch (Exception e)
        {
            _logger.LogError(e, "raid {Name}: unregister failed", bdev.Name);
        }
    }

    // The raid bdev is gone: the bases scheduled for removal (all of them when deleting) are let go.
    private void OnUnregistered(Bdev.Bdev bdev)
    {
        if (bdev is not RaidBdev rb)
        {
            return;
        }

        var a = rb.Array;
        TaskCompletionSource? tcs;
        lock (_lock)
        {
            if (a.Bdev == rb)
            {
                a.Bdev = null;
            }

            a.State = RaidState.Offline;
            a.Process?.Abort();
            tcs = a.Unregistered;
            foreach (var s in a.Slots)
            {
                if (s.RemoveScheduled && s.Attachment is { } att)
                {
                    att.Detach();
                }
            }
        }

        tcs?.TrySetResult();
    }

    // A slot's base is let go for good: claim released, descriptor closed (so a hot-removed base's removal completes).
    private void Finalize(RaidArray a, BaseAttachment att)
    {
        var bdev = att.Desc.Bdev;
        if (bdev.ClaimModule == this)
        {
            _bdevs.ReleaseClaim(bdev, this);
        }

        att.Desc.Dispose();
        TaskCompletionSource? removed = null;
        lock (_lock)
        {
            var s = a.Slots[att.Slot];
            if (s.Attachment == att)
            {
                s.Attachment = null;
                s.IsConfigured = false;
                s.RemoveScheduled = false;
                s.Mode = SlotMode.Active;
                s.Name = null;
                s.Uuid = Guid.Empty;
                removed = s.Removed;
                s.Removed = null;
                a.Discovered--;
                if (a.State != RaidState.Online && a.Discovered == 0)
                {
                    _arrays.Remove(a); // SPDK's raid_bdev_cleanup_and_free: no base left and not online
                }
            }
        }

        _logger.LogInformation("raid: base bdev {Base} released", bdev.Name);
        removed?.TrySetResult();
    }

    /// <summary>A channel (or the rebuild) saw an I/O error on a raid1 base: the base leaves the array (on the main reactor).</summary>
    internal void ReportFailure(RaidArray a, BaseAttachment att, bool target)
    {
        _main.Send(
            static s =>
            {
                var (m, a, att) = ((RaidBdevModule, RaidArray, BaseAttachment))s!;
                lock (m._lock)
                {
                    var slot = a.Slots[att.Slot];
                    if (slot.Attachment == att && !slot.RemoveScheduled)
                    {
                        m._logger.LogError("raid {Name}: I/O error on base bdev {Base}: removing it from the array", a.Name, att.Desc.Bdev.Name);
                        _ = m.RemoveSlot(a, att.Slot);
                    }
                }
            },
            (this, a, att));
    }

    // ---- delete ---------------------------------------------------------------------------------------------------

    /// <summary>bdev_raid_delete: unregisters the bdev if online and releases every base. -ENODEV unknown, -EALREADY twice.</summary>
    public Task DeleteAsync(string name)
    {
        var a = Find(name) ?? throw new RaidException(Errno.ENODEV, $"raid bdev {name} not found");
        return DeleteAsync(a);
    }

    private async Task DeleteAsync(RaidArray a)
    {
        var waits = new List<Task>();
        lock (_lock)
        {
            if (a.DestroyStarted)
            {
                throw new RaidException(Errno.EALREADY, $"destroying raid bdev {a.Name} is already started");
            }

            a.DestroyStarted = true;
            bool online = a.State == RaidState.Online;
            foreach (var s in a.Slots)
            {
                if (s.Attachment is { } att && !s.RemoveScheduled)
                {
                    s.RemoveScheduled = true;
                    waits.Add(s.Removed!.Task);
                    if (!online)
                    {
                        att.Detach();
                    }
                }
                else if (s.Removed is { } r)
                {
                    waits.Add(r.Task);
                }
            }

            if (online)
            {
                waits.Add(Deconfigure(a));
            }

            if (a.Discovered == 0)
            {
                _arrays.Remove(a);
            }
        }

        await Task.WhenAll(waits).WaitAsync(TimeSpan.FromSeconds(60)).ConfigureAwait(true);
        lock (_lock)
        {
            _arrays.Remove(a);
        }
    }

    public override async Task FiniAsync()
    {
        foreach (var a in Arrays)
        {
            try
            {
                await _main.InvokeAsync(async () =>
                {
                    await DeleteAsync(a).ConfigureAwait(true);
                    return true;
                }).WaitAsync(TimeSpan.FromSeconds(15)).ConfigureAwait(false);
            }
            catch (Exception e)
            {
                _logger.LogWarning(e, "raid {Name}: not deleted at shutdown", a.Name);
            }
        }
    }

    // ---- add base / rebuild ---------------------------------------------------------------------------------------

    /// <summary>
    /// bdev_raid_add_base_bdev: the base goes into the first empty slot of an online array (-EINVAL if it is not
    /// online or has none) and, for raid1, is rebuilt. -EBUSY while another rebuild runs (SPDK 24.01 asserts there is none).
    /// </summary>
    public void AddBase(string raidName, string baseName)
    {
        var a = Find(raidName) ?? throw new RaidException(Errno.ENODEV, $"raid bdev {raidName} is not found in config");
        var bdev = _bdevs.Find(baseName) ?? throw new RaidException(Errno.ENODEV, $"Failed to open bdev {baseName}");
        lock (_lock)
        {
            if (a.State != RaidState.Online || a.DestroyStarted)
            {
                throw new RaidException(Errno.EINVAL, $"raid bdev '{a.Name}' must be in online state to attach base bdev");
            }

            int slot = Array.FindIndex(a.Slots, s => s.Attachment is null && s.Removed is null);
            if (slot < 0)
            {
                throw new RaidException(Errno.EINVAL, $"no empty slot found in raid bdev '{a.Name}' for new base bdev '{baseName}'");
            }

            if (a.Process is not null)
            {
                throw new RaidException(Errno.EBUSY, $"raid bdev '{a.Name}' is already rebuilding");
            }

            ConfigureBase(a, slot, bdev);
        }
    }

    /// <summary>Under the lock: the slot becomes a write-only target on every channel, then the copy starts.</summary>
    private void StartRebuild(RaidArray a, int slot)
    {
        var s = a.Slots[slot];
        s.Mode = SlotMode.Rebuilding;
        var rebuild = new RaidRebuild(this, a, a.Bdev!, s.Attachment!, _main, ProcessWindowSizeKb);
        a.Process = rebuild;
        _logger.LogInformation("raid {Name}: rebuilding base bdev {Base}", a.Name, s.Name);
        PublishAndApply(a, rebuild.Start);
    }

    internal BaseAttachment? PickRebuildSource(RaidArray a, BaseAttachment target, HashSet<BaseAttachment> bad)
    {
        lock (_lock)
        {
            foreach (var s in a.Slots)
            {
                if (s.Attachment is { } att && att != target && !s.RemoveScheduled && s.Mode == SlotMode.Active && !bad.Contains(att))
                {
                    return att;
                }
            }
        }

        return null;
    }

    internal void RebuildFailed(RaidArray a, RaidRebuild r, string why) =>
        _logger.LogError("raid {Name}: rebuild of {Base} failed: {Why}", a.Name, r.Target.Desc.Bdev.Name, why);

    internal void RebuildFinished(RaidArray a, RaidRebuild r, bool completed)
    {
        lock (_lock)
        {
            if (a.Process == r)
            {
                a.Process = null;
            }

            var s = a.Slots[r.Target.Slot];
            if (completed && s.Attachment == r.Target && !s.RemoveScheduled && a.State == RaidState.Online)
            {
                s.Mode = SlotMode.Active;
                _logger.LogInformation("raid {Name}: rebuild of {Base} done", a.Name, s.Name);
                PublishAndApply(a, null);
                return;
            }

            if (s.Attachment == r.Target && !s.RemoveScheduled && a.State == RaidState.Online)
            {
                _ = RemoveSlot(a, r.Target.Slot); // an aborted rebuild's target leaves the array
            }
        }
    }

    // ---- reporting ------------------------------------------------------------------------------------------------

    /// <summary>SPDK's raid_bdev_write_info_json (plus the name, as bdev_raid_get_bdevs writes it).</summary>
    public JsonObject Info(RaidArray a, bool withName = true)
    {
        lock (_lock)
        {
            var o = new JsonObject();
            if (withName)
            {
                o["name"] = a.Name;
            }

            o["uuid"] = a.Uuid.ToString();
            o["strip_size_kb"] = a.StripSizeKb;
            o["state"] = a.State.ToSpdk();
            o["raid_level"] = a.Level.ToSpdk();
            o["superblock"] = false;
            o["num_base_bdevs"] = a.Slots.Length;
            o["num_base_bdevs_discovered"] = a.Discovered;
            o["num_base_bdevs_operational"] = a.Operational;
            if (a.Process is { } p && a.Bdev is { } b)
            {
                ulong off = p.Offset;
                o["process"] = new JsonObject
                {
                    ["type"] = "rebuild",
                    ["target"] = p.Target.Desc.Bdev.Name,
                    ["progress"] = new JsonObject
                    {
                        ["blocks"] = off,
                        ["percent"] = (uint)(off * 100.0 / b.BlockCount),
                    },
                };
            }

            var list = new JsonArray();
            foreach (var s in a.Slots)
            {
                list.Add(new JsonObject
                {
                    ["name"] = s.Name,
                    ["uuid"] = s.Uuid.ToString(),
                    ["is_configured"] = s.IsConfigured,
                    ["data_offset"] = s.DataOffset,
                    ["data_size"] = s.DataSize,
                });
            }

            o["base_bdevs_list"] = list;
            return o;
        }
    }

    /// <summary>SPDK's raid_bdev_write_config_json: the bases present now (an empty slot is not written).</summary>
    internal JsonObject ConfigCall(RaidArray a)
    {
        lock (_lock)
        {
            var bases = new JsonArray();
            foreach (var s in a.Slots)
            {
                if (s.Attachment is { } att)
                {
                    bases.Add(att.Desc.Bdev.Name);
                }
            }

            return Subsystem.Call("bdev_raid_create", new JsonObject
            {
                ["name"] = a.Name,
                ["uuid"] = a.Uuid.ToString(),
                ["strip_size_kb"] = a.StripSizeKb,
                ["raid_level"] = a.Level.ToSpdk(),
                ["superblock"] = false,
                ["base_bdevs"] = bases,
            });
        }
    }

    /// <summary>SPDK's module config_json: bdev_raid_set_options.</summary>
    public override void WriteConfig(JsonArray calls) =>
        calls.Add(Subsystem.Call("bdev_raid_set_options", new JsonObject { ["process_window_size_kb"] = ProcessWindowSizeKb }));

    /// <summary>The Remove event of one slot's base descriptor: hot-remove takes the base out of the array (SPDK's raid_bdev_event_base_bdev).</summary>
    private sealed class BaseEvent
    {
        private readonly RaidBdevModule _module;
        private readonly RaidArray _array;
        private readonly int _slot;

        public BaseEvent(RaidBdevModule module, RaidArray array, int slot)
        {
            _module = module;
            _array = array;
            _slot = slot;
        }

        public BaseAttachment? Attachment { get; set; }

        public void On(BdevEventType type)
        {
            if (type != BdevEventType.Remove)
            {
                return;
            }

            lock (_module._lock)
            {
                var s = _array.Slots[_slot];
                if (Attachment is { } att && s.Attachment == att && !s.RemoveScheduled)
                {
                    _module._logger.LogWarning("raid {Name}: base bdev {Base} is being removed", _array.Name, s.Name);
                    _ = _module.RemoveSlot(_array, _slot);
                }
            }
        }
    }
}
