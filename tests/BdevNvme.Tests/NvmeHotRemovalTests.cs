using System.Diagnostics;
using System.Text.Json.Nodes;
using VhostBackend.Bdev;
using VhostBackend.Nvme;
using VhostBackend.Nvme.Tests;
using VhostBackend.Platform;
using VhostBackend.Reactors;
using Xunit;

namespace VhostBackend.BdevNvme.Tests;

/// <summary>
/// Hot removal of a PCIe controller (the device request notifier, registers reading all ones, a recovery reset that
/// fails) and several namespaces, over the controller MODEL: the module fails the I/O, unregisters every namespace
/// bdev (openers get the remove event), gives the device back once, frees the name; the same attach works again.
/// </summary>
public sealed partial class NvmeBdevTests
{
    /// <summary>A descriptor that closes itself when its bdev is hot-removed (what vhost-blk and vhost-scsi do).</summary>
    private sealed class ClosingOpener
    {
        public BdevDesc Desc = null!;
        public readonly TaskCompletionSource Removed = new(TaskCreationOptions.RunContinuationsAsynchronously);

        public static ClosingOpener Open(BdevManager bdevs, string name)
        {
            var o = new ClosingOpener();
            o.Desc = bdevs.Open(name, write: true, static (type, _, ctx) =>
            {
                if (type == BdevEventType.Remove)
                {
                    var self = (ClosingOpener)ctx!;
                    self.Removed.TrySetResult();
                    self.Desc.Dispose();
                }
            }, o);
            return o;
        }
    }

    private async Task WaitHeld(NvmeControllerModel model)
    {
        for (int i = 0; i < 500 && model.HeldCount == 0; i++)
        {
            await Task.Delay(10);
        }

        Assert.True(model.HeldCount > 0, "the read never reached the model");
    }

    private int Releases(NvmeControllerModel model)
    {
        lock (_irqFds)
        {
            return _releases.GetValueOrDefault(model);
        }
    }

    /// <summary>Waits for the hot removal of Nvme0 to finish, then checks what is left: nothing, and the device given back once.</summary>
    private async Task AssertHotRemoved(NvmeControllerModel model, ClosingOpener opener)
    {
        await opener.Removed.Task.WaitAsync(TimeSpan.FromSeconds(10));
        var sw = Stopwatch.StartNew();
        while (_module.FindController("Nvme0") is not null && sw.Elapsed < TimeSpan.FromSeconds(15))
        {
            await _module.WaitHotRemovedAsync("Nvme0").WaitAsync(TimeSpan.FromSeconds(15));
            await Task.Delay(5);
        }

        Assert.Null(_module.FindController("Nvme0"));
        Assert.Null(_bdevs.Find("Nvme0n1"));
        Assert.Empty((await Call("bdev_nvme_get_controllers", "{}"))!.AsArray());
        Assert.Equal(1, Releases(model));
        Assert.Equal(0, model.DmaFaults);
    }

    private async Task ReattachAndReadWrite()
    {
        var again = await Attach();
        Assert.Equal("[\"Nvme0n1\"]", again!.ToJsonString());
        var model = _models[^1];
        using var desc = _bdevs.Open("Nvme0n1", write: true);
        nint buf = Alloc(512);
        try
        {
            Fill(buf, 512, i => (byte)(i * 7));
            Assert.True(await Io(desc, _rt.Main, (ch, cb) => ch.Write(desc, new[] { new IoVec(buf, 512) }, 3, 1, cb, null)));
            Assert.Equal(Read(buf, 0, 512), DiskBytes(model, 3 * 512, 512));
        }
        finally
        {
            Free(buf);
        }
    }

    /// <summary>
    /// The hot-removal pattern the triggers share: attaches Nvme0 and opens Nvme0n1 (an opener that closes itself on
    /// removal); with <paramref name="readInFlight"/>, holds a read in the model before <paramref name="trigger"/>
    /// runs and checks that it fails; then waits for the removal and checks what is left (<see cref="AssertHotRemoved"/>).
    /// </summary>
    private async Task AttachAndHotRemove(Action<NvmeControllerModel> trigger, bool readInFlight = true)
    {
        await Attach();
        var model = _models[0];
        var opener = ClosingOpener.Open(_bdevs, "Nvme0n1");
        if (!readInFlight)
        {
            trigger(model);
            await AssertHotRemoved(model, opener);
            return;
        }

        nint buf = Alloc(512);
        try
        {
            model.HoldIo = true;
            var pending = Io(opener.Desc, _rt.Main, (ch, cb) => ch.Read(opener.Desc, new[] { new IoVec(buf, 512) }, 0, 1, cb, null));
            await WaitHeld(model);
            trigger(model);
            Assert.False(await pending.WaitAsync(TimeSpan.FromSeconds(10))); // the read in flight fails (IOERR above)
            await AssertHotRemoved(model, opener);
        }
        finally
        {
            Free(buf);
        }
    }

    [Fact]
    public async Task DeviceRequestHotRemovesTheControllerAndTheSameAttachWorksAgain()
    {
        await AttachAndHotRemove(model =>
        {
            _rt.Main.ResetMaxIteration();
            EventFd req;
            lock (_irqFds)
            {
                req = _requests[model];
            }

            req.Signal(); // the kernel wants the device back (unbind from vfio-pci, or echo 1 > .../remove)
        });
        double maxMs = Ticks.ToMicroseconds(_rt.Main.MaxIterationTicks) / 1000;
        Assert.True(maxMs < 500, $"the main reactor's longest iteration during the removal was {maxMs} ms");

        // The name and the address are free, and the "device" (a new model behind the same address) attaches again.
        await ReattachAndReadWrite();
    }

    [Fact]
    public async Task SurpriseRemovalRegistersReadingAllOnesHotRemovesTheController()
    {
        await AttachAndHotRemove(model => model.Removed = true);
        await ReattachAndReadWrite();
    }

    [Fact]
    public async Task FatalControllerWhoseRecoveryResetFailsIsHotRemoved()
    {
        await AttachAndHotRemove(
            model =>
            {
                model.NeverReady = true; // the reset after CSTS.CFS never gets RDY back: it fails after CAP.TO (1 s)
                model.InjectFatal();
            },
            readInFlight: false);
    }

    [Fact]
    public async Task ResetRequestedOverRpcThatFailsLeavesTheControllerFailedNotRemoved()
    {
        // SPDK: a failed bdev_nvme_reset_controller (reconnect_delay_sec 0) leaves the controller failed; only the
        // recovery of a failed controller (or the device leaving) deletes it.
        await Attach();
        var model = _models[0];
        model.NeverReady = true;
        await Assert.ThrowsAsync<VhostBackend.Rpc.RpcException>(() => Call("bdev_nvme_reset_controller", """{"name":"Nvme0"}"""));
        await Task.Delay(300);
        Assert.NotNull(_bdevs.Find("Nvme0n1"));
        var listed = (JsonArray)(await Call("bdev_nvme_get_controllers", """{"name":"Nvme0"}"""))!;
        Assert.Equal("failed", (string?)listed[0]!["ctrlrs"]![0]!["state"]);
        Assert.Equal(0, Releases(model));
        model.NeverReady = false;
    }

    [Fact]
    public async Task EveryNamespaceGetsABdevAndNamespaceNoticesAddAndRemoveThem()
    {
        ExtraNamespaces.Add((2, 4096));
        var names = await Attach();
        Assert.Equal("[\"Nvme0n1\",\"Nvme0n2\"]", names!.ToJsonString());
        var model = _models[0];
        Assert.Equal(4096UL, _bdevs.Find("Nvme0n2")!.BlockCount);
        Assert.Equal(8192UL, _bdevs.Find("Nvme0n1")!.BlockCount);

        // I/O to the second namespace lands in its data, not the first's.
        using (var desc = _bdevs.Open("Nvme0n2", write: true))
        {
            nint buf = Alloc(512);
            Fill(buf, 512, i => 0x5A);
            Assert.True(await Io(desc, _rt.Main, (ch, cb) => ch.Write(desc, new[] { new IoVec(buf, 512) }, 4095, 1, cb, null)));
            Free(buf);
        }

        Assert.Equal(0x5A, model.NamespaceDisk(2)[4095 * 512]);
        Assert.Equal(0, model.NamespaceDisk(1)[4095 * 512]);

        // Namespace attribute notices (the driver enabled them with Set Features AEC): one added, one removed.
        model.AddNamespace(3, 1024);
        Assert.True(model.RaiseNamespaceChanged());
        Assert.True(await WaitFor(() => _bdevs.Find("Nvme0n3") is { BlockCount: 1024 }), "Nvme0n3 was not added");
        var opener = ClosingOpener.Open(_bdevs, "Nvme0n2");
        model.RemoveNamespace(2);
        Assert.True(model.RaiseNamespaceChanged());
        await opener.Removed.Task.WaitAsync(TimeSpan.FromSeconds(10)); // its opener hears the remove event
        Assert.True(await WaitFor(() => _bdevs.Find("Nvme0n2") is null), "Nvme0n2 was not removed");
        Assert.Equal(new[] { "Nvme0n1", "Nvme0n3" }, _module.Find("Nvme0")!.Bdevs.Select(b => b.Name).ToArray());
    }

    private static async Task<bool> WaitFor(Func<bool> cond)
    {
        var sw = Stopwatch.StartNew();
        while (!cond())
        {
            if (sw.Elapsed > TimeSpan.FromSeconds(10))
            {
                return false;
            }

            await Task.Delay(10);
        }

        return true;
    }
}
