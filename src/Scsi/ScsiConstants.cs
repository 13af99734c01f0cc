namespace VhostBackend.Scsi;

/// <summary>SAM status byte values.</summary>
public enum ScsiStatus : byte
{
    Good = 0x00,
    CheckCondition = 0x02,
    ConditionMet = 0x04,
    Busy = 0x08,
    ReservationConflict = 0x18,
    TaskSetFull = 0x28,
    AcaActive = 0x30,
    TaskAborted = 0x40,
}

/// <summary>SPC sense keys.</summary>
public enum SenseKey : byte
{
    NoSense = 0x0,
    RecoveredError = 0x1,
    NotReady = 0x2,
    MediumError = 0x3,
    HardwareError = 0x4,
    IllegalRequest = 0x5,
    UnitAttention = 0x6,
    DataProtect = 0x7,
    BlankCheck = 0x8,
    VendorSpecific = 0x9,
    CopyAborted = 0xA,
    AbortedCommand = 0xB,
    VolumeOverflow = 0xD,
    Miscompare = 0xE,
}

/// <summary>Additional sense codes (ASC) we report; the ASCQ is given alongside.</summary>
public static class Asc
{
    public const byte NoAdditionalSense = 0x00;
    public const byte WriteError = 0x0C;
    public const byte UnrecoveredReadError = 0x11;
    public const byte ParameterListLengthError = 0x1A;
    public const byte MiscompareDuringVerify = 0x1D;
    public const byte InvalidCommandOperationCode = 0x20;
    public const byte LbaOutOfRange = 0x21;
    public const byte InvalidFieldInCdb = 0x24;
    public const byte LogicalUnitNotSupported = 0x25;
    public const byte InvalidFieldInParameterList = 0x26;
    public const byte WriteProtected = 0x27;
    public const byte PowerOnOrReset = 0x29;
    public const byte ParametersChanged = 0x2A; // ASCQ 0x09: CAPACITY DATA HAS CHANGED
    public const byte SavingParametersNotSupported = 0x39;
    public const byte InternalTargetFailure = 0x44;
    public const byte LogicalUnitNotReady = 0x04;

    public const byte AscqCapacityDataHasChanged = 0x09;
}

/// <summary>Direction of the data phase, seen from the initiator (as virtio-scsi's data-out / data-in buffers).</summary>
public enum ScsiDataDirection : byte
{
    None = 0,

    /// <summary>Data-out: initiator to target (WRITE, UNMAP parameter list, MODE SELECT).</summary>
    ToDevice = 1,

    /// <summary>Data-in: target to initiator (READ, INQUIRY, ...).</summary>
    FromDevice = 2,
}

/// <summary>Task management functions (SAM-5), numbered as virtio-scsi's VIRTIO_SCSI_T_TMF_* subtypes.</summary>
public enum ScsiTaskManagementFunction
{
    AbortTask = 0,
    AbortTaskSet = 1,
    ClearAca = 2,
    ClearTaskSet = 3,
    ITNexusReset = 4,
    LogicalUnitReset = 5,
    QueryTask = 6,
    QueryTaskSet = 7,

    /// <summary>Resets every logical unit of the target (not a virtio-scsi subtype; SAM's TARGET RESET).</summary>
    TargetReset = 100,
}

/// <summary>SAM service responses to a task management function.</summary>
public enum ScsiTaskManagementResponse
{
    /// <summary>FUNCTION COMPLETE: done (for QUERY TASK: the task was not found).</summary>
    Complete,

    /// <summary>FUNCTION SUCCEEDED: QUERY TASK / QUERY TASK SET found a task.</summary>
    Succeeded,

    /// <summary>FUNCTION REJECTED: not supported.</summary>
    Rejected,

    /// <summary>INCORRECT LOGICAL UNIT NUMBER.</summary>
    IncorrectLun,
}

/// <summary>Operation codes we decode (SPC-4 / SBC-3).</summary>
public static class ScsiOp
{
    public const byte TestUnitReady = 0x00;
    public const byte RequestSense = 0x03;
    public const byte Read6 = 0x08;
    public const byte Write6 = 0x0A;
    public const byte Inquiry = 0x12;
    public const byte ModeSelect6 = 0x15;
    public const byte Reserve6 = 0x16;
    public const byte Release6 = 0x17;
    public const byte ModeSense6 = 0x1A;
    public const byte StartStopUnit = 0x1B;
    public const byte SendDiagnostic = 0x1D;
    public const byte PreventAllowMediumRemoval = 0x1E;
    public const byte ReadCapacity10 = 0x25;
    public const byte Read10 = 0x28;
    public const byte Write10 = 0x2A;
    public const byte WriteAndVerify10 = 0x2E;
    public const byte Verify10 = 0x2F;
    public const byte SynchronizeCache10 = 0x35;
    public const byte WriteSame10 = 0x41;
    public const byte Unmap = 0x42;
    public const byte ModeSelect10 = 0x55;
    public const byte ModeSense10 = 0x5A;
    public const byte PersistentReserveIn = 0x5E;
    public const byte PersistentReserveOut = 0x5F;
    public const byte Read16 = 0x88;
    public const byte CompareAndWrite = 0x89;
    public const byte Write16 = 0x8A;
    public const byte WriteAndVerify16 = 0x8E;
    public const byte Verify16 = 0x8F;
    public const byte SynchronizeCache16 = 0x91;
    public const byte WriteSame16 = 0x93;
    public const byte ServiceActionIn16 = 0x9E;
    public const byte ReportLuns = 0xA0;
    public const byte MaintenanceIn = 0xA3;
    public const byte Read12 = 0xA8;
    public const byte Write12 = 0xAA;

    public const byte SaReadCapacity16 = 0x10;
    public const byte SaReportSupportedOpCodes = 0x0C;
}
