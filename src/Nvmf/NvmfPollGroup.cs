using Microsoft.Extensions.Logging;
using VhostBackend.Reactors;

namespace VhostBackend.Nvmf;

/// <summary>
/// A reactor's poll group (SPDK's spdk_nvmf_poll_group): the connections handed to this reactor, polled by one poller
/// every iteration. Connections are added and removed on the reactor only. The group also bounds the data buffer memory
/// of its connections (SPDK bounds it with its shared buffer pool): requests that would grow past
/// <see cref="BufferLimit"/> wait, in order, until idle buffers are given back. A connection that throws while polled is
/// closed alone; the reactor and the other connections keep running.
/// </summary>
internal sealed class NvmfPollGroup
{
    private NvmfTcpConnection[] _conns = Array.Empty<NvmfTcpConnection>();
    private Poller? _poller;

    public NvmfPollGroup(Reactor reactor, int index)
    {
        Reactor = reactor;
        Name = $"nvmf_tgt_poll_group_{index:D3}";
    }

    public Reactor Reactor { get; }
    public string Name { get; }
    public long AdminQpairs;
    public long IoQpairs;
    public long CompletedIo;

    /// <summary>Bytes of request data buffers held by this group's connections, and the most they may hold.</summary>
    public long BufferBytes;
    public long BufferLimit = long.MaxValue;

    /// <summary>Times a request had to wait for buffer memory (nvmf_get_stats: pending_buffer_waits).</summary>
    public long BufferWaits;
    private NvmfRequest? _waitHead;
    private NvmfRequest? _waitTail;
    private long _lastFaultLog;

    internal bool HasBufferWaiters => _waitHead is not null;

    public IReadOnlyList<NvmfTcpConnection> Connections => _conns;

    /// <summary>On the reactor.</summary>
    public void Start() => _poller ??= Reactor.RegisterPoller("nvmf_poll_group:" + Name, static c => ((NvmfPollGroup)c!).Poll(), this);

    /// <summary>On the reactor.</summary>
    public void Stop()
    {
        foreach (var c in _conns)
        {
            c.Close("target stopping", log: false);
        }

        if (_poller is not null)
        {
            Reactor.UnregisterPoller(_poller);
            _poller = null;
        }
    }

    public void Add(NvmfTcpConnection conn)
    {
        conn.Group = this;
        var next = new NvmfTcpConnection[_conns.Length + 1];
        _conns.CopyTo(next, 0);
        next[^1] = conn;
        _conns = next;
    }

    public void Remove(NvmfTcpConnection conn)
    {
        int i = Array.IndexOf(_conns, conn);
        if (i < 0)
        {
            return;
        }

        CompletedIo += conn.CompletedIo;
        var next = new NvmfTcpConnection[_conns.Length - 1];
        Array.Copy(_conns, 0, next, 0, i);
        Array.Copy(_conns, i + 1, next, i, _conns.Length - i - 1);
        _conns = next;
    }

    /// <summary>Queues a request until buffer memory is free (on the reactor).</summary>
    internal void WaitForBuffer(NvmfRequest req)
    {
        BufferWaits++;
        req.NextWaiter = null;
        if (_waitTail is null)
        {
            _waitHead = req;
        }
        else
        {
            _waitTail.NextWaiter = req;
        }

        _waitTail = req;
    }

    /// <summary>
    /// Disposes idle buffers (of free requests) of this group's connections until <paramref name="need"/> more bytes fit.
    /// Takes them from the idle list: the cost is the buffers given back, nothing when there are none (while requests
    /// wait for memory, every poll tries again).
    /// </summary>
    internal void Reclaim(long need)
    {
        while (BufferBytes + need > BufferLimit && _idleHead is { } req)
        {
            ReclaimVisits++;
            req.Conn.DropBuffer(req); // unlinks it
        }
    }

    /// <summary>Requests Reclaim has looked at (each gave its buffer back): tests check that waiting scans nothing.</summary>
    internal long ReclaimVisits;

    private NvmfRequest? _idleHead;

    /// <summary>Free requests of this group's connections holding a buffer.</summary>
    internal int IdleBuffers { get; private set; }

    /// <summary>A request was freed with its buffer kept (on the reactor).</summary>
    internal void AddIdle(NvmfRequest req)
    {
        if (req.Idle)
        {
            return;
        }

        req.Idle = true;
        req.IdlePrev = null;
        req.IdleNext = _idleHead;
        if (_idleHead is not null)
        {
            _idleHead.IdlePrev = req;
        }

        _idleHead = req;
        IdleBuffers++;
    }

    /// <summary>An idle request was taken again or lost its buffer (on the reactor).</summary>
    internal void RemoveIdle(NvmfRequest req)
    {
        if (!req.Idle)
        {
            return;
        }

        if (req.IdlePrev is { } prev)
        {
            prev.IdleNext = req.IdleNext;
        }
        else
        {
            _idleHead = req.IdleNext;
        }

        if (req.IdleNext is { } next)
        {
            next.IdlePrev = req.IdlePrev;
        }

        req.Idle = false;
        req.IdlePrev = req.IdleNext = null;
        IdleBuffers--;
    }

    private void ResumeWaiters()
    {
        while (_waitHead is { } req)
        {
            if (req.BufferWait != 0 && req.Active && !req.Conn.IsClosed && !req.Conn.ResumeBufferWait(req))
            {
                return; // still no room: it stays first in line
            }

            _waitHead = req.NextWaiter;
            req.NextWaiter = null;
            if (_waitHead is null)
            {
                _waitTail = null;
            }
        }
    }

    private int Poll()
    {
        if (_waitHead is not null)
        {
            ResumeWaiters();
        }

        int work = 0;
        var conns = _conns;
        for (int i = 0; i < conns.Length; i++)
        {
            try
            {
                work += conns[i].Poll();
            }
            catch (Exception e)
            {
                Fault(conns[i], e);
                work++;
            }
        }

        return work;
    }

    /// <summary>A connection threw while polled: it is closed; the group, the reactor and the other connections go on.</summary>
    private void Fault(NvmfTcpConnection conn, Exception e)
    {
        long now = Platform.Ticks.Now();
        if (now - _lastFaultLog > Platform.Ticks.Frequency)
        {
            _lastFaultLog = now;
            conn.Target.Logger.LogError(e, "nvmf: connection {Conn} failed; closing it", conn);
        }

        try
        {
            conn.Close($"internal error: {e.GetType().Name}: {e.Message}", log: false);
        }
        catch (Exception e2)
        {
            conn.Target.Logger.LogError(e2, "nvmf: closing connection {Conn} failed", conn);
            Remove(conn);
        }
    }
}
