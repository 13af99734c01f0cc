using System.Text.Json.Nodes;
using VhostBackend.Bdev;
using VhostBackend.Reactors;

namespace VhostBackend.BdevNull;

/// <summary>bdev_null: discards writes, returns reads without touching the buffers (SPDK's null bdev behaviour).</summary>
public sealed class NullBdev : Bdev.Bdev
{
    public NullBdev(string name, ulong numBlocks, uint blockSize, Guid? uuid = null)
        : base(name, "Null disk", blockSize, numBlocks, uuid)
    {
    }

    public override bool SupportsIoType(BdevIoType type) => type is not BdevIoType.Compare;

    protected override IoChannel GetModuleChannel(Reactor reactor) => reactor.GetIoChannel(StatelessDevice.Instance);

    protected override void Submit(IoChannel moduleChannel, BdevIo io) => io.Complete(BdevIoStatus.Success);

    /// <summary>Submit touches nothing of the I/O but its completion: a vbdev may forward its own I/O here.</summary>
    public override bool AcceptsForwardedIo => true;

    public void Resize(ulong numBlocks) => SetBlockCount(numBlocks);

    public override JsonObject ConfigCall() => VhostBackend.Rpc.Subsystem.Call("bdev_null_create", new JsonObject
    {
        ["name"] = Name,
        ["num_blocks"] = BlockCount,
        ["block_size"] = BlockSize,
        ["uuid"] = Uuid.ToString(),
    });
}
