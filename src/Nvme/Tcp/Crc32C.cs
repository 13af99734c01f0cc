using System.Buffers.Binary;
using System.Runtime.Intrinsics.X86;

namespace VhostBackend.Nvme.Tcp;

/// <summary>
/// CRC32C (Castagnoli, reflected polynomial 0x82F63B78), the NVMe/TCP header and data digest: the SSE4.2
/// <c>crc32</c> instruction when the CPU has it (8 bytes a step), a table otherwise. Incremental: start with
/// <see cref="Initial"/>, <see cref="Update"/> over the pieces, <see cref="Finish"/> for the digest value.
/// </summary>
public static class Crc32C
{
    public const uint Initial = 0xFFFFFFFF;
    private static readonly uint[] s_table = MakeTable();

    /// <summary>True when the hardware instruction is used.</summary>
    public static bool IsHardwareAccelerated => Sse42.X64.IsSupported || Sse42.IsSupported;

    private static uint[] MakeTable()
    {
        var t = new uint[256];
        for (uint i = 0; i < 256; i++)
        {
            uint c = i;
            for (int k = 0; k < 8; k++)
            {
                c = (c & 1) != 0 ? (c >> 1) ^ 0x82F63B78u : c >> 1;
            }

            t[i] = c;
        }

        return t;
    }

    /// <summary>Continues a running CRC (not yet finished) over <paramref name="data"/>.</summary>
    public static uint Update(uint crc, ReadOnlySpan<byte> data)
    {
        if (Sse42.X64.IsSupported)
        {
            ulong c = crc;
            while (data.Length >= 8)
            {
                c = Sse42.X64.Crc32(c, BinaryPrimitives.ReadUInt64LittleEndian(data));
                data = data[8..];
            }

            crc = (uint)c;
        }

        if (Sse42.IsSupported)
        {
            foreach (byte b in data)
            {
                crc = Sse42.Crc32(crc, b);
            }

            return crc;
        }

        return UpdateSoftware(crc, data);
    }

    /// <summary>The table implementation (also what the tests compare the instruction against).</summary>
    public static uint UpdateSoftware(uint crc, ReadOnlySpan<byte> data)
    {
        var t = s_table;
        foreach (byte b in data)
        {
            crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8);
        }

        return crc;
    }

    public static uint Finish(uint crc) => crc ^ 0xFFFFFFFF;

    /// <summary>The digest of one buffer.</summary>
    public static uint Compute(ReadOnlySpan<byte> data) => Finish(Update(Initial, data));
}
