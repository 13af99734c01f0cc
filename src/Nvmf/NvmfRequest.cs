using VhostBackend.Bdev;
using VhostBackend.Nvme;
using VhostBackend.Nvme.Tcp;
using VhostBackend.Platform;

namespace VhostBackend.Nvmf;

/// <summary>
/// One command slot of a connection (preallocated, as many as the queue depth): the command, its data buffer (grown
/// once to the largest transfer it carried, then kept), the R2T state, the completion, and the PDU being sent for it.
/// Owned by the connection's reactor.
/// </summary>
internal sealed class NvmfRequest
{
    internal const int TxNone = 0;
    internal const int TxR2T = 1;
    internal const int TxC2HData = 2;
    internal const int TxResp = 3;

    public NvmfRequest(NvmfTcpConnection conn, ushort index)
    {
        Conn = conn;
        Index = index;
        Wait = new BdevIoWaitEntry(static a => ((NvmfRequest)a!).Conn.Resubmit((NvmfRequest)a!), this);
    }

    public readonly NvmfTcpConnection Conn;
    public readonly ushort Index;
    public readonly BdevIoWaitEntry Wait;
    public bool Active;
    public NvmeCommand Cmd;
    public ushort Status;
    public uint Dw0;
    public uint Dw1;

    public AlignedBuffer? Buffer;

    /// <summary>Bytes the command moves (its SGL length, or what the command needs of it).</summary>
    public uint DataLength;

    /// <summary>C2H bytes to send (the command's answer), at most <see cref="DataLength"/>.</summary>
    public uint C2HLength;
    public bool HostToController;
    public bool InCapsule;

    /// <summary>In-capsule bytes received (the capsule's data, whatever its SGL says).</summary>
    public uint InCapsuleLength;

    /// <summary>H2C: bytes asked for by R2Ts so far; the current R2T covers [R2TOffset, R2TEnd).</summary>
    public uint R2TOffset;
    public uint R2TEnd;
    public uint Received;
    public bool AwaitingH2C;
    public bool DigestError;

    /// <summary>Executing against a bdev (or a multi-step operation): the connection must not free it.</summary>
    public bool InBdev;
    public NvmfNamespace? Ns;
    public int NsSlot;

    /// <summary>Multi-step operations (DSM ranges, emulated write zeroes / compare): the step and its limit.</summary>
    public int Step;
    public int Steps;
    public ulong Lba;
    public ulong Blocks;

    // The PDU being sent for this request.
    public readonly byte[] TxHeader = new byte[NvmeTcpPdu.MaxHeaderBytes];
    public int TxHeaderLength;
    public int TxKind;
    public uint TxDataOffset;
    public uint TxDataLength;
    public uint TxDigest;
    public int TxSent;
    public bool TxSuccessFlag;
    public bool Queued;

    /// <summary>Waiting for data buffer memory (the poll group's budget was used up): the next waiter and where to resume.</summary>
    public NvmfRequest? NextWaiter;
    public int BufferWait;
    public uint WaitBytes;
    public bool WaitKeep;

    /// <summary>
    /// Free and holding a buffer: linked in the poll group's list of idle buffers (what <see cref="NvmfPollGroup.Reclaim"/>
    /// gives back first, without scanning every request).
    /// </summary>
    public bool Idle;
    public NvmfRequest? IdlePrev;
    public NvmfRequest? IdleNext;

    /// <summary>Bytes of the buffer (0: none).</summary>
    public nuint BufferSize => Buffer?.Size ?? 0;

    /// <summary>The buffer size that holds <paramref name="bytes"/> (a power of two, at least 4 KiB).</summary>
    public static nuint SizeFor(uint bytes)
    {
        nuint size = 4096;
        while (size < bytes)
        {
            size <<= 1;
        }

        return size;
    }

    /// <summary>Replaces the buffer with one of <paramref name="size"/> bytes, copying the old contents when <paramref name="keep"/>.</summary>
    public void Grow(nuint size, bool keep)
    {
        var next = new AlignedBuffer(size, 4096, zero: false);
        if (keep && Buffer is not null)
        {
            Buffer.AsSpan(0, (int)Buffer.Size).CopyTo(next.AsSpan(0, (int)Buffer.Size));
        }

        Buffer?.Dispose();
        Buffer = next;
    }

    public Span<byte> Span(uint offset, uint length) => Buffer!.AsSpan(offset, (int)length);

    public IoVec IoVec(uint offset, uint length) => Buffer!.ToIoVec(offset, length);

    /// <summary>
    /// The output buffer of an admin command, cleared, sized by the answer rather than by the host's SGL: Identify
    /// 4 KiB, Get Log Page the bytes NUMD asks for (at most the SGL length), anything else the SGL length.
    /// </summary>
    public Span<byte> Output()
    {
        uint n = DataLength;
        if (Cmd.Opcode == NvmeAdminOpcode.Identify)
        {
            n = Math.Min(n, 4096u);
        }
        else if (Cmd.Opcode == NvmeAdminOpcode.GetLogPage)
        {
            ulong numd = ((Cmd.Cdw10 >> 16) | ((ulong)(Cmd.Cdw11 & 0xFFFF) << 16)) + 1;
            n = (uint)Math.Min(numd * 4, n);
        }

        Conn.ForceBuffer(this, n);
        var s = Span(0, n);
        s.Clear();
        C2HLength = n;
        return s;
    }

    public void SetStatus(int sct, int sc, bool dnr = false) => Status = NvmeStatus.Make(sct, sc, dnr).Field;
}
