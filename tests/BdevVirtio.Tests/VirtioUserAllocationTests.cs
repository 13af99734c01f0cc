using VhostBackend.Bdev;
using VhostBackend.BdevMalloc;
using VhostBackend.Platform;
using VhostBackend.Vhost;
using Xunit;

namespace VhostBackend.BdevVirtio.Tests;

/// <summary>
/// The virtio-user data path allocates nothing in steady state (<see cref="VirtioUserChannel"/>: slots, waiting FIFO,
/// used-ring polling; blk and scsi request formats), measured on the reactor that submits and reaps, through our own
/// vhost-user back end in process (bounced buffers: the I/O buffer is not in the shared arena).
/// </summary>
public sealed partial class VirtioUserEndToEndTests
{
    [Theory]
    [InlineData(VirtioDevType.Blk)]
    [InlineData(VirtioDevType.Scsi)]
    public async Task SteadyStateIoAllocatesNothing(VirtioDevType type)
    {
        var bdevs = new BdevManager();
        bdevs.Register(new MallocBdev("Malloc0", Blocks, BlockSize));
        await using var vhost = new VhostManager(_runtime, bdevs, _dir, _log);
        await _runtime.Main.InvokeAsync(() =>
        {
            if (type == VirtioDevType.Scsi)
            {
                vhost.CreateScsiController("be.0", null);
                vhost.AddScsiTarget("be.0", 0, "Malloc0");
            }
            else
            {
                vhost.CreateBlkController("be.0", "Malloc0", null, false);
            }
        });
        var module = StartModule(bdevs);
        try
        {
            var names = await _runtime.Main.InvokeAsync(() => module.AttachAsync("Vu0", Path.Combine(_dir, "be.0"), vqCount: 2, vqSize: 64, devType: type));
            using var desc = bdevs.Open(Assert.Single(names), true);
            using var buf = new Buf(4096);
            var loop = new IoLoop(desc, [new IoVec(buf.Ptr, 4096)], 1024);
            long bytes = await R(0).InvokeAsync(async () =>
            {
                long b = await loop.SteadyStateAllocation(5_000, 20_000, 32);
                loop.Release();
                return b;
            });
            Assert.True(bytes < 200, $"{type}: {bytes} bytes allocated over 20k I/Os through virtio-user");
            desc.Dispose();
            await OnMain(() => module.DetachAsync("Vu0"));
        }
        catch
        {
            _out.WriteLine(_log.Dump());
            throw;
        }
    }
}
