using VhostBackend.Bdev;
using VhostBackend.Reactors;

namespace VhostBackend.Scsi;

/// <summary>
/// A reactor's channel to one <see cref="ScsiLun"/>: its bdev channel and the list of tasks running on this
/// reactor (for task management and hot-remove draining). Get it with <see cref="ScsiLun.GetIoChannel"/> on the
/// reactor, give it to tasks (<see cref="ScsiTask.Channel"/>), release it with <see cref="Release"/> on the same
/// reactor. Used only on its reactor, so nothing here takes a lock.
/// </summary>
public sealed class ScsiLunChannel
{
    private ScsiTask? _head;
    private ScsiRemoveOperation? _drain;

    internal ScsiLunChannel(ScsiLun lun, Reactor reactor)
    {
        Lun = lun;
        Reactor = reactor;
        if (!lun.IsRemoved)
        {
            try
            {
                BdevChannel = lun.Desc.GetIoChannel();
            }
            catch (InvalidOperationException)
            {
                BdevChannel = null; // the bdev is going away; commands get LOGICAL UNIT NOT SUPPORTED
            }
        }
    }

    public ScsiLun Lun { get; }
    public Reactor Reactor { get; }

    /// <summary>The bdev channel; null once the LUN was removed and this channel drained.</summary>
    public BdevChannel? BdevChannel { get; private set; }

    /// <summary>Tasks executing on this channel.</summary>
    public int Outstanding { get; private set; }

    internal IoChannel? IoChannel { get; set; }

    /// <summary>Drops this reference (on <see cref="Reactor"/>); the last one releases the bdev channel.</summary>
    public void Release() => IoChannel!.Release();

    internal void Track(ScsiTask task)
    {
        task.TrackedBy = this;
        task.Prev = null;
        task.Next = _head;
        if (_head is not null)
        {
            _head.Prev = task;
        }

        _head = task;
        Outstanding++;
    }

    internal void Untrack(ScsiTask task)
    {
        if (task.Prev is not null)
        {
            task.Prev.Next = task.Next;
        }
        else
        {
            _head = task.Next;
        }

        if (task.Next is not null)
        {
            task.Next.Prev = task.Prev;
        }

        task.Prev = task.Next = null;
        task.TrackedBy = null;
        Outstanding--;
        if (Outstanding == 0 && _drain is not null)
        {
            // Not inline: we may be inside the bdev layer's completion of this channel's last I/O.
            Reactor.Send(static c => ((ScsiLunChannel)c!).FinishDrain(), this);
        }
    }

    /// <summary>Applies a task management function to the tasks on this channel (runs on <see cref="Reactor"/>).</summary>
    internal void ApplyTmf(ScsiTmfOperation op)
    {
        for (var t = _head; t is not null; t = t.Next)
        {
            bool match = op.Function switch
            {
                ScsiTaskManagementFunction.AbortTask or ScsiTaskManagementFunction.QueryTask => t.Tag == op.Tag,
                _ => true,
            };

            if (!match)
            {
                continue;
            }

            op.MarkFound();
            if (op.Function is ScsiTaskManagementFunction.QueryTask or ScsiTaskManagementFunction.QueryTaskSet)
            {
                continue;
            }

            t.AbortRequested = true;
            (t.TmfWaiters ??= new List<ScsiTmfOperation>()).Add(op);
            op.AddPending();
        }
    }

    /// <summary>Hot remove: waits until no task runs here, then releases the bdev channel and signals <paramref name="op"/>.</summary>
    internal void BeginDrain(ScsiRemoveOperation op)
    {
        if (_drain is not null || BdevChannel is null)
        {
            op.Signal();
            return;
        }

        _drain = op;
        if (Outstanding == 0)
        {
            FinishDrain();
        }
    }

    private void FinishDrain()
    {
        if (_drain is not { } op || Outstanding != 0)
        {
            return;
        }

        _drain = null;
        if (BdevChannel is { } ch)
        {
            BdevChannel = null;
            BdevDesc.PutIoChannel(ch);
        }

        op.Signal();
    }

    internal void Destroy()
    {
        if (BdevChannel is { } ch)
        {
            BdevChannel = null;
            BdevDesc.PutIoChannel(ch);
        }

        _drain?.Signal();
        _drain = null;
    }
}

/// <summary>Counts channels still draining for a hot remove; the last signal finishes the removal.</summary>
internal sealed class ScsiRemoveOperation
{
    private readonly Action _done;
    private int _pending;

    public ScsiRemoveOperation(int pending, Action done)
    {
        _pending = pending;
        _done = done;
    }

    public void Signal()
    {
        if (Interlocked.Decrement(ref _pending) == 0)
        {
            _done();
        }
    }
}

/// <summary>One task management function in progress: completes when every task it aborted has completed.</summary>
internal sealed class ScsiTmfOperation
{
    private readonly Reactor? _origin;
    private readonly ScsiTmfCompletion _callback;
    private readonly object? _state;
    private readonly ScsiLun[] _resetLuns;
    private int _pending = 1;
    private int _found;

    public ScsiTmfOperation(ScsiTaskManagementFunction fn, ulong tag, ScsiLun[] resetLuns, ScsiTmfCompletion cb, object? state)
    {
        Function = fn;
        Tag = tag;
        _resetLuns = resetLuns;
        _callback = cb;
        _state = state;
        _origin = Reactor.Current;
    }

    public ScsiTaskManagementFunction Function { get; }
    public ulong Tag { get; }

    public void MarkFound() => Volatile.Write(ref _found, 1);

    public void AddPending() => Interlocked.Increment(ref _pending);

    /// <summary>Drops one pending reference; the last one completes the function on the caller's reactor.</summary>
    public void Release()
    {
        if (Interlocked.Decrement(ref _pending) != 0)
        {
            return;
        }

        foreach (var lun in _resetLuns)
        {
            lun.SetResetUnitAttention();
        }

        bool found = Volatile.Read(ref _found) != 0;
        var response = Function is ScsiTaskManagementFunction.QueryTask or ScsiTaskManagementFunction.QueryTaskSet && found
            ? ScsiTaskManagementResponse.Succeeded
            : ScsiTaskManagementResponse.Complete;
        Deliver(_origin, _callback, _state, response);
    }

    public static void Deliver(Reactor? origin, ScsiTmfCompletion cb, object? state, ScsiTaskManagementResponse response)
    {
        if (origin is not null)
        {
            origin.Send(_ => cb(response, state), null);
        }
        else
        {
            ThreadPool.UnsafeQueueUserWorkItem(_ => cb(response, state), null);
        }
    }
}

/// <summary>Completion of <see cref="ScsiDevice.TaskManagement"/>: runs once on the calling reactor.</summary>
public delegate void ScsiTmfCompletion(ScsiTaskManagementResponse response, object? state);
