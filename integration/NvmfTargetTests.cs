using System.Collections.Concurrent;
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
/// Our NVMe-oF/TCP target (src/Nvmf, SPDK's nvmf RPCs) against real initiators, in one TCG guest boot:
/// <list type="number">
/// <item>Full stack: the guest's vhost-user-blk disk is served by a second daemon whose bdev is <c>bdev_nvme</c>
/// (our initiator, TCP) attached to a subsystem of the target daemon (malloc): fio verify on /dev/vda.</item>
/// <item>The guest's Linux kernel initiator (nvme-tcp, nvme-cli from the host root through the 9p chroot; QEMU
/// user-net maps 10.0.2.2 to the host's loopback, where the target listens): <c>nvme discover</c> lists the
/// subsystems; connect, fio verify, disconnect; connect with header and data digests, fio verify; a namespace
/// hot-added while connected appears in the guest (AEN + changed namespace list); a subsystem that does not allow
/// any host refuses an unknown host NQN and accepts the listed one; the target daemon is SIGKILLed and restarted
/// from its <c>--persist-config</c> file, the kernel reconnects (reconnect-delay 1 s) and fio verify passes again, while
/// fio verify loops on the guest's vhost disk (our initiator) across the outage with no error.</item>
/// </list>
/// </summary>
public sealed class NvmfTargetTests(ITestOutputHelper output)
{
    private const string Nqn = "nqn.2016-06.io.spdk:vbtest1";
    private const string HostOnlyNqn = "nqn.2016-06.io.spdk:vbtest2";
    private const string StackNqn = "nqn.2016-06.io.spdk:vbstack";
    private const string HostA = "nqn.2014-08.org.nvmexpress:uuid:0b5b1e6a-6d37-4a53-9a43-2f7c0c6a0a01";
    private const string HostB = "nqn.2014-08.org.nvmexpress:uuid:0b5b1e6a-6d37-4a53-9a43-2f7c0c6a0b02";
    private static readonly TimeSpan Cmd = TimeSpan.FromSeconds(120);

    /// <summary>
    /// Shell functions for the guest (busybox sh): <c>nsdev NQN NSID</c> prints the block device of a namespace
    /// (multipath head or plain), <c>ctrl NQN</c> the controller (nvmeN) connected to a subsystem,
    /// <c>waitns NQN NSID SECONDS</c> waits for the namespace's block device and prints it.
    /// </summary>
    private const string GuestFns =
        "nsdev() { for b in /sys/block/nvme*; do n=${b##*/}; case $n in *c*) continue;; esac; " +
        "[ \"$(cat $b/device/subsysnqn 2>/dev/null)\" = \"$1\" ] && [ \"$(cat $b/nsid 2>/dev/null)\" = \"$2\" ] && echo $n; done; return 0; }; " +
        "ctrl() { for c in /sys/class/nvme/nvme*; do [ \"$(cat $c/subsysnqn 2>/dev/null)\" = \"$1\" ] && echo ${c##*/}; done; return 0; }; " +
        "waitns() { i=0; while [ $i -lt $(($3 * 10)) ]; do d=$(nsdev $1 $2); [ -n \"$d\" ] && [ -b /dev/$d ] && { echo $d; return 0; }; sleep 0.1; i=$((i+1)); done; return 1; }; ";

    private static int FreePort()
    {
        var l = new TcpListener(IPAddress.Loopback, 0);
        l.Start();
        int port = ((IPEndPoint)l.LocalEndpoint).Port;
        l.Stop();
        return port;
    }

    private static JsonObject Listener(int port) => new()
    {
        ["trtype"] = "TCP",
        ["adrfam"] = "IPv4",
        ["traddr"] = "127.0.0.1",
        ["trsvcid"] = port.ToString(CultureInfo.InvariantCulture),
    };

    [Fact]
    public async Task Nvmf_target_serves_the_linux_kernel_initiator_and_our_initiator_end_to_end()
    {
        Tools.Require("qemu-system-x86_64", "qemu-system-x86");
        Tools.Require("fio");
        Tools.Require("nvme", "nvme-cli");
        var total = Stopwatch.StartNew();

        var work = Directory.CreateTempSubdirectory("vb-nvmf-").FullName;
        string tgtDir = Path.Combine(work, "tgt");
        string iniDir = Path.Combine(work, "ini");
        Directory.CreateDirectory(tgtDir);
        Directory.CreateDirectory(iniDir);
        string backing = Path.Combine(work, "ns1.img");
        using (var f = File.Create(backing))
        {
            f.SetLength(64 << 20);
        }

        string stackBacking = Path.Combine(work, "stack.img");
        using (var f = File.Create(stackBacking))
        {
            f.SetLength(32 << 20);
        }

        string persist = Path.Combine(tgtDir, "running.json");
        var tgtLog = new ConcurrentQueue<string>();
        void TLog(string line)
        {
            tgtLog.Enqueue(line);
            output.WriteLine("[target] " + line);
        }

        int port = FreePort();
        VhostDaemon? target = await VhostDaemon.StartAsync(tgtDir, TLog, "--persist-config", persist);
        VhostDaemon? initiator = null;
        QemuGuest? guest = null;
        try
        {
            // --- the target: three subsystems on one TCP listener ---
            await target.CallAsync("bdev_uring_create", new JsonObject { ["filename"] = backing, ["name"] = "File0", ["block_size"] = 512 });
            await target.CallAsync("bdev_malloc_create", new JsonObject { ["name"] = "Malloc1", ["num_blocks"] = 16384, ["block_size"] = 512 });
            await target.CallAsync("bdev_malloc_create", new JsonObject { ["name"] = "Malloc2", ["num_blocks"] = 16384, ["block_size"] = 512 });
            // The full-stack namespace is a file, so its data survives the target's crash in step 7.
            await target.CallAsync("bdev_uring_create", new JsonObject { ["filename"] = stackBacking, ["name"] = "Stack0", ["block_size"] = 512 });
            await target.CallAsync("nvmf_create_transport", new JsonObject { ["trtype"] = "TCP" });

            await target.CallAsync("nvmf_create_subsystem", new JsonObject { ["nqn"] = Nqn, ["allow_any_host"] = true, ["serial_number"] = "VBNVMF0001", ["model_number"] = "VhostBackend test" });
            await target.CallAsync("nvmf_subsystem_add_ns", new JsonObject { ["nqn"] = Nqn, ["namespace"] = new JsonObject { ["bdev_name"] = "File0" } });
            await target.CallAsync("nvmf_subsystem_add_listener", new JsonObject { ["nqn"] = Nqn, ["listen_address"] = Listener(port) });

            await target.CallAsync("nvmf_create_subsystem", new JsonObject { ["nqn"] = HostOnlyNqn, ["serial_number"] = "VBNVMF0002" });
            await target.CallAsync("nvmf_subsystem_add_ns", new JsonObject { ["nqn"] = HostOnlyNqn, ["namespace"] = new JsonObject { ["bdev_name"] = "Malloc2" } });
            await target.CallAsync("nvmf_subsystem_add_host", new JsonObject { ["nqn"] = HostOnlyNqn, ["host"] = HostA });
            await target.CallAsync("nvmf_subsystem_add_listener", new JsonObject { ["nqn"] = HostOnlyNqn, ["listen_address"] = Listener(port) });

            await target.CallAsync("nvmf_create_subsystem", new JsonObject { ["nqn"] = StackNqn, ["allow_any_host"] = true, ["serial_number"] = "VBNVMF0003" });
            await target.CallAsync("nvmf_subsystem_add_ns", new JsonObject { ["nqn"] = StackNqn, ["namespace"] = new JsonObject { ["bdev_name"] = "Stack0" } });
            await target.CallAsync("nvmf_subsystem_add_listener", new JsonObject { ["nqn"] = StackNqn, ["listen_address"] = Listener(port) });

            var subs = (JsonArray)(await target.CallAsync("nvmf_get_subsystems", null))!;
            output.WriteLine("nvmf_get_subsystems: " + subs.ToJsonString());
            Assert.Contains(subs, s => (string?)s!["nqn"] == Nqn);

            // --- the initiator daemon: bdev_nvme over TCP to StackNqn, exported to the guest as vhost-user-blk ---
            var iniLog = new ConcurrentQueue<string>();
            initiator = await VhostDaemon.StartAsync(iniDir, l =>
            {
                iniLog.Enqueue(l);
                output.WriteLine("[initiator] " + l);
            });
            var names = (JsonArray)(await initiator.CallAsync("bdev_nvme_attach_controller", new JsonObject
            {
                ["name"] = "Remote0",
                ["trtype"] = "TCP",
                ["adrfam"] = "IPv4",
                ["traddr"] = "127.0.0.1",
                ["trsvcid"] = port.ToString(CultureInfo.InvariantCulture),
                ["subnqn"] = StackNqn,
                ["hostnqn"] = HostB,
                ["ctrlr_loss_timeout_sec"] = 60,
                ["reconnect_delay_sec"] = 1,
            }))!;
            Assert.Equal("Remote0n1", (string?)names[0]);
            await initiator.CallAsync("vhost_create_blk_controller", new JsonObject { ["ctrlr"] = "vb.nvmf", ["dev_name"] = "Remote0n1" });

            guest = await QemuGuest.StartAsync(new QemuGuestOptions
            {
                Name = "nvmf-target",
                Memory = "512M",
                Cpus = 2,
                BlkDevices = [new VhostUserDevice(Path.Combine(iniDir, "vb.nvmf"), 2)],
                ExtraQemuArgs = ["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"],
                Log = output.WriteLine,
                BootTimeout = TimeSpan.FromSeconds(120),
            });
            await Run(guest, "ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && (modprobe nvme_tcp 2>/dev/null; true) && [ -c /dev/nvme-fabrics ] && echo net-ready");
            output.WriteLine($"guest up after {total.Elapsed.TotalSeconds:F0} s");

            // 1. Full stack: vhost-blk -> bdev_nvme (TCP, our initiator) -> our target -> a file (io_uring).
            Assert.Equal("65536", (await Run(guest, "cat /sys/block/vda/size")).Trim());
            await Fio(guest, "/dev/vda", "stack");
            output.WriteLine($"full stack verified after {total.Elapsed.TotalSeconds:F0} s");

            // 2. Discovery: the discovery log lists the three subsystems on our port.
            string disc = await RunHost(guest, $"nvme discover -t tcp -a 10.0.2.2 -s {port} --hostnqn={HostA}");
            Assert.Contains(Nqn, disc, StringComparison.Ordinal);
            Assert.Contains(HostOnlyNqn, disc, StringComparison.Ordinal);
            Assert.Contains(StackNqn, disc, StringComparison.Ordinal);
            Assert.Contains($"trsvcid: {port}", disc, StringComparison.Ordinal);

            // 3. Connect (no digests), fio verify, disconnect.
            await RunHost(guest, $"nvme connect -t tcp -a 10.0.2.2 -s {port} -n {Nqn} --hostnqn={HostA}");
            string dev = (await Run(guest, GuestFns + $"waitns {Nqn} 1 30")).Trim();
            Assert.Equal("131072", (await Run(guest, $"cat /sys/block/{dev}/size")).Trim());
            Assert.Contains("VBNVMF0001", await Run(guest, GuestFns + $"cat /sys/class/nvme/$(ctrl {Nqn})/serial"), StringComparison.Ordinal);
            await Fio(guest, "/dev/" + dev, "plain");
            var ctrls = (JsonArray)(await target.CallAsync("nvmf_subsystem_get_controllers", new JsonObject { ["nqn"] = Nqn }))!;
            output.WriteLine("controllers: " + ctrls.ToJsonString());
            Assert.Contains(ctrls, c => (string?)c!["hostnqn"] == HostA);
            await RunHost(guest, $"nvme disconnect -n {Nqn}");
            Assert.Equal(string.Empty, (await Run(guest, GuestFns + $"sleep 1; nsdev {Nqn} 1")).Trim());
            output.WriteLine($"plain connection verified after {total.Elapsed.TotalSeconds:F0} s");

            // 4. Header and data digests on; the reconnect parameters for step 7.
            await RunHost(guest, $"nvme connect -t tcp -a 10.0.2.2 -s {port} -n {Nqn} --hostnqn={HostA} --hdr-digest --data-digest --reconnect-delay=1 --ctrl-loss-tmo=60");
            dev = (await Run(guest, GuestFns + $"waitns {Nqn} 1 30")).Trim();
            await Fio(guest, "/dev/" + dev, "digests");
            var qpairs = (JsonArray)(await target.CallAsync("nvmf_subsystem_get_qpairs", new JsonObject { ["nqn"] = Nqn }))!;
            output.WriteLine("qpairs: " + qpairs.ToJsonString());
            Assert.True(qpairs.Count >= 2, "expected an admin and at least one I/O qpair: " + qpairs.ToJsonString());
            string kmsg = await Run(guest, "dmesg | grep -i nvme | tail -30");
            output.WriteLine(kmsg);
            Assert.DoesNotContain("digest", kmsg, StringComparison.OrdinalIgnoreCase);
            output.WriteLine($"digests verified after {total.Elapsed.TotalSeconds:F0} s");

            // 5. Namespace hot-add while connected: the AEN makes the kernel rescan and nsid 2 appears.
            await target.CallAsync("nvmf_subsystem_add_ns", new JsonObject { ["nqn"] = Nqn, ["namespace"] = new JsonObject { ["bdev_name"] = "Malloc1", ["nsid"] = 2 } });
            var ns2 = await guest.ExecAsync(GuestFns + $"waitns {Nqn} 2 30", Cmd);
            Assert.True(ns2.Succeeded, "hot-added namespace 2 not seen by the guest within 30 s\n" + (await guest.ExecAsync("ls /sys/block; dmesg | tail -20", Cmd)).Output);
            string dev2 = ns2.Output.Trim();
            Assert.Equal("16384", (await Run(guest, $"cat /sys/block/{dev2}/size")).Trim());
            await Run(guest, $"head -c 65536 /dev/urandom > /tmp/p && dd if=/tmp/p of=/dev/{dev2} bs=64k seek=5 oflag=direct 2>&1 && dd if=/dev/{dev2} of=/tmp/q bs=64k skip=5 count=1 iflag=direct 2>&1 && cmp /tmp/p /tmp/q");

            // 6. Host access control: HostOnlyNqn lists HostA only.
            var refused = await guest.ExecHostAsync($"nvme connect -t tcp -a 10.0.2.2 -s {port} -n {HostOnlyNqn} --hostnqn={HostB} 2>&1", Cmd);
            output.WriteLine("refused host: " + refused);
            Assert.NotEqual(0, refused.ExitCode);
            Assert.Equal(string.Empty, (await Run(guest, GuestFns + $"ctrl {HostOnlyNqn}")).Trim());
            await RunHost(guest, $"nvme connect -t tcp -a 10.0.2.2 -s {port} -n {HostOnlyNqn} --hostnqn={HostA}");
            string devA = (await Run(guest, GuestFns + $"waitns {HostOnlyNqn} 1 30")).Trim();
            await Run(guest, $"dd if=/dev/{devA} of=/dev/null bs=64k count=16 iflag=direct 2>&1");
            await RunHost(guest, $"nvme disconnect -n {HostOnlyNqn}");
            output.WriteLine($"hot-add and host list checked after {total.Elapsed.TotalSeconds:F0} s");

            // 7. The target daemon crashes and comes back from its persisted config: the kernel reconnects, and the
            //    guest's vhost disk (our initiator, ctrlr_loss_timeout_sec 60, reconnect_delay_sec 1, no
            //    fast_io_fail_timeout_sec) sees no error: fio verify loops on /dev/vda across the outage.
            string c = (await Run(guest, GuestFns + $"ctrl {Nqn}")).Trim();
            Assert.Equal("live", (await Run(guest, $"cat /sys/class/nvme/{c}/state")).Trim());
            // The loop runs in the background in the guest (the agent runs one command at a time): its output and
            // exit code go to the guest's /tmp/outage.out.
            string loop = "end=$(( $(date +%s) + 40 )); n=0; while [ $(date +%s) -lt $end ]; do "
                + "fio --name=outage --filename=/dev/vda --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 --size=2M "
                + "--numjobs=2 --offset_increment=8M --verify=crc32c --verify_fatal=1 --do_verify=1 --group_reporting "
                + "|| { echo \"fio failed in loop $n\"; exit 1; }; n=$((n+1)); done; echo \"fio loops: $n\"";
            await Run(guest, $"rm -f /tmp/outage.out; (chroot /host /bin/sh -c {Tools.ShellQuote(loop)} > /tmp/outage.out 2>&1; echo \"outage-rc $?\" >> /tmp/outage.out) < /dev/null > /dev/null 2>&1 & echo started");
            await Task.Delay(TimeSpan.FromSeconds(8)); // fio is writing (its start-up through the 9p chroot takes seconds)
            await target.KillAsync();
            await target.DisposeAsync();
            target = null;
            output.WriteLine("target killed");
            var lost = await guest.ExecAsync($"i=0; while [ $i -lt 100 ] && [ \"$(cat /sys/class/nvme/{c}/state)\" = live ]; do sleep 0.1; i=$((i+1)); done; cat /sys/class/nvme/{c}/state", Cmd);
            output.WriteLine("controller state after the kill: " + lost.Output.Trim());
            Assert.NotEqual("live", lost.Output.Trim());
            target = await VhostDaemon.StartAsync(tgtDir, TLog, "--persist-config", persist);
            var outage = await guest.ExecAsync("i=0; while [ $i -lt 1800 ] && ! grep -q outage-rc /tmp/outage.out; do sleep 0.1; i=$((i+1)); done; tail -c 3000 /tmp/outage.out", TimeSpan.FromMinutes(5));
            output.WriteLine("fio loop on the vhost disk across the target's crash: " + outage.Output);
            Assert.True(outage.Output.Contains("outage-rc 0", StringComparison.Ordinal) && outage.Output.Contains("fio loops:", StringComparison.Ordinal),
                "the guest's vhost disk saw an error across a short target outage: " + outage.Output + "\n" + guest.ConsoleTail());
            Assert.Contains(iniLog, l => l.Contains("Remote0", StringComparison.Ordinal) && (l.Contains("lost", StringComparison.OrdinalIgnoreCase) || l.Contains("reconnect", StringComparison.OrdinalIgnoreCase)));
            var back = await guest.ExecAsync($"i=0; while [ $i -lt 600 ] && [ \"$(cat /sys/class/nvme/{c}/state)\" != live ]; do sleep 0.1; i=$((i+1)); done; cat /sys/class/nvme/{c}/state", Cmd);
            Assert.True(back.Output.Trim() == "live", $"controller {c} did not come back live within 60 s: {back.Output}\n" + (await guest.ExecAsync("dmesg | tail -30", Cmd)).Output);
            dev = (await Run(guest, GuestFns + $"waitns {Nqn} 1 30")).Trim();
            await Fio(guest, "/dev/" + dev, "restarted");
            Assert.NotEqual(string.Empty, (await Run(guest, GuestFns + $"waitns {Nqn} 2 30")).Trim());
            output.WriteLine($"reconnect after restart verified after {total.Elapsed.TotalSeconds:F0} s");

            await RunHost(guest, $"nvme disconnect -n {Nqn}");
            output.WriteLine("--- guest kernel log ---\n" + await Run(guest, "dmesg | grep -i -E 'nvme|tcp' | tail -60"));
        }
        finally
        {
            if (guest is not null)
            {
                await guest.DisposeAsync();
            }

            if (initiator is not null)
            {
                await initiator.DisposeAsync();
            }

            if (target is not null)
            {
                await target.DisposeAsync();
            }
        }

        output.WriteLine($"total {total.Elapsed.TotalSeconds:F0} s");
    }

    private async Task Fio(QemuGuest guest, string device, string name)
    {
        var sw = Stopwatch.StartNew();
        var fio = await guest.ExecHostAsync(
            $"fio --name={name} --filename={device} --ioengine=libaio --direct=1 --rw=randwrite --bs=4k --iodepth=16 " +
            "--size=2M --numjobs=2 --offset_increment=16M --verify=crc32c --verify_fatal=1 --do_verify=1 --group_reporting",
            TimeSpan.FromSeconds(300));
        output.WriteLine($"fio {name} on {device}: rc {fio.ExitCode} in {sw.Elapsed.TotalSeconds:F1} s");
        Assert.True(fio.ExitCode == 0, fio + "\n" + guest.ConsoleTail());
    }

    private static async Task<string> Run(QemuGuest guest, string cmd)
    {
        var r = await guest.ExecAsync(cmd, Cmd);
        Assert.True(r.ExitCode == 0, r + "\n" + guest.ConsoleTail());
        return r.Output;
    }

    private static async Task<string> RunHost(QemuGuest guest, string cmd)
    {
        var r = await guest.ExecHostAsync(cmd + " 2>&1", Cmd);
        Assert.True(r.ExitCode == 0, r + "\n" + guest.ConsoleTail());
        return r.Output;
    }
}
