using System.Diagnostics;
using System.Runtime.InteropServices;
using System.Text.Json;
using System.Text.Json.Nodes;
using Microsoft.Extensions.Logging.Abstractions;
using VhostBackend.Bdev;
using VhostBackend.Bdev.Rpc;
using VhostBackend.BdevNvme;
using VhostBackend.Nvme;
using VhostBackend.Nvme.Tests;
using VhostBackend.Platform;
using VhostBackend.Reactors;
using VhostBackend.Rpc;
using Xunit;

namespace VhostBackend.BdevNvme.Tests;

/// <summary>The NVMe bdev module and its RPCs over the in-process controller MODEL (no device).</summary>
public sealed partial class NvmeBdevTests : IAsyncLifetime
{
    private readonly DmaSpace _space = new(IdentityDmaMapper.Instance);
    private readonly List<NvmeControllerModel> _models = new();
    private ReactorRuntime _rt = null!;
    private readonly BdevManager _bdevs = new();
    private readonly RpcRegistry _rpc = new();
    private NvmeBdevModule _module = null!;

    private byte CapTimeoutUnits { get; set; } = 2;

    /// <summary>Controllers attached from now on get the model's MSI-X (3 vectors, eventfds) and use them.</summary>
    private bool WithInterrupts { get; set; }

    private readonly List<EventFd> _irqFds = new();
    private readonly Dictionary<NvmeControllerModel, EventFd> _requests = new(); // under _irqFds
    private readonly Dictionary<NvmeControllerModel, int> _releases = new(); // under _irqFds

    /// <summary>Namespaces (besides 1) the models attached from now on have.</summary>
    private List<(uint Nsid, ulong Blocks)> ExtraNamespaces { get; } = new();

    public Task InitializeAsync()
    {
        var online = CpuSet.Online().Cores;
        _rt = new ReactorRuntime(CpuSet.Of(online.Take(2).ToArray()), new ReactorOptions { Mode = ReactorMode.Poll, PinThreads = false });
        _rt.Start();
        _module = NvmeBdevModule.WithAttach((addr, opts, log) =>
        {
            var model = new NvmeControllerModel(_space, blocks: 8192, blockSize: 512, serial: "SN-" + addr) { TimeoutUnits = CapTimeoutUnits };
            lock (_models)
            {
                _models.Add(model);
            }

            foreach (var (nsid, blocks) in ExtraNamespaces)
            {
                model.AddNamespace(nsid, blocks);
            }

            var ctrl = NvmeController.Attach(addr, model, _space, opts, log);

            // The device request notifier, as VfioPciDevice gives it: an eventfd the "kernel" signals, and a release
            // after which BAR0 reads all ones.
            var req = new EventFd();
            lock (_irqFds)
            {
                _irqFds.Add(req);
                _requests[model] = req;
            }

            ctrl.UseRemovalNotifier(req, () =>
            {
                lock (_irqFds)
                {
                    _releases[model] = _releases.GetValueOrDefault(model) + 1;
                }

                model.Removed = true;
            });
            if (WithInterrupts)
            {
                var fds = new[] { new EventFd(), new EventFd(), new EventFd() };
                lock (_irqFds)
                {
                    _irqFds.AddRange(fds);
                }

                model.InterruptFds = fds;
                ctrl.UseInterrupts(DeviceInterruptMode.Msix, fds);
            }

            return ctrl;
        });
        _bdevs.AddModule(_module);
        _module.Init(new BdevModuleContext(_bdevs, _rt, _rpc, new SubsystemRegistry(), NullLoggerFactory.Instance));
        return Task.CompletedTask;
    }

    public async Task DisposeAsync()
    {
        foreach (var c in _module.Controllers)
        {
            await _rt.Main.InvokeAsync(() => _module.DetachAsync(c.CtrlName).ContinueWith(_ => true));
        }

        await _rt.DisposeAsync();
        foreach (var f in _irqFds)
        {
            f.Dispose();
        }
    }

    private async Task<JsonNode?> Call(string method, string json)
    {
        Assert.True(_rpc.TryGet(method, out var handler, out _));
        using var doc = JsonDocument.Parse(json);
        var req = new RpcRequest(method, doc.RootElement.Clone());
        return await _rt.Main.InvokeAsync(() => handler(req));
    }

    private async Task<int> CallError(string method, string json)
    {
        var e = await Assert.ThrowsAsync<RpcException>(() => Call(method, json));
        return e.Code;
    }

    private static unsafe nint Alloc(int n) => (nint)NativeMemory.AlignedAlloc((nuint)n, 4096);

    private static unsafe void Free(nint p) => NativeMemory.AlignedFree((void*)p);

    private static byte[] Read(nint p, int offset, int n)
    {
        var b = new byte[n];
        Marshal.Copy(p + offset, b, 0, n);
        return b;
    }

    private static void Fill(nint p, int n, Func<int, byte> f)
    {
        var b = new byte[n];
        for (int i = 0; i < n; i++)
        {
            b[i] = f(i);
        }

        Marshal.Copy(b, 0, p, n);
    }

    private static byte[] DiskBytes(NvmeControllerModel m, int offset, int n) => m.Disk.Slice(offset, n).ToArray();

    private Task<JsonNode?> Attach(string name = "Nvme0", string addr = "0000:00:04.0") =>
        Call("bdev_nvme_attach_controller", $$"""{"name":"{{name}}","trtype":"PCIe","traddr":"{{addr}}"}""");

    [Fact]
    public async Task AttachCreatesOneBdevPerNamespaceAndGetControllersShowsIt()
    {
        var result = await Attach();
        Assert.Equal("[\"Nvme0n1\"]", result!.ToJsonString());
        var bdev = Assert.IsType<NvmeBdev>(_bdevs.Find("Nvme0n1"));
        Assert.Equal(512u, bdev.BlockSize);
        Assert.Equal(8192UL, bdev.BlockCount);
        Assert.True(bdev.SupportsIoType(BdevIoType.Unmap));
        Assert.True(bdev.SupportsIoType(BdevIoType.WriteZeroes));
        // save_config: the module writes the controller (SPDK's bdev_nvme_config_json), its namespace bdevs nothing.
        Assert.Null(bdev.ConfigCall());
        var config = new JsonArray();
        _module.WriteConfig(config);
        Assert.Equal("bdev_nvme_attach_controller", Assert.Single(config)!["method"]!.GetValue<string>());
        Assert.Equal("0000:00:04.0", config[0]!["params"]!["traddr"]!.GetValue<string>());
        Assert.Equal("SN-0000:00:04.0", bdev.DriverSpecific()["nvme"]![0]!["ctrlr_data"]!["serial_number"]!.GetValue<string>());

        var ctrls = await Call("bdev_nvme_get_controllers", "{}");
        Assert.Equal("Nvme0", ctrls![0]!["name"]!.GetValue<string>());
        Assert.Equal("PCIe", ctrls[0]!["ctrlrs"]![0]!["trid"]!["trtype"]!.GetValue<string>());
        Assert.Equal("enabled", ctrls[0]!["ctrlrs"]![0]!["state"]!.GetValue<string>());
        Assert.Single((await Call("bdev_nvme_get_controllers", """{"name":"Nvme0"}"""))!.AsArray());
    }

    [Fact]
    public async Task RpcErrorsUseSpdkCodes()
    {
        await Attach();
        Assert.Equal(-17, await CallError("bdev_nvme_attach_controller", """{"name":"Nvme0","trtype":"PCIe","traddr":"0000:00:05.0"}"""));
        Assert.Equal(-17, await CallError("bdev_nvme_attach_controller", """{"name":"Nvme1","trtype":"PCIe","traddr":"0000:00:04.0"}"""));
        // SPDK (module/bdev/nvme/bdev_nvme_rpc.c): unparsable trtype/traddr -EINVAL; decoding failures -32603.
        Assert.Equal(-22, await CallError("bdev_nvme_attach_controller", """{"name":"Nvme1","trtype":"tcp","traddr":"0000:00:05.0"}"""));
        Assert.Equal(-22, await CallError("bdev_nvme_attach_controller", """{"name":"Nvme1","trtype":"PCIe","traddr":"nonsense"}"""));
        Assert.Equal(-32603, await CallError("bdev_nvme_attach_controller", """{"trtype":"PCIe","traddr":"0000:00:05.0"}"""));
        Assert.Equal(-32603, await CallError("bdev_nvme_attach_controller", """{"name":"Nvme1","trtype":"PCIe","traddr":"0000:00:05.0","bogus":1}"""));
        Assert.Equal(-32603, await CallError("bdev_nvme_attach_controller", """{"name":7,"trtype":"PCIe","traddr":"0000:00:05.0"}"""));
        Assert.Equal(-19, await CallError("bdev_nvme_get_controllers", """{"name":"Nope"}"""));
        Assert.Equal(-19, await CallError("bdev_nvme_detach_controller", """{"name":"Nope"}"""));
        Assert.Equal(-32603, await CallError("bdev_nvme_detach_controller", "{}"));
    }

    [Fact]
    public async Task SaveConfigWritesOneAttachPerControllerAndReplayingItReattachesThem()
    {
        var subsystems = new SubsystemRegistry();
        BdevRpc.Register(new RpcRegistry(), subsystems, _bdevs);
        await Attach("Nvme1", "0000:00:05.0");
        await Attach("Nvme0", "0000:00:04.0");

        var calls = await _rt.Main.InvokeAsync(() => subsystems.Find("bdev")!.WriteConfig());
        Assert.Equal(
            new[] { "bdev_set_options", "bdev_nvme_attach_controller", "bdev_nvme_attach_controller", "bdev_wait_for_examine" },
            calls.Select(c => c!["method"]!.GetValue<string>()).ToArray());
        Assert.Equal("""{"name":"Nvme1","trtype":"PCIe","traddr":"0000:00:05.0"}""", calls[1]!["params"]!.ToJsonString());
        Assert.Equal("""{"name":"Nvme0","trtype":"PCIe","traddr":"0000:00:04.0"}""", calls[2]!["params"]!.ToJsonString());

        // Shutdown detaches every controller; replaying the saved calls attaches them again, in the same order.
        await _module.FiniAsync();
        Assert.Empty(_module.Controllers);
        Assert.Null(_bdevs.Find("Nvme0n1"));
        foreach (var call in calls.Where(c => c!["method"]!.GetValue<string>() == "bdev_nvme_attach_controller"))
        {
            await Call("bdev_nvme_attach_controller", call!["params"]!.ToJsonString());
        }

        Assert.Equal(new[] { "Nvme1", "Nvme0" }, _module.Controllers.Select(c => c.CtrlName).ToArray());
        Assert.NotNull(_bdevs.Find("Nvme0n1"));
        Assert.NotNull(_bdevs.Find("Nvme1n1"));
    }

    [Fact]
    public async Task AttachFailureIsEnodevAndFreesTheName()
    {
        var module = NvmeBdevModule.WithAttach((a, o, l) => throw new IOException("PCI device not bound to vfio-pci"));
        var rpc = new RpcRegistry();
        module.Init(new BdevModuleContext(_bdevs, _rt, rpc, new SubsystemRegistry(), NullLoggerFactory.Instance));
        Assert.True(rpc.TryGet("bdev_nvme_attach_controller", out var h, out _));
        using var doc = JsonDocument.Parse("""{"name":"X","trtype":"PCIe","traddr":"0000:00:09.0"}""");
        var e = await Assert.ThrowsAsync<RpcException>(() => _rt.Main.InvokeAsync(() => h(new RpcRequest("bdev_nvme_attach_controller", doc.RootElement.Clone()))));
        Assert.Equal(-19, e.Code);
        Assert.Null(module.Find("X"));
        Assert.Empty(module.Controllers);
    }

    private async Task<bool> Io(BdevDesc desc, Reactor r, Func<BdevChannel, BdevIoCompletion, int> submit)
    {
        return await r.InvokeAsync(async () =>
        {
            var ch = desc.GetIoChannel();
            var tcs = new TaskCompletionSource<bool>(TaskCreationOptions.RunContinuationsAsynchronously);
            int rc = submit(ch, (io, ok, _) => tcs.SetResult(ok));
            Assert.Equal(0, rc);
            bool ok = await tcs.Task.WaitAsync(TimeSpan.FromSeconds(10));
            BdevDesc.PutIoChannel(ch);
            return ok;
        });
    }

    [Fact]
    public async Task IoThroughTheBdevLayerBouncesOrGoesZeroCopy()
    {
        await Attach();
        var model = _models[0];
        using var desc = _bdevs.Open("Nvme0n1", write: true);
        nint heap = Alloc(16384);
        try
        {
            // Ordinary (non-DMA) memory, misaligned three-piece list: bounced.
            Fill(heap, 16384, i => (byte)(i * 7));
            var iovs = new[] { new IoVec(heap + 3, 1000), new IoVec(heap + 2000, 24), new IoVec(heap + 5000, 7168) };
            foreach (var reactor in _rt.Reactors)
            {
                Assert.True(await Io(desc, reactor, (ch, cb) => ch.Write(desc, iovs, 16, 16, cb, null)));
            }

            Assert.Equal(Read(heap, 3, 1000), DiskBytes(model, 16 * 512, 1000));
            Assert.Equal(Read(heap, 2000, 24), DiskBytes(model, (16 * 512) + 1000, 24));
            Assert.Equal(Read(heap, 5000, 7168), DiskBytes(model, (16 * 512) + 1024, 7168));

            Fill(heap, 16384, _ => 0);
            Assert.True(await Io(desc, _rt.Main, (ch, cb) => ch.Read(desc, iovs, 16, 16, cb, null)));
            Assert.Equal(DiskBytes(model, 16 * 512, 1000), Read(heap, 3, 1000));
            Assert.Equal(DiskBytes(model, (16 * 512) + 1024, 7168), Read(heap, 5000, 7168));
            Assert.True(await Io(desc, _rt.Main, (ch, cb) => ch.Compare(desc, iovs, 16, 16, cb, null)));
            Fill(heap + 4, 1, _ => 0xFF);
            Assert.False(await Io(desc, _rt.Main, (ch, cb) => ch.Compare(desc, iovs, 16, 16, cb, null)));

            // Registered DMA memory with a PRP-compatible layout: no bounce (the model sees a PRP list into it).
            using var pool = new DmaBufferPool(_space, 2, 65536);
            Assert.True(pool.TryGet(out nint dma, out _));
            Fill(dma, 65536, _ => 0xAB);
            int listsBefore = model.PrpListsSeen;
            Assert.True(await Io(desc, _rt.Main, (ch, cb) => ch.Write(desc, new[] { new IoVec(dma, 65536) }, 256, 128, cb, null)));
            Assert.Equal(listsBefore + 1, model.PrpListsSeen);
            Assert.All(DiskBytes(model, 256 * 512, 65536), b => Assert.Equal(0xAB, b));

            // Unmap -> DSM deallocate, write zeroes -> Write Zeroes, flush.
            Assert.True(await Io(desc, _rt.Main, (ch, cb) => ch.Unmap(desc, 256, 64, cb, null)));
            Assert.All(DiskBytes(model, 256 * 512, 64 * 512), b => Assert.Equal(0, b));
            Assert.True(await Io(desc, _rt.Main, (ch, cb) => ch.WriteZeroes(desc, 320, 64, cb, null)));
            Assert.All(DiskBytes(model, 256 * 512, 65536), b => Assert.Equal(0, b));
            Assert.True(await Io(desc, _rt.Main, (ch, cb) => ch.Flush(desc, 0, 8192, cb, null)));
            Assert.Equal(0, model.DmaFaults);
        }
        finally
        {
            Free(heap);
        }
    }

    [Fact]
    public async Task RegisteredGuestMemoryGoesZeroCopyAndBouncesAreCountedInIostat()
    {
        // The vhost side registers its guest memory mappings with a registry the driver's DMA space subscribes to.
        var registry = new DmaMemoryRegistry();
        using var sub = _space.SubscribeTo(registry);
        await Attach();
        var model = _models[0];
        var bdev = (NvmeBdev)_bdevs.Find("Nvme0n1")!;
        using var desc = _bdevs.Open("Nvme0n1", write: true);
        int fd = MappedRegion.CreateMemFd("guest-ram-model", 1 << 20);
        var guest = MappedRegion.Map(fd, 1 << 20, registry);
        Fd.Close(fd);
        try
        {
            // Page-aligned and multi-page buffers in guest memory: PRPs straight into it, nothing bounced.
            nint g = guest.Pointer;
            Fill(g, 1 << 20, i => (byte)(i * 13));
            int listsBefore = model.PrpListsSeen;
            Assert.True(await Io(desc, _rt.Main, (ch, cb) => ch.Write(desc, new[] { new IoVec(g + 8192, 65536) }, 0, 128, cb, null)));
            Assert.Equal(listsBefore + 1, model.PrpListsSeen);
            Assert.True(await Io(desc, _rt.Main, (ch, cb) => ch.Write(desc, new[] { new IoVec(g, 4096), new IoVec(g + 65536, 8192) }, 128, 24, cb, null)));
            Assert.True(await Io(desc, _rt.Main, (ch, cb) => ch.Read(desc, new[] { new IoVec(g + 512, 512) }, 0, 1, cb, null))); // a sector inside a page: PRP1 with an offset
            Assert.Equal(0L, bdev.BouncedIos);
            Assert.Equal(Read(g, 8192, 65536), DiskBytes(model, 0, 65536));

            // A sector-aligned but not dword-describable split across pages (PRPs need page-aligned inner boundaries): bounced and counted.
            Assert.True(await Io(desc, _rt.Main, (ch, cb) => ch.Write(desc, new[] { new IoVec(g + 512, 512), new IoVec(g + 16384 + 512, 512) }, 200, 2, cb, null)));
            Assert.Equal(1L, bdev.BouncedIos);
            Assert.Equal(1024L, bdev.BouncedBytes);
            Assert.Equal(Read(g, 16384 + 512, 512), DiskBytes(model, (200 * 512) + 512, 512));

            // Withdrawn (the guest's memory table changed): the same buffer is no longer a DMA target, it is bounced.
            guest.Dispose();
            var other = Alloc(8192);
            try
            {
                Assert.True(await Io(desc, _rt.Main, (ch, cb) => ch.Write(desc, new[] { new IoVec(other, 8192) }, 300, 16, cb, null)));
                Assert.Equal(2L, bdev.BouncedIos);
            }
            finally
            {
                Free(other);
            }

            var subsystems = new SubsystemRegistry();
            var rpc = new RpcRegistry();
            BdevRpc.Register(rpc, subsystems, _bdevs);
            Assert.True(rpc.TryGet("bdev_get_iostat", out var handler, out _));
            using var doc = JsonDocument.Parse("""{"name": "Nvme0n1"}""");
            var stat = (await _rt.Main.InvokeAsync(() => handler(new RpcRequest("bdev_get_iostat", doc.RootElement.Clone()))))!["bdevs"]![0]!;
            Assert.Equal(2L, (long)stat["driver_specific"]!["nvme_bounce"]!["bounced_ios"]!);
            Assert.Equal(1024L + 8192, (long)stat["driver_specific"]!["nvme_bounce"]!["bounced_bytes"]!);
            Assert.Equal(0, model.DmaFaults);
        }
        finally
        {
            guest.Dispose();
        }
    }

    [Fact]
    public async Task InInterruptModeTheChannelSleepsOnItsQueuesVectorAndStillCompletesIo()
    {
        WithInterrupts = true;
        await Attach();
        using var desc = _bdevs.Open("Nvme0n1", write: true);
        var r = _rt.Reactors[^1];
        var ch = await r.InvokeAsync(() => desc.GetIoChannel()); // held: the NVMe channel (and its queue pair) lives on
        nint buf = Alloc(8192);
        try
        {
            Assert.True(await Io(desc, r, (c, cb) => c.Write(desc, new[] { new IoVec(buf, 4096) }, 0, 8, cb, null)));
            var ctrl = (NvmeBdevController)_module.Controllers.Single();
            Assert.Equal(DeviceInterruptMode.Msix, ctrl.Controller.InterruptMode);
            Assert.Contains(ctrl.Controller.IoQueuePairs, q => q.InterruptFd is not null);

            long sleeps0 = r.SleepCount;
            r.SetMode(ReactorMode.Interrupt);
            await Task.Delay(600);
            long sleeps = r.SleepCount - sleeps0;

            // Asleep while idle: without a wake source the channel's poller would force a wake every 1 ms (~600 here);
            // with its interrupt eventfd only messages and the reactor's timed pollers (none here: ≤ 1 s) wake it.
            Assert.True(sleeps > 0 && r.IsInInterrupt, $"the reactor is not asleep ({sleeps} sleeps)");
            Assert.True(sleeps < 300, $"the reactor woke {sleeps} times in 600 ms: the NVMe poller has no wake source");
            for (int i = 0; i < 20; i++)
            {
                Assert.True(await Io(desc, r, (c, cb) => c.Read(desc, new[] { new IoVec(buf, 4096) }, (ulong)(i * 8), 8, cb, null)));
            }

            Assert.True(r.SleepCount > sleeps0 + sleeps, "no sleep between I/Os");
        }
        finally
        {
            r.SetMode(ReactorMode.Poll);
            await r.InvokeAsync(() => BdevDesc.PutIoChannel(ch));
            Free(buf);
        }
    }

    /// <summary>Starts one I/O with the model holding it, resets the controller over RPC once it is held, and returns the
    /// I/O's result (the channel retries what was in flight after the reset).</summary>
    private async Task<bool> HeldAcrossReset(NvmeControllerModel model, Func<Task<bool>> start)
    {
        model.HoldIo = true;
        var pending = start();
        for (int i = 0; i < 100 && model.HeldCount == 0; i++)
        {
            await Task.Delay(10);
        }

        Assert.Equal(1, model.HeldCount);
        model.HoldIo = false;
        await Call("bdev_nvme_reset_controller", """{"name":"Nvme0"}""");
        return await pending.WaitAsync(TimeSpan.FromSeconds(10));
    }

    [Fact]
    public async Task ResetRetriesIoThatWasInFlight()
    {
        await Attach();
        var model = _models[0];
        using var desc = _bdevs.Open("Nvme0n1", write: true);
        nint buf = Alloc(4096);
        try
        {
            Fill(buf, 4096, _ => 0x42);
            var iov = new[] { new IoVec(buf, 4096) };
            Assert.True(await HeldAcrossReset(model, () => Io(desc, _rt.Main, (ch, cb) => ch.Write(desc, iov, 40, 8, cb, null))));
            Assert.All(DiskBytes(model, 40 * 512, 4096), b => Assert.Equal(0x42, b));
            Assert.Equal(1, _module.Find("Nvme0")!.Controller.ResetCount);

            // A bdev-level reset goes through the same path.
            Assert.True(await Io(desc, _rt.Main, (ch, cb) => ch.Reset(desc, cb, null)));
            Assert.Equal(2, _module.Find("Nvme0")!.Controller.ResetCount);
        }
        finally
        {
            Free(buf);
        }
    }

    [Fact]
    public async Task ResetIsPolledSoTheReactorKeepsServingAndQueuedIoCompletesAfterIt()
    {
        CapTimeoutUnits = 20; // CAP.TO 10 s: the test holds the controller not ready for a second
        await Attach();
        var model = _models[0];
        var bc = _module.Find("Nvme0")!;
        using var desc = _bdevs.Open("Nvme0n1", write: false);
        nint buf = Alloc(512);
        try
        {
            Assert.True(await Io(desc, _rt.Main, (ch, cb) => ch.Read(desc, new[] { new IoVec(buf, 512) }, 0, 1, cb, null)));

            // The controller does not become ready again until the test says so; the reset poller reads CSTS meanwhile.
            var sw = Stopwatch.StartNew();
            model.ReadyDelayReads = int.MaxValue;
            _rt.Main.ResetMaxIteration();
            var reset = Call("bdev_nvme_reset_controller", """{"name":"Nvme0"}""");
            while (!bc.IsResetting && sw.Elapsed < TimeSpan.FromSeconds(5))
            {
                await Task.Delay(1);
            }

            // I/O submitted on the same reactor during the reset waits; the reactor still runs messages.
            var during = Io(desc, _rt.Main, (ch, cb) => ch.Read(desc, new[] { new IoVec(buf, 512) }, 0, 1, cb, null));
            for (int i = 0; i < 10; i++)
            {
                // Measured from the post to the moment the message runs on the reactor: the await's continuation
                // runs on the thread pool, which two busy-polling reactors on two cores can delay by seconds
                // (thread injection), and that is not the reactor's latency this test is about.
                long posted = Stopwatch.GetTimestamp();
                long ran = await _rt.Main.InvokeAsync(() => Stopwatch.GetTimestamp());
                double waitedMs = Stopwatch.GetElapsedTime(posted, ran).TotalMilliseconds;
                Assert.True(waitedMs < 500, $"a message waited {waitedMs:F0} ms on the reactor during the reset");
                await Task.Delay(100);
            }

            Assert.True(bc.IsResetting);
            Assert.False(during.IsCompleted);
            // The controller becomes ready at the next CSTS read.
            model.ReadyDelayReads = 1;
            model.ArmReady();
            await reset.WaitAsync(TimeSpan.FromSeconds(10));
            Assert.True(await during.WaitAsync(TimeSpan.FromSeconds(10)));
            Assert.Equal(1, bc.Controller.ResetCount);
            double maxMs = Ticks.ToMicroseconds(_rt.Main.MaxIterationTicks) / 1000;
            // A reset that waited for RDY on the reactor would show the whole >= 1 s; the bound leaves room for a loaded machine.
            Assert.True(sw.ElapsedMilliseconds >= 1000);
            Assert.True(maxMs < 500, $"the reactor's longest iteration during a {sw.ElapsedMilliseconds} ms reset was {maxMs} ms");
        }
        finally
        {
            Free(buf);
        }
    }

    [Fact]
    public async Task ResetOfAControllerThatNeverBecomesReadyFailsAfterCapTimeoutWithoutBlockingTheReactor()
    {
        await Attach();
        var model = _models[0];
        var bc = _module.Find("Nvme0")!;
        using var desc = _bdevs.Open("Nvme0n1", write: false);
        nint buf = Alloc(512);
        try
        {
            Assert.True(await Io(desc, _rt.Main, (ch, cb) => ch.Read(desc, new[] { new IoVec(buf, 512) }, 0, 1, cb, null)));
            model.NeverReady = true;
            _rt.Main.ResetMaxIteration();
            var sw = Stopwatch.StartNew();
            var reset = Call("bdev_nvme_reset_controller", """{"name":"Nvme0"}""");
            var pending = Io(desc, _rt.Main, (ch, cb) => ch.Read(desc, new[] { new IoVec(buf, 512) }, 0, 1, cb, null));
            var t = Stopwatch.StartNew();
            Assert.Equal(7, await _rt.Main.InvokeAsync(() => 7));
            Assert.True(t.ElapsedMilliseconds < 500);
            var e = await Assert.ThrowsAsync<RpcException>(() => reset.WaitAsync(TimeSpan.FromSeconds(10)));
            Assert.Equal(-5, e.Code);
            var listed = (JsonArray)(await Call("bdev_nvme_get_controllers", """{"name":"Nvme0"}"""))!;
            Assert.Equal("failed", (string?)listed[0]!["ctrlrs"]![0]!["state"]); // not "enabled" after a failed reset
            Assert.True(sw.Elapsed >= bc.Controller.Cap.Timeout * 0.9, $"failed after {sw.ElapsedMilliseconds} ms, before CAP.TO");
            Assert.False(await pending.WaitAsync(TimeSpan.FromSeconds(10))); // I/O of a controller that failed its reset fails
            double maxMs = Ticks.ToMicroseconds(_rt.Main.MaxIterationTicks) / 1000;
            Assert.True(maxMs < 500, $"the reactor's longest iteration during the {sw.ElapsedMilliseconds} ms reset was {maxMs} ms"); // blocking: >= CAP.TO (1 s)
            model.NeverReady = false;
        }
        finally
        {
            Free(buf);
        }
    }

    [Fact]
    public async Task ResetControllerRpcParams()
    {
        await Attach();
        ushort cntlid = _module.Find("Nvme0")!.Controller.Data.ControllerId;
        Assert.True((await Call("bdev_nvme_reset_controller", $$"""{"name":"Nvme0","cntlid":{{cntlid}}}"""))!.GetValue<bool>());
        Assert.Equal(-19, await CallError("bdev_nvme_reset_controller", $$"""{"name":"Nvme0","cntlid":{{cntlid + 1}}}"""));
        Assert.Equal(-19, await CallError("bdev_nvme_reset_controller", """{"name":"Nope"}"""));
        Assert.Equal(-32603, await CallError("bdev_nvme_reset_controller", "{}"));
        Assert.Equal(-32603, await CallError("bdev_nvme_reset_controller", """{"name":"Nvme0","bogus":1}"""));
        Assert.Equal(1, _module.Find("Nvme0")!.Controller.ResetCount);
    }

    [Fact]
    public async Task DetachRemovesBdevsAndQueues()
    {
        await Attach();
        var model = _models[0];
        using (var desc = _bdevs.Open("Nvme0n1", write: false))
        {
            nint buf = Alloc(512);
            Assert.True(await Io(desc, _rt.Main, (ch, cb) => ch.Read(desc, new[] { new IoVec(buf, 512) }, 0, 1, cb, null)));
            Free(buf);
        }

        Assert.Equal(JsonValue.Create(true)!.ToJsonString(), (await Call("bdev_nvme_detach_controller", """{"name":"Nvme0"}"""))!.ToJsonString());
        Assert.Null(_bdevs.Find("Nvme0n1"));
        Assert.Empty((await Call("bdev_nvme_get_controllers", "{}"))!.AsArray());
        Assert.Equal(0, model.IoQueuesLive);
        Assert.Equal(0u, model.Read32(NvmeReg.Cc) & 1); // disabled on detach
    }

    /// <summary>
    /// The channel memory an attach reserves (a queue pair and bounce buffers per reactor, mapped in the space every
    /// controller shares) goes back at detach: attach, detach, attach again maps no more than the first attach, and
    /// after a detach nothing of the controller stays mapped.
    /// </summary>
    [Fact]
    public async Task AttachDetachAttachDoesNotGrowTheDmaReserve()
    {
        ulong before = _space.AllocatedBytes;
        int regionsBefore = _space.RegionCount;
        var attached = new List<ulong>();
        for (int round = 0; round < 2; round++)
        {
            await Attach();
            using (var desc = _bdevs.Open("Nvme0n1", write: false))
            {
                nint buf = Alloc(512);
                try
                {
                    Assert.True(await Io(desc, _rt.Main, (ch, cb) => ch.Read(desc, new[] { new IoVec(buf, 512) }, 0, 1, cb, null)));
                }
                finally
                {
                    Free(buf);
                }
            }

            attached.Add(_space.AllocatedBytes);
            Assert.True(attached[round] > before, "the attach mapped nothing: the test sees no reserve");
            Assert.Equal(JsonValue.Create(true)!.ToJsonString(), (await Call("bdev_nvme_detach_controller", """{"name":"Nvme0"}"""))!.ToJsonString());

            // The channels close on their reactors after the detach returns: wait (bounded) for the last one.
            var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(10);
            while ((_space.AllocatedBytes != before || _space.RegionCount != regionsBefore) && DateTime.UtcNow < deadline)
            {
                await Task.Delay(20);
            }

            Assert.Equal(before, _space.AllocatedBytes);
            Assert.Equal(regionsBefore, _space.RegionCount);
        }

        Assert.Equal(attached[0], attached[1]);
    }

    /// <summary>bdev_nvme_set_options: timeout_us 50 ms (checked once a second), admin commands 5 s, the action.</summary>
    private Task<JsonNode?> SetTimeouts(string action) =>
        Call("bdev_nvme_set_options", $$"""{"timeout_us":50000,"timeout_admin_us":5000000,"action_on_timeout":"{{action}}"}""");

    [Fact]
    public async Task TimedOutIoWithActionNoneKeepsWaiting()
    {
        await SetTimeouts("none");
        await Attach();
        var model = _models[0];
        using var desc = _bdevs.Open("Nvme0n1", write: false);
        nint buf = Alloc(512);
        try
        {
            model.HoldIo = true;
            var pending = Io(desc, _rt.Main, (ch, cb) => ch.Read(desc, new[] { new IoVec(buf, 512) }, 0, 1, cb, null));
            await Task.Delay(2500); // two timeout checks at least
            Assert.False(pending.IsCompleted);
            Assert.Equal(1, model.HeldCount);
            Assert.DoesNotContain(NvmeAdminOpcode.Abort, model.AdminOpcodes);
            Assert.Equal(0, _module.Find("Nvme0")!.Controller.ResetCount);
            model.HoldIo = false;
            Assert.Equal(1, model.ReleaseHeld());
            Assert.True(await pending.WaitAsync(TimeSpan.FromSeconds(10)));
        }
        finally
        {
            Free(buf);
        }
    }

    [Fact]
    public async Task TimedOutIoWithActionResetResetsWithoutAbortAndIsRetried()
    {
        await SetTimeouts("reset");
        await Attach();
        var model = _models[0];
        using var desc = _bdevs.Open("Nvme0n1", write: true);
        nint buf = Alloc(512);
        try
        {
            Fill(buf, 512, _ => 0x5A);
            model.HoldIo = true;
            var pending = Io(desc, _rt.Main, (ch, cb) => ch.Write(desc, new[] { new IoVec(buf, 512) }, 9, 1, cb, null));
            var ctrl = _module.Find("Nvme0")!.Controller;
            var sw = Stopwatch.StartNew();
            while (ctrl.ResetCount == 0 && sw.Elapsed < TimeSpan.FromSeconds(10))
            {
                await Task.Delay(5);
            }

            Assert.True(ctrl.ResetCount >= 1, $"no reset after {sw.Elapsed}");
            Assert.DoesNotContain(NvmeAdminOpcode.Abort, model.AdminOpcodes);
            model.HoldIo = false; // a retry held again times out again: the next reset's retry writes
            Assert.True(await pending.WaitAsync(TimeSpan.FromSeconds(10)));
            Assert.All(DiskBytes(model, 9 * 512, 512), b => Assert.Equal(0x5A, b));
        }
        finally
        {
            Free(buf);
        }
    }

    [Fact]
    public async Task TimedOutIoIsAbortedAndFailsAsAborted()
    {
        await SetTimeouts("abort");
        await Attach();
        var model = _models[0];
        using var desc = _bdevs.Open("Nvme0n1", write: false);
        nint buf = Alloc(512);
        try
        {
            model.HoldIo = true;
            var t = Stopwatch.StartNew();
            bool ok = await Io(desc, _rt.Main, (ch, cb) => ch.Read(desc, new[] { new IoVec(buf, 512) }, 0, 1, cb, null));
            Assert.False(ok);
            Assert.Equal(0, model.HeldCount); // the abort completed it
            Assert.Contains(NvmeAdminOpcode.Abort, model.AdminOpcodes);
            Assert.Equal(0, _module.Find("Nvme0")!.Controller.ResetCount);
            Assert.True(t.Elapsed < TimeSpan.FromSeconds(5), $"took {t.Elapsed}");
        }
        finally
        {
            Free(buf);
        }
    }

    [Fact]
    public async Task TimeoutWhoseAbortFailsEscalatesToResetAndTheIoIsRetried()
    {
        await SetTimeouts("abort");
        await Attach();
        var model = _models[0];
        using var desc = _bdevs.Open("Nvme0n1", write: true);
        nint buf = Alloc(512);
        try
        {
            Fill(buf, 512, _ => 0x77);
            model.HoldIo = true;
            model.IgnoreAborts = true;
            var pending = Io(desc, _rt.Main, (ch, cb) => ch.Write(desc, new[] { new IoVec(buf, 512) }, 5, 1, cb, null));
            var ctrl = _module.Find("Nvme0")!.Controller;
            var sw = Stopwatch.StartNew();
            while (ctrl.ResetCount == 0 && sw.Elapsed < TimeSpan.FromSeconds(10))
            {
                await Task.Delay(5);
            }

            // Timeout (checked once a second) -> abort finds nothing -> controller reset -> the write is retried.
            Assert.True(ctrl.ResetCount >= 1, $"no reset after {sw.Elapsed}");
            Assert.Contains(NvmeAdminOpcode.Abort, model.AdminOpcodes);
            model.IgnoreAborts = false;
            model.HoldIo = false;
            model.ReleaseHeld(); // a retry may already be held again
            Assert.True(await pending.WaitAsync(TimeSpan.FromSeconds(10)));
            Assert.All(DiskBytes(model, 5 * 512, 512), b => Assert.Equal(0x77, b));
        }
        finally
        {
            Free(buf);
        }
    }

    [Fact]
    public async Task FatalControllerStatusTriggersAResetAndIoWorksAfterwards()
    {
        await Attach();
        var model = _models[0];
        var ctrl = _module.Find("Nvme0")!.Controller;
        model.InjectFatal();
        var sw = Stopwatch.StartNew();
        while (ctrl.ResetCount == 0 && sw.Elapsed < TimeSpan.FromSeconds(10))
        {
            await Task.Delay(5);
        }

        Assert.Equal(1, ctrl.ResetCount);
        Assert.Equal(NvmeHealth.Ok, ctrl.CheckHealth());
        using var desc = _bdevs.Open("Nvme0n1", write: false);
        nint buf = Alloc(512);
        Assert.True(await Io(desc, _rt.Main, (ch, cb) => ch.Read(desc, new[] { new IoVec(buf, 512) }, 0, 1, cb, null)));
        Free(buf);
    }
}
