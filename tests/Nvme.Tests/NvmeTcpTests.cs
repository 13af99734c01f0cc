using System.Buffers.Binary;
using System.Runtime.InteropServices;
using VhostBackend.Nvme.Tcp;
using VhostBackend.Platform;
using Xunit;

namespace VhostBackend.Nvme.Tests;

public class NvmeTcpPduTests
{
    [Fact]
    public void Crc32CMatchesTheCheckValueAndTheTable()
    {
        Assert.Equal(0xE3069283u, Crc32C.Compute("123456789"u8));
        var rnd = new Random(5);
        var buf = new byte[1000];
        rnd.NextBytes(buf);
        for (int n = 0; n < buf.Length; n += 37)
        {
            Assert.Equal(Crc32C.Finish(Crc32C.UpdateSoftware(Crc32C.Initial, buf.AsSpan(0, n))), Crc32C.Compute(buf.AsSpan(0, n)));
        }

        // Incremental over pieces equals one pass.
        uint c = Crc32C.Update(Crc32C.Update(Crc32C.Initial, buf.AsSpan(0, 333)), buf.AsSpan(333));
        Assert.Equal(Crc32C.Compute(buf), Crc32C.Finish(c));
    }

    [Fact]
    public void HeaderLayoutsMatchTheSpec()
    {
        var b = new byte[NvmeTcpPdu.MaxHeaderBytes];
        Assert.Equal(128, NvmeTcpPdu.WriteIcReq(b, 0, true, false, 0));
        Assert.Equal(new byte[] { 0, 0, 128, 0, 128, 0, 0, 0, 0, 0, 0, 1 }, b[..12]);

        var cmd = new NvmeCommand { Opcode = 2, Cid = 0x1234, Nsid = 1 };
        int n = NvmeTcpPdu.WriteCapsuleCmd(b, in cmd, hdgst: true, ddgst: true, cpda: 0, dataLength: 4096);
        Assert.Equal(76, n); // 72 + header digest, data follows directly (cpda 0)
        Assert.Equal(NvmeTcpPduType.CapsuleCmd, b[0]);
        Assert.Equal(NvmeTcpFlags.HeaderDigest | NvmeTcpFlags.DataDigest, b[1]);
        Assert.Equal(72, b[2]);
        Assert.Equal(76, b[3]);
        Assert.Equal(76u + 4096 + 4, NvmeTcpPdu.Plen(b));
        Assert.Equal(0x1234, BinaryPrimitives.ReadUInt16LittleEndian(b.AsSpan(10)));
        Assert.True(NvmeTcpPdu.CheckHeaderDigest(b, 72));

        // With a controller PDA of 3 (16-byte alignment) the data starts at 80.
        n = NvmeTcpPdu.WriteCapsuleCmd(b, in cmd, hdgst: true, ddgst: false, cpda: 3, dataLength: 100);
        Assert.Equal(80, n);
        Assert.Equal(80u + 100, NvmeTcpPdu.Plen(b));

        n = NvmeTcpPdu.WriteH2CData(b, 5, 9, 8192, 4096, last: true, hdgst: false, ddgst: false, cpda: 0);
        Assert.Equal(24, n);
        Assert.Equal(NvmeTcpFlags.LastPdu, b[1]);
        Assert.Equal(5, NvmeTcpPdu.Cccid(b));
        Assert.Equal(9, NvmeTcpPdu.Ttag(b));
        Assert.Equal(8192u, NvmeTcpPdu.DataOffsetField(b));
        Assert.Equal(4096u, NvmeTcpPdu.DataLengthField(b));

        Assert.Equal(64, Marshal.SizeOf<NvmeCommand>());
        var c = NvmeFabrics.Connect(3, 128, 0);
        Assert.Equal(0x7F, c.Opcode);
        Assert.Equal(1u, c.Nsid & 0xFF); // fctype at byte 4
        Assert.Equal(3u << 16, c.Cdw10); // qid at byte 42
        Assert.Equal(127u, c.Cdw11); // sqsize 0's based at byte 44
        NvmeFabrics.SetSgl(ref c, 1024, inCapsule: true);
        Assert.Equal(0x40, c.Flags);
        Assert.Equal(0x01UL << 56 | 1024, c.Prp2);
    }

    private static NvmeTcpFes Validate(byte[] h, bool initialized = true, bool hd = false, bool dd = false) =>
        NvmeTcpPdu.ValidateHeader(h, fromController: true, initialized, hd, dd, 1 << 20, out _, out _);

    [Fact]
    public void HostileHeadersAreRejected()
    {
        var h = new byte[256];
        var cqe = new NvmeCompletion();
        NvmeTcpPdu.WriteCapsuleResp(h, in cqe, hdgst: false);
        Assert.Equal(NvmeTcpFes.None, Validate(h));
        Assert.Equal(NvmeTcpFes.InvalidHeaderField, Validate(h, hd: true)); // digest negotiated but flag missing
        Assert.Equal(NvmeTcpFes.PduSequenceError, Validate(h, initialized: false)); // before ICResp

        var bad = (byte[])h.Clone();
        bad[2] = 20; // hlen
        Assert.Equal(NvmeTcpFes.InvalidHeaderField, Validate(bad));
        bad = (byte[])h.Clone();
        BinaryPrimitives.WriteUInt32LittleEndian(bad.AsSpan(4), 4000); // plen with data on a response
        Assert.Equal(NvmeTcpFes.InvalidHeaderField, Validate(bad));
        bad = (byte[])h.Clone();
        bad[0] = NvmeTcpPduType.CapsuleCmd; // an H2C type from the controller
        Assert.Equal(NvmeTcpFes.InvalidHeaderField, Validate(bad));
        bad[0] = 0x0F;
        Assert.Equal(NvmeTcpFes.InvalidHeaderField, Validate(bad));

        NvmeTcpPdu.WriteC2HData(h, 1, 0, 512, last: false, success: true, false, false, 0); // SUCCESS without LAST_PDU
        Assert.Equal(NvmeTcpFes.InvalidHeaderField, Validate(h));
        NvmeTcpPdu.WriteC2HData(h, 1, 0, 512, last: true, success: true, false, false, 0);
        Assert.Equal(NvmeTcpFes.None, Validate(h));
        Assert.Equal(NvmeTcpFes.InvalidHeaderField, Validate(h, dd: true)); // data digest negotiated, flag missing
        h[3] = 4; // pdo inside the header
        Assert.Equal(NvmeTcpFes.InvalidHeaderField, Validate(h));
        NvmeTcpPdu.WriteC2HData(h, 1, 0, 2 << 20, last: true, success: false, false, false, 0);
        Assert.Equal(NvmeTcpFes.DataTransferLimitExceeded, Validate(h));

        NvmeTcpPdu.WriteIcResp(h, 0, false, false, 8192);
        Assert.Equal(NvmeTcpFes.None, Validate(h, initialized: false));
        Assert.Equal(NvmeTcpFes.PduSequenceError, Validate(h, initialized: true)); // a second ICResp

        int n = NvmeTcpPdu.WriteTermReq(h, fromHost: false, NvmeTcpFes.HeaderDigestError, 0, new byte[24]);
        Assert.Equal(48, n);
        Assert.Equal(NvmeTcpFes.None, Validate(h));
        BinaryPrimitives.WriteUInt32LittleEndian(h.AsSpan(4), 1000); // term req longer than allowed
        Assert.Equal(NvmeTcpFes.InvalidHeaderField, Validate(h));
    }
}

public sealed class NvmeTcpInitiatorTests : IDisposable
{
    private readonly NvmeTcpTargetModel _target = new(inCapsule: 8192, maxH2CData: 4096);
    private readonly AlignedBuffer _buf = new(256 * 1024);

    public void Dispose()
    {
        _target.Dispose();
        _buf.Dispose();
    }

    /// <summary>A command's completion, as the callback <see cref="s_done"/> records it (also used by the other initiator tests).</summary>
    internal sealed class Done
    {
        public bool Completed;
        public NvmeStatus Status;
    }

    internal static readonly NvmeCompletionCallback s_done = static (arg, st, dw0) =>
    {
        var d = (Done)arg!;
        d.Status = st;
        d.Completed = true;
    };

    private static NvmeTcpQueuePair Connect(NvmeTcpController c)
    {
        var qp = c.CreateIoQueuePair();
        Assert.Equal(0, qp.StartConnect(c.Cntlid, 0));
        long end = Environment.TickCount64 + 10000;
        int rc;
        while ((rc = qp.PollConnect()) == 0 && Environment.TickCount64 < end)
        {
            Thread.Sleep(0);
        }

        Assert.True(rc == 1, qp.LastError);
        return qp;
    }

    private NvmeStatus Io(NvmeTcpQueuePair qp, NvmeNamespace ns, byte opcode, ulong lba, uint blocks, int bufOffset = 0, Done? d = null)
    {
        d ??= new Done();
        d.Completed = false;
        var iov = _buf.ToIoVec((nuint)bufOffset, blocks * ns.BlockSize);
        Assert.Equal(0, qp.SubmitIo(opcode, ns, lba, blocks, new ReadOnlySpan<IoVec>(ref iov), 0, s_done, d));
        long end = Environment.TickCount64 + 10000;
        while (!d.Completed && Environment.TickCount64 < end)
        {
            qp.Poll();
        }

        Assert.True(d.Completed, "the command did not complete");
        return d.Status;
    }

    [Theory]
    [InlineData(false, false, false)]
    [InlineData(true, true, false)]
    [InlineData(true, true, true)]
    [InlineData(false, true, true)]
    public void AttachIdentifyWriteAndReadBack(bool hdgst, bool ddgst, bool c2hSuccess)
    {
        _target.UseC2HSuccess = c2hSuccess;
        using var c = NvmeTcpController.Attach(_target.TransportId(hdgst, ddgst));
        Assert.Equal(hdgst, c.HeaderDigest);
        Assert.Equal(ddgst, c.DataDigest);
        Assert.Equal("NVMe/TCP target model", c.Data.ModelNumber);
        var ns = Assert.Single(c.Namespaces);
        Assert.Equal(512u, ns.BlockSize);
        Assert.Equal(2048UL, ns.BlockCount);
        Assert.Equal(8192, c.IoInCapsuleDataSize);

        var qp = Connect(c);
        Assert.Equal(hdgst, qp.HeaderDigest);
        var rnd = new Random(1);
        foreach (uint blocks in new uint[] { 1, 8, 16, 17, 64, 255 })
        {
            var span = _buf.AsSpan(0, (int)(blocks * 512));
            rnd.NextBytes(span);
            var expect = span.ToArray();
            int r2ts = _target.R2TsSent;
            Assert.True(Io(qp, ns, NvmeIoOpcode.Write, 100, blocks).IsSuccess);
            Assert.Equal(blocks * 512 > 8192 ? r2ts + 1 : r2ts, _target.R2TsSent); // in-capsule up to 8 KiB, R2T above
            Assert.Equal(expect, _target.Disk.AsSpan(100 * 512, (int)(blocks * 512)).ToArray());
            span.Clear();
            Assert.True(Io(qp, ns, NvmeIoOpcode.Read, 100, blocks).IsSuccess);
            Assert.Equal(expect, span.ToArray());
        }

        // Scattered buffers: three segments.
        _target.Disk.AsSpan(0, 4096).Fill(0x5A);
        var iovs = new[] { _buf.ToIoVec(0, 1000), _buf.ToIoVec(8192, 2000), _buf.ToIoVec(65536, 1096) };
        var d = new Done();
        Assert.Equal(0, qp.SubmitIo(NvmeIoOpcode.Read, ns, 0, 8, iovs, 0, s_done, d));
        while (!d.Completed)
        {
            qp.Poll();
        }

        Assert.True(d.Status.IsSuccess);
        Assert.True(_buf.AsSpan(8192, 2000).IndexOfAnyExcept((byte)0x5A) < 0);
        c.ReleaseQueuePair(qp);
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void ManySegmentIoLikeAGuestPreadvIsCarried(bool digests)
    {
        // 150 scattered segments (more than vhost-blk's SegMax 126, within its 160-descriptor queue), sizes 256/768
        // alternating: a guest's preadv/pwritev of small buffers arrives like this through vhost-blk.
        const int Segs = 150;
        using var c = NvmeTcpController.Attach(_target.TransportId(digests, digests));
        var qp = Connect(c);
        var ns = Assert.Single(c.Namespaces);
        var iovs = new IoVec[Segs];
        uint total = 0;
        for (int i = 0; i < Segs; i++)
        {
            uint len = i % 2 == 0 ? 256u : 768u;
            iovs[i] = _buf.ToIoVec((nuint)(i * 1024), len);
            total += len;
        }

        uint blocks = total / 512;
        Assert.Equal(0u, total % 512);
        var rnd = new Random(7);
        var expect = new byte[total];
        rnd.NextBytes(expect);
        int pos = 0;
        foreach (var v in iovs)
        {
            expect.AsSpan(pos, (int)v.Length).CopyTo(v.AsSpan());
            pos += (int)v.Length;
        }

        var d = new Done();
        Assert.Equal(0, qp.SubmitIo(NvmeIoOpcode.Write, ns, 10, blocks, iovs, 0, s_done, d));
        long end = Environment.TickCount64 + 10000;
        while (!d.Completed && Environment.TickCount64 < end)
        {
            qp.Poll();
        }

        Assert.True(d.Completed && d.Status.IsSuccess, qp.LastError);
        Assert.Equal(expect, _target.Disk.AsSpan(10 * 512, (int)total).ToArray());

        _buf.AsSpan(0, (int)_buf.Size).Clear();
        d = new Done();
        Assert.Equal(0, qp.SubmitIo(NvmeIoOpcode.Read, ns, 10, blocks, iovs, 0, s_done, d));
        end = Environment.TickCount64 + 10000;
        while (!d.Completed && Environment.TickCount64 < end)
        {
            qp.Poll();
        }

        Assert.True(d.Completed && d.Status.IsSuccess, qp.LastError);
        pos = 0;
        foreach (var v in iovs)
        {
            Assert.Equal(expect.AsSpan(pos, (int)v.Length).ToArray(), v.AsSpan().ToArray());
            pos += (int)v.Length;
        }

        c.ReleaseQueuePair(qp);
    }

    [Fact]
    public void OutOfRangeAndOversizedRequestsAreRefusedBeforeSending()
    {
        using var c = NvmeTcpController.Attach(_target.TransportId());
        var qp = Connect(c);
        var ns = c.Namespaces[0];
        var iov = _buf.ToIoVec(0, 4096);
        Assert.Equal(-Errno.EINVAL, qp.SubmitIo(NvmeIoOpcode.Read, ns, 2047, 2, new ReadOnlySpan<IoVec>(ref iov), 0, s_done, null));
        Assert.Equal(-Errno.EINVAL, qp.SubmitIo(NvmeIoOpcode.Read, ns, 0, 16, new ReadOnlySpan<IoVec>(ref iov), 0, s_done, null)); // buffers shorter than the transfer
        Assert.Equal(0, qp.Outstanding);
        c.ReleaseQueuePair(qp);
    }

    [Theory]
    [InlineData("c2h-bad-cid", true)]
    [InlineData("c2h-bad-offset", true)]
    [InlineData("c2h-datal-mismatch", true)]
    [InlineData("ddgst-corrupt", false)]
    [InlineData("hdgst-corrupt", true)]
    [InlineData("resp-early", true)]
    [InlineData("resp-unknown-cid", true)]
    [InlineData("c2h-bad-type", true)]
    public void HostileReadPdusFailTheQueuePairNotTheProcess(string hostile, bool termReq)
    {
        using var c = NvmeTcpController.Attach(_target.TransportId(hdgst: true, ddgst: true));
        var qp = Connect(c);
        var ns = c.Namespaces[0];
        _target.Hostile = hostile;
        var st = Io(qp, ns, NvmeIoOpcode.Read, 0, 16);
        Assert.Equal(NvmeStatus.TransientTransportError, st);
        Assert.True(qp.IsFailed);
        Assert.NotNull(qp.LastError);
        var one = _buf.ToIoVec(0, 512);
        Assert.Equal(-Errno.ENXIO, qp.SubmitIo(NvmeIoOpcode.Read, ns, 0, 1, new ReadOnlySpan<IoVec>(ref one), 0, s_done, null));
        if (termReq)
        {
            long end = Environment.TickCount64 + 5000;
            while (_target.TermReqsReceived == 0 && Environment.TickCount64 < end)
            {
                Thread.Sleep(5);
            }

            Assert.True(_target.TermReqsReceived > 0, "no H2CTermReq for " + hostile);
        }

        // The same queue pair reconnects and works.
        Assert.Equal(0, qp.StartConnect(c.Cntlid, 0));
        long e2 = Environment.TickCount64 + 10000;
        while (qp.PollConnect() == 0 && Environment.TickCount64 < e2)
        {
        }

        Assert.True(qp.IsConnected, qp.LastError);
        Assert.True(Io(qp, ns, NvmeIoOpcode.Read, 0, 16).IsSuccess);
        c.ReleaseQueuePair(qp);
    }

    [Fact]
    public void R2TBeyondTheCommandsDataIsRejected()
    {
        using var c = NvmeTcpController.Attach(_target.TransportId());
        var qp = Connect(c);
        _target.Hostile = "r2t-too-long";
        Assert.Equal(NvmeStatus.TransientTransportError, Io(qp, c.Namespaces[0], NvmeIoOpcode.Write, 0, 32));
        Assert.Contains("R2T", qp.LastError, StringComparison.Ordinal);
        c.ReleaseQueuePair(qp);
    }

    [Fact]
    public void ACapWithMqesZeroFailsTheAttach()
    {
        // MQES 0 (one entry) is below the spec's minimum of 1: no queue pair of ours can have fewer than two entries.
        // Without the check the attach succeeded and every later I/O queue pair threw ArgumentOutOfRangeException
        // (after taking a queue id it never gave back).
        _target.Mqes = 0;
        var e = Assert.Throws<IOException>(() => NvmeTcpController.Attach(_target.TransportId()).Dispose());
        Assert.Contains("MQES", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void AnInvalidICRespFailsTheConnect()
    {
        using var c = NvmeTcpController.Attach(_target.TransportId());
        _target.Hostile = "icresp-maxh2c";
        var qp = c.CreateIoQueuePair();
        Assert.Equal(0, qp.StartConnect(c.Cntlid, 0));
        int rc;
        long end = Environment.TickCount64 + 10000;
        while ((rc = qp.PollConnect()) == 0 && Environment.TickCount64 < end)
        {
        }

        Assert.True(rc < 0);
        Assert.Contains("MAXH2CDATA", qp.LastError, StringComparison.Ordinal);
        c.ReleaseQueuePair(qp);
    }

    [Fact]
    public void LostConnectionFailsTheControllerAndAReconnectRestoresIo()
    {
        using var c = NvmeTcpController.Attach(_target.TransportId());
        var qp = Connect(c);
        var ns = c.Namespaces[0];
        Assert.True(Io(qp, ns, NvmeIoOpcode.Read, 0, 8).IsSuccess);
        _target.DropConnections();
        Assert.Equal(NvmeStatus.TransientTransportError, Io(qp, ns, NvmeIoOpcode.Read, 0, 8));
        long end = Environment.TickCount64 + 5000;
        while (!c.IsFailed && Environment.TickCount64 < end)
        {
            c.ProcessAdminCompletions();
            Thread.Sleep(1);
        }

        Assert.True(c.IsFailed);
        c.StartReconnect();
        int rc;
        while ((rc = c.PollReconnect()) == 0)
        {
            Thread.Sleep(1);
        }

        Assert.Equal(1, rc);
        Assert.False(c.IsFailed);
        Assert.Equal(0, qp.StartConnect(c.Cntlid, 0));
        while (qp.PollConnect() == 0)
        {
        }

        Assert.True(Io(qp, ns, NvmeIoOpcode.Read, 0, 8).IsSuccess);
        c.ReleaseQueuePair(qp);
    }

    [Fact]
    public void KeepAliveGoesOutEveryHalfTimeout()
    {
        using var c = NvmeTcpController.Attach(_target.TransportId(), new NvmeTcpControllerOptions { KeepAliveTimeoutMs = 200 });
        long end = Environment.TickCount64 + 700;
        while (Environment.TickCount64 < end)
        {
            c.ProcessAdminCompletions();
            Thread.Sleep(5);
        }

        Assert.InRange(_target.KeepAlives, 4, 10);
        Assert.False(c.IsFailed);
    }

    [Fact]
    public void ReadsAndWritesAllocateNothing()
    {
        using var c = NvmeTcpController.Attach(_target.TransportId(true, true));
        var qp = Connect(c);
        var ns = c.Namespaces[0];
        var d = new Done();
        var iov = new IoVec[1];
        void Run(int n)
        {
            for (int i = 0; i < n; i++)
            {
                byte op = (i & 1) == 0 ? NvmeIoOpcode.Write : NvmeIoOpcode.Read;
                uint blocks = (i & 2) == 0 ? 8u : 64u; // in-capsule and R2T writes
                iov[0] = _buf.ToIoVec(0, blocks * 512);
                d.Completed = false;
                qp.SubmitIo(op, ns, 0, blocks, iov, 0, s_done, d);
                while (!d.Completed)
                {
                    qp.Poll();
                }
            }
        }

        Run(200);
        long before = GC.GetAllocatedBytesForCurrentThread();
        Run(400);
        long bytes = GC.GetAllocatedBytesForCurrentThread() - before;
        Assert.True(bytes == 0, $"{bytes} bytes allocated for 400 I/Os");
        c.ReleaseQueuePair(qp);
    }
}
