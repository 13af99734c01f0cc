using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using VhostBackend.IntegrationTests.Infrastructure;
using Xunit;
using Xunit.Abstractions;

namespace VhostBackend.IntegrationTests;

/// <summary>
/// The NVMe/TCP initiator against a real target: Linux nvmet + nvmet-tcp, configured over configfs inside a TCG
/// guest, reached through QEMU user-net hostfwd on 127.0.0.1. bdevperf runs on the host with a JSON config that
/// attaches the remote namespace: verify with digests off, with header and data digests on, and a run during which
/// the target drops the subsystem from its port (every connection closed) and adds it back: the initiator reconnects
/// and the run finishes without errors or miscompares; then the daemon attaches it and follows a namespace added and
/// removed over configfs (asynchronous event -> bdev Tcp0n2 registered, then unregistered). One guest boot for everything.
/// </summary>
public sealed class NvmeTcpTests(ITestOutputHelper output)
{
    private const string Nqn = "nqn.2026-01.io.vhostbackend:tcp1";
    private const string Cfs = "/sys/kernel/config/nvmet";

    private static int FreePort()
    {
        var l = new TcpListener(IPAddress.Loopback, 0);
        l.Start();
        int port = ((IPEndPoint)l.LocalEndpoint).Port;
        l.Stop();
        return port;
    }

    private string WriteConfig(string name, int port, string extra)
    {
        string path = Path.Combine(GuestImage.RepoRoot, ".build", name);
        File.WriteAllText(path, $$$"""
            {"subsystems": [{"subsystem": "bdev", "config": [
              {"method": "bdev_nvme_attach_controller", "params": {"name": "Tcp0", "trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": "{{{port}}}", "subnqn": "{{{Nqn}}}"{{{extra}}}}}
            ]}]}
            """);
        return path;
    }

    private async Task<HostProcessResult> BdevPerf(string config, int seconds, string workload = "verify")
    {
        var sw = Stopwatch.StartNew();
        var r = await Tools.RunAsync(Path.Combine(GuestImage.RepoRoot, "bdevperf"), ["--json", config, "-q", "16", "-o", "4096", "-w", workload, "-t", seconds.ToString(System.Globalization.CultureInfo.InvariantCulture), "-m", "0x1"], TimeSpan.FromMinutes(5), GuestImage.RepoRoot);
        output.WriteLine($"--- bdevperf {Path.GetFileName(config)} ({sw.Elapsed.TotalSeconds:F1} s, exit {r.ExitCode}) ---\n{r.Output}");
        return r;
    }

    [Fact]
    public async Task Bdevperf_verifies_a_linux_nvmet_namespace_over_tcp_with_and_without_digests_and_across_a_target_restart()
    {
        Tools.Require("qemu-system-x86_64", "qemu-system-x86");
        var help = await Tools.RunAsync(Path.Combine(GuestImage.RepoRoot, "bdevperf"), ["--help"], TimeSpan.FromMinutes(5), GuestImage.RepoRoot);
        Assert.True(help.Output.Contains("--json", StringComparison.Ordinal), $"./bdevperf does not build or run: {help.Output}");

        int port = FreePort();
        await using var guest = await QemuGuest.StartAsync(new QemuGuestOptions
        {
            Name = "nvmet-tcp",
            Cpus = 1,
            MountHostRoot = false,
            ExtraQemuArgs = ["-netdev", $"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:4420", "-device", "virtio-net-pci,netdev=n0"],
            BootTimeout = TimeSpan.FromSeconds(120),
            Log = output.WriteLine,
        });

        // Pin the guest's vCPU (TCG is much faster when it does not migrate).
        await Tools.RunAsync("taskset", ["-a", "-p", "0x1", guest.ProcessId.ToString(System.Globalization.CultureInfo.InvariantCulture)], TimeSpan.FromSeconds(10), GuestImage.RepoRoot);

        var t = TimeSpan.FromMinutes(1);
        string setup = string.Join("; ",
            "set -e",
            "ip link set eth0 up", "ip addr add 10.0.2.15/24 dev eth0",
            "modprobe nvmet; modprobe nvmet_tcp; modprobe crc32c_generic || true",
            "grep -q nvmet /proc/modules",
            "dd if=/dev/zero of=/tmp/ns1.img bs=1M count=64 2>/dev/null",
            $"mkdir {Cfs}/subsystems/{Nqn}",
            $"echo 1 > {Cfs}/subsystems/{Nqn}/attr_allow_any_host",
            $"mkdir {Cfs}/subsystems/{Nqn}/namespaces/1",
            $"echo /tmp/ns1.img > {Cfs}/subsystems/{Nqn}/namespaces/1/device_path",
            $"echo 1 > {Cfs}/subsystems/{Nqn}/namespaces/1/buffered_io",
            $"echo 1 > {Cfs}/subsystems/{Nqn}/namespaces/1/enable",
            $"mkdir {Cfs}/ports/1",
            $"echo tcp > {Cfs}/ports/1/addr_trtype", $"echo ipv4 > {Cfs}/ports/1/addr_adrfam",
            $"echo 0.0.0.0 > {Cfs}/ports/1/addr_traddr", $"echo 4420 > {Cfs}/ports/1/addr_trsvcid",
            $"ln -s {Cfs}/subsystems/{Nqn} {Cfs}/ports/1/subsystems/{Nqn}",
            "echo target-ready");
        var r = await guest.ExecAsync(setup, t);
        output.WriteLine(r.Output);
        Assert.True(r.Succeeded && r.Output.Contains("target-ready", StringComparison.Ordinal), r + "\n" + guest.ConsoleTail());

        // 1. verify, no digests.
        var run = await BdevPerf(WriteConfig("nvmf-tcp-plain.json", port, ""), 10);
        Assert.True(run.ExitCode == 0, run.Output + "\n" + guest.ConsoleTail());
        Assert.Contains("Tcp0n1", run.Output, StringComparison.Ordinal);
        Assert.Contains("0 errors, 0 miscompares", run.Output, StringComparison.Ordinal);

        // 2. verify with header and data digests (CRC32C on both sides).
        run = await BdevPerf(WriteConfig("nvmf-tcp-digests.json", port, """, "hdgst": true, "ddgst": true"""), 10);
        Assert.True(run.ExitCode == 0, run.Output + "\n" + guest.ConsoleTail());
        Assert.Contains("0 errors, 0 miscompares", run.Output, StringComparison.Ordinal);
        var dmesg = await guest.ExecAsync("dmesg | grep -i -E 'nvmet|digest' | tail -20", t);
        output.WriteLine(dmesg.Output);
        Assert.DoesNotContain("digest error", dmesg.Output, StringComparison.OrdinalIgnoreCase);

        // 3. the target goes away mid-run (the subsystem leaves the port: nvmet closes every connection) and comes
        //    back 4 s later: the initiator reconnects (every reconnect_delay_sec), queued I/O completes, no errors.
        string cfg = WriteConfig("nvmf-tcp-restart.json", port, """, "hdgst": true, "ctrlr_loss_timeout_sec": 60, "reconnect_delay_sec": 1, "fast_io_fail_timeout_sec": 30""");
        var before = await guest.ExecAsync("dmesg | grep -c 'creating nvm controller'", t);
        int created = int.Parse(before.Output.Trim(), System.Globalization.CultureInfo.InvariantCulture);
        var perf = BdevPerf(cfg, 25);

        // Take the target down 3 s after this run's controller exists (bdevperf's start-up time varies with the load).
        var down = await guest.ExecAsync(
            $"for i in $(seq 1 1200); do [ $(dmesg | grep -c 'creating nvm controller') -gt {created} ] && break; sleep 0.1; done; sleep 3; "
            + $"rm {Cfs}/ports/1/subsystems/{Nqn} && echo target-down; sleep 4; ln -s {Cfs}/subsystems/{Nqn} {Cfs}/ports/1/subsystems/{Nqn} && echo target-up",
            TimeSpan.FromMinutes(3));
        output.WriteLine(down.Output);
        Assert.Contains("target-up", down.Output, StringComparison.Ordinal);
        run = await perf;
        Assert.True(run.ExitCode == 0, run.Output + "\n" + guest.ConsoleTail());
        Assert.Contains("0 errors, 0 miscompares", run.Output, StringComparison.Ordinal);
        dmesg = await guest.ExecAsync("dmesg | grep -i nvmet | tail -30", t);
        output.WriteLine(dmesg.Output);

        // The path was lost and found again: the initiator said so, and nvmet created a second controller for this
        // run's host NQN (a new association) after the port came back.
        Assert.Contains("path lost", run.Output, StringComparison.Ordinal);
        var nqns = Regex.Matches(dmesg.Output, @"creating nvm controller \d+ for subsystem \S+ for NQN (\S+?)\.?\r?$", RegexOptions.Multiline)
            .Select(m => m.Groups[1].Value).ToList();
        output.WriteLine($"nvmet controllers created: {string.Join(", ", nqns)}");
        Assert.True(nqns.Count >= 2 && nqns.Count(n => n == nqns[^1]) >= 2, "no second association after the target came back");

        // 4. Namespace attribute notices (SPDK's aer_cb -> populate_namespaces): the daemon attaches the controller;
        //    a namespace enabled on the target mid-run shows up as Tcp0n2 in bdev_get_bdevs, and goes away when it
        //    is disabled and removed again.
        var work = Directory.CreateTempSubdirectory("vb-nvmet-ns-").FullName;
        await using var daemon = await VhostDaemon.StartAsync(work, output.WriteLine);
        await daemon.CallAsync("bdev_nvme_attach_controller", new JsonObject
        {
            ["name"] = "Tcp0", ["trtype"] = "TCP", ["adrfam"] = "IPv4", ["traddr"] = "127.0.0.1",
            ["trsvcid"] = port.ToString(System.Globalization.CultureInfo.InvariantCulture), ["subnqn"] = Nqn,
        });
        Assert.Equal(["Tcp0n1"], await BdevNames(daemon));
        string ns2 = $"{Cfs}/subsystems/{Nqn}/namespaces/2";
        r = await guest.ExecAsync(string.Join("; ",
            "set -e", "dd if=/dev/zero of=/tmp/ns2.img bs=1M count=16 2>/dev/null", $"mkdir {ns2}",
            $"echo /tmp/ns2.img > {ns2}/device_path", $"echo 1 > {ns2}/buffered_io", $"echo 1 > {ns2}/enable", "echo ns2-enabled"), t);
        Assert.True(r.Succeeded && r.Output.Contains("ns2-enabled", StringComparison.Ordinal), r + "\n" + guest.ConsoleTail());
        var names = await WaitForBdevs(daemon, n => n.Contains("Tcp0n2"));
        Assert.Equal(["Tcp0n1", "Tcp0n2"], names);
        var ns2Info = (JsonArray)(await daemon.CallAsync("bdev_get_bdevs", new JsonObject { ["name"] = "Tcp0n2" }))!;
        Assert.Equal(16UL * 1024 * 1024, ns2Info[0]!["num_blocks"]!.GetValue<ulong>() * ns2Info[0]!["block_size"]!.GetValue<uint>());

        r = await guest.ExecAsync($"set -e; echo 0 > {ns2}/enable; rmdir {ns2}; echo ns2-removed", t);
        Assert.True(r.Succeeded && r.Output.Contains("ns2-removed", StringComparison.Ordinal), r + "\n" + guest.ConsoleTail());
        Assert.Equal(["Tcp0n1"], await WaitForBdevs(daemon, n => !n.Contains("Tcp0n2")));
        await daemon.CallAsync("bdev_nvme_detach_controller", new JsonObject { ["name"] = "Tcp0" });
    }

    private static async Task<string[]> BdevNames(VhostDaemon daemon) =>
        ((JsonArray)(await daemon.CallAsync("bdev_get_bdevs", null))!).Select(b => b!["name"]!.GetValue<string>()).Order(StringComparer.Ordinal).ToArray();

    private async Task<string[]> WaitForBdevs(VhostDaemon daemon, Func<string[], bool> done)
    {
        var sw = Stopwatch.StartNew();
        string[] names;
        while (!done(names = await BdevNames(daemon)))
        {
            Assert.True(sw.Elapsed < TimeSpan.FromSeconds(60), $"bdevs after {sw.Elapsed}: {string.Join(", ", names)}");
            await Task.Delay(200);
        }

        output.WriteLine($"bdevs after {sw.Elapsed.TotalSeconds:F1} s: {string.Join(", ", names)}");
        return names;
    }
}
