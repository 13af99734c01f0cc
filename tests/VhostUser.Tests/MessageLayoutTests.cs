using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using VhostBackend.Virtio.Blk;
using VhostBackend.Virtio.Scsi;
using Xunit;

namespace VhostBackend.VhostUser.Tests;

/// <summary>Wire layouts against docs/interop/vhost-user.rst and the virtio 1.1 spec.</summary>
public class MessageLayoutTests
{
    private static int Off<T>(string field) => (int)Marshal.OffsetOf<T>(field);

    [Fact]
    public void VhostUserStructsHaveTheSpecSizesAndOffsets()
    {
        Assert.Equal(12, Unsafe.SizeOf<VhostUserHeader>());
        Assert.Equal(0, Off<VhostUserHeader>(nameof(VhostUserHeader.Request)));
        Assert.Equal(4, Off<VhostUserHeader>(nameof(VhostUserHeader.Flags)));
        Assert.Equal(8, Off<VhostUserHeader>(nameof(VhostUserHeader.Size)));

        Assert.Equal(32, Unsafe.SizeOf<VhostUserMemoryRegion>());
        Assert.Equal(0, Off<VhostUserMemoryRegion>(nameof(VhostUserMemoryRegion.GuestPhysAddr)));
        Assert.Equal(8, Off<VhostUserMemoryRegion>(nameof(VhostUserMemoryRegion.MemorySize)));
        Assert.Equal(16, Off<VhostUserMemoryRegion>(nameof(VhostUserMemoryRegion.UserspaceAddr)));
        Assert.Equal(24, Off<VhostUserMemoryRegion>(nameof(VhostUserMemoryRegion.MmapOffset)));

        Assert.Equal(8, Unsafe.SizeOf<VhostUserMemoryHeader>());
        Assert.Equal(40, Unsafe.SizeOf<VhostUserSingleMemoryRegion>());
        Assert.Equal(8, Off<VhostUserSingleMemoryRegion>(nameof(VhostUserSingleMemoryRegion.Region)));

        Assert.Equal(8, Unsafe.SizeOf<VhostUserVringState>());
        Assert.Equal(4, Off<VhostUserVringState>(nameof(VhostUserVringState.Num)));

        Assert.Equal(40, Unsafe.SizeOf<VhostUserVringAddr>());
        Assert.Equal(4, Off<VhostUserVringAddr>(nameof(VhostUserVringAddr.Flags)));
        Assert.Equal(8, Off<VhostUserVringAddr>(nameof(VhostUserVringAddr.DescUserAddr)));
        Assert.Equal(16, Off<VhostUserVringAddr>(nameof(VhostUserVringAddr.UsedUserAddr)));
        Assert.Equal(24, Off<VhostUserVringAddr>(nameof(VhostUserVringAddr.AvailUserAddr)));
        Assert.Equal(32, Off<VhostUserVringAddr>(nameof(VhostUserVringAddr.LogGuestAddr)));

        Assert.Equal(12, Unsafe.SizeOf<VhostUserConfigHeader>());
        Assert.Equal(4, Off<VhostUserConfigHeader>(nameof(VhostUserConfigHeader.Size)));
        Assert.Equal(8, Off<VhostUserConfigHeader>(nameof(VhostUserConfigHeader.Flags)));
    }

    [Fact]
    public void VirtioBlkAndScsiStructsHaveTheSpecSizesAndOffsets()
    {
        Assert.Equal(VirtioBlkOutHeader.Size, Unsafe.SizeOf<VirtioBlkOutHeader>());
        Assert.Equal(VirtioBlkDiscardWriteZeroes.Size, Unsafe.SizeOf<VirtioBlkDiscardWriteZeroes>());
        Assert.Equal(8, Off<VirtioBlkOutHeader>(nameof(VirtioBlkOutHeader.Sector)));
        Assert.Equal(16, Unsafe.SizeOf<VirtioBlkDiscardWriteZeroes>());
        Assert.Equal(60, Unsafe.SizeOf<VirtioBlkConfig>());

        Assert.Equal(VirtioScsi.CmdReqSize, Unsafe.SizeOf<VirtioScsiCmdReq>());
        Assert.Equal(8, Off<VirtioScsiCmdReq>(nameof(VirtioScsiCmdReq.Tag)));
        Assert.Equal(16, Off<VirtioScsiCmdReq>(nameof(VirtioScsiCmdReq.TaskAttr)));
        Assert.Equal(19, Off<VirtioScsiCmdReq>(nameof(VirtioScsiCmdReq.Cdb)));
        Assert.Equal(VirtioScsi.CmdRespSize, Unsafe.SizeOf<VirtioScsiCmdResp>());
        Assert.Equal(10, Off<VirtioScsiCmdResp>(nameof(VirtioScsiCmdResp.Status)));
        Assert.Equal(11, Off<VirtioScsiCmdResp>(nameof(VirtioScsiCmdResp.Response)));
        Assert.Equal(VirtioScsi.CmdRespHeaderSize, Off<VirtioScsiCmdResp>(nameof(VirtioScsiCmdResp.Sense)));
        Assert.Equal(VirtioScsi.TmfReqSize, Unsafe.SizeOf<VirtioScsiCtrlTmfReq>());
        Assert.Equal(8, Off<VirtioScsiCtrlTmfReq>(nameof(VirtioScsiCtrlTmfReq.Lun)));
        Assert.Equal(16, Off<VirtioScsiCtrlTmfReq>(nameof(VirtioScsiCtrlTmfReq.Tag)));
        Assert.Equal(VirtioScsi.AnRespSize, Unsafe.SizeOf<VirtioScsiCtrlAnResp>());
        Assert.Equal(VirtioScsi.EventSize, Unsafe.SizeOf<VirtioScsiEvent>());
        Assert.Equal(12, Off<VirtioScsiEvent>(nameof(VirtioScsiEvent.Reason)));
        Assert.Equal(VirtioScsiConfig.Size, Unsafe.SizeOf<VirtioScsiConfig>());
    }

    [Fact]
    public void PayloadValidationRefusesReservedBitsMisalignmentAndRanges()
    {
        var h = new VhostUserHeader { Request = 1, Flags = VhostUserConstants.Version, Size = 0 };
        Assert.True(h.IsValid(reply: false));
        Assert.False(h.IsValid(reply: true));
        Assert.False((h with { Flags = 2 }).IsValid(false));                         // version 2
        Assert.False((h with { Flags = 1 | 0x10 }).IsValid(false));                  // unknown flag
        Assert.False((h with { Size = VhostUserConstants.MaxPayload + 1 }).IsValid(false));
        Assert.True((h with { Flags = 1 | VhostUserConstants.FlagReply }).IsValid(true));

        var r = new VhostUserMemoryRegion { GuestPhysAddr = 0, MemorySize = 4096, UserspaceAddr = 0x1000, MmapOffset = 0 };
        Assert.True(r.IsValid);
        Assert.False((r with { MemorySize = 0 }).IsValid);
        Assert.False((r with { GuestPhysAddr = ulong.MaxValue - 100 }).IsValid);
        Assert.False((r with { MmapOffset = ulong.MaxValue - 100 }).IsValid);
        Assert.False((r with { UserspaceAddr = ulong.MaxValue }).IsValid);

        var mh = new VhostUserMemoryHeader { NRegions = 2 };
        Assert.True(mh.IsValid(8 + 64));
        Assert.False(mh.IsValid(8 + 32));
        Assert.False((mh with { Padding = 1 }).IsValid(8 + 64));
        Assert.False((mh with { NRegions = 9 }).IsValid(8 + (9 * 32)));
        Assert.False((mh with { NRegions = 0 }).IsValid(8));

        var a = new VhostUserVringAddr { Index = 1, DescUserAddr = 0x1000, AvailUserAddr = 0x2002, UsedUserAddr = 0x3004 };
        Assert.True(a.IsValid(2));
        Assert.False(a.IsValid(1));                                                  // index
        Assert.False((a with { Flags = 2 }).IsValid(2));                             // reserved flag
        Assert.False((a with { DescUserAddr = 0x1008 }).IsValid(2));                 // desc 16-aligned
        Assert.False((a with { AvailUserAddr = 0x2001 }).IsValid(2));                // avail 2-aligned
        Assert.False((a with { UsedUserAddr = 0x3002 }).IsValid(2));                 // used 4-aligned

        Assert.True(new VhostUserVringFile(1).IsValid(2, 1));
        Assert.True(new VhostUserVringFile(1 | VhostUserConstants.VringNoFdMask).IsValid(2, 0));
        Assert.False(new VhostUserVringFile(1 | VhostUserConstants.VringNoFdMask).IsValid(2, 1)); // fd despite "no fd"
        Assert.False(new VhostUserVringFile(1).IsValid(2, 0));                       // missing fd
        Assert.False(new VhostUserVringFile(1 | 0x200).IsValid(2, 1));               // reserved bit
        Assert.False(new VhostUserVringFile(5).IsValid(2, 1));                       // index

        var c = new VhostUserConfigHeader { Offset = 0, Size = 60 };
        Assert.True(c.IsValid(72));
        Assert.False(c.IsValid(71));
        Assert.False((c with { Offset = 200 }).IsValid(72));
        Assert.False((c with { Flags = 2 }).IsValid(72));
        Assert.False((c with { Size = 300 }).IsValid(312));

        Assert.True(new VhostUserVringState { Index = 0 }.IsValid(1));
        Assert.False(new VhostUserVringState { Index = 1 }.IsValid(1));
    }
}
