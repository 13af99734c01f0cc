using System.Diagnostics;
using System.Runtime.InteropServices;
using VhostBackend.Virtio;
using VhostBackend.Virtio.Blk;
using VhostBackend.Virtio.Tests;

namespace VhostBackend.Vhost.Tests;

/// <summary>
/// A model of a well-behaved guest driver for a vhost-blk queue set up on <see cref="DriverRingModel"/>: writes a
/// pattern, reads it back and compares, one request at a time, reusing its descriptors and buffers, until
/// stopped. Counts verified I/Os; the first failure or stall (5 s) is reported through the error.
/// </summary>
internal static class HealthyGuestModel
{
    /// <summary>A well-behaved driver: write a pattern, read it back, compare; descriptors and buffers reused.</summary>
    public static void Run(DriverRingModel m, CancellationToken stop, ref long ops, ref string? error)
    {
        ulong hdrW = m.Alloc(16), hdrR = m.Alloc(16), stW = m.Alloc(1), stR = m.Alloc(1);
        ulong wbuf = m.Alloc(4096, 4096), rbuf = m.Alloc(4096, 4096);
        m.SetDesc(0, hdrW, 16, VirtqDesc.FlagNext, 1);
        m.SetDesc(1, wbuf, 4096, VirtqDesc.FlagNext, 2);
        m.SetDesc(2, stW, 1, VirtqDesc.FlagWrite);
        m.SetDesc(3, hdrR, 16, VirtqDesc.FlagNext, 4);
        m.SetDesc(4, rbuf, 4096, (ushort)(VirtqDesc.FlagNext | VirtqDesc.FlagWrite), 5);
        m.SetDesc(5, stR, 1, VirtqDesc.FlagWrite);
        byte n = 0;
        ushort expected = m.UsedIdx;
        while (!stop.IsCancellationRequested)
        {
            n++;
            ulong sector = (ulong)(n % 64) * 8;
            m.Bytes(wbuf, 4096).Fill(n);
            MemoryMarshal.Write(m.Bytes(hdrW, 16), new VirtioBlkOutHeader { Type = VirtioBlkRequestType.Out, Sector = sector });
            MemoryMarshal.Write(m.Bytes(hdrR, 16), new VirtioBlkOutHeader { Type = VirtioBlkRequestType.In, Sector = sector });
            m.Bytes(stW, 1)[0] = 0xff;
            m.Bytes(stR, 1)[0] = 0xff;
            m.Publish(0);
            var t = Stopwatch.StartNew();
            expected++;
            while (m.UsedIdx != expected)
            {
                if (t.Elapsed > TimeSpan.FromSeconds(5))
                {
                    error = $"healthy guest stalled at used {m.UsedIdx}, expected {expected}";
                    return;
                }

                Thread.SpinWait(50);
            }

            m.Publish(3);
            expected++;
            while (m.UsedIdx != expected)
            {
                if (t.Elapsed > TimeSpan.FromSeconds(5))
                {
                    error = $"healthy guest stalled at used {m.UsedIdx}, expected {expected}";
                    return;
                }

                Thread.SpinWait(50);
            }

            if (m.Bytes(stW, 1)[0] != VirtioBlkRequestType.StatusOk || m.Bytes(stR, 1)[0] != VirtioBlkRequestType.StatusOk || m.Bytes(rbuf, 4096).IndexOfAnyExcept(n) >= 0)
            {
                error = $"healthy guest I/O failed or read back wrong data (pass {n})";
                return;
            }

            Interlocked.Add(ref ops, 2);
        }
    }
}
