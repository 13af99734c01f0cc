using VhostBackend.Bdev;
using VhostBackend.Nvme;
using VhostBackend.Platform;
using VhostBackend.TestShared;
using Xunit;

namespace VhostBackend.BdevNvme.Tests;

/// <summary>
/// An NVMe namespace bdev takes another bdev's I/O in place (<see cref="NvmeBdev.AcceptsForwardedIo"/>): a shift model
/// vbdev (block N = the namespace's N + 64, the shape of an lvol's allocated cluster) over the model controller.
/// </summary>
public sealed partial class NvmeBdevTests
{
    [Fact]
    public async Task ForwardedIoReachesTheNamespaceAtItsOffsetBouncesAndRetriesAcrossAReset()
    {
        await Attach();
        var model = _models[0];
        var ns = (NvmeBdev)_bdevs.Find("Nvme0n1")!;
        Assert.True(ns.AcceptsForwardedIo);
        var baseDesc = _bdevs.Open("Nvme0n1", write: true);
        var shift = new ShiftVbdevModel("S", baseDesc, 64, 1024);
        _bdevs.Register(shift);
        nint heap = Alloc(16384);
        try
        {
            using (var desc = _bdevs.Open("S", write: true))
            {
                // Heap memory (not DMA-able) in three pieces: forwarded, then bounced by the namespace's channel, which
                // counts the bounce on the namespace (not on the forwarding bdev) with the right length.
                Fill(heap, 16384, i => (byte)(i * 13));
                var iovs = new[] { new IoVec(heap + 3, 1000), new IoVec(heap + 2000, 24), new IoVec(heap + 5000, 3072) };
                long bounced = ns.BouncedBytes;
                Assert.True(await Io(desc, _rt.Main, (ch, cb) => ch.Write(desc, iovs, 16, 8, cb, null)));
                Assert.Equal((1, 0), (shift.Forwarded, shift.Regular));
                Assert.False(shift.ModuleStateChanged);
                Assert.Equal(4096, ns.BouncedBytes - bounced);
                Assert.Equal(Read(heap, 3, 1000), DiskBytes(model, (16 + 64) * 512, 1000));
                Assert.Equal(Read(heap, 5000, 3072), DiskBytes(model, ((16 + 64) * 512) + 1024, 3072));

                Fill(heap, 16384, _ => 0);
                Assert.True(await Io(desc, _rt.Main, (ch, cb) => ch.Read(desc, iovs, 16, 8, cb, null)));
                Assert.Equal(DiskBytes(model, (16 + 64) * 512, 1000), Read(heap, 3, 1000));
                Assert.Equal(2, shift.Forwarded);

                // Registered DMA memory: forwarded and zero-copy (the model sees a PRP list into it).
                using var pool = new DmaBufferPool(_space, 2, 65536);
                Assert.True(pool.TryGet(out nint dma, out _));
                Fill(dma, 16384, _ => 0x5A);
                int lists = model.PrpListsSeen;
                bounced = ns.BouncedIos;
                Assert.True(await Io(desc, _rt.Main, (ch, cb) => ch.Write(desc, new[] { new IoVec(dma, 16384) }, 256, 32, cb, null)));
                Assert.Equal(lists + 1, model.PrpListsSeen);
                Assert.Equal(bounced, ns.BouncedIos);
                Assert.All(DiskBytes(model, (256 + 64) * 512, 16384), b => Assert.Equal(0x5A, b));

                // A forwarded write in flight when the controller resets waits in the channel's FIFO with the namespace
                // it was given and is sent again after the reset (the FIFO and the request carry the bdev, not io.Bdev).
                Fill(heap, 4096, _ => 0x42);
                Assert.True(await HeldAcrossReset(model, () => Io(desc, _rt.Main, (ch, cb) => ch.Write(desc, new[] { new IoVec(heap, 4096) }, 40, 8, cb, null))));
                Assert.All(DiskBytes(model, (40 + 64) * 512, 4096), b => Assert.Equal(0x42, b));
                Assert.Equal(4, shift.Forwarded);
                Assert.Equal(0, shift.Regular);
                Assert.False(shift.ModuleStateChanged);

                // Both bdevs' statistics count the forwarded I/O.
                Assert.Equal(3L, ns.GetStats().NumWriteOps);
                Assert.Equal(3L, shift.GetStats().NumWriteOps);
                Assert.Equal(0, model.DmaFaults);
            }
        }
        finally
        {
            await _bdevs.UnregisterAsync(shift);
            baseDesc.Dispose();
            Free(heap);
        }
    }
}
