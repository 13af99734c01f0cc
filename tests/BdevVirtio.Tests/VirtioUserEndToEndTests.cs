using System.Diagnostics;
using System.Runtime.InteropServices;
using VhostBackend.Bdev;
using VhostBackend.BdevMalloc;
using VhostBackend.Platform;
using VhostBackend.Reactors;
using VhostBackend.Rpc;
using VhostBackend.Vhost;
using VhostBackend.Vhost.Tests;
using Xunit;
using Xunit.Abstractions;

namespace VhostBackend.BdevVirtio.Tests;

/// <summary>
/// VM-free end to end: our vhost-user-blk controller (VhostManager over a malloc bdev, in process) and the
/// virtio-user bdev attached to its socket, both on the same reactors; data goes through the real protocol,
/// shared memfd and rings. Also the same against qemu-storage-daemon (a prerequisite: missing, the test fails).
/// </summary>
public sealed partial class VirtioUserEndToEndTests : IAsyncLifetime
{
    private const uint BlockSize = 512;
    private const ulong Blocks = 32768; // 16 MiB
    private readonly ITestOutputHelper _out;
    private readonly TestLoggerFactory _log = new();
    private ReactorRuntime _runtime = null!;
    private string _dir = null!;

    public VirtioUserEndToEndTests(ITestOutputHelper output) => _out = output;

    public Task InitializeAsync()
    {
        var online = CpuSet.Online().Cores;
        var cores = Enumerable.Range(0, 2).Select(i => online[i % online.Count]).Distinct().ToArray();
        _runtime = new ReactorRuntime(CpuSet.Of(cores), new ReactorOptions { Mode = ReactorMode.Poll, PinThreads = false });
        _runtime.Start();
        _dir = Path.Combine(Path.GetTempPath(), "virtio-user-test-" + Guid.NewGuid().ToString("N")[..8]);
        Directory.CreateDirectory(_dir);
        return Task.CompletedTask;
    }

    public async Task DisposeAsync()
    {
        await _runtime.DisposeAsync();
        try
        {
            Directory.Delete(_dir, true);
        }
        catch (IOException)
        {
        }
    }

    private Reactor R(int i) => _runtime.Reactors[i % _runtime.Reactors.Count];

    /// <summary>The module as the App's AddBdevModule sets it up: added to the bdev layer, then initialized.</summary>
    private VirtioBdevModule StartModule(BdevManager bdevs, Func<SharedMemoryArena>? sharedMemory = null, RpcRegistry? rpc = null)
    {
        var module = new VirtioBdevModule(sharedMemory);
        bdevs.AddModule(module);
        module.Init(new BdevModuleContext(bdevs, _runtime, rpc ?? new RpcRegistry(), new SubsystemRegistry(), _log));
        return module;
    }

    /// <summary>Native buffer with a deterministic pattern.</summary>
    private sealed unsafe class Buf : IDisposable
    {
        public Buf(int len)
        {
            Length = len;
            Ptr = (nint)NativeMemory.AlignedAlloc((nuint)len, 4096);
        }

        public nint Ptr { get; }
        public int Length { get; }
        public Span<byte> Span => new((void*)Ptr, Length);

        public void Fill(int seed)
        {
            var s = Span;
            for (int i = 0; i < s.Length; i++)
            {
                s[i] = (byte)((i * 31) + seed);
            }
        }

        public void Dispose() => NativeMemory.AlignedFree((void*)Ptr);
    }

    /// <summary>Runs one I/O on reactor <paramref name="r"/> through a channel taken and kept there; returns success.</summary>
    private static Task<bool> Io(Reactor r, BdevDesc desc, Func<BdevChannel, BdevIoCompletion, int> submit)
    {
        var tcs = new TaskCompletionSource<bool>(TaskCreationOptions.RunContinuationsAsynchronously);
        r.Send(_ =>
        {
            var ch = desc.GetIoChannel();
            int rc = submit(ch, (io, ok, arg) =>
            {
                BdevDesc.PutIoChannel(ch);
                tcs.TrySetResult(ok);
            });
            if (rc != 0)
            {
                BdevDesc.PutIoChannel(ch);
                tcs.TrySetException(new IOException($"submit failed: {rc}"));
            }
        }, null);
        return tcs.Task.WaitAsync(TimeSpan.FromSeconds(15));
    }

    private static Task<bool> Write(Reactor r, BdevDesc d, Buf b, ulong lba) =>
        Io(r, d, (ch, cb) => ch.Write(d, [new IoVec(b.Ptr, (nuint)b.Length)], lba, (ulong)b.Length / d.Bdev.BlockSize, cb, null));

    private static Task<bool> Read(Reactor r, BdevDesc d, Buf b, ulong lba) =>
        Io(r, d, (ch, cb) => ch.Read(d, [new IoVec(b.Ptr, (nuint)b.Length)], lba, (ulong)b.Length / d.Bdev.BlockSize, cb, null));

    /// <summary>Takes a channel on each reactor and keeps it until the returned action runs (so each reactor keeps its queue).</summary>
    private async Task<Func<Task>> HoldChannels(BdevDesc d)
    {
        var held = new BdevChannel[_runtime.Reactors.Count];
        for (int i = 0; i < held.Length; i++)
        {
            int k = i;
            held[k] = await R(k).InvokeAsync(() => d.GetIoChannel());
        }

        return async () =>
        {
            for (int i = 0; i < held.Length; i++)
            {
                int k = i;
                await R(k).InvokeAsync(() => BdevDesc.PutIoChannel(held[k]));
            }
        };
    }

    /// <summary>Writes, reads back and verifies patterns from every reactor concurrently; sizes from 512 B to 256 KiB (split at 128 KiB).</summary>
    /// <summary>The queue each reactor's channel of <paramref name="ctrl"/> owns, sorted.</summary>
    private static int[] ChannelQueues(VirtioUserController ctrl) =>
        ctrl.SnapshotChannels().Select(c => ((VirtioUserChannel)c.Context).QueueIndex).OrderBy(q => q).ToArray();

    /// <summary>Data written through <paramref name="d"/> (on reactor 1) is read back from <paramref name="backing"/>, the bdev behind the back end, at the same block.</summary>
    private async Task AssertDataReachesBacking(BdevManager bdevs, BdevDesc d, string backing, int fill, ulong lba, int bytes)
    {
        using var w = new Buf(bytes);
        using var m = new Buf(bytes);
        w.Fill(fill);
        Assert.True(await Write(R(1), d, w, lba));
        using var mdesc = bdevs.Open(backing, false);
        Assert.True(await Read(R(0), mdesc, m, lba));
        Assert.True(m.Span.SequenceEqual(w.Span), $"the data written through the front end is not on {backing}");
    }

    /// <summary>A flush of the whole disk succeeds; an unmap of 64 blocks at 2048 zeroes them (malloc) and nothing past them.</summary>
    private async Task FlushAndUnmap(BdevDesc d)
    {
        Assert.True(await Io(R(0), d, (ch, cb) => ch.Flush(d, 0, Blocks, cb, null)));
        using var w = new Buf(65536);
        using var rb = new Buf(65536);
        w.Fill(5);
        Assert.True(await Write(R(0), d, w, 2048));
        Assert.True(await Io(R(0), d, (ch, cb) => ch.Unmap(d, 2048, 64, cb, null)));
        Assert.True(await Read(R(0), d, rb, 2048));
        Assert.True(rb.Span[..(64 * 512)].IndexOfAnyExcept((byte)0) < 0, "unmapped range is not zero on malloc");
        Assert.True(rb.Span[(64 * 512)..].SequenceEqual(w.Span[(64 * 512)..]), "unmap touched blocks beyond its range");
    }

    /// <summary>I/O past the end is refused by the bdev layer, not sent.</summary>
    private async Task AssertOutOfRangeRefused(BdevDesc d)
    {
        using var b = new Buf(4096);
        await Assert.ThrowsAnyAsync<Exception>(() => Read(R(0), d, b, Blocks - 1));
    }

    /// <summary>
    /// The test lets its channels go and closes its descriptor; detaching <paramref name="ctrlName"/> then removes
    /// <paramref name="bdevName"/> and the controller, the back end's session ends, and a second detach is ENODEV.
    /// </summary>
    private async Task ReleaseAndDetach(Func<Task> release, BdevDesc desc, VhostController backEnd, VirtioBdevModule module, BdevManager bdevs, string ctrlName, string bdevName)
    {
        await release();
        desc.Dispose();
        Assert.Single(backEnd.Sessions);
        await OnMain(() => module.DetachAsync(ctrlName));
        Assert.Null(bdevs.Find(bdevName));
        Assert.Empty(module.Controllers);
        Assert.True(await WaitUntil(() => backEnd.Sessions.Count == 0), "the back end still has a session after detach");
        var ex = await Assert.ThrowsAsync<RpcException>(() => OnMain(() => module.DetachAsync(ctrlName)));
        Assert.Equal(-19, ex.Code);
    }

    private async Task WriteReadVerify(BdevDesc d, int perReactor, int seed)
    {
        var rng = new Random(seed);
        int reactors = _runtime.Reactors.Count;
        var tasks = new List<Task>();
        ulong region = d.Bdev.BlockCount / (ulong)reactors;
        for (int ri = 0; ri < reactors; ri++)
        {
            var r = R(ri);
            ulong baseLba = region * (ulong)ri;
            int[] sizes = Enumerable.Range(0, perReactor).Select(_ => 512 * (1 << rng.Next(10))).ToArray();
            int localSeed = rng.Next();
            tasks.Add(Task.Run(async () =>
            {
                var pending = new List<(Buf W, ulong Lba)>();
                ulong lba = baseLba;
                for (int i = 0; i < sizes.Length; i++)
                {
                    var w = new Buf(sizes[i]);
                    w.Fill(localSeed + i);
                    pending.Add((w, lba));
                    lba += (ulong)sizes[i] / BlockSize;
                }

                Assert.True(lba <= baseLba + region, "test layout overflows the region");
                var writes = pending.Select(p => Write(r, d, p.W, p.Lba)).ToArray();
                Assert.All(await Task.WhenAll(writes), ok => Assert.True(ok, "write failed"));
                foreach (var (w, l) in pending)
                {
                    using var rb = new Buf(w.Length);
                    rb.Span.Fill(0xEE);
                    Assert.True(await Read(r, d, rb, l), "read failed");
                    Assert.True(rb.Span.SequenceEqual(w.Span), $"data mismatch at lba {l} ({w.Length} bytes)");
                    w.Dispose();
                }
            }));
        }

        await Task.WhenAll(tasks);
    }

    [Fact]
    public async Task AgainstOurVhostBlk_MultiQueueReadWriteFlushUnmapWriteZeroesAndDetach()
    {
        var bdevs = new BdevManager();
        var malloc = new MallocBdev("Malloc0", Blocks, BlockSize);
        bdevs.Register(malloc);
        await using var vhost = new VhostManager(_runtime, bdevs, _dir, _log);
        var ctrlr = vhost.CreateBlkController("vhost.0", "Malloc0", null, false);
        var module = StartModule(bdevs);
        try
        {
            var names = await _runtime.Main.InvokeAsync(() => module.AttachAsync("VirtioBlk0", Path.Combine(_dir, "vhost.0"), vqCount: 2, vqSize: 64));
            Assert.Equal(["VirtioBlk0"], names);
            var bdev = Assert.IsType<VirtioBlkBdev>(bdevs.Find("VirtioBlk0"));
            Assert.Equal(BlockSize, bdev.BlockSize);
            Assert.Equal(Blocks, bdev.BlockCount);
            Assert.True(bdev.SupportsIoType(BdevIoType.Flush) && bdev.SupportsIoType(BdevIoType.Unmap) && bdev.SupportsIoType(BdevIoType.WriteZeroes));
            Assert.Equal(2, bdev.Ctrl.VqCount);
            Assert.True(bdev.Ctrl.Has(Virtio.VirtioFeatures.RingIndirectDesc));
            AssertQemuLikeLayout(bdev.Ctrl);
            Assert.DoesNotContain(_log.Lines, l => l.Contains("not sealed against shrinking", StringComparison.Ordinal)); // our back end checked our memfd

            // save_config emits the attach call with SPDK's params.
            var call = bdev.ConfigCall();
            Assert.Equal("bdev_virtio_attach_controller", (string?)call["method"]);
            Assert.Equal("user", (string?)call["params"]!["trtype"]);
            Assert.Equal(Path.Combine(_dir, "vhost.0"), (string?)call["params"]!["traddr"]);
            Assert.Equal(2, (int?)call["params"]!["vq_count"]);

            using var desc = bdevs.Open("VirtioBlk0", true);
            var release = await HoldChannels(desc);

            // Each reactor's channel owns its own queue.
            Assert.Equal([0, 1], ChannelQueues(bdev.Ctrl));

            await WriteReadVerify(desc, perReactor: 40, seed: 1);
            await AssertDataReachesBacking(bdevs, desc, "Malloc0", fill: 99, lba: 100, bytes: 8192);
            await FlushAndUnmap(desc);

            using (var w = new Buf(65536))
            using (var rb = new Buf(65536))
            {
                w.Fill(5);
                Assert.True(await Write(R(1), desc, w, 4096));
                Assert.True(await Io(R(1), desc, (ch, cb) => ch.WriteZeroes(desc, 4096 + 8, 16, cb, null)));
                Assert.True(await Read(R(1), desc, rb, 4096));
                Assert.True(rb.Span[..(8 * 512)].SequenceEqual(w.Span[..(8 * 512)]));
                Assert.True(rb.Span.Slice(8 * 512, 16 * 512).IndexOfAnyExcept((byte)0) < 0, "write-zeroes range is not zero");
                Assert.True(rb.Span[(24 * 512)..].SequenceEqual(w.Span[(24 * 512)..]));
            }

            await AssertOutOfRangeRefused(desc);

            // The back end's statistics saw the traffic (bdev_get_iostat consistency).
            var virtioStats = bdev.GetStats();
            var mallocStats = malloc.GetStats();
            Assert.True(virtioStats.NumWriteOps > 80 && virtioStats.NumReadOps > 80);
            Assert.True(mallocStats.NumWriteOps >= virtioStats.NumWriteOps, $"malloc saw {mallocStats.NumWriteOps} writes, virtio {virtioStats.NumWriteOps}");

            await ReleaseAndDetach(release, desc, ctrlr, module, bdevs, "VirtioBlk0", "VirtioBlk0");
        }
        catch
        {
            _out.WriteLine(_log.Dump());
            throw;
        }
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task InterruptMode_BothSidesSleepOnEventfdsAndDataStillFlows(bool packed)
    {
        // Reactors in interrupt mode: the back end's queues sleep on their kick eventfds and the front end's on
        // its call eventfds, so every request crosses at least one eventfd signal. A lost wake-up would hang (the
        // I/O helpers time out after 15 s); the sleep counters prove the reactors really slept.
        // A poller without an interrupt source is polled at least every FallbackPollMicroseconds while its reactor
        // sleeps: make that long, so only real eventfd wake-ups can keep the sequential requests below quick.
        await _runtime.DisposeAsync();
        var online = CpuSet.Online().Cores;
        var cores = Enumerable.Range(0, 2).Select(i => online[i % online.Count]).Distinct().ToArray();
        _runtime = new ReactorRuntime(CpuSet.Of(cores), new ReactorOptions { Mode = ReactorMode.Interrupt, PinThreads = false, FallbackPollMicroseconds = 10_000_000 });
        _runtime.Start();

        var bdevs = new BdevManager();
        bdevs.Register(new MallocBdev("Malloc0", Blocks, BlockSize));
        await using var vhost = new VhostManager(_runtime, bdevs, _dir, _log);
        vhost.CreateBlkController("vhost.0", "Malloc0", null, false, packedRing: packed);
        var module = StartModule(bdevs);
        try
        {
            await _runtime.Main.InvokeAsync(() => module.AttachAsync("VirtioBlk0", Path.Combine(_dir, "vhost.0"), vqCount: 2, vqSize: 64));
            Assert.Equal(packed, Assert.IsType<VirtioBlkBdev>(bdevs.Find("VirtioBlk0")).Ctrl.PackedRing);
            using var desc = bdevs.Open("VirtioBlk0", true);
            var release = await HoldChannels(desc);
            long[] sleepsBefore = _runtime.Reactors.Select(r => r.SleepCount).ToArray();

            await WriteReadVerify(desc, perReactor: 30, seed: 7);

            // One request at a time with pauses: every completion must wake a sleeping front end.
            // (The front end's connection check, a 100 ms timed poller, would also end each sleep: 40 requests
            // waiting for it would take about 4 s.)
            var sw = Stopwatch.StartNew();
            using (var w = new Buf(4096))
            using (var rb = new Buf(4096))
            {
                for (int i = 0; i < 20; i++)
                {
                    w.Fill(i);
                    Assert.True(await Write(R(i), desc, w, (ulong)(8 * i)));
                    await Task.Delay(2);
                    Assert.True(await Read(R(i + 1), desc, rb, (ulong)(8 * i)));
                    Assert.True(rb.Span.SequenceEqual(w.Span), $"mismatch at request {i}");
                }
            }

            _out.WriteLine($"40 sequential requests in interrupt mode: {sw.ElapsedMilliseconds} ms");
            Assert.True(sw.ElapsedMilliseconds < 1500, $"40 sequential requests took {sw.ElapsedMilliseconds} ms: completions are not waking the sleeping reactors");

            for (int i = 0; i < _runtime.Reactors.Count; i++)
            {
                Assert.True(_runtime.Reactors[i].SleepCount > sleepsBefore[i] + 10, $"reactor {i} never slept: interrupt mode was not exercised");
            }

            await release();
            desc.Dispose();
            await OnMain(() => module.DetachAsync("VirtioBlk0"));
        }
        catch
        {
            _out.WriteLine(_log.Dump());
            throw;
        }
    }

    /// <summary>
    /// Packed rings end to end against our vhost-blk controller with packed_ring: negotiated by default when offered,
    /// data verified across many laps of a small ring on two queues (indirect descriptors), flush and unmap; forced
    /// split on the same back end; save_config keeps the forced choice only.
    /// </summary>
    [Fact]
    public async Task AgainstOurVhostBlk_PackedRingNegotiatedByDefaultAndSplitOnRequest()
    {
        var bdevs = new BdevManager();
        var malloc = new MallocBdev("Malloc0", Blocks, BlockSize);
        bdevs.Register(malloc);
        await using var vhost = new VhostManager(_runtime, bdevs, _dir, _log);
        vhost.CreateBlkController("vhost.p", "Malloc0", null, false, packedRing: true);
        var module = StartModule(bdevs);
        try
        {
            await _runtime.Main.InvokeAsync(() => module.AttachAsync("Packed0", Path.Combine(_dir, "vhost.p"), vqCount: 2, vqSize: 16));
            var bdev = Assert.IsType<VirtioBlkBdev>(bdevs.Find("Packed0"));
            Assert.True(bdev.Ctrl.PackedRing);
            Assert.True(bdev.Ctrl.Has(Virtio.VirtioFeatures.RingIndirectDesc));
            Assert.Null(bdev.ConfigCall()["params"]!["packed_ring"]); // not forced: SPDK's call as is
            Assert.True((bool)module.GetDevices()[0]!["packed_ring"]!);
            AssertQemuLikeLayout(bdev.Ctrl);
            using (var desc = bdevs.Open("Packed0", true))
            {
                var release = await HoldChannels(desc);
                await WriteReadVerify(desc, perReactor: 60, seed: 11); // 16-entry rings: many laps, both wrap counters
                Assert.True(await Io(R(0), desc, (ch, cb) => ch.Flush(desc, 0, Blocks, cb, null)));
                using (var w = new Buf(8192))
                using (var rb = new Buf(8192))
                {
                    w.Fill(3);
                    Assert.True(await Write(R(1), desc, w, 900));
                    Assert.True(await Io(R(1), desc, (ch, cb) => ch.Unmap(desc, 900, 8, cb, null)));
                    Assert.True(await Read(R(1), desc, rb, 900));
                    Assert.True(rb.Span[..4096].IndexOfAnyExcept((byte)0) < 0);
                    Assert.True(rb.Span[4096..].SequenceEqual(w.Span[4096..]));
                }

                await release();
            }

            await OnMain(() => module.DetachAsync("Packed0"));

            // Split rings on request, same back end.
            await _runtime.Main.InvokeAsync(() => module.AttachAsync("Split0", Path.Combine(_dir, "vhost.p"), vqCount: 1, vqSize: 16, packedRing: false));
            var split = Assert.IsType<VirtioBlkBdev>(bdevs.Find("Split0"));
            Assert.False(split.Ctrl.PackedRing);
            Assert.False((bool)split.ConfigCall()["params"]!["packed_ring"]!);
            using (var desc = bdevs.Open("Split0", true))
            {
                using var w = new Buf(4096);
                using var rb = new Buf(4096);
                w.Fill(9);
                Assert.True(await Write(R(0), desc, w, 64));
                Assert.True(await Read(R(0), desc, rb, 64));
                Assert.True(rb.Span.SequenceEqual(w.Span));
            }

            await OnMain(() => module.DetachAsync("Split0"));
        }
        catch
        {
            _out.WriteLine(_log.Dump());
            throw;
        }
    }

    [Fact]
    public async Task BuffersInTheSharedArenaGoByAddressOthersAreBounced()
    {
        var bdevs = new BdevManager();
        bdevs.Register(new MallocBdev("Malloc0", Blocks, BlockSize));
        await using var vhost = new VhostManager(_runtime, bdevs, _dir, _log);
        vhost.CreateBlkController("vhost.zc", "Malloc0", null, false);
        using var arena = SharedMemoryArena.Create("virtio-test", (8 << 20) + 4096);
        Assert.Equal(10UL << 20, arena.Size); // rounded up to 2 MiB, mapped 2 MiB-aligned (SPDK's vhost target's unit)
        Assert.Equal(0L, arena.Base % (2 << 20));
        var module = StartModule(bdevs, () => arena);
        await _runtime.Main.InvokeAsync(() => module.AttachAsync("Zc", Path.Combine(_dir, "vhost.zc"), vqCount: 1, vqSize: 32));
        var bdev = Assert.IsType<VirtioBlkBdev>(bdevs.Find("Zc"));
        using var desc = bdevs.Open("Zc", true);
        var release = await HoldChannels(desc);
        var ch = bdev.Ctrl.SnapshotChannels().Select(c => (VirtioBlkChannel)c.Context).Single(c => c.QueueIndex == 0);

        nint w = arena.Allocate(16384);
        nint r = arena.Allocate(16384);
        unsafe
        {
            var ws = new Span<byte>((void*)w, 16384);
            for (int i = 0; i < ws.Length; i++)
            {
                ws[i] = (byte)(i * 7 + 3);
            }
        }

        var reactor = bdev.Ctrl.SnapshotChannels().First(c => ((VirtioBlkChannel)c.Context).QueueIndex == 0).Reactor;
        Assert.True(await Io(reactor, desc, (c, cb) => c.Write(desc, [new IoVec(w, 16384)], 64, 32, cb, null)));
        Assert.True(await Io(reactor, desc, (c, cb) => c.Read(desc, [new IoVec(r, 16384)], 64, 32, cb, null)));
        Assert.Equal(2, ch.ZeroCopyIos);
        Assert.Equal(0, ch.BouncedIos);
        unsafe
        {
            Assert.True(new Span<byte>((void*)w, 16384).SequenceEqual(new Span<byte>((void*)r, 16384)), "zero-copy read does not match the write");
        }

        // The data is really on the back end's bdev.
        using (var m = new Buf(16384))
        using (var mdesc = bdevs.Open("Malloc0", false))
        {
            Assert.True(await Read(R(0), mdesc, m, 64));
            unsafe
            {
                Assert.True(m.Span.SequenceEqual(new Span<byte>((void*)w, 16384)));
            }
        }

        // A heap buffer still works, through the bounce buffer.
        using (var hb = new Buf(4096))
        {
            Assert.True(await Read(reactor, desc, hb, 64));
            unsafe
            {
                Assert.True(hb.Span.SequenceEqual(new Span<byte>((void*)w, 4096)));
            }
        }

        Assert.Equal(1, ch.BouncedIos);
        arena.Free(w);
        arena.Free(r);
        Assert.Equal(r, arena.Allocate(16384)); // freed blocks are reused (last freed first)
        await release();
        await _runtime.Main.InvokeAsync(() => module.DetachAsync("Zc"));
    }

    [Fact]
    public async Task MoreReactorsThanQueues_TheExtraChannelFailsItsIoClearly()
    {
        var bdevs = new BdevManager();
        bdevs.Register(new MallocBdev("Malloc0", Blocks, BlockSize));
        await using var vhost = new VhostManager(_runtime, bdevs, _dir, _log);
        vhost.CreateBlkController("vhost.1", "Malloc0", null, false);
        var module = StartModule(bdevs);
        await _runtime.Main.InvokeAsync(() => module.AttachAsync("V1", Path.Combine(_dir, "vhost.1"), vqCount: 1, vqSize: 16));
        using var desc = bdevs.Open("V1", true);
        var release = await HoldChannels(desc);
        using var b = new Buf(4096);
        b.Fill(3);
        var results = new[] { await Write(R(0), desc, b, 0), await Write(R(1), desc, b, 0) };
        if (_runtime.Reactors.Count > 1)
        {
            Assert.Equal([true, false], results);
            Assert.Contains(_log.Lines, l => l.Contains("no free virtqueue"));
        }

        await release();
        desc.Dispose();
        await OnMain(() => module.DetachAsync("V1"));
    }

    [Fact]
    public async Task DetachWithAChannelStillOpen_TearsDownWhenTheLastChannelCloses()
    {
        var bdevs = new BdevManager();
        bdevs.Register(new MallocBdev("Malloc0", Blocks, BlockSize));
        await using var vhost = new VhostManager(_runtime, bdevs, _dir, _log);
        var ctrlr = vhost.CreateBlkController("vhost.6", "Malloc0", null, false);
        var module = StartModule(bdevs);
        module.DetachWait = TimeSpan.FromMilliseconds(300);
        await _runtime.Main.InvokeAsync(() => module.AttachAsync("V6", Path.Combine(_dir, "vhost.6"), vqCount: 1, vqSize: 16));
        var ctrl = Assert.IsType<VirtioBlkBdev>(bdevs.Find("V6")).Ctrl;

        // Someone keeps a channel of the device (a bdev channel not put back yet) across the detach.
        var r = R(_runtime.Reactors.Count - 1);
        var held = await r.InvokeAsync(() => r.GetIoChannel(ctrl));
        Assert.Equal(1, ctrl.LiveChannels);
        await OnMain(() => module.DetachAsync("V6"));
        Assert.Null(bdevs.Find("V6"));
        Assert.Empty(module.Controllers);
        Assert.Contains(_log.Lines, l => l.Contains("still open") && l.Contains("V6"));

        // Not torn down under the open channel: the connection and the shared memory stay.
        await Task.Delay(200);
        Assert.False(ctrl.Disposed.IsCompleted);
        Assert.Single(ctrlr.Sessions);

        // The last channel closes: the teardown finishes by itself (no leaked connection or memory).
        await r.InvokeAsync(() =>
        {
            held.Release();
            return true;
        });
        await ctrl.Disposed.WaitAsync(TimeSpan.FromSeconds(10));
        Assert.Equal(0, ctrl.LiveChannels);
        Assert.True(await WaitUntil(() => ctrlr.Sessions.Count == 0), "the back end still has a session after the last channel closed");
        Assert.Contains(_log.Lines, l => l.Contains("V6: detached"));
    }

    [Fact]
    public async Task BackEndGoingAway_FailsIoInsteadOfHanging()
    {
        var bdevs = new BdevManager();
        bdevs.Register(new MallocBdev("Malloc0", Blocks, BlockSize));
        var vhost = new VhostManager(_runtime, bdevs, _dir, _log);
        vhost.CreateBlkController("vhost.3", "Malloc0", null, false);
        var module = StartModule(bdevs);
        await _runtime.Main.InvokeAsync(() => module.AttachAsync("V3", Path.Combine(_dir, "vhost.3"), vqCount: 1, vqSize: 32));
        var bdev = Assert.IsType<VirtioBlkBdev>(bdevs.Find("V3"));
        using var desc = bdevs.Open("V3", true);
        var release = await HoldChannels(desc);
        using var b = new Buf(4096);
        b.Fill(4);
        Assert.True(await Write(R(0), desc, b, 0));

        // The back end shuts down (like a daemon killed with SIGTERM): the front end notices and fails I/O.
        await vhost.DisposeAsync();
        Assert.True(await WaitUntil(() => bdev.Ctrl.Disconnected, 3000), "the disconnect was not noticed");
        Assert.False(await Write(R(0), desc, b, 0));
        Assert.Contains(_log.Lines, l => l.Contains("closed the connection"));

        await release();
        desc.Dispose();
        await OnMain(() => module.DetachAsync("V3"));
        Assert.Null(bdevs.Find("V3"));
    }

    [Fact]
    public async Task AttachErrors()
    {
        var bdevs = new BdevManager();
        bdevs.Register(new MallocBdev("Malloc0", Blocks, BlockSize));
        await using var vhost = new VhostManager(_runtime, bdevs, _dir, _log);
        vhost.CreateBlkController("vhost.2", "Malloc0", null, false);
        var module = StartModule(bdevs); // Init registers the RPC methods too

        var e1 = await Assert.ThrowsAsync<RpcException>(() => _runtime.Main.InvokeAsync(() => module.AttachAsync("X", Path.Combine(_dir, "nope"))));
        Assert.Equal(RpcErrorCodes.InvalidParams, e1.Code);

        var e2 = await Assert.ThrowsAsync<RpcException>(() => _runtime.Main.InvokeAsync(() => module.AttachAsync("X", Path.Combine(_dir, "vhost.2"), vqCount: 64)));
        Assert.Contains("supports 32 queue", e2.Message);

        // packed_ring required from a back end that offers split rings only.
        var e4 = await Assert.ThrowsAsync<RpcException>(() => _runtime.Main.InvokeAsync(() => module.AttachAsync("X", Path.Combine(_dir, "vhost.2"), packedRing: true)));
        Assert.Equal(RpcErrorCodes.InvalidParams, e4.Code);
        Assert.Contains("VIRTIO_F_RING_PACKED", e4.Message);

        var e3 = await Assert.ThrowsAsync<RpcException>(() => _runtime.Main.InvokeAsync(() => module.AttachAsync("Malloc0", Path.Combine(_dir, "vhost.2"))));
        Assert.Equal(-17, e3.Code);
        Assert.Empty(module.Controllers);

        // RPC parameter validation with SPDK's codes.
        var bad = new VirtioAttachParams { Name = "Y", Trtype = "tcp", Traddr = "/x", DevType = "blk" };
        Assert.Equal(22, Assert.Throws<RpcException>(bad.Validate).Code);
        bad = new VirtioAttachParams { Name = "Y", Trtype = "user", Traddr = "/x", DevType = "net" };
        Assert.Equal(22, Assert.Throws<RpcException>(bad.Validate).Code);
    }

    [Fact]
    public async Task AgainstQemuStorageDaemon_ReadWriteVerify()
    {
        const string qsd = "/usr/bin/qemu-storage-daemon";
        // scripts/test.sh installs it: a missing peer fails this test, it never passes without running.
        Assert.True(File.Exists(qsd), "qemu-storage-daemon not installed (apt-get install qemu-system-common; scripts/install-deps.sh does)");

        string img = Path.Combine(_dir, "disk.img");
        using (var f = File.Create(img))
        {
            f.SetLength((long)(Blocks * BlockSize));
        }

        string sock = Path.Combine(_dir, "qsd.sock");
        var psi = new ProcessStartInfo(qsd)
        {
            RedirectStandardError = true,
            RedirectStandardOutput = true,
        };
        foreach (var a in new[]
        {
            "--blockdev", $"driver=file,node-name=file0,filename={img},discard=unmap",
            "--export", $"type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path={sock},writable=on,num-queues=2",
        })
        {
            psi.ArgumentList.Add(a);
        }

        using var p = Process.Start(psi)!;
        try
        {
            Assert.True(await WaitUntil(() => File.Exists(sock) || p.HasExited, 10000), "qemu-storage-daemon did not create its socket");
            if (p.HasExited)
            {
                Assert.Fail("qemu-storage-daemon exited: " + p.StandardError.ReadToEnd());
            }

            var bdevs = new BdevManager();
            var module = StartModule(bdevs);

            // QEMU 7.2's libvhost-user offers no packed rings: requiring them is refused clearly. A qsd that offers
            // them gets the packed ring verified instead.
            try
            {
                await _runtime.Main.InvokeAsync(() => module.AttachAsync("VirtioBlkP", sock, vqCount: 2, vqSize: 64, packedRing: true));
                _out.WriteLine("qemu-storage-daemon offers packed rings: verifying them");
                using (var pdesc = bdevs.Open("VirtioBlkP", true))
                {
                    var prelease = await HoldChannels(pdesc);
                    await WriteReadVerify(pdesc, perReactor: 8, seed: 3);
                    await prelease();
                }

                await OnMain(() => module.DetachAsync("VirtioBlkP"));
            }
            catch (RpcException e)
            {
                Assert.Contains("does not offer VIRTIO_F_RING_PACKED", e.Message);
                _out.WriteLine("qemu-storage-daemon: " + e.Message);
            }

            await _runtime.Main.InvokeAsync(() => module.AttachAsync("VirtioBlkQ", sock, vqCount: 2, vqSize: 128));
            var bdev = Assert.IsType<VirtioBlkBdev>(bdevs.Find("VirtioBlkQ"));
            Assert.Equal(Blocks * BlockSize, bdev.BlockCount * bdev.BlockSize);
            AssertQemuLikeLayout(bdev.Ctrl);
            using var desc = bdevs.Open("VirtioBlkQ", true);
            var release = await HoldChannels(desc);
            await WriteReadVerify(desc, perReactor: 24, seed: 2);
            if (bdev.SupportsIoType(BdevIoType.Flush))
            {
                Assert.True(await Io(R(0), desc, (ch, cb) => ch.Flush(desc, 0, bdev.BlockCount, cb, null)));
            }

            if (bdev.SupportsIoType(BdevIoType.WriteZeroes))
            {
                using var w = new Buf(16384);
                using var rb = new Buf(16384);
                w.Fill(8);
                Assert.True(await Write(R(0), desc, w, 8000));
                Assert.True(await Io(R(0), desc, (ch, cb) => ch.WriteZeroes(desc, 8000, 8, cb, null)));
                Assert.True(await Read(R(0), desc, rb, 8000));
                Assert.True(rb.Span[..4096].IndexOfAnyExcept((byte)0) < 0);
                Assert.True(rb.Span[4096..].SequenceEqual(w.Span[4096..]));
            }

            // The data reached the image file.
            using (var w = new Buf(4096))
            {
                w.Fill(77);
                Assert.True(await Write(R(1), desc, w, 1234));
                if (bdev.SupportsIoType(BdevIoType.Flush))
                {
                    Assert.True(await Io(R(1), desc, (ch, cb) => ch.Flush(desc, 0, bdev.BlockCount, cb, null)));
                }

                using var fs = new FileStream(img, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
                var onDisk = new byte[4096];
                fs.Seek(1234 * 512, SeekOrigin.Begin);
                fs.ReadExactly(onDisk);
                Assert.True(onDisk.AsSpan().SequenceEqual(w.Span));
            }

            await release();
            desc.Dispose();
            await OnMain(() => module.DetachAsync("VirtioBlkQ"));
            Assert.Null(bdevs.Find("VirtioBlkQ"));
        }
        catch
        {
            _out.WriteLine(_log.Dump());
            throw;
        }
        finally
        {
            if (!p.HasExited)
            {
                p.Kill();
                await p.WaitForExitAsync();
            }

            _out.WriteLine("qsd stderr: " + await p.StandardError.ReadToEndAsync());
        }
    }

    /// <summary>
    /// The shared region is laid out as QEMU and DPDK lay theirs out (what SPDK's vhost target registers on 2 MiB
    /// boundaries): size and address multiples of 2 MiB, huge pages when the system has enough free ones.
    /// </summary>
    private void AssertQemuLikeLayout(VirtioUserController ctrl)
    {
        const ulong TwoMiB = 2UL << 20;
        _out.WriteLine($"shared region 0x{ctrl.MemoryBytes:x} bytes at 0x{ctrl.MemoryAddress:x}, huge pages: {ctrl.HugePages}");
        Assert.Equal(0UL, ctrl.MemoryBytes % TwoMiB);
        Assert.Equal(0L, ctrl.MemoryAddress % (long)TwoMiB);
        if (FreeHugePageBytes() < ctrl.MemoryBytes)
        {
            Assert.False(ctrl.HugePages);
        }
    }

    /// <summary>HugePages_Free x Hugepagesize from /proc/meminfo (0 when the system has none).</summary>
    internal static ulong FreeHugePageBytes()
    {
        ulong free = 0, size = 0;
        foreach (var line in File.ReadLines("/proc/meminfo"))
        {
            var f = line.Split(' ', StringSplitOptions.RemoveEmptyEntries);
            if (f.Length >= 2 && f[0] == "HugePages_Free:")
            {
                free = ulong.Parse(f[1], System.Globalization.CultureInfo.InvariantCulture);
            }
            else if (f.Length >= 2 && f[0] == "Hugepagesize:")
            {
                size = ulong.Parse(f[1], System.Globalization.CultureInfo.InvariantCulture) * 1024;
            }
        }

        return free * size;
    }

    /// <summary>Runs an async control-plane operation on the main reactor and waits for it to finish.</summary>
    private Task OnMain(Func<Task> f) => _runtime.Main.InvokeAsync(async () =>
    {
        await f();
        return true;
    });

    private static async Task<bool> WaitUntil(Func<bool> cond, int timeoutMs = 5000)
    {
        long deadline = Environment.TickCount64 + timeoutMs;
        while (!cond())
        {
            if (Environment.TickCount64 > deadline)
            {
                return false;
            }

            await Task.Delay(5);
        }

        return true;
    }
}
