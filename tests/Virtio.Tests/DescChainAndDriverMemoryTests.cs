using System.Runtime.InteropServices;
using VhostBackend.Virtio.Blk;
using Xunit;

namespace VhostBackend.Virtio.Tests;

public sealed class DescChainAndDriverMemoryTests
{
    [Fact]
    public void WireStructsAreReadAndWrittenAcrossSegments()
    {
        var a = Marshal.AllocHGlobal(64);
        var b = Marshal.AllocHGlobal(64);
        try
        {
            // A 16-byte header split 5 + 11 over two readable segments, then a writable segment.
            DescSegment[] segs = [new(a, 5, false), new(b, 11, false), new(a + 32, 8, true)];
            var hdr = new VirtioBlkOutHeader { Type = VirtioBlkRequestType.Out, IoPrio = 7, Sector = 0x1122334455667788 };
            var bytes = MemoryMarshal.AsBytes(new ReadOnlySpan<VirtioBlkOutHeader>(in hdr));
            Assert.True(DescChain.CopyTo(segs, 0, 2, 0, bytes));
            Assert.True(DescChain.TryRead(segs, 0, 2, 0, out VirtioBlkOutHeader back));
            Assert.Equal(hdr, back);

            // Reading past the readable part fails (zeroed value).
            Assert.False(DescChain.TryRead(segs, 0, 2, 8, out VirtioBlkOutHeader tooFar));
            Assert.Equal(default, tooFar);

            // A write is cut to the room of the writable segments.
            Assert.Equal(8, DescChain.Room(segs, 2, 3, 0, 16));
            Assert.Equal(8, DescChain.Write(segs, 2, 3, 0, in hdr));
            Assert.Equal(VirtioBlkRequestType.Out, MemoryMarshal.Read<uint>(DescChain.AsSpan(segs[2], 0, 4)));

            var status = DescChain.Slice(segs[2], 7, 1);
            DescChain.AsSpan(status, 0, 1)[0] = 0xAB;
            Assert.Equal(0xAB, DescChain.AsSpan(segs[2], 7, 1)[0]);
            Assert.Throws<ArgumentOutOfRangeException>(() => DescChain.Slice(segs[2], 8, 1));
        }
        finally
        {
            Marshal.FreeHGlobal(a);
            Marshal.FreeHGlobal(b);
        }
    }

    [Fact]
    public void DriverMemoryChecksEveryAccess()
    {
        var p = Marshal.AllocHGlobal(256);
        try
        {
            var m = new DriverMemory(p, 256);
            ref var h = ref m.Ref<VirtioBlkOutHeader>(64);
            h.Sector = 42;
            Assert.Equal(42UL, MemoryMarshal.Read<VirtioBlkOutHeader>(m.Bytes(64, 16)).Sector);
            m.Ref<byte>(255) = 1;
            Assert.Throws<ArgumentOutOfRangeException>(() => m.Ref<byte>(256));
            Assert.Throws<ArgumentOutOfRangeException>(() => m.Ref<VirtioBlkOutHeader>(248));
            Assert.Throws<ArgumentOutOfRangeException>(() => m.Ref<VirtioBlkOutHeader>(4)); // misaligned
            Assert.Throws<ArgumentOutOfRangeException>(() => m.Bytes(ulong.MaxValue, 2));

            m.WriteDesc(128, 0x1000, 512, VirtqDesc.FlagWrite, 3);
            var d = MemoryMarshal.Read<VirtqDesc>(m.Bytes(128, 16));
            Assert.Equal((0x1000UL, 512u, VirtqDesc.FlagWrite, (ushort)3), (d.Addr, d.Len, d.Flags, d.Next));

            var host = new byte[32];
            host.AsSpan().Fill(9);
            var pin = GCHandle.Alloc(host, GCHandleType.Pinned);
            try
            {
                m.CopyFromHost(pin.AddrOfPinnedObject(), 160, 32);
                Assert.Equal(9, m.Bytes(160, 32)[31]);
                m.Bytes(160, 32).Fill(3);
                m.CopyToHost(160, pin.AddrOfPinnedObject(), 32);
                Assert.Equal(3, host[0]);
                Assert.Throws<ArgumentOutOfRangeException>(() => m.CopyFromHost(pin.AddrOfPinnedObject(), 240, 32));
            }
            finally
            {
                pin.Free();
            }
        }
        finally
        {
            Marshal.FreeHGlobal(p);
        }
    }

    [Fact]
    public unsafe void A_Segment_Longer_Than_A_Span_Is_Read_And_Written_Only_Where_Asked()
    {
        // A guest may describe one buffer of 2 GiB or more; only the bytes a copy needs become a span. (The whole
        // length cast to int was negative and threw on the reactor.) The memory behind is 64 real bytes.
        byte* mem = stackalloc byte[64];
        new Span<byte>(mem, 64).Fill(7);
        var huge = new[] { new DescSegment((nint)mem, 0xC000_0000u, true) };
        Span<byte> got = stackalloc byte[16];
        Assert.True(DescChain.CopyFrom(huge, 0, 1, 8, got));
        Assert.Equal(16, got.IndexOfAnyExcept((byte)7) < 0 ? 16 : -1);
        Assert.True(DescChain.CopyTo(huge, 0, 1, 4, [1, 2, 3]));
        Assert.Equal(new byte[] { 7, 1, 2, 3, 7 }, new Span<byte>(mem + 3, 5).ToArray());
        Assert.Equal(2, DescChain.AsSpan(huge[0], 62, 2).Length);
        Assert.Throws<ArgumentOutOfRangeException>(() => DescChain.AsSpan(huge[0], 0xC000_0000u, 1));
    }

    [Fact]
    public void Room_Counts_The_Bytes_After_Skip()
    {
        var segs = new[] { new DescSegment(1, 16, true), new DescSegment(1, 16, true) };
        Assert.Equal(8, DescChain.Room(segs, 0, 2, 10, 8));
        Assert.Equal(22, DescChain.Room(segs, 0, 2, 10, 100));
        Assert.Equal(0, DescChain.Room(segs, 0, 2, 32, 8));
    }
}
