using System.Diagnostics;
using VhostBackend.Nvme;
using VhostBackend.Platform;
using Xunit;

namespace VhostBackend.Nvme.Tests;

/// <summary>The driver against the in-process controller MODEL (<see cref="NvmeControllerModel"/>), no device.</summary>
public unsafe class ControllerModelTests : IDisposable
{
    private readonly DmaSpace _space = new(IdentityDmaMapper.Instance);
    private readonly NvmeControllerModel _model;
    private readonly NvmeController _ctrl;
    private readonly DmaBufferPool _pool;

    public ControllerModelTests()
    {
        _model = new NvmeControllerModel(_space, blocks: 4096, blockSize: 512, mqes: 63);
        _ctrl = NvmeController.Attach("model0", _model, _space, new NvmeControllerOptions { IoQueueEntries = 16, IoQueuesRequested = 4 });
        _pool = new DmaBufferPool(_space, 32, 128 * 1024);
    }

    public void Dispose()
    {
        foreach (var qp in _ctrl.IoQueuePairs)
        {
            qp.Dispose();
        }

        _ctrl.Dispose();
        _pool.Dispose();
    }

    private sealed class Done
    {
        public int Count;
        public NvmeStatus Last;
        public List<NvmeStatus> All { get; } = new();
    }

    private static readonly NvmeCompletionCallback s_done = static (arg, status, dw0) =>
    {
        var d = (Done)arg!;
        d.Count++;
        d.Last = status;
        d.All.Add(status);
    };

    private static readonly NvmeCompletionCallback s_count = static (arg, status, dw0) => ((int[])arg!)[status.IsSuccess ? 0 : 1]++;

    private NvmeStatus Sync(NvmeQueuePair qp, Func<Done, int> submit)
    {
        var d = new Done();
        Assert.Equal(0, submit(d));
        for (int i = 0; i < 100 && d.Count == 0; i++)
        {
            qp.ProcessCompletions();
        }

        Assert.Equal(1, d.Count);
        return d.Last;
    }

    private nint Buffer(out NvmeIoVec[] iov, int bytes)
    {
        Assert.True(_pool.TryGet(out nint va, out _));
        iov = new[] { new NvmeIoVec(va, (nuint)bytes) };
        return va;
    }

    [Fact]
    public void BringUpFollowsTheSpecAndIdentifies()
    {
        Assert.Equal(1, _model.EnableTransitions);
        uint cc = _model.LastCcOnEnable;
        Assert.Equal(6u, (cc >> 16) & 0xF);
        Assert.Equal(4u, (cc >> 20) & 0xF);
        Assert.Equal("MODEL123", _ctrl.Data.SerialNumber);
        Assert.Equal("VhostBackend NVMe model", _ctrl.Data.ModelNumber);
        Assert.Single(_ctrl.Namespaces);
        var ns = _ctrl.Namespaces[0];
        Assert.Equal(1u, ns.Id);
        Assert.Equal(512u, ns.BlockSize);
        Assert.Equal(4096UL, ns.BlockCount);
        Assert.Equal(1, ns.Data.LbaFormatIndex);
        Assert.Equal(4, _ctrl.MaxIoQueuePairs);
        Assert.Equal(16, _ctrl.IoQueueEntries);
        Assert.Equal(128u * 1024, _ctrl.MaxTransferBytes); // MDTS 5
        Assert.Equal(4, _ctrl.AsyncEventRequestsOutstanding); // min(options 4, AERL+1 = 4)
        Assert.Equal(4, _model.PendingAers);
        Assert.Equal(new byte[] { NvmeAdminOpcode.Identify, NvmeAdminOpcode.SetFeatures, NvmeAdminOpcode.Identify, NvmeAdminOpcode.Identify },
            _model.AdminOpcodes.Take(4).ToArray());
    }

    [Fact]
    public void WriteReadCompareRoundTripsAcrossQueuePairs()
    {
        var ns = _ctrl.Namespaces[0];
        var qp1 = _ctrl.AllocIoQueuePair();
        var qp2 = _ctrl.AllocIoQueuePair();
        Assert.NotEqual(qp1.Id, qp2.Id);
        Assert.Equal(2, _model.IoQueuesLive);
        nint va = Buffer(out var iov, 8192);
        new Span<byte>((void*)va, 8192).Fill(0x5A);
        Assert.True(Sync(qp1, d => qp1.Write(ns, 10, 16, iov, s_done, d)).IsSuccess);
        Assert.True(_model.Disk.Slice(10 * 512, 8192).IndexOfAnyExcept((byte)0x5A) < 0);
        new Span<byte>((void*)va, 8192).Clear();
        Assert.True(Sync(qp2, d => qp2.Read(ns, 10, 16, iov, s_done, d)).IsSuccess);
        Assert.True(new Span<byte>((void*)va, 8192).IndexOfAnyExcept((byte)0x5A) < 0);
        Assert.True(Sync(qp2, d => qp2.Compare(ns, 10, 16, iov, s_done, d)).IsSuccess);
        *(byte*)(va + 4000) = 1;
        Assert.True(Sync(qp2, d => qp2.Compare(ns, 10, 16, iov, s_done, d)).IsCompareFailure);
        Assert.Equal(0, _model.DmaFaults);
    }

    [Fact]
    public void InterruptsSignalEachQueuesVectorAndArmingReportsPostedCompletions()
    {
        // The model's MSI-X: 3 vectors (admin + 2), as VFIO delivers them (eventfd writes).
        var fds = new[] { new EventFd(), new EventFd(), new EventFd() };
        try
        {
            _model.InterruptFds = fds;
            _ctrl.UseInterrupts(DeviceInterruptMode.Msix, fds);
            Assert.Equal(0, _ctrl.VectorFor(0));
            var ns = _ctrl.Namespaces[0];
            var qp1 = _ctrl.AllocIoQueuePair();
            var qp2 = _ctrl.AllocIoQueuePair();
            var qp3 = _ctrl.AllocIoQueuePair();
            Assert.Equal(1, _model.CqVector(qp1.Id)); // IEN with its own vector
            Assert.Equal(2, _model.CqVector(qp2.Id));
            Assert.Equal(1, _model.CqVector(qp3.Id)); // more queues than vectors: shared round robin
            Assert.True(fds[0].DrainCount() > 0, "admin completions (queue creation) did not raise vector 0");
            Assert.Same(fds[1], qp1.InterruptFd);
            Assert.False(qp1.ArmInterrupt()); // idle: may sleep
            Assert.Equal(0UL, fds[1].DrainCount());

            nint va = Buffer(out var iov, 4096);
            var d = new Done();
            Assert.Equal(0, qp1.Read(ns, 0, 8, iov, s_done, d));
            Assert.True(fds[1].DrainCount() > 0, "the completion raised no interrupt on the queue's vector");
            Assert.Equal(0UL, fds[2].DrainCount());
            Assert.True(qp1.HasCompletion);
            Assert.True(qp1.ArmInterrupt()); // posted before the owner would sleep: it must not
            Assert.Equal(0, d.Count); // a peek reaps nothing
            Assert.Equal(1, qp1.ProcessCompletions());
            Assert.Equal(1, d.Count);
            Assert.False(qp1.ArmInterrupt());
            Assert.False(_ctrl.AdminCompletionPending);
        }
        finally
        {
            _model.InterruptFds = [];
            foreach (var f in fds)
            {
                f.Dispose();
            }
        }
    }

    [Fact]
    public void WithoutInterruptsCompletionQueuesArePolledOnly()
    {
        var qp = _ctrl.AllocIoQueuePair();
        Assert.Equal(-1, qp.InterruptVector);
        Assert.Equal(-1, _model.CqVector(qp.Id));
        Assert.Null(qp.InterruptFd);
        Assert.Equal(DeviceInterruptMode.None, _ctrl.InterruptMode);
    }

    [Fact]
    public void LargeScatterGatherUsesAPrpList()
    {
        var ns = _ctrl.Namespaces[0];
        var qp = _ctrl.AllocIoQueuePair();
        Assert.True(_pool.TryGet(out nint a, out _));
        Assert.True(_pool.TryGet(out nint b, out _));
        var iovs = new[] { new NvmeIoVec(a + 1024, 3072), new NvmeIoVec(b, 16384), new NvmeIoVec(a + 65536, 5120) };
        int total = 3072 + 16384 + 5120;
        byte v = 0;
        foreach (var io in iovs)
        {
            var s = new Span<byte>((void*)io.Base, (int)io.Length);
            for (int i = 0; i < s.Length; i++)
            {
                s[i] = v++;
            }
        }

        Assert.True(Sync(qp, d => qp.Write(ns, 100, (uint)(total / 512), iovs, s_done, d)).IsSuccess);
        Assert.Equal(1, _model.PrpListsSeen);
        var disk = _model.Disk.Slice(100 * 512, total);
        for (int i = 0; i < total; i++)
        {
            Assert.Equal((byte)i, disk[i]);
        }
    }

    [Fact]
    public void PhaseTagWrapsAndDoorbellsAreRungPerSubmitAndPerBatch()
    {
        var ns = _ctrl.Namespaces[0];
        var qp = _ctrl.AllocIoQueuePair(4); // 4 entries: 3 trackers, wraps every 4 completions
        nint va = Buffer(out var iov, 512);
        var counts = new int[2];
        int sqBefore = _model.SqDoorbellWrites;
        int cqBefore = _model.CqDoorbellWrites;
        for (int round = 0; round < 10; round++)
        {
            for (int i = 0; i < 3; i++)
            {
                Assert.Equal(0, qp.Read(ns, (ulong)i, 1, iov, s_count, counts));
            }

            Assert.Equal(-12, qp.Read(ns, 0, 1, iov, s_count, counts)); // ENOMEM: no tracker left
            Assert.Equal(3, qp.ProcessCompletions());
        }

        Assert.Equal(30, counts[0]);
        Assert.Equal(0, counts[1]);
        Assert.Equal(30, _model.SqDoorbellWrites - sqBefore);
        Assert.Equal(10, _model.CqDoorbellWrites - cqBefore); // one per batch
        Assert.Equal(0, qp.Outstanding);
    }

    [Fact]
    public void CompletionsArriveLaterWhenTheDeviceIsSlowAndCanBeReapedInPieces()
    {
        var ns = _ctrl.Namespaces[0];
        var qp = _ctrl.AllocIoQueuePair(8);
        nint va = Buffer(out var iov, 512);
        var counts = new int[2];
        _model.ManualProcessing = true;
        for (int i = 0; i < 5; i++)
        {
            Assert.Equal(0, qp.Read(ns, (ulong)i, 1, iov, s_count, counts));
        }

        Assert.Equal(0, qp.ProcessCompletions());
        _model.ProcessAll();
        Assert.Equal(2, qp.ProcessCompletions(2));
        Assert.Equal(3, qp.ProcessCompletions());
        Assert.Equal(5, counts[0]);
    }

    [Fact]
    public void FlushWriteZeroesAndDeallocate()
    {
        var ns = _ctrl.Namespaces[0];
        var qp = _ctrl.AllocIoQueuePair();
        nint va = Buffer(out var iov, 4096);
        new Span<byte>((void*)va, 4096).Fill(7);
        Assert.True(Sync(qp, d => qp.Write(ns, 0, 8, iov, s_done, d)).IsSuccess);
        Assert.True(Sync(qp, d => qp.Flush(ns, s_done, d)).IsSuccess);
        Assert.Equal(1, _model.FlushCount);
        Assert.True(Sync(qp, d => qp.WriteZeroes(ns, 0, 4, false, s_done, d)).IsSuccess);
        Assert.True(_model.Disk[..2048].IndexOfAnyExcept((byte)0) < 0);
        Assert.Equal(7, _model.Disk[2048]);
        Assert.True(Sync(qp, d => qp.Deallocate(ns, 4, 4, s_done, d)).IsSuccess);
        Assert.True(_model.Disk[..4096].IndexOfAnyExcept((byte)0) < 0);
    }

    [Fact]
    public void InvalidSubmissionsAreRejectedWithoutCallbacks()
    {
        var ns = _ctrl.Namespaces[0];
        var qp = _ctrl.AllocIoQueuePair();
        nint va = Buffer(out var iov, 4096);
        var counts = new int[2];
        Assert.Equal(-22, qp.Read(ns, 4095, 8, iov, s_count, counts));            // beyond the namespace
        Assert.Equal(-22, qp.Read(ns, 0, 4, iov, s_count, counts));               // length != blocks * 512
        Assert.Equal(-22, qp.Read(ns, 0, 0, iov, s_count, counts));
        Assert.Equal(-22, qp.Read(ns, 0, 512, new[] { new NvmeIoVec(va, 256 * 1024) }, s_count, counts)); // > MDTS
        var heap = new byte[4096];
        fixed (byte* h = heap)
        {
            Assert.Equal(-14, qp.Read(ns, 0, 8, new[] { new NvmeIoVec((nint)h, 4096) }, s_count, counts));
        }

        Assert.Equal(0, qp.ProcessCompletions());
        Assert.Equal(new[] { 0, 0 }, counts);
    }

    [Fact]
    public void TimeoutIsReportedOnceAndAbortCompletesTheCommand()
    {
        var ns = _ctrl.Namespaces[0];
        var qp = _ctrl.AllocIoQueuePair();
        qp.TimeoutTicks = 1;
        nint va = Buffer(out var iov, 512);
        var d = new Done();
        _model.HoldIo = true;
        Assert.Equal(0, qp.Read(ns, 0, 1, iov, s_done, d));
        Thread.Sleep(2);
        var timedOut = new List<ushort>();
        NvmeTimeoutCallback onTimeout = (ctx, q, cid) => ((List<ushort>)ctx!).Add(cid);
        Assert.Equal(1, qp.CheckTimeouts(Ticks.Now(), onTimeout, timedOut));
        Assert.Equal(0, qp.CheckTimeouts(Ticks.Now(), onTimeout, timedOut));
        Assert.True(qp.IsOutstanding(timedOut[0], out byte opc));
        Assert.Equal(NvmeIoOpcode.Read, opc);
        Assert.True(_ctrl.Abort(qp.Id, timedOut[0], out bool aborted).IsSuccess);
        Assert.True(aborted);
        qp.ProcessCompletions();
        Assert.Equal(1, d.Count);
        Assert.Equal(NvmeStatus.AbortRequested, d.Last);
        Assert.False(_ctrl.Abort(qp.Id, timedOut[0], out aborted).IsSuccess && aborted);
    }

    [Fact]
    public void ResetFailsOutstandingIoOnceAndQueuePairsWorkAfterwards()
    {
        var ns = _ctrl.Namespaces[0];
        var qp1 = _ctrl.AllocIoQueuePair();
        var qp2 = _ctrl.AllocIoQueuePair();
        nint va = Buffer(out var iov, 512);
        var d = new Done();
        _model.HoldIo = true;
        for (int i = 0; i < 5; i++)
        {
            Assert.Equal(0, qp1.Read(ns, (ulong)i, 1, iov, s_done, d));
            Assert.Equal(0, qp2.Read(ns, (ulong)i, 1, iov, s_done, d));
        }

        _ctrl.Reset();
        Assert.False(qp1.IsConnected);
        Assert.Equal(-6, qp1.Read(ns, 0, 1, iov, s_done, d)); // ENXIO until reconnected
        Assert.Equal(0, qp1.Reconnect());
        Assert.Equal(0, qp2.Reconnect());
        Assert.Equal(10, d.Count);
        Assert.All(d.All, s => Assert.Equal(NvmeStatus.AbortedSqDeletion, s));
        Assert.Equal(2, _model.EnableTransitions);
        Assert.Equal(1, _ctrl.ResetCount);
        Assert.Equal(4, _model.PendingAers); // re-posted after the reset
        _model.HoldIo = false;
        Assert.True(Sync(qp1, x => qp1.Read(ns, 0, 1, iov, s_done, x)).IsSuccess);
        Assert.True(Sync(qp2, x => qp2.Read(ns, 0, 1, iov, s_done, x)).IsSuccess);
        Assert.Equal(10, d.Count); // nothing completed twice
    }

    [Fact]
    public void FatalStatusIsDetectedAndResetRecovers()
    {
        var qp = _ctrl.AllocIoQueuePair();
        Assert.Equal(NvmeHealth.Ok, _ctrl.CheckHealth());
        _model.InjectFatal();
        Assert.Equal(NvmeHealth.Fatal, _ctrl.CheckHealth());
        Thread.Sleep(120);
        _ctrl.ProcessAdminCompletions();
        Assert.True(_ctrl.NeedsReset);
        _ctrl.ResetAll();
        Assert.False(_ctrl.NeedsReset);
        Assert.Equal(NvmeHealth.Ok, _ctrl.CheckHealth());
        Assert.True(qp.IsConnected);
    }

    [Fact]
    public void RemovedDeviceIsDetected()
    {
        _model.Removed = true;
        Assert.Equal(NvmeHealth.Removed, _ctrl.CheckHealth());
        Assert.Throws<IOException>(() => _ctrl.Reset());
        _model.Removed = false;
    }

    [Fact]
    public void AsyncEventsAreDeliveredAndRequestsReposted()
    {
        uint seen = 0;
        _ctrl.AsyncEvent = (c, dw0) => seen = dw0;
        Assert.True(_model.RaiseAsyncEvent(0x00020002));
        Assert.Equal(1, _ctrl.ProcessAdminCompletions());
        Assert.Equal(0x00020002u, seen);
        Assert.Equal(4, _model.PendingAers);
        Assert.Equal(4, _ctrl.AsyncEventRequestsOutstanding);
    }

    [Fact]
    public void LogPagesAndFeatures()
    {
        var smart = new byte[512];
        Assert.True(_ctrl.GetLogPage(NvmeLogPage.SmartHealth, smart).IsSuccess);
        Assert.Equal(310, BitConverter.ToUInt16(smart, 1));
        var big = new byte[12288]; // needs the admin PRP list
        Assert.True(_ctrl.GetLogPage(NvmeLogPage.Error, big).IsSuccess);
        Assert.True(_ctrl.GetFeatures(NvmeFeature.NumberOfQueues, out uint dw0).IsSuccess);
        Assert.Equal(0x00030003u, dw0);
        Assert.True(_ctrl.KeepAlive().IsSuccess);
        Assert.Equal(0, _model.DmaFaults);
    }

    [Fact]
    public void QueuePairsAreLimitedAndReleased()
    {
        var qps = Enumerable.Range(0, 4).Select(_ => _ctrl.AllocIoQueuePair()).ToList();
        Assert.Throws<InvalidOperationException>(() => _ctrl.AllocIoQueuePair());
        qps[1].Dispose();
        Assert.Equal(3, _model.IoQueuesLive);
        var again = _ctrl.AllocIoQueuePair();
        Assert.Equal(qps[1].Id, again.Id);
    }

    [Fact]
    public void HotPathAllocatesNothing()
    {
        var ns = _ctrl.Namespaces[0];
        var qp = _ctrl.AllocIoQueuePair();
        nint va = Buffer(out var iov, 4096);
        var counts = new int[2];
        for (int i = 0; i < 100; i++)
        {
            qp.Read(ns, 0, 8, iov, s_count, counts);
            qp.ProcessCompletions();
        }

        // The model allocates (it is a test double): let it run outside the measured windows.
        _model.ManualProcessing = true;
        long allocated = 0;
        for (int round = 0; round < 100; round++)
        {
            long t0 = GC.GetAllocatedBytesForCurrentThread();
            int failures = 0;
            for (int i = 0; i < 15; i++)
            {
                failures += qp.Read(ns, (ulong)i, 8, iov, s_count, counts) == 0 ? 0 : 1;
            }

            long t1 = GC.GetAllocatedBytesForCurrentThread();
            _model.ProcessAll();
            long t2 = GC.GetAllocatedBytesForCurrentThread();
            int reaped = qp.ProcessCompletions();
            allocated += (t1 - t0) + (GC.GetAllocatedBytesForCurrentThread() - t2);
            Assert.Equal(0, failures);
            Assert.Equal(15, reaped);
        }

        Assert.Equal(0, allocated);
        Assert.Equal(1600, counts[0]);
    }
}
