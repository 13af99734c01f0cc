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

    /// <summary>Makes the buffer at least <paramref name="bytes"/> long (allocates only when it grows).</summary>
    public void EnsureBuffer(uint bytes)
    {
        if (Buffer is not null && Buffer.Size >= bytes)
        {
            return;
        }

        nuint size = 4096;
        while (size < bytes)
        {
            size <<= 1;
        }

        Buffer?.Dispose();
        Buffer = new AlignedBuffer(size, 4096, zero: false);
    }

    public Span<byte> Span(uint offset, uint length) => Buffer!.AsSpan(offset, (int)length);

    public IoVec IoVec(uint offset, uint length) => Buffer!.ToIoVec(offset, length);

    /// <summary>The output buffer of an admin command, cleared: <see cref="DataLength"/> bytes (what the host reads).</summary>
    public Span<byte> Output()
    {
        EnsureBuffer(Math.Max(DataLength, 4096));
        var s = Span(0, DataLength);
        s.Clear();
        C2HLength = DataLength;
        return s;
    }

    public void SetStatus(int sct, int sc, bool dnr = false) => Status = NvmeStatus.Make(sct, sc, dnr).Field;
}
