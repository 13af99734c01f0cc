using System.Diagnostics;
using System.Runtime.CompilerServices;
using Microsoft.Extensions.Logging;
using VhostBackend.Bdev;
using VhostBackend.Platform;
using VhostBackend.Reactor;
using VhostBackend.Virtio;

namespace VhostBackend.Vhost.Blk;

/// <summary>
/// A pre-allocated virtio-blk request: segment and iovec arrays, the bdev wait entry and the parsed command.
/// Owned by one <see cref="BlkQueue"/> (and so by its reactor); reused, never allocated per I/O.
/// </summary>
internal sealed class BlkRequest
{
    public const int MaxSegments = 160;

    public BlkRequest(BlkQueue queue)
    {
        Queue = queue;
        WaitEntry = new BdevIoWaitEntry(BlkQueue.RetryCallback, this);
    }

    public BlkQueue Queue { get; }
    public BdevIoWaitEntry WaitEntry { get; }
    public DescSegment[] Segments { get; } = new DescSegment[MaxSegments];
    public IoVec[] Iovs { get; } = new IoVec[MaxSegments];
    public int IovCount;
    public ushort Head;
    public nint StatusPtr;
    public uint UsedLength;
    public BdevIoType Op;
    public ulong OffsetBlocks;
    public ulong NumBlocks;
    public BlkRequest? NextFree;
}

/// <summary>
/// One virtio-blk queue of one session, polled on one reactor: pops chains, parses requests, submits them to the
/// bdev zero-copy (iovecs point straight into guest memory), completes them and signals the guest. Everything
/// here runs on the owning reactor; the protocol thread reaches it only through <see cref="Reactor.InvokeAsync(Action)"/>.
/// </summary>
internal sealed class BlkQueue : IVhostQueueRunner
{
    private const int PopBatch = 32;
    private const long StatsIntervalMs = 10;

    internal static readonly Action<object?> RetryCallback = static o => ((BlkRequest)o!).Queue.Resubmit((BlkRequest)o!);
    private static readonly BdevIoCompletion s_done = static (io, ok, arg) => ((BlkRequest)arg!).Queue.OnBdevDone((BlkRequest)arg!, ok);
    private static readonly PollerFn s_poll = static c => ((BlkQueue)c!).Poll();
    private static readonly PollerInterruptFn s_interrupt = static (c, arm) => ((BlkQueue)c!).OnInterruptMode(arm);

    private readonly VhostBlkController _ctrlr;
    private readonly VhostUserSession _session;
    private readonly int _index;
    private readonly SplitVirtqueue _vq;
    private readonly Reactor.Reactor _reactor;
    private readonly EventFd? _kick;
    private readonly BlkRequest[] _pool;
    private EventFd? _call;
    private BdevDesc? _desc;
    private BdevChannel? _ch;
    private Poller? _poller;
    private BlkRequest? _free;
    private int _inFlight;
    private bool _stopping;
    private bool _broken;
    private bool _bdevGone;
    private bool _signalPending;
    private int _completedSincePoll;
    private TaskCompletionSource? _drained;
    private int _chainErrors;

    // Interrupt coalescing (vhost_controller_set_coalescing): SPDK's model, per queue.
    private long _delayBaseTicks;
    private uint _ioRateThreshold;
    private long _nextStatsCheck;
    private long _nextEventTime;
    private long _irqDelayTicks;
    private uint _usedReqCount;
    private uint _reqCount;

    public BlkQueue(VhostBlkController ctrlr, VhostUserSession session, int index, SplitVirtqueue vq, EventFd? call, EventFd? kick, Reactor.Reactor reactor)
    {
        _ctrlr = ctrlr;
        _session = session;
        _index = index;
        _vq = vq;
        _call = call;
        _kick = kick;
        _reactor = reactor;
        int poolSize = Math.Min((int)vq.Size, 1024);
        _pool = new BlkRequest[poolSize];
        for (int i = 0; i < poolSize; i++)
        {
            var r = new BlkRequest(this) { NextFree = _free };
            _free = r;
            _pool[i] = r;
        }
    }

    public int InFlight => Volatile.Read(ref _inFlight);

    public Reactor.Reactor Reactor => _reactor;

    /// <summary>Registers the poller (and the kick fd as its interrupt source). Runs on the reactor.</summary>
    public void StartOnReactor()
    {
        _desc = _ctrlr.Desc;
        if (_desc is not null)
        {
            _ch = _desc.GetIoChannel();
        }
        else
        {
            _bdevGone = true;
        }

        ApplyCoalescing(_ctrlr.DelayBaseUs, _ctrlr.IopsThreshold);
        _vq.DisableNotify();
        _poller = _reactor.RegisterPoller($"vhost_blk:{_session.Name}:q{_index}", s_poll, this);
        if (_kick is not null)
        {
            _reactor.SetPollerInterrupt(_poller, _kick.Fd, s_interrupt);
        }
    }

    public Task<ushort> StopAsync() => _reactor.InvokeAsync(async () =>
    {
        _stopping = true;
        if (_inFlight > 0)
        {
            _drained ??= new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            await _drained.Task.ConfigureAwait(true);
        }

        Flush(force: true);
        if (_poller is not null)
        {
            _reactor.UnregisterPoller(_poller);
            _poller = null;
        }

        ReleaseChannel();
        return _vq.LastAvailIdx;
    });

    public Task SetCallAsync(EventFd? call) => _reactor.InvokeAsync(() =>
    {
        _call = call;
        if (_signalPending)
        {
            Flush(force: true);
        }
    });

    /// <summary>The bdev is going away: fail new requests, wait for in-flight ones, drop the channel.</summary>
    public Task DetachBdevAsync() => _reactor.InvokeAsync(async () =>
    {
        _bdevGone = true;
        if (_inFlight > 0)
        {
            _drained ??= new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            await _drained.Task.ConfigureAwait(true);
        }

        ReleaseChannel();
        return true;
    });

    public Task SetCoalescingAsync(uint delayBaseUs, uint iopsThreshold) => _reactor.InvokeAsync(() => ApplyCoalescing(delayBaseUs, iopsThreshold));

    private void ApplyCoalescing(uint delayBaseUs, uint iopsThreshold)
    {
        _delayBaseTicks = (long)delayBaseUs * Stopwatch.Frequency / 1_000_000;
        _ioRateThreshold = Math.Max(1u, (uint)(iopsThreshold * StatsIntervalMs / 1000));
        _irqDelayTicks = 0;
        _nextEventTime = 0;
    }

    private void ReleaseChannel()
    {
        if (_ch is not null)
        {
            BdevDesc.PutIoChannel(_ch);
            _ch = null;
        }
    }

    private int Poll()
    {
        int work = _completedSincePoll;
        _completedSincePoll = 0;
        if (!_stopping && !_broken)
        {
            int popped = 0;
            while (popped < PopBatch && _free is not null)
            {
                var r = _vq.TryPop(out ushort head);
                if (r == PopResult.Empty)
                {
                    break;
                }

                if (r == PopResult.Broken)
                {
                    _broken = true;
                    _ctrlr.Logger.LogError("vhost_blk {Session} queue {Index}: driver published an invalid avail index or head; queue stopped", _session.Name, _index);
                    break;
                }

                var req = _free;
                _free = req.NextFree;
                req.NextFree = null;
                popped++;
                Process(req, head);
            }

            work += popped;
        }

        Flush(force: false);
        return work;
    }

    private bool OnInterruptMode(bool arm)
    {
        if (!arm)
        {
            _vq.DisableNotify();
            return false;
        }

        _kick?.Drain();
        bool pending = _vq.EnableNotify() && !_stopping && !_broken;
        return pending || _signalPending || _completedSincePoll > 0;
    }

    // ---- request parsing ----------------------------------------------------------------------------------

    private unsafe void Process(BlkRequest req, ushort head)
    {
        req.Head = head;
        req.StatusPtr = 0;
        req.UsedLength = 1;
        var segs = req.Segments;
        var err = _vq.WalkChain(head, segs, out var info);
        if (err != ChainError.None || info.ReadableBytes < 16 || info.WritableBytes < 1)
        {
            if (_chainErrors++ < 16)
            {
                _ctrlr.Logger.LogError("vhost_blk {Session} queue {Index}: invalid chain at head {Head}: {Error} (readable {Readable}, writable {Writable})",
                    _session.Name, _index, head, err, info.ReadableBytes, info.WritableBytes);
            }

            // No safe status byte: return the head with nothing written.
            req.UsedLength = 0;
            Finish(req, 0, wasInFlight: false);
            return;
        }

        ref var last = ref segs[info.SegmentCount - 1];
        req.StatusPtr = last.Host + (nint)(last.Length - 1);
        VirtioBlkOutHeader hdr;
        CopyReadable(segs, info.FirstWritable, 0, (byte*)&hdr, 16);
        if (_bdevGone)
        {
            Finish(req, VirtioBlkRequestType.StatusIoErr, wasInFlight: false);
            return;
        }

        switch (hdr.Type)
        {
            case VirtioBlkRequestType.In:
                ProcessData(req, in info, hdr.Sector, read: true);
                return;
            case VirtioBlkRequestType.Out:
                ProcessData(req, in info, hdr.Sector, read: false);
                return;
            case VirtioBlkRequestType.Flush:
                if (_ch!.Bdev.SupportsIoType(BdevIoType.Flush))
                {
                    req.Op = BdevIoType.Flush;
                    req.OffsetBlocks = 0;
                    req.NumBlocks = _ch.Bdev.BlockCount;
                    Submit(req);
                }
                else
                {
                    Finish(req, VirtioBlkRequestType.StatusOk, wasInFlight: false);
                }

                return;
            case VirtioBlkRequestType.GetId:
                ProcessGetId(req, in info);
                return;
            case VirtioBlkRequestType.Discard:
            case VirtioBlkRequestType.WriteZeroes:
                ProcessDiscard(req, in info, hdr.Type);
                return;
            default:
                Finish(req, VirtioBlkRequestType.StatusUnsupp, wasInFlight: false);
                return;
        }
    }

    /// <summary>Copies <paramref name="len"/> readable bytes starting at <paramref name="skip"/> (they may span segments).</summary>
    private unsafe static bool CopyReadable(DescSegment[] segs, int readableSegs, ulong skip, byte* dst, int len)
    {
        for (int i = 0; i < readableSegs && len > 0; i++)
        {
            ulong l = segs[i].Length;
            if (skip >= l)
            {
                skip -= l;
                continue;
            }

            int n = (int)Math.Min((ulong)len, l - skip);
            Unsafe.CopyBlockUnaligned(dst, (byte*)segs[i].Host + skip, (uint)n);
            dst += n;
            len -= n;
            skip = 0;
        }

        return len == 0;
    }

    private void ProcessData(BlkRequest req, in ChainInfo info, ulong sector, bool read)
    {
        var segs = req.Segments;
        ulong length;
        int count = 0;
        if (read)
        {
            // Data: every writable byte but the last (the status byte).
            length = info.WritableBytes - 1;
            ulong left = length;
            for (int i = info.FirstWritable; i < info.SegmentCount && left > 0; i++)
            {
                ulong n = Math.Min(left, segs[i].Length);
                req.Iovs[count++] = new IoVec(segs[i].Host, (nuint)n);
                left -= n;
            }
        }
        else
        {
            if (_ctrlr.ReadOnly)
            {
                Finish(req, VirtioBlkRequestType.StatusIoErr, wasInFlight: false);
                return;
            }

            // Data: every readable byte after the 16-byte header.
            length = info.ReadableBytes - 16;
            ulong skip = 16;
            for (int i = 0; i < info.FirstWritable; i++)
            {
                ulong l = segs[i].Length;
                if (skip >= l)
                {
                    skip -= l;
                    continue;
                }

                req.Iovs[count++] = new IoVec(segs[i].Host + (nint)skip, (nuint)(l - skip));
                skip = 0;
            }
        }

        if (length == 0)
        {
            Finish(req, VirtioBlkRequestType.StatusOk, wasInFlight: false);
            return;
        }

        var bdev = _ch!.Bdev;
        uint bs = bdev.BlockSize;
        if (length % bs != 0 || sector > ulong.MaxValue / VirtioBlkRequestType.SectorSize || (sector * VirtioBlkRequestType.SectorSize) % bs != 0)
        {
            Finish(req, VirtioBlkRequestType.StatusIoErr, wasInFlight: false);
            return;
        }

        ulong offset = sector * VirtioBlkRequestType.SectorSize / bs;
        ulong blocks = length / bs;
        ulong total = bdev.BlockCount;
        if (offset > total || blocks > total - offset)
        {
            Finish(req, VirtioBlkRequestType.StatusIoErr, wasInFlight: false);
            return;
        }

        req.IovCount = count;
        req.Op = read ? BdevIoType.Read : BdevIoType.Write;
        req.OffsetBlocks = offset;
        req.NumBlocks = blocks;
        req.UsedLength = read ? (uint)length + 1 : 1;
        Submit(req);
    }

    private unsafe void ProcessGetId(BlkRequest req, in ChainInfo info)
    {
        // The id goes into the writable bytes before the status byte (at most 20, not NUL-terminated when 20 long).
        var id = _ctrlr.SerialBytes;
        ulong room = Math.Min(info.WritableBytes - 1, VirtioBlkRequestType.IdBytes);
        ulong written = 0;
        var segs = req.Segments;
        for (int i = info.FirstWritable; i < info.SegmentCount && written < room; i++)
        {
            ulong n = Math.Min(room - written, segs[i].Length);
            var dst = new Span<byte>((void*)segs[i].Host, (int)n);
            for (int k = 0; k < (int)n; k++)
            {
                int src = (int)written + k;
                dst[k] = src < id.Length ? id[src] : (byte)0;
            }

            written += n;
        }

        req.UsedLength = (uint)written + 1;
        Finish(req, VirtioBlkRequestType.StatusOk, wasInFlight: false);
    }

    private unsafe void ProcessDiscard(BlkRequest req, in ChainInfo info, uint type)
    {
        bool discard = type == VirtioBlkRequestType.Discard;
        var bdev = _ch!.Bdev;
        if ((discard && !_ctrlr.SupportsDiscard) || (!discard && !_ctrlr.SupportsWriteZeroes))
        {
            Finish(req, VirtioBlkRequestType.StatusUnsupp, wasInFlight: false);
            return;
        }

        if (_ctrlr.ReadOnly)
        {
            Finish(req, VirtioBlkRequestType.StatusIoErr, wasInFlight: false);
            return;
        }

        // We advertise max_discard_seg = max_write_zeroes_seg = 1: exactly one 16-byte range.
        ulong payload = info.ReadableBytes - 16;
        if (payload != 16)
        {
            Finish(req, payload % 16 == 0 && payload > 16 ? VirtioBlkRequestType.StatusUnsupp : VirtioBlkRequestType.StatusIoErr, wasInFlight: false);
            return;
        }

        VirtioBlkDiscardWriteZeroes seg;
        CopyReadable(req.Segments, info.FirstWritable, 16, (byte*)&seg, 16);
        uint allowedFlags = discard ? 0 : VirtioBlkRequestType.SegmentFlagUnmap;
        if ((seg.Flags & ~allowedFlags) != 0)
        {
            Finish(req, VirtioBlkRequestType.StatusUnsupp, wasInFlight: false);
            return;
        }

        uint bs = bdev.BlockSize;
        ulong bytes = (ulong)seg.NumSectors * VirtioBlkRequestType.SectorSize;
        if (seg.NumSectors == 0 || seg.Sector > ulong.MaxValue / VirtioBlkRequestType.SectorSize
            || (seg.Sector * VirtioBlkRequestType.SectorSize) % bs != 0 || bytes % bs != 0)
        {
            Finish(req, VirtioBlkRequestType.StatusIoErr, wasInFlight: false);
            return;
        }

        ulong offset = seg.Sector * VirtioBlkRequestType.SectorSize / bs;
        ulong blocks = bytes / bs;
        ulong total = bdev.BlockCount;
        if (offset > total || blocks > total - offset)
        {
            Finish(req, VirtioBlkRequestType.StatusIoErr, wasInFlight: false);
            return;
        }

        // Discard -> unmap (contents undefined afterwards). Write zeroes -> write zeroes whether or not the
        // driver allowed unmapping: our bdevs' write-zeroes may deallocate but always reads back zeroes.
        req.Op = discard ? BdevIoType.Unmap : BdevIoType.WriteZeroes;
        req.OffsetBlocks = offset;
        req.NumBlocks = blocks;
        Submit(req);
    }

    // ---- submission and completion -----------------------------------------------------------------------

    private int SubmitToBdev(BlkRequest req)
    {
        var ch = _ch!;
        var desc = _desc!;
        return req.Op switch
        {
            BdevIoType.Read => ch.Read(desc, req.Iovs.AsSpan(0, req.IovCount), req.OffsetBlocks, req.NumBlocks, s_done, req),
            BdevIoType.Write => ch.Write(desc, req.Iovs.AsSpan(0, req.IovCount), req.OffsetBlocks, req.NumBlocks, s_done, req),
            BdevIoType.Flush => ch.Flush(desc, req.OffsetBlocks, req.NumBlocks, s_done, req),
            BdevIoType.Unmap => ch.Unmap(desc, req.OffsetBlocks, req.NumBlocks, s_done, req),
            BdevIoType.WriteZeroes => ch.WriteZeroes(desc, req.OffsetBlocks, req.NumBlocks, s_done, req),
            _ => -Native.EINVAL,
        };
    }

    private void Submit(BlkRequest req)
    {
        _inFlight++;
        int rc = SubmitToBdev(req);
        if (rc == 0)
        {
            return;
        }

        if (rc == -Native.ENOMEM && _ch!.QueueIoWait(req.WaitEntry))
        {
            return; // Resubmit runs when an I/O object is free; the request stays in flight.
        }

        Finish(req, VirtioBlkRequestType.StatusIoErr, wasInFlight: true);
    }

    private void Resubmit(BlkRequest req)
    {
        if (_bdevGone || _ch is null)
        {
            Finish(req, VirtioBlkRequestType.StatusIoErr, wasInFlight: true);
            return;
        }

        int rc = SubmitToBdev(req);
        if (rc == 0 || (rc == -Native.ENOMEM && _ch.QueueIoWait(req.WaitEntry)))
        {
            return;
        }

        Finish(req, VirtioBlkRequestType.StatusIoErr, wasInFlight: true);
    }

    private void OnBdevDone(BlkRequest req, bool ok)
    {
        Finish(req, ok ? VirtioBlkRequestType.StatusOk : VirtioBlkRequestType.StatusIoErr, wasInFlight: true);
    }

    private unsafe void Finish(BlkRequest req, byte status, bool wasInFlight)
    {
        if (req.StatusPtr != 0)
        {
            *(byte*)req.StatusPtr = status;
        }

        _vq.PushUsed(req.Head, req.UsedLength);
        _usedReqCount++;
        _signalPending = true;
        _completedSincePoll++;
        req.NextFree = _free;
        _free = req;
        if (wasInFlight && --_inFlight == 0 && _drained is { } d)
        {
            _drained = null;
            d.TrySetResult();
        }
    }

    /// <summary>Signals the call eventfd for used entries published since the last signal, honouring coalescing.</summary>
    private void Flush(bool force)
    {
        if (!_signalPending)
        {
            return;
        }

        var call = _call;
        if (call is null)
        {
            _signalPending = false;
            return;
        }

        if (_delayBaseTicks == 0 || force)
        {
            _signalPending = false;
            if (_vq.NeedsNotify())
            {
                call.Signal();
            }

            return;
        }

        long now = Stopwatch.GetTimestamp();
        if (now >= _nextStatsCheck)
        {
            _nextStatsCheck = now + (StatsIntervalMs * Stopwatch.Frequency / 1000);
            uint reqs = _reqCount + _usedReqCount;
            _irqDelayTicks = reqs > _ioRateThreshold ? _delayBaseTicks * (reqs - _ioRateThreshold) / _ioRateThreshold : 0;
            _reqCount = 0;
        }

        if (now < _nextEventTime)
        {
            return; // stays pending; the poller retries next iteration
        }

        _signalPending = false;
        if (_vq.NeedsNotify())
        {
            call.Signal();
            _reqCount += _usedReqCount;
            _usedReqCount = 0;
            _nextEventTime = now + _irqDelayTicks;
        }
    }
}
