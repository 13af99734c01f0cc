using System.Diagnostics;
using System.Runtime.CompilerServices;
using Microsoft.Extensions.Logging;
using VhostBackend.Bdev;
using VhostBackend.Platform;
using VhostBackend.Reactors;
using VhostBackend.VhostUser;
using VhostBackend.Virtio;
using VhostBackend.Virtio.Blk;

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

    /// <summary>The walked chain (segments [0, SegmentCount), writable from FirstWritable): logged when dirty logging is on.</summary>
    public int SegmentCount;
    public int FirstWritable;
    /// <summary>The status byte (the chain's last writable byte); Length 0 when the chain has no safe one.</summary>
    public DescSegment Status;
    public uint UsedLength;
    public BdevIoType Op;
    public ulong OffsetBlocks;
    public ulong NumBlocks;
    public BlkRequest? NextFree;
}

/// <summary>
/// One virtio-blk queue of one session, polled on one reactor: parses requests and submits them to the bdev
/// zero-copy (iovecs point straight into guest memory). Polling, completion publishing and interrupts are
/// <see cref="VhostQueue"/>'s.
/// </summary>
internal sealed class BlkQueue : VhostQueue
{
    internal static readonly Action<object?> RetryCallback = static o => ((BlkRequest)o!).Queue.Resubmit((BlkRequest)o!);
    private static readonly BdevIoCompletion s_done = static (io, ok, arg) => ((BlkRequest)arg!).Queue.OnBdevDone((BlkRequest)arg!, ok);

    private readonly VhostBlkController _ctrlr;
    private readonly BlkRequest[] _pool;
    private BdevDesc? _desc;
    private BdevChannel? _ch;
    private BlkRequest? _free;
    private bool _bdevGone;

    public BlkQueue(VhostBlkController ctrlr, VhostUserSession session, int index, DeviceVirtqueue vq, EventFd? call, EventFd? kick, Reactor reactor)
        : base(ctrlr, session, index, vq, call, kick, reactor, "vhost_blk")
    {
        _ctrlr = ctrlr;
        int poolSize = Math.Min((int)vq.Size, 1024);
        _pool = new BlkRequest[poolSize];
        for (int i = 0; i < poolSize; i++)
        {
            var r = new BlkRequest(this) { NextFree = _free };
            _free = r;
            _pool[i] = r;
        }
    }

    protected override bool CanTakeRequest => _free is not null;

    protected override void OnStart()
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
    }

    protected override void OnStop() => ReleaseChannel();

    protected override int AfterBatch() => _ch?.DeliverDeferred() ?? 0;

    /// <summary>The bdev is going away: fail new requests, wait for in-flight ones, drop the channel.</summary>
    public Task DetachBdevAsync() => Reactor.InvokeAsync(async () =>
    {
        _bdevGone = true;
        await WaitDrainedAsync().ConfigureAwait(true);
        ReleaseChannel();
        return true;
    });

    private void ReleaseChannel()
    {
        if (_ch is not null)
        {
            BdevDesc.PutIoChannel(_ch);
            _ch = null;
        }
    }

    protected override void Process(ushort head)
    {
        var req = _free!;
        _free = req.NextFree;
        req.NextFree = null;
        Process(req, head);
    }

    // ---- request parsing ----------------------------------------------------------------------------------

    private void Process(BlkRequest req, ushort head)
    {
        req.Head = head;
        req.Status = default;
        req.UsedLength = 1;
        var segs = req.Segments;
        var err = Vq.WalkChain(head, segs, out var info);
        req.SegmentCount = err == ChainError.None ? info.SegmentCount : 0;
        req.FirstWritable = info.FirstWritable;
        if (err != ChainError.None || info.ReadableBytes < VirtioBlkOutHeader.Size || info.WritableBytes < 1)
        {
            LogBadRequest(head, "virtio-blk request needs a 16-byte header and a status byte", err, info.ReadableBytes, info.WritableBytes);

            // No safe status byte: return the head with nothing written.
            req.UsedLength = 0;
            Finish(req, 0, wasInFlight: false);
            return;
        }

        ref var last = ref segs[info.SegmentCount - 1];
        req.Status = DescChain.Slice(last, last.Length - 1, 1);
        DescChain.TryRead(segs, 0, info.FirstWritable, 0, out VirtioBlkOutHeader hdr); // ReadableBytes >= its size was checked
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
            length = info.ReadableBytes - VirtioBlkOutHeader.Size;
            ulong skip = VirtioBlkOutHeader.Size;
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

    private void ProcessGetId(BlkRequest req, in ChainInfo info)
    {
        // The id goes into the writable bytes before the status byte (at most 20, not NUL-terminated when 20 long).
        var id = _ctrlr.SerialBytes;
        ulong room = Math.Min(info.WritableBytes - 1, VirtioBlkRequestType.IdBytes);
        ulong written = 0;
        var segs = req.Segments;
        for (int i = info.FirstWritable; i < info.SegmentCount && written < room; i++)
        {
            ulong n = Math.Min(room - written, segs[i].Length);
            var dst = DescChain.AsSpan(segs[i], 0, (int)n);
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

    private void ProcessDiscard(BlkRequest req, in ChainInfo info, uint type)
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
        ulong payload = info.ReadableBytes - VirtioBlkOutHeader.Size;
        if (payload != VirtioBlkDiscardWriteZeroes.Size)
        {
            Finish(req, payload % VirtioBlkDiscardWriteZeroes.Size == 0 && payload > VirtioBlkDiscardWriteZeroes.Size ? VirtioBlkRequestType.StatusUnsupp : VirtioBlkRequestType.StatusIoErr, wasInFlight: false);
            return;
        }

        DescChain.TryRead(req.Segments, 0, info.FirstWritable, VirtioBlkOutHeader.Size, out VirtioBlkDiscardWriteZeroes seg);
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
            _ => -Errno.EINVAL,
        };
    }

    private void Submit(BlkRequest req)
    {
        BeginInFlight();
        int rc = SubmitToBdev(req);
        if (rc == 0)
        {
            return;
        }

        if (rc == -Errno.ENOMEM && _ch!.QueueIoWait(req.WaitEntry))
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
        if (rc == 0 || (rc == -Errno.ENOMEM && _ch.QueueIoWait(req.WaitEntry)))
        {
            return;
        }

        Finish(req, VirtioBlkRequestType.StatusIoErr, wasInFlight: true);
    }

    private void OnBdevDone(BlkRequest req, bool ok)
    {
        Finish(req, ok ? VirtioBlkRequestType.StatusOk : VirtioBlkRequestType.StatusIoErr, wasInFlight: true);
    }

    private void Finish(BlkRequest req, byte status, bool wasInFlight)
    {
        if (req.Status.Length != 0)
        {
            DescChain.AsSpan(req.Status, 0, 1)[0] = status;
        }

        // Live migration: the pages this request wrote (read data, GET_ID, the status byte) are marked dirty.
        Vq.LogWrites(req.Segments, req.FirstWritable, req.SegmentCount);
        ushort head = req.Head;
        uint used = req.UsedLength;
        req.NextFree = _free;
        _free = req;
        Complete(head, used, wasInFlight);
    }
}
