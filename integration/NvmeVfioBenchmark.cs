using System.Globalization;
using System.Text;
using System.Text.Json.Nodes;
using VhostBackend.IntegrationTests.Infrastructure;
using Xunit;
using Xunit.Abstractions;

namespace VhostBackend.IntegrationTests;

/// <summary>
/// Issue 14's benchmark (not a test: run it with <c>scripts/perf-nvme-vfio.sh</c>, or VB_BENCH=1 and
/// <c>--filter NvmeVfioBenchmark</c>; skipped otherwise). In one q35 + intel-iommu TCG guest, on the same emulated NVMe
/// controller, interleaved rounds of:
/// <list type="bullet">
/// <item>kernel: the Linux nvme driver with fio (io_uring; interrupt-driven, and <c>--hipri</c> polled on a poll queue);</item>
/// <item>ours: ./bdevperf on the NVMe bdev over vfio-pci (polling reactor, and <c>--reactor-mode interrupt</c>);</item>
/// <item>vhost: ./vhostd serving the namespace over vhost-user-blk to a virtio-user ./bdevperf (zero-copy): the hop's cost.</item>
/// </list>
/// 4 KiB random reads, QD1 (latency) and QD32 (IOPS). The device is emulated by QEMU under TCG, so absolute numbers
/// are QEMU's emulation speed; the ratios in the same guest and rounds are what to read.
/// </summary>
public sealed class NvmeVfioBenchmark(ITestOutputHelper output)
{
    private const string Addr = "0000:00:04.0";

    /// <summary>Seconds of warm-up before each measured run (JIT tier-up of freshly started processes, caches).</summary>
    private const int Warmup = 3;

    private sealed record Sample(string Config, int Qd, double Iops, double AvgUs, double P50Us, double P99Us);

    [BenchmarkFact]
    public async Task Kernel_nvme_vs_userspace_driver_vs_vhost_hop()
    {
        Tools.Require("qemu-system-x86_64", "qemu-system-x86");
        int rounds = int.TryParse(Environment.GetEnvironmentVariable("VB_BENCH_ROUNDS"), out int r) ? r : 3;
        int secs = int.TryParse(Environment.GetEnvironmentVariable("VB_BENCH_SECONDS"), out int s) ? s : 5;
        string dir = Directory.CreateTempSubdirectory("vb-nvme-bench-").FullName;
        string img = Path.Combine(dir, "nvme.img");
        using (var f = File.Create(img))
        {
            f.SetLength(256L << 20);
        }

        foreach (string tool in new[] { "bdevperf", "vhostd", "vhostctl" })
        {
            var help = await Tools.RunAsync(Path.Combine(GuestImage.RepoRoot, tool), ["--help"], TimeSpan.FromMinutes(15), GuestImage.RepoRoot);
            Assert.True(help.ExitCode == 0, $"./{tool} does not build or run: {help.Output}");
        }

        string build = Path.Combine(GuestImage.RepoRoot, ".build");
        string direct = Path.Combine(build, "bench-nvme-direct.json");
        File.WriteAllText(direct, $$$"""
            {"subsystems": [{"subsystem": "bdev", "config": [
              {"method": "bdev_nvme_attach_controller", "params": {"name": "Nvme0", "trtype": "PCIe", "traddr": "{{{Addr}}}"}}]}]}
            """);
        string vhostd = Path.Combine(build, "bench-nvme-vhostd.json");
        File.WriteAllText(vhostd, $$$"""
            {"subsystems": [
              {"subsystem": "bdev", "config": [
                {"method": "bdev_nvme_attach_controller", "params": {"name": "Nvme0", "trtype": "PCIe", "traddr": "{{{Addr}}}"}}]},
              {"subsystem": "vhost_blk", "config": [
                {"method": "vhost_create_blk_controller", "params": {"ctrlr": "vhost.bench", "dev_name": "Nvme0n1", "cpumask": "0x1"}}]}]}
            """);
        string frontEnd = Path.Combine(build, "bench-nvme-fe.json");
        File.WriteAllText(frontEnd, """
            {"subsystems": [{"subsystem": "bdev", "config": [
              {"method": "bdev_virtio_attach_controller", "params": {"name": "VirtioBlk0", "trtype": "user", "traddr": "/tmp/vs/vhost.bench", "dev_type": "blk", "vq_count": 1, "vq_size": 128}}]}]}
            """);
        try
        {
            await using var guest = await QemuGuest.StartAsync(NvmeVfioTests.GuestOptions("nvme-bench",
            [
                "-drive", $"file={img},if=none,id=nvm0,format=raw",
                "-device", "nvme,serial=VBBENCH1,drive=nvm0,addr=04.0",
            ], output.WriteLine));
            string setup = Path.Combine("/host", GuestImage.RepoRoot.TrimStart('/'), "scripts/setup.sh");
            string repo = GuestImage.RepoRoot;
            var t = TimeSpan.FromMinutes(5);

            // A poll queue for fio --hipri (read when the driver probes the device).
            (await guest.ExecAsync("echo 1 > /sys/module/nvme/parameters/poll_queues; cat /sys/module/nvme/parameters/poll_queues", t)).EnsureSuccess();
            (await guest.ExecAsync($"PCI_ALLOWED='{Addr}' HUGEMEM=64 sh {setup} config && PCI_ALLOWED='{Addr}' sh {setup} reset; sleep 1; ls /sys/block", t)).EnsureSuccess();

            // Fill the namespace once so reads hit written blocks.
            (await guest.ExecHostAsync("fio --name=fill --filename=/dev/nvme0n1 --rw=write --bs=1M --direct=1 --ioengine=io_uring --size=256M --output-format=terse > /dev/null", t)).EnsureSuccess();

            var samples = new List<Sample>();
            for (int round = 0; round < rounds; round++)
            {
                output.WriteLine($"--- round {round + 1}/{rounds}");

                // Kernel driver.
                var bind = await guest.ExecAsync($"PCI_ALLOWED='{Addr}' sh {setup} reset; sleep 1; ls /sys/block | grep nvme0n1", t);
                Assert.True(bind.Succeeded, "the kernel nvme driver did not take the device back: " + bind);
                foreach (int qd in new[] { 1, 32 })
                {
                    foreach (bool hipri in new[] { false, true })
                    {
                        var fio = await guest.ExecHostAsync(
                            $"fio --name=b --filename=/dev/nvme0n1 --rw=randread --bs=4k --direct=1 --ioengine=io_uring --iodepth={qd} {(hipri ? "--hipri" : "")} --ramp_time={Warmup} --runtime={secs} --time_based --output-format=json",
                            t);
                        Assert.True(fio.Succeeded, fio.ToString());
                        samples.Add(ParseFio(hipri ? "kernel-polled" : "kernel-irq", qd, fio.Output));
                    }
                }

                // Our driver, directly (bdevperf on the NVMe bdev).
                (await guest.ExecAsync($"PCI_ALLOWED='{Addr}' HUGEMEM=64 sh {setup} config", t)).EnsureSuccess();
                foreach (int qd in new[] { 1, 32 })
                {
                    foreach (string mode in new[] { "poll", "interrupt" })
                    {
                        var bp = await guest.ExecHostAsync($"cd {repo} && ./bdevperf --json {direct} -q {qd} -o 4096 -w randread -W {Warmup} -t {secs} -m 0x1 --reactor-mode {mode} --output json", t);
                        Assert.True(bp.Succeeded, bp.ToString());
                        samples.Add(ParseBdevperf($"ours-{mode}", qd, bp.Output));
                    }
                }

                // Through vhost: vhostd (core 0) serving the namespace to a virtio-user bdevperf (core 1), zero-copy; both
                // polling ("vhost": vhostd --reactor-mode poll, bdevperf's default), then both sleeping on eventfds
                // ("vhost-intr"): with two polling processes both vCPUs spin and QEMU's device emulation shares the host's cores.
                foreach (var (vhostConfig, mode) in new[] { ("vhost", "poll"), ("vhost-intr", "interrupt") })
                {
                    var vh = await guest.ExecHostAsync(
                        $"cd {repo}; mkdir -p /tmp/vs; rm -f /tmp/vs/vhost.bench /tmp/bb.sock; (./vhostd -m 0x1 --reactor-mode {mode} -S /tmp/vs -r /tmp/vb.sock -c {vhostd} -L warning > /tmp/vbd.log 2>&1 &); "
                        + "for i in $(seq 1 600); do [ -S /tmp/vs/vhost.bench ] && break; sleep 0.2; done; "
                        + $"(./bdevperf --json {frontEnd} -z -r /tmp/bb.sock -s 32 -m 0x2 --reactor-mode {mode} --output json > /tmp/bb.log 2>&1 &); "
                        + "for i in $(seq 1 600); do [ -S /tmp/bb.sock ] && break; sleep 0.2; done; "
                        + "for i in $(seq 1 600); do ./vhostctl -s /tmp/vb.sock --json call bdev_get_iostat '{\"name\": \"Nvme0n1\"}' | tr -d ' \\n' | grep -q '\"pending_maps\":0,\"failed_maps\":0' && break; sleep 0.5; done; "
                        + $"./vhostctl -s /tmp/bb.sock -t 300 call perform_tests '{{\"workload_type\": \"randread\", \"queue_depth\": 32, \"io_size\": \"4096\", \"time_in_sec\": {Warmup}}}' > /dev/null; "
                        + "echo '=== MEASURED'; "
                        + $"./vhostctl -s /tmp/bb.sock -t 300 call perform_tests '{{\"workload_type\": \"randread\", \"queue_depth\": 1, \"io_size\": \"4096\", \"time_in_sec\": {secs}}}'; "
                        + $"./vhostctl -s /tmp/bb.sock -t 300 call perform_tests '{{\"workload_type\": \"randread\", \"queue_depth\": 32, \"io_size\": \"4096\", \"time_in_sec\": {secs}}}'; "
                        + "./vhostctl -s /tmp/vb.sock --json call bdev_get_iostat '{\"name\": \"Nvme0n1\"}' | tr -d ' \\n'; echo; "
                        + "pkill -TERM -f '[B]devPerf.dll.*bb.sock'; sleep 1; pkill -TERM -f '[V]hostBackend.Daemon.dll'; sleep 2; echo '=== FE'; cat /tmp/bb.log",
                        t);
                    Assert.True(vh.Succeeded, vh.ToString());
                    var runs = vh.Output[(vh.Output.IndexOf("=== FE", StringComparison.Ordinal) + 6)..];
                    var objs = SplitJsonObjects(runs);
                    Assert.True(objs.Count >= 3, "the vhost front end printed no results: " + vh.Output);
                    samples.Add(ParseBdevperf(vhostConfig, 1, objs[^2])); // the first is the warm-up run
                    samples.Add(ParseBdevperf(vhostConfig, 32, objs[^1]));
                }
            }

            var table = new StringBuilder();
            table.AppendLine(CultureInfo.InvariantCulture, $"{"config",-16} {"QD",3} {"IOPS med",10} {"avg us med",11} {"p50 us med",11} {"p99 us med",11}  (rounds: IOPS)");
            foreach (var g in samples.GroupBy(x => (x.Config, x.Qd)).OrderBy(g => g.Key.Qd).ThenBy(g => g.Key.Config, StringComparer.Ordinal))
            {
                table.AppendLine(CultureInfo.InvariantCulture,
                    $"{g.Key.Config,-16} {g.Key.Qd,3} {Median(g.Select(x => x.Iops)),10:F0} {Median(g.Select(x => x.AvgUs)),11:F1} {Median(g.Select(x => x.P50Us)),11:F1} {Median(g.Select(x => x.P99Us)),11:F1}  ({string.Join(", ", g.Select(x => x.Iops.ToString("F0", CultureInfo.InvariantCulture)))})");
            }

            // Ratios per round (same round = same placement), then the median.
            string Ratio(string a, string b, int qd, Func<Sample, double> f)
            {
                var ra = samples.Where(x => x.Config == a && x.Qd == qd).ToList();
                var rb = samples.Where(x => x.Config == b && x.Qd == qd).ToList();
                var ratios = ra.Zip(rb, (x, y) => f(x) / f(y)).ToList();
                return ratios.Count == 0 ? "n/a" : $"{Median(ratios):F2} [{ratios.Min():F2}-{ratios.Max():F2}]";
            }

            table.AppendLine("ratios (median [min-max] of per-round ratios):");
            table.AppendLine($"  QD32 IOPS   ours-poll / kernel-irq {Ratio("ours-poll", "kernel-irq", 32, x => x.Iops)}, ours-poll / kernel-polled {Ratio("ours-poll", "kernel-polled", 32, x => x.Iops)}, ours-interrupt / kernel-irq {Ratio("ours-interrupt", "kernel-irq", 32, x => x.Iops)}");
            table.AppendLine($"  QD1 avg lat kernel-irq / ours-poll {Ratio("kernel-irq", "ours-poll", 1, x => x.AvgUs)}, kernel-polled / ours-poll {Ratio("kernel-polled", "ours-poll", 1, x => x.AvgUs)}, kernel-irq / ours-interrupt {Ratio("kernel-irq", "ours-interrupt", 1, x => x.AvgUs)}  (> 1: ours faster)");
            table.AppendLine($"  vhost hop   QD1 avg lat vhost / ours-poll {Ratio("vhost", "ours-poll", 1, x => x.AvgUs)}; QD32 IOPS vhost / ours-poll {Ratio("vhost", "ours-poll", 32, x => x.Iops)}");
            table.AppendLine($"  vhost hop, interrupt mode   QD1 avg lat vhost-intr / ours-interrupt {Ratio("vhost-intr", "ours-interrupt", 1, x => x.AvgUs)}; QD32 IOPS vhost-intr / ours-interrupt {Ratio("vhost-intr", "ours-interrupt", 32, x => x.Iops)}; vhost-intr / vhost QD1 avg lat {Ratio("vhost-intr", "vhost", 1, x => x.AvgUs)}");
            var hop = samples.Where(x => x.Config == "vhost" && x.Qd == 1).Zip(samples.Where(x => x.Config == "ours-poll" && x.Qd == 1), (v, o) => v.AvgUs - o.AvgUs).ToList();
            table.AppendLine(CultureInfo.InvariantCulture, $"  vhost hop per I/O at QD1 (avg latency difference): {Median(hop):F1} us [{hop.Min():F1}-{hop.Max():F1}]");
            output.WriteLine(table.ToString());
            File.WriteAllText(Path.Combine(build, "bench-nvme-vfio.txt"), table.ToString());
        }
        finally
        {
            Directory.Delete(dir, true);
        }
    }

    /// <summary>
    /// Issue 14's "try it": a nested QEMU guest (TCG inside the TCG guest) whose disk is vhostd's vhost-user-blk
    /// controller on the NVMe namespace over vfio-pci (zero-copy): the time to boot it, and a write/read-back of 1 MiB
    /// through it. Driven over the nested guest's serial console (its initramfs is this project's guest image). Not a
    /// test: run with VB_BENCH=1 and <c>--filter NvmeVfioBenchmark.Nested</c>.
    /// </summary>
    [BenchmarkFact]
    public async Task Nested_guest_boots_on_vhost_blk_over_nvme()
    {
        Tools.Require("qemu-system-x86_64", "qemu-system-x86");
        var image = GuestImage.EnsureBuilt();
        string dir = Directory.CreateTempSubdirectory("vb-nvme-nested-").FullName;
        string img = Path.Combine(dir, "nvme.img");
        using (var f = File.Create(img))
        {
            f.SetLength(64L << 20);
        }

        foreach (string tool in new[] { "vhostd", "vhostctl" })
        {
            var help = await Tools.RunAsync(Path.Combine(GuestImage.RepoRoot, tool), ["--help"], TimeSpan.FromMinutes(15), GuestImage.RepoRoot);
            Assert.True(help.ExitCode == 0, $"./{tool} does not build or run: {help.Output}");
        }

        string build = Path.Combine(GuestImage.RepoRoot, ".build");
        string vhostd = Path.Combine(build, "nested-vhostd.json");
        File.WriteAllText(vhostd, $$$"""
            {"subsystems": [
              {"subsystem": "bdev", "config": [
                {"method": "bdev_nvme_attach_controller", "params": {"name": "Nvme0", "trtype": "PCIe", "traddr": "{{{Addr}}}"}}]},
              {"subsystem": "vhost_blk", "config": [
                {"method": "vhost_create_blk_controller", "params": {"ctrlr": "vhost.l2", "dev_name": "Nvme0n1", "cpumask": "0x1"}}]}]}
            """);
        try
        {
            await using var guest = await QemuGuest.StartAsync(NvmeVfioTests.GuestOptions("nvme-nested",
            [
                "-drive", $"file={img},if=none,id=nvm0,format=raw",
                "-device", "nvme,serial=VBNEST1,drive=nvm0,addr=04.0",
            ], output.WriteLine));
            string setup = Path.Combine("/host", GuestImage.RepoRoot.TrimStart('/'), "scripts/setup.sh");
            (await guest.ExecAsync($"PCI_ALLOWED='{Addr}' HUGEMEM=64 sh {setup} config", TimeSpan.FromMinutes(5))).EnsureSuccess();

            // The nested guest's console: commands go in through a FIFO, its output to a file; its disk is vhost.l2.
            string l2 = "qemu-system-x86_64 -nodefaults -no-user-config -display none -no-reboot -machine pc -accel tcg -m 256M "
                + "-object memory-backend-memfd,id=mem,size=256M,share=on -numa node,memdev=mem "
                + $"-kernel {image.KernelPath} -initrd {image.InitrdPath} -append 'console=ttyS0 vbguest.nohost panic=-1' "
                + "-chardev socket,id=vu,path=/tmp/vs/vhost.l2 -device vhost-user-blk-pci,chardev=vu,num-queues=1 "
                + "-serial pipe:/tmp/l2con -pidfile /tmp/l2.pid";
            var run = await guest.ExecHostAsync(
                $"cd {GuestImage.RepoRoot}; mkdir -p /tmp/vs; (./vhostd -m 0x1 -S /tmp/vs -r /tmp/vn.sock -c {vhostd} -L warning > /tmp/vn.log 2>&1 &); "
                + "for i in $(seq 1 600); do [ -S /tmp/vs/vhost.l2 ] && break; sleep 0.2; done; "
                + "rm -f /tmp/l2con.in /tmp/l2con.out /tmp/l2.pid; mkfifo /tmp/l2con.in /tmp/l2con.out; "
                + "(cat /tmp/l2con.out > /tmp/l2.log &); "
                + $"t0=$(date +%s); ({l2} > /tmp/l2qemu.log 2>&1; echo \"l2 qemu exit $?\" >> /tmp/l2qemu.log) & "
                + "exec 7>/tmp/l2con.in; "
                + "for i in $(seq 1 3600); do grep -q 'VBGUEST READY' /tmp/l2.log 2>/dev/null && break; sleep 1; done; "
                + "echo \"=== L2 BOOT $(( $(date +%s) - t0 )) s\"; "
                + "t1=$(date +%s); "
                + "echo 'dd if=/dev/urandom of=/tmp/a bs=64k count=16 2>/dev/null; dd if=/tmp/a of=/dev/vda bs=64k oflag=direct 2>/dev/null; "
                + "dd if=/dev/vda of=/tmp/b bs=64k count=16 iflag=direct 2>/dev/null; cmp /tmp/a /tmp/b && echo L2-DATA-$((40+2)); poweroff -f' >&7; "
                + "for i in $(seq 1 1800); do grep -q 'L2-DATA-42\\|differ' /tmp/l2.log 2>/dev/null && break; sleep 1; done; "
                + "echo \"=== L2 IO $(( $(date +%s) - t1 )) s\"; sleep 5; exec 7>&-; "
                + "./vhostctl -s /tmp/vn.sock --json call bdev_get_iostat '{\"name\": \"Nvme0n1\"}' | tr -d ' \\n'; echo; "
                + "[ -s /tmp/l2.pid ] && kill -KILL $(cat /tmp/l2.pid) 2>/dev/null; pkill -TERM -f '[V]hostBackend.Daemon.dll'; sleep 2; "
                + "echo '=== L2 console'; tail -40 /tmp/l2.log; cat /tmp/l2qemu.log; cat /tmp/vn.log",
                TimeSpan.FromMinutes(90));
            output.WriteLine(run.Output);
            Assert.Contains("L2-DATA-42", run.Output, StringComparison.Ordinal);
        }
        finally
        {
            Directory.Delete(dir, true);
        }
    }

    private static double Median(IEnumerable<double> values)
    {
        var v = values.Order().ToArray();
        return v.Length == 0 ? double.NaN : v.Length % 2 == 1 ? v[v.Length / 2] : (v[(v.Length / 2) - 1] + v[v.Length / 2]) / 2;
    }

    private static Sample ParseFio(string config, int qd, string text)
    {
        var json = JsonNode.Parse(text[text.IndexOf('{', StringComparison.Ordinal)..])!;
        var read = json["jobs"]![0]!["read"]!;
        var clat = read["clat_ns"]!;
        var pct = clat["percentile"]!;
        return new Sample(config, qd, (double)read["iops"]!, (double)read["lat_ns"]!["mean"]! / 1000,
            (double)pct["50.000000"]! / 1000, (double)pct["99.000000"]! / 1000);
    }

    private static Sample ParseBdevperf(string config, int qd, string text)
    {
        var json = JsonNode.Parse(text[text.IndexOf('{', StringComparison.Ordinal)..])!;
        var total = json["total"]!;
        Assert.Equal(0L, (long)total["errors"]!);
        return new Sample(config, qd, (double)total["iops"]!, (double)total["avg_latency_us"]!, (double)total["p50_latency_us"]!, (double)total["p99_latency_us"]!);
    }

    /// <summary>The top-level JSON objects in <paramref name="text"/> (bdevperf -z prints one per run).</summary>
    private static List<string> SplitJsonObjects(string text)
    {
        var list = new List<string>();
        int depth = 0, start = -1;
        for (int i = 0; i < text.Length; i++)
        {
            if (text[i] == '{')
            {
                if (depth++ == 0)
                {
                    start = i;
                }
            }
            else if (text[i] == '}' && depth > 0 && --depth == 0)
            {
                list.Add(text[start..(i + 1)]);
            }
        }

        return list;
    }
}

/// <summary>A benchmark in the integration project: skipped unless VB_BENCH=1 (it measures, it does not test).</summary>
[AttributeUsage(AttributeTargets.Method)]
public sealed class BenchmarkFactAttribute : FactAttribute
{
    public BenchmarkFactAttribute()
    {
        if (Environment.GetEnvironmentVariable("VB_BENCH") != "1")
        {
            Skip = "a benchmark: run it with VB_BENCH=1 (scripts/perf-nvme-vfio.sh)";
        }
    }
}
