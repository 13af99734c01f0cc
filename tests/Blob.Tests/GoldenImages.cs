using System.IO.Compression;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json;

namespace VhostBackend.Blob.Tests;

/// <summary>
/// The SPDK v24.01 golden lvstore images (../shared/testdata/spdk-lvstore: README.md, manifest.json, *.img.gz).
/// Found by walking up from the test's directory for <c>shared/testdata/spdk-lvstore</c> (works from a worktree
/// and from CI's clone), or from <c>VHOSTBACKEND_SPDK_LVSTORE_DIR</c>. Missing data fails the test.
/// </summary>
public static class GoldenImages
{
    public const string EnvVar = "VHOSTBACKEND_SPDK_LVSTORE_DIR";

    public static string Dir
    {
        get
        {
            var env = Environment.GetEnvironmentVariable(EnvVar);
            if (!string.IsNullOrEmpty(env))
            {
                return Directory.Exists(env) ? env : throw new InvalidOperationException($"{EnvVar}={env} does not exist");
            }
            for (var d = new DirectoryInfo(AppContext.BaseDirectory); d != null; d = d.Parent)
            {
                var c = Path.Combine(d.FullName, "shared", "testdata", "spdk-lvstore");
                if (File.Exists(Path.Combine(c, "manifest.json")))
                {
                    return c;
                }
            }
            throw new InvalidOperationException(
                $"SPDK golden lvstore images not found: no shared/testdata/spdk-lvstore/manifest.json above {AppContext.BaseDirectory}; set {EnvVar}");
        }
    }

    public static JsonElement Manifest => JsonDocument.Parse(File.ReadAllBytes(Path.Combine(Dir, "manifest.json"))).RootElement;

    public static JsonElement Image(string file)
    {
        foreach (var im in Manifest.GetProperty("images").EnumerateArray())
        {
            if (im.GetProperty("file").GetString() == file)
            {
                return im;
            }
        }
        throw new InvalidOperationException($"{file} not in the manifest");
    }

    /// <summary>A fresh decompressed copy of an image (the original is never touched).</summary>
    public static byte[] Decompress(string file)
    {
        using var gz = new GZipStream(File.OpenRead(Path.Combine(Dir, file)), CompressionMode.Decompress);
        using var ms = new MemoryStream();
        gz.CopyTo(ms);
        return ms.ToArray();
    }

    public static string Sha256(ReadOnlySpan<byte> data) => Convert.ToHexStringLower(SHA256.HashData(data));

    /// <summary>The manifest's data pattern: 512-byte unit n holds "tag-n|" repeated, cut to 512 bytes.</summary>
    public static byte[] Pattern(string tag, long offset, long length)
    {
        var o = new byte[length];
        for (long n = offset / 512; n < (offset + length) / 512; n++)
        {
            var unit = Encoding.ASCII.GetBytes($"{tag}-{n}|");
            var dst = o.AsSpan((int)(n * 512 - offset), 512);
            for (int i = 0; i < 512; i++)
            {
                dst[i] = unit[i % unit.Length];
            }
        }
        return o;
    }
}
