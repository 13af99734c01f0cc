using System.Runtime.InteropServices;

namespace VhostBackend.VhostUser;

/// <summary>Front-end requests (docs/interop/vhost-user.rst, "Front-end message types").</summary>
public enum VhostUserRequest : uint
{
    None = 0,
    GetFeatures = 1,
    SetFeatures = 2,
    SetOwner = 3,
    ResetOwner = 4,
    SetMemTable = 5,
    SetLogBase = 6,
    SetLogFd = 7,
    SetVringNum = 8,
    SetVringAddr = 9,
    SetVringBase = 10,
    GetVringBase = 11,
    SetVringKick = 12,
    SetVringCall = 13,
    SetVringErr = 14,
    GetProtocolFeatures = 15,
    SetProtocolFeatures = 16,
    GetQueueNum = 17,
    SetVringEnable = 18,
    SendRarp = 19,
    NetSetMtu = 20,
    SetBackendReqFd = 21,
    IotlbMsg = 22,
    SetVringEndian = 23,
    GetConfig = 24,
    SetConfig = 25,
    CreateCryptoSession = 26,
    CloseCryptoSession = 27,
    PostcopyAdvise = 28,
    PostcopyListen = 29,
    PostcopyEnd = 30,
    GetInflightFd = 31,
    SetInflightFd = 32,
    GpuSetSocket = 33,
    ResetDevice = 34,
    VringKick = 35,
    GetMaxMemSlots = 36,
    AddMemReg = 37,
    RemMemReg = 38,
    SetStatus = 39,
    GetStatus = 40,
}

/// <summary>Back-end requests sent over the backend (formerly "slave") channel.</summary>
public enum VhostUserBackendRequest : uint
{
    IotlbMsg = 1,
    ConfigChangeMsg = 2,
    VringHostNotifierMsg = 3,
}

/// <summary>Protocol feature bits (GET/SET_PROTOCOL_FEATURES).</summary>
public static class VhostUserProtocolFeature
{
    public const int Mq = 0;
    public const int LogShmfd = 1;
    public const int Rarp = 2;
    public const int ReplyAck = 3;
    public const int NetMtu = 4;
    public const int BackendReq = 5;
    public const int CrossEndian = 6;
    public const int CryptoSession = 7;
    public const int Pagefault = 8;
    public const int Config = 9;
    public const int BackendSendFd = 10;
    public const int HostNotifier = 11;
    public const int InflightShmfd = 12;
    public const int ResetDevice = 13;
    public const int InbandNotifications = 14;
    public const int ConfigureMemSlots = 15;
    public const int Status = 16;
}

public static class VhostUserConstants
{
    /// <summary>Virtio feature bit 30: the front end may use GET/SET_PROTOCOL_FEATURES.</summary>
    public const int ProtocolFeaturesBit = 30;

    /// <summary>VHOST_F_LOG_ALL (feature bit 26): the back end logs its writes into guest memory in the dirty log (live migration).</summary>
    public const int LogAllBit = 26;

    public const uint VersionMask = 0x3;
    public const uint Version = 0x1;
    public const uint FlagReply = 0x4;
    public const uint FlagNeedReply = 0x8;

    /// <summary>Regions in one SET_MEM_TABLE (VHOST_MEMORY_BASELINE_NREGIONS).</summary>
    public const int MaxMemTableRegions = 8;

    /// <summary>Regions we accept through ADD_MEM_REG (answer to GET_MAX_MEM_SLOTS).</summary>
    public const int MaxMemSlots = 32;

    public const int ConfigSpaceMax = 256;

    /// <summary>Largest payload we read; anything bigger is a protocol error.</summary>
    public const int MaxPayload = 4096;

    /// <summary>Most fds one message carries (SET_MEM_TABLE with <see cref="MaxMemTableRegions"/> regions).</summary>
    public const int MaxFds = MaxMemTableRegions;

    public const int HeaderSize = 12;

    /// <summary>u64 payload of SET_VRING_KICK/CALL/ERR: bits 0-7 queue index, bit 8 "no fd".</summary>
    public const ulong VringIndexMask = 0xFF;
    public const ulong VringNoFdMask = 0x100;
}

/// <summary>Message header: request, flags (version 1, reply, need-reply), payload size. 12 bytes.</summary>
[StructLayout(LayoutKind.Sequential, Pack = 4, Size = 12)]
public struct VhostUserHeader
{
    /// <summary>Flag bits a message may carry: version, reply, need-reply.</summary>
    public const uint KnownFlags = VhostUserConstants.VersionMask | VhostUserConstants.FlagReply | VhostUserConstants.FlagNeedReply;

    public uint Request;
    public uint Flags;
    public uint Size;

    public readonly bool IsReply => (Flags & VhostUserConstants.FlagReply) != 0;

    public readonly bool NeedReply => (Flags & VhostUserConstants.FlagNeedReply) != 0;

    /// <summary>Version 1, no unknown flag bits, the reply bit as <paramref name="reply"/> says, and a payload we can read.</summary>
    public readonly bool IsValid(bool reply) =>
        (Flags & VhostUserConstants.VersionMask) == VhostUserConstants.Version && (Flags & ~KnownFlags) == 0 && IsReply == reply
        && Size <= VhostUserConstants.MaxPayload;
}

/// <summary>struct vhost_user_memory_region (32 bytes).</summary>
[StructLayout(LayoutKind.Sequential, Size = 32)]
public struct VhostUserMemoryRegion
{
    public ulong GuestPhysAddr;
    public ulong MemorySize;
    public ulong UserspaceAddr;
    public ulong MmapOffset;

    /// <summary>Non-empty, and no range (guest physical, user, file offset + size) wraps or exceeds a signed 64-bit length.</summary>
    public readonly bool IsValid =>
        MemorySize != 0 && MemorySize <= ulong.MaxValue - MmapOffset && GuestPhysAddr <= ulong.MaxValue - MemorySize
        && UserspaceAddr <= ulong.MaxValue - MemorySize && MemorySize + MmapOffset <= long.MaxValue;
}

/// <summary>SET_MEM_TABLE payload header: region count and padding (8 bytes), followed by the regions.</summary>
[StructLayout(LayoutKind.Sequential, Size = 8)]
public struct VhostUserMemoryHeader
{
    public uint NRegions;
    public uint Padding;

    /// <summary>1..8 regions, padding zero, and the payload holds exactly that many regions.</summary>
    public readonly bool IsValid(int payloadSize) =>
        NRegions is >= 1 and <= VhostUserConstants.MaxMemTableRegions && Padding == 0 && payloadSize == PayloadSize(NRegions);

    public static int PayloadSize(uint regions) => 8 + (32 * (int)regions);
}

/// <summary>ADD_MEM_REG / REM_MEM_REG payload: padding and one region (40 bytes).</summary>
[StructLayout(LayoutKind.Sequential, Size = 40)]
public struct VhostUserSingleMemoryRegion
{
    public ulong Padding;
    public VhostUserMemoryRegion Region;

    public readonly bool IsValid => Region.IsValid;
}

/// <summary>struct vhost_vring_state (8 bytes).</summary>
[StructLayout(LayoutKind.Sequential, Size = 8)]
public struct VhostUserVringState
{
    public uint Index;
    public uint Num;

    /// <summary>The queue index is one of <paramref name="queues"/>.</summary>
    public readonly bool IsValid(int queues) => Index < (uint)queues;
}

/// <summary>VhostUserLog, the SET_LOG_BASE payload (16 bytes): the dirty log's size and offset in the fd sent with it.</summary>
[StructLayout(LayoutKind.Sequential, Size = 16)]
public struct VhostUserLog
{
    /// <summary>Largest log we map: 1 GiB of bitmap covers 32 TiB of guest-physical space.</summary>
    public const ulong MaxSize = 1UL << 30;

    public ulong MmapSize;
    public ulong MmapOffset;

    /// <summary>A non-empty log of at most <see cref="MaxSize"/> bytes whose end does not wrap.</summary>
    public readonly bool IsValid => MmapSize != 0 && MmapSize <= MaxSize && MmapOffset <= ulong.MaxValue - MmapSize;
}

/// <summary>struct vhost_vring_addr (40 bytes): addresses are in the front end's virtual address space.</summary>
[StructLayout(LayoutKind.Sequential, Size = 40)]
public struct VhostUserVringAddr
{
    public const uint FlagLog = 1;

    public uint Index;
    public uint Flags;
    public ulong DescUserAddr;
    public ulong UsedUserAddr;
    public ulong AvailUserAddr;
    public ulong LogGuestAddr;

    /// <summary>
    /// Index in range, no flag but LOG, and the ring parts aligned as virtio 1.1 2.6 requires (descriptor table
    /// 16, avail 2, used 4). Whether the addresses lie in guest memory is checked when the queue starts.
    /// </summary>
    public readonly bool IsValid(int queues) =>
        Index < (uint)queues && (Flags & ~FlagLog) == 0 && (DescUserAddr & 15) == 0 && (AvailUserAddr & 1) == 0 && (UsedUserAddr & 3) == 0;
}

/// <summary>u64 payload of SET_VRING_KICK/CALL/ERR: bits 0-7 queue index, bit 8 "no fd", the rest reserved.</summary>
public readonly struct VhostUserVringFile
{
    public VhostUserVringFile(ulong value) => Value = value;

    public ulong Value { get; }

    public uint Index => (uint)(Value & VhostUserConstants.VringIndexMask);

    public bool NoFd => (Value & VhostUserConstants.VringNoFdMask) != 0;

    /// <summary>No reserved bit, index in range, and one fd unless "no fd" is set.</summary>
    public bool IsValid(int queues, int fdCount) =>
        (Value & ~(VhostUserConstants.VringIndexMask | VhostUserConstants.VringNoFdMask)) == 0 && Index < (uint)queues && fdCount == (NoFd ? 0 : 1);
}

/// <summary>GET/SET_CONFIG payload header (12 bytes), followed by up to 256 bytes of config space.</summary>
[StructLayout(LayoutKind.Sequential, Size = 12)]
public struct VhostUserConfigHeader
{
    /// <summary>VHOST_SET_CONFIG_TYPE_MIGRATION: the only flag defined (bit 0 set = migration, clear = front end).</summary>
    public const uint FlagMigration = 1;

    public uint Offset;
    public uint Size;
    public uint Flags;

    /// <summary>The payload is the header plus exactly Size bytes, inside the 256-byte config space, no unknown flag.</summary>
    public readonly bool IsValid(int payloadSize) =>
        Size <= VhostUserConstants.ConfigSpaceMax && Offset <= VhostUserConstants.ConfigSpaceMax - Size
        && payloadSize == 12 + (int)Size && (Flags & ~FlagMigration) == 0;
}

/// <summary>
/// GET/SET_INFLIGHT_FD payload (VhostUserInflight: 20 bytes of fields, 24 with the C struct's tail padding, which
/// QEMU sends): the in-flight buffer's size and offset in its memfd, and the queue count and size it covers.
/// </summary>
[StructLayout(LayoutKind.Sequential, Size = 24)]
public struct VhostUserInflight
{
    /// <summary>The fields' bytes (what a front end must send at least).</summary>
    public const int FieldBytes = 20;

    public ulong MmapSize;
    public ulong MmapOffset;
    public ushort NumQueues;
    public ushort QueueSize;

    /// <summary>
    /// The queue count is within what the device offers and the size a valid split-ring size; for SET, the
    /// buffer covers every queue and the offset is page aligned (the mapping starts there).
    /// </summary>
    public readonly bool IsValidRequest(int maxQueues) =>
        NumQueues > 0 && NumQueues <= maxQueues && Virtio.SplitVirtqueue.IsValidSize(QueueSize);

    public readonly bool IsValidBuffer(int maxQueues) =>
        IsValidRequest(maxQueues) && (MmapOffset & 4095) == 0 && MmapOffset <= (1UL << 40)
        && MmapSize >= NumQueues * Virtio.InflightQueue.RegionBytes(QueueSize) && MmapSize <= (1UL << 32);
}
