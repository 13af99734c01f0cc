using BenchmarkDotNet.Attributes;
using VhostBackend.Platform;
using VhostBackend.Reactors;

namespace VhostBackend.Benchmarks;

/// <summary>Cross-reactor message round trip (reactor 0 → reactor 1 → reactor 0), and a reactor messaging itself.</summary>
[MemoryDiagnoser]
public class MessageBenchmarks
{
    private const int RoundTrips = 100_000;
    private ReactorRuntime _rt = null!;
    private PingPong _pp = null!;

    [GlobalSetup]
    public void Setup()
    {
        var cores = CpuSet.Online().Cores;
        _rt = new ReactorRuntime(CpuSet.Of(cores.Take(2).ToArray()), new ReactorOptions { Mode = ReactorMode.Poll, PinThreads = false });
        _rt.Start();
        _pp = new PingPong(_rt.Reactors[0], _rt.Reactors[^1]);
    }

    [GlobalCleanup]
    public void Cleanup() => _rt.DisposeAsync().AsTask().Wait();

    [Benchmark(OperationsPerInvoke = RoundTrips)]
    public void CrossReactorRoundTrip() => _pp.Run(RoundTrips, cross: true);

    [Benchmark(OperationsPerInvoke = RoundTrips)]
    public void SelfMessage() => _pp.Run(RoundTrips, cross: false);

    private sealed class PingPong
    {
        private static readonly Action<object?> s_ping = static s => ((PingPong)s!).OnPing();
        private static readonly Action<object?> s_pong = static s => ((PingPong)s!).OnPong();
        private readonly Reactor _a;
        private readonly Reactor _b;
        private readonly ManualResetEventSlim _done = new();
        private int _remaining;
        private bool _cross;

        public PingPong(Reactor a, Reactor b)
        {
            _a = a;
            _b = b;
        }

        public void Run(int n, bool cross)
        {
            _remaining = n;
            _cross = cross;
            _done.Reset();
            _a.Send(s_pong, this);
            _done.Wait();
        }

        private void OnPing() => _a.Send(s_pong, this);

        private void OnPong()
        {
            if (--_remaining <= 0)
            {
                _done.Set();
                return;
            }

            if (_cross)
            {
                _b.Send(s_ping, this);
            }
            else
            {
                _a.Send(s_pong, this);
            }
        }
    }
}
