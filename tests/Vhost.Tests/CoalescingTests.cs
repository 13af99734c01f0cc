using System.Diagnostics;
using VhostBackend.Platform;
using VhostBackend.VhostUser;
using VhostBackend.Virtio;
using VhostBackend.Virtio.Blk;
using VhostBackend.Virtio.Tests;
using Xunit;

namespace VhostBackend.Vhost.Tests;

/// <summary>
/// vhost_controller_set_coalescing has an effect: under a request rate above iops_threshold the guest is
/// interrupted far less often than without coalescing, and an interrupt still arrives for the last completion
/// (none is lost once the load stops). Counted on the call eventfd the front end model owns.
/// </summary>
[Collection(SoakCollection.Name)] // timing: measured with nothing else running in the process
public sealed class CoalescingTests
{
    private const int Slots = 2;
    private const ulong WantProtocol = (1UL << VhostUserProtocolFeature.ReplyAck) | (1UL << VhostUserProtocolFeature.Config)
        | (1UL << VhostUserProtocolFeature.Mq) | (1UL << VhostUserProtocolFeature.ConfigureMemSlots);

    /// <summary>A gap between interrupts longer than this (and with many completions) is starvation.</summary>
    private static readonly TimeSpan StarvedAfter = TimeSpan.FromMilliseconds(250);

    /// <summary>Completions per judged window of the coalescing run (see <see cref="RunLoad"/>).</summary>
    private const int Window = 5000;

    [Fact]
    public async Task CoalescingCutsInterruptsUnderLoadAndLosesNone()
    {
        var off = await RunLoad(coalesce: false, offRate: 0);
        double offRate = (double)off.Signals / off.Completed;

        // Without coalescing every poll that completes something signals, and a poll completes at most the Slots
        // requests in flight: at least one interrupt per Slots completions, whatever the load (counts, not time).
        Assert.True(offRate * Slots >= 0.9, $"without coalescing only {off.Signals} signals for {off.Completed} requests (at most {Slots} in flight)");
        var on = await RunLoad(coalesce: true, offRate);
        Assert.True(off.Completed > 2000 && on.Completed > 2000, $"too little load to judge: {off.Completed} / {on.Completed} requests");

        // Coalescing (a 2 ms base delay over a 100 IOPS threshold, the minimum) opens the gate about once per 10 ms
        // stats interval, so the interrupts it saves grow with the completions per interval: it cuts nothing while the
        // machine is too loaded to run a few requests per 10 ms (this test's thread and the reactor both descheduled).
        // So the run is judged over its best window of Window consecutive completions (it goes on, up to 20 s, until
        // one shows the cut): a coalescing that does nothing cannot pass, since no window can have fewer than one
        // interrupt per Slots completions, far above offRate / 5.
        Assert.True(on.BestWindowRate * 5 < offRate,
            $"coalescing had no effect: {off.Signals} signals for {off.Completed} requests without; with: {on.Signals} for {on.Completed}, best window of {Window}: {on.BestWindowRate:F4} per request");
    }

    /// <summary>
    /// Drives <see cref="Slots"/> requests in flight for at least 1.5 s and 5000 completions. With
    /// <paramref name="coalesce"/> it also goes on (up to 20 s in all) until a window of <see cref="Window"/>
    /// consecutive completions has fewer than <paramref name="offRate"/> / 5 interrupts per completion, and returns
    /// the lowest such window rate seen.
    /// </summary>
    private static async Task<(long Completed, long Signals, double BestWindowRate)> RunLoad(bool coalesce, double offRate)
    {
        await using var host = new VhostTestHost(reactors: 1);
        var ctrl = host.Vhost.CreateBlkController("co", "Malloc0", null, readOnly: false);
        if (coalesce)
        {
            await ctrl.SetCoalescingAsync(2000, 100);
        }

        using var fe = host.Connect("co");
        fe.Negotiate(WantProtocol);
        Assert.Equal(0UL, fe.SetU64(VhostUserRequest.SetFeatures, (1UL << VirtioFeatures.Version1) | (1UL << VhostUserConstants.ProtocolFeaturesBit)));
        using var m = new DriverRingModel(32);
        Assert.Equal(0UL, fe.SetMemTable(m));
        using var kick = new EventFd();
        using var call = new EventFd();
        Assert.Equal(0UL, fe.SetupQueue(m, 0, kick, call));

        // Slot s uses descriptors 3s..3s+2 and its own header, data and status buffers, reused for every request.
        var hdr = new ulong[Slots];
        var data = new ulong[Slots];
        var status = new ulong[Slots];
        for (int s = 0; s < Slots; s++)
        {
            hdr[s] = m.Alloc(16);
            data[s] = m.Alloc(512, 512);
            status[s] = m.Alloc(1);
        }

        long posted = 0, completed = 0, signals = 0;
        ushort seen = 0;
        for (int s = 0; s < Slots; s++)
        {
            Post(m, s, posted++, hdr, data, status);
        }

        kick.Signal();
        var sw = Stopwatch.StartNew();
        var lastProgress = Stopwatch.StartNew();
        var sinceSignal = Stopwatch.StartNew();
        double maxGap = 0;
        long sinceSignalCompleted = 0, maxWithoutSignal = 0, maxStarved = 0;

        // Completions and signals noted every Window / 10 completions: a window's rate is the difference over ten steps.
        const int Step = Window / 10;
        var checkpoints = new (long Completed, long Signals)[11];
        int nCheckpoints = 0;
        long nextCheckpoint = 0;
        double bestWindowRate = double.MaxValue;
        bool Done() => (sw.Elapsed >= TimeSpan.FromSeconds(1.5) && completed >= 5000 && (!coalesce || bestWindowRate * 5 < offRate))
            || sw.Elapsed >= TimeSpan.FromSeconds(20);
        while (!Done())
        {
            ushort used = m.UsedIdx;
            if (used == seen)
            {
                // A hang, not slowness: on a loaded machine the reactor may not run for a while.
                Assert.True(lastProgress.Elapsed < TimeSpan.FromSeconds(15), "the queue stopped completing requests");
                Thread.SpinWait(20);
                continue;
            }

            lastProgress.Restart();
            while (seen != used)
            {
                var (id, _) = m.Used(seen % m.Size);
                int s = (int)id / 3;
                Assert.Equal(VirtioBlkRequestType.StatusOk, StatusOf(m, status[s]));
                seen++;
                completed++;
                sinceSignalCompleted++;
                Post(m, s, posted++, hdr, data, status);
            }

            kick.Signal();
            long got = (long)call.DrainCount();
            if (got > 0)
            {
                signals += got;
                maxGap = Math.Max(maxGap, sinceSignal.Elapsed.TotalMilliseconds);
                sinceSignal.Restart();
                sinceSignalCompleted = 0;
            }

            maxWithoutSignal = Math.Max(maxWithoutSignal, sinceSignalCompleted);
            if (sinceSignal.Elapsed > StarvedAfter)
            {
                maxStarved = Math.Max(maxStarved, sinceSignalCompleted);
            }

            if (completed >= nextCheckpoint)
            {
                nextCheckpoint += Step;
                Array.Copy(checkpoints, 1, checkpoints, 0, checkpoints.Length - 1);
                checkpoints[^1] = (completed, signals);
                if (++nCheckpoints >= checkpoints.Length)
                {
                    var (c0, s0) = checkpoints[0];
                    bestWindowRate = Math.Min(bestWindowRate, (double)(signals - s0) / (completed - c0));
                }
            }
        }

        // Coalescing delays interrupts; it must not starve the guest of them (the delay is recomputed from each
        // 10 ms interval's rate and the gate reopens at every check, so a signal follows within about 10 ms of
        // reactor time). Neither wall time nor completions alone tell starvation: on a loaded 2-core machine this
        // test's own thread is descheduled for hundreds of ms (seen: 697 ms with coalescing off) while the back end
        // cannot complete more than the 2 posted requests, and on a quiet one a 10-30 ms gap holds 1000-2000
        // completions (seen: 1629 in 32 ms, 2168 in 80 ms). A gap is starvation when it is both: longer than
        // StarvedAfter (25 stats intervals) and past 200 completions (or a tenth of the run). The bug this guards
        // against (a delay growing with every completion since the last signal) held interrupts for seconds of
        // continuous completions.
        Assert.True(maxStarved < Math.Max(200, completed / 10),
            $"{maxStarved} of {completed} completions seen without an interrupt for more than {StarvedAfter.TotalMilliseconds} ms (longest wall gap {maxGap:F0} ms, most completions in a gap {maxWithoutSignal}; coalescing {coalesce})");

        // Load stops: everything posted completes.
        var tail = Stopwatch.StartNew();
        while (m.UsedIdx != (ushort)posted && tail.Elapsed < TimeSpan.FromSeconds(5))
        {
            Thread.SpinWait(100);
        }

        Assert.Equal((ushort)posted, m.UsedIdx);
        await Task.Delay(500); // longer than any coalescing delay this load produces
        signals += (long)call.DrainCount();

        // One more request on the now idle queue: its interrupt must come (not owed and forgotten).
        ushort before = m.UsedIdx;
        Post(m, (int)(posted % Slots), posted++, hdr, data, status);
        kick.Signal();
        Assert.True(await VhostTestHost.WaitUntil(() => m.UsedIdx == (ushort)(before + 1)), "idle request not completed");
        // Within one stats interval (10 ms) and a delay computed from an idle interval (none); the bound is for a
        // loaded machine, where the reactor may not run for a while. A held interrupt (the bug be6efa9 fixed: a delay
        // grown with every completion since the last signal, here more than 10 s) does not come within it.
        long last = 0;
        Assert.True(await VhostTestHost.WaitUntil(() => (last = (long)call.DrainCount()) > 0, 5000), $"the last completion was not signalled within 5 s (coalescing {coalesce})");

        // The controller's counter (vhost_get_controllers "interrupts") is exactly the call eventfd writes seen. The
        // reactor counts a signal just after writing it: wait (bounded) for the count to catch up, then no more come.
        long total = signals + last;
        await VhostTestHost.WaitUntil(() => ctrl.Interrupts >= total);
        Assert.Equal(total, ctrl.Interrupts);
        Assert.Equal(0UL, call.DrainCount());
        return (completed, signals, bestWindowRate);
    }

    private static unsafe void Post(DriverRingModel m, int s, long n, ulong[] hdr, ulong[] data, ulong[] status)
    {
        var h = (VirtioBlkOutHeader*)m.Host(hdr[s]);
        h->Type = VirtioBlkRequestType.In;
        h->IoPrio = 0;
        h->Sector = (ulong)(n % 2048);
        *m.Host(status[s]) = 0xff;
        m.SetDesc(3 * s, hdr[s], 16, VirtqDesc.FlagNext, (ushort)((3 * s) + 1));
        m.SetDesc((3 * s) + 1, data[s], 512, VirtqDesc.FlagNext | VirtqDesc.FlagWrite, (ushort)((3 * s) + 2));
        m.SetDesc((3 * s) + 2, status[s], 1, VirtqDesc.FlagWrite);
        m.Publish((ushort)(3 * s));
    }

    private static unsafe byte StatusOf(DriverRingModel m, ulong gpa) => *m.Host(gpa);
}
