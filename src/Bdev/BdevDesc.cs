using VhostBackend.Reactors;
namespace VhostBackend.Bdev;

/// <summary>
/// An open handle to a bdev, read-only or read-write, with a callback for hot-remove and resize. I/O goes
/// through the per-reactor channel from <see cref="GetIoChannel"/>.
/// </summary>
public sealed class BdevDesc : IDisposable
{
    private readonly BdevEventCallback? _eventCallback;
    private readonly object? _eventContext;
    private readonly Reactor? _owner;
    private int _closed;

    internal BdevDesc(Bdev bdev, bool write, BdevEventCallback? cb, object? ctx)
    {
        Bdev = bdev;
        Writable = write;
        _eventCallback = cb;
        _eventContext = ctx;
        _owner = Reactor.Current;
    }

    public Bdev Bdev { get; }
    public bool Writable { get; private set; }
    public bool IsClosed => Volatile.Read(ref _closed) != 0;

    internal event Action<BdevDesc>? Closed;

    /// <summary>A claim taken through this descriptor makes it a writer (SPDK: the claiming desc gets write access).</summary>
    internal void MarkWritable() => Writable = true;

    /// <summary>This reactor's channel to the bdev (shared by descriptors on the same reactor). Call on a reactor.</summary>
    public BdevChannel GetIoChannel()
    {
        var reactor = Reactor.Current ?? throw new InvalidOperationException("GetIoChannel must be called on a reactor");
        var ch = reactor.GetIoChannel(Bdev.LayerDevice);
        var bch = (BdevChannel)ch.Context;
        bch.IoChannel = ch;
        return bch;
    }

    /// <summary>Releases a channel from <see cref="GetIoChannel"/> (on the same reactor).</summary>
    public static void PutIoChannel(BdevChannel channel) => channel.IoChannel!.Release();

    internal void RaiseEvent(BdevEventType type)
    {
        if (_eventCallback is null || IsClosed)
        {
            return;
        }

        void Deliver()
        {
            if (!IsClosed)
            {
                _eventCallback(type, Bdev, _eventContext);
            }
        }

        if (_owner is not null)
        {
            _owner.Send(_ => Deliver(), null);
        }
        else
        {
            ThreadPool.UnsafeQueueUserWorkItem(_ => Deliver(), null);
        }
    }

    public void Dispose()
    {
        if (Interlocked.Exchange(ref _closed, 1) != 0)
        {
            return;
        }

        Bdev.RemoveDesc(this);
        Closed?.Invoke(this);
    }
}
