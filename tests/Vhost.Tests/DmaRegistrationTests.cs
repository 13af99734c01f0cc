using VhostBackend.Bdev;
using VhostBackend.Platform;
using VhostBackend.Reactors;
using VhostBackend.VhostUser;
using VhostBackend.Virtio;
using VhostBackend.Virtio.Blk;
using VhostBackend.Virtio.Tests;
using Xunit;

namespace VhostBackend.Vhost.Tests;

/// <summary>
/// Guest memory is registered for device DMA (the process's <see cref="DmaMemoryRegistry"/>) while mapped, and withdrawn
/// on SET_MEM_TABLE and disconnect only after the requests using it completed (a device may write it until then).
/// </summary>
public sealed class DmaRegistrationTests
{
    private const ulong WantProtocol = (1UL << VhostUserProtocolFeature.ReplyAck) | (1UL << VhostUserProtocolFeature.Config)
        | (1UL << VhostUserProtocolFeature.Mq) | (1UL << VhostUserProtocolFeature.ConfigureMemSlots);

    /// <summary>
    /// Records the registry's announcements in order. Other test classes running in parallel register (and withdraw)
    /// their own memory in the same process, and a withdrawn mapping's addresses are reused by the next mmap, so a test
    /// identifies its range exactly (address and length, while live) and looks only at events after that point.
    /// </summary>
    private sealed class Listener : IDmaMemoryListener
    {
        private readonly List<(bool Register, nint Va, ulong Len)> _events = new();
        private readonly List<(nint Va, ulong Len)> _live = new();

        public int OnRegister(nint va, ulong length)
        {
            lock (_events)
            {
                _live.Add((va, length));
                _events.Add((true, va, length));
            }

            return 0;
        }

        public void OnUnregister(nint va, ulong length)
        {
            lock (_events)
            {
                _live.Remove((va, length));
                _events.Add((false, va, length));
            }
        }

        /// <summary>The live range holding <paramref name="p"/> and the event position to look from, or null.</summary>
        public (nint Va, ulong Len, int Since)? LiveRangeOf(nint p)
        {
            lock (_events)
            {
                foreach (var r in _live)
                {
                    if (Contains(r, p))
                    {
                        return (r.Va, r.Len, _events.Count);
                    }
                }

                return null;
            }
        }

        /// <summary>Whether exactly that range was withdrawn after the position <see cref="LiveRangeOf"/> returned.</summary>
        public bool WithdrawnSince((nint Va, ulong Len, int Since) r)
        {
            lock (_events)
            {
                for (int i = r.Since; i < _events.Count; i++)
                {
                    if (!_events[i].Register && _events[i].Va == r.Va && _events[i].Len == r.Len)
                    {
                        return true;
                    }
                }

                return false;
            }
        }

        private static bool Contains((nint Va, ulong Len) r, nint p) => (ulong)p >= (ulong)r.Va && (ulong)p - (ulong)r.Va < r.Len;
    }

    /// <summary>
    /// A bdev MODEL that holds every I/O until the test releases it (a device still working on the buffer). After
    /// <see cref="ReleaseAll"/> it completes at once, so a test that fails early never leaves the host's disposal
    /// waiting for I/O no one will complete (the session waits for in-flight requests before it lets memory go).
    /// </summary>
    private sealed class HoldBdev(string name) : Bdev.Bdev(name, "Hold", 512, 2048)
    {
        private readonly Device _device = new();
        private bool _released;

        public List<(BdevIo Io, Reactor Reactor, nint Buffer)> Held { get; } = new();

        public override bool SupportsIoType(BdevIoType type) => type is BdevIoType.Read or BdevIoType.Write or BdevIoType.Flush;

        protected override IoChannel GetModuleChannel(Reactor reactor) => reactor.GetIoChannel(_device);

        protected override void Submit(IoChannel moduleChannel, BdevIo io)
        {
            lock (Held)
            {
                if (_released)
                {
                    moduleChannel.Reactor.Send(static s => ((BdevIo)s!).Complete(BdevIoStatus.Success), io);
                    return;
                }

                Held.Add((io, moduleChannel.Reactor, io.Iovs.Length > 0 ? io.Iovs[0].Base : 0));
            }
        }

        public void ReleaseAll()
        {
            lock (Held)
            {
                _released = true;
                foreach (var (io, reactor, _) in Held)
                {
                    reactor.Send(static s => ((BdevIo)s!).Complete(BdevIoStatus.Success), io);
                }

                Held.Clear();
            }
        }

        private sealed class Device : IoDevice
        {
            public Device()
                : base("hold")
            {
            }

            protected override object CreateChannelContext(Reactor reactor) => this;

            protected override void DestroyChannelContext(Reactor reactor, object context)
            {
            }
        }
    }

    private static (FrontEndModel Fe, DriverRingModel M, BlkDriverModel Drv) Connect(VhostTestHost host, string ctrl)
    {
        var fe = host.Connect(ctrl);
        fe.Negotiate(WantProtocol);
        Assert.Equal(0UL, fe.SetU64(VhostUserRequest.SetFeatures, (1UL << VirtioFeatures.Version1) | (1UL << VhostUserConstants.ProtocolFeaturesBit)));
        var m = new DriverRingModel(16);
        Assert.Equal(0UL, fe.SetMemTable(m));
        Assert.Equal(0UL, fe.SetupQueue(m, 0, null, null));
        return (fe, m, new BlkDriverModel(m));
    }

    // Session s24 skipped this test: it hung about 1 run in 5 under load. The hang was the test's own failure path: an
    // assertion failing while the model held the I/O left the session waiting forever for those requests (as it must:
    // memory stays mapped until the device is done) and the host's disposal waiting for the session. The assertion that
    // failed was most likely the withdrawal check matching another test's withdrawn range at a reused address. Now the
    // I/O is released in a finally and the range is identified exactly (docs/DMA.md).
    [Fact]
    public async Task GuestMemoryStaysRegisteredUntilInFlightIoCompletesOnDisconnect()
    {
        var listener = new Listener();
        using var sub = DmaMemoryRegistry.Process.Subscribe(listener);
        await using var host = new VhostTestHost();
        var bdev = new HoldBdev("Hold0");
        host.Bdevs.Register(bdev);
        host.Vhost.CreateBlkController("dma", "Hold0", "0x1", readOnly: false);
        var (fe, m, drv) = Connect(host, "dma");
        using var ring = m;
        using var front = fe;
        (nint Va, ulong Len, int Since) range;
        try
        {
            for (int i = 0; i < 3; i++)
            {
                drv.Post(VirtioBlkRequestType.Out, (ulong)i * 8, m.Alloc(4096, 4096), 4096, deviceWritesData: false);
            }

            Assert.True(await VhostTestHost.WaitUntil(() => { lock (bdev.Held) { return bdev.Held.Count == 3; } }, 15000), "requests did not reach the bdev");
            nint buffer;
            lock (bdev.Held)
            {
                buffer = bdev.Held[0].Buffer;
            }

            range = listener.LiveRangeOf(buffer) ?? throw new Xunit.Sdk.XunitException("the guest buffer is not in registered DMA memory");

            fe.Dispose(); // the front end goes away with 3 requests at the "device"
            await Task.Delay(500);
            Assert.False(listener.WithdrawnSince(range), "guest memory was withdrawn from DMA while a device still owned a buffer in it");
        }
        finally
        {
            bdev.ReleaseAll();
        }

        Assert.True(await VhostTestHost.WaitUntil(() => listener.WithdrawnSince(range), 15000), "guest memory still registered after the session ended");
        Assert.True(await VhostTestHost.WaitUntil(() => host.Vhost.Find("dma")!.Sessions.Count == 0, 15000), "the session did not close");
    }

    [Fact]
    public async Task SetMemTableWithdrawsTheOldRegionsOnlyAfterTheQueuesDrained()
    {
        var listener = new Listener();
        using var sub = DmaMemoryRegistry.Process.Subscribe(listener);
        await using var host = new VhostTestHost();
        var bdev = new HoldBdev("Hold1");
        host.Bdevs.Register(bdev);
        host.Vhost.CreateBlkController("dma2", "Hold1", "0x1", readOnly: false);
        var (fe, m, drv) = Connect(host, "dma2");
        using var ring = m;
        using var front = fe;
        using var m2 = new DriverRingModel(16);
        Task<ulong> change;
        (nint Va, ulong Len, int Since) oldRange;
        try
        {
            drv.Post(VirtioBlkRequestType.In, 0, m.Alloc(8192, 4096), 8192, deviceWritesData: true);
            Assert.True(await VhostTestHost.WaitUntil(() => { lock (bdev.Held) { return bdev.Held.Count == 1; } }, 15000), "the read did not reach the bdev");
            nint oldBuffer;
            lock (bdev.Held)
            {
                oldBuffer = bdev.Held[0].Buffer;
            }

            oldRange = listener.LiveRangeOf(oldBuffer) ?? throw new Xunit.Sdk.XunitException("the guest buffer is not in registered DMA memory");

            // The front end's memory table changes (e.g. memory hotplug) while the read is at the device.
            change = Task.Run(() => fe.SetMemTable(m2));
            await Task.Delay(500);
            Assert.False(change.IsCompleted, "SET_MEM_TABLE finished while a request was in flight");
            Assert.False(listener.WithdrawnSince(oldRange), "the old region was withdrawn from DMA with a read in flight into it");
        }
        finally
        {
            bdev.ReleaseAll();
        }

        Assert.Equal(0UL, await change.WaitAsync(TimeSpan.FromSeconds(15)));
        Assert.True(listener.WithdrawnSince(oldRange), "the old region is still registered after the table changed");
    }
}
