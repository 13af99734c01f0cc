using System.Runtime.InteropServices;
using System.Text.Json.Nodes;
using VhostBackend.Reactor;

namespace VhostBackend.Bdev.Modules;

/// <summary>bdev_malloc: a RAM disk. Memory is allocated zeroed up front and freed when the bdev is destroyed.</summary>
public sealed unsafe class MallocBdev : Bdev
{
    private byte* _data;
    private readonly nuint _size;

    public MallocBdev(string name, ulong numBlocks, uint blockSize, Guid? uuid = null)
        : base(name, "Malloc disk", blockSize, numBlocks, uuid)
    {
        _size = checked((nuint)checked(numBlocks * blockSize));
        _data = (byte*)NativeMemory.AlignedAlloc(_size, 4096);
        NativeMemory.Clear(_data, _size);
        WriteCache = false;
    }

    public override bool SupportsIoType(BdevIoType type) => true;

    protected internal override IoChannel GetModuleChannel(Reactor.Reactor reactor) => reactor.GetIoChannel(StatelessDevice.Instance);

    protected internal override void Submit(IoChannel moduleChannel, BdevIo io)
    {
        // SAFETY: the bdev layer checked offset + length against BlockCount, and iovecs sum to the length.
        byte* p = _data + io.OffsetBlocks * BlockSize;
        switch (io.Type)
        {
            case BdevIoType.Read:
                foreach (var v in io.Iovs)
                {
                    Buffer.MemoryCopy(p, (void*)v.Base, (long)v.Length, (long)v.Length);
                    p += v.Length;
                }

                break;
            case BdevIoType.Write:
                foreach (var v in io.Iovs)
                {
                    Buffer.MemoryCopy((void*)v.Base, p, (long)v.Length, (long)v.Length);
                    p += v.Length;
                }

                break;
            case BdevIoType.Compare:
                foreach (var v in io.Iovs)
                {
                    if (!new ReadOnlySpan<byte>(p, checked((int)v.Length)).SequenceEqual(new ReadOnlySpan<byte>((void*)v.Base, (int)v.Length)))
                    {
                        io.Complete(BdevIoStatus.Miscompare);
                        return;
                    }

                    p += v.Length;
                }

                break;
            case BdevIoType.Unmap:
            case BdevIoType.WriteZeroes:
                NativeMemory.Clear(p, (nuint)(io.NumBlocks * BlockSize));
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

    protected internal override ValueTask DestructAsync()
    {
        var p = _data;
        _data = null;
        if (p != null)
        {
            NativeMemory.AlignedFree(p);
        }

        return ValueTask.CompletedTask;
    }
}
