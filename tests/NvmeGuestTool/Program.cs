using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;
using VhostBackend.Nvme;

namespace VhostBackend.NvmeGuestTool;

/// <summary>
/// Checks the userspace NVMe driver against a real device (QEMU's emulated NVMe inside the test guest).
/// Usage: NvmeGuestTool --traddr 0000:00:04.0 [--serial S] [--blocks N] [--block-size B] [--qpairs Q] [--tests a,b]
/// (or --traddr A --bdev 1: the bdev module; or --rpc-reset-check SOCKET [--ctrl Nvme0] [--bdev-name Nvme0n1]
/// [--rounds 3] [--window-ms 3000]: resets under I/O through a running bdevperf's RPC socket, see <see cref="RpcResetCheck"/>).
/// Prints one "PASS name" / "FAIL name: why" line per check and "N passed, N failed"; exit code 0 only when all pass.
/// </summary>
internal static unsafe class Program
{
    private static int s_passed;
    private static int s_failed;

    private static int Main(string[] args)
    {
        var opt = new Dictionary<string, string>();
        for (int i = 0; i + 1 < args.Length; i += 2)
        {
            opt[args[i].TrimStart('-')] = args[i + 1];
        }

        if (opt.TryGetValue("rpc-reset-check", out var socket))
        {
            try
            {
                RpcResetCheck.RunAsync(
                    socket,
                    opt.GetValueOrDefault("ctrl", "Nvme0"),
                    opt.GetValueOrDefault("bdev-name", "Nvme0n1"),
                    int.Parse(opt.GetValueOrDefault("rounds", "3"), CultureInfo.InvariantCulture),
                    int.Parse(opt.GetValueOrDefault("window-ms", "3000"), CultureInfo.InvariantCulture),
                    Pass,
                    Fail).GetAwaiter().GetResult();
            }
            catch (Exception e)
            {
                Fail("rpc-unexpected", e.ToString());
            }

            return Summary();
        }

        if (!opt.TryGetValue("traddr", out var traddr))
        {
            Console.Error.WriteLine("usage: NvmeGuestTool --traddr DDDD:BB:DD.F [--serial S] [--blocks N] [--block-size B] [--qpairs Q]");
            return 2;
        }

        if (opt.ContainsKey("bdev"))
        {
            try
            {
                BdevMode.RunAsync(traddr, Pass, Fail).GetAwaiter().GetResult();
            }
            catch (Exception e)
            {
                Fail("bdev-unexpected", e.ToString());
            }

            return Summary();
        }

        var sw = Stopwatch.StartNew();
        NvmeController ctrl;
        try
        {
            ctrl = NvmeController.AttachPci(traddr, new NvmeControllerOptions { IoQueueEntries = 64, IoTimeout = TimeSpan.FromSeconds(20) });
        }
        catch (Exception e)
        {
            Fail("attach", e.ToString());
            return Summary();
        }

        Pass("attach", $"{sw.ElapsedMilliseconds} ms, CAP 0x{ctrl.Cap.Raw:x}, VS 0x{ctrl.Version:x}, DSTRD {ctrl.Cap.DoorbellStride}, TO {ctrl.Cap.TimeoutUnits}, huge pages {!ctrl.Dma.UsingSmallPages}, iommu type {(VfioContainer.SharedExists ? VfioContainer.Shared.IommuType : 0)}");
        Console.WriteLine($"INFO model='{ctrl.Data.ModelNumber}' serial='{ctrl.Data.SerialNumber}' fw='{ctrl.Data.FirmwareRevision}' vid=0x{ctrl.Data.VendorId:x4} nn={ctrl.Data.NamespaceCount} oncs=0x{(int)ctrl.Data.Oncs:x} vwc={ctrl.Data.VolatileWriteCache} mdts={ctrl.Data.Mdts} maxqp={ctrl.MaxIoQueuePairs} qsize={ctrl.IoQueueEntries} aerl={ctrl.Data.AsyncEventLimit}");
        foreach (var r in ctrl.Dma.Mapper.IovaRanges)
        {
            Console.WriteLine($"INFO iova range 0x{r.Start:x}-0x{r.End:x}");
        }

        try
        {
            Run(ctrl, opt);
        }
        catch (Exception e)
        {
            Fail("unexpected", e.ToString());
        }

        try
        {
            foreach (var qp in ctrl.IoQueuePairs)
            {
                qp.Dispose();
            }

            ctrl.Dispose();
            Pass("detach");
        }
        catch (Exception e)
        {
            Fail("detach", e.Message);
        }

        return Summary();
    }

    private static int Summary()
    {
        Console.WriteLine($"{s_passed} passed, {s_failed} failed");
        return s_failed == 0 ? 0 : 1;
    }

    internal static void Pass(string name, string? info = null)
    {
        s_passed++;
        Console.WriteLine(info is null ? $"PASS {name}" : $"PASS {name}: {info}");
    }

    internal static void Fail(string name, string why)
    {
        s_failed++;
        Console.WriteLine($"FAIL {name}: {why}");
    }

    private static void Check(string name, bool ok, string detail)
    {
        if (ok)
        {
            Pass(name, detail);
        }
        else
        {
            Fail(name, detail);
        }
    }

    private sealed class Done
    {
        public int Count;
        public int Errors;
        public NvmeStatus Last;
    }

    private static readonly NvmeCompletionCallback s_done = static (arg, status, dw0) =>
    {
        var d = (Done)arg!;
        d.Count++;
        d.Last = status;
        if (!status.IsSuccess)
        {
            d.Errors++;
        }
    };

    private static NvmeStatus Sync(NvmeQueuePair qp, Func<Done, int> submit)
    {
        var d = new Done();
        int rc = submit(d);
        if (rc != 0)
        {
            throw new IOException($"submit failed: {rc}");
        }

        var sw = Stopwatch.StartNew();
        while (d.Count == 0)
        {
            qp.ProcessCompletions();
            if (sw.Elapsed > TimeSpan.FromSeconds(30))
            {
                throw new TimeoutException("command did not complete in 30 s");
            }
        }

        return d.Last;
    }

    private static void Run(NvmeController ctrl, Dictionary<string, string> opt)
    {
        if (opt.TryGetValue("serial", out var serial))
        {
            Check("identify-serial", ctrl.Data.SerialNumber == serial, $"'{ctrl.Data.SerialNumber}' (expected '{serial}')");
        }

        Check("namespaces", ctrl.Namespaces.Count >= 1, $"{ctrl.Namespaces.Count} active: {string.Join(", ", ctrl.Namespaces)}");
        if (ctrl.Namespaces.Count == 0)
        {
            return;
        }

        var ns = ctrl.Namespaces[0];
        if (opt.TryGetValue("block-size", out var bsText))
        {
            uint bs = uint.Parse(bsText, CultureInfo.InvariantCulture);
            Check("identify-block-size", ns.BlockSize == bs, $"{ns.BlockSize} (expected {bs}), lbaf {ns.Data.LbaFormatIndex} of {ns.Data.LbaFormatCount}");
        }

        if (opt.TryGetValue("blocks", out var blocksText))
        {
            ulong blocks = ulong.Parse(blocksText, CultureInfo.InvariantCulture);
            Check("identify-size", ns.BlockCount == blocks, $"{ns.BlockCount} blocks (expected {blocks})");
        }

        var smart = new byte[512];
        var st = ctrl.GetLogPage(NvmeLogPage.SmartHealth, smart);
        Check("smart-log", st.IsSuccess, $"{st}, temperature {BitConverter.ToUInt16(smart, 1)} K");
        var errlog = new byte[64];
        st = ctrl.GetLogPage(NvmeLogPage.Error, errlog);
        Check("error-log", st.IsSuccess, st.ToString());
        st = ctrl.GetFeatures(NvmeFeature.NumberOfQueues, out uint nq);
        Check("get-features", st.IsSuccess, $"{st}, number of queues dw0 0x{nq:x8}");
        Check("aer-outstanding", ctrl.AsyncEventRequestsOutstanding > 0, $"{ctrl.AsyncEventRequestsOutstanding} AERs posted");

        int qpairs = opt.TryGetValue("qpairs", out var q) ? int.Parse(q, CultureInfo.InvariantCulture) : 2;
        var qps = new List<NvmeQueuePair>();
        for (int i = 0; i < qpairs; i++)
        {
            qps.Add(ctrl.AllocIoQueuePair());
        }

        Check("qpairs", qps.Count == qpairs, $"{qps.Count} I/O queue pairs, ids {string.Join(",", qps.Select(x => x.Id))}");

        using var buffers = new DmaBufferPool(ctrl.Dma, 128, 64 * 1024, "guest-tool");
        ReadWriteAcrossQpairs(ctrl, ns, qps, buffers);
        ScatterGather(ns, qps[0], buffers);
        FlushAndZeroes(ctrl, ns, qps[0], buffers);
        ResetDuringIo(ctrl, ns, qps, buffers);
    }

    private static void Fill(nint p, int len, uint seed)
    {
        var s = new Span<uint>((void*)p, len / 4);
        for (int i = 0; i < s.Length; i++)
        {
            s[i] = (seed * 2654435761u) ^ (uint)i;
        }
    }

    private static bool Verify(nint p, int len, uint seed)
    {
        var s = new Span<uint>((void*)p, len / 4);
        for (int i = 0; i < s.Length; i++)
        {
            if (s[i] != ((seed * 2654435761u) ^ (uint)i))
            {
                return false;
            }
        }

        return true;
    }

    private static void ReadWriteAcrossQpairs(NvmeController ctrl, NvmeNamespace ns, List<NvmeQueuePair> qps, DmaBufferPool pool)
    {
        // Each queue pair writes its own pattern to its own region, many commands in flight on every queue, then reads back.
        const int ioBytes = 16 * 1024;
        uint blocksPerIo = (uint)(ioBytes / ns.BlockSize);
        int iosPerQp = Math.Min(24, 96 / qps.Count);
        var bufs = new List<(NvmeQueuePair Qp, nint Va, ulong Lba, uint Seed)>();
        var done = new Done();
        var sw = Stopwatch.StartNew();
        for (int q = 0; q < qps.Count; q++)
        {
            for (int i = 0; i < iosPerQp; i++)
            {
                pool.TryGet(out nint va, out _);
                ulong lba = (ulong)((q * iosPerQp) + i) * blocksPerIo;
                uint seed = (uint)((q * 1000) + i + 1);
                Fill(va, ioBytes, seed);
                bufs.Add((qps[q], va, lba, seed));
            }
        }

        foreach (var b in bufs)
        {
            var iov = new NvmeIoVec(b.Va, ioBytes);
            int rc = b.Qp.Write(ns, b.Lba, blocksPerIo, new ReadOnlySpan<NvmeIoVec>(ref iov), s_done, done);
            if (rc != 0)
            {
                Fail("write-qpairs", $"submit rc {rc}");
                return;
            }
        }

        Drain(qps, done, bufs.Count);
        Check("write-qpairs", done.Errors == 0 && done.Count == bufs.Count, $"{done.Count} writes of {ioBytes} B on {qps.Count} queue pairs, {done.Errors} errors, {sw.ElapsedMilliseconds} ms");
        foreach (var b in bufs)
        {
            new Span<byte>((void*)b.Va, ioBytes).Fill(0xEE);
        }

        done = new Done();
        foreach (var b in bufs)
        {
            var iov = new NvmeIoVec(b.Va, ioBytes);
            b.Qp.Read(ns, b.Lba, blocksPerIo, new ReadOnlySpan<NvmeIoVec>(ref iov), s_done, done);
        }

        Drain(qps, done, bufs.Count);
        int bad = bufs.Count(b => !Verify(b.Va, ioBytes, b.Seed));
        Check("read-verify-qpairs", done.Errors == 0 && bad == 0, $"{done.Count} reads, {bad} mismatches");

        // Compare: match on the first, mismatch after flipping a byte.
        var first = bufs[0];
        var cio = new NvmeIoVec(first.Va, ioBytes);
        var st = Sync(first.Qp, d => first.Qp.Compare(ns, first.Lba, blocksPerIo, new ReadOnlySpan<NvmeIoVec>(ref cio), s_done, d));
        if ((ctrl.Data.Oncs & NvmeOncs.Compare) != 0)
        {
            Check("compare-match", st.IsSuccess, st.ToString());
            *(byte*)(first.Va + 100) ^= 0xFF;
            st = Sync(first.Qp, d => first.Qp.Compare(ns, first.Lba, blocksPerIo, new ReadOnlySpan<NvmeIoVec>(ref cio), s_done, d));
            Check("compare-miscompare", st.IsCompareFailure, st.ToString());
        }
        else
        {
            Console.WriteLine("INFO compare not supported (ONCS)");
        }

        foreach (var b in bufs)
        {
            pool.Return(b.Va);
        }
    }

    private static void Drain(List<NvmeQueuePair> qps, Done done, int expected)
    {
        var sw = Stopwatch.StartNew();
        while (done.Count < expected && sw.Elapsed < TimeSpan.FromSeconds(60))
        {
            foreach (var qp in qps)
            {
                qp.ProcessCompletions();
            }
        }
    }

    private static void ScatterGather(NvmeNamespace ns, NvmeQueuePair qp, DmaBufferPool pool)
    {
        // Three segments: unaligned head ending on a page boundary, two whole pages, a short tail; > 2 pages => PRP list.
        pool.TryGet(out nint a, out _);
        pool.TryGet(out nint b, out _);
        pool.TryGet(out nint c, out _);
        int total = 16384; // 3584 + 8192 + 4608: head, two whole pages, a tail over two pages
        int head = 4096 - 512;
        int mid = 8192;
        int tail = total - head - mid;
        var iovs = new[] { new NvmeIoVec(a + 512, (nuint)head), new NvmeIoVec(b, (nuint)mid), new NvmeIoVec(c, (nuint)tail) };
        var linear = Marshal.AllocHGlobal(total);
        var rnd = new Random(7);
        var data = new byte[total];
        rnd.NextBytes(data);
        int off = 0;
        foreach (var v in iovs)
        {
            data.AsSpan(off, (int)v.Length).CopyTo(new Span<byte>((void*)v.Base, (int)v.Length));
            off += (int)v.Length;
        }

        ulong lba = 4096;
        var st = Sync(qp, d => qp.Write(ns, lba, (uint)(total / ns.BlockSize), iovs, s_done, d));
        foreach (var v in iovs)
        {
            new Span<byte>((void*)v.Base, (int)v.Length).Clear();
        }

        var st2 = Sync(qp, d => qp.Read(ns, lba, (uint)(total / ns.BlockSize), iovs, s_done, d));
        var back = new byte[total];
        off = 0;
        foreach (var v in iovs)
        {
            new Span<byte>((void*)v.Base, (int)v.Length).CopyTo(back.AsSpan(off));
            off += (int)v.Length;
        }

        Check("prp-list-sgl", st.IsSuccess && st2.IsSuccess && back.AsSpan().SequenceEqual(data), $"write {st}, read {st2}, {total} bytes in 3 segments");
        int bad = qp.Read(ns, lba, 1, new[] { new NvmeIoVec(a + 2, ns.BlockSize) }, s_done, null);
        Check("prp-reject-misaligned", bad == -22, $"rc {bad}");
        Marshal.FreeHGlobal(linear);
        pool.Return(a);
        pool.Return(b);
        pool.Return(c);
    }

    private static void FlushAndZeroes(NvmeController ctrl, NvmeNamespace ns, NvmeQueuePair qp, DmaBufferPool pool)
    {
        var st = Sync(qp, d => qp.Flush(ns, s_done, d));
        Check("flush", st.IsSuccess, st.ToString());
        pool.TryGet(out nint va, out _);
        int bytes = 8 * (int)ns.BlockSize;
        var iov = new[] { new NvmeIoVec(va, (nuint)bytes) };
        ulong lba = Math.Min(8192UL, ns.BlockCount - 16);
        Fill(va, bytes, 99);
        Sync(qp, d => qp.Write(ns, lba, 8, iov, s_done, d));
        if ((ctrl.Data.Oncs & NvmeOncs.WriteZeroes) != 0)
        {
            st = Sync(qp, d => qp.WriteZeroes(ns, lba, 8, false, s_done, d));
            Fill(va, bytes, 1);
            var st2 = Sync(qp, d => qp.Read(ns, lba, 8, iov, s_done, d));
            bool zero = new Span<byte>((void*)va, bytes).IndexOfAnyExcept((byte)0) < 0;
            Check("write-zeroes", st.IsSuccess && st2.IsSuccess && zero, $"{st}, read back zero: {zero}");
        }

        if ((ctrl.Data.Oncs & NvmeOncs.DatasetManagement) != 0)
        {
            Fill(va, bytes, 5);
            Sync(qp, d => qp.Write(ns, lba, 8, iov, s_done, d));
            st = Sync(qp, d => qp.Deallocate(ns, lba, 8, s_done, d));
            var st2 = Sync(qp, d => qp.Read(ns, lba, 8, iov, s_done, d));
            bool changed = !Verify(va, bytes, 5);
            Check("deallocate", st.IsSuccess && st2.IsSuccess, $"{st}, data after deallocate changed: {changed}");
        }

        pool.Return(va);
    }

    private static void ResetDuringIo(NvmeController ctrl, NvmeNamespace ns, List<NvmeQueuePair> qps, DmaBufferPool pool)
    {
        // Many reads in flight on every queue pair, then a controller reset: each must complete exactly once, with
        // success or the retryable "aborted: SQ deletion"; afterwards I/O works again on every queue pair.
        var done = new Done();
        int submitted = 0;
        var bufs = new List<nint>();
        foreach (var qp in qps)
        {
            for (int i = 0; i < 16; i++)
            {
                pool.TryGet(out nint va, out _);
                bufs.Add(va);
                var iov = new NvmeIoVec(va, 4096);
                if (qp.Read(ns, (ulong)(i * 8), 4096 / ns.BlockSize, new ReadOnlySpan<NvmeIoVec>(ref iov), s_done, done) == 0)
                {
                    submitted++;
                }
            }
        }

        // Let part of them finish first, so the reset hits a mix of completed and in-flight commands.
        var sw = Stopwatch.StartNew();
        while (done.Count < submitted / 4 && sw.ElapsedMilliseconds < 500)
        {
            foreach (var qp in qps)
            {
                qp.ProcessCompletions(1);
            }
        }

        int completedBefore = done.Count;
        sw.Restart();
        ctrl.ResetAll();
        long resetMs = sw.ElapsedMilliseconds;
        foreach (var qp in qps)
        {
            qp.ProcessCompletions();
        }

        Check("reset-during-io", done.Count == submitted, $"{submitted} in flight ({completedBefore} completed before reset), {done.Count} completed exactly once, {done.Errors} failed cleanly as aborted, reset {resetMs} ms");
        int ok = 0;
        foreach (var qp in qps)
        {
            var iov = new NvmeIoVec(bufs[0], 4096);
            var st = Sync(qp, d => qp.Read(ns, 0, 4096 / ns.BlockSize, new ReadOnlySpan<NvmeIoVec>(ref iov), s_done, d));
            if (st.IsSuccess)
            {
                ok++;
            }
        }

        Check("io-after-reset", ok == qps.Count, $"{ok}/{qps.Count} queue pairs work after reset {ctrl.ResetCount}; AERs {ctrl.AsyncEventRequestsOutstanding}");
        foreach (var va in bufs)
        {
            pool.Return(va);
        }
    }
}
