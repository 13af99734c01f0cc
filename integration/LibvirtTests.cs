using System.Diagnostics;
using System.Globalization;
using System.Text;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using VhostBackend.IntegrationTests.Infrastructure;
using Xunit;
using Xunit.Abstractions;

namespace VhostBackend.IntegrationTests;

/// <summary>
/// The daemon under a real libvirtd (qemu:///system, started without systemd when needed), with libvirt's own
/// defaults: QEMU runs as <c>libvirt-qemu</c> with the DAC security driver, so it reaches the vhost-user sockets only
/// because vhostd made them <c>root:kvm 0660</c> (<c>--socket-group kvm --socket-mode 0660</c>). One domain
/// (<c>&lt;domain type='qemu'&gt;</c>, direct kernel boot of the test guest, memfd shared memory) checks:
/// the XML <c>vhostctl libvirt-xml</c> prints and every XML in docs/ validate (<c>virt-xml-validate</c>);
/// a <c>&lt;disk type='vhostuser'&gt;</c> boots and passes fio verify; <c>virsh attach-device --live</c> and
/// <c>detach-device --live</c> hot-plug a second vhost-user-blk disk; vhost-user-scsi through
/// <c>&lt;qemu:commandline&gt;</c> gets a LUN hot-added over RPC that the running domain sees; the daemon is killed and
/// restarted from its persisted config while the domain runs, and the disk reconnects (<c>&lt;reconnect&gt;</c>).
/// </summary>
public sealed partial class LibvirtTests(ITestOutputHelper output)
{
    private const string QemuUser = "libvirt-qemu";
    private static readonly TimeSpan Cmd = TimeSpan.FromSeconds(120);

    [Fact]
    public async Task Libvirt_domain_boots_hotplugs_and_survives_a_daemon_restart_on_vhostd_disks()
    {
        Tools.Require("qemu-system-x86_64", "qemu-system-x86");
        Tools.Require("fio");
        await Libvirt.EnsureRunningAsync(output.WriteLine);

        // 1. Every XML in the docs is valid libvirt XML (fragments wrapped in a minimal domain).
        await ValidateDocsXml();

        // QEMU (libvirt-qemu) must traverse to the kernel, initrd and sockets: a world-searchable work directory
        // whose sockets only the kvm group may open.
        var work = Directory.CreateTempSubdirectory("vb-libvirt-").FullName;
        await Tools.RunAsync("chmod", ["0755", work], Cmd);
        var image = GuestImage.EnsureBuilt();
        string kernel = Path.Combine(work, "vmlinux");
        string initrd = Path.Combine(work, "initramfs.img");
        File.Copy(File.Exists(Path.Combine(Path.GetDirectoryName(image.KernelPath)!, "vmlinux"))
            ? Path.Combine(Path.GetDirectoryName(image.KernelPath)!, "vmlinux") : image.KernelPath, kernel);
        File.Copy(image.InitrdPath, initrd);
        string backing = Path.Combine(work, "disk.img");
        using (var f = File.Create(backing))
        {
            f.SetLength(64 << 20);
        }

        string persist = Path.Combine(work, "running.json");
        string[] daemonArgs = ["--socket-group", "kvm", "--socket-mode", "0660", "--persist-config", persist];
        var daemon = await VhostDaemon.StartAsync(work, output.WriteLine, daemonArgs);
        string domain = "vbtest-" + Guid.NewGuid().ToString("N")[..8];
        QemuGuest? guest = null;
        try
        {
            await daemon.CallAsync("bdev_uring_create", new JsonObject { ["filename"] = backing, ["name"] = "File0", ["block_size"] = 4096 });
            await daemon.CallAsync("bdev_malloc_create", new JsonObject { ["name"] = "Hot0", ["num_blocks"] = 8192, ["block_size"] = 4096 });
            await daemon.CallAsync("bdev_malloc_create", new JsonObject { ["name"] = "Lun0", ["num_blocks"] = 32768, ["block_size"] = 512 });
            await daemon.CallAsync("vhost_create_blk_controller", new JsonObject { ["ctrlr"] = "lv.0", ["dev_name"] = "File0" });
            await daemon.CallAsync("vhost_create_blk_controller", new JsonObject { ["ctrlr"] = "lv.hot", ["dev_name"] = "Hot0" });
            await daemon.CallAsync("vhost_create_scsi_controller", new JsonObject { ["ctrlr"] = "lv.scsi" });

            // The sockets libvirt's QEMU connects to: root:kvm 0660, not world-accessible.
            foreach (var sock in new[] { "lv.0", "lv.hot", "lv.scsi" })
            {
                string path = Path.Combine(work, sock);
                var st = await Tools.RunAsync("stat", ["-c", "%U:%G %a", path], Cmd);
                Assert.Equal("root:kvm 660", st.Output.Trim());
            }

            // 2. The fragments vhostctl prints go into the domain as they are.
            string disk0 = await LibvirtXml(daemon, "lv.0", "--target", "vda");
            string diskHot = await LibvirtXml(daemon, "lv.hot", "--target", "vdb");
            string scsi = await LibvirtXml(daemon, "lv.scsi");
            Assert.Contains("<disk type='vhostuser' device='disk'>", disk0, StringComparison.Ordinal);
            Assert.Contains($"path='{Path.Combine(work, "lv.0")}'", disk0, StringComparison.Ordinal);
            Assert.Contains("<reconnect enabled='yes' timeout='1'/>", disk0, StringComparison.Ordinal);
            Assert.Contains("vhost-user-scsi-pci", scsi, StringComparison.Ordinal);
            string hotFile = Path.Combine(work, "hot.xml");
            await File.WriteAllTextAsync(hotFile, diskHot);
            await AssertValid(WrapFragment(diskHot), "vhostctl libvirt-xml lv.hot");

            string domainXml = DomainXml(domain, kernel, initrd, Path.Combine(work, "console.log"), disk0, scsi);
            string domainFile = Path.Combine(work, "domain.xml");
            await File.WriteAllTextAsync(domainFile, domainXml);
            var valid = await Libvirt.ValidateAsync(domainFile);
            Assert.True(valid.ExitCode == 0, "domain XML invalid: " + valid.Output + "\n" + domainXml);
            output.WriteLine(domainXml);

            // 3. Boot under libvirt.
            await Libvirt.VirshAsync(["define", domainFile], Cmd);
            await Libvirt.VirshAsync(["start", domain], Cmd);
            int pid = Libvirt.QemuPid(domain);
            string uid = File.ReadAllLines($"/proc/{pid}/status").First(l => l.StartsWith("Uid:", StringComparison.Ordinal));
            string qemuUid = (await Tools.RunAsync("id", ["-u", QemuUser], Cmd)).Output.Trim();
            Assert.True(uid.Split('\t', StringSplitOptions.RemoveEmptyEntries)[1] == qemuUid, $"QEMU does not run as {QemuUser} ({qemuUid}): {uid}");
            string agent = await Libvirt.ChannelPathAsync(domain, QemuGuest.AgentPortName);
            guest = await QemuGuest.AttachAsync(pid, agent, Path.Combine(work, "console.log"), new QemuGuestOptions
            {
                Name = "libvirt",
                Log = output.WriteLine,
                BootTimeout = TimeSpan.FromSeconds(180),
            });

            Assert.Equal("131072", (await Run(guest, "cat /sys/block/vda/size")).Trim());
            await Run(guest, "chroot /host /bin/sh -c 'fio --name=lv --filename=/dev/vda --ioengine=libaio --direct=1 --rw=randwrite " +
                "--bs=4k --iodepth=16 --size=16M --verify=crc32c --verify_fatal=1 --do_verify=1' 2>&1 | tail -5");

            // 4. Hot-plug a second vhost-user-blk disk with virsh, then unplug it.
            await Libvirt.VirshAsync(["attach-device", domain, hotFile, "--live"], Cmd);
            await WaitInGuest(guest, "test -e /sys/block/vdb", "vdb never appeared after attach-device");
            Assert.Equal("65536", (await Run(guest, "cat /sys/block/vdb/size")).Trim());
            await RoundTrip(guest, "/dev/vdb", 3);
            Assert.Single(Sessions(await Controller(daemon, "lv.hot")));
            await Libvirt.VirshAsync(["detach-device", domain, hotFile, "--live"], Cmd);
            await WaitInGuest(guest, "test ! -e /sys/block/vdb", "vdb still present after detach-device");
            await WaitFor(async () => Sessions(await Controller(daemon, "lv.hot")).Count == 0, "the lv.hot session did not end after detach-device");
            Assert.DoesNotContain("vhostuser", (await Libvirt.VirshAsync(["domblklist", domain], Cmd)).Output.Split('\n').Where(l => l.Contains("vdb", StringComparison.Ordinal)));

            // 5. vhost-user-scsi from <qemu:commandline>: a LUN hot-added over RPC shows up in the running domain.
            Assert.Equal("", (await Run(guest, "ls /sys/block | grep '^sd' || true")).Trim());
            Assert.Equal(0, (int)(await daemon.CallAsync("vhost_scsi_controller_add_target", new JsonObject { ["ctrlr"] = "lv.scsi", ["scsi_target_num"] = 0, ["bdev_name"] = "Lun0" }))!);
            await WaitInGuest(guest, "ls /sys/block | grep -q '^sd'", "the hot-added LUN never appeared");
            string sd = (await Run(guest, "ls /sys/block | grep '^sd' | head -1")).Trim();
            Assert.Equal("32768", (await Run(guest, $"cat /sys/block/{sd}/size")).Trim());
            await RoundTrip(guest, "/dev/" + sd, 5);

            // 6. The daemon dies and comes back from its persisted config; libvirt's <reconnect> brings vda back.
            await WaitForFile(persist, "lv.scsi");
            await daemon.KillAsync();
            await daemon.DisposeAsync();
            output.WriteLine("vhostd killed; restarting");
            await Task.Delay(1500);
            daemon = await VhostDaemon.StartAsync(work, output.WriteLine, daemonArgs);
            await daemon.CallAsync("framework_wait_init", null);
            await WaitFor(async () => Sessions(await Controller(daemon, "lv.0")).Count == 1, "QEMU did not reconnect to lv.0 after the restart");
            await RoundTrip(guest, "/dev/vda", 11);
            Assert.Equal("running", (await Libvirt.VirshAsync(["domstate", domain], Cmd)).Output.Trim());
        }
        finally
        {
            if (guest is not null)
            {
                await guest.DisposeAsync();
            }

            await Libvirt.VirshAsync(["destroy", domain], Cmd, check: false);
            await Libvirt.VirshAsync(["undefine", domain], Cmd, check: false);
            await daemon.DisposeAsync();
            try
            {
                Directory.Delete(work, recursive: true);
            }
            catch (IOException)
            {
            }
        }
    }

    private async Task ValidateDocsXml()
    {
        var root = GuestImage.RepoRoot;
        var sources = new List<(string Where, string Xml)>();
        foreach (var md in Directory.GetFiles(Path.Combine(root, "docs"), "*.md").Append(Path.Combine(root, "README.md")))
        {
            int n = 0;
            foreach (Match m in XmlBlock().Matches(File.ReadAllText(md)))
            {
                sources.Add(($"{Path.GetFileName(md)} block {++n}", m.Groups[1].Value));
            }
        }

        foreach (var dir in new[] { "docs", "qemu", "contrib" })
        {
            foreach (var file in Directory.GetFiles(Path.Combine(root, dir), "*.xml", SearchOption.AllDirectories))
            {
                sources.Add((Path.GetRelativePath(root, file), File.ReadAllText(file)));
            }
        }

        Assert.True(sources.Count >= 3, $"expected the libvirt XML of docs/LIBVIRT.md, found {sources.Count} XML blocks");
        foreach (var (where, xml) in sources)
        {
            await AssertValid(WrapFragment(xml), where);
        }

        // The check can fail: a disk without its target is refused.
        var bad = Path.Combine(Path.GetTempPath(), $"vb-bad-{Guid.NewGuid():N}.xml");
        await File.WriteAllTextAsync(bad, WrapFragment("<disk type='vhostuser' device='disk'><source type='unix' path='/x'/></disk>"));
        try
        {
            Assert.NotEqual(0, (await Libvirt.ValidateAsync(bad)).ExitCode);
        }
        finally
        {
            File.Delete(bad);
        }

        output.WriteLine($"virt-xml-validate: {sources.Count} XML documents/fragments from docs/ valid");
    }

    private static async Task AssertValid(string domainXml, string where)
    {
        var file = Path.Combine(Path.GetTempPath(), $"vb-xml-{Guid.NewGuid():N}.xml");
        await File.WriteAllTextAsync(file, domainXml);
        try
        {
            var r = await Libvirt.ValidateAsync(file);
            Assert.True(r.ExitCode == 0, $"{where}: virt-xml-validate failed:\n{r.Output}\n{domainXml}");
        }
        finally
        {
            File.Delete(file);
        }
    }

    /// <summary>A whole domain stays as it is; device elements go into a minimal domain's devices, others beside them.</summary>
    private static string WrapFragment(string xml)
    {
        string body = XmlComment().Replace(xml, string.Empty).Trim();
        if (body.StartsWith("<domain", StringComparison.Ordinal))
        {
            return xml;
        }

        var devices = new StringBuilder();
        var top = new StringBuilder();
        foreach (Match m in TopElement().Matches(body))
        {
            string name = m.Groups["name"].Value;
            bool device = name is "disk" or "controller" or "channel" or "serial" or "console" or "filesystem" or "interface" or "memballoon" or "emulator";
            (device ? devices : top).Append(m.Value).Append('\n');
        }

        return "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>\n<name>fragment</name>\n<memory unit='MiB'>512</memory>\n" +
            "<os><type arch='x86_64' machine='q35'>hvm</type></os>\n" + (top.ToString().Contains("<memoryBacking", StringComparison.Ordinal) ? string.Empty :
            "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>\n") + top + "<devices>\n" + devices + "</devices>\n</domain>\n";
    }

    /// <summary>
    /// The test domain: direct kernel boot, memfd shared memory (vhost-user), the agent on a libvirt-created unix
    /// channel, spare PCIe root ports for hot-plug. Hot-plug uses native PCIe hotplug: with QEMU 7.2's default ACPI
    /// PCI hotplug on q35 this guest kernel removed other devices (9p, vda) when a disk was hot-added.
    /// </summary>
    private static string DomainXml(string name, string kernel, string initrd, string console, string disk, string scsi)
    {
        var ports = new StringBuilder();
        for (int i = 1; i <= 4; i++)
        {
            ports.Append(CultureInfo.InvariantCulture,
                $"    <controller type='pci' index='{i}' model='pcie-root-port'><address type='pci' domain='0x0000' bus='0x00' slot='0x{i + 3:x2}' function='0x0'/></controller>\n");
        }

        string scsiArgs = Regex.Match(scsi, "<qemu:commandline>(.*)</qemu:commandline>", RegexOptions.Singleline).Groups[1].Value;
        Assert.False(string.IsNullOrWhiteSpace(scsiArgs), "vhostctl libvirt-xml printed no qemu:commandline for the scsi controller: " + scsi);
        string share = GuestImage.RepoHiddenInGuest ? " vbguest.share=" + GuestImage.RepoRoot : string.Empty;
        return $"""
            <domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
              <name>{name}</name>
              <memory unit='MiB'>512</memory>
              <vcpu>2</vcpu>
              <memoryBacking>
                <source type='memfd'/>
                <access mode='shared'/>
              </memoryBacking>
              <os>
                <type arch='x86_64' machine='q35'>hvm</type>
                <kernel>{kernel}</kernel>
                <initrd>{initrd}</initrd>
                <cmdline>console=ttyS0 panic=-1 quiet pcie_ports=native{share}</cmdline>
              </os>
              <cpu mode='maximum'/>
              <on_reboot>destroy</on_reboot>
              <devices>
                <emulator>/usr/bin/qemu-system-x86_64</emulator>
            {disk}
                <controller type='usb' model='none'/>
                <controller type='pci' index='0' model='pcie-root'/>
            {ports}    <serial type='file'>
                  <source path='{console}'/>
                </serial>
                <channel type='unix'>
                  <source mode='bind'/>
                  <target type='virtio' name='{QemuGuest.AgentPortName}'/>
                </channel>
                <memballoon model='none'/>
              </devices>
              <qemu:commandline>
                <qemu:arg value='-global'/>
                <qemu:arg value='ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off'/>
                <qemu:arg value='-fsdev'/>
                <qemu:arg value='local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap'/>
                <qemu:arg value='-device'/>
                <qemu:arg value='{"{"}"driver":"virtio-9p-pci","fsdev":"hostroot","mount_tag":"hostroot","bus":"pcie.0","addr":"0x10"{"}"}'/>
            {scsiArgs}
              </qemu:commandline>
            </domain>
            """;
    }

    private static async Task<string> LibvirtXml(VhostDaemon daemon, string ctrlr, params string[] extra)
    {
        // Standard output only (a first-use build of the tool reports on standard error).
        string file = Path.Combine(Path.GetTempPath(), $"vb-xml-{Guid.NewGuid():N}.out");
        try
        {
            var r = await Tools.RunAsync("bash", ["-c", "f=$1; shift; exec \"$@\" > \"$f\"", "vhostctl", file,
                Path.Combine(GuestImage.RepoRoot, "vhostctl"), "-s", daemon.RpcSocket, "libvirt-xml", ctrlr, .. extra], Cmd);
            Assert.True(r.ExitCode == 0, $"vhostctl libvirt-xml {ctrlr} failed: {r.Output}");
            return await File.ReadAllTextAsync(file);
        }
        finally
        {
            File.Delete(file);
        }
    }

    private static async Task<JsonObject> Controller(VhostDaemon daemon, string name) =>
        (JsonObject)((JsonArray)(await daemon.CallAsync("vhost_get_controllers", new JsonObject { ["name"] = name }))!)[0]!;

    private static JsonArray Sessions(JsonObject controller) => (JsonArray)controller["sessions"]!;

    private static async Task RoundTrip(QemuGuest guest, string dev, int seek) =>
        await Run(guest, $"head -c 65536 /dev/urandom > /tmp/p && dd if=/tmp/p of={dev} bs=64k seek={seek} oflag=direct 2>&1 && " +
            $"dd if={dev} of=/tmp/q bs=64k skip={seek} count=1 iflag=direct 2>&1 && cmp /tmp/p /tmp/q");

    private static async Task WaitInGuest(QemuGuest guest, string condition, string failure)
    {
        var sw = Stopwatch.StartNew();
        while ((await guest.ExecAsync(condition, Cmd)).ExitCode != 0)
        {
            Assert.True(sw.Elapsed < TimeSpan.FromSeconds(60), failure + "\n" + (await guest.ExecAsync("ls /sys/block; dmesg | tail -15", Cmd)).Output);
            await Task.Delay(500);
        }
    }

    private static async Task WaitFor(Func<Task<bool>> condition, string failure)
    {
        var sw = Stopwatch.StartNew();
        while (!await condition())
        {
            Assert.True(sw.Elapsed < TimeSpan.FromSeconds(60), failure);
            await Task.Delay(300);
        }
    }

    private static async Task WaitForFile(string file, string text) =>
        await WaitFor(async () => File.Exists(file) && (await File.ReadAllTextAsync(file)).Contains(text, StringComparison.Ordinal), $"{file} never got {text}");

    private static async Task<string> Run(QemuGuest guest, string cmd)
    {
        var r = await guest.ExecAsync(cmd, Cmd);
        Assert.True(r.ExitCode == 0, r + "\n" + guest.ConsoleTail());
        return r.Output;
    }

    [GeneratedRegex("```xml\\n(.*?)```", RegexOptions.Singleline)]
    private static partial Regex XmlBlock();

    [GeneratedRegex("<!--.*?-->", RegexOptions.Singleline)]
    private static partial Regex XmlComment();

    [GeneratedRegex(@"<(?<name>[A-Za-z:]+)\b[^>]*?(/>|>.*?</\k<name>>)", RegexOptions.Singleline)]
    private static partial Regex TopElement();
}
