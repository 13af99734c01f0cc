using Microsoft.Extensions.Logging.Abstractions;
using VhostBackend.Bdev;
using VhostBackend.BdevMalloc;
using VhostBackend.BdevRaid;
using VhostBackend.BdevSplit;
using VhostBackend.Platform;
using VhostBackend.Reactors;
using VhostBackend.Rpc;

namespace VhostBackend.BdevRaid.Tests;

/// <summary>
/// Started reactors, a bdev manager with the split and raid modules hosted as the App's AddBdevModule does, and
/// I/O helpers that run on a reactor (copied from tests/Bdev.Tests' BdevTestKit, not referenced).
/// </summary>
internal sealed class RaidTestKit : IAsyncDisposable
{
    public RaidTestKit(int reactors = 1, uint windowKb = 1024)
    {
        var online = CpuSet.Online().Cores;
        Runtime = new ReactorRuntime(CpuSet.Of(online.Take(Math.Min(reactors, online.Count)).ToArray()), new ReactorOptions { Mode = ReactorMode.Poll, PinThreads = false });
        Runtime.Start();
        var context = new BdevModuleContext(Bdevs, Runtime, Rpc, new SubsystemRegistry(), NullLoggerFactory.Instance);
        Split = new SplitBdevModule();
        Raid = new RaidBdevModule { ProcessWindowSizeKb = windowKb };
        Bdevs.AddModule(Split);
        Split.Init(context);
        Bdevs.AddModule(Raid);
        Raid.Init(context);
    }

    public ReactorRuntime Runtime { get; }
    public BdevManager Bdevs { get; } = new();
    public RpcRegistry Rpc { get; } = new();
    public SplitBdevModule Split { get; }
    public RaidBdevModule Raid { get; }
    public Reactor Main => Runtime.Main;
    public Reactor Other => Runtime.Reactors[^1];

    public async ValueTask DisposeAsync()
    {
        await Raid.FiniAsync();
        await Runtime.DisposeAsync();
    }

    public MallocBdev Malloc(string name, ulong blocks, uint blockSize = 512)
    {
        var m = new MallocBdev(name, blocks, blockSize);
        Bdevs.Register(m);
        return m;
    }

    /// <summary>Runs an async control operation on the main reactor (where the RPC handlers run) and waits for it.</summary>
    public Task OnMain(Func<Task> f) => Main.InvokeAsync(async () =>
    {
        await f();
        return 0;
    });

    public Task<RaidArray> CreateRaid(string name, RaidLevel level, uint stripKb, params string[] bases) =>
        Main.InvokeAsync(() => Raid.CreateAsync(name, level, stripKb, bases, null));

    /// <summary>Waits (bounded) until <paramref name="cond"/> holds.</summary>
    public static async Task Until(Func<bool> cond, string what, int ms = 10_000)
    {
        var end = DateTime.UtcNow.AddMilliseconds(ms);
        while (!cond())
        {
            if (DateTime.UtcNow > end)
            {
                throw new TimeoutException("timed out waiting for " + what);
            }

            await Task.Delay(5);
        }
    }

    /// <summary>Runs one I/O on <paramref name="on"/> (main by default) and returns (submit rc, success).</summary>
    public Task<(int Rc, bool Success)> Io(BdevDesc desc, Func<BdevChannel, BdevIoCompletion, int> submit, Reactor? on = null) =>
        (on ?? Main).InvokeAsync(async () =>
        {
            var ch = desc.GetIoChannel();
            var tcs = new TaskCompletionSource<bool>(TaskCreationOptions.RunContinuationsAsynchronously);
            int rc = submit(ch, (io, ok, _) => tcs.SetResult(ok));
            bool ok = rc == 0 && await tcs.Task;
            BdevDesc.PutIoChannel(ch);
            return (rc, ok);
        });

    public async Task<bool> Write(BdevDesc desc, ulong lba, byte[] data, Reactor? on = null)
    {
        using var buf = new AlignedBuffer((nuint)data.Length);
        data.CopyTo(buf.AsSpan(0, data.Length));
        var iov = new[] { buf.ToIoVec() };
        var (rc, ok) = await Io(desc, (ch, cb) => ch.Write(desc, iov, lba, (ulong)data.Length / desc.Bdev.BlockSize, cb, null), on);
        Assert.Equal(0, rc);
        return ok;
    }

    public async Task<byte[]> Read(BdevDesc desc, ulong lba, ulong blocks)
    {
        int len = (int)(blocks * desc.Bdev.BlockSize);
        using var buf = new AlignedBuffer((nuint)len);
        var iov = new[] { buf.ToIoVec() };
        var (rc, ok) = await Io(desc, (ch, cb) => ch.Read(desc, iov, lba, blocks, cb, null));
        Assert.Equal(0, rc);
        Assert.True(ok, $"read of {blocks} blocks at {lba} from {desc.Bdev.Name} failed");
        return buf.AsSpan(0, len).ToArray();
    }

    /// <summary>Every block filled with its own number (and a tag), so a misplaced block is recognised.</summary>
    public static byte[] Pattern(ulong firstLba, ulong blocks, uint blockSize, byte tag)
    {
        var data = new byte[blocks * blockSize];
        for (ulong b = 0; b < blocks; b++)
        {
            var span = data.AsSpan((int)(b * blockSize), (int)blockSize);
            span.Fill(tag);
            BitConverter.TryWriteBytes(span, firstLba + b);
        }

        return data;
    }

    public static ulong BlockTag(byte[] data, ulong block, uint blockSize) => BitConverter.ToUInt64(data, (int)(block * blockSize));
}

/// <summary>
/// A test model of a disk (not a product module): RAM-backed, completes on the next message, and can be told to fail
/// reads or writes, to hold I/O until released, and to have a tiny I/O pool (so its callers see -ENOMEM).
/// </summary>
internal sealed class FlakyDiskModel : Bdev.Bdev, IDisposable
{
    private readonly AlignedBuffer _data;
    private readonly Device _device = new();
    private readonly List<BdevIo> _held = new();

    public FlakyDiskModel(string name, ulong blocks, uint blockSize = 512, int pool = 1024)
        : base(name, "Flaky disk model", blockSize, blocks)
    {
        _data = new AlignedBuffer((nuint)(blocks * blockSize));
        IoPoolSize = pool;
    }

    public volatile bool FailReads;
    public volatile bool FailWrites;
    public volatile bool Hold;

    /// <summary>Holds only the writes submitted on this reactor (until <see cref="Release"/>).</summary>
    public volatile Reactor? HoldWritesOn;
    public int Reads;
    public int Writes;
    public int MaxInFlight;
    private int _inFlight;

    public override bool SupportsIoType(BdevIoType type) => type is not BdevIoType.Compare;

    protected override IoChannel GetModuleChannel(Reactor reactor) => reactor.GetIoChannel(_device);

    protected override void Submit(IoChannel moduleChannel, BdevIo io)
    {
        MaxInFlight = Math.Max(MaxInFlight, Interlocked.Increment(ref _inFlight));
        if (Hold || (io.Type == BdevIoType.Write && HoldWritesOn is { } r && r == moduleChannel.Reactor))
        {
            lock (_held)
            {
                _held.Add(io);
            }

            return;
        }

        moduleChannel.Reactor.Send(static s => ((FlakyDiskModel)((BdevIo)s!).Bdev).Do((BdevIo)s!), io);
    }

    /// <summary>Completes the held I/O (on their reactor).</summary>
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

    public void Release()
    {
        Hold = false;
        HoldWritesOn = null;
        BdevIo[] held;
        lock (_held)
        {
            held = _held.ToArray();
            _held.Clear();
        }

        foreach (var io in held)
        {
            io.Channel.Reactor.Send(static s => ((FlakyDiskModel)((BdevIo)s!).Bdev).Do((BdevIo)s!), io);
        }
    }

    private void Do(BdevIo io)
    {
        Interlocked.Decrement(ref _inFlight);
        nuint offset = (nuint)(io.OffsetBlocks * BlockSize);
        switch (io.Type)
        {
            case BdevIoType.Read:
                Interlocked.Increment(ref Reads);
                if (FailReads)
                {
                    io.Complete(BdevIoStatus.Failed);
                    return;
                }

                _data.CopyTo(offset, io.Iovs);
                break;
            case BdevIoType.Write:
                Interlocked.Increment(ref Writes);
                if (FailWrites)
                {
                    io.Complete(BdevIoStatus.Failed);
                    return;
                }

                _data.CopyFrom(offset, io.Iovs);
                break;
            case BdevIoType.Unmap:
            case BdevIoType.WriteZeroes:
                _data.Clear(offset, (nuint)(io.NumBlocks * BlockSize));
                break;
        }

        io.Complete(BdevIoStatus.Success);
    }

    public void Dispose() => _data.Dispose();

    private sealed class Device : IoDevice
    {
        public Device()
            : base("flaky")
        {
        }

        protected override object CreateChannelContext(Reactor reactor) => this;

        protected override void DestroyChannelContext(Reactor reactor, object context)
        {
        }
    }
}
