using VhostBackend.Reactors;

namespace VhostBackend.Nvmf;

/// <summary>
/// A reactor's poll group (SPDK's spdk_nvmf_poll_group): the connections handed to this reactor, polled by one poller
/// every iteration. Connections are added and removed on the reactor only.
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

    private int Poll()
    {
        int work = 0;
        var conns = _conns;
        for (int i = 0; i < conns.Length; i++)
        {
            work += conns[i].Poll();
        }

        return work;
    }
}
