using System.Diagnostics;
using System.Runtime.InteropServices;
using VhostBackend.BdevMalloc;
using VhostBackend.Platform;
using VhostBackend.VhostUser;
using VhostBackend.Virtio;
using VhostBackend.Virtio.Blk;
using VhostBackend.Virtio.Tests;
using Xunit;

namespace VhostBackend.Vhost.Tests;

/// <summary>
/// A hostile guest (a raw front end model writing whatever it likes into its rings) next to a healthy one, both
/// polled by the same reactor: every kind of malformed request is answered (IOERR, or nothing written when there
/// is no valid status byte) or stops only the hostile queue; the healthy guest's verified I/O never fails or
/// stalls; a storm of bad requests allocates nothing per request on the reactor (the log is rate limited before
/// anything is formatted); a used ring whose memory is removed stops that queue without touching the memory.
/// The per-descriptor cases themselves are unit tested in tests/Virtio.Tests (SplitVirtqueueTests).
/// </summary>
public sealed class HostileGuestTests
{
    private const ulong WantProtocol = (1UL << VhostUserProtocolFeature.ReplyAck) | (1UL << VhostUserProtocolFeature.Config)
        | (1UL << VhostUserProtocolFeature.Mq) | (1UL << VhostUserProtocolFeature.ConfigureMemSlots);

    private const ushort Size = 64;

    [Fact]
    public async Task HostileRequestsAreContainedAndTheNeighbourKeepsServing()
    {
        await using var host = new VhostTestHost(reactors: 1);
        host.Bdevs.Register(new MallocBdev("Malloc1", 2048, 512));
        host.Vhost.CreateBlkController("good", "Malloc0", null, readOnly: false);
        host.Vhost.CreateBlkController("evil", "Malloc1", null, readOnly: false);

        // The healthy guest: write a pattern, read it back, compare, forever (QD1), until told to stop.
        using var gm = new DriverRingModel(Size);
        using var gfe = Open(host, "good", gm);
        using var gcall = new EventFd();
        Assert.Equal(0UL, gfe.SetupQueue(gm, 0, null, gcall));
        using var stop = new CancellationTokenSource();
        long goodOps = 0;
        string? goodError = null;
        var good = Task.Run(() => HealthyGuestModel.Run(gm, stop.Token, ref goodOps, ref goodError));

        // The hostile guest.
        using var em = new DriverRingModel(Size);
        using var efe = Open(host, "evil", em);
        using var ecall = new EventFd();
        Assert.Equal(0UL, efe.SetupQueue(em, 0, null, ecall));
        var evil = new HostileDriver(em);

        long before = Volatile.Read(ref goodOps);
        foreach (var (kind, post) in evil.Kinds())
        {
            // One at a time: the kinds share descriptors and the indirect table.
            ushort target = (ushort)(em.UsedIdx + 1);
            post();
            Assert.True(await VhostTestHost.WaitUntil(() => em.UsedIdx == target), $"hostile request '{kind}' not answered (used {em.UsedIdx})\n{host.Log.Dump()}");
        }

        Assert.All(evil.StatusAddresses, a => Assert.NotEqual(VirtioBlkRequestType.StatusOk, evil.Status(a)));

        // A storm: the same bad request again and again; the reactor allocates (almost) nothing for it.
        var reactor = host.Runtime.Reactors[0];
        long alloc0 = await reactor.InvokeAsync(() => GC.GetAllocatedBytesForCurrentThread());
        const int Storm = 20000;
        ushort used0 = em.UsedIdx;
        for (int i = 0; i < Storm; i++)
        {
            evil.PostUnmapped();
            if ((i & 31) == 31)
            {
                int target = used0 + i + 1;
                Assert.True(await VhostTestHost.WaitUntil(() => (short)(em.UsedIdx - (ushort)target) >= 0), "storm stalled");
            }
        }

        Assert.True(await VhostTestHost.WaitUntil(() => em.UsedIdx == (ushort)(used0 + Storm)), "storm not fully answered");
        long perRequest = (await reactor.InvokeAsync(() => GC.GetAllocatedBytesForCurrentThread()) - alloc0) / Storm;
        Assert.True(perRequest < 8, $"{perRequest} bytes allocated per malformed request on the reactor");
        Assert.True(host.Log.Lines.Count(l => l.Contains("invalid request", StringComparison.Ordinal)) < 100, "bad requests were not rate limited in the log");

        // Finally the avail index jumps past the ring: that queue stops (broken), nothing else does.
        evil.JumpAvail(1000);
        await Task.Delay(200);
        Assert.Contains(host.Log.Lines, l => l.Contains("invalid avail index", StringComparison.Ordinal));

        // The healthy guest keeps completing I/O (a wait, not a fixed window: on a loaded 2-core machine its thread
        // can miss a few hundred milliseconds; a real stall never gets there).
        long afterBreak = Volatile.Read(ref goodOps);
        Assert.True(await VhostTestHost.WaitUntil(() => Volatile.Read(ref goodOps) > afterBreak + 20), "the healthy guest stalled after the hostile one broke its queue");
        stop.Cancel();
        await good;
        Assert.Null(goodError);
        Assert.True(Volatile.Read(ref goodOps) - before > 100, $"the healthy guest did only {goodOps - before} verified I/Os meanwhile");

        // Both controllers still accept sessions.
        Assert.Single(host.Vhost.Find("good")!.Sessions);
        Assert.Single(host.Vhost.Find("evil")!.Sessions);
    }

    [Fact]
    public async Task RemovingTheRegionUnderARunningRingStopsOnlyThatQueue()
    {
        await using var host = new VhostTestHost(reactors: 1);
        host.Vhost.CreateBlkController("rm", "Malloc0", null, readOnly: false);
        using var m = new DriverRingModel(Size);
        using var fe = host.Connect("rm");
        fe.Negotiate(WantProtocol);
        Assert.Equal(0UL, fe.SetU64(VhostUserRequest.SetFeatures, (1UL << VirtioFeatures.Version1) | (1UL << VhostUserConstants.ProtocolFeaturesBit)));

        // The two regions one at a time (ADD_MEM_REG), the ring in the first.
        var regions = new VhostUserSingleMemoryRegion[2];
        for (int i = 0; i < 2; i++)
        {
            regions[i] = new VhostUserSingleMemoryRegion
            {
                Region = new VhostUserMemoryRegion
                {
                    GuestPhysAddr = DriverRingModel.GpaBase + ((ulong)i * DriverRingModel.RegionSize),
                    MemorySize = DriverRingModel.RegionSize,
                    UserspaceAddr = DriverRingModel.UvaBase + ((ulong)i * DriverRingModel.RegionSize),
                    MmapOffset = (ulong)i * DriverRingModel.RegionSize,
                },
            };
            fe.Send(VhostUserRequest.AddMemReg, regions[i], [m.MemFd], needReply: true);
            Assert.Equal(0UL, fe.ReadU64Reply(VhostUserRequest.AddMemReg));
        }

        using var call = new EventFd();
        Assert.Equal(0UL, fe.SetupQueue(m, 0, null, call));
        var drv = new BlkDriverModel(m);
        ulong st = drv.Post(VirtioBlkRequestType.In, 0, m.Alloc(512), 512, true);
        Assert.True(await VhostTestHost.WaitUntil(() => m.UsedIdx == 1));
        Assert.Equal(VirtioBlkRequestType.StatusOk, drv.Status(st));

        // The region holding the rings disappears: the queue is stopped and cannot restart (its rings are outside
        // guest memory now); requests posted afterwards are not touched; the session stays up and answers.
        fe.Send(VhostUserRequest.RemMemReg, regions[0], needReply: true);
        fe.ReadU64Reply(VhostUserRequest.RemMemReg);
        drv.Post(VirtioBlkRequestType.In, 0, m.Alloc(512), 512, true);
        await Task.Delay(300);
        Assert.Equal(1, m.UsedIdx);
        Assert.Equal((ulong)VhostUserConstants.MaxMemSlots, fe.Get(VhostUserRequest.GetMaxMemSlots));
        Assert.Single(host.Vhost.Find("rm")!.Sessions);
        Assert.Equal(0, host.Vhost.Find("rm")!.Sessions[0].StartedQueues);
    }

    [Fact]
    public async Task UnsealedGuestMemoryIsReportedOnceAndAFloodingFrontEndStallsOnlyItself()
    {
        await using var host = new VhostTestHost(reactors: 1);
        host.Bdevs.Register(new MallocBdev("Malloc1", 2048, 512));
        host.Vhost.CreateBlkController("sealed", "Malloc0", null, readOnly: false);
        host.Vhost.CreateBlkController("open", "Malloc1", null, readOnly: false);
        const string Warning = "not sealed against shrinking";

        using (var sm = new DriverRingModel(Size))
        using (var sfe = Open(host, "sealed", sm))
        {
            Assert.Equal(0UL, sfe.SetMemTable(sm));
        }

        Assert.DoesNotContain(host.Log.Lines, l => l.Contains(Warning, StringComparison.Ordinal));
        using var um = new DriverRingModel(Size, sealMemory: false);
        using var ufe = Open(host, "open", um);
        Assert.Equal(0UL, ufe.SetMemTable(um)); // a second table: still one line per session
        Assert.Single(host.Log.Lines, l => l.Contains(Warning, StringComparison.Ordinal));

        // A front end that floods requests and never reads a reply: its protocol thread blocks once the socket
        // buffer is full; another guest on the same reactor connects and does I/O meanwhile.
        var flood = Task.Run(() =>
        {
            var payload = Array.Empty<byte>();
            for (int i = 0; i < 200_000; i++)
            {
                try
                {
                    ufe.Send(VhostUserRequest.GetFeatures, payload);
                }
                catch (IOException)
                {
                    return;
                }
            }
        });
        await Task.Delay(300);
        using var gm = new DriverRingModel(Size);
        using var gfe = Open(host, "sealed", gm);
        using var call = new EventFd();
        Assert.Equal(0UL, gfe.SetupQueue(gm, 0, null, call));
        var drv = new BlkDriverModel(gm);
        ulong st = drv.Post(VirtioBlkRequestType.In, 0, gm.Alloc(512), 512, true);
        Assert.True(await VhostTestHost.WaitUntil(() => gm.UsedIdx == 1), "a guest could not do I/O while another front end flooded its socket");
        Assert.Equal(VirtioBlkRequestType.StatusOk, drv.Status(st));
        ufe.Endpoint.Shutdown(); // unblocks the flooding sender (and ends its session)
        await flood.WaitAsync(TimeSpan.FromSeconds(10));
    }

    [Fact]
    public async Task GuestMemoryShorterThanItsRegionsIsRefusedWithRateLimitedLogsAndTheSessionGoesOn()
    {
        await using var host = new VhostTestHost(reactors: 1);
        host.Vhost.CreateBlkController("short", "Malloc0", null, readOnly: false);
        using var m = new DriverRingModel(Size);
        using var fe = host.Connect("short");
        fe.Negotiate(WantProtocol);
        Assert.Equal(0UL, fe.SetU64(VhostUserRequest.SetFeatures, (1UL << VirtioFeatures.Version1) | (1UL << VhostUserConstants.ProtocolFeaturesBit)));

        // The file holds the first region only: mapping the second would fault on first touch (SIGBUS, every VM).
        int shortFd = MappedRegion.CreateMemFd("short-guest-memory", (long)DriverRingModel.RegionSize);
        try
        {
            for (int i = 0; i < 100; i++)
            {
                Assert.NotEqual(0UL, fe.SetMemTable(shortFd));
            }
        }
        finally
        {
            Fd.Close(shortFd);
        }

        int lines = host.Log.Lines.Count(l => l.Contains("SET_MEM_TABLE refused", StringComparison.Ordinal));
        Assert.InRange(lines, 1, 40); // a burst, then a few per second
        Assert.Contains(host.Log.Lines, l => l.Contains("SET_MEM_TABLE refused", StringComparison.Ordinal) && l.Contains(nameof(MemoryRegionError.PastEndOfFile), StringComparison.Ordinal));

        // The session goes on: a proper table, a queue, I/O.
        Assert.Equal(0UL, fe.SetMemTable(m));
        using var call = new EventFd();
        Assert.Equal(0UL, fe.SetupQueue(m, 0, null, call));
        var drv = new BlkDriverModel(m);
        ulong st = drv.Post(VirtioBlkRequestType.In, 0, m.Alloc(512), 512, true);
        Assert.True(await VhostTestHost.WaitUntil(() => m.UsedIdx == 1), "no I/O after the refused tables");
        Assert.Equal(VirtioBlkRequestType.StatusOk, drv.Status(st));
    }

    private static FrontEndModel Open(VhostTestHost host, string name, DriverRingModel m)
    {
        var fe = host.Connect(name);
        fe.Negotiate(WantProtocol);
        Assert.Equal(0UL, fe.SetU64(VhostUserRequest.SetFeatures, (1UL << VirtioFeatures.Version1) | (1UL << VhostUserConstants.ProtocolFeaturesBit) | (1UL << VirtioFeatures.RingIndirectDesc)));
        Assert.Equal(0UL, fe.SetMemTable(m));
        return fe;
    }

    /// <summary>Writes malformed virtio-blk requests straight into a ring (a model of a hostile guest driver).</summary>
    private sealed unsafe class HostileDriver
    {
        private readonly DriverRingModel _m;
        private readonly ulong _hdr;
        private readonly ulong _status;
        private readonly ulong _table;
        private readonly ulong _data;
        private int _next;

        public HostileDriver(DriverRingModel m)
        {
            _m = m;
            _hdr = m.Alloc(16);
            _status = m.Alloc(64);
            _table = m.Alloc(16 * 256, 16);
            _data = m.Alloc(8192, 4096);
            var h = (VirtioBlkOutHeader*)m.Host(_hdr);
            h->Type = VirtioBlkRequestType.In;
            h->Sector = 0;
        }

        public List<ulong> StatusAddresses { get; } = new();

        public byte Status(ulong gpa) => *_m.Host(gpa);

        /// <summary>Each malformed kind, as a named action that posts one request.</summary>
        public List<(string Kind, Action Post)> Kinds()
        {
            ulong end = DriverRingModel.GpaBase + (2 * DriverRingModel.RegionSize);
            return
            [
                ("descriptor loop", () => Chain((0, _hdr, 16, VirtqDesc.FlagNext, 1), (1, _data, 512, (ushort)(VirtqDesc.FlagNext | VirtqDesc.FlagWrite), 0))),
                ("next index outside the table", () => Chain((2, _hdr, 16, VirtqDesc.FlagNext, 60000))),
                ("data outside guest memory", () => Request(0xdead_0000_0000, 512)),
                ("data straddling the end of guest memory", () => Request(end - 256, 4096)),
                ("address + length overflowing", () => Request(ulong.MaxValue - 100, 4096)),
                ("4 GiB data length", () => Request(_data, uint.MaxValue)),
                ("nested indirect table", () =>
                {
                    Indirect(0, _hdr, 16, VirtqDesc.FlagIndirect, 0);
                    IndirectRequest(1);
                }),
                ("indirect table with a loop", () =>
                {
                    Indirect(0, _hdr, 16, VirtqDesc.FlagNext, 1);
                    Indirect(1, _status, 1, (ushort)(VirtqDesc.FlagNext | VirtqDesc.FlagWrite), 0);
                    IndirectRequest(2);
                }),
                ("indirect chain of 256 descriptors", () =>
                {
                    for (int i = 0; i < 256; i++)
                    {
                        Indirect(i, i == 0 ? _hdr : _data + (ulong)(i * 16), 16, (ushort)((i == 0 ? 0 : VirtqDesc.FlagWrite) | (i < 255 ? VirtqDesc.FlagNext : 0)), (ushort)(i + 1));
                    }

                    IndirectRequest(256);
                }),
                ("indirect table length not a multiple of 16", () => { _m.SetDesc(5, _table, 17, VirtqDesc.FlagIndirect); _m.Publish(5); }),
                ("no status byte", () => Chain((3, _hdr, 16, 0, 0))),
                ("header device-writable", () => Chain((4, _hdr, 16, VirtqDesc.FlagWrite, 0))),
            ];
        }

        /// <summary>A request whose data buffer is outside guest memory (the storm's request).</summary>
        public void PostUnmapped() => Request(0xdead_0000_0000, 512, track: false);

        public void JumpAvail(ushort by) => _m.SetAvailIdxRaw((ushort)(_m.UsedIdx + by));

        private void Request(ulong dataAddr, uint dataLen, bool track = true)
        {
            ulong status = _status + (ulong)(StatusAddresses.Count % 64);
            *_m.Host(status) = 0xee;
            if (track)
            {
                StatusAddresses.Add(status);
            }

            int d = 10 + ((_next++ % 16) * 3);
            _m.SetDesc(d, _hdr, 16, VirtqDesc.FlagNext, (ushort)(d + 1));
            _m.SetDesc(d + 1, dataAddr, dataLen, (ushort)(VirtqDesc.FlagNext | VirtqDesc.FlagWrite), (ushort)(d + 2));
            _m.SetDesc(d + 2, status, 1, VirtqDesc.FlagWrite);
            _m.Publish((ushort)d);
        }

        private void Chain(params (int Index, ulong Addr, uint Len, ushort Flags, ushort Next)[] descs)
        {
            foreach (var (i, a, l, f, nx) in descs)
            {
                _m.SetDesc(i, a, l, f, nx);
            }

            _m.Publish((ushort)descs[0].Index);
        }

        private void Indirect(int i, ulong addr, uint len, ushort flags, ushort next) =>
            DriverRingModel.SetDescAt(_m.Host(_table), i, addr, len, flags, next);

        private void IndirectRequest(int entries)
        {
            _m.SetDesc(5, _table, (uint)(16 * entries), VirtqDesc.FlagIndirect);
            _m.Publish(5);
        }
    }
}
