using System.Diagnostics;
using VhostBackend.IntegrationTests.Infrastructure;
using Xunit;
using Xunit.Abstractions;

namespace VhostBackend.IntegrationTests;

public sealed class TmpHarnessTests(ITestOutputHelper output)
{
    [Fact]
    public async Task Timeout_resync_concurrency_kill()
    {
        await using var guest = await QemuGuest.StartAsync(new QemuGuestOptions { Name = "tmp", Log = output.WriteLine, HostRootCache = "loose", ExtraKernelArgs = ["foo=bar"] });
        var cmdline = await guest.ExecAsync("cat /proc/cmdline; mount | grep hostroot");
        output.WriteLine(cmdline.Output);
        Assert.Contains("foo=bar", cmdline.Output);
        Assert.Contains("loose", cmdline.Output);
        var ex = await Assert.ThrowsAsync<TimeoutException>(() => guest.ExecAsync("sleep 3; echo late", TimeSpan.FromSeconds(1)));
        output.WriteLine("timeout message: " + ex.Message[..Math.Min(300, ex.Message.Length)]);
        var after = await guest.ExecAsync("echo next", TimeSpan.FromSeconds(10));
        Assert.Equal("next\n", after.Output);
        var tasks = Enumerable.Range(0, 5).Select(i => guest.ExecAsync($"echo {i}", TimeSpan.FromSeconds(20))).ToArray();
        var results = await Task.WhenAll(tasks);
        for (int i = 0; i < 5; i++) Assert.Equal($"{i}\n", results[i].Output);
        var big = await guest.ExecAsync("seq 1 200000", TimeSpan.FromSeconds(60));
        Assert.Equal(200000, big.Output.Split('\n', StringSplitOptions.RemoveEmptyEntries).Length);
        output.WriteLine($"seq 200000 took {big.Duration}");
        var hello = await guest.ExecHostAsync("dotnet /root/.cache/vhostbackend/scratch/hello/out/hello.dll", TimeSpan.FromSeconds(60));
        output.WriteLine(hello.ToString());
        var info = await guest.ExecHostAsync("dotnet --info | head -3", TimeSpan.FromSeconds(60));
        output.WriteLine(info.ToString());
        guest.Kill();
        Assert.True(await guest.WaitForExitAsync(TimeSpan.FromSeconds(5)));
        await Assert.ThrowsAsync<QemuGuestException>(() => guest.ExecAsync("true", TimeSpan.FromSeconds(5)));
    }

    [Fact]
    public async Task Bad_qemu_arg_fails_fast()
    {
        var sw = Stopwatch.StartNew();
        var ex = await Assert.ThrowsAsync<QemuGuestException>(() => QemuGuest.StartAsync(new QemuGuestOptions { ExtraQemuArgs = ["-device", "nonexistent-device"] }));
        output.WriteLine($"{sw.Elapsed}: {ex.Message}");
        Assert.True(sw.Elapsed < TimeSpan.FromSeconds(10));
    }

    [Fact]
    public async Task No_hostroot_and_pc_machine()
    {
        await using var guest = await QemuGuest.StartAsync(new QemuGuestOptions { MountHostRoot = false, Machine = "pc", Memory = "512M", Cpus = 1 });
        var r = await guest.ExecAsync("mount | grep -c hostroot; nproc");
        output.WriteLine(r.ToString());
        Assert.Equal("0\n1\n", r.Output);
    }
}
