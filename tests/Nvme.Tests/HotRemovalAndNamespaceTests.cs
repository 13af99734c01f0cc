using VhostBackend.Nvme;
using VhostBackend.Platform;
using Xunit;

namespace VhostBackend.Nvme.Tests;

/// <summary>
/// Hot removal (the device request notifier, <see cref="NvmeController.MarkRemoved"/>, <see cref="NvmeController.ReleaseDevice"/>),
/// several namespaces and a controller with CAP.MQES 0, against the controller MODEL.
/// </summary>
public sealed unsafe class HotRemovalAndNamespaceTests : IDisposable
{
    private readonly DmaSpace _space = new(IdentityDmaMapper.Instance);
    private readonly DmaBufferPool _pool;

    public HotRemovalAndNamespaceTests() => _pool = new DmaBufferPool(_space, 4, 4096);

    public void Dispose() => _pool.Dispose();

    private static readonly NvmeCompletionCallback s_record = static (arg, status, dw0) => ((List<NvmeStatus>)arg!).Add(status);

    [Fact]
    public void ControllerWithMqesZeroIsRefusedWithAClearError()
    {
        // MQES is 0's based: 0 would be a queue of one entry (reserved). Math.Clamp(x, 2, 1) used to throw ArgumentException.
        var model = new NvmeControllerModel(_space, mqes: 0);
        var e = Assert.Throws<IOException>(() => NvmeController.Attach("mqes0", model, _space));
        Assert.Contains("CAP.MQES is 0", e.Message);
        Assert.Equal(0, model.EnableTransitions); // refused before the controller was touched
    }

    [Fact]
    public void EveryActiveNamespaceIsIdentifiedAndNamespaceNoticesAreEnabled()
    {
        var model = new NvmeControllerModel(_space, blocks: 1024);
        model.AddNamespace(3, 2048);
        model.AddNamespace(7, 512);
        using var ctrl = NvmeController.Attach("multi", model, _space);
        Assert.Equal(new uint[] { 1, 3, 7 }, ctrl.Namespaces.Select(n => n.Id).ToArray());
        Assert.Equal(new ulong[] { 1024, 2048, 512 }, ctrl.Namespaces.Select(n => n.BlockCount).ToArray());
        Assert.Equal(NvmeAsyncEvent.NamespaceAttributeNotices, model.AsyncEventConfig); // OAES offers them: AEC asks for them

        // I/O reaches each namespace's own data.
        var qp = ctrl.AllocIoQueuePair();
        Assert.True(_pool.TryGet(out nint va, out _));
        try
        {
            new Span<byte>((void*)va, 512).Fill(0x37);
            var iov = new[] { new NvmeIoVec(va, 512) };
            var st = new List<NvmeStatus>();
            Assert.Equal(0, qp.Write(ctrl.GetNamespace(3)!, 2047, 1, iov, s_record, st));
            for (int i = 0; i < 100 && st.Count == 0; i++)
            {
                qp.ProcessCompletions();
            }

            Assert.True(Assert.Single(st).IsSuccess);
            Assert.Equal(0x37, model.NamespaceDisk(3)[2047 * 512]);
            Assert.Equal(0, model.NamespaceDisk(1)[0]);

            // A namespace that goes away: Identify shows it inactive, the rescan drops it; a notice is raised once AEC allows it.
            model.RemoveNamespace(7);
            ctrl.ScanNamespaces();
            Assert.Equal(new uint[] { 1, 3 }, ctrl.Namespaces.Select(n => n.Id).ToArray());
            uint seen = 0;
            ctrl.AsyncEvent = (_, dw0) => seen = dw0;
            Assert.True(model.RaiseNamespaceChanged());
            ctrl.ProcessAdminCompletions();
            Assert.True(NvmeAsyncEvent.IsNamespaceAttributeChanged(seen));
        }
        finally
        {
            _pool.Return(va);
            qp.Dispose();
        }
    }

    [Fact]
    public void AResetAsksForNamespaceNoticesAgain()
    {
        var model = new NvmeControllerModel(_space);
        using var ctrl = NvmeController.Attach("aec", model, _space);
        Assert.Equal(NvmeAsyncEvent.NamespaceAttributeNotices, model.AsyncEventConfig);
        int before = model.AdminOpcodes.Count(o => o == NvmeAdminOpcode.SetFeatures);
        ctrl.Reset();
        for (int i = 0; i < 10; i++)
        {
            ctrl.ProcessAdminCompletions();
        }

        // Number of queues and the AEC again (a reset returns features to their defaults).
        Assert.Equal(before + 2, model.AdminOpcodes.Count(o => o == NvmeAdminOpcode.SetFeatures));
        Assert.Equal(NvmeAsyncEvent.NamespaceAttributeNotices, model.AsyncEventConfig);
    }

    [Fact]
    public void DeviceRequestIsReadFromItsEventFdAndReleaseGivesTheDeviceBackOnce()
    {
        var model = new NvmeControllerModel(_space);
        using var req = new EventFd();
        int released = 0;
        var ctrl = NvmeController.Attach("req", model, _space);
        ctrl.UseRemovalNotifier(req, () =>
        {
            released++;
            model.Removed = true; // what VfioPciDevice.Release does to BAR0: it reads all ones from now on
        });
        var qp = ctrl.AllocIoQueuePair();
        Assert.True(_pool.TryGet(out nint va, out _));
        try
        {
            Assert.Same(req, ctrl.RemovalRequestFd);
            Assert.False(ctrl.PollRemovalRequest());
            model.HoldIo = true;
            var st = new List<NvmeStatus>();
            Assert.Equal(0, qp.Read(ctrl.Namespaces[0], 0, 1, new[] { new NvmeIoVec(va, 512) }, s_record, st));
            var adminSt = new List<NvmeStatus>();
            model.HoldAdmin = true;
            var cmd = new NvmeCommand { Opcode = NvmeAdminOpcode.GetFeatures, Cdw10 = NvmeFeature.NumberOfQueues };
            Assert.Equal(0, ctrl.SubmitAdmin(ref cmd, s_record, adminSt));

            req.Signal(); // the kernel: VFIO_PCI_REQ_IRQ_INDEX
            Assert.True(ctrl.PollRemovalRequest());
            Assert.True(ctrl.PollRemovalRequest()); // sticky

            ctrl.MarkRemoved("test");
            Assert.True(ctrl.IsRemoved);
            Assert.Equal(NvmeStatus.AbortedSqDeletion, Assert.Single(adminSt)); // outstanding admin commands fail at once
            Assert.Equal(-6, ctrl.SubmitAdmin(ref cmd, s_record, adminSt)); // nothing new reaches the device
            Assert.Equal(-6, qp.Read(ctrl.Namespaces[0], 0, 1, new[] { new NvmeIoVec(va, 512) }, s_record, st));
            Assert.False(ctrl.StartReset());
            Assert.Equal(0, released); // marking does not give the device back: the owner does, off its reactors

            qp.FailOutstanding(NvmeStatus.InternalDeviceError); // the queue pair's owner fails its I/O
            Assert.Equal(NvmeStatus.InternalDeviceError, Assert.Single(st));

            ctrl.ReleaseDevice("test");
            ctrl.ReleaseDevice("test");
            Assert.Equal(1, released);
            Assert.Equal(NvmeHealth.Removed, ctrl.CheckHealth());
        }
        finally
        {
            _pool.Return(va);
            qp.Dispose(); // no queues to delete on a removed controller: kept until the controller is disposed
            ctrl.Dispose(); // frees everything without waiting for the (gone) device
        }

        Assert.Empty(ctrl.IoQueuePairs);
    }
}
