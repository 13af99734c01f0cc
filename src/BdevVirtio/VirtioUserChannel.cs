using Microsoft.Extensions.Logging;
using VhostBackend.Bdev;
using VhostBackend.Reactors;
using VhostBackend.Virtio;

namespace VhostBackend.BdevVirtio;

/// <summary>
/// A reactor's channel to a virtio-user device: it owns one virtqueue of the controller, that queue's request
/// slots and a poller that reaps the used ring. While the reactor polls, the ring asks the device for no
/// interrupts; a reactor in interrupt mode sleeps on the queue's call eventfd. Everything runs on the channel's
/// reactor; nothing is allocated or locked per I/O. The device type only decides the request format:
/// <see cref="VirtioBlkChannel"/> (blk header and status byte) and <see cref="VirtioScsiChannel"/> (SCSI command
/// request and response) fill a slot in <see cref="BuildRequest"/> and judge its completion in
/// <see cref="Succeeded"/>; the slot table, the FIFO of waiting I/O, publish-and-kick, completion polling and the
/// failure of a broken queue are here.
/// <para>
/// Data moves through the slot's bounce buffer in the shared memfd (copied in for writes, out for reads) unless
/// the I/O buffer is a single iovec inside the shared arena (then by address): bdev I/O buffers are ordinary
/// process memory the back end cannot see. SPDK avoids the copy because its env allocates all I/O buffers from
/// memory it shares with the back end; we have no such allocator for every buffer.
/// </para>
/// <para>
/// With VIRTIO_F_RING_INDIRECT_DESC each request takes one ring descriptor (its slot's indirect table), so a
/// queue of N entries carries N requests; without it a request takes 2-3 ring descriptors. I/O that finds no
/// free slot or descriptor waits in a FIFO drained by the poller. A broken used ring or a closed connection fails
/// the queue: everything in flight and waiting, and everything submitted after.
/// </para>
/// </summary>
internal abstract class VirtioUserChannel
{
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

    /// <param name="ctrl">The controller whose queue this channel claims.</param>
    /// <param name="reactor">The channel's reactor.</param>
    /// <param name="pollerPrefix">Names the pollers: <c>&lt;prefix&gt;_poll:&lt;ctrl&gt;:q&lt;n&gt;</c> and <c>&lt;prefix&gt;_conn:…</c>.</param>
    /// <param name="queueKind">What the log calls the queue when none is free ("virtqueue", "request queue").</param>
    protected VirtioUserChannel(VirtioUserController ctrl, Reactor reactor, string pollerPrefix, string queueKind)
    {
        Ctrl = ctrl;
        _reactor = reactor;
        _queue = ctrl.ClaimQueue();
        _indirect = ctrl.Has(VirtioFeatures.RingIndirectDesc);
        int slots = _queue?.SlotCount ?? 1;
        _ios = new BdevIo?[slots];
        _bounced = new bool[slots];
        _free = new int[slots];
        _waiting = new Queue<BdevIo>(1024);
        if (_queue is null)
        {
            // More reactors than queues: this channel has no queue and fails its I/O (sharing a queue would need a lock).
            ctrl.Logger.LogError("virtio-user {Name}: no free {QueueKind} for {Reactor} (vq_count {Count} is less than the reactors using it); its I/O fails",
                ctrl.CtrlName, queueKind, reactor, ctrl.VqCount);
            _failed = true;
            return;
        }

        _driver = _queue.Driver;
        for (int i = 0; i < slots; i++)
        {
            _free[i] = slots - 1 - i;
        }

        _freeCount = slots;
        _poller = reactor.RegisterPoller(pollerPrefix + "_poll:" + ctrl.CtrlName + ":q" + _queue.Index, static c => ((VirtioUserChannel)c!).Poll(), this);

        // Interrupt mode: a reactor with nothing to do sleeps on the queue's call eventfd.
        reactor.SetPollerInterrupt(_poller, _queue.Call.Fd, static (c, arm) => ((VirtioUserChannel)c!).Arm(arm));

        // A back end that dies never returns its requests: watch the socket (every 100 ms, one non-blocking poll).
        _connPoller = reactor.RegisterPoller(pollerPrefix + "_conn:" + ctrl.CtrlName + ":q" + _queue.Index, static c => ((VirtioUserChannel)c!).CheckConnection(), this, 100_000);
    }

    protected VirtioUserController Ctrl { get; }

    /// <summary>The queue this channel owns (null: none was free).</summary>
    public int QueueIndex => _queue?.Index ?? -1;

    /// <summary>Reads and writes whose buffer was in the shared arena (sent by address).</summary>
    public long ZeroCopyIos { get; private set; }

    /// <summary>Reads and writes copied through the slot's bounce buffer.</summary>
    public long BouncedIos { get; private set; }

    /// <summary>
    /// Writes <paramref name="io"/>'s request into <paramref name="slot"/> of <paramref name="q"/> and its buffers,
    /// device-readable first, into <paramref name="bufs"/> (room for 3). Returns how many buffers, or 0 when the I/O
    /// cannot be sent and was completed (failed) here. Reads and writes take their data buffer from
    /// <see cref="TryDataBuffer"/>. Runs on the reactor; must not allocate.
    /// </summary>
    protected abstract int BuildRequest(BdevIo io, VirtioUserQueue q, int slot, Span<DriverBuffer> bufs);

    /// <summary>
    /// The back end returned <paramref name="slot"/> with <paramref name="usedLen"/> bytes written: whether
    /// <paramref name="io"/> succeeded. The slot's memory is the back end's answer: validate before use.
    /// </summary>
    protected abstract bool Succeeded(BdevIo io, VirtioUserQueue q, int slot, uint usedLen);

    /// <summary>
    /// Puts one request on <paramref name="q"/>'s ring: through the slot's indirect table when
    /// VIRTIO_F_RING_INDIRECT_DESC was negotiated, else as a direct chain. Returns the head, or -1 when the ring has
    /// no room. Not published.
    /// </summary>
    internal static int Add(VirtioUserQueue q, bool indirect, int slot, ReadOnlySpan<DriverBuffer> bufs)
    {
        var drv = q.Driver;
        if (!indirect)
        {
            return drv.TryAdd(bufs, slot);
        }

        ulong table = q.SlotGpa(slot) + VirtioUserQueue.TableOffset;
        for (int i = 0; i < bufs.Length; i++)
        {
            if (drv.IsPacked)
            {
                // Packed rings take packed indirect entries (id, then flags; no NEXT: the table is sequential).
                q.Memory.WritePackedDesc(table + (ulong)(16 * i), bufs[i].Addr, bufs[i].Length, bufs[i].Flags);
            }
            else
            {
                q.Memory.WriteDesc(table + (ulong)(16 * i), bufs[i].Addr, bufs[i].Length, (ushort)(bufs[i].Flags | (i < bufs.Length - 1 ? VirtqDesc.FlagNext : 0)), (ushort)(i + 1));
            }
        }

        var one = new DriverBuffer(table, (uint)(16 * bufs.Length), VirtqDesc.FlagIndirect);
        return drv.TryAdd(new ReadOnlySpan<DriverBuffer>(in one), slot);
    }

    /// <summary>
    /// The data buffer of a read or write in <paramref name="slot"/>: by address when the I/O buffer is one iovec in
    /// the shared arena (zero copy), else the slot's bounce buffer (a write's data is copied in now, a read's is
    /// copied out when it succeeds). False when the I/O is larger than the bounce buffer: the bdev layer splits at
    /// MaxTransferBlocks, so a larger request is a bug upstream.
    /// </summary>
    protected bool TryDataBuffer(BdevIo io, int slot, out DriverBuffer data)
    {
        var q = _queue!;
        ulong len = io.Length;
        if (len > (ulong)q.BounceBytes)
        {
            data = default;
            return false;
        }

        bool read = io.Type == BdevIoType.Read;
        ushort flags = read ? VirtqDesc.FlagWrite : (ushort)0;
        var iovs = io.Iovs;
        if (iovs.Length == 1 && Ctrl.Shared is { } shared && shared.TryTranslate(iovs[0].Base, len, out ulong sharedOffset))
        {
            // Zero copy: the buffer is in memory the back end has mapped.
            ZeroCopyIos++;
            data = new DriverBuffer(VirtioUserController.SharedGpa + sharedOffset, (uint)len, flags);
            return true;
        }

        _bounced[slot] = true;
        BouncedIos++;
        ulong bounceGpa = q.BounceGpa(slot);
        if (!read)
        {
            CopyIn(io, q.Memory, bounceGpa);
        }

        data = new DriverBuffer(bounceGpa, (uint)len, flags);
        return true;
    }

    private int CheckConnection()
    {
        if (_failed || !Ctrl.CheckConnection())
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

    /// <summary>Starts the I/O (or completes it, failed, when it cannot be sent), or returns false when it must wait for a slot or descriptors.</summary>
    private bool TryStart(BdevIo io)
    {
        if (_freeCount == 0)
        {
            return false;
        }

        var q = _queue!;
        int slot = _free[_freeCount - 1];
        _bounced[slot] = false;
        Span<DriverBuffer> bufs = stackalloc DriverBuffer[3];
        int n = BuildRequest(io, q, slot, bufs);
        if (n == 0)
        {
            return true; // refused and completed
        }

        if (Add(q, _indirect, slot, bufs[..n]) < 0)
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
            var r = drv.TryPopUsed(out int slot, out uint usedLen);
            if (r == UsedResult.Empty)
            {
                break;
            }

            if (r == UsedResult.Broken || (uint)slot >= (uint)_ios.Length || _ios[slot] is null)
            {
                Ctrl.Logger.LogError("virtio-user {Name}: queue {Queue}: the back end broke the used ring (used idx past what is in flight, or an unknown head); failing the queue's I/O",
                    Ctrl.CtrlName, q.Index);
                _inPoll = false;
                FailQueue();
                return done + 1;
            }

            var io = _ios[slot]!;
            _ios[slot] = null;
            bool ok = Succeeded(io, q, slot, usedLen);
            if (ok && io.Type == BdevIoType.Read && _bounced[slot])
            {
                CopyOut(io, q.Memory, q.BounceGpa(slot));
            }

            _free[_freeCount++] = slot;
            done++;
            io.Complete(ok ? BdevIoStatus.Success : BdevIoStatus.Failed);
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
            Ctrl.ReleaseQueue(_queue);
        }
    }
}
