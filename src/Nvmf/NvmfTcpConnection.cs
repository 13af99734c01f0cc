using System.Buffers.Binary;
using System.Net;
using System.Net.Sockets;
using System.Runtime.CompilerServices;
using VhostBackend.Bdev;
using VhostBackend.Nvme;
using VhostBackend.Nvme.Tcp;
using VhostBackend.Platform;
using VhostBackend.Reactors;

namespace VhostBackend.Nvmf;

/// <summary>
/// One NVMe/TCP queue pair on the target side: a non-blocking socket polled by its poll group's reactor, the PDU
/// receive state machine (ICReq, CapsuleCmd with in-capsule data, H2CData answering our R2Ts, H2CTermReq), a preallocated
/// request per queue entry, and the send queue (ICResp, R2T, C2HData, CapsuleResp, C2HTermReq). Everything the host sends
/// is validated before use; a protocol violation sends a C2HTermReq and closes this connection only. Nothing is allocated
/// per command once each request's buffer has grown to the largest transfer it carried.
/// Before Connect a connection costs little: no requests until ICReq, then <see cref="PreConnectDepth"/> of them and no
/// data buffer or R2T for anything but a Connect; the queue is sized at Connect (SQSIZE + 1). A connection without ICReq
/// within <see cref="NvmfTarget.IcReqTimeout"/> or without Connect within <see cref="NvmfTarget.ConnectTimeout"/> is
/// closed. Data buffers are grown within the poll group's budget (<see cref="NvmfPollGroup.BufferLimit"/>); a request
/// that does not fit waits for memory instead.
/// </summary>
public sealed class NvmfTcpConnection
{
    private const int RxCommonHeader = 0;
    private const int RxHeader = 1;
    private const int RxPad = 2;
    private const int RxData = 3;
    private const int RxDataDigest = 4;
    private const int RxClosed = 5;

    private const uint MaxC2HChunk = 131072;

    /// <summary>Queue entries before Connect (the Connect itself and one more).</summary>
    public const int PreConnectDepth = 2;

    private const int WaitR2T = 1;
    private const int WaitIo = 2;

    private readonly NvmfTarget _target;
    private readonly NvmfTransportOptions _opts;
    private Socket? _sock;
    private NvmfRequest[] _requests = Array.Empty<NvmfRequest>();
    private ushort[] _free = Array.Empty<ushort>();
    private int _freeCount;
    private NvmfRequest[] _sendQueue = Array.Empty<NvmfRequest>();
    private int _sendHead;
    private int _sendCount;

    private readonly byte[] _ctlTx = new byte[NvmeTcpPdu.IcSize + NvmeTcpPdu.TermReqMaxErrorData + 32];

    // Send coalescing: whole small PDUs (responses, R2Ts, C2HData of at most 8 KiB) go out in one send from the stage,
    // instead of one send per header and per data part (at QD128 the target was bound by send syscalls: 2-3 per
    // read). Larger data is sent from the request's buffer, after what is staged.
    private readonly NvmeTcpSendStage _txStage = new();
    private int _ctlLen;
    private int _ctlSent;

    private readonly byte[] _staging = new byte[8192];
    private int _stageStart;
    private int _stageEnd;
    private readonly byte[] _rxHdr = new byte[NvmeTcpPdu.MaxHeaderBytes + NvmeTcpPdu.TermReqMaxErrorData];
    private int _rxHave;
    private int _rxHeaderLength;
    private int _rxState;
    private NvmeTcpPduInfo _rxInfo;
    private NvmfRequest? _rxReq;
    private uint _rxDataOffset;
    private int _rxDataLeft;
    private uint _rxCrc;
    private readonly byte[] _rxDigest = new byte[4];
    private readonly byte[] _padSink = new byte[NvmeTcpPdu.MaxHeaderBytes];

    private bool _initialized;
    private bool _hdgst;
    private bool _ddgst;
    private int _hpda;
    private bool _closing;
    private bool _finished;
    private int _inBdev;
    private ushort _sqHead;

    // Bdev channels per namespace slot (nsid - 1), taken on this reactor on first use.
    private BdevChannel?[] _channels = Array.Empty<BdevChannel?>();
    private NvmfNamespace?[] _channelNs = Array.Empty<NvmfNamespace?>();
    private int[] _channelInflight = Array.Empty<int>();
    private bool[] _channelReleasing = Array.Empty<bool>();

    internal NvmfTcpConnection(NvmfTarget target, Socket sock, NvmfListenAddress listener)
    {
        _target = target;
        _opts = target.TransportOptions!;
        _sock = sock;
        Listener = listener;
        PeerAddress = sock.RemoteEndPoint as IPEndPoint;
        LocalAddress = sock.LocalEndPoint as IPEndPoint;
        _acceptedAt = Ticks.Now();
        _icReqDeadline = Ticks.FromMicroseconds((long)target.IcReqTimeout.TotalMicroseconds);
        _connectDeadline = Ticks.FromMicroseconds((long)target.ConnectTimeout.TotalMicroseconds);
    }

    private readonly long _acceptedAt;
    private readonly long _icReqDeadline;
    private readonly long _connectDeadline;

    internal NvmfTarget Target => _target;

    /// <summary>The listener's count of open connections (decremented once, when this one closes).</summary>
    internal StrongBox<int>? ListenerConnections { get; set; }

    /// <summary>TEST HOOK: called at the start of every Poll when set (fault injection by the unit tests).</summary>
    internal Action<NvmfTcpConnection>? TestPollHook { get; set; }

    /// <summary>Makes room for <paramref name="depth"/> requests (ICReq: the pre-Connect few; Connect: SQSIZE + 1).</summary>
    private void GrowRequests(int depth)
    {
        int old = _requests.Length;
        if (depth <= old)
        {
            return;
        }

        var reqs = new NvmfRequest[depth];
        Array.Copy(_requests, reqs, old);
        for (int i = old; i < depth; i++)
        {
            reqs[i] = new NvmfRequest(this, (ushort)i);
        }

        var free = new ushort[depth];
        Array.Copy(_free, free, _freeCount);
        for (int i = depth - 1; i >= old; i--)
        {
            free[_freeCount++] = (ushort)i; // the lowest index is taken first
        }

        var sq = new NvmfRequest[depth + 1];
        for (int i = 0; i < _sendCount; i++)
        {
            sq[i] = _sendQueue[(_sendHead + i) % _sendQueue.Length];
        }

        _sendHead = 0;
        _requests = reqs;
        _free = free;
        _sendQueue = sq;
    }

    /// <summary>Requests allocated for this queue (tests: lazy allocation).</summary>
    internal int AllocatedRequests => _requests.Length;

    public NvmfListenAddress Listener { get; }
    public IPEndPoint? PeerAddress { get; }
    public IPEndPoint? LocalAddress { get; }
    internal NvmfPollGroup? Group { get; set; }
    internal Reactor? Reactor => Group?.Reactor;

    /// <summary>The controller this queue pair belongs to (after Connect).</summary>
    internal NvmfController? Controller { get; private set; }
    public ushort Qid { get; private set; }

    /// <summary>Entries of the queue (Connect SQSIZE + 1); commands beyond it close the connection.</summary>
    public int QueueDepth { get; private set; }
    public bool HeaderDigest => _hdgst;
    public bool DataDigest => _ddgst;
    public bool IsClosed => _closing;
    internal bool SqFlowDisabled { get; private set; }
    public string? CloseReason { get; private set; }
    internal long CompletedIo;

    private int Outstanding => _requests.Length - _freeCount;

    /// <summary>Polls: sends what is queued, receives and handles what arrived. Returns work done.</summary>
    internal int Poll()
    {
        if (_closing)
        {
            return 0;
        }

        TestPollHook?.Invoke(this);
        if (Controller is null && PreConnectTimedOut())
        {
            return 1;
        }

        int before = _sendCount;
        Flush();
        if (!_closing)
        {
            Receive();
        }

        if (!_closing && (_sendCount > 0 || _ctlLen > _ctlSent || !_txStage.IsEmpty))
        {
            Flush();
        }

        Controller?.PollAdmin(this);
        return _closing || _sendCount != before || _rxWork ? 1 : 0;
    }

    private bool _rxWork;

    private bool PreConnectTimedOut()
    {
        long age = Ticks.Now() - _acceptedAt;
        if (!_initialized && age > _icReqDeadline)
        {
            Close($"no ICReq within {_target.IcReqTimeout.TotalSeconds:0.#} s", log: true);
            return true;
        }

        if (age > _connectDeadline)
        {
            Close($"no Connect within {_target.ConnectTimeout.TotalSeconds:0.#} s", log: true);
            return true;
        }

        return false;
    }

    // ---------------------------------------------------------------- receive

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
                Close(r == 0 && err == SocketError.Success ? "connection closed by the host" : $"receive: {err}", log: false);
                return -1;
            }

            _rxWork = true;
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

    private int MaxCapsuleData => Controller is null || Qid == 0 ? Math.Max((int)_opts.InCapsuleDataSize, NvmfTransportOptions.AdminInCapsuleDataSize) : (int)_opts.InCapsuleDataSize;

    /// <summary>PDUs handled per poll at most: one busy connection cannot starve the others of its poll group.</summary>
    private const int MaxPdusPerPoll = 64;

    private void Receive()
    {
        _rxWork = false;
        int pdus = 0;
        while (!_closing)
        {
            switch (_rxState)
            {
                case RxCommonHeader:
                {
                    if (_rxHave == 0 && ++pdus > MaxPdusPerPoll)
                    {
                        _rxWork = true;
                        return;
                    }

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

                    int maxData = _rxHdr[0] == NvmeTcpPduType.H2CData ? (int)_opts.MaxIoSize : Math.Max(MaxCapsuleData, NvmfTransportOptions.AdminInCapsuleDataSize);
                    var fes = NvmeTcpPdu.ValidateHeader(_rxHdr, fromController: false, _initialized, _hdgst, _ddgst, maxData, out _rxInfo, out int errOff);
                    if (fes != NvmeTcpFes.None)
                    {
                        Fatal($"invalid PDU header (type 0x{_rxHdr[0]:x2}, byte {errOff}, {fes})", fes, (uint)errOff);
                        return;
                    }

                    _rxState = RxHeader;
                    break;
                }

                case RxHeader:
                {
                    int want = _rxInfo.Type == NvmeTcpPduType.H2CTermReq ? _rxInfo.Length : _rxInfo.HeaderBytes;
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

                    if (_hdgst && _rxInfo.Type is NvmeTcpPduType.CapsuleCmd or NvmeTcpPduType.H2CData
                        && !NvmeTcpPdu.CheckHeaderDigest(_rxHdr, _rxHdr[2]))
                    {
                        Fatal("header digest error", NvmeTcpFes.HeaderDigestError, 0);
                        return;
                    }

                    _rxHeaderLength = want;
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
                    var req = _rxReq!;
                    var dst = req.Span(_rxDataOffset, (uint)_rxDataLeft);
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
                    if (_rxDataLeft > 0)
                    {
                        return;
                    }

                    if (_ddgst)
                    {
                        _rxHave = 0;
                        _rxState = RxDataDigest;
                    }
                    else
                    {
                        _rxState = RxCommonHeader;
                        DataPduDone(req);
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
                    var req = _rxReq!;
                    if (BinaryPrimitives.ReadUInt32LittleEndian(_rxDigest) != Crc32C.Finish(_rxCrc))
                    {
                        // The command's data is bad, not the stream: the command fails with a transient transport error.
                        req.DigestError = true;
                        _target.LogBadHost(this, "data digest error");
                    }

                    DataPduDone(req);
                    break;
                }

                default:
                    return;
            }
        }
    }

    private void OnHeader()
    {
        var h = _rxHdr.AsSpan();
        switch (_rxInfo.Type)
        {
            case NvmeTcpPduType.IcReq:
                OnIcReq();
                return;
            case NvmeTcpPduType.H2CTermReq:
                Close($"host terminated the connection (H2CTermReq FES {(int)NvmeTcpPdu.TermFes(h)})", log: true);
                return;
            case NvmeTcpPduType.CapsuleCmd:
                OnCapsule();
                return;
            case NvmeTcpPduType.H2CData:
                OnH2CData();
                return;
        }
    }

    private void OnIcReq()
    {
        var h = _rxHdr.AsSpan(0, NvmeTcpPdu.IcSize);
        if (NvmeTcpPdu.Pfv(h) != 0)
        {
            Fatal("ICReq: unsupported PDU format version", NvmeTcpFes.InvalidHeaderField, 8);
            return;
        }

        int hpda = NvmeTcpPdu.IcPda(h);
        if (hpda > NvmeTcpPdu.MaxPda)
        {
            Fatal("ICReq: HPDA out of range", NvmeTcpFes.InvalidHeaderField, 10);
            return;
        }

        byte dg = NvmeTcpPdu.IcDigests(h);
        _hdgst = (dg & 1) != 0;
        _ddgst = (dg & 2) != 0;
        _hpda = hpda;
        _initialized = true;
        GrowRequests(PreConnectDepth);
        QueueDepth = PreConnectDepth;

        // CPDA 0: our PDUs' data starts right after the header; MAXH2CDATA: max_io_size, as SPDK.
        _ctlLen = NvmeTcpPdu.WriteIcResp(_ctlTx, 0, _hdgst, _ddgst, _opts.MaxIoSize);
        _ctlSent = 0;
    }

    private void OnCapsule()
    {
        var cmd = NvmeTcpPdu.CapsuleCommand(_rxHdr);
        int limit = Controller is null || Qid == 0 ? Math.Max(MaxCapsuleData, NvmfTransportOptions.AdminInCapsuleDataSize) : MaxCapsuleData;
        if (Controller is null && cmd.Opcode == NvmeFabrics.Opcode && (cmd.Cdw10 >> 16) != 0)
        {
            limit = Math.Max((int)_opts.InCapsuleDataSize, NvmeFabrics.ConnectDataSize); // an I/O queue's Connect
        }

        if (_rxInfo.DataLength > limit)
        {
            Fatal($"capsule with {_rxInfo.DataLength} bytes of in-capsule data (at most {limit})", NvmeTcpFes.DataTransferLimitExceeded, 4);
            return;
        }

        if (_freeCount == 0 || Outstanding >= QueueDepth)
        {
            Fatal($"submission queue overflow ({QueueDepth} entries)", NvmeTcpFes.InvalidHeaderField, 0);
            return;
        }

        var req = _requests[_free[--_freeCount]];
        if (req.Idle)
        {
            Group!.RemoveIdle(req); // its buffer is in use again
        }

        req.Active = true;
        req.Cmd = cmd;
        req.Status = 0;
        req.Dw0 = 0;
        req.Dw1 = 0;
        req.DataLength = 0;
        req.C2HLength = 0;
        req.HostToController = false;
        req.InCapsule = _rxInfo.DataLength > 0;
        req.InCapsuleLength = (uint)_rxInfo.DataLength;
        req.Received = 0;
        req.AwaitingH2C = false;
        req.DigestError = false;
        req.InBdev = false;
        req.Ns = null;
        req.TxKind = NvmfRequest.TxNone;
        _sqHead = (ushort)(_sqHead + 1 >= QueueDepth ? 0 : _sqHead + 1);
        req.BufferWait = 0;
        if (_rxInfo.DataLength > 0)
        {
            // In-capsule data is already on its way: its buffer is taken even past the budget (at most the queue's
            // in-capsule limit per request; idle buffers are given back first).
            ForceBuffer(req, (uint)_rxInfo.DataLength);
            BeginData(req, 0);
            return;
        }

        Execute(req);
    }

    private void BeginData(NvmfRequest req, uint offset)
    {
        _rxReq = req;
        _rxDataOffset = offset;
        _rxCrc = Crc32C.Initial;
        int pad = _rxInfo.DataOffset - _rxInfo.HeaderBytes;
        if (pad > 0)
        {
            _rxDataLeft = pad;
            _rxState = RxPad;
        }
        else
        {
            _rxDataLeft = _rxInfo.DataLength;
            _rxState = RxData;
        }
    }

    private void OnH2CData()
    {
        var h = _rxHdr.AsSpan();
        ushort cccid = NvmeTcpPdu.Cccid(h);
        ushort ttag = NvmeTcpPdu.Ttag(h);
        uint off = NvmeTcpPdu.DataOffsetField(h);
        uint len = NvmeTcpPdu.DataLengthField(h);
        var req = ttag < _requests.Length ? _requests[ttag] : null;
        if (req is null || !req.Active || !req.AwaitingH2C || req.Cmd.Cid != cccid)
        {
            Fatal($"H2CData for command {cccid} (ttag {ttag}), which awaits no data", NvmeTcpFes.InvalidHeaderField, 8);
            return;
        }

        if (req.Queued)
        {
            Fatal($"H2CData for command {cccid} before its R2T was sent", NvmeTcpFes.PduSequenceError, 0);
            return;
        }

        if (len != (uint)_rxInfo.DataLength)
        {
            Fatal($"H2CData DATAL {len} does not match PLEN", NvmeTcpFes.InvalidHeaderField, 16);
            return;
        }

        if (off != req.Received || off < req.R2TOffset || len > req.R2TEnd - off)
        {
            Fatal($"H2CData for command {cccid}: offset {off} length {len} outside {req.Received}..{req.R2TEnd}", NvmeTcpFes.DataTransferOutOfRange, 12);
            return;
        }

        if (len > _opts.MaxIoSize)
        {
            Fatal($"H2CData of {len} bytes exceeds MAXH2CDATA", NvmeTcpFes.DataTransferLimitExceeded, 16);
            return;
        }

        bool last = (_rxInfo.Flags & NvmeTcpFlags.LastPdu) != 0;
        if (last != (off + len == req.R2TEnd))
        {
            Fatal($"H2CData LAST_PDU flag does not match the end of the R2T for command {cccid}", NvmeTcpFes.InvalidHeaderField, 1);
            return;
        }

        BeginData(req, off);
    }

    private void DataPduDone(NvmfRequest req)
    {
        _rxReq = null;
        if (_closing || !req.Active)
        {
            return;
        }

        if (req.InCapsule && !req.AwaitingH2C)
        {
            Execute(req);
            return;
        }

        req.Received = _rxDataOffset;
        if (req.Received < req.R2TEnd)
        {
            return;
        }

        req.AwaitingH2C = false;
        if (req.Received < req.DataLength)
        {
            SendR2T(req);
            return;
        }

        if (req.DigestError)
        {
            Complete(req, NvmeStatus.TransientTransportError.Field);
            return;
        }

        Dispatch(req);
    }

    // ---------------------------------------------------------------- command execution

    /// <summary>Checks the SGL and the data direction; starts R2Ts for host data not in the capsule; then dispatches.</summary>
    private void Execute(NvmfRequest req)
    {
        if (req.DigestError)
        {
            Complete(req, NvmeStatus.TransientTransportError.Field);
            return;
        }

        ref var cmd = ref req.Cmd;
        int fctype = NvmeFabrics.FctypeOf(in cmd);
        if (Controller is null && fctype != NvmeFabrics.FctypeConnect)
        {
            // Nothing but a Connect gets a buffer or an R2T on a queue that is not connected.
            _target.LogBadHost(this, fctype >= 0 ? $"fabrics command 0x{fctype:x2} before Connect" : $"command 0x{cmd.Opcode:x2} before Connect");
            Complete(req, NvmeStatus.Make(NvmeSct.Generic, NvmeSc.CommandSequenceError, dnr: true).Field);
            return;
        }

        int xfer = fctype >= 0 ? (fctype & 3) : (cmd.Opcode & 3); // 1: host to controller, 2: controller to host
        if (xfer == 3)
        {
            Complete(req, NvmeStatus.Make(NvmeSct.Generic, NvmeSc.InvalidOpcode, dnr: true).Field);
            return;
        }

        var (addr, length, type) = NvmeFabrics.Sgl(in cmd);
        if (xfer == 0 || length == 0)
        {
            if (req.InCapsule)
            {
                Complete(req, NvmeStatus.Make(NvmeSct.Generic, NvmeSc.InvalidField, dnr: true).Field);
                return;
            }

            req.DataLength = 0;
            Dispatch(req);
            return;
        }

        if ((cmd.Flags & 0xC0) != NvmeFabrics.PsdtSgl)
        {
            Complete(req, NvmeStatus.Make(NvmeSct.Generic, NvmeSc.InvalidField, dnr: true).Field);
            return;
        }

        if (fctype == NvmeFabrics.FctypeConnect && length != NvmeFabrics.ConnectDataSize)
        {
            _target.LogBadHost(this, $"Connect with {length} bytes of data (must be {NvmeFabrics.ConnectDataSize})");
            Complete(req, NvmeStatus.Make(NvmeSct.Generic, NvmeSc.DataSglLengthInvalid, dnr: true).Field);
            return;
        }

        req.HostToController = xfer == 1;
        if (type == NvmeFabrics.SglInCapsule)
        {
            if (!req.HostToController || !req.InCapsule)
            {
                Complete(req, NvmeStatus.Make(NvmeSct.Generic, NvmeSc.SglDescriptorTypeInvalid, dnr: true).Field);
                return;
            }

            // SGLS bit 20: the data may start at an offset into the capsule's data.
            if (addr > req.InCapsuleLength)
            {
                Complete(req, NvmeStatus.Make(NvmeSct.Generic, NvmeSc.SglOffsetInvalid, dnr: true).Field);
                return;
            }

            if (length > req.InCapsuleLength - addr)
            {
                Complete(req, NvmeStatus.Make(NvmeSct.Generic, NvmeSc.DataSglLengthInvalid, dnr: true).Field);
                return;
            }

            if (addr != 0)
            {
                req.Span((uint)addr, length).CopyTo(req.Span(0, length)); // overlapping: a memmove
            }

            req.DataLength = length;
            req.Received = length;
            Dispatch(req);
            return;
        }

        if (type != NvmeFabrics.SglTransport || req.InCapsule)
        {
            Complete(req, NvmeStatus.Make(NvmeSct.Generic, NvmeSc.SglDescriptorTypeInvalid, dnr: true).Field);
            return;
        }

        if (length > _opts.MaxIoSize)
        {
            Complete(req, NvmeStatus.Make(NvmeSct.Generic, NvmeSc.DataSglLengthInvalid, dnr: true).Field);
            return;
        }

        req.DataLength = length;
        if (!req.HostToController)
        {
            Dispatch(req);
            return;
        }

        req.Received = 0;
        req.R2TEnd = 0;
        if (!TryBuffer(req, length, keep: false))
        {
            Park(req, WaitR2T, length, keep: false);
            return;
        }

        SendR2T(req);
    }

    // ---------------------------------------------------------------- data buffer budget

    /// <summary>
    /// Grows the buffer of <paramref name="req"/> to <paramref name="bytes"/> within the poll group's budget (idle
    /// buffers of the group are given back first); false when it does not fit (the caller parks the request).
    /// </summary>
    private bool TryBuffer(NvmfRequest req, uint bytes, bool keep, bool resuming = false)
    {
        nuint have = req.BufferSize;
        if (have >= bytes)
        {
            return true;
        }

        nuint size = NvmfRequest.SizeFor(bytes);
        long need = (long)(size - have);
        var g = Group!;
        if (g.BufferBytes + need > g.BufferLimit)
        {
            if (!resuming && g.HasBufferWaiters)
            {
                return false; // others wait already: first come, first served
            }

            g.Reclaim(need);
            if (g.BufferBytes + need > g.BufferLimit)
            {
                return false;
            }
        }

        req.Grow(size, keep);
        g.BufferBytes += need;
        return true;
    }

    /// <summary>A buffer that cannot wait (in-capsule data arriving, an admin answer): taken even past the budget.</summary>
    internal void ForceBuffer(NvmfRequest req, uint bytes)
    {
        nuint have = req.BufferSize;
        if (have >= bytes)
        {
            return;
        }

        nuint size = NvmfRequest.SizeFor(bytes);
        long need = (long)(size - have);
        var g = Group!;
        if (g.BufferBytes + need > g.BufferLimit)
        {
            g.Reclaim(need);
        }

        req.Grow(size, keep: false);
        g.BufferBytes += need;
    }

    private void Park(NvmfRequest req, int kind, uint bytes, bool keep)
    {
        req.BufferWait = kind;
        req.WaitBytes = bytes;
        req.WaitKeep = keep;
        Group!.WaitForBuffer(req);
    }

    /// <summary>The poll group retries a parked request: false when its buffer still does not fit.</summary>
    internal bool ResumeBufferWait(NvmfRequest req)
    {
        if (!TryBuffer(req, req.WaitBytes, req.WaitKeep, resuming: true))
        {
            return false;
        }

        int kind = req.BufferWait;
        req.BufferWait = 0;
        if (kind == WaitR2T)
        {
            SendR2T(req);
        }
        else if (Controller is { } ctrl)
        {
            ExecuteIo(ctrl, req);
        }
        else
        {
            Complete(req, NvmeStatus.Make(NvmeSct.Generic, NvmeSc.CommandSequenceError, dnr: true).Field);
        }

        return true;
    }

    internal void DropBuffer(NvmfRequest req)
    {
        if (req.Idle)
        {
            Group!.RemoveIdle(req);
        }

        if (req.Buffer is { } b)
        {
            Group!.BufferBytes -= (long)b.Size;
            b.Dispose();
            req.Buffer = null;
        }
    }

    private void SendR2T(NvmfRequest req)
    {
        uint off = req.R2TEnd;
        uint len = Math.Min(req.DataLength - off, _opts.MaxIoSize);
        req.R2TOffset = off;
        req.R2TEnd = off + len;
        req.AwaitingH2C = true;
        req.TxKind = NvmfRequest.TxR2T;
        req.TxHeaderLength = NvmeTcpPdu.WriteR2T(req.TxHeader, req.Cmd.Cid, req.Index, off, len, _hdgst);
        req.TxDataLength = 0;
        Enqueue(req);
    }

    private void Dispatch(NvmfRequest req)
    {
        if (NvmeFabrics.FctypeOf(in req.Cmd) >= 0)
        {
            _target.HandleFabrics(this, req);
            return;
        }

        var ctrl = Controller;
        if (ctrl is null)
        {
            _target.LogBadHost(this, $"command 0x{req.Cmd.Opcode:x2} before Connect");
            Complete(req, NvmeStatus.Make(NvmeSct.Generic, NvmeSc.CommandSequenceError, dnr: true).Field);
            return;
        }

        if (!ctrl.IsEnabled)
        {
            Complete(req, NvmeStatus.Make(NvmeSct.Generic, NvmeSc.CommandSequenceError, dnr: true).Field);
            return;
        }

        if (Qid == 0)
        {
            ctrl.HandleAdmin(this, req);
            return;
        }

        ExecuteIo(ctrl, req);
    }

    /// <summary>Makes this connection a queue of <paramref name="ctrl"/> (Connect succeeded).</summary>
    internal void Attach(NvmfController ctrl, ushort qid, int entries, bool sqFlowDisabled)
    {
        Controller = ctrl;
        Qid = qid;
        GrowRequests(entries);
        QueueDepth = entries;
        SqFlowDisabled = sqFlowDisabled;
    }

    internal ushort SqHead => _sqHead;

    // ---------------------------------------------------------------- I/O commands

    private static readonly BdevIoCompletion s_ioDone = static (io, success, arg) =>
    {
        var req = (NvmfRequest)arg!;
        var c = req.Conn;
        ushort status = success ? (ushort)0
            : io.Status == BdevIoStatus.Miscompare ? NvmeStatus.Make(NvmeSct.MediaError, NvmeSc.CompareFailure).Field
            : io.NvmeStatus != 0 ? (ushort)(io.NvmeStatus & 0x7FF)
            : NvmeStatus.Make(NvmeSct.Generic, NvmeSc.InternalDeviceError).Field;
        c.BdevDone(req, status);
    };

    private void ExecuteIo(NvmfController ctrl, NvmfRequest req)
    {
        ref var cmd = ref req.Cmd;
        var nss = ctrl.Subsystem.NamespaceSnapshot;
        uint nsid = cmd.Nsid;
        var ns = nsid >= 1 && nsid <= nss.Length ? nss[nsid - 1] : null;
        if (ns is null || ns.Removed)
        {
            Complete(req, NvmeStatus.Make(NvmeSct.Generic, NvmeSc.InvalidNamespace, dnr: true).Field);
            return;
        }

        var bdev = ns.Bdev;
        ulong slba = cmd.Cdw10 | ((ulong)cmd.Cdw11 << 32);
        ulong nlb = (cmd.Cdw12 & 0xFFFF) + 1UL;
        switch (cmd.Opcode)
        {
            case NvmeIoOpcode.Read:
            case NvmeIoOpcode.Write:
            case NvmeIoOpcode.Compare:
            {
                if (slba > bdev.BlockCount || nlb > bdev.BlockCount - slba)
                {
                    Complete(req, NvmeStatus.Make(NvmeSct.Generic, NvmeSc.LbaOutOfRange, dnr: true).Field);
                    return;
                }

                ulong bytes = nlb * bdev.BlockSize;
                if (bytes > req.DataLength)
                {
                    Complete(req, NvmeStatus.Make(NvmeSct.Generic, NvmeSc.DataSglLengthInvalid, dnr: true).Field);
                    return;
                }

                req.DataLength = (uint)bytes;
                req.Lba = slba;
                req.Blocks = nlb;
                if (cmd.Opcode == NvmeIoOpcode.Read)
                {
                    if (!TryBuffer(req, (uint)bytes, keep: false))
                    {
                        Park(req, WaitIo, (uint)bytes, keep: false);
                        return;
                    }

                    req.C2HLength = (uint)bytes;
                }
                else if (cmd.Opcode == NvmeIoOpcode.Compare && !bdev.SupportsIoType(BdevIoType.Compare))
                {
                    // Emulated: read into the second half, then compare. The host's data in the first half is kept
                    // when the buffer grows; once grown, the buffer is reused (no allocation per compare).
                    if (!TryBuffer(req, (uint)bytes * 2, keep: true))
                    {
                        Park(req, WaitIo, (uint)bytes * 2, keep: true);
                        return;
                    }

                    req.Step = 1;
                }
                else
                {
                    req.Step = 0;
                }

                break;
            }

            case NvmeIoOpcode.Flush:
                req.Lba = 0;
                req.Blocks = bdev.BlockCount;
                if (!bdev.SupportsIoType(BdevIoType.Flush))
                {
                    Complete(req, 0);
                    return;
                }

                break;
            case NvmeIoOpcode.WriteZeroes:
                if (slba > bdev.BlockCount || nlb > bdev.BlockCount - slba)
                {
                    Complete(req, NvmeStatus.Make(NvmeSct.Generic, NvmeSc.LbaOutOfRange, dnr: true).Field);
                    return;
                }

                req.Lba = slba;
                req.Blocks = nlb;
                req.Step = bdev.SupportsIoType(BdevIoType.WriteZeroes) ? 0 : 1;
                if (req.Step == 1)
                {
                    uint chunkBytes = (uint)(Math.Min(nlb, Math.Max(1, _opts.MaxIoSize / bdev.BlockSize)) * bdev.BlockSize);
                    if (!TryBuffer(req, chunkBytes, keep: false))
                    {
                        Park(req, WaitIo, chunkBytes, keep: false);
                        return;
                    }
                }

                break;
            case NvmeIoOpcode.DatasetManagement:
            {
                int nr = (int)(cmd.Cdw10 & 0xFF) + 1;
                if ((cmd.Cdw11 & 4) == 0 || !bdev.SupportsIoType(BdevIoType.Unmap))
                {
                    Complete(req, 0); // only deallocate does anything; the attributes are hints
                    return;
                }

                if ((uint)nr * 16 > req.DataLength)
                {
                    Complete(req, NvmeStatus.Make(NvmeSct.Generic, NvmeSc.DataSglLengthInvalid, dnr: true).Field);
                    return;
                }

                for (int i = 0; i < nr; i++)
                {
                    var r = req.Span((uint)(i * 16), 16);
                    ulong lba = BinaryPrimitives.ReadUInt64LittleEndian(r[8..]);
                    uint n = BinaryPrimitives.ReadUInt32LittleEndian(r[4..]);
                    if (lba > bdev.BlockCount || n > bdev.BlockCount - lba)
                    {
                        Complete(req, NvmeStatus.Make(NvmeSct.Generic, NvmeSc.LbaOutOfRange, dnr: true).Field);
                        return;
                    }
                }

                req.Step = 0;
                req.Steps = nr;
                break;
            }

            default:
                Complete(req, NvmeStatus.Make(NvmeSct.Generic, NvmeSc.InvalidOpcode, dnr: true).Field);
                return;
        }

        int slot = (int)nsid - 1;
        var ch = Channel(slot, ns);
        if (ch is null)
        {
            Complete(req, NvmeStatus.Make(NvmeSct.Generic, NvmeSc.InvalidNamespace, dnr: true).Field);
            return;
        }

        req.Ns = ns;
        req.NsSlot = slot;
        req.InBdev = true;
        _inBdev++;
        _channelInflight[slot]++;
        Submit(req);
    }

    private BdevChannel? Channel(int slot, NvmfNamespace ns)
    {
        if (slot >= _channels.Length)
        {
            int n = Math.Max(slot + 1, _channels.Length * 2);
            Array.Resize(ref _channels, n);
            Array.Resize(ref _channelNs, n);
            Array.Resize(ref _channelInflight, n);
            Array.Resize(ref _channelReleasing, n);
        }

        if (_channelNs[slot] == ns)
        {
            return _channels[slot];
        }

        if (_channelNs[slot] is not null || _channelReleasing[slot])
        {
            return null; // the old namespace of this slot is still draining here
        }

        try
        {
            _channels[slot] = ns.Desc.GetIoChannel();
        }
        catch (Exception e) when (e is InvalidOperationException or ObjectDisposedException)
        {
            return null;
        }

        _channelNs[slot] = ns;
        Interlocked.Increment(ref ns.PendingReleases);
        return _channels[slot];
    }

    /// <summary>Gives back the channel of <paramref name="ns"/> (namespace removed), now or after its in-flight I/O.</summary>
    internal void ReleaseNamespace(NvmfNamespace ns)
    {
        int slot = (int)ns.Nsid - 1;
        if (slot >= _channelNs.Length || _channelNs[slot] != ns)
        {
            return;
        }

        if (_channelInflight[slot] > 0)
        {
            _channelReleasing[slot] = true;
            return;
        }

        ReleaseSlot(slot);
    }

    private void ReleaseSlot(int slot)
    {
        var ns = _channelNs[slot]!;
        BdevDesc.PutIoChannel(_channels[slot]!);
        _channels[slot] = null;
        _channelNs[slot] = null;
        _channelReleasing[slot] = false;
        ns.ChannelReleased();
    }

    internal void Resubmit(NvmfRequest req) => Submit(req);

    private void Submit(NvmfRequest req)
    {
        var ns = req.Ns!;
        var ch = _channels[req.NsSlot]!;
        var desc = ns.Desc;
        int rc;
        switch (req.Cmd.Opcode)
        {
            case NvmeIoOpcode.Read:
            {
                var v = req.IoVec(0, req.DataLength);
                rc = ch.Read(desc, new ReadOnlySpan<IoVec>(ref v), req.Lba, req.Blocks, s_ioDone, req);
                break;
            }

            case NvmeIoOpcode.Write:
            {
                var v = req.IoVec(0, req.DataLength);
                rc = ch.Write(desc, new ReadOnlySpan<IoVec>(ref v), req.Lba, req.Blocks, s_ioDone, req);
                break;
            }

            case NvmeIoOpcode.Compare:
                if (req.Step == 0)
                {
                    var v = req.IoVec(0, req.DataLength);
                    rc = ch.Compare(desc, new ReadOnlySpan<IoVec>(ref v), req.Lba, req.Blocks, s_ioDone, req);
                }
                else
                {
                    var v = req.IoVec(req.DataLength, req.DataLength);
                    rc = ch.Read(desc, new ReadOnlySpan<IoVec>(ref v), req.Lba, req.Blocks, s_ioDone, req);
                }

                break;
            case NvmeIoOpcode.Flush:
                rc = ch.Flush(desc, req.Lba, req.Blocks, s_ioDone, req);
                break;
            case NvmeIoOpcode.WriteZeroes:
                if (req.Step == 0)
                {
                    rc = ch.WriteZeroes(desc, req.Lba, req.Blocks, s_ioDone, req);
                }
                else
                {
                    // Emulated: zeroed chunks of at most max_io_size, one after the other.
                    uint bs = ns.Bdev.BlockSize;
                    ulong chunk = Math.Min(req.Blocks, Math.Max(1, _opts.MaxIoSize / bs)); // the buffer was sized in ExecuteIo
                    req.Span(0, (uint)(chunk * bs)).Clear();
                    var v = req.IoVec(0, (uint)(chunk * bs));
                    req.Steps = (int)chunk;
                    rc = ch.Write(desc, new ReadOnlySpan<IoVec>(ref v), req.Lba, chunk, s_ioDone, req);
                }

                break;
            default: // DSM deallocate: one range at a time
            {
                var r = req.Span((uint)(req.Step * 16), 16);
                ulong lba = BinaryPrimitives.ReadUInt64LittleEndian(r[8..]);
                uint n = BinaryPrimitives.ReadUInt32LittleEndian(r[4..]);
                if (n == 0)
                {
                    BdevDone(req, 0);
                    return;
                }

                rc = ch.Unmap(desc, lba, n, s_ioDone, req);
                break;
            }
        }

        if (rc == -Errno.ENOMEM)
        {
            ch.QueueIoWait(req.Wait);
            return;
        }

        if (rc != 0)
        {
            BdevDone(req, rc == -Errno.EINVAL
                ? NvmeStatus.Make(NvmeSct.Generic, NvmeSc.LbaOutOfRange, dnr: true).Field
                : NvmeStatus.Make(NvmeSct.Generic, NvmeSc.InternalDeviceError, dnr: rc != -Errno.ENODEV).Field);
        }
    }

    private void BdevDone(NvmfRequest req, ushort status)
    {
        if (status == 0 && !_closing)
        {
            // Multi-step operations continue.
            switch (req.Cmd.Opcode)
            {
                case NvmeIoOpcode.Compare when req.Step == 1:
                {
                    bool same = req.Span(0, req.DataLength).SequenceEqual(req.Span(req.DataLength, req.DataLength));
                    status = same ? (ushort)0 : NvmeStatus.Make(NvmeSct.MediaError, NvmeSc.CompareFailure).Field;
                    break;
                }

                case NvmeIoOpcode.WriteZeroes when req.Step == 1:
                    req.Lba += (ulong)req.Steps;
                    req.Blocks -= (ulong)req.Steps;
                    if (req.Blocks > 0)
                    {
                        Submit(req);
                        return;
                    }

                    break;
                case NvmeIoOpcode.DatasetManagement:
                    if (++req.Step < req.Steps)
                    {
                        Submit(req);
                        return;
                    }

                    break;
            }
        }

        req.InBdev = false;
        _inBdev--;
        int slot = req.NsSlot;
        if (--_channelInflight[slot] == 0 && _channelReleasing[slot])
        {
            ReleaseSlot(slot);
        }

        req.Ns = null;
        CompletedIo++;
        if (_closing)
        {
            FreeRequest(req);
            TryFinish();
            return;
        }

        if (status != 0)
        {
            req.C2HLength = 0;
        }

        Complete(req, status);
    }

    // ---------------------------------------------------------------- completion and send

    /// <summary>Completes a command: its data (controller to host) then its response, or the SUCCESS flag on the last data PDU.</summary>
    internal void Complete(NvmfRequest req, ushort status)
    {
        if (_closing)
        {
            FreeRequest(req);
            return;
        }

        req.Status = status;
        req.AwaitingH2C = false;
        if (status == 0 && !req.HostToController && req.C2HLength > 0)
        {
            QueueC2H(req, 0);
            return;
        }

        QueueResp(req);
    }

    private void QueueC2H(NvmfRequest req, uint offset)
    {
        uint len = Math.Min(req.C2HLength - offset, MaxC2HChunk);
        bool last = offset + len == req.C2HLength;
        bool success = last && _opts.C2hSuccess && SqFlowDisabled && req.Dw0 == 0 && req.Dw1 == 0;
        req.TxKind = NvmfRequest.TxC2HData;
        req.TxSuccessFlag = success;
        req.TxHeaderLength = NvmeTcpPdu.WriteC2HData(req.TxHeader, req.Cmd.Cid, offset, len, last, success, _hdgst, _ddgst, _hpda);
        req.TxDataOffset = offset;
        req.TxDataLength = len;
        req.TxDigest = _ddgst ? Crc32C.Compute(req.Span(offset, len)) : 0;
        Enqueue(req);
    }

    private void QueueResp(NvmfRequest req)
    {
        var cqe = new NvmeCompletion
        {
            Dw0 = req.Dw0,
            Dw1 = req.Dw1,
            SqHead = _sqHead,
            SqId = Qid,
            Cid = req.Cmd.Cid,
            StatusPhase = (ushort)(req.Status << 1),
        };
        req.TxKind = NvmfRequest.TxResp;
        req.TxHeaderLength = NvmeTcpPdu.WriteCapsuleResp(req.TxHeader, in cqe, _hdgst);
        req.TxDataLength = 0;
        Enqueue(req);
    }

    private void Enqueue(NvmfRequest req)
    {
        req.TxSent = 0;
        req.Queued = true;
        _sendQueue[(_sendHead + _sendCount) % _sendQueue.Length] = req;
        _sendCount++;
    }

    private void Flush()
    {
        var s = _sock;
        if (s is null)
        {
            return;
        }

        while (_ctlSent < _ctlLen)
        {
            int n = s.Send(_ctlTx.AsSpan(_ctlSent, _ctlLen - _ctlSent), SocketFlags.None, out var err);
            if (!Sent(n, err))
            {
                return;
            }

            _ctlSent += n;
        }

        while (!_closing)
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
            if (!_txStage.IsEmpty)
            {
                continue;
            }

            var req = _sendQueue[_sendHead];
            int dd = req.TxDataLength > 0 && _ddgst ? 4 : 0;
            long total = req.TxHeaderLength + req.TxDataLength + dd;
            while (req.TxSent < total)
            {
                int n;
                SocketError err;
                if (req.TxSent < req.TxHeaderLength)
                {
                    n = s.Send(req.TxHeader.AsSpan(req.TxSent, req.TxHeaderLength - req.TxSent), SocketFlags.None, out err);
                }
                else if (req.TxSent < req.TxHeaderLength + req.TxDataLength)
                {
                    uint done = (uint)(req.TxSent - req.TxHeaderLength);
                    n = s.Send(req.Span(req.TxDataOffset + done, req.TxDataLength - done), SocketFlags.None, out err);
                }
                else
                {
                    n = _txStage.SendDigest(s, req.TxDigest, (int)(req.TxSent - req.TxHeaderLength - req.TxDataLength), out err);
                }

                if (!Sent(n, err))
                {
                    return;
                }

                req.TxSent += n;
            }

            _sendHead = (_sendHead + 1) % _sendQueue.Length;
            _sendCount--;
            req.Queued = false;
            PduSent(req);
        }
    }

    /// <summary>
    /// Copies whole queued PDUs (none started, data at most the stage's DataMax) into the send stage while they fit;
    /// each counts as sent once copied (its buffer may be released: the bytes are in the stage, which goes out before
    /// anything queued later). Stops at the first PDU that is larger or does not fit.
    /// </summary>
    private void StagePdus()
    {
        while (_sendCount > 0)
        {
            var req = _sendQueue[_sendHead];
            if (req.TxSent != 0 || !_txStage.CanStage(req.TxHeaderLength, req.TxDataLength, _ddgst))
            {
                return;
            }

            var header = req.TxHeader.AsSpan(0, req.TxHeaderLength);
            if (req.TxDataLength > 0)
            {
                _txStage.Append(header, req.Span(req.TxDataOffset, req.TxDataLength), _ddgst, req.TxDigest);
            }
            else
            {
                _txStage.Append(header, 0, _ddgst, 0);
            }

            _sendHead = (_sendHead + 1) % _sendQueue.Length;
            _sendCount--;
            req.Queued = false;
            PduSent(req);
        }
    }

    private void PduSent(NvmfRequest req)
    {
        switch (req.TxKind)
        {
            case NvmfRequest.TxR2T:
                return; // the host answers with H2CData
            case NvmfRequest.TxC2HData:
            {
                uint next = req.TxDataOffset + req.TxDataLength;
                if (next < req.C2HLength)
                {
                    QueueC2H(req, next);
                }
                else if (req.TxSuccessFlag)
                {
                    FreeRequest(req);
                }
                else
                {
                    QueueResp(req);
                }

                return;
            }

            default:
                FreeRequest(req);
                return;
        }
    }

    private void FreeRequest(NvmfRequest req)
    {
        if (!req.Active || req.InBdev)
        {
            return;
        }

        req.Active = false;
        req.Queued = false;
        req.TxKind = NvmfRequest.TxNone;
        req.BufferWait = 0;
        if (req.Buffer is not null && Group is { } g)
        {
            if (g.HasBufferWaiters)
            {
                DropBuffer(req); // others wait for memory: do not keep this one idle
            }
            else
            {
                g.AddIdle(req); // kept for the next request; given back first when memory runs short
            }
        }

        _free[_freeCount++] = req.Index;
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

        Close($"send: {err}", log: false);
        return false;
    }

    // ---------------------------------------------------------------- errors and teardown

    /// <summary>A fatal protocol error: C2HTermReq with <paramref name="fes"/>, then close (this connection only).</summary>
    private void Fatal(string reason, NvmeTcpFes fes, uint fei)
    {
        if (_closing)
        {
            return;
        }

        _target.LogBadHost(this, reason);
        CloseReason = reason;
        _target.CountProtocolError();
        var s = _sock;

        // The C2HTermReq goes out only between PDUs: in the middle of one, its bytes would be read as that PDU's.
        bool atBoundary = _ctlSent >= _ctlLen && !_txStage.PartlySent && (_sendCount == 0 || _sendQueue[_sendHead].TxSent == 0);
        if (s is not null && atBoundary)
        {
            // The error data is the offending PDU header (as much of it as was read, at most 128 bytes).
            int have = _rxHave > 0 ? _rxHave : _rxHeaderLength;
            int hdr = Math.Clamp(have, NvmeTcpPdu.CommonHeaderSize, NvmeTcpPdu.TermReqMaxErrorData);
            int n = NvmeTcpPdu.WriteTermReq(_ctlTx, fromHost: false, fes, fei, _rxHdr.AsSpan(0, hdr));
            s.Send(_ctlTx.AsSpan(0, n), SocketFlags.None, out _); // best effort
        }

        Close(reason, log: false);
    }

    /// <summary>Closes the connection: the socket now, the requests and channels once no bdev I/O is in flight.</summary>
    internal void Close(string reason, bool log)
    {
        if (_closing)
        {
            return;
        }

        if (log)
        {
            _target.LogBadHost(this, reason);
        }

        CloseReason ??= reason;
        _closing = true;
        if (ListenerConnections is { } count)
        {
            Interlocked.Decrement(ref count.Value);
        }

        _rxState = RxClosed;
        var s = _sock;
        _sock = null;
        try
        {
            s?.Shutdown(SocketShutdown.Both);
        }
        catch (SocketException)
        {
        }

        s?.Dispose();
        _sendCount = 0;
        _txStage.Clear();
        foreach (var r in _requests)
        {
            if (r.Active && !r.InBdev)
            {
                FreeRequest(r);
            }
        }

        Controller?.ConnectionClosed(this);
        TryFinish();
    }

    private void TryFinish()
    {
        if (_finished || !_closing || _inBdev > 0)
        {
            return;
        }

        _finished = true;
        for (int i = 0; i < _channelNs.Length; i++)
        {
            if (_channelNs[i] is not null)
            {
                ReleaseSlot(i);
            }
        }

        foreach (var r in _requests)
        {
            DropBuffer(r);
        }

        Group?.Remove(this);
    }

    /// <summary>Closes from another thread (controller teardown, target shutdown).</summary>
    internal void CloseAsync(string reason)
    {
        var r = Reactor;
        if (r is null)
        {
            return;
        }

        r.Send(static a =>
        {
            var (c, why) = ((NvmfTcpConnection, string))a!;
            c.Close(why, log: false);
        }, (this, reason));
    }

    public override string ToString() => $"{PeerAddress} qid {Qid}";
}
