using System.Diagnostics;
using VhostBackend.IntegrationTests.Infrastructure;
using Xunit;
using Xunit.Abstractions;

namespace VhostBackend.IntegrationTests;

/// <summary>Boots the test guest without vhost devices and checks the agent and the chroot into the host root.</summary>
public sealed class GuestSmokeTests(ITestOutputHelper output)
{
    [Fact]
    public async Task Guest_boots_and_runs_commands()
    {
        Tools.Require("qemu-system-x86_64", "qemu-system-x86");
        Tools.Require("fio");

        var total = Stopwatch.StartNew();
        await using var guest = await QemuGuest.StartAsync(new QemuGuestOptions { Name = "smoke", Log = output.WriteLine });
        output.WriteLine($"boot time: {guest.BootTime.TotalSeconds:F2}s");
        var timeout = TimeSpan.FromSeconds(60);

        var uname = await guest.ExecAsync("uname -r", timeout);
        Assert.True(uname.ExitCode == 0, uname.ToString());
        Assert.False(string.IsNullOrWhiteSpace(uname.Output), uname.ToString());
        output.WriteLine($"boot + first command: {total.Elapsed.TotalSeconds:F2}s (kernel {uname.Output.Trim()})");

        var fio = await guest.ExecAsync("chroot /host fio --version", timeout);
        Assert.True(fio.ExitCode == 0, fio.ToString() + "\n" + guest.ConsoleTail());
        Assert.Contains("fio-", fio.Output, StringComparison.Ordinal);

        var fail = await guest.ExecAsync("false", timeout);
        Assert.Equal(1, fail.ExitCode);

        var ports = await guest.ExecAsync("ls /sys/class/virtio-ports", timeout);
        Assert.True(ports.ExitCode == 0, ports.ToString());
        Assert.Contains("vport", ports.Output, StringComparison.Ordinal);

        // Output is returned exactly, stdout and stderr merged; multi-line scripts work.
        var exact = await guest.ExecAsync("printf 'a\\nb'; echo err >&2", timeout);
        Assert.Equal("a\nberr\n", exact.Output);
        var script = await guest.ExecAsync("x=41\necho $((x + 1))\nexit 3", timeout);
        Assert.Equal((3, "42\n"), (script.ExitCode, script.Output));

        var sgInq = await guest.ExecHostAsync("sg_inq --help", timeout);
        Assert.Contains("Usage: sg_inq", sgInq.Output, StringComparison.Ordinal);

        output.WriteLine($"total incl. poweroff pending: {total.Elapsed.TotalSeconds:F2}s");
    }
}
