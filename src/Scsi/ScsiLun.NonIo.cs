using System.Buffers.Binary;

namespace VhostBackend.Scsi;

/// <summary>Commands answered from the emulation itself (no bdev I/O). All complete synchronously into the task.</summary>
public sealed partial class ScsiLun
{
    private void ExecuteNonIo(ScsiTask task, byte op)
    {
        var cdb = task.CdbPadded;
        Span<byte> buf = stackalloc byte[ScsiResponses.MaxResponse];
        switch (op)
        {
            case ScsiOp.TestUnitReady:
                return;

            case ScsiOp.Inquiry:
                {
                    bool evpd = (cdb[1] & 0x01) != 0;
                    byte page = cdb[2];
                    ulong alloc = BinaryPrimitives.ReadUInt16BigEndian(cdb[3..]);
                    if ((cdb[1] & 0xFE) != 0 || (!evpd && page != 0))
                    {
                        task.SetCheckCondition(SenseKey.IllegalRequest, Asc.InvalidFieldInCdb, 0, (cdb[1] & 0xFE) != 0 ? 1 : 2);
                        return;
                    }

                    int len = evpd ? ScsiResponses.Vpd(buf, this, page) : ScsiResponses.StandardInquiry(buf, this);
                    if (len < 0)
                    {
                        task.SetCheckCondition(SenseKey.IllegalRequest, Asc.InvalidFieldInCdb, 0, 2);
                        return;
                    }

                    task.DataTransferred = task.CopyToDataIn(buf[..len], alloc);
                    return;
                }

            case ScsiOp.ReadCapacity10:
                task.DataTransferred = task.CopyToDataIn(buf[..ScsiResponses.ReadCapacity10(buf, this)], 8);
                return;

            case ScsiOp.ServiceActionIn16:
                if ((cdb[1] & 0x1F) != ScsiOp.SaReadCapacity16)
                {
                    task.SetCheckCondition(SenseKey.IllegalRequest, Asc.InvalidFieldInCdb, 0, 1);
                    return;
                }

                task.DataTransferred = task.CopyToDataIn(buf[..ScsiResponses.ReadCapacity16(buf, this)], BinaryPrimitives.ReadUInt32BigEndian(cdb[10..]));
                return;

            case ScsiOp.ModeSense6:
            case ScsiOp.ModeSense10:
                {
                    bool ten = op == ScsiOp.ModeSense10;
                    bool dbd = (cdb[1] & 0x08) != 0;
                    bool llbaa = ten && (cdb[1] & 0x10) != 0;
                    int pc = cdb[2] >> 6;
                    int page = cdb[2] & 0x3F;
                    int subpage = cdb[3];
                    ulong alloc = ten ? BinaryPrimitives.ReadUInt16BigEndian(cdb[7..]) : cdb[4];
                    if (pc == 3)
                    {
                        task.SetCheckCondition(SenseKey.IllegalRequest, Asc.SavingParametersNotSupported, 0);
                        return;
                    }

                    int len = ScsiResponses.ModeSense(buf, this, ten, dbd, llbaa, pc, page, subpage);
                    if (len < 0)
                    {
                        task.SetCheckCondition(SenseKey.IllegalRequest, Asc.InvalidFieldInCdb, 0, subpage is not (0 or 0xFF) ? 3 : 2);
                        return;
                    }

                    task.DataTransferred = task.CopyToDataIn(buf[..len], alloc);
                    return;
                }

            case ScsiOp.ModeSelect6:
            case ScsiOp.ModeSelect10:
                ModeSelect(task, op == ScsiOp.ModeSelect10, buf);
                return;

            case ScsiOp.ReportLuns:
            case ScsiOp.RequestSense:
                ScsiDevice.ExecuteCommon(task, Device, this);
                return;

            case ScsiOp.StartStopUnit:
            case ScsiOp.PreventAllowMediumRemoval:
                return; // nothing to spin up, lock or eject

            case ScsiOp.MaintenanceIn:
                // REPORT SUPPORTED OPERATION CODES and friends are not implemented; Linux then sets no_report_opcodes.
                task.SetCheckCondition(SenseKey.IllegalRequest, Asc.InvalidFieldInCdb, 0, 1);
                return;

            default:
                task.SetCheckCondition(SenseKey.IllegalRequest, Asc.InvalidCommandOperationCode, 0, 0);
                return;
        }
    }

    /// <summary>
    /// MODE SELECT: accepted when it only restates what MODE SENSE reports. Pages we report are accepted (the
    /// parameters are fixed); a caching page asking for a different WCE is rejected, as are unknown pages.
    /// </summary>
    private void ModeSelect(ScsiTask task, bool ten, Span<byte> buf)
    {
        var cdb = task.CdbPadded;
        int paramLen = ten ? BinaryPrimitives.ReadUInt16BigEndian(cdb[7..]) : cdb[4];
        if (paramLen == 0)
        {
            return;
        }

        if ((cdb[1] & 0x10) == 0)
        {
            task.SetCheckCondition(SenseKey.IllegalRequest, Asc.InvalidFieldInCdb, 0, 1); // PF = 0: vendor format
            return;
        }

        int hlen = ten ? 8 : 4;
        if (paramLen < hlen || paramLen > buf.Length)
        {
            task.SetCheckCondition(SenseKey.IllegalRequest, Asc.ParameterListLengthError, 0);
            return;
        }

        var data = buf[..paramLen];
        if (!task.CopyFromDataOut(data))
        {
            task.SetCheckCondition(SenseKey.IllegalRequest, Asc.InvalidFieldInCdb, 0, ten ? 7 : 4);
            return;
        }

        task.DataTransferred = (ulong)paramLen;
        int blen = ten ? BinaryPrimitives.ReadUInt16BigEndian(data[6..]) : data[3];
        int pos = hlen + blen;
        if (pos > paramLen)
        {
            task.SetCheckCondition(SenseKey.IllegalRequest, Asc.ParameterListLengthError, 0);
            return;
        }

        while (pos < paramLen)
        {
            int page = data[pos] & 0x3F;
            bool spf = (data[pos] & 0x40) != 0;
            int plen;
            int header;
            if (spf)
            {
                if (pos + 4 > paramLen)
                {
                    break;
                }

                header = 4;
                plen = BinaryPrimitives.ReadUInt16BigEndian(data[(pos + 2)..]);
            }
            else
            {
                if (pos + 2 > paramLen)
                {
                    break;
                }

                header = 2;
                plen = data[pos + 1];
            }

            if (pos + header + plen > paramLen)
            {
                task.SetCheckCondition(SenseKey.IllegalRequest, Asc.ParameterListLengthError, 0);
                return;
            }

            bool ok = !spf && page switch
            {
                0x08 => plen == 0x12 && ((data[pos + 2] & 0x04) != 0) == Bdev.WriteCache,
                0x0A or 0x1C => plen == 0x0A,
                _ => false,
            };

            if (!ok)
            {
                task.SetCheckCondition(SenseKey.IllegalRequest, Asc.InvalidFieldInParameterList, 0, pos, inCdb: false);
                return;
            }

            pos += header + plen;
        }
    }

    /// <summary>REQUEST SENSE on a live LUN: reports (and clears) a pending unit attention, else NO SENSE.</summary>
    internal void RequestSense(ScsiTask task, Span<byte> buf)
    {
        var cdb = task.CdbPadded;
        bool desc = (cdb[1] & 0x01) != 0;
        int len = TryConsumeUnitAttention(out byte asc, out byte ascq)
            ? ScsiResponses.RequestSense(buf, desc, SenseKey.UnitAttention, asc, ascq)
            : ScsiResponses.RequestSense(buf, desc, SenseKey.NoSense, 0, 0);
        task.DataTransferred = task.CopyToDataIn(buf[..len], cdb[4]);
    }

    /// <summary>Whether a unit attention is pending (for tests and the transport's diagnostics).</summary>
    public bool HasPendingUnitAttention => PeekUnitAttention(out _, out _);
}
