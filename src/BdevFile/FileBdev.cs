using System.Text.Json.Nodes;
using VhostBackend.Bdev;
using VhostBackend.Platform;
using VhostBackend.Reactors;

namespace VhostBackend.BdevFile;

/// <summary>
/// A regular file or block device served through io_uring: each reactor gets its own ring (an I/O channel),
/// submissions are batched into one io_uring_enter per poll, completions are reaped without a syscall, and the
/// ring's eventfd wakes a sleeping reactor. Opened with O_DIRECT when the file system allows it (then buffers
/// must be aligned to the block size: the bdev layer bounces the rest).
/// Unmap punches holes (files) or BLKDISCARD (block devices, synchronous); write-zeroes uses ZERO_RANGE
/// (files) or BLKZEROOUT (block devices, synchronous).
/// </summary>
public sealed class FileBdev : Bdev.Bdev
{
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
            throw new FileBdevException(Errno.EINVAL, $"block_size {blockSize} must be a power of two between 512 and 65536");
        }

        int flags = (readOnly ? Native.O_RDONLY : Native.O_RDWR) | Native.O_CLOEXEC;
        int fd = FileOps.Open(path, flags | Native.O_DIRECT);
        bool direct = fd >= 0;
        if (fd < 0)
        {
            int errno = -fd;
            if (errno != Errno.EINVAL)
            {
                throw new FileBdevException(errno, $"could not open {path}: {Native.StrError(errno)}");
            }

            fd = FileOps.Open(path, flags); // e.g. tmpfs: no O_DIRECT
            if (fd < 0)
            {
                errno = -fd;
                throw new FileBdevException(errno, $"could not open {path}: {Native.StrError(errno)}");
            }
        }

        try
        {
            int rc = FileOps.FStat(fd, out StatBuf st);
            if (rc != 0)
            {
                throw new FileBdevException(-rc, $"fstat {path} failed");
            }

            ulong size;
            uint detected = 512;
            bool blockDevice = st.IsBlockDevice;
            if (blockDevice)
            {
                rc = FileOps.GetBlockDeviceSize(fd, out ulong bytes);
                if (rc == 0)
                {
                    rc = FileOps.GetLogicalBlockSize(fd, out detected);
                }

                if (rc != 0)
                {
                    throw new FileBdevException(-rc, $"cannot read the size of block device {path}");
                }

                size = bytes;
            }
            else if (st.IsRegular)
            {
                size = (ulong)st.Size;
            }
            else
            {
                throw new FileBdevException(Errno.EINVAL, $"{path} is neither a regular file nor a block device");
            }

            uint bs = blockSize == 0 ? detected : blockSize;
            if (blockDevice && bs < detected)
            {
                throw new FileBdevException(Errno.EINVAL, $"block_size {bs} is smaller than {path}'s logical block size {detected}");
            }

            ulong blocks = size / bs;
            if (blocks == 0)
            {
                throw new FileBdevException(Errno.EINVAL, $"{path} is smaller than one {bs}-byte block");
            }

            return new FileBdev(name, path, fd, direct, blockDevice, readOnly, bs, blocks, uuid, createMethod);
        }
        catch
        {
            FileOps.Close(fd);
            throw;
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

    /// <summary>
    /// A vbdev (lvol, passthru) may forward its own I/O here (<see cref="BdevChannel.TryForward"/>): the file channel
    /// reads only the I/O's type, range and iovecs and this bdev's own geometry and file, keeps the I/O in a ring slot
    /// or its wait queue (never its bdev or channel), writes only <see cref="BdevIo.ModuleTag"/> (the errno) and ends
    /// with <see cref="BdevIo.Complete(BdevIoStatus)"/> on the reactor. <see cref="SupportsIoType"/> depends only on
    /// the read-only flag fixed at open. What it would split (1 MiB transfers) or bounce (O_DIRECT, misaligned
    /// buffers) the layer does not forward.
    /// </summary>
    public override bool AcceptsForwardedIo => true;

    protected override IoChannel GetModuleChannel(Reactor reactor) => reactor.GetIoChannel(_device);

    protected override void Submit(IoChannel moduleChannel, BdevIo io) => ((FileChannel)moduleChannel.Context).Submit(io);

    /// <summary>Re-reads the file size (bdev_aio_rescan); raises a Resize event when it changed.</summary>
    public int Rescan()
    {
        ulong size;
        if (IsBlockDevice)
        {
            int rc = FileOps.GetBlockDeviceSize(_fd, out size);
            if (rc != 0)
            {
                return rc;
            }
        }
        else
        {
            int rc = FileOps.FStat(_fd, out StatBuf st);
            if (rc != 0)
            {
                return rc;
            }

            size = (ulong)st.Size;
        }

        ulong blocks = size / BlockSize;
        if (blocks == 0)
        {
            return -Errno.EINVAL;
        }

        if (blocks != BlockCount)
        {
            SetBlockCount(blocks);
        }

        return 0;
    }

    /// <summary>Synchronous discard / zero-out for block devices (io_uring has no opcode for them here).</summary>
    internal int BlockDeviceRange(bool zero, ulong offset, ulong length) => FileOps.DiscardOrZero(_fd, zero, offset, length);

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

    protected override ValueTask DestructAsync()
    {
        Close();
        return ValueTask.CompletedTask;
    }

    /// <summary>Closes the file (once). For a bdev that was never registered; a registered one is closed when unregistered.</summary>
    internal void Close()
    {
        int fd = Interlocked.Exchange(ref _fd, -1);
        if (fd >= 0)
        {
            FileOps.Close(fd);
        }
    }

    private sealed class FileDevice : IoDevice
    {
        private readonly FileBdev _bdev;

        public FileDevice(FileBdev bdev)
            : base("file:" + bdev.Name) => _bdev = bdev;

        protected override object CreateChannelContext(Reactor reactor) => new FileChannel(_bdev, reactor);

        protected override void DestroyChannelContext(Reactor reactor, object context) => ((FileChannel)context).Dispose();
    }
}

public sealed class FileBdevException : Exception
{
    public FileBdevException(int errno, string message)
        : base(message) => Errno = errno;

    public int Errno { get; }
}
