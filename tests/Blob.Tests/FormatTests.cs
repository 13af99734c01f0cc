using System.Text;

namespace VhostBackend.Blob.Tests;

public class FormatTests
{
    [Fact]
    public void Crc32CMatchesTheCastagnoliCheckValue()
    {
        // RFC 3720 check value of "123456789"; a length that is not a multiple of 8 also runs the byte loop.
        Assert.Equal(0xE3069283u, Crc32C.Update(uint.MaxValue, Encoding.ASCII.GetBytes("123456789")) ^ uint.MaxValue);
        Assert.Equal(0u, Crc32C.Update(uint.MaxValue, []) ^ uint.MaxValue);
    }

    [Fact]
    public async Task CorruptMetadataIsRefusedNotReadOutOfRange()
    {
        var img = GoldenImages.Decompress("lvs512.img.gz");
        // A descriptor length past the page end in thick0's first md page (page 1), CRC fixed up so only the
        // length is wrong: the blob is corrupt, the clean load refuses it with an errno.
        int page = (4 + 1) * BlobFormat.PageSize;
        BitConverter.TryWriteBytes(img.AsSpan(page + 16 + 1), 5000u);
        MdCodec.SealPage(img.AsSpan(page, BlobFormat.PageSize));
        var e = await Assert.ThrowsAsync<BlobException>(() => LvolStore.LoadAsync(new MemoryBlobDevice(512, img)));
        Assert.Equal(Errno.EINVAL, e.Errno);
        // Dirty, the same store drops that blob and keeps the others.
        BitConverter.TryWriteBytes(img.AsSpan(16), 0u);
        var sb = img.AsSpan(0, BlobFormat.PageSize);
        MdCodec.SealPage(sb);
        var lvs = await LvolStore.LoadAsync(new MemoryBlobDevice(512, img));
        Assert.Equal([(BlobFormat.PageToBlobId(1), Errno.EINVAL)], lvs.BlobStore.LoadReport.Dropped);
        Assert.Null(lvs.FindByName("thick0"));
        Assert.NotNull(lvs.FindByName("clone0"));
        // A bad super block CRC is -EILSEQ.
        img[100] ^= 1;
        Assert.Equal(Errno.EILSEQ, (await Assert.ThrowsAsync<BlobException>(() => LvolStore.LoadAsync(new MemoryBlobDevice(512, img)))).Errno);
    }
}
