using System.Buffers.Binary;
using VhostBackend.Bdev;
using VhostBackend.BdevNvme;
using VhostBackend.Nvme;
using VhostBackend.Nvme.Tests;
using VhostBackend.Platform;
using VhostBackend.Rpc;
using VhostBackend.VhostUser;
using VhostBackend.Virtio;
using VhostBackend.Virtio.Blk;
using VhostBackend.Virtio.Scsi;
using VhostBackend.Virtio.Tests;
using Xunit;

namespace VhostBackend.Vhost.Tests;

/// <summary>
/// An NVMe namespace bdev (the module over the in-process controller MODEL, with its device request notifier) served
/// by vhost-blk and vhost-scsi at once; the "kernel" asks for the device back: the blk queue answers IOERR, the SCSI
/// target goes away with a TRANSPORT_RESET/REMOVED event, the controller's name is free and attaching it again works.
/// </summary>
public sealed class NvmeHotRemovalTests
{
    private const ulong BlkProtocol = (1UL << VhostUserProtocolFeature.ReplyAck) | (1UL << VhostUserProtocolFeature.Config);
    private const ulong BlkFeatures = (1UL << VirtioFeatures.Version1) | (1UL << VhostUserConstants.ProtocolFeaturesBit);
    private const ulong ScsiProtocol = (1UL << VhostUserProtocolFeature.ReplyAck) | (1UL << VhostUserProtocolFeature.Mq);
    private static readonly ulong ScsiFeatures = (1UL << VirtioFeatures.Version1) | (1UL << VhostUserConstants.ProtocolFeaturesBit)
        | (1UL << VirtioScsiFeature.Hotplug) | (1UL << VirtioScsiFeature.Change);

    [Fact]
    public async Task RemovedNvmeDeviceFailsBlkRequestsWithIoErrAndRemovesTheScsiLunWithAnEvent()
    {
        await using var host = new VhostTestHost(reactors: 2);
        var space = new DmaSpace(IdentityDmaMapper.Instance);
        var models = new List<NvmeControllerModel>();
        var requests = new List<EventFd>();
        int releases = 0;
        var module = NvmeBdevModule.WithAttach((addr, opts, log) =>
        {
            var model = new NvmeControllerModel(space, blocks: 4096, blockSize: 512);
            var ctrl = NvmeController.Attach(addr, model, space, opts, log);
            var req = new EventFd();
            lock (models)
            {
                models.Add(model);
                requests.Add(req);
            }

            ctrl.UseRemovalNotifier(req, () =>
            {
                Interlocked.Increment(ref releases);
                model.Removed = true; // BAR0 reads all ones once the device is given back
            });
            return ctrl;
        });
        host.Bdevs.AddModule(module);
        module.Init(new BdevModuleContext(host.Bdevs, host.Runtime, new RpcRegistry(), new SubsystemRegistry(), host.Log));
        try
        {
            await host.Runtime.Main.InvokeAsync(() => module.AttachAsync("Nvme0", "0000:00:04.0"));

            // vhost-blk on the namespace, a front end with one queue; a read works.
            var blk = host.Vhost.CreateBlkController("blk.nvme", "Nvme0n1", null, false);
            using var bfe = host.Connect("blk.nvme");
            bfe.Negotiate(BlkProtocol);
            Assert.Equal(0UL, bfe.SetU64(VhostUserRequest.SetFeatures, BlkFeatures));
            using var bm = new DriverRingModel(16);
            Assert.Equal(0UL, bfe.SetMemTable(bm));
            Assert.Equal(0UL, bfe.SetupQueue(bm, 0, null, null));
            var drv = new BlkDriverModel(bm);
            ulong buf = bm.Alloc(4096, 4096);
            ulong st1 = drv.Post(VirtioBlkRequestType.In, 0, buf, 4096, true);
            Assert.True(await VhostTestHost.WaitUntil(() => bm.UsedIdx == 1));
            Assert.Equal(VirtioBlkRequestType.StatusOk, drv.Status(st1));

            // vhost-scsi with the same namespace as target 0, a front end with event buffers posted.
            var scsi = host.Vhost.CreateScsiController("scsi.nvme", null);
            await host.Runtime.Main.InvokeAsync(() => host.Vhost.AddScsiTarget("scsi.nvme", 0, "Nvme0n1"));
            using var sfe = host.Connect("scsi.nvme");
            sfe.Negotiate(ScsiProtocol);
            Assert.Equal(0UL, sfe.SetU64(VhostUserRequest.SetFeatures, ScsiFeatures));
            using var em = new DriverRingModel(16, eventIdx: false);
            Assert.Equal(0UL, sfe.SetMemTable(em));
            using var kick = new EventFd();
            using var call = new EventFd();
            Assert.Equal(0UL, sfe.SetupQueue(em, VirtioScsi.EventQueue, kick, call));
            ulong ev = em.Alloc(16);
            em.SetDesc(0, ev, 16, VirtqDesc.FlagWrite);
            em.Publish(0);
            kick.Signal();
            Assert.True(await VhostTestHost.WaitUntil(() => scsi.Sessions.Single().Started));
            Assert.NotNull(scsi.GetTarget(0));

            // The kernel wants the device back (unbind from vfio-pci, or the PCI device removed).
            requests[0].Signal();
            Assert.True(await VhostTestHost.WaitUntil(() => em.UsedIdx == 1, 15000), "no hotplug event reached the SCSI front end");
            var e = em.Bytes(ev, 16);
            Assert.Equal(VirtioScsi.TTransportReset, BinaryPrimitives.ReadUInt32LittleEndian(e));
            Assert.Equal(0, e[5]); // target 0
            Assert.Equal(VirtioScsi.EvtResetRemoved, BinaryPrimitives.ReadUInt32LittleEndian(e[12..]));
            Assert.True(await VhostTestHost.WaitUntil(() => scsi.GetTarget(0) is null && blk.BdevName is null, 15000));

            ulong st2 = drv.Post(VirtioBlkRequestType.In, 0, buf, 4096, true);
            Assert.True(await VhostTestHost.WaitUntil(() => bm.UsedIdx == 2));
            Assert.Equal(VirtioBlkRequestType.StatusIoErr, drv.Status(st2));

            Assert.True(await VhostTestHost.WaitUntil(() => module.FindController("Nvme0") is null, 15000), "the controller was not removed");
            Assert.Null(host.Bdevs.Find("Nvme0n1"));
            Assert.Equal(1, Volatile.Read(ref releases));

            // Re-attach with the same name and address; the LUN can be added again and the blk front end keeps working (IOERR).
            var names = await host.Runtime.Main.InvokeAsync(() => module.AttachAsync("Nvme0", "0000:00:04.0"));
            Assert.Equal(new[] { "Nvme0n1" }, names);
            Assert.Equal(0, await host.Runtime.Main.InvokeAsync(() => host.Vhost.AddScsiTarget("scsi.nvme", 0, "Nvme0n1")));
            Assert.NotNull(scsi.GetTarget(0));
            ulong st3 = drv.Post(VirtioBlkRequestType.In, 0, buf, 4096, true);
            Assert.True(await VhostTestHost.WaitUntil(() => bm.UsedIdx == 3));
            Assert.Equal(VirtioBlkRequestType.StatusIoErr, drv.Status(st3)); // a vhost-blk controller does not re-open a bdev (as SPDK)
        }
        finally
        {
            await host.Vhost.DisposeAsync();
            await module.FiniAsync();
            foreach (var r in requests)
            {
                r.Dispose();
            }
        }
    }
}
