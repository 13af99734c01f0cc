using System.Buffers.Binary;
using System.Runtime.Intrinsics.X86;

namespace VhostBackend.Blob;

/// <summary>CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as SPDK's <c>spdk_crc32c_update</c>.</summary>
public static class Crc32C
{
    private static readonly uint[] s_table = BuildTable();

    private static uint[] BuildTable()
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

    /// <summary>Continues a CRC over <paramref name="data"/> (no pre/post inversion: the caller does that).</summary>
    public static uint Update(uint crc, ReadOnlySpan<byte> data)
    {
        int i = 0;
        if (Sse42.X64.IsSupported)
        {
            ulong c = crc;
            for (; i + 8 <= data.Length; i += 8)
            {
                c = Sse42.X64.Crc32(c, BinaryPrimitives.ReadUInt64LittleEndian(data[i..]));
            }
            crc = (uint)c;
        }
        for (; i < data.Length; i++)
        {
            crc = s_table[(crc ^ data[i]) & 0xFF] ^ (crc >> 8);
        }
        return crc;
    }

    /// <summary>The CRC of a 4 KiB metadata page or super block: CRC-32C of all bytes but the last four
    /// (SPDK's <c>blob_md_page_calc_crc</c>: initial 0xFFFFFFFF, final xor 0xFFFFFFFF).</summary>
    public static uint PageCrc(ReadOnlySpan<byte> page) => Update(uint.MaxValue, page[..(BlobFormat.PageSize - 4)]) ^ uint.MaxValue;
}
