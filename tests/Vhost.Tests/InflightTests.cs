using System.Runtime.InteropServices;
using VhostBackend.Platform;
using VhostBackend.VhostUser;
using VhostBackend.Virtio;
using VhostBackend.Virtio.Blk;
using VhostBackend.Virtio.Tests;
using Xunit;

namespace VhostBackend.Vhost.Tests;

/// <summary>
/// In-flight tracking (INFLIGHT_SHMFD) through a real session and the vhost-blk device, with the front end model
/// playing QEMU: GET_INFLIGHT_FD hands out a sealed buffer, requests are marked in flight while taken and cleared
/// once their used entry is published; a second session given the buffer a "crashed" back end left (heads taken,
/// never completed) resubmits them first, in the order they were taken, and then continues with the ring.
/// </summary>
public sealed class InflightTests
{
    private const ulong WantProtocol = (1UL << VhostUserProtocolFeature.ReplyAck) | (1UL << VhostUserProtocolFeature.Config)
        | (1UL << VhostUserProtocolFeature.Mq) | (1UL << VhostUserProtocolFeature.ConfigureMemSlots) | (1UL << VhostUserProtocolFeature.InflightShmfd);

    private const ushort QueueSize = 16;

    [Fact]
    public async Task RequestsLeftInFlightAreResubmittedInOrderByTheNextSession()
    {
        await using var host = new VhostTestHost(reactors: 1);
        var ctrl = host.Vhost.CreateBlkController("inf", "Malloc0", null, readOnly: false);
        using var m = new DriverRingModel(QueueSize);
        var drv = new BlkDriverModel(m);
        int inflightFd;
        ulong inflightSize;

        // Session A: gets the buffer, does three writes; none stays marked once completed.
        using (var fe = Open(host, m))
        {
            var inf = new VhostUserInflight { NumQueues = 1, QueueSize = QueueSize };
            fe.Send(VhostUserRequest.GetInflightFd, inf);
            var reply = fe.ReadReplyWithFd() ?? throw new InvalidOperationException("no GET_INFLIGHT_FD reply");
            var got = MemoryMarshal.Read<VhostUserInflight>(reply.Payload);
            inflightFd = reply.Fd;
            Assert.True(inflightFd >= 0, "no fd with the GET_INFLIGHT_FD reply");
            Assert.Equal(InflightQueue.RegionBytes(QueueSize), got.MmapSize);
            Assert.Equal(0UL, got.MmapOffset);
            Assert.Equal(Fd.SealShrink | Fd.SealGrow | Fd.SealSeal, Fd.GetSeals(inflightFd) & 7);
            inflightSize = got.MmapSize;
            fe.Send(VhostUserRequest.SetInflightFd, got, [inflightFd], needReply: true);
            Assert.Equal(0UL, fe.ReadU64Reply(VhostUserRequest.SetInflightFd));

            using var call = new EventFd();
            Assert.Equal(0UL, fe.SetMemTable(m));
            Assert.Equal(0UL, fe.SetupQueue(m, 0, null, call));
            for (int i = 0; i < 3; i++)
            {
                drv.Post(VirtioBlkRequestType.Out, (ulong)(8 * i), Pattern(m, (byte)(0x10 + i)), 4096, deviceWritesData: false);
            }

            Assert.True(await VhostTestHost.WaitUntil(() => m.UsedIdx == 3), "session A's writes did not complete");
        }

        Assert.True(await VhostTestHost.WaitUntil(() => ctrl.Sessions.Count == 0), "session A did not close");
        using var region = MappedRegion.Map(inflightFd, inflightSize);
        var view = new InflightQueue(region.Pointer, QueueSize);
        for (ushort h = 0; h < QueueSize; h++)
        {
            Assert.False(view.IsInflight(h), $"head {h} still marked in flight after a clean stop");
        }

        // What a back end killed mid-I/O leaves: the guest published three more writes; the back end had taken
        // the first two (in the order: second, then first) and completed neither; it never saw the third.
        ushort firstNew = (ushort)m.UsedIdx;
        int before = (int)(m.UsedIdx);
        ulong w1 = drv.Post(VirtioBlkRequestType.Out, 40, Pattern(m, 0xA1), 4096, deviceWritesData: false);
        ulong w2 = drv.Post(VirtioBlkRequestType.Out, 48, Pattern(m, 0xA2), 4096, deviceWritesData: false);
        ulong w3 = drv.Post(VirtioBlkRequestType.Out, 56, Pattern(m, 0xA3), 4096, deviceWritesData: false);
        ushort h1 = AvailHead(m, firstNew), h2 = AvailHead(m, (ushort)(firstNew + 1)), h3 = AvailHead(m, (ushort)(firstNew + 2));
        view.Begin(h2);
        view.Begin(h1);

        // Session B (the restarted back end): QEMU hands the buffer back and restores the ring base to used.idx.
        using (var fe = Open(host, m))
        {
            fe.Send(VhostUserRequest.SetInflightFd, new VhostUserInflight { MmapSize = inflightSize, NumQueues = 1, QueueSize = QueueSize }, [inflightFd], needReply: true);
            Assert.Equal(0UL, fe.ReadU64Reply(VhostUserRequest.SetInflightFd));
            using var call = new EventFd();
            Assert.Equal(0UL, fe.SetMemTable(m));
            Assert.Equal(0UL, fe.SetupQueue(m, 0, null, call, vringBase: m.UsedIdx));
            Assert.True(await VhostTestHost.WaitUntil(() => m.UsedIdx == before + 3), $"resubmitted requests did not complete (used {m.UsedIdx})");

            // The two left in flight first, in the order they were taken; then the one never taken; each once.
            Assert.Equal(h2, (ushort)m.Used(before).Id);
            Assert.Equal(h1, (ushort)m.Used(before + 1).Id);
            Assert.Equal(h3, (ushort)m.Used(before + 2).Id);
            Assert.Equal(VirtioBlkRequestType.StatusOk, drv.Status(w1));
            Assert.Equal(VirtioBlkRequestType.StatusOk, drv.Status(w2));
            Assert.Equal(VirtioBlkRequestType.StatusOk, drv.Status(w3));
            Assert.False(view.IsInflight(h1) || view.IsInflight(h2) || view.IsInflight(h3), "completed requests still marked in flight");

            // The data landed and the queue goes on as usual.
            foreach (var (sector, fill) in new[] { (40UL, (byte)0xA1), (48UL, (byte)0xA2), (56UL, (byte)0xA3), (8UL, (byte)0x11) })
            {
                ulong buf = m.Alloc(4096, 4096);
                ulong st = drv.Post(VirtioBlkRequestType.In, sector, buf, 4096, deviceWritesData: true);
                int target = m.UsedIdx + 1;
                Assert.True(await VhostTestHost.WaitUntil(() => m.UsedIdx == target), "read back did not complete");
                Assert.Equal(VirtioBlkRequestType.StatusOk, drv.Status(st));
                Assert.True(m.Bytes(buf, 4096).IndexOfAnyExcept(fill) < 0, $"sector {sector} does not hold 0x{fill:x2}");
            }
        }

        Fd.Close(inflightFd);
    }

    [Fact]
    public async Task HostileInflightBuffersAreRefused()
    {
        await using var host = new VhostTestHost(reactors: 1);
        host.Vhost.CreateBlkController("inf2", "Malloc0", null, readOnly: false);
        using var m = new DriverRingModel(QueueSize);
        using var fe = Open(host, m);

        // A memfd shorter than the size it declares: mapping it would fault on first touch (SIGBUS).
        int shortFd = MappedRegion.CreateMemFd("short", 64);
        fe.Send(VhostUserRequest.SetInflightFd, new VhostUserInflight { MmapSize = InflightQueue.RegionBytes(QueueSize), NumQueues = 1, QueueSize = QueueSize }, [shortFd], needReply: true);
        Assert.NotEqual(0UL, fe.ReadU64Reply(VhostUserRequest.SetInflightFd));

        // Sizes and counts out of range.
        int fd = MappedRegion.CreateMemFd("ok", 1 << 20);
        foreach (var bad in new[]
        {
            new VhostUserInflight { MmapSize = 1 << 20, NumQueues = 0, QueueSize = QueueSize },
            new VhostUserInflight { MmapSize = 1 << 20, NumQueues = 200, QueueSize = QueueSize },
            new VhostUserInflight { MmapSize = 1 << 20, NumQueues = 1, QueueSize = 100 },
            new VhostUserInflight { MmapSize = 16, NumQueues = 1, QueueSize = QueueSize },
            new VhostUserInflight { MmapSize = 4096, MmapOffset = 100, NumQueues = 1, QueueSize = QueueSize },
        })
        {
            fe.Send(VhostUserRequest.SetInflightFd, bad, [fd], needReply: true);
            Assert.NotEqual(0UL, fe.ReadU64Reply(VhostUserRequest.SetInflightFd));
        }

        // GET with a queue count the device does not have: an empty reply, no fd.
        fe.Send(VhostUserRequest.GetInflightFd, new VhostUserInflight { NumQueues = 500, QueueSize = QueueSize });
        var r = fe.ReadReplyWithFd() ?? throw new InvalidOperationException("no reply");
        Assert.Equal(-1, r.Fd);
        Assert.Equal(0UL, MemoryMarshal.Read<VhostUserInflight>(r.Payload).MmapSize);

        // A region whose heads and batch list are garbage (a hostile front end wrote it): the queue starts, no
        // crash, only heads inside the ring are resubmitted.
        using (var map = MappedRegion.Map(fd, 1 << 20))
        {
            Marshal.Copy(Enumerable.Repeat((byte)0xFF, (int)InflightQueue.RegionBytes(QueueSize)).ToArray(), 0, map.Pointer, (int)InflightQueue.RegionBytes(QueueSize));
            Marshal.WriteInt16(map.Pointer + 8, 1); // version 1
            Marshal.WriteInt16(map.Pointer + 10, (short)QueueSize); // desc_num matches: the content is interpreted
        }

        fe.Send(VhostUserRequest.SetInflightFd, new VhostUserInflight { MmapSize = InflightQueue.RegionBytes(QueueSize), NumQueues = 1, QueueSize = QueueSize }, [fd], needReply: true);
        Assert.Equal(0UL, fe.ReadU64Reply(VhostUserRequest.SetInflightFd));
        using var call = new EventFd();
        Assert.Equal(0UL, fe.SetMemTable(m));
        Assert.Equal(0UL, fe.SetupQueue(m, 0, null, call));

        // All 16 heads claim to be in flight; their (zeroed) descriptors are invalid requests: each fails cleanly.
        Assert.True(await VhostTestHost.WaitUntil(() => m.UsedIdx == QueueSize), $"garbage resubmissions not all answered (used {m.UsedIdx})");
        Assert.Single(host.Vhost.Find("inf2")!.Sessions);
        Fd.Close(shortFd);
        Fd.Close(fd);
    }

    private static FrontEndModel Open(VhostTestHost host, DriverRingModel m)
    {
        var fe = host.Connect(host.Vhost.Controllers[^1].Name);
        var (_, proto) = fe.Negotiate(WantProtocol);
        Assert.NotEqual(0UL, proto & (1UL << VhostUserProtocolFeature.InflightShmfd));
        Assert.Equal(0UL, fe.SetU64(VhostUserRequest.SetFeatures, (1UL << VirtioFeatures.Version1) | (1UL << VhostUserConstants.ProtocolFeaturesBit)));
        return fe;
    }

    private static ulong Pattern(DriverRingModel m, byte fill)
    {
        ulong buf = m.Alloc(4096, 4096);
        m.Bytes(buf, 4096).Fill(fill);
        return buf;
    }

    private static ushort AvailHead(DriverRingModel m, ushort availIdx) =>
        MemoryMarshal.Read<ushort>(m.Bytes(m.AvailGpa + 4 + (2UL * (ulong)(availIdx % m.Size)), 2));
}
