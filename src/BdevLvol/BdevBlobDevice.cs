using VhostBackend.Bdev;
using VhostBackend.Blob;
using VhostBackend.Platform;
using VhostBackend.Reactors;

namespace VhostBackend.BdevLvol;

/// <summary>
/// The blobstore's device on a bdev (SPDK's <c>bs_dev</c> from <c>spdk_bdev_create_bs_dev</c>): metadata and
/// copy-on-write I/O of the blobstore, submitted on the main reactor through its channel of the base descriptor,
/// through a DMA-able bounce buffer per call (control plane and first-write allocation only; the guests' I/O to
/// allocated clusters goes straight to the base, see <see cref="LvolBdev"/>).
/// </summary>
public sealed class BdevBlobDevice : IBlobDevice
{
    private static readonly BdevIoCompletion s_done = static (_, ok, arg) => ((Op)arg!).Tcs.TrySetResult(ok);

    private readonly BdevDesc _desc;
    private readonly Reactor _main;
    private BdevChannel? _channel;
    /// <summary>One spare DMA buffer kept between calls (the metadata path and first-write copies run one at a
    /// time, so a cluster-sized buffer is reused rather than allocated per call); taken and returned lock-free.</summary>
    private AlignedBuffer? _spare;

    public BdevBlobDevice(BdevDesc desc, Reactor main)
    {
        _desc = desc;
        _main = main;
    }

    public int BlockSize => (int)_desc.Bdev.BlockSize;

    public ulong BlockCount => _desc.Bdev.BlockCount;

    private sealed class Op
    {
        public TaskCompletionSource<bool> Tcs = null!;
        public IoVec[] Iov = [];
        public BdevIoType Type;
        public ulong Lba;
        public ulong Blocks;
    }

    private void Check(ulong offset, ulong length)
    {
        if (offset % (ulong)BlockSize != 0 || length % (ulong)BlockSize != 0 || offset / (ulong)BlockSize + length / (ulong)BlockSize > BlockCount)
        {
            throw new BlobException(Blob.Errno.EINVAL, $"I/O {offset}+{length} outside {_desc.Bdev.Name} or unaligned");
        }
    }

    /// <summary>
    /// Submits <paramref name="op"/> on the main reactor and waits for it. Called on the main reactor (the
    /// blobstore's work started there: an lvol's first write to a cluster, examine, the module's own calls) the
    /// I/O is submitted right here and the caller continues inline in the completion, on the reactor, as SPDK's
    /// blobstore runs on its md thread: a first-write allocation then takes no thread hop at all. From any other
    /// thread (an RPC) it is posted to the reactor and the caller continues on the thread pool.
    /// </summary>
    private async Task Run(Op op)
    {
        bool onMain = _main.IsCurrent;
        op.Tcs = new TaskCompletionSource<bool>(onMain ? TaskCreationOptions.None : TaskCreationOptions.RunContinuationsAsynchronously);
        var rc = onMain ? Submit(op) : await _main.InvokeAsync(() => Submit(op)).ConfigureAwait(false);
        while (rc == -Platform.Errno.ENOMEM)
        {
            await Task.Delay(1).ConfigureAwait(false);
            op.Tcs = new TaskCompletionSource<bool>(TaskCreationOptions.RunContinuationsAsynchronously);
            rc = await _main.InvokeAsync(() => Submit(op)).ConfigureAwait(false);
        }
        if (rc != 0)
        {
            throw new IOException($"{op.Type} on {_desc.Bdev.Name} refused: {Platform.Errno.Message(rc)}");
        }
        if (!await op.Tcs.Task.ConfigureAwait(false))
        {
            throw new IOException($"{op.Type} of {op.Blocks} blocks at {op.Lba} on {_desc.Bdev.Name} failed");
        }
    }

    private int Submit(Op op)
    {
        if (_desc.IsClosed)
        {
            return -Platform.Errno.ENODEV;
        }
        _channel ??= _desc.GetIoChannel();
        return op.Type switch
        {
            BdevIoType.Read => _channel.Read(_desc, op.Iov, op.Lba, op.Blocks, s_done, op),
            BdevIoType.Write => _channel.Write(_desc, op.Iov, op.Lba, op.Blocks, s_done, op),
            BdevIoType.WriteZeroes => _channel.WriteZeroes(_desc, op.Lba, op.Blocks, s_done, op),
            BdevIoType.Unmap => _channel.Unmap(_desc, op.Lba, op.Blocks, s_done, op),
            _ => _channel.Flush(_desc, 0, BlockCount, s_done, op),
        };
    }

    private AlignedBuffer Rent(int length)
    {
        var b = Interlocked.Exchange(ref _spare, null);
        if (b != null && b.Size >= (nuint)length)
        {
            return b;
        }
        b?.Dispose();
        return new AlignedBuffer((nuint)length, Math.Max(4096u, _desc.Bdev.RequiredAlignment), zero: false);
    }

    private void Return(AlignedBuffer b)
    {
        if (Interlocked.CompareExchange(ref _spare, b, null) != null)
        {
            b.Dispose();
        }
    }

    public async ValueTask ReadAsync(ulong offset, Memory<byte> buffer)
    {
        Check(offset, (ulong)buffer.Length);
        if (buffer.Length == 0)
        {
            return;
        }
        var b = Rent(buffer.Length);
        try
        {
            var op = new Op { Type = BdevIoType.Read, Iov = [b.ToIoVec(0, (nuint)buffer.Length)], Lba = offset / (ulong)BlockSize, Blocks = (ulong)buffer.Length / (ulong)BlockSize };
            await Run(op).ConfigureAwait(false);
            b.AsSpan(0, buffer.Length).CopyTo(buffer.Span);
        }
        finally
        {
            Return(b);
        }
    }

    public async ValueTask WriteAsync(ulong offset, ReadOnlyMemory<byte> buffer)
    {
        Check(offset, (ulong)buffer.Length);
        if (buffer.Length == 0)
        {
            return;
        }
        var b = Rent(buffer.Length);
        try
        {
            buffer.Span.CopyTo(b.AsSpan(0, buffer.Length));
            var op = new Op { Type = BdevIoType.Write, Iov = [b.ToIoVec(0, (nuint)buffer.Length)], Lba = offset / (ulong)BlockSize, Blocks = (ulong)buffer.Length / (ulong)BlockSize };
            await Run(op).ConfigureAwait(false);
        }
        finally
        {
            Return(b);
        }
    }

    public async ValueTask WriteZeroesAsync(ulong offset, ulong length)
    {
        Check(offset, length);
        if (length == 0)
        {
            return;
        }
        if (_desc.Bdev.SupportsIoType(BdevIoType.WriteZeroes))
        {
            await Run(new Op { Type = BdevIoType.WriteZeroes, Lba = offset / (ulong)BlockSize, Blocks = length / (ulong)BlockSize }).ConfigureAwait(false);
            return;
        }
        var zero = new byte[(int)Math.Min(length, 1UL << 20)];
        for (ulong done = 0; done < length;)
        {
            int n = (int)Math.Min((ulong)zero.Length, length - done);
            await WriteAsync(offset + done, zero.AsMemory(0, n)).ConfigureAwait(false);
            done += (ulong)n;
        }
    }

    /// <summary>The base bdev takes write zeroes as a command.</summary>
    public bool SupportsWriteZeroes => _desc.Bdev.SupportsIoType(BdevIoType.WriteZeroes);

    /// <summary>The base bdev takes unmap (SPDK's bs_dev passes blob unmaps to it).</summary>
    public bool SupportsUnmap => _desc.Bdev.SupportsIoType(BdevIoType.Unmap);

    public async ValueTask UnmapAsync(ulong offset, ulong length)
    {
        Check(offset, length);
        if (length == 0)
        {
            return;
        }
        if (!SupportsUnmap)
        {
            await WriteZeroesAsync(offset, length).ConfigureAwait(false);
            return;
        }
        await Run(new Op { Type = BdevIoType.Unmap, Lba = offset / (ulong)BlockSize, Blocks = length / (ulong)BlockSize }).ConfigureAwait(false);
    }

    public async ValueTask FlushAsync()
    {
        if (_desc.Bdev.SupportsIoType(BdevIoType.Flush))
        {
            await Run(new Op { Type = BdevIoType.Flush }).ConfigureAwait(false);
        }
    }

    /// <summary>Releases the main reactor's channel (on the main reactor) and the spare buffer.</summary>
    public Task CloseAsync() => _main.InvokeAsync(() =>
    {
        Interlocked.Exchange(ref _spare, null)?.Dispose();
        if (_channel != null)
        {
            BdevDesc.PutIoChannel(_channel);
            _channel = null;
        }
    });
}
