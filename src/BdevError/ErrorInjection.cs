using VhostBackend.Bdev;
using VhostBackend.Platform;

namespace VhostBackend.BdevError;

/// <summary>What bdev_error_inject_error makes an I/O do (SPDK's enum vbdev_error_type).</summary>
public enum ErrorType
{
    None = 0,

    /// <summary>Completed with an error, not sent to the base.</summary>
    Failure = 1,

    /// <summary>Never completed, until a reset fails it or the vbdev's removal aborts it.</summary>
    Pending = 2,

    /// <summary>A write's data corrupted before it goes to the base, a read's after it comes back.</summary>
    CorruptData = 3,

    /// <summary>Completed with NoMemory, not sent to the base: the submitter is expected to retry.</summary>
    NoMemory = 4,
}

/// <summary>
/// One I/O type's injected error (SPDK's struct vbdev_error_info). Written by the RPC, read on the reactors without a
/// lock as in SPDK, except the count: taking one injection is a compare-and-swap, so <c>num</c> errors are injected
/// exactly, even from several reactors.
/// </summary>
public sealed class ErrorInjection
{
    private long _num;

    public ErrorType Type { get; private set; }

    /// <summary>Injections left.</summary>
    public long Num => Volatile.Read(ref _num);

    /// <summary>Only when at least this many of the channel's I/Os are at the base (SPDK's error_qd).</summary>
    public ulong QueueDepth { get; private set; }

    public ulong CorruptOffset { get; private set; }

    public byte CorruptValue { get; private set; }

    internal void Set(ErrorType type, uint num, ulong queueDepth, ulong corruptOffset, byte corruptValue)
    {
        Volatile.Write(ref _num, 0);
        Type = type;
        QueueDepth = queueDepth;
        CorruptOffset = corruptOffset;
        CorruptValue = corruptValue;
        Volatile.Write(ref _num, num); // published last
    }

    internal void Clear() => Volatile.Write(ref _num, 0);

    /// <summary>Takes one injection; false when none is left.</summary>
    internal bool TryConsume()
    {
        long n;
        do
        {
            n = Volatile.Read(ref _num);
            if (n <= 0)
            {
                return false;
            }
        }
        while (Interlocked.CompareExchange(ref _num, n - 1, n) != n);

        return true;
    }

    /// <summary>SPDK's vbdev_error_corrupt_io_data: XORs the byte at <see cref="CorruptOffset"/> of the I/O's buffers (nothing if beyond them).</summary>
    internal void Corrupt(ReadOnlySpan<IoVec> iovs)
    {
        ulong offset = CorruptOffset;
        foreach (var iov in iovs)
        {
            if ((ulong)iov.Length > offset)
            {
                iov.AsSpan((nuint)offset, 1)[0] ^= CorruptValue;
                return;
            }

            offset -= iov.Length;
        }
    }

    /// <summary>The vector index of an I/O type SPDK injects into (read, write, unmap, flush), else -1.</summary>
    internal static int IndexOf(BdevIoType type) => type switch
    {
        BdevIoType.Read => 0,
        BdevIoType.Write => 1,
        BdevIoType.Unmap => 2,
        BdevIoType.Flush => 3,
        _ => -1,
    };
}
