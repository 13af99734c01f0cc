using VhostBackend.Platform;

namespace VhostBackend.Reactors;

/// <summary>
/// The set of reactors of one application: one per core of the core mask, the first being the main reactor
/// (where the control plane, RPC handlers and subsystem init run).
/// </summary>
public sealed class ReactorRuntime : IAsyncDisposable
{
    private readonly Reactor[] _reactors;
    private int _nextRoundRobin;
    private bool _started;

    public ReactorRuntime(CpuSet cores, ReactorOptions? options = null)
    {
        Options = options ?? new ReactorOptions();
        CpuMask = cores;
        var online = CpuSet.Online();
        foreach (int c in cores.Cores)
        {
            if (!online.Contains(c))
            {
                throw new ArgumentException($"core {c} in mask {cores} is not available (online: {string.Join(',', online.Cores)})");
            }
        }

        _reactors = cores.Cores.Select((core, i) => new Reactor(i, core, Options)).ToArray();
    }

    public ReactorOptions Options { get; }
    public CpuSet CpuMask { get; }
    public IReadOnlyList<Reactor> Reactors => _reactors;
    public Reactor Main => _reactors[0];

    public void Start()
    {
        if (_started)
        {
            return;
        }

        _started = true;
        foreach (var r in _reactors)
        {
            r.Start();
        }
    }

    /// <summary>The reactor on <paramref name="core"/>, or null.</summary>
    public Reactor? ForCore(int core) => _reactors.FirstOrDefault(r => r.Core == core);

    /// <summary>Reactors whose cores are in <paramref name="mask"/> (all when null); throws if none match.</summary>
    public Reactor[] Select(CpuSet? mask)
    {
        if (mask is null)
        {
            return _reactors.ToArray();
        }

        var selected = _reactors.Where(r => mask.Contains(r.Core)).ToArray();
        if (selected.Length == 0)
        {
            throw new ArgumentException($"cpumask {mask} selects no reactor (reactors run on {CpuMask})");
        }

        return selected;
    }

    public Reactor NextRoundRobin(Reactor[] among)
    {
        int i = Interlocked.Increment(ref _nextRoundRobin);
        return among[(int)((uint)i % (uint)among.Length)];
    }

    /// <summary>
    /// Runs <paramref name="fn"/> on every reactor in turn, then <paramref name="done"/> on the calling reactor
    /// (a thread-pool thread from outside). Like spdk_for_each_thread.
    /// </summary>
    public void ForEachReactor(Action<Reactor> fn, Action done)
    {
        var origin = Reactor.Current;
        void Step(int i)
        {
            if (i == _reactors.Length)
            {
                if (origin is null)
                {
                    ThreadPool.UnsafeQueueUserWorkItem(_ => done(), null);
                }
                else
                {
                    origin.Send(_ => done(), null);
                }

                return;
            }

            var r = _reactors[i];
            r.Send(_ =>
            {
                fn(r);
                Step(i + 1);
            }, null);
        }

        Step(0);
    }

    public Task ForEachReactorAsync(Action<Reactor> fn)
    {
        var tcs = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        ForEachReactor(fn, () => tcs.SetResult());
        return tcs.Task;
    }

    public async ValueTask DisposeAsync()
    {
        if (!_started)
        {
            return;
        }

        foreach (var r in _reactors)
        {
            r.RequestStop();
        }

        await Task.WhenAll(_reactors.Select(r => r.Stopped)).WaitAsync(TimeSpan.FromSeconds(10)).ConfigureAwait(false);
        foreach (var r in _reactors)
        {
            r.DisposeResources();
        }
    }
}
