using System.Diagnostics;
using VhostBackend.IntegrationTests.Infrastructure;
using Xunit;
using Xunit.Abstractions;

namespace VhostBackend.IntegrationTests;

/// <summary>
/// The userspace NVMe driver against QEMU's emulated NVMe controller, inside a TCG guest with an emulated
/// intel-iommu: scripts/setup.sh binds the devices to vfio-pci in the guest, and tests/NvmeGuestTool (built on
/// the host, run from the host's root shared over 9p) drives them. Two controllers: 512-byte and 4096-byte blocks.
/// </summary>
public sealed class NvmeVfioTests(ITestOutputHelper output)
{
    private const string Addr512 = "0000:00:04.0";
    private const string Addr4k = "0000:00:05.0";

    /// <summary>vhostctl against the vhost step's vhostd (raw JSON), run from the repository root in the guest.</summary>
    private const string Vctl = "./vhostctl -s /tmp/vd.sock --json";

    /// <summary>
    /// QEMU arguments for a q35 guest with an emulated IOMMU and NVMe controllers (the IOMMU must come before the
    /// devices it translates). <c>-cpu max,-smap</c> (overriding the harness's <c>-cpu max</c>): QEMU 7.2's TCG
    /// does the stack reads of a user-mode iretq (which .NET uses to restore thread contexts) as supervisor
    /// accesses, so with SMAP on, dotnet in the guest dies at random with a kernel Oops (and "nosmap" is gone
    /// from Linux 6.1).
    /// </summary>
    public static QemuGuestOptions GuestOptions(string name, IEnumerable<string> nvmeArgs, Action<string> log) => new()
    {
        Name = name,
        Machine = "q35,kernel-irqchip=split",
        // no_timer_check: on a loaded host the TCG guest's early IO-APIC timer check can miss its ticks and the kernel
        // panics ("timer doesn't work through Interrupt-remapped IO-APIC", seen with a host load average of 30).
        ExtraKernelArgs = ["intel_iommu=on", "no_timer_check"],
        ExtraQemuArgs = ["-cpu", "max,-smap", "-device", "intel-iommu,intremap=on,caching-mode=on", .. nvmeArgs],
        HostRootCache = "loose",
        Memory = "2G", // vhostd pins (VFIO MAP_DMA) a vhost front end's whole memory (bdevperf's virtio-user arena: 512 MiB)
        BootTimeout = TimeSpan.FromSeconds(120),
        Log = log,
    };

    public static async Task<string> EnsureGuestToolAsync(Action<string> log)
    {
        string dll = Path.Combine(GuestImage.RepoRoot, ".build/bin/VhostBackend.NvmeGuestTool/Debug/net10.0/VhostBackend.NvmeGuestTool.dll");
        // Always (incremental): the guest runs whatever is in .build.
        {
            // 15 min: an incremental build after a change in src/ took over 5 min on a host with a load average of 35.
            log("building tests/NvmeGuestTool");
            var r = await Tools.RunAsync("dotnet", ["build", Path.Combine(GuestImage.RepoRoot, "tests/NvmeGuestTool"), "-v", "q"], TimeSpan.FromMinutes(15), GuestImage.RepoRoot);
            Assert.True(r.ExitCode == 0, r.Output);
        }

        return dll;
    }

    [Fact]
    public async Task Driver_brings_up_identifies_and_does_io_on_real_qemu_nvme()
    {
        Tools.Require("qemu-system-x86_64", "qemu-system-x86");
        string dll = await EnsureGuestToolAsync(output.WriteLine);
        string dir = Directory.CreateTempSubdirectory("vb-nvme-").FullName;
        string img512 = Path.Combine(dir, "nvme512.img");
        string img4k = Path.Combine(dir, "nvme4k.img");
        using (var f = File.Create(img512))
        {
            f.SetLength(64L << 20);
        }

        using (var f = File.Create(img4k))
        {
            f.SetLength(32L << 20);
        }

        // The 4096-byte controller has a second namespace (512-byte blocks): two nvme-ns devices on one controller.
        string img4kNs2 = Path.Combine(dir, "nvme4k-ns2.img");
        using (var f = File.Create(img4kNs2))
        {
            f.SetLength(16L << 20);
        }

        // bdevperf and vhostd run from the read-only host root in the guest: build them here first (a tool that does
        // not build fails the test), write their configs where the guest can see them (the host's /tmp is not shared).
        foreach (string tool in new[] { "bdevperf", "vhostd", "vhostctl" })
        {
            var help = await Tools.RunAsync(Path.Combine(GuestImage.RepoRoot, tool), ["--help"], TimeSpan.FromMinutes(15), GuestImage.RepoRoot);
            Assert.True(help.Output.Contains("--json", StringComparison.Ordinal) || help.Output.Contains("--cpumask", StringComparison.Ordinal), $"./{tool} does not build or run: {help.Output}");
        }

        string bdevperfConfig = Path.Combine(GuestImage.RepoRoot, ".build", "nvme-bdevperf.json");
        File.WriteAllText(bdevperfConfig, $$$"""
            {"subsystems": [{"subsystem": "bdev", "config": [
              {"method": "bdev_nvme_attach_controller", "params": {"name": "Nvme0", "trtype": "PCIe", "traddr": "{{{Addr512}}}"}}
            ]}]}
            """);

        // vhostd serving the NVMe namespace as vhost-user-blk, everything on one reactor (-m 0x1: the vhost queue, the
        // NVMe queue pair, the admin and reset pollers, the RPC handlers); bdevperf drives it as a virtio-user front end.
        string vhostdConfig = Path.Combine(GuestImage.RepoRoot, ".build", "nvme-vhostd.json");
        File.WriteAllText(vhostdConfig, $$$"""
            {"subsystems": [
              {"subsystem": "bdev", "config": [
                {"method": "bdev_nvme_attach_controller", "params": {"name": "Nvme0", "trtype": "PCIe", "traddr": "{{{Addr512}}}"}},
                {"method": "bdev_nvme_attach_controller", "params": {"name": "Nvme1", "trtype": "PCIe", "traddr": "{{{Addr4k}}}"}}]},
              {"subsystem": "vhost_blk", "config": [
                {"method": "vhost_create_blk_controller", "params": {"ctrlr": "vhost.nvme", "dev_name": "Nvme0n1", "cpumask": "0x1"}}]},
              {"subsystem": "vhost_scsi", "config": [
                {"method": "vhost_create_scsi_controller", "params": {"ctrlr": "vhost.scsi", "cpumask": "0x1"}},
                {"method": "vhost_scsi_controller_add_target", "params": {"ctrlr": "vhost.scsi", "scsi_target_num": 0, "bdev_name": "Nvme1n1"}},
                {"method": "vhost_scsi_controller_add_target", "params": {"ctrlr": "vhost.scsi", "scsi_target_num": 1, "bdev_name": "Nvme1n2"}}]}
            ]}
            """);
        string frontEndConfig = Path.Combine(GuestImage.RepoRoot, ".build", "nvme-virtio-user.json");
        File.WriteAllText(frontEndConfig, """
            {"subsystems": [{"subsystem": "bdev", "config": [
              {"method": "bdev_virtio_attach_controller", "params": {"name": "VirtioBlk0", "trtype": "user", "traddr": "/tmp/vs/vhost.nvme", "dev_type": "blk", "vq_count": 1, "vq_size": 128}}
            ]}]}
            """);
        // The zero-copy checks drive both controllers at once: vhost-user-blk on the 512-byte namespace and
        // vhost-user-scsi (target 0) on the 4096-byte one, one virtio-user front end each in one bdevperf.
        string bothConfig = Path.Combine(GuestImage.RepoRoot, ".build", "nvme-virtio-user-both.json");
        File.WriteAllText(bothConfig, """
            {"subsystems": [{"subsystem": "bdev", "config": [
              {"method": "bdev_virtio_attach_controller", "params": {"name": "VirtioBlk0", "trtype": "user", "traddr": "/tmp/vs/vhost.nvme", "dev_type": "blk", "vq_count": 1, "vq_size": 128}},
              {"method": "bdev_virtio_attach_controller", "params": {"name": "VirtioScsi0", "trtype": "user", "traddr": "/tmp/vs/vhost.scsi", "dev_type": "scsi", "vq_count": 1, "vq_size": 128}}
            ]}]}
            """);

        // Issue 14's zero-copy checks, run against the vhost step's vhostd (see DmaCheckScript).
        string dmaCheck = Path.Combine(GuestImage.RepoRoot, ".build", "nvme-dma-check.sh");
        File.WriteAllText(dmaCheck, DmaCheckScript(bothConfig));
        try
        {
            await using var guest = await QemuGuest.StartAsync(GuestOptions("nvme-vfio",
            [
                "-drive", $"file={img512},if=none,id=nvm0,format=raw",
                "-device", "nvme,serial=VBTEST123,drive=nvm0,addr=04.0",
                "-drive", $"file={img4k},if=none,id=nvm1,format=raw",
                "-drive", $"file={img4kNs2},if=none,id=nvm2,format=raw",
                "-device", "nvme,id=nvmec1,serial=VBTEST4K,addr=05.0",
                "-device", "nvme-ns,bus=nvmec1,drive=nvm1,nsid=1,logical_block_size=4096,physical_block_size=4096",
                "-device", "nvme-ns,bus=nvmec1,drive=nvm2,nsid=2",
            ], output.WriteLine));
            var t = TimeSpan.FromMinutes(2);
            string setup = Path.Combine("/host", GuestImage.RepoRoot.TrimStart('/'), "scripts/setup.sh");

            // Both devices start on the kernel's nvme driver, each in its own IOMMU group.
            var before = await guest.ExecAsync($"sh {setup} status", t);
            output.WriteLine(before.Output);
            Assert.Contains($"{Addr512}  0x1b36 0x0010 nvme", before.Output, StringComparison.Ordinal);

            var cfg = await guest.ExecAsync($"PCI_ALLOWED='{Addr512} {Addr4k}' HUGEMEM=64 sh {setup} config", t);
            output.WriteLine(cfg.Output);
            Assert.True(cfg.Succeeded, cfg.ToString());
            var status = await guest.ExecAsync($"sh {setup} status", t);
            Assert.Contains($"{Addr512}  0x1b36 0x0010 vfio-pci", status.Output, StringComparison.Ordinal);
            Assert.Contains($"{Addr4k}  0x1b36 0x0010 vfio-pci", status.Output, StringComparison.Ordinal);
            Assert.Contains("hugepages: 32 x 2 MiB", status.Output, StringComparison.Ordinal);

            var sw = Stopwatch.StartNew();
            var run = await guest.ExecHostAsync($"dotnet {dll} --traddr {Addr512} --serial VBTEST123 --blocks {64 << 20 >> 9} --block-size 512 --qpairs 3", TimeSpan.FromMinutes(5));
            output.WriteLine($"--- 512-byte controller ({sw.Elapsed.TotalSeconds:F1} s) ---\n{run.Output}");
            Assert.True(run.Succeeded, run.ToString() + "\n" + guest.ConsoleTail());
            foreach (var check in new[] { "attach", "identify-serial", "identify-size", "identify-block-size", "write-qpairs", "read-verify-qpairs", "compare-miscompare", "prp-list-sgl", "flush", "write-zeroes", "deallocate", "reset-during-io", "io-after-reset", "detach" })
            {
                Assert.Contains($"PASS {check}", run.Output, StringComparison.Ordinal);
            }

            sw.Restart();
            run = await guest.ExecHostAsync($"dotnet {dll} --traddr {Addr4k} --serial VBTEST4K --blocks {32 << 20 >> 12} --block-size 4096 --qpairs 2", TimeSpan.FromMinutes(5));
            output.WriteLine($"--- 4096-byte controller ({sw.Elapsed.TotalSeconds:F1} s) ---\n{run.Output}");
            Assert.True(run.Succeeded, run.ToString() + "\n" + guest.ConsoleTail());
            Assert.Contains("PASS identify-block-size: 4096", run.Output, StringComparison.Ordinal);

            // The bdev module on the real device: reactors, bdev layer, bounce and zero-copy paths, reset with retry.
            sw.Restart();
            run = await guest.ExecHostAsync($"dotnet {dll} --traddr {Addr4k} --bdev 1", TimeSpan.FromMinutes(5));
            output.WriteLine($"--- bdev module on the 4096-byte controller ({sw.Elapsed.TotalSeconds:F1} s) ---\n{run.Output}");
            Assert.True(run.Succeeded, run.ToString() + "\n" + guest.ConsoleTail());
            foreach (var check in new[] { "bdev-attach", "bdev-bounce-write-read", "bdev-zero-copy", "bdev-compare", "bdev-write-zeroes", "bdev-reset-retry", "bdev-detach" })
            {
                Assert.Contains($"PASS {check}", run.Output, StringComparison.Ordinal);
            }

            // bdevperf -w verify over a config that attaches the controller.
            sw.Restart();
            run = await guest.ExecHostAsync($"cd {GuestImage.RepoRoot} && ./bdevperf --json {bdevperfConfig} -q 16 -o 4096 -w verify -t 5 -m 0x3", TimeSpan.FromMinutes(5));
            output.WriteLine($"--- bdevperf verify ({sw.Elapsed.TotalSeconds:F1} s) ---\n{run.Output}");
            Assert.True(run.Succeeded, run.ToString() + "\n" + guest.ConsoleTail());
            Assert.Contains("Nvme0n1", run.Output, StringComparison.Ordinal);

            // The non-blocking control path under vhost I/O: vhostd serves the namespace as vhost-user-blk with the
            // vhost queue, the NVMe queue pair, the admin and reset pollers and the RPC handlers on one reactor
            // (-m 0x1); bdevperf, a virtio-user front end on the other vCPU, verifies through it. NvmeGuestTool, over
            // vhostd's RPC socket, alternates baseline windows and windows with bdev_nvme_reset_controller, reading
            // the reactor's longest loop iteration (framework_get_reactors max_iteration_us) for each.
            // vhostd maps the front end's memory for the device (zero-copy, the default; docs/DMA.md).
            // VHOSTBACKEND_NVME_ZERO_COPY=0 in the test's environment runs it with every guest buffer bounced instead
            // (the zero-copy assertions are then skipped: reported as such in the output).
            bool zeroCopyOn = Environment.GetEnvironmentVariable("VHOSTBACKEND_NVME_ZERO_COPY") != "0";
            string zeroCopy = zeroCopyOn ? "" : "VHOSTBACKEND_NVME_ZERO_COPY=0 ";
            output.WriteLine($"vhostd zero-copy: {(zeroCopyOn ? "on (default)" : "off")}");
            sw.Restart();
            // Each stage is its own guest command under `timeout`, so a stage that hangs still shows what it printed.
            run = await guest.ExecHostAsync(
                $"cd {GuestImage.RepoRoot}; mkdir -p /tmp/vs; ({zeroCopy}./vhostd -m 0x1 -S /tmp/vs -r /tmp/vd.sock -c {vhostdConfig} -L warning > /tmp/vd.log 2>&1; echo \"vhostd exit $?\" >> /tmp/vd.log) & "
                + WaitForSocket("/tmp/vs/vhost.nvme", 600)
                + $"(timeout -s KILL 400 ./bdevperf --json {frontEndConfig} -s 32 -q 16 -o 4096 -w verify -t 60 -m 0x2 > /tmp/bp.log 2>&1; echo \"bdevperf exit $?\" >> /tmp/bp.log) & bp=$!; "
                + $"timeout -s KILL 400 dotnet {dll} --rpc-reset-check /tmp/vd.sock --ctrl Nvme0 --bdev-name Nvme0n1 --rounds 4 --window-ms 3000; echo \"tool exit $?\"; "
                + "wait $bp; echo '--- verify run'; cat /tmp/bp.log",
                TimeSpan.FromMinutes(8));
            output.WriteLine($"--- resets under vhost-user-blk verify I/O ({sw.Elapsed.TotalSeconds:F1} s) ---\n{run.Output}");
            string stage2 = await RunStage(guest, output.WriteLine, "idle sleep and QD1 through vhost",
                // Reported, not asserted (issue 14's numbers): the bounce counters after the verify run, the reactor's
                // sleep count across 5 idle seconds, and a QD1 run through vhost.
                $"cd {GuestImage.RepoRoot}; echo '--- iostat after verify'; {Iostat(Vctl, "Nvme0n1")}; "
                + $"echo '--- reactors (idle start)'; {Vctl} framework_get_reactors; sleep 5; echo '--- reactors (after 5 s idle)'; {Vctl} framework_get_reactors; "
                + $"timeout -s KILL 200 ./bdevperf --json {frontEndConfig} -s 32 -q 1 -o 4096 -w randread -t 10 -m 0x2 > /tmp/bp1.log 2>&1; echo \"bdevperf qd1 exit $?\" >> /tmp/bp1.log; "
                + $"echo '--- iostat after QD1'; {Iostat(Vctl, "Nvme0n1")}; echo '--- reactors after QD1'; {Vctl} framework_get_reactors; "
                + "echo '--- QD1 run'; cat /tmp/bp1.log",
                TimeSpan.FromMinutes(4));
            string stage3 = await RunStage(guest, output.WriteLine, "zero-copy checks", $"cd {GuestImage.RepoRoot}; timeout -s KILL 720 sh {dmaCheck}", TimeSpan.FromMinutes(13));
            string stage4 = await RunStage(guest, output.WriteLine, "vhostd stop",
                "kill -TERM $(pgrep -f [V]hostBackend.Daemon.dll) 2>/dev/null; for i in $(seq 1 50); do pgrep -f [V]hostBackend.Daemon.dll > /dev/null || break; sleep 0.2; done; cat /tmp/vd.log",
                TimeSpan.FromMinutes(2));
            output.WriteLine($"(vhost step {sw.Elapsed.TotalSeconds:F1} s)");
            Assert.True(run.Succeeded, run.ToString() + "\n" + guest.ConsoleTail());
            Assert.Contains("PASS rpc-reset-under-io", run.Output, StringComparison.Ordinal);
            Assert.Contains("tool exit 0", run.Output, StringComparison.Ordinal);
            Assert.Contains("bdevperf exit 0", run.Output, StringComparison.Ordinal); // verify through vhost: no errors, no miscompares
            Assert.Contains("VirtioBlk0", run.Output, StringComparison.Ordinal);
            Assert.Contains("bdevperf qd1 exit 0", stage2, StringComparison.Ordinal);
            Assert.DoesNotContain("vhostd exit", stage3, StringComparison.Ordinal); // still running after every front end
            CheckDma(stage3, zeroCopyOn);
            var m = System.Text.RegularExpressions.Regex.Match(run.Output, @"baseline=\[[^\]]*\] max (\d+); during reset=\[([^\]]*)\] max \d+; reset rpc ms=\[[^\]]*\]; max_control_step_us=\[([^\]]*)\]");
            Assert.True(m.Success, "no MEASURE line");
            double baselineUs = double.Parse(m.Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture);

            // A reset that blocks the reactor does so in every window; one window with a stall while its control steps
            // stayed short is the TCG guest preempting the reactor (seen twice: 451 and 457 ms in one window of four,
            // with a 30-46 ms longest control step and a 31-34 ms baseline). So the bound applies to the second-longest window.
            var resetWindows = m.Groups[2].Value.Split(',').Select(v => double.Parse(v, System.Globalization.CultureInfo.InvariantCulture)).OrderDescending().ToArray();
            double resetUs = resetWindows.Length > 1 ? resetWindows[1] : resetWindows[0];
            double stepUs = m.Groups[3].Value.Split(',').Max(v => double.Parse(v, System.Globalization.CultureInfo.InvariantCulture));
            output.WriteLine($"longest reactor iteration: baseline {baselineUs} us, with resets {resetUs} us (second-longest window); longest control-path step {stepUs} us");

            // The bound: under 1 ms. When the TCG guest's own noise (the baseline windows: a starved vCPU preempts
            // the reactor for hundreds of ms) already exceeds that, the windows with a (warm) reset must stay within
            // that noise (twice the baseline), not add a blocking wait.
            Assert.True(resetUs < 1000 || resetUs <= 2 * baselineUs, $"resets made the reactor's longest iteration {resetUs} us in at least two windows (baseline {baselineUs} us)");

            // reset gives the devices back to the kernel driver, which sees the data the userspace driver wrote.
            var reset = await guest.ExecAsync($"PCI_ALLOWED='{Addr512} {Addr4k}' sh {setup} reset; sleep 1; sh {setup} status; ls /sys/block", t);
            output.WriteLine(reset.Output);
            Assert.Contains($"{Addr512}  0x1b36 0x0010 nvme", reset.Output, StringComparison.Ordinal);
            Assert.Contains("nvme0n1", reset.Output, StringComparison.Ordinal);
            var data = await guest.ExecAsync("dd if=/dev/nvme0n1 bs=4096 count=1 iflag=direct 2>/dev/null | tr -d '\\000' | wc -c", t);
            Assert.True(data.Succeeded && int.TryParse(data.Output.Trim(), out int nonZero) && nonZero > 0, "kernel driver reads zeroes where the userspace driver wrote data: " + data);

            await HotRemovalCheckAsync(guest, setup, t);
        }
        finally
        {
            Directory.Delete(dir, true);
        }
    }

    /// <summary>Runs one stage of the vhost step in the guest; its output, or a failure with the output so far.</summary>
    private static async Task<string> RunStage(QemuGuest guest, Action<string> log, string name, string command, TimeSpan timeout)
    {
        var sw = Stopwatch.StartNew();
        var r = await guest.ExecHostAsync(command, timeout);
        log($"--- {name} ({sw.Elapsed.TotalSeconds:F1} s) ---\n{r.Output}");
        Assert.True(r.Succeeded, $"stage '{name}' failed: {r}\n{guest.ConsoleTail()}");
        return r.Output;
    }

    /// <summary>The runs of the zero-copy check: workload, queue depth, I/O size, buffer offset into its page.</summary>
    private static readonly (string Workload, int Qd, int Size, int Offset)[] s_zeroCopyRuns =
    [
        ("verify", 1, 4096, 0),
        ("verify", 16, 4096, 0),
        ("verify", 4, 65536, 0),    // 16 pages: a PRP list
        ("verify", 8, 131072, 0),   // the largest I/O (128 KiB)
        ("verify", 8, 16384, 512),  // starts inside a page (sector aligned): PRP1 with an offset, still zero-copy
        ("randread", 1, 4096, 0),   // QD1 latency through vhost, zero-copy, reactor in adaptive mode
    ];

    /// <summary>
    /// Issue 14's checks against the vhost step's running vhostd (RPC /tmp/vd.sock), run in the guest from the
    /// repository root. A virtio-user bdevperf started with -z (one process, one 32 MiB shared arena) waits until vhostd
    /// reports its memory mapped for the device (bdev_get_iostat nvme_dma: no map pending, one more range mapped), then
    /// runs each of <see cref="s_zeroCopyRuns"/> over perform_tests; then a run with buffers 3 bytes into a page (PRPs
    /// cannot describe that: bounced). bdev_get_iostat is printed between the stages (=== IOSTAT name ... === END).
    /// Then a front end is SIGKILLed in the middle of 64 KiB verify I/O, and vhostd must still answer and serve a new one.
    /// </summary>
    private static string DmaCheckScript(string frontEndConfig)
    {
        var runs = string.Join("\n", s_zeroCopyRuns.Select(r =>
            $"pt {r.Workload} {r.Qd} {r.Size} {r.Offset}"));
        return $$"""
            #!/bin/sh
            V="./vhostctl -s /tmp/vd.sock --json -t 30"
            P="./vhostctl -s /tmp/bpz.sock --json -t 120"
            stat() { $V call bdev_get_iostat | tr -d ' \n'; }
            field() { echo "$1" | sed -n "s/.*\"$2\":\([0-9a-z]*\).*/\1/p"; }
            iostat() { echo "=== IOSTAT $1"; stat; echo; echo "=== END"; }
            pt() {
              echo "=== RUN $1 $2 $3 $4"
              $P call perform_tests "{\"workload_type\": \"$1\", \"queue_depth\": $2, \"io_size\": \"$3\", \"time_in_sec\": 5, \"buf_offset\": $4}"
              echo "=== RC $?"
            }
            m0=$(field "$(stat)" mapped_ranges)
            rm -f /tmp/bpz.sock
            ./bdevperf --json {{frontEndConfig}} -z -r /tmp/bpz.sock -s 32 -m 0x2 > /tmp/bpz.log 2>&1 &
            bpz=$!
            for i in $(seq 1 600); do [ -S /tmp/bpz.sock ] && break; sleep 0.2; done
            t0=$(date +%s)
            while [ $(( $(date +%s) - t0 )) -lt 240 ]; do
              s=$(stat)
              [ "$(field "$s" pending_maps)" = 0 ] && [ "$(field "$s" mapped_ranges)" -gt "$m0" ] && break
              sleep 1
            done
            echo "=== MAPPED after $(( $(date +%s) - t0 )) s (mapped_ranges before: $m0)"
            iostat ready
            {{runs}}
            iostat aligned
            pt verify 4 4096 3
            iostat misaligned
            echo "=== RUN remap"
            $P call perform_tests '{"workload_type": "verify", "queue_depth": 16, "io_size": "16384", "time_in_sec": 12, "buf_offset": 0, "remap_memory_ms": 2000}'
            echo "=== RC $?"
            iostat remapped
            echo "=== DMAR faults: $(dmesg | grep -c -i 'dmar.*fault')"
            kill -TERM $bpz; wait $bpz
            echo "=== perform_tests front end log"; cat /tmp/bpz.log
            ./bdevperf --json {{frontEndConfig}} -s 32 -q 32 -o 65536 -w verify -t 60 -m 0x2 > /tmp/bpk.log 2>&1 &
            k=$!
            sleep 12
            kill -9 $k; wait $k
            sleep 2
            $V framework_get_reactors > /dev/null && echo "=== ALIVE after the front end was killed"
            ./bdevperf --json {{frontEndConfig}} -s 32 -q 8 -o 4096 -w verify -t 5 -m 0x2 > /tmp/bpa.log 2>&1
            echo "=== AFTER-KILL exit $?"
            cat /tmp/bpa.log
            iostat end
            """;
    }

    /// <summary>
    /// The namespaces under vhost in the zero-copy checks: Nvme0n1 (512-byte blocks, vhost-blk), Nvme1n1 (4096-byte) and
    /// Nvme1n2 (512-byte, the same controller's second namespace), targets 0 and 1 of vhost-scsi.
    /// </summary>
    private static readonly string[] s_namespaces = ["Nvme0n1", "Nvme1n1", "Nvme1n2"];

    /// <summary>Asserts <see cref="DmaCheckScript"/>'s results in <paramref name="output"/> and reports its numbers.</summary>
    private void CheckDma(string text, bool zeroCopyOn)
    {
        // The NVMe bdevs' driver_specific stats (Nvme0n1 under vhost-blk, Nvme1n1 under vhost-scsi) in one iostat.
        Dictionary<string, System.Text.Json.Nodes.JsonNode> Stats(string name)
        {
            var m = System.Text.RegularExpressions.Regex.Match(text, $"=== IOSTAT {name}\\n(.*?)\\n=== END", System.Text.RegularExpressions.RegexOptions.Singleline);
            Assert.True(m.Success, $"no iostat '{name}' in the DMA check's text");
            var d = new Dictionary<string, System.Text.Json.Nodes.JsonNode>();
            foreach (var b in System.Text.Json.Nodes.JsonNode.Parse(m.Groups[1].Value)!["bdevs"]!.AsArray())
            {
                if (b!["driver_specific"]?["nvme_bounce"] is not null)
                {
                    d[(string)b["name"]!] = b["driver_specific"]!;
                }
            }

            Assert.True(d.ContainsKey("Nvme0n1") && d.ContainsKey("Nvme1n1") && d.ContainsKey("Nvme1n2"), $"iostat '{name}' lacks the NVMe bdevs: {m.Groups[1].Value}");
            return d;
        }

        System.Text.Json.Nodes.JsonNode Stat(string name) => Stats(name)["Nvme0n1"];
        long BouncedOf(string name, string bdev) => (long)Stats(name)[bdev]["nvme_bounce"]!["bounced_ios"]!;
        long Bounced(string name) => s_namespaces.Sum(ns => BouncedOf(name, ns));

        Assert.Contains("=== MAPPED", text, StringComparison.Ordinal);
        Assert.Contains("VirtioScsi0t0", text, StringComparison.Ordinal); // the vhost-scsi LUN on the 4096-byte namespace ran too
        Assert.Contains("VirtioScsi0t1", text, StringComparison.Ordinal); // and the one on the same controller's second namespace
        var ready = Stat("ready");
        output.WriteLine($"DMA state when the front end's memory was mapped: {ready["nvme_dma"]!.ToJsonString()}");
        foreach (var r in s_zeroCopyRuns)
        {
            var m = System.Text.RegularExpressions.Regex.Match(text, $"=== RUN {r.Workload} {r.Qd} {r.Size} {r.Offset}\\n(.*?)=== RC (\\d+)", System.Text.RegularExpressions.RegexOptions.Singleline);
            Assert.True(m.Success && m.Groups[2].Value == "0", $"perform_tests {r} through vhost to the NVMe namespace failed: {(m.Success ? m.Value : "not run")}");
        }

        long b0 = Bounced("ready"), b1 = Bounced("aligned"), b2 = Bounced("misaligned");
        output.WriteLine($"bounced I/Os: {b0} before the runs, {b1} after the page-aligned and in-page-offset runs, {b2} after the 3-byte-offset run");
        var mis = System.Text.RegularExpressions.Regex.Match(text, "=== RUN verify 4 4096 3\\n(.*?)=== RC (\\d+)", System.Text.RegularExpressions.RegexOptions.Singleline);
        Assert.True(mis.Success && mis.Groups[2].Value == "0", "the run with buffers 3 bytes into a page failed: " + mis.Value);
        if (zeroCopyOn)
        {
            Assert.Equal(0, (long)ready["nvme_dma"]!["failed_maps"]!);
            Assert.True(b1 == b0, $"{b1 - b0} I/Os were bounced although every buffer was PRP-describable registered memory");
            foreach (string ns in s_namespaces)
            {
                Assert.True(BouncedOf("misaligned", ns) > BouncedOf("aligned", ns),
                    $"buffers 3 bytes into a page (not dword aligned: PRPs cannot describe them) were not bounced on {ns}");
            }
        }
        else
        {
            output.WriteLine("zero-copy off (VHOSTBACKEND_NVME_ZERO_COPY=0): the zero-copy assertions were SKIPPED");
        }

        // The memory table re-sent under verify load (every 2 s for 12 s): each time vhostd drains and stops the queue,
        // withdraws the old mappings (IOMMU unmap after the drain) and maps the new ones; data stays right, and the
        // device never touched an unmapped IOVA (the guest's intel-iommu reports such DMA as a DMAR fault).
        var remap = System.Text.RegularExpressions.Regex.Match(text, "=== RUN remap\n(.*?)=== RC (\\d+)", System.Text.RegularExpressions.RegexOptions.Singleline);
        Assert.True(remap.Success && remap.Groups[2].Value == "0", "verify with the memory table changing under load failed: " + remap.Value);
        var resent = System.Text.RegularExpressions.Regex.Match(text, @"memory table re-sent (\d+) time");
        Assert.True(resent.Success && int.Parse(resent.Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture) >= 3, "the front end did not re-send its memory table during the run");
        long b3 = Bounced("remapped");
        output.WriteLine($"memory table re-sent {resent.Groups[1].Value} times under verify load: {b3 - b2} I/Os bounced meanwhile (while a new table's ranges were being mapped)");
        var faults = System.Text.RegularExpressions.Regex.Match(text, @"=== DMAR faults: (\d+)");
        Assert.True(faults.Success && faults.Groups[1].Value == "0", "the IOMMU reported DMA faults: " + faults.Value);

        Assert.Contains("=== ALIVE after the front end was killed", text, StringComparison.Ordinal);
        Assert.Contains("=== AFTER-KILL exit 0", text, StringComparison.Ordinal);
    }

    /// <summary>vhostctl against the hot-removal step's vhostd.</summary>
    private const string VctlHot = "./vhostctl -s /tmp/vdh.sock --json";

    /// <summary>The shell text of one vhostctl call: <c>{vctl} call {method} '{json}'</c>.</summary>
    private static string VctlCall(string vctl, string method, string json = "{}") => $"{vctl} call {method} '{json}'";

    /// <summary>The shell text of a vhostctl call that prints <paramref name="bdev"/>'s I/O statistics (bdev_get_iostat).</summary>
    private static string Iostat(string vctl, string bdev) => VctlCall(vctl, "bdev_get_iostat", $$"""{"name": "{{bdev}}"}""");

    /// <summary>A call to the hot-removal step's vhostd, then <c>echo "{label} rc $?"</c> (the step asserts rc 0).</summary>
    private static string VctlHotWithRc(string method, string json, string label) => $"{VctlCall(VctlHot, method, json)}; echo \"{label} rc $?\"; ";

    /// <summary>
    /// A call to the hot-removal step's vhostd whose answer is saved to <paramref name="file"/> and printed, then
    /// <paramref name="found"/> or <paramref name="notFound"/> echoed as <paramref name="pattern"/> is in it or not.
    /// </summary>
    private static string VctlHotGrep(string method, string file, string pattern, string found, string notFound)
        => $"{VctlCall(VctlHot, method)} > {file}; cat {file}; grep -q {pattern} {file} && echo '{found}' || echo '{notFound}'; ";

    /// <summary>Shell text that waits up to <paramref name="tries"/> x 0.2 s for the socket <paramref name="path"/> to exist.</summary>
    private static string WaitForSocket(string path, int tries) => $"for i in $(seq 1 {tries}); do [ -S {path} ] && break; sleep 0.2; done; ";

    /// <summary>Shell text that waits up to <paramref name="tries"/> x 0.2 s for <paramref name="text"/> in <paramref name="file"/>.</summary>
    private static string WaitForText(string file, string text, int tries) => $"for i in $(seq 1 {tries}); do grep -q '{text}' {file} && break; sleep 0.2; done; ";

    /// <summary>
    /// Issue 14's hot removal, on the 512-byte controller (back on vfio-pci): vhostd serves namespace 1 as vhost-user-blk
    /// (a virtio-user bdevperf reads through it) and as LUN 0 of a vhost-user-scsi controller (no SCSI front end: our
    /// virtio-user initiator has none; the LUN holds the bdev open all the same). While I/O runs the guest kernel removes
    /// the PCI device (<c>echo 1 &gt; .../remove</c>), which blocks until vhostd gives the VFIO device back (its device
    /// request notifier). Then: the removal finished, vhostd is alive, the blk front end got I/O errors, the NVMe
    /// controller and the SCSI LUN are gone. After a PCI rescan and scripts/setup.sh: the same
    /// bdev_nvme_attach_controller works again, the LUN is re-added and a new vhost-blk controller verifies I/O.
    /// </summary>
    private async Task HotRemovalCheckAsync(QemuGuest guest, string setup, TimeSpan t)
    {
        string vhostdConfig = Path.Combine(GuestImage.RepoRoot, ".build", "nvme-hot-vhostd.json");
        File.WriteAllText(vhostdConfig, $$$"""
            {"subsystems": [
              {"subsystem": "bdev", "config": [
                {"method": "bdev_nvme_attach_controller", "params": {"name": "Nvme0", "trtype": "PCIe", "traddr": "{{{Addr512}}}"}}]},
              {"subsystem": "vhost_blk", "config": [
                {"method": "vhost_create_blk_controller", "params": {"ctrlr": "blk.nvme", "dev_name": "Nvme0n1", "cpumask": "0x1"}}]},
              {"subsystem": "vhost_scsi", "config": [
                {"method": "vhost_create_scsi_controller", "params": {"ctrlr": "scsi.nvme", "cpumask": "0x1"}},
                {"method": "vhost_scsi_controller_add_target", "params": {"ctrlr": "scsi.nvme", "scsi_target_num": 0, "bdev_name": "Nvme0n1"}}]}
            ]}
            """);
        string FrontEnd(string ctrlr)
        {
            string path = Path.Combine(GuestImage.RepoRoot, ".build", $"nvme-hot-{ctrlr}.json");
            File.WriteAllText(path, $$$"""
                {"subsystems": [{"subsystem": "bdev", "config": [
                  {"method": "bdev_virtio_attach_controller", "params": {"name": "VirtioBlk0", "trtype": "user", "traddr": "/tmp/vsh/{{{ctrlr}}}", "dev_type": "blk", "vq_count": 1, "vq_size": 128}}
                ]}]}
                """);
            return path;
        }

        string fe1 = FrontEnd("blk.nvme");
        string fe2 = FrontEnd("blk2.nvme");
        string repo = GuestImage.RepoRoot;

        // Back to vfio-pci (the data check above left it on the kernel's nvme driver).
        var cfg = await guest.ExecAsync($"PCI_ALLOWED='{Addr512}' HUGEMEM=64 sh {setup} config; sh {setup} status", t);
        output.WriteLine(cfg.Output);
        Assert.Contains($"{Addr512}  0x1b36 0x0010 vfio-pci", cfg.Output, StringComparison.Ordinal);

        // vhostd up, bdevperf reading through vhost-blk; wait until reads reach the NVMe bdev. The front end is given
        // 180 s: each vhostctl in the guest is a dotnet start under TCG (tens of seconds on a loaded host), and with a
        // 60-s run the removal once came after the front end had finished (no I/O left to fail). It ends at its first
        // failed I/O (no -f, as SPDK's bdevperf), so the wait for it below ends soon after the removal.
        var sw = Stopwatch.StartNew();
        var run = await guest.ExecHostAsync(
            $"cd {repo}; mkdir -p /tmp/vsh; rm -f /tmp/vsh/* /tmp/vdh.sock; "
            + $"(./vhostd -m 0x1 -S /tmp/vsh -r /tmp/vdh.sock -c {vhostdConfig} -L info > /tmp/vdh.log 2>&1; echo \"vhostd exit $?\" >> /tmp/vdh.log) & "
            + WaitForSocket("/tmp/vsh/blk.nvme", 600)
            + $"(./bdevperf --json {fe1} -q 8 -o 4096 -w randread -t 180 -m 0x2 > /tmp/bph.log 2>&1; echo \"bdevperf exit $? at $(date +%T)\" >> /tmp/bph.log) & "
            + $"for i in $(seq 1 900); do {Iostat(VctlHot, "Nvme0n1")} 2>/dev/null | grep -Eq '\"num_read_ops\": ?[0-9]{{3,}}' && echo \"IO FLOWING at $(date +%T)\" && break; sleep 0.2; done; "
            + $"echo '--- vhost before removal'; {VctlCall(VctlHot, "vhost_get_controllers")}",
            TimeSpan.FromMinutes(6));
        output.WriteLine($"--- hot removal: vhostd + bdevperf started ({sw.Elapsed.TotalSeconds:F1} s) ---\n{run.Output}");
        Assert.Contains("IO FLOWING", run.Output, StringComparison.Ordinal);
        Assert.Contains("scsi.nvme", run.Output, StringComparison.Ordinal);

        // The guest kernel removes the PCI device under I/O; vfio-pci's remove blocks until vhostd lets go.
        sw.Restart();
        var rm = await guest.ExecAsync(
            $"rm -f /tmp/rm.log; (echo 1 > /sys/bus/pci/devices/{Addr512}/remove; echo \"remove rc $?\" > /tmp/rm.log) & "
            + "i=0; while [ $i -lt 900 ] && [ ! -s /tmp/rm.log ]; do sleep 0.1; i=$((i+1)); done; "
            + $"cat /tmp/rm.log 2>/dev/null || echo 'REMOVE BLOCKED'; date +%T; ls /sys/bus/pci/devices/ | grep -c {Addr512} || true",
            TimeSpan.FromMinutes(3));
        double removeSeconds = sw.Elapsed.TotalSeconds;
        output.WriteLine($"--- echo 1 > remove ({removeSeconds:F1} s) ---\n{rm.Output}");
        Assert.Contains("remove rc 0", rm.Output, StringComparison.Ordinal);

        var after = await guest.ExecHostAsync(
            $"cd {repo}; sleep 3; pid=$(pgrep -f [V]hostBackend.Daemon.dll); [ -n \"$pid\" ] && kill -0 $pid && echo 'VHOSTD ALIVE'; "
            + $"{VctlHot} spdk_get_version > /dev/null && echo 'RPC ANSWERS'; "
            + VctlHotGrep("bdev_nvme_get_controllers", "/tmp/nc.json", "Nvme0", "NVME CTRL STILL THERE", "NVME CTRL GONE")
            + VctlHotGrep("vhost_get_controllers", "/tmp/vc.json", "Nvme0n1", "VHOST STILL HAS Nvme0n1", "VHOST LUN GONE")
            + WaitForText("/tmp/bph.log", "bdevperf exit", 1800) + "echo '--- blk front end'; cat /tmp/bph.log; "
            + "echo '--- vhostd log (removal)'; grep -iE 'remov|request|release|vhost_blk|scsi|fail' /tmp/vdh.log | tail -n 40",
            TimeSpan.FromMinutes(9));
        output.WriteLine($"--- after removal ---\n{after.Output}");
        Assert.Contains("VHOSTD ALIVE", after.Output, StringComparison.Ordinal);
        Assert.Contains("RPC ANSWERS", after.Output, StringComparison.Ordinal);
        Assert.Contains("NVME CTRL GONE", after.Output, StringComparison.Ordinal);
        Assert.Contains("VHOST LUN GONE", after.Output, StringComparison.Ordinal);
        var errors = System.Text.RegularExpressions.Regex.Match(after.Output, @"(\d+) errors, \d+ miscompares");
        Assert.True(errors.Success && long.Parse(errors.Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture) > 0, "the blk front end saw no I/O errors after the removal");

        // Rescan, back to vfio-pci, attach again with the same name and address, re-add the LUN, verify through a new vhost-blk controller.
        var rescan = await guest.ExecAsync($"echo 1 > /sys/bus/pci/rescan; sleep 2; PCI_ALLOWED='{Addr512}' HUGEMEM=64 sh {setup} config; sh {setup} status", t);
        output.WriteLine(rescan.Output);
        Assert.Contains($"{Addr512}  0x1b36 0x0010 vfio-pci", rescan.Output, StringComparison.Ordinal);
        sw.Restart();
        var again = await guest.ExecHostAsync(
            $"cd {repo}; "
            + VctlHotWithRc("bdev_nvme_attach_controller", $$"""{"name": "Nvme0", "trtype": "PCIe", "traddr": "{{Addr512}}"}""", "attach")
            + VctlHotWithRc("vhost_scsi_controller_add_target", """{"ctrlr": "scsi.nvme", "scsi_target_num": 0, "bdev_name": "Nvme0n1"}""", "add_target")
            + VctlHotWithRc("vhost_create_blk_controller", """{"ctrlr": "blk2.nvme", "dev_name": "Nvme0n1", "cpumask": "0x1"}""", "create")
            + WaitForSocket("/tmp/vsh/blk2.nvme", 300)
            + $"./bdevperf --json {fe2} -q 8 -o 4096 -w verify -t 5 -m 0x2 > /tmp/bph2.log 2>&1; echo \"bdevperf2 exit $?\"; cat /tmp/bph2.log; "
            + $"echo '--- vhost after re-attach'; {VctlCall(VctlHot, "vhost_get_controllers")}; "
            + "kill -TERM $(pgrep -f [V]hostBackend.Daemon.dll) 2>/dev/null; " + WaitForText("/tmp/vdh.log", "vhostd exit", 300)
            + "echo '--- vhostd log'; grep -v ' info: ' /tmp/vdh.log | tail -n 80; grep -iE 'remov|request|release' /tmp/vdh.log | tail -n 30",
            TimeSpan.FromMinutes(6));
        output.WriteLine($"--- re-attach ({sw.Elapsed.TotalSeconds:F1} s) ---\n{again.Output}");
        Assert.Contains("attach rc 0", again.Output, StringComparison.Ordinal);
        Assert.Contains("add_target rc 0", again.Output, StringComparison.Ordinal);
        Assert.Contains("create rc 0", again.Output, StringComparison.Ordinal);
        Assert.Contains("bdevperf2 exit 0", again.Output, StringComparison.Ordinal);
        Assert.DoesNotContain("Unhandled exception", again.Output, StringComparison.Ordinal);
        output.WriteLine($"hot removal: the kernel's remove took {removeSeconds:F1} s (host-measured, 0.1 s polling); re-attach and verify passed");
    }
}
