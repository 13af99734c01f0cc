using Tmds.Linux;

namespace VhostBackend.Platform;

/// <summary>An owned eventfd (non-blocking, close-on-exec) used to wake a sleeping reactor or signal a guest.</summary>
public sealed unsafe class EventFd : IDisposable
{
    private int _fd;

    public EventFd()
    {
        _fd = LibC.eventfd(0, 0x800 /*EFD_NONBLOCK*/ | 0x80000 /*EFD_CLOEXEC*/);
        if (_fd < 0)
        {
            throw new IOException($"eventfd failed: {Native.StrError(Native.Errno)}");
        }
    }

    /// <summary>Takes ownership of an eventfd received from elsewhere (e.g. over SCM_RIGHTS).</summary>
    public EventFd(int fd) => _fd = fd;

    public int Fd => _fd;

    /// <summary>Adds one to the counter. Safe from any thread; never blocks (a saturated counter is already signalled).</summary>
    public void Signal()
    {
        ulong one = 1;
        LibC.write(_fd, &one, 8);
    }

    /// <summary>Resets the counter; returns whether it was non-zero.</summary>
    public bool Drain()
    {
        ulong value;
        return LibC.read(_fd, &value, 8) == 8;
    }

    /// <summary>Resets the counter and returns it: how many signals arrived since the last read (0 if none).</summary>
    public ulong DrainCount()
    {
        ulong value;
        return LibC.read(_fd, &value, 8) == 8 ? value : 0;
    }

    public void Dispose()
    {
        int fd = Interlocked.Exchange(ref _fd, -1);
        if (fd >= 0)
        {
            LibC.close(fd);
        }
    }
}
