using System.Runtime.InteropServices;
using VhostBackend.Platform;
using VhostBackend.Virtio.Tests;
using VhostBackend.VhostUser;
using VhostBackend.Virtio;
using VhostBackend.Virtio.Blk;
using Xunit;

namespace VhostBackend.Vhost.Tests;

/// <summary>
/// Live-migration dirty logging through the protocol (QEMU's order: SET_LOG_BASE, SET_FEATURES with LOG_ALL, then
/// SET_VRING_ADDR with VHOST_VRING_F_LOG): the log is mapped and checked, LOG_ALL without a log is refused, and a
/// read's data pages and the used ring are marked in the front end's log (a memfd it can read).
/// </summary>
public sealed class DirtyLogSessionTests
{
    private const ulong WantProtocol = (1UL << VhostUserProtocolFeature.ReplyAck) | (1UL << VhostUserProtocolFeature.LogShmfd)
        | (1UL << VhostUserProtocolFeature.Mq);

    [Fact]
    public async Task ReadsAndUsedRingAreMarkedInTheLog()
    {
        await using var host = new VhostTestHost();
        host.Vhost.CreateBlkController("vhost.0", "Malloc0", null, readOnly: false);
        using var fe = host.Connect("vhost.0");
        var (features, proto) = fe.Negotiate(WantProtocol);
        Assert.NotEqual(0UL, features & (1UL << VhostUserConstants.LogAllBit));
        Assert.NotEqual(0UL, proto & (1UL << VhostUserProtocolFeature.LogShmfd));
        ulong want = (1UL << VirtioFeatures.Version1) | (1UL << VhostUserConstants.ProtocolFeaturesBit);

        // LOG_ALL before a log is accepted (QEMU's vhost_dev_start order while migrating: features, then the log);
        // logging starts once SET_LOG_BASE arrives, which is what the reads below check.
        Assert.Equal(0UL, fe.SetU64(VhostUserRequest.SetFeatures, want | (1UL << VhostUserConstants.LogAllBit)));

        using var m = new DriverRingModel(16);
        Assert.Equal(0UL, fe.SetMemTable(m));
        using var kick = new EventFd();
        using var call = new EventFd();
        Assert.Equal(0UL, fe.SetupQueue(m, 0, kick, call));
        Assert.Equal(0UL, fe.SetStruct(VhostUserRequest.SetVringEnable, new VhostUserVringState { Index = 0, Num = 1 }));

        // A log fd smaller than the size it claims is refused (reply 1), an empty log too.
        int small = MappedRegion.CreateMemFd("small-log", 64);
        try
        {
            Assert.Equal(1UL, SetLogBase(fe, small, 4096));
            Assert.Equal(1UL, SetLogBase(fe, small, 0));
        }
        finally
        {
            Fd.Close(small);
        }

        // The real log: 2 MiB of guest space from 0 needs 64 bytes; the model's memory ends at 3 MiB.
        const ulong logBytes = 128;
        int logFd = MappedRegion.CreateMemFd("dirty-log", (long)logBytes, @sealed: true);
        using var logMap = MappedRegion.Map(logFd, logBytes);
        try
        {
            Assert.Equal(0UL, SetLogBase(fe, logFd, logBytes));
        }
        finally
        {
            Fd.Close(logFd);
        }

        Assert.Equal(0UL, fe.SetStruct(VhostUserRequest.SetVringAddr, new VhostUserVringAddr
        {
            Index = 0,
            Flags = VhostUserVringAddr.FlagLog,
            DescUserAddr = m.ToUva(m.DescGpa),
            AvailUserAddr = m.ToUva(m.AvailGpa),
            UsedUserAddr = m.ToUva(m.UsedGpa),
            LogGuestAddr = m.UsedGpa,
        }));

        var drv = new BlkDriverModel(m);
        ulong rbuf = m.Alloc(8192, 4096);
        ulong st = drv.Post(VirtioBlkRequestType.In, 0, rbuf, 8192, deviceWritesData: true);
        kick.Signal();
        Assert.True(await VhostTestHost.WaitUntil(() => m.UsedIdx == 1), "read not completed");
        Assert.Equal(VirtioBlkRequestType.StatusOk, drv.Status(st));

        bool Dirty(ulong gpa)
        {
            ulong page = gpa >> 12;
            return (Marshal.ReadByte(logMap.Pointer + (nint)(page / 8)) & (1 << (int)(page % 8))) != 0;
        }

        Assert.True(Dirty(rbuf), "data page 1 not logged");
        Assert.True(Dirty(rbuf + 4096), "data page 2 not logged");
        Assert.True(Dirty(st), "status byte not logged");
        Assert.True(Dirty(m.UsedGpa), "used ring not logged");
        Assert.False(Dirty(rbuf + 65536), "a page nobody wrote is marked");

        // The sealed log drew no warning; an unsealed one does, once per session (like guest memory).
        const string Warning = "dirty log fd is not sealed against shrinking";
        Assert.DoesNotContain(host.Log.Lines, l => l.Contains(Warning, StringComparison.Ordinal));
        for (int i = 0; i < 2; i++)
        {
            int open = MappedRegion.CreateMemFd("open-log", (long)logBytes);
            try
            {
                Assert.Equal(0UL, SetLogBase(fe, open, logBytes));
            }
            finally
            {
                Fd.Close(open);
            }
        }

        Assert.Single(host.Log.Lines, l => l.Contains(Warning, StringComparison.Ordinal));
    }

    private static ulong SetLogBase(FrontEndModel fe, int fd, ulong size)
    {
        var log = new VhostUserLog { MmapSize = size, MmapOffset = 0 };
        fe.Send(VhostUserRequest.SetLogBase, log, [fd]);
        return fe.ReadU64Reply(VhostUserRequest.SetLogBase);
    }
}
