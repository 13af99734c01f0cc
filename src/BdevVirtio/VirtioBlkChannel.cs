using Microsoft.Extensions.Logging;
using VhostBackend.Bdev;
using VhostBackend.Reactors;
using VhostBackend.Virtio;
using VhostBackend.Virtio.Blk;

namespace VhostBackend.BdevVirtio;

/// <summary>
/// A reactor's channel to a virtio-user blk device: it owns one virtqueue of the controller, that queue's
/// request slots and a poller that reaps the used ring. While the reactor polls, the ring asks the device for no
/// interrupts; a reactor in interrupt mode sleeps on the queue's call eventfd. Everything runs on the channel's
/// reactor; nothing is allocated or locked per I/O.
/// <para>
/// Data moves through the slot's bounce buffer in the shared memfd (copied in for writes, out for reads):
/// bdev I/O buffers are ordinary process memory the back end cannot see. SPDK avoids the copy because its
/// env allocates all I/O buffers from memory it shares with the back end; we have no such allocator.
/// </para>
/// <para>
/// With VIRTIO_F_RING_INDIRECT_DESC each request takes one ring descriptor (its slot's indirect table), so a
/// queue of N entries carries N requests; without it a request takes 2-3 ring descriptors. I/O that finds no
/// free slot or descriptor waits in a FIFO drained by the poller.
/// </para>
/// </summary>
internal sealed class VirtioBlkChannel
{
    private readonly VirtioUserController _ctrl;
    private readonly Reactor _reactor;
    private readonly VirtioUserQueue? _queue;
    private readonly VirtqueueDriver? _driver;
    private readonly BdevIo?[] _ios;
    private readonly bool[] _bounced;
    private readonly int[] _free;
    private readonly Queue<BdevIo> _waiting;
    private readonly Poller? _poller;
    private readonly Poller? _connPoller;
    private readonly bool _indirect;
    private int _freeCount;
    private bool _failed;
    private bool _inPoll;
    private bool _unpublished;

    public VirtioBlkChannel(VirtioUserController ctrl, Reactor reactor)
    {
        _ctrl = ctrl;
        _reactor = reactor;
        _queue = ctrl.ClaimQueue();
        _indirect = ctrl.Has(Virtio.VirtioFeatures.RingIndirectDesc);
        int slots = _queue?.SlotCount ?? 1;
        _ios = new BdevIo?[slots];
        _bounced = new bool[slots];
        _free = new int[slots];
        _waiting = new Queue<BdevIo>(1024);
        if (_queue is null)
        {
            // More reactors than queues: this channel has no queue and fails its I/O (sharing a queue would need a lock).
            ctrl.Logger.LogError("virtio-user {Name}: no free virtqueue for {Reactor} (vq_count {Count} is less than the reactors using it); its I/O fails",
                ctrl.CtrlName, reactor, ctrl.VqCount);
            _failed = true;
            return;
        }

        _driver = _queue.Driver;
        for (int i = 0; i < slots; i++)
        {
            _free[i] = slots - 1 - i;
        }

        _freeCount = slots;
        _poller = reactor.RegisterPoller("bdev_virtio_poll:" + ctrl.CtrlName + ":q" + _queue.Index, static c => ((VirtioBlkChannel)c!).Poll(), this);

        // Interrupt mode: a reactor with nothing to do sleeps on the queue's call eventfd.
        reactor.SetPollerInterrupt(_poller, _queue.Call.Fd, static (c, arm) => ((VirtioBlkChannel)c!).Arm(arm));

        // A back end that dies never returns its requests: watch the socket (every 100 ms, one non-blocking poll).
        _connPoller = reactor.RegisterPoller("bdev_virtio_conn:" + ctrl.CtrlName + ":q" + _queue.Index, static c => ((VirtioBlkChannel)c!).CheckConnection(), this, 100_000);
    }

    private int CheckConnection()
    {
        if (_failed || !_ctrl.CheckConnection())
        {
            return 0;
        }

        FailQueue();
        return 1;
    }

    /// <summary>
    /// The reactor is about to sleep (<paramref name="arm"/>) or has woken: enable used-ring interrupts and say
    /// whether work is already pending, or go back to polling without interrupts.
    /// </summary>
    private bool Arm(bool arm)
    {
        var drv = _driver!;
        if (!arm)
        {
            drv.DisableInterrupts();
            return false;
        }

        _queue!.Call.Drain(); // edge-triggered: drain before the re-check so a later signal wakes us
        if (_failed)
        {
            return _waiting.Count > 0;
        }

        return drv.EnableInterrupts() || (_waiting.Count > 0 && _freeCount > 0);
    }

    /// <summary>The queue this channel owns (null: none was free).</summary>
    public int QueueIndex => _queue?.Index ?? -1;

    public void Submit(BdevIo io)
    {
        if (_failed)
        {
            io.Complete(BdevIoStatus.Failed);
            return;
        }

        if (_waiting.Count > 0 || !TryStart(io))
        {
            _waiting.Enqueue(io); // FIFO: nothing overtakes I/O already waiting
        }
    }

    /// <summary>Reads and writes whose buffer was in the shared arena (sent by address).</summary>
    public long ZeroCopyIos { get; private set; }

    /// <summary>Reads and writes copied through the slot's bounce buffer.</summary>
    public long BouncedIos { get; private set; }

    /// <summary>Starts the I/O, or returns false when it must wait for a slot or descriptors.</summary>
    private bool TryStart(BdevIo io)
    {
        if (_freeCount == 0)
        {
            return false;
        }

        var q = _queue!;
        int slot = _free[_freeCount - 1];
        ulong metaGpa = q.SlotGpa(slot);
        ulong bounceGpa = q.BounceGpa(slot);
        uint bs = io.Bdev.BlockSize;
        ulong sector = io.OffsetBlocks * (bs / VirtioBlkRequestType.SectorSize);
        ref var hdr = ref q.Header(slot);
        hdr.IoPrio = 0;
        hdr.Sector = sector;
        q.Status(slot) = 0xFF;

        Span<DriverBuffer> bufs = stackalloc DriverBuffer[3];
        bufs[0] = new DriverBuffer(q.HeaderGpa(slot), VirtioBlkOutHeader.Size, 0);
        var status = new DriverBuffer(q.StatusGpa(slot), 1, VirtqDesc.FlagWrite);
        int n;
        switch (io.Type)
        {
            case BdevIoType.Read:
            case BdevIoType.Write:
            {
                ulong len = io.Length;
                if (len > (ulong)q.BounceBytes)
                {
                    // The bdev layer splits at MaxTransferBlocks; a larger request is a bug upstream.
                    io.Complete(BdevIoStatus.Failed);
                    return true;
                }

                bool read = io.Type == BdevIoType.Read;
                hdr.Type = read ? VirtioBlkRequestType.In : VirtioBlkRequestType.Out;
                var iovs = io.Iovs;
                if (iovs.Length == 1 && _ctrl.Shared is { } shared && shared.TryTranslate(iovs[0].Base, len, out ulong sharedOffset))
                {
                    // Zero copy: the buffer is in memory the back end has mapped.
                    _bounced[slot] = false;
                    ZeroCopyIos++;
                    bufs[1] = new DriverBuffer(VirtioUserController.SharedGpa + sharedOffset, (uint)len, read ? VirtqDesc.FlagWrite : (ushort)0);
                }
                else
                {
                    _bounced[slot] = true;
                    BouncedIos++;
                    if (!read)
                    {
                        CopyIn(io, q.Memory, bounceGpa);
                    }

                    bufs[1] = new DriverBuffer(bounceGpa, (uint)len, read ? VirtqDesc.FlagWrite : (ushort)0);
                }

                bufs[2] = status;
                n = 3;
                break;
            }

            case BdevIoType.Flush:
                hdr.Type = VirtioBlkRequestType.Flush;
                hdr.Sector = 0;
                bufs[1] = status;
                n = 2;
                break;
            case BdevIoType.Unmap:
            case BdevIoType.WriteZeroes:
            {
                ulong sectors = io.NumBlocks * (bs / VirtioBlkRequestType.SectorSize);
                if (sectors > uint.MaxValue)
                {
                    io.Complete(BdevIoStatus.Failed);
                    return true;
                }

                hdr.Type = io.Type == BdevIoType.Unmap ? VirtioBlkRequestType.Discard : VirtioBlkRequestType.WriteZeroes;
                hdr.Sector = 0;
                ref var range = ref q.Memory.Ref<VirtioBlkDiscardWriteZeroes>(metaGpa + VirtioUserQueue.RangeOffset);
                range.Sector = sector;
                range.NumSectors = (uint)sectors;
                range.Flags = 0;
                bufs[1] = new DriverBuffer(metaGpa + VirtioUserQueue.RangeOffset, VirtioBlkDiscardWriteZeroes.Size, 0);
                bufs[2] = status;
                n = 3;
                break;
            }

            default:
                io.Complete(BdevIoStatus.Failed);
                return true;
        }

        var drv = _driver!;
        int head;
        if (_indirect)
        {
            for (int i = 0; i < n && drv.IsPacked; i++)
            {
                // Packed rings take packed indirect entries (id, then flags; no NEXT: the table is sequential).
                q.Memory.WritePackedDesc(metaGpa + VirtioUserQueue.TableOffset + (ulong)(16 * i), bufs[i].Addr, bufs[i].Length, bufs[i].Flags);
            }

            for (int i = 0; i < n && !drv.IsPacked; i++)
            {
                q.Memory.WriteDesc(metaGpa + VirtioUserQueue.TableOffset + (ulong)(16 * i), bufs[i].Addr, bufs[i].Length, (ushort)(bufs[i].Flags | (i < n - 1 ? VirtqDesc.FlagNext : 0)), (ushort)(i + 1));
            }

            var one = new DriverBuffer(metaGpa + VirtioUserQueue.TableOffset, (uint)(16 * n), VirtqDesc.FlagIndirect);
            head = drv.TryAdd(new ReadOnlySpan<DriverBuffer>(in one), slot);
        }
        else
        {
            head = drv.TryAdd(bufs[..n], slot);
        }

        if (head < 0)
        {
            return false; // no ring descriptors (direct chains): wait for completions
        }

        _freeCount--;
        _ios[slot] = io;
        if (_inPoll)
        {
            // Resubmitted from a completion callback: published once at the end of the poll (one avail.idx
            // store and one kick decision for the whole batch instead of one per request).
            _unpublished = true;
        }
        else
        {
            PublishAndKick();
        }

        return true;
    }

    private void PublishAndKick()
    {
        var drv = _driver!;
        drv.Publish();
        if (drv.NeedsKick())
        {
            _queue!.Kick.Signal();
        }
    }

    private static void CopyIn(BdevIo io, DriverMemory memory, ulong dst)
    {
        foreach (var v in io.Iovs)
        {
            // The bdev layer checked that the iovecs add up to io.Length, which fits the bounce buffer.
            memory.CopyFromHost(v.Base, dst, (int)v.Length);
            dst += v.Length;
        }
    }

    private static void CopyOut(BdevIo io, DriverMemory memory, ulong src)
    {
        foreach (var v in io.Iovs)
        {
            memory.CopyToHost(src, v.Base, (int)v.Length);
            src += v.Length;
        }
    }

    private int Poll()
    {
        if (_failed)
        {
            FailWaiting();
            return 0;
        }

        var drv = _driver!;
        var q = _queue!;
        int done = 0;
        _inPoll = true;
        while (true)
        {
            var r = drv.TryPopUsed(out int slot, out _);
            if (r == UsedResult.Empty)
            {
                break;
            }

            if (r == UsedResult.Broken || (uint)slot >= (uint)_ios.Length || _ios[slot] is null)
            {
                _ctrl.Logger.LogError("virtio-user {Name}: queue {Queue}: the back end broke the used ring (used idx past what is in flight, or an unknown head); failing the queue's I/O",
                    _ctrl.CtrlName, q.Index);
                _inPoll = false;
                FailQueue();
                return done + 1;
            }

            var io = _ios[slot]!;
            _ios[slot] = null;
            byte st = q.Status(slot);
            if (st == VirtioBlkRequestType.StatusOk && io.Type == BdevIoType.Read && _bounced[slot])
            {
                CopyOut(io, q.Memory, q.BounceGpa(slot));
            }

            _free[_freeCount++] = slot;
            done++;
            io.Complete(st == VirtioBlkRequestType.StatusOk ? BdevIoStatus.Success : BdevIoStatus.Failed);
        }

        while (_waiting.Count > 0 && !_failed)
        {
            if (!TryStart(_waiting.Peek()))
            {
                break;
            }

            _waiting.Dequeue();
            done++;
        }

        _inPoll = false;
        if (_unpublished)
        {
            _unpublished = false;
            PublishAndKick();
        }

        return done;
    }

    /// <summary>The device is unusable: fail what it holds and everything after; the queue is not handed out again.</summary>
    private void FailQueue()
    {
        _failed = true;
        _queue!.Broken = true;
        for (int i = 0; i < _ios.Length; i++)
        {
            if (_ios[i] is { } io)
            {
                _ios[i] = null;
                io.Complete(BdevIoStatus.Failed);
            }
        }

        FailWaiting();
    }

    private void FailWaiting()
    {
        while (_waiting.TryDequeue(out var io))
        {
            io.Complete(BdevIoStatus.Failed);
        }
    }

    public void Destroy()
    {
        if (_poller is not null)
        {
            _reactor.UnregisterPoller(_poller);
        }

        if (_connPoller is not null)
        {
            _reactor.UnregisterPoller(_connPoller);
        }

        FailWaiting();
        if (_queue is not null)
        {
            _ctrl.ReleaseQueue(_queue);
        }
    }
}
