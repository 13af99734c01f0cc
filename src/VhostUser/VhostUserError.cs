namespace VhostBackend.VhostUser;

/// <summary>
/// Why a message was not accepted. Values, not strings: a hostile peer can make these happen at will, so nothing
/// is formatted until a caller decides to log (once, on the cold path that closes the connection).
/// </summary>
public enum VhostUserError
{
    None = 0,

    /// <summary>The peer closed the connection (end of file).</summary>
    Closed,

    /// <summary>A socket error (the errno is logged by whoever saw it).</summary>
    Io,

    /// <summary>No reply within the timeout.</summary>
    Timeout,

    /// <summary>Wrong version, unknown flag bits, or the reply bit where it does not belong.</summary>
    BadFlags,

    /// <summary>A payload larger than <see cref="VhostUserConstants.MaxPayload"/> or the caller's buffer.</summary>
    TooLarge,

    /// <summary>The payload size is not one the request allows.</summary>
    BadSize,

    /// <summary>More fds than the request (or any message) carries.</summary>
    TooManyFds,

    /// <summary>Fewer fds than the request needs.</summary>
    MissingFds,

    /// <summary>A request we do not implement (or do not know).</summary>
    Unsupported,

    /// <summary>A request whose protocol feature was not negotiated.</summary>
    FeatureNotNegotiated,

    /// <summary>A reply to another request than the one asked.</summary>
    UnexpectedReply,

    /// <summary>The payload's own fields are invalid (reserved bits, alignment, ranges, queue index).</summary>
    InvalidPayload,
}

/// <summary>A message the peer got wrong badly enough that the connection is closed.</summary>
public sealed class VhostProtocolException : Exception
{
    public VhostProtocolException(VhostUserRequest request, VhostUserError error)
        : base("vhost-user " + request.ToString() + ": " + error.ToString())
    {
        Request = request;
        Error = error;
    }

    public VhostUserRequest Request { get; }

    public VhostUserError Error { get; }
}
