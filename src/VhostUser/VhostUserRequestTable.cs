namespace VhostBackend.VhostUser;

/// <summary>What a request expects back.</summary>
public enum VhostUserReplyKind : byte
{
    /// <summary>No reply, except a REPLY_ACK u64 when the front end set NEED_REPLY and REPLY_ACK was negotiated.</summary>
    Ack,

    /// <summary>Always answered (GET_*): a refusal cannot be expressed, so the connection is closed instead.</summary>
    Always,
}

/// <summary>
/// One row of <see cref="VhostUserRequestTable"/>: the payload sizes and fd counts a front-end request may carry,
/// the protocol feature it needs, and how it is answered. Sizes are checked before the payload is read.
/// </summary>
public readonly struct VhostUserRequestInfo
{
    /// <summary>No protocol feature needed.</summary>
    public const int NoFeature = -1;

    public VhostUserRequestInfo(VhostUserRequest request, bool supported, int minSize, int maxSize, int minFds, int maxFds, int protocolFeature, VhostUserReplyKind reply, bool eitherSize = false)
    {
        EitherSize = eitherSize;
        Request = request;
        Supported = supported;
        MinSize = minSize;
        MaxSize = maxSize;
        MinFds = minFds;
        MaxFds = maxFds;
        ProtocolFeature = protocolFeature;
        Reply = reply;
    }

    public VhostUserRequest Request { get; }

    /// <summary>Whether our back end implements it; unsupported requests are refused (or close the connection if they need a reply).</summary>
    public bool Supported { get; }

    public int MinSize { get; }
    public int MaxSize { get; }

    /// <summary>The size is <see cref="MinSize"/> or <see cref="MaxSize"/>, nothing between (GET requests: none or an unused u64).</summary>
    public bool EitherSize { get; }
    public int MinFds { get; }
    public int MaxFds { get; }

    /// <summary>The VHOST_USER_PROTOCOL_F_* bit that must be negotiated, or <see cref="NoFeature"/>.</summary>
    public int ProtocolFeature { get; }

    public VhostUserReplyKind Reply { get; }
}

/// <summary>
/// The front-end requests (docs/interop/vhost-user.rst, "Front-end message types"): for each code, payload size
/// range, fd count range, required protocol feature and reply kind. <see cref="Check"/> validates a received
/// header against it before any handler runs; the handlers then check the payload's own fields.
/// </summary>
public static class VhostUserRequestTable
{
    private const int Max = (int)VhostUserRequest.GetStatus;
    private static readonly VhostUserRequestInfo[] s_rows = Build();

    /// <summary>The row for <paramref name="request"/> (an unsupported row for unknown codes).</summary>
    public static ref readonly VhostUserRequestInfo Get(uint request) => ref s_rows[request <= Max ? request : 0];

    /// <summary>
    /// Checks a request header and its fd count against the table. <see cref="VhostUserError.Unsupported"/> and
    /// <see cref="VhostUserError.FeatureNotNegotiated"/> may be refused politely (REPLY_ACK failure) when the
    /// request has no mandatory reply; every other error is fatal for the connection.
    /// </summary>
    public static VhostUserError Check(in VhostUserHeader header, int fdCount, ulong protocolFeatures)
    {
        ref readonly var row = ref Get(header.Request);
        if (!row.Supported)
        {
            return VhostUserError.Unsupported;
        }

        if (header.Size < (uint)row.MinSize || header.Size > (uint)row.MaxSize
            || (row.EitherSize && header.Size != (uint)row.MinSize && header.Size != (uint)row.MaxSize))
        {
            return VhostUserError.BadSize;
        }

        if (fdCount > row.MaxFds)
        {
            return VhostUserError.TooManyFds;
        }

        if (fdCount < row.MinFds)
        {
            return VhostUserError.MissingFds;
        }

        if (row.ProtocolFeature != VhostUserRequestInfo.NoFeature && (protocolFeatures & (1UL << row.ProtocolFeature)) == 0)
        {
            return VhostUserError.FeatureNotNegotiated;
        }

        return VhostUserError.None;
    }

    /// <summary>Whether an error from <see cref="Check"/> can be answered with a refusal instead of closing the connection.</summary>
    public static bool IsRefusable(uint request, VhostUserError error) =>
        error is VhostUserError.Unsupported or VhostUserError.FeatureNotNegotiated && Get(request).Reply == VhostUserReplyKind.Ack;

    private static VhostUserRequestInfo[] Build()
    {
        const int none = VhostUserRequestInfo.NoFeature;
        const VhostUserReplyKind ack = VhostUserReplyKind.Ack;
        const VhostUserReplyKind always = VhostUserReplyKind.Always;
        const int u64 = 8;
        const int state = 8;
        const int addr = 40;
        const int region = 40;
        const int config = 12;
        const int inflight = 24;
        var t = new VhostUserRequestInfo[Max + 1];
        for (uint i = 0; i <= Max; i++)
        {
            // Requests we do not implement; those whose spec mandates a reply cannot be refused politely.
            var r = (VhostUserRequest)i;
            bool needsReply = r is VhostUserRequest.GetInflightFd or VhostUserRequest.PostcopyAdvise or VhostUserRequest.CreateCryptoSession;
            t[i] = new VhostUserRequestInfo(r, false, 0, 0, 0, 0, none, needsReply ? always : ack);
        }

        void Row(VhostUserRequest r, int minSize, int maxSize, int minFds, int maxFds, int feature, VhostUserReplyKind reply) =>
            t[(int)r] = new VhostUserRequestInfo(r, true, minSize, maxSize, minFds, maxFds, feature, reply, eitherSize: minSize == 0 && maxSize == u64);

        // GET requests carry no payload; some front ends send an unused u64.
        Row(VhostUserRequest.GetFeatures, 0, u64, 0, 0, none, always);
        Row(VhostUserRequest.SetFeatures, u64, u64, 0, 0, none, ack);
        Row(VhostUserRequest.SetOwner, 0, 0, 0, 0, none, ack);
        Row(VhostUserRequest.ResetOwner, 0, 0, 0, 0, none, ack);
        Row(VhostUserRequest.SetMemTable, VhostUserMemoryHeader.PayloadSize(1), VhostUserMemoryHeader.PayloadSize(VhostUserConstants.MaxMemTableRegions), 1, VhostUserConstants.MaxMemTableRegions, none, ack);
        Row(VhostUserRequest.SetVringNum, state, state, 0, 0, none, ack);
        Row(VhostUserRequest.SetVringAddr, addr, addr, 0, 0, none, ack);
        Row(VhostUserRequest.SetVringBase, state, state, 0, 0, none, ack);
        Row(VhostUserRequest.GetVringBase, state, state, 0, 0, none, always);
        Row(VhostUserRequest.SetVringKick, u64, u64, 0, 1, none, ack);
        Row(VhostUserRequest.SetVringCall, u64, u64, 0, 1, none, ack);
        Row(VhostUserRequest.SetVringErr, u64, u64, 0, 1, none, ack);
        Row(VhostUserRequest.GetProtocolFeatures, 0, u64, 0, 0, none, always);
        Row(VhostUserRequest.SetProtocolFeatures, u64, u64, 0, 0, none, ack);

        // The spec asks for MQ among the *offered* protocol features only, so GET_QUEUE_NUM is not gated.
        Row(VhostUserRequest.GetQueueNum, 0, u64, 0, 0, none, always);
        Row(VhostUserRequest.SetVringEnable, state, state, 0, 0, none, ack);
        Row(VhostUserRequest.SetBackendReqFd, 0, u64, 1, 1, VhostUserProtocolFeature.BackendReq, ack);
        Row(VhostUserRequest.GetConfig, config, config + VhostUserConstants.ConfigSpaceMax, 0, 0, VhostUserProtocolFeature.Config, always);
        Row(VhostUserRequest.SetConfig, config, config + VhostUserConstants.ConfigSpaceMax, 0, 0, VhostUserProtocolFeature.Config, ack);
        Row(VhostUserRequest.ResetDevice, 0, 0, 0, 0, VhostUserProtocolFeature.ResetDevice, ack);
        Row(VhostUserRequest.GetMaxMemSlots, 0, u64, 0, 0, VhostUserProtocolFeature.ConfigureMemSlots, always);
        Row(VhostUserRequest.AddMemReg, region, region, 1, 1, VhostUserProtocolFeature.ConfigureMemSlots, ack);

        // The spec tolerates one (ignored) fd for front ends that send one.
        Row(VhostUserRequest.RemMemReg, region, region, 0, 1, VhostUserProtocolFeature.ConfigureMemSlots, ack);
        Row(VhostUserRequest.SetStatus, u64, u64, 0, 0, VhostUserProtocolFeature.Status, ack);
        Row(VhostUserRequest.GetInflightFd, VhostUserInflight.FieldBytes, inflight, 0, 0, VhostUserProtocolFeature.InflightShmfd, always);
        Row(VhostUserRequest.SetInflightFd, VhostUserInflight.FieldBytes, inflight, 1, 1, VhostUserProtocolFeature.InflightShmfd, ack);
        Row(VhostUserRequest.GetStatus, 0, u64, 0, 0, VhostUserProtocolFeature.Status, always);

        // With LOG_SHMFD the front end waits for a reply once the log is mapped (QEMU reads one, libvhost-user sends a u64).
        Row(VhostUserRequest.SetLogBase, 16, 16, 1, 1, VhostUserProtocolFeature.LogShmfd, always);
        return t;
    }
}
