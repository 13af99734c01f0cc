using VhostBackend.Bdev.Tests.Core;
using VhostBackend.BdevFile;
using Xunit;

namespace VhostBackend.Bdev.Tests.File;

/// <summary>
/// The file bdev (io_uring / aio) accepts forwarded I/O (<see cref="BdevChannel.TryForward"/>): a vbdev's I/O reaches
/// the file at the translated offset as the vbdev's own object, is counted in the file bdev's statistics, and what the
/// file bdev would split (its 1 MiB transfer limit) or bounce (O_DIRECT with a misaligned buffer) is refused and goes
/// the regular way, with the same data on disk.
/// </summary>
public sealed class FileForwardTests : IDisposable
{
    private readonly string _dir = Directory.CreateDirectory(Path.Combine("/var/tmp", "vb-filefwd-" + Guid.NewGuid().ToString("N"))).FullName;

    public void Dispose() => Directory.Delete(_dir, true);

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task A_Vbdev_Forwards_Into_The_File_Bdev_And_Falls_Back_Where_It_Would_Split_Or_Bounce(bool tmpfs)
    {
        string dir = tmpfs ? Directory.CreateDirectory(Path.Combine("/dev/shm", "vb-filefwd-" + Guid.NewGuid().ToString("N"))).FullName : _dir;
        try
        {
            string path = Path.Combine(dir, "fwd.img");
            FileBdev.CreateSparseIfMissing(path, 8 << 20);
            await using var kit = new BdevTestKit();
            var file = FileBdev.Open("F0", path, 512, readOnly: false, null, "bdev_uring_create");
            Assert.True(file.AcceptsForwardedIo);
            Assert.True(file.Direct || tmpfs, "O_DIRECT expected on /var/tmp");
            kit.Bdevs.Register(file);
            using var baseDesc = kit.Bdevs.Open("F0", write: true);
            var shift = new ShiftVbdevModel("S", baseDesc, 100, 8192);
            kit.Bdevs.Register(shift);
            using var desc = kit.Bdevs.Open("S", write: true);
            int big = 2 << 20;
            using var src = new NativeBuffer(big);
            using var dst = new NativeBuffer(big);
            new Random(11).NextBytes(src.Span[..big]);

            // Aligned 4 KiB write and read: forwarded (the file bdev completes from its ring's poller, outside the submit).
            Assert.Equal((0, true), await kit.Io(desc, (ch, cb) => ch.Write(desc, src.Split(0, 4096), 3, 8, cb, null)));
            Assert.Equal((1, 0), (shift.Forwarded, shift.Regular));
            Assert.Equal((0, true), await kit.Io(desc, (ch, cb) => ch.Read(desc, dst.Split(0, 4096), 3, 8, cb, null)));
            Assert.Equal((2, 0), (shift.Forwarded, shift.Regular));
            Assert.True(src.Span[..4096].SequenceEqual(dst.Span[..4096]));
            Assert.False(shift.CompletedInsideSubmit);
            Assert.True(System.IO.File.ReadAllBytes(path).AsSpan(103 * 512, 4096).SequenceEqual(src.Span[..4096]), "at the translated offset");

            // A misaligned buffer: O_DIRECT would need a bounce buffer, so the forward is refused there; tmpfs takes it.
            dst.Span[..4096].Clear();
            Assert.Equal((0, true), await kit.Io(desc, (ch, cb) => ch.Read(desc, dst.Split(7, 4096), 3, 8, cb, null)));
            Assert.Equal(file.Direct ? (2, 1) : (3, 0), (shift.Forwarded, shift.Regular));
            Assert.True(src.Span[..4096].SequenceEqual(dst.Span.Slice(7, 4096)));

            // 2 MiB: beyond the file bdev's 1 MiB transfer limit (it would split): refused, done the regular way.
            int forwarded = shift.Forwarded, regular = shift.Regular;
            Assert.Equal((0, true), await kit.Io(desc, (ch, cb) => ch.Write(desc, src.Split(0, big), 1000, (ulong)big / 512, cb, null)));
            Assert.Equal((forwarded, regular + 1), (shift.Forwarded, shift.Regular));
            Assert.True(System.IO.File.ReadAllBytes(path).AsSpan(1100 * 512, big).SequenceEqual(src.Span[..big]));

            // The file bdev counted the forwarded I/O as its own; the vbdev counted all of its I/O.
            var stats = file.GetStats();
            Assert.Equal(2, stats.NumWriteOps); // the forwarded write and the regular 2 MiB one (split below the layer's count)
            Assert.Equal(2, stats.NumReadOps);
            Assert.Equal(2, shift.GetStats().NumWriteOps);
            Assert.Equal(2, shift.GetStats().NumReadOps);
            Assert.Equal(0, file.QueueDepth);
            desc.Dispose();
            await kit.Main.InvokeAsync(() => kit.Bdevs.UnregisterAsync(shift));
            baseDesc.Dispose();
            await kit.Main.InvokeAsync(() => kit.Bdevs.UnregisterAsync(file));
        }
        finally
        {
            if (tmpfs)
            {
                Directory.Delete(dir, true);
            }
        }
    }
}
