using System.Runtime.InteropServices;
using Microsoft.Extensions.Logging;
using VhostBackend.Platform;
using VhostBackend.Reactors;
using VhostBackend.VhostUser;
using VhostBackend.Virtio;
using VhostBackend.Virtio.Blk;
using VhostBackend.Virtio.Scsi;

namespace VhostBackend.BdevVirtio;

/// <summary>
/// One virtqueue of a virtio-user device: the ring (driver side), its request slots (an indirect table, the
/// request header, a discard range and the status byte per slot) and a bounce buffer per slot, all inside the
/// memfd shared with the back end, plus the kick and call eventfds. Claimed by at most one I/O channel at a time.
/// </summary>
internal sealed class VirtioUserQueue : IDisposable
{
    /// <summary>
    /// Bytes of per-slot metadata, two cache lines: the first holds the 3 indirect descriptors (48), which stay the
    /// same from one I/O to the next for a given buffer and so are not rewritten (the line stays shared with the
    /// back end, no transfer); the second holds what changes per I/O: out header (16), discard range (16), status (1).
    /// </summary>
    public const int SlotBytes = 128;
    public const int TableOffset = 0;
    public const int HeaderOffset = 64;
    public const int RangeOffset = 80;
    public const int StatusOffset = 96;

    /// <summary>Where avail flags/idx and used flags/idx sit inside their cache lines (see <see cref="RingLayout"/>).</summary>
    public const int IdxLineOffset = 60;

    /// <summary>
    /// Ring layout with two cache lines shared on purpose. avail.flags/idx end a line (avail ring at line offset 60)
    /// whose first bytes hold slot 0's request header, and used.flags/idx end a line whose first byte is slot 0's
    /// status. At low queue depth the channel always reuses slot 0 (its free list is a stack), so the header
    /// travels to the device with the avail index and the status comes back with the used index: four cache-line
    /// transfers per request less (of about nine; the descriptors and the indirect table are unchanged from one
    /// request to the next and stay shared). Buffers may lie anywhere in the shared memory, ring lines included;
    /// the ring alignments (descriptors 16, avail 2, used 4) hold.
    /// </summary>
    public static (ulong Desc, ulong HotHeader, ulong Avail, ulong HotStatus, ulong Used, ulong Total) RingLayout(uint size)
    {
        ulong availLine = (SplitVirtqueue.DescTableBytes(size) + 63) & ~63UL;
        ulong avail = availLine + IdxLineOffset;
        ulong usedLine = (avail + SplitVirtqueue.AvailRingBytes(size) + 4095) & ~4095UL;
        ulong used = usedLine + IdxLineOffset;
        ulong total = (used + SplitVirtqueue.UsedRingBytes(size) + 4095) & ~4095UL;
        return (0, availLine, avail, usedLine, used, total);
    }

    /// <summary>
    /// Packed ring layout: the descriptor ring at 0, the driver event suppression area (we write it) on the next
    /// cache line, the device's (the back end writes it) on the line after, so neither side's stores share a line
    /// with the other's. Desc/HotHeader/Avail/HotStatus/Used as in <see cref="RingLayout"/>: Avail is the driver
    /// area, Used the device area; the hot lines are the slots' own (no index line to share).
    /// </summary>
    public static (ulong Desc, ulong HotHeader, ulong Avail, ulong HotStatus, ulong Used, ulong Total) PackedRingLayout(uint size)
    {
        ulong driverArea = PackedVirtqueueDriver.RingBytes(size);
        ulong deviceArea = driverArea + 64;
        ulong total = (deviceArea + 64 + 4095) & ~4095UL;
        return (0, ulong.MaxValue, driverArea, ulong.MaxValue, deviceArea, total);
    }

    /// <summary>
    /// virtio-scsi slot metadata (<see cref="ScsiSlotBytes"/> bytes): the indirect table (3 descriptors) on the first
    /// cache line, the 51-byte command request (or control-queue TMF request) on the second, the 108-byte response
    /// (or TMF response, or an event-queue buffer) on the third and fourth. No line is shared with the ring's index.
    /// </summary>
    public const int ScsiSlotBytes = 256;
    public const int ScsiReqOffset = 64;
    public const int ScsiRespOffset = 128;

    public VirtioUserQueue(int index, VirtqueueDriver driver, DriverMemory memory, ulong slotsGpa, ulong bounceGpa, int slotCount, int bounceBytes,
        ulong hotHeaderGpa, ulong hotStatusGpa, int slotBytes = SlotBytes, int statusOffset = StatusOffset)
    {
        _hotHeaderGpa = hotHeaderGpa;
        _hotStatusGpa = hotStatusGpa;
        _slotBytes = slotBytes;
        _statusOffset = statusOffset;
        Index = index;
        Driver = driver;
        Memory = memory;
        SlotBaseGpa = slotsGpa;
        BounceBaseGpa = bounceGpa;
        SlotCount = slotCount;
        BounceBytes = bounceBytes;
    }

    private readonly ulong _hotHeaderGpa;
    private readonly ulong _hotStatusGpa;
    private readonly int _slotBytes;
    private readonly int _statusOffset;

    public int Index { get; }
    public VirtqueueDriver Driver { get; }

    /// <summary>The shared memory (GPA = offset in it) holding this queue's ring, slots and bounce buffers.</summary>
    public DriverMemory Memory { get; }

    /// <summary>Slot <paramref name="slot"/>'s metadata (indirect table, discard range; header and status unless slot 0).</summary>
    public ulong SlotGpa(int slot) => SlotBaseGpa + (ulong)(slot * _slotBytes);

    /// <summary>The request header of <paramref name="slot"/>: slot 0's shares the avail index's line.</summary>
    public ulong HeaderGpa(int slot) => slot == 0 ? _hotHeaderGpa : SlotGpa(slot) + HeaderOffset;

    public ref VirtioBlkOutHeader Header(int slot) => ref Memory.Ref<VirtioBlkOutHeader>(HeaderGpa(slot));

    /// <summary>The status byte of <paramref name="slot"/>: slot 0's shares the used index's line.</summary>
    public ulong StatusGpa(int slot) => slot == 0 ? _hotStatusGpa : SlotGpa(slot) + (ulong)_statusOffset;

    public ref byte Status(int slot) => ref Memory.Ref<byte>(StatusGpa(slot));

    /// <summary>The bounce buffer of <paramref name="slot"/>.</summary>
    public ulong BounceGpa(int slot) => BounceBaseGpa + ((ulong)slot * (ulong)BounceBytes);

    public ulong SlotBaseGpa { get; }
    public ulong BounceBaseGpa { get; }
    public int SlotCount { get; }
    public int BounceBytes { get; }
    public EventFd Kick { get; } = new();
    public EventFd Call { get; } = new();

    /// <summary>Set while a channel owns the queue (guarded by the controller's lock).</summary>
    public bool Claimed { get; set; }

    /// <summary>Set when the device broke the ring protocol: the queue is not used again.</summary>
    public bool Broken { get; set; }

    public void Dispose()
    {
        Kick.Dispose();
        Call.Dispose();
    }
}

/// <summary>The attach's dev_type.</summary>
public enum VirtioDevType
{
    Blk,
    Scsi,
}

/// <summary>
/// A vhost-user-blk or vhost-user-scsi device reached as a front end (SPDK's virtio_user + bdev_virtio_blk /
/// bdev_virtio_scsi; for scsi, queues 0 and 1 are the control and event queues and <see cref="Scsi"/> holds the scan and event side): the socket, the
/// negotiated features, the device config, the shared memory region (one memfd holding every ring, request slot
/// and bounce buffer; guest-physical addresses are offsets into it, user addresses are our mapping) and the
/// queues. As an <see cref="IoDevice"/> its per-reactor channels (<see cref="VirtioUserChannel"/>) each own one queue (<see cref="VirtioBlkChannel"/>, or <see cref="VirtioScsiChannel"/> on a scsi request queue).
/// </summary>
public sealed class VirtioUserController : IoDevice, IDisposable
{
    /// <summary>Largest read/write sent as one request: the size of each slot's bounce buffer.</summary>
    public const int MaxIoBytes = 128 * 1024;

    /// <summary>virtio-blk config bytes read with GET_CONFIG (up to write_zeroes_may_unmap); fallback 36 (up to num_queues).</summary>
    public const int ConfigBytes = 60;

    private readonly VhostUserFrontEnd _fe;
    private readonly int _memFd;
    private readonly MappedRegion _map;
    private readonly VirtioUserQueue[] _queues;
    private readonly ILogger _log;
    private int _nextQueue;
    private bool _disposed;

    private VirtioUserController(string name, string path, int vqSize, VhostUserFrontEnd fe, ulong features, VirtioBlkConfig config, int memFd, MappedRegion map, VirtioUserQueue[] queues, ILogger log, SharedMemoryArena? shared, VirtioDevType devType)
        : base("virtio_user:" + name)
    {
        DevType = devType;
        FixedQueues = devType == VirtioDevType.Scsi ? VirtioScsi.FirstRequestQueue : 0;
        _nextQueue = FixedQueues;
        Shared = shared;
        CtrlName = name;
        SocketPath = path;
        VqSize = vqSize;
        _fe = fe;
        Features = features;
        Config = config;
        _memFd = memFd;
        _map = map;
        _queues = queues;
        _log = log;
    }

    public string CtrlName { get; }

    /// <summary>blk or scsi (the attach's dev_type).</summary>
    public VirtioDevType DevType { get; }

    /// <summary>Queues that carry no I/O: 2 for scsi (control and event queues), 0 for blk.</summary>
    public int FixedQueues { get; }

    /// <summary>The SCSI front end (scan results, event queue) when <see cref="DevType"/> is scsi.</summary>
    internal VirtioScsiDevice? Scsi { get; set; }

    /// <summary>Queue <paramref name="index"/> (control plane: the SCSI scan, control and event queues).</summary>
    internal VirtioUserQueue Queue(int index) => _queues[index];

    /// <summary>The region holding rings, slots and bounce buffers: its length (a multiple of 2 MiB).</summary>
    public ulong MemoryBytes => _map.Length;

    /// <summary>Our address of that region (2 MiB-aligned; the user address the back end is told).</summary>
    public nint MemoryAddress => _map.Pointer;

    /// <summary>Whether that region lives in huge pages (hugetlbfs memfd) rather than an ordinary memfd.</summary>
    public bool HugePages { get; private init; }

    /// <summary>Guest-physical address the back end sees <see cref="Shared"/> at (second memory region).</summary>
    public const ulong SharedGpa = 1UL << 40;

    /// <summary>The process's shared I/O memory, mapped by the back end too: buffers inside it go by address (zero copy).</summary>
    public SharedMemoryArena? Shared { get; }
    public string SocketPath { get; }
    /// <summary>Request queues (SPDK's vq_count: for scsi the control and event queues are not counted).</summary>
    public int VqCount => _queues.Length - FixedQueues;
    public int VqSize { get; }

    /// <summary>Negotiated virtio features.</summary>
    public ulong Features { get; }

    public VirtioBlkConfig Config { get; }

    public ulong ProtocolFeatures => _fe.ProtocolFeatures;

    public bool Has(int bit) => (Features & (1UL << bit)) != 0;

    /// <summary>The rings are packed (VIRTIO_F_RING_PACKED negotiated).</summary>
    public bool PackedRing => Has(VirtioFeatures.RingPacked);

    /// <summary>What the attach asked for: null = packed when offered, true = packed required, false = split.</summary>
    public bool? PackedRingOption { get; private init; }

    internal ILogger Logger => _log;

    /// <summary>Features we ask for when the back end offers them.</summary>
    public static readonly ulong WantedFeatures =
        VirtioFeatures.Bit(VirtioFeatures.Version1) | VirtioFeatures.Bit(VirtioFeatures.RingIndirectDesc)
        | VirtioFeatures.Bit(VirtioFeatures.RingEventIdx) | VirtioFeatures.Bit(VhostUserConstants.ProtocolFeaturesBit)
        | VirtioFeatures.Bit(VirtioBlkFeature.SizeMax) | VirtioFeatures.Bit(VirtioBlkFeature.SegMax)
        | VirtioFeatures.Bit(VirtioBlkFeature.BlkSize) | VirtioFeatures.Bit(VirtioBlkFeature.Ro)
        | VirtioFeatures.Bit(VirtioBlkFeature.Flush) | VirtioFeatures.Bit(VirtioBlkFeature.Topology)
        | VirtioFeatures.Bit(VirtioBlkFeature.Mq) | VirtioFeatures.Bit(VirtioBlkFeature.Discard)
        | VirtioFeatures.Bit(VirtioBlkFeature.WriteZeroes) | VirtioFeatures.Bit(VirtioBlkFeature.ConfigWce);

    /// <summary>What a scsi front end asks for when offered: SPDK's set less VIRTIO_SCSI_F_INOUT (we send no bidirectional commands).</summary>
    public static readonly ulong WantedScsiFeatures =
        VirtioFeatures.Bit(VirtioFeatures.Version1) | VirtioFeatures.Bit(VirtioFeatures.RingIndirectDesc)
        | VirtioFeatures.Bit(VirtioFeatures.RingEventIdx) | VirtioFeatures.Bit(VhostUserConstants.ProtocolFeaturesBit)
        | VirtioFeatures.Bit(VirtioScsiFeature.Hotplug);

    public static readonly ulong WantedProtocolFeatures =
        (1UL << VhostUserProtocolFeature.ReplyAck) | (1UL << VhostUserProtocolFeature.Mq) | (1UL << VhostUserProtocolFeature.Config);

    /// <summary>
    /// Connects and sets the device up the way QEMU does: features, protocol features, owner, queue count,
    /// config, memory table, then each ring (num, base, addr, kick, call) and SET_VRING_ENABLE. Blocking; throws
    /// <see cref="IOException"/> (connection, protocol or refusal) or <see cref="ArgumentException"/> (bad request).
    /// </summary>
    /// <param name="packedRing">
    /// VIRTIO_F_RING_PACKED: null negotiates it when the back end offers it, true requires it (an
    /// <see cref="IOException"/> when not offered), false keeps split rings.
    /// </param>
    /// <param name="devType">blk, or scsi: <paramref name="vqCount"/> request queues after the control and event queues.</param>
    public static VirtioUserController Connect(string name, string path, int vqCount, int vqSize, ILogger log, SharedMemoryArena? shared = null, bool? packedRing = null,
        VirtioDevType devType = VirtioDevType.Blk)
    {
        bool scsi = devType == VirtioDevType.Scsi;
        int fixedQueues = scsi ? VirtioScsi.FirstRequestQueue : 0;
        if (vqCount < 1 || vqCount > 256)
        {
            throw new ArgumentException($"vq_count {vqCount} must be 1..256");
        }

        if (!SplitVirtqueue.IsValidSize((uint)vqSize))
        {
            throw new ArgumentException($"vq_size {vqSize} must be a power of two in 1..{SplitVirtqueue.MaxQueueSize}");
        }

        var fe = VhostUserFrontEnd.Connect(path);
        int memFd = -1;
        MappedRegion? map = null;
        var queues = new List<VirtioUserQueue>();
        try
        {
            ulong offered = fe.GetU64(VhostUserRequest.GetFeatures);
            if ((offered & VirtioFeatures.Bit(VirtioFeatures.Version1)) == 0)
            {
                throw new IOException($"back end at {path} does not offer VIRTIO_F_VERSION_1 (features 0x{offered:x})");
            }

            bool protocol = (offered & VirtioFeatures.Bit(VhostUserConstants.ProtocolFeaturesBit)) != 0;
            if (protocol)
            {
                ulong proto = fe.GetU64(VhostUserRequest.GetProtocolFeatures);
                fe.SetProtocolFeatures(proto & WantedProtocolFeatures);
            }

            fe.SetOwner();
            int maxQueues = fe.HasProtocolFeature(VhostUserProtocolFeature.Mq) ? (int)Math.Min(fe.GetU64(VhostUserRequest.GetQueueNum), 256UL + (ulong)fixedQueues) : 1 + fixedQueues;
            var config = default(VirtioBlkConfig);
            ulong features;
            if (scsi)
            {
                features = offered & WantedScsiFeatures;
                maxQueues = Math.Max(0, maxQueues - fixedQueues);
                Span<byte> scsiCfg = stackalloc byte[VirtioScsiConfig.Size];
                if (fe.HasProtocolFeature(VhostUserProtocolFeature.Config) && fe.GetConfig(scsiCfg))
                {
                    // num_queues counts request queues; 0 or garbage leaves GET_QUEUE_NUM's answer.
                    uint n = MemoryMarshal.Read<VirtioScsiConfig>(scsiCfg).NumQueues;
                    if (n > 0 && n < (uint)maxQueues)
                    {
                        maxQueues = (int)n;
                    }
                }
            }
            else
            {
                features = ReadBlkConfig(fe, path, offered, ref maxQueues, out config);
            }

            bool packed = (offered & VirtioFeatures.Bit(VirtioFeatures.RingPacked)) != 0 && packedRing != false;
            if (packedRing == true && !packed)
            {
                throw new IOException($"back end at {path} does not offer VIRTIO_F_RING_PACKED (features 0x{offered:x}); packed_ring was required");
            }

            if (packed)
            {
                features |= VirtioFeatures.Bit(VirtioFeatures.RingPacked);
            }

            if (vqCount > maxQueues)
            {
                throw new ArgumentException($"back end at {path} supports {maxQueues} {(scsi ? "request " : "")}queue(s); vq_count {vqCount} requested");
            }

            fe.SetU64(VhostUserRequest.SetFeatures, features);
            int totalQueues = vqCount + fixedQueues;
            int slotBytes = scsi ? VirtioUserQueue.ScsiSlotBytes : VirtioUserQueue.SlotBytes;

            // The shared region: per queue, its ring, then its slots' metadata, then its bounce buffers (none for
            // the scsi control and event queues).
            var layout = packed ? VirtioUserQueue.PackedRingLayout((uint)vqSize) : VirtioUserQueue.RingLayout((uint)vqSize);
            ulong slotArea = ((ulong)vqSize * (ulong)slotBytes + 4095) & ~4095UL;
            ulong bounceArea = (ulong)vqSize * MaxIoBytes;
            var queueOffsets = new ulong[totalQueues];
            ulong total = 0;
            for (int q = 0; q < totalQueues; q++)
            {
                queueOffsets[q] = total;
                total += layout.Total + slotArea + (q < fixedQueues ? 0 : bounceArea);
            }

            // Sealed (the back end can trust its size), 2 MiB-aligned in size and address, huge pages when there
            // are enough free ones: the layout QEMU and DPDK give their regions, which SPDK's vhost target expects.
            map = MappedRegion.CreateShared("virtio-user-" + name, total, out memFd, out bool hugePages, DmaMemoryRegistry.Process); // its bounce buffers may be device DMA targets
            total = map.Length;
            bool eventIdx = (features & VirtioFeatures.Bit(VirtioFeatures.RingEventIdx)) != 0;
            var memory = new DriverMemory(map.Pointer, total);
            for (int q = 0; q < totalQueues; q++)
            {
                ulong off = queueOffsets[q];
                VirtqueueDriver drv = packed
                    ? new PackedVirtqueueDriver(memory.Address(off + layout.Desc, PackedVirtqueueDriver.RingBytes((uint)vqSize)),
                        memory.Address(off + layout.Avail, 4), memory.Address(off + layout.Used, 4), (ushort)vqSize, eventIdx)
                    : new SplitVirtqueueDriver(memory.Address(off + layout.Desc, SplitVirtqueue.DescTableBytes((uint)vqSize)),
                        memory.Address(off + layout.Avail, SplitVirtqueue.AvailRingBytes((uint)vqSize)),
                        memory.Address(off + layout.Used, SplitVirtqueue.UsedRingBytes((uint)vqSize)), (ushort)vqSize, eventIdx);
                drv.DisableInterrupts();
                ulong slots = off + layout.Total;
                queues.Add(scsi
                    ? new VirtioUserQueue(q, drv, memory, slots, slots + slotArea, vqSize, q < fixedQueues ? 0 : MaxIoBytes,
                        slots + VirtioUserQueue.ScsiReqOffset, slots + VirtioUserQueue.ScsiRespOffset, VirtioUserQueue.ScsiSlotBytes, VirtioUserQueue.ScsiRespOffset)
                    : new VirtioUserQueue(q, drv, memory, slots, slots + slotArea, vqSize, MaxIoBytes,
                        packed ? slots + VirtioUserQueue.HeaderOffset : off + layout.HotHeader, packed ? slots + VirtioUserQueue.StatusOffset : off + layout.HotStatus));
            }

            // GPA = offset in the memfd; user address = our mapping (ring addresses are given in it).
            // The shared I/O arena, when there is one, is a second region far above the first.
            Span<VhostUserMemoryRegion> regions = stackalloc VhostUserMemoryRegion[2];
            regions[0] = new VhostUserMemoryRegion { GuestPhysAddr = 0, MemorySize = total, UserspaceAddr = (ulong)map.Pointer, MmapOffset = 0 };
            if (shared is not null)
            {
                regions[1] = new VhostUserMemoryRegion { GuestPhysAddr = SharedGpa, MemorySize = shared.Size, UserspaceAddr = (ulong)shared.Base, MmapOffset = 0 };
                fe.SetMemTable(regions, [memFd, shared.Fd]);
            }
            else
            {
                fe.SetMemTable(regions[..1], [memFd]);
            }

            foreach (var q in queues)
            {
                uint i = (uint)q.Index;
                ulong ringUva = (ulong)map.Pointer + queueOffsets[i];
                fe.SetStruct(VhostUserRequest.SetVringNum, new VhostUserVringState { Index = i, Num = (uint)vqSize });
                fe.SetStruct(VhostUserRequest.SetVringBase, new VhostUserVringState { Index = i, Num = q.Driver.InitialVringBase });
                fe.SetStruct(VhostUserRequest.SetVringAddr, new VhostUserVringAddr
                {
                    Index = i,
                    DescUserAddr = ringUva + layout.Desc,
                    AvailUserAddr = ringUva + layout.Avail,
                    UsedUserAddr = ringUva + layout.Used,
                });
                fe.SetU64(VhostUserRequest.SetVringKick, i, [q.Kick.Fd]);
                fe.SetU64(VhostUserRequest.SetVringCall, i, [q.Call.Fd]);
            }

            if (protocol)
            {
                foreach (var q in queues)
                {
                    fe.SetStruct(VhostUserRequest.SetVringEnable, new VhostUserVringState { Index = (uint)q.Index, Num = 1 });
                }
            }

            log.LogInformation("virtio-user {Name} ({Type}): connected to {Path}: features 0x{Features:x}, protocol 0x{Proto:x}, {Queues} queue(s) of {Size}, capacity {Cap} sectors, blk_size {Bs}, shared memory 0x{Mem:x} bytes at 0x{Addr:x} ({Backing})",
                name, scsi ? "scsi" : "blk", path, features, fe.ProtocolFeatures, totalQueues, vqSize, config.Capacity, config.BlkSize, total, (ulong)map.Pointer, hugePages ? "huge pages" : "memfd");
            return new VirtioUserController(name, path, vqSize, fe, features, config, memFd, map, queues.ToArray(), log, shared, devType) 
            {
                HugePages = hugePages,
                PackedRingOption = packedRing,
                MemoryTable = shared is not null ? ([regions[0], regions[1]], [memFd, shared.Fd]) : ([regions[0]], [memFd]),
            };
        }
        catch
        {
            foreach (var q in queues)
            {
                q.Dispose();
            }

            fe.Dispose();
            map?.Dispose();
            Fd.Close(memFd);
            throw;
        }
    }

    private (VhostUserMemoryRegion[] Regions, int[] Fds) MemoryTable { get; init; }

    /// <summary>
    /// Sends the memory table again (SET_MEM_TABLE with the same regions), as QEMU does on every change of a guest's
    /// memory layout, while I/O may be running: the back end must drain and stop its queues, map the regions anew
    /// (and withdraw the old mappings, from its IOMMU too), and go on. bdevperf's --remap-memory uses it to test a
    /// back end's memory table changing under load. Control plane; blocking; serialised with other callers.
    /// </summary>
    public void ResendMemoryTable()
    {
        lock (_fe)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            _fe.SetMemTable(MemoryTable.Regions, MemoryTable.Fds);
        }
    }

    /// <summary>
    /// virtio-blk: the config space (GET_CONFIG, required: it holds the capacity), the features we take and the
    /// queue limit VIRTIO_BLK_F_MQ gives. Throws <see cref="IOException"/> for a config we cannot use.
    /// </summary>
    private static ulong ReadBlkConfig(VhostUserFrontEnd fe, string path, ulong offered, ref int maxQueues, out VirtioBlkConfig config)
    {
        if (!fe.HasProtocolFeature(VhostUserProtocolFeature.Config))
        {
            throw new IOException($"back end at {path} does not offer VHOST_USER_PROTOCOL_F_CONFIG: cannot read the disk's capacity");
        }

        Span<byte> cfgBytes = stackalloc byte[ConfigBytes];
        cfgBytes.Clear();
        if (!fe.GetConfig(cfgBytes) && !fe.GetConfig(cfgBytes[..36]))
        {
            throw new IOException($"back end at {path} refused GET_CONFIG");
        }

        config = MemoryMarshal.Read<VirtioBlkConfig>(cfgBytes);
        ulong features = offered & WantedFeatures;
        if ((features & VirtioFeatures.Bit(VirtioBlkFeature.Mq)) != 0 && config.NumQueues > 0)
        {
            maxQueues = Math.Min(maxQueues, config.NumQueues);
        }
        else if ((features & VirtioFeatures.Bit(VirtioBlkFeature.Mq)) == 0)
        {
            maxQueues = 1;
        }

        uint blockSize = (features & VirtioFeatures.Bit(VirtioBlkFeature.BlkSize)) != 0 ? config.BlkSize : 512;
        // The capacity (512-byte sectors) must give at least one block and must not overflow in bytes: a back end's
        // 2^55+ sectors would wrap the bdev's size.
        if (blockSize < 512 || (blockSize & (blockSize - 1)) != 0 || blockSize > 1024 * 1024 || config.Capacity < blockSize / 512
            || config.Capacity > ulong.MaxValue / 512)
        {
            throw new IOException($"back end at {path}: unusable geometry (capacity {config.Capacity} sectors, blk_size {blockSize})");
        }

        return features;
    }

    /// <summary>Set once the back end closed the connection: every channel fails its outstanding and new I/O.</summary>
    public bool Disconnected => Volatile.Read(ref _disconnected) != 0;

    private int _disconnected;

    /// <summary>Checks (non-blocking) whether the back end went away; logs it once. Called by the channels' timed pollers.</summary>
    internal bool CheckConnection()
    {
        if (Disconnected)
        {
            return true;
        }

        if (_disposed || !_fe.IsPeerClosed())
        {
            return false;
        }

        if (Interlocked.Exchange(ref _disconnected, 1) == 0)
        {
            _log.LogError("virtio-user {Name}: the back end at {Path} closed the connection; failing the device's I/O", CtrlName, SocketPath);
        }

        return true;
    }

    /// <summary>Takes a free queue for a new channel (round robin from the last one given); null when all are taken.</summary>
    internal VirtioUserQueue? ClaimQueue()
    {
        lock (_queues)
        {
            int n = _queues.Length - FixedQueues;
            for (int k = 0; k < n; k++)
            {
                var q = _queues[FixedQueues + ((_nextQueue - FixedQueues + k) % n)];
                if (!q.Claimed && !q.Broken)
                {
                    q.Claimed = true;
                    _nextQueue = FixedQueues + ((q.Index - FixedQueues + 1) % n);
                    return q;
                }
            }

            return null;
        }
    }

    internal void ReleaseQueue(VirtioUserQueue q)
    {
        lock (_queues)
        {
            q.Claimed = false;
        }
    }

    protected override object CreateChannelContext(Reactor reactor)
    {
        VirtioUserChannel ch = DevType == VirtioDevType.Scsi ? new VirtioScsiChannel(this, reactor) : new VirtioBlkChannel(this, reactor);
        Interlocked.Increment(ref _liveChannels);
        return ch;
    }

    protected override void DestroyChannelContext(Reactor reactor, object context)
    {
        try
        {
            ((VirtioUserChannel)context).Destroy();
        }
        finally
        {
            // The last channel of a detached controller: the deferred teardown runs now (off the reactor: it blocks).
            if (Interlocked.Decrement(ref _liveChannels) == 0 && Volatile.Read(ref _disposeWhenUnused) != 0)
            {
                StartDispose();
            }
        }
    }

    internal void MarkGone() => MarkUnregistered();

    private int _liveChannels;
    private int _disposeWhenUnused;
    private int _disposeStarted;
    private readonly TaskCompletionSource _disposedTcs = new(TaskCreationOptions.RunContinuationsAsynchronously);

    /// <summary>Channel contexts alive now (created and not yet destroyed on their reactors).</summary>
    internal int LiveChannels => Volatile.Read(ref _liveChannels);

    /// <summary>Completes once <see cref="Dispose"/> has run (the rings stopped, the connection closed, the memory unmapped).</summary>
    public Task Disposed => _disposedTcs.Task;

    /// <summary>
    /// Detach: no new channels (<see cref="MarkGone"/>), and <see cref="Dispose"/> on the thread pool as soon as no
    /// channel is left: now, or when the last open one is destroyed on its reactor (however long it stays open).
    /// Returns <see cref="Disposed"/>.
    /// </summary>
    internal Task DisposeWhenUnused()
    {
        MarkGone();
        Interlocked.Exchange(ref _disposeWhenUnused, 1); // a full fence: the count below is read after the flag is set
        if (Volatile.Read(ref _liveChannels) == 0)
        {
            StartDispose(); // (a racing last destroy may start it too: the first one wins)
        }

        return Disposed;
    }

    private void StartDispose()
    {
        if (Interlocked.Exchange(ref _disposeStarted, 1) != 0)
        {
            return;
        }

        Task.Run(() =>
        {
            try
            {
                Dispose();
                _log.LogInformation("virtio-user {Name}: detached", CtrlName);
            }
            catch (Exception e)
            {
                _log.LogError(e, "virtio-user {Name}: teardown failed", CtrlName);
                _disposedTcs.TrySetException(e);
            }
        });
    }

    /// <summary>
    /// Stops every ring on the back end (GET_VRING_BASE) and closes the connection, then unmaps the shared memory.
    /// Call only once no channel uses the queues. Blocking; errors from a back end that went away are logged.
    /// </summary>
    public void Dispose()
    {
        if (_disposed)
        {
            return;
        }

        _disposed = true;
        try
        {
            foreach (var q in _queues)
            {
                _fe.GetVringBase((uint)q.Index);
            }
        }
        catch (IOException e)
        {
            _log.LogWarning("virtio-user {Name}: stopping the rings on {Path} failed: {Error}", CtrlName, SocketPath, e.Message);
        }

        // Close the socket before unmapping: the back end unmaps its side when the connection ends.
        _fe.Dispose();
        foreach (var q in _queues)
        {
            q.Dispose();
        }

        _map.Dispose();
        Fd.Close(_memFd);
        _disposedTcs.TrySetResult();
    }
}
