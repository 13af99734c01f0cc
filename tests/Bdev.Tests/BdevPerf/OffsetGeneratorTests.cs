using VhostBackend.BdevPerf;
using Xunit;

namespace VhostBackend.Bdev.Tests.BdevPerf;

/// <summary>bdevperf's offset generators: -F (zipf) and -D (random map), checked by their distributions.</summary>
public class OffsetGeneratorTests
{
    [Theory]
    [InlineData(0.5)]
    [InlineData(1.0)]
    [InlineData(1.2)]
    public void Zipf_Slots_Follow_One_Over_K_To_The_Theta(double theta)
    {
        const int n = 1000, samples = 400_000;
        var z = new ZipfSampler(n, theta);
        var counts = new int[n];
        ulong rng = 0x1234_5678_9ABC_DEF1;
        for (int i = 0; i < samples; i++)
        {
            ulong s = z.Sample(ref rng);
            Assert.True(s < n, $"slot {s} out of range");
            counts[s]++;
        }

        double norm = 0;
        for (int k = 1; k <= n; k++)
        {
            norm += Math.Pow(k, -theta);
        }

        // The hottest slots against the exact probabilities (within 5 %, far above sampling noise at these counts),
        // and the tail's total.
        foreach (int k in new[] { 1, 2, 3, 10 })
        {
            double expected = samples * Math.Pow(k, -theta) / norm;
            Assert.InRange(counts[k - 1], expected * 0.95, expected * 1.05);
        }

        double tailExpected = 0;
        for (int k = 101; k <= n; k++)
        {
            tailExpected += samples * Math.Pow(k, -theta) / norm;
        }

        Assert.InRange(counts.Skip(100).Sum(), tailExpected * 0.95, tailExpected * 1.05);
    }

    [Fact]
    public void Zipf_Refuses_A_Bad_Theta_And_An_Empty_Range()
    {
        Assert.Throws<ArgumentOutOfRangeException>(() => new ZipfSampler(10, 0));
        Assert.Throws<ArgumentOutOfRangeException>(() => new ZipfSampler(10, double.NaN));
        Assert.Throws<ArgumentOutOfRangeException>(() => new ZipfSampler(0, 1.2));
    }

    [Theory]
    [InlineData(1UL)]
    [InlineData(63UL)]
    [InlineData(64UL)]
    [InlineData(1000UL)]
    public void Random_Map_Takes_Every_Slot_Once_Per_Pass(ulong slots)
    {
        var map = new RandomSlotMap(slots);
        ulong rng = 88172645463325252UL;
        for (int pass = 0; pass < 3; pass++)
        {
            var seen = new bool[slots];
            for (ulong i = 0; i < slots; i++)
            {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                ulong s = map.Take(pass == 1 ? 0 : rng); // pass 1: always the same wish, still every slot once
                Assert.True(s < slots);
                Assert.False(seen[s], $"slot {s} taken twice in pass {pass}");
                seen[s] = true;
            }

            Assert.Equal(slots, map.Taken);
        }
    }
}
