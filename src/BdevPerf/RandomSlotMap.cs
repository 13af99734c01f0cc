namespace VhostBackend.BdevPerf;

/// <summary>
/// -D (SPDK's random map): random slots each taken once per pass. <see cref="Take"/> turns a random slot into the
/// first slot at or after it (wrapping) not yet taken in this pass; a pass ends when every slot was taken and the
/// next starts empty. A bit per slot, allocated once; nothing per call.
/// </summary>
public sealed class RandomSlotMap
{
    private readonly ulong[] _bits;
    private readonly ulong _slots;
    private ulong _taken;

    public RandomSlotMap(ulong slots)
    {
        ArgumentOutOfRangeException.ThrowIfZero(slots);
        _slots = slots;
        _bits = new ulong[(slots + 63) / 64];
    }

    /// <summary>Slots taken in the current pass.</summary>
    public ulong Taken => _taken;

    public ulong Take(ulong slot)
    {
        if (_taken == _slots)
        {
            Array.Clear(_bits);
            _taken = 0;
        }

        slot %= _slots;
        int word = (int)(slot / 64);
        ulong free = ~_bits[word] & (ulong.MaxValue << (int)(slot % 64));
        while (true)
        {
            if (free != 0)
            {
                ulong found = ((ulong)word * 64) + (ulong)System.Numerics.BitOperations.TrailingZeroCount(free);
                if (found < _slots)
                {
                    _bits[word] |= 1UL << (int)(found % 64);
                    _taken++;
                    return found;
                }
            }

            word = word + 1 == _bits.Length ? 0 : word + 1;
            free = ~_bits[word];
        }
    }
}
