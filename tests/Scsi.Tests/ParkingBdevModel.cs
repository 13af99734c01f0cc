using VhostBackend.Bdev;
using VhostBackend.Reactors;

namespace VhostBackend.Scsi.Tests;

/// <summary>
/// Test model of a slow or failing bdev: every I/O is parked until <see cref="CompleteAllAsync"/> completes it
/// with the chosen status (and NVMe status word), so tests can hold commands in flight.
/// </summary>
internal sealed class ParkingBdevModel : Bdev.Bdev
{
    private readonly List<BdevIo> _parked = new();
    private readonly ModelDevice _device = new();

    public ParkingBdevModel(string name, ulong blocks = 1024, uint blockSize = 512)
        : base(name, "Parking model", blockSize, blocks)
    {
        WriteCache = true;
    }

    public int ParkedCount
    {
        get
        {
            lock (_parked)
            {
                return _parked.Count;
            }
        }
    }

    public override bool SupportsIoType(BdevIoType type) => true;

    protected override IoChannel GetModuleChannel(Reactor reactor) => reactor.GetIoChannel(_device);

    protected override void Submit(IoChannel moduleChannel, BdevIo io)
    {
        lock (_parked)
        {
            _parked.Add(io);
        }
    }

    /// <summary>Completes every parked I/O on <paramref name="reactor"/> with <paramref name="status"/>.</summary>
    public Task CompleteAllAsync(Reactor reactor, BdevIoStatus status = BdevIoStatus.Success, int nvmeStatus = 0) =>
        reactor.InvokeAsync(() =>
        {
            BdevIo[] ios;
            lock (_parked)
            {
                ios = _parked.ToArray();
                _parked.Clear();
            }

            foreach (var io in ios)
            {
                io.NvmeStatus = nvmeStatus;
                io.Complete(status);
            }
        });

    private sealed class ModelDevice : IoDevice
    {
        public ModelDevice()
            : base("parking-model")
        {
        }

        protected override object CreateChannelContext(Reactor reactor) => this;

        protected override void DestroyChannelContext(Reactor reactor, object context)
        {
        }
    }
}
