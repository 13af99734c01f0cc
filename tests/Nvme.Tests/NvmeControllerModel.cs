using System.Runtime.InteropServices;
using VhostBackend.Nvme;

namespace VhostBackend.Nvme.Tests;

/// <summary>
/// An in-process MODEL of an NVMe controller (not a real device): it implements the register file, reacts to CC
/// and doorbell writes, fetches submission entries from the driver's DMA memory (through the DMA space's IOVA
/// translation, so pointing the device at unregistered memory is caught), executes admin and NVM commands
/// against a RAM namespace, and posts completion entries with phase tags. Single-threaded: it runs inside the
/// doorbell write of the driver's thread.
/// </summary>
internal sealed unsafe class NvmeControllerModel : NvmeRegisters
{
    private readonly DmaSpace _space;
    private readonly byte[] _disk;
    private readonly Dictionary<int, Sq> _sqs = new();
    private readonly Dictionary<int, Cq> _cqs = new();
    private readonly List<(int Sqid, ushort Cid, byte Opcode)> _held = new();
    private readonly List<(int Sqid, ushort Cid)> _pendingAers = new();
    private uint _cc;
    private uint _csts;
    private uint _aqa;
    private ulong _asq;
    private ulong _acq;
    private uint _grantedQueues = 8;
    private int _readyCountdown;

    private sealed class Sq
    {
        public ulong Iova;
        public int Size;
        public int Head;
        public int Tail;
        public int Cqid;
    }

    private sealed class Cq
    {
        public ulong Iova;
        public int Size;
        public int Vector = -1;
        public int Head;
        public int Tail;
        public int Phase = 1;
    }

    /// <summary>The model's MSI-X vectors: an eventfd per vector, signalled when a completion is posted to a CQ with IEN (the admin CQ: vector 0).</summary>
    public IReadOnlyList<VhostBackend.Platform.EventFd> InterruptFds { get; set; } = [];

    /// <summary>Interrupts raised.</summary>
    public int Interrupts { get; private set; }

    /// <summary>The vector each I/O completion queue was created with (-1: IEN off).</summary>
    public int CqVector(int qid) => _cqs.TryGetValue(qid, out var cq) ? cq.Vector : -2;

    public NvmeControllerModel(DmaSpace space, ulong blocks = 2048, uint blockSize = 512, int mqes = 1023, int dstrd = 0, string serial = "MODEL123")
    {
        _space = space;
        Blocks = blocks;
        BlockSize = blockSize;
        Mqes = mqes;
        Dstrd = dstrd;
        Serial = serial;
        _disk = new byte[blocks * blockSize];
        _namespaces[1] = _disk;
    }

    /// <summary>Namespace ids the model reports (Identify Controller NN); namespace 1 (<see cref="Disk"/>) is active at first.</summary>
    public const uint MaxNamespaces = 32;

    private readonly SortedDictionary<uint, byte[]> _namespaces = new(); // active namespaces (under lock(this))

    /// <summary>Makes namespace <paramref name="nsid"/> active with <paramref name="blocks"/> blocks of <see cref="BlockSize"/> (a device adding one; raise the notice with <see cref="RaiseNamespaceChanged"/>).</summary>
    public void AddNamespace(uint nsid, ulong blocks)
    {
        if (nsid == 0 || nsid > MaxNamespaces)
        {
            throw new ArgumentOutOfRangeException(nameof(nsid));
        }

        lock (this)
        {
            _namespaces[nsid] = new byte[blocks * BlockSize];
        }
    }

    /// <summary>Makes namespace <paramref name="nsid"/> inactive (its I/O fails with Invalid Namespace).</summary>
    public void RemoveNamespace(uint nsid)
    {
        lock (this)
        {
            _namespaces.Remove(nsid);
        }
    }

    /// <summary>An active namespace's data.</summary>
    public byte[] NamespaceDisk(uint nsid)
    {
        lock (this)
        {
            return _namespaces[nsid];
        }
    }

    /// <summary>The Asynchronous Event Configuration the host set (Set Features 0Bh).</summary>
    public uint AsyncEventConfig { get; private set; }

    /// <summary>Completes an outstanding AER with a Namespace Attribute Changed notice, if the host enabled it (AEC bit 8), as a device does.</summary>
    public bool RaiseNamespaceChanged()
    {
        lock (this)
        {
            return (AsyncEventConfig & NvmeAsyncEvent.NamespaceAttributeNotices) != 0 && RaiseAsyncEvent(0x00040002); // notice, info 0, log page 04h
        }
    }

    public ulong Blocks { get; }
    public uint BlockSize { get; }
    public int Mqes { get; }
    public int Dstrd { get; }
    public string Serial { get; }
    public NvmeOncs Oncs { get; set; } = NvmeOncs.Compare | NvmeOncs.DatasetManagement | NvmeOncs.WriteZeroes;
    public byte Mdts { get; set; } = 5; // 32 x 4 KiB = 128 KiB
    public uint MaxQueuePairs { get; set; } = 8;

    /// <summary>Commands are fetched and executed, but their completions are held until <see cref="ReleaseHeld"/>.</summary>
    public bool HoldIo { get; set; }

    /// <summary>I/O SQ doorbell writes are recorded but the SQs are only processed by <see cref="ProcessAll"/> (admin runs as usual).</summary>
    public bool ManualProcessing { get; set; }

    /// <summary>Abort commands find nothing to abort (DW0 bit 0 set), so a timeout must escalate to a reset.</summary>
    public bool IgnoreAborts { get; set; }

    /// <summary>CAP.TO in 500 ms units (default 2: one second). Read by the driver at attach.</summary>
    public byte TimeoutUnits { get; set; } = 2;

    /// <summary>CC.EN=1 never sets CSTS.RDY (a controller that does not come back from a reset).</summary>
    public bool NeverReady { get; set; }

    /// <summary>After CC.EN=1, CSTS reads this many times with RDY=0 before RDY=1 (a controller that takes its time).</summary>
    public int ReadyDelayReads { get; set; }

    /// <summary>Admin commands (other than Asynchronous Event Requests) are fetched but never completed.</summary>
    public bool HoldAdmin { get; set; }

    /// <summary>The device is gone: every register reads all ones.</summary>
    public bool Removed { get; set; }

    public int SqDoorbellWrites { get; private set; }
    public int CqDoorbellWrites { get; private set; }
    public int CommandsExecuted { get; private set; }
    public int DmaFaults { get; private set; }
    public int PrpListsSeen { get; private set; }
    public int FlushCount { get; private set; }
    public int EnableTransitions { get; private set; }
    public uint LastCcOnEnable { get; private set; }
    private readonly List<byte> _adminOpcodes = new();

    /// <summary>A snapshot of the admin opcodes executed so far (the model's thread appends while tests read).</summary>
    public IReadOnlyList<byte> AdminOpcodes
    {
        get
        {
            lock (_adminOpcodes)
            {
                return _adminOpcodes.ToArray();
            }
        }
    }
    public int IoQueuesLive => _sqs.Count(kv => kv.Key != 0);

    public Span<byte> Disk => _disk;

    public void InjectFatal() => _csts |= NvmeReg.CstsCfs;

    public override uint Read32(int offset)
    {
        lock (this)
        {
            return Read32Locked(offset);
        }
    }

    public override void Write32(int offset, uint value)
    {
        // Queue pairs on several reactors ring doorbells concurrently: the model serialises itself.
        lock (this)
        {
            Write32Locked(offset, value);
        }
    }

    private uint Read32Locked(int offset)
    {
        if (Removed)
        {
            return uint.MaxValue;
        }

        ulong cap = (ulong)Mqes | (1UL << 16) | ((ulong)TimeoutUnits << 24) | ((ulong)Dstrd << 32) | (1UL << 37);
        return offset switch
        {
            NvmeReg.Cap => (uint)cap,
            NvmeReg.Cap + 4 => (uint)(cap >> 32),
            NvmeReg.Vs => 0x00010400,
            NvmeReg.Cc => _cc,
            NvmeReg.Csts => ReadCsts(),
            NvmeReg.Aqa => _aqa,
            NvmeReg.Asq => (uint)_asq,
            NvmeReg.Asq + 4 => (uint)(_asq >> 32),
            NvmeReg.Acq => (uint)_acq,
            NvmeReg.Acq + 4 => (uint)(_acq >> 32),
            _ => 0,
        };
    }

    /// <summary>Restarts the ready countdown from <see cref="ReadyDelayReads"/> (a controller that is enabled and waiting for RDY).</summary>
    public void ArmReady()
    {
        lock (this)
        {
            _readyCountdown = ReadyDelayReads;
        }
    }

    private uint ReadCsts()
    {
        if (_readyCountdown > 0 && --_readyCountdown == 0 && (_cc & NvmeReg.CcEn) != 0)
        {
            _csts |= NvmeReg.CstsRdy;
        }

        return _csts;
    }

    private void Write32Locked(int offset, uint value)
    {
        if (Removed)
        {
            return;
        }

        switch (offset)
        {
            case NvmeReg.Cc:
                WriteCc(value);
                return;
            case NvmeReg.Aqa:
                _aqa = value;
                return;
            case NvmeReg.Asq:
                _asq = (_asq & 0xFFFFFFFF00000000) | value;
                return;
            case NvmeReg.Asq + 4:
                _asq = (_asq & 0xFFFFFFFF) | ((ulong)value << 32);
                return;
            case NvmeReg.Acq:
                _acq = (_acq & 0xFFFFFFFF00000000) | value;
                return;
            case NvmeReg.Acq + 4:
                _acq = (_acq & 0xFFFFFFFF) | ((ulong)value << 32);
                return;
        }

        if (offset >= NvmeReg.DoorbellBase)
        {
            int index = (offset - NvmeReg.DoorbellBase) / (4 << Dstrd);
            if ((offset - NvmeReg.DoorbellBase) % (4 << Dstrd) != 0)
            {
                throw new InvalidOperationException($"doorbell write at 0x{offset:x} is not on the stride");
            }

            int qid = index / 2;
            if (index % 2 == 0)
            {
                SqDoorbellWrites++;
                if ((_csts & NvmeReg.CstsRdy) == 0 || !_sqs.TryGetValue(qid, out var sq) || value >= sq.Size)
                {
                    return; // ignored like a disabled controller or invalid doorbell write
                }

                sq.Tail = (int)value;
                if (!ManualProcessing || qid == 0)
                {
                    ProcessSq(qid);
                }
            }
            else
            {
                CqDoorbellWrites++;
                if (_cqs.TryGetValue(qid, out var cq) && value < cq.Size)
                {
                    cq.Head = (int)value;
                }
            }
        }
    }

    private void WriteCc(uint value)
    {
        bool wasEnabled = (_cc & NvmeReg.CcEn) != 0;
        bool enable = (value & NvmeReg.CcEn) != 0;
        _cc = value;
        if (((value >> 14) & 3) != 0)
        {
            _csts = (_csts & ~(3u << 2)) | (2u << 2); // shutdown complete
        }

        if (!wasEnabled && enable)
        {
            EnableTransitions++;
            LastCcOnEnable = value;
            int asqs = (int)(_aqa & 0xFFF) + 1;
            int acqs = (int)((_aqa >> 16) & 0xFFF) + 1;
            _sqs.Clear();
            _cqs.Clear();
            _sqs[0] = new Sq { Iova = _asq, Size = asqs, Cqid = 0 };
            _cqs[0] = new Cq { Iova = _acq, Size = acqs };
            _csts = NeverReady || ReadyDelayReads > 0 ? 0 : NvmeReg.CstsRdy;
            _readyCountdown = NeverReady ? 0 : ReadyDelayReads;
        }
        else if (wasEnabled && !enable)
        {
            _sqs.Clear();
            _cqs.Clear();
            _held.Clear();
            _pendingAers.Clear();
            _csts = 0;
        }
    }

    public void ProcessAll()
    {
        foreach (var qid in _sqs.Keys.ToArray())
        {
            ProcessSq(qid);
        }
    }

    private void ProcessSq(int qid)
    {
        var sq = _sqs[qid];
        while (sq.Head != sq.Tail)
        {
            var cq = _cqs[sq.Cqid];
            if ((cq.Tail + 1) % cq.Size == cq.Head)
            {
                return; // CQ full: stall until the host frees entries
            }

            nint p = _space.TranslateIova(sq.Iova + ((ulong)sq.Head * 64), 64);
            if (p == 0)
            {
                DmaFaults++;
                return;
            }

            var cmd = *(NvmeCommand*)p;
            sq.Head = (sq.Head + 1) % sq.Size;
            CommandsExecuted++;
            NvmeStatus status;
            uint dw0 = 0;
            if (qid == 0)
            {
                lock (_adminOpcodes)
                {
                    _adminOpcodes.Add(cmd.Opcode);
                }

                if (cmd.Opcode == NvmeAdminOpcode.AsyncEventRequest)
                {
                    _pendingAers.Add((qid, cmd.Cid));
                    continue;
                }

                if (HoldAdmin)
                {
                    continue; // never completed
                }

                status = ExecuteAdmin(ref cmd, out dw0);
            }
            else
            {
                status = ExecuteIo(ref cmd);
                if (HoldIo)
                {
                    _held.Add((qid, cmd.Cid, cmd.Opcode));
                    continue;
                }
            }

            Post(qid, cmd.Cid, status, dw0);
            if (!_sqs.ContainsKey(qid))
            {
                return; // the command deleted its own queue
            }
        }
    }

    private void Post(int sqid, ushort cid, NvmeStatus status, uint dw0)
    {
        if (!_sqs.TryGetValue(sqid, out var sq) || !_cqs.TryGetValue(sq.Cqid, out var cq))
        {
            return;
        }

        nint p = _space.TranslateIova(cq.Iova + ((ulong)cq.Tail * 16), 16);
        if (p == 0)
        {
            DmaFaults++;
            return;
        }

        var e = (NvmeCompletion*)p;
        e->Dw0 = dw0;
        e->Dw1 = 0;
        e->SqHead = (ushort)sq.Head;
        e->SqId = (ushort)sqid;
        e->Cid = cid;

        // The phase word last, like a device: the host polls it.
        Volatile.Write(ref e->StatusPhase, (ushort)((status.Field << 1) | cq.Phase));
        int vector = sq.Cqid == 0 ? 0 : cq.Vector;
        if (vector >= 0 && vector < InterruptFds.Count)
        {
            InterruptFds[vector].Signal(); // the MSI-X message, as VFIO delivers it: an eventfd write
            Interrupts++;
        }

        cq.Tail++;
        if (cq.Tail == cq.Size)
        {
            cq.Tail = 0;
            cq.Phase ^= 1;
        }
    }

    /// <summary>Completes the held commands (success, in order).</summary>
    public int ReleaseHeld()
    {
        var held = _held.ToArray();
        _held.Clear();
        foreach (var (sqid, cid, _) in held)
        {
            Post(sqid, cid, NvmeStatus.Success, 0);
        }

        return held.Length;
    }

    public int HeldCount => _held.Count;

    public int PendingAers => _pendingAers.Count;

    /// <summary>Completes one outstanding Asynchronous Event Request with <paramref name="dw0"/>.</summary>
    public bool RaiseAsyncEvent(uint dw0)
    {
        if (_pendingAers.Count == 0)
        {
            return false;
        }

        var (sqid, cid) = _pendingAers[0];
        _pendingAers.RemoveAt(0);
        Post(sqid, cid, NvmeStatus.Success, dw0);
        return true;
    }

    private NvmeStatus ExecuteAdmin(ref NvmeCommand cmd, out uint dw0)
    {
        dw0 = 0;
        switch (cmd.Opcode)
        {
            case NvmeAdminOpcode.Identify:
            {
                var data = new byte[4096];
                int cns = (int)(cmd.Cdw10 & 0xFF);
                if (cns == 1)
                {
                    BitConverter.TryWriteBytes(data.AsSpan(0), (ushort)0x1b36);
                    Pad(Serial, 20).CopyTo(data.AsSpan(4));
                    Pad("VhostBackend NVMe model", 40).CopyTo(data.AsSpan(24));
                    Pad("1.0", 8).CopyTo(data.AsSpan(64));
                    data[77] = Mdts;
                    BitConverter.TryWriteBytes(data.AsSpan(80), 0x00010400u);
                    BitConverter.TryWriteBytes(data.AsSpan(92), NvmeAsyncEvent.NamespaceAttributeNotices); // OAES
                    data[259] = 3; // AERL
                    data[512] = 0x66;
                    data[513] = 0x44;
                    BitConverter.TryWriteBytes(data.AsSpan(516), MaxNamespaces);
                    BitConverter.TryWriteBytes(data.AsSpan(520), (ushort)Oncs);
                    data[525] = 1;
                }
                else if (cns == 0)
                {
                    if (cmd.Nsid == 0 || cmd.Nsid > MaxNamespaces)
                    {
                        return NvmeStatus.Make(NvmeSct.Generic, NvmeSc.InvalidNamespace, dnr: true);
                    }

                    if (!_namespaces.TryGetValue(cmd.Nsid, out var nsDisk))
                    {
                        return CopyOut(ref cmd, data); // an inactive namespace: zeroes
                    }

                    ulong nsBlocks = (ulong)nsDisk.Length / BlockSize;
                    BitConverter.TryWriteBytes(data.AsSpan(0), nsBlocks);
                    BitConverter.TryWriteBytes(data.AsSpan(8), nsBlocks);
                    data[25] = 1; // two LBA formats
                    data[26] = 1; // using format 1
                    BitConverter.TryWriteBytes(data.AsSpan(128), 9u << 16); // 512 B
                    BitConverter.TryWriteBytes(data.AsSpan(132), (uint)(System.Numerics.BitOperations.Log2(BlockSize) << 16));
                }
                else if (cns == 2)
                {
                    int i = 0;
                    foreach (uint id in _namespaces.Keys)
                    {
                        if (id > cmd.Nsid)
                        {
                            BitConverter.TryWriteBytes(data.AsSpan(4 * i++), id);
                        }
                    }
                }
                else
                {
                    return NvmeStatus.Make(NvmeSct.Generic, NvmeSc.InvalidField, dnr: true);
                }

                return CopyOut(ref cmd, data);
            }

            case NvmeAdminOpcode.SetFeatures:
                if ((cmd.Cdw10 & 0xFF) == NvmeFeature.AsyncEventConfiguration)
                {
                    AsyncEventConfig = cmd.Cdw11;
                }

                if ((cmd.Cdw10 & 0xFF) == NvmeFeature.NumberOfQueues)
                {
                    uint want = Math.Min((cmd.Cdw11 & 0xFFFF) + 1, MaxQueuePairs);
                    _grantedQueues = want;
                    dw0 = (want - 1) | ((want - 1) << 16);
                }

                return NvmeStatus.Success;
            case NvmeAdminOpcode.GetFeatures:
                dw0 = (cmd.Cdw10 & 0xFF) == NvmeFeature.NumberOfQueues ? (_grantedQueues - 1) | ((_grantedQueues - 1) << 16) : 0;
                return NvmeStatus.Success;
            case NvmeAdminOpcode.CreateIoCq:
            {
                int qid = (int)(cmd.Cdw10 & 0xFFFF);
                int size = (int)(cmd.Cdw10 >> 16) + 1;
                if (qid == 0 || qid > _grantedQueues || _cqs.ContainsKey(qid))
                {
                    return NvmeStatus.Make(NvmeSct.CommandSpecific, NvmeSc.InvalidQueueId, dnr: true);
                }

                if (size < 2 || size > Mqes + 1 || (cmd.Cdw11 & 1) == 0)
                {
                    return NvmeStatus.Make(NvmeSct.CommandSpecific, NvmeSc.InvalidQueueSize, dnr: true);
                }

                _cqs[qid] = new Cq { Iova = cmd.Prp1, Size = size, Vector = (cmd.Cdw11 & 2) != 0 ? (int)(cmd.Cdw11 >> 16) : -1 };
                return NvmeStatus.Success;
            }

            case NvmeAdminOpcode.CreateIoSq:
            {
                int qid = (int)(cmd.Cdw10 & 0xFFFF);
                int size = (int)(cmd.Cdw10 >> 16) + 1;
                int cqid = (int)(cmd.Cdw11 >> 16);
                if (qid == 0 || qid > _grantedQueues || _sqs.ContainsKey(qid))
                {
                    return NvmeStatus.Make(NvmeSct.CommandSpecific, NvmeSc.InvalidQueueId, dnr: true);
                }

                if (!_cqs.ContainsKey(cqid) || cqid == 0)
                {
                    return NvmeStatus.Make(NvmeSct.CommandSpecific, 0x00 /* completion queue invalid */, dnr: true);
                }

                if (size < 2 || size > Mqes + 1)
                {
                    return NvmeStatus.Make(NvmeSct.CommandSpecific, NvmeSc.InvalidQueueSize, dnr: true);
                }

                _sqs[qid] = new Sq { Iova = cmd.Prp1, Size = size, Cqid = cqid };
                return NvmeStatus.Success;
            }

            case NvmeAdminOpcode.DeleteIoSq:
            {
                int qid = (int)(cmd.Cdw10 & 0xFFFF);
                if (qid == 0 || !_sqs.Remove(qid))
                {
                    return NvmeStatus.Make(NvmeSct.CommandSpecific, NvmeSc.InvalidQueueId, dnr: true);
                }

                _held.RemoveAll(h => h.Sqid == qid);
                return NvmeStatus.Success;
            }

            case NvmeAdminOpcode.DeleteIoCq:
            {
                int qid = (int)(cmd.Cdw10 & 0xFFFF);
                if (qid == 0 || !_cqs.Remove(qid))
                {
                    return NvmeStatus.Make(NvmeSct.CommandSpecific, NvmeSc.InvalidQueueId, dnr: true);
                }

                return NvmeStatus.Success;
            }

            case NvmeAdminOpcode.GetLogPage:
            {
                int bytes = (int)(((cmd.Cdw10 >> 16) | ((cmd.Cdw11 & 0xFFFF) << 16)) + 1) * 4;
                var data = new byte[bytes];
                if ((cmd.Cdw10 & 0xFF) == NvmeLogPage.SmartHealth && bytes >= 3)
                {
                    BitConverter.TryWriteBytes(data.AsSpan(1), (ushort)310);
                }

                return CopyOut(ref cmd, data);
            }

            case NvmeAdminOpcode.Abort:
            {
                int sqid = (int)(cmd.Cdw10 & 0xFFFF);
                ushort cid = (ushort)(cmd.Cdw10 >> 16);
                int i = IgnoreAborts ? -1 : _held.FindIndex(h => h.Sqid == sqid && h.Cid == cid);
                if (i < 0)
                {
                    dw0 = 1; // not aborted
                    return NvmeStatus.Success;
                }

                _held.RemoveAt(i);
                Post(sqid, cid, NvmeStatus.AbortRequested, 0);
                return NvmeStatus.Success;
            }

            case NvmeAdminOpcode.KeepAlive:
                return NvmeStatus.Success;
            default:
                return NvmeStatus.Make(NvmeSct.Generic, NvmeSc.InvalidOpcode, dnr: true);
        }
    }

    private static byte[] Pad(string s, int n)
    {
        var b = new byte[n];
        b.AsSpan().Fill((byte)' ');
        System.Text.Encoding.ASCII.GetBytes(s).AsSpan(0, Math.Min(n, s.Length)).CopyTo(b);
        return b;
    }

    private NvmeStatus CopyOut(ref NvmeCommand cmd, byte[] data)
    {
        var segs = WalkPrps(cmd.Prp1, cmd.Prp2, data.Length);
        if (segs is null)
        {
            return NvmeStatus.Make(NvmeSct.Generic, NvmeSc.DataTransferError);
        }

        int off = 0;
        foreach (var (p, len) in segs)
        {
            data.AsSpan(off, len).CopyTo(new Span<byte>((void*)p, len));
            off += len;
        }

        return NvmeStatus.Success;
    }

    /// <summary>PRP walk per NVMe 1.4 4.3 with 4 KiB pages; validates alignment rules and DMA reachability.</summary>
    private List<(nint, int)>? WalkPrps(ulong prp1, ulong prp2, int length)
    {
        const int page = 4096;
        var segs = new List<(nint, int)>();
        if ((prp1 & 3) != 0)
        {
            return null;
        }

        int first = Math.Min(length, page - (int)(prp1 % page));
        if (!Add(prp1, first))
        {
            return null;
        }

        int remaining = length - first;
        if (remaining == 0)
        {
            return segs;
        }

        if (remaining <= page)
        {
            return prp2 % page == 0 && Add(prp2, remaining) ? segs : null;
        }

        PrpListsSeen++;
        ulong listIova = prp2;
        int maxEntries = (page - (int)(listIova % page)) / 8;
        nint list = _space.TranslateIova(listIova, (ulong)maxEntries * 8);
        if (list == 0 || (listIova & 7) != 0)
        {
            DmaFaults++;
            return null;
        }

        int idx = 0;
        while (remaining > 0)
        {
            if (idx == maxEntries - 1 && remaining > page)
            {
                return null; // the model does not follow chained lists (the driver never builds them)
            }

            ulong entry = ((ulong*)list)[idx++];
            if (entry % page != 0)
            {
                return null;
            }

            int n = Math.Min(page, remaining);
            if (!Add(entry, n))
            {
                return null;
            }

            remaining -= n;
        }

        return segs;

        bool Add(ulong iova, int len)
        {
            nint p = _space.TranslateIova(iova, (ulong)len);
            if (p == 0)
            {
                DmaFaults++;
                return false;
            }

            segs.Add((p, len));
            return true;
        }
    }

    private NvmeStatus ExecuteIo(ref NvmeCommand cmd)
    {
        if (!_namespaces.TryGetValue(cmd.Nsid, out var nsDisk) && cmd.Opcode != NvmeIoOpcode.Flush)
        {
            return NvmeStatus.Make(NvmeSct.Generic, NvmeSc.InvalidNamespace, dnr: true);
        }

        nsDisk ??= _disk;
        ulong blocks = (ulong)nsDisk.Length / BlockSize;

        ulong slba = cmd.Cdw10 | ((ulong)cmd.Cdw11 << 32);
        uint nlb = (cmd.Cdw12 & 0xFFFF) + 1;
        switch (cmd.Opcode)
        {
            case NvmeIoOpcode.Flush:
                FlushCount++;
                return NvmeStatus.Success;
            case NvmeIoOpcode.Read:
            case NvmeIoOpcode.Write:
            case NvmeIoOpcode.Compare:
            {
                if (slba + nlb > blocks)
                {
                    return NvmeStatus.Make(NvmeSct.Generic, NvmeSc.LbaOutOfRange, dnr: true);
                }

                int bytes = (int)(nlb * BlockSize);
                if (Mdts != 0 && bytes > (4096 << Mdts))
                {
                    return NvmeStatus.Make(NvmeSct.Generic, NvmeSc.InvalidField, dnr: true);
                }

                var segs = WalkPrps(cmd.Prp1, cmd.Prp2, bytes);
                if (segs is null)
                {
                    return NvmeStatus.Make(NvmeSct.Generic, NvmeSc.DataTransferError);
                }

                int off = (int)(slba * BlockSize);
                foreach (var (p, len) in segs)
                {
                    var host = new Span<byte>((void*)p, len);
                    var disk = nsDisk.AsSpan(off, len);
                    if (cmd.Opcode == NvmeIoOpcode.Read)
                    {
                        disk.CopyTo(host);
                    }
                    else if (cmd.Opcode == NvmeIoOpcode.Write)
                    {
                        host.CopyTo(disk);
                    }
                    else if (!host.SequenceEqual(disk))
                    {
                        return NvmeStatus.Make(NvmeSct.MediaError, NvmeSc.CompareFailure);
                    }

                    off += len;
                }

                return NvmeStatus.Success;
            }

            case NvmeIoOpcode.WriteZeroes:
                if ((Oncs & NvmeOncs.WriteZeroes) == 0)
                {
                    return NvmeStatus.Make(NvmeSct.Generic, NvmeSc.InvalidOpcode, dnr: true);
                }

                if (slba + nlb > blocks)
                {
                    return NvmeStatus.Make(NvmeSct.Generic, NvmeSc.LbaOutOfRange, dnr: true);
                }

                nsDisk.AsSpan((int)(slba * BlockSize), (int)(nlb * BlockSize)).Clear();
                return NvmeStatus.Success;
            case NvmeIoOpcode.DatasetManagement:
            {
                int nr = (int)(cmd.Cdw10 & 0xFF) + 1;
                var segs = WalkPrps(cmd.Prp1, cmd.Prp2, nr * 16);
                if (segs is null)
                {
                    return NvmeStatus.Make(NvmeSct.Generic, NvmeSc.DataTransferError);
                }

                var ranges = MemoryMarshal.Cast<byte, NvmeDsmRange>(new ReadOnlySpan<byte>((void*)segs[0].Item1, nr * 16));
                foreach (var r in ranges)
                {
                    if (r.StartLba + r.LengthBlocks > blocks)
                    {
                        return NvmeStatus.Make(NvmeSct.Generic, NvmeSc.LbaOutOfRange, dnr: true);
                    }

                    if ((cmd.Cdw11 & 4) != 0)
                    {
                        nsDisk.AsSpan((int)(r.StartLba * BlockSize), (int)(r.LengthBlocks * BlockSize)).Clear();
                    }
                }

                return NvmeStatus.Success;
            }

            default:
                return NvmeStatus.Make(NvmeSct.Generic, NvmeSc.InvalidOpcode, dnr: true);
        }
    }
}
