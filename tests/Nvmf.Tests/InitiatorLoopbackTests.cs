using System.Net;
using VhostBackend.Nvme;
using VhostBackend.Nvme.Tcp;
using VhostBackend.Platform;
using Xunit;

namespace VhostBackend.Nvmf.Tests;

/// <summary>Our NVMe/TCP initiator (src/Nvme/Tcp, a real peer) against our target on loopback.</summary>
public sealed class InitiatorLoopbackTests : IAsyncLifetime
{
    private readonly NvmfTestTarget _t = new();

    public Task InitializeAsync() => _t.SetupAsync();

    public async Task DisposeAsync() => await _t.DisposeAsync();

    private NvmeTcpTransportId Trid(bool digests = false, string? nqn = null) => new()
    {
        Address = IPAddress.Loopback,
        Port = _t.Port,
        SubNqn = nqn ?? NvmfTestTarget.Nqn,
        HeaderDigest = digests,
        DataDigest = digests,
    };

    private static NvmeStatus Run(NvmeTcpQueuePair qp, Func<NvmeCompletionCallback, int> submit)
    {
        NvmeStatus? st = null;
        Assert.Equal(0, submit((_, s, _) => st = s));
        var deadline = DateTime.UtcNow.AddSeconds(10);
        while (st is null)
        {
            qp.Poll();
            Assert.True(DateTime.UtcNow < deadline, "command timed out");
        }

        return st.Value;
    }

    private static NvmeTcpQueuePair ConnectIo(NvmeTcpController c)
    {
        var qp = c.CreateIoQueuePair();
        Assert.Equal(0, qp.StartConnect(c.Cntlid, 0));
        var deadline = DateTime.UtcNow.AddSeconds(10);
        int rc;
        while ((rc = qp.PollConnect()) == 0)
        {
            Assert.True(DateTime.UtcNow < deadline, "I/O queue connect timed out");
        }

        Assert.Equal(1, rc);
        return qp;
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void AttachIdentifyAndVerifyOverSeveralQueuePairs(bool digests)
    {
        using var c = NvmeTcpController.Attach(Trid(digests), new NvmeTcpControllerOptions { IoQueuesRequested = 3 });
        Assert.Equal(digests, c.HeaderDigest);
        Assert.Equal(digests, c.DataDigest);
        Assert.Equal(NvmfTestTarget.Nqn, c.Data.SubsystemNqn);
        Assert.Equal(3, c.MaxIoQueuePairs);
        Assert.Equal(4096, c.IoInCapsuleDataSize);
        var ns = Assert.Single(c.Namespaces);
        Assert.Equal(8192ul, ns.BlockCount);

        var qps = new[] { ConnectIo(c), ConnectIo(c), ConnectIo(c) };
        using var buf = new AlignedBuffer(1 << 20);
        var rnd = new Random(5);
        rnd.NextBytes(buf.AsSpan(0, 1 << 19));
        for (int i = 0; i < qps.Length; i++)
        {
            // 512 B (in capsule), 4 KiB (in capsule), 128 KiB (R2T) per queue pair at distinct LBAs.
            foreach (var (lba, blocks) in new (ulong, uint)[] { (1000 + ((ulong)i * 400), 1), (1010 + ((ulong)i * 400), 8), (1100 + ((ulong)i * 400), 256) })
            {
                nuint off = (nuint)(lba * 512 % (1 << 18));
                var v = buf.ToIoVec(off, blocks * 512);
                Assert.True(Run(qps[i], cb => qps[i].SubmitIo(NvmeIoOpcode.Write, ns, lba, blocks, new ReadOnlySpan<IoVec>(ref v), 0, cb, null)).IsSuccess);
                var r = buf.ToIoVec((1 << 19) + off, blocks * 512);
                Assert.True(Run(qps[i], cb => qps[i].SubmitIo(NvmeIoOpcode.Read, ns, lba, blocks, new ReadOnlySpan<IoVec>(ref r), 0, cb, null)).IsSuccess);
                Assert.True(buf.AsSpan(off, (int)(blocks * 512)).SequenceEqual(buf.AsSpan((1 << 19) + off, (int)(blocks * 512))));
            }
        }

        foreach (var q in qps)
        {
            c.ReleaseQueuePair(q);
        }
    }

    [Fact]
    public void DiscoveryLogThroughTheInitiator()
    {
        using var c = NvmeTcpController.Attach(Trid(nqn: NvmeFabrics.DiscoveryNqn));
        var log = c.GetDiscoveryLog(out _);
        var e = Assert.Single(log);
        Assert.Equal(NvmfTestTarget.Nqn, e.SubNqn);
        Assert.Equal(NvmeDiscoveryEntry.SubTypeNvme, e.SubType);
    }

    [Fact]
    public async Task ControllersAndQpairsAreReported()
    {
        using var c = NvmeTcpController.Attach(Trid(), new NvmeTcpControllerOptions { IoQueuesRequested = 2 });
        var q = ConnectIo(c);
        var ctrls = (System.Text.Json.Nodes.JsonArray)(await _t.Call("nvmf_subsystem_get_controllers", $$"""{"nqn":"{{NvmfTestTarget.Nqn}}"}"""))!;
        var one = Assert.Single(ctrls);
        Assert.Equal(c.Cntlid, (ushort)one!["cntlid"]!.GetValue<int>());
        Assert.Equal(1, one["num_io_qpairs"]!.GetValue<int>());
        var qpairs = (System.Text.Json.Nodes.JsonArray)(await _t.Call("nvmf_subsystem_get_qpairs", $$"""{"nqn":"{{NvmfTestTarget.Nqn}}"}"""))!;
        Assert.Equal(2, qpairs.Count);
        Assert.Contains(qpairs, x => x!["qid"]!.GetValue<int>() == 1 && x["listen_address"]!["trsvcid"]!.GetValue<string>() == _t.Port.ToString(System.Globalization.CultureInfo.InvariantCulture));
        var stats = (await _t.Call("nvmf_get_stats", "{}"))!;
        Assert.Equal(2, stats["poll_groups"]!.AsArray().Count);
        Assert.Equal(1, stats["poll_groups"]!.AsArray().Sum(g => g!["current_admin_qpairs"]!.GetValue<int>()));
        Assert.Equal(1, stats["poll_groups"]!.AsArray().Sum(g => g!["current_io_qpairs"]!.GetValue<int>()));
        c.ReleaseQueuePair(q);
    }
}
