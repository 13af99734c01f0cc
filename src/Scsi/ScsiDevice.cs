using System.Buffers.Binary;
using VhostBackend.Reactors;

namespace VhostBackend.Scsi;

/// <summary>
/// A SCSI target (SPDK's spdk_scsi_dev): a table of LUNs, LUN 0 normally present. The transport resolves the LUN
/// of each request here; commands to an absent (or removed) LUN are answered as SPC requires (INQUIRY with
/// peripheral qualifier 3, REPORT LUNS, REQUEST SENSE; anything else LOGICAL UNIT NOT SUPPORTED).
/// The LUN table is changed on the control plane and read lock-free on the reactors.
/// </summary>
public sealed class ScsiDevice
{
    /// <summary>LUN ids are 0..255 (single-level peripheral addressing).</summary>
    public const int MaxLuns = 256;

    private readonly ScsiLun?[] _luns = new ScsiLun?[MaxLuns];

    public ScsiDevice(string name, int id = 0)
    {
        Name = name;
        Id = id;
    }

    public string Name { get; }
    public int Id { get; }

    /// <summary>Raised (on the LUN's opening reactor) after a LUN was hot-removed; the transport sends its removal event.</summary>
    public event Action<ScsiDevice, ScsiLun>? LunRemoved;

    /// <summary>Raised (on the LUN's opening reactor) after a LUN's capacity changed; the transport sends its parameter-change event.</summary>
    public event Action<ScsiDevice, ScsiLun>? LunResized;

    public ScsiLun? GetLun(int id) => (uint)id < MaxLuns ? Volatile.Read(ref _luns[id]) : null;

    /// <summary>Ids of the attached LUNs, ascending.</summary>
    public IEnumerable<int> LunIds
    {
        get
        {
            for (int i = 0; i < MaxLuns; i++)
            {
                if (GetLun(i) is not null)
                {
                    yield return i;
                }
            }
        }
    }

    /// <summary>Attaches <paramref name="lun"/> as LUN <paramref name="id"/>. Throws if the id is taken or out of range.</summary>
    public void AttachLun(int id, ScsiLun lun)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(id);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(id, MaxLuns);
        lock (_luns)
        {
            if (_luns[id] is not null)
            {
                throw new InvalidOperationException($"LUN {id} of {Name} is already attached");
            }

            if (lun.Device is not null)
            {
                throw new InvalidOperationException($"{lun} is already attached to {lun.Device.Name}");
            }

            lun.Device = this;
            lun.Id = id;
            Volatile.Write(ref _luns[id], lun);
        }
    }

    internal void DetachLun(ScsiLun lun)
    {
        lock (_luns)
        {
            if (lun.Id >= 0 && lun.Id < MaxLuns && _luns[lun.Id] == lun)
            {
                Volatile.Write(ref _luns[lun.Id], null);
            }
        }

        LunRemoved?.Invoke(this, lun);
    }

    internal void RaiseLunResized(ScsiLun lun) => LunResized?.Invoke(this, lun);

    /// <summary>
    /// Executes a task addressed to <c>task.LunId</c>. For a present LUN <c>task.Channel</c> must be that LUN's
    /// channel on this reactor (see <see cref="ScsiLun.Execute"/>); for an absent LUN no channel is needed. The
    /// completion fires once, later, on this reactor.
    /// </summary>
    public void Execute(ScsiTask task)
    {
        var lun = GetLun(task.LunId);
        if (lun is not null && task.Channel?.Lun == lun)
        {
            lun.Execute(task);
            return;
        }

        if (lun is not null && !lun.IsRemoved)
        {
            throw new InvalidOperationException($"task for LUN {task.LunId} carries no channel of that LUN");
        }

        task.Begin(null);
        ExecuteNoLun(task, this);
        ScsiLun.Defer(task);
    }

    /// <summary>Answers a command for a LUN that is not there (SPC-4: only INQUIRY, REPORT LUNS, REQUEST SENSE succeed).</summary>
    internal static void ExecuteNoLun(ScsiTask task, ScsiDevice? device)
    {
        var cdb = task.CdbPadded;
        Span<byte> buf = stackalloc byte[ScsiResponses.MaxResponse];
        switch (cdb[0])
        {
            case ScsiOp.Inquiry:
                if ((cdb[1] & 0x01) != 0 || cdb[2] != 0)
                {
                    task.SetCheckCondition(SenseKey.IllegalRequest, Asc.LogicalUnitNotSupported, 0);
                    return;
                }

                task.DataTransferred = task.CopyToDataIn(buf[..ScsiResponses.NullLunInquiry(buf)], BinaryPrimitives.ReadUInt16BigEndian(cdb[3..]));
                return;
            case ScsiOp.ReportLuns:
            case ScsiOp.RequestSense:
                ExecuteCommon(task, device, null);
                return;
            default:
                task.SetCheckCondition(SenseKey.IllegalRequest, Asc.LogicalUnitNotSupported, 0);
                return;
        }
    }

    /// <summary>REPORT LUNS and REQUEST SENSE, which any LUN (present or not) answers.</summary>
    internal static void ExecuteCommon(ScsiTask task, ScsiDevice? device, ScsiLun? lun)
    {
        var cdb = task.CdbPadded;
        Span<byte> buf = stackalloc byte[8 + (8 * MaxLuns)];
        if (cdb[0] == ScsiOp.ReportLuns)
        {
            int select = cdb[2];
            ulong alloc = BinaryPrimitives.ReadUInt32BigEndian(cdb[6..]);
            if (select is not (0x00 or 0x01 or 0x02) || alloc < 16)
            {
                task.SetCheckCondition(SenseKey.IllegalRequest, Asc.InvalidFieldInCdb, 0, select is not (0x00 or 0x01 or 0x02) ? 2 : 6);
                return;
            }

            int len = ScsiResponses.ReportLuns(buf, device, select, lun?.Id ?? 0);
            task.DataTransferred = task.CopyToDataIn(buf[..len], alloc);
            return;
        }

        if (lun is not null && !lun.IsRemoved)
        {
            lun.RequestSense(task, buf);
            return;
        }

        // REQUEST SENSE to an absent LUN: GOOD status, parameter data says LOGICAL UNIT NOT SUPPORTED.
        int n = ScsiResponses.RequestSense(buf, (cdb[1] & 0x01) != 0, SenseKey.IllegalRequest, Asc.LogicalUnitNotSupported, 0);
        task.DataTransferred = task.CopyToDataIn(buf[..n], cdb[4]);
    }

    /// <summary>
    /// Runs a task management function. <paramref name="callback"/> fires exactly once, after every task it
    /// aborted has completed (with <see cref="ScsiTask.Aborted"/> set), on the calling reactor (a thread-pool
    /// thread when called off the reactors); never inside this call.
    /// LOGICAL UNIT RESET / TARGET RESET / I_T NEXUS RESET also set a POWER ON, RESET unit attention.
    /// </summary>
    public void TaskManagement(ScsiTaskManagementFunction function, int lunId, ulong tag, ScsiTmfCompletion callback, object? state)
    {
        ArgumentNullException.ThrowIfNull(callback);
        var origin = Reactor.Current;
        ScsiLun[] targets;
        ScsiLun[] resets = [];
        switch (function)
        {
            case ScsiTaskManagementFunction.AbortTask:
            case ScsiTaskManagementFunction.AbortTaskSet:
            case ScsiTaskManagementFunction.ClearTaskSet:
            case ScsiTaskManagementFunction.QueryTask:
            case ScsiTaskManagementFunction.QueryTaskSet:
            case ScsiTaskManagementFunction.LogicalUnitReset:
                if (GetLun(lunId) is not { IsRemoved: false } lun)
                {
                    ScsiTmfOperation.Deliver(origin, callback, state, ScsiTaskManagementResponse.IncorrectLun);
                    return;
                }

                targets = [lun];
                if (function == ScsiTaskManagementFunction.LogicalUnitReset)
                {
                    resets = targets;
                }

                break;
            case ScsiTaskManagementFunction.TargetReset:
            case ScsiTaskManagementFunction.ITNexusReset:
                targets = LunIds.Select(GetLun).Where(l => l is { IsRemoved: false }).ToArray()!;
                resets = targets;
                break;
            default:
                ScsiTmfOperation.Deliver(origin, callback, state, ScsiTaskManagementResponse.Rejected);
                return;
        }

        var op = new ScsiTmfOperation(function, tag, resets, callback, state);
        foreach (var lun in targets)
        {
            lun.ApplyTmf(op);
        }

        op.Release();
    }

    /// <summary>Awaitable form of <see cref="TaskManagement"/> (control plane and tests).</summary>
    public Task<ScsiTaskManagementResponse> TaskManagementAsync(ScsiTaskManagementFunction function, int lunId, ulong tag = 0)
    {
        var tcs = new TaskCompletionSource<ScsiTaskManagementResponse>(TaskCreationOptions.RunContinuationsAsynchronously);
        TaskManagement(function, lunId, tag, static (r, s) => ((TaskCompletionSource<ScsiTaskManagementResponse>)s!).TrySetResult(r), tcs);
        return tcs.Task;
    }

    public override string ToString() => Name;
}
