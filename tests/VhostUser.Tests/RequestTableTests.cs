using Xunit;

namespace VhostBackend.VhostUser.Tests;

public class RequestTableTests
{
    private static VhostUserHeader H(VhostUserRequest r, uint size) => new() { Request = (uint)r, Flags = VhostUserConstants.Version, Size = size };

    private const ulong AllProtocol = ulong.MaxValue;

    [Fact]
    public void WellFormedRequestsPass()
    {
        Assert.Equal(VhostUserError.None, VhostUserRequestTable.Check(H(VhostUserRequest.GetFeatures, 0), 0, 0));
        Assert.Equal(VhostUserError.None, VhostUserRequestTable.Check(H(VhostUserRequest.GetFeatures, 8), 0, 0));
        Assert.Equal(VhostUserError.None, VhostUserRequestTable.Check(H(VhostUserRequest.SetVringAddr, 40), 0, 0));
        Assert.Equal(VhostUserError.None, VhostUserRequestTable.Check(H(VhostUserRequest.SetMemTable, 8 + (3 * 32)), 3, 0));
        Assert.Equal(VhostUserError.None, VhostUserRequestTable.Check(H(VhostUserRequest.SetVringKick, 8), 1, 0));
        Assert.Equal(VhostUserError.None, VhostUserRequestTable.Check(H(VhostUserRequest.SetVringKick, 8), 0, 0));
        Assert.Equal(VhostUserError.None, VhostUserRequestTable.Check(H(VhostUserRequest.GetConfig, 12 + 60), 0, AllProtocol));
    }

    [Fact]
    public void RequestWhoseProtocolFeatureWasNotNegotiatedIsRefused()
    {
        Assert.Equal(VhostUserError.FeatureNotNegotiated, VhostUserRequestTable.Check(H(VhostUserRequest.GetConfig, 12 + 60), 0, 0));
        Assert.Equal(VhostUserError.FeatureNotNegotiated, VhostUserRequestTable.Check(H(VhostUserRequest.SetStatus, 8), 0, 0));
        Assert.Equal(VhostUserError.FeatureNotNegotiated, VhostUserRequestTable.Check(H(VhostUserRequest.AddMemReg, 40), 1, 1UL << VhostUserProtocolFeature.Config));
        Assert.Equal(VhostUserError.None, VhostUserRequestTable.Check(H(VhostUserRequest.AddMemReg, 40), 1, 1UL << VhostUserProtocolFeature.ConfigureMemSlots));
        Assert.Equal(VhostUserError.FeatureNotNegotiated, VhostUserRequestTable.Check(H(VhostUserRequest.SetBackendReqFd, 0), 1, 0));

        // Without a mandatory reply the refusal is a REPLY_ACK failure; GET_* cannot be refused, only closed.
        Assert.True(VhostUserRequestTable.IsRefusable((uint)VhostUserRequest.SetStatus, VhostUserError.FeatureNotNegotiated));
        Assert.False(VhostUserRequestTable.IsRefusable((uint)VhostUserRequest.GetConfig, VhostUserError.FeatureNotNegotiated));
        Assert.False(VhostUserRequestTable.IsRefusable((uint)VhostUserRequest.SetStatus, VhostUserError.BadSize));
    }

    [Fact]
    public void WrongPayloadSizeIsRefused()
    {
        Assert.Equal(VhostUserError.BadSize, VhostUserRequestTable.Check(H(VhostUserRequest.SetVringNum, 4), 0, 0));
        Assert.Equal(VhostUserError.BadSize, VhostUserRequestTable.Check(H(VhostUserRequest.SetFeatures, 16), 0, 0));
        Assert.Equal(VhostUserError.BadSize, VhostUserRequestTable.Check(H(VhostUserRequest.GetFeatures, 4), 0, 0));
        Assert.Equal(VhostUserError.BadSize, VhostUserRequestTable.Check(H(VhostUserRequest.SetMemTable, 8), 0, 0));
        Assert.Equal(VhostUserError.BadSize, VhostUserRequestTable.Check(H(VhostUserRequest.SetMemTable, 8 + (9 * 32)), 8, 0));
        Assert.Equal(VhostUserError.BadSize, VhostUserRequestTable.Check(H(VhostUserRequest.GetConfig, 12 + 257), 0, AllProtocol));
    }

    [Fact]
    public void UnexpectedTooManyAndMissingFdsAreRefused()
    {
        Assert.Equal(VhostUserError.TooManyFds, VhostUserRequestTable.Check(H(VhostUserRequest.SetFeatures, 8), 1, 0));
        Assert.Equal(VhostUserError.TooManyFds, VhostUserRequestTable.Check(H(VhostUserRequest.GetVringBase, 8), 1, 0));
        Assert.Equal(VhostUserError.TooManyFds, VhostUserRequestTable.Check(H(VhostUserRequest.SetVringCall, 8), 2, 0));
        Assert.Equal(VhostUserError.TooManyFds, VhostUserRequestTable.Check(H(VhostUserRequest.SetMemTable, 8 + 32), 9, 0));
        Assert.Equal(VhostUserError.MissingFds, VhostUserRequestTable.Check(H(VhostUserRequest.SetMemTable, 8 + 32), 0, 0));
        Assert.Equal(VhostUserError.MissingFds, VhostUserRequestTable.Check(H(VhostUserRequest.AddMemReg, 40), 0, AllProtocol));
    }

    [Fact]
    public void UnknownAndUnsupportedRequestsAreRefusedOrClosed()
    {
        Assert.Equal(VhostUserError.Unsupported, VhostUserRequestTable.Check(H((VhostUserRequest)999, 8), 0, AllProtocol));
        Assert.Equal(VhostUserError.Unsupported, VhostUserRequestTable.Check(H(VhostUserRequest.SetLogFd, 0), 0, AllProtocol));
        Assert.True(VhostUserRequestTable.IsRefusable(999, VhostUserError.Unsupported));
        Assert.True(VhostUserRequestTable.IsRefusable((uint)VhostUserRequest.SetLogFd, VhostUserError.Unsupported));

        // SET_LOG_BASE (issue 19): needs LOG_SHMFD and its fd, and always has a reply.
        Assert.Equal(VhostUserError.MissingFds, VhostUserRequestTable.Check(H(VhostUserRequest.SetLogBase, 16), 0, AllProtocol));
        Assert.Equal(VhostUserError.None, VhostUserRequestTable.Check(H(VhostUserRequest.SetLogBase, 16), 1, AllProtocol));
        Assert.Equal(VhostUserReplyKind.Always, VhostUserRequestTable.Get((uint)VhostUserRequest.SetLogBase).Reply);
        Assert.False(VhostUserRequestTable.IsRefusable((uint)VhostUserRequest.GetInflightFd, VhostUserError.Unsupported));
        Assert.Equal(VhostUserReplyKind.Always, VhostUserRequestTable.Get((uint)VhostUserRequest.GetVringBase).Reply);
        Assert.Equal(VhostUserReplyKind.Ack, VhostUserRequestTable.Get((uint)VhostUserRequest.SetVringBase).Reply);
    }
}
