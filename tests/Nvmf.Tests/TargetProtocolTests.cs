using System.Buffers.Binary;
using System.Text;
using VhostBackend.Nvme;
using VhostBackend.Nvme.Tcp;
using Xunit;

namespace VhostBackend.Nvmf.Tests;

/// <summary>The target over a real loopback socket, driven by the host MODEL (well-formed and hostile PDUs).</summary>
public sealed class TargetProtocolTests : IAsyncLifetime
{
    private readonly NvmfTestTarget _t = new();

    public Task InitializeAsync() => _t.SetupAsync();

    public async Task DisposeAsync() => await _t.DisposeAsync();

    private NvmfHostModel AdminHost(bool hdgst = false, bool ddgst = false, bool disableSqFlow = false)
    {
        var h = _t.Host(hdgst, ddgst);
        var r = h.Connect(NvmfTestTarget.Nqn, disableSqFlow: disableSqFlow);
        Assert.Equal(0, r.Status);
        h.Enable();
        return h;
    }

    private static ushort Cntlid(ModelPdu connectResp) => (ushort)connectResp.Completion.Dw0;

    [Fact]
    public void IcReqIsAnsweredWithIcRespEchoingDigestsAndMaxH2CData()
    {
        using var h = new NvmfHostModel(_t.Port);
        var r = h.IcReq(hdgst: true, ddgst: true, hpda: 3);
        Assert.Equal(NvmeTcpPduType.IcResp, r.Type);
        Assert.Equal(128, r.Header.Length);
        Assert.Equal(0, NvmeTcpPdu.Pfv(r.Header));
        Assert.Equal(0, NvmeTcpPdu.IcPda(r.Header));
        Assert.Equal(3, NvmeTcpPdu.IcDigests(r.Header));
        Assert.Equal(131072u, NvmeTcpPdu.IcMax(r.Header));
    }

    [Fact]
    public void ConnectPropertiesAndIdentifyController()
    {
        using var h = _t.Host();
        var c = h.Connect(NvmfTestTarget.Nqn);
        Assert.Equal(0, c.Status);
        ushort cntlid = Cntlid(c);
        Assert.InRange(cntlid, 1, 0xFFEF);

        var cap = h.Execute(NvmeFabrics.PropertyGet(NvmeReg.Cap, eightBytes: true)).Completion;
        ulong capv = cap.Dw0 | ((ulong)cap.Dw1 << 32);
        Assert.Equal(128, new NvmeCap(capv).MaxQueueEntries);
        Assert.True(new NvmeCap(capv).NvmCommandSet);
        Assert.Equal(0x00010300u, h.Execute(NvmeFabrics.PropertyGet(NvmeReg.Vs, false)).Completion.Dw0);
        Assert.Equal(0u, h.Execute(NvmeFabrics.PropertyGet(NvmeReg.Csts, false)).Completion.Dw0);

        // Admin commands before CC.EN: command sequence error.
        var early = h.Read(NvmfHostModel.Identify(1), 4096);
        Assert.Equal(NvmeSc.CommandSequenceError, NvmfHostModel.Sc(early.Resp!.Status));

        h.Enable();
        Assert.Equal(1u, h.Execute(NvmeFabrics.PropertyGet(NvmeReg.Csts, false)).Completion.Dw0 & 1);
        var (data, resp, _) = h.Read(NvmfHostModel.Identify(1), 4096);
        Assert.Equal(0, resp!.Status);
        Assert.Equal(4096, data.Length);
        var id = NvmeControllerData.Parse(data);
        Assert.Equal("SPDK00000000000001", id.SerialNumber);
        Assert.Equal("SPDK bdev Controller", id.ModelNumber);
        Assert.Equal(cntlid, id.ControllerId);
        Assert.Equal(NvmfTestTarget.Nqn, id.SubsystemNqn);
        Assert.Equal(128, BinaryPrimitives.ReadUInt16LittleEndian(data.AsSpan(514))); // MAXCMD
        Assert.Equal((64u + 4096) / 16, BinaryPrimitives.ReadUInt32LittleEndian(data.AsSpan(1792))); // IOCCSZ
        Assert.Equal(5, id.Mdts); // 128 KiB
        Assert.True(id.Oncs.HasFlag(NvmeOncs.DatasetManagement) && id.Oncs.HasFlag(NvmeOncs.WriteZeroes) && id.Oncs.HasFlag(NvmeOncs.Compare));
        Assert.Equal(1, data[111]); // I/O controller
    }

    [Fact]
    public void IdentifyNamespaceActiveListAndDescriptors()
    {
        using var h = AdminHost();
        var (ns, r, _) = h.Read(NvmfHostModel.Identify(0, 1), 4096);
        Assert.Equal(0, r!.Status);
        var d = NvmeNamespaceData.Parse(1, ns);
        Assert.Equal(8192ul, d.Size);
        Assert.Equal(512u, d.BlockSize);

        var (list, r2, _) = h.Read(NvmfHostModel.Identify(2, 0), 4096);
        Assert.Equal(0, r2!.Status);
        Assert.Equal(1u, BinaryPrimitives.ReadUInt32LittleEndian(list));
        Assert.Equal(0u, BinaryPrimitives.ReadUInt32LittleEndian(list.AsSpan(4)));

        var (desc, r3, _) = h.Read(NvmfHostModel.Identify(3, 1), 4096);
        Assert.Equal(0, r3!.Status);
        Assert.Equal(2, desc[0]); // NGUID
        Assert.Equal(16, desc[1]);
        Assert.Equal(3, desc[20]); // UUID
        Assert.Equal(ns.AsSpan(104, 16).ToArray(), desc.AsSpan(4, 16).ToArray());

        // An nsid with no namespace: zeroed data; beyond NN: invalid namespace.
        var (empty, r4, _) = h.Read(NvmfHostModel.Identify(0, 2), 4096);
        Assert.Equal(0, r4!.Status);
        Assert.All(empty, b => Assert.Equal(0, b));
        var (_, r5, _) = h.Read(NvmfHostModel.Identify(0, 100000), 4096);
        Assert.Equal(NvmeSc.InvalidNamespace, NvmfHostModel.Sc(r5!.Status));
    }

    private NvmfHostModel IoHost(ushort cntlid, bool hdgst = false, bool ddgst = false, ushort qid = 1, int entries = 32, bool disableSqFlow = false)
    {
        var h = _t.Host(hdgst, ddgst);
        var r = h.Connect(NvmfTestTarget.Nqn, qid, cntlid, entries, disableSqFlow: disableSqFlow);
        Assert.Equal(0, r.Status);
        return h;
    }

    private (NvmfHostModel Admin, ushort Cntlid) AdminWithId(bool hdgst = false, bool ddgst = false)
    {
        var h = _t.Host(hdgst, ddgst);
        var r = h.Connect(NvmfTestTarget.Nqn);
        Assert.Equal(0, r.Status);
        h.Enable();
        return (h, Cntlid(r));
    }

    private static byte[] Pattern(int n, int seed)
    {
        var b = new byte[n];
        new Random(seed).NextBytes(b);
        return b;
    }

    [Theory]
    [InlineData(false, false)]
    [InlineData(true, true)]
    public void WriteInCapsuleAndThroughR2TThenReadBack(bool hdgst, bool ddgst)
    {
        var (admin, cntlid) = AdminWithId(hdgst, ddgst);
        using var _ = admin;
        using var h = IoHost(cntlid, hdgst, ddgst);

        // 4 KiB fits in the capsule (in_capsule_data_size 4096).
        var small = Pattern(4096, 1);
        var w = NvmfHostModel.Rw(NvmeIoOpcode.Write, 1, 16, 8);
        w.Cid = h.NextCid();
        h.SendCommand(w, small);
        Assert.Equal(0, h.ReadPdu().Status);

        // 64 KiB: an R2T for all of it, answered in four H2CData PDUs.
        var big = Pattern(65536, 2);
        var w2 = NvmfHostModel.Rw(NvmeIoOpcode.Write, 1, 100, 128);
        w2.Cid = h.NextCid();
        h.SendCommand(w2, null, 65536);
        var r2t = h.ReadPdu();
        Assert.Equal(NvmeTcpPduType.R2T, r2t.Type);
        Assert.Equal(w2.Cid, NvmeTcpPdu.Cccid(r2t.Header));
        Assert.Equal(0u, NvmeTcpPdu.DataOffsetField(r2t.Header));
        Assert.Equal(65536u, NvmeTcpPdu.DataLengthField(r2t.Header));
        ushort ttag = NvmeTcpPdu.Ttag(r2t.Header);
        for (int i = 0; i < 4; i++)
        {
            h.SendH2C(w2.Cid, ttag, (uint)(i * 16384), big.AsSpan(i * 16384, 16384), last: i == 3);
        }

        Assert.Equal(0, h.ReadPdu().Status);

        var (d1, r1, _) = h.Read(NvmfHostModel.Rw(NvmeIoOpcode.Read, 1, 16, 8), 4096);
        Assert.Equal(0, r1!.Status);
        Assert.Equal(small, d1);
        var (d2, rr, _) = h.Read(NvmfHostModel.Rw(NvmeIoOpcode.Read, 1, 100, 128), 65536);
        Assert.Equal(0, rr!.Status);
        Assert.Equal(big, d2);
    }

    [Fact]
    public void C2HSuccessFlagOnlyWhenTheHostDisabledSqFlowControl()
    {
        var (admin, cntlid) = AdminWithId();
        using var _ = admin;
        using var normal = IoHost(cntlid, qid: 1);
        var (_, resp, pdus) = normal.Read(NvmfHostModel.Rw(NvmeIoOpcode.Read, 1, 0, 8), 4096);
        Assert.NotNull(resp);
        Assert.Equal(NvmeTcpPduType.CapsuleResp, resp!.Type);
        Assert.Equal(0, pdus[0].Flags & NvmeTcpFlags.Success);

        using var fast = IoHost(cntlid, qid: 2, disableSqFlow: true);
        var (data, resp2, pdus2) = fast.Read(NvmfHostModel.Rw(NvmeIoOpcode.Read, 1, 0, 8), 4096);
        Assert.Null(resp2);
        Assert.Equal(4096, data.Length);
        Assert.NotEqual(0, pdus2[^1].Flags & NvmeTcpFlags.Success);
        Assert.NotEqual(0, pdus2[^1].Flags & NvmeTcpFlags.LastPdu);
    }

    [Fact]
    public void FlushWriteZeroesDeallocateAndCompare()
    {
        var (admin, cntlid) = AdminWithId();
        using var _ = admin;
        using var h = IoHost(cntlid);
        var data = Pattern(4096, 7);
        var w = NvmfHostModel.Rw(NvmeIoOpcode.Write, 1, 200, 8);
        w.Cid = h.NextCid();
        h.SendCommand(w, data);
        Assert.Equal(0, h.ReadPdu().Status);

        // Compare: equal, then different.
        var c = NvmfHostModel.Rw(NvmeIoOpcode.Compare, 1, 200, 8);
        c.Cid = h.NextCid();
        h.SendCommand(c, data);
        Assert.Equal(0, h.ReadPdu().Status);
        var other = (byte[])data.Clone();
        other[100] ^= 1;
        c.Cid = h.NextCid();
        h.SendCommand(c, other);
        var miscompare = h.ReadPdu().Status;
        Assert.Equal(NvmeSct.MediaError, NvmfHostModel.Sct(miscompare));
        Assert.Equal(NvmeSc.CompareFailure, NvmfHostModel.Sc(miscompare));

        Assert.Equal(0, h.Execute(new NvmeCommand { Opcode = NvmeIoOpcode.Flush, Nsid = 1 }).Status);

        // Write zeroes over the first half, deallocate the second half: both read back as zeros (malloc).
        Assert.Equal(0, h.Execute(NvmfHostModel.Rw(NvmeIoOpcode.WriteZeroes, 1, 200, 4)).Status);
        var range = new byte[16];
        BinaryPrimitives.WriteUInt32LittleEndian(range.AsSpan(4), 4);
        BinaryPrimitives.WriteUInt64LittleEndian(range.AsSpan(8), 204);
        var dsm = new NvmeCommand { Opcode = NvmeIoOpcode.DatasetManagement, Nsid = 1, Cdw10 = 0, Cdw11 = 4, Cid = h.NextCid() };
        h.SendCommand(dsm, range);
        Assert.Equal(0, h.ReadPdu().Status);
        var (back, r, _) = h.Read(NvmfHostModel.Rw(NvmeIoOpcode.Read, 1, 200, 8), 4096);
        Assert.Equal(0, r!.Status);
        Assert.All(back, b => Assert.Equal(0, b));
    }

    [Fact]
    public void IoErrorsAreSpecStatuses()
    {
        var (admin, cntlid) = AdminWithId();
        using var _ = admin;
        using var h = IoHost(cntlid);
        var (_, r1, _) = h.Read(NvmfHostModel.Rw(NvmeIoOpcode.Read, 1, 8190, 8), 4096);
        Assert.Equal(NvmeSc.LbaOutOfRange, NvmfHostModel.Sc(r1!.Status));
        var (_, r2, _) = h.Read(NvmfHostModel.Rw(NvmeIoOpcode.Read, 9, 0, 8), 4096);
        Assert.Equal(NvmeSc.InvalidNamespace, NvmfHostModel.Sc(r2!.Status));
        var (_, r3, _) = h.Read(NvmfHostModel.Rw(NvmeIoOpcode.Read, 1, 0, 16), 4096); // SGL shorter than the blocks
        Assert.Equal(NvmeSc.DataSglLengthInvalid, NvmfHostModel.Sc(r3!.Status));
        var (_, r4, _) = h.Read(NvmfHostModel.Rw(NvmeIoOpcode.Read, 1, 0, 512), 262144); // beyond max_io_size
        Assert.Equal(NvmeSc.DataSglLengthInvalid, NvmfHostModel.Sc(r4!.Status));
        var r5 = h.Execute(new NvmeCommand { Opcode = 0x7E, Nsid = 1 });
        Assert.Equal(NvmeSc.InvalidOpcode, NvmfHostModel.Sc(r5.Status));
    }

    // ---------------------------------------------------------------- bad hosts

    [Fact]
    public void ConnectToUnknownNqnIsInvalidParametersAtSubnqn()
    {
        using var h = _t.Host();
        var r = h.Connect("nqn.2016-06.io.spdk:nosuch");
        Assert.Equal(NvmeSct.CommandSpecific, NvmfHostModel.Sct(r.Status));
        Assert.Equal(NvmeSc.ConnectInvalidParameters, NvmfHostModel.Sc(r.Status));
        Assert.Equal(1u, r.Completion.Dw0 & 1); // IATTR: in the data
        Assert.Equal(256u, r.Completion.Dw0 >> 16); // IPO: subnqn
    }

    [Fact]
    public async Task RefusedHostGetsInvalidHostUntilAdded()
    {
        await _t.Call("nvmf_subsystem_allow_any_host", $$"""{"nqn":"{{NvmfTestTarget.Nqn}}","allow_any_host":false}""");
        using (var h = _t.Host())
        {
            var r = h.Connect(NvmfTestTarget.Nqn);
            Assert.Equal(NvmeSc.ConnectInvalidHost, NvmfHostModel.Sc(r.Status));
        }

        await _t.Call("nvmf_subsystem_add_host", $$"""{"nqn":"{{NvmfTestTarget.Nqn}}","host":"{{NvmfHostModel.HostNqn}}"}""");
        using var ok = _t.Host();
        Assert.Equal(0, ok.Connect(NvmfTestTarget.Nqn).Status);
        using var other = _t.Host();
        Assert.Equal(NvmeSc.ConnectInvalidHost, NvmfHostModel.Sc(other.Connect(NvmfTestTarget.Nqn, hostnqn: "nqn.2014-08.org.example:other").Status));
    }

    [Fact]
    public void CommandsBeforeConnectAreSequenceErrors()
    {
        using var h = _t.Host();
        var r = h.Execute(NvmeFabrics.PropertyGet(NvmeReg.Cap, true));
        Assert.Equal(NvmeSc.CommandSequenceError, NvmfHostModel.Sc(r.Status));
        var (_, r2, _) = h.Read(NvmfHostModel.Identify(1), 4096);
        Assert.Equal(NvmeSc.CommandSequenceError, NvmfHostModel.Sc(r2!.Status));

        // The connection still works.
        Assert.Equal(0, h.Connect(NvmfTestTarget.Nqn).Status);
    }

    [Fact]
    public void IoQueueConnectToUnknownControllerOrDuplicateQid()
    {
        var (admin, cntlid) = AdminWithId();
        using var _ = admin;
        using (var h = _t.Host())
        {
            var r = h.Connect(NvmfTestTarget.Nqn, 1, (ushort)(cntlid + 100));
            Assert.Equal(NvmeSc.ConnectInvalidParameters, NvmfHostModel.Sc(r.Status));
            Assert.Equal(16u, r.Completion.Dw0 >> 16);
        }

        using var q1 = IoHost(cntlid, qid: 1);
        using var dup = _t.Host();
        var d = dup.Connect(NvmfTestTarget.Nqn, 1, cntlid);
        Assert.Equal(NvmeSc.ConnectInvalidParameters, NvmfHostModel.Sc(d.Status));
        Assert.Equal(42u, d.Completion.Dw0 >> 16);
    }

    [Fact]
    public void MalformedPduGetsTermReqAndCloseOthersUnaffected()
    {
        var (admin, cntlid) = AdminWithId();
        using var _ = admin;
        using var good = IoHost(cntlid);

        using var bad = _t.Host();
        var junk = new byte[24];
        NvmeTcpPdu.WriteCommon(junk, NvmeTcpPduType.CapsuleCmd, 0, 40, 0, 24); // wrong hlen
        bad.Send(junk);
        var seen = new List<ModelPdu>();
        Assert.True(bad.ClosedByTarget(seen: seen));
        Assert.Contains(seen, p => p.Type == NvmeTcpPduType.C2HTermReq && NvmeTcpPdu.TermFes(p.Header) == NvmeTcpFes.InvalidHeaderField);

        var (_, r, _) = good.Read(NvmfHostModel.Rw(NvmeIoOpcode.Read, 1, 0, 8), 4096);
        Assert.Equal(0, r!.Status);
        Assert.True(_t.Target.ProtocolErrors >= 1);
    }

    [Fact]
    public void HeaderDigestMismatchClosesWithHeaderDigestError()
    {
        using var h = _t.Host(hdgst: true);
        var cmd = NvmeFabrics.PropertyGet(NvmeReg.Cap, true);
        cmd.Cid = 1;
        h.SendCommand(cmd, corruptHeaderDigest: true);
        var seen = new List<ModelPdu>();
        Assert.True(h.ClosedByTarget(seen: seen));
        Assert.Contains(seen, p => p.Type == NvmeTcpPduType.C2HTermReq && NvmeTcpPdu.TermFes(p.Header) == NvmeTcpFes.HeaderDigestError);
    }

    [Fact]
    public void DataDigestMismatchFailsTheCommandNotTheConnection()
    {
        var (admin, cntlid) = AdminWithId(ddgst: true);
        using var _ = admin;
        using var h = IoHost(cntlid, ddgst: true);
        var w = NvmfHostModel.Rw(NvmeIoOpcode.Write, 1, 0, 8);
        w.Cid = h.NextCid();
        h.SendCommand(w, Pattern(4096, 3), corruptDataDigest: true);
        var r = h.ReadPdu();
        Assert.Equal(NvmeSc.TransientTransportError, NvmfHostModel.Sc(r.Status));
        w.Cid = h.NextCid();
        h.SendCommand(w, Pattern(4096, 3));
        Assert.Equal(0, h.ReadPdu().Status);
    }

    [Fact]
    public void InCapsuleDataBeyondTheLimitIsFatal()
    {
        var (admin, cntlid) = AdminWithId();
        using var _ = admin;
        using var h = IoHost(cntlid);
        var w = NvmfHostModel.Rw(NvmeIoOpcode.Write, 1, 0, 16);
        w.Cid = h.NextCid();
        h.SendCommand(w, Pattern(8192, 4)); // in_capsule_data_size is 4096 on I/O queues
        var seen = new List<ModelPdu>();
        Assert.True(h.ClosedByTarget(seen: seen));
        Assert.Contains(seen, p => p.Type == NvmeTcpPduType.C2HTermReq && NvmeTcpPdu.TermFes(p.Header) == NvmeTcpFes.DataTransferLimitExceeded);
    }

    [Fact]
    public void H2CDataOutsideTheR2TIsFatal()
    {
        var (admin, cntlid) = AdminWithId();
        using var _ = admin;
        using var h = IoHost(cntlid);
        var w = NvmfHostModel.Rw(NvmeIoOpcode.Write, 1, 0, 32);
        w.Cid = h.NextCid();
        h.SendCommand(w, null, 16384);
        var r2t = h.ReadPdu();
        Assert.Equal(NvmeTcpPduType.R2T, r2t.Type);
        h.SendH2C(w.Cid, NvmeTcpPdu.Ttag(r2t.Header), 8192, new byte[8192], last: true); // skips the first 8 KiB
        var seen = new List<ModelPdu>();
        Assert.True(h.ClosedByTarget(seen: seen));
        Assert.Contains(seen, p => p.Type == NvmeTcpPduType.C2HTermReq && NvmeTcpPdu.TermFes(p.Header) == NvmeTcpFes.DataTransferOutOfRange);
    }

    [Fact]
    public void FloodingPastTheQueueSizeClosesTheConnection()
    {
        var (admin, cntlid) = AdminWithId();
        using var _ = admin;
        using var h = IoHost(cntlid, entries: 4);

        // Writes whose data never comes (R2T outstanding) hold their slots: the fifth command overflows a 4-entry queue.
        for (int i = 0; i < 5; i++)
        {
            var w = NvmfHostModel.Rw(NvmeIoOpcode.Write, 1, (ulong)(i * 64), 16);
            w.Cid = h.NextCid();
            h.SendCommand(w, null, 8192);
        }

        var seen = new List<ModelPdu>();
        Assert.True(h.ClosedByTarget(seen: seen));
        Assert.InRange(seen.Count(p => p.Type == NvmeTcpPduType.R2T), 0, 4);
        Assert.Contains(seen, p => p.Type == NvmeTcpPduType.C2HTermReq);
    }

    [Fact]
    public void SecondIcReqIsASequenceError()
    {
        using var h = _t.Host();
        var b = new byte[NvmeTcpPdu.IcSize];
        NvmeTcpPdu.WriteIcReq(b, 0, false, false, 0);
        h.Send(b);
        var seen = new List<ModelPdu>();
        Assert.True(h.ClosedByTarget(seen: seen));
        Assert.Contains(seen, p => p.Type == NvmeTcpPduType.C2HTermReq && NvmeTcpPdu.TermFes(p.Header) == NvmeTcpFes.PduSequenceError);
    }

    // ---------------------------------------------------------------- admin: features, logs, AER, keep alive

    [Fact]
    public void FeaturesKeepAliveAbortAndLogPages()
    {
        using var h = AdminHost();
        var nq = h.Execute(new NvmeCommand { Opcode = NvmeAdminOpcode.SetFeatures, Cdw10 = NvmeFeature.NumberOfQueues, Cdw11 = 3 | (3u << 16) });
        Assert.Equal(0, nq.Status);
        Assert.Equal(126u, nq.Completion.Dw0 & 0xFFFF); // 127 I/O queues (max_io_qpairs_per_ctrlr), 0's based
        Assert.Equal(0, h.Execute(new NvmeCommand { Opcode = NvmeAdminOpcode.SetFeatures, Cdw10 = NvmeFeature.KeepAliveTimer, Cdw11 = 15000 }).Status);
        Assert.Equal(15000u, h.Execute(new NvmeCommand { Opcode = NvmeAdminOpcode.GetFeatures, Cdw10 = NvmeFeature.KeepAliveTimer }).Completion.Dw0);
        Assert.Equal(0, h.Execute(new NvmeCommand { Opcode = NvmeAdminOpcode.SetFeatures, Cdw10 = NvmeFeature.AsyncEventConfiguration, Cdw11 = 0x100 }).Status);
        Assert.Equal(0x100u, h.Execute(new NvmeCommand { Opcode = NvmeAdminOpcode.GetFeatures, Cdw10 = NvmeFeature.AsyncEventConfiguration }).Completion.Dw0);
        Assert.Equal(NvmeSc.InvalidField, NvmfHostModel.Sc(h.Execute(new NvmeCommand { Opcode = NvmeAdminOpcode.GetFeatures, Cdw10 = 0x7D }).Status));
        Assert.Equal(0, h.Execute(new NvmeCommand { Opcode = NvmeAdminOpcode.KeepAlive }).Status);
        var ab = h.Execute(new NvmeCommand { Opcode = NvmeAdminOpcode.Abort, Cdw10 = 1 | (5u << 16) });
        Assert.Equal(0, ab.Status);
        Assert.Equal(1u, ab.Completion.Dw0 & 1); // not aborted

        var smart = new NvmeCommand { Opcode = NvmeAdminOpcode.GetLogPage, Cdw10 = NvmeLogPage.SmartHealth | ((512u / 4 - 1) << 16) };
        var (s, sr, _) = h.Read(smart, 512);
        Assert.Equal(0, sr!.Status);
        Assert.Equal(512, s.Length);
        var err = new NvmeCommand { Opcode = NvmeAdminOpcode.GetLogPage, Cdw10 = NvmeLogPage.Error | ((64u / 4 - 1) << 16) };
        Assert.Equal(0, h.Read(err, 64).Resp!.Status);
        var bad = new NvmeCommand { Opcode = NvmeAdminOpcode.GetLogPage, Cdw10 = 0x55 | ((64u / 4 - 1) << 16) };
        var br = h.Read(bad, 64).Resp!;
        Assert.Equal(NvmeSct.CommandSpecific, NvmfHostModel.Sct(br.Status));
        Assert.Equal(NvmeSc.InvalidLogPage, NvmfHostModel.Sc(br.Status));
    }

    [Fact]
    public async Task NamespaceHotAddAndRemoveRaiseAenAndChangedNsList()
    {
        using var h = AdminHost();
        Assert.Equal(0, h.Execute(new NvmeCommand { Opcode = NvmeAdminOpcode.SetFeatures, Cdw10 = NvmeFeature.AsyncEventConfiguration, Cdw11 = 0x100 }).Status);
        var aer = new NvmeCommand { Opcode = NvmeAdminOpcode.AsyncEventRequest, Cid = h.NextCid() };
        h.SendCommand(aer);

        await _t.AddMalloc("Malloc1", 2048, 4096);
        var nsid = await _t.Call("nvmf_subsystem_add_ns", $$$"""{"nqn":"{{{NvmfTestTarget.Nqn}}}","namespace":{"bdev_name":"Malloc1","nsid":5}}""");
        Assert.Equal(5u, nsid!.GetValue<uint>());

        var ev = h.ReadPdu();
        Assert.Equal(aer.Cid, ev.Completion.Cid);
        Assert.Equal(0, ev.Status);
        Assert.Equal(0x040002u, ev.Completion.Dw0); // notice, namespace attribute changed, log page 4

        var log = new NvmeCommand { Opcode = NvmeAdminOpcode.GetLogPage, Cdw10 = NvmeLogPage.ChangedNamespaceList | ((4096u / 4 - 1) << 16) };
        var (page, r, _) = h.Read(log, 4096);
        Assert.Equal(0, r!.Status);
        Assert.Equal(5u, BinaryPrimitives.ReadUInt32LittleEndian(page));
        Assert.Equal(0u, BinaryPrimitives.ReadUInt32LittleEndian(page.AsSpan(4)));

        var (ns, r2, _) = h.Read(NvmfHostModel.Identify(0, 5), 4096);
        Assert.Equal(0, r2!.Status);
        Assert.Equal(4096u, NvmeNamespaceData.Parse(5, ns).BlockSize);

        // Hot remove of the bdev: the namespace goes, the host hears it again.
        aer.Cid = h.NextCid();
        h.SendCommand(aer);
        var bdev = _t.Bdevs.Find("Malloc1")!;
        await _t.Reactors.Main.InvokeAsync(() => _t.Bdevs.UnregisterAsync(bdev, TimeSpan.FromSeconds(10)));
        var ev2 = h.ReadPdu();
        Assert.Equal(aer.Cid, ev2.Completion.Cid);
        Assert.Equal(0x040002u, ev2.Completion.Dw0);
        var (list, _, _) = h.Read(NvmfHostModel.Identify(2, 0), 4096);
        Assert.Equal(1u, BinaryPrimitives.ReadUInt32LittleEndian(list));
        Assert.Equal(0u, BinaryPrimitives.ReadUInt32LittleEndian(list.AsSpan(4)));
    }

    [Fact]
    public void AerLimitExceeded()
    {
        using var h = AdminHost();
        for (int i = 0; i < NvmfController.AerLimit; i++)
        {
            var aer = new NvmeCommand { Opcode = NvmeAdminOpcode.AsyncEventRequest, Cid = h.NextCid() };
            h.SendCommand(aer);
        }

        var extra = new NvmeCommand { Opcode = NvmeAdminOpcode.AsyncEventRequest, Cid = h.NextCid() };
        h.SendCommand(extra);
        var r = h.ReadPdu();
        Assert.Equal(extra.Cid, r.Completion.Cid);
        Assert.Equal(NvmeSc.AsyncEventRequestLimitExceeded, NvmfHostModel.Sc(r.Status));
    }

    [Fact]
    public void KeepAliveTimeoutDestroysTheControllerAndItsQueues()
    {
        using var h = _t.Host();
        var c = h.Connect(NvmfTestTarget.Nqn, kato: 300);
        Assert.Equal(0, c.Status);
        h.Enable();
        using var io = IoHost(Cntlid(c));
        Assert.True(h.ClosedByTarget(3000));
        Assert.True(io.ClosedByTarget(3000));
    }

    [Fact]
    public void ControllerResetClosesIoQueues()
    {
        var (admin, cntlid) = AdminWithId();
        using var _ = admin;
        using var io = IoHost(cntlid);
        Assert.Equal(0, admin.Execute(NvmeFabrics.PropertySet(NvmeReg.Cc, 0)).Status);
        Assert.Equal(0u, admin.Execute(NvmeFabrics.PropertyGet(NvmeReg.Csts, false)).Completion.Dw0 & 1);
        Assert.True(io.ClosedByTarget(3000));
    }

    [Fact]
    public void ShutdownReportsComplete()
    {
        using var h = AdminHost();
        Assert.Equal(0, h.Execute(NvmeFabrics.PropertySet(NvmeReg.Cc, NvmeReg.CcEn | (6u << 16) | (4u << 20) | (1u << 14))).Status);
        Assert.Equal(2u, (h.Execute(NvmeFabrics.PropertyGet(NvmeReg.Csts, false)).Completion.Dw0 >> 2) & 3);
    }

    [Fact]
    public async Task DiscoveryControllerListsAllowedSubsystems()
    {
        using var h = _t.Host();
        var c = h.Connect(Nvme.NvmeFabrics.DiscoveryNqn);
        Assert.Equal(0, c.Status);
        h.Enable();
        var (id, _, _) = h.Read(NvmfHostModel.Identify(1), 4096);
        Assert.Equal(2, id[111]); // discovery controller
        var log = new NvmeCommand { Opcode = NvmeAdminOpcode.GetLogPage, Cdw10 = NvmeLogPage.Discovery | ((4096u / 4 - 1) << 16) };
        var (page, r, _) = h.Read(log, 4096);
        Assert.Equal(0, r!.Status);
        Assert.Equal(1ul, BinaryPrimitives.ReadUInt64LittleEndian(page.AsSpan(8)));
        var e = NvmeDiscoveryEntry.Parse(page.AsSpan(1024, 1024));
        Assert.Equal(NvmfTestTarget.Nqn, e.SubNqn);
        Assert.Equal("127.0.0.1", e.TrAddr);
        Assert.Equal(_t.Port.ToString(System.Globalization.CultureInfo.InvariantCulture), e.TrSvcId);
        Assert.Equal(NvmeDiscoveryEntry.TrTypeTcp, e.TrType);

        // A subsystem this host may not see is not listed.
        await _t.Call("nvmf_subsystem_allow_any_host", $$"""{"nqn":"{{NvmfTestTarget.Nqn}}","allow_any_host":false}""");
        var (page2, _, _) = h.Read(log, 4096);
        Assert.Equal(0ul, BinaryPrimitives.ReadUInt64LittleEndian(page2.AsSpan(8)));
        Assert.True(BinaryPrimitives.ReadUInt64LittleEndian(page2) > BinaryPrimitives.ReadUInt64LittleEndian(page)); // generation
        _ = Encoding.ASCII;
    }
}
