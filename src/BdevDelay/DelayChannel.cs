using VhostBackend.Bdev;
using VhostBackend.Platform;
using VhostBackend.Reactors;

namespace VhostBackend.BdevDelay;

/// <summary>Which latency an I/O gets (SPDK's enum delay_io_type), kept in <see cref="BdevIo.ModuleTag"/> while it is forwarded.</summary>
internal enum DelayKind
{
    AvgRead = 0,
    P99Read = 1,
    AvgWrite = 2,
    P99Write = 3,
    None = 4,
}

/// <summary>
/// A delay vbdev's channel on one reactor: forwards to the base and holds each completed read and write until its
/// deadline (base completion + the latency of its kind, as SPDK's _delay_complete_io), then a timed poller releases
/// it with the base's status. One FIFO per kind, as SPDK's four lists: deadlines of a kind rise in submission order
/// unless the latency is lowered meanwhile, and then, as in SPDK, the newer I/Os wait behind the older ones. The
/// FIFOs are rings preallocated at the vbdev's I/O pool size (at most that many of its I/Os exist on a channel), so
/// holding an I/O allocates nothing.
/// </summary>
internal sealed class DelayChannel : BaseForwarder
{
    /// <summary>How often the release poller runs. Also bounds how long an idle reactor sleeps while I/O is held.</summary>
    private const ulong PollPeriodMicroseconds = 10;

    private readonly DelayBdev _bdev;
    private readonly Reactor _reactor;
    private readonly Poller _poller;
    private readonly Ring[] _rings = new Ring[4];
    private uint _rand;

    public DelayChannel(DelayBdev bdev, BdevDesc baseDesc, Reactor reactor)
        : base(baseDesc)
    {
        _bdev = bdev;
        _reactor = reactor;
        for (int i = 0; i < _rings.Length; i++)
        {
            _rings[i] = new Ring(bdev.IoPoolSize);
        }

        _rand = (uint)HashCode.Combine(Environment.TickCount64, reactor.Id, bdev.Name) | 1;
        _poller = reactor.RegisterPoller("delay:" + bdev.Name, static c => ((DelayChannel)c!).Poll(), this, PollPeriodMicroseconds);
    }

    /// <summary>I/Os held for their latency right now.</summary>
    public int HeldCount => _rings[0].Count + _rings[1].Count + _rings[2].Count + _rings[3].Count;

    /// <summary>SPDK: <c>rand_r(&amp;seed) % 100 == 0</c>, so about 1 read or write in 100 gets the p99 latency.</summary>
    public bool NextIsP99()
    {
        uint x = _rand; // xorshift32: no allocation, per channel
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        _rand = x;
        return x % 100 == 0;
    }

    protected override void OnBaseDone(BdevIo io, BdevIoStatus status, int nvmeStatus)
    {
        var kind = (DelayKind)io.ModuleTag;
        if (kind == DelayKind.None || _bdev.Removing || !_rings[(int)kind].TryPush(io, Ticks.Now() + _bdev.LatencyTicks(kind), status, nvmeStatus))
        {
            io.NvmeStatus = nvmeStatus;
            io.Complete(status);
        }
    }

    /// <summary>Completes every held I/O now: with <paramref name="status"/> (a reset: Aborted, as SPDK), or with its own when null (the vbdev is going away).</summary>
    public void ReleaseAll(BdevIoStatus? status)
    {
        foreach (var ring in _rings)
        {
            while (ring.TryPop(long.MaxValue, out var io, out var s, out int nvme))
            {
                io.NvmeStatus = status is null ? nvme : 0;
                io.Complete(status ?? s);
            }
        }
    }

    public override void Close()
    {
        ReleaseAll(null);
        _reactor.UnregisterPoller(_poller);
        base.Close();
    }

    private int Poll()
    {
        long now = _reactor.Now; // the iteration's start, never ahead of the clock: a deadline is never released early
        int released = 0;
        foreach (var ring in _rings)
        {
            while (ring.TryPop(now, out var io, out var status, out int nvme))
            {
                io.NvmeStatus = nvme;
                io.Complete(status);
                released++;
            }
        }

        return released;
    }

    private struct Held
    {
        public BdevIo Io;
        public long Deadline;
        public BdevIoStatus Status;
        public int NvmeStatus;
    }

    /// <summary>A FIFO of held I/Os in a fixed array.</summary>
    private sealed class Ring
    {
        private readonly Held[] _items;
        private int _head;

        public Ring(int capacity) => _items = new Held[Math.Max(1, capacity)];

        public int Count { get; private set; }

        public bool TryPush(BdevIo io, long deadline, BdevIoStatus status, int nvmeStatus)
        {
            if (Count == _items.Length)
            {
                return false; // cannot happen (one slot per I/O of the pool); the caller then completes at once
            }

            ref var slot = ref _items[(_head + Count) % _items.Length];
            slot.Io = io;
            slot.Deadline = deadline;
            slot.Status = status;
            slot.NvmeStatus = nvmeStatus;
            Count++;
            return true;
        }

        /// <summary>Takes the head if its deadline is at or before <paramref name="now"/>.</summary>
        public bool TryPop(long now, out BdevIo io, out BdevIoStatus status, out int nvmeStatus)
        {
            if (Count == 0 || _items[_head].Deadline > now)
            {
                io = null!;
                status = default;
                nvmeStatus = 0;
                return false;
            }

            ref var slot = ref _items[_head];
            io = slot.Io;
            status = slot.Status;
            nvmeStatus = slot.NvmeStatus;
            slot = default;
            _head = (_head + 1) % _items.Length;
            Count--;
            return true;
        }
    }
}
