using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Text.Json.Nodes;
using VhostBackend.Platform;
using VhostBackend.Reactors;
using VhostBackend.Vhost.Blk;
using VhostBackend.VhostUser;
using VhostBackend.Virtio;
using VhostBackend.Virtio.Blk;
using VhostBackend.Virtio.Tests;
using Xunit;

namespace VhostBackend.Vhost.Tests;

public sealed class VhostBlkTests
{
    private const ulong WantProtocol = (1UL << VhostUserProtocolFeature.ReplyAck) | (1UL << VhostUserProtocolFeature.Config)
        | (1UL << VhostUserProtocolFeature.Mq) | (1UL << VhostUserProtocolFeature.ConfigureMemSlots) | (1UL << VhostUserProtocolFeature.BackendReq);

    [Fact]
    public void WireStructSizesMatchTheSpec()
    {
        Assert.Equal(12, Unsafe.SizeOf<VhostUserHeader>());
        Assert.Equal(32, Unsafe.SizeOf<VhostUserMemoryRegion>());
        Assert.Equal(8, Unsafe.SizeOf<VhostUserMemoryHeader>());
        Assert.Equal(40, Unsafe.SizeOf<VhostUserSingleMemoryRegion>());
        Assert.Equal(8, Unsafe.SizeOf<VhostUserVringState>());
        Assert.Equal(40, Unsafe.SizeOf<VhostUserVringAddr>());
        Assert.Equal(8, (int)Marshal.OffsetOf<VhostUserVringAddr>(nameof(VhostUserVringAddr.DescUserAddr)));
        Assert.Equal(16, (int)Marshal.OffsetOf<VhostUserVringAddr>(nameof(VhostUserVringAddr.UsedUserAddr)));
        Assert.Equal(24, (int)Marshal.OffsetOf<VhostUserVringAddr>(nameof(VhostUserVringAddr.AvailUserAddr)));
        Assert.Equal(12, Unsafe.SizeOf<VhostUserConfigHeader>());
        Assert.Equal(16, Unsafe.SizeOf<VirtioBlkOutHeader>());
        Assert.Equal(16, Unsafe.SizeOf<VirtioBlkDiscardWriteZeroes>());
        Assert.Equal(60, Unsafe.SizeOf<VirtioBlkConfig>());
        Assert.Equal(20, (int)Marshal.OffsetOf<VirtioBlkConfig>(nameof(VirtioBlkConfig.BlkSize)));
        Assert.Equal(34, (int)Marshal.OffsetOf<VirtioBlkConfig>(nameof(VirtioBlkConfig.NumQueues)));
        Assert.Equal(36, (int)Marshal.OffsetOf<VirtioBlkConfig>(nameof(VirtioBlkConfig.MaxDiscardSectors)));
        Assert.Equal(56, (int)Marshal.OffsetOf<VirtioBlkConfig>(nameof(VirtioBlkConfig.WriteZeroesMayUnmap)));
    }

    [Theory]
    [InlineData(ReactorMode.Poll, false)]
    [InlineData(ReactorMode.Interrupt, true)]
    public async Task NegotiateAndDoIoThroughMallocBdev(ReactorMode mode, bool eventIdx)
    {
        await using var host = new VhostTestHost(mode: mode);
        host.Vhost.CreateBlkController("vhost.0", "Malloc0", null, readOnly: false);
        using var fe = host.Connect("vhost.0");
        var (features, proto) = fe.Negotiate(WantProtocol);
        Assert.NotEqual(0UL, features & (1UL << VirtioFeatures.Version1));
        Assert.NotEqual(0UL, features & (1UL << VirtioBlkFeature.Discard));
        Assert.Equal(0UL, features & (1UL << VirtioBlkFeature.Ro));
        Assert.NotEqual(0UL, proto & (1UL << VhostUserProtocolFeature.InflightShmfd));
        Assert.Equal((ulong)VhostBlkController.MaxQueuesPerSession, fe.Get(VhostUserRequest.GetQueueNum));
        Assert.Equal((ulong)VhostUserConstants.MaxMemSlots, fe.Get(VhostUserRequest.GetMaxMemSlots));

        // GET_CONFIG with QEMU's size (60) answers exactly that many bytes.
        var cfgReq = new byte[12 + 60];
        MemoryMarshal.Write(cfgReq, new VhostUserConfigHeader { Offset = 0, Size = 60 });
        fe.Send(VhostUserRequest.GetConfig, cfgReq);
        var cfgReply = fe.ReadReply()!.Value;
        Assert.Equal(72u, cfgReply.Header.Size);
        var cfg = MemoryMarshal.Read<VirtioBlkConfig>(cfgReply.Payload.AsSpan(12));
        Assert.Equal(2048UL, cfg.Capacity);
        Assert.Equal(512u, cfg.BlkSize);
        Assert.Equal(1u, cfg.MaxDiscardSeg);

        // SPDK's virtio-user asks 256.
        MemoryMarshal.Write(cfgReq, new VhostUserConfigHeader { Offset = 0, Size = 256 });
        var big = new byte[12 + 256];
        cfgReq.AsSpan(0, 12).CopyTo(big);
        fe.Send(VhostUserRequest.GetConfig, big);
        Assert.Equal(268u, fe.ReadReply()!.Value.Header.Size);

        ulong want = (1UL << VirtioFeatures.Version1) | (1UL << VhostUserConstants.ProtocolFeaturesBit) | (1UL << VirtioBlkFeature.Flush)
            | (1UL << VirtioBlkFeature.Discard) | (1UL << VirtioBlkFeature.WriteZeroes) | (1UL << VirtioFeatures.RingIndirectDesc)
            | (eventIdx ? 1UL << VirtioFeatures.RingEventIdx : 0);
        Assert.Equal(0UL, fe.SetU64(VhostUserRequest.SetFeatures, want));

        using var m = new DriverRingModel(16, eventIdx);
        Assert.Equal(0UL, fe.SetMemTable(m));
        using var kick = new EventFd();
        using var call = new EventFd();
        Assert.Equal(0UL, fe.SetupQueue(m, 0, kick, call));

        var drv = new BlkDriverModel(m);
        ulong wbuf = m.Alloc(4096, 4096);
        var wspan = m.Bytes(wbuf, 4096);
        for (int i = 0; i < 4096; i++)
        {
            wspan[i] = (byte)(i * 7);
        }

        // Write 8 sectors at sector 16 (buffer crossing nothing), then read them back with a split header.
        ulong st1 = drv.Post(VirtioBlkRequestType.Out, 16, wbuf, 4096, deviceWritesData: false);
        kick.Signal();
        Assert.True(await VhostTestHost.WaitUntil(() => m.UsedIdx == 1), "write not completed");
        Assert.Equal(VirtioBlkRequestType.StatusOk, drv.Status(st1));

        ulong rbuf = m.AllocAcrossRegions(4096); // forces a split into two iovecs
        ulong st2 = drv.Post(VirtioBlkRequestType.In, 16, rbuf, 4096, deviceWritesData: true, splitHeader: true);
        kick.Signal();
        Assert.True(await VhostTestHost.WaitUntil(() => m.UsedIdx == 2), "read not completed");
        Assert.Equal(VirtioBlkRequestType.StatusOk, drv.Status(st2));
        Assert.Equal(4097u, m.Used(1).Len);
        Assert.True(m.Bytes(wbuf, 4096).SequenceEqual(m.Bytes(rbuf, 4096)));

        // The guest was interrupted.
        Assert.True(await VhostTestHost.WaitUntil(() => call.Drain()), "no call signal");

        // GET_ID, FLUSH, unsupported, out of range, misaligned, discard, write zeroes, short chain.
        ulong idBuf = m.Alloc(20);
        ulong st3 = drv.Post(VirtioBlkRequestType.GetId, 0, idBuf, 20, deviceWritesData: true);
        ulong st4 = drv.Post(VirtioBlkRequestType.Flush, 0, 0, 0, false);
        ulong st5 = drv.Post(99, 0, 0, 0, false);
        ulong st6 = drv.Post(VirtioBlkRequestType.In, 2048, rbuf, 512, true);
        ulong st7 = drv.Post(VirtioBlkRequestType.In, 0, rbuf, 100, true);
        kick.Signal();
        Assert.True(await VhostTestHost.WaitUntil(() => m.UsedIdx == 7), "batch not completed");
        Assert.Equal("Malloc0", System.Text.Encoding.ASCII.GetString(m.Bytes(idBuf, 7)));
        Assert.Equal(VirtioBlkRequestType.StatusOk, drv.Status(st3));
        Assert.Equal(VirtioBlkRequestType.StatusOk, drv.Status(st4));
        Assert.Equal(VirtioBlkRequestType.StatusUnsupp, drv.Status(st5));
        Assert.Equal(VirtioBlkRequestType.StatusIoErr, drv.Status(st6));
        Assert.Equal(VirtioBlkRequestType.StatusIoErr, drv.Status(st7));

        ulong seg = m.Alloc(16);
        BlkDriverModel.Write(m, seg, new VirtioBlkDiscardWriteZeroes { Sector = 16, NumSectors = 8, Flags = 0 });
        ulong st8 = drv.Post(VirtioBlkRequestType.WriteZeroes, 0, seg, 16, false);
        ulong segBad = m.Alloc(16);
        BlkDriverModel.Write(m, segBad, new VirtioBlkDiscardWriteZeroes { Sector = 0, NumSectors = 8, Flags = 1 });
        ulong st9 = drv.Post(VirtioBlkRequestType.Discard, 0, segBad, 16, false); // unmap flag on discard: UNSUPP
        kick.Signal();
        Assert.True(await VhostTestHost.WaitUntil(() => m.UsedIdx == 9), "discard batch not completed");
        Assert.Equal(VirtioBlkRequestType.StatusOk, drv.Status(st8));
        Assert.Equal(VirtioBlkRequestType.StatusUnsupp, drv.Status(st9));
        ulong st10 = drv.Post(VirtioBlkRequestType.In, 16, rbuf, 4096, true);
        kick.Signal();
        Assert.True(await VhostTestHost.WaitUntil(() => m.UsedIdx == 10));
        Assert.Equal(VirtioBlkRequestType.StatusOk, drv.Status(st10));
        Assert.True(m.Bytes(rbuf, 4096).IndexOfAnyExcept((byte)0) < 0, "write zeroes did not zero");

        // A malformed chain (loop) is returned with length 0 and the queue keeps working.
        m.SetDesc(14, m.Alloc(16), 16, VirtqDesc.FlagNext, 15);
        m.SetDesc(15, m.Alloc(16), 16, VirtqDesc.FlagNext, 14);
        m.Publish(14);
        kick.Signal();
        Assert.True(await VhostTestHost.WaitUntil(() => m.UsedIdx == 11));
        Assert.Equal((14u, 0u), m.Used(10));

        // GET_VRING_BASE stops the queue and reports where it stopped.
        fe.Send(VhostUserRequest.GetVringBase, new VhostUserVringState { Index = 0 });
        var baseReply = fe.ReadReply()!.Value;
        Assert.Equal(11u, MemoryMarshal.Read<VhostUserVringState>(baseReply.Payload).Num);
        var ctrl = host.Vhost.Find("vhost.0")!;
        Assert.False(ctrl.Sessions.Single().Started);
    }

    [Fact]
    public async Task ReadOnlyControllerAdvertisesRoAndFailsWrites()
    {
        await using var host = new VhostTestHost();
        host.Vhost.CreateBlkController("ro", "Malloc0", null, readOnly: true);
        using var fe = host.Connect("ro");
        var (features, _) = fe.Negotiate(WantProtocol);
        Assert.NotEqual(0UL, features & (1UL << VirtioBlkFeature.Ro));
        Assert.Equal(0UL, fe.SetU64(VhostUserRequest.SetFeatures, (1UL << VirtioFeatures.Version1) | (1UL << VhostUserConstants.ProtocolFeaturesBit)));
        using var m = new DriverRingModel(16);
        Assert.Equal(0UL, fe.SetMemTable(m));
        Assert.Equal(0UL, fe.SetupQueue(m, 0, kick: null, call: null)); // a polling front end: no fds at all
        var drv = new BlkDriverModel(m);
        ulong buf = m.Alloc(512);
        ulong st = drv.Post(VirtioBlkRequestType.Out, 0, buf, 512, false);
        ulong st2 = drv.Post(VirtioBlkRequestType.In, 0, buf, 512, true);
        Assert.True(await VhostTestHost.WaitUntil(() => m.UsedIdx == 2));
        Assert.Equal(VirtioBlkRequestType.StatusIoErr, drv.Status(st));
        Assert.Equal(VirtioBlkRequestType.StatusOk, drv.Status(st2));
    }

    [Fact]
    public async Task MalformedMessagesAreRejectedAndTheSocketKeepsServing()
    {
        await using var host = new VhostTestHost();
        host.Vhost.CreateBlkController("bad", "Malloc0", null, readOnly: false);

        // Wrong payload size: the connection is closed.
        using (var fe = host.Connect("bad"))
        {
            fe.Send(VhostUserRequest.SetVringNum, new byte[4]);
            Assert.True(fe.IsClosedByPeer());
        }

        // An fd on a message that carries none: closed (and the fd closed by the back end).
        using (var fe = host.Connect("bad"))
        using (var stray = new EventFd())
        {
            fe.Send(VhostUserRequest.SetFeatures, new byte[8], [stray.Fd]);
            Assert.True(fe.IsClosedByPeer());
        }

        // Too many fds for the socket buffer: closed.
        using (var fe = host.Connect("bad"))
        {
            var many = Enumerable.Range(0, 30).Select(_ => new EventFd()).ToArray();
            fe.Send(VhostUserRequest.SetMemTable, new byte[8 + 32], many.Select(e => e.Fd).ToArray());
            Assert.True(fe.IsClosedByPeer());
            foreach (var e in many)
            {
                e.Dispose();
            }
        }

        // Bad version and a reply flag from the front end: closed.
        using (var fe = host.Connect("bad"))
        {
            fe.Send(VhostUserRequest.GetFeatures, ReadOnlySpan<byte>.Empty, flags: 2);
            Assert.True(fe.IsClosedByPeer());
        }

        // Oversized payload header: closed without reading 4 GiB.
        using (var fe = host.Connect("bad"))
        {
            var raw = new byte[12];
            MemoryMarshal.Write(raw, new VhostUserHeader { Request = 1, Flags = 1, Size = uint.MaxValue });
            fe.Connection.Send(raw);
            Assert.True(fe.IsClosedByPeer());
        }

        // Unknown request and semantic errors get a REPLY_ACK failure and the session keeps working.
        using (var fe = host.Connect("bad"))
        {
            fe.Negotiate(WantProtocol);
            fe.Send((VhostUserRequest)999, new byte[8], needReply: true);
            Assert.Equal(1UL, fe.ReadU64Reply((VhostUserRequest)999));
            fe.Send(VhostUserRequest.SetLogFd, [], needReply: true); // not implemented (the log needs no eventfd)
            Assert.Equal(1UL, fe.ReadU64Reply(VhostUserRequest.SetLogFd));
            Assert.Equal(1UL, fe.SetU64(VhostUserRequest.SetFeatures, 1UL << 63)); // not offered
            Assert.Equal(1UL, fe.SetStruct(VhostUserRequest.SetVringNum, new VhostUserVringState { Index = 0, Num = 100 })); // not a power of 2

            using var m = new DriverRingModel(16);
            Assert.Equal(0UL, fe.SetMemTable(m));
            Assert.Equal(0UL, fe.SetStruct(VhostUserRequest.SetVringNum, new VhostUserVringState { Index = 0, Num = 16 }));

            // Ring outside guest memory: refused when the queue would start.
            Assert.Equal(0UL, fe.SetStruct(VhostUserRequest.SetVringAddr, new VhostUserVringAddr { Index = 0, DescUserAddr = 0x1000, AvailUserAddr = 0x2000, UsedUserAddr = 0x3000 }));
            Assert.Equal(0UL, fe.SetStruct(VhostUserRequest.SetVringEnable, new VhostUserVringState { Index = 0, Num = 1 }));
            using var kick = new EventFd();
            Assert.Equal(1UL, fe.SetU64(VhostUserRequest.SetVringKick, 0, [kick.Fd]));

            // Misaligned ring: refused too.
            Assert.Equal(1UL, fe.SetStruct(VhostUserRequest.SetVringAddr, new VhostUserVringAddr
            {
                Index = 0,
                DescUserAddr = m.ToUva(m.DescGpa) + 8,
                AvailUserAddr = m.ToUva(m.AvailGpa),
                UsedUserAddr = m.ToUva(m.UsedGpa),
            }));

            // Queue index out of range: protocol error.
            Assert.NotEqual(0UL, fe.Get(VhostUserRequest.GetFeatures));
            fe.Send(VhostUserRequest.SetVringNum, new VhostUserVringState { Index = 200, Num = 16 });
            Assert.True(fe.IsClosedByPeer());
        }

        // The socket still accepts a fresh front end that works end to end.
        using (var fe = host.Connect("bad"))
        {
            fe.Negotiate(WantProtocol);
            Assert.Equal(0UL, fe.SetU64(VhostUserRequest.SetFeatures, (1UL << VirtioFeatures.Version1) | (1UL << VhostUserConstants.ProtocolFeaturesBit)));
            using var m = new DriverRingModel(16);
            Assert.Equal(0UL, fe.SetMemTable(m));
            using var kick = new EventFd();
            Assert.Equal(0UL, fe.SetupQueue(m, 0, kick, null));
            var drv = new BlkDriverModel(m);
            ulong st = drv.Post(VirtioBlkRequestType.In, 0, m.Alloc(512), 512, true);
            kick.Signal();
            Assert.True(await VhostTestHost.WaitUntil(() => m.UsedIdx == 1));
            Assert.Equal(VirtioBlkRequestType.StatusOk, drv.Status(st));
        }

        Assert.True(await VhostTestHost.WaitUntil(() => host.Vhost.Find("bad")!.Sessions.Count == 0), "sessions not released");
    }

    [Fact]
    public async Task RequestsWhoseProtocolFeatureWasNotNegotiatedAreRefused()
    {
        await using var host = new VhostTestHost();
        host.Vhost.CreateBlkController("nf", "Malloc0", null, readOnly: false);
        using (var fe = host.Connect("nf"))
        {
            // REPLY_ACK only: SET_STATUS and SET_CONFIG get a failure ack and the session goes on.
            fe.Negotiate(1UL << VhostUserProtocolFeature.ReplyAck);
            Assert.Equal(1UL, fe.SetU64(VhostUserRequest.SetStatus, 0xF));
            var cfg = new byte[12 + 4];
            MemoryMarshal.Write(cfg, new VhostUserConfigHeader { Offset = 0, Size = 4 });
            fe.Send(VhostUserRequest.SetConfig, cfg, needReply: true);
            Assert.Equal(1UL, fe.ReadU64Reply(VhostUserRequest.SetConfig));
            Assert.NotEqual(0UL, fe.Get(VhostUserRequest.GetFeatures));

            // GET_STATUS must be answered, which cannot be refused: the connection is closed.
            fe.Send(VhostUserRequest.GetStatus, ReadOnlySpan<byte>.Empty);
            Assert.True(fe.IsClosedByPeer());
        }

        Assert.True(await VhostTestHost.WaitUntil(() => host.Vhost.Find("nf")!.Sessions.Count == 0), "sessions not released");
    }

    [Fact]
    public async Task DisconnectWithIoInFlightFreesTheSessionAndDeleteThenWorks()
    {
        await using var host = new VhostTestHost();
        host.Vhost.CreateBlkController("c", "Malloc0", "0x1", readOnly: false);
        var ctrl = host.Vhost.Find("c")!;
        var fe = host.Connect("c");
        fe.Negotiate(WantProtocol);
        fe.SetU64(VhostUserRequest.SetFeatures, (1UL << VirtioFeatures.Version1) | (1UL << VhostUserConstants.ProtocolFeaturesBit));
        using var m = new DriverRingModel(16);
        fe.SetMemTable(m);
        fe.SetupQueue(m, 0, null, null);
        var drv = new BlkDriverModel(m);
        for (int i = 0; i < 5; i++)
        {
            drv.Post(VirtioBlkRequestType.Out, (ulong)i * 8, m.Alloc(4096), 4096, false);
        }

        Assert.True(await VhostTestHost.WaitUntil(() => ctrl.Sessions.Count == 1));
        var ex = await Assert.ThrowsAsync<VhostException>(() => host.Vhost.DeleteControllerAsync("c"));
        Assert.Equal(Errno.EBUSY, ex.Errno);

        fe.Dispose(); // the "QEMU crash"
        Assert.True(await VhostTestHost.WaitUntil(() => ctrl.Sessions.Count == 0), "session not freed");
        await host.Vhost.DeleteControllerAsync("c");
        Assert.Null(host.Vhost.Find("c"));
        Assert.False(File.Exists(Path.Combine(host.SocketDir, "c")));
        var ex2 = await Assert.ThrowsAsync<VhostException>(() => host.Vhost.DeleteControllerAsync("c"));
        Assert.Equal(Errno.ENODEV, ex2.Errno);
    }

    [Fact]
    public async Task ManagerErrorsUseSpdkErrnos()
    {
        await using var host = new VhostTestHost();
        host.Vhost.CreateBlkController("x", "Malloc0", null, false);
        Assert.Equal(Errno.EEXIST, Assert.Throws<VhostException>(() => host.Vhost.CreateBlkController("x", "Malloc0", null, false)).Errno);
        Assert.Equal(Errno.ENODEV, Assert.Throws<VhostException>(() => host.Vhost.CreateBlkController("y", "Nope", null, false)).Errno);
        Assert.Equal(Errno.EINVAL, Assert.Throws<VhostException>(() => host.Vhost.CreateBlkController("z", "Malloc0", "0x100000", false)).Errno);
        Assert.Equal(Errno.EINVAL, Assert.Throws<VhostException>(() => host.Vhost.CreateBlkController("a/b", "Malloc0", null, false)).Errno);

        var json = host.Vhost.Find("x")!.ToJson();
        Assert.Equal("x", (string?)json["ctrlr"]);
        Assert.Equal("Malloc0", (string?)json["backend_specific"]!["block"]!["bdev"]);
        Assert.False((bool)json["backend_specific"]!["block"]!["readonly"]!);
        Assert.Equal(0u, (uint)json["delay_base_us"]!);
        Assert.Equal(60000u, (uint)json["iops_threshold"]!);
        Assert.IsType<JsonArray>(json["sessions"]);

        await host.Vhost.Find("x")!.SetCoalescingAsync(50, 10000);
        var calls = Rpc.VhostRpc.WriteConfig(host.Vhost, "vhost_blk");
        Assert.Equal(2, calls.Count);
        Assert.Equal("vhost_create_blk_controller", (string?)calls[0]!["method"]);
        Assert.Equal("vhost_controller_set_coalescing", (string?)calls[1]!["method"]);
        await Assert.ThrowsAsync<VhostException>(() => host.Vhost.Find("x")!.SetCoalescingAsync(0, 10));
    }

    [Fact]
    public async Task MultipleQueuesSpreadOverReactorsWithCoalescing()
    {
        await using var host = new VhostTestHost(reactors: 2);
        var ctrl = host.Vhost.CreateBlkController("mq", "Malloc0", null, readOnly: false);
        await ctrl.SetCoalescingAsync(100, 1000);
        using var fe = host.Connect("mq");
        fe.Negotiate(WantProtocol);
        fe.SetU64(VhostUserRequest.SetFeatures, (1UL << VirtioFeatures.Version1) | (1UL << VhostUserConstants.ProtocolFeaturesBit) | (1UL << VirtioFeatures.RingEventIdx));
        using var m0 = new DriverRingModel(16, eventIdx: true);
        using var m1 = new DriverRingModel(16, eventIdx: true);

        // One table with all four regions would overlap; use mem slots instead: ADD_MEM_REG per region.
        AddRegions(fe, m0, 0);
        AddRegions(fe, m1, 0x1000_0000);
        using var call0 = new EventFd();
        using var call1 = new EventFd();
        Assert.Equal(0UL, fe.SetupQueue(m0, 0, null, call0));
        Assert.Equal(0UL, SetupShiftedQueue(fe, m1, 1, call1, 0x1000_0000));
        var d0 = new BlkDriverModel(m0);
        ulong s0 = d0.Post(VirtioBlkRequestType.In, 0, m0.Alloc(512), 512, true);
        Assert.True(await VhostTestHost.WaitUntil(() => m0.UsedIdx == 1));
        Assert.Equal(VirtioBlkRequestType.StatusOk, d0.Status(s0));
        Assert.True(await VhostTestHost.WaitUntil(() => call0.Drain()));
        Assert.Equal(2, host.Runtime.Reactors.Count(r => r.Pollers.Any(p => p.Name.StartsWith("vhost_blk", StringComparison.Ordinal))) + (host.Runtime.Reactors.Count == 1 ? 1 : 0));
    }

    private static void AddRegions(FrontEndModel fe, DriverRingModel m, ulong shift)
    {
        for (int i = 0; i < 2; i++)
        {
            var r = new VhostUserSingleMemoryRegion
            {
                Region = new VhostUserMemoryRegion
                {
                    GuestPhysAddr = shift + DriverRingModel.GpaBase + ((ulong)i * DriverRingModel.RegionSize),
                    MemorySize = DriverRingModel.RegionSize,
                    UserspaceAddr = shift + DriverRingModel.UvaBase + ((ulong)i * DriverRingModel.RegionSize),
                    MmapOffset = (ulong)i * DriverRingModel.RegionSize,
                },
            };
            fe.Send(VhostUserRequest.AddMemReg, r, [m.MemFd], needReply: true);
            Assert.Equal(0UL, fe.ReadU64Reply(VhostUserRequest.AddMemReg));
        }
    }

    private static ulong SetupShiftedQueue(FrontEndModel fe, DriverRingModel m, uint index, EventFd call, ulong shift)
    {
        ulong rc = fe.SetStruct(VhostUserRequest.SetVringNum, new VhostUserVringState { Index = index, Num = m.Size });
        rc |= fe.SetStruct(VhostUserRequest.SetVringAddr, new VhostUserVringAddr
        {
            Index = index,
            DescUserAddr = shift + m.ToUva(m.DescGpa),
            AvailUserAddr = shift + m.ToUva(m.AvailGpa),
            UsedUserAddr = shift + m.ToUva(m.UsedGpa),
        });
        rc |= fe.SetU64(VhostUserRequest.SetVringCall, index, [call.Fd]);
        rc |= fe.SetU64(VhostUserRequest.SetVringKick, index | VhostUserConstants.VringNoFdMask);
        rc |= fe.SetStruct(VhostUserRequest.SetVringEnable, new VhostUserVringState { Index = index, Num = 1 });
        return rc;
    }
}
