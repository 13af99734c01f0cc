using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace VhostBackend.Virtio.Scsi;

/// <summary>virtio-scsi feature bits (virtio 1.1, 5.6.3).</summary>
public static class VirtioScsiFeature
{
    public const int InOut = 0;
    public const int Hotplug = 1;
    public const int Change = 2;
    public const int T10Pi = 3;
}

/// <summary>virtio-scsi wire constants (virtio 1.1, 5.6.6).</summary>
public static class VirtioScsi
{
    /// <summary>Queue 0 is the control queue, 1 the event queue, 2.. the request queues.</summary>
    public const int ControlQueue = 0;
    public const int EventQueue = 1;
    public const int FirstRequestQueue = 2;

    public const int CdbSize = 32;
    public const int SenseSize = 96;

    /// <summary>virtio_scsi_req_cmd without PI: lun[8], id, task_attr, prio, crn, cdb[32].</summary>
    public const int CmdReqSize = 8 + 8 + 1 + 1 + 1 + CdbSize;

    /// <summary>virtio_scsi_resp_cmd: sense_len, resid, status_qualifier, status, response, sense[96].</summary>
    public const int CmdRespSize = 4 + 4 + 2 + 1 + 1 + SenseSize;

    /// <summary>The response fields up to and including <c>response</c> (what a short buffer must at least hold).</summary>
    public const int CmdRespHeaderSize = 12;

    // Response codes.
    public const byte SOk = 0;
    public const byte SOverrun = 1;
    public const byte SAborted = 2;
    public const byte SBadTarget = 3;
    public const byte SReset = 4;
    public const byte SBusy = 5;
    public const byte STransportFailure = 6;
    public const byte STargetFailure = 7;
    public const byte SNexusFailure = 8;
    public const byte SFailure = 9;
    public const byte SFunctionSucceeded = 10;
    public const byte SFunctionRejected = 11;
    public const byte SIncorrectLun = 12;

    // Control queue request types.
    public const uint TTmf = 0;
    public const uint TAnQuery = 1;
    public const uint TAnSubscribe = 2;

    /// <summary>virtio_scsi_ctrl_tmf_req: type, subtype, lun[8], id.</summary>
    public const int TmfReqSize = 4 + 4 + 8 + 8;

    /// <summary>virtio_scsi_ctrl_an_req: type, lun[8], event_requested.</summary>
    public const int AnReqSize = 4 + 8 + 4;

    /// <summary>virtio_scsi_ctrl_an_resp: event_actual, response.</summary>
    public const int AnRespSize = 4 + 1;

    // Events.
    public const uint TNoEvent = 0;
    public const uint TTransportReset = 1;
    public const uint TAsyncNotify = 2;
    public const uint TParamChange = 3;
    public const uint EventsMissed = 0x80000000;
    public const uint EvtResetHard = 0;
    public const uint EvtResetRescan = 1;
    public const uint EvtResetRemoved = 2;

    /// <summary>virtio_scsi_event: event, lun[8], reason.</summary>
    public const int EventSize = 16;

    /// <summary>
    /// Decodes a virtio-scsi LUN field (byte 0 = 1, byte 1 = target, bytes 2-3 = flat-space LUN with 0x40 in the
    /// top bits, bytes 4-7 zero). Returns false for any other format.
    /// </summary>
    public static bool TryDecodeLun(ReadOnlySpan<byte> lun, out int target, out int lunId)
    {
        target = lun[1];
        lunId = ((lun[2] & 0x3F) << 8) | lun[3];
        return lun[0] == 1 && (lun[2] & 0xC0) is 0x40 or 0x00 && lun[4] == 0 && lun[5] == 0 && lun[6] == 0 && lun[7] == 0;
    }

    /// <summary>
    /// Encodes target/LUN for an event the way REPORT LUNS encodes it (peripheral addressing below 256, flat
    /// space with 0x40 above), which is what Linux's virtscsi_handle_transport_reset decodes: a RESCAN with LUN
    /// field 0 scans the whole target.
    /// </summary>
    public static void EncodeLun(Span<byte> lun, int target, int lunId)
    {
        lun.Clear();
        lun[0] = 1;
        lun[1] = (byte)target;
        lun[2] = lunId >= 256 ? (byte)((lunId >> 8) | 0x40) : (byte)0;
        lun[3] = (byte)lunId;
    }
}

/// <summary>virtio_scsi_config (virtio 1.1, 5.6.4), little endian.</summary>
[StructLayout(LayoutKind.Sequential, Pack = 1)]
public struct VirtioScsiConfig
{
    public uint NumQueues;
    public uint SegMax;
    public uint MaxSectors;
    public uint CmdPerLun;
    public uint EventInfoSize;
    public uint SenseSize;
    public uint CdbSize;
    public ushort MaxChannel;
    public ushort MaxTarget;
    public uint MaxLun;

    public const int Size = 36;
}

/// <summary>The 8-byte LUN field of virtio-scsi requests and events.</summary>
[InlineArray(8)]
public struct VirtioScsiLun
{
    private byte _b0;
}

/// <summary>The 32-byte CDB of a command request.</summary>
[InlineArray(VirtioScsi.CdbSize)]
public struct VirtioScsiCdb
{
    private byte _b0;
}

/// <summary>The 96-byte sense buffer of a command response.</summary>
[InlineArray(VirtioScsi.SenseSize)]
public struct VirtioScsiSense
{
    private byte _b0;
}

/// <summary>struct virtio_scsi_cmd_req (51 bytes, packed): the device-readable header of a command.</summary>
[StructLayout(LayoutKind.Sequential, Pack = 1)]
public struct VirtioScsiCmdReq
{
    public VirtioScsiLun Lun;
    public ulong Tag;
    public byte TaskAttr;
    public byte Prio;
    public byte Crn;
    public VirtioScsiCdb Cdb;
}

/// <summary>struct virtio_scsi_cmd_resp (108 bytes, packed): the device-writable header of a command.</summary>
[StructLayout(LayoutKind.Sequential, Pack = 1)]
public struct VirtioScsiCmdResp
{
    public uint SenseLen;
    public uint Resid;
    public ushort StatusQualifier;
    public byte Status;
    public byte Response;
    public VirtioScsiSense Sense;
}

/// <summary>struct virtio_scsi_ctrl_tmf_req (24 bytes): a task management request on the control queue.</summary>
[StructLayout(LayoutKind.Sequential, Pack = 1)]
public struct VirtioScsiCtrlTmfReq
{
    public uint Type;
    public uint Subtype;
    public VirtioScsiLun Lun;
    public ulong Tag;
}

/// <summary>struct virtio_scsi_ctrl_an_resp (5 bytes): the answer to an asynchronous notification query/subscribe.</summary>
[StructLayout(LayoutKind.Sequential, Pack = 1)]
public struct VirtioScsiCtrlAnResp
{
    public uint EventActual;
    public byte Response;
}

/// <summary>struct virtio_scsi_event (16 bytes): what the device writes into an event-queue buffer.</summary>
[StructLayout(LayoutKind.Sequential, Pack = 1)]
public struct VirtioScsiEvent
{
    public uint Event;
    public VirtioScsiLun Lun;
    public uint Reason;
}
