using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;
using Microsoft.Extensions.Logging;
using Serilog;
using Serilog.Events;
using VhostBackend.App;
using VhostBackend.Bdev;
using VhostBackend.Platform;
using VhostBackend.Reactors;

namespace VhostBackend.BdevPerf;

public static class Program
{
    public static async Task<int> Main(string[] args)
    {
        BdevPerfCommandLine cl;
        try
        {
            cl = BdevPerfCommandLine.Parse(args);
        }
        catch (ArgumentException e)
        {
            Console.Error.WriteLine($"bdevperf: {e.Message}\n\n{BdevPerfCommandLine.Usage}");
            return 1;
        }

        if (cl.Help)
        {
            Console.WriteLine(BdevPerfCommandLine.Usage);
            return 0;
        }

        var serilog = new LoggerConfiguration()
            .MinimumLevel.Is(cl.LogLevel switch
            {
                "error" => LogEventLevel.Error,
                "info" => LogEventLevel.Information,
                "debug" => LogEventLevel.Debug,
                _ => LogEventLevel.Warning,
            })
            .WriteTo.Console(standardErrorFromLevel: LogEventLevel.Verbose, outputTemplate: "[{Level:u3}] {SourceContext}: {Message:lj}{NewLine}{Exception}")
            .CreateLogger();
        using var loggerFactory = new LoggerFactory().AddSerilog(serilog, dispose: true);
        var options = new ApplicationOptions
        {
            Name = "bdevperf",
            CpuMask = cl.CpuMask,
            ConfigFile = cl.ConfigFile,
            RpcSocket = cl.RpcSocket,
            Reactor = new ReactorOptions { Mode = cl.ReactorMode },
            SharedMemoryBytes = cl.MemSizeMiB is { } mib ? mib << 20 : ApplicationOptions.DefaultSharedMemoryBytes,
        };

        Application app;
        try
        {
            app = new Application(options, loggerFactory);
            StandardModules.Register(app);
            if (cl.WaitForTests)
            {
                RegisterPerformTests(app, cl);
            }

            await app.StartAsync();
        }
        catch (ApplicationConfigException e)
        {
            Console.Error.WriteLine($"bdevperf: {e.Message}");
            return 1;
        }

        try
        {
            if (cl.WaitForTests)
            {
                // SPDK's bdevperf -z: set up, then run a test per perform_tests RPC until told to stop.
                var stop = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
                using var term = System.Runtime.InteropServices.PosixSignalRegistration.Create(System.Runtime.InteropServices.PosixSignal.SIGTERM, c => { c.Cancel = true; stop.TrySetResult(); });
                using var intr = System.Runtime.InteropServices.PosixSignalRegistration.Create(System.Runtime.InteropServices.PosixSignal.SIGINT, c => { c.Cancel = true; stop.TrySetResult(); });
                Console.WriteLine($"bdevperf: waiting for perform_tests on {cl.RpcSocket}");
                await stop.Task;
                return 0;
            }

            return await RunAsync(app, cl, cl.Perf);
        }
        catch (ArgumentException e)
        {
            Console.Error.WriteLine($"bdevperf: {e.Message}");
            return 1;
        }
        finally
        {
            await app.StopAsync();
        }
    }

    private sealed class PerformTestsParams
    {
        public int? TimeInSec { get; set; }
        public string? WorkloadType { get; set; }
        public int? QueueDepth { get; set; }
        public string? IoSize { get; set; }
        public int? RwPercentage { get; set; }

        /// <summary>Ours (not SPDK's): --buf-offset for this run.</summary>
        public int? BufOffset { get; set; }

        /// <summary>Ours (not SPDK's): --remap-memory for this run.</summary>
        public int? RemapMemoryMs { get; set; }
    }

    private static int s_testRunning;

    /// <summary>
    /// SPDK's perform_tests (bdevperf -z): params override the command line's for this run and the ones after it (as
    /// SPDK keeps them); the answer is 0 when the run ended without errors, else an error. One run at a time.
    /// </summary>
    private static void RegisterPerformTests(Application app, BdevPerfCommandLine cl)
    {
        app.Rpc.Register("perform_tests", async req =>
        {
            var p = req.Bind<PerformTestsParams>(Rpc.RpcErrorCodes.ParseError, "spdk_json_decode_object failed", allowUnknownNames: true);
            if (Interlocked.Exchange(ref s_testRunning, 1) != 0)
            {
                throw new Rpc.RpcException(Rpc.RpcErrorCodes.InternalError, "Operation now in progress: another test is already in progress");
            }

            try
            {
                var o = new PerfOptions
                {
                    QueueDepth = cl.Perf.QueueDepth,
                    IoSize = cl.Perf.IoSize,
                    Workload = cl.Perf.Workload,
                    Seconds = cl.Perf.Seconds,
                    ReadPercent = cl.Perf.ReadPercent,
                    WarmupSeconds = cl.Perf.WarmupSeconds,
                    BufferOffset = cl.Perf.BufferOffset,
                    RemapMemoryMs = cl.Perf.RemapMemoryMs,
                    InterleaveMs = cl.Perf.InterleaveMs,
                    Precondition = cl.Perf.Precondition,
                    ContinueOnFailure = cl.Perf.ContinueOnFailure,
                    ShowPeriodSeconds = cl.Perf.ShowPeriodSeconds,
                    EmaPeriod = cl.Perf.EmaPeriod,
                    LatencyLevel = cl.Perf.LatencyLevel,
                    TimeoutSeconds = cl.Perf.TimeoutSeconds,
                    ZipfTheta = cl.Perf.ZipfTheta,
                    RandomMap = cl.Perf.RandomMap,
                    UniqueWrites = cl.Perf.UniqueWrites,
                };
                try
                {
                    if (p.WorkloadType is { } w)
                    {
                        o.Workload = BdevPerfCommandLine.ParseWorkload(w);
                    }

                    if (p.QueueDepth is { } q)
                    {
                        o.QueueDepth = q is >= 1 and <= 65536 ? q : throw new ArgumentException($"queue_depth: {q} is not in [1, 65536]");
                    }

                    if (p.IoSize is { } sz)
                    {
                        o.IoSize = BdevPerfCommandLine.ParseSize("io_size", sz);
                    }

                    if (p.TimeInSec is { } t)
                    {
                        o.Seconds = t is >= 1 and <= 86400 ? t : throw new ArgumentException($"time_in_sec: {t} is not in [1, 86400]");
                    }

                    if (p.RwPercentage is { } rw)
                    {
                        o.ReadPercent = rw is >= 0 and <= 100 ? rw : throw new ArgumentException($"rw_percentage: {rw} is not in [0, 100]");
                    }

                    if (p.RemapMemoryMs is { } remap)
                    {
                        o.RemapMemoryMs = remap is >= 0 and <= 3_600_000 ? remap : throw new ArgumentException($"remap_memory_ms: {remap} is not in [0, 3600000]");
                    }

                    if (p.BufOffset is { } off)
                    {
                        o.BufferOffset = off is >= 0 and <= 4095 ? off : throw new ArgumentException($"buf_offset: {off} is not in [0, 4095]");
                    }
                }
                catch (ArgumentException e)
                {
                    throw new Rpc.RpcException(Rpc.RpcErrorCodes.ParseError, "Invalid parameters provided: " + e.Message.Replace("-w: ", "workload_type: ", StringComparison.Ordinal));
                }

                // Valid: they stay for the runs after this one (as SPDK keeps them).
                cl.Perf.QueueDepth = o.QueueDepth;
                cl.Perf.IoSize = o.IoSize;
                cl.Perf.Workload = o.Workload;
                cl.Perf.Seconds = o.Seconds;
                cl.Perf.ReadPercent = o.ReadPercent;
                cl.Perf.BufferOffset = o.BufferOffset;
                cl.Perf.RemapMemoryMs = o.RemapMemoryMs;
                int rc;
                try
                {
                    rc = await Task.Run(() => RunAsync(app, cl, o));
                }
                catch (ArgumentException e)
                {
                    throw new Rpc.RpcException(Rpc.RpcErrorCodes.InternalError, "bdevperf failed with error " + e.Message);
                }

                return rc == 0 ? 0 : throw new Rpc.RpcException(Rpc.RpcErrorCodes.InternalError, "bdevperf failed with error Input/output error");
            }
            finally
            {
                Volatile.Write(ref s_testRunning, 0);
            }
        });
    }

    private static async Task<int> RunAsync(Application app, BdevPerfCommandLine cl, PerfOptions perf)
    {
        var bdevs = cl.Targets.Count > 0
            ? cl.Targets.Select(t => app.Bdevs.Find(t) ?? throw new ArgumentException($"-T: no bdev named '{t}'")).ToList()
            : app.Bdevs.All.Where(b => b.ClaimedBy is null).ToList();
        if (bdevs.Count == 0)
        {
            throw new ArgumentException("the config creates no bdev to test");
        }

        bool writes = perf.Workload is not (Workload.Read or Workload.RandRead);
        var reactors = app.Reactors.Reactors;
        var plan = new List<(Bdev.Bdev Bdev, Reactor Reactor)>();
        for (int i = 0; i < bdevs.Count; i++)
        {
            if (cl.EveryCoreAllBdevs)
            {
                plan.AddRange(reactors.Select(r => (bdevs[i], r)));
            }
            else
            {
                plan.Add((bdevs[i], reactors[i % reactors.Count]));
            }
        }

        var preconditioned = new Dictionary<string, double>();
        if (perf.Precondition)
        {
            foreach (var (bdev, reactor) in plan)
            {
                if (!preconditioned.ContainsKey(bdev.Name))
                {
                    double secs = preconditioned[bdev.Name] = await PreconditionAsync(app, bdev, reactor);
                    if (!cl.JsonOutput)
                    {
                        Console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"preconditioned {bdev.Name}: {bdev.BlockCount * bdev.BlockSize >> 20} MiB written in {secs:F2} s"));
                    }
                }
            }
        }

        var jobs = new List<PerfJob>();
        foreach (var (bdev, reactor) in plan)
        {
            var job = await reactor.InvokeAsync(() => new PerfJob(app.Bdevs.Open(bdev.Name, writes), reactor, perf, app.SharedMemory));
            jobs.Add(job);
        }

        // SPDK's end on error: a failed I/O (without -f) ends the test; a job ended by its own error (a miscompare, a
        // refused submit) ends it when every job has.
        perf.Messages = cl.JsonOutput ? Console.Error : Console.Out;
        var endedEarly = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        int jobsEnded = 0;
        foreach (var j in jobs)
        {
            j.Ended = (_, failure) =>
            {
                if (Interlocked.Increment(ref jobsEnded) == jobs.Count || failure)
                {
                    endedEarly.TrySetResult();
                }
            };
        }

        string header = $"Running {perf.Workload.ToString().ToLowerInvariant()} for {perf.Seconds} s: queue depth {perf.QueueDepth}, I/O size {perf.IoSize}, {jobs.Count} job(s) on cores {cl.CpuMask}";
        if (!cl.JsonOutput)
        {
            Console.WriteLine(header);
        }

        foreach (var j in jobs)
        {
            await j.Reactor.InvokeAsync(j.Open); // every channel made before any job's window opens
        }

        Poller? turns = null;
        if (perf.InterleaveMs > 0)
        {
            if (jobs.Count < 2 || jobs.Any(j => j.Reactor != jobs[0].Reactor))
            {
                throw new ArgumentException("--interleave: needs two or more jobs, all on one reactor (one core in -m, several -T)");
            }

            for (int i = 1; i < jobs.Count; i++)
            {
                jobs[i].StartPaused();
            }

            int current = 0;
            turns = await jobs[0].Reactor.InvokeAsync(() => jobs[0].Reactor.RegisterPoller("bdevperf_interleave", _ =>
            {
                long now = Ticks.Now();
                jobs[current].Pause(now);
                current = (current + 1) % jobs.Count;
                jobs[current].Resume(now);
                return 1;
            }, null, (ulong)perf.InterleaveMs * 1000));
        }

        var cpu0 = Process.GetCurrentProcess().TotalProcessorTime;
        foreach (var j in jobs)
        {
            await j.Reactor.InvokeAsync(j.Start);
        }

        if (perf.WarmupSeconds > 0)
        {
            await Task.WhenAny(Task.Delay(TimeSpan.FromSeconds(perf.WarmupSeconds)), endedEarly.Task);
            if (!endedEarly.Task.IsCompleted)
            {
                foreach (var j in jobs)
                {
                    await j.Reactor.InvokeAsync(j.BeginMeasuring);
                }

                cpu0 = Process.GetCurrentProcess().TotalProcessorTime;
            }
        }

        using var remapStop = new CancellationTokenSource();
        var remap = perf.RemapMemoryMs > 0 ? Task.Run(() => RemapLoop(jobs, perf.RemapMemoryMs, remapStop.Token)) : Task.FromResult(0);
        if (!endedEarly.Task.IsCompleted)
        {
            await MeasureAsync(cl, perf, jobs, endedEarly.Task);
        }

        remapStop.Cancel();
        int remaps = await remap;
        if (perf.RemapMemoryMs > 0 && !cl.JsonOutput)
        {
            Console.WriteLine($"memory table re-sent {remaps} time(s) while measuring");
        }

        foreach (var j in jobs)
        {
            await j.Reactor.InvokeAsync(j.EndMeasuring); // every window closed before any job tears down
        }

        if (turns is not null)
        {
            await jobs[0].Reactor.InvokeAsync(() => jobs[0].Reactor.UnregisterPoller(turns));
        }

        var drains = new List<Task>();
        foreach (var j in jobs)
        {
            drains.Add(await j.Reactor.InvokeAsync(j.StopAsync));
        }

        var cpu = Process.GetCurrentProcess().TotalProcessorTime - cpu0;
        var all = Task.WhenAll(drains);
        if (await Task.WhenAny(all, Task.Delay(TimeSpan.FromSeconds(30))) != all)
        {
            Console.Error.WriteLine("bdevperf: I/O did not drain within 30 s after the run");
            return 1;
        }

        foreach (var j in jobs)
        {
            j.Desc.Dispose();
        }

        return Report(cl, perf, jobs, cpu, preconditioned);
    }

    /// <summary>The measured time: waits it out (or the end on an error); with -S prints each job's rates every period
    /// meanwhile (with -P also their moving average), read from the jobs' counters (display only).</summary>
    private static async Task MeasureAsync(BdevPerfCommandLine cl, PerfOptions perf, List<PerfJob> jobs, Task endedEarly)
    {
        if (perf.ShowPeriodSeconds <= 0)
        {
            await Task.WhenAny(Task.Delay(TimeSpan.FromSeconds(perf.Seconds)), endedEarly);
            return;
        }

        var output = cl.JsonOutput ? Console.Error : Console.Out;
        var sw = Stopwatch.StartNew();
        var lastIos = jobs.Select(j => j.Ios).ToArray();
        var ema = new double[jobs.Count];
        double alpha = perf.EmaPeriod > 0 ? 2.0 / (perf.EmaPeriod + 1) : 0;
        double last = 0;
        int period = 0;
        while (!endedEarly.IsCompleted)
        {
            // A line at each whole period within the run; the run's remainder after the last one is only waited out.
            double next = (period + 1) * (double)perf.ShowPeriodSeconds;
            bool show = next <= perf.Seconds;
            double wait = (show ? next : perf.Seconds) - sw.Elapsed.TotalSeconds;
            if (wait > 0)
            {
                await Task.WhenAny(Task.Delay(TimeSpan.FromSeconds(wait)), endedEarly);
            }

            if (!show || endedEarly.IsCompleted)
            {
                break;
            }

            double now = sw.Elapsed.TotalSeconds, secs = Math.Max(now - last, 1e-9);
            last = now;
            period++;
            double totalIops = 0;
            output.WriteLine(string.Create(CultureInfo.InvariantCulture, $"[{now:F2} s]"));
            for (int i = 0; i < jobs.Count; i++)
            {
                long ios = jobs[i].Ios;
                double iops = (ios - lastIos[i]) / secs;
                lastIos[i] = ios;
                totalIops += iops;
                ema[i] = period == 1 ? iops : ema[i] + (alpha * (iops - ema[i]));
                string name = $"{jobs[i].Desc.Bdev.Name} @ {jobs[i].Reactor.Core}";
                string avg = alpha > 0 ? string.Create(CultureInfo.InvariantCulture, $" (EMA {ema[i],12:F2} IO/s)") : "";
                output.WriteLine(string.Create(CultureInfo.InvariantCulture, $"  {name,-28} {iops,12:F2} IO/s {iops * perf.IoSize / (1024 * 1024),10:F2} MiB/s{avg}"));
            }

            output.WriteLine(string.Create(CultureInfo.InvariantCulture, $"  {"Total",-28} {totalIops,12:F2} IO/s {totalIops * perf.IoSize / (1024 * 1024),10:F2} MiB/s"));
        }
    }

    /// <summary>-l: SPDK's percentiles, as its bdevperf prints them; -ll: and every non-empty bucket (cumulative %).</summary>
    private static void PrintLatency(PerfJob job, int level)
    {
        static double Us(long ticks) => Ticks.ToMicroseconds(ticks);
        var h = job.Latency;
        Console.WriteLine();
        Console.WriteLine($" Latency summary [us] for {job.Desc.Bdev.Name} @ {job.Reactor.Core}:");
        Console.WriteLine(" =================================================================================");
        foreach (double p in new[] { 1, 10, 25, 50, 75, 90, 95, 98, 99, 99.5, 99.9, 99.99, 99.999 })
        {
            Console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"{p,9:F5}% : {Us(h.Percentile(p)),9:F3}us"));
        }

        if (level < 2)
        {
            return;
        }

        Console.WriteLine();
        Console.WriteLine($" Latency histogram [us] for {job.Desc.Bdev.Name} @ {job.Reactor.Core}:");
        Console.WriteLine(" ==============================================================================");
        Console.WriteLine("       Range in us     Cumulative    IO count");
        long seen = 0;
        foreach (var (lower, upper, count) in h.Buckets())
        {
            seen += count;
            Console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"{Us(lower),9:F3} - {Us(upper),9:F3}: {100.0 * seen / h.Count,9:F4}%  ({count,9})"));
        }
    }

    /// <summary>
    /// --precondition: writes <paramref name="bdev"/> once in full, in order, at queue depth 8 in the largest power-of-two
    /// I/O of at most 1 MiB that divides its size, through a descriptor and channel of its own that are closed before
    /// the measured jobs open theirs. Returns the seconds it took.
    /// </summary>
    private static async Task<double> PreconditionAsync(Application app, Bdev.Bdev bdev, Reactor reactor)
    {
        ulong size = bdev.BlockCount * bdev.BlockSize;
        int io = 1 << 20;
        while (io > bdev.BlockSize && (size % (ulong)io != 0 || io % bdev.BlockSize != 0))
        {
            io /= 2;
        }

        if (io % bdev.BlockSize != 0)
        {
            io = (int)bdev.BlockSize; // a block size that is not a power of two: one block per I/O
        }

        var o = new PerfOptions { Workload = Workload.Write, IoSize = io, QueueDepth = 8, SinglePass = true };
        var sw = Stopwatch.StartNew();
        var job = await reactor.InvokeAsync(() => new PerfJob(app.Bdevs.Open(bdev.Name, true), reactor, o, app.SharedMemory));
        var pass = await reactor.InvokeAsync(job.RunSinglePass);
        if (await Task.WhenAny(pass, Task.Delay(TimeSpan.FromMinutes(10))) != pass)
        {
            throw new ArgumentException($"--precondition: writing {bdev.Name} did not finish within 10 minutes");
        }

        job.Desc.Dispose();
        if (job.Errors > 0)
        {
            throw new ArgumentException($"--precondition: {job.Errors} write(s) to {bdev.Name} failed");
        }

        return sw.Elapsed.TotalSeconds;
    }

    /// <summary>--remap-memory: re-sends each virtio-user controller's memory table every <paramref name="ms"/> ms; returns how often.</summary>
    private static async Task<int> RemapLoop(List<PerfJob> jobs, int ms, CancellationToken stop)
    {
        var bdevs = jobs.Select(j => j.Desc.Bdev).ToList();
        int n = 0;
        try
        {
            while (true)
            {
                await Task.Delay(ms, stop);
                n += VirtioUserMemory.ResendMemoryTables(bdevs);
            }
        }
        catch (OperationCanceledException)
        {
        }
        catch (Exception e) when (e is IOException or ObjectDisposedException)
        {
            Console.Error.WriteLine($"bdevperf: re-sending the memory table failed: {e.Message}");
            return -1;
        }

        return n;
    }

    private static double[] TurnRatios(PerfJob first, PerfJob job)
    {
        var a = first.TurnIops;
        var b = job.TurnIops;
        int n = Math.Min(a.Length, b.Length);
        var r = new List<double>(n);
        for (int k = 0; k < n; k++)
        {
            if (a[k] > 0)
            {
                r.Add(b[k] / a[k]);
            }
        }

        return r.ToArray();
    }

    private static int Report(BdevPerfCommandLine cl, PerfOptions perf, List<PerfJob> jobs, TimeSpan cpu, Dictionary<string, double> preconditioned)
    {
        double us(long ticks) => Ticks.ToMicroseconds(ticks);
        var total = new LatencyHistogram();
        long ios = 0, errors = 0, miscompares = 0, allocated = 0;
        double iops = 0, mibs = 0;
        var rows = new JsonArray();
        if (!cl.JsonOutput)
        {
            Console.WriteLine($"{"Job (bdev @ core)",-28} {"IOPS",12} {"MiB/s",9} {"avg us",9} {"min us",9} {"p50 us",9} {"p99 us",9} {"p99.9 us",9} {"max us",10}");
        }

        foreach (var j in jobs)
        {
            double secs = Math.Max(j.ElapsedSeconds, 1e-9);
            double jobIops = j.Ios / secs;
            double jobMib = j.Bytes / secs / (1024 * 1024);
            var h = j.Latency;
            total.Merge(h);
            ios += j.Ios;
            errors += j.Errors;
            miscompares += j.Miscompares;
            allocated += j.AllocatedBytes;
            iops += jobIops;
            mibs += jobMib;
            double avg = h.Count == 0 ? 0 : us(h.Sum) / h.Count;
            string name = $"{j.Desc.Bdev.Name} @ {j.Reactor.Core}";
            if (!cl.JsonOutput)
            {
                Console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"{name,-28} {jobIops,12:F2} {jobMib,9:F2} {avg,9:F2} {(h.Count == 0 ? 0 : us(h.Min)),9:F2} {us(h.Percentile(50)),9:F2} {us(h.Percentile(99)),9:F2} {us(h.Percentile(99.9)),9:F2} {us(h.Max),10:F2}"));
                if (j.Errors > 0 || j.Miscompares > 0)
                {
                    Console.WriteLine($"  {j.Errors} I/O errors, {j.Miscompares} miscompares");
                }

                if (perf.TimeoutSeconds > 0)
                {
                    Console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"  {j.Timeouts} I/Os timed out (> {perf.TimeoutSeconds} s; {j.Timeouts / secs:F2} TO/s)"));
                }

                if (j.EndedWithError)
                {
                    Console.WriteLine(string.Create(CultureInfo.InvariantCulture, $" Job: {j.Desc.Bdev.Name} ended in about {j.ElapsedSeconds:F2} seconds with error"));
                }

                if (perf.LatencyLevel > 0)
                {
                    PrintLatency(j, perf.LatencyLevel);
                }
            }

            var row = new JsonObject
            {
                ["bdev"] = j.Desc.Bdev.Name,
                ["core"] = j.Reactor.Core,
                ["status"] = j.EndedWithError ? "failed" : "finished",
                ["runtime"] = Math.Round(j.ElapsedSeconds, 3),
                ["ios"] = j.Ios,
                ["iops"] = Math.Round(jobIops, 2),
                ["mibps"] = Math.Round(jobMib, 2),
                ["avg_latency_us"] = Math.Round(avg, 3),
                ["min_latency_us"] = Math.Round(h.Count == 0 ? 0 : us(h.Min), 3),
                ["p50_latency_us"] = Math.Round(us(h.Percentile(50)), 3),
                ["p90_latency_us"] = Math.Round(us(h.Percentile(90)), 3),
                ["p99_latency_us"] = Math.Round(us(h.Percentile(99)), 3),
                ["p999_latency_us"] = Math.Round(us(h.Percentile(99.9)), 3),
                ["max_latency_us"] = Math.Round(us(h.Max), 3),
                ["errors"] = j.Errors,
                ["io_failed"] = j.Errors,
                ["io_timeout"] = j.Timeouts,
                ["miscompares"] = j.Miscompares,
                ["allocated_bytes"] = j.AllocatedBytes,
            };
            if (perf.InterleaveMs > 0 && j != jobs[0] && TurnRatios(jobs[0], j) is { Length: > 0 } ratios)
            {
                // Per pair of adjacent turns (this job's k-th and the first job's k-th), its IOPS over the first's.
                Array.Sort(ratios);
                double median = ratios.Length % 2 == 1 ? ratios[ratios.Length / 2] : (ratios[(ratios.Length / 2) - 1] + ratios[ratios.Length / 2]) / 2;
                row["turns"] = j.TurnCount;
                row["turn_ratio_to_first"] = new JsonObject
                {
                    ["median"] = Math.Round(median, 4),
                    ["p10"] = Math.Round(ratios[ratios.Length / 10], 4),
                    ["p90"] = Math.Round(ratios[ratios.Length * 9 / 10], 4),
                    ["pairs"] = ratios.Length,
                };
                if (!cl.JsonOutput)
                {
                    Console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"  {j.TurnCount} turns of {perf.InterleaveMs} ms; IOPS vs {jobs[0].Desc.Bdev.Name}'s adjacent turn: median {median:F4} [p10 {ratios[ratios.Length / 10]:F4}, p90 {ratios[ratios.Length * 9 / 10]:F4}]"));
                }
            }

            rows.Add(row);
        }

        double allocPerIo = ios == 0 ? 0 : (double)allocated / ios;
        double cpuPerIoUs = ios == 0 ? 0 : cpu.TotalMicroseconds / ios;
        double totalAvg = total.Count == 0 ? 0 : us(total.Sum) / total.Count;
        if (cl.JsonOutput)
        {
            var result = new JsonObject
            {
                ["workload"] = perf.Workload.ToString().ToLowerInvariant(),
                ["queue_depth"] = perf.QueueDepth,
                ["io_size"] = perf.IoSize,
                ["seconds"] = perf.Seconds,
                ["jobs"] = rows,
                ["precondition_seconds"] = new JsonObject(preconditioned.Select(p => KeyValuePair.Create(p.Key, (JsonNode?)Math.Round(p.Value, 3)))),
                ["total"] = new JsonObject
                {
                    ["ios"] = ios,
                    ["iops"] = Math.Round(iops, 2),
                    ["mibps"] = Math.Round(mibs, 2),
                    ["avg_latency_us"] = Math.Round(totalAvg, 3),
                    ["p50_latency_us"] = Math.Round(us(total.Percentile(50)), 3),
                    ["p99_latency_us"] = Math.Round(us(total.Percentile(99)), 3),
                    ["p999_latency_us"] = Math.Round(us(total.Percentile(99.9)), 3),
                    ["errors"] = errors,
                    ["miscompares"] = miscompares,
                    ["allocated_bytes_per_io"] = Math.Round(allocPerIo, 4),
                    ["cpu_seconds"] = Math.Round(cpu.TotalSeconds, 3),
                    ["cpu_us_per_io"] = Math.Round(cpuPerIoUs, 4),
                },
            };
            Console.WriteLine(result.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
        }
        else
        {
            Console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"{"Total",-28} {iops,12:F2} {mibs,9:F2} {totalAvg,9:F2} {(total.Count == 0 ? 0 : us(total.Min)),9:F2} {us(total.Percentile(50)),9:F2} {us(total.Percentile(99)),9:F2} {us(total.Percentile(99.9)),9:F2} {us(total.Max),10:F2}"));
            Console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"CPU {cpu.TotalSeconds:F2} s ({cpuPerIoUs:F3} us per I/O), {allocPerIo:F3} bytes allocated per I/O on the reactors, {errors} errors, {miscompares} miscompares"));
        }

        // As SPDK's: with -f failed I/O is counted and the run still succeeds; a refused submit or a miscompare fails it.
        long submitErrors = jobs.Sum(j => j.SubmitErrors);
        return (errors > 0 && !perf.ContinueOnFailure) || submitErrors > 0 || miscompares > 0 || ios == 0 ? 1 : 0;
    }
}
