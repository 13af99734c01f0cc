using Tmds.Linux;

namespace VhostBackend.Platform;

/// <summary>An owned epoll instance. Registrations carry a 64-bit cookie the owner maps back to its handler.</summary>
public sealed unsafe class Epoll : IDisposable
{
    public const uint EPOLLIN = 0x1;
    public const uint EPOLLET = 1u << 31;
    private const int EPOLL_CTL_ADD = 1;
    private const int EPOLL_CTL_DEL = 2;

    private int _fd;

    public Epoll()
    {
        _fd = LibC.epoll_create1(0x80000 /*EPOLL_CLOEXEC*/);
        if (_fd < 0)
        {
            throw new IOException($"epoll_create1 failed: {Native.StrError(Native.Errno)}");
        }
    }

    public int Fd => _fd;

    public void Add(int fd, ulong cookie, uint events = EPOLLIN)
    {
        epoll_event ev = default;
        ev.events = (int)events;
        ev.data.u64 = cookie;
        if (LibC.epoll_ctl(_fd, EPOLL_CTL_ADD, fd, &ev) != 0)
        {
            throw new IOException($"epoll_ctl(ADD, {fd}) failed: {Native.StrError(Native.Errno)}");
        }
    }

    public void Remove(int fd)
    {
        epoll_event ev = default;
        LibC.epoll_ctl(_fd, EPOLL_CTL_DEL, fd, &ev);
    }

    /// <summary>Waits up to <paramref name="timeoutMs"/> (-1 forever); returns the number of cookies written, 0 on timeout or EINTR.</summary>
    public int Wait(Span<ulong> cookies, int timeoutMs)
    {
        epoll_event* events = stackalloc epoll_event[16];
        int max = Math.Min(16, cookies.Length);
        int n = LibC.epoll_wait(_fd, events, max, timeoutMs);
        if (n <= 0)
        {
            return 0;
        }

        for (int i = 0; i < n; i++)
        {
            cookies[i] = events[i].data.u64;
        }

        return n;
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
