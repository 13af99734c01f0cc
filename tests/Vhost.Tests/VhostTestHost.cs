using VhostBackend.Bdev;
using VhostBackend.BdevMalloc;
using VhostBackend.Platform;
using VhostBackend.Reactors;
using VhostBackend.Virtio;
using VhostBackend.Virtio.Blk;
using VhostBackend.Virtio.Tests;

namespace VhostBackend.Vhost.Tests;

/// <summary>A reactor runtime, a bdev manager with a malloc bdev and a vhost manager on a temporary socket directory.</summary>
internal sealed class VhostTestHost : IAsyncDisposable
{
    public VhostTestHost(int reactors = 2, ReactorMode mode = ReactorMode.Poll, ulong blocks = 2048, uint blockSize = 512)
    {
        var online = CpuSet.Online().Cores;
        var cores = Enumerable.Range(0, reactors).Select(i => online[i % online.Count]).Distinct().ToArray();
        Runtime = new ReactorRuntime(CpuSet.Of(cores), new ReactorOptions { Mode = mode, PinThreads = false, AdaptiveIdleMicroseconds = 500 });
        Runtime.Start();
        SocketDir = Path.Combine(Path.GetTempPath(), "vhost-test-" + Guid.NewGuid().ToString("N")[..8]);
        Directory.CreateDirectory(SocketDir);
        Bdev = new MallocBdev("Malloc0", blocks, blockSize);
        Bdevs.Register(Bdev);
        Vhost = new VhostManager(Runtime, Bdevs, SocketDir, Log);
    }

    public TestLoggerFactory Log { get; } = new();

    public ReactorRuntime Runtime { get; }
    public BdevManager Bdevs { get; } = new();
    public MallocBdev Bdev { get; }
    public VhostManager Vhost { get; }
    public string SocketDir { get; }

    public FrontEndModel Connect(string ctrlr) => new(UnixConnection.Connect(Path.Combine(SocketDir, ctrlr)));

    public async ValueTask DisposeAsync()
    {
        await Vhost.DisposeAsync();
        await Runtime.DisposeAsync();
        try
        {
            Directory.Delete(SocketDir, true);
        }
        catch (IOException)
        {
        }
    }

    public static async Task<bool> WaitUntil(Func<bool> cond, int timeoutMs = 5000)
    {
        long deadline = Environment.TickCount64 + timeoutMs;
        while (!cond())
        {
            if (Environment.TickCount64 > deadline)
            {
                return false;
            }

            await Task.Delay(2);
        }

        return true;
    }
}

/// <summary>A model of the guest's virtio-blk driver on top of <see cref="DriverRingModel"/>: builds requests as Linux does.</summary>
internal sealed unsafe class BlkDriverModel
{
    private readonly DriverRingModel _m;
    private int _nextDesc;

    public BlkDriverModel(DriverRingModel m) => _m = m;

    public DriverRingModel Ring => _m;

    /// <summary>Posts header / data / status as three descriptors; returns the status byte's guest address.</summary>
    public ulong Post(uint type, ulong sector, ulong dataGpa, uint dataLen, bool deviceWritesData, bool splitHeader = false)
    {
        ulong hdr = _m.Alloc(16);
        ulong status = _m.Alloc(1);
        var h = (VirtioBlkOutHeader*)_m.Host(hdr);
        h->Type = type;
        h->IoPrio = 0;
        h->Sector = sector;
        *_m.Host(status) = 0xff;
        int head = Take();
        int d = head;
        if (splitHeader)
        {
            int d2 = Take();
            _m.SetDesc(d, hdr, 7, VirtqDesc.FlagNext, (ushort)d2);
            d = d2;
            int d3 = Take();
            _m.SetDesc(d, hdr + 7, 9, VirtqDesc.FlagNext, (ushort)d3);
            d = d3;
        }
        else
        {
            int n = Take();
            _m.SetDesc(d, hdr, 16, VirtqDesc.FlagNext, (ushort)n);
            d = n;
        }

        if (dataLen > 0)
        {
            int n = Take();
            _m.SetDesc(d, dataGpa, dataLen, (ushort)(VirtqDesc.FlagNext | (deviceWritesData ? VirtqDesc.FlagWrite : 0)), (ushort)n);
            d = n;
        }

        _m.SetDesc(d, status, 1, VirtqDesc.FlagWrite);
        _m.Publish((ushort)head);
        return status;
    }

    private int Take()
    {
        int d = _nextDesc;
        _nextDesc = (_nextDesc + 1) % _m.Size;
        return d;
    }

    public byte Status(ulong statusGpa) => *_m.Host(statusGpa);

    public static void Write<T>(DriverRingModel m, ulong gpa, T value)
        where T : unmanaged => *(T*)m.Host(gpa) = value;
}
