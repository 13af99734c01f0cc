using VhostBackend.Bdev;

namespace VhostBackend.BdevError;

/// <summary>
/// An error vbdev's channel on one reactor: forwards to the base, counts what is at the base (for queue_depth),
/// corrupts a successful read when told to, and keeps the I/Os held by a "pending" injection, linked through their
/// <see cref="BdevIo.ModuleContext"/> (no allocation; held I/Os are never forwarded, so the field is free).
/// </summary>
internal sealed class ErrorChannel : BaseForwarder
{
    private readonly ErrorBdev _bdev;
    private BdevIo? _pendingHead;

    public ErrorChannel(ErrorBdev bdev, BdevDesc baseDesc)
        : base(baseDesc) => _bdev = bdev;

    /// <summary>This channel's I/Os at the base (SPDK's io_inflight).</summary>
    public ulong Inflight { get; private set; }

    /// <summary>I/Os held by a "pending" injection.</summary>
    public int PendingCount { get; private set; }

    public void ForwardCounted(BdevIo io)
    {
        Inflight++;
        Forward(io);
    }

    public void Hold(BdevIo io)
    {
        io.ModuleContext = _pendingHead;
        _pendingHead = io;
        PendingCount++;
    }

    /// <summary>Completes every held I/O with <paramref name="status"/> (a reset: Failed, as SPDK; removal: Aborted).</summary>
    public void CompletePending(BdevIoStatus status)
    {
        while (_pendingHead is { } io)
        {
            _pendingHead = io.ModuleContext as BdevIo;
            io.ModuleContext = null;
            PendingCount--;
            io.Complete(status);
        }
    }

    protected override void OnBaseDone(BdevIo io, BdevIoStatus status, int nvmeStatus)
    {
        Inflight--;
        if (status == BdevIoStatus.Success && io.Type == BdevIoType.Read)
        {
            // SPDK decides a read's corruption at its completion (no queue-depth condition there).
            var inj = _bdev.Injection(BdevIoType.Read);
            if (inj.Type == ErrorType.CorruptData && inj.TryConsume())
            {
                inj.Corrupt(io.Iovs);
            }
        }

        base.OnBaseDone(io, status, nvmeStatus);
    }

    protected override void OnSubmitFailed(BdevIo io)
    {
        Inflight--;
        base.OnSubmitFailed(io);
    }

    public override void Close()
    {
        CompletePending(BdevIoStatus.Aborted);
        base.Close();
    }
}
