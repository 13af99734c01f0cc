using System.Globalization;
using VhostBackend.Platform;
using VhostBackend.Reactors;

namespace VhostBackend.BdevPerf;

/// <summary>Command line in SPDK bdevperf's notation.</summary>
public sealed class BdevPerfCommandLine
{
    public string? ConfigFile { get; private set; }
    public PerfOptions Perf { get; } = new();
    public CpuSet CpuMask { get; private set; } = CpuSet.Of(0);
    public bool CpuMaskGiven { get; private set; }
    public ReactorMode ReactorMode { get; private set; } = ReactorMode.Poll;
    public List<string> Targets { get; } = new();
    public bool EveryCoreAllBdevs { get; private set; }
    public bool JsonOutput { get; private set; }
    public string? RpcSocket { get; private set; }
    public string LogLevel { get; private set; } = "warning";
    public bool Help { get; private set; }

    /// <summary>-z: set up, then run a test for each perform_tests RPC (SPDK's bdevperf -z) until stopped.</summary>
    public bool WaitForTests { get; private set; }

    /// <summary>-s: the shared I/O memory in MiB (what a virtio-user front end sends its back end).</summary>
    public ulong? MemSizeMiB { get; private set; }

    public const string Usage = """
        Usage: bdevperf --json CONFIG -q DEPTH -o IO_SIZE -w WORKLOAD -t SECONDS [options]
          -c, --json FILE        JSON config (SPDK format) creating the bdevs to test
          -q, --queue-depth N    I/Os in flight per job
          -o, --io-size SIZE     bytes per I/O (4096, 4k, 128k, 1m)
          -w, --workload W       read, write, randread, randwrite, rw, randrw, verify, flush, unmap, write_zeroes
          -t, --time SECONDS     run time (after warm-up)
          -M, --rwmixread PCT    read percentage for rw/randrw (default 50)
          -m, --cpumask MASK     reactor cores (0x3, [0,1]); default 0x1
          -T, --target BDEV      test only this bdev (repeatable); default: all bdevs of the config
          -C                     every core runs a job on every bdev (default: bdevs spread over cores)
          -W, --warmup SECONDS   warm-up before measuring (default 0)
          -S PERIOD              print each job's IOPS and MiB/s every PERIOD seconds while the test runs
          -P N                   with -S: also an exponential moving average of IOPS over N periods
          -l, -ll                latency summary per job (percentiles); -ll adds the latency histogram
          -k SECONDS             count I/O outstanding longer than SECONDS as timed out (TO/s; 0: off)
          -F THETA               random offsets from a zipf distribution with this theta (e.g. 1.2)
          -D                     random offsets from a random map: each slot once per pass over the bdev
          -U                     unique data in every write (each write's buffer filled anew)
          -f                     continue after a failed I/O (SPDK's -f; without it, as SPDK's bdevperf, the
                                 first failed I/O ends the test: every job stops issuing, drains and reports;
                                 a miscompare or a refused submit ends its own job either way)
          --precondition         before the jobs open, write each target once in full, in order, in I/Os of up
                                 to 1 MiB through a channel of its own (a thin lvol is then fully allocated, and
                                 the jobs start from the state a filled disk is in; ours, not SPDK's)
          --buf-offset N         start each I/O buffer N bytes (0-4095) into a page (default 0: page aligned);
                                 exercises drivers with misaligned buffers (ours, not SPDK's)
          --remap-memory MS      (virtio-user bdevs) re-send the memory table every MS ms while the test runs,
                                 as QEMU does when a guest's memory changes: tests a back end's memory table
                                 changing under load (ours, not SPDK's)
          --interleave MS        jobs take turns on their one reactor, MS ms each (e.g. -T base -T vbdev): each
                                 job's IOPS over its own turns, and per job the median of its per-turn IOPS
                                 ratio to the first job's turn just before (an A/B measured in one run, immune
                                 to the host's slow drifts; ours, not SPDK's)
          -r, --rpc-socket PATH  also serve JSON-RPC (bdev_get_iostat etc.) while running
          -z                     set up, then wait: each perform_tests RPC runs a test (params time_in_sec,
                                 workload_type, queue_depth, io_size, rw_percentage override the command
                                 line; ours: buf_offset) and answers when it ends; runs until SIGINT/SIGTERM;
                                 the RPC socket defaults to /var/tmp/spdk.sock
          -s, --mem-size MIB     shared I/O memory (the virtio-user front end's buffers; default 512): a back
                                 end with an IOMMU pins all of it, a small one is mapped sooner
          -L, --log-level LEVEL  error, warning, info, debug
          --reactor-mode MODE    poll (default), interrupt or adaptive: how idle reactors wait (interrupt:
                                 the virtio-user front end sleeps on its call eventfds)
          --interrupt-mode       same as --reactor-mode interrupt
          --output json          machine-readable results
          -h, --help
        """;

    public static BdevPerfCommandLine Parse(string[] args)
    {
        var o = new BdevPerfCommandLine();
        bool haveQ = false, haveO = false, haveW = false, haveT = false;
        for (int i = 0; i < args.Length; i++)
        {
            string a = args[i];
            string Value()
            {
                if (i + 1 >= args.Length)
                {
                    throw new ArgumentException($"option {a} needs a value");
                }

                return args[++i];
            }

            switch (a)
            {
                case "-c":
                case "--json":
                    o.ConfigFile = Value();
                    break;
                case "-q":
                case "--queue-depth":
                    o.Perf.QueueDepth = ParseInt(a, Value(), 1, 65536);
                    haveQ = true;
                    break;
                case "-o":
                case "--io-size":
                    o.Perf.IoSize = ParseSize(a, Value());
                    haveO = true;
                    break;
                case "-w":
                case "--workload":
                    o.Perf.Workload = ParseWorkload(Value());
                    haveW = true;
                    break;
                case "-t":
                case "--time":
                    o.Perf.Seconds = ParseDouble(a, Value(), 0.01, 86400);
                    haveT = true;
                    break;
                case "-M":
                case "--rwmixread":
                    o.Perf.ReadPercent = ParseInt(a, Value(), 0, 100);
                    break;
                case "-m":
                case "--cpumask":
                    string mask = Value();
                    if (!CpuSet.TryParse(mask, out var set, out var err))
                    {
                        throw new ArgumentException($"-m: {err}");
                    }

                    o.CpuMask = set;
                    o.CpuMaskGiven = true;
                    break;
                case "-T":
                case "--target":
                    o.Targets.Add(Value());
                    break;
                case "-C":
                    o.EveryCoreAllBdevs = true;
                    break;
                case "-W":
                case "--warmup":
                    o.Perf.WarmupSeconds = ParseDouble(a, Value(), 0, 3600);
                    break;
                case "-f":
                    o.Perf.ContinueOnFailure = true;
                    break;
                case "-S":
                    o.Perf.ShowPeriodSeconds = ParseInt(a, Value(), 1, 3600);
                    break;
                case "-P":
                    o.Perf.EmaPeriod = ParseInt(a, Value(), 1, 1000);
                    break;
                case "-l":
                case "-ll":
                    o.Perf.LatencyLevel = Math.Min(2, o.Perf.LatencyLevel + a.Length - 1);
                    break;
                case "-k":
                    o.Perf.TimeoutSeconds = ParseInt(a, Value(), 0, 86400);
                    break;
                case "-F":
                    string theta = Value();
                    o.Perf.ZipfTheta = double.TryParse(theta, NumberStyles.Float, CultureInfo.InvariantCulture, out double th) && th > 0 && th <= 100
                        ? th : throw new ArgumentException($"-F: illegal zipf theta value {theta} (a number in (0, 100])");
                    break;
                case "-D":
                    o.Perf.RandomMap = true;
                    break;
                case "-U":
                    o.Perf.UniqueWrites = true;
                    break;
                case "-Z":
                case "-X":
                case "-E":
                case "-j":
                case "-J":
                    throw new ArgumentException($"{a}: SPDK's bdevperf option is not supported here ({a switch
                    {
                        "-Z" => "the zcopy bdev API",
                        "-X" => "aborting timed-out I/O",
                        "-E" => "one shared thread per lcore",
                        "-j" => "job config files",
                        _ => "a JSON-RPC log file",
                    }})");
                case "--precondition":
                    o.Perf.Precondition = true;
                    break;
                case "--buf-offset":
                    o.Perf.BufferOffset = ParseInt(a, Value(), 0, 4095);
                    break;
                case "-r":
                case "--rpc-socket":
                    o.RpcSocket = Value();
                    break;
                case "--remap-memory":
                    o.Perf.RemapMemoryMs = ParseInt(a, Value(), 1, 3_600_000);
                    break;
                case "--interleave":
                    o.Perf.InterleaveMs = ParseInt(a, Value(), 1, 60_000);
                    break;
                case "-z":
                    o.WaitForTests = true;
                    break;
                case "-s":
                case "--mem-size":
                    o.MemSizeMiB = (ulong)ParseInt(a, Value(), 2, 1 << 20);
                    break;
                case "--interrupt-mode":
                    o.ReactorMode = ReactorMode.Interrupt;
                    break;
                case "--reactor-mode":
                    string mode = Value();
                    if (!ReactorOptions.TryParseMode(mode, out var parsed))
                    {
                        throw new ArgumentException($"--reactor-mode: unknown mode '{mode}' (poll, interrupt, adaptive)");
                    }

                    o.ReactorMode = parsed;
                    break;
                case "-L":
                case "--log-level":
                    o.LogLevel = Value();
                    break;
                case "--output":
                    string fmt = Value();
                    o.JsonOutput = fmt switch
                    {
                        "json" => true,
                        "text" => false,
                        _ => throw new ArgumentException($"--output: unknown format '{fmt}' (json or text)"),
                    };
                    break;
                case "-h":
                case "--help":
                    o.Help = true;
                    return o;
                default:
                    throw new ArgumentException($"unknown option '{a}'");
            }
        }

        if (o.ConfigFile is null)
        {
            throw new ArgumentException("--json CONFIG is required");
        }

        if (o.Perf.EmaPeriod > 0 && o.Perf.ShowPeriodSeconds == 0)
        {
            throw new ArgumentException("-P option must be specified with -S option");
        }

        if (o.WaitForTests)
        {
            o.RpcSocket ??= "/var/tmp/spdk.sock";
        }
        else if (!haveQ || !haveO || !haveW || !haveT)
        {
            throw new ArgumentException("-q, -o, -w and -t are required (or -z and perform_tests)");
        }

        return o;
    }

    private static int ParseInt(string opt, string v, int min, int max)
    {
        if (!int.TryParse(v, NumberStyles.None, CultureInfo.InvariantCulture, out int n) || n < min || n > max)
        {
            throw new ArgumentException($"{opt}: '{v}' is not an integer in [{min}, {max}]");
        }

        return n;
    }

    private static double ParseDouble(string opt, string v, double min, double max)
    {
        if (!double.TryParse(v, NumberStyles.Float, CultureInfo.InvariantCulture, out double n) || n < min || n > max)
        {
            throw new ArgumentException($"{opt}: '{v}' is not a number in [{min}, {max}]");
        }

        return n;
    }

    public static int ParseSize(string opt, string v)
    {
        string s = v.Trim().ToLowerInvariant();
        long mult = 1;
        if (s.EndsWith('k'))
        {
            mult = 1024;
            s = s[..^1];
        }
        else if (s.EndsWith('m'))
        {
            mult = 1024 * 1024;
            s = s[..^1];
        }

        if (!long.TryParse(s, NumberStyles.None, CultureInfo.InvariantCulture, out long n) || n <= 0 || n * mult > 64 * 1024 * 1024)
        {
            throw new ArgumentException($"{opt}: bad size '{v}'");
        }

        return (int)(n * mult);
    }

    public static Workload ParseWorkload(string v) => v switch
    {
        "read" => Workload.Read,
        "write" => Workload.Write,
        "randread" => Workload.RandRead,
        "randwrite" => Workload.RandWrite,
        "rw" => Workload.Rw,
        "randrw" => Workload.RandRw,
        "verify" => Workload.Verify,
        "flush" => Workload.Flush,
        "unmap" => Workload.Unmap,
        "write_zeroes" => Workload.WriteZeroes,
        _ => throw new ArgumentException($"-w: unknown workload '{v}'"),
    };
}
