using System.Buffers.Binary;
using System.Net;
using System.Net.Sockets;
using Microsoft.Extensions.Logging;
using VhostBackend.Bdev;
using VhostBackend.BdevMalloc;
using VhostBackend.Nvmf;
using VhostBackend.Platform;
using VhostBackend.Reactors;

namespace VhostBackend.Fuzz;

/// <summary>
/// nvmf-tcp: the bytes an NVMe/TCP host sends, over a real loopback connection, to a real <see cref="NvmfTarget"/>
/// (TCP transport, one reactor, subsystem <see cref="Nqn"/> allowing any host with one namespace on a 512-byte-block
/// malloc bdev, and the discovery subsystem): PDU framing (common header, lengths, data offsets, digests), the
/// connection state machine (ICReq, commands before Connect, Connect to known and unknown NQNs, admin and I/O
/// commands, in-capsule data, H2CData after R2T) and the controller behind it.
///
/// Input: byte 0 bit 0 picks the queue. 0: the rest is the whole stream of a fresh connection (ICReq, Connect,
/// admin or discovery commands...). 1: the harness first creates a controller itself (ICReq, admin Connect,
/// Property Set CC.EN=1 on one connection; a valid step that fails is a finding), opens a second connection with
/// ICReq and an I/O queue Connect for that controller, and the rest is what follows on that I/O queue (reads,
/// writes with in-capsule data or through R2T/H2CData, flush, write zeroes, DSM, compare...). The stream is sent in
/// one go; the harness then reads whatever the target answers until it closes the connection or stays silent for
/// 20 ms, and resets its connections. Findings: an exception the target logged at error level (it catches
/// everything to stay alive, see <see cref="FindingLogger"/>), an exception out of a reactor (the process dies),
/// and a target that no longer serves a new host afterwards (a fresh connection's ICReq must get an ICResp within
/// 5 s). The transport's data buffer budget is the smallest, so requests that wait for buffer memory are exercised too.
/// </summary>
internal sealed class NvmfTcpTarget : IFuzzTarget
{
    /// <summary>The subsystem the seeds connect to.</summary>
    public const string Nqn = "nqn.2016-06.io.spdk:fuzz1";

    private const string HostNqn = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000001";

    private readonly FindingLogger _log = new();
    private readonly ReactorRuntime _runtime;
    private readonly NvmfTarget _target;
    private readonly IPEndPoint _endPoint;
    private readonly byte[] _rx = new byte[64 * 1024];

    public NvmfTcpTarget()
    {
        _runtime = new ReactorRuntime(CpuSet.Of(CpuSet.Online().Cores[0]), new ReactorOptions { PinThreads = false });
        _runtime.Start();
        var bdevs = new BdevManager();
        bdevs.Register(new MallocBdev("Malloc0", 2048, 512));
        _target = new NvmfTarget(_runtime, bdevs, new FindingLoggerFactory(_log));
        // The smallest data buffer budget (4 x max_io_size on the one poll group): streams of large writes and reads
        // reach the path where requests wait for buffer memory.
        _target.CreateTransportAsync(new NvmfTransportOptions { NumSharedBuffers = 1 }).GetAwaiter().GetResult();
        int port = FreePort();
        _runtime.Main.InvokeAsync(() =>
        {
            var sub = _target.CreateSubsystem(Nqn, "FUZZ0001", null, allowAnyHost: true, 32, 1, 0xFFEF);
            _target.AddNamespace(sub, "Malloc0", 1, null, null, 0);
            var addr = new NvmfListenAddress("IPv4", "127.0.0.1", port.ToString(System.Globalization.CultureInfo.InvariantCulture));
            _target.AddListener(sub, addr);
            _target.AddListener(_target.Discovery, addr);
        }).GetAwaiter().GetResult();
        _endPoint = new IPEndPoint(IPAddress.Loopback, port);
    }

    public void Run(ReadOnlySpan<byte> input)
    {
        if (input.Length < 1)
        {
            return;
        }

        bool ioQueue = (input[0] & 1) != 0;
        input = input[1..];
        Socket? admin = null;
        Socket? s = null;
        try
        {
            if (ioQueue)
            {
                // A controller the harness creates (admin queue, CC.EN=1), then the stream on an I/O queue of it.
                admin = Connect();
                ushort cntlid = Handshake(admin, qid: 0, cntlid: 0xFFFF);
                Exchange(admin, Capsule(Sqe(0x7F, 2, fctype: 0x00, cdw10: 0, cdw11: 0x14, cdw12: 0x460001), []), "Property Set CC.EN=1");
                s = Connect();
                Handshake(s, qid: 1, cntlid: cntlid);
            }
            else
            {
                s = Connect();
            }

            s.Send(input);
            s.Shutdown(SocketShutdown.Send);
            Drain(s, TimeSpan.FromMilliseconds(20));
        }
        catch (SocketException)
        {
            // The target closed the connection (its answer to a malformed stream): fine.
        }
        finally
        {
            s?.Dispose();
            admin?.Dispose();
        }

        _log.ThrowIfAny();
        CheckAlive();
        _log.ThrowIfAny();
    }

    /// <summary>ICReq (no digests) and a Connect for <paramref name="qid"/>; returns the controller id.</summary>
    private ushort Handshake(Socket s, ushort qid, ushort cntlid)
    {
        Span<byte> icreq = stackalloc byte[128];
        icreq.Clear();
        icreq[2] = 128;
        icreq[4] = 128;
        s.Send(icreq);
        ReceiveExactly(s, 128, "ICResp");
        if (_rx[0] != 0x01)
        {
            throw new FuzzFindingException($"a valid ICReq got PDU type {_rx[0]}");
        }

        var data = new byte[1024];
        data[16] = (byte)cntlid;
        data[17] = (byte)(cntlid >> 8);
        System.Text.Encoding.ASCII.GetBytes(Nqn, data.AsSpan(256));
        System.Text.Encoding.ASCII.GetBytes(HostNqn, data.AsSpan(512));
        var cqe = Exchange(s, Capsule(Sqe(0x7F, 1, fctype: 0x01, cdw10: (uint)qid << 16, cdw11: qid == 0 ? 31u : 127u, cdw12: 0, sglLength: 1024), data), $"Connect qid {qid}");
        return BinaryPrimitives.ReadUInt16LittleEndian(cqe);
    }

    /// <summary>Sends a command capsule and returns its completion queue entry; a failed status is a finding.</summary>
    private ReadOnlySpan<byte> Exchange(Socket s, byte[] capsule, string what)
    {
        s.Send(capsule);
        ReceiveExactly(s, 24, what);
        if (_rx[0] != 0x05)
        {
            throw new FuzzFindingException($"{what}: answered with PDU type {_rx[0]}, not a response capsule");
        }

        ushort status = (ushort)(BinaryPrimitives.ReadUInt16LittleEndian(_rx.AsSpan(8 + 14)) >> 1);
        if (status != 0)
        {
            throw new FuzzFindingException($"{what}: a valid command failed with status 0x{status:x}");
        }

        return _rx.AsSpan(8, 16);
    }

    private static byte[] Sqe(byte opc, ushort cid, byte fctype, uint cdw10, uint cdw11, uint cdw12, uint sglLength = 0)
    {
        var sqe = new byte[64];
        sqe[0] = opc;
        sqe[1] = 0x40; // SGL
        BinaryPrimitives.WriteUInt16LittleEndian(sqe.AsSpan(2), cid);
        sqe[4] = fctype;
        BinaryPrimitives.WriteUInt32LittleEndian(sqe.AsSpan(24 + 8), sglLength);
        sqe[39] = 0x01; // data block, offset: in-capsule data
        BinaryPrimitives.WriteUInt32LittleEndian(sqe.AsSpan(40), cdw10);
        BinaryPrimitives.WriteUInt32LittleEndian(sqe.AsSpan(44), cdw11);
        BinaryPrimitives.WriteUInt32LittleEndian(sqe.AsSpan(48), cdw12);
        return sqe;
    }

    private static byte[] Capsule(byte[] sqe, byte[] data)
    {
        var pdu = new byte[72 + data.Length];
        pdu[0] = 0x04;
        pdu[2] = 72;
        pdu[3] = (byte)(data.Length > 0 ? 72 : 0);
        BinaryPrimitives.WriteUInt32LittleEndian(pdu.AsSpan(4), (uint)pdu.Length);
        sqe.CopyTo(pdu, 8);
        data.CopyTo(pdu, 72);
        return pdu;
    }

    private void ReceiveExactly(Socket s, int length, string what)
    {
        int got = 0;
        s.ReceiveTimeout = 5000;
        while (got < length)
        {
            int n;
            try
            {
                n = s.Receive(_rx.AsSpan(got, length - got));
            }
            catch (SocketException e) when (e.SocketErrorCode == SocketError.TimedOut)
            {
                n = 0;
            }

            if (n == 0)
            {
                throw new FuzzFindingException($"{what}: no answer from the target ({got} of {length} bytes within 5 s)");
            }

            got += n;
        }
    }

    /// <summary>A fresh host is served: ICReq (no digests) gets a 128-byte ICResp.</summary>
    private void CheckAlive()
    {
        using var s = Connect();
        Span<byte> icreq = stackalloc byte[128];
        icreq.Clear();
        icreq[2] = 128;
        icreq[4] = 128;
        s.Send(icreq);
        ReceiveExactly(s, 128, "ICReq after the input");
        if (_rx[0] != 0x01)
        {
            throw new FuzzFindingException($"target answers a valid ICReq after the input with PDU type {_rx[0]}");
        }
    }

    private Socket Connect()
    {
        var s = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp) { NoDelay = true, LingerState = new LingerOption(true, 0) };
        s.Connect(_endPoint);
        return s;
    }

    /// <summary>Reads until the target closes or says nothing for <paramref name="idle"/>.</summary>
    private void Drain(Socket s, TimeSpan idle)
    {
        while (s.Poll(idle, SelectMode.SelectRead))
        {
            if (s.Receive(_rx) == 0)
            {
                return;
            }
        }
    }

    private static int FreePort()
    {
        var l = new System.Net.Sockets.TcpListener(IPAddress.Loopback, 0);
        l.Start();
        int port = ((IPEndPoint)l.LocalEndpoint).Port;
        l.Stop();
        return port;
    }

    private sealed class FindingLoggerFactory(FindingLogger log) : ILoggerFactory
    {
        public void AddProvider(ILoggerProvider provider)
        {
        }

        public ILogger CreateLogger(string categoryName) => log;

        public void Dispose()
        {
        }
    }
}
