using System.Diagnostics;
using System.Globalization;
using System.Text.RegularExpressions;

namespace VhostBackend.IntegrationTests.Infrastructure;

/// <summary>
/// The host's libvirtd (qemu:///system), started without systemd when it is not running (<c>virtlogd -d</c>,
/// <c>libvirtd -d</c>), and <c>virsh</c>. Nothing is reconfigured: QEMU runs as libvirt's default user
/// (<c>libvirt-qemu</c> on Debian) with the DAC security driver, as on an operator's host.
/// </summary>
public static partial class Libvirt
{
    public const string Uri = "qemu:///system";

    private static readonly SemaphoreSlim s_start = new(1, 1);

    /// <summary>Fails (the test fails) when libvirt is not installed or does not come up.</summary>
    public static async Task EnsureRunningAsync(Action<string> log)
    {
        Tools.Require("virsh", "libvirt-clients");
        Tools.Require("virt-xml-validate", "libvirt-clients");
        Tools.Require("libvirtd", "libvirt-daemon-system");
        await s_start.WaitAsync();
        try
        {
            if ((await VirshAsync(["version"], TimeSpan.FromSeconds(20), check: false)).ExitCode == 0)
            {
                return;
            }

            log("libvirt: starting virtlogd and libvirtd (no systemd)");
            if (!Process.GetProcessesByName("virtlogd").Any())
            {
                await Tools.RunAsync("virtlogd", ["-d"], TimeSpan.FromSeconds(20));
            }

            if (!Process.GetProcessesByName("libvirtd").Any())
            {
                var r = await Tools.RunAsync("libvirtd", ["-d"], TimeSpan.FromSeconds(30));
                if (r.ExitCode != 0)
                {
                    throw new InvalidOperationException("libvirtd -d failed: " + r.Output);
                }
            }

            var sw = Stopwatch.StartNew();
            while (true)
            {
                var v = await VirshAsync(["version"], TimeSpan.FromSeconds(20), check: false);
                if (v.ExitCode == 0)
                {
                    return;
                }

                if (sw.Elapsed > TimeSpan.FromSeconds(30))
                {
                    throw new InvalidOperationException("libvirtd did not answer within 30 s: " + v.Output);
                }

                await Task.Delay(500);
            }
        }
        finally
        {
            s_start.Release();
        }
    }

    /// <summary>Runs <c>virsh -c qemu:///system ARGS</c>; throws with its output when it fails and <paramref name="check"/>.</summary>
    public static async Task<HostProcessResult> VirshAsync(IReadOnlyList<string> args, TimeSpan timeout, bool check = true)
    {
        var r = await Tools.RunAsync("virsh", ["-c", Uri, .. args], timeout);
        if (check && r.ExitCode != 0)
        {
            throw new InvalidOperationException($"virsh {string.Join(' ', args)} failed ({r.ExitCode}): {r.Output}");
        }

        return r;
    }

    /// <summary><c>virt-xml-validate FILE [domain]</c>: the exit code and output.</summary>
    public static Task<HostProcessResult> ValidateAsync(string file, string? schema = "domain") =>
        Tools.RunAsync("virt-xml-validate", schema is null ? [file] : [file, schema], TimeSpan.FromSeconds(60));

    /// <summary>The PID of a running domain's QEMU (from libvirt's pid file).</summary>
    public static int QemuPid(string domain)
    {
        string text = File.ReadAllText($"/run/libvirt/qemu/{domain}.pid").Trim();
        return int.Parse(text, CultureInfo.InvariantCulture);
    }

    /// <summary>The host path of a unix channel libvirt created for the domain (mode='bind' without a path).</summary>
    public static async Task<string> ChannelPathAsync(string domain, string targetName)
    {
        var xml = (await VirshAsync(["dumpxml", domain], TimeSpan.FromSeconds(30))).Output;
        foreach (Match m in ChannelRegex().Matches(xml))
        {
            if (m.Groups["name"].Value == targetName)
            {
                return m.Groups["path"].Value;
            }
        }

        throw new InvalidOperationException($"domain {domain} has no unix channel '{targetName}':\n{xml}");
    }

    [GeneratedRegex(@"<channel type='unix'>\s*<source mode='bind' path='(?<path>[^']+)'/>\s*<target type='virtio' name='(?<name>[^']+)'", RegexOptions.Singleline)]
    private static partial Regex ChannelRegex();
}
