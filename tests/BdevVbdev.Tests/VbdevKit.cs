using Microsoft.Extensions.Logging.Abstractions;
using VhostBackend.Bdev;
using VhostBackend.BdevDelay;
using VhostBackend.BdevError;
using VhostBackend.BdevMalloc;
using VhostBackend.BdevPassthru;
using VhostBackend.Platform;
using VhostBackend.Reactors;
using VhostBackend.Rpc;

namespace VhostBackend.BdevVbdev.Tests;

/// <summary>
/// A started reactor runtime, a bdev manager and the three vbdev modules hosted as the App's AddBdevModule does
/// (adapted from tests/Bdev.Tests' BdevTestKit).
/// </summary>
internal sealed class VbdevKit : IAsyncDisposable
{
    public VbdevKit()
    {
        var online = CpuSet.Online().Cores;
        Runtime = new ReactorRuntime(CpuSet.Of(online.Take(1).ToArray()), new ReactorOptions { Mode = ReactorMode.Poll, PinThreads = false });
        Runtime.Start();
        foreach (var m in new BdevModule[] { Passthru, Delay, Error })
        {
            Bdevs.AddModule(m);
            m.Init(new BdevModuleContext(Bdevs, Runtime, Rpc, Subsystems, NullLoggerFactory.Instance));
        }
    }

    public ReactorRuntime Runtime { get; }
    public BdevManager Bdevs { get; } = new();
    public RpcRegistry Rpc { get; } = new();
    public SubsystemRegistry Subsystems { get; } = new();
    public PassthruBdevModule Passthru { get; } = new();
    public DelayBdevModule Delay { get; } = new();
    public ErrorBdevModule Error { get; } = new();
    public Reactor Main => Runtime.Main;

    public ValueTask DisposeAsync() => Runtime.DisposeAsync();

    /// <summary>A malloc base of 1024 blocks of 512 bytes.</summary>
    public MallocBdev AddMalloc(string name = "M")
    {
        var m = new MallocBdev(name, 1024, 512);
        Bdevs.Register(m);
        return m;
    }

    /// <summary>Creates the module's vbdev on <paramref name="baseName"/> (zero latencies for delay) and returns its name.</summary>
    public string CreateVbdev(string module, string baseName, ulong latencyUs = 0)
    {
        switch (module)
        {
            case "passthru":
                Passthru.Create("PT_" + baseName, baseName, null);
                return "PT_" + baseName;
            case "delay":
                Delay.Create("DL_" + baseName, baseName, null, new DelayLatencies(latencyUs, latencyUs, latencyUs, latencyUs));
                return "DL_" + baseName;
            default:
                Error.Create(baseName, null);
                return ErrorBdevModule.VbdevName(baseName);
        }
    }

    public Task<bool> DeleteVbdevAsync(string module, string name) => module switch
    {
        "passthru" => Passthru.DeleteAsync(name),
        "delay" => Delay.DeleteAsync(name),
        _ => Error.DeleteAsync(name),
    };

    /// <summary>Runs one I/O on the main reactor; returns the submit rc and the status the submitter saw.</summary>
    public Task<(int Rc, BdevIoStatus Status)> Io(BdevDesc desc, Func<BdevChannel, BdevIoCompletion, int> submit) =>
        Main.InvokeAsync(async () =>
        {
            var ch = desc.GetIoChannel();
            var tcs = new TaskCompletionSource<BdevIoStatus>(TaskCreationOptions.RunContinuationsAsynchronously);
            int rc = submit(ch, (io, _, _) => tcs.SetResult(io.Status));
            var status = rc == 0 ? await tcs.Task : BdevIoStatus.Pending;
            BdevDesc.PutIoChannel(ch);
            return (rc, status);
        });

    /// <summary>Starts I/Os on the main reactor and returns their completions (status) without waiting for them.</summary>
    public async Task<Task<BdevIoStatus>[]> Start(BdevDesc desc, int count, Func<BdevChannel, int, BdevIoCompletion, int> submit)
    {
        var tasks = new TaskCompletionSource<BdevIoStatus>[count];
        for (int i = 0; i < count; i++)
        {
            tasks[i] = new TaskCompletionSource<BdevIoStatus>(TaskCreationOptions.RunContinuationsAsynchronously);
        }

        await Main.InvokeAsync(() =>
        {
            var ch = desc.GetIoChannel();
            for (int i = 0; i < count; i++)
            {
                var tcs = tasks[i];
                int rc = submit(ch, i, (io, _, _) => tcs.SetResult(io.Status));
                if (rc != 0)
                {
                    throw new InvalidOperationException($"submit {i} failed: {rc}");
                }
            }

            // The channel stays referenced by the I/Os' own channel while they run; released when the last completes.
            int left = count;
            foreach (var t in tasks)
            {
                t.Task.ContinueWith(_ =>
                {
                    if (Interlocked.Decrement(ref left) == 0)
                    {
                        Main.Send(c => BdevDesc.PutIoChannel((BdevChannel)c!), ch);
                    }
                }, TaskScheduler.Default);
            }
        });
        return tasks.Select(t => t.Task).ToArray();
    }
}

/// <summary>A page-aligned native buffer for test I/O (Platform's AlignedBuffer: no unsafe code here).</summary>
internal sealed class TestBuffer : IDisposable
{
    private readonly AlignedBuffer _buf;

    public TestBuffer(int size)
    {
        _buf = new AlignedBuffer((nuint)size);
        Size = size;
    }

    public int Size { get; }

    public Span<byte> Span => _buf.AsSpan(0, Size);

    public IoVec[] Iov(int offset, params int[] lengths)
    {
        var list = new IoVec[lengths.Length];
        int pos = offset;
        for (int i = 0; i < lengths.Length; i++)
        {
            list[i] = _buf.ToIoVec((nuint)pos, (nuint)lengths[i]);
            pos += lengths[i];
        }

        return list;
    }

    public IoVec[] Whole() => Iov(0, Size);

    public void Dispose() => _buf.Dispose();
}

/// <summary>
/// A base bdev model (not a product module) that holds every I/O until <see cref="ReleaseAll"/>, so a test can remove
/// the base with I/O in flight at the base.
/// </summary>
internal sealed class HoldingBdev : Bdev.Bdev
{
    private readonly Device _device = new();
    private readonly List<BdevIo> _held = new();

    public HoldingBdev(string name, int pool = 1024)
        : base(name, "Holding", 512, 1024) => IoPoolSize = pool;

    /// <summary>The offsets of the I/Os in the order they arrived.</summary>
    public List<ulong> Offsets { get; } = new();

    public int HeldCount
    {
        get
        {
            lock (_held)
            {
                return _held.Count;
            }
        }
    }

    public override bool SupportsIoType(BdevIoType type) => true;

    /// <summary>Completes every held I/O successfully (call on the reactor that submitted them).</summary>
    public void ReleaseAll()
    {
        BdevIo[] ios;
        lock (_held)
        {
            ios = _held.ToArray();
            _held.Clear();
        }

        foreach (var io in ios)
        {
            io.Complete(BdevIoStatus.Success);
        }
    }

    protected override IoChannel GetModuleChannel(Reactor reactor) => reactor.GetIoChannel(_device);

    protected override void Submit(IoChannel moduleChannel, BdevIo io)
    {
        lock (_held)
        {
            _held.Add(io);
            Offsets.Add(io.OffsetBlocks);
        }
    }

    private sealed class Device : IoDevice
    {
        public Device()
            : base("holding")
        {
        }

        protected override object CreateChannelContext(Reactor reactor) => this;

        protected override void DestroyChannelContext(Reactor reactor, object context)
        {
        }
    }
}
