using VhostBackend.Platform;
using Xunit;

namespace VhostBackend.VhostUser.Tests;

public class GuestMemoryTableTests
{
    private const ulong Page = 4096;

    private static VhostUserMemoryRegion Region(ulong gpa, ulong size, ulong offset = 0) =>
        new() { GuestPhysAddr = gpa, MemorySize = size, UserspaceAddr = 0x7f00_0000_0000 + gpa, MmapOffset = offset };

    [Fact]
    public void RegionLargerThanItsFileIsRefused()
    {
        int fd = MappedRegion.CreateMemFd("vu-test", (long)(4 * Page));
        try
        {
            Assert.Equal(MemoryRegionError.PastEndOfFile, GuestMemoryTable.TryMap(Region(0, 8 * Page), fd, [], out _));
            Assert.Equal(MemoryRegionError.PastEndOfFile, GuestMemoryTable.TryMap(Region(0, 2 * Page, 3 * Page), fd, [], out _));
            Assert.Equal(MemoryRegionError.PastEndOfFile, GuestMemoryTable.TryMap(Region(0, Page, 5 * Page), fd, [], out _));
            Assert.Equal(MemoryRegionError.BadRange, GuestMemoryTable.TryMap(Region(0, 0), fd, [], out _));
            Assert.Equal(MemoryRegionError.StatFailed, GuestMemoryTable.TryMap(Region(0, Page), -1, [], out _));

            Assert.Equal(MemoryRegionError.None, GuestMemoryTable.TryMap(Region(0, 2 * Page, 2 * Page), fd, [], out var m));
            using (m.Map)
            {
                Assert.Equal(2 * Page, m.Region.Size);
            }
        }
        finally
        {
            Fd.Close(fd);
        }
    }

    /// <summary>
    /// A front end's region from <see cref="MappedRegion.CreateShared"/> (virtio-user): 2 MiB-rounded, 2 MiB-aligned,
    /// sealed, and accepted by the back end's table with its whole size (fstat agrees), its bytes shared.
    /// </summary>
    [Fact]
    public void SharedFrontEndRegionIsTwoMiBAlignedSealedAndMapsOnTheBackEnd()
    {
        const ulong TwoMiB = 2UL << 20;
        using var front = MappedRegion.CreateShared("vu-shared-test", (3 * TwoMiB) + 4096, out int fd, out bool huge);
        try
        {
            Assert.Equal(4 * TwoMiB, front.Length);
            Assert.Equal(0L, front.Pointer % (long)TwoMiB);
            int seals = Fd.GetSeals(fd);
            Assert.True(seals >= 0 && (seals & Fd.SealShrink) != 0 && (seals & Fd.SealGrow) != 0, $"seals 0x{seals:x}, huge pages {huge}");

            var r = new VhostUserMemoryRegion { GuestPhysAddr = 0, MemorySize = front.Length, UserspaceAddr = (ulong)front.Pointer };
            Assert.Equal(MemoryRegionError.None, GuestMemoryTable.TryMap(r, fd, [], out var m));
            using (m.Map)
            {
                var table = new Virtio.GuestMemory([m.Region]);
                Assert.True(table.TryTranslateGpa(front.Length - 8, 8, out _));
                Assert.False(table.TryTranslateGpa(front.Length - 4, 8, out _));
                System.Runtime.InteropServices.Marshal.WriteInt64(front.Pointer + (nint)TwoMiB + 16, 0x1122334455667788);
                Assert.Equal(0x1122334455667788, System.Runtime.InteropServices.Marshal.ReadInt64(m.Map.Pointer + (nint)TwoMiB + 16));
            }

            // One byte more than the rounded size is past the end of the file.
            Assert.Equal(MemoryRegionError.PastEndOfFile, GuestMemoryTable.TryMap(r with { MemorySize = front.Length + 4096 }, fd, [], out _));
        }
        finally
        {
            Fd.Close(fd);
        }
    }

    [Fact]
    public void SetMemTableMapsAllOrNothingAndViewsArePublished()
    {
        int fd = MappedRegion.CreateMemFd("vu-test", (long)(4 * Page));
        using var table = new GuestMemoryTable(maxSlots: 3);
        try
        {
            // The second region overlaps the first: nothing is kept.
            Assert.Equal(MemoryRegionError.Overlap, GuestMemoryTable.TryMapAll([Region(0, 2 * Page), Region(Page, Page, 2 * Page)], [fd, fd], out _, out int failed));
            Assert.Equal(1, failed);

            Assert.Equal(MemoryRegionError.None, GuestMemoryTable.TryMapAll([Region(0, 2 * Page), Region(0x10_0000, 2 * Page, 2 * Page)], [fd, fd], out var mapped, out _));
            table.ReplaceAll(mapped);
            Assert.Equal(2, table.Count);
            Assert.True(table.Memory.TryTranslateGpa(0x10_0000 + 100, 8, out _));
            Assert.False(table.Memory.TryTranslateGpa(0x10_0000 + (2 * Page), 1, out _));

            // ADD_MEM_REG up to the slot limit; REM_MEM_REG of an unknown region finds nothing.
            Assert.Equal(MemoryRegionError.None, table.TryAdd(Region(0x20_0000, Page), fd));
            Assert.Equal(MemoryRegionError.NoFreeSlot, table.TryAdd(Region(0x30_0000, Page), fd));
            Assert.Equal(-1, table.Find(Region(0x40_0000, Page)));
            int i = table.Find(Region(0x20_0000, Page));
            Assert.True(i >= 0);
            table.RemoveAt(i);
            Assert.Equal(2, table.Count);
            Assert.False(table.Memory.TryTranslateGpa(0x20_0000, 1, out _));
        }
        finally
        {
            Fd.Close(fd);
        }
    }
}
