using System.Diagnostics;
using System.Text.Json.Nodes;
using VhostBackend.IntegrationTests.Infrastructure;
using Xunit;
using Xunit.Abstractions;

namespace VhostBackend.IntegrationTests;

/// <summary>
/// ./bdevperf's SPDK options beyond the basic ones. On a failed I/O, as SPDK's bdevperf: without -f the first failed I/O ends the test (every job stops
/// issuing and drains; "task offset: N on job bdev=X fails", "Job: X ended in about T seconds with error", a non-zero
/// exit); with -f the failure is counted and the run goes on to its end (exit 0). The failure is real I/O failing: an
/// error bdev (bdev_error_inject_error in the config) over malloc fails the first write. And -S/-P (rates every
/// period), -l/-ll (latency summary and histogram), -k (I/O outstanding too long counted as timed out: a null bdev
/// under a 1000 IOPS QoS limit at queue depth 3000 keeps I/O waiting seconds), -F/-D/-U (offsets and data; their
/// distributions are checked in Bdev.Tests' OffsetGeneratorTests) and the options refused by name. No guest.
/// </summary>
public sealed class BdevPerfSpdkOptionsTests(ITestOutputHelper output)
{
    private async Task<(HostProcessResult Result, TimeSpan Took)> BdevPerf(params string[] args)
    {
        var sw = Stopwatch.StartNew();
        var r = await Tools.RunAsync(Path.Combine(GuestImage.RepoRoot, "bdevperf"), args, TimeSpan.FromMinutes(3), GuestImage.RepoRoot);
        output.WriteLine($"--- bdevperf {string.Join(' ', args)} (exit {r.ExitCode}, {sw.Elapsed.TotalSeconds:F1} s) ---\n{r.Output}");
        return (r, sw.Elapsed);
    }

    [Fact]
    public async Task A_failed_io_ends_the_test_unless_f_is_given()
    {
        var dir = Directory.CreateTempSubdirectory("vb-bdevperf-fail-").FullName;
        string config = Path.Combine(dir, "bdevs.json");
        File.WriteAllText(config, """
            {"subsystems": [{"subsystem": "bdev", "config": [
              {"method": "bdev_malloc_create", "params": {"name": "M", "num_blocks": 16384, "block_size": 512}},
              {"method": "bdev_error_create", "params": {"base_name": "M"}},
              {"method": "bdev_null_create", "params": {"name": "N", "num_blocks": 16384, "block_size": 512}},
              {"method": "bdev_error_inject_error", "params": {"name": "EE_M", "io_type": "write", "error_type": "failure", "num": 1}}
            ]}]}
            """);
        try
        {
            // Without -f: a 60-s run over two jobs (the error bdev's and a null bdev's) ends at the failure.
            var (failed, took) = await BdevPerf("--json", config, "-T", "EE_M", "-T", "N", "-q", "8", "-o", "4096", "-w", "randwrite", "-t", "60", "-m", "0x1");
            Assert.NotEqual(0, failed.ExitCode);
            Assert.Contains("on job bdev=EE_M fails", failed.Output, StringComparison.Ordinal);
            Assert.Matches(@"task offset: \d+ on job bdev=EE_M fails", failed.Output);
            Assert.Contains(" Job: EE_M ended in about ", failed.Output, StringComparison.Ordinal);
            Assert.DoesNotContain(" Job: N ended", failed.Output, StringComparison.Ordinal); // stopped by the test's end, not by an error of its own
            Assert.Contains("1 I/O errors", failed.Output, StringComparison.Ordinal);
            Assert.True(took < TimeSpan.FromSeconds(45), $"the run went on after the failure ({took.TotalSeconds:F0} s of a 60-s run)");

            // The same in JSON: the failed job's status and run time; the message goes to stderr, the JSON stays whole.
            var (json, _) = await BdevPerf("--json", config, "-T", "EE_M", "-T", "N", "-q", "8", "-o", "4096", "-w", "randwrite", "-t", "60", "-m", "0x1", "--output", "json");
            Assert.NotEqual(0, json.ExitCode);
            var jobs = JsonNode.Parse(json.Output[json.Output.IndexOf('{')..])!["jobs"]!.AsArray();
            var ee = jobs.Single(j => (string?)j!["bdev"] == "EE_M")!;
            var n = jobs.Single(j => (string?)j!["bdev"] == "N")!;
            Assert.Equal(("failed", 1L), ((string?)ee["status"], (long)ee["errors"]!));
            Assert.Equal(("finished", 0L), ((string?)n["status"], (long)n["errors"]!));
            Assert.InRange((double)ee["runtime"]!, 0, 45);

            // With -f: the failure is counted, the run goes to its end, and the exit code is 0 (as SPDK's).
            var (cont, contTook) = await BdevPerf("--json", config, "-T", "EE_M", "-T", "N", "-q", "8", "-o", "4096", "-w", "randwrite", "-t", "2", "-m", "0x1", "-f", "--output", "json");
            Assert.Equal(0, cont.ExitCode);
            var cjobs = JsonNode.Parse(cont.Output[cont.Output.IndexOf('{')..])!["jobs"]!.AsArray();
            var cee = cjobs.Single(j => (string?)j!["bdev"] == "EE_M")!;
            Assert.Equal(("finished", 1L), ((string?)cee["status"], (long)cee["errors"]!));
            Assert.True((long)cee["ios"]! > 0, "the error bdev's job did no I/O after its failure");
            Assert.InRange((double)cee["runtime"]!, 1.5, 3);
            Assert.DoesNotContain("fails", cont.Output, StringComparison.Ordinal);
            Assert.True(contTook >= TimeSpan.FromSeconds(2));
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    [Fact]
    public async Task Periodic_rates_latency_timeouts_and_offset_options()
    {
        var dir = Directory.CreateTempSubdirectory("vb-bdevperf-opts-").FullName;
        string config = Path.Combine(dir, "bdevs.json");
        File.WriteAllText(config, """
            {"subsystems": [{"subsystem": "bdev", "config": [
              {"method": "bdev_malloc_create", "params": {"name": "M", "num_blocks": 16384, "block_size": 512}},
              {"method": "bdev_null_create", "params": {"name": "Q", "num_blocks": 16384, "block_size": 512}},
              {"method": "bdev_set_qos_limit", "params": {"name": "Q", "rw_ios_per_sec": 1000}}
            ]}]}
            """);
        try
        {
            var (slow, _) = await BdevPerf("--json", config, "-T", "Q", "-q", "3000", "-o", "512", "-w", "randread", "-t", "3", "-S", "1", "-P", "2", "-ll", "-k", "1");
            Assert.Equal(0, slow.ExitCode);
            foreach (string line in new[] { "[1.00 s]", "[2.00 s]", "(EMA ", " Latency summary [us] for Q @ 0:", " 99.90000% : ", " Latency histogram [us] for Q @ 0:" })
            {
                Assert.Contains(line, slow.Output, StringComparison.Ordinal);
            }

            var timedOut = System.Text.RegularExpressions.Regex.Match(slow.Output, @"(\d+) I/Os timed out \(> 1 s");
            Assert.True(timedOut.Success && long.Parse(timedOut.Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture) > 0,
                "no I/O counted as timed out, though a 1000-IOPS limit at queue depth 3000 holds I/O for seconds");

            // Without -k nothing is counted (the control); JSON carries SPDK's io_timeout and io_failed.
            var (fast, _) = await BdevPerf("--json", config, "-T", "M", "-q", "16", "-o", "4096", "-w", "randwrite", "-t", "1", "-F", "1.2", "-D", "-U", "--output", "json");
            Assert.Equal(0, fast.ExitCode);
            var job = JsonNode.Parse(fast.Output[fast.Output.IndexOf('{')..])!["jobs"]![0]!;
            Assert.True((long)job["ios"]! > 0);
            Assert.Equal((0L, 0L), ((long)job["io_timeout"]!, (long)job["io_failed"]!));

            // Refused with the option named.
            var (p, _) = await BdevPerf("--json", config, "-T", "M", "-q", "1", "-o", "4096", "-w", "randread", "-t", "1", "-P", "4");
            Assert.NotEqual(0, p.ExitCode);
            Assert.Contains("-P option must be specified with -S option", p.Output, StringComparison.Ordinal);
            var (d, _) = await BdevPerf("--json", config, "-T", "M", "-q", "1", "-o", "4096", "-w", "read", "-t", "1", "-D");
            Assert.NotEqual(0, d.ExitCode);
            Assert.Contains("-D:", d.Output, StringComparison.Ordinal);
            var (z, _) = await BdevPerf("--json", config, "-T", "M", "-q", "1", "-o", "4096", "-w", "read", "-t", "1", "-Z");
            Assert.NotEqual(0, z.ExitCode);
            Assert.Contains("-Z: SPDK's bdevperf option is not supported here", z.Output, StringComparison.Ordinal);
            var (f, _) = await BdevPerf("--json", config, "-T", "M", "-q", "1", "-o", "4096", "-w", "randread", "-t", "1", "-F", "abc");
            Assert.NotEqual(0, f.ExitCode);
            Assert.Contains("-F: illegal zipf theta value abc", f.Output, StringComparison.Ordinal);
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }
}
