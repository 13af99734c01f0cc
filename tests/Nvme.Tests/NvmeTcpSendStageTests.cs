using System.Buffers.Binary;
using System.Net;
using System.Net.Sockets;
using VhostBackend.Nvme.Tcp;
using Xunit;

namespace VhostBackend.Nvme.Tests;

/// <summary>The NVMe/TCP send stage shared by the initiator and the target, over a real loopback TCP connection.</summary>
public sealed class NvmeTcpSendStageTests : IDisposable
{
    private readonly Socket _tx;
    private readonly Socket _rx;

    public NvmeTcpSendStageTests()
    {
        using var listener = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
        listener.ReceiveBufferSize = 4096; // inherited by the accepted socket: a small window
        listener.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        listener.Listen(1);
        _tx = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp) { SendBufferSize = 4096 };
        _tx.Connect(listener.LocalEndPoint!);
        _rx = listener.Accept();
        _tx.Blocking = false;
        _rx.ReceiveTimeout = 10_000;
    }

    public void Dispose()
    {
        _tx.Dispose();
        _rx.Dispose();
    }

    private static byte[] Pattern(int n, int seed)
    {
        var b = new byte[n];
        new Random(seed).NextBytes(b);
        return b;
    }

    private void ReceiveExactly(Span<byte> dst)
    {
        int got = 0;
        while (got < dst.Length)
        {
            int n = _rx.Receive(dst[got..]);
            Assert.True(n > 0, "the peer closed");
            got += n;
        }
    }

    /// <summary>Drains the stage completely, reading the peer's side whenever the socket is full. Returns all the stage held.</summary>
    private byte[] DrainAll(NvmeTcpSendStage stage, out int partialDrains)
    {
        int total = stage.Length; // the peer has read none of it yet
        var got = new byte[total];
        int have = 0;
        partialDrains = 0;
        while (!stage.Drain(_tx, out var err))
        {
            Assert.Equal(SocketError.WouldBlock, err);
            Assert.False(stage.IsEmpty);
            partialDrains++;
            int n = _rx.Receive(got.AsSpan(have));
            Assert.True(n > 0);
            have += n;
        }

        Assert.True(stage.IsEmpty);
        Assert.Equal(0, stage.Length);
        ReceiveExactly(got.AsSpan(have));
        return got;
    }

    [Fact]
    public void PartialSendsResumeWhereTheyStoppedAndKeepTheByteOrder()
    {
        // 256 KiB of PDUs against a ~16 KiB socket path: the drain must stop and resume many times.
        var stage = new NvmeTcpSendStage(capacity: 256 * 1024, dataMax: 16 * 1024);
        var expected = new List<byte>();
        int seed = 1;
        while (true)
        {
            var header = Pattern(24, seed);
            var data = Pattern(16 * 1024 - seed, seed + 1000);
            if (!stage.CanStage(header.Length, (uint)data.Length, dataDigest: true))
            {
                break;
            }

            uint digest = Crc32C.Compute(data);
            stage.Append(header, data, dataDigest: true, digest);
            expected.AddRange(header);
            expected.AddRange(data);
            expected.AddRange(BitConverter.GetBytes(digest)); // little endian on x86
            seed++;
        }

        Assert.Equal(expected.Count, stage.Length);
        Assert.False(stage.Drain(_tx, out var first));
        Assert.Equal(SocketError.WouldBlock, first);
        Assert.InRange(stage.Sent, 1, stage.Length - 1);
        Assert.True(stage.PartlySent);

        // Half sent: nothing may be appended (its bytes would go out after a drain that already started).
        Assert.False(stage.CanStage(8, 0, false));
        Assert.Throws<InvalidOperationException>(() => stage.Append(new byte[8], 0, false, 0));

        var got = DrainAll(stage, out int partial);
        Assert.True(partial > 0);
        Assert.False(stage.PartlySent);
        Assert.Equal(expected.ToArray(), got);
    }

    [Fact]
    public void AnExactlyFullStageTakesItsLastPduAndTheNextWaitsForTheDrain()
    {
        var stage = new NvmeTcpSendStage(capacity: 1024, dataMax: 1024);
        var h1 = Pattern(72, 1);
        var d1 = Pattern(500, 2);
        stage.Append(h1, d1, dataDigest: true, 0xA1B2C3D4);
        int left = stage.Capacity - stage.Length;
        Assert.Equal(1024 - 576, left);

        // Exactly the rest: header 24, data left - 24 - 4, digest 4.
        var h2 = Pattern(24, 3);
        var d2 = Pattern(left - 28, 4);
        Assert.True(stage.CanStage(h2.Length, (uint)d2.Length, dataDigest: true));
        Assert.False(stage.CanStage(h2.Length, (uint)d2.Length + 1, dataDigest: true));
        stage.Append(h2, d2, dataDigest: true, 0x01020304);
        Assert.Equal(stage.Capacity, stage.Length);
        Assert.False(stage.PartlySent); // staged, nothing sent: the stream is between PDUs

        // Full: even the smallest PDU waits ("wrap": it goes to the front of the stage after the drain).
        Assert.False(stage.CanStage(8, 0, dataDigest: false));
        var got = DrainAll(stage, out _);
        Assert.Equal(1024, got.Length);
        Assert.Equal(h1, got[..72]);
        Assert.Equal(d1, got[72..572]);
        Assert.Equal(0xA1B2C3D4u, BinaryPrimitives.ReadUInt32LittleEndian(got.AsSpan(572)));
        Assert.Equal(h2, got[576..600]);
        Assert.Equal(d2, got[600..^4]);
        Assert.Equal(0x01020304u, BinaryPrimitives.ReadUInt32LittleEndian(got.AsSpan(1020)));

        var h3 = Pattern(8, 5);
        Assert.True(stage.CanStage(8, 0, dataDigest: false));
        stage.Append(h3, 0, dataDigest: true, 0xFFFFFFFF); // no data: no digest
        Assert.Equal(8, stage.Length);
        Assert.Equal(h3, DrainAll(stage, out _));
    }

    [Fact]
    public void DataOverDataMaxIsNotStaged()
    {
        var stage = new NvmeTcpSendStage(capacity: 32 * 1024, dataMax: 8 * 1024);
        Assert.True(stage.CanStage(24, 8 * 1024, dataDigest: true));
        Assert.False(stage.CanStage(24, 8 * 1024 + 1, dataDigest: true));
        Assert.False(stage.CanStage(24, uint.MaxValue, dataDigest: true));
        Assert.Throws<InvalidOperationException>(() => stage.Append(new byte[24], 8 * 1024 + 1, true, 0));
        Assert.Equal(0, stage.Length);
    }

    [Fact]
    public void DigestGoesAfterTheDataOnlyWhenNegotiatedAndDataIsFilledInPieces()
    {
        var stage = new NvmeTcpSendStage(capacity: 4096);
        var h = Pattern(24, 7);
        var a = Pattern(100, 8);
        var b = Pattern(60, 9);

        // Data in two pieces (the initiator copies from several iovecs into the returned span).
        var dst = stage.Append(h, 160, dataDigest: true, 0xDEADBEEF);
        Assert.Equal(160, dst.Length);
        a.CopyTo(dst);
        b.CopyTo(dst[100..]);
        stage.Append(h, a, dataDigest: false, 0xDEADBEEF); // no digest negotiated: none written
        Assert.Equal(24 + 160 + 4 + 24 + 100, stage.Length);

        var got = DrainAll(stage, out _);
        Assert.Equal(h, got[..24]);
        Assert.Equal(a, got[24..124]);
        Assert.Equal(b, got[124..184]);
        Assert.Equal(0xDEADBEEFu, BinaryPrimitives.ReadUInt32LittleEndian(got.AsSpan(184)));
        Assert.Equal(h, got[188..212]);
        Assert.Equal(a, got[212..]);

        // The digest of a PDU sent from its owner's buffers, in pieces.
        _tx.Blocking = true;
        for (int done = 0; done < 4;)
        {
            int n = stage.SendDigest(_tx, 0x11223344, done, out var err);
            Assert.Equal(SocketError.Success, err);
            done += n;
        }

        Assert.Equal(1, stage.SendDigest(_tx, 0x11223344, 3, out _));
        var d = new byte[5];
        ReceiveExactly(d);
        Assert.Equal(new byte[] { 0x44, 0x33, 0x22, 0x11, 0x11 }, d);
        Assert.Throws<ArgumentOutOfRangeException>(() => stage.SendDigest(_tx, 0, 4, out _));
    }

    [Fact]
    public void StagingAndDrainingAllocateNothing()
    {
        var stage = new NvmeTcpSendStage();
        var h = Pattern(72, 1);
        var d = Pattern(4096, 2);
        var sink = new byte[64 * 1024];
        for (int warm = 0; warm < 2; warm++)
        {
            long before = GC.GetAllocatedBytesForCurrentThread();
            for (int i = 0; i < 100; i++)
            {
                stage.Append(h, d, dataDigest: true, 1);
                while (!stage.Drain(_tx, out _))
                {
                    _rx.Receive(sink);
                }

                while (_rx.Available > 0)
                {
                    _rx.Receive(sink);
                }
            }

            long after = GC.GetAllocatedBytesForCurrentThread();
            if (warm == 1)
            {
                Assert.Equal(0, after - before);
            }
        }
    }

    [Fact]
    public void ClearForgetsAHalfSentStage()
    {
        var stage = new NvmeTcpSendStage(capacity: 256 * 1024, dataMax: 64 * 1024);
        var d = Pattern(64 * 1024, 1);
        for (int i = 0; i < 3; i++)
        {
            stage.Append(new byte[24], d, dataDigest: false, 0);
        }

        Assert.False(stage.Drain(_tx, out _));
        Assert.False(stage.IsEmpty);
        stage.Clear();
        Assert.True(stage.IsEmpty);
        Assert.Equal(0, stage.Length);
        Assert.True(stage.CanStage(24, 64 * 1024, false));
    }
}
