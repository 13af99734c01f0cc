namespace VhostBackend.Blob;

/// <summary>
/// The blobstore's view of its storage (SPDK's <c>struct spdk_bs_dev</c>): a block device addressed in bytes,
/// offsets and lengths multiples of <see cref="BlockSize"/>. The store issues metadata I/O on its metadata
/// thread and data I/O from any thread; an implementation must accept concurrent calls on disjoint ranges.
/// A failed I/O throws (<see cref="IOException"/> or <see cref="BlobException"/>).
/// </summary>
public interface IBlobDevice
{
    int BlockSize { get; }

    ulong BlockCount { get; }

    ValueTask ReadAsync(ulong offset, Memory<byte> buffer);

    ValueTask WriteAsync(ulong offset, ReadOnlyMemory<byte> buffer);

    /// <summary>Makes the range read as zeroes (unmap or write zeroes).</summary>
    ValueTask WriteZeroesAsync(ulong offset, ulong length);

    /// <summary>Whether <see cref="WriteZeroesAsync"/> is a device command (no data buffer goes to the device):
    /// a first write to a cluster with nothing under it then zeroes the rest of the cluster that way instead of
    /// writing a cluster of zeroes.</summary>
    bool SupportsWriteZeroes => false;

    /// <summary>Whether <see cref="UnmapAsync"/> passes an unmap (deallocate) to the device.</summary>
    bool SupportsUnmap => false;

    /// <summary>Deallocates the range (SPDK's <c>bs_dev-&gt;unmap</c>): its content is unspecified afterwards.
    /// Without <see cref="SupportsUnmap"/>, zeroes are written.</summary>
    ValueTask UnmapAsync(ulong offset, ulong length) => WriteZeroesAsync(offset, length);

    ValueTask FlushAsync();
}

/// <summary>An <see cref="IBlobDevice"/> in RAM (a model for tests, and SPDK's malloc-backed bs_dev).</summary>
public sealed class MemoryBlobDevice : IBlobDevice
{
    private readonly byte[] _data;

    public MemoryBlobDevice(int blockSize, ulong blockCount)
    {
        BlockSize = blockSize;
        BlockCount = blockCount;
        _data = new byte[checked((long)((ulong)blockSize * blockCount))];
    }

    public MemoryBlobDevice(int blockSize, byte[] image)
    {
        BlockSize = blockSize;
        BlockCount = (ulong)(image.Length / blockSize);
        _data = image;
    }

    public int BlockSize { get; }

    public ulong BlockCount { get; }

    /// <summary>The device's bytes (tests inspect and copy them).</summary>
    public byte[] Data => _data;

    private Span<byte> Range(ulong offset, long length)
    {
        if (offset % (ulong)BlockSize != 0 || length % BlockSize != 0 || offset + (ulong)length > (ulong)_data.LongLength)
        {
            throw new BlobException(Errno.EINVAL, $"I/O {offset}+{length} outside the device or unaligned");
        }
        return _data.AsSpan((int)offset, (int)length);
    }

    public ValueTask ReadAsync(ulong offset, Memory<byte> buffer)
    {
        Range(offset, buffer.Length).CopyTo(buffer.Span);
        return ValueTask.CompletedTask;
    }

    public ValueTask WriteAsync(ulong offset, ReadOnlyMemory<byte> buffer)
    {
        buffer.Span.CopyTo(Range(offset, buffer.Length));
        return ValueTask.CompletedTask;
    }

    public ValueTask WriteZeroesAsync(ulong offset, ulong length)
    {
        Range(offset, (long)length).Clear();
        ZeroedBytes += (long)length;
        return ValueTask.CompletedTask;
    }

    /// <summary>The model's write zeroes clears the range without a buffer (as malloc's does).</summary>
    public bool SupportsWriteZeroes => true;

    /// <summary>The model's unmap zeroes the range (as malloc's does) and counts the bytes.</summary>
    public bool SupportsUnmap => true;

    /// <summary>Bytes unmapped so far.</summary>
    public long UnmappedBytes { get; private set; }

    /// <summary>Bytes zeroed by write zeroes so far.</summary>
    public long ZeroedBytes { get; private set; }

    public ValueTask UnmapAsync(ulong offset, ulong length)
    {
        Range(offset, (long)length).Clear();
        UnmappedBytes += (long)length;
        return ValueTask.CompletedTask;
    }

    public ValueTask FlushAsync() => ValueTask.CompletedTask;
}

/// <summary>An <see cref="IBlobDevice"/> on a regular file (SPDK's aio bdev used as a bs_dev), through
/// positional reads and writes.</summary>
public sealed class FileBlobDevice : IBlobDevice, IDisposable
{
    private readonly Microsoft.Win32.SafeHandles.SafeFileHandle _handle;

    public FileBlobDevice(string path, int blockSize)
    {
        _handle = File.OpenHandle(path, FileMode.Open, FileAccess.ReadWrite, FileShare.Read, FileOptions.None);
        BlockSize = blockSize;
        BlockCount = (ulong)RandomAccess.GetLength(_handle) / (ulong)blockSize;
    }

    public int BlockSize { get; }

    public ulong BlockCount { get; }

    private void Check(ulong offset, long length)
    {
        if (offset % (ulong)BlockSize != 0 || length % BlockSize != 0 || offset + (ulong)length > BlockCount * (ulong)BlockSize)
        {
            throw new BlobException(Errno.EINVAL, $"I/O {offset}+{length} outside the device or unaligned");
        }
    }

    public async ValueTask ReadAsync(ulong offset, Memory<byte> buffer)
    {
        Check(offset, buffer.Length);
        int done = 0;
        while (done < buffer.Length)
        {
            int n = await RandomAccess.ReadAsync(_handle, buffer[done..], (long)offset + done).ConfigureAwait(false);
            if (n <= 0)
            {
                buffer.Span[done..].Clear();
                break;
            }
            done += n;
        }
    }

    public ValueTask WriteAsync(ulong offset, ReadOnlyMemory<byte> buffer)
    {
        Check(offset, buffer.Length);
        return RandomAccess.WriteAsync(_handle, buffer, (long)offset);
    }

    public async ValueTask WriteZeroesAsync(ulong offset, ulong length)
    {
        Check(offset, (long)length);
        var zero = new byte[(int)Math.Min(length, 1UL << 20)];
        for (ulong done = 0; done < length;)
        {
            int n = (int)Math.Min((ulong)zero.Length, length - done);
            await RandomAccess.WriteAsync(_handle, zero.AsMemory(0, n), (long)(offset + done)).ConfigureAwait(false);
            done += (ulong)n;
        }
    }

    public ValueTask FlushAsync()
    {
        RandomAccess.FlushToDisk(_handle);
        return ValueTask.CompletedTask;
    }

    public void Dispose() => _handle.Dispose();
}
