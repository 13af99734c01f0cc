using System.Buffers.Binary;
using System.Net.Sockets;

namespace VhostBackend.Nvme.Tcp;

/// <summary>
/// The send stage of one NVMe/TCP connection (initiator queue pair or target connection): whole small PDUs (header,
/// data, data digest) are copied into one buffer and go out in one send, instead of one send per header, data part
/// and digest (at QD128 both sides were bound by send syscalls). Larger PDUs are sent from their owners' buffers,
/// after what is staged (<see cref="SendDigest"/> helps with their digest).
/// <para>
/// Ownership: the buffer is allocated once, at construction, and belongs to the connection's owning thread; nothing is
/// allocated per PDU. PDUs are appended only while nothing is being drained (<see cref="IsEmpty"/>), so the bytes of
/// a PDU never straddle two drains and a staged PDU counts as sent once it is copied: its source buffer may be
/// released, the stage goes out before anything queued later. A PDU that does not fit waits for the next drain, which
/// starts again at the front of the buffer.
/// </para>
/// </summary>
public sealed class NvmeTcpSendStage
{
    /// <summary>Default size of the stage.</summary>
    public const int DefaultCapacity = 32 * 1024;

    /// <summary>Default largest data part of a PDU that is staged; larger data is sent from the owner's buffer.</summary>
    public const int DefaultDataMax = 8 * 1024;

    private readonly byte[] _buf;
    private readonly byte[] _digest = new byte[4];
    private int _length;
    private int _sent;

    public NvmeTcpSendStage(int capacity = DefaultCapacity, int dataMax = DefaultDataMax)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(capacity, NvmeTcpPdu.MaxHeaderBytes + 4);
        ArgumentOutOfRangeException.ThrowIfNegative(dataMax);
        _buf = new byte[capacity];
        DataMax = dataMax;
    }

    public int Capacity => _buf.Length;

    /// <summary>Largest data part of a PDU that <see cref="CanStage"/> accepts.</summary>
    public int DataMax { get; }

    /// <summary>Bytes staged (sent or not) since the last complete drain.</summary>
    public int Length => _length;

    /// <summary>Bytes of <see cref="Length"/> already sent.</summary>
    public int Sent => _sent;

    /// <summary>Nothing is waiting to be sent: the stream is not inside a staged PDU.</summary>
    public bool IsEmpty => _sent >= _length;

    /// <summary>
    /// Part of what is staged has gone out and part has not: the stream may be inside a PDU (a cut between two staged
    /// PDUs counts too). Anything else written to the socket now (a TermReq) would be read as that PDU's bytes.
    /// </summary>
    public bool PartlySent => _sent > 0 && _sent < _length;

    /// <summary>Bytes a PDU with this header and data takes in the stage (the digest counts only with data).</summary>
    public static int PduBytes(int headerLength, uint dataLength, bool dataDigest) =>
        headerLength + (int)Math.Min(dataLength, int.MaxValue - 256) + (dataLength > 0 && dataDigest ? 4 : 0);

    /// <summary>
    /// Whether a whole PDU of <paramref name="headerLength"/> header bytes and <paramref name="dataLength"/> data bytes
    /// (plus the data digest) may be appended now: its data is at most <see cref="DataMax"/>, it fits what is left,
    /// and no earlier PDU is half sent.
    /// </summary>
    public bool CanStage(int headerLength, uint dataLength, bool dataDigest) =>
        _sent == 0 && dataLength <= (uint)DataMax && headerLength >= 0 && PduBytes(headerLength, dataLength, dataDigest) <= _buf.Length - _length;

    /// <summary>
    /// Appends a PDU: copies <paramref name="header"/>, reserves <paramref name="dataLength"/> bytes for the data, then
    /// writes <paramref name="digest"/> after them when <paramref name="dataDigest"/> and there is data. Returns the
    /// data's place in the stage, for the caller to fill completely (from one or several buffers). The caller checked
    /// <see cref="CanStage"/>.
    /// </summary>
    public Span<byte> Append(ReadOnlySpan<byte> header, uint dataLength, bool dataDigest, uint digest)
    {
        if (!CanStage(header.Length, dataLength, dataDigest))
        {
            throw new InvalidOperationException($"a PDU of {header.Length} + {dataLength} bytes does not fit the send stage ({_length}/{_buf.Length}, {_sent} sent)");
        }

        int total = PduBytes(header.Length, dataLength, dataDigest);
        var dst = _buf.AsSpan(_length, total);
        header.CopyTo(dst);
        var data = dst.Slice(header.Length, (int)dataLength);
        if (dataLength > 0 && dataDigest)
        {
            BinaryPrimitives.WriteUInt32LittleEndian(dst[(header.Length + (int)dataLength)..], digest);
        }

        _length += total;
        return data;
    }

    /// <summary>Appends a PDU whose data is one contiguous span (see <see cref="Append(ReadOnlySpan{byte}, uint, bool, uint)"/>).</summary>
    public void Append(ReadOnlySpan<byte> header, ReadOnlySpan<byte> data, bool dataDigest, uint digest) =>
        data.CopyTo(Append(header, (uint)data.Length, dataDigest, digest));

    /// <summary>
    /// Sends what is staged until it is all out (returns true; the stage is empty again and starts at its front) or the
    /// socket stops taking bytes (returns false with <paramref name="error"/>: WouldBlock or Interrupted to try again
    /// later, anything else when the connection failed; a send of 0 bytes reports Success and counts as a failure).
    /// </summary>
    public bool Drain(Socket socket, out SocketError error)
    {
        ArgumentNullException.ThrowIfNull(socket);
        while (_sent < _length)
        {
            int n = socket.Send(_buf.AsSpan(_sent, _length - _sent), SocketFlags.None, out error);
            if (error != SocketError.Success || n <= 0)
            {
                return false;
            }

            _sent += n;
        }

        _length = _sent = 0;
        error = SocketError.Success;
        return true;
    }

    /// <summary>Forgets what is staged (the connection closed).</summary>
    public void Clear() => _length = _sent = 0;

    /// <summary>
    /// Sends the rest of a data digest of a PDU sent from its owner's buffers, <paramref name="done"/> of its 4 bytes
    /// having gone out. Returns what <see cref="Socket.Send(ReadOnlySpan{byte}, SocketFlags, out SocketError)"/> returns.
    /// </summary>
    public int SendDigest(Socket socket, uint digest, int done, out SocketError error)
    {
        ArgumentNullException.ThrowIfNull(socket);
        ArgumentOutOfRangeException.ThrowIfNegative(done);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(done, 4);
        BinaryPrimitives.WriteUInt32LittleEndian(_digest, digest);
        return socket.Send(_digest.AsSpan(done), SocketFlags.None, out error);
    }
}
