using System.Diagnostics;
using System.Runtime.InteropServices;
using Microsoft.Extensions.Logging.Abstractions;
using VhostBackend.Bdev;
using VhostBackend.BdevNvme;
using VhostBackend.Nvme;
using VhostBackend.Platform;
using VhostBackend.Reactors;
using VhostBackend.Rpc;

namespace VhostBackend.NvmeGuestTool;

/// <summary>
/// "--bdev 1": the NVMe bdev module on the real device: attach through the module on a reactor runtime, I/O through
/// the bdev layer from every reactor (bounced heap buffers and zero-copy DMA buffers), unmap/write zeroes, a
/// controller reset with I/O in flight (retried), detach.
/// </summary>
internal static class BdevMode
{
    public static async Task RunAsync(string traddr, Action<string, string?> pass, Action<string, string> fail)
    {
        var online = CpuSet.Online().Cores;
        await using var rt = new ReactorRuntime(CpuSet.Of(online.Take(2).ToArray()), new ReactorOptions { Mode = ReactorMode.Poll, PinThreads = false });
        rt.Start();
        var bdevs = new BdevManager();
        var module = new NvmeBdevModule();
        bdevs.AddModule(module);
        module.Init(new BdevModuleContext(bdevs, rt, new RpcRegistry(), new SubsystemRegistry(), NullLoggerFactory.Instance));
        var sw = Stopwatch.StartNew();
        var names = await rt.Main.InvokeAsync(() => module.AttachAsync("Nvme0", traddr));
        pass("bdev-attach", $"{string.Join(",", names)} in {sw.ElapsedMilliseconds} ms");
        var bdev = (NvmeBdev)bdevs.Find("Nvme0n1")!;
        using var desc = bdevs.Open("Nvme0n1", write: true);
        uint bs = bdev.BlockSize;

        // Heap memory (not registered for DMA): bounced. 64 KiB per I/O, 16 I/Os per reactor, each reactor its own range.
        const int ioBytes = 65536;
        int perReactor = 16;
        nint heap = Alloc(ioBytes * perReactor * rt.Reactors.Count);
        var rnd = new Random(11);
        var pattern = new byte[ioBytes * perReactor * rt.Reactors.Count];
        rnd.NextBytes(pattern);
        Marshal.Copy(pattern, 0, heap, pattern.Length);
        int ok = await RunBatch(rt, desc, heap, ioBytes, perReactor, bs, write: true);
        Marshal.Copy(new byte[pattern.Length], 0, heap, pattern.Length);
        int ok2 = await RunBatch(rt, desc, heap, ioBytes, perReactor, bs, write: false);
        var back = new byte[pattern.Length];
        Marshal.Copy(heap, back, 0, back.Length);
        bool same = back.AsSpan().SequenceEqual(pattern);
        int total = perReactor * rt.Reactors.Count;
        Check("bdev-bounce-write-read", ok == total && ok2 == total && same, $"{ok}+{ok2} of {total}+{total} I/Os on {rt.Reactors.Count} reactors, data equal: {same}");

        // DMA memory, PRP friendly: zero copy.
        using var pool = new DmaBufferPool(((NvmeBdevController)bdev.Ctrl).Controller.Dma, 2, ioBytes, "bdev-mode");
        pool.TryGet(out nint dma, out _);
        Marshal.Copy(pattern, 0, dma, ioBytes);
        bool w = await One(rt.Main, desc, (ch, cb) => ch.Write(desc, new[] { new IoVec(dma, ioBytes) }, 4096, (ulong)(ioBytes / bs), cb, null));
        Marshal.Copy(new byte[ioBytes], 0, dma, ioBytes);
        bool r = await One(rt.Main, desc, (ch, cb) => ch.Read(desc, new[] { new IoVec(dma, ioBytes) }, 4096, (ulong)(ioBytes / bs), cb, null));
        var dmaBack = new byte[ioBytes];
        Marshal.Copy(dma, dmaBack, 0, ioBytes);
        Check("bdev-zero-copy", w && r && dmaBack.AsSpan().SequenceEqual(pattern.AsSpan(0, ioBytes)), $"write {w}, read {r}");

        bool cmpOk = await One(rt.Main, desc, (ch, cb) => ch.Compare(desc, new[] { new IoVec(dma, ioBytes) }, 4096, (ulong)(ioBytes / bs), cb, null));
        Marshal.WriteByte(dma, 17, (byte)(Marshal.ReadByte(dma, 17) ^ 0xFF));
        bool cmpBad = await One(rt.Main, desc, (ch, cb) => ch.Compare(desc, new[] { new IoVec(dma, ioBytes) }, 4096, (ulong)(ioBytes / bs), cb, null));
        Check("bdev-compare", cmpOk && !cmpBad, $"match {cmpOk}, mismatch detected {!cmpBad}");

        bool wz = await One(rt.Main, desc, (ch, cb) => ch.WriteZeroes(desc, 4096, (ulong)(ioBytes / bs), cb, null));
        r = await One(rt.Main, desc, (ch, cb) => ch.Read(desc, new[] { new IoVec(dma, ioBytes) }, 4096, (ulong)(ioBytes / bs), cb, null));
        Marshal.Copy(dma, dmaBack, 0, ioBytes);
        Check("bdev-write-zeroes", wz && r && dmaBack.AsSpan().IndexOfAnyExcept((byte)0) < 0, $"write zeroes {wz}");
        bool um = await One(rt.Main, desc, (ch, cb) => ch.Unmap(desc, Math.Min(8192UL, bdev.BlockCount - 1024), 1024, cb, null));
        bool fl = await One(rt.Main, desc, (ch, cb) => ch.Flush(desc, 0, bdev.BlockCount, cb, null));
        Check("bdev-unmap-flush", um && fl, $"unmap {um}, flush {fl}");

        // Reset with I/O in flight: everything completes successfully (aborted commands are retried).
        Marshal.Copy(pattern, 0, heap, pattern.Length);
        var batch = RunBatch(rt, desc, heap, ioBytes, perReactor, bs, write: true);
        await Task.Delay(1);
        sw.Restart();
        await rt.Main.InvokeAsync(() => bdev.Ctrl.ResetAsync().ContinueWith(t => t.IsCompletedSuccessfully));
        long resetMs = sw.ElapsedMilliseconds;
        ok = await batch;
        Marshal.Copy(new byte[pattern.Length], 0, heap, pattern.Length);
        ok2 = await RunBatch(rt, desc, heap, ioBytes, perReactor, bs, write: false);
        Marshal.Copy(heap, back, 0, back.Length);
        same = back.AsSpan().SequenceEqual(pattern);
        Check("bdev-reset-retry", ok == total && ok2 == total && same && ((NvmeBdevController)bdev.Ctrl).Controller.ResetCount == 1, $"{ok}/{total} writes across a reset ({resetMs} ms) succeeded, read back equal: {same}");

        Free(heap);
        desc.Dispose();
        await rt.Main.InvokeAsync(() => module.DetachAsync("Nvme0").ContinueWith(t => t.IsCompletedSuccessfully));
        Check("bdev-detach", bdevs.Find("Nvme0n1") is null && module.Controllers.Count == 0, "bdev gone, controller detached");

        void Check(string name, bool good, string detail)
        {
            if (good)
            {
                pass(name, detail);
            }
            else
            {
                fail(name, detail);
            }
        }
    }

    private static unsafe nint Alloc(int n) => (nint)NativeMemory.AlignedAlloc((nuint)n, 4096);

    private static unsafe void Free(nint p) => NativeMemory.AlignedFree((void*)p);

    private static Task<bool> One(Reactor r, BdevDesc desc, Func<BdevChannel, BdevIoCompletion, int> submit) =>
        r.InvokeAsync(async () =>
        {
            var ch = desc.GetIoChannel();
            var tcs = new TaskCompletionSource<bool>(TaskCreationOptions.RunContinuationsAsynchronously);
            int rc = submit(ch, (io, success, _) => tcs.SetResult(success));
            bool result = rc == 0 && await tcs.Task.WaitAsync(TimeSpan.FromSeconds(60));
            BdevDesc.PutIoChannel(ch);
            return result;
        });

    /// <summary>Every reactor submits its share at once (queue depth = perReactor), returns how many succeeded.</summary>
    private static async Task<int> RunBatch(ReactorRuntime rt, BdevDesc desc, nint buf, int ioBytes, int perReactor, uint bs, bool write)
    {
        var tasks = new List<Task<int>>();
        for (int ri = 0; ri < rt.Reactors.Count; ri++)
        {
            int rIndex = ri;
            tasks.Add(rt.Reactors[ri].InvokeAsync(async () =>
            {
                var ch = desc.GetIoChannel();
                var done = new List<Task<bool>>();
                for (int i = 0; i < perReactor; i++)
                {
                    int k = (rIndex * perReactor) + i;
                    var tcs = new TaskCompletionSource<bool>(TaskCreationOptions.RunContinuationsAsynchronously);
                    var iov = new[] { new IoVec(buf + (k * ioBytes), (nuint)ioBytes) };
                    ulong lba = (ulong)k * (ulong)(ioBytes / bs);
                    int rc = write
                        ? ch.Write(desc, iov, lba, (ulong)(ioBytes / bs), (io, s, a) => ((TaskCompletionSource<bool>)a!).SetResult(s), tcs)
                        : ch.Read(desc, iov, lba, (ulong)(ioBytes / bs), (io, s, a) => ((TaskCompletionSource<bool>)a!).SetResult(s), tcs);
                    done.Add(rc == 0 ? tcs.Task : Task.FromResult(false));
                }

                var results = await Task.WhenAll(done).WaitAsync(TimeSpan.FromSeconds(120));
                BdevDesc.PutIoChannel(ch);
                return results.Count(x => x);
            }));
        }

        return (await Task.WhenAll(tasks)).Sum();
    }
}
