using System.Buffers.Binary;
using System.Net;
using System.Net.Sockets;
using System.Runtime.InteropServices;
using VhostBackend.Nvme.Tcp;

namespace VhostBackend.Nvme.Tests;

/// <summary>
/// An in-process NVMe/TCP target MODEL (not a real target): a loopback listener, one thread per connection with
/// blocking sockets, one RAM namespace. It speaks enough of the protocol for the initiator's tests (ICReq/ICResp,
/// Connect, Property Get/Set, Identify, Set Features, Keep Alive, Read, Write with in-capsule data or R2T/H2CData) and
/// can misbehave on request (<see cref="Hostile"/>) to check the initiator's validation.
/// </summary>
public sealed class NvmeTcpTargetModel : IDisposable
{
    public const string SubNqn = "nqn.2026-01.io.model:sub1";
    private readonly TcpListener _listener;
    private readonly Thread _acceptThread;
    private readonly List<Socket> _conns = new();
    private volatile bool _stop;
    private uint _cc;
    private uint _csts;

    public NvmeTcpTargetModel(uint blockSize = 512, ulong blocks = 2048, uint inCapsule = 8192, uint maxH2CData = 8192, int cpda = 0)
    {
        BlockSize = blockSize;
        Disk = new byte[blockSize * blocks];
        InCapsule = inCapsule;
        MaxH2CData = maxH2CData;
        Cpda = cpda;
        _listener = new TcpListener(IPAddress.Loopback, 0);
        _listener.Start();
        Port = ((IPEndPoint)_listener.LocalEndpoint).Port;
        _acceptThread = new Thread(AcceptLoop) { IsBackground = true, Name = "tcp-target-model" };
        _acceptThread.Start();
    }

    public int Port { get; }
    public uint BlockSize { get; }
    public byte[] Disk { get; }
    public uint InCapsule { get; }
    public uint MaxH2CData { get; }
    public int Cpda { get; }

    /// <summary>Misbehaviour for the next read or write (the test sets it, the connection thread applies it once).</summary>
    public volatile string? Hostile;

    /// <summary>Close new connections at once (a target that is down; the listener stays so the port is not reused).</summary>
    public volatile bool Refuse;

    /// <summary>Send reads' data with C2HData SUCCESS instead of a CapsuleResp.</summary>
    public bool UseC2HSuccess { get; set; }

    /// <summary>Split C2H data into PDUs of at most this many bytes.</summary>
    public int C2HChunk { get; set; } = 4096;

    /// <summary>Reads are not answered but held (a target that stops answering) until aborted or <see cref="ReleaseHeld"/>.</summary>
    public volatile bool HoldReads;

    /// <summary>Abort commands find nothing to abort (DW0 bit 0 set), like Linux nvmet, which implements no aborts.</summary>
    public volatile bool IgnoreAborts;

    public int AbortsReceived;

    private readonly List<(Socket Sock, ushort Qid, ushort Cid, bool Hd, bool Dd, long Offset, int Length)> _held = new();
    private readonly Dictionary<Socket, ushort> _qids = new();

    /// <summary>Reads held by <see cref="HoldReads"/>.</summary>
    public int HeldCount
    {
        get
        {
            lock (_held)
            {
                return _held.Count;
            }
        }
    }

    /// <summary>Answers every held read (on connections still open); returns how many.</summary>
    public int ReleaseHeld()
    {
        (Socket Sock, ushort Qid, ushort Cid, bool Hd, bool Dd, long Offset, int Length)[] held;
        lock (_held)
        {
            held = _held.ToArray();
            _held.Clear();
        }

        foreach (var h in held)
        {
            lock (h.Sock)
            {
                SendC2H(h.Sock, h.Cid, Disk.AsSpan((int)h.Offset, h.Length), h.Hd, h.Dd, false);
                Respond(h.Sock, h.Cid, 0, 0, 0, h.Hd, new byte[256]);
            }
        }

        return held.Length;
    }

    /// <summary>CAP.MQES the model reports (0's based; a hostile target may say 0).</summary>
    public ushort Mqes { get; set; } = 127;

    /// <summary>Active namespaces are 1..NamespaceCount (all backed by <see cref="Disk"/>; I/O goes to namespace 1 only).</summary>
    public volatile int NamespaceCount = 1;

    /// <summary>The size Identify Namespace reports (blocks; null: the disk's).</summary>
    public long ReportedBlocks = -1;

    public int ChangedNsLogReads;

    private readonly List<(Socket Sock, ushort Cid, bool Hd)> _aers = new();

    /// <summary>Asynchronous Event Requests the host has outstanding.</summary>
    public int PendingAers
    {
        get
        {
            lock (_aers)
            {
                return _aers.Count;
            }
        }
    }

    /// <summary>Completes one outstanding AER with a namespace attribute notice (log page 0x04); false when none is.</summary>
    public bool RaiseNamespaceChanged()
    {
        (Socket Sock, ushort Cid, bool Hd) a;
        lock (_aers)
        {
            if (_aers.Count == 0)
            {
                return false;
            }

            a = _aers[0];
            _aers.RemoveAt(0);
        }

        lock (a.Sock)
        {
            Respond(a.Sock, a.Cid, 0, 0, 0x00040002, a.Hd, new byte[256]);
        }

        return true;
    }

    public int R2TsSent;
    public int KeepAlives;
    public int Connects;
    public int TermReqsReceived;

    public NvmeTcpTransportId TransportId(bool hdgst = false, bool ddgst = false) =>
        new() { Address = IPAddress.Loopback, Port = Port, SubNqn = SubNqn, HeaderDigest = hdgst, DataDigest = ddgst };

    /// <summary>Closes every open connection (a target going away; the listener stays).</summary>
    public void DropConnections()
    {
        lock (_conns)
        {
            foreach (var s in _conns)
            {
                try
                {
                    s.Shutdown(SocketShutdown.Both);
                }
                catch (Exception e) when (e is SocketException or ObjectDisposedException)
                {
                }

                s.Dispose();
            }

            _conns.Clear();
        }
    }

    private void AcceptLoop()
    {
        while (!_stop)
        {
            Socket s;
            try
            {
                s = _listener.AcceptSocket();
            }
            catch (Exception e) when (e is SocketException or ObjectDisposedException or InvalidOperationException)
            {
                return;
            }

            if (Refuse)
            {
                s.Dispose(); // a target that is down: the connection closes at once
                continue;
            }

            lock (_conns)
            {
                _conns.Add(s);
            }

            new Thread(() => Serve(s)) { IsBackground = true, Name = "tcp-target-model-conn" }.Start();
        }
    }

    private static bool ReadExact(Socket s, Span<byte> b)
    {
        while (b.Length > 0)
        {
            int n;
            try
            {
                n = s.Receive(b);
            }
            catch (Exception e) when (e is SocketException or ObjectDisposedException)
            {
                return false;
            }

            if (n == 0)
            {
                return false;
            }

            b = b[n..];
        }

        return true;
    }

    private static void Send(Socket s, ReadOnlySpan<byte> b)
    {
        try
        {
            lock (s)
            {
                s.Send(b);
            }
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException)
        {
        }
    }

    private void Serve(Socket s)
    {
        bool hd = false, dd = false;
        var hdr = new byte[512];
        var data = new byte[1 << 20];
        var tx = new byte[256];
        while (!_stop)
        {
            if (!ReadExact(s, hdr.AsSpan(0, 8)))
            {
                return;
            }

            byte type = hdr[0];
            int hlen = hdr[2];
            int pdo = hdr[3];
            int plen = (int)BinaryPrimitives.ReadUInt32LittleEndian(hdr.AsSpan(4));
            if (type == NvmeTcpPduType.IcReq)
            {
                ReadExact(s, hdr.AsSpan(8, 120));
                hd = (hdr[11] & 1) != 0;
                dd = (hdr[11] & 2) != 0;
                if (Hostile == "icresp-maxh2c")
                {
                    Hostile = null;
                    NvmeTcpPdu.WriteIcResp(tx, Cpda, hd, dd, 100);
                }
                else
                {
                    NvmeTcpPdu.WriteIcResp(tx, Cpda, hd, dd, MaxH2CData);
                }

                Send(s, tx.AsSpan(0, 128));
                continue;
            }

            if (type == NvmeTcpPduType.H2CTermReq)
            {
                Interlocked.Increment(ref TermReqsReceived);
                ReadExact(s, hdr.AsSpan(8, plen - 8));
                s.Dispose();
                return;
            }

            if (type != NvmeTcpPduType.CapsuleCmd)
            {
                s.Dispose();
                return;
            }

            int hb = hlen + (hd ? 4 : 0);
            ReadExact(s, hdr.AsSpan(8, hb - 8));
            int icd = 0;
            if (plen > hb)
            {
                ReadExact(s, hdr.AsSpan(hb, pdo - hb));
                icd = plen - pdo - (dd ? 4 : 0);
                ReadExact(s, data.AsSpan(0, icd));
                if (dd)
                {
                    ReadExact(s, tx.AsSpan(0, 4));
                }
            }

            var cmd = MemoryMarshal.Read<NvmeCommand>(hdr.AsSpan(8));
            lock (s)
            {
                Handle(s, cmd, data, icd, hd, dd, tx); // held reads are answered from other threads under the same lock
            }
        }
    }

    private void Respond(Socket s, ushort cid, int sct, int sc, uint dw0, bool hd, byte[] tx)
    {
        var cqe = new NvmeCompletion { Cid = cid, Dw0 = dw0, StatusPhase = (ushort)(NvmeStatus.Make(sct, sc).Field << 1) };
        int n = NvmeTcpPdu.WriteCapsuleResp(tx, in cqe, hd);
        Send(s, tx.AsSpan(0, n));
    }

    private void SendC2H(Socket s, ushort cid, ReadOnlySpan<byte> payload, bool hd, bool dd, bool success)
    {
        var tx = new byte[256];
        string? h = Hostile;
        if (h is not null)
        {
            Hostile = null;
        }

        for (int off = 0; off < payload.Length;)
        {
            int len = Math.Min(C2HChunk, payload.Length - off);
            bool last = off + len == payload.Length;
            ushort pcid = h == "c2h-bad-cid" ? (ushort)(cid + 50) : cid;
            uint poff = h == "c2h-bad-offset" ? (uint)(off + 512) : (uint)off;
            int n = NvmeTcpPdu.WriteC2HData(tx, pcid, poff, (uint)len, last, last && success, hd, dd, 0);
            if (h == "hdgst-corrupt" && hd)
            {
                tx[n - 1] ^= 0xFF;
            }

            if (h == "c2h-datal-mismatch")
            {
                BinaryPrimitives.WriteUInt32LittleEndian(tx.AsSpan(16), (uint)len + 8);
            }

            Send(s, tx.AsSpan(0, n));
            var piece = payload.Slice(off, len).ToArray();
            Send(s, piece);
            if (dd)
            {
                uint crc = Crc32C.Compute(piece);
                if (h == "ddgst-corrupt")
                {
                    crc ^= 1;
                }

                var d = new byte[4];
                BinaryPrimitives.WriteUInt32LittleEndian(d, crc);
                Send(s, d);
            }

            off += len;
        }
    }

    private void Handle(Socket s, NvmeCommand cmd, byte[] data, int icd, bool hd, bool dd, byte[] tx)
    {
        ushort cid = cmd.Cid;
        if ((cmd.Flags & 0xC0) != NvmeFabrics.PsdtSgl)
        {
            Respond(s, cid, 0, 2, 0, hd, tx); // like nvmet: fabrics commands must use SGLs (PSDT 01b)
            return;
        }

        if (cmd.Opcode == NvmeFabrics.Opcode)
        {
            switch (cmd.Nsid & 0xFF)
            {
                case NvmeFabrics.FctypeConnect:
                    Interlocked.Increment(ref Connects);
                    lock (_held)
                    {
                        _qids[s] = (ushort)(cmd.Cdw10 >> 16);
                    }

                    Respond(s, cid, 0, 0, 1, hd, tx);
                    return;
                case NvmeFabrics.FctypePropertyGet:
                {
                    ulong v = cmd.Cdw11 switch
                    {
                        0x00 => Mqes | (1UL << 16) | (2UL << 24) | (1UL << 37), // MQES (127), CQR, TO 1 s, NVM
                        0x08 => 0x10400,
                        0x14 => _cc,
                        0x1C => _csts,
                        _ => 0,
                    };
                    var cqe = new NvmeCompletion { Cid = cid, Dw0 = (uint)v, Dw1 = (uint)(v >> 32) };
                    int n = NvmeTcpPdu.WriteCapsuleResp(tx, in cqe, hd);
                    Send(s, tx.AsSpan(0, n));
                    return;
                }

                case NvmeFabrics.FctypePropertySet:
                    if (cmd.Cdw11 == 0x14)
                    {
                        _cc = cmd.Cdw12;
                        _csts = (_cc & 1) != 0 ? 1u : 0u;
                        if (((_cc >> 14) & 3) != 0)
                        {
                            _csts |= 2u << 2; // shutdown complete
                        }
                    }

                    Respond(s, cid, 0, 0, 0, hd, tx);
                    return;
            }

            Respond(s, cid, 0, 1, 0, hd, tx);
            return;
        }

        uint dataLen = (uint)(cmd.Prp2 & 0xFFFFFFFF);
        switch (cmd.Opcode)
        {
            case NvmeAdminOpcode.Identify when cmd.Nsid == 0 || (cmd.Cdw10 & 0xFF) == 0:
            {
                var id = new byte[4096];
                switch (cmd.Cdw10 & 0xFF)
                {
                    case 1:
                        "MODEL-SN"u8.CopyTo(id.AsSpan(4));
                        "NVMe/TCP target model"u8.CopyTo(id.AsSpan(24));
                        id[77] = 5; // MDTS 128 KiB
                        BinaryPrimitives.WriteUInt16LittleEndian(id.AsSpan(78), 1);
                        BinaryPrimitives.WriteUInt32LittleEndian(id.AsSpan(516), 32); // NN
                        id[259] = 3; // AERL: 4 AERs
                        BinaryPrimitives.WriteUInt32LittleEndian(id.AsSpan(1792), (InCapsule + 64) / 16);
                        System.Text.Encoding.ASCII.GetBytes(SubNqn).CopyTo(id.AsSpan(768));
                        break;
                    case 2:
                        for (int n = 1; n <= NamespaceCount; n++)
                        {
                            BinaryPrimitives.WriteUInt32LittleEndian(id.AsSpan((n - 1) * 4), (uint)n);
                        }

                        break;
                    case 0 when cmd.Nsid > NamespaceCount:
                        break; // inactive: all zeroes
                    case 0:
                        long rb = Interlocked.Read(ref ReportedBlocks);
                        ulong blocks = rb >= 0 ? (ulong)rb : (ulong)Disk.Length / BlockSize;
                        BinaryPrimitives.WriteUInt64LittleEndian(id, blocks);
                        BinaryPrimitives.WriteUInt64LittleEndian(id.AsSpan(8), blocks);
                        BinaryPrimitives.WriteUInt64LittleEndian(id.AsSpan(16), blocks);
                        id[25] = 0; // NLBAF 0 -> one format
                        id[26] = 0;
                        id[128 + 2] = (byte)System.Numerics.BitOperations.Log2(BlockSize);
                        break;
                }

                SendC2H(s, cid, id.AsSpan(0, (int)Math.Min(dataLen, 4096)), hd, dd, false);
                Respond(s, cid, 0, 0, 0, hd, tx);
                return;
            }

            case NvmeAdminOpcode.GetLogPage when (cmd.Cdw10 & 0xFF) == NvmeDiscoveryEntry.LogPageId:
            {
                // A discovery log: this subsystem, a referral and the discovery subsystem itself (the host attaches only the first).
                var log = new byte[4 * 1024];
                BinaryPrimitives.WriteUInt64LittleEndian(log, 7);
                BinaryPrimitives.WriteUInt64LittleEndian(log.AsSpan(8), 3);
                string port = Port.ToString(System.Globalization.CultureInfo.InvariantCulture);
                new NvmeDiscoveryEntry(NvmeDiscoveryEntry.TrTypeTcp, NvmeDiscoveryEntry.AdrFamIpv4, NvmeDiscoveryEntry.SubTypeNvme, 1, 0xFFFF, port, SubNqn, "127.0.0.1").Write(log.AsSpan(1024));
                new NvmeDiscoveryEntry(NvmeDiscoveryEntry.TrTypeTcp, NvmeDiscoveryEntry.AdrFamIpv4, NvmeDiscoveryEntry.SubTypeReferral, 2, 0xFFFF, "8009", NvmeFabrics.DiscoveryNqn, "192.0.2.1").Write(log.AsSpan(2048));
                new NvmeDiscoveryEntry(NvmeDiscoveryEntry.TrTypeTcp, NvmeDiscoveryEntry.AdrFamIpv4, NvmeDiscoveryEntry.SubTypeCurrentDiscovery, 1, 0xFFFF, port, NvmeFabrics.DiscoveryNqn, "127.0.0.1").Write(log.AsSpan(3072));
                SendC2H(s, cid, log.AsSpan(0, (int)Math.Min(dataLen, (uint)log.Length)), hd, dd, false);
                Respond(s, cid, 0, 0, 0, hd, tx);
                return;
            }

            case NvmeAdminOpcode.Abort:
            {
                Interlocked.Increment(ref AbortsReceived);
                ushort sqid = (ushort)cmd.Cdw10;
                ushort acid = (ushort)(cmd.Cdw10 >> 16);
                int i = -1;
                (Socket Sock, ushort Qid, ushort Cid, bool Hd, bool Dd, long Offset, int Length) h = default;
                lock (_held)
                {
                    if (!IgnoreAborts)
                    {
                        i = _held.FindIndex(x => x.Qid == sqid && x.Cid == acid);
                        if (i >= 0)
                        {
                            h = _held[i];
                            _held.RemoveAt(i);
                        }
                    }
                }

                if (i >= 0)
                {
                    lock (h.Sock!)
                    {
                        Respond(h.Sock, h.Cid, 0, NvmeSc.AbortRequested, 0, h.Hd, new byte[256]);
                    }
                }

                Respond(s, cid, 0, 0, i >= 0 ? 0u : 1u, hd, tx);
                return;
            }

            case NvmeAdminOpcode.SetFeatures:
                Respond(s, cid, 0, 0, 3 | (3u << 16), hd, tx);
                return;
            case NvmeAdminOpcode.AsyncEventRequest:
                lock (_aers)
                {
                    _aers.RemoveAll(a => !a.Sock.Connected);
                    _aers.Add((s, cid, hd));
                }

                return; // completed by RaiseNamespaceChanged
            case NvmeAdminOpcode.GetLogPage when (cmd.Cdw10 & 0xFF) == NvmeLogPage.ChangedNamespaceList:
            {
                Interlocked.Increment(ref ChangedNsLogReads);
                var log = new byte[4096];
                BinaryPrimitives.WriteUInt32LittleEndian(log, 0xFFFFFFFF); // more than we track: rescan all
                SendC2H(s, cid, log.AsSpan(0, (int)Math.Min(dataLen, 4096u)), hd, dd, false);
                Respond(s, cid, 0, 0, 0, hd, tx);
                return;
            }

            case NvmeAdminOpcode.KeepAlive when cmd.Nsid == 0:
                Interlocked.Increment(ref KeepAlives);
                Respond(s, cid, 0, 0, 0, hd, tx);
                return;
            case NvmeIoOpcode.Read when cmd.Nsid == 1:
            {
                long off = (long)(cmd.Cdw10 | ((ulong)cmd.Cdw11 << 32)) * BlockSize;
                int len = (int)(((cmd.Cdw12 & 0xFFFF) + 1) * BlockSize);
                string? h = Hostile;
                if (h == "resp-early")
                {
                    Hostile = null;
                    Respond(s, cid, 0, 0, 0, hd, tx);
                    return;
                }

                if (h == "resp-unknown-cid")
                {
                    Hostile = null;
                    Respond(s, (ushort)(cid + 77), 0, 0, 0, hd, tx);
                    return;
                }

                if (h == "c2h-bad-type")
                {
                    Hostile = null;
                    tx.AsSpan(0, 24).Clear();
                    NvmeTcpPdu.WriteCommon(tx, 0x0F, 0, 24, 0, 24);
                    Send(s, tx.AsSpan(0, 24));
                    return;
                }

                if (HoldReads)
                {
                    lock (_held)
                    {
                        _held.Add((s, _qids.GetValueOrDefault(s), cid, hd, dd, off, len));
                    }

                    return;
                }

                SendC2H(s, cid, Disk.AsSpan((int)off, len), hd, dd, UseC2HSuccess);
                if (!UseC2HSuccess)
                {
                    Respond(s, cid, 0, 0, 0, hd, tx);
                }

                return;
            }

            case NvmeIoOpcode.Write when cmd.Nsid == 1:
            {
                long off = (long)(cmd.Cdw10 | ((ulong)cmd.Cdw11 << 32)) * BlockSize;
                int len = (int)(((cmd.Cdw12 & 0xFFFF) + 1) * BlockSize);
                if (icd > 0)
                {
                    data.AsSpan(0, len).CopyTo(Disk.AsSpan((int)off));
                    Respond(s, cid, 0, 0, 0, hd, tx);
                    return;
                }

                string? h = Hostile;
                Hostile = null;
                if (h == "r2t-too-long")
                {
                    int n0 = NvmeTcpPdu.WriteR2T(tx, cid, 7, 0, (uint)len + 512, hd);
                    Send(s, tx.AsSpan(0, n0));
                    return;
                }

                // One R2T for everything; the host splits it into H2CData PDUs of at most MAXH2CDATA.
                Interlocked.Increment(ref R2TsSent);
                int n = NvmeTcpPdu.WriteR2T(tx, cid, 7, 0, (uint)len, hd);
                Send(s, tx.AsSpan(0, n));
                int got = 0;
                var h2 = new byte[256];
                while (got < len)
                {
                    if (!ReadExact(s, h2.AsSpan(0, 8)) || h2[0] != NvmeTcpPduType.H2CData)
                    {
                        return;
                    }

                    int phl = h2[2] + (hd ? 4 : 0);
                    ReadExact(s, h2.AsSpan(8, phl - 8));
                    int ppdo = h2[3];
                    ReadExact(s, h2.AsSpan(phl, ppdo - phl));
                    uint datao = BinaryPrimitives.ReadUInt32LittleEndian(h2.AsSpan(12));
                    int datal = (int)BinaryPrimitives.ReadUInt32LittleEndian(h2.AsSpan(16));
                    if (BinaryPrimitives.ReadUInt16LittleEndian(h2.AsSpan(10)) != 7 || datao != got || datal > MaxH2CData)
                    {
                        Respond(s, cid, 0, 4, 0, hd, tx); // data transfer error
                        return;
                    }

                    ReadExact(s, Disk.AsSpan((int)off + got, datal));
                    if (dd)
                    {
                        ReadExact(s, h2.AsSpan(0, 4));
                    }

                    got += datal;
                }

                Respond(s, cid, 0, 0, 0, hd, tx);
                return;
            }
        }

        Respond(s, cid, 0, 1, 0, hd, tx); // invalid opcode
    }

    public void Dispose()
    {
        _stop = true;
        _listener.Stop();
        DropConnections();
    }
}
