namespace VhostBackend.Platform;

/// <summary>
/// Linux errno values, defined once for the whole tree: syscall results, bdev submission codes (negated, SPDK's
/// contract), RPC error codes (negated on the wire, as SPDK's rpc.py shows them) and their strerror texts.
/// </summary>
public static class Errno
{
    public const int EPERM = 1;
    public const int ENOENT = 2;
    public const int EINTR = 4;
    public const int EIO = 5;
    public const int ENXIO = 6;
    public const int EBADF = 9;
    public const int EAGAIN = 11;
    public const int ENOMEM = 12;
    public const int EFAULT = 14;
    public const int EBUSY = 16;
    public const int EEXIST = 17;
    public const int ENODEV = 19;
    public const int EINVAL = 22;
    public const int ENOSPC = 28;
    public const int ERANGE = 34;
    public const int ENOTSUP = 95;
    public const int EADDRINUSE = 98;
    public const int EADDRNOTAVAIL = 99;
    public const int ECONNRESET = 104;
    public const int ETIMEDOUT = 110;
    public const int ECONNREFUSED = 111;
    public const int EALREADY = 114;
    public const int ECANCELED = 125;

    /// <summary>strerror(<paramref name="errno"/>) as glibc (and so SPDK's spdk_strerror) prints it; sign ignored.</summary>
    public static string Message(int errno) => Math.Abs(errno) switch
    {
        EPERM => "Operation not permitted",
        ENOENT => "No such file or directory",
        EINTR => "Interrupted system call",
        EIO => "Input/output error",
        ENXIO => "No such device or address",
        EBADF => "Bad file descriptor",
        EAGAIN => "Resource temporarily unavailable",
        ENOMEM => "Cannot allocate memory",
        EFAULT => "Bad address",
        EBUSY => "Device or resource busy",
        EEXIST => "File exists",
        ENODEV => "No such device",
        EINVAL => "Invalid argument",
        ENOSPC => "No space left on device",
        ERANGE => "Numerical result out of range",
        ENOTSUP => "Operation not supported",
        ETIMEDOUT => "Connection timed out",
        EALREADY => "Operation already in progress",
        ECANCELED => "Operation canceled",
        var n => $"Unknown error {n}",
    };
}
