using System.Diagnostics;
using VhostBackend.Platform;
using Xunit;

namespace VhostBackend.Reactors.Tests;

public class TicksTests
{
    [Fact]
    public void Ticks_Advance_At_The_Calibrated_Frequency()
    {
        // Over ~300 ms of the monotonic clock the tick source must advance by Frequency * elapsed (within 2%),
        // whether it is the TSC or the fallback. Each end is the tightest of several bracketed reads, so a
        // preemption between the two clocks (tests run in parallel) cannot skew it.
        static (long Ticks, long Clock) Pair()
        {
            long bestGap = long.MaxValue;
            (long, long) best = default;
            for (int i = 0; i < 20; i++)
            {
                long c0 = Stopwatch.GetTimestamp();
                long t = Ticks.Now();
                long c1 = Stopwatch.GetTimestamp();
                if (c1 - c0 < bestGap)
                {
                    bestGap = c1 - c0;
                    best = (t, c0 + ((c1 - c0) / 2));
                }
            }

            return best;
        }

        var a = Pair();
        Thread.Sleep(300);
        var b = Pair();
        double clockSeconds = (b.Clock - a.Clock) / (double)Stopwatch.Frequency;
        double tickSeconds = (b.Ticks - a.Ticks) / (double)Ticks.Frequency;
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
