namespace VhostBackend.Nvme;

/// <summary>
/// Access to a controller's register file (BAR0). The real one is <see cref="MmioRegisters"/>; in-process models
/// derive from this class to see register and doorbell writes as they happen.
/// </summary>
public abstract class NvmeRegisters
{
    public abstract uint Read32(int offset);

    public abstract void Write32(int offset, uint value);

    /// <summary>64-bit registers as two 32-bit accesses, low dword first (what every controller accepts).</summary>
    public ulong Read64(int offset) => Read32(offset) | ((ulong)Read32(offset + 4) << 32);

    public void Write64(int offset, ulong value)
    {
        Write32(offset, (uint)value);
        Write32(offset + 4, (uint)(value >> 32));
    }
}

/// <summary>BAR0 mapped through VFIO. Every access is a volatile (uncached MMIO) load or store.</summary>
public sealed unsafe class MmioRegisters : NvmeRegisters
{
    private readonly byte* _base;
    private readonly nuint _size;

    public MmioRegisters(nint bar, nuint size)
    {
        _base = (byte*)bar;
        _size = size;
    }

    public override uint Read32(int offset)
    {
        if ((nuint)offset + 4 > _size)
        {
            throw new ArgumentOutOfRangeException(nameof(offset));
        }

        // SAFETY: offset checked against the BAR size; the mapping lives as long as the device.
        return Volatile.Read(ref *(uint*)(_base + offset));
    }

    public override void Write32(int offset, uint value)
    {
        if ((nuint)offset + 4 > _size)
        {
            throw new ArgumentOutOfRangeException(nameof(offset));
        }

        // SAFETY: as above.
        Volatile.Write(ref *(uint*)(_base + offset), value);
    }
}
