using VhostBackend.Bdev;
using VhostBackend.Platform;
using VhostBackend.Reactors;

namespace VhostBackend.BdevRaid;

/// <summary>
/// A raid1 rebuild (SPDK's raid_bdev_process of type "rebuild"): copies the array, window by window, from an
/// operational base to the target slot, on the main reactor, with one preallocated window buffer.
///
/// Before the first window every channel has been told that the target is a write target (not a read source), so
/// guest writes go to it from then on, wherever they land: a write to a range not copied yet is harmless, since the
/// copy of that range later reads the source after the write completed. The one hazard is a write racing the copy of
/// its own range (the copy could read the old data and land after the write); so each window is locked first: every
/// channel queues new writes overlapping it, and acknowledges once the writes it already had in flight there are
/// done; only then is the window read from the source and written to the target, and then unlocked (the queued
/// writes go on, to every base). Reads never come from the target until the rebuild is done and the target becomes
/// operational.
/// </summary>
internal sealed class RaidRebuild
{
    private static readonly BdevIoCompletion s_readDone = static (_, ok, arg) => ((RaidRebuild)arg!).ReadDone(ok);
    private static readonly BdevIoCompletion s_writeDone = static (_, ok, arg) => ((RaidRebuild)arg!).WriteDone(ok);

    private readonly RaidBdevModule _module;
    private readonly RaidArray _array;
    private readonly RaidBdev _bdev;
    private readonly BaseAttachment _target;
    private readonly Reactor _main;
    private readonly AlignedBuffer _buffer;
    private readonly ulong _windowBlocks;
    private readonly IoVec[] _iov = new IoVec[1];
    private readonly BdevIoWaitEntry _retry;
    private readonly HashSet<BaseAttachment> _badSources = new();
    private BdevChannel? _targetChannel;
    private BaseAttachment? _source;
    private BdevChannel? _sourceChannel;
    private ulong _windowStart;
    private ulong _windowEnd;
    private bool _writing;
    private volatile bool _abort;
    private long _offset;

    public RaidRebuild(RaidBdevModule module, RaidArray array, RaidBdev bdev, BaseAttachment target, Reactor main, uint windowSizeKb)
    {
        _module = module;
        _array = array;
        _bdev = bdev;
        _target = target;
        _main = main;
        _windowBlocks = Math.Max(1, (ulong)windowSizeKb * 1024 / bdev.BlockSize);
        _buffer = new AlignedBuffer((nuint)(_windowBlocks * bdev.BlockSize), Math.Max(4096, bdev.RequiredAlignment), zero: false);
        _retry = new BdevIoWaitEntry(static s => ((RaidRebuild)s!).Submit(), this);
    }

    public BaseAttachment Target => _target;

    /// <summary>Blocks copied so far (SPDK reports the current window's offset).</summary>
    public ulong Offset => (ulong)Interlocked.Read(ref _offset);

    public void Start()
    {
        _target.AddRef(); // held like a channel: the target is not closed under the copy
        _main.Send(static s => ((RaidRebuild)s!).Next(), this);
    }

    /// <summary>Stops after the current window (its lock is still released properly).</summary>
    public void Abort() => _abort = true;

    private void Next()
    {
        try
        {
            _targetChannel ??= _target.Desc.GetIoChannel();
        }
        catch (InvalidOperationException)
        {
            _abort = true; // the target is being hot-removed
        }

        ulong count = _bdev.BlockCount;
        if (_abort || Offset >= count)
        {
            Finish();
            return;
        }

        _windowStart = Offset;
        _windowEnd = Math.Min(count, _windowStart + _windowBlocks);
        ulong ws = _windowStart, we = _windowEnd;
        _array.CurrentWindow = (ws, we);
        var locked = new Countdown(() => _main.Send(static s => ((RaidRebuild)s!).Copy(), this));
        _bdev.Device.ForEachChannel(
            ch =>
            {
                locked.Add();
                ((RaidChannel)ch.Context).LockWindow(ws, we, locked.Signal);
            },
            locked.Signal);
    }

    private void Copy()
    {
        if (_abort)
        {
            Unlock(advance: false);
            return;
        }

        _writing = false;
        var src = _module.PickRebuildSource(_array, _target, _badSources);
        if (src is null)
        {
            _module.RebuildFailed(_array, this, "no operational base to copy from");
            _abort = true;
            Unlock(advance: false);
            return;
        }

        if (src != _source)
        {
            ReleaseSource();
            BdevChannel ch;
            try
            {
                ch = src.Desc.GetIoChannel();
            }
            catch (InvalidOperationException)
            {
                _badSources.Add(src); // being hot-removed: copy from another one
                Copy();
                return;
            }

            src.AddRef();
            _source = src;
            _sourceChannel = ch;
        }

        Submit();
    }

    private void Submit()
    {
        ulong blocks = _windowEnd - _windowStart;
        _iov[0] = _buffer.ToIoVec(0, (nuint)(blocks * _bdev.BlockSize));
        var ch = _writing ? _targetChannel! : _sourceChannel!;
        var desc = _writing ? _target.Desc : _source!.Desc;
        int rc = _writing
            ? ch.Write(desc, _iov, _windowStart, blocks, s_writeDone, this)
            : ch.Read(desc, _iov, _windowStart, blocks, s_readDone, this);
        if (rc == -Errno.ENOMEM)
        {
            ch.QueueIoWait(_retry);
            return;
        }

        if (rc != 0)
        {
            if (_writing)
            {
                WriteDone(false);
            }
            else
            {
                ReadDone(false);
            }
        }
    }

    private void ReadDone(bool ok)
    {
        if (!ok)
        {
            // The source failed: it leaves the array (degraded further); copy the window from another one.
            _badSources.Add(_source!);
            _module.ReportFailure(_array, _source!, target: false);
            Copy();
            return;
        }

        _writing = true;
        Submit();
    }

    private void WriteDone(bool ok)
    {
        if (!ok)
        {
            _abort = true;
            _module.ReportFailure(_array, _target, target: true);
            Unlock(advance: false);
            return;
        }

        Unlock(advance: true);
    }

    private void Unlock(bool advance)
    {
        _array.CurrentWindow = (0, 0);
        _bdev.Device.ForEachChannel(
            static ch => ((RaidChannel)ch.Context).UnlockWindow(),
            () => _main.Send(
                static s =>
                {
                    var (r, adv) = ((RaidRebuild, bool))s!;
                    if (adv)
                    {
                        Interlocked.Exchange(ref r._offset, (long)r._windowEnd);
                    }

                    r.Next();
                },
                (this, advance)));
    }

    private void ReleaseSource()
    {
        if (_sourceChannel is { } ch)
        {
            BdevDesc.PutIoChannel(ch);
            _sourceChannel = null;
        }

        _source?.Release();
        _source = null;
    }

    private void Finish()
    {
        ReleaseSource();
        if (_targetChannel is { } t)
        {
            BdevDesc.PutIoChannel(t);
            _targetChannel = null;
        }

        _buffer.Dispose();
        bool completed = !_abort;
        _target.Release();
        _module.RebuildFinished(_array, this, completed);
    }
}
