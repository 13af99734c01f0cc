namespace VhostBackend.Virtio;

/// <summary>
/// The front end's dirty page log for live migration (vhost-user.rst, "Migration"; VHOST_USER_SET_LOG_BASE with
/// VHOST_USER_PROTOCOL_F_LOG_SHMFD): one bit per 4 KiB page of guest-physical address space, bit (page % 8) of
/// byte (page / 8), set with atomic OR because the front end clears it concurrently (QEMU exchanges whole words).
/// Every write the device makes into guest memory while logging is on is marked here, after the write and before
/// the used entry that completes it is published.
///
/// Bounds: a page beyond the log is not marked (the front end sized the log to cover its memory; a guest address
/// outside it is one no region holds). The log's base need not be 4-byte aligned: each mark ORs into the aligned
/// 32-bit word around its byte, which stays inside the mapping because mappings are whole pages. No allocation, no
/// lock: an atomic OR per touched word, skipped when the bit is already set.
/// </summary>
public sealed unsafe class DirtyLog
{
    public const int PageShift = 12;

    private readonly byte* _base;
    private readonly ulong _bytes;

    /// <summary>A log of <paramref name="bytes"/> bytes at <paramref name="host"/>, inside a mapping of whole pages the owner keeps alive.</summary>
    public DirtyLog(nint host, ulong bytes)
    {
        _base = (byte*)host;
        _bytes = bytes;
    }

    public ulong Bytes => _bytes;

    /// <summary>Guest-physical bytes the log covers.</summary>
    public ulong CoveredBytes => _bytes << (PageShift + 3);

    /// <summary>Marks every page [gpa, gpa + length) touches.</summary>
    public void Mark(ulong gpa, ulong length)
    {
        if (length == 0)
        {
            return;
        }

        ulong first = gpa >> PageShift;
        ulong last = (gpa + length - 1) >> PageShift;
        if (gpa + length - 1 < gpa)
        {
            last = ulong.MaxValue >> PageShift; // wraps: clamp (such pages are past any log)
        }

        for (ulong page = first; page <= last; page++)
        {
            ulong byteIndex = page >> 3;
            if (byteIndex >= _bytes)
            {
                return;
            }

            // SAFETY: byteIndex < _bytes, the log's length; the aligned word around it lies in the same page of the
            // mapping (pages are 4-byte aligned), so the OR touches only mapped bytes and changes only this bit.
            nint addr = (nint)(_base + byteIndex);
            uint* word = (uint*)(addr & ~(nint)3);
            uint bit = 1u << (int)((((ulong)addr & 3) * 8) + (page & 7));
            if ((Volatile.Read(ref *word) & bit) == 0)
            {
                Interlocked.Or(ref *word, bit);
            }
        }
    }

    /// <summary>Whether the page holding <paramref name="gpa"/> is marked (tests, statistics).</summary>
    public bool IsDirty(ulong gpa)
    {
        ulong page = gpa >> PageShift;
        ulong byteIndex = page >> 3;
        return byteIndex < _bytes && (Volatile.Read(ref _base[byteIndex]) & (1 << (int)(page & 7))) != 0;
    }
}
