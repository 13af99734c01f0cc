using System.Text.Json.Nodes;
using VhostBackend.Bdev;
using VhostBackend.Platform;
using VhostBackend.Reactors;

namespace VhostBackend.BdevMalloc;

/// <summary>bdev_malloc: a RAM disk. Memory is allocated zeroed up front and freed when the bdev is destroyed.</summary>
public sealed class MallocBdev : Bdev.Bdev
{
    private readonly AlignedBuffer _data;

    public MallocBdev(string name, ulong numBlocks, uint blockSize, Guid? uuid = null)
        : base(name, "Malloc disk", blockSize, numBlocks, uuid)
    {
        SizeBytes = checked((nuint)checked(numBlocks * blockSize));
        _data = new AlignedBuffer(SizeBytes, 4096, zero: true);
        WriteCache = false;
    }

    /// <summary>Bytes of memory the disk holds.</summary>
    public nuint SizeBytes { get; }

    public override bool SupportsIoType(BdevIoType type) => true;

    /// <summary>Submit reads only the I/O's type, range and iovecs (checked by the layer or by
    /// <see cref="BdevChannel.TryForward"/>): a vbdev may forward its own I/O here.</summary>
    public override bool AcceptsForwardedIo => true;

    protected override IoChannel GetModuleChannel(Reactor reactor) => reactor.GetIoChannel(StatelessDevice.Instance);

    protected override void Submit(IoChannel moduleChannel, BdevIo io)
    {
        // The bdev layer checked offset + length against BlockCount and that the iovecs sum to the length; the
        // buffer checks its bounds again.
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

    public override JsonObject ConfigCall() => VhostBackend.Rpc.Subsystem.Call("bdev_malloc_create", new JsonObject
    {
        ["name"] = Name,
        ["num_blocks"] = BlockCount,
        ["block_size"] = BlockSize,
        ["uuid"] = Uuid.ToString(),
    });

    protected override ValueTask DestructAsync()
    {
        _data.Dispose();
        return ValueTask.CompletedTask;
    }
}
