using System.Runtime.InteropServices;

namespace VhostBackend.Platform;

/// <summary>
/// Raw Linux calls that Tmds.LibC does not bind (ioctl, the io_uring syscalls, file space management).
/// Every method returns the raw result; callers read <see cref="Marshal.GetLastPInvokeError"/> on failure.
/// Keep this file to declarations only: validation and ownership live in the small wrapper types.
/// </summary>
public static unsafe partial class Native
{
    public const int O_RDONLY = 0x0;
    public const int O_RDWR = 0x2;
    public const int O_CREAT = 0x40;
    public const int O_CLOEXEC = 0x80000;
    public const int O_DIRECT = 0x4000;
    public const int O_NONBLOCK = 0x800;

    public const int SYS_io_uring_setup = 425;
    public const int SYS_io_uring_enter = 426;
    public const int SYS_io_uring_register = 427;
    public const int SYS_gettid = 186;

    [LibraryImport("libc", SetLastError = true)]
    public static partial long syscall(long number, long a1, long a2, long a3, long a4, long a5, long a6);

    [LibraryImport("libc", SetLastError = true)]
    public static partial int ioctl(int fd, ulong request, void* arg);

    [LibraryImport("libc", SetLastError = true)]
    public static partial int ioctl(int fd, ulong request, ulong arg);

    [LibraryImport("libc", SetLastError = true)]
    public static partial int fallocate(int fd, int mode, long offset, long len);

    [LibraryImport("libc", SetLastError = true)]
    public static partial int fdatasync(int fd);

    [LibraryImport("libc", SetLastError = true)]
    public static partial int fstat(int fd, StatBuf* buf);

    [LibraryImport("libc", SetLastError = true)]
    public static partial long lseek(int fd, long offset, int whence);

    [LibraryImport("libc", SetLastError = true)]
    public static partial long preadv(int fd, void* iov, int iovcnt, long offset);

    [LibraryImport("libc", SetLastError = true)]
    public static partial long pwritev(int fd, void* iov, int iovcnt, long offset);

    [LibraryImport("libc", SetLastError = true)]
    public static partial int madvise(void* addr, nuint length, int advice);

    public static int Errno => Marshal.GetLastPInvokeError();

    public static int GetTid() => (int)syscall(SYS_gettid, 0, 0, 0, 0, 0, 0);

    public static string StrError(int errno) => Marshal.GetPInvokeErrorMessage(errno);
}

/// <summary>struct stat for x86_64 (144 bytes); only the fields we read are named.</summary>
[StructLayout(LayoutKind.Explicit, Size = 144)]
public struct StatBuf
{
    [FieldOffset(0)] public ulong Dev;
    [FieldOffset(8)] public ulong Ino;
    [FieldOffset(24)] public uint Mode;
    [FieldOffset(48)] public long Size;
    [FieldOffset(56)] public long BlkSize;

    public const uint S_IFMT = 0xF000;
    public const uint S_IFREG = 0x8000;
    public const uint S_IFBLK = 0x6000;
    public readonly bool IsRegular => (Mode & S_IFMT) == S_IFREG;
    public readonly bool IsBlockDevice => (Mode & S_IFMT) == S_IFBLK;
}
