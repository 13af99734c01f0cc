using System.Diagnostics;
using VhostBackend.Nvme;
using VhostBackend.Nvme.Tcp;
using Xunit;

namespace VhostBackend.Nvmf.Tests;

/// <summary>
/// Robustness of the target against hosts that do not play along (issue 17 review findings 1-4, 11, 12): resources
/// before Connect, the data buffer budget, timeouts, the connection cap, a failing connection, a stuck namespace
/// removal, emulated compare, C2HTermReq contents, in-capsule SGL offsets. Real loopback sockets, the host MODEL.
/// </summary>
public sealed class HardeningTests
{
    private static NvmfTcpConnection Conn(NvmfTestTarget t, NvmfHostModel h)
    {
        var ep = h.LocalEndPoint;
        for (int i = 0; i < 500; i++)
        {
            foreach (var g in t.Target.Groups)
            {
                foreach (var c in g.Connections)
                {
                    if (ep.Equals(c.PeerAddress))
                    {
                        return c;
                    }
                }
            }

            Thread.Sleep(10);
        }

        throw new Xunit.Sdk.XunitException($"no target connection for {ep}");
    }

    private static (NvmfHostModel Admin, ushort Cntlid) Admin(NvmfTestTarget t)
    {
        var h = t.Host();
        var r = h.Connect(NvmfTestTarget.Nqn);
        Assert.Equal(0, r.Status);
        h.Enable();
        return (h, (ushort)r.Completion.Dw0);
    }

    private static NvmfHostModel Io(NvmfTestTarget t, ushort cntlid, ushort qid = 1, int entries = 32)
    {
        var h = t.Host();
        Assert.Equal(0, h.Connect(NvmfTestTarget.Nqn, qid, cntlid, entries).Status);
        return h;
    }

    private static byte[] Pattern(int n, int seed)
    {
        var b = new byte[n];
        new Random(seed).NextBytes(b);
        return b;
    }

    private static async Task<TestRamBdev> AddTestNamespace(NvmfTestTarget t, string name, bool compare, uint nsid = 2)
    {
        var bdev = new TestRamBdev(name, 2048, 512, compare);
        await t.Reactors.Main.InvokeAsync(() => t.Bdevs.Register(bdev));
        await t.Call("nvmf_subsystem_add_ns", $$$"""{"nqn":"{{{NvmfTestTarget.Nqn}}}","namespace":{"bdev_name":"{{{name}}}","nsid":{{{nsid}}}}}""");
        return bdev;
    }

    // ---------------------------------------------------------------- finding 1: before Connect

    [Fact]
    public async Task BeforeConnectNothingButConnectGetsABufferOrAnR2T()
    {
        await using var t = new NvmfTestTarget();
        await t.SetupAsync();
        using var h = t.Host();
        var c = Conn(t, h);
        Assert.Equal(NvmfTcpConnection.PreConnectDepth, c.AllocatedRequests);

        // A write with a transport SGL: Command Sequence Error at once, no R2T.
        var w = NvmfHostModel.Rw(NvmeIoOpcode.Write, 1, 0, 256);
        w.Cid = h.NextCid();
        h.SendCommand(w, null, 131072);
        var r = h.ReadPdu();
        Assert.Equal(NvmeTcpPduType.CapsuleResp, r.Type);
        Assert.Equal(NvmeSc.CommandSequenceError, NvmfHostModel.Sc(r.Status));

        // A Connect asking for 128 KiB through an R2T, and one with 2 KiB in the capsule: Data SGL Length Invalid.
        var big = NvmeFabrics.Connect(0, 32, 0);
        big.Cid = h.NextCid();
        h.SendCommand(big, null, 131072);
        r = h.ReadPdu();
        Assert.Equal(NvmeTcpPduType.CapsuleResp, r.Type);
        Assert.Equal(NvmeSc.DataSglLengthInvalid, NvmfHostModel.Sc(r.Status));

        var longer = NvmeFabrics.Connect(0, 32, 0);
        longer.Cid = h.NextCid();
        var data = new byte[2048];
        NvmeFabrics.WriteConnectData(data, Guid.NewGuid(), 0xFFFF, NvmfTestTarget.Nqn, NvmfHostModel.HostNqn);
        h.SendCommand(longer, data);
        r = h.ReadPdu();
        Assert.Equal(NvmeSc.DataSglLengthInvalid, NvmfHostModel.Sc(r.Status));
        Assert.Equal(0, c.Group!.BufferWaits);

        // A proper Connect sizes the queue: SQSIZE + 1 requests, not max_queue_depth.
        Assert.Equal(0, h.Connect(NvmfTestTarget.Nqn, entries: 16).Status);
        Assert.Equal(16, c.AllocatedRequests);
        Assert.Equal(16, c.QueueDepth);
        h.Enable();
        var (id, ir, _) = h.Read(NvmfHostModel.Identify(1), 4096);
        Assert.Equal(0, ir!.Status);
        Assert.Equal(4096, id.Length);
    }

    [Fact]
    public async Task AdminAnswerIsSizedByTheAnswerNotByTheSgl()
    {
        await using var t = new NvmfTestTarget();
        await t.SetupAsync();
        var (h, _) = Admin(t);
        using var _ = h;
        var c = Conn(t, h);
        var (id, r, _) = h.Read(NvmfHostModel.Identify(1), 131072);
        Assert.Equal(0, r!.Status);
        Assert.Equal(4096, id.Length);
        var log = new NvmeCommand { Opcode = NvmeAdminOpcode.GetLogPage, Cdw10 = NvmeLogPage.SmartHealth | ((512u / 4 - 1) << 16) };
        var (page, lr, _) = h.Read(log, 131072);
        Assert.Equal(0, lr!.Status);
        Assert.Equal(512, page.Length);
        Assert.True(c.Group!.BufferBytes < 131072, $"{c.Group.BufferBytes} bytes of buffers for 4 KiB answers");
    }

    [Fact]
    public async Task DataBuffersStayWithinThePollGroupBudgetAndRequestsWaitForMemory()
    {
        await using var t = new NvmfTestTarget();
        await t.SetupAsync(""","num_shared_buffers":2,"io_unit_size":131072""");
        var (admin, cntlid) = Admin(t);
        using var _ = admin;
        using var io = Io(t, cntlid, entries: 16);
        var group = Conn(t, io).Group!;
        Assert.Equal(4L * 131072, group.BufferLimit); // 2 x 128 KiB over 2 groups, raised to 4 x max_io_size

        var cids = new ushort[6];
        var payload = new Dictionary<ushort, byte[]>();
        for (int i = 0; i < cids.Length; i++)
        {
            var w = NvmfHostModel.Rw(NvmeIoOpcode.Write, 1, (ulong)(i * 256), 256);
            w.Cid = cids[i] = io.NextCid();
            payload[w.Cid] = Pattern(131072, 100 + i);
            io.SendCommand(w, null, 131072);
        }

        // Four 128 KiB buffers fill the budget: the fifth and sixth writes wait (no R2T) while the host sends nothing.
        var r2ts = new List<ModelPdu>();
        while (io.TryReadPdu(2000) is { } p)
        {
            r2ts.Add(p);
        }

        Assert.Equal(4, r2ts.Count);
        Assert.All(r2ts, p => Assert.Equal(NvmeTcpPduType.R2T, p.Type));
        Assert.Equal(cids[..4], r2ts.Select(p => NvmeTcpPdu.Cccid(p.Header)).Order().ToArray());
        Assert.True(group.BufferWaits >= 1);
        Assert.InRange(Volatile.Read(ref group.BufferBytes), 0, group.BufferLimit);

        // While they wait, every poll tries again: with no idle buffer to give back, that looks at no request (it
        // used to walk every request of every connection of the group, each poll).
        long visits = Volatile.Read(ref group.ReclaimVisits);
        Thread.Sleep(300);
        Assert.Equal(visits, Volatile.Read(ref group.ReclaimVisits));
        Assert.True(group.HasBufferWaiters);

        // Answering the R2Ts frees memory: every write gets its R2T in turn and completes.
        var pending = new Queue<ModelPdu>(r2ts);
        int done = 0;
        while (done < cids.Length)
        {
            while (pending.TryDequeue(out var r2t))
            {
                ushort cid = NvmeTcpPdu.Cccid(r2t.Header);
                io.SendH2C(cid, NvmeTcpPdu.Ttag(r2t.Header), 0, payload[cid], last: true);
            }

            var p = io.ReadPdu();
            if (p.Type == NvmeTcpPduType.R2T)
            {
                pending.Enqueue(p);
                continue;
            }

            Assert.Equal(0, p.Status);
            done++;
            Assert.InRange(Volatile.Read(ref group.BufferBytes), 0, group.BufferLimit);
        }

        var (back, rr, _) = io.Read(NvmfHostModel.Rw(NvmeIoOpcode.Read, 1, 5 * 256, 256), 131072);
        Assert.Equal(0, rr!.Status);
        Assert.Equal(payload[cids[5]], back);
    }

    [Fact]
    public async Task IdleBuffersOfAnotherConnectionAreGivenBackFromTheIdleList()
    {
        await using var t = new NvmfTestTarget();
        await t.SetupAsync(""","num_shared_buffers":2,"io_unit_size":131072""");
        var (admin, cntlid) = Admin(t);
        using var _ = admin;

        // Two I/O connections on the same poll group (connections are spread over the groups).
        var hosts = new List<NvmfHostModel>();
        NvmfHostModel? a = null, b = null;
        for (ushort qid = 1; qid <= 4 && b is null; qid++)
        {
            var h = Io(t, cntlid, qid, entries: 16);
            hosts.Add(h);
            var g = Conn(t, h).Group;
            a ??= h;
            if (!ReferenceEquals(h, a) && ReferenceEquals(g, Conn(t, a).Group))
            {
                b = h;
            }
        }

        try
        {
            Assert.NotNull(a);
            Assert.NotNull(b);
            var group = Conn(t, a).Group!;

            // A fills the budget with four 128 KiB buffers, then goes idle: they stay with its free requests.
            var cids = new ushort[4];
            for (int i = 0; i < cids.Length; i++)
            {
                var w = NvmfHostModel.Rw(NvmeIoOpcode.Write, 1, (ulong)(i * 256), 256);
                w.Cid = cids[i] = a.NextCid();
                a.SendCommand(w, null, 131072);
            }

            for (int done = 0; done < cids.Length;)
            {
                var p = a.ReadPdu();
                if (p.Type == NvmeTcpPduType.R2T)
                {
                    a.SendH2C(NvmeTcpPdu.Cccid(p.Header), NvmeTcpPdu.Ttag(p.Header), 0, Pattern(131072, 7), last: true);
                    continue;
                }

                Assert.Equal(0, p.Status);
                done++;
            }

            Assert.Equal(4, group.IdleBuffers);
            Assert.Equal(group.BufferLimit, Volatile.Read(ref group.BufferBytes));
            long visits = Volatile.Read(ref group.ReclaimVisits);

            // B needs a 128 KiB buffer: one of A's idle ones is given back (taken off the idle list, nothing scanned).
            var data = Pattern(131072, 8);
            var bw = NvmfHostModel.Rw(NvmeIoOpcode.Write, 1, 2048, 256);
            bw.Cid = b.NextCid();
            b.SendCommand(bw, null, 131072);
            var r2t = b.ReadPdu();
            Assert.Equal(NvmeTcpPduType.R2T, r2t.Type);
            b.SendH2C(bw.Cid, NvmeTcpPdu.Ttag(r2t.Header), 0, data, last: true);
            Assert.Equal(0, b.ReadPdu().Status);
            Assert.Equal(visits + 1, Volatile.Read(ref group.ReclaimVisits));
            Assert.Equal(4, group.IdleBuffers); // three of A's, B's own
            Assert.InRange(Volatile.Read(ref group.BufferBytes), 0, group.BufferLimit);
            var (back, rr, _) = b.Read(NvmfHostModel.Rw(NvmeIoOpcode.Read, 1, 2048, 256), 131072);
            Assert.Equal(0, rr!.Status);
            Assert.Equal(data, back);
        }
        finally
        {
            foreach (var h in hosts)
            {
                h.Dispose();
            }
        }
    }

    [Fact]
    public async Task AConnectionThatThrowsIsClosedAloneAndItsReactorGoesOn()
    {
        await using var t = new NvmfTestTarget();
        await t.SetupAsync();
        var hosts = Enumerable.Range(0, 4).Select(_ =>
        {
            var h = t.Host();
            Assert.Equal(0, h.Connect(NvmfTestTarget.Nqn).Status);
            return h;
        }).ToArray();
        try
        {
            var conns = hosts.Select(h => Conn(t, h)).ToArray();
            int victim = 0;
            int other = Array.FindIndex(conns, c => c != conns[0] && c.Group == conns[0].Group);
            Assert.True(other > 0, "two connections on one poll group");
            conns[victim].TestPollHook = _ => throw new InvalidOperationException("injected fault");
            Assert.True(hosts[victim].ClosedByTarget(5000));
            Assert.Contains("injected fault", conns[victim].CloseReason);
            for (int i = 1; i < hosts.Length; i++)
            {
                Assert.Equal(0, hosts[i].Execute(NvmeFabrics.PropertyGet(NvmeReg.Cap, eightBytes: true)).Status);
            }
        }
        finally
        {
            foreach (var h in hosts)
            {
                h.Dispose();
            }
        }
    }

    // ---------------------------------------------------------------- finding 2: timeouts, connection cap

    [Fact]
    public async Task ConnectionsWithoutIcReqOrConnectAreClosed()
    {
        await using var t = new NvmfTestTarget();
        await t.SetupAsync();
        t.Target.IcReqTimeout = TimeSpan.FromMilliseconds(500);
        t.Target.ConnectTimeout = TimeSpan.FromMilliseconds(2000);
        var sw = Stopwatch.StartNew();
        using var silent = new NvmfHostModel(t.Port);
        using var icOnly = t.Host();
        using var ok = t.Host();
        Assert.Equal(0, ok.Connect(NvmfTestTarget.Nqn).Status);

        Assert.True(silent.ClosedByTarget(5000));
        Assert.True(icOnly.ClosedByTarget(5000));
        Assert.True(sw.ElapsedMilliseconds >= 1500, $"ICReq-only connection closed after {sw.ElapsedMilliseconds} ms");
        Assert.Equal(0, ok.Execute(NvmeFabrics.PropertyGet(NvmeReg.Cap, eightBytes: true)).Status);
    }

    [Fact]
    public async Task ConnectionsBeyondTheListenerCapAreClosedAtAccept()
    {
        await using var t = new NvmfTestTarget();
        await t.SetupAsync();
        t.Target.MaxConnectionsPerListener = 3;
        var hosts = new List<NvmfHostModel> { t.Host(), t.Host(), t.Host() };
        try
        {
            using (var fourth = new NvmfHostModel(t.Port))
            {
                Assert.True(fourth.ClosedByTarget(5000));
            }

            Assert.True(t.Target.RefusedConnections >= 1);
            Assert.Equal(0, hosts[0].Connect(NvmfTestTarget.Nqn).Status);

            // A closed connection makes room again.
            hosts[1].Dispose();
            hosts.RemoveAt(1);
            NvmfHostModel? again = null;
            for (int i = 0; i < 50 && again is null; i++)
            {
                try
                {
                    again = t.Host();
                }
                catch (Exception e) when (e is EndOfStreamException or System.Net.Sockets.SocketException)
                {
                    Thread.Sleep(100);
                }
            }

            Assert.NotNull(again);
            hosts.Add(again!);
            Assert.Equal(0, again!.Connect(NvmfTestTarget.Nqn).Status);
        }
        finally
        {
            foreach (var h in hosts)
            {
                h.Dispose();
            }
        }
    }

    // ---------------------------------------------------------------- finding 3: namespace removal with stuck I/O

    [Fact]
    public async Task RemovingANamespaceWithStuckIoAnswersAndClosesTheBdevWhenTheIoEnds()
    {
        await using var t = new NvmfTestTarget();
        await t.SetupAsync();
        var bdev = await AddTestNamespace(t, "Stuck0", compare: true);
        t.Target.NamespaceReleaseTimeout = TimeSpan.FromMilliseconds(300);
        var (admin, cntlid) = Admin(t);
        using var _ = admin;
        using var io = Io(t, cntlid);

        bdev.Stall = true;
        var rd = NvmfHostModel.Rw(NvmeIoOpcode.Read, 2, 0, 8);
        rd.Cid = io.NextCid();
        io.SendCommand(rd, null, 4096);
        var sw = Stopwatch.StartNew();
        while (bdev.HeldCount == 0 && sw.ElapsedMilliseconds < 5000)
        {
            Thread.Sleep(10);
        }

        Assert.Equal(1, bdev.HeldCount);
        var removed = await t.Call("nvmf_subsystem_remove_ns", $$"""{"nqn":"{{NvmfTestTarget.Nqn}}","nsid":2}""");
        Assert.True(removed!.GetValue<bool>());
        var subs = await t.Call("nvmf_get_subsystems", $$"""{"nqn":"{{NvmfTestTarget.Nqn}}"}""");
        Assert.DoesNotContain("Stuck0", subs!.ToJsonString(), StringComparison.Ordinal);

        // The bdev is still open (its I/O is in flight): hot-remove waits; once the I/O ends the descriptor closes.
        var unregister = await t.Reactors.Main.InvokeAsync(() => t.Bdevs.UnregisterAsync(bdev, TimeSpan.FromSeconds(20)));
        await Task.Delay(200);
        Assert.False(bdev.Destructed);
        bdev.ReleaseHeld();
        ModelPdu p;
        do
        {
            p = io.ReadPdu();
        }
        while (p.Type == NvmeTcpPduType.C2HData && (p.Flags & NvmeTcpFlags.Success) == 0);

        await unregister.WaitAsync(TimeSpan.FromSeconds(15));
        Assert.True(bdev.Destructed);
    }

    // ---------------------------------------------------------------- finding 4: emulated compare

    [Fact]
    public async Task EmulatedCompareKeepsTheHostsData()
    {
        await using var t = new NvmfTestTarget();
        await t.SetupAsync();
        var bdev = await AddTestNamespace(t, "NoCompare0", compare: false);
        Assert.False(bdev.SupportsIoType(Bdev.BdevIoType.Compare));
        var (admin, cntlid) = Admin(t);
        using var _ = admin;
        using var io = Io(t, cntlid);

        // In-capsule (4 KiB): the request's buffer is exactly the host's data when the compare needs twice as much.
        var data = Pattern(4096, 11);
        var w = NvmfHostModel.Rw(NvmeIoOpcode.Write, 2, 0, 8);
        w.Cid = io.NextCid();
        io.SendCommand(w, data);
        Assert.Equal(0, io.ReadPdu().Status);
        var cmp = NvmfHostModel.Rw(NvmeIoOpcode.Compare, 2, 0, 8);
        cmp.Cid = io.NextCid();
        io.SendCommand(cmp, data);
        Assert.Equal(0, io.ReadPdu().Status);
        var other = (byte[])data.Clone();
        other[4095] ^= 0x80;
        cmp.Cid = io.NextCid();
        io.SendCommand(cmp, other);
        var st = io.ReadPdu().Status;
        Assert.Equal(NvmeSct.MediaError, NvmfHostModel.Sct(st));
        Assert.Equal(NvmeSc.CompareFailure, NvmfHostModel.Sc(st));

        // Through an R2T (16 KiB) on a fresh queue.
        using var io2 = Io(t, cntlid, qid: 2);
        var big = Pattern(16384, 12);
        var w2 = NvmfHostModel.Rw(NvmeIoOpcode.Write, 2, 64, 32);
        w2.Cid = io2.NextCid();
        io2.SendCommand(w2, null, 16384);
        var r2t = io2.ReadPdu();
        io2.SendH2C(w2.Cid, NvmeTcpPdu.Ttag(r2t.Header), 0, big, last: true);
        Assert.Equal(0, io2.ReadPdu().Status);
        var c2 = NvmfHostModel.Rw(NvmeIoOpcode.Compare, 2, 64, 32);
        c2.Cid = io2.NextCid();
        io2.SendCommand(c2, null, 16384);
        r2t = io2.ReadPdu();
        Assert.Equal(NvmeTcpPduType.R2T, r2t.Type);
        io2.SendH2C(c2.Cid, NvmeTcpPdu.Ttag(r2t.Header), 0, big, last: true);
        Assert.Equal(0, io2.ReadPdu().Status);
    }

    // ---------------------------------------------------------------- finding 11: C2HTermReq

    [Fact]
    public async Task TermReqCarriesTheOffendingHeader()
    {
        await using var t = new NvmfTestTarget();
        await t.SetupAsync();
        var (admin, cntlid) = Admin(t);
        using var _ = admin;
        using var io = Io(t, cntlid);
        var w = NvmfHostModel.Rw(NvmeIoOpcode.Write, 1, 0, 32);
        w.Cid = io.NextCid();
        io.SendCommand(w, null, 16384);
        var r2t = io.ReadPdu();
        ushort ttag = NvmeTcpPdu.Ttag(r2t.Header);
        io.SendH2C(w.Cid, ttag, 8192, new byte[8192], last: true); // outside the R2T
        var seen = new List<ModelPdu>();
        Assert.True(io.ClosedByTarget(seen: seen));
        var term = Assert.Single(seen, p => p.Type == NvmeTcpPduType.C2HTermReq);
        var expected = new byte[NvmeTcpPdu.MaxHeaderBytes];
        int hl = NvmeTcpPdu.WriteH2CData(expected, w.Cid, ttag, 8192, 8192, true, false, false, 0);
        Assert.Equal(NvmeTcpPdu.TermReqHlen + hl, term.Header.Length);
        Assert.Equal(expected.AsSpan(0, hl).ToArray(), term.Header.AsSpan(NvmeTcpPdu.TermReqHlen).ToArray());
    }

    // ---------------------------------------------------------------- finding 12: in-capsule SGL offsets

    [Fact]
    public async Task InCapsuleSglOffsetIsHonoured()
    {
        await using var t = new NvmfTestTarget();
        await t.SetupAsync();
        var (admin, cntlid) = Admin(t);
        using var _ = admin;
        using var io = Io(t, cntlid);
        var capsule = Pattern(4096, 21);
        var w = NvmfHostModel.Rw(NvmeIoOpcode.Write, 1, 300, 7);
        w.Cid = io.NextCid();
        NvmeFabrics.SetSgl(ref w, 3584, inCapsule: true);
        w.Prp1 = 512;
        io.SendCommand(w, capsule, keepSgl: true);
        Assert.Equal(0, io.ReadPdu().Status);
        var (back, r, _) = io.Read(NvmfHostModel.Rw(NvmeIoOpcode.Read, 1, 300, 7), 3584);
        Assert.Equal(0, r!.Status);
        Assert.Equal(capsule.AsSpan(512).ToArray(), back);

        // Beyond the capsule: offset invalid; offset + length beyond it: length invalid.
        w.Cid = io.NextCid();
        w.Prp1 = 4097;
        io.SendCommand(w, capsule, keepSgl: true);
        Assert.Equal(NvmeSc.SglOffsetInvalid, NvmfHostModel.Sc(io.ReadPdu().Status));
        w.Cid = io.NextCid();
        w.Prp1 = 1024;
        io.SendCommand(w, capsule, keepSgl: true);
        Assert.Equal(NvmeSc.DataSglLengthInvalid, NvmfHostModel.Sc(io.ReadPdu().Status));
    }
}
