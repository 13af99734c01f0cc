using System.Runtime.InteropServices;
using VhostBackend.Platform;
using Xunit;

namespace VhostBackend.VhostUser.Tests;

public class EndpointTests
{
    [Fact]
    public void RequestAndReplyRoundTripOverASocketPairWithAnFd()
    {
        var (fe, be) = VhostUserEndpoint.CreatePair();
        using var _1 = fe;
        using var _2 = be;
        using var call = new EventFd();

        Assert.Equal(0, fe.SendRequest(VhostUserRequest.SetVringCall, 3UL, [call.Fd], needReply: true));
        var payload = new byte[VhostUserConstants.MaxPayload];
        var fds = new int[UnixConnection.MaxFdsPerMessage];
        Assert.Equal(VhostUserError.None, be.ReceiveRequest(0, out var h, payload, out int size, fds, out int fdCount));
        Assert.Equal((uint)VhostUserRequest.SetVringCall, h.Request);
        Assert.True(h.NeedReply);
        Assert.False(h.IsReply);
        Assert.Equal(8, size);
        Assert.Equal(3UL, MemoryMarshal.Read<ulong>(payload));
        Assert.Equal(1, fdCount);

        // The received fd is the same eventfd.
        using (var received = new EventFd(fds[0]))
        {
            received.Signal();
            Assert.True(call.Drain());
        }

        Assert.Equal(0, be.SendReply(h.Request, 0UL));
        Assert.Equal(VhostUserError.None, fe.ReceiveU64Reply(VhostUserRequest.SetVringCall, 1000, out ulong ack));
        Assert.Equal(0UL, ack);

        // A struct payload, and a reply to the wrong request.
        var state = new VhostUserVringState { Index = 1, Num = 256 };
        Assert.Equal(0, fe.SendRequest(VhostUserRequest.GetVringBase, in state));
        Assert.Equal(VhostUserError.None, be.ReceiveRequest(0, out h, payload, out size, fds, out fdCount));
        Assert.Equal(state, MemoryMarshal.Read<VhostUserVringState>(payload.AsSpan(0, size)));
        Assert.Equal(0, be.SendReply((uint)VhostUserRequest.GetFeatures, 1UL));
        Assert.Equal(VhostUserError.UnexpectedReply, fe.ReceiveU64Reply(VhostUserRequest.GetVringBase, 1000, out _));
    }

    [Fact]
    public void EndpointRefusesToSendOverTheLimits()
    {
        var (fe, be) = VhostUserEndpoint.CreatePair();
        using var _1 = fe;
        using var _2 = be;
        Assert.Equal(-Errno.EINVAL, fe.SendRequest(VhostUserRequest.SetFeatures, new byte[VhostUserConstants.MaxPayload + 1]));
        Assert.Equal(-Errno.EINVAL, fe.SendRequest(VhostUserRequest.SetMemTable, new byte[8], new int[VhostUserConstants.MaxFds + 1]));
    }

    [Fact]
    public void FdsOnARequestThatCarriesNoneAreRefusedAndClosed()
    {
        var (fe, be) = VhostUserEndpoint.CreatePair();
        using var _1 = fe;
        using var _2 = be;
        using var stray = new EventFd();
        Assert.Equal(0, fe.SendRequest(VhostUserRequest.SetFeatures, 0UL, [stray.Fd]));
        var fds = new int[UnixConnection.MaxFdsPerMessage];
        Assert.Equal(VhostUserError.TooManyFds, be.ReceiveRequest(0, out _, new byte[VhostUserConstants.MaxPayload], out _, fds, out int fdCount));
        Assert.Equal(0, fdCount);
    }

    [Fact]
    public void MoreFdsThanAnyMessageCarriesAreRefused()
    {
        var (fe, be) = VhostUserEndpoint.CreatePair();
        using var _1 = fe;
        using var _2 = be;
        var many = new EventFd[VhostUserConstants.MaxFds + 1];
        for (int i = 0; i < many.Length; i++)
        {
            many[i] = new EventFd();
        }

        // Raw, since the endpoint refuses to build it.
        var raw = new byte[12 + 8 + 32];
        MemoryMarshal.Write(raw, new VhostUserHeader { Request = (uint)VhostUserRequest.SetMemTable, Flags = 1, Size = 40 });
        Assert.Equal(0, fe.Connection.Send(raw, Array.ConvertAll(many, e => e.Fd)));
        var fds = new int[UnixConnection.MaxFdsPerMessage];
        Assert.Equal(VhostUserError.TooManyFds, be.Receive(false, out _, new byte[VhostUserConstants.MaxPayload], out _, fds, out int fdCount));
        Assert.Equal(0, fdCount);
        foreach (var e in many)
        {
            e.Dispose();
        }
    }

    [Fact]
    public void BadFlagsOversizedPayloadsAndRepliesWithFdsAreRefused()
    {
        var (fe, be) = VhostUserEndpoint.CreatePair();
        using var _1 = fe;
        using var _2 = be;
        var payload = new byte[VhostUserConstants.MaxPayload];
        var fds = new int[UnixConnection.MaxFdsPerMessage];

        // A reply bit on a request.
        Assert.Equal(0, fe.Send((uint)VhostUserRequest.GetFeatures, VhostUserConstants.Version | VhostUserConstants.FlagReply, default));
        Assert.Equal(VhostUserError.BadFlags, be.Receive(false, out _, payload, out _, fds, out _));

        // A header announcing more than MaxPayload: refused before reading it.
        var raw = new byte[12];
        MemoryMarshal.Write(raw, new VhostUserHeader { Request = 1, Flags = 1, Size = uint.MaxValue });
        Assert.Equal(0, fe.Connection.Send(raw));
        Assert.Equal(VhostUserError.TooLarge, be.Receive(false, out _, payload, out _, fds, out _));

        // A reply carrying an fd.
        var (a, b) = VhostUserEndpoint.CreatePair();
        using var _3 = a;
        using var _4 = b;
        using var stray = new EventFd();
        Assert.Equal(0, a.Send((uint)VhostUserRequest.GetFeatures, VhostUserConstants.Version | VhostUserConstants.FlagReply, new byte[8], [stray.Fd]));
        Assert.Equal(VhostUserError.TooManyFds, b.ReceiveU64Reply(VhostUserRequest.GetFeatures, 1000, out _));
    }

    [Fact]
    public void PeerCloseIsSeen()
    {
        var (fe, be) = VhostUserEndpoint.CreatePair();
        using var _2 = be;
        Assert.False(be.IsPeerClosed());
        fe.Dispose();
        Assert.True(be.IsPeerClosed());
        Assert.Equal(VhostUserError.Closed, be.Receive(false, out _, new byte[16], out _, new int[UnixConnection.MaxFdsPerMessage], out _));
    }
}
