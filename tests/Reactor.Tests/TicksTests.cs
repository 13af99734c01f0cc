using Xunit;
using System.Diagnostics;
using VhostBackend.Platform;

namespace VhostBackend.Reactor.Tests;

public class TicksTests
{
    [Fact]
    public void Ticks_Advance_At_The_Calibrated_Frequency()
    {
        // Over ~200 ms of the monotonic clock the tick source must advance by Frequency * elapsed (within 2%),
        // whether it is the TSC or the fallback.
        long t0 = Ticks.Now();
        long c0 = Stopwatch.GetTimestamp();
        Thread.Sleep(200);
        long t1 = Ticks.Now();
        long c1 = Stopwatch.GetTimestamp();
        double clockSeconds = (c1 - c0) / (double)Stopwatch.Frequency;
        double tickSeconds = (t1 - t0) / (double)Ticks.Frequency;
        Assert.InRange(tickSeconds / clockSeconds, 0.98, 1.02);
        Assert.InRange(Ticks.Frequency, 1_000_000L, 10_000_000_000L);
    }

    [Fact]
    public void Ticks_Never_Go_Backwards_On_One_Thread()
    {
        long last = Ticks.Now();
        for (int i = 0; i < 1_000_000; i++)
        {
            long now = Ticks.Now();
            Assert.True(now >= last, $"tick went back from {last} to {now}");
            last = now;
        }
    }

    [Fact]
    public void Microsecond_Conversions_Round_Trip()
    {
        long t = Ticks.FromMicroseconds(1500);
        Assert.InRange(Ticks.ToMicroseconds(t), 1499.9, 1500.1);
    }
}
