using System.Runtime.InteropServices;
using VhostBackend.Bdev;
using VhostBackend.BdevMalloc;
using VhostBackend.Platform;
using VhostBackend.Reactors;
using ReactorT = VhostBackend.Reactors.Reactor;

namespace VhostBackend.Scsi.Tests;

/// <summary>What a command returned, copied out of the task in its completion callback.</summary>
internal sealed record ScsiResult(ScsiStatus Status, byte[] Sense, byte[] Data, ulong DataTransferred, ulong Residual, bool Aborted)
{
    public SenseKey Key => Sense.Length >= 14 ? (SenseKey)(Sense[2] & 0x0F) : SenseKey.NoSense;
    public byte Asc => Sense.Length >= 14 ? Sense[12] : (byte)0;
    public byte Ascq => Sense.Length >= 14 ? Sense[13] : (byte)0;

    public void AssertGood()
    {
        Assert.True(Status == ScsiStatus.Good, $"expected GOOD, got {Status} sense {Key}/{Asc:x2}/{Ascq:x2}");
    }

    public void AssertSense(SenseKey key, byte asc, byte ascq = 0)
    {
        Assert.Equal(ScsiStatus.CheckCondition, Status);
        Assert.Equal(0x70, Sense[0]);
        Assert.Equal(10, Sense[7]);
        Assert.Equal((key, asc, ascq), (Key, Asc, Ascq));
    }
}

/// <summary>A started single-reactor runtime (unpinned), a bdev manager and one SCSI target on the main reactor.</summary>
internal sealed class ScsiHarness : IAsyncDisposable
{
    private readonly Dictionary<int, ScsiLunChannel> _channels = new();

    public ScsiHarness()
    {
        Runtime = new ReactorRuntime(CpuSet.Of(CpuSet.Online().Cores[0]), new ReactorOptions { PinThreads = false, Mode = ReactorMode.Adaptive, AdaptiveIdleMicroseconds = 200 });
        Runtime.Start();
        Manager = new BdevManager();
        Device = new ScsiDevice("scsi0");
    }

    public ReactorRuntime Runtime { get; }
    public ReactorT Reactor => Runtime.Main;
    public BdevManager Manager { get; }
    public ScsiDevice Device { get; }

    public MallocBdev AddMalloc(string name, ulong blocks = 1024, uint blockSize = 512)
    {
        var b = new MallocBdev(name, blocks, blockSize);
        Manager.Register(b);
        return b;
    }

    public Task<ScsiLun> AttachAsync(string bdev, int lunId = 0, bool readOnly = false, ScsiLunOptions? options = null) =>
        Reactor.InvokeAsync(() =>
        {
            var lun = ScsiLun.Open(Manager, bdev, readOnly, options);
            Device.AttachLun(lunId, lun);
            _channels[lunId] = lun.GetIoChannel();
            return lun;
        });

    public Task ReleaseChannelAsync(int lunId) => Reactor.InvokeAsync(() =>
    {
        if (_channels.Remove(lunId, out var ch))
        {
            ch.Release();
        }
    });

    public ScsiLunChannel? ChannelOf(int lunId) => _channels.GetValueOrDefault(lunId);

    /// <summary>Data-in command: a buffer of <paramref name="dataInLength"/> bytes, split in <paramref name="segments"/> iovecs.</summary>
    public Task<ScsiResult> RunIn(byte[] cdb, int dataInLength, int lun = 0, int segments = 1, ulong tag = 0) =>
        Run(cdb, dataInLength == 0 ? ScsiDataDirection.None : ScsiDataDirection.FromDevice, new byte[dataInLength], lun, segments, tag);

    public Task<ScsiResult> RunOut(byte[] cdb, byte[] dataOut, int lun = 0, int segments = 1, ulong tag = 0) =>
        Run(cdb, dataOut.Length == 0 ? ScsiDataDirection.None : ScsiDataDirection.ToDevice, dataOut, lun, segments, tag);

    public async Task<ScsiResult> Run(byte[] cdb, ScsiDataDirection dir, byte[] data, int lun, int segments, ulong tag)
    {
        var pending = Start(cdb, dir, data, lun, segments, tag);
        return await pending.ConfigureAwait(false);
    }

    /// <summary>Starts a command on the reactor and returns the task that completes with its result.</summary>
    public unsafe Task<ScsiResult> Start(byte[] cdb, ScsiDataDirection dir, byte[] data, int lun = 0, int segments = 1, ulong tag = 0)
    {
        var tcs = new TaskCompletionSource<ScsiResult>(TaskCreationOptions.RunContinuationsAsynchronously);
        int len = data.Length;
        byte* buf = (byte*)NativeMemory.AlignedAlloc((nuint)Math.Max(len, 1), 4096);
        data.AsSpan().CopyTo(new Span<byte>(buf, len));
        var iovs = new List<IoVec>();
        if (len > 0)
        {
            segments = Math.Max(1, Math.Min(segments, len));
            int per = len / segments;
            int off = 0;
            for (int i = 0; i < segments; i++)
            {
                int l = i == segments - 1 ? len - off : per;
                iovs.Add(new IoVec((nint)(buf + off), (nuint)l));
                off += l;
            }
        }

        var state = new RunState(tcs, (nint)buf, len, dir);
        Reactor.Send(_ =>
        {
            var task = new ScsiTask();
            task.SetCdb(cdb);
            task.LunId = lun;
            task.Tag = tag;
            task.SetData(dir, iovs.ToArray());
            task.SetCompletion(static (t, s) => ((RunState)s!).Complete(t), state);
            task.Channel = _channels.GetValueOrDefault(lun);
            try
            {
                Device.Execute(task);
            }
            catch (Exception e)
            {
                tcs.TrySetException(e);
            }
        }, null);
        return tcs.Task;
    }

    private sealed unsafe class RunState(TaskCompletionSource<ScsiResult> tcs, nint buffer, int length, ScsiDataDirection dir)
    {
        private int _completions;

        public void Complete(ScsiTask t)
        {
            if (Interlocked.Increment(ref _completions) != 1)
            {
                tcs.TrySetException(new InvalidOperationException("completion fired twice"));
                return;
            }

            if (ReactorT.Current is null)
            {
                tcs.TrySetException(new InvalidOperationException("completion off the reactor"));
                return;
            }

            var data = dir == ScsiDataDirection.FromDevice ? new ReadOnlySpan<byte>((void*)buffer, length).ToArray() : [];
            var r = new ScsiResult(t.Status, t.Sense.ToArray(), data, t.DataTransferred, t.Residual, t.Aborted);
            NativeMemory.AlignedFree((void*)buffer);
            tcs.TrySetResult(r);
        }
    }

    public async ValueTask DisposeAsync()
    {
        await Reactor.InvokeAsync(() =>
        {
            foreach (var ch in _channels.Values)
            {
                ch.Release();
            }

            _channels.Clear();
        });
        await Runtime.DisposeAsync();
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

/// <summary>CDB builders.</summary>
internal static class Cdb
{
    public static byte[] Tur() => new byte[6];

    public static byte[] Inquiry(bool evpd, byte page, ushort alloc) => [ScsiOp.Inquiry, (byte)(evpd ? 1 : 0), page, (byte)(alloc >> 8), (byte)alloc, 0];

    public static byte[] ReadCapacity10() => [ScsiOp.ReadCapacity10, 0, 0, 0, 0, 0, 0, 0, 0, 0];

    public static byte[] ReadCapacity16(uint alloc = 32)
    {
        var c = new byte[16];
        c[0] = ScsiOp.ServiceActionIn16;
        c[1] = ScsiOp.SaReadCapacity16;
        Be32(c, 10, alloc);
        return c;
    }

    public static byte[] Rw10(bool write, uint lba, ushort blocks, bool fua = false)
    {
        var c = new byte[10];
        c[0] = write ? ScsiOp.Write10 : ScsiOp.Read10;
        c[1] = (byte)(fua ? 0x08 : 0);
        Be32(c, 2, lba);
        c[7] = (byte)(blocks >> 8);
        c[8] = (byte)blocks;
        return c;
    }

    public static byte[] Rw6(bool write, uint lba, byte blocks) => [write ? ScsiOp.Write6 : ScsiOp.Read6, (byte)((lba >> 16) & 0x1F), (byte)(lba >> 8), (byte)lba, blocks, 0];

    public static byte[] Rw12(bool write, uint lba, uint blocks)
    {
        var c = new byte[12];
        c[0] = write ? ScsiOp.Write12 : ScsiOp.Read12;
        Be32(c, 2, lba);
        Be32(c, 6, blocks);
        return c;
    }

    public static byte[] Rw16(bool write, ulong lba, uint blocks, bool fua = false)
    {
        var c = new byte[16];
        c[0] = write ? ScsiOp.Write16 : ScsiOp.Read16;
        c[1] = (byte)(fua ? 0x08 : 0);
        Be64(c, 2, lba);
        Be32(c, 10, blocks);
        return c;
    }

    public static byte[] WriteSame16(ulong lba, uint blocks, bool unmap = false, bool ndob = false)
    {
        var c = new byte[16];
        c[0] = ScsiOp.WriteSame16;
        c[1] = (byte)((unmap ? 0x08 : 0) | (ndob ? 0x01 : 0));
        Be64(c, 2, lba);
        Be32(c, 10, blocks);
        return c;
    }

    public static byte[] WriteSame10(uint lba, ushort blocks, bool unmap = false)
    {
        var c = new byte[10];
        c[0] = ScsiOp.WriteSame10;
        c[1] = (byte)(unmap ? 0x08 : 0);
        Be32(c, 2, lba);
        c[7] = (byte)(blocks >> 8);
        c[8] = (byte)blocks;
        return c;
    }

    public static byte[] Unmap(ushort paramLen) => [ScsiOp.Unmap, 0, 0, 0, 0, 0, 0, (byte)(paramLen >> 8), (byte)paramLen, 0];

    public static byte[] UnmapParams(params (ulong Lba, uint Count)[] descs)
    {
        var p = new byte[8 + (16 * descs.Length)];
        Be16(p, 0, (ushort)(p.Length - 2));
        Be16(p, 2, (ushort)(16 * descs.Length));
        for (int i = 0; i < descs.Length; i++)
        {
            Be64(p, 8 + (16 * i), descs[i].Lba);
            Be32(p, 16 + (16 * i), descs[i].Count);
        }

        return p;
    }

    public static byte[] SyncCache10(uint lba = 0, ushort blocks = 0) => [ScsiOp.SynchronizeCache10, 0, (byte)(lba >> 24), (byte)(lba >> 16), (byte)(lba >> 8), (byte)lba, 0, (byte)(blocks >> 8), (byte)blocks, 0];

    public static byte[] Verify10(uint lba, ushort blocks, int bytchk)
    {
        var c = new byte[10];
        c[0] = ScsiOp.Verify10;
        c[1] = (byte)(bytchk << 1);
        Be32(c, 2, lba);
        c[7] = (byte)(blocks >> 8);
        c[8] = (byte)blocks;
        return c;
    }

    public static byte[] ModeSense6(byte page, byte alloc = 255, bool dbd = false, int pc = 0, byte subpage = 0) =>
        [ScsiOp.ModeSense6, (byte)(dbd ? 0x08 : 0), (byte)((pc << 6) | page), subpage, alloc, 0];

    public static byte[] ModeSense10(byte page, ushort alloc = 512, bool dbd = false, bool llbaa = false, int pc = 0) =>
        [ScsiOp.ModeSense10, (byte)((dbd ? 0x08 : 0) | (llbaa ? 0x10 : 0)), (byte)((pc << 6) | page), 0, 0, 0, 0, (byte)(alloc >> 8), (byte)alloc, 0];

    public static byte[] ReportLuns(uint alloc = 4096, byte select = 0)
    {
        var c = new byte[12];
        c[0] = ScsiOp.ReportLuns;
        c[2] = select;
        Be32(c, 6, alloc);
        return c;
    }

    public static byte[] RequestSense(byte alloc = 252, bool desc = false) => [ScsiOp.RequestSense, (byte)(desc ? 1 : 0), 0, 0, alloc, 0];

    public static void Be16(byte[] b, int o, ushort v) => System.Buffers.Binary.BinaryPrimitives.WriteUInt16BigEndian(b.AsSpan(o), v);

    public static void Be32(byte[] b, int o, uint v) => System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(b.AsSpan(o), v);

    public static void Be64(byte[] b, int o, ulong v) => System.Buffers.Binary.BinaryPrimitives.WriteUInt64BigEndian(b.AsSpan(o), v);

    public static ushort U16(byte[] b, int o) => System.Buffers.Binary.BinaryPrimitives.ReadUInt16BigEndian(b.AsSpan(o));

    public static uint U32(byte[] b, int o) => System.Buffers.Binary.BinaryPrimitives.ReadUInt32BigEndian(b.AsSpan(o));

    public static ulong U64(byte[] b, int o) => System.Buffers.Binary.BinaryPrimitives.ReadUInt64BigEndian(b.AsSpan(o));
}
