using System.Diagnostics.Metrics;
using VhostBackend.Bdev;
using VhostBackend.VhostUser;
using VhostBackend.Virtio;
using VhostBackend.Virtio.Blk;
using VhostBackend.Virtio.Tests;
using Xunit;

namespace VhostBackend.Vhost.Tests;

/// <summary>
/// The controllers' observable instruments (<see cref="VhostMetrics"/>) and the bdev ones, read through a
/// <see cref="MeterListener"/> while a front-end model (a model of QEMU, in-process) connects, runs requests and leaves.
/// </summary>
public sealed class VhostMetricsTests
{
    private const ulong WantProtocol = (1UL << VhostUserProtocolFeature.ReplyAck) | (1UL << VhostUserProtocolFeature.Config);
    private const ulong BaseFeatures = (1UL << VirtioFeatures.Version1) | (1UL << VhostUserConstants.ProtocolFeaturesBit);

    [Fact]
    public async Task Sessions_Queues_And_Bdev_Operations_Follow_A_Front_End()
    {
        await using var host = new VhostTestHost(reactors: 1);
        using var meter = new Meter("test.vhost." + Guid.NewGuid());
        VhostMetrics.Register(meter, host.Vhost);
        BdevMetrics.Register(meter, host.Bdevs);
        var values = new Dictionary<string, double>();
        using var listener = new MeterListener
        {
            InstrumentPublished = (i, l) =>
            {
                if (ReferenceEquals(i.Meter, meter))
                {
                    l.EnableMeasurementEvents(i);
                }
            },
        };
        void Add(Instrument i, double v, ReadOnlySpan<KeyValuePair<string, object?>> tags)
        {
            string key = i.Name;
            foreach (var t in tags)
            {
                key += $"|{t.Key}={t.Value}";
            }

            lock (values)
            {
                values[key] = v;
            }
        }

        listener.SetMeasurementEventCallback<long>((i, v, t, _) => Add(i, v, t));
        listener.SetMeasurementEventCallback<int>((i, v, t, _) => Add(i, v, t));
        listener.Start();
        double Get(string key)
        {
            lock (values)
            {
                values.Clear();
            }

            listener.RecordObservableInstruments();
            lock (values)
            {
                return values.TryGetValue(key, out double v) ? v : double.NaN;
            }
        }

        host.Vhost.CreateBlkController("mx", "Malloc0", null, false);
        const string Tags = "|controller=mx|type=vhost_blk";
        Assert.Equal(0, Get("vhost.controller.sessions" + Tags));
        Assert.Equal(0, Get("vhost.controller.queues" + Tags));

        var fe = host.Connect("mx");
        fe.Negotiate(WantProtocol);
        Assert.Equal(0UL, fe.SetU64(VhostUserRequest.SetFeatures, BaseFeatures));
        using var m = new DriverRingModel(16);
        Assert.Equal(0UL, fe.SetMemTable(m));
        Assert.Equal(0UL, fe.SetupQueue(m, 0, null, null));
        var drv = new BlkDriverModel(m);
        Assert.True(await VhostTestHost.WaitUntil(() => Get("vhost.controller.queues" + Tags) == 1), "queue count never reached 1");
        Assert.Equal(1, Get("vhost.controller.sessions" + Tags));

        ulong buf = m.Alloc(4096, 4096);
        for (int i = 0; i < 20; i++)
        {
            ushort target = (ushort)(m.UsedIdx + 1);
            drv.Post(VirtioBlkRequestType.Out, (ulong)i * 8, buf, 4096, false);
            Assert.True(await VhostTestHost.WaitUntil(() => m.UsedIdx == target));
        }

        Assert.Equal(20, Get("vhost.bdev.operations|bdev=Malloc0|op=write"));
        Assert.Equal(20 * 4096, Get("vhost.bdev.bytes|bdev=Malloc0|op=write"));
        Assert.Equal(0, Get("vhost.controller.inflight" + Tags));

        fe.Dispose();
        Assert.True(await VhostTestHost.WaitUntil(() => Get("vhost.controller.sessions" + Tags) == 0), "session count never went back to 0");
        Assert.Equal(0, Get("vhost.controller.queues" + Tags));
    }
}
