using System.Globalization;
using Tmds.Linux;

namespace VhostBackend.Platform;

/// <summary>
/// A set of CPU cores parsed from SPDK's notations: a hex mask (<c>0x3</c>, <c>3</c>), or a list in
/// brackets with ranges (<c>[0,2-3]</c>). Parsing is strict: anything else is a <see cref="FormatException"/>.
/// </summary>
public sealed class CpuSet
{
    private readonly int[] _cores;

    private CpuSet(int[] cores) => _cores = cores;

    public IReadOnlyList<int> Cores => _cores;

    public static CpuSet Parse(string text)
    {
        if (TryParse(text, out var set, out var error))
        {
            return set;
        }

        throw new FormatException(error);
    }

    public static bool TryParse(string? text, out CpuSet set, out string error)
    {
        set = null!;
        error = "";
        text = text?.Trim();
        if (string.IsNullOrEmpty(text))
        {
            error = "empty CPU mask";
            return false;
        }

        var cores = new SortedSet<int>();
        if (text.StartsWith('['))
        {
            if (!text.EndsWith(']'))
            {
                error = $"CPU list '{text}' has no closing ']'";
                return false;
            }

            foreach (var part in text[1..^1].Split(',', StringSplitOptions.TrimEntries))
            {
                var range = part.Split('-', StringSplitOptions.TrimEntries);
                if (range.Length is < 1 or > 2
                    || !int.TryParse(range[0], NumberStyles.None, CultureInfo.InvariantCulture, out int lo)
                    || !int.TryParse(range[^1], NumberStyles.None, CultureInfo.InvariantCulture, out int hi)
                    || hi < lo || hi >= 1024)
                {
                    error = $"bad entry '{part}' in CPU list '{text}'";
                    return false;
                }

                for (int c = lo; c <= hi; c++)
                {
                    cores.Add(c);
                }
            }
        }
        else
        {
            var hex = text.StartsWith("0x", StringComparison.OrdinalIgnoreCase) ? text[2..] : text;
            if (hex.Length == 0 || hex.Length > 16 || !ulong.TryParse(hex, NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture, out ulong mask))
            {
                error = $"bad CPU mask '{text}' (expected hex like 0x3 or a list like [0,1])";
                return false;
            }

            for (int c = 0; c < 64; c++)
            {
                if ((mask & (1UL << c)) != 0)
                {
                    cores.Add(c);
                }
            }
        }

        if (cores.Count == 0)
        {
            error = $"CPU mask '{text}' selects no core";
            return false;
        }

        set = new CpuSet(cores.ToArray());
        return true;
    }

    public static CpuSet Of(params int[] cores) => new(cores.Distinct().Order().ToArray());

    public bool Contains(int core) => Array.IndexOf(_cores, core) >= 0;

    /// <summary>The mask in SPDK's hex notation (cores above 63 are not representable and are dropped).</summary>
    public string ToMaskString()
    {
        ulong mask = 0;
        foreach (int c in _cores)
        {
            if (c < 64)
            {
                mask |= 1UL << c;
            }
        }

        return "0x" + mask.ToString("x", CultureInfo.InvariantCulture);
    }

    public override string ToString() => ToMaskString();

    /// <summary>Pins the calling OS thread to one core. Returns 0 or the errno.</summary>
    public static unsafe int PinCurrentThread(int core)
    {
        cpu_set_t set = default;
        LibC.CPU_SET(core, &set);
        int rc = LibC.sched_setaffinity(0, (size_t)sizeof(cpu_set_t), &set);
        return rc == 0 ? 0 : Native.Errno;
    }

    /// <summary>The cores this process may run on.</summary>
    public static unsafe CpuSet Online()
    {
        cpu_set_t set = default;
        if (LibC.sched_getaffinity(0, (size_t)sizeof(cpu_set_t), &set) != 0)
        {
            return Of(Enumerable.Range(0, Environment.ProcessorCount).ToArray());
        }

        var cores = new List<int>();
        byte* bytes = (byte*)&set;
        for (int c = 0; c < sizeof(cpu_set_t) * 8; c++)
        {
            if ((bytes[c / 8] & (1 << (c % 8))) != 0)
            {
                cores.Add(c);
            }
        }

        return new CpuSet(cores.ToArray());
    }
}
