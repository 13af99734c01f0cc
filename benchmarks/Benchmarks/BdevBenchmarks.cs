using System.Runtime.InteropServices;
using BenchmarkDotNet.Attributes;
using VhostBackend.Bdev;
using VhostBackend.BdevMalloc;
using VhostBackend.BdevNull;
using VhostBackend.Platform;
using VhostBackend.Reactors;

namespace VhostBackend.Benchmarks;

/// <summary>Submit/complete through the bdev layer on one reactor at queue depth 32, 4 KiB, against null and malloc.</summary>
[MemoryDiagnoser]
public unsafe class BdevBenchmarks
{
    private const int Ios = 200_000;
    private ReactorRuntime _rt = null!;
    private BdevManager _bdevs = null!;
    private Loop _null = null!;
    private Loop _malloc = null!;

    [GlobalSetup]
    public void Setup()
    {
        _rt = new ReactorRuntime(CpuSet.Of(CpuSet.Online().Cores[0]), new ReactorOptions { Mode = ReactorMode.Poll, PinThreads = false });
        _rt.Start();
        _bdevs = new BdevManager();
        _bdevs.Register(new NullBdev("Null0", 1 << 24, 512));
        _bdevs.Register(new MallocBdev("Malloc0", 1 << 17, 512));
        _null = new Loop(_rt.Main, _bdevs.Open("Null0", true));
        _malloc = new Loop(_rt.Main, _bdevs.Open("Malloc0", true));
    }

    [GlobalCleanup]
    public void Cleanup() => _rt.DisposeAsync().AsTask().Wait();

    [Benchmark(OperationsPerInvoke = Ios)]
    public void NullRead4K() => _null.Run(Ios, read: true);

    [Benchmark(OperationsPerInvoke = Ios)]
    public void MallocRead4K() => _malloc.Run(Ios, read: true);

    [Benchmark(OperationsPerInvoke = Ios)]
    public void MallocWrite4K() => _malloc.Run(Ios, read: false);

    private sealed class Loop
    {
        private const int Depth = 32;
        private static readonly BdevIoCompletion s_done = static (_, ok, s) => ((Loop)s!).OnDone(ok);
        private static readonly Action<object?> s_start = static s => ((Loop)s!).Start();
        private readonly Reactor _reactor;
        private readonly BdevDesc _desc;
        private readonly IoVec[] _iov;
        private readonly ManualResetEventSlim _done = new();
        private BdevChannel? _ch;
        private int _remaining;
        private int _inflight;
        private bool _read;
        private ulong _lba;

        public Loop(Reactor reactor, BdevDesc desc)
        {
            _reactor = reactor;
            _desc = desc;
            _iov = [new IoVec((nint)NativeMemory.AlignedAlloc(4096, 4096), 4096)];
        }

        public void Run(int n, bool read)
        {
            _remaining = n;
            _read = read;
            _done.Reset();
            _reactor.Send(s_start, this);
            _done.Wait();
        }

        private void Start()
        {
            _ch ??= _desc.GetIoChannel();
            for (int i = 0; i < Depth; i++)
            {
                Submit();
            }
        }

        private void Submit()
        {
            _remaining--;
            _inflight++;
            _lba = (_lba + 8) & 0xFFFF;
            int rc = _read ? _ch!.Read(_desc, _iov, _lba, 8, s_done, this) : _ch!.Write(_desc, _iov, _lba, 8, s_done, this);
            if (rc != 0)
            {
                throw new InvalidOperationException($"submit failed: {rc}");
            }
        }

        private void OnDone(bool ok)
        {
            _inflight--;
            if (_remaining > 0)
            {
                Submit();
            }
            else if (_inflight == 0)
            {
                _done.Set();
            }
        }
    }
}
