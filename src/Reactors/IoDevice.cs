namespace VhostBackend.Reactors;

/// <summary>
/// Something with per-reactor state (a bdev, an NVMe controller's queue pairs, a file's io_uring). Each reactor
/// that uses the device gets its own <see cref="IoChannel"/>, created on first use on that reactor and destroyed
/// there when its last reference is released, so per-thread state is never shared and needs no lock.
/// </summary>
public abstract class IoDevice
{
    private readonly List<IoChannel> _channels = new();

    protected IoDevice(string name) => Name = name;

    public string Name { get; protected set; }

    internal bool IsUnregistered { get; private set; }

    /// <summary>Creates the per-reactor context. Runs on <paramref name="reactor"/>.</summary>
    protected internal abstract object CreateChannelContext(Reactor reactor);

    /// <summary>Destroys a context when its last reference is released. Runs on <paramref name="reactor"/>.</summary>
    protected internal abstract void DestroyChannelContext(Reactor reactor, object context);

    internal void AddChannel(IoChannel ch)
    {
        lock (_channels)
        {
            _channels.Add(ch);
        }
    }

    internal void RemoveChannel(IoChannel ch)
    {
        lock (_channels)
        {
            _channels.Remove(ch);
        }
    }

    /// <summary>Channels open right now (a snapshot).</summary>
    public IoChannel[] SnapshotChannels()
    {
        lock (_channels)
        {
            return _channels.ToArray();
        }
    }

    /// <summary>Marks the device as going away: no new channels are handed out.</summary>
    protected void MarkUnregistered() => IsUnregistered = true;

    /// <summary>
    /// Calls <paramref name="fn"/> on each channel's own reactor, one after another, then <paramref name="done"/>
    /// on the calling reactor (or a thread-pool thread when called from outside the reactors). Like
    /// spdk_for_each_channel. Control plane only.
    /// </summary>
    public void ForEachChannel(Action<IoChannel> fn, Action done)
    {
        var channels = SnapshotChannels();
        var origin = Reactor.Current;
        void Step(int i)
        {
            if (i == channels.Length)
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

            var ch = channels[i];
            ch.Reactor.Send(_ =>
            {
                if (ch.RefCount > 0)
                {
                    fn(ch);
                }

                Step(i + 1);
            }, null);
        }

        Step(0);
    }

    public Task ForEachChannelAsync(Action<IoChannel> fn)
    {
        var tcs = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        ForEachChannel(fn, () => tcs.SetResult());
        return tcs.Task;
    }
}

/// <summary>A reactor's reference-counted handle to an <see cref="IoDevice"/>. Use and release it on that reactor only.</summary>
public sealed class IoChannel
{
    internal IoChannel(IoDevice device, Reactor reactor, object context)
    {
        Device = device;
        Reactor = reactor;
        Context = context;
    }

    public IoDevice Device { get; }
    public Reactor Reactor { get; }
    public object Context { get; }
    internal int RefCount;

    /// <summary>Set (on the owning reactor) when the context has been destroyed.</summary>
    internal bool Destroyed;

    /// <summary>Drops one reference; the last one destroys the context. Must be called on <see cref="Reactor"/>.</summary>
    public void Release() => Reactor.ReleaseIoChannel(this);
}
