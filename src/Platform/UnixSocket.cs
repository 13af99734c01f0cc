using System.Globalization;
using System.Runtime.InteropServices;
using System.Text;

namespace VhostBackend.Platform;

/// <summary>
/// Declarations for Unix stream sockets with SCM_RIGHTS, memfd and mmap (x86_64 Linux layouts). Declarations only:
/// ownership and validation live in <see cref="UnixConnection"/>, <see cref="UnixSocketListener"/> and <see cref="MappedRegion"/>.
/// </summary>
public static unsafe partial class SocketNative
{
    public const int AF_UNIX = 1;
    public const int SOCK_STREAM = 1;
    public const int SOCK_CLOEXEC = 0x80000;
    public const int SOL_SOCKET = 1;
    public const int SCM_RIGHTS = 1;
    public const int MSG_CTRUNC = 0x8;
    public const int MSG_WAITALL = 0x100;
    public const int MSG_NOSIGNAL = 0x4000;
    public const int MSG_CMSG_CLOEXEC = 0x40000000;
    public const int SHUT_RDWR = 2;
    public const short POLLIN = 0x1;
    public const int F_GETFL = 3;
    public const int F_SETFL = 4;
    public const int PROT_READ = 1;
    public const int PROT_WRITE = 2;
    public const int MAP_SHARED = 1;
    public const uint MFD_CLOEXEC = 1;
    public const uint MFD_ALLOW_SEALING = 2;
    public const uint MFD_HUGETLB = 4;
    public const int MAP_PRIVATE = 2;
    public const int MAP_FIXED = 0x10;
    public const int MAP_ANONYMOUS = 0x20;
    public const int MAP_NORESERVE = 0x4000;
    public const int PROT_NONE = 0;
    public const int F_ADD_SEALS = 1033;
    public const int F_GET_SEALS = 1034;

    [StructLayout(LayoutKind.Sequential)]
    public struct MsgHdr
    {
        public void* Name;
        public uint NameLen;
        public NativeIoVec* Iov;
        public nuint IovLen;
        public void* Control;
        public nuint ControlLen;
        public int Flags;
    }

    [StructLayout(LayoutKind.Sequential)]
    public struct CmsgHdr
    {
        public nuint Len;
        public int Level;
        public int Type;
    }

    [StructLayout(LayoutKind.Sequential)]
    public struct NativeIoVec
    {
        public void* Base;
        public nuint Len;
    }

    [StructLayout(LayoutKind.Sequential)]
    public struct PollFd
    {
        public int Fd;
        public short Events;
        public short REvents;
    }

    /// <summary>struct sockaddr_un: family + 108 bytes of path.</summary>
    [StructLayout(LayoutKind.Sequential, Size = 110)]
    public struct SockAddrUn
    {
        public ushort Family;
    }

    [LibraryImport("libc", SetLastError = true)]
    public static partial int socket(int domain, int type, int protocol);

    [LibraryImport("libc", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    public static partial int chown(string path, uint owner, uint group);

    [LibraryImport("libc", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    public static partial int chmod(string path, uint mode);

    /// <summary>struct passwd*; offsets of pw_uid (16) on x86_64 glibc. Not thread safe: parse-time only.</summary>
    [LibraryImport("libc", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    public static partial nint getpwnam(string name);

    /// <summary>struct group*; gr_gid at offset 16 on x86_64 glibc. Not thread safe: parse-time only.</summary>
    [LibraryImport("libc", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    public static partial nint getgrnam(string name);

    [LibraryImport("libc", SetLastError = true)]
    public static partial int socketpair(int domain, int type, int protocol, int* sv);

    [LibraryImport("libc", SetLastError = true)]
    public static partial int bind(int fd, void* addr, uint len);

    [LibraryImport("libc", SetLastError = true)]
    public static partial int connect(int fd, void* addr, uint len);

    [LibraryImport("libc", SetLastError = true)]
    public static partial int listen(int fd, int backlog);

    [LibraryImport("libc", SetLastError = true)]
    public static partial int accept4(int fd, void* addr, void* len, int flags);

    [LibraryImport("libc", SetLastError = true)]
    public static partial nint sendmsg(int fd, MsgHdr* msg, int flags);

    [LibraryImport("libc", SetLastError = true)]
    public static partial nint recvmsg(int fd, MsgHdr* msg, int flags);

    [LibraryImport("libc", SetLastError = true)]
    public static partial nint recv(int fd, void* buf, nuint len, int flags);

    [LibraryImport("libc", SetLastError = true)]
    public static partial int shutdown(int fd, int how);

    [LibraryImport("libc", SetLastError = true)]
    public static partial int poll(PollFd* fds, nuint nfds, int timeout);

    [LibraryImport("libc", SetLastError = true)]
    public static partial int close(int fd);

    [LibraryImport("libc", SetLastError = true)]
    public static partial int fcntl(int fd, int cmd, int arg);

    [LibraryImport("libc", SetLastError = true)]
    public static partial int ftruncate(int fd, long length);

    [LibraryImport("libc", SetLastError = true)]
    public static partial int memfd_create(byte* name, uint flags);

    [LibraryImport("libc", SetLastError = true)]
    public static partial void* mmap(void* addr, nuint length, int prot, int flags, int fd, long offset);

    [LibraryImport("libc", SetLastError = true)]
    public static partial int munmap(void* addr, nuint length);

    [LibraryImport("libc", SetLastError = true)]
    public static partial int unlink(byte* path);

    internal static int FillAddress(string path, SockAddrUn* addr)
    {
        var bytes = Encoding.UTF8.GetBytes(path);
        if (bytes.Length == 0 || bytes.Length > 107)
        {
            throw new ArgumentException($"socket path '{path}' is empty or longer than 107 bytes");
        }

        *addr = default;
        addr->Family = AF_UNIX;
        byte* p = (byte*)addr + 2;
        for (int i = 0; i < bytes.Length; i++)
        {
            p[i] = bytes[i];
        }

        return 2 + bytes.Length + 1;
    }
}

/// <summary>Small fd helpers.</summary>
public static class Fd
{
    /// <summary>Closes <paramref name="fd"/> if it is valid (&gt;= 0).</summary>
    public static void Close(int fd)
    {
        if (fd >= 0)
        {
            SocketNative.close(fd);
        }
    }

    /// <summary>Closes every valid fd in the span and sets the entries to -1.</summary>
    public static void CloseAll(Span<int> fds)
    {
        for (int i = 0; i < fds.Length; i++)
        {
            Close(fds[i]);
            fds[i] = -1;
        }
    }

    /// <summary>
    /// fstat: the size of the file behind <paramref name="fd"/> and whether it is a regular file (memfd, hugetlbfs
    /// and tmpfs files are). Returns 0 or -errno.
    /// </summary>
    public static unsafe int GetFileSize(int fd, out long size, out bool regular)
    {
        StatBuf st;
        if (Native.fstat(fd, &st) != 0)
        {
            size = 0;
            regular = false;
            return -Native.Errno;
        }

        size = st.Size;
        regular = st.IsRegular;
        return 0;
    }

    /// <summary>memfd seals (F_SEAL_*), or -errno (-EINVAL for a file that cannot carry seals).</summary>
    public static int GetSeals(int fd)
    {
        int seals = SocketNative.fcntl(fd, SocketNative.F_GET_SEALS, 0);
        return seals >= 0 ? seals : -Native.Errno;
    }

    /// <summary>F_SEAL_SEAL: no more seals can be added.</summary>
    public const int SealSeal = 1;

    /// <summary>F_SEAL_SHRINK: the file cannot shrink (so a mapping of it cannot fault with SIGBUS).</summary>
    public const int SealShrink = 2;

    /// <summary>F_SEAL_GROW.</summary>
    public const int SealGrow = 4;

    public static bool SetNonBlocking(int fd)
    {
        int flags = SocketNative.fcntl(fd, SocketNative.F_GETFL, 0);
        return flags >= 0 && SocketNative.fcntl(fd, SocketNative.F_SETFL, flags | Native.O_NONBLOCK) == 0;
    }
}

/// <summary>
/// A connected Unix stream socket that can pass file descriptors (SCM_RIGHTS). Blocking I/O: it is used by
/// one dedicated protocol thread per connection; <see cref="Shutdown"/> (any thread) wakes a blocked receive.
/// Received fds belong to the caller, who must close those it does not keep.
/// </summary>
public sealed unsafe class UnixConnection : IDisposable
{
    /// <summary>Most fds accepted with one message (more are closed and reported as truncation).</summary>
    public const int MaxFdsPerMessage = 32;

    private int _fd;

    public UnixConnection(int fd) => _fd = fd;

    public int FileDescriptor => _fd;

    public static (UnixConnection A, UnixConnection B) CreatePair()
    {
        int* sv = stackalloc int[2];
        if (SocketNative.socketpair(SocketNative.AF_UNIX, SocketNative.SOCK_STREAM | SocketNative.SOCK_CLOEXEC, 0, sv) != 0)
        {
            throw new IOException($"socketpair: {Native.StrError(Native.Errno)}");
        }

        return (new UnixConnection(sv[0]), new UnixConnection(sv[1]));
    }

    /// <summary>Connects to a listening socket at <paramref name="path"/>; throws IOException on failure.</summary>
    public static UnixConnection Connect(string path)
    {
        int fd = SocketNative.socket(SocketNative.AF_UNIX, SocketNative.SOCK_STREAM | SocketNative.SOCK_CLOEXEC, 0);
        if (fd < 0)
        {
            throw new IOException($"socket: {Native.StrError(Native.Errno)}");
        }

        SocketNative.SockAddrUn addr;
        int len = SocketNative.FillAddress(path, &addr);
        if (SocketNative.connect(fd, &addr, (uint)len) != 0)
        {
            int e = Native.Errno;
            SocketNative.close(fd);
            throw new IOException($"connect {path}: {Native.StrError(e)}");
        }

        return new UnixConnection(fd);
    }

    /// <summary>
    /// One recvmsg: reads up to <paramref name="buffer"/>.Length bytes and the fds attached to them.
    /// Returns bytes read (0 = peer closed) or -errno. <paramref name="fdCount"/> fds are stored in
    /// <paramref name="fds"/>; if the peer sent more than fit (or the kernel truncated), all are closed and
    /// <paramref name="truncated"/> is set.
    /// </summary>
    public int Receive(Span<byte> buffer, Span<int> fds, out int fdCount, out bool truncated)
    {
        fdCount = 0;
        truncated = false;
        const int controlSize = 16 + (MaxFdsPerMessage * 4); // CMSG_SPACE(32 * sizeof(int))
        byte* control = stackalloc byte[controlSize];
        fixed (byte* p = buffer)
        {
            SocketNative.NativeIoVec iov;
            iov.Base = p;
            iov.Len = (nuint)buffer.Length;
            SocketNative.MsgHdr msg = default;
            msg.Iov = &iov;
            msg.IovLen = 1;
            msg.Control = control;
            msg.ControlLen = controlSize;
            nint n;
            do
            {
                n = SocketNative.recvmsg(_fd, &msg, SocketNative.MSG_CMSG_CLOEXEC);
            }
            while (n < 0 && Native.Errno == Errno.EINTR);

            if (n < 0)
            {
                return -Native.Errno;
            }

            // Walk the control messages (CMSG_FIRSTHDR / CMSG_NXTHDR by hand: headers are 8-byte aligned).
            byte* c = control;
            byte* end = control + msg.ControlLen;
            while (c + sizeof(SocketNative.CmsgHdr) <= end)
            {
                var h = (SocketNative.CmsgHdr*)c;
                if (h->Len < (nuint)sizeof(SocketNative.CmsgHdr) || c + h->Len > end)
                {
                    break;
                }

                if (h->Level == SocketNative.SOL_SOCKET && h->Type == SocketNative.SCM_RIGHTS)
                {
                    int count = (int)((h->Len - (nuint)sizeof(SocketNative.CmsgHdr)) / 4);
                    int* data = (int*)(c + sizeof(SocketNative.CmsgHdr));
                    for (int i = 0; i < count; i++)
                    {
                        if (fdCount < fds.Length)
                        {
                            fds[fdCount++] = data[i];
                        }
                        else
                        {
                            Fd.Close(data[i]);
                            truncated = true;
                        }
                    }
                }

                c += (h->Len + 7) & ~(nuint)7;
            }

            if ((msg.Flags & SocketNative.MSG_CTRUNC) != 0)
            {
                truncated = true;
            }

            if (truncated)
            {
                Fd.CloseAll(fds[..fdCount]);
                fdCount = 0;
            }

            return (int)n;
        }
    }

    /// <summary>Reads exactly buffer.Length bytes (fds arriving with them are closed). Returns false on EOF or error.</summary>
    public bool ReceiveExact(Span<byte> buffer)
    {
        Span<int> fds = stackalloc int[MaxFdsPerMessage];
        int done = 0;
        while (done < buffer.Length)
        {
            int n = Receive(buffer[done..], fds, out int count, out _);
            Fd.CloseAll(fds[..count]);
            if (n <= 0)
            {
                return false;
            }

            done += n;
        }

        return true;
    }

    /// <summary>Sends all of <paramref name="data"/>, with <paramref name="fds"/> attached to the first byte. Returns 0 or -errno.</summary>
    public int Send(ReadOnlySpan<byte> data, ReadOnlySpan<int> fds = default)
    {
        if (fds.Length > MaxFdsPerMessage)
        {
            return -Errno.EINVAL;
        }

        int controlSize = fds.Length == 0 ? 0 : 16 + (((fds.Length * 4) + 7) & ~7);
        byte* control = stackalloc byte[16 + (MaxFdsPerMessage * 4)];
        int sent = 0;
        fixed (byte* p = data)
        {
            while (sent < data.Length || (data.Length == 0 && sent == 0 && fds.Length > 0))
            {
                SocketNative.NativeIoVec iov;
                iov.Base = p + sent;
                iov.Len = (nuint)(data.Length - sent);
                SocketNative.MsgHdr msg = default;
                msg.Iov = &iov;
                msg.IovLen = 1;
                if (sent == 0 && fds.Length > 0)
                {
                    var h = (SocketNative.CmsgHdr*)control;
                    h->Level = SocketNative.SOL_SOCKET;
                    h->Type = SocketNative.SCM_RIGHTS;
                    h->Len = (nuint)(16 + (fds.Length * 4));
                    int* dst = (int*)(control + 16);
                    for (int i = 0; i < fds.Length; i++)
                    {
                        dst[i] = fds[i];
                    }

                    msg.Control = control;
                    msg.ControlLen = (nuint)controlSize;
                }

                nint n = SocketNative.sendmsg(_fd, &msg, SocketNative.MSG_NOSIGNAL);
                if (n < 0)
                {
                    int e = Native.Errno;
                    if (e == Errno.EINTR)
                    {
                        continue;
                    }

                    return -e;
                }

                sent += (int)n;
                if (data.Length == 0)
                {
                    break;
                }
            }
        }

        return 0;
    }

    /// <summary>Waits until the socket is readable (or hung up). Returns false on timeout.</summary>
    public bool WaitReadable(int timeoutMs)
    {
        SocketNative.PollFd pfd = default;
        pfd.Fd = _fd;
        pfd.Events = SocketNative.POLLIN;
        int r = SocketNative.poll(&pfd, 1, timeoutMs);
        return r != 0;
    }

    /// <summary>
    /// Whether the peer has closed the connection (hang-up, error, or end of file with nothing pending). Does not
    /// consume anything: a pending message is left for the reader. Any thread; one non-blocking poll.
    /// </summary>
    public bool IsPeerClosed()
    {
        int fd = Volatile.Read(ref _fd);
        if (fd < 0)
        {
            return true;
        }

        SocketNative.PollFd pfd = default;
        pfd.Fd = fd;
        pfd.Events = SocketNative.POLLIN;
        if (SocketNative.poll(&pfd, 1, 0) <= 0)
        {
            return false;
        }

        if ((pfd.REvents & (PollHup | PollErr)) != 0)
        {
            return true;
        }

        byte b;
        return SocketNative.recv(fd, &b, 1, MsgPeek | MsgDontWait) == 0;
    }

    private const short PollErr = 0x8;
    private const short PollHup = 0x10;
    private const int MsgPeek = 0x2;
    private const int MsgDontWait = 0x40;

    /// <summary>Shuts both directions down: a receive blocked on another thread returns 0 (any thread).</summary>
    public void Shutdown()
    {
        int fd = Volatile.Read(ref _fd);
        if (fd >= 0)
        {
            SocketNative.shutdown(fd, SocketNative.SHUT_RDWR);
        }
    }

    public void Dispose()
    {
        int fd = Interlocked.Exchange(ref _fd, -1);
        Fd.Close(fd);
    }
}

/// <summary>A listening Unix stream socket at a path; removes the socket file when disposed.</summary>
public sealed unsafe class UnixSocketListener : IDisposable
{
    private readonly EventFd _cancel = new();
    private int _fd;

    private UnixSocketListener(int fd, string path)
    {
        _fd = fd;
        Path = path;
    }

    public string Path { get; }

    /// <summary>
    /// Binds and listens at <paramref name="path"/>, replacing a stale socket file (not any other file). With
    /// <paramref name="ownership"/>, the socket file gets its owner, group and mode before it listens.
    /// </summary>
    public static UnixSocketListener Listen(string path, int backlog = 16, SocketOwnership? ownership = null)
    {
        if (File.Exists(path))
        {
            if (!IsSocket(path))
            {
                throw new IOException($"{path} exists and is not a socket");
            }

            File.Delete(path);
        }

        int fd = SocketNative.socket(SocketNative.AF_UNIX, SocketNative.SOCK_STREAM | SocketNative.SOCK_CLOEXEC, 0);
        if (fd < 0)
        {
            throw new IOException($"socket: {Native.StrError(Native.Errno)}");
        }

        SocketNative.SockAddrUn addr;
        int len = SocketNative.FillAddress(path, &addr);
        if (SocketNative.bind(fd, &addr, (uint)len) != 0)
        {
            int e = Native.Errno;
            SocketNative.close(fd);
            throw new IOException($"cannot listen on {path}: {Native.StrError(e)}");
        }

        try
        {
            // Between bind and listen: no front end can connect before the owner and mode are right.
            ownership?.Apply(path);
        }
        catch
        {
            SocketNative.close(fd);
            File.Delete(path);
            throw;
        }

        if (SocketNative.listen(fd, backlog) != 0)
        {
            int e = Native.Errno;
            SocketNative.close(fd);
            File.Delete(path);
            throw new IOException($"cannot listen on {path}: {Native.StrError(e)}");
        }

        return new UnixSocketListener(fd, path);
    }

    private static bool IsSocket(string path)
    {
        StatBuf st;
        var bytes = Encoding.UTF8.GetBytes(path + "\0");
        fixed (byte* p = bytes)
        {
            int fd = Tmds.Linux.LibC.open(p, 0x200000 /*O_PATH*/ | Native.O_CLOEXEC, 0);
            if (fd < 0)
            {
                return false;
            }

            int r = Native.fstat(fd, &st);
            SocketNative.close(fd);
            return r == 0 && (st.Mode & StatBuf.S_IFMT) == 0xC000;
        }
    }

    /// <summary>
    /// Waits for a connection. Returns null when <see cref="Dispose"/> was called (from any thread) or the
    /// wait timed out. Blocking: call from the listener's own thread.
    /// </summary>
    public UnixConnection? Accept(int timeoutMs = -1)
    {
        var pfds = stackalloc SocketNative.PollFd[2];
        pfds[0].Fd = Volatile.Read(ref _fd);
        pfds[0].Events = SocketNative.POLLIN;
        pfds[1].Fd = _cancel.Fd;
        pfds[1].Events = SocketNative.POLLIN;
        if (pfds[0].Fd < 0)
        {
            return null;
        }

        int r = SocketNative.poll(pfds, 2, timeoutMs);
        if (r <= 0 || pfds[1].REvents != 0 || Volatile.Read(ref _fd) < 0)
        {
            return null;
        }

        int c = SocketNative.accept4(pfds[0].Fd, null, null, SocketNative.SOCK_CLOEXEC);
        return c < 0 ? null : new UnixConnection(c);
    }

    public bool IsDisposed => Volatile.Read(ref _fd) < 0;

    public void Dispose()
    {
        int fd = Interlocked.Exchange(ref _fd, -1);
        if (fd < 0)
        {
            return;
        }

        _cancel.Signal();
        SocketNative.close(fd);
        try
        {
            File.Delete(Path);
        }
        catch (IOException)
        {
        }
        catch (UnauthorizedAccessException)
        {
        }
    }
}

/// <summary>
/// An owned shared mapping of a file descriptor (a guest memory region, a memfd). Unmapped on dispose; the
/// pointer must not be used afterwards, so owners dispose only once no I/O references the memory.
/// </summary>
public sealed unsafe class MappedRegion : IDisposable
{
    private nint _ptr;
    private DmaMemoryRegistry? _dma;

    private MappedRegion(nint ptr, ulong length)
    {
        _ptr = ptr;
        Length = length;
    }

    public nint Pointer => _ptr;
    public ulong Length { get; }

    /// <summary>Whether the mapping is registered for DMA (<see cref="Map(int, ulong, DmaMemoryRegistry?)"/>).</summary>
    public bool DmaRegistered => _dma is not null;

    /// <summary>Maps <paramref name="length"/> bytes of <paramref name="fd"/> from offset 0, read-write and shared. Throws IOException.</summary>
    public static MappedRegion Map(int fd, ulong length) => Map(fd, length, null);

    /// <summary>
    /// As <see cref="Map(int, ulong)"/>, and registers the whole mapping (rounded up to pages) with
    /// <paramref name="dma"/> so devices may target it; <see cref="Dispose"/> unregisters it before unmapping
    /// (owners dispose only once no I/O uses the memory, so no device touches it after the unmap).
    /// </summary>
    public static MappedRegion Map(int fd, ulong length, DmaMemoryRegistry? dma)
    {
        if (length == 0 || length > (ulong)nint.MaxValue)
        {
            throw new IOException($"bad mapping length {length}");
        }

        void* p = SocketNative.mmap(null, (nuint)length, SocketNative.PROT_READ | SocketNative.PROT_WRITE, SocketNative.MAP_SHARED, fd, 0);
        if (p == (void*)-1)
        {
            throw new IOException($"mmap of {length} bytes failed: {Native.StrError(Native.Errno)}");
        }

        var m = new MappedRegion((nint)p, length);
        if (dma is not null && dma.Register((nint)p, DmaMemoryRegistry.PageAlign(length)) == 0)
        {
            m._dma = dma;
        }

        return m;
    }

    private MappedRegion RegisterDma(DmaMemoryRegistry? dma)
    {
        if (dma is not null && dma.Register(_ptr, DmaMemoryRegistry.PageAlign(Length)) == 0)
        {
            _dma = dma;
        }

        return this;
    }

    /// <summary>2 MiB: the size and address alignment of <see cref="CreateShared"/> regions (an x86-64 huge page).</summary>
    public const ulong HugePageBytes = 2UL << 20;

    /// <summary>
    /// Memory to share with a vhost-user back end laid out as QEMU and DPDK lay theirs out: <paramref name="size"/>
    /// rounded up to 2 MiB, mapped at a 2 MiB-aligned address, and backed by huge pages (a sealed MFD_HUGETLB memfd)
    /// when the system has enough free ones, otherwise by a sealed ordinary memfd. SPDK's vhost target registers
    /// every region for address translation on 2 MiB boundaries (spdk_mem_register) and DPDK maps a region's fd
    /// in units of its block size, so a region that is not 2 MiB-aligned in size and address is refused or slow
    /// there. Returns the mapping; <paramref name="fd"/> (the caller owns it) and <paramref name="hugePages"/> say
    /// what backs it; with <paramref name="dma"/> the mapping is registered there as <see cref="Map(int, ulong,
    /// DmaMemoryRegistry?)"/> does. Throws <see cref="IOException"/> when neither kind can be created.
    /// </summary>
    public static MappedRegion CreateShared(string name, ulong size, out int fd, out bool hugePages, DmaMemoryRegistry? dma = null)
    {
        if (size == 0 || size > (ulong)nint.MaxValue - HugePageBytes)
        {
            throw new IOException($"bad shared memory size {size}");
        }

        ulong rounded = (size + HugePageBytes - 1) & ~(HugePageBytes - 1);
        int hfd = TryCreateMemFd(name, (long)rounded, SocketNative.MFD_HUGETLB, out _);
        if (hfd >= 0)
        {
            // A hugetlbfs mapping reserves its pages at mmap: ENOMEM here means too few free huge pages.
            var huge = TryMapAligned(hfd, rounded, HugePageBytes, out _);
            if (huge is not null)
            {
                fd = hfd;
                hugePages = true;
                return huge.RegisterDma(dma);
            }

            SocketNative.close(hfd);
        }

        int mfd = TryCreateMemFd(name, (long)rounded, 0, out int err);
        if (mfd < 0)
        {
            throw new IOException($"memfd of {rounded} bytes for {name}: {Native.StrError(err)}");
        }

        var map = TryMapAligned(mfd, rounded, HugePageBytes, out err);
        if (map is null)
        {
            SocketNative.close(mfd);
            throw new IOException($"mmap of {rounded} bytes for {name}: {Native.StrError(err)}");
        }

        fd = mfd;
        hugePages = false;
        return map.RegisterDma(dma);
    }

    /// <summary>
    /// Maps <paramref name="length"/> bytes of <paramref name="fd"/> at an address aligned to
    /// <paramref name="alignment"/> (a power of two): reserves length + alignment of address space, maps the file
    /// over its aligned part, and returns the slack. Null (and the errno) on failure.
    /// </summary>
    private static MappedRegion? TryMapAligned(int fd, ulong length, ulong alignment, out int errno)
    {
        nuint reserve = (nuint)(length + alignment);
        void* r = SocketNative.mmap(null, reserve, SocketNative.PROT_NONE, SocketNative.MAP_PRIVATE | SocketNative.MAP_ANONYMOUS | SocketNative.MAP_NORESERVE, -1, 0);
        if (r == (void*)-1)
        {
            errno = Native.Errno;
            return null;
        }

        nuint start = (nuint)r;
        nuint aligned = (start + (nuint)alignment - 1) & ~((nuint)alignment - 1);
        void* p = SocketNative.mmap((void*)aligned, (nuint)length, SocketNative.PROT_READ | SocketNative.PROT_WRITE, SocketNative.MAP_SHARED | SocketNative.MAP_FIXED, fd, 0);
        if (p == (void*)-1)
        {
            errno = Native.Errno;
            SocketNative.munmap(r, reserve);
            return null;
        }

        // SAFETY: the head and tail slack are parts of our own reservation that the file mapping did not replace.
        if (aligned > start)
        {
            SocketNative.munmap(r, aligned - start);
        }

        nuint end = aligned + (nuint)length;
        if (start + reserve > end)
        {
            SocketNative.munmap((void*)end, start + reserve - end);
        }

        errno = 0;
        return new MappedRegion((nint)p, length);
    }

    private static int TryCreateMemFd(string name, long size, uint flags, out int errno)
    {
        var bytes = Encoding.UTF8.GetBytes(name + "\0");
        fixed (byte* p = bytes)
        {
            int fd = SocketNative.memfd_create(p, SocketNative.MFD_CLOEXEC | SocketNative.MFD_ALLOW_SEALING | flags);
            if (fd < 0)
            {
                errno = Native.Errno;
                return -1;
            }

            if (SocketNative.ftruncate(fd, size) != 0
                || SocketNative.fcntl(fd, SocketNative.F_ADD_SEALS, Fd.SealShrink | Fd.SealGrow | Fd.SealSeal) != 0)
            {
                errno = Native.Errno;
                SocketNative.close(fd);
                return -1;
            }

            errno = 0;
            return fd;
        }
    }

    /// <summary>
    /// Creates a memfd of <paramref name="size"/> bytes; returns its fd (caller owns it). <paramref name="sealed"/>:
    /// its size is sealed (no shrink, no grow, no further seals), so whoever it is handed to cannot make our
    /// mapping of it fault.
    /// </summary>
    public static int CreateMemFd(string name, long size, bool @sealed = false)
    {
        var bytes = Encoding.UTF8.GetBytes(name + "\0");
        fixed (byte* p = bytes)
        {
            int fd = SocketNative.memfd_create(p, SocketNative.MFD_CLOEXEC | (@sealed ? SocketNative.MFD_ALLOW_SEALING : 0));
            if (fd < 0)
            {
                throw new IOException($"memfd_create: {Native.StrError(Native.Errno)}");
            }

            if (SocketNative.ftruncate(fd, size) != 0)
            {
                int e = Native.Errno;
                SocketNative.close(fd);
                throw new IOException($"ftruncate: {Native.StrError(e)}");
            }

            if (@sealed && SocketNative.fcntl(fd, SocketNative.F_ADD_SEALS, Fd.SealShrink | Fd.SealGrow | Fd.SealSeal) != 0)
            {
                int e = Native.Errno;
                SocketNative.close(fd);
                throw new IOException($"F_ADD_SEALS: {Native.StrError(e)}");
            }

            return fd;
        }
    }

    public void Dispose()
    {
        nint p = Interlocked.Exchange(ref _ptr, 0);
        if (p != 0)
        {
            // Withdrawn from the devices (IOMMU unmapped) before the pages go.
            Interlocked.Exchange(ref _dma, null)?.Unregister(p, DmaMemoryRegistry.PageAlign(Length));
            SocketNative.munmap((void*)p, (nuint)Length);
        }
    }
}

/// <summary>
/// Owner, group and mode for a Unix socket file (vhostd's --socket-user/--socket-group/--socket-mode), so that
/// QEMU running as another user (libvirt's qemu:kvm) can connect without the operator chowning sockets by hand
/// after every controller creation, as SPDK users do. Null members leave that attribute as created.
/// </summary>
public sealed record SocketOwnership(uint? UserId, uint? GroupId, UnixFileMode? Mode)
{
    /// <summary>Whether anything is to be changed.</summary>
    public bool IsEmpty => UserId is null && GroupId is null && Mode is null;

    /// <summary>Applies the owner/group (chown) then the mode (chmod) to <paramref name="path"/>; throws <see cref="IOException"/>.</summary>
    public void Apply(string path)
    {
        if (UserId is not null || GroupId is not null)
        {
            // (uid_t)-1 leaves that id unchanged.
            if (SocketNative.chown(path, UserId ?? uint.MaxValue, GroupId ?? uint.MaxValue) != 0)
            {
                int e = Native.Errno;
                throw new IOException($"cannot chown {path} to {UserId?.ToString(CultureInfo.InvariantCulture) ?? "-"}:{GroupId?.ToString(CultureInfo.InvariantCulture) ?? "-"}: {Native.StrError(e)}");
            }
        }

        if (Mode is { } mode)
        {
            if (SocketNative.chmod(path, (uint)mode) != 0)
            {
                int e = Native.Errno;
                throw new IOException($"cannot chmod {path} to {Convert.ToString((int)mode, 8)}: {Native.StrError(e)}");
            }
        }
    }

    /// <summary>A user name or numeric uid; false when no such user exists.</summary>
    public static bool TryResolveUser(string user, out uint uid)
    {
        if (uint.TryParse(user, NumberStyles.None, CultureInfo.InvariantCulture, out uid) && uid != uint.MaxValue)
        {
            return true;
        }

        nint pw = user.Length == 0 || user.Contains('\0', StringComparison.Ordinal) ? 0 : SocketNative.getpwnam(user);
        if (pw == 0)
        {
            return false;
        }

        uid = (uint)Marshal.ReadInt32(pw, 16); // struct passwd { char *pw_name; char *pw_passwd; uid_t pw_uid; ... }
        return true;
    }

    /// <summary>A group name or numeric gid; false when no such group exists.</summary>
    public static bool TryResolveGroup(string group, out uint gid)
    {
        if (uint.TryParse(group, NumberStyles.None, CultureInfo.InvariantCulture, out gid) && gid != uint.MaxValue)
        {
            return true;
        }

        nint gr = group.Length == 0 || group.Contains('\0', StringComparison.Ordinal) ? 0 : SocketNative.getgrnam(group);
        if (gr == 0)
        {
            return false;
        }

        gid = (uint)Marshal.ReadInt32(gr, 16); // struct group { char *gr_name; char *gr_passwd; gid_t gr_gid; ... }
        return true;
    }

    /// <summary>An octal permission mode (0660, 660, 0o660): permission bits only, no setuid/setgid/sticky.</summary>
    public static bool TryParseMode(string text, out UnixFileMode mode)
    {
        mode = default;
        string digits = text.StartsWith("0o", StringComparison.OrdinalIgnoreCase) ? text[2..] : text;
        if (digits.Length is 0 or > 4)
        {
            return false;
        }

        int value = 0;
        foreach (char c in digits)
        {
            if (c is < '0' or > '7')
            {
                return false;
            }

            value = (value * 8) + (c - '0');
        }

        if (value > 0x1FF)
        {
            return false;
        }

        mode = (UnixFileMode)value;
        return true;
    }
}
