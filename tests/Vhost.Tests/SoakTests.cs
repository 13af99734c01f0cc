using System.Diagnostics;
using VhostBackend.BdevMalloc;
using VhostBackend.Platform;
using VhostBackend.VhostUser;
using VhostBackend.Virtio;
using VhostBackend.Virtio.Blk;
using VhostBackend.Virtio.Scsi;
using VhostBackend.Virtio.Tests;
using Xunit;
using Xunit.Abstractions;

namespace VhostBackend.Vhost.Tests;

/// <summary>
/// Soak: 100 SCSI LUN hot-add/remove cycles (each on a fresh bdev, deleted afterwards) and 100 guest
/// connect/disconnect cycles (each with I/O, the last request of every session still in flight when it
/// disconnects), while a healthy guest on another controller keeps doing verified I/O. Open fds, mappings,
/// threads and managed memory are counted after a warm-up and at the end: none may grow, and the healthy guest
/// sees no error and no stall.
/// </summary>
[Collection(SoakCollection.Name)]
public sealed class SoakTests(ITestOutputHelper output)
{
    private const ulong WantProtocol = (1UL << VhostUserProtocolFeature.ReplyAck) | (1UL << VhostUserProtocolFeature.Config)
        | (1UL << VhostUserProtocolFeature.Mq) | (1UL << VhostUserProtocolFeature.ConfigureMemSlots);

    [Fact]
    public async Task HundredsOfHotplugAndConnectCyclesLeakNothing()
    {
        await using var host = new VhostTestHost(reactors: 2);
        host.Vhost.CreateBlkController("steady", "Malloc0", null, readOnly: false);
        host.Bdevs.Register(new MallocBdev("Cyc0", 4096, 512));
        var cycling = host.Vhost.CreateBlkController("cycle", "Cyc0", null, readOnly: false);
        var scsi = host.Vhost.CreateScsiController("soak.scsi", null);

        // The unaffected guest.
        using var gm = new DriverRingModel(64);
        using var gfe = host.Connect("steady");
        gfe.Negotiate(WantProtocol);
        Assert.Equal(0UL, gfe.SetU64(VhostUserRequest.SetFeatures, (1UL << VirtioFeatures.Version1) | (1UL << VhostUserConstants.ProtocolFeaturesBit)));
        Assert.Equal(0UL, gfe.SetMemTable(gm));
        using var gcall = new EventFd();
        Assert.Equal(0UL, gfe.SetupQueue(gm, 0, null, gcall));
        using var stop = new CancellationTokenSource();
        long goodOps = 0;
        string? goodError = null;
        var good = Task.Run(() => HealthyGuestModel.Run(gm, stop.Token, ref goodOps, ref goodError));

        // A guest attached to the SCSI controller the whole time (sees the hotplug traffic on its session).
        using var sm = new DriverRingModel(16);
        using var sfe = host.Connect("soak.scsi");
        sfe.Negotiate(WantProtocol);
        Assert.Equal(0UL, sfe.SetU64(VhostUserRequest.SetFeatures, (1UL << VirtioFeatures.Version1) | (1UL << VhostUserConstants.ProtocolFeaturesBit) | (1UL << VirtioScsiFeature.Hotplug)));
        Assert.Equal(0UL, sfe.SetMemTable(sm));

        async Task LunCycle(int i)
        {
            string name = "Hot" + i.ToString(System.Globalization.CultureInfo.InvariantCulture);
            await host.Runtime.Main.InvokeAsync(() => host.Bdevs.Register(new MallocBdev(name, 2048, 512)));
            Assert.Equal(1, await host.Runtime.Main.InvokeAsync(() => host.Vhost.AddScsiTarget("soak.scsi", 1, name)));
            await host.Vhost.RemoveScsiTargetAsync("soak.scsi", 1);
            await host.Runtime.Main.InvokeAsync(() => host.Bdevs.UnregisterAsync(host.Bdevs.Find(name)!));
        }

        async Task ConnectCycle()
        {
            using var m = new DriverRingModel(16);
            using (var fe = host.Connect("cycle"))
            {
                fe.Negotiate(WantProtocol);
                Assert.Equal(0UL, fe.SetU64(VhostUserRequest.SetFeatures, (1UL << VirtioFeatures.Version1) | (1UL << VhostUserConstants.ProtocolFeaturesBit)));
                Assert.Equal(0UL, fe.SetMemTable(m));
                using var call = new EventFd();
                Assert.Equal(0UL, fe.SetupQueue(m, 0, null, call));
                var drv = new BlkDriverModel(m);
                ulong buf = m.Alloc(4096, 4096);
                for (int r = 0; r < 4; r++)
                {
                    drv.Post(r % 2 == 0 ? VirtioBlkRequestType.Out : VirtioBlkRequestType.In, (ulong)(r * 8), buf, 4096, r % 2 == 1);
                }

                Assert.True(await VhostTestHost.WaitUntil(() => m.UsedIdx == 4), "cycling guest's I/O did not complete");
                drv.Post(VirtioBlkRequestType.Out, 64, buf, 4096, false); // may still be in flight at the disconnect
            }

            Assert.True(await VhostTestHost.WaitUntil(() => cycling.Sessions.Count == 0), "session not released after disconnect");
        }

        // Warm-up: pools, JIT, thread pool and reactor message queues reach their steady sizes.
        for (int i = 0; i < 10; i++)
        {
            await LunCycle(1000 + i);
            await ConnectCycle();
        }

        var before = Resources.Take();
        long opsBefore = Volatile.Read(ref goodOps);
        var sw = Stopwatch.StartNew();
        for (int i = 0; i < 100; i++)
        {
            await LunCycle(i);
            await ConnectCycle();
        }

        var after = Resources.Take();
        output.WriteLine($"100 + 100 cycles in {sw.Elapsed.TotalSeconds:F1} s; before {before}; after {after}; healthy guest did {Volatile.Read(ref goodOps) - opsBefore} verified I/Os meanwhile");
        stop.Cancel();
        await good;
        Assert.Null(goodError);
        Assert.True(Volatile.Read(ref goodOps) > opsBefore, "the healthy guest made no progress during the soak");

        Assert.True(after.Fds <= before.Fds + 4, $"open fds grew: {before.Fds} -> {after.Fds}");
        // Every guest here is a memfd ("driver-model") the daemon side maps region by region: the daemon's
        // mappings of those must all be gone. Other mappings (RAM disks, GC regions, thread stacks, the JIT's
        // "doublemapper" memfd) may move a little; a leak per cycle would add 100+.
        Assert.True(after.MemfdMaps <= before.MemfdMaps, $"memfd mappings grew: {before.MemfdMaps} -> {after.MemfdMaps}");
        Assert.True(after.Maps <= before.Maps + 40, $"mappings grew: {before.Maps} -> {after.Maps}");
        Assert.True(after.Threads <= before.Threads + 4, $"threads grew: {before.Threads} -> {after.Threads}");
        Assert.True(after.ManagedBytes <= before.ManagedBytes + (8L << 20), $"managed memory grew: {before.ManagedBytes} -> {after.ManagedBytes}");
        Assert.Empty(scsi.Targets);
        Assert.Null(host.Bdevs.Find("Hot99"));
    }

    private readonly record struct Resources(int Fds, int Maps, int MemfdMaps, int Threads, long ManagedBytes)
    {
        public static Resources Take()
        {
            // Sessions close their fds and mappings on their own threads: give them a moment, then count.
            Thread.Sleep(200);
            GC.Collect();
            GC.WaitForPendingFinalizers();
            GC.Collect();
            return new Resources(
                Directory.GetFiles("/proc/self/fd").Length,
                File.ReadAllLines("/proc/self/maps").Length,
                File.ReadAllLines("/proc/self/maps").Count(l => l.Contains("/memfd:driver-model", StringComparison.Ordinal)),
                Process.GetCurrentProcess().Threads.Count,
                GC.GetTotalMemory(forceFullCollection: true));
        }

        public override string ToString() => $"fds {Fds}, maps {Maps} ({MemfdMaps} memfd), threads {Threads}, managed {ManagedBytes / 1024} KiB";
    }
}

/// <summary>The soak test counts the process's fds, mappings and threads: nothing else may run meanwhile.</summary>
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class SoakCollection
{
    public const string Name = "soak (runs alone)";
}
