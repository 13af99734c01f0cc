using System.Text;
using Tmds.Linux;

namespace VhostBackend.Platform;

/// <summary>
/// File and block-device calls with a safe surface (no pointers at the caller): every method returns 0 / a
/// non-negative result, or -errno.
/// </summary>
public static unsafe class FileOps
{
    private const ulong BLKGETSIZE64 = 0x80081272;
    private const ulong BLKSSZGET = 0x1268;
    private const ulong BLKDISCARD = 0x1277;
    private const ulong BLKZEROOUT = 0x127f;

    /// <summary>open(2): the fd, or -errno.</summary>
    public static int Open(string path, int flags, int mode = 0)
    {
        byte[] bytes = Encoding.UTF8.GetBytes(path + "\0");
        fixed (byte* p = bytes)
        {
            int fd = LibC.open(p, flags, (mode_t)mode);
            return fd >= 0 ? fd : -Native.Errno;
        }
    }

    public static void Close(int fd) => LibC.close(fd);

    /// <summary>fsync(2): 0 or -errno.</summary>
    public static int Fsync(int fd) => LibC.fsync(fd) == 0 ? 0 : -Native.Errno;

    /// <summary>
    /// Makes a rename or create in <paramref name="directory"/> durable (fsync of the directory): 0 or -errno.
    /// </summary>
    public static int SyncDirectory(string directory)
    {
        int fd = Open(directory, LibC.O_RDONLY | LibC.O_DIRECTORY | LibC.O_CLOEXEC);
        if (fd < 0)
        {
            return fd;
        }

        int rc = Fsync(fd);
        Close(fd);
        return rc;
    }

    /// <summary>fstat(2): 0 or -errno.</summary>
    public static int FStat(int fd, out StatBuf st)
    {
        StatBuf s;
        int rc = Native.fstat(fd, &s);
        st = s;
        return rc == 0 ? 0 : -Native.Errno;
    }

    /// <summary>A block device's size in bytes (BLKGETSIZE64): 0 or -errno.</summary>
    public static int GetBlockDeviceSize(int fd, out ulong bytes)
    {
        ulong b = 0;
        int rc = Native.ioctl(fd, BLKGETSIZE64, &b);
        bytes = b;
        return rc == 0 ? 0 : -Native.Errno;
    }

    /// <summary>A block device's logical block size (BLKSSZGET): 0 or -errno.</summary>
    public static int GetLogicalBlockSize(int fd, out uint blockSize)
    {
        int b = 0;
        int rc = Native.ioctl(fd, BLKSSZGET, &b);
        blockSize = (uint)b;
        return rc == 0 ? 0 : -Native.Errno;
    }

    /// <summary>Synchronous BLKZEROOUT (<paramref name="zero"/>) or BLKDISCARD of a byte range: 0 or -errno.</summary>
    public static int DiscardOrZero(int fd, bool zero, ulong offset, ulong length)
    {
        ulong* range = stackalloc ulong[2];
        range[0] = offset;
        range[1] = length;
        return Native.ioctl(fd, zero ? BLKZEROOUT : BLKDISCARD, range) == 0 ? 0 : -Native.Errno;
    }
}
