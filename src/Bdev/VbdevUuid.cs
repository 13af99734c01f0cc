using System.Security.Cryptography;

namespace VhostBackend.Bdev;

/// <summary>
/// SPDK's spdk_uuid_generate_sha1 (an RFC 4122 version-5 UUID): SHA-1 over a module's namespace UUID and the base
/// bdev's UUID, both in wire byte order. A vbdev created without a UUID gets the same one on every run over the same
/// base, as in SPDK.
/// </summary>
public static class VbdevUuid
{
    public static Guid FromBase(Guid namespaceUuid, Guid baseUuid)
    {
        Span<byte> input = stackalloc byte[32];
        namespaceUuid.TryWriteBytes(input[..16], bigEndian: true, out _);
        baseUuid.TryWriteBytes(input[16..], bigEndian: true, out _);
        Span<byte> hash = stackalloc byte[20];
        SHA1.HashData(input, hash);
        hash[6] = (byte)((hash[6] & 0x0f) | 0x50); // version 5
        hash[8] = (byte)((hash[8] & 0x3f) | 0x80); // RFC 4122 variant
        return new Guid(hash[..16], bigEndian: true);
    }
}
