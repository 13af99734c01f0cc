using VhostBackend.Virtio.Scsi;

namespace VhostBackend.BdevVirtio;

/// <summary>The SCSI operation codes, status and sense fields the virtio-scsi front end uses (SPC-4, SBC-3).</summary>
internal static class ScsiCdb
{
    public const byte TestUnitReady = 0x00;
    public const byte Inquiry = 0x12;
    public const byte StartStopUnit = 0x1B;
    public const byte ReadCapacity10 = 0x25;
    public const byte Read10 = 0x28;
    public const byte Write10 = 0x2A;
    public const byte SynchronizeCache10 = 0x35;
    public const byte Unmap = 0x42;
    public const byte Read16 = 0x88;
    public const byte Write16 = 0x8A;
    public const byte ServiceActionIn16 = 0x9E;
    public const byte SaReadCapacity16 = 0x10;

    public const byte VpdSupportedPages = 0x00;
    public const byte VpdBlockLimits = 0xB0;
    public const byte VpdLogicalBlockProvisioning = 0xB2;

    public const byte StatusGood = 0x00;
    public const byte StatusCheckCondition = 0x02;

    public const byte SenseIllegalRequest = 0x5;
    public const byte SenseUnitAttention = 0x6;
    public const byte AscLogicalUnitNotReady = 0x04;

    /// <summary>UNMAP parameter list with one block descriptor: 8-byte header + 16.</summary>
    public const int UnmapParamBytes = 24;

    /// <summary>Sense key, ASC and ASCQ of fixed-format sense data, bounded by the response's sense_len (as SPDK's get_scsi_status).</summary>
    public static (int Key, int Asc, int Ascq) Sense(ref VirtioScsiCmdResp resp)
    {
        uint len = Math.Min(resp.SenseLen, (uint)VirtioScsi.SenseSize);
        ReadOnlySpan<byte> s = resp.Sense;
        int key = len >= 3 ? s[2] & 0xF : 0;
        int asc = len >= 13 ? s[12] : 0;
        int ascq = len >= 14 ? s[13] : 0;
        return (key, asc, ascq);
    }
}
