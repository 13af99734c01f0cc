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
