using System.Runtime.InteropServices;
using VhostBackend.Platform;
using VhostBackend.VhostUser;
using VhostBackend.Virtio;
using VhostBackend.Virtio.Blk;
using VhostBackend.Virtio.Tests;
using Xunit;

namespace VhostBackend.Vhost.Tests;

/// <summary>
/// In-flight tracking for packed rings (QEMU's QueueRegionPacked) through a real session and the vhost-blk device,
/// with models on both sides: the packed driver model plays the guest, the front end model plays QEMU, and a
/// "killed back end" is modelled by an <see cref="InflightPackedQueue"/> driven by hand on the model's ring (it takes
/// buffers, completes one out of order, dies in the middle of completing another). The next session must find the
/// ring position in the region (QEMU sends a stale base for packed rings after a back-end crash), resubmit what was
/// in flight from the descriptor copies the region keeps (the ring slots were reused meanwhile), and go on.
/// Corrupted regions are refused with an error and nothing written: no crash, no hang.
/// </summary>
public sealed class PackedInflightModelTests
{
    private const ulong WantProtocol = (1UL << VhostUserProtocolFeature.ReplyAck) | (1UL << VhostUserProtocolFeature.Config)
        | (1UL << VhostUserProtocolFeature.Mq) | (1UL << VhostUserProtocolFeature.ConfigureMemSlots) | (1UL << VhostUserProtocolFeature.InflightShmfd);

    private const ushort QueueSize = 16;

    [Fact]
    public async Task Model_packed_requests_left_in_flight_by_a_killed_session_are_resubmitted_by_the_next()
    {
        await using var host = new VhostTestHost(reactors: 1);
        var ctrl = host.Vhost.CreateBlkController("pinf", "Malloc0", null, readOnly: false, packedRing: true);
        using var p = new PackedDriverModel(QueueSize);
        var status = new Dictionary<ushort, ulong>();
        int inflightFd;
        ulong inflightSize;

        // Session A: GET_INFLIGHT_FD sized for the packed layout; three writes complete and leave nothing marked.
        using (var fe = Open(host))
        {
            fe.Send(VhostUserRequest.GetInflightFd, new VhostUserInflight { NumQueues = 1, QueueSize = QueueSize });
            var reply = fe.ReadReplyWithFd() ?? throw new InvalidOperationException("no GET_INFLIGHT_FD reply");
            var got = MemoryMarshal.Read<VhostUserInflight>(reply.Payload);
            inflightFd = reply.Fd;
            Assert.True(inflightFd >= 0, "no fd with the GET_INFLIGHT_FD reply");
            Assert.Equal(InflightPackedQueue.RegionBytes(QueueSize), got.MmapSize);
            inflightSize = got.MmapSize;
            fe.Send(VhostUserRequest.SetInflightFd, got, [inflightFd], needReply: true);
            Assert.Equal(0UL, fe.ReadU64Reply(VhostUserRequest.SetInflightFd));

            using var call = new EventFd();
            Assert.Equal(0UL, fe.SetMemTable(p));
            Assert.Equal(0UL, fe.SetupPackedQueue(p, 0, null, call));
            for (ushort id = 0; id < 3; id++)
            {
                status[id] = PostWrite(p, id, (ulong)(8 * id), (byte)(0x10 + id));
            }

            var done = new List<ushort>();
            Assert.True(await VhostTestHost.WaitUntil(() => Drain(p, done) == 3), $"session A's writes did not complete ({done.Count})");
        }

        Assert.True(await VhostTestHost.WaitUntil(() => ctrl.Sessions.Count == 0), "session A did not close");
        using var region = MappedRegion.Map(inflightFd, inflightSize);
        var probe = new InflightPackedQueue(region.Pointer, QueueSize);
        Assert.Equal(0, probe.CountInflightEntries());

        // The killed back end: it restarted on the region (ring at slot 9), took W1 (id 3), W2 (id 4) and W3 (id 5),
        // completed W2 out of order (its used descriptor overwrote W1's first slot), and died after recording W3's
        // completion in the region but before writing its used descriptor. It never took W4 (id 6).
        status[3] = PostWrite(p, 3, 40, 0xA1);
        status[4] = PostWrite(p, 4, 48, 0xA2);
        status[5] = PostWrite(p, 5, 56, 0xA3);
        status[6] = PostWrite(p, 6, 64, 0xA4);
        var dead = p.CreateDeviceQueue(0x8000_8000u | 9u | (9u << 16));
        var deadRegion = new InflightPackedQueue(region.Pointer, QueueSize);
        Assert.True(deadRegion.TryRecover(dead, out var rec0, out string err0), err0);
        Assert.Empty(rec0.Resubmit);
        deadRegion.Attach(dead, rec0);
        for (int i = 0; i < 3; i++)
        {
            Assert.Equal(PopResult.Popped, dead.TryPop(out ushort id));
            deadRegion.Begin(id);
        }

        Complete(dead, deadRegion, 4); // W2 done (the model does not write its data: sector 48 is not checked below)
        deadRegion.AddUsed(5); // W3: the region says "used", the ring never got the descriptor
        Assert.Equal(2, deadRegion.CountInflightEntries()); // W1 and W3 (W2 was cleared)

        // The guest sees W2 done, and reuses its id and ring slots: W5 (id 4) and W6 (id 7), the latter over W1's
        // original slots. W1 can now be recovered only from the region's copies.
        var seen = new List<ushort>();
        Assert.Equal(1, Drain(p, seen));
        Assert.Equal((ushort)4, seen[0]);
        status[4] = PostWrite(p, 4, 72, 0xA5);
        status[7] = PostWrite(p, 7, 80, 0xA6);

        // Session B (the restarted back end): QEMU hands the buffer back and, for a packed ring, a stale base.
        using (var fe = Open(host))
        {
            fe.Send(VhostUserRequest.SetInflightFd, new VhostUserInflight { MmapSize = inflightSize, NumQueues = 1, QueueSize = QueueSize }, [inflightFd], needReply: true);
            Assert.Equal(0UL, fe.ReadU64Reply(VhostUserRequest.SetInflightFd));
            using var call = new EventFd();
            Assert.Equal(0UL, fe.SetMemTable(p));
            Assert.Equal(0UL, fe.SetupPackedQueue(p, 0, null, call, PackedVirtqueue.InitialBase));

            var done = new List<ushort>();
            Assert.True(await VhostTestHost.WaitUntil(() => Drain(p, done) == 5), $"resubmitted and new requests did not all complete (used ids {string.Join(",", done)})");

            // W1 then W3 (the order they were taken), then W4, W5, W6 from the ring; each once.
            Assert.Equal((ushort)3, done[0]);
            Assert.Equal((ushort)5, done[1]);
            Assert.Equal(new ushort[] { 4, 6, 7 }, done.Skip(2).Order().ToArray());
            foreach (ushort id in new ushort[] { 3, 5, 6, 4, 7 })
            {
                Assert.Equal(VirtioBlkRequestType.StatusOk, StatusOf(p, status[id]));
            }

            // The data landed (W1 from the copies, although its slots now hold W6), and the queue goes on.
            foreach (var (sector, fill) in new[] { (40UL, (byte)0xA1), (56UL, (byte)0xA3), (64UL, (byte)0xA4), (72UL, (byte)0xA5), (80UL, (byte)0xA6), (8UL, (byte)0x11) })
            {
                ulong buf = p.Alloc(4096, 4096);
                ulong st = PostRead(p, 0, sector, buf);
                var one = new List<ushort>();
                Assert.True(await VhostTestHost.WaitUntil(() => Drain(p, one) == 1), $"read of sector {sector} did not complete");
                Assert.Equal(VirtioBlkRequestType.StatusOk, StatusOf(p, st));
                Assert.True(HoldsOnly(p, buf, fill), $"sector {sector} does not hold 0x{fill:x2}");
            }
        }

        Assert.True(await VhostTestHost.WaitUntil(() => ctrl.Sessions.Count == 0), "session B did not close");
        Assert.Equal(0, probe.CountInflightEntries());
        Fd.Close(inflightFd);
    }

    public static TheoryData<string> Corruptions() =>
    [
        "free list loops", "free_head out of range", "wrap counter 2", "used_idx out of range", "head with num 0", "head with num past the ring",
        "chain runs into the free list", "two heads share an entry", "buffer id twice", "buffer id out of range", "chain not ending at last",
        "indirect in a chain", "desc_num not the queue size", "version 7", "entries unaccounted", "inflight 0xff", "all 0xff",
    ];

    [Theory]
    [MemberData(nameof(Corruptions))]
    public async Task Model_a_corrupted_packed_inflight_region_is_refused_with_an_error_and_no_crash(string corruption)
    {
        await using var host = new VhostTestHost(reactors: 1);
        var ctrl = host.Vhost.CreateBlkController("pbad", "Malloc0", null, readOnly: false, packedRing: true);
        using var p = new PackedDriverModel(QueueSize);

        // Two chains the guest made available and a back end took (ids 0 and 1, ring slots 0-5), described by a
        // valid region; then one corruption.
        ulong st0 = PostWrite(p, 0, 8, 0x51);
        ulong st1 = PostWrite(p, 1, 16, 0x52);
        byte[] good = ValidRegion(p);
        byte[] bad = (byte[])good.Clone();
        Corrupt(bad, corruption);
        int fd = MappedRegion.CreateMemFd("pinf-bad", bad.Length);
        using var map = MappedRegion.Map(fd, (ulong)bad.Length);
        Marshal.Copy(bad, 0, map.Pointer, bad.Length);

        using (var fe = Open(host))
        {
            fe.Send(VhostUserRequest.SetInflightFd, new VhostUserInflight { MmapSize = (ulong)bad.Length, NumQueues = 1, QueueSize = QueueSize }, [fd], needReply: true);
            Assert.Equal(0UL, fe.ReadU64Reply(VhostUserRequest.SetInflightFd));
            using var call = new EventFd();
            Assert.Equal(0UL, fe.SetMemTable(p));
            Assert.NotEqual(0UL, fe.SetupPackedQueue(p, 0, null, call));

            // Refused: the queue did not start, nothing was completed, the region was not written; the session lives.
            await Task.Delay(100);
            Assert.False(p.TryGetUsed(out _, out _), "a refused queue completed something");
            var after = new byte[bad.Length];
            Marshal.Copy(map.Pointer, after, 0, after.Length);
            Assert.Equal(bad, after);
            Assert.Single(ctrl.Sessions);
            Assert.Contains(host.Log.Lines, l => l.Contains("in-flight region refused", StringComparison.Ordinal));
        }

        // The same session protocol with the valid region: both chains are resubmitted and complete.
        Assert.True(await VhostTestHost.WaitUntil(() => ctrl.Sessions.Count == 0), "session did not close");
        Marshal.Copy(good, 0, map.Pointer, good.Length);
        using (var fe = Open(host))
        {
            fe.Send(VhostUserRequest.SetInflightFd, new VhostUserInflight { MmapSize = (ulong)good.Length, NumQueues = 1, QueueSize = QueueSize }, [fd], needReply: true);
            Assert.Equal(0UL, fe.ReadU64Reply(VhostUserRequest.SetInflightFd));
            using var call = new EventFd();
            Assert.Equal(0UL, fe.SetMemTable(p));
            Assert.Equal(0UL, fe.SetupPackedQueue(p, 0, null, call));
            var done = new List<ushort>();
            Assert.True(await VhostTestHost.WaitUntil(() => Drain(p, done) == 2), "the valid region's requests were not resubmitted");
            Assert.Equal(new ushort[] { 0, 1 }, done.ToArray());
            Assert.Equal(VirtioBlkRequestType.StatusOk, StatusOf(p, st0));
            Assert.Equal(VirtioBlkRequestType.StatusOk, StatusOf(p, st1));
        }

        Fd.Close(fd);
    }

    // ---- region layout (vhost-user.rst QueueRegionPacked / DescStatePacked) -----------------------------------

    private const int Hdr = InflightPackedQueue.HeaderBytes;
    private const int Ent = InflightPackedQueue.DescStateBytes;

    /// <summary>A region in which ids 0 and 1 (three descriptors each, ring slots 0-5) are in flight: entries 0-2 and 3-5, the rest free.</summary>
    private static unsafe byte[] ValidRegion(PackedDriverModel p)
    {
        var r = new byte[InflightPackedQueue.RegionBytes(QueueSize)];
        W16(r, 8, InflightPackedQueue.Version);
        W16(r, 10, QueueSize);
        W16(r, 12, 6); // free_head
        W16(r, 14, 6); // old_free_head
        W16(r, 16, 0); // used_idx
        W16(r, 18, 0);
        r[20] = 1; // used wrap counters
        r[21] = 1;
        for (int e = 0; e < QueueSize; e++)
        {
            W16(r, Hdr + (e * Ent) + 2, (ushort)(e + 1)); // next
        }

        for (int head = 0; head < 6; head += 3)
        {
            int o = Hdr + (head * Ent);
            r[o] = 1; // inflight
            W16(r, o + 4, (ushort)(head + 2)); // last
            W16(r, o + 6, 3); // num
            BitConverter.TryWriteBytes(r.AsSpan(o + 8), (ulong)(10 + head)); // counter
            for (int k = 0; k < 3; k++)
            {
                var d = *p.Slot(head + k);
                int eo = Hdr + ((head + k) * Ent);
                W16(r, eo + 16, d.Id);
                W16(r, eo + 18, d.Flags);
                BitConverter.TryWriteBytes(r.AsSpan(eo + 20), d.Len);
                BitConverter.TryWriteBytes(r.AsSpan(eo + 24), d.Addr);
            }
        }

        return r;
    }

    private static void Corrupt(byte[] r, string what)
    {
        int E(int e) => Hdr + (e * Ent);
        switch (what)
        {
            case "free list loops": W16(r, E(12) + 2, 8); break;
            case "free_head out of range": W16(r, 12, 40); W16(r, 14, 40); break;
            case "wrap counter 2": r[20] = 2; r[21] = 2; break;
            case "used_idx out of range": W16(r, 16, QueueSize); W16(r, 18, QueueSize); break;
            case "head with num 0": W16(r, E(3) + 6, 0); break;
            case "head with num past the ring": W16(r, E(3) + 6, 200); break;
            case "chain runs into the free list": W16(r, E(4) + 2, 9); break;
            case "two heads share an entry": W16(r, E(0) + 2, 4); break;
            case "buffer id twice": W16(r, E(5) + 16, 0); break;
            case "buffer id out of range": W16(r, E(5) + 16, 999); break;
            case "chain not ending at last": W16(r, E(3) + 4, 4); break;
            case "indirect in a chain": W16(r, E(0) + 18, (ushort)(VirtqPackedDesc.FlagIndirect | VirtqPackedDesc.FlagNext | VirtqPackedDesc.FlagAvail)); break;
            case "desc_num not the queue size": W16(r, 10, 8); break;
            case "version 7": W16(r, 8, 7); break;
            case "entries unaccounted": W16(r, E(13) + 2, QueueSize); break;
            case "inflight 0xff": r[E(7)] = 0xff; break;
            case "all 0xff":
                r.AsSpan().Fill(0xff);
                W16(r, 8, 1);
                W16(r, 10, QueueSize);
                break;
            default: throw new ArgumentException(what);
        }
    }

    private static void W16(byte[] r, int offset, ushort v) => BitConverter.TryWriteBytes(r.AsSpan(offset), v);

    // ---- helpers -------------------------------------------------------------------------------------------

    private static FrontEndModel Open(VhostTestHost host)
    {
        var fe = host.Connect(host.Vhost.Controllers[^1].Name);
        var (features, proto) = fe.Negotiate(WantProtocol);
        Assert.NotEqual(0UL, proto & (1UL << VhostUserProtocolFeature.InflightShmfd));
        Assert.NotEqual(0UL, features & (1UL << VirtioFeatures.RingPacked));
        Assert.Equal(0UL, fe.SetU64(VhostUserRequest.SetFeatures, (1UL << VirtioFeatures.Version1) | (1UL << VirtioFeatures.RingPacked) | (1UL << VhostUserConstants.ProtocolFeaturesBit)));
        return fe;
    }

    /// <summary>A virtio-blk write of 4 KiB of <paramref name="fill"/> as header / data / status; returns the status byte's address.</summary>
    private static unsafe ulong PostWrite(PackedDriverModel p, ushort id, ulong sector, byte fill)
    {
        ulong data = p.Alloc(4096, 4096);
        new Span<byte>(p.Host(data), 4096).Fill(fill);
        return Post(p, id, VirtioBlkRequestType.Out, sector, data, write: false);
    }

    private static ulong PostRead(PackedDriverModel p, ushort id, ulong sector, ulong data) => Post(p, id, VirtioBlkRequestType.In, sector, data, write: true);

    private static unsafe ulong Post(PackedDriverModel p, ushort id, uint type, ulong sector, ulong data, bool write)
    {
        ulong hdr = p.Alloc(16);
        ulong status = p.Alloc(1);
        var h = (VirtioBlkOutHeader*)p.Host(hdr);
        h->Type = type;
        h->IoPrio = 0;
        h->Sector = sector;
        *p.Host(status) = 0xff;
        p.Add(id, (hdr, 16, false), (data, 4096, write), (status, 1, true));
        return status;
    }

    private static unsafe byte StatusOf(PackedDriverModel p, ulong statusGpa) => *p.Host(statusGpa);

    private static unsafe bool HoldsOnly(PackedDriverModel p, ulong buf, byte fill) => new Span<byte>(p.Host(buf), 4096).IndexOfAnyExcept(fill) < 0;

    /// <summary>Takes every used descriptor the device wrote into <paramref name="ids"/>; returns how many were taken in all.</summary>
    private static int Drain(PackedDriverModel p, List<ushort> ids)
    {
        while (p.TryGetUsed(out ushort id, out _))
        {
            ids.Add(id);
        }

        return ids.Count;
    }

    /// <summary>What the killed back end did for a completion: region, used descriptor, commit.</summary>
    private static void Complete(PackedVirtqueue vq, InflightPackedQueue region, ushort id)
    {
        region.AddUsed(id);
        vq.AddUsed(id, 1);
        region.UsedWritten(id);
    }
}
