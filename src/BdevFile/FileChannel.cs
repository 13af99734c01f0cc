using VhostBackend.Bdev;
using VhostBackend.Platform;
using VhostBackend.Reactors;

namespace VhostBackend.BdevFile;

/// <summary>
/// One reactor's io_uring for one file bdev. Slots (user_data = slot index) are pre-allocated; an I/O that finds
/// the ring full waits in a FIFO and is issued when completions free room. Short transfers are continued from
/// where they stopped. Runs on its reactor only.
/// </summary>
internal sealed class FileChannel : IDisposable
{
    private const uint RingSize = 256;

    private readonly FileBdev _bdev;
    private readonly Reactor _reactor;
    private readonly IoUring _ring;
    private readonly EventFd _eventFd = new();
    private readonly Poller _poller;
    private readonly Slot[] _slots;
    private readonly Stack<int> _freeSlots;
    private readonly Queue<BdevIo> _waiting = new((int)RingSize);

    private sealed class Slot
    {
        public BdevIo? Io;
        public ulong Done;       // bytes transferred so far (short reads/writes continue from here)
        public PinnedArray<IoVec> Scratch = new(16); // pinned: the kernel reads it after submit
    }

    public FileChannel(FileBdev bdev, Reactor reactor)
    {
        _bdev = bdev;
        _reactor = reactor;
        _ring = new IoUring(RingSize);
        _ring.RegisterEventFd(_eventFd.Fd);
        _slots = new Slot[RingSize];
        _freeSlots = new Stack<int>((int)RingSize);
        for (int i = (int)RingSize - 1; i >= 0; i--)
        {
            _slots[i] = new Slot();
            _freeSlots.Push(i);
        }

        _poller = reactor.RegisterPoller("file:" + bdev.Name, static c => ((FileChannel)c!).Poll(), this);
        reactor.SetPollerInterrupt(_poller, _eventFd.Fd, static (c, arm) => ((FileChannel)c!).Arm(arm));
    }

    private bool Arm(bool arm)
    {
        if (!arm)
        {
            _eventFd.Drain();
            return false;
        }

        // Work pending that the poller must do before we may sleep: unsubmitted SQEs, waiting I/O, or completions.
        return _ring.Pending > 0 || _waiting.Count > 0 || _ring.TryPeekCompletion(out _, out _);
    }

    public void Submit(BdevIo io)
    {
        if (_waiting.Count > 0 || !TryStart(io))
        {
            _waiting.Enqueue(io);
        }
    }

    private bool TryStart(BdevIo io)
    {
        switch (io.Type)
        {
            case BdevIoType.Reset:
                io.Complete(BdevIoStatus.Success);
                return true;
            case BdevIoType.Unmap or BdevIoType.WriteZeroes when _bdev.IsBlockDevice:
                int rc = _bdev.BlockDeviceRange(io.Type == BdevIoType.WriteZeroes, io.OffsetBlocks * _bdev.BlockSize, io.NumBlocks * _bdev.BlockSize);
                io.ModuleTag = rc;
                io.Complete(rc == 0 ? BdevIoStatus.Success : BdevIoStatus.Failed);
                return true;
        }

        if (_freeSlots.Count == 0)
        {
            return false;
        }

        int index = _freeSlots.Pop();
        var slot = _slots[index];
        slot.Io = io;
        slot.Done = 0;
        if (!Fill(slot, index, zeroRangeFallback: false))
        {
            _ring.Submit(); // the submission ring is full: hand it to the kernel and try once more
            if (!Fill(slot, index, zeroRangeFallback: false))
            {
                slot.Io = null;
                _freeSlots.Push(index);
                return false;
            }
        }

        return true;
    }

    /// <summary>Queues the slot's I/O (from where a short transfer stopped). False when the submission ring is full.</summary>
    private bool Fill(Slot slot, int index, bool zeroRangeFallback)
    {
        var io = slot.Io!;
        ulong offset = io.OffsetBlocks * _bdev.BlockSize;
        int fd = _bdev.Fd;
        switch (io.Type)
        {
            case BdevIoType.Read:
            case BdevIoType.Write:
                var iovs = io.Iovs;
                int count = iovs.Length;
                var scratch = slot.Scratch;
                if (count > scratch.Length)
                {
                    scratch = slot.Scratch = new PinnedArray<IoVec>(Math.Max(count, scratch.Length * 2)); // grows once, then reused
                }

                // Skip what a short transfer already did.
                ulong skip = slot.Done;
                int n = 0;
                var dst = scratch.Span;
                for (int i = 0; i < count; i++)
                {
                    var v = iovs[i];
                    if (skip >= v.Length)
                    {
                        skip -= v.Length;
                        continue;
                    }

                    dst[n++] = new IoVec(v.Base + (nint)skip, v.Length - (nuint)skip);
                    skip = 0;
                }

                // The scratch list stays referenced by the slot until the completion.
                return _ring.TryPrepareReadWrite(io.Type == BdevIoType.Write, fd, scratch, n, offset + slot.Done, (ulong)index);
            case BdevIoType.Flush:
                return _ring.TryPrepareFsync(fd, dataOnly: true, (ulong)index);
            case BdevIoType.Unmap:
            case BdevIoType.WriteZeroes:
                int mode = io.Type == BdevIoType.WriteZeroes && !zeroRangeFallback ? FileBdev.FallocateMode(true) : FileBdev.PunchMode;
                return _ring.TryPrepareFallocate(fd, mode, offset, io.NumBlocks * _bdev.BlockSize, (ulong)index);
            default:
                return _ring.TryPrepareFsync(fd, dataOnly: true, (ulong)index); // not reached: Reset completes in TryStart
        }
    }

    private int Poll()
    {
        int work = 0;
        while (_ring.TryPeekCompletion(out ulong userData, out int res))
        {
            _ring.AdvanceCompletion();
            work++;
            OnCompletion((int)userData, res);
        }

        while (_waiting.Count > 0 && TryStart(_waiting.Peek()))
        {
            _waiting.Dequeue();
            work++;
        }

        if (_ring.Pending > 0)
        {
            int rc = _ring.Submit();
            if (rc < 0 && rc != -Errno.EAGAIN && rc != -Errno.EBUSY)
            {
                FailPending(rc);
            }

            work++;
        }

        return work;
    }

    private void FailPending(int rc)
    {
        // io_uring_enter itself failed (not an I/O error): nothing we queued will complete; fail those slots.
        for (int i = 0; i < _slots.Length; i++)
        {
            if (_slots[i].Io is { } io)
            {
                _slots[i].Io = null;
                _freeSlots.Push(i);
                io.ModuleTag = rc;
                io.Complete(BdevIoStatus.Failed);
            }
        }
    }

    private void OnCompletion(int index, int res)
    {
        if ((uint)index >= (uint)_slots.Length || _slots[index].Io is not { } io)
        {
            return; // not ours: ignore rather than crash
        }

        var slot = _slots[index];
        if (res >= 0 && io.Type is BdevIoType.Read or BdevIoType.Write)
        {
            slot.Done += (ulong)res;
            ulong total = io.NumBlocks * _bdev.BlockSize;
            if (slot.Done < total && res > 0)
            {
                // Short transfer: continue with the rest.
                if (Fill(slot, index, zeroRangeFallback: false))
                {
                    return;
                }
            }

            if (slot.Done < total)
            {
                res = -Errno.EIO;
            }
        }
        else if (res == -Errno.ENOTSUP)
        {
            if (io.Type == BdevIoType.WriteZeroes && slot.Done == 0)
            {
                // ZERO_RANGE unsupported (e.g. some file systems): a punched hole reads back as zeroes too.
                slot.Done = 1;
                if (Fill(slot, index, zeroRangeFallback: true))
                {
                    return;
                }
            }
        }

        slot.Io = null;
        _freeSlots.Push(index);
        io.ModuleTag = res < 0 ? res : 0;
        io.Complete(res >= 0 ? BdevIoStatus.Success : BdevIoStatus.Failed);
    }

    public void Dispose()
    {
        _reactor.UnregisterPoller(_poller);
        _ring.Dispose();
        _eventFd.Dispose();
    }
}
