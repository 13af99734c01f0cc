using System.Runtime.InteropServices;
using Tmds.Linux;

namespace VhostBackend.Platform;

[StructLayout(LayoutKind.Sequential)]
public struct IoSqringOffsets
{
    public uint Head, Tail, RingMask, RingEntries, Flags, Dropped, Array, Resv1;
    public ulong UserAddr;
}

[StructLayout(LayoutKind.Sequential)]
public struct IoCqringOffsets
{
    public uint Head, Tail, RingMask, RingEntries, Overflow, Cqes, Flags, Resv1;
    public ulong UserAddr;
}

/// <summary>struct io_uring_params (120 bytes).</summary>
[StructLayout(LayoutKind.Sequential)]
public unsafe struct IoUringParams
{
    public uint SqEntries, CqEntries, Flags, SqThreadCpu, SqThreadIdle, Features, WqFd;
    public fixed uint Resv[3];
    public IoSqringOffsets SqOff;
    public IoCqringOffsets CqOff;
}

/// <summary>struct io_uring_sqe (64 bytes), the fields our opcodes use.</summary>
[StructLayout(LayoutKind.Explicit, Size = 64)]
public struct IoUringSqe
{
    [FieldOffset(0)] public byte Opcode;
    [FieldOffset(1)] public byte Flags;
    [FieldOffset(2)] public ushort IoPrio;
    [FieldOffset(4)] public int Fd;
    [FieldOffset(8)] public ulong Off;
    [FieldOffset(16)] public ulong Addr;
    [FieldOffset(24)] public uint Len;
    [FieldOffset(28)] public uint OpFlags;
    [FieldOffset(32)] public ulong UserData;
    [FieldOffset(40)] public ushort BufIndex;
    [FieldOffset(48)] public ulong Addr3;
    [FieldOffset(56)] public ulong Pad;
}

/// <summary>struct io_uring_cqe (16 bytes).</summary>
[StructLayout(LayoutKind.Sequential)]
public struct IoUringCqe
{
    public ulong UserData;
    public int Res;
    public uint Flags;
}

/// <summary>
/// A raw io_uring (no liburing): one submission and one completion ring mapped into this process, owned by one
/// thread (a reactor). SQEs are filled in place and published in batches with one io_uring_enter; completions
/// are reaped by reading the CQ ring without a syscall.
///
/// Ordering with the kernel: the SQ tail is published with a release store after the SQEs and array slots are
/// written (the kernel reads them after an acquire of the tail); the SQ head (advanced by the kernel) is read
/// with acquire before reusing slots. The CQ tail is read with acquire before reading CQEs, and the CQ head is
/// released after we are done with them, so the kernel never overwrites an entry we are still reading.
/// </summary>
public sealed unsafe class IoUring : IDisposable
{
    public const byte OpNop = 0;
    public const byte OpReadv = 1;
    public const byte OpWritev = 2;
    public const byte OpFsync = 3;
    public const byte OpFallocate = 17;
    public const uint FsyncDatasync = 1;

    private const long OffSqRing = 0;
    private const long OffCqRing = 0x8000000;
    private const long OffSqes = 0x10000000;
    private const uint FeatSingleMmap = 1;
    private const uint EnterGetEvents = 1;
    private const uint RegisterEventFdOp = 4;

    private readonly int _fd;
    private readonly byte* _sqRing;
    private readonly nuint _sqRingSize;
    private readonly byte* _cqRing;
    private readonly nuint _cqRingSize;
    private readonly IoUringSqe* _sqes;
    private readonly nuint _sqesSize;
    private readonly uint* _sqHead;
    private readonly uint* _sqTail;
    private readonly uint _sqMask;
    private readonly uint* _sqArray;
    private readonly uint* _cqHead;
    private readonly uint* _cqTail;
    private readonly uint _cqMask;
    private readonly IoUringCqe* _cqes;
    private readonly bool _singleMmap;
    private uint _localTail;
    private uint _submittedTail;
    private bool _disposed;

    public IoUring(uint entries)
    {
        IoUringParams p = default;
        long fd = Native.syscall(Native.SYS_io_uring_setup, entries, (long)&p, 0, 0, 0, 0);
        if (fd < 0)
        {
            throw new IOException($"io_uring_setup({entries}) failed: {Native.StrError(Native.Errno)}");
        }

        _fd = (int)fd;
        Entries = p.SqEntries;
        CqEntries = p.CqEntries;
        _sqRingSize = p.SqOff.Array + (p.SqEntries * 4);
        _cqRingSize = p.CqOff.Cqes + (p.CqEntries * (uint)sizeof(IoUringCqe));
        _singleMmap = (p.Features & FeatSingleMmap) != 0;
        if (_singleMmap)
        {
            _sqRingSize = _cqRingSize = Math.Max(_sqRingSize, _cqRingSize);
        }

        _sqRing = Map(_sqRingSize, OffSqRing);
        _cqRing = _singleMmap ? _sqRing : Map(_cqRingSize, OffCqRing);
        _sqesSize = p.SqEntries * (nuint)sizeof(IoUringSqe);
        _sqes = (IoUringSqe*)Map(_sqesSize, OffSqes);

        _sqHead = (uint*)(_sqRing + p.SqOff.Head);
        _sqTail = (uint*)(_sqRing + p.SqOff.Tail);
        _sqMask = *(uint*)(_sqRing + p.SqOff.RingMask);
        _sqArray = (uint*)(_sqRing + p.SqOff.Array);
        _cqHead = (uint*)(_cqRing + p.CqOff.Head);
        _cqTail = (uint*)(_cqRing + p.CqOff.Tail);
        _cqMask = *(uint*)(_cqRing + p.CqOff.RingMask);
        _cqes = (IoUringCqe*)(_cqRing + p.CqOff.Cqes);
        _localTail = _submittedTail = Volatile.Read(ref *_sqTail);
    }

    public uint Entries { get; }
    public uint CqEntries { get; }
    public int Fd => _fd;

    /// <summary>SQEs filled and not yet handed to the kernel by <see cref="Submit"/>.</summary>
    public uint Pending => _localTail - _submittedTail;

    private byte* Map(nuint size, long offset)
    {
        void* p = LibC.mmap(null, (size_t)(ulong)size, 0x1 | 0x2 /*PROT_READ|WRITE*/, 0x01 | 0x8000 /*MAP_SHARED|MAP_POPULATE*/, _fd, offset);
        if (p == (void*)-1)
        {
            int errno = Native.Errno;
            LibC.close(_fd);
            throw new IOException($"io_uring mmap failed: {Native.StrError(errno)}");
        }

        return (byte*)p;
    }

    /// <summary>Returns the next free SQE (zeroed), or null when the submission ring is full.</summary>
    public IoUringSqe* GetSqe()
    {
        // Acquire: the kernel's head advance means it has consumed those slots.
        uint head = Volatile.Read(ref *_sqHead);
        if (_localTail - head >= Entries)
        {
            return null;
        }

        uint index = _localTail & _sqMask;
        IoUringSqe* sqe = &_sqes[index];
        *sqe = default;
        _sqArray[index] = index;
        _localTail++;
        return sqe;
    }

    /// <summary>
    /// Queues a READV/WRITEV of the first <paramref name="count"/> iovecs of <paramref name="iovs"/> (pinned, so the
    /// kernel may read the list after submit; the caller keeps it referenced until the completion). False when the
    /// submission ring is full.
    /// </summary>
    public bool TryPrepareReadWrite(bool write, int fd, PinnedArray<IoVec> iovs, int count, ulong offset, ulong userData)
    {
        if ((uint)count > (uint)iovs.Length)
        {
            throw new ArgumentOutOfRangeException(nameof(count));
        }

        IoUringSqe* sqe = GetSqe();
        if (sqe == null)
        {
            return false;
        }

        sqe->Opcode = write ? OpWritev : OpReadv;
        sqe->Fd = fd;
        sqe->Addr = (ulong)iovs.Address;
        sqe->Len = (uint)count;
        sqe->Off = offset;
        sqe->UserData = userData;
        return true;
    }

    /// <summary>Queues an FSYNC (fdatasync with <paramref name="dataOnly"/>). False when the submission ring is full.</summary>
    public bool TryPrepareFsync(int fd, bool dataOnly, ulong userData)
    {
        IoUringSqe* sqe = GetSqe();
        if (sqe == null)
        {
            return false;
        }

        sqe->Opcode = OpFsync;
        sqe->Fd = fd;
        sqe->OpFlags = dataOnly ? FsyncDatasync : 0;
        sqe->UserData = userData;
        return true;
    }

    /// <summary>Queues an FALLOCATE of <paramref name="length"/> bytes at <paramref name="offset"/>. False when the submission ring is full.</summary>
    public bool TryPrepareFallocate(int fd, int mode, ulong offset, ulong length, ulong userData)
    {
        IoUringSqe* sqe = GetSqe();
        if (sqe == null)
        {
            return false;
        }

        sqe->Opcode = OpFallocate;
        sqe->Fd = fd;
        sqe->Off = offset;
        sqe->Addr = length; // io_uring's fallocate takes the length in addr
        sqe->Len = (uint)mode;
        sqe->UserData = userData;
        return true;
    }

    /// <summary>Publishes filled SQEs and enters the kernel once. Returns the number submitted or -errno.</summary>
    public int Submit()
    {
        uint toSubmit = _localTail - _submittedTail;
        if (toSubmit == 0)
        {
            return 0;
        }

        // Release: SQE contents and array slots are visible before the kernel sees the new tail.
        Volatile.Write(ref *_sqTail, _localTail);
        long rc;
        do
        {
            rc = Native.syscall(Native.SYS_io_uring_enter, _fd, toSubmit, 0, 0, 0, 0);
        }
        while (rc < 0 && Native.Errno == Errno.EINTR);
        if (rc < 0)
        {
            return -Native.Errno;
        }

        _submittedTail += (uint)rc;
        return (int)rc;
    }

    /// <summary>Waits (blocking) until at least <paramref name="min"/> completions are ready. For tests and tools, not reactors.</summary>
    public int WaitCompletions(uint min)
    {
        long rc = Native.syscall(Native.SYS_io_uring_enter, _fd, 0, min, EnterGetEvents, 0, 0);
        return rc < 0 ? -Native.Errno : (int)rc;
    }

    /// <summary>Reads the next completion if one is ready (no syscall). Call <see cref="AdvanceCompletion"/> after using it.</summary>
    public bool TryPeekCompletion(out ulong userData, out int result)
    {
        uint head = *_cqHead; // only we write the head
        // Acquire: CQE contents written by the kernel before it advanced the tail are visible.
        uint tail = Volatile.Read(ref *_cqTail);
        if (head == tail)
        {
            userData = 0;
            result = 0;
            return false;
        }

        IoUringCqe* cqe = &_cqes[head & _cqMask];
        userData = cqe->UserData;
        result = cqe->Res;
        return true;
    }

    public void AdvanceCompletion()
    {
        // Release: we are done reading the CQE before the kernel may reuse its slot.
        Volatile.Write(ref *_cqHead, *_cqHead + 1);
    }

    /// <summary>Has the kernel signal <paramref name="eventFd"/> on every completion (for interrupt-mode reactors).</summary>
    public void RegisterEventFd(int eventFd)
    {
        int fd = eventFd;
        long rc = Native.syscall(Native.SYS_io_uring_register, _fd, RegisterEventFdOp, (long)&fd, 1, 0, 0);
        if (rc < 0)
        {
            throw new IOException($"IORING_REGISTER_EVENTFD failed: {Native.StrError(Native.Errno)}");
        }
    }

    public void Dispose()
    {
        if (_disposed)
        {
            return;
        }

        _disposed = true;
        LibC.munmap(_sqes, (size_t)(ulong)_sqesSize);
        LibC.munmap(_sqRing, (size_t)(ulong)_sqRingSize);
        if (!_singleMmap)
        {
            LibC.munmap(_cqRing, (size_t)(ulong)_cqRingSize);
        }

        LibC.close(_fd);
    }
}
