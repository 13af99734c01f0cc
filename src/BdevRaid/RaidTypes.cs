using VhostBackend.Bdev;

namespace VhostBackend.BdevRaid;

/// <summary>The RAID levels this module implements (SPDK's <c>enum raid_level</c> minus raid5f).</summary>
public enum RaidLevel
{
    Raid0,
    Raid1,
    Concat,
}

/// <summary>SPDK's raid bdev states (<c>g_raid_state_names</c>).</summary>
public enum RaidState
{
    /// <summary>Registered with the bdev layer and serving I/O (possibly degraded).</summary>
    Online,

    /// <summary>Waiting for base bdevs (created before them, or some are still missing).</summary>
    Configuring,

    /// <summary>Unregistered after losing more bases than its level tolerates (or being deleted); only delete is left.</summary>
    Offline,
}

/// <summary>What a channel does with a slot's base: nothing, everything (operational), or writes only (the rebuild target).</summary>
internal enum SlotMode : byte
{
    Empty,
    Active,
    Rebuilding,
}

/// <summary>Names and parsing of levels and states, as SPDK spells them.</summary>
public static class RaidNames
{
    /// <summary>SPDK's raid_bdev_str_to_level (case-insensitive): raid0|0, raid1|1, concat; raid5f|5f parse but are not implemented.</summary>
    public static bool TryParseLevel(string s, out RaidLevel level, out bool known)
    {
        known = true;
        switch (s.ToLowerInvariant())
        {
            case "raid0":
            case "0":
                level = RaidLevel.Raid0;
                return true;
            case "raid1":
            case "1":
                level = RaidLevel.Raid1;
                return true;
            case "concat":
                level = RaidLevel.Concat;
                return true;
            case "raid5f":
            case "5f":
                level = default;
                return false; // a level SPDK knows, whose module we do not have: -EINVAL at create
            default:
                known = false;
                level = default;
                return false;
        }
    }

    public static string ToSpdk(this RaidLevel level) => level switch
    {
        RaidLevel.Raid0 => "raid0",
        RaidLevel.Raid1 => "raid1",
        _ => "concat",
    };

    public static string ToSpdk(this RaidState state) => state switch
    {
        RaidState.Online => "online",
        RaidState.Configuring => "configuring",
        _ => "offline",
    };

    /// <summary>SPDK's raid_bdev_str_to_state for bdev_raid_get_bdevs' category; "all" gives null.</summary>
    public static bool TryParseCategory(string s, out RaidState? state)
    {
        state = s switch
        {
            "online" => RaidState.Online,
            "configuring" => RaidState.Configuring,
            "offline" => RaidState.Offline,
            _ => null,
        };
        return state is not null || s == "all";
    }
}

/// <summary>A raid operation failed with an errno (SPDK's return codes of raid_bdev_create, _add_base_device, ...).</summary>
public sealed class RaidException : Exception
{
    public RaidException(int errno, string message)
        : base(message) => Errno = Math.Abs(errno);

    public int Errno { get; }
}

/// <summary>
/// One opened and claimed base bdev in one slot. Channels take a reference while they hold a channel to it; the
/// control path closes the descriptor and releases the claim only when it is detaching and no channel holds it, so
/// no channel ever submits to a closed descriptor.
/// </summary>
internal sealed class BaseAttachment
{
    private readonly Action<BaseAttachment> _finalize;
    private int _refs;
    private int _detaching;
    private int _finalized;

    public BaseAttachment(BdevDesc desc, int slot, Action<BaseAttachment> finalize)
    {
        Desc = desc;
        Slot = slot;
        _finalize = finalize;
    }

    public BdevDesc Desc { get; }
    public int Slot { get; }

    public void AddRef() => Interlocked.Increment(ref _refs);

    /// <summary>A channel let go of its base channel.</summary>
    public void Release()
    {
        if (Interlocked.Decrement(ref _refs) == 0 && Volatile.Read(ref _detaching) != 0)
        {
            Finish();
        }
    }

    /// <summary>No channel will take a new reference (they were all told): finalize once the last one lets go.</summary>
    public void Detach()
    {
        Volatile.Write(ref _detaching, 1);
        if (Volatile.Read(ref _refs) == 0)
        {
            Finish();
        }
    }

    private void Finish()
    {
        if (Interlocked.Exchange(ref _finalized, 1) == 0)
        {
            _finalize(this);
        }
    }
}

/// <summary>What every channel must agree on: for each slot, its attachment and how it is used. Immutable; replaced on membership changes.</summary>
internal sealed class RaidLayout
{
    public RaidLayout(BaseAttachment?[] slots, SlotMode[] modes, int version)
    {
        Slots = slots;
        Modes = modes;
        Version = version;
    }

    public BaseAttachment?[] Slots { get; }
    public SlotMode[] Modes { get; }
    public int Version { get; }
}

/// <summary>Calls an action once every party signalled (starts with one party: the initiator, who signals last).</summary>
internal sealed class Countdown
{
    private readonly Action _onZero;
    private int _count = 1;

    public Countdown(Action onZero) => _onZero = onZero;

    public void Add() => Interlocked.Increment(ref _count);

    public void Signal()
    {
        if (Interlocked.Decrement(ref _count) == 0)
        {
            _onZero();
        }
    }
}
