using System.Text.Json.Nodes;
using VhostBackend.IntegrationTests.Infrastructure;
using Xunit;
using Xunit.Abstractions;

namespace VhostBackend.IntegrationTests;

/// <summary>
/// ./bdevperf --interleave (ours): jobs on one reactor take turns and each job after the first reports the median of
/// its per-turn IOPS ratio to the first job's adjacent turn. The check is of the mechanism (turns taken by every job,
/// pairs formed, I/O done only in a job's own turns, nothing allocated per I/O, bad use refused), not of a speed: three
/// jobs (two identical null bdevs and a thick lvol on a third) rotate; the two identical nulls must come out near 1.
/// No guest.
/// </summary>
public sealed class BdevPerfInterleaveTests(ITestOutputHelper output)
{
    private async Task<HostProcessResult> BdevPerf(params string[] args)
    {
        var r = await Tools.RunAsync(Path.Combine(GuestImage.RepoRoot, "bdevperf"), args, TimeSpan.FromMinutes(5), GuestImage.RepoRoot);
        output.WriteLine($"--- bdevperf {string.Join(' ', args)} (exit {r.ExitCode}) ---\n{r.Output}");
        return r;
    }

    [Fact]
    public async Task Jobs_take_turns_and_report_their_ratio_to_the_first_job()
    {
        string dir = Path.Combine(GuestImage.RepoRoot, ".build", "bdevperf-interleave-" + Environment.ProcessId);
        Directory.CreateDirectory(dir);
        string config = Path.Combine(dir, "bdevs.json");
        File.WriteAllText(config, """
            {"subsystems": [{"subsystem": "bdev", "config": [
              {"method": "bdev_null_create", "params": {"name": "A", "num_blocks": 2097152, "block_size": 512}},
              {"method": "bdev_null_create", "params": {"name": "B", "num_blocks": 2097152, "block_size": 512}},
              {"method": "bdev_null_create", "params": {"name": "L", "num_blocks": 2097152, "block_size": 512}},
              {"method": "bdev_lvol_create_lvstore", "params": {"bdev_name": "L", "lvs_name": "lvs", "cluster_sz": 1048576}},
              {"method": "bdev_lvol_create", "params": {"lvs_name": "lvs", "lvol_name": "t", "size_in_mib": 512, "thin_provision": false}}
            ]}]}
            """);
        try
        {
            var r = await BdevPerf("--json", config, "-T", "A", "-T", "B", "-T", "lvs/t", "-q", "32", "-o", "4096", "-w", "randwrite",
                "-t", "3", "-W", "0.5", "-m", "0x1", "--interleave", "10", "--output", "json");
            Assert.Equal(0, r.ExitCode);
            var doc = JsonNode.Parse(r.Output[r.Output.IndexOf('{')..])!;
            var jobs = doc["jobs"]!.AsArray();
            Assert.Equal(3, jobs.Count);

            // 3 s in turns of 10 ms over three jobs: about 100 turns each (a loaded host runs a timed poller late, so fewer).
            foreach (var job in jobs)
            {
                Assert.True((long)job!["ios"]! > 0, $"{job["bdev"]}: no I/O");
                Assert.Equal(0L, (long)job["errors"]!);
            }

            Assert.Null(jobs[0]!["turn_ratio_to_first"]);
            for (int i = 1; i < 3; i++)
            {
                int turns = (int)jobs[i]!["turns"]!;
                Assert.InRange(turns, 20, 160);
                var ratio = jobs[i]!["turn_ratio_to_first"]!;
                Assert.True((int)ratio["pairs"]! >= turns - 2, $"{jobs[i]!["bdev"]}: {ratio["pairs"]} pairs for {turns} turns");
                Assert.True((double)ratio["median"]! > 0);
            }

            // Identical bdevs measured turn by turn: near 1 (wide bounds: this is a check of the pairing, not a benchmark).
            Assert.InRange((double)jobs[1]!["turn_ratio_to_first"]!["median"]!, 0.6, 1.6);

            // Each job's IOPS is over its own turns only: the jobs' measured times (I/Os over IOPS) add up to the 3 s run,
            // where jobs counted over the whole run would add up to 9 s.
            double seconds = jobs.Sum(j => (long)j!["ios"]! / (double)j["iops"]!);
            Assert.InRange(seconds, 2.4, 3.6);
            Assert.True((double)doc["total"]!["allocated_bytes_per_io"]! < 1.0, "interleaving allocated per I/O");

            // One job, or jobs on two reactors, cannot take turns: refused with the option named.
            var one = await BdevPerf("--json", config, "-T", "A", "-q", "8", "-o", "4096", "-w", "randread", "-t", "1", "--interleave", "10");
            Assert.NotEqual(0, one.ExitCode);
            Assert.Contains("--interleave", one.Output, StringComparison.Ordinal);
            var bad = await BdevPerf("--json", config, "-T", "A", "-T", "B", "-q", "8", "-o", "4096", "-w", "randread", "-t", "1", "--interleave", "0");
            Assert.NotEqual(0, bad.ExitCode);
            Assert.Contains("--interleave", bad.Output, StringComparison.Ordinal);
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    /// <summary>
    /// --precondition (ours): each target is written once in full before the jobs open, so a thin lvol is measured fully
    /// allocated. A thin lvol on a file: a randread run allocates nothing without it (the control: the check can fail)
    /// and all of the lvol's clusters with it; vhostd then finds the lvstore on the file by examine and reports them.
    /// </summary>
    [Fact]
    public async Task Precondition_fully_allocates_a_thin_lvol_before_the_jobs_open()
    {
        var dir = Directory.CreateTempSubdirectory("vb-precondition-").FullName;
        string file = Path.Combine(dir, "base.img");
        using (var f = File.Create(file))
        {
            f.SetLength(80 << 20);
        }

        string config = Path.Combine(dir, "bdevs.json");
        string create = $$$"""{"method": "bdev_aio_create", "params": {"name": "F", "filename": "{{{file}}}", "block_size": 4096}}""";
        File.WriteAllText(config, $$$"""
            {"subsystems": [{"subsystem": "bdev", "config": [
              {{{create}}},
              {"method": "bdev_lvol_create_lvstore", "params": {"bdev_name": "F", "lvs_name": "lvs", "cluster_sz": 1048576}},
              {"method": "bdev_lvol_create", "params": {"lvs_name": "lvs", "lvol_name": "v", "size_in_mib": 32, "thin_provision": true}}
            ]}]}
            """);
        string reopen = Path.Combine(dir, "reopen.json");
        File.WriteAllText(reopen, """{"subsystems": [{"subsystem": "bdev", "config": [""" + create + "]}]}");
        var log = new List<string>();
        async Task<long> Allocated()
        {
            await using var daemon = await VhostDaemon.StartAsync(dir, l => { lock (log) { log.Add(l); } }, "-c", reopen);
            var sw = System.Diagnostics.Stopwatch.StartNew();
            while (true)
            {
                var all = (JsonArray)(await daemon.CallAsync("bdev_get_bdevs", null))!;
                if (all.FirstOrDefault(b => b!["aliases"]!.AsArray().Any(a => (string?)a == "lvs/v")) is { } lvol)
                {
                    return (long)lvol["driver_specific"]!["lvol"]!["num_allocated_clusters"]!;
                }

                Assert.True(sw.Elapsed < TimeSpan.FromSeconds(30), "vhostd never found lvs/v on the file by examine");
                await Task.Delay(200);
            }
        }

        try
        {
            // Without it: reads of a fresh thin lvol allocate nothing.
            var plain = await BdevPerf("--json", config, "-T", "lvs/v", "-q", "8", "-o", "4096", "-w", "randread", "-t", "0.5", "--output", "json");
            Assert.Equal(0, plain.ExitCode);
            Assert.Equal(0L, await Allocated());

            // With it: the whole lvol written before the (read-only) job opens; the pass is reported per bdev.
            File.Delete(file);
            using (var f = File.Create(file))
            {
                f.SetLength(80 << 20);
            }

            var pre = await BdevPerf("--json", config, "-T", "lvs/v", "-q", "8", "-o", "4096", "-w", "randread", "-t", "0.5", "--precondition", "--output", "json");
            Assert.Equal(0, pre.ExitCode);
            var doc = JsonNode.Parse(pre.Output[pre.Output.IndexOf('{')..])!;
            var seconds = doc["precondition_seconds"]!.AsObject();
            Assert.Single(seconds);
            Assert.True((double)seconds.Single().Value! > 0);
            Assert.Equal(0L, (long)doc["total"]!["errors"]!);
            Assert.Equal(32L, await Allocated());
        }
        finally
        {
            lock (log)
            {
                output.WriteLine(string.Join("\n", log));
            }

            Directory.Delete(dir, recursive: true);
        }
    }
}
