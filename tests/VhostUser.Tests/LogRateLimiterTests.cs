using VhostBackend.Platform;
using Xunit;

namespace VhostBackend.VhostUser.Tests;

public class LogRateLimiterTests
{
    [Fact]
    public void ABurstThenAFewPerSecondWithTheSuppressedCount()
    {
        var l = new LogRateLimiter(burst: 3, perSecond: 2);
        long t = 1000;
        for (int i = 0; i < 3; i++)
        {
            Assert.True(l.TryAcquire(t, out long s));
            Assert.Equal(0, s);
        }

        for (int i = 0; i < 100; i++)
        {
            Assert.False(l.TryAcquire(t + i, out _));
        }

        // Half a second later one line is allowed, and it reports the 100 it dropped.
        t += Ticks.Frequency / 2;
        Assert.True(l.TryAcquire(t, out long suppressed));
        Assert.Equal(100, suppressed);
        Assert.False(l.TryAcquire(t, out _));
    }
}
