using System.Buffers.Binary;
using System.Runtime.InteropServices;
using VhostBackend.BdevMalloc;
using VhostBackend.Platform;
using VhostBackend.Vhost.Scsi;
using VhostBackend.VhostUser;
using VhostBackend.Virtio;
using VhostBackend.Virtio.Scsi;
using VhostBackend.Virtio.Tests;
using Xunit;

namespace VhostBackend.Vhost.Tests;

/// <summary>
/// vhost-user-scsi controller against in-process models of the front end and of Linux's virtio_scsi driver
/// (fast coverage; the real test is integration/VhostScsiTests with QEMU and a guest kernel). Each model ring
/// drives one virtqueue: the request queue (2), the event queue (1) or the control queue (0).
/// </summary>
public sealed class VhostScsiTests
{
    private const ulong WantProtocol = (1UL << VhostUserProtocolFeature.ReplyAck) | (1UL << VhostUserProtocolFeature.Mq);

    private static readonly ulong Features = (1UL << VirtioFeatures.Version1) | (1UL << VhostUserConstants.ProtocolFeaturesBit)
        | (1UL << VirtioScsiFeature.Hotplug) | (1UL << VirtioScsiFeature.Change) | (1UL << VirtioFeatures.RingEventIdx);

    [Fact]
    public void WireSizesMatchTheSpec()
    {
        Assert.Equal(51, VirtioScsi.CmdReqSize);
        Assert.Equal(108, VirtioScsi.CmdRespSize);
        Assert.Equal(VirtioScsiConfig.Size, Marshal.SizeOf<VirtioScsiConfig>());
        Assert.Equal(32, (int)Marshal.OffsetOf<VirtioScsiConfig>(nameof(VirtioScsiConfig.MaxLun)));
        Span<byte> lun = stackalloc byte[8];
        VirtioScsi.EncodeLun(lun, 5, 3);
        Assert.True(VirtioScsi.TryDecodeLun(lun, out int t, out int l));
        Assert.Equal((5, 3), (t, l));
        lun[0] = 2;
        Assert.False(VirtioScsi.TryDecodeLun(lun, out _, out _));
    }

    [Fact]
    public async Task RequestQueueRunsCommandsAndAnswersBadTargets()
    {
        await using var host = new VhostTestHost(blocks: 4096, blockSize: 512);
        var ctrlr = host.Vhost.CreateScsiController("scsi.0", null);
        Assert.Equal(0, await host.Runtime.Main.InvokeAsync(() => host.Vhost.AddScsiTarget("scsi.0", 0, "Malloc0")));
        using var fe = host.Connect("scsi.0");
        fe.Negotiate(WantProtocol);
        Assert.Equal((ulong)ctrlr.MaxQueues, fe.Get(VhostUserRequest.GetQueueNum));
        Assert.Equal(0UL, fe.SetU64(VhostUserRequest.SetFeatures, Features));
        using var m = new DriverRingModel(32, eventIdx: true);
        Assert.Equal(0UL, fe.SetMemTable(m));
        using var kick = new EventFd();
        using var call = new EventFd();
        Assert.Equal(0UL, fe.SetupQueue(m, VirtioScsi.FirstRequestQueue, kick, call));
        var drv = new ScsiDriverModel(m);

        // INQUIRY, READ CAPACITY(10), WRITE(10) + READ(10) of 8 blocks, a missing target, a LUN that does not exist.
        ulong inq = m.Alloc(96);
        var r1 = drv.Post(0, 0, [0x12, 0, 0, 0, 96, 0], inq, 96, dataIn: true);
        ulong cap = m.Alloc(8);
        var r2 = drv.Post(0, 0, [0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], cap, 8, dataIn: true);
        ulong wbuf = m.Alloc(4096);
        for (int i = 0; i < 4096; i++)
        {
            m.Bytes(wbuf, 4096)[i] = (byte)(i * 13);
        }

        var r3 = drv.Post(0, 0, [0x2A, 0, 0, 0, 0, 16, 0, 0, 8, 0], wbuf, 4096, dataIn: false);
        var r4 = drv.Post(3, 0, [0x00, 0, 0, 0, 0, 0], 0, 0, dataIn: false);
        ulong inq2 = m.Alloc(36);
        var r5 = drv.Post(0, 1, [0x12, 0, 0, 0, 36, 0], inq2, 36, dataIn: true);
        kick.Signal();
        Assert.True(await VhostTestHost.WaitUntil(() => m.UsedIdx == 5), $"completed {m.UsedIdx} of 5");
        Assert.True(await VhostTestHost.WaitUntil(() => call.Drain()), "no interrupt");

        Assert.Equal((VirtioScsi.SOk, (byte)0), drv.Result(r1));
        Assert.Equal("VHOSTBE", System.Text.Encoding.ASCII.GetString(m.Bytes(inq + 8, 7)));
        Assert.Equal((VirtioScsi.SOk, (byte)0), drv.Result(r2));
        Assert.Equal(4095u, BinaryPrimitives.ReadUInt32BigEndian(m.Bytes(cap, 4)));
        Assert.Equal(512u, BinaryPrimitives.ReadUInt32BigEndian(m.Bytes(cap + 4, 4)));
        Assert.Equal((VirtioScsi.SOk, (byte)0), drv.Result(r3));
        Assert.Equal(VirtioScsi.SBadTarget, drv.Result(r4).Response);
        Assert.Equal((VirtioScsi.SOk, (byte)0), drv.Result(r5));
        Assert.Equal(0x7F, m.Bytes(inq2, 1)[0]); // peripheral qualifier 3, type 0x1F: no LUN 1

        ulong rbuf = m.Alloc(4096);
        var r6 = drv.Post(0, 0, [0x28, 0, 0, 0, 0, 16, 0, 0, 8, 0], rbuf, 4096, dataIn: true);
        var r7 = drv.Post(0, 0, [0x28, 0, 0, 0, 0x10, 0, 0, 0, 8, 0], rbuf, 4096, dataIn: true); // LBA 4096: out of range
        var r8 = drv.Post(0, 0, [0xFF, 0, 0, 0, 0, 0], 0, 0, dataIn: false);
        kick.Signal();
        Assert.True(await VhostTestHost.WaitUntil(() => m.UsedIdx == 8), $"completed {m.UsedIdx} of 8");
        Assert.Equal((VirtioScsi.SOk, (byte)0), drv.Result(r6));
        Assert.Equal(108u + 4096u, m.Used(5).Len);
        Assert.True(m.Bytes(wbuf, 4096).SequenceEqual(m.Bytes(rbuf, 4096)));
        Assert.Equal((VirtioScsi.SOk, (byte)2), drv.Result(r7));
        Assert.Equal((0x5, 0x21), drv.Sense(r7)); // ILLEGAL REQUEST, LBA OUT OF RANGE
        Assert.Equal((0x5, 0x20), drv.Sense(r8)); // INVALID COMMAND OPERATION CODE

        // A chain too short for the response is returned with nothing written, and the queue keeps going.
        m.SetDesc(30, m.Alloc(51), 51, 0);
        m.Publish(30);
        kick.Signal();
        Assert.True(await VhostTestHost.WaitUntil(() => m.UsedIdx == 9));
        Assert.Equal((30u, 0u), m.Used(8));
    }

    [Fact]
    public async Task HotplugEventsAreQueuedUntilTheDriverPostsBuffers()
    {
        await using var host = new VhostTestHost(blocks: 4096, blockSize: 512);
        host.Bdevs.Register(new MallocBdev("Malloc1", 2048, 512));
        var ctrlr = host.Vhost.CreateScsiController("scsi.0", null);
        using var fe = host.Connect("scsi.0");
        fe.Negotiate(WantProtocol);
        Assert.Equal(0UL, fe.SetU64(VhostUserRequest.SetFeatures, Features));
        using var m = new DriverRingModel(16, eventIdx: false);
        Assert.Equal(0UL, fe.SetMemTable(m));
        using var kick = new EventFd();
        using var call = new EventFd();
        Assert.Equal(0UL, fe.SetupQueue(m, VirtioScsi.EventQueue, kick, call));
        kick.Signal(); // the queue starts on its first kick
        Assert.True(await VhostTestHost.WaitUntil(() => ctrlr.Sessions.Single().Started));

        // Two events before any buffer: both kept.
        await host.Runtime.Main.InvokeAsync(() => host.Vhost.AddScsiTarget("scsi.0", 3, "Malloc0"));
        await host.Runtime.Main.InvokeAsync(() => host.Vhost.AddScsiTarget("scsi.0", -1, "Malloc1"));
        await Task.Delay(50);
        Assert.Equal(0, m.UsedIdx);

        ulong e1 = m.Alloc(16);
        m.SetDesc(0, e1, 16, VirtqDesc.FlagWrite);
        m.Publish(0);
        ulong e2 = m.Alloc(16);
        m.SetDesc(1, e2, 16, VirtqDesc.FlagWrite);
        m.Publish(1);
        kick.Signal();
        Assert.True(await VhostTestHost.WaitUntil(() => m.UsedIdx == 2), $"events delivered: {m.UsedIdx}");
        Assert.Equal((VirtioScsi.TTransportReset, 3, VirtioScsi.EvtResetRescan), ReadEvent(m, e1));
        Assert.Equal((VirtioScsi.TTransportReset, 0, VirtioScsi.EvtResetRescan), ReadEvent(m, e2));

        // Removal (RPC path) sends REMOVED once the LUN drained; a bdev deletion removes its target too.
        ulong e3 = m.Alloc(16);
        m.SetDesc(2, e3, 16, VirtqDesc.FlagWrite);
        m.Publish(2);
        ulong e4 = m.Alloc(16);
        m.SetDesc(3, e4, 16, VirtqDesc.FlagWrite);
        m.Publish(3);
        kick.Signal();
        await host.Runtime.Main.InvokeAsync(() => host.Vhost.RemoveScsiTargetAsync("scsi.0", 3));
        Assert.Null(ctrlr.GetTarget(3));
        await host.Runtime.Main.InvokeAsync(() => host.Bdevs.UnregisterAsync(host.Bdevs.Find("Malloc1")!));
        Assert.True(await VhostTestHost.WaitUntil(() => m.UsedIdx == 4), $"events delivered: {m.UsedIdx}");
        Assert.Equal((VirtioScsi.TTransportReset, 3, VirtioScsi.EvtResetRemoved), ReadEvent(m, e3));
        Assert.Equal((VirtioScsi.TTransportReset, 0, VirtioScsi.EvtResetRemoved), ReadEvent(m, e4));
        Assert.Empty(ctrlr.Targets);

        // Errors with SPDK's errnos.
        var ex = await Assert.ThrowsAsync<VhostException>(() => host.Runtime.Main.InvokeAsync(() => host.Vhost.AddScsiTarget("scsi.0", 8, "Malloc0")));
        Assert.Equal(Errno.EINVAL, ex.Errno);
        ex = await Assert.ThrowsAsync<VhostException>(() => host.Vhost.RemoveScsiTargetAsync("scsi.0", 2));
        Assert.Equal(Errno.ENODEV, ex.Errno);
    }

    [Fact]
    public async Task ControlQueueAnswersTaskManagement()
    {
        await using var host = new VhostTestHost(blocks: 4096, blockSize: 512);
        host.Vhost.CreateScsiController("scsi.0", null);
        await host.Runtime.Main.InvokeAsync(() => host.Vhost.AddScsiTarget("scsi.0", 0, "Malloc0"));
        using var fe = host.Connect("scsi.0");
        fe.Negotiate(WantProtocol);
        Assert.Equal(0UL, fe.SetU64(VhostUserRequest.SetFeatures, Features));
        using var m = new DriverRingModel(16, eventIdx: false);
        Assert.Equal(0UL, fe.SetMemTable(m));
        using var kick = new EventFd();
        Assert.Equal(0UL, fe.SetupQueue(m, VirtioScsi.ControlQueue, kick, null));

        ulong r1 = PostTmf(m, 0, 0, (uint)VhostBackend.Scsi.ScsiTaskManagementFunction.LogicalUnitReset);
        ulong r2 = PostTmf(m, 2, 5, (uint)VhostBackend.Scsi.ScsiTaskManagementFunction.LogicalUnitReset);
        ulong r3 = PostTmf(m, 4, 0, 99);
        kick.Signal();
        Assert.True(await VhostTestHost.WaitUntil(() => m.UsedIdx == 3), $"completed {m.UsedIdx} of 3");
        Assert.Equal(VirtioScsi.SOk, m.Bytes(r1, 1)[0]);
        Assert.Equal(VirtioScsi.SBadTarget, m.Bytes(r2, 1)[0]);
        Assert.Equal(VirtioScsi.SFunctionRejected, m.Bytes(r3, 1)[0]);
    }

    [Fact]
    public async Task RequestPathAllocatesNothingPerCommand()
    {
        await using var host = new VhostTestHost(reactors: 1, blocks: 4096, blockSize: 512);
        host.Vhost.CreateScsiController("z", null);
        await host.Runtime.Main.InvokeAsync(() => host.Vhost.AddScsiTarget("z", 0, "Malloc0"));
        using var fe = host.Connect("z");
        fe.Negotiate(WantProtocol);
        Assert.Equal(0UL, fe.SetU64(VhostUserRequest.SetFeatures, Features));
        using var m = new DriverRingModel(64, eventIdx: true);
        Assert.Equal(0UL, fe.SetMemTable(m));
        Assert.Equal(0UL, fe.SetupQueue(m, VirtioScsi.FirstRequestQueue, null, null));
        var drv = new ScsiDriverModel(m);
        ulong buf = m.Alloc(4096, 4096);
        var reactor = host.Runtime.Main;
        byte[] write = [0x2A, 0, 0, 0, 0, 8, 0, 0, 8, 0];
        byte[] read = [0x28, 0, 0, 0, 0, 8, 0, 0, 8, 0];

        async Task<long> RunBatch(int count)
        {
            long before = await reactor.InvokeAsync(() => GC.GetAllocatedBytesForCurrentThread());
            for (int i = 0; i < count; i++)
            {
                ushort target = (ushort)(m.UsedIdx + 1);
                drv.Post(0, 0, i % 2 == 0 ? write : read, buf, 4096, dataIn: i % 2 == 1);
                Assert.True(await VhostTestHost.WaitUntil(() => m.UsedIdx == target));
            }

            long after = await reactor.InvokeAsync(() => GC.GetAllocatedBytesForCurrentThread());
            return after - before;
        }

        await RunBatch(50);
        long idle = await RunBatch(0);
        long busy = await RunBatch(500);
        Assert.True(busy - idle < 2048, $"reactor allocated {busy} bytes for 500 SCSI commands (baseline {idle})");
    }

    private static ulong PostTmf(DriverRingModel m, int desc, int target, uint subtype)
    {
        ulong req = m.Alloc(24);
        var s = m.Bytes(req, 24);
        BinaryPrimitives.WriteUInt32LittleEndian(s, VirtioScsi.TTmf);
        BinaryPrimitives.WriteUInt32LittleEndian(s[4..], subtype);
        VirtioScsi.EncodeLun(s.Slice(8, 8), target, 0);
        ulong resp = m.Alloc(1);
        m.Bytes(resp, 1)[0] = 0xEE;
        m.SetDesc(desc, req, 24, VirtqDesc.FlagNext, (ushort)(desc + 8));
        m.SetDesc(desc + 8, resp, 1, VirtqDesc.FlagWrite);
        m.Publish((ushort)desc);
        return resp;
    }

    private static (uint Type, int Target, uint Reason) ReadEvent(DriverRingModel m, ulong gpa)
    {
        var s = m.Bytes(gpa, 16);
        return (BinaryPrimitives.ReadUInt32LittleEndian(s), s[5], BinaryPrimitives.ReadUInt32LittleEndian(s[12..]));
    }
}

/// <summary>A model of Linux's virtio_scsi request layout: command header, data-out, response, data-in.</summary>
internal sealed class ScsiDriverModel
{
    private readonly DriverRingModel _m;
    private int _nextDesc;

    public ScsiDriverModel(DriverRingModel m) => _m = m;

    /// <summary>Posts a command; returns the response's guest address.</summary>
    public ulong Post(int target, int lun, byte[] cdb, ulong dataGpa, uint dataLen, bool dataIn)
    {
        ulong req = _m.Alloc(VirtioScsi.CmdReqSize);
        var s = _m.Bytes(req, VirtioScsi.CmdReqSize);
        s.Clear();
        VirtioScsi.EncodeLun(s[..8], target, lun);
        BinaryPrimitives.WriteUInt64LittleEndian(s[8..], (ulong)_nextDesc);
        cdb.CopyTo(s[19..]);
        ulong resp = _m.Alloc(VirtioScsi.CmdRespSize);
        _m.Bytes(resp, VirtioScsi.CmdRespSize).Fill(0xEE);
        int head = Take();
        int d = head;
        if (dataLen > 0 && !dataIn)
        {
            int n1 = Take();
            _m.SetDesc(d, req, VirtioScsi.CmdReqSize, VirtqDesc.FlagNext, (ushort)n1);
            d = n1;
            int n2 = Take();
            _m.SetDesc(d, dataGpa, dataLen, VirtqDesc.FlagNext, (ushort)n2);
            d = n2;
            _m.SetDesc(d, resp, VirtioScsi.CmdRespSize, VirtqDesc.FlagWrite);
        }
        else
        {
            int n1 = Take();
            _m.SetDesc(d, req, VirtioScsi.CmdReqSize, VirtqDesc.FlagNext, (ushort)n1);
            d = n1;
            if (dataLen > 0)
            {
                int n2 = Take();
                _m.SetDesc(d, resp, VirtioScsi.CmdRespSize, (ushort)(VirtqDesc.FlagWrite | VirtqDesc.FlagNext), (ushort)n2);
                _m.SetDesc(n2, dataGpa, dataLen, VirtqDesc.FlagWrite);
            }
            else
            {
                _m.SetDesc(d, resp, VirtioScsi.CmdRespSize, VirtqDesc.FlagWrite);
            }
        }

        _m.Publish((ushort)head);
        return resp;
    }

    /// <summary>(response, SCSI status) of a completed command.</summary>
    public (byte Response, byte Status) Result(ulong resp)
    {
        var s = _m.Bytes(resp, VirtioScsi.CmdRespSize);
        return (s[11], s[10]);
    }

    /// <summary>(sense key, ASC) of a completed command's fixed-format sense.</summary>
    public (int Key, int Asc) Sense(ulong resp)
    {
        var s = _m.Bytes(resp, VirtioScsi.CmdRespSize);
        Assert.True(BinaryPrimitives.ReadUInt32LittleEndian(s) >= 14, "no sense data");
        return (s[12 + 2] & 0xF, s[12 + 12]);
    }

    private int Take()
    {
        int d = _nextDesc;
        _nextDesc = (_nextDesc + 1) % _m.Size;
        return d;
    }
}
