using System.Buffers.Binary;
using System.Net;
using System.Net.Sockets;
using System.Runtime.InteropServices;
using VhostBackend.Platform;

namespace VhostBackend.Nvme.Tcp;

/// <summary>Called once for each command of an NVMe/TCP queue pair that has been outstanding longer than the timeout.</summary>
public delegate void NvmeTcpTimeoutCallback(object? context, NvmeTcpQueuePair qpair, ushort cid);

/// <summary>
/// One NVMe/TCP queue pair: a non-blocking TCP connection to the controller, the initialization (ICReq/ICResp) and
/// fabrics Connect, and the command state of up to <see cref="Entries"/> - 1 outstanding commands. Owned by one
/// thread, which calls <see cref="Poll"/> (send what is queued, receive and dispatch what arrived); nothing blocks and
/// nothing is allocated per command: trackers, headers and buffers are made at construction.
/// <para>
/// Data moves between the socket and the caller's buffers (<see cref="IoVec"/>s) directly: write data is sent
/// in-capsule when it fits the controller's in-capsule size, otherwise on its R2Ts as H2CData PDUs (at most
/// MAXH2CDATA each); read data arrives in C2HData PDUs, read straight into the buffers (small pieces through an 8 KiB
/// staging buffer), completed by a CapsuleResp or by the C2HData SUCCESS flag.
/// </para>
/// <para>
/// Everything the controller sends is untrusted: every header is validated (<see cref="NvmeTcpPdu.ValidateHeader"/>),
/// its digests checked when negotiated, command ids must name an outstanding command that expects that PDU, data
/// offsets and lengths must lie inside the command's transfer and arrive in order. Any violation sends an
/// H2CTermReq (when the stream is between PDUs), closes the connection and completes every outstanding command with "transient transport error":
/// the queue pair is then <see cref="IsFailed"/> and the owner reconnects or gives up (<see cref="LastError"/> says why).
/// </para>
/// </summary>
public sealed class NvmeTcpQueuePair : IDisposable
{
    /// <summary>
    /// Most buffer segments one command may carry: at least the most the vhost layer hands a bdev in one request
    /// (vhost-blk and vhost-scsi queues accept up to 160 descriptors; SegMax 126 is advertised), with headroom.
    /// </summary>
    public const int MaxIovs = 256;

    private const int StateIdle = 0;
    private const int StateTcpConnecting = 1;
    private const int StateIcWait = 2;
    private const int StateFabricConnect = 3;
    private const int StateConnected = 4;
    private const int StateFailed = 5;

    private const int RxCommonHeader = 0;
    private const int RxHeader = 1;
    private const int RxPad = 2;
    private const int RxData = 3;
    private const int RxDataDigest = 4;

    private readonly NvmeTcpTransportId _trid;
    private readonly Tracker[] _trackers;
    private readonly ushort[] _freeCids;
    private int _freeCount;
    private readonly Tracker[] _sendQueue;
    private int _sendHead;
    private int _sendCount;

    // Send coalescing: whole small PDUs (command capsules with their in-capsule data, H2CData of at most 8 KiB) go out
    // in one send from the stage (at QD128 the initiator was bound by send syscalls). Larger data is sent from the
    // command's buffers, after what is staged.
    private readonly NvmeTcpSendStage _txStage = new();
    private readonly byte[] _ctlTx = new byte[NvmeTcpPdu.IcSize + NvmeTcpPdu.TermReqMaxErrorData];
    private int _ctlLen;
    private int _ctlSent;

    private readonly byte[] _staging = new byte[8192];
    private int _stageStart;
    private int _stageEnd;
    private readonly byte[] _rxHdr = new byte[NvmeTcpPdu.MaxHeaderBytes + NvmeTcpPdu.TermReqMaxErrorData];
    private int _rxHave;
    private int _rxState;
    private NvmeTcpPduInfo _rxInfo;
    private Tracker? _rxTracker;
    private uint _rxDataOffset;
    private int _rxDataLeft;
    private uint _rxCrc;
    private readonly byte[] _rxDigest = new byte[4];
    private readonly byte[] _padSink = new byte[NvmeTcpPdu.MaxHeaderBytes];

    private readonly PinnedArray<byte> _connectData = new(NvmeFabrics.ConnectDataSize);
    private Socket? _sock;
    private int _state;
    private long _deadline;
    private ushort _connectCntlid;
    private uint _kato;
    private bool _hdgst;
    private bool _ddgst;
    private int _cpda;
    private uint _maxH2CData;

    private sealed class Tracker
    {
        public ushort Cid;
        public bool Active;
        public NvmeCompletionCallback? Callback;
        public object? Arg;
        public long SubmitTicks;
        public bool TimeoutReported;
        public byte Opcode;
        public readonly IoVec[] Iovs = new IoVec[MaxIovs];
        public int IovCount;
        public uint DataLength;
        public bool HostToController;
        public bool InCapsule;

        /// <summary>C2H: bytes received; H2C: bytes the controller has asked for (R2T offsets must continue from here).</summary>
        public uint Transferred;
        public bool R2TActive;
        public ushort Ttag;
        public uint R2TEnd;

        // The PDU being sent: header bytes, then DataLength bytes at TxDataOffset, then the data digest.
        public readonly byte[] TxHeader = new byte[NvmeTcpPdu.MaxHeaderBytes];
        public int TxHeaderLength;
        public uint TxDataOffset;
        public uint TxDataLength;
        public uint TxDigest;
        public int TxSent;
        public bool Queued;
    }

    /// <summary>A queue pair for queue <paramref name="qid"/> (0: admin) with <paramref name="entries"/> entries (at most entries - 1 outstanding).</summary>
    public NvmeTcpQueuePair(NvmeTcpTransportId trid, ushort qid, int entries, int inCapsuleDataSize)
    {
        ArgumentNullException.ThrowIfNull(trid);
        ArgumentOutOfRangeException.ThrowIfLessThan(entries, 2);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(entries, 65536);
        _trid = trid;
        Id = qid;
        Entries = entries;
        InCapsuleDataSize = Math.Max(0, inCapsuleDataSize);
        _trackers = new Tracker[entries - 1];
        _freeCids = new ushort[entries - 1];
        for (int i = 0; i < _trackers.Length; i++)
        {
            _trackers[i] = new Tracker { Cid = (ushort)i };
            _freeCids[i] = (ushort)(_trackers.Length - 1 - i);
        }

        _freeCount = _trackers.Length;
        _sendQueue = new Tracker[entries];
        ConnectTimeoutTicks = 10 * Ticks.Frequency;
    }

    public ushort Id { get; }
    public int Entries { get; }

    /// <summary>Largest write sent inside the command capsule; larger ones wait for R2Ts.</summary>
    public int InCapsuleDataSize { get; set; }

    /// <summary>Controller id the Connect returned (admin queue) or used (I/O queues).</summary>
    public ushort Cntlid { get; private set; }

    public bool IsConnected => _state == StateConnected;
    public bool IsConnecting => _state is StateTcpConnecting or StateIcWait or StateFabricConnect;
    public bool IsFailed => _state == StateFailed;

    /// <summary>Why the queue pair failed (null while it has not).</summary>
    public string? LastError { get; private set; }

    /// <summary>Digests in effect after the initialization.</summary>
    public bool HeaderDigest => _hdgst;
    public bool DataDigest => _ddgst;
    public uint MaxH2CData => _maxH2CData;

    public int Outstanding => _trackers.Length - _freeCount;

    /// <summary>
    /// The connected socket's file descriptor (-1 when not connected): a reactor may sleep on it (readable = a poll
    /// has PDUs to process). The owner must stop watching it before it closes the connection (<see cref="Close"/>).
    /// </summary>
    public int SocketFd => _state == StateConnected && _sock is { } s ? (int)s.Handle : -1;

    /// <summary>
    /// A poll has work now, so the owner must not sleep: a connect in progress, PDUs waiting to be sent (the socket's
    /// send buffer was full), or received bytes not processed yet.
    /// </summary>
    public bool HasPendingWork => IsConnecting || _sendCount > 0 || _ctlLen > _ctlSent || _stageEnd > _stageStart || !_txStage.IsEmpty;
    public int FreeSlots => _freeCount;

    /// <summary>How long <see cref="StartConnect"/> + <see cref="PollConnect"/> may take (ticks).</summary>
    public long ConnectTimeoutTicks { get; set; }

    /// <summary>Received PDUs rejected as invalid since construction (statistics).</summary>
    public long ProtocolErrors { get; private set; }

    /// <summary>
    /// Starts connecting: a new non-blocking TCP connection, then (from <see cref="PollConnect"/>) ICReq/ICResp and the
    /// fabrics Connect for <see cref="Id"/> to controller <paramref name="cntlid"/> (0xFFFF for a new controller on the
    /// admin queue) with keep-alive timeout <paramref name="katoMs"/>. Closes an earlier connection; commands still
    /// outstanding on it complete with "transient transport error". Returns 0 or a negative errno.
    /// </summary>
    public int StartConnect(ushort cntlid, uint katoMs)
    {
        Close(NvmeStatus.TransientTransportError);
        _connectCntlid = cntlid;
        _kato = katoMs;
        LastError = null;
        _hdgst = false;
        _ddgst = false;
        _cpda = 0;
        _maxH2CData = 0;
        _rxState = RxCommonHeader;
        _rxHave = 0;
        _stageStart = _stageEnd = 0;
        _ctlLen = _ctlSent = 0;
        _txStage.Clear();
        _deadline = Ticks.Now() + ConnectTimeoutTicks;
        try
        {
            var s = new Socket(_trid.Family, SocketType.Stream, ProtocolType.Tcp) { Blocking = false, NoDelay = true };
            _sock = s;
            if (_trid.HostAddress is not null || _trid.HostPort != 0)
            {
                s.Bind(new IPEndPoint(_trid.HostAddress ?? (_trid.Family == AddressFamily.InterNetworkV6 ? IPAddress.IPv6Any : IPAddress.Any), _trid.HostPort));
            }

            try
            {
                s.Connect(new IPEndPoint(_trid.Address, _trid.Port));
            }
            catch (SocketException e) when (e.SocketErrorCode is SocketError.WouldBlock or SocketError.InProgress or SocketError.AlreadyInProgress)
            {
                // completes in PollConnect
            }
        }
        catch (SocketException e)
        {
            Fail($"connect to {_trid.Address}:{_trid.Port}: {e.SocketErrorCode}", NvmeTcpFes.None, 0);
            return -(int)ToErrno(e.SocketErrorCode);
        }

        _state = StateTcpConnecting;
        return 0;
    }

    /// <summary>Advances the connection: 0 while in progress, 1 when connected, a negative errno when it failed.</summary>
    public int PollConnect()
    {
        switch (_state)
        {
            case StateConnected:
                return 1;
            case StateFailed:
            case StateIdle:
                return -Errno.ECONNREFUSED;
        }

        if (Ticks.Now() > _deadline)
        {
            Fail(_state == StateTcpConnecting ? "TCP connect timed out" : _state == StateIcWait ? "no ICResp" : "fabrics Connect timed out", NvmeTcpFes.None, 0);
            return -Errno.ETIMEDOUT;
        }

        if (_state == StateTcpConnecting)
        {
            var s = _sock!;
            try
            {
                if (!s.Poll(0, SelectMode.SelectWrite) && !s.Poll(0, SelectMode.SelectError))
                {
                    return 0;
                }

                int err = (int)s.GetSocketOption(SocketOptionLevel.Socket, SocketOptionName.Error)!;
                if (err != 0 || !s.Connected)
                {
                    Fail($"connect to {_trid.Address}:{_trid.Port}: {(SocketError)err}", NvmeTcpFes.None, 0);
                    return -Errno.ECONNREFUSED;
                }
            }
            catch (SocketException e)
            {
                Fail($"connect: {e.SocketErrorCode}", NvmeTcpFes.None, 0);
                return -Errno.ECONNREFUSED;
            }

            // Host PDU data alignment 0, MAXR2T 0's based: one outstanding R2T per command.
            _ctlLen = NvmeTcpPdu.WriteIcReq(_ctlTx, 0, _trid.HeaderDigest, _trid.DataDigest, 0);
            _ctlSent = 0;
            _state = StateIcWait;
        }

        Poll();
        return _state switch
        {
            StateConnected => 1,
            StateFailed => -Errno.ECONNRESET,
            _ => 0,
        };
    }

    private static readonly NvmeCompletionCallback s_connectDone = static (arg, status, dw0) =>
    {
        var qp = (NvmeTcpQueuePair)arg!;
        if (qp._state != StateFabricConnect)
        {
            return;
        }

        if (!status.IsSuccess)
        {
            qp.Fail($"fabrics Connect (qid {qp.Id}) failed: {status}", NvmeTcpFes.None, 0);
            return;
        }

        qp.Cntlid = (ushort)dw0;
        qp._state = StateConnected;
    };

    private void OnIcResp()
    {
        var h = _rxHdr.AsSpan(0, NvmeTcpPdu.IcSize);
        byte dg = NvmeTcpPdu.IcDigests(h);
        int cpda = NvmeTcpPdu.IcPda(h);
        uint maxh2c = NvmeTcpPdu.IcMax(h);
        byte asked = (byte)((_trid.HeaderDigest ? 1 : 0) | (_trid.DataDigest ? 2 : 0));
        if (NvmeTcpPdu.Pfv(h) != 0)
        {
            Fail("ICResp: unsupported PDU format version", NvmeTcpFes.UnsupportedParameter, 8);
            return;
        }

        if (cpda > NvmeTcpPdu.MaxPda)
        {
            Fail("ICResp: CPDA out of range", NvmeTcpFes.InvalidHeaderField, 10);
            return;
        }

        if ((dg & ~asked) != 0)
        {
            Fail("ICResp: digests enabled that were not requested", NvmeTcpFes.InvalidHeaderField, 11);
            return;
        }

        if (maxh2c < 4096 || (maxh2c & 3) != 0)
        {
            Fail($"ICResp: MAXH2CDATA {maxh2c} invalid", NvmeTcpFes.InvalidHeaderField, 12);
            return;
        }

        _hdgst = (dg & 1) != 0;
        _ddgst = (dg & 2) != 0;
        _cpda = cpda;
        _maxH2CData = maxh2c;
        _state = StateFabricConnect;

        NvmeFabrics.WriteConnectData(_connectData.Span, _trid.HostId, _connectCntlid, _trid.SubNqn, _trid.EffectiveHostNqn);
        var cmd = NvmeFabrics.Connect(Id, Entries, Id == 0 ? _kato : 0);
        var iov = _connectData.ToIoVec(NvmeFabrics.ConnectDataSize);
        int rc = SubmitCore(ref cmd, new ReadOnlySpan<IoVec>(ref iov), NvmeFabrics.ConnectDataSize, true, s_connectDone, this, internalCommand: true, forceInCapsule: true);
        if (rc != 0)
        {
            Fail($"fabrics Connect could not be submitted ({rc})", NvmeTcpFes.None, 0);
        }
    }

    /// <summary>
    /// Submits a command moving <paramref name="dataLength"/> bytes of <paramref name="data"/> (host to controller when
    /// <paramref name="hostToController"/>); the SGL and the command id are filled in here. Returns 0 (the callback
    /// will run exactly once, from <see cref="Poll"/> or a failure), -ENOMEM (-12) when every slot is in use, -ENXIO
    /// (-6) when not connected, -EINVAL for a data description that does not fit.
    /// </summary>
    public int Submit(ref NvmeCommand cmd, ReadOnlySpan<IoVec> data, uint dataLength, bool hostToController, NvmeCompletionCallback cb, object? arg) =>
        SubmitCore(ref cmd, data, dataLength, hostToController, cb, arg, internalCommand: false, forceInCapsule: false);

    /// <summary>A read, write or compare of <paramref name="numBlocks"/> blocks at <paramref name="lba"/> of <paramref name="ns"/>.</summary>
    public int SubmitIo(byte opcode, NvmeNamespace ns, ulong lba, uint numBlocks, ReadOnlySpan<IoVec> iovs, uint cdw12Flags, NvmeCompletionCallback cb, object? arg)
    {
        if (numBlocks == 0 || numBlocks > 65536 || !ns.InRange(lba, numBlocks))
        {
            return -Errno.EINVAL;
        }

        ulong len = (ulong)numBlocks * ns.BlockSize;
        if (len > uint.MaxValue)
        {
            return -Errno.EINVAL;
        }

        var cmd = new NvmeCommand
        {
            Opcode = opcode,
            Nsid = ns.Id,
            Cdw10 = (uint)lba,
            Cdw11 = (uint)(lba >> 32),
            Cdw12 = (numBlocks - 1) | cdw12Flags,
        };
        return SubmitCore(ref cmd, iovs, (uint)len, opcode != NvmeIoOpcode.Read, cb, arg, false, false);
    }

    private int SubmitCore(ref NvmeCommand cmd, ReadOnlySpan<IoVec> data, uint dataLength, bool hostToController, NvmeCompletionCallback cb, object? arg, bool internalCommand, bool forceInCapsule)
    {
        if (_state != StateConnected && !(internalCommand && _state == StateFabricConnect))
        {
            return -Errno.ENXIO;
        }

        if (_freeCount == 0)
        {
            return -Errno.ENOMEM;
        }

        if (data.Length > MaxIovs || (dataLength > 0 && IoVecs.TotalLength(data) < dataLength))
        {
            return -Errno.EINVAL;
        }

        var t = _trackers[_freeCids[--_freeCount]];
        t.Active = true;
        t.Callback = cb;
        t.Arg = arg;
        t.SubmitTicks = Ticks.Now();
        t.TimeoutReported = false;
        t.Opcode = cmd.Opcode;
        data.CopyTo(t.Iovs);
        t.IovCount = data.Length;
        t.DataLength = dataLength;
        t.HostToController = hostToController;
        t.InCapsule = hostToController && dataLength > 0 && (forceInCapsule || dataLength <= (uint)InCapsuleDataSize);
        t.Transferred = 0;
        t.R2TActive = false;
        cmd.Cid = t.Cid;

        // Fabrics commands always use SGLs (PSDT 01b, which targets check): a null transport data block when no data.
        NvmeFabrics.SetSgl(ref cmd, dataLength, t.InCapsule);

        uint inCapsule = t.InCapsule ? dataLength : 0;
        t.TxHeaderLength = NvmeTcpPdu.WriteCapsuleCmd(t.TxHeader, in cmd, _hdgst, _ddgst, _cpda, (int)inCapsule);
        t.TxDataOffset = 0;
        t.TxDataLength = inCapsule;
        t.TxDigest = inCapsule > 0 && _ddgst ? DataCrc(t, 0, inCapsule) : 0;
        if (t.InCapsule)
        {
            t.Transferred = dataLength;
        }

        Enqueue(t);
        return 0;
    }

    private static uint DataCrc(Tracker t, uint offset, uint length)
    {
        uint crc = Crc32C.Initial;
        uint pos = 0;
        for (int i = 0; i < t.IovCount && length > 0; i++)
        {
            var v = t.Iovs[i];
            if (offset >= pos + v.Length)
            {
                pos += (uint)v.Length;
                continue;
            }

            nuint start = offset - pos;
            int n = (int)Math.Min(v.Length - start, length);
            crc = Crc32C.Update(crc, v.AsSpan(start, n));
            offset += (uint)n;
            length -= (uint)n;
            pos += (uint)v.Length;
        }

        return Crc32C.Finish(crc);
    }

    private void Enqueue(Tracker t)
    {
        t.TxSent = 0;
        t.Queued = true;
        _sendQueue[(_sendHead + _sendCount) % _sendQueue.Length] = t;
        _sendCount++;
    }

    /// <summary>Sends what is queued and processes what arrived. Returns the number of commands completed.</summary>
    public int Poll()
    {
        if (_state is StateIdle or StateFailed or StateTcpConnecting)
        {
            return 0;
        }

        _completed = 0;
        Flush();
        if (_state is not StateFailed)
        {
            Receive();
        }

        if (_state is not StateFailed && (_sendCount > 0 || _ctlLen > _ctlSent || !_txStage.IsEmpty))
        {
            Flush(); // R2Ts answered, or what the received PDUs queued
        }

        return _completed;
    }

    private int _completed;

    /// <summary>Sends until the socket would block. Returns false when the connection failed.</summary>
    private void Flush()
    {
        var s = _sock!;
        while (_ctlSent < _ctlLen)
        {
            int n = s.Send(_ctlTx.AsSpan(_ctlSent, _ctlLen - _ctlSent), SocketFlags.None, out var err);
            if (!Sent(n, err))
            {
                return;
            }

            _ctlSent += n;
        }

        while (_state is not StateFailed)
        {
            if (!_txStage.Drain(s, out var stageErr))
            {
                Sent(0, stageErr);
                return;
            }

            if (_sendCount == 0)
            {
                return;
            }

            StagePdus();
            if (!_txStage.IsEmpty || _sendCount == 0)
            {
                continue;
            }

            var t = _sendQueue[_sendHead];
            int dd = t.TxDataLength > 0 && _ddgst ? 4 : 0;
            long total = t.TxHeaderLength + t.TxDataLength + dd;
            while (t.TxSent < total)
            {
                int n;
                SocketError err;
                if (t.TxSent < t.TxHeaderLength)
                {
                    n = s.Send(t.TxHeader.AsSpan(t.TxSent, t.TxHeaderLength - t.TxSent), SocketFlags.None, out err);
                }
                else if (t.TxSent < t.TxHeaderLength + t.TxDataLength)
                {
                    uint off = t.TxDataOffset + (uint)(t.TxSent - t.TxHeaderLength);
                    uint left = t.TxDataLength - (uint)(t.TxSent - t.TxHeaderLength);
                    n = s.Send(Segment(t, off, left), SocketFlags.None, out err);
                }
                else
                {
                    n = _txStage.SendDigest(s, t.TxDigest, (int)(t.TxSent - t.TxHeaderLength - t.TxDataLength), out err);
                }

                if (!Sent(n, err))
                {
                    return;
                }

                t.TxSent += n;
            }

            Dequeued(t);
        }
    }

    /// <summary>The head PDU has gone out (or is staged): take it off the queue; an R2T's next piece is queued.</summary>
    private void Dequeued(Tracker t)
    {
        _sendHead = (_sendHead + 1) % _sendQueue.Length;
        _sendCount--;
        t.Queued = false;
        if (t.Active && t.R2TActive && t.TxDataOffset + t.TxDataLength < t.R2TEnd)
        {
            QueueH2C(t, t.TxDataOffset + t.TxDataLength); // the next piece of this R2T
        }
        else if (t.Active && t.R2TActive)
        {
            t.R2TActive = false;
        }
    }

    /// <summary>
    /// Copies whole queued PDUs (none started, data at most the stage's DataMax) into the send stage while they fit;
    /// each counts as sent once copied (the stage goes out before anything queued later). Stops at the first PDU that
    /// is larger or does not fit.
    /// </summary>
    private void StagePdus()
    {
        while (_sendCount > 0)
        {
            var t = _sendQueue[_sendHead];
            if (t.TxSent != 0 || !_txStage.CanStage(t.TxHeaderLength, t.TxDataLength, _ddgst))
            {
                return;
            }

            var dst = _txStage.Append(t.TxHeader.AsSpan(0, t.TxHeaderLength), t.TxDataLength, _ddgst, t.TxDigest);
            int pos = 0;
            uint off = t.TxDataOffset;
            uint left = t.TxDataLength;
            while (left > 0)
            {
                var seg = Segment(t, off, left);
                if (seg.IsEmpty)
                {
                    Fail("send: a command's data is shorter than its PDU (internal error)", NvmeTcpFes.None, 0);
                    return;
                }

                seg.CopyTo(dst[pos..]);
                pos += seg.Length;
                off += (uint)seg.Length;
                left -= (uint)seg.Length;
            }

            Dequeued(t);
        }
    }

    private bool Sent(int n, SocketError err)
    {
        if (err == SocketError.Success && n > 0)
        {
            return true;
        }

        if (err is SocketError.WouldBlock or SocketError.Interrupted)
        {
            return false;
        }

        Fail($"send: {err}", NvmeTcpFes.None, 0);
        return false;
    }

    /// <summary>The contiguous piece of the command's buffers at <paramref name="offset"/>, at most <paramref name="max"/> bytes.</summary>
    private static Span<byte> Segment(Tracker t, uint offset, uint max)
    {
        uint pos = 0;
        for (int i = 0; i < t.IovCount; i++)
        {
            var v = t.Iovs[i];
            if (offset < pos + v.Length)
            {
                nuint start = offset - pos;
                return v.AsSpan(start, (int)Math.Min(Math.Min(v.Length - start, max), int.MaxValue));
            }

            pos += (uint)v.Length;
        }

        return default; // not reached: lengths were checked at submit
    }

    private void QueueH2C(Tracker t, uint offset)
    {
        uint len = Math.Min(t.R2TEnd - offset, _maxH2CData);
        bool last = offset + len == t.R2TEnd;
        t.TxHeaderLength = NvmeTcpPdu.WriteH2CData(t.TxHeader, t.Cid, t.Ttag, offset, len, last, _hdgst, _ddgst, _cpda);
        t.TxDataOffset = offset;
        t.TxDataLength = len;
        t.TxDigest = _ddgst ? DataCrc(t, offset, len) : 0;
        Enqueue(t);
    }

    /// <summary>Fills <paramref name="dst"/> from the staging buffer and the socket. Returns bytes placed, or -1 when the connection failed.</summary>
    private int Read(Span<byte> dst)
    {
        int got = 0;
        while (got < dst.Length)
        {
            if (_stageStart < _stageEnd)
            {
                int n = Math.Min(_stageEnd - _stageStart, dst.Length - got);
                _staging.AsSpan(_stageStart, n).CopyTo(dst[got..]);
                _stageStart += n;
                got += n;
                continue;
            }

            // Large pieces go straight into the destination; small ones through the staging buffer (fewer calls).
            bool direct = dst.Length - got >= 4096;
            int r = direct
                ? _sock!.Receive(dst[got..], SocketFlags.None, out var err)
                : _sock!.Receive(_staging, SocketFlags.None, out err);
            if (err is SocketError.WouldBlock or SocketError.Interrupted)
            {
                return got;
            }

            if (err != SocketError.Success || r == 0)
            {
                Fail(r == 0 && err == SocketError.Success ? "connection closed by the controller" : $"receive: {err}", NvmeTcpFes.None, 0);
                return -1;
            }

            if (direct)
            {
                got += r;
            }
            else
            {
                _stageStart = 0;
                _stageEnd = r;
            }
        }

        return got;
    }

    private void Receive()
    {
        while (_state is not StateFailed and not StateIdle)
        {
            switch (_rxState)
            {
                case RxCommonHeader:
                {
                    int n = Read(_rxHdr.AsSpan(_rxHave, NvmeTcpPdu.CommonHeaderSize - _rxHave));
                    if (n <= 0)
                    {
                        return;
                    }

                    _rxHave += n;
                    if (_rxHave < NvmeTcpPdu.CommonHeaderSize)
                    {
                        return;
                    }

                    var fes = NvmeTcpPdu.ValidateHeader(_rxHdr, fromController: true, initialized: _state != StateIcWait, _hdgst, _ddgst, int.MaxValue, out _rxInfo, out int errOff);
                    if (fes != NvmeTcpFes.None)
                    {
                        ProtocolErrors++;
                        Fail($"invalid PDU header (type 0x{_rxHdr[0]:x2}, byte {errOff})", fes, (uint)errOff);
                        return;
                    }

                    _rxState = RxHeader;
                    break;
                }

                case RxHeader:
                {
                    // A termination request: read its error data too (its header has no digest).
                    int want = _rxInfo.Type == NvmeTcpPduType.C2HTermReq ? _rxInfo.Length : _rxInfo.HeaderBytes;
                    int n = Read(_rxHdr.AsSpan(_rxHave, want - _rxHave));
                    if (n < 0)
                    {
                        return;
                    }

                    _rxHave += n;
                    if (_rxHave < want)
                    {
                        return;
                    }

                    if (_hdgst && _rxInfo.Type is NvmeTcpPduType.CapsuleResp or NvmeTcpPduType.R2T or NvmeTcpPduType.C2HData
                        && !NvmeTcpPdu.CheckHeaderDigest(_rxHdr, _rxHdr[2]))
                    {
                        ProtocolErrors++;
                        Fail("header digest error", NvmeTcpFes.HeaderDigestError, 0);
                        return;
                    }

                    _rxHave = 0;
                    _rxState = RxCommonHeader;
                    OnHeader();
                    break;
                }

                case RxPad:
                {
                    int n = Read(_padSink.AsSpan(0, _rxDataLeft));
                    if (n < 0)
                    {
                        return;
                    }

                    _rxDataLeft -= n;
                    if (_rxDataLeft > 0)
                    {
                        return;
                    }

                    _rxDataLeft = _rxInfo.DataLength;
                    _rxState = RxData;
                    break;
                }

                case RxData:
                {
                    var t = _rxTracker!;
                    var dst = Segment(t, _rxDataOffset, (uint)_rxDataLeft);
                    int n = Read(dst);
                    if (n < 0)
                    {
                        return;
                    }

                    if (_ddgst)
                    {
                        _rxCrc = Crc32C.Update(_rxCrc, dst[..n]);
                    }

                    _rxDataOffset += (uint)n;
                    _rxDataLeft -= n;
                    if (n < dst.Length)
                    {
                        return;
                    }

                    if (_rxDataLeft == 0)
                    {
                        if (_ddgst)
                        {
                            _rxHave = 0;
                            _rxState = RxDataDigest;
                        }
                        else
                        {
                            _rxState = RxCommonHeader;
                            DataPduDone();
                        }
                    }

                    break;
                }

                case RxDataDigest:
                {
                    int n = Read(_rxDigest.AsSpan(_rxHave, 4 - _rxHave));
                    if (n < 0)
                    {
                        return;
                    }

                    _rxHave += n;
                    if (_rxHave < 4)
                    {
                        return;
                    }

                    _rxHave = 0;
                    _rxState = RxCommonHeader;
                    if (BinaryPrimitives.ReadUInt32LittleEndian(_rxDigest) != Crc32C.Finish(_rxCrc))
                    {
                        // A data digest error is the command's, not the connection's: fail it when it completes.
                        // NVMe/TCP lets the host choose; like Linux, treat it as a transport error of the connection.
                        ProtocolErrors++;
                        Fail("data digest error", NvmeTcpFes.None, 0);
                        return;
                    }

                    DataPduDone();
                    break;
                }
            }
        }
    }

    private void OnHeader()
    {
        var h = _rxHdr.AsSpan();
        switch (_rxInfo.Type)
        {
            case NvmeTcpPduType.IcResp:
                OnIcResp();
                return;
            case NvmeTcpPduType.C2HTermReq:
                ProtocolErrors++;
                Fail($"controller terminated the connection (C2HTermReq FES {(int)NvmeTcpPdu.TermFes(h)}, FEI {NvmeTcpPdu.TermFei(h)})", NvmeTcpFes.None, 0);
                return;
            case NvmeTcpPduType.CapsuleResp:
            {
                var cqe = MemoryMarshal.Read<NvmeCompletion>(h[NvmeTcpPdu.CommonHeaderSize..]);
                var t = ActiveTracker(cqe.Cid);
                if (t is null)
                {
                    Fail($"CapsuleResp for command {cqe.Cid}, which is not outstanding", NvmeTcpFes.InvalidHeaderField, 8 + 12);
                    return;
                }

                var status = new NvmeStatus((ushort)(cqe.StatusPhase >> 1));
                if (status.IsSuccess && !t.HostToController && t.Transferred != t.DataLength)
                {
                    Fail($"CapsuleResp success for command {cqe.Cid} after {t.Transferred} of {t.DataLength} bytes", NvmeTcpFes.PduSequenceError, 0);
                    return;
                }

                if (t.Queued)
                {
                    // Answered while its data is still being sent: a controller that does not wait for its own R2T data.
                    Fail($"CapsuleResp for command {cqe.Cid} while its data is being sent", NvmeTcpFes.PduSequenceError, 0);
                    return;
                }

                Complete(t, status, cqe.Dw0);
                return;
            }

            case NvmeTcpPduType.R2T:
            {
                ushort cid = NvmeTcpPdu.Cccid(h);
                uint off = NvmeTcpPdu.DataOffsetField(h);
                uint len = NvmeTcpPdu.DataLengthField(h);
                var t = ActiveTracker(cid);
                if (t is null || !t.HostToController || t.InCapsule || t.DataLength == 0)
                {
                    Fail($"R2T for command {cid}, which does not expect one", NvmeTcpFes.InvalidHeaderField, 8);
                    return;
                }

                if (t.R2TActive || t.Queued)
                {
                    Fail($"R2T for command {cid} beyond MAXR2T", NvmeTcpFes.DataTransferLimitExceeded, 8);
                    return;
                }

                if (len == 0 || off != t.Transferred || len > t.DataLength - off)
                {
                    Fail($"R2T for command {cid}: offset {off} length {len} outside {t.Transferred}..{t.DataLength}", NvmeTcpFes.DataTransferOutOfRange, 12);
                    return;
                }

                t.R2TActive = true;
                t.Ttag = NvmeTcpPdu.Ttag(h);
                t.R2TEnd = off + len;
                t.Transferred = off + len;
                QueueH2C(t, off);
                return;
            }

            case NvmeTcpPduType.C2HData:
            {
                ushort cid = NvmeTcpPdu.Cccid(h);
                uint off = NvmeTcpPdu.DataOffsetField(h);
                uint len = NvmeTcpPdu.DataLengthField(h);
                var t = ActiveTracker(cid);
                if (t is null || t.HostToController || t.DataLength == 0)
                {
                    Fail($"C2HData for command {cid}, which does not read", NvmeTcpFes.InvalidHeaderField, 8);
                    return;
                }

                if (t.Queued)
                {
                    // Data for a read whose capsule has not yet left: the controller cannot know the command.
                    Fail($"C2HData for command {cid} before its capsule was sent", NvmeTcpFes.PduSequenceError, 0);
                    return;
                }

                if (len != (uint)_rxInfo.DataLength)
                {
                    Fail($"C2HData DATAL {len} does not match PLEN", NvmeTcpFes.InvalidHeaderField, 16);
                    return;
                }

                if (off != t.Transferred || len > t.DataLength - off)
                {
                    Fail($"C2HData for command {cid}: offset {off} length {len} outside {t.Transferred}..{t.DataLength}", NvmeTcpFes.DataTransferOutOfRange, 12);
                    return;
                }

                if ((_rxInfo.Flags & NvmeTcpFlags.Success) != 0 && off + len != t.DataLength)
                {
                    Fail($"C2HData SUCCESS for command {cid} before its last byte", NvmeTcpFes.PduSequenceError, 1);
                    return;
                }

                _rxTracker = t;
                _rxDataOffset = off;
                _rxCrc = Crc32C.Initial;
                _rxDataLeft = _rxInfo.DataOffset - _rxInfo.HeaderBytes;
                _rxState = _rxDataLeft > 0 ? RxPad : RxData;
                if (_rxDataLeft == 0)
                {
                    _rxDataLeft = _rxInfo.DataLength;
                }

                return;
            }
        }
    }

    private void DataPduDone()
    {
        var t = _rxTracker!;
        _rxTracker = null;
        t.Transferred = _rxDataOffset;
        if ((_rxInfo.Flags & NvmeTcpFlags.Success) != 0)
        {
            Complete(t, NvmeStatus.Success, 0);
        }
    }

    private Tracker? ActiveTracker(ushort cid) => cid < _trackers.Length && _trackers[cid].Active ? _trackers[cid] : null;

    private void Complete(Tracker t, NvmeStatus status, uint dw0)
    {
        var cb = t.Callback!;
        var arg = t.Arg;
        t.Active = false;
        t.Callback = null;
        t.Arg = null;
        t.R2TActive = false;
        Array.Clear(t.Iovs, 0, t.IovCount);
        t.IovCount = 0;
        _freeCids[_freeCount++] = t.Cid;
        _completed++;
        cb(arg, status, dw0);
    }

    /// <summary>
    /// Calls <paramref name="cb"/> once for each command outstanding longer than <paramref name="timeoutTicks"/>
    /// (0 = none) that it was not called for yet; returns how many it called it for. The owner decides what to do
    /// (SPDK's action_on_timeout: nothing, Abort the command, or reset the controller).
    /// </summary>
    public int CheckTimeouts(long nowTicks, long timeoutTicks, NvmeTcpTimeoutCallback cb, object? context)
    {
        if (timeoutTicks <= 0 || _freeCount == _trackers.Length)
        {
            return 0;
        }

        int n = 0;
        foreach (var t in _trackers)
        {
            if (t.Active && !t.TimeoutReported && !IsAsyncEventRequest(t) && nowTicks - t.SubmitTicks > timeoutTicks)
            {
                t.TimeoutReported = true;
                n++;
                cb(context, this, t.Cid);
            }
        }

        return n;
    }

    /// <summary>An Asynchronous Event Request stays outstanding until an event: it never times out.</summary>
    private bool IsAsyncEventRequest(Tracker t) => Id == 0 && t.Opcode == NvmeAdminOpcode.AsyncEventRequest;

    /// <summary>How many outstanding commands are older than <paramref name="timeoutTicks"/> (0 = none).</summary>
    public int CountTimedOut(long nowTicks, long timeoutTicks)
    {
        if (timeoutTicks <= 0)
        {
            return 0;
        }

        int n = 0;
        foreach (var t in _trackers)
        {
            if (t.Active && !IsAsyncEventRequest(t) && nowTicks - t.SubmitTicks > timeoutTicks)
            {
                n++;
            }
        }

        return n;
    }

    /// <summary>Closes the connection (if open) and completes every outstanding command with <paramref name="status"/>.</summary>
    public void Close(NvmeStatus status)
    {
        var s = _sock;
        _sock = null;
        if (s is not null)
        {
            s.Dispose();
        }

        if (_state != StateFailed)
        {
            _state = StateIdle;
        }

        FailOutstanding(status);
    }

    /// <summary>Completes every outstanding command with <paramref name="status"/> (their data may not have moved).</summary>
    public int FailOutstanding(NvmeStatus status)
    {
        _sendCount = 0;
        _txStage.Clear();
        _sendHead = 0;
        _rxTracker = null;
        int n = 0;
        foreach (var t in _trackers)
        {
            if (t.Active)
            {
                t.Queued = false;
                Complete(t, status, 0);
                n++;
            }
        }

        return n;
    }

    /// <summary>
    /// Nothing written to the socket stops inside a PDU: the control PDU is out, the stage has not been partly sent
    /// and the PDU at the head of the queue has not been started (a non-empty stage that sent nothing, and whatever
    /// is queued behind it, start at a boundary).
    /// </summary>
    private bool AtPduBoundary => _ctlSent >= _ctlLen && !_txStage.PartlySent && (_sendCount == 0 || _sendQueue[_sendHead].TxSent == 0);

    /// <summary>For tests: what a protocol violation found in a received PDU does (<see cref="Fail"/>), at a moment the test chose.</summary>
    internal void FailForTest(string reason, NvmeTcpFes fes, uint fei) => Fail(reason, fes, fei);

    private void Fail(string reason, NvmeTcpFes fes, uint fei)
    {
        if (_state == StateFailed)
        {
            return;
        }

        LastError = reason;
        var s = _sock;
        if (s is not null && fes != NvmeTcpFes.None && AtPduBoundary)
        {
            // Best effort: tell the controller why (a non-blocking send that may not get through). Only between PDUs:
            // in the middle of one (part of the stage, an ICReq or a large PDU sent), its bytes would be read as that
            // PDU's; then the connection just closes.
            int n = NvmeTcpPdu.WriteTermReq(_ctlTx, fromHost: true, fes, fei, _rxHdr.AsSpan(0, Math.Clamp(Math.Max(_rxHave, _rxInfo.HeaderBytes), NvmeTcpPdu.CommonHeaderSize, NvmeTcpPdu.TermReqMaxErrorData)));
            s.Send(_ctlTx.AsSpan(0, n), SocketFlags.None, out _);
        }

        _state = StateFailed;
        _sock = null;
        s?.Dispose();
        _ctlLen = _ctlSent = 0;
        FailOutstanding(NvmeStatus.TransientTransportError);
    }

    private static int ToErrno(SocketError e) => e switch
    {
        SocketError.ConnectionRefused => Errno.ECONNREFUSED,
        SocketError.TimedOut => Errno.ETIMEDOUT,
        SocketError.AddressNotAvailable => Errno.EADDRNOTAVAIL,
        SocketError.AddressAlreadyInUse => Errno.EADDRINUSE,
        _ => Errno.EIO,
    };

    public void Dispose()
    {
        Close(NvmeStatus.AbortedSqDeletion);
        _state = StateIdle;
    }
}
