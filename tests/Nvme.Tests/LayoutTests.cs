using System.Diagnostics;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using VhostBackend.Nvme;
using Xunit;

namespace VhostBackend.Nvme.Tests;

public class LayoutTests
{
    [Fact]
    public void VfioIoctlNumbersAreIoOfSemicolonAndBasePlusN()
    {
        // _IO(';', 100 + n) = 0x3B00 | (100 + n): linux/vfio.h.
        Assert.Equal(0x3B64UL, VfioIoctl.GetApiVersion);
        Assert.Equal(0x3B65UL, VfioIoctl.CheckExtension);
        Assert.Equal(0x3B66UL, VfioIoctl.SetIommu);
        Assert.Equal(0x3B67UL, VfioIoctl.GroupGetStatus);
        Assert.Equal(0x3B68UL, VfioIoctl.GroupSetContainer);
        Assert.Equal(0x3B69UL, VfioIoctl.GroupUnsetContainer);
        Assert.Equal(0x3B6AUL, VfioIoctl.GroupGetDeviceFd);
        Assert.Equal(0x3B6BUL, VfioIoctl.DeviceGetInfo);
        Assert.Equal(0x3B6CUL, VfioIoctl.DeviceGetRegionInfo);
        Assert.Equal(0x3B6FUL, VfioIoctl.DeviceReset);
        Assert.Equal(0x3B70UL, VfioIoctl.IommuGetInfo);
        Assert.Equal(0x3B71UL, VfioIoctl.IommuMapDma);
        Assert.Equal(0x3B72UL, VfioIoctl.IommuUnmapDma);
    }

    [Fact]
    public unsafe void VfioStructSizesAndOffsets()
    {
        Assert.Equal(8, sizeof(VfioGroupStatus));
        Assert.Equal(20, sizeof(VfioDeviceInfo));
        Assert.Equal(32, sizeof(VfioRegionInfo));
        Assert.Equal(16, (int)Marshal.OffsetOf<VfioRegionInfo>(nameof(VfioRegionInfo.Size)));
        Assert.Equal(24, (int)Marshal.OffsetOf<VfioRegionInfo>(nameof(VfioRegionInfo.Offset)));
        Assert.Equal(24, sizeof(VfioIommuType1Info));
        Assert.Equal(16, (int)Marshal.OffsetOf<VfioIommuType1Info>(nameof(VfioIommuType1Info.CapOffset)));
        Assert.Equal(8, sizeof(VfioInfoCapHeader));
        Assert.Equal(32, sizeof(VfioDmaMap));
        Assert.Equal(8, (int)Marshal.OffsetOf<VfioDmaMap>(nameof(VfioDmaMap.Vaddr)));
        Assert.Equal(16, (int)Marshal.OffsetOf<VfioDmaMap>(nameof(VfioDmaMap.Iova)));
        Assert.Equal(24, (int)Marshal.OffsetOf<VfioDmaMap>(nameof(VfioDmaMap.Size)));
        Assert.Equal(24, sizeof(VfioDmaUnmap));
        Assert.Equal(16, sizeof(VfioIrqInfo));
        Assert.Equal(12, (int)Marshal.OffsetOf<VfioIrqInfo>(nameof(VfioIrqInfo.Count)));
        Assert.Equal(20, sizeof(VfioIrqSet)); // the eventfds (s32) follow at offset 20, as data[] in linux/vfio.h
        Assert.Equal(16, (int)Marshal.OffsetOf<VfioIrqSet>(nameof(VfioIrqSet.Count)));
        Assert.Equal(0x3B6DUL, VfioIoctl.DeviceGetIrqInfo);
        Assert.Equal(0x3B6EUL, VfioIoctl.DeviceSetIrqs);
    }

    [Fact]
    public unsafe void NvmeStructSizesAndOffsets()
    {
        Assert.Equal(64, sizeof(NvmeCommand));
        Assert.Equal(16, sizeof(NvmeCompletion));
        Assert.Equal(16, sizeof(NvmeDsmRange));
        Assert.Equal(16, sizeof(NvmeIoVec));
        NvmeCommand c = default;
        byte* b = (byte*)&c;
        Assert.Equal(2, (int)((byte*)&c.Cid - b));
        Assert.Equal(4, (int)((byte*)&c.Nsid - b));
        Assert.Equal(24, (int)((byte*)&c.Prp1 - b));
        Assert.Equal(32, (int)((byte*)&c.Prp2 - b));
        Assert.Equal(40, (int)((byte*)&c.Cdw10 - b));
        Assert.Equal(60, (int)((byte*)&c.Cdw15 - b));
        NvmeCompletion e = default;
        byte* eb = (byte*)&e;
        Assert.Equal(8, (int)((byte*)&e.SqHead - eb));
        Assert.Equal(12, (int)((byte*)&e.Cid - eb));
        Assert.Equal(14, (int)((byte*)&e.StatusPhase - eb));
    }

    [Fact]
    public void CapDecodingAndControllerConfiguration()
    {
        // QEMU 7.2's CAP as read from the real device in the guest test.
        var cap = new NvmeCap(0x4018200f0107ffUL);
        Assert.Equal(2048, cap.MaxQueueEntries);
        Assert.True(cap.ContiguousQueuesRequired);
        Assert.Equal(15, cap.TimeoutUnits);
        Assert.Equal(TimeSpan.FromMilliseconds(7500), cap.Timeout);
        Assert.Equal(0, cap.DoorbellStride);
        Assert.True(cap.NvmCommandSet);
        Assert.Equal(0, cap.MpsMin);
        Assert.Equal(4, cap.MpsMax);

        uint cc = NvmeReg.MakeCc(0, enable: true);
        Assert.Equal(1u, cc & 1);
        Assert.Equal(6u, (cc >> 16) & 0xF); // IOSQES: 64-byte entries
        Assert.Equal(4u, (cc >> 20) & 0xF); // IOCQES: 16-byte entries
        Assert.Equal(0u, (cc >> 7) & 0xF);  // MPS: 4 KiB
        Assert.Equal(0u, (cc >> 14) & 3);   // no shutdown
    }

    [Theory]
    [InlineData(0, false, 0, 0x1000)]
    [InlineData(0, true, 0, 0x1004)]
    [InlineData(1, false, 0, 0x1008)]
    [InlineData(1, true, 0, 0x100C)]
    [InlineData(1, false, 2, 0x1020)]
    [InlineData(3, true, 1, 0x1038)]
    public void DoorbellOffsetsFollowTheStride(int qid, bool cq, int dstrd, int expected) =>
        Assert.Equal(expected, NvmeReg.DoorbellOffset(qid, cq, dstrd));

    [Fact]
    public void StatusFieldDecoding()
    {
        var s = new NvmeStatus((ushort)((NvmeSct.MediaError << 8) | NvmeSc.CompareFailure));
        Assert.True(s.IsCompareFailure);
        Assert.False(s.IsSuccess);
        Assert.Equal(0x285, s.SctSc);
        Assert.True(NvmeStatus.Success.IsSuccess);
        Assert.True(NvmeStatus.InternalDeviceError.DoNotRetry);
        Assert.Equal(NvmeSc.AbortedSqDeletion, NvmeStatus.AbortedSqDeletion.Sc);
    }

    [Theory]
    [InlineData("0000:00:04.0", "0000:00:04.0")]
    [InlineData("00:04.0", "0000:00:04.0")]
    [InlineData("0000:AF:1F.7", "0000:af:1f.7")]
    public void PciAddressesNormalize(string input, string expected) => Assert.Equal(expected, VfioPciDevice.NormalizeAddress(input));

    [Theory]
    [InlineData("")]
    [InlineData("0000:00:20.0")]
    [InlineData("0000:00:04.8")]
    [InlineData("../../etc")]
    [InlineData("0000:00:04")]
    public void BadPciAddressesAreRejected(string input) => Assert.False(VfioPciDevice.TryNormalizeAddress(input, out _));

    /// <summary>Compiles a C program against the system's linux/vfio.h and compares sizes/offsets/ioctl numbers.</summary>
    [Fact]
    public unsafe void LayoutsMatchTheKernelHeaders()
    {
        if (!File.Exists("/usr/include/linux/vfio.h") || !File.Exists("/usr/bin/cc"))
        {
            return; // no compiler here: the hard-coded checks above still run
        }

        string dir = Directory.CreateTempSubdirectory("vfio-layout").FullName;
        string c = Path.Combine(dir, "l.c");
        File.WriteAllText(c, """
            #include <stdio.h>
            #include <stddef.h>
            #include <linux/vfio.h>
            int main(void) {
              printf("%zu %zu %zu %zu %zu %zu\n", sizeof(struct vfio_group_status), sizeof(struct vfio_device_info),
                sizeof(struct vfio_region_info), sizeof(struct vfio_iommu_type1_info), sizeof(struct vfio_iommu_type1_dma_map),
                sizeof(struct vfio_iommu_type1_dma_unmap));
              printf("%zu %zu %zu\n", offsetof(struct vfio_region_info, size), offsetof(struct vfio_region_info, offset),
                offsetof(struct vfio_iommu_type1_info, cap_offset));
              printf("%lu %lu %lu %lu %lu %lu %lu\n", (unsigned long)VFIO_GET_API_VERSION, (unsigned long)VFIO_SET_IOMMU,
                (unsigned long)VFIO_GROUP_SET_CONTAINER, (unsigned long)VFIO_GROUP_GET_DEVICE_FD, (unsigned long)VFIO_DEVICE_GET_REGION_INFO,
                (unsigned long)VFIO_IOMMU_MAP_DMA, (unsigned long)VFIO_IOMMU_GET_INFO);
              return 0;
            }
            """);
        string exe = Path.Combine(dir, "l");
        Run("/usr/bin/cc", $"-o {exe} {c}");
        var lines = Run(exe, "").Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.Equal($"{sizeof(VfioGroupStatus)} {sizeof(VfioDeviceInfo)} {sizeof(VfioRegionInfo)} {sizeof(VfioIommuType1Info)} {sizeof(VfioDmaMap)} {sizeof(VfioDmaUnmap)}", lines[0]);
        Assert.Equal($"{Marshal.OffsetOf<VfioRegionInfo>("Size")} {Marshal.OffsetOf<VfioRegionInfo>("Offset")} {Marshal.OffsetOf<VfioIommuType1Info>("CapOffset")}", lines[1]);
        Assert.Equal($"{VfioIoctl.GetApiVersion} {VfioIoctl.SetIommu} {VfioIoctl.GroupSetContainer} {VfioIoctl.GroupGetDeviceFd} {VfioIoctl.DeviceGetRegionInfo} {VfioIoctl.IommuMapDma} {VfioIoctl.IommuGetInfo}", lines[2]);
        Directory.Delete(dir, true);
    }

    private static string Run(string file, string args)
    {
        var psi = new ProcessStartInfo(file, args) { RedirectStandardOutput = true, RedirectStandardError = true };
        using var p = Process.Start(psi)!;
        string output = p.StandardOutput.ReadToEnd();
        string err = p.StandardError.ReadToEnd();
        p.WaitForExit();
        Assert.True(p.ExitCode == 0, $"{file} failed: {err}");
        return output;
    }
}
