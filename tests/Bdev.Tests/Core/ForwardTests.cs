using VhostBackend.BdevMalloc;
using VhostBackend.Reactors;
using Xunit;

namespace VhostBackend.Bdev.Tests.Core;

/// <summary>
/// <see cref="BdevChannel.TryForward"/>: a vbdev handing its caller's I/O to its base in place. A test model vbdev
/// (<see cref="ShiftVbdevModel"/>, tests/Shared: its block N is the base's block N + shift) forwards when it can and
/// falls back to a regular base I/O when refused, recording which one it did.
/// </summary>
public class ForwardTests
{
    [Fact]
    public async Task Forward_Translates_Counts_On_The_Base_And_Completes_Outside_The_Submit()
    {
        await using var kit = new BdevTestKit();
        var malloc = new MallocBdev("M", 256, 512);
        kit.Bdevs.Register(malloc);
        using var baseDesc = kit.Bdevs.Open("M", write: true);
        var shift = new ShiftVbdevModel("S", baseDesc, 100, 64);
        kit.Bdevs.Register(shift);
        using var desc = kit.Bdevs.Open("S", write: true);
        using var src = new NativeBuffer(4096);
        using var dst = new NativeBuffer(4096);
        new Random(5).NextBytes(src.Span[..4096]);

        Assert.Equal((0, true), await kit.Io(desc, (ch, cb) => ch.Write(desc, src.Split(0, 1000, 3096), 3, 8, cb, null)));
        Assert.Equal(1, shift.Forwarded);
        Assert.Equal(0, shift.Regular);
        Assert.False(shift.CompletedInsideSubmit);
        using var check = kit.Bdevs.Open("M", write: false);
        Assert.Equal((0, true), await kit.Io(check, (ch, cb) => ch.Read(check, dst.Split(0, 4096), 103, 8, cb, null)));
        Assert.True(src.Span[..4096].SequenceEqual(dst.Span[..4096]), "the data is at the translated offset of the base");

        Assert.Equal((0, true), await kit.Io(desc, (ch, cb) => ch.Read(desc, dst.Split(0, 512, 3584), 3, 8, cb, null)));
        Assert.Equal(2, shift.Forwarded);
        Assert.True(src.Span[..4096].SequenceEqual(dst.Span[..4096]));
        var stats = malloc.GetStats();
        Assert.Equal(1, stats.NumWriteOps); // the forwarded write, counted by the base as SPDK's iostat would
        Assert.Equal(2, stats.NumReadOps);  // the forwarded read and the check read
        Assert.Equal(1, shift.GetStats().NumWriteOps);
    }

    [Fact]
    public async Task Forward_Is_Refused_With_Qos_On_The_Base_Out_Of_Range_Or_Without_The_Modules_Consent()
    {
        await using var kit = new BdevTestKit();
        var malloc = new MallocBdev("M", 256, 512);
        kit.Bdevs.Register(malloc);
        var plain = new PlainBdev("P", 256);
        kit.Bdevs.Register(plain);
        using var mallocDesc = kit.Bdevs.Open("M", write: true);
        using var plainDesc = kit.Bdevs.Open("P", write: true);
        var overMalloc = new ShiftVbdevModel("S1", mallocDesc, 200, 100); // blocks 56..99 map past the base's end
        var overPlain = new ShiftVbdevModel("S2", plainDesc, 0, 64);
        kit.Bdevs.Register(overMalloc);
        kit.Bdevs.Register(overPlain);
        using var d1 = kit.Bdevs.Open("S1", write: true);
        using var d2 = kit.Bdevs.Open("S2", write: true);
        using var buf = new NativeBuffer(4096);

        // A module that did not opt in gets a regular I/O.
        Assert.Equal((0, true), await kit.Io(d2, (ch, cb) => ch.Write(d2, buf.Split(0, 4096), 0, 8, cb, null)));
        Assert.Equal((0, 1), (overPlain.Forwarded, overPlain.Regular));

        // Past the base's end: refused; the regular I/O then fails the base's range check (the caller sees a failure).
        Assert.Equal((0, false), await kit.Io(d1, (ch, cb) => ch.Read(d1, buf.Split(0, 4096), 60, 8, cb, null)));
        Assert.Equal((0, 1), (overMalloc.Forwarded, overMalloc.Regular));

        // QoS on the base: refused, so the base's limits apply to the vbdev's I/O too.
        Assert.Equal((0, true), await kit.Io(d1, (ch, cb) => ch.Read(d1, buf.Split(0, 4096), 0, 8, cb, null)));
        Assert.Equal((1, 1), (overMalloc.Forwarded, overMalloc.Regular));
        malloc.SetQosLimits(rwIosPerSec: 100_000, 0, 0, 0);
        Assert.Equal((0, true), await kit.Io(d1, (ch, cb) => ch.Read(d1, buf.Split(0, 4096), 0, 8, cb, null)));
        Assert.Equal((1, 2), (overMalloc.Forwarded, overMalloc.Regular));
    }

    /// <summary>A test model base that completes every I/O and does not accept forwarded ones.</summary>
    private sealed class PlainBdev(string name, ulong blocks) : Bdev(name, "Plain", 512, blocks)
    {
        public override bool SupportsIoType(BdevIoType type) => true;

        protected internal override IoChannel GetModuleChannel(Reactor reactor) => reactor.GetIoChannel(StatelessDevice.Instance);

        protected internal override void Submit(IoChannel moduleChannel, BdevIo io) => io.Complete(BdevIoStatus.Success);
    }
}
