using System.Buffers.Binary;
using VhostBackend.Bdev;

namespace VhostBackend.Scsi;

/// <summary>
/// Builders of the parameter data of non-I/O commands (INQUIRY, VPD pages, READ CAPACITY, MODE SENSE,
/// REPORT LUNS, REQUEST SENSE). Each writes the complete response into a caller-provided span and returns its
/// length; the caller copies at most the allocation length into the data-in buffer (SPC-4 4.2.5.6 truncation).
/// </summary>
internal static class ScsiResponses
{
    public const int StandardInquiryLength = 96;
    public const int MaxResponse = 4096;

    // Version descriptors (SPC-4 table 49), "no version claimed" codes.
    private const ushort VersionSam5 = 0x00A0;
    private const ushort VersionSpc4 = 0x0460;
    private const ushort VersionSbc3 = 0x04C0;

    public const byte VpdSupportedPages = 0x00;
    public const byte VpdUnitSerial = 0x80;
    public const byte VpdDeviceIdentification = 0x83;
    public const byte VpdBlockLimits = 0xB0;
    public const byte VpdBlockCharacteristics = 0xB1;
    public const byte VpdLogicalBlockProvisioning = 0xB2;

    public static int StandardInquiry(Span<byte> d, ScsiLun lun)
    {
        d[..StandardInquiryLength].Clear();
        d[0] = 0x00; // peripheral qualifier 0 (connected), device type 0 (direct access block device)
        d[1] = 0x00; // RMB = 0: not removable
        d[2] = 0x06; // VERSION: SPC-4
        d[3] = 0x12; // HISUP | RESPONSE DATA FORMAT 2
        d[4] = StandardInquiryLength - 5; // ADDITIONAL LENGTH
        d[5] = 0x00; // no SCCS, ACC, TPGS, 3PC, PROTECT
        d[6] = 0x00;
        d[7] = 0x02; // CMDQUE: command queuing (Linux enables tagged queuing on this bit)
        PadAscii(d.Slice(8, 8), lun.Options.Vendor);
        PadAscii(d.Slice(16, 16), lun.Bdev.ProductName);
        PadAscii(d.Slice(32, 4), lun.Options.Revision);
        d.Slice(36, 20).Fill((byte)' '); // vendor specific
        BinaryPrimitives.WriteUInt16BigEndian(d[58..], VersionSam5);
        BinaryPrimitives.WriteUInt16BigEndian(d[60..], VersionSpc4);
        BinaryPrimitives.WriteUInt16BigEndian(d[62..], VersionSbc3);
        return StandardInquiryLength;
    }

    /// <summary>Standard INQUIRY data for a LUN that is not there: peripheral qualifier 3, type 0x1F (SPC-4 6.6.2).</summary>
    public static int NullLunInquiry(Span<byte> d)
    {
        d[..36].Clear();
        d[0] = 0x7F;
        d[2] = 0x06;
        d[3] = 0x12;
        d[4] = 36 - 5;
        return 36;
    }

    /// <summary>Builds a VPD page; returns -1 if the page is not supported.</summary>
    public static int Vpd(Span<byte> d, ScsiLun lun, byte page)
    {
        d[..4].Clear();
        d[1] = page;
        int len;
        switch (page)
        {
            case VpdSupportedPages:
                {
                    int n = 4;
                    d[n++] = VpdSupportedPages;
                    d[n++] = VpdUnitSerial;
                    d[n++] = VpdDeviceIdentification;
                    d[n++] = VpdBlockLimits;
                    d[n++] = VpdBlockCharacteristics;
                    if (lun.SupportsUnmap)
                    {
                        d[n++] = VpdLogicalBlockProvisioning;
                    }

                    len = n - 4;
                    break;
                }

            case VpdUnitSerial:
                len = SerialNumber(d[4..], lun.Bdev.Name);
                break;
            case VpdDeviceIdentification:
                len = DeviceIdentification(d[4..], lun);
                break;
            case VpdBlockLimits:
                len = BlockLimits(d[4..], lun);
                break;
            case VpdBlockCharacteristics:
                d.Slice(4, 60).Clear();
                BinaryPrimitives.WriteUInt16BigEndian(d[4..], 1); // MEDIUM ROTATION RATE: non-rotating medium
                len = 60;
                break;
            case VpdLogicalBlockProvisioning:
                if (!lun.SupportsUnmap)
                {
                    return -1;
                }

                d.Slice(4, 4).Clear();
                d[4] = 0; // THRESHOLD EXPONENT
                d[5] = 0xE0; // LBPU | LBPWS | LBPWS10 (LBPRZ 0, ANC_SUP 0, DP 0)
                d[6] = 0x02; // PROVISIONING TYPE: thin provisioned
                len = 4;
                break;
            default:
                return -1;
        }

        BinaryPrimitives.WriteUInt16BigEndian(d[2..], (ushort)len);
        return 4 + len;
    }

    private static int SerialNumber(Span<byte> d, string name)
    {
        int n = Math.Min(name.Length, 32);
        for (int i = 0; i < n; i++)
        {
            d[i] = Printable(name[i]);
        }

        return n;
    }

    private static int DeviceIdentification(Span<byte> d, ScsiLun lun)
    {
        Span<byte> uuid = stackalloc byte[16];
        lun.Bdev.Uuid.TryWriteBytes(uuid, bigEndian: true, out _);
        int n = 0;

        // 1) NAA designator, locally assigned (NAA 3): 60 bits taken from the bdev UUID.
        d[n++] = 0x01; // protocol 0, code set: binary
        d[n++] = 0x03; // PIV 0, association: logical unit, type: NAA
        d[n++] = 0;
        d[n++] = 8;
        ulong naa = BinaryPrimitives.ReadUInt64BigEndian(uuid) ^ BinaryPrimitives.ReadUInt64BigEndian(uuid[8..]);
        naa = (naa & 0x0FFF_FFFF_FFFF_FFFFUL) | (3UL << 60);
        BinaryPrimitives.WriteUInt64BigEndian(d[n..], naa);
        n += 8;

        // 2) T10 vendor ID designator: vendor (8) + the bdev UUID as text (36).
        d[n++] = 0x02; // code set: ASCII
        d[n++] = 0x01; // association: logical unit, type: T10 vendor ID
        d[n++] = 0;
        d[n++] = 8 + 36;
        PadAscii(d.Slice(n, 8), lun.Options.Vendor);
        n += 8;
        var text = lun.Bdev.Uuid.ToString("D");
        for (int i = 0; i < 36; i++)
        {
            d[n + i] = (byte)text[i];
        }

        n += 36;
        return n;
    }

    private static int BlockLimits(Span<byte> p, ScsiLun lun)
    {
        // p is the page after its 4-byte header; offsets below are the SBC-3 byte numbers minus 4.
        p[..60].Clear();
        uint bs = lun.Bdev.BlockSize;
        p[0] = 0x01; // WSNZ: a WRITE SAME with NUMBER OF LOGICAL BLOCKS 0 is rejected
        p[1] = 0; // MAXIMUM COMPARE AND WRITE LENGTH: not supported
        BinaryPrimitives.WriteUInt16BigEndian(p[2..], (ushort)Math.Max(1u, 4096 / bs)); // OPTIMAL TRANSFER LENGTH GRANULARITY
        BinaryPrimitives.WriteUInt32BigEndian(p[4..], lun.MaxTransferBlocks); // MAXIMUM TRANSFER LENGTH
        BinaryPrimitives.WriteUInt32BigEndian(p[8..], lun.Bdev.OptimalIoBoundaryBlocks); // OPTIMAL TRANSFER LENGTH (0 = not reported)
        if (lun.SupportsUnmap)
        {
            BinaryPrimitives.WriteUInt32BigEndian(p[16..], lun.Options.MaxUnmapLbaCount); // MAXIMUM UNMAP LBA COUNT
            BinaryPrimitives.WriteUInt32BigEndian(p[20..], lun.Options.MaxUnmapDescriptors); // MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT
            BinaryPrimitives.WriteUInt32BigEndian(p[24..], Math.Max(1u, 4096 / bs)); // OPTIMAL UNMAP GRANULARITY (UGAVALID 0)
        }

        BinaryPrimitives.WriteUInt64BigEndian(p[32..], lun.Options.MaxWriteSameBlocks); // MAXIMUM WRITE SAME LENGTH
        return 60;
    }

    public static int ReadCapacity10(Span<byte> d, ScsiLun lun)
    {
        ulong last = lun.Bdev.BlockCount - 1;
        BinaryPrimitives.WriteUInt32BigEndian(d, last > 0xFFFF_FFFEUL ? 0xFFFF_FFFFu : (uint)last);
        BinaryPrimitives.WriteUInt32BigEndian(d[4..], lun.Bdev.BlockSize);
        return 8;
    }

    public static int ReadCapacity16(Span<byte> d, ScsiLun lun)
    {
        d[..32].Clear();
        BinaryPrimitives.WriteUInt64BigEndian(d, lun.Bdev.BlockCount - 1);
        BinaryPrimitives.WriteUInt32BigEndian(d[8..], lun.Bdev.BlockSize);
        if (lun.SupportsUnmap)
        {
            d[14] = 0x80; // LBPME (LBPRZ 0: the bdev layer does not promise zeroes after unmap)
        }

        return 32;
    }

    /// <summary>
    /// MODE SENSE (6 or 10) parameter data. Returns -1 for an unsupported page/subpage (INVALID FIELD IN CDB).
    /// <paramref name="pc"/> 0 current, 1 changeable (all zero), 2 default; 3 (saved) is rejected by the caller.
    /// </summary>
    public static int ModeSense(Span<byte> d, ScsiLun lun, bool ten, bool dbd, bool llbaa, int pc, int page, int subpage)
    {
        int hlen = ten ? 8 : 4;
        int blen = dbd ? 0 : (ten && llbaa ? 16 : 8);
        var pages = d[(hlen + blen)..];
        int plen;
        if (page == 0x3F)
        {
            if (subpage != 0x00 && subpage != 0xFF)
            {
                return -1;
            }

            plen = CachingPage(pages, lun, pc);
            plen += ControlPage(pages[plen..], pc);
            plen += InformationalExceptionsPage(pages[plen..], pc);
        }
        else
        {
            if (subpage != 0x00 && subpage != 0xFF)
            {
                return -1;
            }

            switch (page)
            {
                case 0x08:
                    plen = CachingPage(pages, lun, pc);
                    break;
                case 0x0A:
                    plen = ControlPage(pages, pc);
                    break;
                case 0x1C:
                    plen = InformationalExceptionsPage(pages, pc);
                    break;
                default:
                    return -1;
            }
        }

        int total = hlen + blen + plen;
        d[..(hlen + blen)].Clear();

        // DEVICE-SPECIFIC PARAMETER (SBC-3 6.4.1): WP for read-only LUNs, DPOFUA since we honour FUA.
        byte deviceSpecific = (byte)((lun.ReadOnly ? 0x80 : 0) | 0x10);
        if (ten)
        {
            BinaryPrimitives.WriteUInt16BigEndian(d, (ushort)(total - 2));
            d[3] = deviceSpecific;
            d[4] = (byte)(blen == 16 ? 1 : 0); // LONGLBA
            BinaryPrimitives.WriteUInt16BigEndian(d[6..], (ushort)blen);
        }
        else
        {
            d[0] = (byte)(total - 1);
            d[2] = deviceSpecific;
            d[3] = (byte)blen;
        }

        var bd = d[hlen..];
        ulong blocks = lun.Bdev.BlockCount;
        if (blen == 8)
        {
            BinaryPrimitives.WriteUInt32BigEndian(bd, blocks > 0xFFFF_FFFFUL ? 0xFFFF_FFFFu : (uint)blocks);
            BinaryPrimitives.WriteUInt32BigEndian(bd[4..], lun.Bdev.BlockSize & 0x00FF_FFFF); // byte 4 reserved
        }
        else if (blen == 16)
        {
            BinaryPrimitives.WriteUInt64BigEndian(bd, blocks);
            BinaryPrimitives.WriteUInt32BigEndian(bd[12..], lun.Bdev.BlockSize);
        }

        return total;
    }

    private static int CachingPage(Span<byte> p, ScsiLun lun, int pc)
    {
        p[..20].Clear();
        p[0] = 0x08;
        p[1] = 0x12;
        if (pc != 1 && lun.Bdev.WriteCache)
        {
            p[2] = 0x04; // WCE
        }

        return 20;
    }

    private static int ControlPage(Span<byte> p, int pc)
    {
        p[..12].Clear();
        p[0] = 0x0A;
        p[1] = 0x0A;
        if (pc != 1)
        {
            p[3] = 0x10; // QUEUE ALGORITHM MODIFIER 1: unrestricted reordering; QERR 0
        }

        return 12;
    }

    private static int InformationalExceptionsPage(Span<byte> p, int pc)
    {
        p[..12].Clear();
        p[0] = 0x1C;
        p[1] = 0x0A;
        if (pc != 1)
        {
            p[2] = 0x08; // DEXCPT: informational exception operations disabled
        }

        return 12;
    }

    /// <summary>REPORT LUNS parameter data for <paramref name="device"/> (single-level LUNs, SAM-5 addressing).</summary>
    public static int ReportLuns(Span<byte> d, ScsiDevice? device, int selectReport, int fallbackLun)
    {
        d[..8].Clear();
        int n = 8;
        if (selectReport != 0x01)
        {
            if (device is null)
            {
                WriteLun(d[n..], fallbackLun);
                n += 8;
            }
            else
            {
                for (int id = 0; id < ScsiDevice.MaxLuns && n + 8 <= d.Length; id++)
                {
                    if (device.GetLun(id) is { IsRemoved: false })
                    {
                        WriteLun(d[n..], id);
                        n += 8;
                    }
                }
            }
        }

        BinaryPrimitives.WriteUInt32BigEndian(d, (uint)(n - 8));
        return n;
    }

    private static void WriteLun(Span<byte> d, int id)
    {
        d[..8].Clear();
        if (id < 256)
        {
            d[1] = (byte)id; // peripheral device addressing, bus 0
        }
        else
        {
            d[0] = (byte)(0x40 | (id >> 8)); // flat space addressing
            d[1] = (byte)id;
        }
    }

    /// <summary>REQUEST SENSE parameter data in fixed (18 bytes) or descriptor (8 bytes) format.</summary>
    public static int RequestSense(Span<byte> d, bool descriptor, SenseKey key, byte asc, byte ascq)
    {
        if (descriptor)
        {
            d[..8].Clear();
            d[0] = 0x72;
            d[1] = (byte)key;
            d[2] = asc;
            d[3] = ascq;
            return 8;
        }

        ScsiTask.WriteFixedSense(d, key, asc, ascq);
        return ScsiTask.FixedSenseLength;
    }

    private static void PadAscii(Span<byte> d, string s)
    {
        d.Fill((byte)' ');
        int n = Math.Min(s.Length, d.Length);
        for (int i = 0; i < n; i++)
        {
            d[i] = Printable(s[i]);
        }
    }

    private static byte Printable(char c) => c is >= (char)0x20 and < (char)0x7F ? (byte)c : (byte)'_';
}
