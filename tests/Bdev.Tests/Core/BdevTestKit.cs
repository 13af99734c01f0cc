using System.Runtime.InteropServices;
using VhostBackend.Platform;
using VhostBackend.Reactors;

namespace VhostBackend.Bdev.Tests.Core;

/// <summary>A started reactor runtime plus a bdev manager for bdev-layer tests.</summary>
internal sealed class BdevTestKit : IAsyncDisposable
{
    public BdevTestKit(int reactors = 1)
    {
        var online = CpuSet.Online().Cores;
        Runtime = new ReactorRuntime(CpuSet.Of(online.Take(reactors).ToArray()), new ReactorOptions { Mode = ReactorMode.Poll, PinThreads = false });
        Runtime.Start();
    }

    public ReactorRuntime Runtime { get; }
    public BdevManager Bdevs { get; } = new();
    public Reactor Main => Runtime.Main;

    public ValueTask DisposeAsync() => Runtime.DisposeAsync();

    /// <summary>Runs one I/O on the main reactor and returns (submit rc, success).</summary>
    public Task<(int Rc, bool Success)> Io(BdevDesc desc, Func<BdevChannel, BdevIoCompletion, int> submit) =>
        Main.InvokeAsync(async () =>
        {
            var ch = desc.GetIoChannel();
            var tcs = new TaskCompletionSource<bool>();
            int rc = submit(ch, (io, ok, _) => tcs.SetResult(ok));
            bool ok = rc == 0 && await tcs.Task;
            BdevDesc.PutIoChannel(ch);
            return (rc, ok);
        });
}

/// <summary>Native buffer for tests: owns memory, hands out IoVecs (optionally at odd offsets).</summary>
internal sealed unsafe class NativeBuffer : IDisposable
{
    public NativeBuffer(int size, int alignment = 4096)
    {
        Size = size;
        Ptr = (nint)NativeMemory.AlignedAlloc((nuint)size + 4096, (nuint)alignment);
    }

    public nint Ptr { get; }
    public int Size { get; }
    public Span<byte> Span => new((void*)Ptr, Size + 4096);

    public IoVec[] Split(int offset, params int[] lengths)
    {
        var list = new IoVec[lengths.Length];
        int pos = offset;
        for (int i = 0; i < lengths.Length; i++)
        {
            list[i] = new IoVec(Ptr + pos, (nuint)lengths[i]);
            pos += lengths[i];
        }

        return list;
    }

    public void Dispose() => NativeMemory.AlignedFree((void*)Ptr);
}

/// <summary>A test module (a model, not a real device): records what the module layer receives, completes on the next message.</summary>
internal sealed class RecordingBdev : Bdev
{
    private readonly TestDevice _device = new();

    public RecordingBdev(string name, uint blockSize, ulong blocks, uint maxTransfer = 0, uint boundary = 0, uint alignment = 1, int pool = 1024)
        : base(name, "Recording", blockSize, blocks)
    {
        MaxTransferBlocks = maxTransfer;
        OptimalIoBoundaryBlocks = boundary;
        RequiredAlignment = alignment;
        IoPoolSize = pool;
    }

    public List<(BdevIoType Type, ulong Offset, ulong Blocks, IoVec[] Iovs)> Seen { get; } = new();
    public bool CompleteInline { get; set; }
    public bool Hold { get; set; }
    public List<BdevIo> Held { get; } = new();
    public BdevIoStatus Result { get; set; } = BdevIoStatus.Success;

    public override bool SupportsIoType(BdevIoType type) => true;

    protected internal override IoChannel GetModuleChannel(Reactor reactor) => reactor.GetIoChannel(_device);

    protected internal override void Submit(IoChannel moduleChannel, BdevIo io)
    {
        lock (Seen)
        {
            Seen.Add((io.Type, io.OffsetBlocks, io.NumBlocks, io.Iovs.ToArray()));
        }

        if (Hold)
        {
            Held.Add(io);
            return;
        }

        if (CompleteInline)
        {
            io.Complete(Result);
            return;
        }

        moduleChannel.Reactor.Send(static s => { var (io, r) = ((BdevIo, BdevIoStatus))s!; io.Complete(r); }, (io, Result));
    }

    public void Resize(ulong blocks) => SetBlockCount(blocks);

    private sealed class TestDevice : IoDevice
    {
        public TestDevice()
            : base("recording")
        {
        }

        protected override object CreateChannelContext(Reactor reactor) => this;

        protected override void DestroyChannelContext(Reactor reactor, object context)
        {
        }
    }
}
