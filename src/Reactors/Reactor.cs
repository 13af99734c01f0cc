using System.Collections.Concurrent;
using System.Diagnostics;
using VhostBackend.Platform;

namespace VhostBackend.Reactors;

/// <summary>How an idle reactor waits for work.</summary>
public enum ReactorMode
{
    /// <summary>Spin on the pollers forever: lowest latency, one full core.</summary>
    Poll,

    /// <summary>Sleep in epoll whenever an iteration finds no work.</summary>
    Interrupt,

    /// <summary>Poll while busy; sleep in epoll after <see cref="ReactorOptions.AdaptiveIdleMicroseconds"/> without work.</summary>
    Adaptive,
}

public sealed class ReactorOptions
{
    public ReactorMode Mode { get; set; } = ReactorMode.Adaptive;

    /// <summary>Adaptive mode: how long a reactor polls without finding work before it sleeps.</summary>
    public int AdaptiveIdleMicroseconds { get; set; } = 2000;

    /// <summary>Longest sleep when some poller has no interrupt source (it is then polled at least this often).</summary>
    public int FallbackPollMicroseconds { get; set; } = 1000;

    public int MessageQueueCapacity { get; set; } = 16384;

    /// <summary>Messages handled per loop iteration before pollers get their turn.</summary>
    public int MessageBatch { get; set; } = 64;

    /// <summary>Whether reactor threads pin themselves to their cores (tests may turn it off).</summary>
    public bool PinThreads { get; set; } = true;

    /// <summary>Parses a <c>--reactor-mode</c> value: poll, interrupt or adaptive.</summary>
    public static bool TryParseMode(string text, out ReactorMode mode)
    {
        switch (text)
        {
            case "poll":
                mode = ReactorMode.Poll;
                return true;
            case "interrupt":
                mode = ReactorMode.Interrupt;
                return true;
            case "adaptive":
                mode = ReactorMode.Adaptive;
                return true;
            default:
                mode = default;
                return false;
        }
    }
}

/// <summary>
/// One OS thread pinned to one core that runs its pollers and messages in a loop. Every object owned by a
/// reactor (pollers, I/O channels, queue state) is touched only on its thread; other threads post messages.
///
/// Wake-up protocol (interrupt and adaptive modes): before sleeping the reactor publishes
/// <c>_sleeping = 1</c> with a full fence and then re-checks its queue; a sender enqueues (a full fence, via
/// the queue's CAS) and then reads <c>_sleeping</c>. One of the two always sees the other, so no message
/// is left behind a sleeping reactor (Dekker's pattern).
/// </summary>
public sealed class Reactor
{
    [ThreadStatic]
    private static Reactor? t_current;

    private readonly ReactorOptions _options;
    private readonly MessageQueue _queue;
    private readonly ConcurrentQueue<(Action<object?> Fn, object? Arg)> _overflow = new();
    private readonly EventFd _wakeFd = new();
    private readonly Epoll _epoll = new();
    private readonly Dictionary<IoDevice, IoChannel> _channels = new(ReferenceEqualityComparer.Instance);
    private readonly List<Poller> _pollers = new();
    private Poller[] _active = [];
    private Poller[] _timed = [];
    private Thread? _thread;
    private int _sleeping;
    private volatile bool _stopRequested;
    private readonly TaskCompletionSource _stopped = new(TaskCreationOptions.RunContinuationsAsynchronously);

    internal Reactor(int id, int core, ReactorOptions options)
    {
        Id = id;
        Core = core;
        _options = options;
        _queue = new MessageQueue(options.MessageQueueCapacity);
        _epoll.Add(_wakeFd.Fd, 0, Epoll.EPOLLIN);
    }

    public int Id { get; }
    public int Core { get; }
    public string Name => $"reactor_{Core}";

    /// <summary>The reactor whose thread is calling, or null on a non-reactor thread.</summary>
    public static Reactor? Current => t_current;

    public bool IsCurrent => t_current == this;

    public ReactorMode Mode { get; private set; }

    // Statistics: written by the reactor thread only, read racily by anyone (64-bit aligned, never torn on x64).
    public long BusyTicks { get; private set; }
    public long IdleTicks { get; private set; }
    public long SleepCount { get; private set; }
    public long Iterations { get; private set; }

    /// <summary>
    /// The longest loop iteration (messages, active pollers, due timed pollers; sleeping in epoll excluded), in
    /// <see cref="Ticks"/>, since start or the last <see cref="ResetMaxIteration"/>: how long this reactor kept every
    /// queue it serves waiting at worst. Maintained with one compare per iteration on the clock read it already does.
    /// </summary>
    public long MaxIterationTicks => Volatile.Read(ref _maxIterationTicks);
    private long _maxIterationTicks;

    /// <summary>Starts a new <see cref="MaxIterationTicks"/> window. Any thread (a racing iteration may record its own length after the reset).</summary>
    public void ResetMaxIteration() => Volatile.Write(ref _maxIterationTicks, 0);
    public long MessagesHandled { get; private set; }
    public long OverflowMessages => Interlocked.Read(ref _overflowCount);
    private long _overflowCount;

    /// <summary>Bytes this reactor's thread has allocated, sampled every 1024 iterations.</summary>
    public long AllocatedBytes { get; private set; }
    public int Gen2Collections => GC.CollectionCount(2);
    public int ThreadId { get; private set; }

    public bool IsInInterrupt => Volatile.Read(ref _sleeping) != 0;

    public IReadOnlyList<Poller> Pollers
    {
        get
        {
            lock (_pollers)
            {
                return _pollers.ToArray();
            }
        }
    }

    /// <summary>
    /// Queues <paramref name="fn"/>(<paramref name="arg"/>) to run on this reactor. Callable from any thread,
    /// including this one; always returns before the function runs. Allocates nothing unless the ring is full.
    /// </summary>
    public void Send(Action<object?> fn, object? arg)
    {
        if (!_queue.TryEnqueue(fn, arg))
        {
            Interlocked.Increment(ref _overflowCount);
            _overflow.Enqueue((fn, arg));
        }

        // Full fence came with the enqueue's CAS; now see whether the reactor went to sleep before it.
        if (Volatile.Read(ref _sleeping) != 0)
        {
            _wakeFd.Signal();
        }
    }

    /// <summary>Runs a control-plane function on this reactor and returns its result (allocates; not for I/O).</summary>
    public Task<T> InvokeAsync<T>(Func<T> fn) => InvokeCore(fn);

    private Task<T> InvokeCore<T>(Func<T> fn)
    {
        var tcs = new TaskCompletionSource<T>(TaskCreationOptions.RunContinuationsAsynchronously);
        Send(static s =>
        {
            var (f, t) = ((Func<T>, TaskCompletionSource<T>))s!;
            try
            {
                t.SetResult(f());
            }
            catch (Exception e)
            {
                t.SetException(e);
            }
        }, (fn, tcs));
        return tcs.Task;
    }

    /// <summary>Runs an async control-plane function on this reactor; its continuations stay on the reactor.</summary>
    /// <remarks>
    /// The returned task is completed by the reactor itself when <paramref name="fn"/>'s task finishes (no
    /// <c>Unwrap</c>, whose hook-up of the inner task is a thread-pool work item): a thread blocked on it (the
    /// vhost-user thread answering GET_VRING_BASE or cleaning up a disconnected session, both behind
    /// <c>VhostQueue.StopAsync</c>) needs no thread-pool thread, as with the queue start (df765c8).
    /// </remarks>
    public Task<T> InvokeAsync<T>(Func<Task<T>> fn)
    {
        var tcs = new TaskCompletionSource<T>(TaskCreationOptions.RunContinuationsAsynchronously);
        Send(static s =>
        {
            var (f, t) = ((Func<Task<T>>, TaskCompletionSource<T>))s!;
            Task<T> inner;
            try
            {
                inner = f();
            }
            catch (Exception e)
            {
                t.SetException(e);
                return;
            }

            // Runs inline where the inner task completes: on this reactor (the async function's continuations are
            // posted to its synchronization context), or right here when it already finished.
            _ = inner.ContinueWith(static (i, st) => ((TaskCompletionSource<T>)st!).TrySetFromTask(i), t,
                CancellationToken.None, TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);
        }, (fn, tcs));
        return tcs.Task;
    }

    public Task InvokeAsync(Action fn) => InvokeCore(() =>
    {
        fn();
        return true;
    });

    /// <summary>Registers a poller. Must be called on this reactor. A period of 0 runs it every iteration.</summary>
    public Poller RegisterPoller(string name, PollerFn fn, object? context, ulong periodMicroseconds = 0)
    {
        AssertCurrent();
        long period = Ticks.FromMicroseconds((long)periodMicroseconds);
        if (periodMicroseconds > 0 && period == 0)
        {
            period = 1;
        }

        var p = new Poller(this, name, fn, context, period) { IsRegistered = true };
        p.NextRunTicks = Ticks.Now() + period;
        lock (_pollers)
        {
            _pollers.Add(p);
        }

        RebuildPollerArrays();
        return p;
    }

    /// <summary>Gives the poller an interrupt source: an fd (or -1) watched while the reactor sleeps, and an arm callback.</summary>
    public void SetPollerInterrupt(Poller poller, int fd, PollerInterruptFn fn)
    {
        AssertCurrent();
        if (poller.InterruptFd >= 0)
        {
            _epoll.Remove(poller.InterruptFd);
        }

        poller.InterruptFd = fd;
        poller.InterruptFn = fn;
        if (fd >= 0)
        {
            _epoll.Add(fd, 1, Epoll.EPOLLIN | Epoll.EPOLLET);
        }
    }

    public void UnregisterPoller(Poller poller)
    {
        AssertCurrent();
        if (!poller.IsRegistered)
        {
            return;
        }

        poller.IsRegistered = false;
        if (poller.InterruptFd >= 0)
        {
            _epoll.Remove(poller.InterruptFd);
            poller.InterruptFd = -1;
        }

        lock (_pollers)
        {
            _pollers.Remove(poller);
        }

        RebuildPollerArrays();
    }

    private void RebuildPollerArrays()
    {
        lock (_pollers)
        {
            _active = _pollers.Where(p => p.PeriodTicks == 0).ToArray();
            _timed = _pollers.Where(p => p.PeriodTicks > 0).ToArray();
        }
    }

    /// <summary>Gets (creating on first use) this reactor's channel to <paramref name="device"/>. Must be called on this reactor.</summary>
    public IoChannel GetIoChannel(IoDevice device)
    {
        AssertCurrent();
        if (_channels.TryGetValue(device, out var ch))
        {
            // A channel whose last reference went (its destruction is queued) is taken back, as SPDK's
            // get_io_channel does: the module never holds two contexts of one device on one thread (a
            // virtio-user channel's queue, say, is still claimed by the first until it is destroyed).
            if (ch.RefCount > 0 || !device.IsUnregistered)
            {
                ch.RefCount++;
                return ch;
            }

            _channels.Remove(device);
        }

        if (device.IsUnregistered)
        {
            throw new InvalidOperationException($"I/O device '{device.Name}' is being unregistered");
        }

        var context = device.CreateChannelContext(this);
        ch = new IoChannel(device, this, context) { RefCount = 1 };
        _channels.Add(device, ch);
        device.AddChannel(ch);
        return ch;
    }

    internal void ReleaseIoChannel(IoChannel ch)
    {
        AssertCurrent();
        if (--ch.RefCount > 0)
        {
            return;
        }

        // Destroy on the next loop iteration, like SPDK's put_io_channel: the caller may be deep inside a
        // completion delivered by this very channel (e.g. releasing it from an I/O callback), and the module
        // must be allowed to finish what it was doing before its context goes away. Until then the channel
        // stays this thread's channel of the device: a GetIoChannel meanwhile takes it back (the queued
        // destruction then does nothing). The device lists the channel until its context is gone, so whoever
        // walks the device's channels (statistics, teardown waits) sees the context while it still exists;
        // walkers skip it by its zero reference count.
        Send(static s =>
        {
            var (reactor, channel) = ((Reactor, IoChannel))s!;
            if (channel.RefCount > 0 || channel.Destroyed)
            {
                return; // taken back, or an earlier queued destruction already ran
            }

            channel.Destroyed = true;
            if (reactor._channels.TryGetValue(channel.Device, out var current) && ReferenceEquals(current, channel))
            {
                reactor._channels.Remove(channel.Device);
            }

            channel.Device.DestroyChannelContext(reactor, channel.Context);
            channel.Device.RemoveChannel(channel);
        }, (this, ch));
    }

    internal void AssertCurrent()
    {
        if (t_current != this)
        {
            throw new InvalidOperationException($"must be called on {Name} (called on thread '{Thread.CurrentThread.Name}')");
        }
    }

    internal void Start()
    {
        Mode = _options.Mode;
        _thread = new Thread(Run) { Name = Name, IsBackground = true };
        _thread.Start();
    }

    internal void RequestStop()
    {
        _stopRequested = true;
        _wakeFd.Signal();
    }

    internal Task Stopped => _stopped.Task;

    private void Run()
    {
        t_current = this;
        ThreadId = Native.GetTid();
        SynchronizationContext.SetSynchronizationContext(new ReactorSynchronizationContext(this));
        if (_options.PinThreads)
        {
            CpuSet.PinCurrentThread(Core);
        }

        long adaptiveTicks = Ticks.FromMicroseconds(_options.AdaptiveIdleMicroseconds);
        long lastWork = Ticks.Now();
        long start = lastWork;
        try
        {
            while (!_stopRequested)
            {
                // One clock read per iteration: the end of one iteration is the start of the next (clock_gettime
                // costs ~40 ns in this kind of VM, and it was half of a poll-mode front end's CPU per I/O).
                Now = start;
                int work = RunOnce(start);
                long end = Ticks.Now();
                if (end - start > _maxIterationTicks)
                {
                    _maxIterationTicks = end - start; // a plain store: readers on other threads get either value
                }

                if (work > 0)
                {
                    BusyTicks += end - start;
                    lastWork = end;
                }
                else
                {
                    IdleTicks += end - start;
                }

                if ((++Iterations & 1023) == 0)
                {
                    AllocatedBytes = GC.GetAllocatedBytesForCurrentThread();
                }

                if (work == 0 && Mode != ReactorMode.Poll && (Mode == ReactorMode.Interrupt || end - lastWork > adaptiveTicks))
                {
                    Sleep(end);
                    lastWork = end = Ticks.Now();
                }

                start = end;
            }

            // Drain messages that were queued before the stop so completions and cleanups still run.
            RunMessages(int.MaxValue);
        }
        finally
        {
            AllocatedBytes = GC.GetAllocatedBytesForCurrentThread();
            t_current = null;
            _stopped.TrySetResult();
        }
    }

    /// <summary>One loop iteration: messages, every-iteration pollers, due timed pollers. Returns work done.</summary>
    private int RunOnce(long now)
    {
        int work = RunMessages(_options.MessageBatch);

        var active = _active;
        for (int i = 0; i < active.Length; i++)
        {
            var p = active[i];
            if (!p.IsRegistered)
            {
                continue;
            }

            int r = p.Fn(p.Context);
            p.RunCount++;
            if (r > 0)
            {
                p.BusyCount++;
                work += r;
            }
        }

        var timed = _timed;
        for (int i = 0; i < timed.Length; i++)
        {
            var p = timed[i];
            if (!p.IsRegistered || now < p.NextRunTicks)
            {
                continue;
            }

            p.NextRunTicks = now + p.PeriodTicks;
            int r = p.Fn(p.Context);
            p.RunCount++;
            if (r > 0)
            {
                p.BusyCount++;
                work += r;
            }
        }

        return work;
    }

    private int RunMessages(int max)
    {
        int n = 0;
        while (n < max && _queue.TryDequeue(out var fn, out var arg))
        {
            Invoke(fn, arg);
            n++;
        }

        while (n < max && !_overflow.IsEmpty && _overflow.TryDequeue(out var m))
        {
            Invoke(m.Fn, m.Arg);
            n++;
        }

        MessagesHandled += n;
        return n;
    }

    private void Invoke(Action<object?> fn, object? arg)
    {
        try
        {
            fn(arg);
        }
        catch (Exception e)
        {
            // A message must never take the reactor down; the owner logs through UnhandledMessageException.
            UnhandledException?.Invoke(this, e);
        }
    }

    /// <summary>Raised (on the reactor) when a message or continuation throws. The host logs it.</summary>
    public static event Action<Reactor, Exception>? UnhandledException;

    private void Sleep(long now)
    {
        // Full fence: publish "sleeping" before re-checking for work (pairs with Send's enqueue-then-read).
        Interlocked.Exchange(ref _sleeping, 1);
        bool pending = !_queue.IsEmpty || !_overflow.IsEmpty || _stopRequested;
        bool fallback = false;
        var active = _active;
        for (int i = 0; i < active.Length; i++)
        {
            var p = active[i];
            if (p.InterruptFn is null)
            {
                fallback = true;
            }
            else if (p.InterruptFn(p.Context, true))
            {
                pending = true;
            }
        }

        if (!pending)
        {
            long timeoutTicks = long.MaxValue;
            foreach (var p in _timed)
            {
                timeoutTicks = Math.Min(timeoutTicks, Math.Max(0, p.NextRunTicks - now));
            }

            if (fallback)
            {
                timeoutTicks = Math.Min(timeoutTicks, Ticks.FromMicroseconds(_options.FallbackPollMicroseconds));
            }

            int timeoutMs = timeoutTicks == long.MaxValue ? 1000 : (int)Math.Min(1000, (timeoutTicks * 1000 + Ticks.Frequency - 1) / Ticks.Frequency);
            Span<ulong> cookies = stackalloc ulong[16];
            SleepCount++;
            long before = Ticks.Now();
            _epoll.Wait(cookies, timeoutMs);
            IdleTicks += Ticks.Now() - before;
        }

        Volatile.Write(ref _sleeping, 0);
        _wakeFd.Drain();
        for (int i = 0; i < active.Length; i++)
        {
            active[i].InterruptFn?.Invoke(active[i].Context, false);
        }
    }

    /// <summary>
    /// The clock (<see cref="Ticks"/>) at the start of the current loop iteration: a free timestamp for
    /// statistics and rate limiting on the reactor (precise to one iteration). Read it on the reactor.
    /// </summary>
    public long Now { get; private set; }

    /// <summary>Changes the mode at runtime (framework_set_scheduler-like control; from any thread).</summary>
    public void SetMode(ReactorMode mode) => Send(static s =>
    {
        var (r, m) = ((Reactor, ReactorMode))s!;
        r.Mode = m;
    }, (this, mode));

    internal void DisposeResources()
    {
        _wakeFd.Dispose();
        _epoll.Dispose();
    }

    public override string ToString() => Name;
}
