namespace VhostBackend.BdevRaid;

/// <summary>One slot of an array (SPDK's <c>raid_base_bdev_info</c>): the configured base's name, and while present its attachment.</summary>
internal sealed class BaseSlot
{
    public string? Name;
    public Guid Uuid;
    public BaseAttachment? Attachment;
    public bool IsConfigured;
    public ulong DataOffset = 0; // no superblock: data starts at block 0 (SPDK sets it only with one)
    public ulong DataSize;

    /// <summary>Leaving the array (removed, failed, hot-removed, or the array is being deleted); the attachment is finalized later.</summary>
    public bool RemoveScheduled;

    /// <summary>Active, or Rebuilding while it is a rebuild's target.</summary>
    public SlotMode Mode = SlotMode.Active;

    /// <summary>Completed when the slot's attachment is finalized (descriptor closed, claim released).</summary>
    public TaskCompletionSource? Removed;
}

/// <summary>
/// A raid bdev's configuration and state (SPDK's <c>struct raid_bdev</c>): exists from bdev_raid_create until
/// bdev_raid_delete (or until its last base is gone while it is not online), whether or not its bdev is registered.
/// Changed only on the control path under the module's lock; channels read <see cref="Layout"/> only.
/// </summary>
public sealed class RaidArray
{
    private volatile RaidLayout _layout;
    private volatile WindowBox _window = WindowBox.None;

    internal RaidArray(RaidBdevModule module, string name, RaidLevel level, uint stripSizeKb, Guid uuid, int slots, int minOperational)
    {
        Module = module;
        Name = name;
        Level = level;
        StripSizeKb = stripSizeKb;
        Uuid = uuid;
        Slots = new BaseSlot[slots];
        for (int i = 0; i < slots; i++)
        {
            Slots[i] = new BaseSlot();
        }

        Operational = slots;
        MinOperational = minOperational;
        _layout = new RaidLayout(new BaseAttachment?[slots], new SlotMode[slots], 0);
    }

    internal RaidBdevModule Module { get; }
    public string Name { get; }
    public RaidLevel Level { get; }
    public uint StripSizeKb { get; }

    /// <summary>The bdev's UUID: given at create, else zero until the bdev is registered (then a random one, as SPDK's register does).</summary>
    public Guid Uuid { get; internal set; }

    internal BaseSlot[] Slots { get; }
    public RaidState State { get; internal set; } = RaidState.Configuring;
    public int Discovered { get; internal set; }
    public int Operational { get; internal set; }
    internal int MinOperational { get; }
    public RaidBdev? Bdev { get; internal set; }
    internal RaidRebuild? Process { get; set; }
    internal bool DestroyStarted { get; set; }
    internal uint BlockSize { get; set; }
    internal ulong StripBlocks { get; set; }
    internal TaskCompletionSource? Unregistered { get; set; }

    internal RaidLayout Layout => _layout;

    internal int LayoutVersion => _layout.Version;

    /// <summary>The rebuild window locked right now ([0, 0) = none), for channels created during a window.</summary>
    internal (ulong Start, ulong End) CurrentWindow
    {
        get
        {
            var w = _window;
            return (w.Start, w.End);
        }

        set => _window = value.End == 0 ? WindowBox.None : new WindowBox(value.Start, value.End);
    }

    /// <summary>Publishes the slots' current attachments and modes (slots being removed are left out).</summary>
    internal RaidLayout PublishLayout()
    {
        var atts = new BaseAttachment?[Slots.Length];
        var modes = new SlotMode[Slots.Length];
        for (int i = 0; i < Slots.Length; i++)
        {
            var s = Slots[i];
            if (s.Attachment is { } a && !s.RemoveScheduled)
            {
                atts[i] = a;
                modes[i] = s.Mode;
            }
        }

        var layout = new RaidLayout(atts, modes, _layout.Version + 1);
        _layout = layout;
        return layout;
    }

    public override string ToString() => Name;

    private sealed class WindowBox
    {
        public static readonly WindowBox None = new(0, 0);

        public WindowBox(ulong start, ulong end)
        {
            Start = start;
            End = end;
        }

        public ulong Start { get; }
        public ulong End { get; }
    }
}
