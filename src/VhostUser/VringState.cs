using VhostBackend.Platform;
using VhostBackend.Virtio;

namespace VhostBackend.VhostUser;

/// <summary>Why a vring message was refused (a REPLY_ACK failure; the connection stays up).</summary>
public enum VringError
{
    None = 0,

    /// <summary>SET_VRING_NUM: not a power of two in 1..32768.</summary>
    BadSize,

    /// <summary>SET_VRING_BASE: not a 16-bit index (split ring), or an index beyond the ring (packed ring).</summary>
    BadBase,

    /// <summary>SET_VRING_ENABLE: neither 0 nor 1.</summary>
    BadEnable,

    /// <summary>SET_VRING_ADDR: unknown flags or misaligned ring parts.</summary>
    BadAddress,

    /// <summary>A change that is only allowed while the ring is stopped.</summary>
    Running,
}

/// <summary>
/// One vring as the front end configured it, and whether it runs. Protocol-thread state, with this life cycle:
/// configured (SET_VRING_NUM/ADDR/BASE, CALL/ERR) → complete (a size, addresses, a kick received, enabled, and
/// guest memory present) → started (the device runs it; <see cref="Runner"/> set) → stopped (GET_VRING_BASE or a
/// change that needs the ring stopped; the base is taken back from the runner) and, after GET_VRING_BASE, a new
/// SET_VRING_KICK is needed before it is complete again. The session starts and stops runners; this type
/// only records state and says when the queue can be handed to the device.
/// </summary>
public sealed class VringState
{
    public VringState(int index) => Index = index;

    public int Index { get; }

    public uint Num { get; private set; }

    public VhostUserVringAddr? Address { get; private set; }

    /// <summary>
    /// The next avail index to process (SET_VRING_BASE, or where a stopped runner left off); for a packed ring the
    /// 32-bit value of vhost-user.rst (avail index and wrap counter, used index and wrap counter).
    /// </summary>
    public uint Base { get; private set; }

    public EventFd? Call { get; private set; }

    public EventFd? Kick { get; private set; }

    public bool KickReceived { get; private set; }

    /// <summary>Rings start enabled unless VHOST_USER_F_PROTOCOL_FEATURES is negotiated (then SET_VRING_ENABLE decides).</summary>
    public bool Enabled { get; private set; } = true;

    public int ErrFd { get; private set; } = -1;

    /// <summary>The running queue, or null when stopped.</summary>
    public IVhostQueueRunner? Runner { get; private set; }

    public bool Started => Runner is not null;

    /// <summary>Whether the ring can be handed to the device, given whether guest memory is mapped.</summary>
    public bool IsComplete(bool hasMemory) => !Started && Num != 0 && Address is not null && KickReceived && Enabled && hasMemory;

    public VringError SetNum(uint num)
    {
        if (!SplitVirtqueue.IsValidSize(num))
        {
            return VringError.BadSize;
        }

        if (Started)
        {
            return VringError.Running;
        }

        Num = num;
        return VringError.None;
    }

    public VringError SetBase(uint value, bool packed = false)
    {
        if (Started)
        {
            return VringError.Running;
        }

        // Packed: bits 0-14 and 16-30 are ring positions (checked against the size when the ring starts).
        if (!packed && value > ushort.MaxValue)
        {
            return VringError.BadBase;
        }

        Base = value;
        return VringError.None;
    }

    /// <summary>Records ring addresses. The caller stops a running ring first (and restarts it after).</summary>
    public VringError SetAddress(in VhostUserVringAddr address)
    {
        if (Started)
        {
            return VringError.Running;
        }

        if ((address.Flags & ~VhostUserVringAddr.FlagLog) != 0 || (address.DescUserAddr & 15) != 0 || (address.AvailUserAddr & 1) != 0 || (address.UsedUserAddr & 3) != 0)
        {
            return VringError.BadAddress;
        }

        Address = address;
        return VringError.None;
    }

    /// <summary>Takes a kick eventfd (null: the front end wants us to poll). The caller stops a running ring first.</summary>
    public VringError SetKick(EventFd? kick)
    {
        if (Started)
        {
            kick?.Dispose();
            return VringError.Running;
        }

        Kick?.Dispose();
        Kick = kick;
        KickReceived = true;
        return VringError.None;
    }

    /// <summary>Takes a call eventfd (null: no interrupts). Returns the old one, for the caller to dispose once the runner switched.</summary>
    public EventFd? SetCall(EventFd? call)
    {
        var old = Call;
        Call = call;
        return old;
    }

    public void SetErr(int fd)
    {
        Fd.Close(ErrFd);
        ErrFd = fd;
    }

    public VringError SetEnable(uint value)
    {
        if (value > 1)
        {
            return VringError.BadEnable;
        }

        Enabled = value == 1;
        return VringError.None;
    }

    /// <summary>SET_FEATURES before any ring started: rings wait for SET_VRING_ENABLE when protocol features are on.</summary>
    public void SetInitialEnable(bool enabled)
    {
        if (!Started)
        {
            Enabled = enabled;
        }
    }

    /// <summary>The device took the ring.</summary>
    public void MarkStarted(IVhostQueueRunner runner) => Runner = runner;

    /// <summary>The device gave the ring back at <paramref name="vringBase"/> (what GET_VRING_BASE returns).</summary>
    public void MarkStopped(uint vringBase)
    {
        Runner = null;
        Base = vringBase;
    }

    /// <summary>GET_VRING_BASE on a stopped ring: the kick fd is dropped, a new SET_VRING_KICK is needed to start again.</summary>
    public void Suspend()
    {
        KickReceived = false;
        Kick?.Dispose();
        Kick = null;
    }

    /// <summary>Back to the initial state (RESET_DEVICE, session end). The ring must be stopped.</summary>
    public void Reset()
    {
        Num = 0;
        Address = null;
        Base = 0;
        Call?.Dispose();
        Call = null;
        Suspend();
        Enabled = true;
        SetErr(-1);
    }
}
