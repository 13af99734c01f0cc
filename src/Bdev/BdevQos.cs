using System.Diagnostics;
using VhostBackend.Platform;

namespace VhostBackend.Bdev;

/// <summary>
/// Token buckets shared by all channels of a bdev, refilled every 1 ms time slice. Lock-free: buckets are
/// decremented with Interlocked and may go negative by one I/O (the debt is carried into the next slice),
/// so the long-run rate equals the limit.
/// </summary>
internal sealed class BdevQos
{
    private static readonly long SliceTicks = Ticks.Frequency / 1000;

    private readonly long _iosPerSlice;
    private readonly long _bytesPerSlice;
    private readonly long _readBytesPerSlice;
    private readonly long _writeBytesPerSlice;
    private long _ios;
    private long _bytes;
    private long _readBytes;
    private long _writeBytes;
    private long _sliceEnd;

    public BdevQos(ulong rwIosPerSec, ulong rwMBytesPerSec, ulong rMBytesPerSec, ulong wMBytesPerSec)
    {
        RwIosPerSec = rwIosPerSec;
        RwMBytesPerSec = rwMBytesPerSec;
        RMBytesPerSec = rMBytesPerSec;
        WMBytesPerSec = wMBytesPerSec;
        _iosPerSlice = (long)Math.Max(rwIosPerSec / 1000, rwIosPerSec > 0 ? 1UL : 0);
        _bytesPerSlice = (long)(rwMBytesPerSec * 1024 * 1024 / 1000);
        _readBytesPerSlice = (long)(rMBytesPerSec * 1024 * 1024 / 1000);
        _writeBytesPerSlice = (long)(wMBytesPerSec * 1024 * 1024 / 1000);
        _ios = _iosPerSlice;
        _bytes = _bytesPerSlice;
        _readBytes = _readBytesPerSlice;
        _writeBytes = _writeBytesPerSlice;
        _sliceEnd = Ticks.Now() + SliceTicks;
    }

    public ulong RwIosPerSec { get; }
    public ulong RwMBytesPerSec { get; }
    public ulong RMBytesPerSec { get; }
    public ulong WMBytesPerSec { get; }

    public bool TryAdmit(BdevIo io, long now)
    {
        bool read = io.Type == BdevIoType.Read;
        bool write = io.Type == BdevIoType.Write;
        if (!read && !write)
        {
            return true;
        }

        Refill(now);
        if ((_iosPerSlice > 0 && Volatile.Read(ref _ios) <= 0)
            || (_bytesPerSlice > 0 && Volatile.Read(ref _bytes) <= 0)
            || (read && _readBytesPerSlice > 0 && Volatile.Read(ref _readBytes) <= 0)
            || (write && _writeBytesPerSlice > 0 && Volatile.Read(ref _writeBytes) <= 0))
        {
            return false;
        }

        long len = (long)io.Length;
        if (_iosPerSlice > 0)
        {
            Interlocked.Decrement(ref _ios);
        }

        if (_bytesPerSlice > 0)
        {
            Interlocked.Add(ref _bytes, -len);
        }

        if (read && _readBytesPerSlice > 0)
        {
            Interlocked.Add(ref _readBytes, -len);
        }

        if (write && _writeBytesPerSlice > 0)
        {
            Interlocked.Add(ref _writeBytes, -len);
        }

        return true;
    }

    private void Refill(long now)
    {
        long end = Volatile.Read(ref _sliceEnd);
        if (now < end || Interlocked.CompareExchange(ref _sliceEnd, now + SliceTicks, end) != end)
        {
            return;
        }

        Top(ref _ios, _iosPerSlice);
        Top(ref _bytes, _bytesPerSlice);
        Top(ref _readBytes, _readBytesPerSlice);
        Top(ref _writeBytes, _writeBytesPerSlice);
    }

    private static void Top(ref long bucket, long perSlice)
    {
        if (perSlice == 0)
        {
            return;
        }

        long cur, next;
        do
        {
            cur = Volatile.Read(ref bucket);
            next = Math.Min(cur, 0) + perSlice; // unused tokens expire; debt carries over
        }
        while (Interlocked.CompareExchange(ref bucket, next, cur) != cur);
    }
}
