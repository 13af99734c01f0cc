using System.Buffers.Binary;
using System.Runtime.InteropServices;
using VhostBackend.Bdev;
using VhostBackend.BdevMalloc;
using VhostBackend.Platform;
using VhostBackend.Reactors;
using VhostBackend.Scsi;

namespace VhostBackend.Fuzz;

/// <summary>
/// scsi-cdb: arbitrary commands through a real <see cref="ScsiDevice"/> on a started reactor, LUN 0 on a
/// 512-byte-block malloc bdev, LUN 1 read-only on a 4096-byte-block one (LUNs 2 and 3 do not exist).
///
/// Input: up to 8 commands, each a 5-byte header (byte 0: bits 0-1 direction 0 none / 1 and 3 data-out / 2
/// data-in, bits 2-3 LUN; byte 1: CDB length 1..32; bytes 2-3: data length, big endian; byte 4: iovec count
/// 1..16), the CDB, then for data-out the data bytes (zero-filled when the input ends). The data buffer is
/// guarded by 64 bytes on each side. Findings: an exception out of Execute, a command that does not complete
/// (or completes twice, or off the reactor), an undefined status, a write outside the buffer, a transfer count
/// past the buffer.
/// </summary>
internal sealed class ScsiCdbTarget : IFuzzTarget
{
    private const int Guard = 64;
    private const byte GuardByte = 0xA5;

    private readonly ReactorRuntime _runtime;
    private readonly ScsiDevice _device = new("fuzz");
    private readonly Dictionary<int, ScsiLunChannel> _channels = new();

    public ScsiCdbTarget()
    {
        _runtime = new ReactorRuntime(CpuSet.Of(CpuSet.Online().Cores[0]), new ReactorOptions { PinThreads = false, Mode = ReactorMode.Interrupt });
        _runtime.Start();
        var manager = new BdevManager();
        manager.Register(new MallocBdev("Malloc0", 2048, 512));
        manager.Register(new MallocBdev("Malloc1", 256, 4096));
        _runtime.Main.InvokeAsync(() =>
        {
            Attach(manager, "Malloc0", 0, readOnly: false);
            Attach(manager, "Malloc1", 1, readOnly: true);
        }).GetAwaiter().GetResult();
    }

    private void Attach(BdevManager manager, string bdev, int id, bool readOnly)
    {
        var lun = ScsiLun.Open(manager, bdev, readOnly);
        _device.AttachLun(id, lun);
        _channels[id] = lun.GetIoChannel();
    }

    public void Run(ReadOnlySpan<byte> input)
    {
        for (int c = 0; c < 8 && input.Length >= 5; c++)
        {
            var dir = (input[0] & 3) switch
            {
                0 => ScsiDataDirection.None,
                2 => ScsiDataDirection.FromDevice,
                _ => ScsiDataDirection.ToDevice,
            };
            int lun = (input[0] >> 2) & 3;
            int cdbLength = Math.Clamp((int)input[1], 1, ScsiTask.MaxCdbLength);
            int length = BinaryPrimitives.ReadUInt16BigEndian(input[2..]);
            int iovCount = Math.Clamp(input[4] & 15, 1, 16);
            input = input[5..];
            var cdb = new byte[cdbLength];
            input[..Math.Min(cdbLength, input.Length)].CopyTo(cdb);
            input = input[Math.Min(cdbLength, input.Length)..];
            if (dir == ScsiDataDirection.None)
            {
                length = 0;
            }

            var buffer = GC.AllocateArray<byte>(length + (2 * Guard), pinned: true);
            buffer.AsSpan().Fill(GuardByte);
            if (dir == ScsiDataDirection.ToDevice)
            {
                var data = buffer.AsSpan(Guard, length);
                data.Clear();
                input[..Math.Min(length, input.Length)].CopyTo(data);
                input = input[Math.Min(length, input.Length)..];
            }

            Execute(cdb, dir, lun, buffer, length, iovCount);
        }
    }

    private void Execute(byte[] cdb, ScsiDataDirection dir, int lun, byte[] buffer, int length, int iovCount)
    {
        nint data = Marshal.UnsafeAddrOfPinnedArrayElement(buffer, Guard);
        var iovs = new List<IoVec>();
        if (length > 0)
        {
            iovCount = Math.Min(iovCount, length);
            int per = length / iovCount;
            for (int i = 0, off = 0; i < iovCount; i++, off += per)
            {
                iovs.Add(new IoVec(data + off, (nuint)(i == iovCount - 1 ? length - off : per)));
            }
        }

        var done = new TaskCompletionSource<(ScsiStatus Status, ulong Transferred)>(TaskCreationOptions.RunContinuationsAsynchronously);
        int completions = 0;
        _runtime.Main.Send(_ =>
        {
            var task = new ScsiTask();
            if (!task.SetCdb(cdb))
            {
                done.TrySetResult((ScsiStatus.Good, 0));
                return;
            }

            task.LunId = lun;
            task.SetData(dir, iovs.ToArray());
            task.Channel = _channels.GetValueOrDefault(lun);
            task.SetCompletion(
                (t, _) =>
                {
                    if (Interlocked.Increment(ref completions) != 1)
                    {
                        done.TrySetException(new FuzzFindingException("completion fired twice"));
                    }
                    else if (Reactor.Current is null)
                    {
                        done.TrySetException(new FuzzFindingException("completion off the reactor"));
                    }
                    else
                    {
                        done.TrySetResult((t.Status, t.DataTransferred));
                    }
                },
                null);
            try
            {
                _device.Execute(task);
            }
            catch (Exception e)
            {
                done.TrySetException(e);
            }
        }, null);

        if (!done.Task.Wait(TimeSpan.FromSeconds(20)))
        {
            throw new FuzzFindingException($"CDB {Convert.ToHexString(cdb)} did not complete");
        }

        var (status, transferred) = done.Task.Result;
        if (!Enum.IsDefined(status))
        {
            throw new FuzzFindingException($"CDB {Convert.ToHexString(cdb)}: undefined status {status}");
        }

        if (transferred > (ulong)length)
        {
            throw new FuzzFindingException($"CDB {Convert.ToHexString(cdb)}: {transferred} bytes transferred into a buffer of {length}");
        }

        if (buffer.AsSpan(0, Guard).ContainsAnyExcept(GuardByte) || buffer.AsSpan(Guard + length).ContainsAnyExcept(GuardByte))
        {
            throw new FuzzFindingException($"CDB {Convert.ToHexString(cdb)}: wrote outside its {length}-byte buffer");
        }
    }
}
