using System.Diagnostics;
using System.Runtime.InteropServices;
using VhostBackend.Bdev;
using VhostBackend.Platform;
using VhostBackend.Reactors;

namespace VhostBackend.BdevPerf;

public enum Workload
{
    Read,
    Write,
    RandRead,
    RandWrite,
    Rw,
    RandRw,
    Verify,
    Flush,
    Unmap,
    WriteZeroes,
}

public sealed class PerfOptions
{
    public int QueueDepth { get; set; } = 1;
    public int IoSize { get; set; } = 4096;
    public Workload Workload { get; set; } = Workload.RandRead;
    public double Seconds { get; set; } = 5;
    public int ReadPercent { get; set; } = 50;
    public double WarmupSeconds { get; set; }

    /// <summary>Bytes each buffer starts into its page (0: page aligned): misaligned-buffer runs.</summary>
    public int BufferOffset { get; set; }

    /// <summary>While measuring, every virtio-user controller under test re-sends its memory table this often (0: never).</summary>
    public int RemapMemoryMs { get; set; }

    /// <summary>--interleave: the jobs (all on one reactor) take turns of this many ms (0: all run at once).</summary>
    public int InterleaveMs { get; set; }

    /// <summary>--precondition: before the jobs open, each target is written once in full (a thin lvol fully allocated).</summary>
    public bool Precondition { get; set; }

    /// <summary>-f (SPDK's continue_on_failure): a failed I/O is counted and the job goes on. Without it the first
    /// failed I/O ends the test (<see cref="PerfJob.Ended"/> with <c>failure: true</c>).</summary>
    public bool ContinueOnFailure { get; set; }

    /// <summary>-S: print the jobs' rates every this many seconds while the test runs (0: not).</summary>
    public int ShowPeriodSeconds { get; set; }

    /// <summary>-P: with -S, an exponential moving average of IOPS over this many periods (0: not).</summary>
    public int EmaPeriod { get; set; }

    /// <summary>-l (1): latency percentiles per job; -ll (2): and the histogram.</summary>
    public int LatencyLevel { get; set; }

    /// <summary>-k: an I/O outstanding longer than this is counted as timed out, once (0: off).</summary>
    public int TimeoutSeconds { get; set; }

    /// <summary>-F: random offsets from a zipf distribution of this theta (0: uniform).</summary>
    public double ZipfTheta { get; set; }

    /// <summary>-D: random offsets from a random map (every slot once per pass).</summary>
    public bool RandomMap { get; set; }

    /// <summary>-U: every write's buffer filled with data of its own.</summary>
    public bool UniqueWrites { get; set; }

    /// <summary>Where a job's end-on-error line goes (SPDK prints it on stdout; JSON output sends it to stderr).</summary>
    public TextWriter Messages { get; set; } = Console.Out;

    /// <summary>The job writes each I/O slot once, in order, and then ends by itself (the precondition pass).</summary>
    internal bool SinglePass { get; set; }
}

/// <summary>One task slot: its own DMA-able buffers and a cached wait entry; reused for every I/O it issues.</summary>
internal sealed class PerfTask
{
    private readonly SharedMemoryArena? _shared;
    private readonly AlignedBuffer? _heapBuffer;
    private readonly AlignedBuffer? _heapReadBuffer;

    private readonly int _offset;

    public PerfTask(PerfJob job, int size, SharedMemoryArena? shared, int offset = 0)
    {
        Job = job;
        _shared = shared;
        _offset = offset;
        Iov = [Alloc(size, out _heapBuffer)];
        ReadIov = [Alloc(size, out _heapReadBuffer)];
        Iov[0].AsSpan().Clear();
        Wait = new BdevIoWaitEntry(static t => ((PerfTask)t!).Job.Submit((PerfTask)t!), this);
    }

    public PerfJob Job { get; }

    /// <summary>The write (and verify pattern) buffer.</summary>
    public Span<byte> Buffer => Iov[0].AsSpan();

    /// <summary>The buffer verify reads back into.</summary>
    public Span<byte> ReadBuffer => ReadIov[0].AsSpan();

    public IoVec[] Iov { get; }
    public IoVec[] ReadIov { get; }
    public BdevIoWaitEntry Wait { get; }
    public ulong Offset;
    public bool VerifyReadStage;
    public long StartTicks;

    /// <summary>Submitted and not yet completed (-k counts it once when it is outstanding too long).</summary>
    public bool InFlight;
    public bool TimedOut;

    /// <summary>Buffers come from the shared arena when there is room (vhost-user front ends then send them by address), else the heap.</summary>
    private IoVec Alloc(int size, out AlignedBuffer? heap)
    {
        heap = null;
        int slack = _offset == 0 ? 0 : 4096;
        if (_shared is not null)
        {
            try
            {
                return new IoVec(_shared.Allocate((ulong)(size + slack)) + _offset, (nuint)size);
            }
            catch (OutOfMemoryException)
            {
            }
        }

        heap = new AlignedBuffer((nuint)(size + slack), 4096, zero: false);
        return heap.ToIoVec((nuint)_offset, (nuint)size);
    }

    private void FreeOne(IoVec iov, AlignedBuffer? heap)
    {
        if (heap is not null)
        {
            heap.Dispose();
        }
        else
        {
            _shared!.Free(iov.Base - _offset);
        }
    }

    public void Free()
    {
        FreeOne(Iov[0], _heapBuffer);
        FreeOne(ReadIov[0], _heapReadBuffer);
    }
}

/// <summary>
/// Drives one bdev from one reactor at a fixed queue depth. Everything it touches per I/O is pre-allocated;
/// it runs only on its reactor.
/// </summary>
public sealed class PerfJob
{
    private static readonly BdevIoCompletion s_done = static (io, ok, arg) => ((PerfTask)arg!).Job.OnDone((PerfTask)arg!, io, ok);

    private readonly PerfOptions _options;
    private readonly PerfTask[] _tasks;
    private readonly ulong _blocksPerIo;
    private readonly ulong _ioSlots;
    private ulong _nextSeq;
    private ulong _rng;
    private readonly ZipfSampler? _zipf; // -F
    private readonly RandomSlotMap? _randomMap; // -D
    private Poller? _timeoutPoller; // -k
    private BdevChannel? _channel;
    private int _inflight;
    private bool _stopping;
    private bool _measuring;
    private long _measureStart;
    private long _measureEnd;
    private long _allocStart;
    private TaskCompletionSource? _drained;

    // --interleave: a paused job parks its tasks instead of issuing their next I/O; its time counts only while it runs.
    private bool _paused;
    private PerfTask[] _parked = [];
    private int _parkedCount;
    private long _turnStart;
    private long _turnIos;
    private long _activeTicks;
    private double[] _turnIops = [];

    public PerfJob(BdevDesc desc, Reactor reactor, PerfOptions options, SharedMemoryArena? sharedMemory = null)
    {
        Desc = desc;
        Reactor = reactor;
        _options = options;
        var bdev = desc.Bdev;
        if (options.IoSize % bdev.BlockSize != 0)
        {
            throw new ArgumentException($"I/O size {options.IoSize} is not a multiple of {bdev.Name}'s block size {bdev.BlockSize}");
        }

        _blocksPerIo = (ulong)options.IoSize / bdev.BlockSize;
        _ioSlots = bdev.BlockCount / _blocksPerIo;
        if (_ioSlots == 0)
        {
            throw new ArgumentException($"I/O size {options.IoSize} is larger than {bdev.Name}");
        }

        _rng = (ulong)(0x9E3779B97F4A7C15 ^ (ulong)bdev.Name.GetHashCode() ^ (ulong)reactor.Core);
        bool random = options.Workload is Workload.RandRead or Workload.RandWrite or Workload.RandRw;
        if (options.RandomMap)
        {
            _randomMap = random ? new RandomSlotMap(_ioSlots) : throw new ArgumentException("-D: the random map needs a random workload (randread, randwrite, randrw)");
        }

        if (options.ZipfTheta > 0 && random)
        {
            _zipf = new ZipfSampler(_ioSlots, options.ZipfTheta);
        }
        _tasks = Enumerable.Range(0, options.QueueDepth).Select(_ => new PerfTask(this, options.IoSize, sharedMemory, options.BufferOffset)).ToArray();
    }

    public BdevDesc Desc { get; }
    public Reactor Reactor { get; }
    public LatencyHistogram Latency { get; } = new();
    public long Ios { get; private set; }
    public long Bytes { get; private set; }
    public long Errors { get; private set; }
    public long Miscompares { get; private set; }
    public long SubmitErrors { get; private set; }

    /// <summary>-k: I/Os that were outstanding longer than the timeout (each counted once).</summary>
    public long Timeouts { get; private set; }
    public long AllocatedBytes { get; private set; }
    public double ElapsedSeconds => (_options.InterleaveMs > 0 ? _activeTicks : _measureEnd - _measureStart) / (double)Ticks.Frequency;

    /// <summary>--interleave: the IOPS of each whole measured turn, in order.</summary>
    public ReadOnlySpan<double> TurnIops => _turnIops.AsSpan(0, TurnCount);

    public int TurnCount { get; private set; }

    /// <summary>--interleave: this job starts paused (every job but the first); set before <see cref="Start"/>.</summary>
    public void StartPaused()
    {
        _paused = true;
    }

    /// <summary>
    /// Gets the job's I/O channel. Runs on the job's reactor, for every job before any starts: a channel's setup
    /// allocates (its statistics, histograms, queues), and another job's setup on the same reactor inside this job's
    /// window would be counted as its bytes per I/O.
    /// </summary>
    public void Open() => _channel ??= Desc.GetIoChannel();

    /// <summary>Starts the tasks. Runs on the job's reactor.</summary>
    public void Start()
    {
        Open();
        _measuring = _options.WarmupSeconds <= 0;
        _measureStart = Ticks.Now();
        if (_options.InterleaveMs > 0)
        {
            _parked = new PerfTask[_tasks.Length];
            int turns = (int)Math.Ceiling((_options.Seconds + _options.WarmupSeconds + 2) * 1000 / _options.InterleaveMs) + 2;
            _turnIops = new double[turns];
            _turnStart = _measureStart;
            _turnIos = 0;
        }

        if (_options.TimeoutSeconds > 0)
        {
            _timeoutPoller = Reactor.RegisterPoller("bdevperf_timeout", static j => ((PerfJob)j!).CheckTimeouts(), this, 100_000);
        }

        _allocStart = GC.GetAllocatedBytesForCurrentThread();
        foreach (var t in _tasks)
        {
            Submit(t);
        }
    }

    /// <summary>-k: counts the I/Os outstanding longer than the timeout, each once (SPDK's io_timeout).</summary>
    private int CheckTimeouts()
    {
        long now = Ticks.Now();
        long limit = _options.TimeoutSeconds * Ticks.Frequency;
        int found = 0;
        foreach (var t in _tasks)
        {
            if (t.InFlight && !t.TimedOut && now - t.StartTicks > limit)
            {
                t.TimedOut = true;
                Timeouts++;
                found++;
            }
        }

        return found;
    }

    /// <summary>--interleave: ends this job's turn (its I/Os in flight complete and park). Runs on the job's reactor.</summary>
    public void Pause(long now)
    {
        if (_paused)
        {
            return;
        }

        _paused = true;
        if (_measuring && _measureEnd == 0)
        {
            _activeTicks += now - _turnStart;
            double secs = (now - _turnStart) / (double)Ticks.Frequency;
            if (TurnCount < _turnIops.Length && secs > 0)
            {
                _turnIops[TurnCount++] = (Ios - _turnIos) / secs;
            }
        }
    }

    /// <summary>--interleave: starts this job's turn, issuing the I/Os its tasks parked. Runs on the job's reactor.</summary>
    public void Resume(long now)
    {
        if (!_paused)
        {
            return;
        }

        _paused = false;
        _turnStart = now;
        _turnIos = Ios;
        while (_parkedCount > 0 && !_paused)
        {
            var t = _parked[--_parkedCount];
            _parked[_parkedCount] = null!;
            Submit(t, now);
        }
    }

    /// <summary>Warm-up is over: reset the counters. Runs on the job's reactor.</summary>
    public void BeginMeasuring()
    {
        if (_measureEnd != 0)
        {
            return; // ended on an error during the warm-up: its time runs from its start
        }

        _measuring = true;
        Ios = Bytes = 0;
        _measureStart = Ticks.Now();
        _turnStart = _measureStart; // a turn under way counts from here
        _turnIos = 0;
        _activeTicks = 0;
        TurnCount = 0;
        _allocStart = GC.GetAllocatedBytesForCurrentThread();
    }

    /// <summary>
    /// Ends the measured window (time and bytes allocated) without stopping. Runs on the job's reactor, for every job
    /// before any stops: a stopping job's teardown on the same reactor must not land in another job's window.
    /// </summary>
    public void EndMeasuring()
    {
        if (_measureEnd == 0)
        {
            _measureEnd = Ticks.Now();
            if (!_paused)
            {
                _activeTicks += _measureEnd - _turnStart; // the turn cut short: its time counts, not as a turn
            }

            AllocatedBytes = GC.GetAllocatedBytesForCurrentThread() - _allocStart;
        }
    }

    /// <summary>
    /// <see cref="PerfOptions.SinglePass"/>: issues every I/O slot once in order; the task completes when the last is
    /// back (the channel is then put and the buffers freed). Runs on the job's reactor.
    /// </summary>
    public Task RunSinglePass()
    {
        if (!_options.SinglePass)
        {
            throw new InvalidOperationException("not a single-pass job");
        }

        _drained = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        Start();
        EndPassIfIdle();
        return _drained.Task;
    }

    /// <summary>A single pass with nothing left to issue and nothing in flight is over.</summary>
    private void EndPassIfIdle()
    {
        if (_inflight == 0 && !_stopping && _drained is not null)
        {
            EndMeasuring();
            _stopping = true;
            Finish();
        }
    }

    /// <summary>The job ended on an error before the run's end (SPDK's drain): a failed I/O without
    /// <see cref="PerfOptions.ContinueOnFailure"/>, a miscompare or a refused submit.</summary>
    public bool EndedWithError { get; private set; }

    /// <summary>
    /// Called on the job's reactor, once, when the job ends on an error: <c>failure</c> is true for a failed I/O
    /// (which ends the whole test, as SPDK's <c>g_error_to_exit</c>), false for what ends only this job.
    /// </summary>
    public Action<PerfJob, bool>? Ended { get; set; }

    /// <summary>Ends the job on an error, as SPDK's bdevperf drains a job: its measured time ends here, it issues
    /// nothing more, and what is in flight completes (the run's stop waits for it).</summary>
    private void EndOnError(string message, bool failure)
    {
        if (_stopping)
        {
            return;
        }

        EndedWithError = true;
        EndMeasuring();
        _stopping = true;
        _options.Messages.WriteLine(message);
        Ended?.Invoke(this, failure);
    }

    /// <summary>Stops issuing; the task completes when the last I/O is back. Runs on the job's reactor.</summary>
    public Task StopAsync()
    {
        EndMeasuring();
        _stopping = true;
        _drained = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        if (_inflight == 0)
        {
            Finish();
        }

        return _drained.Task;
    }

    private void Finish()
    {
        if (_timeoutPoller is not null)
        {
            Reactor.UnregisterPoller(_timeoutPoller);
            _timeoutPoller = null;
        }

        if (_channel is not null)
        {
            BdevDesc.PutIoChannel(_channel);
            _channel = null;
        }

        foreach (var t in _tasks)
        {
            t.Free();
        }

        _drained!.TrySetResult();
    }

    private ulong NextRandom()
    {
        // xorshift64*: no allocation, good enough to spread offsets.
        _rng ^= _rng >> 12;
        _rng ^= _rng << 25;
        _rng ^= _rng >> 27;
        return _rng * 2685821657736338717UL;
    }

    private ulong NextOffset(bool random)
    {
        if (!random)
        {
            return _nextSeq++ % _ioSlots * _blocksPerIo;
        }

        ulong slot = _zipf is { } z ? z.Sample(ref _rng) : NextRandom() % _ioSlots;
        if (_randomMap is { } map)
        {
            slot = map.Take(slot);
        }

        return slot * _blocksPerIo;
    }

    internal void Submit(PerfTask t) => Submit(t, Ticks.Now());

    /// <summary>Issues the task's next I/O; <paramref name="now"/> is its start time (a completion passes its own clock read).</summary>
    private void Submit(PerfTask t, long now)
    {
        if (_stopping)
        {
            return;
        }

        if (_paused)
        {
            _parked[_parkedCount++] = t;
            return;
        }

        if (_options.SinglePass && _nextSeq >= _ioSlots)
        {
            EndPassIfIdle();
            return;
        }

        var ch = _channel!;
        var w = _options.Workload;
        int rc;
        if (!t.VerifyReadStage)
        {
            t.Offset = w switch
            {
                Workload.RandRead or Workload.RandWrite or Workload.RandRw => NextOffset(true),
                _ => NextOffset(false),
            };
        }

        t.StartTicks = now;
        t.TimedOut = false;
        t.InFlight = true; // before the submit: a completion clears it
        switch (w)
        {
            case Workload.Read:
            case Workload.RandRead:
                rc = ch.Read(Desc, t.Iov, t.Offset, _blocksPerIo, s_done, t);
                break;
            case Workload.Write:
            case Workload.RandWrite:
                if (_options.UniqueWrites)
                {
                    FillPattern(t);
                }

                rc = ch.Write(Desc, t.Iov, t.Offset, _blocksPerIo, s_done, t);
                break;
            case Workload.Rw:
            case Workload.RandRw:
                if ((int)(NextRandom() % 100) < _options.ReadPercent)
                {
                    rc = ch.Read(Desc, t.Iov, t.Offset, _blocksPerIo, s_done, t);
                }
                else
                {
                    if (_options.UniqueWrites)
                    {
                        FillPattern(t);
                    }

                    rc = ch.Write(Desc, t.Iov, t.Offset, _blocksPerIo, s_done, t);
                }

                break;
            case Workload.Verify:
                if (!t.VerifyReadStage)
                {
                    FillPattern(t);
                    rc = ch.Write(Desc, t.Iov, t.Offset, _blocksPerIo, s_done, t);
                }
                else
                {
                    rc = ch.Read(Desc, t.ReadIov, t.Offset, _blocksPerIo, s_done, t);
                }

                break;
            case Workload.Flush:
                rc = ch.Flush(Desc, t.Offset, _blocksPerIo, s_done, t);
                break;
            case Workload.Unmap:
                rc = ch.Unmap(Desc, t.Offset, _blocksPerIo, s_done, t);
                break;
            case Workload.WriteZeroes:
                rc = ch.WriteZeroes(Desc, t.Offset, _blocksPerIo, s_done, t);
                break;
            default:
                rc = -Errno.EINVAL;
                break;
        }

        if (rc != 0)
        {
            t.InFlight = false;
        }

        if (rc == -Errno.ENOMEM)
        {
            ch.QueueIoWait(t.Wait);
            return;
        }

        if (rc != 0)
        {
            SubmitErrors++;
            Errors++;
            if (_options.SinglePass)
            {
                EndPassIfIdle();
            }
            else
            {
                EndOnError($"Failed to submit bdev_io: {rc}", failure: false); // SPDK drains the job whatever -f says
            }

            return;
        }

        _inflight++;
    }

    private void FillPattern(PerfTask t)
    {
        // Each 8-byte word: offset, position and a per-pass counter, so stale or misplaced data is detected.
        var p = MemoryMarshal.Cast<byte, ulong>(t.Buffer);
        int words = _options.IoSize / 8;
        ulong pass = (ulong)Ios;
        for (int i = 0; i < words; i++)
        {
            p[i] = (t.Offset << 20) ^ ((ulong)i << 1) ^ (pass * 0x9E3779B97F4A7C15);
        }
    }

    private void OnDone(PerfTask t, BdevIo io, bool ok)
    {
        _inflight--;
        t.InFlight = false;
        long now = Ticks.Now();
        if (!ok)
        {
            Errors++;
            if (!_options.ContinueOnFailure && !_options.SinglePass)
            {
                EndOnError($"task offset: {t.Offset} on job bdev={Desc.Bdev.Name} fails", failure: true);
            }
        }
        else if (_measuring && !_paused)
        {
            Ios++;
            Bytes += _options.IoSize;
            Latency.Record(now - t.StartTicks);
        }

        if (_options.Workload == Workload.Verify && ok)
        {
            if (!t.VerifyReadStage)
            {
                t.VerifyReadStage = true;
            }
            else
            {
                t.VerifyReadStage = false;
                if (!t.Buffer[.._options.IoSize].SequenceEqual(t.ReadBuffer[.._options.IoSize]))
                {
                    Miscompares++;
                    EndOnError($"Buffer mismatch! Target: {Desc.Bdev.Name} Disk Offset: {t.Offset}", failure: false);
                }
            }
        }

        if (_stopping)
        {
            if (_inflight == 0 && _drained is not null)
            {
                Finish(); // else ended on an error: StopAsync finishes it
            }

            return;
        }

        // The completion's clock read is the next I/O's start: one clock read per I/O instead of two.
        Submit(t, now);
    }
}
