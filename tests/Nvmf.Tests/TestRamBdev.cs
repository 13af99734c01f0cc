using VhostBackend.Bdev;
using VhostBackend.Platform;
using VhostBackend.Reactors;

namespace VhostBackend.Nvmf.Tests;

/// <summary>
/// A test MODEL bdev: RAM that can leave out native compare (the target emulates it) and can hold its I/O until the
/// test lets it go (an I/O stuck in a bdev). Destruction is recorded.
/// </summary>
public sealed class TestRamBdev : Bdev.Bdev
{
    private readonly AlignedBuffer _data;
    private readonly List<(BdevIo Io, Reactor Reactor)> _held = new();

    public TestRamBdev(string name, ulong blocks, uint blockSize, bool compare)
        : base(name, "Test RAM disk", blockSize, blocks, null)
    {
        _data = new AlignedBuffer((nuint)(blocks * blockSize), 4096, zero: true);
        NativeCompare = compare;
        WriteCache = false;
    }

    public bool NativeCompare { get; }

    /// <summary>While set, I/O is held (not completed) until <see cref="ReleaseHeld"/>.</summary>
    public volatile bool Stall;

    public volatile bool Destructed;

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

    public override bool SupportsIoType(BdevIoType type) => type is not BdevIoType.Compare || NativeCompare;

    protected override IoChannel GetModuleChannel(Reactor reactor) => reactor.GetIoChannel(StatelessDevice.Instance);

    protected override void Submit(IoChannel moduleChannel, BdevIo io)
    {
        if (Stall)
        {
            lock (_held)
            {
                _held.Add((io, Reactor.Current!));
            }

            return;
        }

        Do(io);
    }

    private void Do(BdevIo io)
    {
        nuint offset = (nuint)(io.OffsetBlocks * BlockSize);
        switch (io.Type)
        {
            case BdevIoType.Read:
                _data.CopyTo(offset, io.Iovs);
                break;
            case BdevIoType.Write:
                _data.CopyFrom(offset, io.Iovs);
                break;
            case BdevIoType.Compare:
                if (!IoVecs.SequenceEqual(io.Iovs, _data, offset))
                {
                    io.Complete(BdevIoStatus.Miscompare);
                    return;
                }

                break;
            case BdevIoType.Unmap:
            case BdevIoType.WriteZeroes:
                _data.Clear(offset, (nuint)(io.NumBlocks * BlockSize));
                break;
        }

        io.Complete(BdevIoStatus.Success);
    }

    /// <summary>Completes the held I/O, each on its channel's reactor.</summary>
    public void ReleaseHeld()
    {
        Stall = false;
        List<(BdevIo Io, Reactor Reactor)> held;
        lock (_held)
        {
            held = _held.ToList();
            _held.Clear();
        }

        foreach (var (io, r) in held)
        {
            r.Send(static a =>
            {
                var (b, i) = ((TestRamBdev, BdevIo))a!;
                b.Do(i);
            }, (this, io));
        }
    }

    protected override ValueTask DestructAsync()
    {
        Destructed = true;
        _data.Dispose();
        return ValueTask.CompletedTask;
    }
}
