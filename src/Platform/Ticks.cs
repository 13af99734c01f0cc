using System.Diagnostics;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using Tmds.Linux;

namespace VhostBackend.Platform;

/// <summary>
/// The hot path's clock, like spdk_get_ticks: the CPU's time-stamp counter where it is invariant (x86-64 with
/// constant_tsc and nonstop_tsc), else <see cref="Stopwatch.GetTimestamp"/>. Reading the TSC costs ~12 ns in
/// this kind of VM against ~35 ns for clock_gettime through the runtime, and a polling reactor reads the clock
/// every loop iteration. <see cref="Frequency"/> is calibrated against the monotonic clock once, at first use.
/// Every tick value in the process comes from here, so they can be compared and subtracted with each other.
/// </summary>
public static unsafe class Ticks
{
    // rdtsc; shl rdx, 32; or rax, rdx; ret
    private static ReadOnlySpan<byte> RdtscCode => [0x0F, 0x31, 0x48, 0xC1, 0xE2, 0x20, 0x48, 0x09, 0xD0, 0xC3];

    private static readonly delegate* unmanaged[SuppressGCTransition]<ulong> s_rdtsc = CreateRdtsc();

    /// <summary>Ticks per second.</summary>
    public static readonly long Frequency = s_rdtsc == null ? Stopwatch.Frequency : Calibrate();

    /// <summary>Whether ticks come from the TSC (false: the monotonic clock through <see cref="Stopwatch"/>).</summary>
    public static bool IsTsc => s_rdtsc != null;

    /// <summary>The current tick count.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static long Now() => s_rdtsc != null ? (long)s_rdtsc() : Stopwatch.GetTimestamp();

    /// <summary>Converts microseconds to ticks (exact integer math up to about an hour).</summary>
    public static long FromMicroseconds(long us) => us * Frequency / 1_000_000;

    /// <summary>Converts ticks to microseconds.</summary>
    public static double ToMicroseconds(long ticks) => ticks * 1_000_000.0 / Frequency;

    private static delegate* unmanaged[SuppressGCTransition]<ulong> CreateRdtsc()
    {
        if (RuntimeInformation.ProcessArchitecture != Architecture.X64
            || Environment.GetEnvironmentVariable("VHOSTBACKEND_NO_TSC") == "1"
            || !HasInvariantTsc())
        {
            return null;
        }

        // A private page holding the ten bytes above, made read+execute before first use.
        void* page = LibC.mmap(null, 4096, LibC.PROT_READ | LibC.PROT_WRITE, LibC.MAP_PRIVATE | LibC.MAP_ANONYMOUS, -1, 0);
        if (page == (void*)-1)
        {
            return null;
        }

        RdtscCode.CopyTo(new Span<byte>(page, 4096));
        if (LibC.mprotect(page, 4096, LibC.PROT_READ | LibC.PROT_EXEC) != 0)
        {
            LibC.munmap(page, 4096);
            return null;
        }

        return (delegate* unmanaged[SuppressGCTransition]<ulong>)page;
    }

    private static bool HasInvariantTsc()
    {
        try
        {
            foreach (var line in File.ReadLines("/proc/cpuinfo"))
            {
                if (line.StartsWith("flags", StringComparison.Ordinal))
                {
                    var flags = line.Split(' ', StringSplitOptions.RemoveEmptyEntries);
                    return flags.Contains("constant_tsc") && flags.Contains("nonstop_tsc");
                }
            }
        }
        catch (IOException)
        {
        }

        return false;
    }

    private static long Calibrate()
    {
        // TSC ticks over ~20 ms of the monotonic clock, each end bracketed tightly (a context switch between the
        // two reads of a pair would skew it: take the pair with the smallest gap of a few).
        static (long Tsc, long Clock) Pair()
        {
            long bestGap = long.MaxValue;
            (long, long) best = default;
            for (int i = 0; i < 5; i++)
            {
                long t0 = (long)s_rdtsc();
                long c = Stopwatch.GetTimestamp();
                long t1 = (long)s_rdtsc();
                if (t1 - t0 < bestGap)
                {
                    bestGap = t1 - t0;
                    best = (t0 + ((t1 - t0) / 2), c);
                }
            }

            return best;
        }

        var a = Pair();
        Thread.Sleep(20);
        var b = Pair();
        double seconds = (b.Clock - a.Clock) / (double)Stopwatch.Frequency;
        return (long)((b.Tsc - a.Tsc) / seconds);
    }
}
