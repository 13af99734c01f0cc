namespace VhostBackend.BdevPerf;

/// <summary>
/// -F: slots 0..n-1 drawn from a zipf distribution (slot k-1 with probability proportional to 1/k^theta, so slot 0
/// is the hottest), by rejection-inversion sampling (W. Hörmann, G. Derflinger, "Rejection-inversion to generate
/// variates from monotone discrete distributions", 1996): constant time and memory for any n and theta &gt; 0, no
/// table. Allocation-free; the caller's xorshift state supplies the uniform numbers.
/// </summary>
public sealed class ZipfSampler
{
    private readonly double _n;
    private readonly double _theta;
    private readonly double _hIntegralX1;
    private readonly double _hIntegralN;
    private readonly double _s;

    public ZipfSampler(ulong n, double theta)
    {
        ArgumentOutOfRangeException.ThrowIfZero(n);
        if (!(theta > 0) || double.IsInfinity(theta))
        {
            throw new ArgumentOutOfRangeException(nameof(theta), theta, "zipf theta must be a positive number");
        }

        _n = n;
        _theta = theta;
        _hIntegralX1 = HIntegral(1.5) - 1.0;
        _hIntegralN = HIntegral(_n + 0.5);
        _s = 2.0 - HIntegralInverse(HIntegral(2.5) - H(2.0));
    }

    /// <summary>A slot in [0, n).</summary>
    public ulong Sample(ref ulong rng)
    {
        while (true)
        {
            double u = _hIntegralN + (Uniform(ref rng) * (_hIntegralX1 - _hIntegralN));
            double x = HIntegralInverse(u);
            double k = Math.Floor(x + 0.5);
            k = Math.Clamp(k, 1.0, _n);
            if (k - x <= _s || u >= HIntegral(k + 0.5) - H(k))
            {
                return (ulong)k - 1;
            }
        }
    }

    /// <summary>A uniform double in [0, 1) from xorshift64* state.</summary>
    private static double Uniform(ref ulong rng)
    {
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        return ((rng * 2685821657736338717UL) >> 11) * (1.0 / (1UL << 53));
    }

    private double H(double x) => Math.Exp(-_theta * Math.Log(x));

    // The integral of h from 1 to x, shifted: (x^(1-theta) - 1) / (1 - theta), log(x) at theta = 1.
    private double HIntegral(double x)
    {
        double logX = Math.Log(x);
        return Helper2((1.0 - _theta) * logX) * logX;
    }

    private double HIntegralInverse(double x)
    {
        double t = x * (1.0 - _theta);
        if (t < -1.0)
        {
            t = -1.0; // limited by rounding
        }

        return Math.Exp(Helper1(t) * x);
    }

    // log(1 + x) / x, exact near 0.
    private static double Helper1(double x) =>
        Math.Abs(x) > 1e-8 ? double.LogP1(x) / x : 1.0 - (x * ((1.0 / 2.0) - (x * ((1.0 / 3.0) - (x / 4.0)))));

    // (exp(x) - 1) / x, exact near 0.
    private static double Helper2(double x) =>
        Math.Abs(x) > 1e-8 ? double.ExpM1(x) / x : 1.0 + (x * (1.0 / 2.0) * (1.0 + (x * (1.0 / 3.0) * (1.0 + (x / 4.0)))));
}
