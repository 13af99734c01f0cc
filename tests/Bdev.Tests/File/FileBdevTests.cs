using VhostBackend.Bdev.Tests.Core;
using VhostBackend.BdevFile;
using VhostBackend.Platform;
using Xunit;

namespace VhostBackend.Bdev.Tests.File;

public sealed class FileBdevTests : IDisposable
{
    private readonly string _dir = Directory.CreateDirectory(Path.Combine("/var/tmp", "vb-file-" + Guid.NewGuid().ToString("N"))).FullName;

    public void Dispose() => Directory.Delete(_dir, true);

    private string MakeFile(string name, long size, string? dir = null)
    {
        string path = Path.Combine(dir ?? _dir, name);
        FileBdev.CreateSparseIfMissing(path, size);
        return path;
    }

    [Fact]
    public unsafe void IoUring_Writes_And_Reads_Back_A_Batch()
    {
        string path = MakeFile("ring.img", 1 << 20);
        using var fs = new FileStream(path, FileMode.Open, FileAccess.ReadWrite);
        using var ring = new IoUring(64);
        using var buf = new NativeBuffer(64 * 512);
        new Random(5).NextBytes(buf.Span[..(64 * 512)]);
        var iovs = GC.AllocateArray<IoVec>(64, pinned: true);
        for (int i = 0; i < 64; i++)
        {
            iovs[i] = new IoVec(buf.Ptr + (i * 512), 512);
            var sqe = ring.GetSqe();
            Assert.True(sqe != null);
            sqe->Opcode = IoUring.OpWritev;
            sqe->Fd = (int)fs.SafeFileHandle.DangerousGetHandle();
            sqe->Addr = (ulong)System.Runtime.CompilerServices.Unsafe.AsPointer(ref iovs[i]);
            sqe->Len = 1;
            sqe->Off = (ulong)(i * 512);
            sqe->UserData = (ulong)i;
        }

        Assert.Equal(64u, ring.Pending);
        Assert.Equal(64, ring.Submit());
        var seen = new HashSet<ulong>();
        while (seen.Count < 64)
        {
            ring.WaitCompletions(1);
            while (ring.TryPeekCompletion(out ulong ud, out int res))
            {
                ring.AdvanceCompletion();
                Assert.Equal(512, res);
                Assert.True(seen.Add(ud));
            }
        }

        var onDisk = System.IO.File.ReadAllBytes(path).AsSpan(0, 64 * 512);
        Assert.True(onDisk.SequenceEqual(buf.Span[..(64 * 512)]));
    }

    [Fact]
    public void IoUring_Structs_Have_Kernel_Sizes()
    {
        Assert.Equal(64, System.Runtime.CompilerServices.Unsafe.SizeOf<IoUringSqe>());
        Assert.Equal(16, System.Runtime.CompilerServices.Unsafe.SizeOf<IoUringCqe>());
        Assert.Equal(120, System.Runtime.CompilerServices.Unsafe.SizeOf<IoUringParams>());
        Assert.Equal(40, System.Runtime.CompilerServices.Unsafe.SizeOf<IoSqringOffsets>());
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task File_Bdev_Round_Trips_Data_Including_Misaligned_And_Split_Io(bool tmpfs)
    {
        string dir = tmpfs ? Directory.CreateDirectory(Path.Combine("/dev/shm", "vb-file-" + Guid.NewGuid().ToString("N"))).FullName : _dir;
        try
        {
            string path = MakeFile("disk.img", 8 << 20, dir);
            await using var kit = new BdevTestKit();
            var bdev = FileBdev.Open("F0", path, 512, readOnly: false, null, "bdev_uring_create");
            Assert.True(bdev.Direct || tmpfs, "O_DIRECT expected on /var/tmp");
            Assert.Equal(bdev.Direct ? 512u : 1u, bdev.RequiredAlignment);
            kit.Bdevs.Register(bdev);
            using var desc = kit.Bdevs.Open("F0", true);
            int size = 3 << 20; // larger than the 1 MiB transfer limit: split
            using var src = new NativeBuffer(size);
            using var dst = new NativeBuffer(size);
            new Random(9).NextBytes(src.Span[..size]);
            Assert.Equal((0, true), await kit.Io(desc, (ch, cb) => ch.Write(desc, src.Split(0, 4096, size - 4096), 100, (ulong)size / 512, cb, null)));
            Assert.Equal((0, true), await kit.Io(desc, (ch, cb) => ch.Flush(desc, 0, 0, cb, null)));
            Assert.Equal((0, true), await kit.Io(desc, (ch, cb) => ch.Read(desc, dst.Split(7, 1000, size - 1000), 100, (ulong)size / 512, cb, null)));
            Assert.True(src.Span[..size].SequenceEqual(dst.Span.Slice(7, size)));
            var onDisk = System.IO.File.ReadAllBytes(path).AsSpan(100 * 512, size);
            Assert.True(onDisk.SequenceEqual(src.Span[..size]));

            // unmap and write-zeroes read back zeroes
            Assert.Equal((0, true), await kit.Io(desc, (ch, cb) => ch.Unmap(desc, 100, 8, cb, null)));
            Assert.Equal((0, true), await kit.Io(desc, (ch, cb) => ch.WriteZeroes(desc, 108, 8, cb, null)));
            Assert.Equal((0, true), await kit.Io(desc, (ch, cb) => ch.Read(desc, dst.Split(0, 16 * 512), 100, 16, cb, null)));
            Assert.True(dst.Span[..(16 * 512)].IndexOfAnyExcept((byte)0) < 0);

            // out of range
            Assert.Equal(-22, (await kit.Io(desc, (ch, cb) => ch.Read(desc, dst.Split(0, 512), bdev.BlockCount, 1, cb, null))).Rc);
            await kit.Main.InvokeAsync(() => kit.Bdevs.UnregisterAsync(bdev));
            desc.Dispose();
        }
        finally
        {
            if (tmpfs)
            {
                Directory.Delete(dir, true);
            }
        }
    }

    [Fact]
    public async Task ReadOnly_File_Bdev_Refuses_Writes()
    {
        string path = MakeFile("ro.img", 1 << 20);
        await using var kit = new BdevTestKit();
        kit.Bdevs.Register(FileBdev.Open("RO", path, 0, readOnly: true, null, "bdev_aio_create"));
        using var desc = kit.Bdevs.Open("RO", true);
        using var buf = new NativeBuffer(512);
        Assert.Equal(-95, (await kit.Io(desc, (ch, cb) => ch.Write(desc, buf.Split(0, 512), 0, 1, cb, null))).Rc);
        Assert.Equal((0, true), await kit.Io(desc, (ch, cb) => ch.Read(desc, buf.Split(0, 512), 0, 1, cb, null)));
    }

    [Theory]
    [InlineData("/nonexistent/x.img", 0u, 2)]
    [InlineData(null, 1000u, 22)]
    public void Open_Errors_Carry_Errno(string? path, uint blockSize, int errno)
    {
        path ??= MakeFile("e.img", 1 << 20);
        var e = Assert.Throws<FileBdevException>(() => FileBdev.Open("E", path, blockSize, false, null, "bdev_aio_create"));
        Assert.Equal(errno, e.Errno);
    }

    [Fact]
    public async Task Steady_State_File_Io_Allocates_Nothing_Per_Io()
    {
        string path = MakeFile("alloc.img", 4 << 20);
        await using var kit = new BdevTestKit();
        kit.Bdevs.Register(FileBdev.Open("A", path, 512, false, null, "bdev_uring_create"));
        using var desc = kit.Bdevs.Open("A", true);
        using var buf = new NativeBuffer(4096);
        var loop = new Loop(desc, buf.Split(0, 4096));
        long bytes = await kit.Main.InvokeAsync(async () =>
        {
            await loop.Run(5_000);
            long first = await loop.Run(50_000);
            // A one-off allocation on the reactor thread inside the window (CI once saw 8008 bytes over 50k I/Os,
            // 0.16 B/IO) does not repeat; an allocation per I/O shows in every window.
            return first < 500 ? first : Math.Min(first, await loop.Run(50_000));
        });
        Assert.True(bytes < 500, $"{bytes} bytes allocated over 50k file I/Os (the smaller of two windows)");
    }

    private sealed class Loop
    {
        private static readonly BdevIoCompletion s_done = static (_, ok, s) => ((Loop)s!).Done(ok);
        private readonly BdevDesc _desc;
        private readonly IoVec[] _iov;
        private BdevChannel? _ch;
        private int _left;
        private int _inflight;
        private long _start;
        private TaskCompletionSource<long>? _tcs;

        public Loop(BdevDesc desc, IoVec[] iov)
        {
            _desc = desc;
            _iov = iov;
        }

        public Task<long> Run(int n)
        {
            _ch ??= _desc.GetIoChannel();
            _tcs = new TaskCompletionSource<long>();
            _left = n;
            _start = GC.GetAllocatedBytesForCurrentThread();
            for (int i = 0; i < 16; i++)
            {
                Next();
            }

            return _tcs.Task;
        }

        private void Next()
        {
            _left--;
            _inflight++;
            ulong lba = (ulong)(_left % 512) * 8;
            if ((_left & 1) == 0 ? _ch!.Read(_desc, _iov, lba, 8, s_done, this) != 0 : _ch!.Write(_desc, _iov, lba, 8, s_done, this) != 0)
            {
                throw new InvalidOperationException("submit failed");
            }
        }

        private void Done(bool ok)
        {
            Assert.True(ok);
            _inflight--;
            if (_left > 0)
            {
                Next();
            }
            else if (_inflight == 0)
            {
                _tcs!.SetResult(GC.GetAllocatedBytesForCurrentThread() - _start);
            }
        }
    }
}
