using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using VhostBackend.Platform;

namespace VhostBackend.VhostUser;

/// <summary>
/// One end of a vhost-user connection: frames messages (12-byte header, payload, fds) over a Unix stream socket.
/// Used by the back-end session, by the virtio-user front end and by test front ends alike. Blocking calls, one
/// protocol thread per endpoint (<see cref="Shutdown"/> may come from any thread).
///
/// Limits enforced on receive, before a handler sees anything: version 1 and no unknown flag, the reply bit as
/// the caller expects, payload at most <see cref="VhostUserConstants.MaxPayload"/> (and the caller's buffer), at
/// most <see cref="VhostUserConstants.MaxFds"/> fds, and none on replies. Received fds belong to the caller, who
/// closes those it does not keep; on an error return every received fd is already closed.
/// </summary>
public sealed class VhostUserEndpoint : IDisposable
{
    private readonly UnixConnection _conn;

    public VhostUserEndpoint(UnixConnection connection) => _conn = connection;

    public UnixConnection Connection => _conn;

    /// <summary>The last socket errno seen by a failed send or receive (for the log line of the caller).</summary>
    public int LastErrno { get; private set; }

    public static VhostUserEndpoint Connect(string path) => new(UnixConnection.Connect(path));

    public static (VhostUserEndpoint A, VhostUserEndpoint B) CreatePair()
    {
        var (a, b) = UnixConnection.CreatePair();
        return (new VhostUserEndpoint(a), new VhostUserEndpoint(b));
    }

    // ---- send -------------------------------------------------------------------------------------------------

    /// <summary>Sends one message with <paramref name="fds"/> attached. Returns 0 or -errno (-EINVAL for a message over the limits).</summary>
    public int Send(uint request, uint flags, ReadOnlySpan<byte> payload, ReadOnlySpan<int> fds = default)
    {
        if (payload.Length > VhostUserConstants.MaxPayload || fds.Length > VhostUserConstants.MaxFds)
        {
            return -Errno.EINVAL;
        }

        Span<byte> buf = stackalloc byte[VhostUserConstants.HeaderSize + VhostUserConstants.MaxPayload];
        var h = new VhostUserHeader { Request = request, Flags = flags, Size = (uint)payload.Length };
        MemoryMarshal.Write(buf, in h);
        payload.CopyTo(buf[VhostUserConstants.HeaderSize..]);
        int rc = _conn.Send(buf[..(VhostUserConstants.HeaderSize + payload.Length)], fds);
        if (rc != 0)
        {
            LastErrno = -rc;
        }

        return rc;
    }

    /// <summary>Sends a front-end request (version 1, NEED_REPLY as asked).</summary>
    public int SendRequest(VhostUserRequest request, ReadOnlySpan<byte> payload, ReadOnlySpan<int> fds = default, bool needReply = false) =>
        Send((uint)request, VhostUserConstants.Version | (needReply ? VhostUserConstants.FlagNeedReply : 0), payload, fds);

    /// <summary>Sends a front-end request whose payload is <paramref name="body"/>.</summary>
    public int SendRequest<T>(VhostUserRequest request, in T body, ReadOnlySpan<int> fds = default, bool needReply = false)
        where T : unmanaged =>
        SendRequest(request, AsBytes(in body), fds, needReply);

    /// <summary>Sends the reply to <paramref name="request"/> (version 1, reply bit).</summary>
    public int SendReply(uint request, ReadOnlySpan<byte> payload, ReadOnlySpan<int> fds = default) =>
        Send(request, VhostUserConstants.Version | VhostUserConstants.FlagReply, payload, fds);

    public int SendReply<T>(uint request, in T body)
        where T : unmanaged =>
        SendReply(request, AsBytes(in body));

    /// <summary>The bytes of an unmanaged struct (a view, no copy).</summary>
    public static ReadOnlySpan<byte> AsBytes<T>(in T value)
        where T : unmanaged =>
        MemoryMarshal.AsBytes(new ReadOnlySpan<T>(in value));

    // ---- receive ----------------------------------------------------------------------------------------------

    /// <summary>
    /// Receives one message: header, fds (into <paramref name="fds"/>, at least <see cref="UnixConnection.MaxFdsPerMessage"/>
    /// long) and payload (into <paramref name="payload"/>). <paramref name="reply"/> says whether the reply bit
    /// must be set (a front end reading replies) or clear (a back end reading requests); replies carry no fds
    /// unless the caller expects some (<paramref name="replyFds"/>: GET_INFLIGHT_FD's reply carries one).
    /// On any error, received fds are closed and <paramref name="fdCount"/> is 0.
    /// </summary>
    public VhostUserError Receive(bool reply, out VhostUserHeader header, Span<byte> payload, out int payloadSize, Span<int> fds, out int fdCount, int replyFds = 0)
    {
        header = default;
        payloadSize = 0;
        Span<byte> hb = stackalloc byte[VhostUserConstants.HeaderSize];
        int n = _conn.Receive(hb, fds, out fdCount, out bool truncated);
        if (n <= 0)
        {
            LastErrno = -n;
            return Fail(n == 0 ? VhostUserError.Closed : VhostUserError.Io, fds, ref fdCount);
        }

        if (n < hb.Length && !_conn.ReceiveExact(hb[n..]))
        {
            return Fail(VhostUserError.Closed, fds, ref fdCount);
        }

        header = MemoryMarshal.Read<VhostUserHeader>(hb);
        if (!header.IsValid(reply))
        {
            return Fail(header.Size > VhostUserConstants.MaxPayload ? VhostUserError.TooLarge : VhostUserError.BadFlags, fds, ref fdCount);
        }

        if (header.Size > (uint)payload.Length)
        {
            return Fail(VhostUserError.TooLarge, fds, ref fdCount);
        }

        // The payload is read even when the fds are refused, so that closing the connection afterwards is an
        // orderly end of file for the peer rather than a reset over unread data.
        payloadSize = (int)header.Size;
        if (payloadSize > 0 && !_conn.ReceiveExact(payload[..payloadSize]))
        {
            payloadSize = 0;
            return Fail(VhostUserError.Closed, fds, ref fdCount);
        }

        if (truncated || fdCount > VhostUserConstants.MaxFds || (reply && fdCount > replyFds))
        {
            return Fail(VhostUserError.TooManyFds, fds, ref fdCount);
        }

        return VhostUserError.None;
    }

    /// <summary>
    /// Receives a front-end request and checks it against <see cref="VhostUserRequestTable"/> (sizes, fd counts,
    /// protocol feature). A refusable error (<see cref="VhostUserRequestTable.IsRefusable"/>) leaves the message
    /// read, with its fds closed, so the caller can answer it.
    /// </summary>
    public VhostUserError ReceiveRequest(ulong protocolFeatures, out VhostUserHeader header, Span<byte> payload, out int payloadSize, Span<int> fds, out int fdCount)
    {
        var e = Receive(false, out header, payload, out payloadSize, fds, out fdCount);
        if (e != VhostUserError.None)
        {
            return e;
        }

        e = VhostUserRequestTable.Check(header, fdCount, protocolFeatures);
        return e == VhostUserError.None ? e : Fail(e, fds, ref fdCount);
    }

    /// <summary>
    /// Front end: waits up to <paramref name="timeoutMs"/> for the reply to <paramref name="request"/> and reads its
    /// payload into <paramref name="dest"/>. <paramref name="exactSize"/>: the payload must fill dest.
    /// </summary>
    public VhostUserError ReceiveReply(VhostUserRequest request, Span<byte> dest, bool exactSize, int timeoutMs, out int size)
    {
        size = 0;
        if (!_conn.WaitReadable(timeoutMs))
        {
            return VhostUserError.Timeout;
        }

        Span<int> fds = stackalloc int[UnixConnection.MaxFdsPerMessage];
        var e = Receive(true, out var h, dest, out size, fds, out _);
        if (e != VhostUserError.None)
        {
            return e;
        }

        if (h.Request != (uint)request)
        {
            return VhostUserError.UnexpectedReply;
        }

        return exactSize && size != dest.Length ? VhostUserError.BadSize : VhostUserError.None;
    }

    /// <summary>Front end: reads a REPLY_ACK (or any u64 reply) to <paramref name="request"/>.</summary>
    public VhostUserError ReceiveU64Reply(VhostUserRequest request, int timeoutMs, out ulong value)
    {
        Span<byte> b = stackalloc byte[8];
        var e = ReceiveReply(request, b, exactSize: true, timeoutMs, out _);
        value = e == VhostUserError.None ? MemoryMarshal.Read<ulong>(b) : 0;
        return e;
    }

    private static VhostUserError Fail(VhostUserError e, Span<int> fds, ref int fdCount)
    {
        Fd.CloseAll(fds[..fdCount]);
        fdCount = 0;
        return e;
    }

    // ---- connection -----------------------------------------------------------------------------------------

    /// <summary>Waits until a message (or hang-up) is readable. False on timeout.</summary>
    public bool WaitReadable(int timeoutMs) => _conn.WaitReadable(timeoutMs);

    /// <summary>Whether the peer has closed the connection, without consuming a pending message. Any thread.</summary>
    public bool IsPeerClosed() => _conn.IsPeerClosed();

    /// <summary>Wakes a receive blocked on another thread (it returns <see cref="VhostUserError.Closed"/>).</summary>
    public void Shutdown() => _conn.Shutdown();

    public void Dispose() => _conn.Dispose();

    /// <summary>Size of a payload struct (for table checks in tests and handlers).</summary>
    public static int SizeOf<T>()
        where T : unmanaged => Unsafe.SizeOf<T>();
}
