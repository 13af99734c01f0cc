using System.Buffers.Binary;
using System.Text;
using VhostBackend.Bdev;
using VhostBackend.Nvme;
using VhostBackend.Nvme.Tcp;
using VhostBackend.Platform;

namespace VhostBackend.Nvmf;

/// <summary>
/// A controller created by an admin-queue Connect (dynamic controller model): its properties (CC, CSTS), features,
/// keep-alive timer, asynchronous event requests and changed-namespace log, and its I/O queues. Admin commands run on
/// the admin connection's reactor, which owns this state; I/O connections on other reactors read only
/// <see cref="IsEnabled"/> and the subsystem's namespace snapshot. The queue table is guarded by the target lock.
/// </summary>
public sealed class NvmfController
{
    public const int AerLimit = 4;
    public const int AbortLimit = 4;

    /// <summary>Keep Alive Support granularity reported in Identify (KAS, units of 100 ms).</summary>
    public const ushort KasUnits = 1;

    /// <summary>Set Features status (command specific) when SV asks to save: nothing is saveable here (as SPDK).</summary>
    private const int FeatureIdNotSaveable = 0x0D;

    private readonly NvmfRequest?[] _aers = new NvmfRequest?[AerLimit];
    private int _aerCount;

    /// <summary>Asynchronous Event Requests the host has outstanding (tests; read from another thread: a snapshot).</summary>
    internal int PendingAsyncEventRequests => Volatile.Read(ref _aerCount);
    private bool _nsChangePending;
    private bool _nsChangeMasked;
    private bool _discoveryChangePending;
    private readonly List<uint> _changedNs = new();
    private bool _changedNsOverflow;
    private long _lastKeepAlive;
    private uint _cc;
    private uint _csts;

    internal NvmfController(NvmfSubsystem subsystem, ushort cntlid, string hostNqn, Guid hostId, uint katoMs, NvmfTcpConnection admin)
    {
        Subsystem = subsystem;
        Cntlid = cntlid;
        HostNqn = hostNqn;
        HostId = hostId;
        KatoMs = RoundKato(katoMs);
        AdminConnection = admin;
        var o = subsystem.Target.TransportOptions!;
        IoQueues = new NvmfTcpConnection?[o.MaxQpairsPerCtrlr];
        NumIoQueues = o.MaxQpairsPerCtrlr - 1;
        _lastKeepAlive = Ticks.Now();
    }

    public NvmfSubsystem Subsystem { get; }
    public ushort Cntlid { get; }
    public string HostNqn { get; }
    public Guid HostId { get; }
    public uint KatoMs { get; private set; }
    internal NvmfTcpConnection AdminConnection { get; }

    /// <summary>I/O queues by qid (index 0 unused); guarded by the target lock.</summary>
    internal readonly NvmfTcpConnection?[] IoQueues;
    internal uint NumIoQueues;
    public bool Destroyed { get; private set; }

    public bool IsEnabled => (Volatile.Read(ref _cc) & NvmeReg.CcEn) != 0 && (Volatile.Read(ref _csts) & NvmeReg.CstsRdy) != 0;

    // Features (Get/Set Features); their values are stored and reported.
    private uint _arbitration;
    private uint _powerManagement;
    private uint _temperatureThreshold = 0x0157; // 343 K
    private uint _errorRecovery;
    private uint _volatileWriteCache;
    private uint _asyncEventConfig;
    private uint _interruptCoalescing;
    private uint _writeAtomicity;

    public int IoQueueCount
    {
        get
        {
            lock (Subsystem.Target.Lock)
            {
                return IoQueues.Count(q => q is not null);
            }
        }
    }

    // ---------------------------------------------------------------- keep alive, teardown

    /// <summary>A KATO (ms) rounded up to the KAS granularity, as SPDK does for Connect and Set Features; 0 stays 0.</summary>
    internal static uint RoundKato(uint ms)
    {
        const uint unit = KasUnits * 100u;
        return ms == 0 ? 0 : (uint)Math.Min(((ulong)ms + unit - 1) / unit * unit, uint.MaxValue / unit * unit);
    }

    internal void PollAdmin(NvmfTcpConnection conn)
    {
        if (conn != AdminConnection || KatoMs == 0 || Destroyed)
        {
            return;
        }

        long now = conn.Reactor?.Now ?? Ticks.Now();
        if (now - _lastKeepAlive > Ticks.FromMicroseconds((long)KatoMs * 1000))
        {
            Subsystem.Target.LogKeepAliveTimeout(this);
            conn.Close("keep alive timeout", log: false);
        }
    }

    internal void ConnectionClosed(NvmfTcpConnection conn)
    {
        if (conn == AdminConnection)
        {
            Destroy();
            return;
        }

        lock (Subsystem.Target.Lock)
        {
            if (conn.Qid < IoQueues.Length && IoQueues[conn.Qid] == conn)
            {
                IoQueues[conn.Qid] = null;
            }
        }
    }

    /// <summary>Removes the controller; its I/O queues are closed on their reactors.</summary>
    internal void Destroy()
    {
        NvmfTcpConnection?[] queues;
        lock (Subsystem.Target.Lock)
        {
            if (Destroyed)
            {
                return;
            }

            Destroyed = true;
            Subsystem.Controllers.Remove(this);
            queues = (NvmfTcpConnection?[])IoQueues.Clone();
            Array.Clear(IoQueues);
        }

        Volatile.Write(ref _cc, 0);
        Volatile.Write(ref _csts, 0);
        Array.Clear(_aers);
        _aerCount = 0;
        foreach (var q in queues)
        {
            q?.CloseAsync("controller destroyed");
        }

        AdminConnection.CloseAsync("controller destroyed");
    }

    /// <summary>
    /// Controller reset / shutdown: the I/O queues are closed on their reactors, and their slots are freed now (under the
    /// lock, as <see cref="Destroy"/> does) so that a host that re-enables at once can connect the same QIDs again;
    /// <see cref="ConnectionClosed"/> later clears only a slot that still points to the closing connection.
    /// </summary>
    private void CloseIoQueues(string reason)
    {
        NvmfTcpConnection?[] queues;
        lock (Subsystem.Target.Lock)
        {
            queues = (NvmfTcpConnection?[])IoQueues.Clone();
            Array.Clear(IoQueues);
        }

        foreach (var q in queues)
        {
            q?.CloseAsync(reason);
        }
    }

    // ---------------------------------------------------------------- properties

    internal void PropertyGet(NvmfRequest req)
    {
        uint offset = req.Cmd.Cdw11;
        bool eight = (req.Cmd.Cdw10 & 7) == 1;
        var o = Subsystem.Target.TransportOptions!;
        ulong value;
        switch (offset)
        {
            case NvmeReg.Cap when eight:
                // MQES, CQR, TO (500 ms units), CSS NVM, MPSMIN/MPSMAX 0 (4 KiB).
                value = (ulong)(Subsystem.IsDiscovery ? o.MaxAqDepth - 1 : o.MaxQueueDepth - 1) | (1UL << 16) | (30UL << 24) | (1UL << 37);
                break;
            case NvmeReg.Vs when !eight:
                value = 0x00010300;
                break;
            case NvmeReg.Cc when !eight:
                value = Volatile.Read(ref _cc);
                break;
            case NvmeReg.Csts when !eight:
                value = Volatile.Read(ref _csts);
                break;
            default:
                req.SetStatus(NvmeSct.Generic, NvmeSc.InvalidField, dnr: true);
                Complete(req);
                return;
        }

        req.Dw0 = (uint)value;
        req.Dw1 = (uint)(value >> 32);
        Complete(req);
    }

    internal void PropertySet(NvmfRequest req)
    {
        uint offset = req.Cmd.Cdw11;
        bool eight = (req.Cmd.Cdw10 & 7) == 1;
        if (offset != NvmeReg.Cc || eight)
        {
            req.SetStatus(NvmeSct.Generic, NvmeSc.InvalidField, dnr: true);
            Complete(req);
            return;
        }

        uint value = req.Cmd.Cdw12;
        uint old = _cc;
        Volatile.Write(ref _cc, value);
        uint shn = (value >> 14) & 3;
        if (shn != 0 && ((old >> 14) & 3) == 0)
        {
            // Shutdown: I/O queues go, the controller reports shutdown complete.
            CloseIoQueues("controller shutdown");
            Volatile.Write(ref _csts, (Volatile.Read(ref _csts) & ~0xCu) | (2u << 2));
        }

        if ((value & NvmeReg.CcEn) != 0 && (old & NvmeReg.CcEn) == 0)
        {
            if (((value >> 16) & 0xF) != 6 && !Subsystem.IsDiscovery || ((value >> 20) & 0xF) != 4 && !Subsystem.IsDiscovery || ((value >> 7) & 0xF) != 0)
            {
                // IOSQES 64 bytes, IOCQES 16 bytes, MPS 4 KiB: anything else fails enabling.
                Volatile.Write(ref _csts, NvmeReg.CstsCfs);
            }
            else
            {
                Volatile.Write(ref _csts, NvmeReg.CstsRdy);
            }
        }
        else if ((value & NvmeReg.CcEn) == 0 && (old & NvmeReg.CcEn) != 0)
        {
            // Controller reset: I/O queues are disconnected, ready clears.
            CloseIoQueues("controller reset");
            Volatile.Write(ref _csts, Volatile.Read(ref _csts) & ~(NvmeReg.CstsRdy | NvmeReg.CstsCfs));
        }

        Complete(req);
    }

    // ---------------------------------------------------------------- admin commands

    private static void Complete(NvmfRequest req) => req.Conn.Complete(req, req.Status);

    internal void HandleAdmin(NvmfTcpConnection conn, NvmfRequest req)
    {
        ref var cmd = ref req.Cmd;
        bool discovery = Subsystem.IsDiscovery;
        switch (cmd.Opcode)
        {
            case NvmeAdminOpcode.Identify:
                Identify(req);
                break;
            case NvmeAdminOpcode.GetLogPage:
                GetLogPage(req);
                break;
            case NvmeAdminOpcode.GetFeatures:
                GetFeatures(req);
                break;
            case NvmeAdminOpcode.SetFeatures:
                SetFeatures(req);
                break;
            case NvmeAdminOpcode.KeepAlive:
                _lastKeepAlive = conn.Reactor?.Now ?? Ticks.Now();
                Complete(req);
                break;
            case NvmeAdminOpcode.AsyncEventRequest:
                if (_aerCount >= AerLimit)
                {
                    req.SetStatus(NvmeSct.CommandSpecific, NvmeSc.AsyncEventRequestLimitExceeded);
                    Complete(req);
                    break;
                }

                _aers[_aerCount++] = req;
                DeliverEvents();
                break;
            case NvmeAdminOpcode.Abort when !discovery:
                req.Dw0 = 1; // not aborted: commands here run to completion
                Complete(req);
                break;
            default:
                req.SetStatus(NvmeSct.Generic, NvmeSc.InvalidOpcode, dnr: true);
                Complete(req);
                break;
        }
    }

    private void Identify(NvmfRequest req)
    {
        uint cns = req.Cmd.Cdw10 & 0xFF;
        if (req.DataLength < 4096 || req.HostToController)
        {
            req.SetStatus(NvmeSct.Generic, NvmeSc.DataSglLengthInvalid, dnr: true);
            Complete(req);
            return;
        }

        var nss = Subsystem.NamespaceSnapshot;
        uint nsid = req.Cmd.Nsid;
        switch (cns)
        {
            case 0x01:
                WriteIdentifyController(req.Output());
                break;
            case 0x00 when !Subsystem.IsDiscovery:
            {
                if (nsid == 0 || nsid > nss.Length)
                {
                    req.SetStatus(NvmeSct.Generic, NvmeSc.InvalidNamespace, dnr: true);
                    break;
                }

                var d = req.Output();
                var ns = nss[nsid - 1];
                if (ns is not null && !ns.Removed)
                {
                    WriteIdentifyNamespace(ns, d);
                }

                break;
            }

            case 0x02 when !Subsystem.IsDiscovery:
            {
                if (nsid >= 0xFFFFFFFE)
                {
                    req.SetStatus(NvmeSct.Generic, NvmeSc.InvalidNamespace, dnr: true);
                    break;
                }

                var d = req.Output();
                int k = 0;
                for (int i = 0; i < nss.Length && k < 1024; i++)
                {
                    if (nss[i] is { Removed: false } ns && ns.Nsid > nsid)
                    {
                        BinaryPrimitives.WriteUInt32LittleEndian(d[(k++ * 4)..], ns.Nsid);
                    }
                }

                break;
            }

            case 0x03 when !Subsystem.IsDiscovery:
            {
                var ns = nsid >= 1 && nsid <= nss.Length ? nss[nsid - 1] : null;
                if (ns is null || ns.Removed)
                {
                    req.SetStatus(NvmeSct.Generic, NvmeSc.InvalidNamespace, dnr: true);
                    break;
                }

                var d = req.Output();
                int at = 0;
                if (ns.Nguid.AsSpan().ContainsAnyExcept((byte)0))
                {
                    d[0] = 2; // NGUID (only a non-zero one is an identifier)
                    d[1] = 16;
                    ns.Nguid.CopyTo(d[4..]);
                    at = 20;
                }

                if (ns.Uuid != Guid.Empty)
                {
                    d[at] = 3; // UUID
                    d[at + 1] = 16;
                    ns.Uuid.TryWriteBytes(d[(at + 4)..(at + 20)], bigEndian: true, out _);
                }
                break;
            }

            default:
                req.SetStatus(NvmeSct.Generic, NvmeSc.InvalidField, dnr: true);
                break;
        }

        Complete(req);
    }

    private static void Ascii(Span<byte> dst, string s)
    {
        dst.Fill((byte)' ');
        int n = Encoding.ASCII.GetBytes(s.AsSpan(0, Math.Min(s.Length, dst.Length)), dst);
        _ = n;
    }

    private void WriteIdentifyController(Span<byte> d)
    {
        var o = Subsystem.Target.TransportOptions!;
        bool disc = Subsystem.IsDiscovery;
        BinaryPrimitives.WriteUInt16LittleEndian(d[0..], 0x4E58); // vendor id (not a PCI function)
        BinaryPrimitives.WriteUInt16LittleEndian(d[2..], 0x4E58);
        Ascii(d.Slice(4, 20), disc ? "" : Subsystem.SerialNumber);
        Ascii(d.Slice(24, 40), disc ? "" : Subsystem.ModelNumber);
        Ascii(d.Slice(64, 8), "24.01");
        d[72] = 6; // RAB
        d[76] = (byte)(disc ? 0 : 0x03); // CMIC: multiple ports, multiple controllers (as SPDK; Linux needs it for a 2nd path)
        int mdts = 0;
        while ((4096u << (mdts + 1)) <= o.MaxIoSize)
        {
            mdts++;
        }

        d[77] = (byte)mdts;
        BinaryPrimitives.WriteUInt16LittleEndian(d[78..], Cntlid);
        BinaryPrimitives.WriteUInt32LittleEndian(d[80..], 0x00010300);
        BinaryPrimitives.WriteUInt32LittleEndian(d[92..], disc ? 1u << 31 : 1u << 8); // OAES: discovery log / namespace attribute notices
        d[111] = (byte)(disc ? 2 : 1); // CNTRLTYPE
        d[258] = AbortLimit - 1; // ACL
        d[259] = AerLimit - 1; // AERL
        d[260] = 1 << 1 | 1; // FRMW: one slot, slot 1 read-only
        d[261] = 1 << 2; // LPA: extended data for Get Log Page
        d[262] = 127; // ELPE
        BinaryPrimitives.WriteUInt16LittleEndian(d[320..], KasUnits);
        d[512] = 0x66; // SQES
        d[513] = 0x44; // CQES
        BinaryPrimitives.WriteUInt16LittleEndian(d[514..], (ushort)Math.Min(o.MaxQueueDepth, 65535u)); // MAXCMD
        BinaryPrimitives.WriteUInt32LittleEndian(d[516..], disc ? 0 : Subsystem.MaxNsid); // NN
        BinaryPrimitives.WriteUInt16LittleEndian(d[520..], disc ? (ushort)0 : (ushort)(NvmeOncs.Compare | NvmeOncs.DatasetManagement | NvmeOncs.WriteZeroes));
        d[525] = (byte)(disc ? 0 : 1 | (2 << 1)); // VWC present; flush with the broadcast NSID not supported (as SPDK)
        BinaryPrimitives.WriteUInt32LittleEndian(d[536..], 1u | (1u << 20) | (1u << 21)); // SGLS: SGLs, offsets, transport data blocks
        Encoding.UTF8.GetBytes(Subsystem.Nqn, d.Slice(768, 256));
        if (!disc)
        {
            BinaryPrimitives.WriteUInt32LittleEndian(d[1792..], (64 + o.InCapsuleDataSize) / 16); // IOCCSZ
            BinaryPrimitives.WriteUInt32LittleEndian(d[1796..], 1); // IORCSZ
        }

        d[1803] = 1; // MSDBD
        BinaryPrimitives.WriteUInt16LittleEndian(d[2048..], 0); // power state 0
    }

    private static void WriteIdentifyNamespace(NvmfNamespace ns, Span<byte> d)
    {
        var b = ns.Bdev;
        ulong blocks = b.BlockCount;
        BinaryPrimitives.WriteUInt64LittleEndian(d[0..], blocks);
        BinaryPrimitives.WriteUInt64LittleEndian(d[8..], blocks);
        BinaryPrimitives.WriteUInt64LittleEndian(d[16..], blocks);
        d[24] = (byte)(b.SupportsIoType(BdevIoType.Unmap) ? 1 : 0); // NSFEAT: thin provisioning
        d[25] = 0; // NLBAF: one format
        d[26] = 0; // FLBAS
        d[30] = 1; // NMIC: may be attached to several controllers (as SPDK)
        d[33] = (byte)(b.SupportsIoType(BdevIoType.WriteZeroes) ? 0x08 : 0); // DLFEAT: write zeroes deallocates
        ns.Nguid.CopyTo(d[104..120]);
        BinaryPrimitives.WriteUInt64BigEndian(d[120..], ns.Eui64);
        int lbads = System.Numerics.BitOperations.Log2(b.BlockSize);
        d[130] = (byte)lbads;
    }

    private void GetLogPage(NvmfRequest req)
    {
        ref var cmd = ref req.Cmd;
        byte lid = (byte)(cmd.Cdw10 & 0xFF);
        bool rae = (cmd.Cdw10 & (1u << 15)) != 0;
        ulong numd = ((cmd.Cdw10 >> 16) | ((ulong)(cmd.Cdw11 & 0xFFFF) << 16)) + 1;
        ulong offset = cmd.Cdw12 | ((ulong)cmd.Cdw13 << 32);
        // NUMD asking for more than the command's buffer holds is Invalid Field, as SPDK answers (not clamped).
        if ((offset & 3) != 0 || req.HostToController || req.DataLength == 0 || numd * 4 > req.DataLength)
        {
            req.SetStatus(NvmeSct.Generic, NvmeSc.InvalidField, dnr: true);
            Complete(req);
            return;
        }

        ulong len = numd * 4;
        byte[]? page;
        bool disc = Subsystem.IsDiscovery;
        switch (lid)
        {
            case NvmeLogPage.Error when !disc:
                page = new byte[64];
                break;
            case NvmeLogPage.SmartHealth when !disc:
                page = new byte[512];
                BinaryPrimitives.WriteUInt16LittleEndian(page.AsSpan(1), 298); // composite temperature, K
                page[3] = 100; // available spare
                page[4] = 10; // threshold
                break;
            case NvmeLogPage.FirmwareSlot when !disc:
                page = new byte[512];
                page[0] = 1;
                Encoding.ASCII.GetBytes("24.01   ", page.AsSpan(8, 8));
                break;
            case NvmeLogPage.ChangedNamespaceList when !disc:
                page = new byte[4096];
                if (_changedNsOverflow)
                {
                    BinaryPrimitives.WriteUInt32LittleEndian(page, 0xFFFFFFFF);
                }
                else
                {
                    for (int i = 0; i < _changedNs.Count; i++)
                    {
                        BinaryPrimitives.WriteUInt32LittleEndian(page.AsSpan(i * 4), _changedNs[i]);
                    }
                }

                _changedNs.Clear();
                _changedNsOverflow = false;
                if (!rae)
                {
                    _nsChangeMasked = false;
                }

                break;
            case NvmeLogPage.Discovery when disc:
                page = Subsystem.Target.DiscoveryLog(HostNqn);
                if (!rae)
                {
                    _discoveryChangeMasked = false;
                }

                break;
            default:
                req.SetStatus(NvmeSct.CommandSpecific, NvmeSc.InvalidLogPage, dnr: true);
                Complete(req);
                return;
        }

        if (offset > (ulong)page.Length)
        {
            // An offset past the end of the page (NVMe 1.4 5.14.1): Invalid Field.
            req.SetStatus(NvmeSct.Generic, NvmeSc.InvalidField, dnr: true);
            Complete(req);
            return;
        }

        var d = req.Output();
        req.C2HLength = (uint)len;
        if (offset < (ulong)page.Length)
        {
            int n = (int)Math.Min((ulong)page.Length - offset, len);
            page.AsSpan((int)offset, n).CopyTo(d);
        }

        Complete(req);
        DeliverEvents();
    }

    private bool _discoveryChangeMasked;

    private void GetFeatures(NvmfRequest req)
    {
        byte fid = (byte)(req.Cmd.Cdw10 & 0xFF);
        switch (fid)
        {
            case NvmeFeature.Arbitration:
                req.Dw0 = _arbitration;
                break;
            case NvmeFeature.PowerManagement:
                req.Dw0 = _powerManagement;
                break;
            case NvmeFeature.TemperatureThreshold:
                req.Dw0 = _temperatureThreshold;
                break;
            case NvmeFeature.ErrorRecovery:
                req.Dw0 = _errorRecovery;
                break;
            case NvmeFeature.VolatileWriteCache:
                req.Dw0 = _volatileWriteCache;
                break;
            case NvmeFeature.NumberOfQueues:
                req.Dw0 = (NumIoQueues - 1) | ((NumIoQueues - 1) << 16);
                break;
            case NvmeFeature.InterruptCoalescing:
                req.Dw0 = _interruptCoalescing;
                break;
            case NvmeFeature.WriteAtomicity:
                req.Dw0 = _writeAtomicity;
                break;
            case NvmeFeature.AsyncEventConfiguration:
                req.Dw0 = _asyncEventConfig;
                break;
            case NvmeFeature.KeepAliveTimer:
                req.Dw0 = KatoMs;
                break;
            default:
                req.SetStatus(NvmeSct.Generic, NvmeSc.InvalidField, dnr: true);
                break;
        }

        Complete(req);
    }

    private void SetFeatures(NvmfRequest req)
    {
        byte fid = (byte)(req.Cmd.Cdw10 & 0xFF);
        uint v = req.Cmd.Cdw11;
        if ((req.Cmd.Cdw10 & (1u << 31)) != 0)
        {
            // SV: no feature is saveable (ONCS does not advertise Save/Select), as SPDK.
            req.SetStatus(NvmeSct.CommandSpecific, FeatureIdNotSaveable, dnr: true);
            Complete(req);
            return;
        }

        switch (fid)
        {
            case NvmeFeature.Arbitration:
                _arbitration = v;
                break;
            case NvmeFeature.PowerManagement:
                if ((v & 0x1F) != 0)
                {
                    req.SetStatus(NvmeSct.Generic, NvmeSc.InvalidField, dnr: true); // one power state
                    break;
                }

                _powerManagement = v;
                break;
            case NvmeFeature.TemperatureThreshold:
                _temperatureThreshold = v;
                break;
            case NvmeFeature.ErrorRecovery:
                _errorRecovery = v;
                break;
            case NvmeFeature.VolatileWriteCache:
                _volatileWriteCache = v & 1;
                break;
            case NvmeFeature.NumberOfQueues:
            {
                if ((v & 0xFFFF) == 0xFFFF || (v >> 16) == 0xFFFF)
                {
                    req.SetStatus(NvmeSct.Generic, NvmeSc.InvalidField, dnr: true);
                    break;
                }

                if (IoQueueCount > 0)
                {
                    req.SetStatus(NvmeSct.Generic, NvmeSc.CommandSequenceError, dnr: true);
                    break;
                }

                // As SPDK: the controller allocates its maximum whatever was asked; the host uses the smaller.
                uint n = NumIoQueues;
                req.Dw0 = (n - 1) | ((n - 1) << 16);
                break;
            }

            case NvmeFeature.InterruptCoalescing:
                _interruptCoalescing = v;
                break;
            case NvmeFeature.WriteAtomicity:
                _writeAtomicity = v;
                break;
            case NvmeFeature.AsyncEventConfiguration:
                _asyncEventConfig = v;
                DeliverEvents();
                break;
            case NvmeFeature.KeepAliveTimer:
                KatoMs = RoundKato(v);
                _lastKeepAlive = req.Conn.Reactor?.Now ?? Ticks.Now();
                break;
            default:
                req.SetStatus(NvmeSct.Generic, NvmeSc.InvalidField, dnr: true);
                break;
        }

        Complete(req);
    }

    // ---------------------------------------------------------------- asynchronous events

    /// <summary>A namespace of the subsystem changed (added, removed, resized): on the admin reactor.</summary>
    internal void NamespaceChanged(uint nsid)
    {
        if (Destroyed)
        {
            return;
        }

        if (!_changedNs.Contains(nsid))
        {
            if (_changedNs.Count >= 1024)
            {
                _changedNsOverflow = true;
            }
            else
            {
                _changedNs.Add(nsid);
            }
        }

        _nsChangePending = true;
        DeliverEvents();
    }

    /// <summary>The discovery log changed (discovery controllers): on the admin reactor.</summary>
    internal void DiscoveryLogChanged()
    {
        if (Destroyed)
        {
            return;
        }

        _discoveryChangePending = true;
        DeliverEvents();
    }

    private void DeliverEvents()
    {
        if (_aerCount == 0)
        {
            return;
        }

        if (_nsChangePending && !_nsChangeMasked && (_asyncEventConfig & (1u << 8)) != 0)
        {
            _nsChangePending = false;
            _nsChangeMasked = true;
            CompleteAer(2 | (0u << 8) | ((uint)NvmeLogPage.ChangedNamespaceList << 16));
        }
        else if (_discoveryChangePending && !_discoveryChangeMasked && (_asyncEventConfig & (1u << 31)) != 0)
        {
            _discoveryChangePending = false;
            _discoveryChangeMasked = true;
            CompleteAer(2 | (0xF0u << 8) | ((uint)NvmeLogPage.Discovery << 16));
        }
    }

    private void CompleteAer(uint dw0)
    {
        var req = _aers[--_aerCount]!;
        _aers[_aerCount] = null;
        req.Dw0 = dw0;
        Complete(req);
    }
}
