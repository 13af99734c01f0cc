using System.Diagnostics;
using VhostBackend.Nvme;
using VhostBackend.Platform;
using Xunit;

namespace VhostBackend.Nvme.Tests;

/// <summary>
/// The non-blocking control path (asynchronous admin commands, the reset and queue pair state machines) against the
/// in-process controller MODEL (<see cref="NvmeControllerModel"/>, not a device). "Never waits" is checked as: every
/// single call returns within a bound far below the waits it replaces (CAP.TO, the admin timeout).
/// </summary>
public sealed unsafe class NonBlockingControlPathTests : IDisposable
{
    // A single poll must not wait: generous against a loaded machine (100 ms preemptions seen with 2 shared cores),
    // below the waits it replaces (CAP.TO: 1 s in the model; the admin timeout here: 300 ms).
    private const double MaxCallMs = 200;

    private readonly DmaSpace _space = new(IdentityDmaMapper.Instance);
    private readonly NvmeControllerModel _model;
    private readonly NvmeController _ctrl;
    private readonly DmaBufferPool _pool;

    public NonBlockingControlPathTests()
    {
        _model = new NvmeControllerModel(_space, blocks: 4096, blockSize: 512, mqes: 63);
        _ctrl = NvmeController.Attach("model0", _model, _space, new NvmeControllerOptions { IoQueueEntries = 16, IoQueuesRequested = 4, AdminTimeout = TimeSpan.FromMilliseconds(300) });
        _pool = new DmaBufferPool(_space, 4, 4096);
    }

    public void Dispose()
    {
        _model.HoldAdmin = false;
        _model.NeverReady = false;
        foreach (var qp in _ctrl.IoQueuePairs)
        {
            qp.Dispose();
        }

        _ctrl.Dispose();
        _pool.Dispose();
    }

    private sealed class Result
    {
        public int Count;
        public NvmeStatus Status;
        public uint Dw0;
    }

    private static readonly NvmeCompletionCallback s_result = static (arg, status, dw0) =>
    {
        var r = (Result)arg!;
        r.Count++;
        r.Status = status;
        r.Dw0 = dw0;
    };

    /// <summary>Calls <paramref name="poll"/> until it returns something other than <paramref name="inProgress"/>; returns the result, the polls, the longest call and the total time.</summary>
    private static (T Result, int Polls, double MaxCallMs, double TotalMs) PollUntil<T>(Func<T> poll, T inProgress, TimeSpan limit)
    {
        var total = Stopwatch.StartNew();
        double maxCall = 0;
        int polls = 0;
        while (true)
        {
            long t0 = Ticks.Now();
            var r = poll();
            maxCall = Math.Max(maxCall, Ticks.ToMicroseconds(Ticks.Now() - t0) / 1000);
            polls++;
            if (!EqualityComparer<T>.Default.Equals(r, inProgress))
            {
                return (r, polls, maxCall, total.Elapsed.TotalMilliseconds);
            }

            Assert.True(total.Elapsed < limit, $"still in progress after {limit}");
            Thread.Sleep(1);
        }
    }

    private static NvmeCommand GetFeatures(byte fid)
    {
        NvmeCommand c = default;
        c.Opcode = NvmeAdminOpcode.GetFeatures;
        c.Cdw10 = fid;
        return c;
    }

    private int ReadOne(NvmeQueuePair qp, Result r)
    {
        _pool.TryGet(out nint va, out _);
        var iov = new NvmeIoVec(va, 512);
        int rc = qp.Read(_ctrl.Namespaces[0], 0, 1, new ReadOnlySpan<NvmeIoVec>(ref iov), s_result, r);
        _pool.Return(va);
        return rc;
    }

    [Fact]
    public void ResetIsPolledStepByStepAndIoQueuePairsReconnectByPolling()
    {
        var qp = _ctrl.AllocIoQueuePair();
        _model.ReadyDelayReads = 20; // the controller takes 20 CSTS reads to become ready again
        Assert.True(_ctrl.StartReset());
        Assert.True(_ctrl.IsResetting);
        Assert.False(_ctrl.StartReset()); // one at a time
        Assert.False(qp.IsConnected);
        Assert.Equal(-6, ReadOne(qp, new Result())); // -ENXIO while resetting: the bdev module queues and retries

        var (st, polls, maxCall, _) = PollUntil(_ctrl.PollReset, NvmeResetState.InProgress, TimeSpan.FromSeconds(5));
        Assert.Equal(NvmeResetState.Succeeded, st);
        Assert.True(polls >= 20, $"{polls} polls");
        Assert.True(maxCall < MaxCallMs, $"a PollReset call took {maxCall} ms");
        Assert.Equal(1, _ctrl.ResetCount);
        Assert.False(_ctrl.IsResetting);
        Assert.False(_ctrl.NeedsReset);
        Assert.True(_ctrl.AsyncEventRequestsOutstanding > 0);

        // The queue pair is reconnected by its owner, by polling; the queues were gone, so no delete first.
        int before = _model.AdminOpcodes.Count;
        Assert.Equal(0, qp.StartConnect());
        var (rc, _, maxConnectCall, _) = PollUntil(qp.PollConnect, 0, TimeSpan.FromSeconds(5));
        Assert.Equal(1, rc);
        Assert.True(maxConnectCall < MaxCallMs);
        Assert.Equal(new[] { NvmeAdminOpcode.CreateIoCq, NvmeAdminOpcode.CreateIoSq }, _model.AdminOpcodes.Skip(before).ToArray());
        var r = new Result();
        Assert.Equal(0, ReadOne(qp, r));
        qp.ProcessCompletions();
        Assert.Equal(1, r.Count);
        Assert.True(r.Status.IsSuccess);
    }

    [Fact]
    public void ResetOfAControllerThatNeverBecomesReadyFailsAfterCapTimeoutWithoutBlockingTheCaller()
    {
        var qp = _ctrl.AllocIoQueuePair();
        var held = new Result();
        _model.HoldIo = true;
        Assert.Equal(0, ReadOne(qp, held));
        _model.NeverReady = true;
        Assert.True(_ctrl.StartReset());
        var (st, polls, maxCall, totalMs) = PollUntil(_ctrl.PollReset, NvmeResetState.InProgress, TimeSpan.FromSeconds(10));
        Assert.Equal(NvmeResetState.Failed, st);
        double capTo = _ctrl.Cap.Timeout.TotalMilliseconds;
        Assert.True(totalMs >= capTo * 0.9, $"failed after {totalMs} ms, before CAP.TO ({capTo} ms)");
        Assert.True(maxCall < MaxCallMs, $"a PollReset call took {maxCall} ms");
        Assert.True(polls > 10);
        Assert.Contains("CAP.TO", _ctrl.ResetError, StringComparison.Ordinal);
        Assert.Equal(NvmeResetState.Failed, _ctrl.PollReset()); // stays failed

        // The controller is unusable: the queue pair cannot connect (no hang), the outstanding read failed retryably.
        Assert.Equal(0, qp.StartConnect());
        Assert.Equal(1, held.Count);
        Assert.Equal(NvmeStatus.AbortedSqDeletion, held.Status);
        Assert.True(qp.PollConnect() < 0);

        // The synchronous wrapper reports the same as a TimeoutException.
        Assert.Throws<TimeoutException>(_ctrl.Reset);

        // A controller that comes back: the next reset works, and so does the queue pair.
        _model.NeverReady = false;
        _model.HoldIo = false;
        _ctrl.ResetAll();
        var r = new Result();
        Assert.Equal(0, ReadOne(qp, r));
        qp.ProcessCompletions();
        Assert.True(r.Status.IsSuccess);
    }

    [Fact]
    public void AdminCommandsCompleteThroughTheAdminPollerAndATimedOutOneIsExpiredAndAsksForAReset()
    {
        // A normal one: the callback fires from ProcessAdminCompletions, not from the submit.
        var r = new Result();
        var cmd = GetFeatures(NvmeFeature.NumberOfQueues);
        Assert.Equal(0, _ctrl.SubmitAdmin(ref cmd, s_result, r));
        Assert.Equal(0, r.Count);
        _ctrl.ProcessAdminCompletions();
        Assert.Equal(1, r.Count);
        Assert.True(r.Status.IsSuccess);

        // The controller swallows the next one: it is expired after the admin timeout (300 ms) by the poller.
        _model.HoldAdmin = true;
        var lost = new Result();
        cmd = GetFeatures(NvmeFeature.NumberOfQueues);
        Assert.Equal(0, _ctrl.SubmitAdmin(ref cmd, s_result, lost));
        var (count, _, maxCall, totalMs) = PollUntil(() => { _ctrl.ProcessAdminCompletions(); return lost.Count; }, 0, TimeSpan.FromSeconds(5));
        Assert.Equal(1, count);
        Assert.Equal(NvmeStatus.AbortRequested, lost.Status);
        Assert.True(totalMs >= 250, $"expired after {totalMs} ms");
        Assert.True(maxCall < MaxCallMs);
        Assert.True(_ctrl.NeedsReset);

        // Expired once only, even if polled again; a synchronous command times out the same way.
        _ctrl.ProcessAdminCompletions();
        Assert.Equal(1, lost.Count);
        Assert.Equal(NvmeStatus.AbortRequested, _ctrl.GetFeatures(NvmeFeature.NumberOfQueues, out _));

        // The reset frees the expired commands' slots; the admin queue works again.
        _model.HoldAdmin = false;
        _ctrl.Reset();
        Assert.False(_ctrl.NeedsReset);
        Assert.True(_ctrl.GetFeatures(NvmeFeature.NumberOfQueues, out _).IsSuccess);
        Assert.Equal(1, lost.Count);
    }

    [Fact]
    public void AsyncAbortOfAnIoCommand()
    {
        var qp = _ctrl.AllocIoQueuePair();
        _model.HoldIo = true;
        var io = new Result();
        Assert.Equal(0, ReadOne(qp, io));
        var ab = new Result();
        Assert.Equal(0, _ctrl.SubmitAbort(qp.Id, 0, s_result, ab));
        _ctrl.ProcessAdminCompletions();
        Assert.Equal(1, ab.Count);
        Assert.True(ab.Status.IsSuccess);
        Assert.Equal(0u, ab.Dw0 & 1); // aborted
        qp.ProcessCompletions();
        Assert.Equal(1, io.Count);
        Assert.Equal(NvmeStatus.AbortRequested, io.Status);
        _model.HoldIo = false;
    }

    [Fact]
    public void QueuePairIsCreatedByPollingAndRefusesIoUntilConnected()
    {
        var qp = _ctrl.CreateIoQueuePair();
        Assert.False(qp.IsConnected);
        Assert.Equal(0, _model.IoQueuesLive);
        Assert.Equal(-6, ReadOne(qp, new Result()));
        Assert.Equal(0, qp.StartConnect());
        Assert.True(qp.IsConnecting);
        var (rc, _, maxCall, _) = PollUntil(qp.PollConnect, 0, TimeSpan.FromSeconds(5));
        Assert.Equal(1, rc);
        Assert.True(maxCall < MaxCallMs);
        Assert.Equal(1, _model.IoQueuesLive);

        // Reconnect without a reset: the queues still exist, so they are deleted first.
        int before = _model.AdminOpcodes.Count;
        Assert.Equal(0, qp.StartConnect());
        Assert.Equal(1, PollUntil(qp.PollConnect, 0, TimeSpan.FromSeconds(5)).Result);
        Assert.Equal(new[] { NvmeAdminOpcode.DeleteIoSq, NvmeAdminOpcode.DeleteIoCq, NvmeAdminOpcode.CreateIoCq, NvmeAdminOpcode.CreateIoSq }, _model.AdminOpcodes.Skip(before).ToArray());
        Assert.Equal(1, _model.IoQueuesLive);
    }

    [Fact]
    public void QueuePairCreateThatTheControllerNeverAnswersFailsAfterTheAdminTimeout()
    {
        var qp = _ctrl.CreateIoQueuePair();
        _model.HoldAdmin = true;
        Assert.Equal(0, qp.StartConnect());
        var (rc, _, maxCall, totalMs) = PollUntil(qp.PollConnect, 0, TimeSpan.FromSeconds(5));
        Assert.Equal(-Platform.Errno.EIO, rc);
        Assert.Equal(-Platform.Errno.EIO, qp.ConnectError);
        Assert.True(totalMs >= 250, $"failed after {totalMs} ms");
        Assert.True(maxCall < MaxCallMs);
        Assert.True(_ctrl.NeedsReset);
        Assert.False(qp.IsConnected);

        // After a reset (the expired command is gone with the old admin queue) it connects.
        _model.HoldAdmin = false;
        _ctrl.ResetAll();
        Assert.True(qp.IsConnected);
    }

    [Fact]
    public void QueuePairDeletionIsAsynchronousAndFreesAfterTheControllerConfirms()
    {
        var qp = _ctrl.AllocIoQueuePair();
        ushort qid = qp.Id;
        var after = new Flag();
        qp.BeginDestroy(after);
        Assert.True(qp.IsDeleting || qp.IsDestroyed);
        for (int i = 0; i < 10 && !qp.IsDestroyed; i++)
        {
            _ctrl.ProcessAdminCompletions();
        }

        Assert.True(qp.IsDestroyed);
        Assert.True(after.Disposed);
        Assert.Equal(0, _model.IoQueuesLive);
        Assert.Equal(qid, _ctrl.AllocIoQueuePair().Id); // the queue id is free again

        // After a reset the queues are gone: nothing to delete, freed at once.
        var qp2 = _ctrl.IoQueuePairs[0];
        _ctrl.Reset();
        int before = _model.AdminOpcodes.Count;
        var after2 = new Flag();
        qp2.BeginDestroy(after2);
        Assert.True(qp2.IsDestroyed);
        Assert.True(after2.Disposed);
        Assert.Equal(before, _model.AdminOpcodes.Count);
    }

    private sealed class Flag : IDisposable
    {
        public bool Disposed;

        public void Dispose() => Disposed = true;
    }
}
