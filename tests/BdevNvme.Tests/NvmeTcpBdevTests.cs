using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Nodes;
using Microsoft.Extensions.Logging.Abstractions;
using VhostBackend.Bdev;
using VhostBackend.Nvme.Tests;
using VhostBackend.Platform;
using VhostBackend.Reactors;
using VhostBackend.Rpc;
using Xunit;

namespace VhostBackend.BdevNvme.Tests;

/// <summary>The module's NVMe/TCP controllers against the in-process NVMe/TCP target MODEL on loopback (no real target).</summary>
public sealed class NvmeTcpBdevTests : IAsyncLifetime
{
    private readonly NvmeTcpTargetModel _target = new(blockSize: 512, blocks: 4096, inCapsule: 8192, maxH2CData: 8192);
    private readonly BdevManager _bdevs = new();
    private readonly RpcRegistry _rpc = new();
    private readonly AlignedBuffer _buf = new(1 << 20);
    private ReactorRuntime _rt = null!;
    private NvmeBdevModule _module = null!;

    public Task InitializeAsync()
    {
        var online = CpuSet.Online().Cores;
        _rt = new ReactorRuntime(CpuSet.Of(online.Take(2).ToArray()), new ReactorOptions { Mode = ReactorMode.Poll, PinThreads = false });
        _rt.Start();
        _module = new NvmeBdevModule();
        _bdevs.AddModule(_module);
        _module.Init(new BdevModuleContext(_bdevs, _rt, _rpc, new SubsystemRegistry(), NullLoggerFactory.Instance));
        return Task.CompletedTask;
    }

    public async Task DisposeAsync()
    {
        _target.Refuse = false;
        foreach (var c in _module.Controllers)
        {
            await _rt.Main.InvokeAsync(() => _module.DetachAsync(c.CtrlName).ContinueWith(_ => true));
        }

        await _rt.DisposeAsync();
        _target.Dispose();
        _buf.Dispose();
    }

    private async Task<JsonNode?> Call(string method, string json)
    {
        Assert.True(_rpc.TryGet(method, out var handler, out _));
        using var doc = JsonDocument.Parse(json);
        var req = new RpcRequest(method, doc.RootElement.Clone());
        return await _rt.Main.InvokeAsync(() => handler(req));
    }

    private async Task<RpcException> CallError(string method, string json) => await Assert.ThrowsAsync<RpcException>(() => Call(method, json));

    private string AttachJson(string extra = "") =>
        $$"""{"name":"Tcp0","trtype":"TCP","adrfam":"IPv4","traddr":"127.0.0.1","trsvcid":"{{_target.Port}}","subnqn":"{{NvmeTcpTargetModel.SubNqn}}"{{extra}}}""";

    /// <summary>Submits on <paramref name="r"/> and waits for the completion (or times out: null).</summary>
    private async Task<bool?> Io(BdevDesc desc, Reactor r, Func<BdevChannel, BdevIoCompletion, int> submit, TimeSpan? wait = null)
    {
        var tcs = new TaskCompletionSource<bool>(TaskCreationOptions.RunContinuationsAsynchronously);
        var ch = await r.InvokeAsync(() =>
        {
            var c = desc.GetIoChannel();
            Assert.Equal(0, submit(c, (io, ok, _) => tcs.SetResult(ok)));
            return c;
        });
        try
        {
            return await tcs.Task.WaitAsync(wait ?? TimeSpan.FromSeconds(10));
        }
        catch (TimeoutException)
        {
            return null;
        }
        finally
        {
            if (tcs.Task.IsCompleted)
            {
                await r.InvokeAsync(() =>
                {
                    BdevDesc.PutIoChannel(ch);
                    return true;
                });
            }
        }
    }

    [Fact]
    public async Task AttachOverTcpWritesReadsAndDescribesTheController()
    {
        var names = await Call("bdev_nvme_attach_controller", AttachJson(""","hdgst":true,"ddgst":true"""));
        Assert.Equal("[\"Tcp0n1\"]", names!.ToJsonString());
        var bdev = Assert.IsType<NvmeBdev>(_bdevs.Find("Tcp0n1"));
        Assert.Equal(4096UL, bdev.BlockCount);

        var ctrls = await Call("bdev_nvme_get_controllers", """{"name":"Tcp0"}""");
        var c0 = ctrls![0]!["ctrlrs"]![0]!;
        Assert.Equal("enabled", c0["state"]!.GetValue<string>());
        Assert.Equal(
            $$"""{"trtype":"TCP","adrfam":"IPv4","traddr":"127.0.0.1","trsvcid":"{{_target.Port}}","subnqn":"{{NvmeTcpTargetModel.SubNqn}}"}""",
            c0["trid"]!.ToJsonString());
        Assert.StartsWith("nqn.2014-08.org.nvmexpress:uuid:", c0["host"]!["nqn"]!.GetValue<string>(), StringComparison.Ordinal);
        Assert.True(c0["hdgst"]!.GetValue<bool>());
        Assert.Equal("TCP", bdev.DriverSpecific()["nvme"]![0]!["trid"]!["trtype"]!.GetValue<string>());

        var config = new JsonArray();
        _module.WriteConfig(config);
        var p = Assert.Single(config)!["params"]!;
        Assert.Equal("TCP", p["trtype"]!.GetValue<string>());
        Assert.True(p["ddgst"]!.GetValue<bool>());
        Assert.Equal(0, p["ctrlr_loss_timeout_sec"]!.GetValue<int>());

        using var desc = _bdevs.Open("Tcp0n1", write: true);
        var rnd = new Random(3);
        foreach (var reactor in _rt.Reactors)
        {
            foreach (int blocks in new[] { 8, 64, 256 })
            {
                rnd.NextBytes(_buf.AsSpan(0, blocks * 512));
                var expect = _buf.AsSpan(0, blocks * 512).ToArray();
                var iov = new[] { _buf.ToIoVec(0, (nuint)(blocks * 512)) };
                Assert.True(await Io(desc, reactor, (ch, cb) => ch.Write(desc, iov, 100, (ulong)blocks, cb, null)));
                Assert.Equal(expect, _target.Disk.AsSpan(100 * 512, blocks * 512).ToArray());
                _buf.AsSpan(0, blocks * 512).Clear();
                Assert.True(await Io(desc, reactor, (ch, cb) => ch.Read(desc, iov, 100, (ulong)blocks, cb, null)));
                Assert.Equal(expect, _buf.AsSpan(0, blocks * 512).ToArray());
            }
        }

        Assert.True(await Io(desc, _rt.Main, (ch, cb) => ch.Flush(desc, 0, 4096, cb, null)) is not null);

        // Closed first: a descriptor left open (this test does not answer the remove event) held the detach for the
        // bdev layer's 30 s unregister timeout, and the bdev was then leaked, not destructed.
        desc.Dispose();
        var sw = Stopwatch.StartNew();
        await Call("bdev_nvme_detach_controller", """{"name":"Tcp0","trtype":"TCP","traddr":"127.0.0.1"}""");
        Assert.Null(_bdevs.Find("Tcp0n1"));
        Assert.True(sw.Elapsed < TimeSpan.FromSeconds(20), $"detach took {sw.Elapsed}");
    }

    [Fact]
    public async Task ParametersThatDoNotApplyOrAreNotImplementedAreErrorsNamingThem()
    {
        async Task Expect(string json, string param, int code = -22, string method = "bdev_nvme_attach_controller")
        {
            var e = await CallError(method, json);
            Assert.Equal(code, e.Code);
            Assert.Contains(param, e.Message, StringComparison.Ordinal);
        }

        // PCIe no longer ignores the fabrics parameters.
        await Expect("""{"name":"N","trtype":"PCIe","traddr":"0000:00:04.0","hdgst":true}""", "hdgst");
        await Expect("""{"name":"N","trtype":"PCIe","traddr":"0000:00:04.0","subnqn":"nqn.x"}""", "subnqn");
        await Expect("""{"name":"N","trtype":"PCIe","traddr":"0000:00:04.0","ctrlr_loss_timeout_sec":5}""", "ctrlr_loss_timeout_sec");
        await Expect("""{"name":"N","trtype":"PCIe","traddr":"0000:00:04.0","priority":"1"}""", "priority");
        await Expect("""{"name":"N","trtype":"PCIe","traddr":"0000:00:04.0","prchk_guard":true}""", "prchk_guard");
        await Expect("""{"name":"N","trtype":"PCIe","traddr":"0000:00:04.0","multipath":"failover"}""", "multipath");

        // TCP.
        await Expect("""{"name":"N","trtype":"RDMA","traddr":"1.2.3.4"}""", "trtype");
        await Expect("""{"name":"N","trtype":"TCP","traddr":"not-an-ip","subnqn":"nqn.x"}""", "traddr");
        await Expect("""{"name":"N","trtype":"TCP","traddr":"127.0.0.1"}""", "subnqn");
        await Expect("""{"name":"N","trtype":"TCP","traddr":"127.0.0.1","adrfam":"IPv6","subnqn":"nqn.x"}""", "adrfam");
        await Expect("""{"name":"N","trtype":"TCP","traddr":"127.0.0.1","trsvcid":"99999","subnqn":"nqn.x"}""", "trsvcid");
        await Expect("""{"name":"N","trtype":"TCP","traddr":"127.0.0.1","subnqn":"nqn.x","psk":"NVMeTLSkey-1:01:abc"}""", "psk");
        await Expect("""{"name":"N","trtype":"TCP","traddr":"127.0.0.1","subnqn":"nqn.x","hostaddr":"::1"}""", "hostaddr");
        await Expect("""{"name":"N","trtype":"TCP","traddr":"127.0.0.1","subnqn":"nqn.x","ctrlr_loss_timeout_sec":2,"reconnect_delay_sec":5}""", "reconnect_delay_sec");
        await Expect("""{"name":"N","trtype":"TCP","traddr":"127.0.0.1","subnqn":"nqn.x","ctrlr_loss_timeout_sec":-2}""", "ctrlr_loss_timeout_sec");
        await Expect("""{"name":"N","trtype":"TCP","traddr":"127.0.0.1","subnqn":"nqn.x","ctrlr_loss_timeout_sec":10,"reconnect_delay_sec":2,"fast_io_fail_timeout_sec":20}""", "fast_io_fail_timeout_sec");
        await Expect("""{"name":"N","trtype":"TCP","traddr":"127.0.0.1","trsvcid":"1","subnqn":"nqn.x"}""", "Failed to attach", -19); // nothing listens

        // bdev_nvme_set_options: unimplemented fields named; refused once a controller exists.
        await Expect("""{"transport_tos":3}""", "transport_tos", method: "bdev_nvme_set_options");
        await Expect("""{"action_on_timeout":"retry"}""", "action_on_timeout", method: "bdev_nvme_set_options");
        await Expect("""{"ctrlr_loss_timeout_sec":0,"reconnect_delay_sec":1}""", "reconnect_delay_sec", method: "bdev_nvme_set_options");
        Assert.True((await Call("bdev_nvme_set_options", """{"keep_alive_timeout_ms":5000,"ctrlr_loss_timeout_sec":-1,"reconnect_delay_sec":1}"""))!.GetValue<bool>());
        await Call("bdev_nvme_attach_controller", AttachJson());
        Assert.Equal(-1, (await CallError("bdev_nvme_set_options", """{"keep_alive_timeout_ms":6000}""")).Code);

        // The module defaults apply to the controller and save_config writes them first.
        var config = new JsonArray();
        _module.WriteConfig(config);
        Assert.Equal("bdev_nvme_set_options", config[0]!["method"]!.GetValue<string>());
        Assert.Equal(-1, config[1]!["params"]!["ctrlr_loss_timeout_sec"]!.GetValue<int>());
        Assert.Equal(-17, (await CallError("bdev_nvme_attach_controller", AttachJson().Replace("Tcp0", "Tcp1", StringComparison.Ordinal))).Code); // same trid
    }

    [Fact]
    public async Task IoQueuedDuringAnOutageCompletesAfterTheReconnect()
    {
        await Call("bdev_nvme_attach_controller", AttachJson(""","ctrlr_loss_timeout_sec":30,"reconnect_delay_sec":1,"fast_io_fail_timeout_sec":20"""));
        using var desc = _bdevs.Open("Tcp0n1", write: true);
        var iov = new[] { _buf.ToIoVec(0, 4096) };
        Assert.True(await Io(desc, _rt.Main, (ch, cb) => ch.Read(desc, iov, 0, 8, cb, null)));

        _target.Refuse = true;
        _target.DropConnections();
        var tcs = new TaskCompletionSource<bool>(TaskCreationOptions.RunContinuationsAsynchronously);
        _target.Disk.AsSpan(0, 4096).Fill(0x77);
        await _rt.Main.InvokeAsync(() =>
        {
            var ch = desc.GetIoChannel();
            Assert.Equal(0, ch.Read(desc, iov, 0, 8, (io, ok, _) => tcs.SetResult(ok), null));
            return true;
        });
        await Task.Delay(2500);
        Assert.False(tcs.Task.IsCompleted, "I/O completed while the target was down");
        var st = await Call("bdev_nvme_get_controllers", """{"name":"Tcp0"}""");
        Assert.Equal("resetting", st![0]!["ctrlrs"]![0]!["state"]!.GetValue<string>());

        _target.Refuse = false;
        Assert.True(await tcs.Task.WaitAsync(TimeSpan.FromSeconds(10)));
        Assert.True(_buf.AsSpan(0, 4096).IndexOfAnyExcept((byte)0x77) < 0);
        st = await Call("bdev_nvme_get_controllers", """{"name":"Tcp0"}""");
        Assert.Equal("enabled", st![0]!["ctrlrs"]![0]!["state"]!.GetValue<string>());
        Assert.True(st[0]!["ctrlrs"]![0]!["reset_count"]!.GetValue<int>() >= 1);
    }

    [Fact]
    public async Task FastIoFailFailsIoAndCtrlrLossGivesTheControllerUp()
    {
        await Call("bdev_nvme_attach_controller", AttachJson(""","ctrlr_loss_timeout_sec":4,"reconnect_delay_sec":1,"fast_io_fail_timeout_sec":1"""));
        using var desc = _bdevs.Open("Tcp0n1", write: true);
        var iov = new[] { _buf.ToIoVec(0, 4096) };
        Assert.True(await Io(desc, _rt.Main, (ch, cb) => ch.Read(desc, iov, 0, 8, cb, null)));
        _target.Refuse = true;
        _target.DropConnections();
        var sw = Stopwatch.StartNew();
        var r = await Io(desc, _rt.Main, (ch, cb) => ch.Read(desc, iov, 0, 8, cb, null), TimeSpan.FromSeconds(10));
        Assert.False(r); // failed (not timed out)
        Assert.InRange(sw.Elapsed.TotalSeconds, 0.5, 5);

        // After ctrlr_loss_timeout_sec the controller is deleted (SPDK's behaviour) and its bdev unregistered.
        desc.Dispose();
        var deadline = DateTime.UtcNow.AddSeconds(15);
        while (_module.FindController("Tcp0") is not null && DateTime.UtcNow < deadline)
        {
            await Task.Delay(100);
        }

        Assert.Null(_module.FindController("Tcp0"));
        Assert.Null(_bdevs.Find("Tcp0n1"));
    }

    [Fact]
    public async Task ResetControllerReconnects()
    {
        await Call("bdev_nvme_attach_controller", AttachJson());
        using var desc = _bdevs.Open("Tcp0n1", write: true);
        var iov = new[] { _buf.ToIoVec(0, 4096) };
        Assert.True(await Io(desc, _rt.Reactors[1], (ch, cb) => ch.Read(desc, iov, 0, 8, cb, null)));
        int connects = _target.Connects;
        Assert.True((await Call("bdev_nvme_reset_controller", """{"name":"Tcp0"}"""))!.GetValue<bool>());
        Assert.True(_target.Connects >= connects + 1);
        Assert.True(await Io(desc, _rt.Reactors[1], (ch, cb) => ch.Read(desc, iov, 0, 8, cb, null)));
    }

    [Fact]
    public async Task DiscoveryAttachesTheListedSubsystemsAndStopDetachesThem()
    {
        // The model answers the discovery log with its own subsystem, a referral and the discovery subsystem.
        Assert.True((await Call("bdev_nvme_start_discovery", $$"""{"name":"disc","trtype":"TCP","adrfam":"IPv4","traddr":"127.0.0.1","trsvcid":"{{_target.Port}}","wait_for_attach":true}"""))!.GetValue<bool>());
        Assert.NotNull(_module.FindController("disc0"));
        Assert.Null(_module.FindController("disc1")); // only the NVM subsystem entry is attached
        Assert.IsType<NvmeBdev>(_bdevs.Find("disc0n1"));

        var info = await Call("bdev_nvme_get_discovery_info", "{}");
        Assert.Equal("disc", info![0]!["name"]!.GetValue<string>());
        Assert.Equal("nqn.2014-08.org.nvmexpress.discovery", info[0]!["trid"]!["subnqn"]!.GetValue<string>());
        Assert.Equal("[\"disc0\"]", info[0]!["attached"]!.ToJsonString());

        // save_config writes the discovery service, not the controller it attached.
        var config = new JsonArray();
        _module.WriteConfig(config);
        Assert.Equal("bdev_nvme_start_discovery", Assert.Single(config)!["method"]!.GetValue<string>());

        Assert.Equal(-17, (await CallError("bdev_nvme_start_discovery", $$"""{"name":"disc","trtype":"TCP","traddr":"127.0.0.1","trsvcid":"{{_target.Port}}"}""")).Code);
        Assert.Equal(-22, (await CallError("bdev_nvme_start_discovery", """{"name":"d2","trtype":"RDMA","traddr":"127.0.0.1"}""")).Code);
        // attach_timeout_ms: an unreachable discovery controller is retried for that long, then ETIMEDOUT.
        var sw = Stopwatch.StartNew();
        Assert.Equal(-110, (await CallError("bdev_nvme_start_discovery", """{"name":"d2","trtype":"TCP","traddr":"127.0.0.1","trsvcid":"1","attach_timeout_ms":600}""")).Code);
        Assert.InRange(sw.Elapsed.TotalSeconds, 0.5, 10);
        Assert.DoesNotContain((await Call("bdev_nvme_get_discovery_info", "{}"))!.AsArray(), d => d!["name"]!.GetValue<string>() == "d2");
        Assert.Equal(-19, (await CallError("bdev_nvme_start_discovery", """{"name":"d3","trtype":"TCP","traddr":"127.0.0.1","trsvcid":"1"}""")).Code);

        Assert.True((await Call("bdev_nvme_stop_discovery", """{"name":"disc"}"""))!.GetValue<bool>());
        Assert.Null(_module.FindController("disc0"));
        Assert.Null(_bdevs.Find("disc0n1"));
        Assert.Empty((await Call("bdev_nvme_get_discovery_info", "{}"))!.AsArray());
        Assert.Equal(-19, (await CallError("bdev_nvme_stop_discovery", """{"name":"disc"}""")).Code);
    }

    /// <summary>Submits a read on the main reactor; the task gives its bdev status once it completes.</summary>
    private async Task<Task<BdevIoStatus>> StartRead(BdevDesc desc, IoVec[] iov, ulong lba, ulong blocks)
    {
        var tcs = new TaskCompletionSource<BdevIoStatus>(TaskCreationOptions.RunContinuationsAsynchronously);
        await _rt.Main.InvokeAsync(() =>
        {
            var ch = desc.GetIoChannel();
            Assert.Equal(0, ch.Read(desc, iov, lba, blocks, (io, ok, _) =>
            {
                tcs.SetResult(io.Status);
                BdevDesc.PutIoChannel(ch);
            }, null));
            return true;
        });
        return tcs.Task;
    }

    private Task<JsonNode?> SetTimeouts(string action) =>
        Call("bdev_nvme_set_options", $$"""{"timeout_us":300000,"timeout_admin_us":5000000,"action_on_timeout":"{{action}}"}""");

    private NvmeTcpBdevController Tcp0 => Assert.IsType<NvmeTcpBdevController>(_module.FindController("Tcp0"));

    [Fact]
    public async Task TimedOutReadIsAbortedOverTcpAndFailsAsAborted()
    {
        await SetTimeouts("abort");
        await Call("bdev_nvme_attach_controller", AttachJson());
        using var desc = _bdevs.Open("Tcp0n1", write: false);
        var iov = new[] { _buf.ToIoVec(0, 4096) };
        _target.HoldReads = true;
        var read = await StartRead(desc, iov, 0, 8);
        Assert.Equal(BdevIoStatus.Aborted, await read.WaitAsync(TimeSpan.FromSeconds(10)));
        Assert.Equal(1, _target.AbortsReceived);
        Assert.Equal(0, _target.HeldCount);
        Assert.Equal(0, Tcp0.ReconnectCount); // the abort sufficed: no reconnect

        _target.HoldReads = false;
        _target.Disk.AsSpan(0, 4096).Fill(0x31);
        Assert.Equal(BdevIoStatus.Success, await (await StartRead(desc, iov, 0, 8)).WaitAsync(TimeSpan.FromSeconds(10)));
        Assert.Equal(0x31, _buf.AsSpan(4095, 1)[0]);
    }

    [Fact]
    public Task TimeoutWhoseAbortFindsNothingReconnectsAndTheReadIsRetried() =>
        TimeoutReconnectsAndTheReadIsRetried("abort", ignoreAborts: true); // Linux nvmet answers every Abort "not aborted"

    [Fact]
    public Task TimeoutActionResetReconnectsWithoutAbort() => TimeoutReconnectsAndTheReadIsRetried("reset", ignoreAborts: false);

    /// <summary>A held read times out; the action ends in a reconnect (SPDK's reset of a fabrics controller) and the read is sent again.</summary>
    private async Task TimeoutReconnectsAndTheReadIsRetried(string action, bool ignoreAborts)
    {
        await SetTimeouts(action);
        await Call("bdev_nvme_attach_controller", AttachJson(""","ctrlr_loss_timeout_sec":30,"reconnect_delay_sec":1"""));
        using var desc = _bdevs.Open("Tcp0n1", write: false);
        var iov = new[] { _buf.ToIoVec(0, 4096) };
        _target.Disk.AsSpan(0, 4096).Fill(0x32);
        _target.HoldReads = true;
        _target.IgnoreAborts = ignoreAborts;
        var read = await StartRead(desc, iov, 0, 8);
        await WaitFor(() => Tcp0.ReconnectCount >= 1, "a reconnect", 15);
        Assert.Equal(action == "abort", _target.AbortsReceived >= 1);
        _target.HoldReads = false;
        _target.ReleaseHeld(); // the retry may already be held on the new connection
        Assert.Equal(BdevIoStatus.Success, await read.WaitAsync(TimeSpan.FromSeconds(15)));
        Assert.Equal(0x32, _buf.AsSpan(4095, 1)[0]);
    }

    [Fact]
    public async Task TimeoutActionNoneOnlyWaits()
    {
        await SetTimeouts("none");
        await Call("bdev_nvme_attach_controller", AttachJson());
        using var desc = _bdevs.Open("Tcp0n1", write: false);
        var iov = new[] { _buf.ToIoVec(0, 4096) };
        _target.Disk.AsSpan(0, 4096).Fill(0x34);
        _target.HoldReads = true;
        var read = await StartRead(desc, iov, 0, 8);
        await Task.Delay(2500); // two timeout checks at least
        Assert.False(read.IsCompleted);
        Assert.Equal(0, _target.AbortsReceived);
        Assert.Equal(0, Tcp0.ReconnectCount);
        _target.HoldReads = false;
        Assert.Equal(1, _target.ReleaseHeld());
        Assert.Equal(BdevIoStatus.Success, await read.WaitAsync(TimeSpan.FromSeconds(10)));
        Assert.Equal(0x34, _buf.AsSpan(4095, 1)[0]);
    }

    private async Task WaitFor(Func<bool> cond, string what, int seconds = 10)
    {
        var sw = Stopwatch.StartNew();
        while (!cond())
        {
            Assert.True(sw.Elapsed < TimeSpan.FromSeconds(seconds), $"timed out waiting for {what}");
            await Task.Delay(10);
        }
    }

    [Fact]
    public async Task NamespaceAttributeNoticeAddsResizesAndRemovesBdevs()
    {
        await Call("bdev_nvme_attach_controller", AttachJson());
        await WaitFor(() => _target.PendingAers == 4, "the AERs to be posted (AERL + 1)");
        Assert.Null(_bdevs.Find("Tcp0n2"));

        // A namespace appears: the notice makes the host read the changed list and register Tcp0n2.
        _target.NamespaceCount = 2;
        Assert.True(_target.RaiseNamespaceChanged());
        await WaitFor(() => _bdevs.Find("Tcp0n2") is not null, "Tcp0n2");
        Assert.True(_target.ChangedNsLogReads >= 1); // the log read re-arms the notice
        Assert.Equal(["Tcp0n1", "Tcp0n2"], Tcp0.Bdevs.Select(b => b.Name).Order().ToArray());
        await WaitFor(() => _target.PendingAers == 4, "the AER to be posted again");

        // Namespace 1 grows: the bdev is resized and an open descriptor hears it.
        var resized = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        using var desc = _bdevs.Open("Tcp0n1", write: false, (e, _, _) =>
        {
            if (e == BdevEventType.Resize)
            {
                resized.TrySetResult();
            }
        });
        Interlocked.Exchange(ref _target.ReportedBlocks, 8192);
        Assert.True(_target.RaiseNamespaceChanged());
        await resized.Task.WaitAsync(TimeSpan.FromSeconds(10));
        Assert.Equal(8192UL, _bdevs.Find("Tcp0n1")!.BlockCount);
        Assert.Equal(8192UL, ((NvmeBdev)_bdevs.Find("Tcp0n2")!).BlockCount);

        // Namespace 2 goes away: its bdev is unregistered; I/O on namespace 1 still works.
        _target.NamespaceCount = 1;
        Assert.True(_target.RaiseNamespaceChanged());
        await WaitFor(() => _bdevs.Find("Tcp0n2") is null, "Tcp0n2 to be unregistered");
        Assert.Equal(["Tcp0n1"], Tcp0.Bdevs.Select(b => b.Name).ToArray());
        Assert.Equal(BdevIoStatus.Success, await (await StartRead(desc, new[] { _buf.ToIoVec(0, 4096) }, 0, 8)).WaitAsync(TimeSpan.FromSeconds(10)));
    }

    [Fact]
    public async Task AnInterruptModeReactorSleepsOnTheSocketInsteadOfTicking()
    {
        // I/O on a second reactor in interrupt mode with no timed pollers and a 10 s fallback tick: without the socket
        // as its wake source each read would wait for the 1 s sleep cap, so 20 reads would take 20 s or more.
        var online = CpuSet.Online().Cores;
        await using var rt = new ReactorRuntime(CpuSet.Of(online.Take(2).ToArray()), new ReactorOptions { Mode = ReactorMode.Interrupt, PinThreads = false, FallbackPollMicroseconds = 10_000_000 });
        rt.Start();
        var bdevs = new BdevManager();
        var module = new NvmeBdevModule();
        var rpc = new RpcRegistry();
        bdevs.AddModule(module);
        module.Init(new BdevModuleContext(bdevs, rt, rpc, new SubsystemRegistry(), NullLoggerFactory.Instance));
        await rt.Main.InvokeAsync(() => module.AttachTcpAsync("Irq0", _target.TransportId(), new NvmePathLossPolicy(0, 0, 0)));
        try
        {
            _target.Disk.AsSpan(0, 4096).Fill(0x35);
            using var desc = bdevs.Open("Irq0n1", write: false);
            var r1 = rt.Reactors[1];
            var iov = new[] { _buf.ToIoVec(0, 4096) };
            Assert.True(await Io(desc, r1, (ch, cb) => ch.Read(desc, iov, 0, 8, cb, null), TimeSpan.FromSeconds(30))); // connects the queue pair
            long sleeps = r1.SleepCount;
            var sw = Stopwatch.StartNew();
            for (int i = 0; i < 20; i++)
            {
                Assert.True(await Io(desc, r1, (ch, cb) => ch.Read(desc, iov, (ulong)i * 8, 8, cb, null), TimeSpan.FromSeconds(30)));
            }

            Assert.True(sw.Elapsed < TimeSpan.FromSeconds(8), $"20 reads took {sw.Elapsed}");
            Assert.True(r1.SleepCount > sleeps, "the reactor never slept");
        }
        finally
        {
            await rt.Main.InvokeAsync(() => module.DetachAsync("Irq0").ContinueWith(_ => true));
        }
    }
}
