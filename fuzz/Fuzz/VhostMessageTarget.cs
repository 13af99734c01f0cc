using System.Buffers.Binary;
using System.Runtime.InteropServices;
using VhostBackend.Platform;
using VhostBackend.VhostUser;

namespace VhostBackend.Fuzz;

/// <summary>
/// vhost-msg: the input is what a hostile front end writes on the socket, replayed into a real
/// <see cref="VhostUserSession"/> (with <see cref="VhostDeviceModel"/> behind it, no reactors).
///
/// Input: byte 0 is the fd policy (bit 0: attach one more fd than the request wants, bit 1: attach none), then
/// messages as on the wire: a 12-byte header (request, flags, size, little endian) and size payload bytes (fewer
/// when the input ends). The harness attaches what the request expects: memfds for SET_MEM_TABLE (one per region
/// the payload names), ADD_MEM_REG and SET_INFLIGHT_FD, an eventfd for SET_VRING_KICK/CALL/ERR without the
/// "no fd" bit, a socket for SET_BACKEND_REQ_FD. Each header and payload also goes through the pure validators
/// (header, request table, payload structs) first. Then the harness closes its sending side, reads replies until
/// the session closes, and waits for <see cref="VhostUserSession.Completion"/>. Findings: an exception out of a
/// validator, a session that does not complete (the protocol thread hung), an unexpected exception.
/// </summary>
internal sealed class VhostMessageTarget : IFuzzTarget
{
    /// <summary>Messages per input (bounded so that replies always fit the socket buffer unread).</summary>
    public const int MaxMessages = 128;

    /// <summary>Size of the memfd handed out as guest memory and in-flight buffer (seeds map within it).</summary>
    public const long MemFdSize = 1 << 20;

    private const int ShutWr = 1;

    private readonly int _memfd = MappedRegion.CreateMemFd("fuzz-guest", MemFdSize);
    private readonly EventFd _eventfd = new();
    private readonly (UnixConnection A, UnixConnection B) _backend = UnixConnection.CreatePair();
    private readonly byte[] _replies = new byte[64 * 1024];
    private readonly int[] _replyFds = new int[UnixConnection.MaxFdsPerMessage];
    private readonly VhostDeviceModel _device = new();
    private readonly FindingLogger _log = new();

    public void Run(ReadOnlySpan<byte> input)
    {
        if (input.Length < 1)
        {
            return;
        }

        int policy = input[0];
        input = input[1..];
        var (front, back) = UnixConnection.CreatePair();
        var session = new VhostUserSession(_device, back, _log);
        session.Start();
        try
        {
            Span<int> fds = stackalloc int[VhostUserConstants.MaxFds + 1];
            for (int m = 0; m < MaxMessages && input.Length >= VhostUserConstants.HeaderSize; m++)
            {
                var h = MemoryMarshal.Read<VhostUserHeader>(input);
                int size = (int)Math.Min(h.Size, (uint)(input.Length - VhostUserConstants.HeaderSize));
                var message = input[..(VhostUserConstants.HeaderSize + size)];
                input = input[message.Length..];
                int fdCount = FdsFor(h, message[VhostUserConstants.HeaderSize..], policy, fds);
                Validate(h, message[VhostUserConstants.HeaderSize..], fdCount);
                if (front.Send(message, fds[..fdCount]) != 0)
                {
                    break; // the session closed the connection (a fatal protocol error)
                }
            }

            SocketNative.shutdown(front.FileDescriptor, ShutWr);
            while (front.Receive(_replies, _replyFds, out int n, out _) > 0)
            {
                Fd.CloseAll(_replyFds.AsSpan(0, n));
            }

            if (!session.Completion.Wait(TimeSpan.FromSeconds(20)))
            {
                throw new FuzzFindingException("the session did not complete after the front end closed");
            }

            _log.ThrowIfAny();
        }
        finally
        {
            front.Dispose();
        }
    }

    /// <summary>The fds a front end would attach to this request (see the class summary).</summary>
    private int FdsFor(in VhostUserHeader h, ReadOnlySpan<byte> payload, int policy, Span<int> fds)
    {
        int count = 0;
        int fd = _memfd;
        switch ((VhostUserRequest)h.Request)
        {
            case VhostUserRequest.SetMemTable:
                count = payload.Length >= 4 ? (int)Math.Min(BinaryPrimitives.ReadUInt32LittleEndian(payload), (uint)VhostUserConstants.MaxFds) : 1;
                break;
            case VhostUserRequest.AddMemReg:
            case VhostUserRequest.SetInflightFd:
                count = 1;
                break;
            case VhostUserRequest.SetVringKick:
            case VhostUserRequest.SetVringCall:
            case VhostUserRequest.SetVringErr:
                count = payload.Length >= 2 && (payload[1] & 1) != 0 ? 0 : 1;
                fd = _eventfd.Fd;
                break;
            case VhostUserRequest.SetBackendReqFd:
                count = 1;
                fd = _backend.B.FileDescriptor;
                break;
        }

        if ((policy & 2) != 0)
        {
            count = 0;
        }
        else if ((policy & 1) != 0)
        {
            count++;
        }

        fds[..count].Fill(fd);
        return count;
    }

    /// <summary>The pure checks a received message goes through; none may throw, whatever the bytes.</summary>
    private static void Validate(in VhostUserHeader h, ReadOnlySpan<byte> payload, int fdCount)
    {
        _ = h.IsValid(reply: false);
        _ = h.IsValid(reply: true);
        _ = VhostUserRequestTable.Check(h, fdCount, ulong.MaxValue);
        _ = VhostUserRequestTable.Check(h, fdCount, 0);
        _ = VhostUserRequestTable.IsRefusable(h.Request, VhostUserError.Unsupported);
        _ = VhostUserRequestTable.Get(h.Request);
        if (payload.Length >= 8)
        {
            var mh = MemoryMarshal.Read<VhostUserMemoryHeader>(payload);
            _ = mh.IsValid(payload.Length);
            _ = new VhostUserVringFile(MemoryMarshal.Read<ulong>(payload)).IsValid(2, fdCount);
            _ = MemoryMarshal.Read<VhostUserVringState>(payload).IsValid(2);
        }

        if (payload.Length >= 12)
        {
            _ = MemoryMarshal.Read<VhostUserConfigHeader>(payload).IsValid(payload.Length);
        }

        if (payload.Length >= 24)
        {
            var inflight = MemoryMarshal.Read<VhostUserInflight>(payload);
            _ = inflight.IsValidRequest(2);
            _ = inflight.IsValidBuffer(2);
        }

        if (payload.Length >= 32)
        {
            _ = MemoryMarshal.Read<VhostUserMemoryRegion>(payload).IsValid;
        }

        if (payload.Length >= 40)
        {
            _ = MemoryMarshal.Read<VhostUserSingleMemoryRegion>(payload).IsValid;
            _ = MemoryMarshal.Read<VhostUserVringAddr>(payload).IsValid(2);
        }
    }
}
