using System.Buffers.Binary;
using System.Net;
using System.Net.Sockets;
using System.Runtime.InteropServices;
using VhostBackend.Nvme.Tcp;
using VhostBackend.Platform;
using Xunit;

namespace VhostBackend.Nvme.Tests;

/// <summary>
/// The initiator's H2CTermReq goes out only between PDUs. The controller side is a raw socket driven by the test
/// (one thread, no model thread): the initiator is left in the middle of a write's H2CData, the socket is emptied so a
/// send would get through, and then a protocol error fails the queue pair.
/// </summary>
public sealed class NvmeTcpTermReqBoundaryTests : IDisposable
{
    private const int WriteBytes = 16 << 20; // more than the initiator's socket takes while the controller does not read

    private readonly Socket _listener;
    private readonly AlignedBuffer _buf = new(WriteBytes);
    private readonly byte[] _pattern = new byte[WriteBytes];
    private Socket? _ctrl;

    public NvmeTcpTermReqBoundaryTests()
    {
        _listener = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp) { ReceiveBufferSize = 4096 };
        _listener.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        _listener.Listen(1);
        new Random(3).NextBytes(_pattern);
        _pattern.CopyTo(_buf.AsSpan(0, WriteBytes));
    }

    public void Dispose()
    {
        _ctrl?.Dispose();
        _listener.Dispose();
        _buf.Dispose();
    }

    private static void Pump(NvmeTcpQueuePair qp)
    {
        if (qp.IsConnected)
        {
            qp.Poll();
        }
        else if (qp.IsConnecting)
        {
            qp.PollConnect();
        }
    }

    /// <summary>Reads <paramref name="n"/> bytes from the initiator, polling it meanwhile.</summary>
    private byte[] Expect(NvmeTcpQueuePair qp, int n)
    {
        var b = new byte[n];
        int got = 0;
        long end = Environment.TickCount64 + 10_000;
        while (got < n)
        {
            Assert.True(Environment.TickCount64 < end, $"the initiator sent {got} of {n} bytes");
            Pump(qp);
            if (_ctrl!.Poll(1000, SelectMode.SelectRead))
            {
                int r = _ctrl.Receive(b.AsSpan(got));
                Assert.True(r > 0, "the initiator closed the connection: " + qp.LastError);
                got += r;
            }
        }

        return b;
    }

    /// <summary>Reads what the initiator has sent until nothing more arrives for 200 ms (or the connection closed).</summary>
    private void ReadQuiet(List<byte> into)
    {
        var b = new byte[1 << 20];
        while (_ctrl!.Poll(200_000, SelectMode.SelectRead))
        {
            int r = _ctrl.Receive(b);
            if (r == 0)
            {
                return;
            }

            into.AddRange(b.AsSpan(0, r));
        }
    }

    private NvmeTcpQueuePair ConnectRaw(uint maxH2CData)
    {
        var trid = new NvmeTcpTransportId { Address = IPAddress.Loopback, Port = ((IPEndPoint)_listener.LocalEndPoint!).Port, SubNqn = "nqn.2026-01.io.test:raw" };
        var qp = new NvmeTcpQueuePair(trid, 1, 32, inCapsuleDataSize: 0);
        Assert.Equal(0, qp.StartConnect(1, 0));
        _ctrl = _listener.Accept();

        var icreq = Expect(qp, NvmeTcpPdu.IcSize);
        Assert.Equal(NvmeTcpPduType.IcReq, icreq[0]);
        var tx = new byte[NvmeTcpPdu.IcSize];
        _ctrl.Send(tx.AsSpan(0, NvmeTcpPdu.WriteIcResp(tx, 0, false, false, maxH2CData)));

        var connect = Expect(qp, 8);
        Assert.Equal(NvmeTcpPduType.CapsuleCmd, connect[0]);
        int plen = (int)BinaryPrimitives.ReadUInt32LittleEndian(connect.AsSpan(4));
        var rest = Expect(qp, plen - 8);
        ushort cid = BinaryPrimitives.ReadUInt16LittleEndian(rest.AsSpan(2)); // SQE byte 2, after the 8-byte common header
        RespondSuccess(cid, dw0: 1);

        long end = Environment.TickCount64 + 10_000;
        while (!qp.IsConnected && !qp.IsFailed && Environment.TickCount64 < end)
        {
            qp.PollConnect();
        }

        Assert.True(qp.IsConnected, qp.LastError);
        return qp;
    }

    private void RespondSuccess(ushort cid, uint dw0)
    {
        var cqe = new NvmeCompletion { Cid = cid, Dw0 = dw0 };
        var tx = new byte[64];
        _ctrl!.Send(tx.AsSpan(0, NvmeTcpPdu.WriteCapsuleResp(tx, in cqe, false)));
    }

    /// <summary>
    /// Walks the H2CData stream the controller received: every PDU's data must be the written pattern at its offset;
    /// the last one may stop short (the connection closed inside it). Returns whether it stopped inside a PDU and how
    /// many H2CTermReqs followed whole PDUs.
    /// </summary>
    private (bool MidPdu, int TermReqs) Walk(List<byte> stream)
    {
        var s = CollectionsMarshal.AsSpan(stream);
        int pos = 0;
        uint next = 0;
        int termReqs = 0;
        while (pos < s.Length)
        {
            var rest = s[pos..];
            if (rest.Length < 8)
            {
                return (true, termReqs); // inside a common header
            }

            int plen = (int)BinaryPrimitives.ReadUInt32LittleEndian(rest[4..]);
            if (rest[0] == NvmeTcpPduType.H2CTermReq)
            {
                Assert.True(rest.Length >= plen, "a truncated H2CTermReq");
                termReqs++;
                pos += plen;
                continue;
            }

            Assert.True(rest[0] == NvmeTcpPduType.H2CData, $"byte {pos}: PDU type 0x{rest[0]:x2}, expected H2CData (0x06) or H2CTermReq (0x02)");
            Assert.Equal(0, termReqs); // nothing after a TermReq
            if (rest.Length < 24)
            {
                return (true, termReqs);
            }

            Assert.Equal(24, rest[2]); // HLEN
            uint datao = BinaryPrimitives.ReadUInt32LittleEndian(rest[12..]);
            int datal = (int)BinaryPrimitives.ReadUInt32LittleEndian(rest[16..]);
            Assert.Equal(next, datao);
            Assert.Equal(24 + datal, plen);
            int have = Math.Min(datal, rest.Length - 24);
            Assert.True(rest.Slice(24, have).SequenceEqual(_pattern.AsSpan((int)datao, have)), $"H2CData at offset {datao}: the bytes after {pos + 24} are not the written data (foreign bytes inside a PDU)");
            if (have < datal)
            {
                return (true, termReqs);
            }

            pos += plen;
            next += (uint)datal;
        }

        return (false, termReqs);
    }

    [Theory]
    [InlineData(16u << 20, true)] // one H2CData PDU of 16 MiB sent from the buffer: always cut inside it
    [InlineData(4096u, false)] // 4 KiB H2CData PDUs, coalesced in the send stage: cut inside the stage, or between stages
    public void ATermReqIsNotWrittenIntoAHalfSentPdu(uint maxH2CData, bool alwaysInsideAPdu)
    {
        using var qp = ConnectRaw(maxH2CData);

        // A write that waits for an R2T; the controller asks for everything at once and then stops reading.
        var cmd = new NvmeCommand { Opcode = NvmeIoOpcode.Write, Nsid = 1, Cdw12 = WriteBytes / 512 - 1 };
        var iov = _buf.ToIoVec(0, WriteBytes);
        var done = new NvmeTcpInitiatorTests.Done();
        Assert.Equal(0, qp.Submit(ref cmd, new ReadOnlySpan<IoVec>(ref iov), WriteBytes, hostToController: true, NvmeTcpInitiatorTests.s_done, done));
        var capsule = Expect(qp, 72);
        Assert.Equal(NvmeTcpPduType.CapsuleCmd, capsule[0]);
        ushort cid = BinaryPrimitives.ReadUInt16LittleEndian(capsule.AsSpan(10));
        var r2t = new byte[64];
        _ctrl!.Send(r2t.AsSpan(0, NvmeTcpPdu.WriteR2T(r2t, cid, 7, 0, WriteBytes, false)));
        for (int i = 0; i < 50; i++)
        {
            qp.Poll(); // sends until the socket is full
            Thread.Sleep(1);
        }

        Assert.True(qp.HasPendingWork, "the whole write went out: the socket took 16 MiB");

        // Empty the socket (the initiator does not poll meanwhile): a send now would get through.
        var stream = new List<byte>();
        ReadQuiet(stream);

        // A protocol error now (what a bad PDU from the controller does): the queue pair fails and closes.
        qp.FailForTest("test: invalid PDU from the controller", NvmeTcpFes.InvalidHeaderField, 8);
        Assert.True(qp.IsFailed);
        Assert.True(done.Completed);
        Assert.Equal(NvmeStatus.TransientTransportError, done.Status);
        ReadQuiet(stream);

        var (midPdu, termReqs) = Walk(stream);
        if (midPdu)
        {
            Assert.Equal(0, termReqs); // cut inside a PDU: just closed
        }
        else
        {
            Assert.False(alwaysInsideAPdu, "the write stopped between PDUs");
            Assert.Equal(1, termReqs); // between PDUs: the controller is told why
        }

        if (alwaysInsideAPdu)
        {
            Assert.True(midPdu);
        }
    }

    [Fact]
    public void BetweenPdusTheTermReqStillGoesOut()
    {
        using var qp = ConnectRaw(4096);
        qp.FailForTest("test: invalid PDU from the controller", NvmeTcpFes.InvalidHeaderField, 8);
        var stream = new List<byte>();
        ReadQuiet(stream);
        Assert.True(stream.Count >= 24, "no H2CTermReq");
        Assert.Equal(NvmeTcpPduType.H2CTermReq, stream[0]);
        Assert.Equal(stream.Count, (int)BinaryPrimitives.ReadUInt32LittleEndian(CollectionsMarshal.AsSpan(stream)[4..]));
    }
}
