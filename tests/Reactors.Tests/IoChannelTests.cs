using Xunit;

namespace VhostBackend.Reactors.Tests;

public class IoChannelTests
{
    private sealed class CountingDevice : IoDevice
    {
        public int Created;
        public int Destroyed;
        public readonly List<(Reactor Reactor, Reactor? Thread)> Events = new();

        public CountingDevice()
            : base("counting")
        {
        }

        protected internal override object CreateChannelContext(Reactor reactor)
        {
            Interlocked.Increment(ref Created);
            lock (Events)
            {
                Events.Add((reactor, Reactor.Current));
            }

            return new object();
        }

        protected internal override void DestroyChannelContext(Reactor reactor, object context)
        {
            Interlocked.Increment(ref Destroyed);
            lock (Events)
            {
                Events.Add((reactor, Reactor.Current));
            }
        }
    }

    [Fact]
    public async Task A_Channel_Taken_Again_Before_Its_Queued_Destruction_Is_Revived_Not_Duplicated()
    {
        // SPDK's put/get_io_channel: the last release queues the destruction; a get on the same thread before it
        // runs takes the same channel back (a module never sees two contexts of one device on one thread).
        await using var rt = TestRuntime.Start(1);
        var dev = new CountingDevice();
        var r = rt.Reactors[0];
        var (first, again) = await r.InvokeAsync(() =>
        {
            var a = r.GetIoChannel(dev);
            a.Release();
            var b = r.GetIoChannel(dev);
            return (a, b);
        });
        Assert.Same(first, again);
        await r.InvokeAsync(() => 0); // the queued destruction has run (and did nothing)
        Assert.Equal(1, dev.Created);
        Assert.Equal(0, dev.Destroyed);

        // Released for good: destroyed once; a later get creates a new context.
        await r.InvokeAsync(() => again.Release());
        await r.InvokeAsync(() => 0);
        Assert.Equal(1, dev.Destroyed);
        var third = await r.InvokeAsync(() => r.GetIoChannel(dev));
        Assert.NotSame(first, third);
        Assert.Equal(2, dev.Created);
        await r.InvokeAsync(() => third.Release());
    }

    [Fact]
    public async Task Channel_Per_Reactor_RefCounted_Created_And_Destroyed_On_Its_Thread()
    {
        await using var rt = TestRuntime.Start(2);
        var dev = new CountingDevice();
        var channels = new List<IoChannel>();
        foreach (var r in rt.Reactors)
        {
            var (a, b) = await r.InvokeAsync(() => (r.GetIoChannel(dev), r.GetIoChannel(dev)));
            Assert.Same(a, b);
            Assert.Equal(2, a.RefCount);
            Assert.Same(r, a.Reactor);
            channels.Add(a);
        }

        Assert.Equal(rt.Reactors.Count, dev.Created);
        Assert.Equal(rt.Reactors.Count, dev.SnapshotChannels().Length);

        int visited = 0;
        await await rt.Main.InvokeAsync(() => dev.ForEachChannelAsync(ch =>
        {
            Assert.Same(ch.Reactor, Reactor.Current);
            visited++;
        }));
        Assert.Equal(rt.Reactors.Count, visited);

        int released = 0;
        foreach (var ch in channels)
        {
            await ch.Reactor.InvokeAsync(() => ch.Release());
            Assert.Equal(released, dev.Destroyed); // one reference left
            int destroyedInsideRelease = await ch.Reactor.InvokeAsync(() =>
            {
                ch.Release();
                return dev.Destroyed;
            });
            Assert.Equal(released, destroyedInsideRelease); // destroyed on a later iteration, never inside Release
            released++;
            Assert.True(await TestRuntime.WaitUntil(() => Volatile.Read(ref dev.Destroyed) == released));
        }

        Assert.Equal(rt.Reactors.Count, dev.Destroyed);
        Assert.Empty(dev.SnapshotChannels());
        Assert.True(dev.Events.Count == 2 * rt.Reactors.Count);
        Assert.All(dev.Events, e => Assert.Same(e.Reactor, e.Thread));
    }

    [Fact]
    public async Task Release_Off_Reactor_Throws()
    {
        await using var rt = TestRuntime.Start(1);
        var dev = new CountingDevice();
        var ch = await rt.Main.InvokeAsync(() => rt.Main.GetIoChannel(dev));
        Assert.Throws<InvalidOperationException>(() => ch.Release());
    }
}
