using System.Globalization;
using System.Runtime.InteropServices;

namespace VhostBackend.Nvme;

/// <summary>
/// ioctl request numbers of linux/vfio.h. VFIO defines all of them with <c>_IO(VFIO_TYPE, VFIO_BASE + n)</c>, i.e.
/// no direction and no size bits: the number is <c>(';' &lt;&lt; 8) | (100 + n)</c>. A unit test recomputes them.
/// </summary>
public static class VfioIoctl
{
    public const int VfioType = ';'; // 0x3B
    public const int VfioBase = 100;

    /// <summary>_IO(type, nr): dir = 0 (bits 30-31), size = 0 (bits 16-29), type in bits 8-15, nr in bits 0-7.</summary>
    public static ulong Io(int type, int nr) => ((ulong)(uint)type << 8) | (uint)nr;

    public static readonly ulong GetApiVersion = Io(VfioType, VfioBase + 0);
    public static readonly ulong CheckExtension = Io(VfioType, VfioBase + 1);
    public static readonly ulong SetIommu = Io(VfioType, VfioBase + 2);
    public static readonly ulong GroupGetStatus = Io(VfioType, VfioBase + 3);
    public static readonly ulong GroupSetContainer = Io(VfioType, VfioBase + 4);
    public static readonly ulong GroupUnsetContainer = Io(VfioType, VfioBase + 5);
    public static readonly ulong GroupGetDeviceFd = Io(VfioType, VfioBase + 6);
    public static readonly ulong DeviceGetInfo = Io(VfioType, VfioBase + 7);
    public static readonly ulong DeviceGetRegionInfo = Io(VfioType, VfioBase + 8);
    public static readonly ulong DeviceGetIrqInfo = Io(VfioType, VfioBase + 9);
    public static readonly ulong DeviceSetIrqs = Io(VfioType, VfioBase + 10);
    public static readonly ulong DeviceReset = Io(VfioType, VfioBase + 11);
    public static readonly ulong IommuGetInfo = Io(VfioType, VfioBase + 12);
    public static readonly ulong IommuMapDma = Io(VfioType, VfioBase + 13);
    public static readonly ulong IommuUnmapDma = Io(VfioType, VfioBase + 14);

    public const int ApiVersion = 0;
    public const int Type1Iommu = 1;
    public const int Type1v2Iommu = 3;
    public const uint GroupFlagsViable = 1;
    public const uint RegionInfoFlagRead = 1;
    public const uint RegionInfoFlagWrite = 2;
    public const uint RegionInfoFlagMmap = 4;
    public const uint IommuInfoCaps = 2;
    public const ushort IommuType1InfoCapIovaRange = 1;
    public const uint DmaMapFlagRead = 1;
    public const uint DmaMapFlagWrite = 2;
    public const int PciBar0RegionIndex = 0;
    public const uint PciIntxIrqIndex = 0;
    public const uint PciMsixIrqIndex = 2;

    /// <summary>VFIO_PCI_REQ_IRQ_INDEX: the kernel signals it when it wants the device back (unbind, remove).</summary>
    public const uint PciReqIrqIndex = 4;
    public const uint IrqInfoEventfd = 1;
    public const uint IrqSetDataNone = 1 << 0;
    public const uint IrqSetDataEventfd = 1 << 2;
    public const uint IrqSetActionUnmask = 1 << 4;
    public const uint IrqSetActionTrigger = 1 << 5;
    public const int PciConfigRegionIndex = 7;
}

/// <summary>struct vfio_group_status (8 bytes).</summary>
[StructLayout(LayoutKind.Sequential)]
public struct VfioGroupStatus
{
    public uint Argsz;
    public uint Flags;
}

/// <summary>struct vfio_device_info (20 bytes, with cap_offset).</summary>
[StructLayout(LayoutKind.Sequential)]
public struct VfioDeviceInfo
{
    public uint Argsz;
    public uint Flags;
    public uint NumRegions;
    public uint NumIrqs;
    public uint CapOffset;
}

/// <summary>struct vfio_irq_info (16 bytes).</summary>
[StructLayout(LayoutKind.Sequential)]
public struct VfioIrqInfo
{
    public uint Argsz;
    public uint Flags;
    public uint Index;
    public uint Count;
}

/// <summary>struct vfio_irq_set without its flexible data[] (20 bytes; the eventfds follow as s32s).</summary>
[StructLayout(LayoutKind.Sequential)]
public struct VfioIrqSet
{
    public uint Argsz;
    public uint Flags;
    public uint Index;
    public uint Start;
    public uint Count;
}

/// <summary>How a device's completions reach us: not at all (polled only), MSI-X vectors, or the legacy INTx line.</summary>
public enum DeviceInterruptMode
{
    None = 0,
    Msix = 1,
    Intx = 2,
}

/// <summary>struct vfio_region_info (32 bytes).</summary>
[StructLayout(LayoutKind.Sequential)]
public struct VfioRegionInfo
{
    public uint Argsz;
    public uint Flags;
    public uint Index;
    public uint CapOffset;
    public ulong Size;
    public ulong Offset;
}

/// <summary>struct vfio_iommu_type1_info (24 bytes: u32 cap_offset plus tail padding).</summary>
[StructLayout(LayoutKind.Sequential, Size = 24)]
public struct VfioIommuType1Info
{
    public uint Argsz;
    public uint Flags;
    public ulong IovaPgsizes;
    public uint CapOffset;
}

/// <summary>struct vfio_info_cap_header (8 bytes).</summary>
[StructLayout(LayoutKind.Sequential)]
public struct VfioInfoCapHeader
{
    public ushort Id;
    public ushort Version;
    public uint Next;
}

/// <summary>struct vfio_iommu_type1_dma_map (32 bytes).</summary>
[StructLayout(LayoutKind.Sequential)]
public struct VfioDmaMap
{
    public uint Argsz;
    public uint Flags;
    public ulong Vaddr;
    public ulong Iova;
    public ulong Size;
}

/// <summary>struct vfio_iommu_type1_dma_unmap (24 bytes, without the flexible data[]).</summary>
[StructLayout(LayoutKind.Sequential)]
public struct VfioDmaUnmap
{
    public uint Argsz;
    public uint Flags;
    public ulong Iova;
    public ulong Size;
}

/// <summary>Maps memory into a device's I/O address space. Implemented by <see cref="VfioContainer"/>; models use an identity mapper.</summary>
public interface IDmaMapper
{
    /// <summary>Ranges of IOVA the device may use, inclusive ends, sorted.</summary>
    IReadOnlyList<(ulong Start, ulong End)> IovaRanges { get; }

    /// <summary>Maps [va, va+len) at <paramref name="iova"/>. Returns 0 or a negative errno.</summary>
    int Map(nint va, ulong iova, ulong length);

    /// <summary>Unmaps the IOVA range. Returns 0 or a negative errno.</summary>
    int Unmap(ulong iova, ulong length);
}

/// <summary>A mapper with no IOMMU: device addresses are process addresses (in-process models, tests).</summary>
public sealed class IdentityDmaMapper : IDmaMapper
{
    public static readonly IdentityDmaMapper Instance = new();

    public IReadOnlyList<(ulong Start, ulong End)> IovaRanges { get; } = new[] { (0UL, ulong.MaxValue) };

    public int Map(nint va, ulong iova, ulong length) => 0;

    public int Unmap(ulong iova, ulong length) => 0;
}

/// <summary>
/// A VFIO container (/dev/vfio/vfio): one IOMMU context shared by every group added to it. The IOMMU type is set
/// when the first group joins. Thread-safe (control plane).
/// </summary>
public sealed unsafe class VfioContainer : IDmaMapper, IDisposable
{
    private static VfioContainer? s_shared;
    private static readonly object s_sharedLock = new();
    private readonly object _lock = new();
    private int _fd;
    private volatile bool _iommuSet;
    private int _groups;
    private readonly List<Action<bool>> _onIommuSet = new();
    private volatile (ulong Start, ulong End)[] _ranges = { (0, (1UL << 48) - 1) };

    public VfioContainer()
    {
        _fd = NvmeNative.open("/dev/vfio/vfio", Platform.Native.O_RDWR | Platform.Native.O_CLOEXEC);
        if (_fd < 0)
        {
            int e = NvmeNative.Errno;
            throw new IOException($"open /dev/vfio/vfio failed: {NvmeNative.StrError(e)} (is the vfio module loaded?)");
        }

        int version = NvmeNative.ioctl(_fd, VfioIoctl.GetApiVersion, 0);
        if (version != VfioIoctl.ApiVersion)
        {
            Dispose();
            throw new IOException($"unsupported VFIO API version {version}");
        }

        if (NvmeNative.ioctl(_fd, VfioIoctl.CheckExtension, VfioIoctl.Type1Iommu) <= 0)
        {
            Dispose();
            throw new IOException("VFIO type1 IOMMU is not supported (no IOMMU, or vfio_iommu_type1 not loaded)");
        }
    }

    /// <summary>The process-wide container all controllers share (so one DMA map serves every device).</summary>
    public static VfioContainer Shared
    {
        get
        {
            lock (s_sharedLock)
            {
                return s_shared ??= new VfioContainer();
            }
        }
    }

    /// <summary>Whether the shared container was created (without creating it).</summary>
    public static bool SharedExists
    {
        get
        {
            lock (s_sharedLock)
            {
                return s_shared is not null;
            }
        }
    }

    public int Fd => _fd;

    /// <summary>The IOMMU type in use (1 or 3), 0 before the first group joined.</summary>
    public int IommuType { get; private set; }

    /// <summary>The valid IOVA ranges (no lock: DMA spaces read it under their own lock, which the container's callbacks take inside its lock).</summary>
    public IReadOnlyList<(ulong Start, ulong End)> IovaRanges => _ranges;

    /// <summary>Adds a group (its fd) to this container and sets the IOMMU type on the first one.</summary>
    internal void AttachGroup(int groupFd)
    {
        lock (_lock)
        {
            int fd = _fd;
            if (NvmeNative.ioctl(groupFd, VfioIoctl.GroupSetContainer, &fd) != 0)
            {
                throw new IOException($"VFIO_GROUP_SET_CONTAINER failed: {NvmeNative.StrError(NvmeNative.Errno)}");
            }

            if (!_iommuSet)
            {
                // Type1v2 has cleaner unmap semantics; plain type1 (the brief's VFIO_TYPE1_IOMMU) is the fallback.
                int type = NvmeNative.ioctl(_fd, VfioIoctl.CheckExtension, VfioIoctl.Type1v2Iommu) > 0 ? VfioIoctl.Type1v2Iommu : VfioIoctl.Type1Iommu;
                if (NvmeNative.ioctl(_fd, VfioIoctl.SetIommu, type) != 0)
                {
                    throw new IOException($"VFIO_SET_IOMMU({type}) failed: {NvmeNative.StrError(NvmeNative.Errno)}");
                }

                IommuType = type;
                _iommuSet = true;
                _ranges = QueryIovaRanges(_fd) ?? _ranges;
                _groups++;

                // A container whose last group left lost its mappings: let the DMA spaces map their memory again.
                foreach (var a in _onIommuSet)
                {
                    a(true);
                }

                return;
            }

            _groups++;
        }
    }

    /// <summary>Called when a group leaves; the last one leaving resets the container (the kernel drops the IOMMU context).</summary>
    internal void DetachGroup()
    {
        lock (_lock)
        {
            if (_groups > 0 && --_groups == 0)
            {
                _iommuSet = false;
                foreach (var a in _onIommuSet)
                {
                    a(false); // the IOMMU context (and every mapping) is gone
                }
            }
        }
    }

    /// <summary>Whether DMA mappings can be made now (the IOMMU type is set).</summary>
    public bool IsReady => _iommuSet;

    /// <summary>
    /// Registers a callback run (under the container lock) each time the IOMMU is (re)initialised (true: map
    /// everything) or torn down with its last group (false: every mapping is gone). Lock order: container, then the
    /// callback's own lock; the callee must not take the container's lock.
    /// </summary>
    public void OnIommuReady(Action<bool> replay)
    {
        lock (_lock)
        {
            _onIommuSet.Add(replay);
        }
    }

    private static (ulong, ulong)[]? QueryIovaRanges(int fd)
    {
        // First call learns the size including capabilities, second reads them.
        VfioIommuType1Info info = default;
        info.Argsz = (uint)sizeof(VfioIommuType1Info);
        if (NvmeNative.ioctl(fd, VfioIoctl.IommuGetInfo, &info) != 0)
        {
            return null;
        }

        if ((info.Flags & VfioIoctl.IommuInfoCaps) == 0 || info.Argsz <= (uint)sizeof(VfioIommuType1Info) || info.Argsz > 65536)
        {
            return null;
        }

        uint size = info.Argsz;
        byte* buf = (byte*)NativeMemory.AllocZeroed(size);
        try
        {
            ((VfioIommuType1Info*)buf)->Argsz = size;
            if (NvmeNative.ioctl(fd, VfioIoctl.IommuGetInfo, buf) != 0)
            {
                return null;
            }

            uint off = ((VfioIommuType1Info*)buf)->CapOffset;
            for (int guard = 0; off != 0 && off + 8 <= size && guard < 64; guard++)
            {
                var hdr = (VfioInfoCapHeader*)(buf + off);
                if (hdr->Id == VfioIoctl.IommuType1InfoCapIovaRange && off + 16 <= size)
                {
                    uint n = *(uint*)(buf + off + 8);
                    if (n == 0 || off + 16 + (n * 16) > size)
                    {
                        return null;
                    }

                    var ranges = new (ulong, ulong)[n];
                    for (int i = 0; i < n; i++)
                    {
                        ulong* r = (ulong*)(buf + off + 16 + (i * 16));
                        ranges[i] = (r[0], r[1]);
                    }

                    return ranges;
                }

                off = hdr->Next;
            }

            return null;
        }
        finally
        {
            NativeMemory.Free(buf);
        }
    }

    /// <summary>
    /// Maps [va, va+len) at <paramref name="iova"/> in pieces (<see cref="ChunkBytes"/>): VFIO type1 holds the
    /// container's mutex for the whole pin-and-map of one <c>VFIO_IOMMU_MAP_DMA</c>, and every other map or unmap of the
    /// container waits for it; pinning a front end's memory through an emulated IOMMU can take a minute. In pieces, a
    /// map made meanwhile (a controller attaching, a reset) waits for one piece at most. <see cref="Unmap"/> takes the
    /// same pieces (the piece size depends on the range's length only). A piece that fails undoes the others.
    /// </summary>
    public int Map(nint va, ulong iova, ulong length) => MapInChunks(MapOne, UnmapOne, va, iova, length);

    /// <summary>The size of one <c>VFIO_IOMMU_MAP_DMA</c> for a range of <paramref name="length"/> bytes: 4 MiB, larger
    /// for very large ranges so one range stays within 512 mappings (VFIO limits a container's mappings, 65535 by default).</summary>
    public static ulong ChunkBytes(ulong length)
    {
        const ulong min = 4UL << 20, align = 2UL << 20;
        ulong c = Math.Max(min, length / 512);
        return (c + align - 1) & ~(align - 1);
    }

    /// <summary>Maps a range piece by piece with <paramref name="map"/>; on failure unmaps what it mapped. Returns 0 or a negative errno.</summary>
    public static int MapInChunks(Func<nint, ulong, ulong, int> map, Func<ulong, ulong, int> unmap, nint va, ulong iova, ulong length)
    {
        ulong chunk = ChunkBytes(length);
        for (ulong done = 0; done < length; done += chunk)
        {
            ulong n = Math.Min(chunk, length - done);
            int rc = map(va + (nint)done, iova + done, n);
            if (rc != 0)
            {
                if (done > 0)
                {
                    unmap(iova, done);
                }

                return rc;
            }
        }

        return 0;
    }

    private int MapOne(nint va, ulong iova, ulong length)
    {
        VfioDmaMap map = default;
        map.Argsz = (uint)sizeof(VfioDmaMap);
        map.Flags = VfioIoctl.DmaMapFlagRead | VfioIoctl.DmaMapFlagWrite;
        map.Vaddr = (ulong)va;
        map.Iova = iova;
        map.Size = length;
        return NvmeNative.ioctl(_fd, VfioIoctl.IommuMapDma, &map) == 0 ? 0 : -NvmeNative.Errno;
    }

    /// <summary>Unmaps a range mapped by <see cref="Map"/>, in the same pieces (the mutex is free between them).</summary>
    public int Unmap(ulong iova, ulong length) => UnmapInChunks(UnmapOne, iova, length);

    /// <summary>Unmaps piece by piece (<see cref="ChunkBytes"/>), all of them even when one fails; returns the first error.</summary>
    public static int UnmapInChunks(Func<ulong, ulong, int> unmap, ulong iova, ulong length)
    {
        ulong chunk = ChunkBytes(length);
        int first = 0;
        for (ulong done = 0; done < length; done += chunk)
        {
            int rc = unmap(iova + done, Math.Min(chunk, length - done));
            if (rc != 0 && first == 0)
            {
                first = rc;
            }
        }

        return first;
    }

    private int UnmapOne(ulong iova, ulong length)
    {
        VfioDmaUnmap unmap = default;
        unmap.Argsz = (uint)sizeof(VfioDmaUnmap);
        unmap.Iova = iova;
        unmap.Size = length;
        return NvmeNative.ioctl(_fd, VfioIoctl.IommuUnmapDma, &unmap) == 0 ? 0 : -NvmeNative.Errno;
    }

    public void Dispose()
    {
        int fd = Interlocked.Exchange(ref _fd, -1);
        if (fd >= 0)
        {
            NvmeNative.close(fd);
        }
    }
}

/// <summary>
/// A PCI function bound to vfio-pci: its group joined to a container, config space access, BAR mapping and
/// bus-master enable. Control plane only.
/// </summary>
public sealed unsafe class VfioPciDevice : IDisposable
{
    private int _groupFd = -1;
    private int _deviceFd = -1;
    private VfioRegionInfo _config;
    private nint _bar0;
    private nuint _bar0Size;
    private bool _attached;
    private Platform.EventFd[] _irqFds = [];
    private Platform.EventFd? _requestFd;
    private int _released;

    private VfioPciDevice(string address, VfioContainer container)
    {
        Address = address;
        Container = container;
    }

    public string Address { get; }
    public VfioContainer Container { get; }
    public int IommuGroup { get; private set; }

    /// <summary>BAR0 mapped into this process (the NVMe register file).</summary>
    public nint Bar0 => _bar0;

    public nuint Bar0Size => _bar0Size;

    /// <summary>Normalizes "0000:00:04.0" / "00:04.0"; throws on anything else.</summary>
    public static string NormalizeAddress(string address)
    {
        if (!TryNormalizeAddress(address, out var a))
        {
            throw new ArgumentException($"invalid PCI address '{address}' (expected DDDD:BB:DD.F)");
        }

        return a;
    }

    public static bool TryNormalizeAddress(string? address, out string normalized)
    {
        normalized = "";
        if (string.IsNullOrWhiteSpace(address))
        {
            return false;
        }

        var parts = address.Trim().ToLowerInvariant().Split(':');
        if (parts.Length == 2)
        {
            parts = new[] { "0000", parts[0], parts[1] };
        }

        if (parts.Length != 3)
        {
            return false;
        }

        var devFn = parts[2].Split('.');
        if (devFn.Length != 2
            || !uint.TryParse(parts[0], NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture, out uint domain) || domain > 0xFFFF
            || !uint.TryParse(parts[1], NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture, out uint bus) || bus > 0xFF
            || !uint.TryParse(devFn[0], NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture, out uint dev) || dev > 0x1F
            || !uint.TryParse(devFn[1], NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture, out uint fn) || fn > 7)
        {
            return false;
        }

        normalized = string.Create(CultureInfo.InvariantCulture, $"{domain:x4}:{bus:x2}:{dev:x2}.{fn:x1}");
        return true;
    }

    /// <summary>Opens the device: group, container, device fd, config region, BAR0 mapping, bus master on.</summary>
    public static VfioPciDevice Open(string address, VfioContainer? container = null)
    {
        address = NormalizeAddress(address);
        string sys = "/sys/bus/pci/devices/" + address;
        if (!Directory.Exists(sys))
        {
            throw new IOException($"PCI device {address} not found ({sys} missing)");
        }

        string? driver = ReadLinkName(sys + "/driver");
        if (driver != "vfio-pci")
        {
            throw new IOException($"PCI device {address} is bound to '{driver ?? "no driver"}', not vfio-pci (run scripts/setup.sh)");
        }

        string? group = ReadLinkName(sys + "/iommu_group");
        if (group is null || !int.TryParse(group, NumberStyles.None, CultureInfo.InvariantCulture, out int groupNo))
        {
            throw new IOException($"PCI device {address} has no IOMMU group (is the IOMMU enabled? intel_iommu=on)");
        }

        container ??= VfioContainer.Shared;
        var dev = new VfioPciDevice(address, container) { IommuGroup = groupNo };
        try
        {
            dev.OpenGroupAndDevice();
            return dev;
        }
        catch
        {
            dev.Dispose();
            throw;
        }
    }

    private static string? ReadLinkName(string path)
    {
        try
        {
            var target = new FileInfo(path).LinkTarget;
            return target is null ? null : Path.GetFileName(target);
        }
        catch (IOException)
        {
            return null;
        }
    }

    private void OpenGroupAndDevice()
    {
        string groupPath = "/dev/vfio/" + IommuGroup.ToString(CultureInfo.InvariantCulture);
        _groupFd = NvmeNative.open(groupPath, Platform.Native.O_RDWR | Platform.Native.O_CLOEXEC);
        if (_groupFd < 0)
        {
            throw new IOException($"open {groupPath} failed: {NvmeNative.StrError(NvmeNative.Errno)}");
        }

        VfioGroupStatus status = default;
        status.Argsz = (uint)sizeof(VfioGroupStatus);
        if (NvmeNative.ioctl(_groupFd, VfioIoctl.GroupGetStatus, &status) != 0)
        {
            throw new IOException($"VFIO_GROUP_GET_STATUS failed: {NvmeNative.StrError(NvmeNative.Errno)}");
        }

        if ((status.Flags & VfioIoctl.GroupFlagsViable) == 0)
        {
            throw new IOException($"IOMMU group {IommuGroup} is not viable (bind every device of the group to vfio-pci)");
        }

        Container.AttachGroup(_groupFd);
        _attached = true;

        byte[] name = System.Text.Encoding.ASCII.GetBytes(Address + "\0");
        fixed (byte* p = name)
        {
            _deviceFd = NvmeNative.ioctl(_groupFd, VfioIoctl.GroupGetDeviceFd, p);
        }

        if (_deviceFd < 0)
        {
            throw new IOException($"VFIO_GROUP_GET_DEVICE_FD({Address}) failed: {NvmeNative.StrError(NvmeNative.Errno)}");
        }

        _config = GetRegionInfo(VfioIoctl.PciConfigRegionIndex);
        var bar0 = GetRegionInfo(VfioIoctl.PciBar0RegionIndex);
        if ((bar0.Flags & VfioIoctl.RegionInfoFlagMmap) == 0 || bar0.Size < 0x2000)
        {
            throw new IOException($"BAR0 of {Address} cannot be mapped (flags 0x{bar0.Flags:x}, size {bar0.Size})");
        }

        nint p0 = NvmeNative.mmap(0, (nuint)bar0.Size, NvmeNative.PROT_READ | NvmeNative.PROT_WRITE, NvmeNative.MAP_SHARED, _deviceFd, (long)bar0.Offset);
        if (p0 == NvmeNative.MAP_FAILED)
        {
            throw new IOException($"mmap BAR0 of {Address} failed: {NvmeNative.StrError(NvmeNative.Errno)}");
        }

        _bar0 = p0;
        _bar0Size = (nuint)bar0.Size;

        // Command register: memory space (bit 1) and bus master (bit 2) on, INTx off (bit 10): we poll.
        ushort cmd = ReadConfig16(0x04);
        WriteConfig16(0x04, (ushort)(cmd | 0x0002 | 0x0004 | 0x0400));
    }

    public VfioRegionInfo GetRegionInfo(int index)
    {
        VfioRegionInfo info = default;
        info.Argsz = (uint)sizeof(VfioRegionInfo);
        info.Index = (uint)index;
        if (NvmeNative.ioctl(_deviceFd, VfioIoctl.DeviceGetRegionInfo, &info) != 0)
        {
            throw new IOException($"VFIO_DEVICE_GET_REGION_INFO({index}) failed: {NvmeNative.StrError(NvmeNative.Errno)}");
        }

        return info;
    }

    public ushort ReadConfig16(int offset)
    {
        ushort v = 0xFFFF;
        NvmeNative.pread(_deviceFd, &v, 2, (long)_config.Offset + offset);
        return v;
    }

    public uint ReadConfig32(int offset)
    {
        uint v = 0xFFFFFFFF;
        NvmeNative.pread(_deviceFd, &v, 4, (long)_config.Offset + offset);
        return v;
    }

    public void WriteConfig16(int offset, ushort value)
    {
        if (NvmeNative.pwrite(_deviceFd, &value, 2, (long)_config.Offset + offset) != 2)
        {
            throw new IOException($"config write at 0x{offset:x} failed: {NvmeNative.StrError(NvmeNative.Errno)}");
        }
    }

    /// <summary>Vendor and device ID from config space.</summary>
    public (ushort Vendor, ushort Device) Ids => (ReadConfig16(0), ReadConfig16(2));

    /// <summary>How interrupts are delivered (after <see cref="EnableInterrupts"/>).</summary>
    public DeviceInterruptMode InterruptMode { get; private set; }

    /// <summary>The eventfd of each enabled vector (MSI-X: one per vector; INTx: one). Owned by this device.</summary>
    public IReadOnlyList<Platform.EventFd> InterruptFds => _irqFds;

    /// <summary>Vectors (MSI-X) or lines (INTx: 1) the device offers for <paramref name="index"/>; 0 when none or on error.</summary>
    public uint IrqCount(uint index)
    {
        VfioIrqInfo info = default;
        info.Argsz = (uint)sizeof(VfioIrqInfo);
        info.Index = index;
        if (NvmeNative.ioctl(_deviceFd, VfioIoctl.DeviceGetIrqInfo, &info) != 0 || (info.Flags & VfioIoctl.IrqInfoEventfd) == 0)
        {
            return 0;
        }

        return info.Count;
    }

    /// <summary>
    /// VFIO_DEVICE_SET_IRQS: each of up to <paramref name="wanted"/> MSI-X vectors signals its own eventfd; a device
    /// without MSI-X gets its INTx line on one eventfd instead (VFIO masks the line when it fires: <see cref="UnmaskIntx"/>
    /// after the completions were reaped). Returns the mode (None when neither could be set up: the caller polls).
    /// </summary>
    public DeviceInterruptMode EnableInterrupts(int wanted)
    {
        DisableInterrupts();
        uint msix = IrqCount(VfioIoctl.PciMsixIrqIndex);
        if (msix > 0 && wanted > 0)
        {
            int n = (int)Math.Min(msix, (uint)Math.Min(wanted, 2048));
            if (SetEventFds(VfioIoctl.PciMsixIrqIndex, n))
            {
                InterruptMode = DeviceInterruptMode.Msix;
                return InterruptMode;
            }
        }

        if (IrqCount(VfioIoctl.PciIntxIrqIndex) > 0 && SetEventFds(VfioIoctl.PciIntxIrqIndex, 1))
        {
            // INTx was disabled in the command register at open (we polled): let the line through now.
            ushort cmd = ReadConfig16(0x04);
            WriteConfig16(0x04, (ushort)(cmd & ~0x0400));
            InterruptMode = DeviceInterruptMode.Intx;
            return InterruptMode;
        }

        return DeviceInterruptMode.None;
    }

    private bool SetEventFds(uint index, int count)
    {
        var fds = new Platform.EventFd[count];
        for (int i = 0; i < count; i++)
        {
            fds[i] = new Platform.EventFd();
        }

        int size = sizeof(VfioIrqSet) + (4 * count);
        byte* buf = stackalloc byte[size];
        var set = (VfioIrqSet*)buf;
        set->Argsz = (uint)size;
        set->Flags = VfioIoctl.IrqSetDataEventfd | VfioIoctl.IrqSetActionTrigger;
        set->Index = index;
        set->Start = 0;
        set->Count = (uint)count;
        int* data = (int*)(buf + sizeof(VfioIrqSet));
        for (int i = 0; i < count; i++)
        {
            data[i] = fds[i].Fd;
        }

        if (NvmeNative.ioctl(_deviceFd, VfioIoctl.DeviceSetIrqs, buf) != 0)
        {
            foreach (var f in fds)
            {
                f.Dispose();
            }

            return false;
        }

        _irqFds = fds;
        _irqIndex = index;
        return true;
    }

    private uint _irqIndex;

    /// <summary>INTx: unmask the line VFIO masked when it fired (after reaping, before sleeping). No-op otherwise.</summary>
    public void UnmaskIntx()
    {
        if (InterruptMode != DeviceInterruptMode.Intx || IsReleased)
        {
            return;
        }

        VfioIrqSet set = default;
        set.Argsz = (uint)sizeof(VfioIrqSet);
        set.Flags = VfioIoctl.IrqSetDataNone | VfioIoctl.IrqSetActionUnmask;
        set.Index = VfioIoctl.PciIntxIrqIndex;
        set.Start = 0;
        set.Count = 1;
        NvmeNative.ioctl(_deviceFd, VfioIoctl.DeviceSetIrqs, &set);
    }

    /// <summary>Turns interrupts off (count 0 with DATA_NONE) and closes their eventfds.</summary>
    public void DisableInterrupts()
    {
        if (_irqFds.Length == 0)
        {
            return;
        }

        if (_deviceFd >= 0)
        {
            VfioIrqSet set = default;
            set.Argsz = (uint)sizeof(VfioIrqSet);
            set.Flags = VfioIoctl.IrqSetDataNone | VfioIoctl.IrqSetActionTrigger;
            set.Index = _irqIndex;
            set.Start = 0;
            set.Count = 0;
            NvmeNative.ioctl(_deviceFd, VfioIoctl.DeviceSetIrqs, &set);
        }

        foreach (var f in _irqFds)
        {
            f.Dispose();
        }

        _irqFds = [];
        InterruptMode = DeviceInterruptMode.None;
    }

    /// <summary>
    /// The device request notifier (VFIO_PCI_REQ_IRQ_INDEX, see linux/vfio.h): the kernel signals this eventfd when it
    /// wants the device back (the device is being unbound from vfio-pci or removed) and blocks that unbind until every
    /// user closed the device (<see cref="Release"/>). Null when the kernel offers no request interrupt. Owned here.
    /// </summary>
    public Platform.EventFd? RequestFd => _requestFd;

    /// <summary>Sets up <see cref="RequestFd"/> (VFIO_DEVICE_SET_IRQS, DATA_EVENTFD | ACTION_TRIGGER on the request index). Returns whether it is on.</summary>
    public bool EnableRequestNotifier()
    {
        if (_requestFd is not null)
        {
            return true;
        }

        if (IrqCount(VfioIoctl.PciReqIrqIndex) == 0)
        {
            return false;
        }

        var fd = new Platform.EventFd();
        int size = sizeof(VfioIrqSet) + 4;
        byte* buf = stackalloc byte[size];
        var set = (VfioIrqSet*)buf;
        set->Argsz = (uint)size;
        set->Flags = VfioIoctl.IrqSetDataEventfd | VfioIoctl.IrqSetActionTrigger;
        set->Index = VfioIoctl.PciReqIrqIndex;
        set->Start = 0;
        set->Count = 1;
        *(int*)(buf + sizeof(VfioIrqSet)) = fd.Fd;
        if (NvmeNative.ioctl(_deviceFd, VfioIoctl.DeviceSetIrqs, buf) != 0)
        {
            fd.Dispose();
            return false;
        }

        _requestFd = fd;
        return true;
    }

    /// <summary>Whether <see cref="Release"/> ran: the device is no longer ours.</summary>
    public bool IsReleased => Volatile.Read(ref _released) != 0;

    /// <summary>
    /// Gives the device back to the kernel at once (hot removal), while code on other threads may still touch BAR0:
    /// BAR0 is replaced in place (MAP_FIXED) by an anonymous mapping filled with 0xFF, so a late register read sees
    /// all ones (as of a surprise-removed device) and a late doorbell write lands nowhere (DPDK remaps a removed BAR
    /// to anonymous memory for the same reason); then the device fd (vfio-pci disables and resets the function when
    /// its last user closes it) and the group fd are closed, so the kernel's unbind completes. The interrupt eventfds
    /// stay open (reactors may still have them as wake sources; the kernel no longer signals them) until
    /// <see cref="Dispose"/>. Idempotent; a control thread (closing the device can take a while: the function reset).
    /// </summary>
    public void Release()
    {
        if (Interlocked.Exchange(ref _released, 1) != 0)
        {
            return;
        }

        if (_bar0 != 0)
        {
            nint p = NvmeNative.mmap(_bar0, _bar0Size, NvmeNative.PROT_READ | NvmeNative.PROT_WRITE, NvmeNative.MAP_PRIVATE | NvmeNative.MAP_ANONYMOUS | NvmeNative.MAP_FIXED, -1, 0);
            if (p == _bar0)
            {
                // SAFETY: the anonymous mapping just made at _bar0, _bar0Size bytes.
                new Span<byte>((void*)_bar0, checked((int)_bar0Size)).Fill(0xFF);
            }
            else
            {
                // Could not replace it: unmap it (a late access would fault, but the device must go back).
                NvmeNative.munmap(_bar0, _bar0Size);
                _bar0 = 0;
            }
        }

        CloseDeviceAndGroup();
    }

    /// <summary>
    /// Closes the device fd (vfio-pci disables and resets the function when its last user closes it), then the group
    /// fd, detaching the group from the container. Idempotent; used by <see cref="Release"/> and <see cref="Dispose"/>.
    /// </summary>
    private void CloseDeviceAndGroup()
    {
        if (_deviceFd >= 0)
        {
            NvmeNative.close(_deviceFd);
            _deviceFd = -1;
        }

        if (_groupFd >= 0)
        {
            NvmeNative.close(_groupFd);
            _groupFd = -1;
            if (_attached)
            {
                _attached = false;
                Container.DetachGroup();
            }
        }
    }

    /// <summary>Function-level reset through VFIO (when the device supports one). Returns 0 or -errno.</summary>
    public int Reset() => NvmeNative.ioctl(_deviceFd, VfioIoctl.DeviceReset, 0) == 0 ? 0 : -NvmeNative.Errno;

    public void Dispose()
    {
        DisableInterrupts(); // after Release: no ioctl (the device fd is closed), the eventfds are closed
        if (_requestFd is not null)
        {
            if (_deviceFd >= 0)
            {
                VfioIrqSet set = default;
                set.Argsz = (uint)sizeof(VfioIrqSet);
                set.Flags = VfioIoctl.IrqSetDataNone | VfioIoctl.IrqSetActionTrigger;
                set.Index = VfioIoctl.PciReqIrqIndex;
                set.Start = 0;
                set.Count = 0;
                NvmeNative.ioctl(_deviceFd, VfioIoctl.DeviceSetIrqs, &set);
            }

            _requestFd.Dispose();
            _requestFd = null;
        }

        if (_bar0 != 0)
        {
            NvmeNative.munmap(_bar0, _bar0Size);
            _bar0 = 0;
        }

        CloseDeviceAndGroup();
    }
}
