using System.Runtime.CompilerServices;
using VhostBackend.Platform;
using Xunit;

namespace VhostBackend.Reactors.Tests;

public class ReactorTests
{
    [Fact]
    public async Task Send_Runs_On_The_Reactor_Thread_After_Send_Returns()
    {
        await using var rt = TestRuntime.Start(2);
        foreach (var r in rt.Reactors)
        {
            var (onReactor, ranInline) = await r.InvokeAsync(() =>
            {
                bool ran = false;
                r.Send(_ => ran = true, null); // to itself: must not run inline
                return (Reactor.Current == r, ran);
            });
            Assert.True(onReactor);
            Assert.False(ranInline);
        }
    }

    [Fact]
    public async Task Messages_From_Many_Threads_Are_All_Delivered()
    {
        await using var rt = TestRuntime.Start(1);
        var r = rt.Main;
        long count = 0;
        var threads = Enumerable.Range(0, 4).Select(_ => new Thread(() =>
        {
            for (int i = 0; i < 20_000; i++)
            {
                r.Send(static c => ((StrongBox<long>)c!).Value++, counter);
            }
        })).ToList();
        threads.ForEach(t => t.Start());
        threads.ForEach(t => t.Join());
        Assert.True(await TestRuntime.WaitUntil(() => Volatile.Read(ref counter.Value) == 80_000));
        count = await r.InvokeAsync(() => counter.Value);
        Assert.Equal(80_000, count);
    }

    private static readonly StrongBox<long> counter = new();

    [Fact]
    public async Task Pollers_Run_Until_Unregistered_And_Timed_Pollers_Run_Less_Often()
    {
        await using var rt = TestRuntime.Start(1);
        var r = rt.Main;
        int fast = 0, slow = 0;
        var (pf, ps) = await r.InvokeAsync(() => (
            r.RegisterPoller("fast", _ => { fast++; return 0; }, null),
            r.RegisterPoller("slow", _ => { slow++; return 1; }, null, periodMicroseconds: 10_000)));
        Assert.True(await TestRuntime.WaitUntil(() => Volatile.Read(ref slow) >= 3));
        await r.InvokeAsync(() => r.UnregisterPoller(pf));
        int fastAfter = await r.InvokeAsync(() => fast);
        await Task.Delay(50);
        Assert.Equal(fastAfter, await r.InvokeAsync(() => fast));
        Assert.True(fastAfter > slow * 10, $"every-iteration poller ran {fastAfter} times, 10 ms poller {slow}");
        Assert.Equal(ps.RunCount, ps.BusyCount);
        Assert.Contains(r.Pollers, p => p.Name == "slow");
        Assert.DoesNotContain(r.Pollers, p => p.Name == "fast");
    }

    [Fact]
    public async Task RegisterPoller_Off_Reactor_Throws()
    {
        await using var rt = TestRuntime.Start(1);
        Assert.Throws<InvalidOperationException>(() => rt.Main.RegisterPoller("x", _ => 0, null));
    }

    [Fact]
    public async Task Interrupt_Mode_Sleeps_When_Idle_And_Wakes_On_Message()
    {
        await using var rt = TestRuntime.Start(1, ReactorMode.Interrupt);
        var r = rt.Main;
        Assert.True(await TestRuntime.WaitUntil(() => r.IsInInterrupt), "reactor never went to sleep");
        long busyBefore = r.BusyTicks + r.IdleTicks;
        for (int i = 0; i < 20; i++)
        {
            Assert.True(r.IsInInterrupt || await TestRuntime.WaitUntil(() => r.IsInInterrupt));
            // Measured from the send to the message running on the reactor: the reactor's wake-up, not how long
            // the thread pool takes to resume this test (other test classes run in parallel on 2 cores).
            long sent = Ticks.Now();
            long ran = await r.InvokeAsync(static () => Ticks.Now());
            double ms = Ticks.ToMicroseconds(ran - sent) / 1000;
            Assert.True(ms < 500, $"wake-up took {ms:F1} ms");
        }

        Assert.True(r.SleepCount >= 20);
    }

    [Fact]
    public async Task Adaptive_Mode_Wakes_On_Poller_Fd()
    {
        await using var rt = TestRuntime.Start(1, ReactorMode.Adaptive);
        var r = rt.Main;
        using var fd = new EventFd();
        int handled = 0;
        await r.InvokeAsync(() =>
        {
            var p = r.RegisterPoller("fd", _ => fd.Drain() ? ++handled : 0, null);
            r.SetPollerInterrupt(p, fd.Fd, static (_, _) => false);
        });
        Assert.True(await TestRuntime.WaitUntil(() => r.IsInInterrupt), "adaptive reactor never slept");
        fd.Signal();
        Assert.True(await TestRuntime.WaitUntil(() => Volatile.Read(ref handled) == 1), "fd did not wake the reactor");
    }

    [Fact]
    public async Task ForEachReactor_Visits_All_Then_Completes_On_Origin()
    {
        await using var rt = TestRuntime.Start(2);
        var visited = new List<int>();
        var doneOn = await rt.Main.InvokeAsync(async () =>
        {
            var tcs = new TaskCompletionSource<Reactor?>();
            rt.ForEachReactor(r =>
            {
                Assert.Same(r, Reactor.Current);
                lock (visited)
                {
                    visited.Add(r.Id);
                }
            }, () => tcs.SetResult(Reactor.Current));
            return await tcs.Task;
        });
        Assert.Same(rt.Main, doneOn);
        Assert.Equal(rt.Reactors.Select(r => r.Id), visited);
    }

    [Fact]
    public async Task Stats_Count_Busy_Idle_And_Iterations()
    {
        await using var rt = TestRuntime.Start(1);
        var r = rt.Main;
        await r.InvokeAsync(() => r.RegisterPoller("busy", _ => 1, null));
        Assert.True(await TestRuntime.WaitUntil(() => r.Iterations > 1000 && r.BusyTicks > 0));
        Assert.True(r.MessagesHandled >= 1);
    }

    [Fact]
    public async Task Unhandled_Exception_In_Message_Does_Not_Kill_Reactor()
    {
        await using var rt = TestRuntime.Start(1);
        Exception? seen = null;
        Action<Reactor, Exception> handler = (_, e) => seen = e;
        Reactor.UnhandledException += handler;
        try
        {
            rt.Main.Send(_ => throw new InvalidOperationException("boom"), null);
            Assert.Equal(7, await rt.Main.InvokeAsync(() => 7));
            Assert.True(await TestRuntime.WaitUntil(() => seen is not null));
        }
        finally
        {
            Reactor.UnhandledException -= handler;
        }
    }

    [Fact]
    public async Task Steady_State_Self_Messages_Allocate_Nothing()
    {
        await using var rt = TestRuntime.Start(1);
        var r = rt.Main;
        var state = new PingState(r);
        long allocated = await r.InvokeAsync(async () =>
        {
            state.Remaining = 10_000;
            await state.Run(); // warm-up
            state.Remaining = 200_000;
            var run = state.Prepare();
            long before = GC.GetAllocatedBytesForCurrentThread();
            state.Start();
            await run;
            return state.Allocated - before;
        });

        // Steady state: nothing per message. A one-off of a few dozen bytes (tiered JIT bookkeeping) is not per message.
        Assert.True(allocated < 200_000 / 1000, $"{allocated} bytes over 200k messages");
    }

    private sealed class PingState
    {
        private static readonly Action<object?> s_ping = static s => ((PingState)s!).Ping();
        private readonly Reactor _r;
        private TaskCompletionSource? _done;

        public PingState(Reactor r) => _r = r;

        public int Remaining;
        public long Allocated;

        public Task Run()
        {
            var t = Prepare();
            Start();
            return t;
        }

        public Task Prepare()
        {
            _done = new TaskCompletionSource();
            return _done.Task;
        }

        public void Start() => _r.Send(s_ping, this);

        private void Ping()
        {
            if (--Remaining > 0)
            {
                _r.Send(s_ping, this);
                return;
            }

            Allocated = GC.GetAllocatedBytesForCurrentThread(); // read before completing the task (which allocates)
            _done!.SetResult();
        }
    }
}
