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
        };

        Application app;
        try
        {
            app = new Application(options, loggerFactory);
            StandardModules.Register(app);
            await app.StartAsync();
        }
        catch (ApplicationConfigException e)
        {
            Console.Error.WriteLine($"bdevperf: {e.Message}");
            return 1;
        }

        try
        {
            return await RunAsync(app, cl);
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

    private static async Task<int> RunAsync(Application app, BdevPerfCommandLine cl)
    {
        var bdevs = cl.Targets.Count > 0
            ? cl.Targets.Select(t => app.Bdevs.Find(t) ?? throw new ArgumentException($"-T: no bdev named '{t}'")).ToList()
            : app.Bdevs.All.Where(b => b.ClaimedBy is null).ToList();
        if (bdevs.Count == 0)
        {
            throw new ArgumentException("the config creates no bdev to test");
        }

        bool writes = cl.Perf.Workload is not (Workload.Read or Workload.RandRead);
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

        var jobs = new List<PerfJob>();
        foreach (var (bdev, reactor) in plan)
        {
            var job = await reactor.InvokeAsync(() => new PerfJob(app.Bdevs.Open(bdev.Name, writes), reactor, cl.Perf, app.SharedMemory));
            jobs.Add(job);
        }

        string header = $"Running {cl.Perf.Workload.ToString().ToLowerInvariant()} for {cl.Perf.Seconds} s: queue depth {cl.Perf.QueueDepth}, I/O size {cl.Perf.IoSize}, {jobs.Count} job(s) on cores {cl.CpuMask}";
        if (!cl.JsonOutput)
        {
            Console.WriteLine(header);
        }

        var cpu0 = Process.GetCurrentProcess().TotalProcessorTime;
        foreach (var j in jobs)
        {
            await j.Reactor.InvokeAsync(j.Start);
        }

        if (cl.Perf.WarmupSeconds > 0)
        {
            await Task.Delay(TimeSpan.FromSeconds(cl.Perf.WarmupSeconds));
            foreach (var j in jobs)
            {
                await j.Reactor.InvokeAsync(j.BeginMeasuring);
            }

            cpu0 = Process.GetCurrentProcess().TotalProcessorTime;
        }

        await Task.Delay(TimeSpan.FromSeconds(cl.Perf.Seconds));
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

        return Report(cl, jobs, cpu);
    }

    private static int Report(BdevPerfCommandLine cl, List<PerfJob> jobs, TimeSpan cpu)
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
            }

            rows.Add(new JsonObject
            {
                ["bdev"] = j.Desc.Bdev.Name,
                ["core"] = j.Reactor.Core,
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
                ["miscompares"] = j.Miscompares,
                ["allocated_bytes"] = j.AllocatedBytes,
            });
        }

        double allocPerIo = ios == 0 ? 0 : (double)allocated / ios;
        double cpuPerIoUs = ios == 0 ? 0 : cpu.TotalMicroseconds / ios;
        double totalAvg = total.Count == 0 ? 0 : us(total.Sum) / total.Count;
        if (cl.JsonOutput)
        {
            var result = new JsonObject
            {
                ["workload"] = cl.Perf.Workload.ToString().ToLowerInvariant(),
                ["queue_depth"] = cl.Perf.QueueDepth,
                ["io_size"] = cl.Perf.IoSize,
                ["seconds"] = cl.Perf.Seconds,
                ["jobs"] = rows,
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

        return errors > 0 || miscompares > 0 || ios == 0 ? 1 : 0;
    }
}
