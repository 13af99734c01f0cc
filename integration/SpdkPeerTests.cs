using System.Diagnostics;
using System.Globalization;
using System.Net;
using System.Net.Sockets;
using System.Text.Json.Nodes;
using VhostBackend.IntegrationTests.Infrastructure;
using Xunit;
using Xunit.Abstractions;

namespace VhostBackend.IntegrationTests;

/// <summary>
/// Interoperability with SPDK v24.01 itself as the peer (the anchor build of ../shared/anchors: its vhost target,
/// nvmf_tgt, bdevperf and scripts/rpc.py), on the host, no guest:
/// our virtio-user front end (split rings) against SPDK's vhost-user-blk target; our NVMe/TCP initiator
/// against SPDK's NVMe-oF/TCP target; SPDK's initiator (its bdevperf) against our target, configured with SPDK's own
/// unmodified rpc.py. Each runs bdevperf -w verify and requires 0 errors.
/// Skipped (never passed) when no SPDK build is found: set SPDK_DIR to the SPDK tree (default /tmp/anchor-spdk/spdk).
/// </summary>
public sealed class SpdkPeerTests(ITestOutputHelper output)
{
    internal static string SpdkDir => Environment.GetEnvironmentVariable("SPDK_DIR") is { Length: > 0 } d ? d : "/tmp/anchor-spdk/spdk";

    private static int FreePort()
    {
        var l = new TcpListener(IPAddress.Loopback, 0);
        l.Start();
        int port = ((IPEndPoint)l.LocalEndpoint).Port;
        l.Stop();
        return port;
    }

    private string WorkDir(string name)
    {
        string dir = Path.Combine(GuestImage.RepoRoot, ".build", $"spdk-peer-{name}-{Environment.ProcessId}");
        Directory.CreateDirectory(dir);
        return dir;
    }

    private async Task<HostProcessResult> OurBdevPerf(string config, string ioSize, int seconds, string mask = "0x2")
    {
        var sw = Stopwatch.StartNew();
        var r = await Tools.RunAsync(Path.Combine(GuestImage.RepoRoot, "bdevperf"),
            ["--json", config, "-q", "32", "-o", ioSize, "-w", "verify", "-t", seconds.ToString(CultureInfo.InvariantCulture), "-m", mask],
            TimeSpan.FromMinutes(5), GuestImage.RepoRoot);
        output.WriteLine($"--- our bdevperf {Path.GetFileName(config)} -o {ioSize} ({sw.Elapsed.TotalSeconds:F1} s, exit {r.ExitCode}) ---\n{r.Output}");
        return r;
    }

    /// <summary>A bdev JSON config attaching controller Nvme0 over TCP to 127.0.0.1:<paramref name="port"/> (SPDK's and our bdevperf read the same file).</summary>
    private static string NvmeTcpConfig(string dir, string name, int port, string nqn, string digests)
    {
        string cfg = Path.Combine(dir, name);
        File.WriteAllText(cfg, $$$"""
            {"subsystems": [{"subsystem": "bdev", "config": [
              {"method": "bdev_nvme_attach_controller", "params": {"name": "Nvme0", "trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": "{{{port}}}", "subnqn": "{{{nqn}}}", "hdgst": {{{digests}}}, "ddgst": {{{digests}}}}}
            ]}]}
            """);
        return cfg;
    }

    [SpdkPeerFact]
    public async Task Our_virtio_user_front_end_verifies_against_spdk_vhost_blk_with_split_and_packed_rings()
    {
        string dir = WorkDir("vhost");
        await using var spdk = await SpdkApp.StartAsync("build/bin/vhost", dir, output.WriteLine, "-S", dir);
        await spdk.RpcAsync("bdev_malloc_create", "-b", "Malloc0", "64", "4096");
        await spdk.RpcAsync("bdev_malloc_create", "-b", "Malloc1", "64", "4096");
        await spdk.RpcAsync("vhost_create_blk_controller", "vhost.0", "Malloc0", "--cpumask", "0x1");
        // SPDK's vhost-blk offers VIRTIO_F_RING_PACKED only on a controller created with -p/--packed_ring; packed_ring true
        // makes our attach fail unless the ring really is packed.
        await spdk.RpcAsync("vhost_create_blk_controller", "vhost.1", "Malloc1", "--cpumask", "0x1", "-p");
        foreach (var (label, packed, sock) in new[] { ("split", "false", Path.Combine(dir, "vhost.0")), ("packed", "true", Path.Combine(dir, "vhost.1")) })
        {
            string cfg = Path.Combine(dir, $"virtio-{label}.json");
            File.WriteAllText(cfg, $$$"""
                {"subsystems": [{"subsystem": "bdev", "config": [
                  {"method": "bdev_virtio_attach_controller", "params": {"name": "VirtioBlk0", "trtype": "user", "traddr": "{{{sock}}}", "dev_type": "blk", "vq_count": 1, "vq_size": 128, "packed_ring": {{{packed}}}}},
                  {"method": "bdev_wait_for_examine"}
                ]}]}
                """);
            foreach (var size in new[] { "4096", "65536" })
            {
                var r = await OurBdevPerf(cfg, size, 4);
                Assert.True(r.ExitCode == 0, $"{label} {size}: {r.Output}\n{spdk.LogTail()}");
                Assert.Contains("VirtioBlk0", r.Output, StringComparison.Ordinal);
                Assert.Contains("0 errors, 0 miscompares", r.Output, StringComparison.Ordinal);
            }
        }

        Assert.True(spdk.IsRunning, "SPDK's vhost target exited:\n" + spdk.LogTail());
    }

    [SpdkPeerFact]
    public async Task Our_nvme_tcp_initiator_verifies_against_spdk_nvmf_tgt_with_and_without_digests()
    {
        string dir = WorkDir("nvmf-tgt");
        int port = FreePort();
        const string nqn = "nqn.2016-06.io.spdk:cnode1";
        await using var spdk = await SpdkApp.StartAsync("build/bin/nvmf_tgt", dir, output.WriteLine);
        await spdk.RpcAsync("bdev_malloc_create", "-b", "Malloc0", "64", "512");
        await spdk.RpcAsync("nvmf_create_transport", "-t", "TCP");
        await spdk.RpcAsync("nvmf_create_subsystem", nqn, "-a", "-s", "SPDK00000000000001");
        await spdk.RpcAsync("nvmf_subsystem_add_ns", nqn, "Malloc0");
        await spdk.RpcAsync("nvmf_subsystem_add_listener", nqn, "-t", "tcp", "-a", "127.0.0.1", "-s", port.ToString(CultureInfo.InvariantCulture));
        foreach (var (label, digests) in new[] { ("plain", "false"), ("digests", "true") })
        {
            string cfg = NvmeTcpConfig(dir, "nvme-" + label + ".json", port, nqn, digests);
            foreach (var size in new[] { "4096", "131072" })
            {
                var r = await OurBdevPerf(cfg, size, 4);
                Assert.True(r.ExitCode == 0, $"{label} {size}: {r.Output}\n{spdk.LogTail()}");
                Assert.Contains("Nvme0n1", r.Output, StringComparison.Ordinal);
                Assert.Contains("0 errors, 0 miscompares", r.Output, StringComparison.Ordinal);
            }
        }

        Assert.True(spdk.IsRunning, "SPDK's nvmf_tgt exited:\n" + spdk.LogTail());
    }

    [SpdkPeerFact]
    public async Task Spdk_bdevperf_verifies_against_our_target_configured_by_spdk_rpc_py()
    {
        string dir = WorkDir("our-tgt");
        int port = FreePort();
        const string nqn = "nqn.2016-06.io.spdk:cnode1";
        await using var daemon = await VhostDaemon.StartAsync(dir, output.WriteLine);

        // SPDK's rpc.py, unmodified, against ./vhostd.
        string rpcPy = Path.Combine(SpdkDir, "scripts", "rpc.py");
        async Task<string> Rpc(params string[] args)
        {
            var r = await Tools.RunAsync("python3", new[] { rpcPy, "-s", daemon.RpcSocket }.Concat(args), TimeSpan.FromMinutes(1));
            output.WriteLine($"rpc.py {string.Join(' ', args)} -> {r.ExitCode}\n{r.Output}");
            Assert.True(r.ExitCode == 0, $"rpc.py {string.Join(' ', args)}: {r.Output}");
            return r.Output;
        }

        await Rpc("bdev_malloc_create", "-b", "Malloc0", "64", "512");
        await Rpc("nvmf_create_transport", "-t", "TCP", "-u", "16384", "-c", "4096");
        await Rpc("nvmf_create_subsystem", nqn, "-a", "-s", "SPDK00000000000001", "-d", "VhostBackend");
        await Rpc("nvmf_subsystem_add_ns", nqn, "Malloc0");
        await Rpc("nvmf_subsystem_add_listener", nqn, "-t", "tcp", "-a", "127.0.0.1", "-s", port.ToString(CultureInfo.InvariantCulture));
        string subs = await Rpc("nvmf_get_subsystems");
        Assert.Contains(nqn, subs, StringComparison.Ordinal);
        Assert.Contains("Malloc0", subs, StringComparison.Ordinal);

        foreach (var (label, digests) in new[] { ("plain", "false"), ("digests", "true") })
        {
            string cfg = NvmeTcpConfig(dir, "spdk-nvme-" + label + ".json", port, nqn, digests);
            foreach (var size in new[] { "4096", "65536" }) // SPDK bdevperf refuses verify above 64 KiB
            {
                var r = await SpdkApp.RunBdevPerfAsync(dir, cfg, size, output.WriteLine);
                Assert.True(r.ExitCode == 0, $"SPDK bdevperf {label} {size}: {r.Output}");
                Assert.Matches(@"Total\s*:\s*[0-9.]+", r.Output);
                var total = System.Text.RegularExpressions.Regex.Match(r.Output, @"Total\s*:\s*([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)");
                Assert.True(total.Success && double.Parse(total.Groups[1].Value, CultureInfo.InvariantCulture) > 0, "no I/O: " + r.Output);
                Assert.Equal(0.0, double.Parse(total.Groups[3].Value, CultureInfo.InvariantCulture)); // Fail/s
                Assert.DoesNotContain("miscompare", r.Output, StringComparison.OrdinalIgnoreCase);
            }
        }

        var qpairs = (await daemon.CallAsync("nvmf_subsystem_get_controllers", new JsonObject { ["nqn"] = nqn }))!.AsArray();
        output.WriteLine($"controllers after the runs: {qpairs.Count}");
    }
}

/// <summary>An SPDK v24.01 application of the anchor build, with its RPC socket, stopped with SIGINT.</summary>
internal sealed class SpdkApp : IAsyncDisposable
{
    private readonly Process _p;
    private readonly System.Text.StringBuilder _log = new();
    private readonly string _rpcSock;

    private SpdkApp(Process p, string rpcSock)
    {
        _p = p;
        _rpcSock = rpcSock;
    }

    public bool IsRunning => !_p.HasExited;

    public string LogTail()
    {
        lock (_log)
        {
            string s = _log.ToString();
            return s.Length > 6000 ? s[^6000..] : s;
        }
    }

    /// <summary>2 MiB huge pages (at least 1024) and hugetlbfs on /dev/hugepages, as SPDK's apps need.</summary>
    internal static void EnsureHugePages()
    {
        const string nr = "/proc/sys/vm/nr_hugepages";
        if (int.Parse(File.ReadAllText(nr).Trim(), CultureInfo.InvariantCulture) < 1024)
        {
            File.WriteAllText(nr, "1024");
        }

        if (!File.ReadAllText("/proc/mounts").Split('\n').Any(l => l.Split(' ') is [_, "/dev/hugepages", "hugetlbfs", ..]))
        {
            Directory.CreateDirectory("/dev/hugepages");
            var m = Process.Start("mount", "-t hugetlbfs -o pagesize=2M nodev /dev/hugepages")!;
            m.WaitForExit();
        }
    }

    private static ProcessStartInfo Psi(string binary, IEnumerable<string> args)
    {
        var psi = new ProcessStartInfo(Path.Combine(SpdkPeerTests.SpdkDir, binary))
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        psi.Environment["LD_LIBRARY_PATH"] = Path.Combine(SpdkPeerTests.SpdkDir, "build", "lib");
        foreach (var a in args)
        {
            psi.ArgumentList.Add(a);
        }

        return psi;
    }

    /// <summary>Starts <paramref name="binary"/> (relative to the SPDK tree) on core 0 with -u (no PCI probing) and waits for its RPC server.</summary>
    public static async Task<SpdkApp> StartAsync(string binary, string dir, Action<string> log, params string[] extra)
    {
        EnsureHugePages();
        string rpc = Path.Combine(dir, "spdk.sock");
        File.Delete(rpc);
        var p = Process.Start(Psi(binary, new[] { "-m", "0x1", "-u", "-s", "512", "-r", rpc, "--disable-cpumask-locks" }.Concat(extra)))!;
        var app = new SpdkApp(p, rpc);
        void Add(string? line)
        {
            if (line is null)
            {
                return;
            }

            lock (app._log)
            {
                app._log.AppendLine(line);
            }

            log("spdk: " + line);
        }

        p.OutputDataReceived += (_, e) => Add(e.Data);
        p.ErrorDataReceived += (_, e) => Add(e.Data);
        p.BeginOutputReadLine();
        p.BeginErrorReadLine();
        var sw = Stopwatch.StartNew();
        while (true)
        {
            if (p.HasExited)
            {
                throw new InvalidOperationException($"SPDK {binary} exited with {p.ExitCode}:\n{app.LogTail()}");
            }

            if (File.Exists(rpc) && (await app.TryRpcAsync("spdk_get_version")).ExitCode == 0)
            {
                return app;
            }

            if (sw.Elapsed > TimeSpan.FromSeconds(60))
            {
                await app.DisposeAsync();
                throw new TimeoutException($"SPDK {binary} did not open {rpc}:\n{app.LogTail()}");
            }

            await Task.Delay(200);
        }
    }

    private Task<HostProcessResult> TryRpcAsync(params string[] args) =>
        Tools.RunAsync("python3", new[] { Path.Combine(SpdkPeerTests.SpdkDir, "scripts", "rpc.py"), "-s", _rpcSock }.Concat(args), TimeSpan.FromMinutes(1));

    public async Task<string> RpcAsync(params string[] args)
    {
        var r = await TryRpcAsync(args);
        if (r.ExitCode != 0)
        {
            throw new InvalidOperationException($"SPDK rpc.py {string.Join(' ', args)} failed: {r.Output}\n{LogTail()}");
        }

        return r.Output;
    }

    /// <summary>SPDK's bdevperf (verify, QD 32, 4 s, core 1) with <paramref name="config"/>.</summary>
    public static async Task<HostProcessResult> RunBdevPerfAsync(string dir, string config, string ioSize, Action<string> log)
    {
        EnsureHugePages();
        string rpc = Path.Combine(dir, "bdevperf.sock");
        var psi = Psi("build/examples/bdevperf", ["--json", config, "-q", "32", "-o", ioSize, "-w", "verify", "-t", "4", "-m", "0x2", "-u", "-s", "512", "-r", rpc, "--disable-cpumask-locks"]);
        var sw = Stopwatch.StartNew();
        var r = await Tools.RunAsync("env", new[] { "LD_LIBRARY_PATH=" + psi.Environment["LD_LIBRARY_PATH"], psi.FileName }.Concat(psi.ArgumentList), TimeSpan.FromMinutes(3));
        log($"--- SPDK bdevperf {Path.GetFileName(config)} -o {ioSize} ({sw.Elapsed.TotalSeconds:F1} s, exit {r.ExitCode}) ---\n{r.Output}");
        return r;
    }

    public async ValueTask DisposeAsync()
    {
        if (!_p.HasExited)
        {
            Process.Start("kill", ["-INT", _p.Id.ToString(CultureInfo.InvariantCulture)])!.WaitForExit();
            using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(15));
            try
            {
                await _p.WaitForExitAsync(cts.Token);
            }
            catch (OperationCanceledException)
            {
                _p.Kill(entireProcessTree: true);
                await _p.WaitForExitAsync();
            }
        }

        _p.Dispose();
    }
}

/// <summary>A fact that needs an SPDK v24.01 build (SPDK_DIR, default /tmp/anchor-spdk/spdk); reported as skipped without one, never as passed.</summary>
[AttributeUsage(AttributeTargets.Method)]
public sealed class SpdkPeerFactAttribute : FactAttribute
{
    public SpdkPeerFactAttribute()
    {
        string d = SpdkPeerTests.SpdkDir;
        foreach (var f in new[] { "build/bin/vhost", "build/bin/nvmf_tgt", "build/bin/spdk_tgt", "build/bin/spdk_dd", "build/examples/bdevperf", "scripts/rpc.py" })
        {
            if (!File.Exists(Path.Combine(d, f)))
            {
                Skip = $"no SPDK v24.01 build at {d} (missing {f}): build one with ../shared/anchors/build-spdk.sh or set SPDK_DIR";
                return;
            }
        }
    }
}
