using System.Runtime.InteropServices;
using System.Text;
using System.Text.Json.Nodes;
using Tmds.Linux;
using VhostBackend.Platform;
using VhostBackend.Reactor;

namespace VhostBackend.Bdev.Modules.File;

/// <summary>
/// A regular file or block device served through io_uring: each reactor gets its own ring (an I/O channel),
/// submissions are batched into one io_uring_enter per poll, completions are reaped without a syscall, and the
/// ring's eventfd wakes a sleeping reactor. Opened with O_DIRECT when the file system allows it (then buffers
/// must be aligned to the block size: the bdev layer bounces the rest).
/// Unmap punches holes (files) or BLKDISCARD (block devices, synchronous); write-zeroes uses ZERO_RANGE
/// (files) or BLKZEROOUT (block devices, synchronous).
/// </summary>
public sealed unsafe class FileBdev : Bdev
{
    private const ulong BLKGETSIZE64 = 0x80081272;
    private const ulong BLKSSZGET = 0x1268;
    private const ulong BLKDISCARD = 0x1277;
    private const ulong BLKZEROOUT = 0x127f;
    private const int FALLOC_FL_KEEP_SIZE = 0x01;
    private const int FALLOC_FL_PUNCH_HOLE = 0x02;
    private const int FALLOC_FL_ZERO_RANGE = 0x10;

    private readonly FileDevice _device;
    private int _fd;

    private FileBdev(string name, string path, int fd, bool direct, bool blockDevice, bool readOnly, uint blockSize, ulong blocks, Guid? uuid, string createMethod)
        : base(name, blockDevice ? "Block device" : "File disk", blockSize, blocks, uuid)
    {
        Path = path;
        _fd = fd;
        Direct = direct;
        IsBlockDevice = blockDevice;
        ReadOnly = readOnly;
        CreateMethod = createMethod;
        RequiredAlignment = direct ? blockSize : 1;
        WriteCache = true;
        MaxTransferBlocks = (uint)Math.Max(1, (1024 * 1024) / blockSize);
        _device = new FileDevice(this);
    }

    public string Path { get; }
    public bool Direct { get; }
    public bool IsBlockDevice { get; }
    public bool ReadOnly { get; }
    public string CreateMethod { get; }
    internal int Fd => _fd;

    /// <summary>Opens <paramref name="path"/>. Block size 0 = detect. Throws <see cref="FileBdevException"/> with an errno.</summary>
    public static FileBdev Open(string name, string path, uint blockSize, bool readOnly, Guid? uuid, string createMethod)
    {
        if (blockSize != 0 && (blockSize < 512 || (blockSize & (blockSize - 1)) != 0 || blockSize > 65536))
        {
            throw new FileBdevException(Native.EINVAL, $"block_size {blockSize} must be a power of two between 512 and 65536");
        }

        int flags = (readOnly ? Native.O_RDONLY : Native.O_RDWR) | Native.O_CLOEXEC;
        int fd = OpenRaw(path, flags | Native.O_DIRECT);
        bool direct = fd >= 0;
        if (fd < 0)
        {
            int errno = Native.Errno;
            if (errno != Native.EINVAL)
            {
                throw new FileBdevException(errno, $"could not open {path}: {Native.StrError(errno)}");
            }

            fd = OpenRaw(path, flags); // e.g. tmpfs: no O_DIRECT
            if (fd < 0)
            {
                errno = Native.Errno;
                throw new FileBdevException(errno, $"could not open {path}: {Native.StrError(errno)}");
            }
        }

        try
        {
            StatBuf st;
            if (Native.fstat(fd, &st) != 0)
            {
                throw new FileBdevException(Native.Errno, $"fstat {path} failed");
            }

            ulong size;
            uint detected = 512;
            bool blockDevice = st.IsBlockDevice;
            if (blockDevice)
            {
                ulong bytes;
                int sector;
                if (Native.ioctl(fd, BLKGETSIZE64, &bytes) != 0 || Native.ioctl(fd, BLKSSZGET, &sector) != 0)
                {
                    throw new FileBdevException(Native.Errno, $"cannot read the size of block device {path}");
                }

                size = bytes;
                detected = (uint)sector;
            }
            else if (st.IsRegular)
            {
                size = (ulong)st.Size;
            }
            else
            {
                throw new FileBdevException(Native.EINVAL, $"{path} is neither a regular file nor a block device");
            }

            uint bs = blockSize == 0 ? detected : blockSize;
            if (blockDevice && bs < detected)
            {
                throw new FileBdevException(Native.EINVAL, $"block_size {bs} is smaller than {path}'s logical block size {detected}");
            }

            ulong blocks = size / bs;
            if (blocks == 0)
            {
                throw new FileBdevException(Native.EINVAL, $"{path} is smaller than one {bs}-byte block");
            }

            return new FileBdev(name, path, fd, direct, blockDevice, readOnly, bs, blocks, uuid, createMethod);
        }
        catch
        {
            LibC.close(fd);
            throw;
        }
    }

    private static int OpenRaw(string path, int flags)
    {
        byte[] bytes = Encoding.UTF8.GetBytes(path + "\0");
        fixed (byte* p = bytes)
        {
            return LibC.open(p, flags, 0);
        }
    }

    /// <summary>Creates <paramref name="path"/> as a sparse file of <paramref name="sizeBytes"/> if it does not exist.</summary>
    public static void CreateSparseIfMissing(string path, long sizeBytes)
    {
        if (System.IO.File.Exists(path))
        {
            return;
        }

        Directory.CreateDirectory(System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(path))!);
        using var f = new FileStream(path, FileMode.CreateNew, FileAccess.Write);
        f.SetLength(sizeBytes);
    }

    public override bool SupportsIoType(BdevIoType type) => type switch
    {
        BdevIoType.Read or BdevIoType.Flush or BdevIoType.Reset => true,
        BdevIoType.Write or BdevIoType.Unmap or BdevIoType.WriteZeroes => !ReadOnly,
        _ => false,
    };

    protected internal override IoChannel GetModuleChannel(Reactor.Reactor reactor) => reactor.GetIoChannel(_device);

    protected internal override void Submit(IoChannel moduleChannel, BdevIo io) => ((FileChannel)moduleChannel.Context).Submit(io);

    /// <summary>Re-reads the file size (bdev_aio_rescan); raises a Resize event when it changed.</summary>
    public int Rescan()
    {
        StatBuf st;
        ulong size;
        if (IsBlockDevice)
        {
            ulong bytes;
            if (Native.ioctl(_fd, BLKGETSIZE64, &bytes) != 0)
            {
                return -Native.Errno;
            }

            size = bytes;
        }
        else
        {
            if (Native.fstat(_fd, &st) != 0)
            {
                return -Native.Errno;
            }

            size = (ulong)st.Size;
        }

        ulong blocks = size / BlockSize;
        if (blocks == 0)
        {
            return -Native.EINVAL;
        }

        if (blocks != BlockCount)
        {
            SetBlockCount(blocks);
        }

        return 0;
    }

    /// <summary>Synchronous discard / zero-out for block devices (io_uring has no opcode for them here).</summary>
    internal int BlockDeviceRange(bool zero, ulong offset, ulong length)
    {
        ulong* range = stackalloc ulong[2];
        range[0] = offset;
        range[1] = length;
        return Native.ioctl(_fd, zero ? BLKZEROOUT : BLKDISCARD, range) == 0 ? 0 : -Native.Errno;
    }

    internal static int FallocateMode(bool zero) => zero ? FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE : FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;

    internal static int PunchMode => FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;

    public override JsonObject DriverSpecific() => new()
    {
        [CreateMethod == "bdev_uring_create" ? "uring" : "aio"] = new JsonObject
        {
            ["filename"] = Path,
            ["block_size_override"] = true,
            ["readonly"] = ReadOnly,
            ["o_direct"] = Direct,
        },
    };

    public override JsonObject ConfigCall()
    {
        var p = new JsonObject { ["name"] = Name, ["filename"] = Path, ["block_size"] = BlockSize, ["uuid"] = Uuid.ToString() };
        if (CreateMethod == "bdev_aio_create" && ReadOnly)
        {
            p["readonly"] = true;
        }

        return VhostBackend.Rpc.Subsystem.Call(CreateMethod, p);
    }

    protected internal override ValueTask DestructAsync()
    {
        int fd = Interlocked.Exchange(ref _fd, -1);
        if (fd >= 0)
        {
            LibC.close(fd);
        }

        return ValueTask.CompletedTask;
    }

    private sealed class FileDevice : IoDevice
    {
        private readonly FileBdev _bdev;

        public FileDevice(FileBdev bdev)
            : base("file:" + bdev.Name) => _bdev = bdev;

        protected override object CreateChannelContext(Reactor.Reactor reactor) => new FileChannel(_bdev, reactor);

        protected override void DestroyChannelContext(Reactor.Reactor reactor, object context) => ((FileChannel)context).Dispose();
    }
}

public sealed class FileBdevException : Exception
{
    public FileBdevException(int errno, string message)
        : base(message) => Errno = errno;

    public int Errno { get; }
}
