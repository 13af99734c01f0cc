using VhostBackend.Platform;
using Xunit;

namespace VhostBackend.VhostUser.Tests;

public class VringStateTests
{
    private sealed class Runner : IVhostQueueRunner
    {
        public uint StopAt { get; init; }

        public int InFlight => 0;

        public Task<uint> StopAsync() => Task.FromResult(StopAt);

        public Task SetCallAsync(EventFd? call) => Task.CompletedTask;
    }

    private static readonly VhostUserVringAddr Addr = new() { Index = 0, DescUserAddr = 0x1000, AvailUserAddr = 0x2000, UsedUserAddr = 0x3000 };

    [Fact]
    public void ARingBecomesCompleteOnlyWithSizeAddressesKickEnableAndMemory()
    {
        var v = new VringState(0);
        Assert.False(v.IsComplete(true));
        Assert.Equal(VringError.None, v.SetNum(256));
        Assert.False(v.IsComplete(true));
        Assert.Equal(VringError.None, v.SetAddress(Addr));
        Assert.False(v.IsComplete(true));
        Assert.Equal(VringError.None, v.SetKick(null)); // "no fd": poll only, still a kick message
        Assert.True(v.KickReceived);
        Assert.False(v.IsComplete(false)); // no guest memory yet
        Assert.True(v.IsComplete(true));

        // With VHOST_USER_F_PROTOCOL_FEATURES rings start disabled and wait for SET_VRING_ENABLE.
        v.SetInitialEnable(false);
        Assert.False(v.IsComplete(true));
        Assert.Equal(VringError.None, v.SetEnable(1));
        Assert.True(v.IsComplete(true));
    }

    [Fact]
    public void StartedRingRefusesChangesAndGivesItsBaseBack()
    {
        var v = new VringState(0);
        v.SetNum(16);
        v.SetAddress(Addr);
        v.SetKick(new EventFd());
        v.MarkStarted(new Runner());
        Assert.True(v.Started);
        Assert.False(v.IsComplete(true)); // already handed over
        Assert.Equal(VringError.Running, v.SetNum(32));
        Assert.Equal(VringError.Running, v.SetBase(5));
        Assert.Equal(VringError.Running, v.SetAddress(Addr));

        v.MarkStopped(42);
        Assert.False(v.Started);
        Assert.Equal(42u, v.Base);
        Assert.True(v.IsComplete(true));

        // GET_VRING_BASE: the kick is dropped, a new SET_VRING_KICK is needed.
        v.Suspend();
        Assert.Null(v.Kick);
        Assert.False(v.IsComplete(true));
        v.SetKick(new EventFd());
        Assert.True(v.IsComplete(true));

        v.Reset();
        Assert.Equal(0u, v.Num);
        Assert.Null(v.Address);
        Assert.Null(v.Kick);
        Assert.False(v.IsComplete(true));
    }

    [Fact]
    public void BadValuesAreRefused()
    {
        var v = new VringState(0);
        Assert.Equal(VringError.BadSize, v.SetNum(0));
        Assert.Equal(VringError.BadSize, v.SetNum(100));
        Assert.Equal(VringError.BadSize, v.SetNum(65536));
        Assert.Equal(VringError.BadBase, v.SetBase(65536));
        // A packed ring's base is 32 bits (indices and wrap counters).
        Assert.Equal(VringError.None, v.SetBase(0x8000_8000, packed: true));
        Assert.Equal(0x8000_8000u, v.Base);
        Assert.Equal(VringError.BadEnable, v.SetEnable(2));
        Assert.Equal(VringError.BadAddress, v.SetAddress(Addr with { Flags = 4 }));
        Assert.Equal(VringError.BadAddress, v.SetAddress(Addr with { DescUserAddr = 0x1008 }));
        Assert.Equal(VringError.BadAddress, v.SetAddress(Addr with { UsedUserAddr = 0x3002 }));
        Assert.Null(v.Address);
    }

    [Fact]
    public void CallSwapReturnsTheOldFdForTheCallerToDispose()
    {
        var v = new VringState(0);
        var first = new EventFd();
        Assert.Null(v.SetCall(first));
        using var second = new EventFd();
        var old = v.SetCall(second);
        Assert.Same(first, old);
        old!.Dispose();
        Assert.Same(second, v.Call);
    }
}
