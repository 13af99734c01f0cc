using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using VhostBackend.Platform;

namespace VhostBackend.Nvme;

/// <summary>Tunables of a controller attach.</summary>
public sealed class NvmeControllerOptions
{
    public int AdminQueueEntries { get; set; } = 32;

    /// <summary>I/O queue size (entries; capped by CAP.MQES + 1).</summary>
    public int IoQueueEntries { get; set; } = 256;

    /// <summary>I/O queue pairs to ask the controller for (Set Features, Number of Queues).</summary>
    public int IoQueuesRequested { get; set; } = 16;

    /// <summary>Timeout of admin commands (synchronous or not): an expired command completes with "abort requested" and the controller is marked <see cref="NvmeController.NeedsReset"/>.</summary>
    public TimeSpan AdminTimeout { get; set; } = TimeSpan.FromSeconds(10);

    /// <summary>I/O command timeout applied to new queue pairs (zero = none).</summary>
    public TimeSpan IoTimeout { get; set; } = TimeSpan.FromSeconds(30);

    /// <summary>Asynchronous Event Requests kept outstanding (capped by AERL + 1).</summary>
    public int AsyncEventRequests { get; set; } = 4;
}

public enum NvmeHealth
{
    Ok,

    /// <summary>CSTS.CFS: the controller hit a fatal error; a reset is needed.</summary>
    Fatal,

    /// <summary>Registers read as all ones: the device is gone (hot removed or surprise removal).</summary>
    Removed,

    /// <summary>Not enabled (being reset, or bring-up failed).</summary>
    NotReady,
}

/// <summary>Where a controller reset started by <see cref="NvmeController.StartReset"/> is.</summary>
public enum NvmeResetState
{
    /// <summary>No reset was started.</summary>
    Idle,
    InProgress,
    Succeeded,

    /// <summary>The reset failed (<see cref="NvmeController.ResetError"/>); the controller is unusable until a reset succeeds.</summary>
    Failed,
}

/// <summary>An active namespace of a controller.</summary>
public sealed class NvmeNamespace
{
    internal NvmeNamespace(NvmeController? ctrl, NvmeNamespaceData data)
    {
        Controller = ctrl;
        Data = data;
        Id = data.Nsid;
        BlockSize = data.BlockSize;
        BlockCount = data.Size;
    }

    /// <summary>The PCIe controller, or null for a namespace of a fabrics (TCP) controller.</summary>
    public NvmeController? Controller { get; }
    public uint Id { get; }
    public uint BlockSize { get; }
    public ulong BlockCount { get; }
    public NvmeNamespaceData Data { get; }

    public bool InRange(ulong lba, ulong numBlocks) => lba < BlockCount && numBlocks <= BlockCount - lba;

    public override string ToString() => $"ns{Id} ({BlockCount} x {BlockSize})";
}

/// <summary>
/// A userspace NVMe controller (NVMe 1.4): bring-up, identify, namespaces, I/O queue pairs, admin commands,
/// health, reset. I/O goes through <see cref="NvmeQueuePair"/>s owned by one thread each.
/// <para>
/// The control path does not wait: admin commands are submitted with a completion callback
/// (<see cref="SubmitAdmin"/>) and reaped by <see cref="ProcessAdminCompletions"/>, which the owner calls from a
/// poller (it also expires admin commands older than <see cref="NvmeControllerOptions.AdminTimeout"/>). A
/// controller reset (<see cref="StartReset"/> / <see cref="PollReset"/>) and the creation and deletion of I/O queue
/// pairs (<see cref="NvmeQueuePair.StartConnect"/> / <see cref="NvmeQueuePair.PollConnect"/>,
/// <see cref="NvmeQueuePair.BeginDestroy"/>) are state machines advanced by polling; their deadlines are
/// <see cref="Ticks"/> comparisons. The admin queue is guarded by a lock held only for a submission or one reap,
/// never across a wait, and <see cref="ProcessAdminCompletions"/> only tries it. The synchronous methods
/// (<see cref="ExecuteAdmin"/>, <see cref="Identify"/>, <see cref="Reset"/>, <see cref="AllocIoQueuePair"/>,
/// attach, detach) wait and are for control threads, tools and tests, never for a reactor that serves I/O.
/// </para>
/// </summary>
public sealed unsafe class NvmeController : IDisposable
{
    private readonly object _adminLock = new();
    private readonly object _syncLock = new();
    private readonly List<NvmeQueuePair> _orphans = new();
    private readonly ILogger _log;
    private readonly NvmeControllerOptions _opts;
    private readonly IDisposable? _owner;
    private readonly List<NvmeQueuePair> _ioQpairs = new();
    private readonly List<DmaReservation> _reservations = new(); // channel memory kept mapped for this controller (under itself)
    private readonly bool[] _qidUsed;
    private NvmeQueuePair _admin = null!;
    private DmaRegion _adminBuf = null!;
    private int _mps;
    private int _aersOutstanding;
    private bool _disposed;
    private long _lastHealthCheck;
    private long _generation;
    private volatile bool _resetting;
    private NvmeResetState _lastReset;
    private int _resetStep;
    private long _resetDeadline;
    private int _resetCmdDone;
    private NvmeStatus _resetCmdStatus;
    private uint _resetCmdDw0;
    private bool _resetTimedOut;

    private const int ResetWaitNotReady = 1;
    private const int ResetWaitReady = 2;
    private const int ResetWaitSetFeatures = 3;

    private NvmeController(string name, NvmeRegisters regs, DmaSpace dma, NvmeControllerOptions? opts, ILogger? log, IDisposable? owner)
    {
        Name = name;
        Registers = regs;
        Dma = dma;
        _opts = opts ?? new NvmeControllerOptions();
        _log = log ?? NullLogger.Instance;
        _owner = owner;
        _qidUsed = new bool[65536];
    }

    /// <summary>Transport address ("0000:00:04.0") or the model's name.</summary>
    public string Name { get; }
    public NvmeRegisters Registers { get; }
    public DmaSpace Dma { get; }
    public NvmeCap Cap { get; private set; }
    public uint Version { get; private set; }
    public NvmeControllerData Data { get; private set; } = null!;
    public IReadOnlyList<NvmeNamespace> Namespaces { get; private set; } = Array.Empty<NvmeNamespace>();

    /// <summary>Memory page size in use (CC.MPS), bytes.</summary>
    public int PageSize { get; private set; }

    /// <summary>Largest data transfer of one command (MDTS, and one PRP list page without chaining).</summary>
    public uint MaxTransferBytes { get; private set; }

    /// <summary>I/O queue pairs the controller granted.</summary>
    public int MaxIoQueuePairs { get; private set; }

    public int IoQueueEntries { get; private set; }

    /// <summary>Completed controller resets.</summary>
    public int ResetCount { get; private set; }

    /// <summary>Set when a command timed out or the controller failed: the owner should reset it.</summary>
    public bool NeedsReset { get; internal set; }

    /// <summary>Asks the owner to reset the controller (it polls <see cref="NeedsReset"/>), e.g. after a failed abort.</summary>
    public void RequestReset() => NeedsReset = true;

    /// <summary>A reset started by <see cref="StartReset"/> has not finished: the admin queue and every I/O queue pair refuse submissions (-ENXIO).</summary>
    public bool IsResetting => _resetting;

    /// <summary>Why the last reset failed (null when it did not).</summary>
    public string? ResetError { get; private set; }

    /// <summary>Incremented each time a reset re-enables the controller: queues created before no longer exist on it.</summary>
    public long Generation => Volatile.Read(ref _generation);

    internal bool QueuesMayExist(long generation) => generation >= 0 && generation == Volatile.Read(ref _generation);

    /// <summary>CAP.TO in <see cref="Ticks"/>.</summary>
    public long ReadyTimeoutTicks => (long)(Cap.Timeout.TotalSeconds * Ticks.Frequency);

    /// <summary><see cref="NvmeControllerOptions.AdminTimeout"/> in <see cref="Ticks"/>.</summary>
    public long AdminTimeoutTicks => (long)(_opts.AdminTimeout.TotalSeconds * Ticks.Frequency);

    /// <summary>Bound of a queue pair connect that cannot get an admin slot (each admin command has its own timeout).</summary>
    internal long ConnectTimeoutTicks => 3 * AdminTimeoutTicks;

    /// <summary>How completions signal (MSI-X vectors, INTx, or none: polled only).</summary>
    public DeviceInterruptMode InterruptMode { get; private set; }

    /// <summary>Interrupt vectors in use (MSI-X: vector 0 is the admin queue's, I/O queues share 1..n-1; INTx: 1).</summary>
    public int InterruptVectors => _irqFds.Count;

    private IReadOnlyList<EventFd> _irqFds = [];
    private Action? _unmask;

    /// <summary>
    /// Turns on interrupts: one MSI-X vector for the admin queue (AER) and one per I/O queue pair when the device
    /// has enough (else I/O queues share them round robin), or the INTx line for all. Each vector signals an eventfd
    /// (VFIO_DEVICE_SET_IRQS) that a sleeping reactor watches. Without either the queues are polled only.
    /// </summary>
    private void SetUpInterrupts(VfioPciDevice dev)
    {
        try
        {
            var mode = dev.EnableInterrupts(1 + Math.Min(MaxIoQueuePairs, 256));
            UseInterrupts(mode, dev.InterruptFds, mode == DeviceInterruptMode.Intx ? dev.UnmaskIntx : null);
        }
        catch (IOException e)
        {
            _log.LogWarning("NVMe {Name}: no interrupts ({Error}); queues are polled only", Name, e.Message);
        }
    }

    /// <summary>
    /// Sets the interrupt eventfds (the VFIO device's, or a model's): queue pairs created afterwards enable interrupts
    /// on their completion queue. <paramref name="unmask"/>: INTx's unmask, called before a reactor sleeps.
    /// </summary>
    public void UseInterrupts(DeviceInterruptMode mode, IReadOnlyList<EventFd> fds, Action? unmask = null)
    {
        InterruptMode = fds.Count == 0 ? DeviceInterruptMode.None : mode;
        _irqFds = InterruptMode == DeviceInterruptMode.None ? [] : fds;
        _unmask = unmask;
        _log.LogInformation("NVMe {Name}: interrupts {Mode}, {Vectors} vector(s)", Name, InterruptMode, _irqFds.Count);
    }

    /// <summary>The vector of a queue id (-1: no interrupts): admin 0; I/O queues 1..n-1 round robin (all 0 with one vector).</summary>
    public int VectorFor(ushort qid)
    {
        int n = _irqFds.Count;
        return n == 0 ? -1 : qid == 0 || n == 1 ? 0 : 1 + ((qid - 1) % (n - 1));
    }

    /// <summary>The eventfd a vector signals (null without interrupts).</summary>
    public EventFd? InterruptFd(int vector) => vector >= 0 && vector < _irqFds.Count ? _irqFds[vector] : null;

    /// <summary>INTx: unmask the line after reaping (VFIO masked it when it fired). No-op for MSI-X.</summary>
    public void UnmaskInterrupt() => _unmask?.Invoke();

    /// <summary>Whether the admin completion queue holds an unreaped entry (a phase-bit peek: no lock, any thread).</summary>
    public bool AdminCompletionPending => _admin is not null && _admin.HasCompletion;

    /// <summary>Raised (on the thread that processes admin completions) for each Asynchronous Event: the completion's DW0.</summary>
    public Action<NvmeController, uint>? AsyncEvent { get; set; }

    /// <summary>Attaches the controller at a PCI address bound to vfio-pci (the shared VFIO container and DMA space).</summary>
    public static NvmeController AttachPci(string address, NvmeControllerOptions? opts = null, ILogger? log = null)
    {
        var dev = VfioPciDevice.Open(address);
        try
        {
            var dma = DmaSpace.ForVfio(log);
            var regs = new MmioRegisters(dev.Bar0, dev.Bar0Size);
            var ctrl = new NvmeController(dev.Address, regs, dma, opts, log, dev);
            ctrl.Initialize();
            ctrl.SetUpInterrupts(dev);
            if (dev.EnableRequestNotifier())
            {
                ctrl.UseRemovalNotifier(dev.RequestFd, dev.Release);
            }
            else
            {
                // Without it an unbind (or removal) of the device blocks in the kernel until the controller is detached.
                ctrl.UseRemovalNotifier(null, dev.Release);
                log?.LogWarning("NVMe {Name}: the kernel offers no device request notifier (VFIO_PCI_REQ_IRQ_INDEX): unbinding the device waits for bdev_nvme_detach_controller", dev.Address);
            }

            return ctrl;
        }
        catch
        {
            dev.Dispose();
            throw;
        }
    }

    /// <summary>Attaches through any register file and DMA space (in-process models). <paramref name="owner"/> is disposed with the controller.</summary>
    public static NvmeController Attach(string name, NvmeRegisters regs, DmaSpace dma, NvmeControllerOptions? opts = null, ILogger? log = null, IDisposable? owner = null)
    {
        var ctrl = new NvmeController(name, regs, dma, opts, log, owner);
        try
        {
            ctrl.Initialize();
            return ctrl;
        }
        catch
        {
            ctrl.Dispose();
            throw;
        }
    }

    private void Initialize()
    {
        Cap = new NvmeCap(Registers.Read64(NvmeReg.Cap));
        if (Cap.Raw == ulong.MaxValue)
        {
            throw new IOException($"{Name}: registers read as all ones (device not responding)");
        }

        if (Cap.MaxQueueEntries < 2)
        {
            // MQES is 0's based and 0 is reserved: a queue needs two entries at least (one is always kept empty).
            throw new IOException($"{Name}: CAP.MQES is 0 (a queue of one entry): not a usable controller (CAP 0x{Cap.Raw:x})");
        }

        Version = Registers.Read32(NvmeReg.Vs);
        if (!Cap.NvmCommandSet)
        {
            throw new IOException($"{Name}: controller does not support the NVM command set (CAP 0x{Cap.Raw:x})");
        }

        // 4 KiB pages (MPS = 0) when allowed, else the smallest the controller supports.
        _mps = Math.Max(0, Cap.MpsMin);
        if (_mps > Cap.MpsMax)
        {
            throw new IOException($"{Name}: bad CAP.MPSMIN/MPSMAX");
        }

        PageSize = 4096 << _mps;
        if (PageSize != 4096)
        {
            throw new IOException($"{Name}: controller needs {PageSize}-byte pages; only 4096 is supported");
        }

        _adminBuf = Dma.Allocate(16384, "vb-nvme-adminbuf");
        int adminEntries = Math.Clamp(_opts.AdminQueueEntries, 2, Math.Min(4096, Cap.MaxQueueEntries));
        _admin = new NvmeQueuePair(this, 0, adminEntries, PageSize, Cap.DoorbellStride) { TimeoutTicks = AdminTimeoutTicks };
        EnableController();

        var identify = new byte[4096];
        var st = Identify(1, 0, identify);
        if (!st.IsSuccess)
        {
            throw new IOException($"{Name}: Identify Controller failed: {st}");
        }

        Data = NvmeControllerData.Parse(identify);
        uint mdtsBytes = Data.Mdts == 0 ? uint.MaxValue : (uint)Math.Min((1UL << Data.Mdts) * (4096UL << Cap.MpsMin), uint.MaxValue);
        MaxTransferBytes = Math.Min(mdtsBytes, (uint)(PageSize / 8 * PageSize)); // one PRP list page, no chaining

        SetNumberOfQueues();
        IoQueueEntries = Math.Clamp(_opts.IoQueueEntries, 2, Math.Min(4096, Cap.MaxQueueEntries));
        ScanNamespaces();
        ConfigureAsyncEvents();
        PostAsyncEventRequests();
        _log.LogInformation("NVMe {Name}: {Model} sn {Serial} fw {Fw}, {Ns} namespace(s), {Qp} I/O queue pairs of {Entries}, max transfer {Mdts} bytes",
            Name, Data.ModelNumber, Data.SerialNumber, Data.FirmwareRevision, Namespaces.Count, MaxIoQueuePairs, IoQueueEntries, MaxTransferBytes);
    }

    /// <summary>
    /// Bring-up (attach, on a control thread): CC.EN=0, wait RDY=0, program the admin queue, CC (IOSQES/IOCQES/MPS)
    /// with EN=1, wait RDY=1; each wait bounded by CAP.TO.
    /// </summary>
    private void EnableController()
    {
        uint cc = Registers.Read32(NvmeReg.Cc);
        if ((cc & NvmeReg.CcEn) != 0)
        {
            Registers.Write32(NvmeReg.Cc, cc & ~NvmeReg.CcEn);
        }

        WaitReady(false);
        ProgramAdminQueueAndEnable();
        WaitReady(true);
        _admin.MarkConnected();
    }

    /// <summary>With CSTS.RDY = 0: empty admin rings, AQA/ASQ/ACQ, then CC without and with EN.</summary>
    private void ProgramAdminQueueAndEnable()
    {
        _admin.ResetRings();
        uint q = (uint)(_admin.Entries - 1);
        Registers.Write32(NvmeReg.Aqa, q | (q << 16));
        Registers.Write64(NvmeReg.Asq, _admin.SqIova);
        Registers.Write64(NvmeReg.Acq, _admin.CqIova);
        Registers.Write32(NvmeReg.Cc, NvmeReg.MakeCc(_mps, enable: false));
        Registers.Write32(NvmeReg.Cc, NvmeReg.MakeCc(_mps, enable: true));
    }

    /// <summary>Attach only (a control thread): waits for CSTS.RDY, spinning briefly, then sleeping 1 ms between reads.</summary>
    private void WaitReady(bool ready)
    {
        long deadline = Ticks.Now() + ReadyTimeoutTicks;
        int spins = 0;
        while (true)
        {
            uint csts = Registers.Read32(NvmeReg.Csts);
            if (csts == uint.MaxValue)
            {
                throw new IOException($"{Name}: device removed (CSTS reads all ones)");
            }

            if (((csts & NvmeReg.CstsRdy) != 0) == ready)
            {
                return;
            }

            if (ready && (csts & NvmeReg.CstsCfs) != 0)
            {
                throw new IOException($"{Name}: controller fatal status while enabling (CSTS 0x{csts:x})");
            }

            if (Ticks.Now() - deadline > 0)
            {
                throw new TimeoutException($"{Name}: CSTS.RDY did not become {(ready ? 1 : 0)} within CAP.TO ({Cap.Timeout.TotalMilliseconds} ms)");
            }

            if (++spins > 100)
            {
                Thread.Sleep(1);
            }
        }
    }

    private void SetNumberOfQueues()
    {
        int want = Math.Clamp(_opts.IoQueuesRequested, 1, 65535);
        uint dw11 = (uint)(want - 1) | ((uint)(want - 1) << 16);
        var st = ExecuteAdmin(MakeCommand(NvmeAdminOpcode.SetFeatures, 0, NvmeFeature.NumberOfQueues, dw11), null, out uint dw0);
        if (!st.IsSuccess)
        {
            throw new IOException($"{Name}: Set Features (number of queues) failed: {st}");
        }

        int sq = (int)(dw0 & 0xFFFF) + 1;
        int cq = (int)(dw0 >> 16) + 1;
        MaxIoQueuePairs = Math.Min(want, Math.Min(sq, cq));
    }

    /// <summary>Reads the active namespace list (CNS 2; falls back to 1..NN) and identifies each namespace (CNS 0).</summary>
    public void ScanNamespaces()
    {
        var list = new List<uint>();
        var buf = new byte[4096];
        var st = Identify(2, 0, buf);
        if (st.IsSuccess)
        {
            for (int i = 0; i < 1024; i++)
            {
                uint id = BitConverter.ToUInt32(buf, i * 4);
                if (id == 0)
                {
                    break;
                }

                list.Add(id);
            }
        }
        else
        {
            for (uint id = 1; id <= Math.Min(Data.NamespaceCount, 1024u); id++)
            {
                list.Add(id);
            }
        }

        var namespaces = new List<NvmeNamespace>();
        foreach (uint id in list)
        {
            Array.Clear(buf);
            st = Identify(0, id, buf);
            if (!st.IsSuccess)
            {
                _log.LogWarning("NVMe {Name}: Identify Namespace {Nsid} failed: {Status}", Name, id, st);
                continue;
            }

            var data = NvmeNamespaceData.Parse(id, buf);
            if (!data.IsActive)
            {
                continue;
            }

            if (data.BlockSize < 512 || data.BlockSize > 65536 || data.MetadataSize != 0)
            {
                _log.LogWarning("NVMe {Name}: namespace {Nsid} skipped (block size {Bs}, metadata {Ms})", Name, id, data.BlockSize, data.MetadataSize);
                continue;
            }

            namespaces.Add(new NvmeNamespace(this, data));
        }

        Namespaces = namespaces;
    }

    public NvmeNamespace? GetNamespace(uint nsid)
    {
        foreach (var ns in Namespaces)
        {
            if (ns.Id == nsid)
            {
                return ns;
            }
        }

        return null;
    }

    internal static NvmeCommand MakeCommand(byte opcode, uint nsid, uint cdw10 = 0, uint cdw11 = 0)
    {
        NvmeCommand c = default;
        c.Opcode = opcode;
        c.Nsid = nsid;
        c.Cdw10 = cdw10;
        c.Cdw11 = cdw11;
        return c;
    }

    /// <summary>Identify with a 4096-byte result (CNS 0 namespace, 1 controller, 2 active namespace list).</summary>
    public NvmeStatus Identify(byte cns, uint nsid, Span<byte> result)
    {
        var cmd = MakeCommand(NvmeAdminOpcode.Identify, nsid, cns);
        return ExecuteAdmin(cmd, result.Length >= 4096 ? result[..4096] : result, out _);
    }

    /// <summary>Get Log Page (e.g. <see cref="NvmeLogPage.Error"/>, <see cref="NvmeLogPage.SmartHealth"/>), up to 16 KiB.</summary>
    public NvmeStatus GetLogPage(byte logId, Span<byte> result, uint nsid = 0xFFFFFFFF, ulong offset = 0)
    {
        if (result.Length == 0 || result.Length % 4 != 0 || result.Length > 16384)
        {
            throw new ArgumentException("log page length must be a multiple of 4, at most 16384");
        }

        uint numd = (uint)(result.Length / 4) - 1;
        var cmd = MakeCommand(NvmeAdminOpcode.GetLogPage, nsid, logId | ((numd & 0xFFFF) << 16), numd >> 16);
        cmd.Cdw12 = (uint)offset;
        cmd.Cdw13 = (uint)(offset >> 32);
        return ExecuteAdmin(cmd, result, out _);
    }

    public NvmeStatus GetFeatures(byte featureId, out uint dw0, uint cdw11 = 0) =>
        ExecuteAdmin(MakeCommand(NvmeAdminOpcode.GetFeatures, 0, featureId, cdw11), null, out dw0);

    public NvmeStatus SetFeatures(byte featureId, uint cdw11, out uint dw0) =>
        ExecuteAdmin(MakeCommand(NvmeAdminOpcode.SetFeatures, 0, featureId, cdw11), null, out dw0);

    /// <summary>Abort command <paramref name="cid"/> on SQ <paramref name="sqid"/>. <paramref name="aborted"/> is DW0 bit 0 clear. Synchronous (control threads).</summary>
    public NvmeStatus Abort(ushort sqid, ushort cid, out bool aborted)
    {
        var st = ExecuteAdmin(MakeCommand(NvmeAdminOpcode.Abort, 0, sqid | ((uint)cid << 16)), null, out uint dw0);
        aborted = st.IsSuccess && (dw0 & 1) == 0;
        return st;
    }

    /// <summary>Submits an Abort of command <paramref name="cid"/> on SQ <paramref name="sqid"/>; the command was aborted when the status is success and DW0 bit 0 is clear. Returns 0 or -errno (see <see cref="SubmitAdmin"/>).</summary>
    public int SubmitAbort(ushort sqid, ushort cid, NvmeCompletionCallback cb, object? arg)
    {
        var cmd = MakeCommand(NvmeAdminOpcode.Abort, 0, sqid | ((uint)cid << 16));
        return SubmitAdmin(ref cmd, cb, arg);
    }

    public NvmeStatus KeepAlive() => ExecuteAdmin(MakeCommand(NvmeAdminOpcode.KeepAlive, 0), null, out _);

    /// <summary>
    /// Submits an admin command without waiting (SPDK's spdk_nvme_ctrlr_cmd_admin_raw): any PRPs must already point at
    /// DMA memory. Any thread. Returns 0, and <paramref name="cb"/> fires exactly once, from
    /// <see cref="ProcessAdminCompletions"/> on whichever thread calls it (a completion, or "abort requested" when the
    /// command expired after <see cref="NvmeControllerOptions.AdminTimeout"/>, or "aborted: SQ deletion" when a reset
    /// failed it); or returns -ENXIO (controller resetting, failed or disposed) or -ENOMEM (admin queue full) and
    /// <paramref name="cb"/> never fires. Callbacks must be short: they run with the admin queue's lock held.
    /// </summary>
    public int SubmitAdmin(ref NvmeCommand cmd, NvmeCompletionCallback cb, object? arg)
    {
        lock (_adminLock)
        {
            if (_disposed || _removed)
            {
                return -6; // ENXIO
            }

            return _admin.Submit(ref cmd, cb, arg, noTimeout: false);
        }
    }

    private sealed class AdminWait
    {
        public int Done;
        public NvmeStatus Status;
        public uint Dw0;
    }

    private static readonly NvmeCompletionCallback s_adminDone = static (arg, status, dw0) =>
    {
        var w = (AdminWait)arg!;
        w.Status = status;
        w.Dw0 = dw0;
        Volatile.Write(ref w.Done, 1);
    };

    /// <summary>
    /// Runs one admin command synchronously (control threads, tools, tests; never a reactor that serves I/O). Data
    /// (up to 16 KiB) goes through the controller's admin DMA buffer: copied in before (for data-out commands the
    /// caller's span is the source), out after. On timeout the command is expired ("abort requested") and the
    /// controller marked <see cref="NeedsReset"/>.
    /// </summary>
    public NvmeStatus ExecuteAdmin(NvmeCommand cmd, Span<byte> data, out uint dw0, bool dataOut = false)
    {
        dw0 = 0;
        if (data.Length > (int)_adminBuf.Size)
        {
            throw new ArgumentException("admin data larger than the admin buffer");
        }

        lock (_syncLock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            if (data.Length > 0)
            {
                var buf = new Span<byte>((void*)_adminBuf.Va, data.Length);
                if (dataOut)
                {
                    data.CopyTo(buf);
                }
                else
                {
                    buf.Clear();
                }

                cmd.Prp1 = _adminBuf.Iova;
                cmd.Prp2 = data.Length > PageSize ? _adminBuf.Iova + (ulong)PageSize : 0;
                if (data.Length > 2 * PageSize)
                {
                    // Build a PRP list in the last page of the admin buffer for 8-16 KiB transfers.
                    ulong* list = (ulong*)(_adminBuf.Va + (nint)(_adminBuf.Size - (ulong)PageSize));
                    int pages = (data.Length + PageSize - 1) / PageSize;
                    if (pages > 3)
                    {
                        throw new ArgumentException("admin data too large");
                    }

                    for (int i = 1; i < pages; i++)
                    {
                        list[i - 1] = _adminBuf.Iova + (ulong)(i * PageSize);
                    }

                    cmd.Prp2 = _adminBuf.Iova + _adminBuf.Size - (ulong)PageSize;
                }
            }

            var w = new AdminWait();
            int rc = SubmitAdmin(ref cmd, s_adminDone, w);
            if (rc != 0)
            {
                return NvmeStatus.Make(NvmeSct.Generic, NvmeSc.InternalDeviceError, dnr: false);
            }

            // The expiry in ProcessAdminCompletions normally ends the wait; this deadline only guards against it not running.
            long deadline = Ticks.Now() + (2 * AdminTimeoutTicks);
            int spins = 0;
            while (Volatile.Read(ref w.Done) == 0)
            {
                ProcessAdminCompletions();
                if (Volatile.Read(ref w.Done) != 0)
                {
                    break;
                }

                if (Ticks.Now() - deadline > 0)
                {
                    NeedsReset = true;
                    _log.LogError("NVMe {Name}: admin command 0x{Opc:x2} timed out", Name, cmd.Opcode);
                    return NvmeStatus.AbortRequested;
                }

                if ((++spins & 0x3FF) == 0)
                {
                    uint csts = Registers.Read32(NvmeReg.Csts);
                    if (csts == uint.MaxValue || (csts & NvmeReg.CstsCfs) != 0)
                    {
                        NeedsReset = true;
                        return NvmeStatus.InternalDeviceError;
                    }
                }

                if (spins > 200)
                {
                    Thread.Sleep(0);
                }
            }

            dw0 = w.Dw0;
            if (w.Status.IsSuccess && data.Length > 0 && !dataOut)
            {
                new Span<byte>((void*)_adminBuf.Va, data.Length).CopyTo(data);
            }

            return w.Status;
        }
    }

    private static readonly NvmeTimeoutCallback s_adminTimeout = static (ctx, qp, cid) =>
    {
        var ctrl = (NvmeController)ctx!;
        qp.IsOutstanding(cid, out byte opcode);
        ctrl._log.LogError("NVMe {Name}: admin command 0x{Opc:x2} (cid {Cid}) timed out; the controller needs a reset", ctrl.Name, opcode, cid);
        ctrl.NeedsReset = true;
        qp.ExpireCommand(cid, NvmeStatus.AbortRequested);
    };

    private static readonly NvmeCompletionCallback s_aerDone = static (arg, status, dw0) =>
    {
        var ctrl = (NvmeController)arg!;
        ctrl._aersOutstanding--;
        if (status == NvmeStatus.AbortedSqDeletion || ctrl._disposed)
        {
            return; // reset or shutdown: re-posted by whoever reset
        }

        if (status.IsSuccess)
        {
            ctrl._log.LogInformation("NVMe {Name}: asynchronous event 0x{Dw0:x8}", ctrl.Name, dw0);
            ctrl.AsyncEvent?.Invoke(ctrl, dw0);
        }

        if (status.Sct == NvmeSct.CommandSpecific && status.Sc == 0x05)
        {
            return; // AER limit exceeded
        }

        ctrl.PostOneAer();
    };

    private void PostAsyncEventRequests()
    {
        lock (_adminLock)
        {
            int limit = Math.Min(_opts.AsyncEventRequests, Data.AsyncEventLimit + 1);
            limit = Math.Min(limit, _admin.Entries / 2);
            while (_aersOutstanding < limit)
            {
                if (!PostOneAer())
                {
                    break;
                }
            }
        }
    }

    private bool PostOneAer()
    {
        var cmd = MakeCommand(NvmeAdminOpcode.AsyncEventRequest, 0);
        if (_admin.Submit(ref cmd, s_aerDone, this, noTimeout: true) != 0)
        {
            return false;
        }

        _aersOutstanding++;
        return true;
    }

    /// <summary>The Asynchronous Event Configuration we set: namespace attribute notices when OAES offers them (SPDK's nvme_ctrlr_configure_aer).</summary>
    public uint AsyncEventConfig => (Data.Oaes & NvmeAsyncEvent.NamespaceAttributeNotices) != 0 ? NvmeAsyncEvent.NamespaceAttributeNotices : 0;

    /// <summary>Attach: turns on the optional notices the controller offers (a reset turns them off again: see <see cref="FinishSetFeatures"/>).</summary>
    private void ConfigureAsyncEvents()
    {
        uint aec = AsyncEventConfig;
        if (aec == 0)
        {
            return;
        }

        var st = SetFeatures(NvmeFeature.AsyncEventConfiguration, aec, out _);
        if (!st.IsSuccess)
        {
            _log.LogWarning("NVMe {Name}: Set Features (asynchronous event configuration 0x{Aec:x}) failed: {Status}; namespace changes are not reported", Name, aec, st);
        }
    }

    private static readonly NvmeCompletionCallback s_aecDone = static (arg, status, dw0) =>
    {
        var ctrl = (NvmeController)arg!;
        if (!status.IsSuccess && status != NvmeStatus.AbortedSqDeletion)
        {
            ctrl._log.LogWarning("NVMe {Name}: Set Features (asynchronous event configuration) after the reset failed: {Status}", ctrl.Name, status);
        }
    };

    /// <summary>Outstanding Asynchronous Event Requests.</summary>
    public int AsyncEventRequestsOutstanding => _aersOutstanding;

    /// <summary>
    /// Admin poller body, any thread: reaps admin completions (firing their callbacks), expires admin commands older
    /// than the admin timeout, checks controller health every ~100 ms. Never blocks: returns 0 when another thread
    /// is in it. Returns completions reaped.
    /// </summary>
    public int ProcessAdminCompletions()
    {
        if (!Monitor.TryEnter(_adminLock))
        {
            return 0;
        }

        try
        {
            if (_disposed || _removed)
            {
                return 0;
            }

            int n = _admin.ProcessCompletions();
            long now = Ticks.Now();
            _admin.CheckTimeouts(now, s_adminTimeout, this);
            if (now - _lastHealthCheck > Ticks.Frequency / 10)
            {
                _lastHealthCheck = now;
                if (!_resetting && CheckHealth() is NvmeHealth.Fatal or NvmeHealth.Removed)
                {
                    NeedsReset = true;
                }
            }

            return n;
        }
        finally
        {
            Monitor.Exit(_adminLock);
        }
    }

    public NvmeHealth CheckHealth()
    {
        uint csts = Registers.Read32(NvmeReg.Csts);
        if (csts == uint.MaxValue)
        {
            return NvmeHealth.Removed;
        }

        if ((csts & NvmeReg.CstsCfs) != 0)
        {
            return NvmeHealth.Fatal;
        }

        return (csts & NvmeReg.CstsRdy) != 0 ? NvmeHealth.Ok : NvmeHealth.NotReady;
    }

    /// <summary>
    /// Allocates an I/O queue pair (a queue id and its memory) without creating it on the controller: the caller's
    /// thread owns it from now on and creates it with <see cref="NvmeQueuePair.StartConnect"/> /
    /// <see cref="NvmeQueuePair.PollConnect"/>. Throws when no queue id is left.
    /// </summary>
    /// <summary>
    /// Keeps the DMA memory of <paramref name="count"/> I/O queue pairs (default size) allocated and mapped, so that
    /// <see cref="CreateIoQueuePair"/> on a reactor makes no VFIO call (see <see cref="DmaSpace.Reserve"/>). Off the reactors.
    /// Given back when the controller detaches (<see cref="Dispose"/>).
    /// </summary>
    public void ReserveIoQueueMemory(int count) =>
        ReserveDma(NvmeQueuePair.DmaBytes(IoQueueEntries, PageSize), Math.Min(count, MaxIoQueuePairs), "vb-nvme-qpair");

    /// <summary>
    /// Keeps <paramref name="count"/> regions of <paramref name="size"/> bytes of <see cref="Dma"/> mapped for this
    /// controller's channels (<see cref="DmaSpace.Reserve"/>), until the controller detaches: <see cref="Dispose"/> gives
    /// the reserve back, so a controller detached and attached again does not map its channel memory twice (the space
    /// is shared by every controller of the process). Off the reactors.
    /// </summary>
    public void ReserveDma(ulong size, int count, string name)
    {
        var r = Dma.Reserve(size, count, name);
        bool keep;
        lock (_reservations)
        {
            keep = !_disposed;
            if (keep)
            {
                _reservations.Add(r);
            }
        }

        if (!keep)
        {
            r.Dispose(); // detached meanwhile
        }
    }

    public NvmeQueuePair CreateIoQueuePair(int entries = 0)
    {
        ushort qid;
        lock (_ioQpairs)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            qid = 0;
            for (int i = 1; i <= MaxIoQueuePairs; i++)
            {
                if (!_qidUsed[i])
                {
                    qid = (ushort)i;
                    break;
                }
            }

            if (qid == 0)
            {
                throw new InvalidOperationException($"{Name}: all {MaxIoQueuePairs} I/O queue pairs are in use");
            }

            _qidUsed[qid] = true;
        }

        try
        {
            int n = entries <= 0 ? IoQueueEntries : Math.Clamp(entries, 2, Math.Min(4096, Cap.MaxQueueEntries));
            var qp = new NvmeQueuePair(this, qid, n, PageSize, Cap.DoorbellStride)
            {
                TimeoutTicks = (long)(_opts.IoTimeout.TotalSeconds * Ticks.Frequency),
                InterruptVector = VectorFor(qid),
            };
            lock (_ioQpairs)
            {
                _ioQpairs.Add(qp);
            }

            return qp;
        }
        catch
        {
            lock (_ioQpairs)
            {
                _qidUsed[qid] = false;
            }

            throw;
        }
    }

    /// <summary>
    /// Synchronous allocation for tools and tests: <see cref="CreateIoQueuePair"/>, then connects it, waiting. Throws
    /// when the controller has no queue left or refuses.
    /// </summary>
    public NvmeQueuePair AllocIoQueuePair(int entries = 0)
    {
        var qp = CreateIoQueuePair(entries);
        int rc = qp.Reconnect();
        if (rc != 0)
        {
            qp.Dispose();
            throw new IOException($"{Name}: creating I/O queue pair {qp.Id} failed ({rc})");
        }

        return qp;
    }

    public IReadOnlyList<NvmeQueuePair> IoQueuePairs
    {
        get
        {
            lock (_ioQpairs)
            {
                return _ioQpairs.ToArray();
            }
        }
    }

    internal void LogQueueFailure(NvmeQueuePair qp, int step, NvmeStatus st, int rc)
    {
        string what = step switch { 0 => "Delete I/O SQ", 1 => "Delete I/O CQ", 2 => "Create I/O CQ", _ => "Create I/O SQ" };
        _log.LogError("NVMe {Name}: {What} {Qid} failed: {Status} ({Rc})", Name, what, qp.Id, st, rc);
    }

    internal void ReleaseQueuePair(NvmeQueuePair qp)
    {
        lock (_ioQpairs)
        {
            _ioQpairs.Remove(qp);
            _orphans.Remove(qp);
            _qidUsed[qp.Id] = false;
        }
    }

    /// <summary>A destroyed queue pair whose queues the controller did not confirm deleted: freed by the next reset or the detach.</summary>
    internal void Orphan(NvmeQueuePair qp)
    {
        lock (_ioQpairs)
        {
            if (!_orphans.Contains(qp))
            {
                _orphans.Add(qp);
            }
        }
    }

    internal bool IsOrphan(NvmeQueuePair qp)
    {
        lock (_ioQpairs)
        {
            return _orphans.Contains(qp);
        }
    }

    private void FreeOrphans()
    {
        NvmeQueuePair[] orphans;
        lock (_ioQpairs)
        {
            orphans = _orphans.ToArray();
            _orphans.Clear();
        }

        foreach (var qp in orphans)
        {
            qp.Free();
        }
    }

    private EventFd? _requestFd;
    private Action? _release;
    private volatile bool _removed;
    private int _removalRequested;

    /// <summary>
    /// Sets the device's removal notifier: <paramref name="requestFd"/> is signalled when the kernel wants the device
    /// back (VFIO's device request; a model's eventfd in tests) and <paramref name="release"/> gives it back
    /// (<see cref="VfioPciDevice.Release"/>). Either may be null.
    /// </summary>
    public void UseRemovalNotifier(EventFd? requestFd, Action? release)
    {
        _requestFd = requestFd;
        _release = release;
    }

    /// <summary>The eventfd the kernel signals when it wants the device back (null: no notifier).</summary>
    public EventFd? RemovalRequestFd => _requestFd;

    /// <summary>
    /// Whether the kernel asked for the device back (reads the request eventfd without blocking: one syscall). Once
    /// true it stays true. Any thread; the owner calls it from a poller with <see cref="RemovalRequestFd"/> as wake source.
    /// </summary>
    public bool PollRemovalRequest()
    {
        if (Volatile.Read(ref _removalRequested) != 0)
        {
            return true;
        }

        var fd = _requestFd;
        if (fd is null || _disposed || fd.DrainCount() == 0)
        {
            return false;
        }

        Volatile.Write(ref _removalRequested, 1);
        return true;
    }

    /// <summary>The controller was hot-removed (<see cref="MarkRemoved"/>): nothing is sent to the device any more.</summary>
    public bool IsRemoved => _removed;

    /// <summary>Why it was removed (null while it is not).</summary>
    public string? RemovedReason { get; private set; }

    /// <summary>
    /// Hot removal, step one (any thread, never waits): from now on nothing is submitted to the device: every queue
    /// pair and the admin queue refuse submissions (-ENXIO), outstanding admin commands complete with "aborted: SQ
    /// deletion", a reset under way fails and no new one starts. Outstanding I/O is failed by the queue pairs'
    /// owners (<see cref="NvmeQueuePair.FailOutstanding"/> on their threads). Idempotent.
    /// </summary>
    public void MarkRemoved(string why)
    {
        lock (_adminLock)
        {
            if (_removed)
            {
                return;
            }

            RemovedReason = why;
            _removed = true;
            _log.LogError("NVMe {Name}: removed ({Why})", Name, why);
            lock (_ioQpairs)
            {
                foreach (var qp in _ioQpairs)
                {
                    qp.MarkDisconnected();
                }
            }

            if (_admin is not null)
            {
                _admin.MarkDisconnected();
                _admin.FailOutstanding(NvmeStatus.AbortedSqDeletion);
            }

            _aersOutstanding = 0;
            if (_resetting)
            {
                FailReset("device removed");
            }
        }
    }

    /// <summary>
    /// Hot removal, step two (a control thread: closing a VFIO device resets the function, which can take a while):
    /// <see cref="MarkRemoved"/>, then gives the device back (<see cref="VfioPciDevice.Release"/>: BAR0 reads all ones
    /// from now on, the device and group fds are closed, so the kernel's unbind or removal completes). The memory the
    /// device used stays allocated until <see cref="Dispose"/>, after the queue pairs' owners let go. Idempotent.
    /// </summary>
    public void ReleaseDevice(string why)
    {
        MarkRemoved(why);
        Interlocked.Exchange(ref _release, null)?.Invoke();
    }

    /// <summary>
    /// Starts a controller reset without waiting (SPDK bdev_nvme's disconnect/reconnect): every I/O queue pair and the
    /// admin queue are marked disconnected (submissions fail with -ENXIO from now on) and CC.EN is cleared.
    /// <see cref="PollReset"/> advances it: wait CSTS.RDY=0 (CAP.TO) → fail outstanding admin commands (aborted: SQ
    /// deletion) → program the admin queue, CC.EN=1 → wait CSTS.RDY=1 (CAP.TO) → Set Features (number of queues) →
    /// re-post asynchronous event requests. The controller data and namespaces are not identified again (a reset
    /// does not change them; namespace-change events are not acted on yet: namespaces are scanned at attach). The I/O queue pairs stay
    /// disconnected until their owners reconnect them (<see cref="NvmeQueuePair.StartConnect"/>, which fails their
    /// outstanding commands with a retryable status). Returns false when a reset is already running or the
    /// controller is disposed.
    /// </summary>
    public bool StartReset()
    {
        lock (_adminLock)
        {
            if (_disposed || _resetting || _removed)
            {
                return false;
            }

            _resetting = true;
            _lastReset = NvmeResetState.InProgress;
            ResetError = null;
            _resetTimedOut = false;
            lock (_ioQpairs)
            {
                foreach (var qp in _ioQpairs)
                {
                    qp.MarkDisconnected();
                }
            }

            _admin.MarkDisconnected();
            _log.LogWarning("NVMe {Name}: resetting controller", Name);
            uint cc = Registers.Read32(NvmeReg.Cc);
            if (cc == uint.MaxValue)
            {
                FailReset("device removed");
                return true;
            }

            Registers.Write32(NvmeReg.Cc, cc & ~NvmeReg.CcEn);
            _resetStep = ResetWaitNotReady;
            _resetDeadline = Ticks.Now() + ReadyTimeoutTicks;
            return true;
        }
    }

    private static readonly NvmeCompletionCallback s_resetCmdDone = static (arg, status, dw0) =>
    {
        var ctrl = (NvmeController)arg!;
        ctrl._resetCmdStatus = status;
        ctrl._resetCmdDw0 = dw0;
        Volatile.Write(ref ctrl._resetCmdDone, 1);
    };

    /// <summary>
    /// Advances a reset started by <see cref="StartReset"/>; never waits (a register read or two, at most one admin
    /// submission and one reap). Returns <see cref="NvmeResetState.InProgress"/> until the reset succeeded or failed
    /// (a wait for CSTS.RDY longer than CAP.TO, fatal status, removal, the admin command failing or timing out);
    /// afterwards it keeps returning that result. Call it from one thread at a time (the owner's poller).
    /// </summary>
    public NvmeResetState PollReset()
    {
        if (!_resetting)
        {
            return _lastReset;
        }

        lock (_adminLock)
        {
            if (!_resetting)
            {
                return _lastReset;
            }

            if (_removed)
            {
                return FailReset("device removed");
            }

            long now = Ticks.Now();
            switch (_resetStep)
            {
                case ResetWaitNotReady:
                {
                    uint csts = Registers.Read32(NvmeReg.Csts);
                    if (csts == uint.MaxValue)
                    {
                        return FailReset("device removed (CSTS reads all ones)");
                    }

                    if ((csts & NvmeReg.CstsRdy) != 0)
                    {
                        return now - _resetDeadline > 0 ? FailReset($"CSTS.RDY did not become 0 within CAP.TO ({Cap.Timeout.TotalMilliseconds} ms)", timedOut: true) : NvmeResetState.InProgress;
                    }

                    // Disabled: the device has forgotten every queue and command.
                    _admin.FailOutstanding(NvmeStatus.AbortedSqDeletion);
                    _aersOutstanding = 0;
                    Interlocked.Increment(ref _generation);
                    FreeOrphans();
                    ProgramAdminQueueAndEnable();
                    _resetStep = ResetWaitReady;
                    _resetDeadline = Ticks.Now() + ReadyTimeoutTicks;
                    return NvmeResetState.InProgress;
                }

                case ResetWaitReady:
                {
                    uint csts = Registers.Read32(NvmeReg.Csts);
                    if (csts == uint.MaxValue)
                    {
                        return FailReset("device removed (CSTS reads all ones)");
                    }

                    if ((csts & NvmeReg.CstsCfs) != 0)
                    {
                        return FailReset($"controller fatal status while enabling (CSTS 0x{csts:x})");
                    }

                    if ((csts & NvmeReg.CstsRdy) == 0)
                    {
                        return now - _resetDeadline > 0 ? FailReset($"CSTS.RDY did not become 1 within CAP.TO ({Cap.Timeout.TotalMilliseconds} ms)", timedOut: true) : NvmeResetState.InProgress;
                    }

                    _admin.MarkConnected();
                    int want = Math.Clamp(_opts.IoQueuesRequested, 1, 65535);
                    var cmd = MakeCommand(NvmeAdminOpcode.SetFeatures, 0, NvmeFeature.NumberOfQueues, (uint)(want - 1) | ((uint)(want - 1) << 16));
                    _resetCmdDone = 0;
                    if (_admin.Submit(ref cmd, s_resetCmdDone, this, noTimeout: false) != 0)
                    {
                        return FailReset("could not submit Set Features");
                    }

                    _resetStep = ResetWaitSetFeatures;
                    _admin.ProcessCompletions();
                    return Volatile.Read(ref _resetCmdDone) != 0 ? FinishSetFeatures() : NvmeResetState.InProgress;
                }

                default:
                    ProcessAdminCompletions(); // also expires the command after the admin timeout
                    return Volatile.Read(ref _resetCmdDone) != 0 ? FinishSetFeatures() : NvmeResetState.InProgress;
            }
        }
    }

    private NvmeResetState FinishSetFeatures()
    {
        if (!_resetCmdStatus.IsSuccess)
        {
            return FailReset($"Set Features (number of queues) failed: {_resetCmdStatus}", timedOut: _resetCmdStatus == NvmeStatus.AbortRequested);
        }

        int granted = (int)Math.Min(_resetCmdDw0 & 0xFFFF, _resetCmdDw0 >> 16) + 1;
        if (granted < MaxIoQueuePairs)
        {
            _log.LogWarning("NVMe {Name}: the controller grants {Granted} I/O queue pairs after the reset, {Had} before", Name, granted, MaxIoQueuePairs);
            MaxIoQueuePairs = granted;
        }

        NeedsReset = false;
        ResetCount++;
        _resetStep = 0;
        _lastReset = NvmeResetState.Succeeded;
        _resetting = false;
        if (AsyncEventConfig != 0)
        {
            // Features are back to their defaults after a reset: ask for the notices again (not waited for).
            var aec = MakeCommand(NvmeAdminOpcode.SetFeatures, 0, NvmeFeature.AsyncEventConfiguration, AsyncEventConfig);
            _admin.Submit(ref aec, s_aecDone, this, noTimeout: false);
        }

        PostAsyncEventRequests();
        return NvmeResetState.Succeeded;
    }

    private NvmeResetState FailReset(string why, bool timedOut = false)
    {
        _log.LogError("NVMe {Name}: reset failed: {Why}", Name, why);
        ResetError = why;
        NeedsReset = false; // no automatic retry loop: the owner decides (another reset, or detach)
        _resetTimedOut = timedOut;
        _admin.MarkDisconnected();
        _resetStep = 0;
        _lastReset = NvmeResetState.Failed;
        _resetting = false;
        return NvmeResetState.Failed;
    }

    /// <summary>
    /// Synchronous reset for tools and tests (never on a reactor that serves I/O): <see cref="StartReset"/>, then
    /// <see cref="PollReset"/> until done. The I/O queue pairs stay disconnected (see <see cref="ResetAll"/>). Throws
    /// <see cref="TimeoutException"/> when CSTS.RDY or the admin command timed out, <see cref="IOException"/> otherwise.
    /// </summary>
    public void Reset()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (!StartReset())
        {
            throw new InvalidOperationException($"{Name}: a reset is already in progress");
        }

        NvmeResetState st;
        while ((st = PollReset()) == NvmeResetState.InProgress)
        {
            Thread.Yield();
        }

        if (st == NvmeResetState.Failed)
        {
            throw _resetTimedOut ? new TimeoutException($"{Name}: {ResetError}") : new IOException($"{Name}: {ResetError}");
        }
    }

    /// <summary>Reset plus reconnect of every I/O queue pair, for a caller that owns all of them (tools, tests).</summary>
    public void ResetAll()
    {
        Reset();
        foreach (var qp in IoQueuePairs)
        {
            int rc = qp.Reconnect();
            if (rc != 0)
            {
                throw new IOException($"{Name}: reconnecting queue pair {qp.Id} failed ({rc})");
            }
        }
    }

    /// <summary>Normal shutdown notification (CC.SHN = 01b), waiting for CSTS.SHST = complete within CAP.TO. Detach only (a control thread).</summary>
    public void Shutdown()
    {
        lock (_adminLock)
        {
            uint cc = Registers.Read32(NvmeReg.Cc);
            if (cc == uint.MaxValue || (cc & NvmeReg.CcEn) == 0)
            {
                return;
            }

            Registers.Write32(NvmeReg.Cc, (cc & ~(3u << 14)) | (1u << 14));
            long deadline = Ticks.Now() + ReadyTimeoutTicks;
            while (Ticks.Now() - deadline < 0)
            {
                uint csts = Registers.Read32(NvmeReg.Csts);
                if (csts == uint.MaxValue || ((csts >> 2) & 3) == 2)
                {
                    return;
                }

                Thread.Sleep(1);
            }

            _log.LogWarning("NVMe {Name}: shutdown did not complete within CAP.TO", Name);
        }
    }

    /// <summary>
    /// Detaches: the I/O queue pairs must have been disposed by their owners (any left are abandoned), then
    /// shutdown notification, controller disabled, memory freed, VFIO device closed.
    /// </summary>
    public void Dispose()
    {
        lock (_adminLock)
        {
            if (_disposed)
            {
                return;
            }

            if (_admin is not null)
            {
                try
                {
                    foreach (var qp in IoQueuePairs)
                    {
                        qp.MarkDisconnected();
                    }

                    Shutdown();
                    uint cc = Registers.Read32(NvmeReg.Cc);
                    if (cc != uint.MaxValue)
                    {
                        Registers.Write32(NvmeReg.Cc, cc & ~NvmeReg.CcEn);
                    }
                }
                catch (Exception e) when (e is IOException or TimeoutException)
                {
                    _log.LogWarning("NVMe {Name}: error while detaching: {Error}", Name, e.Message);
                }
            }

            _disposed = true;

            // Disabled (or gone): queue pairs being deleted, or left by a refused delete, can be freed now.
            foreach (var qp in IoQueuePairs)
            {
                if (qp.IsDeleting)
                {
                    qp.Free();
                }
            }

            FreeOrphans();
            _admin?.Dispose();
            _adminBuf?.Dispose();
            ReleaseReservations();
            _owner?.Dispose();
        }
    }

    /// <summary>The channel memory reserved for this controller goes back (idle regions are unmapped now, the rest when freed).</summary>
    private void ReleaseReservations()
    {
        DmaReservation[] rs;
        lock (_reservations)
        {
            rs = _reservations.ToArray();
            _reservations.Clear();
        }

        foreach (var r in rs)
        {
            r.Dispose();
        }
    }
}
