using System.Runtime.InteropServices;
using VhostBackend.VhostUser;

namespace VhostBackend.BdevVirtio;

/// <summary>
/// The front-end (client) side of the vhost-user protocol: what QEMU sends to a vhost-user back end. Blocking
/// request/reply calls over a <see cref="VhostUserEndpoint"/>, for the control plane only (attach and detach run
/// on the thread pool). Every wait for a reply is bounded by <see cref="TimeoutMs"/>; any protocol violation by
/// the back end throws <see cref="IOException"/> with the request it concerned.
/// </summary>
public sealed class VhostUserFrontEnd : IDisposable
{
    private readonly VhostUserEndpoint _ep;
    private ulong _protocolFeatures;

    private VhostUserFrontEnd(VhostUserEndpoint ep, string path)
    {
        _ep = ep;
        Path = path;
    }

    public string Path { get; }

    /// <summary>Longest wait for one reply.</summary>
    public int TimeoutMs { get; set; } = 10_000;

    /// <summary>Protocol features agreed with SET_PROTOCOL_FEATURES.</summary>
    public ulong ProtocolFeatures => _protocolFeatures;

    public bool HasProtocolFeature(int bit) => (_protocolFeatures & (1UL << bit)) != 0;

    /// <summary>Connects to the back end's listening socket.</summary>
    public static VhostUserFrontEnd Connect(string path) => new(VhostUserEndpoint.Connect(path), path);

    /// <summary>A request whose reply is a u64 (GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM).</summary>
    public ulong GetU64(VhostUserRequest req)
    {
        Send(req, ReadOnlySpan<byte>.Empty, default, false);
        Check(req, _ep.ReceiveU64Reply(req, TimeoutMs, out ulong value));
        return value;
    }

    /// <summary>A request with a u64 payload and no reply (SET_FEATURES, SET_VRING_KICK/CALL), acknowledged when REPLY_ACK is on.</summary>
    public void SetU64(VhostUserRequest req, ulong value, ReadOnlySpan<int> fds = default) =>
        SendAcked(req, VhostUserEndpoint.AsBytes(in value), fds);

    /// <summary>A request with a struct payload and no reply, acknowledged when REPLY_ACK is on.</summary>
    public void SetStruct<T>(VhostUserRequest req, in T body, ReadOnlySpan<int> fds = default)
        where T : unmanaged =>
        SendAcked(req, VhostUserEndpoint.AsBytes(in body), fds);

    /// <summary>SET_PROTOCOL_FEATURES; REPLY_ACK applies from the next request on.</summary>
    public void SetProtocolFeatures(ulong features)
    {
        Send(VhostUserRequest.SetProtocolFeatures, VhostUserEndpoint.AsBytes(in features), default, false);
        _protocolFeatures = features;
    }

    /// <summary>SET_OWNER (no payload).</summary>
    public void SetOwner() => SendAcked(VhostUserRequest.SetOwner, ReadOnlySpan<byte>.Empty, default);

    /// <summary>SET_MEM_TABLE with one region per fd.</summary>
    public void SetMemTable(ReadOnlySpan<VhostUserMemoryRegion> regions, ReadOnlySpan<int> fds)
    {
        if (regions.Length != fds.Length || regions.Length == 0 || regions.Length > VhostUserConstants.MaxMemTableRegions)
        {
            throw new ArgumentException("one fd per region, 1..8 regions");
        }

        Span<byte> b = stackalloc byte[VhostUserMemoryHeader.PayloadSize(VhostUserConstants.MaxMemTableRegions)];
        var h = new VhostUserMemoryHeader { NRegions = (uint)regions.Length };
        MemoryMarshal.Write(b, in h);
        MemoryMarshal.AsBytes(regions).CopyTo(b[8..]);
        SendAcked(VhostUserRequest.SetMemTable, b[..VhostUserMemoryHeader.PayloadSize((uint)regions.Length)], fds);
    }

    /// <summary>GET_CONFIG of <paramref name="dest"/>.Length bytes at offset 0. Returns false when the back end refused (empty reply).</summary>
    public bool GetConfig(Span<byte> dest)
    {
        if (dest.Length > VhostUserConstants.ConfigSpaceMax)
        {
            throw new ArgumentException("config space is at most 256 bytes");
        }

        Span<byte> b = stackalloc byte[12 + VhostUserConstants.ConfigSpaceMax];
        b.Clear();
        var ch = new VhostUserConfigHeader { Offset = 0, Size = (uint)dest.Length, Flags = 0 };
        MemoryMarshal.Write(b, in ch);
        Send(VhostUserRequest.GetConfig, b[..(12 + dest.Length)], default, false);
        Check(VhostUserRequest.GetConfig, _ep.ReceiveReply(VhostUserRequest.GetConfig, b, exactSize: false, TimeoutMs, out int n));
        if (n != 12 + dest.Length || MemoryMarshal.Read<VhostUserConfigHeader>(b).Size != (uint)dest.Length)
        {
            return false;
        }

        b.Slice(12, dest.Length).CopyTo(dest);
        return true;
    }

    /// <summary>GET_VRING_BASE: stops the ring on the back end and returns its next avail index.</summary>
    public uint GetVringBase(uint index)
    {
        var s = new VhostUserVringState { Index = index, Num = 0 };
        Send(VhostUserRequest.GetVringBase, VhostUserEndpoint.AsBytes(in s), default, false);
        Span<byte> b = stackalloc byte[8];
        Check(VhostUserRequest.GetVringBase, _ep.ReceiveReply(VhostUserRequest.GetVringBase, b, exactSize: true, TimeoutMs, out _));
        var r = MemoryMarshal.Read<VhostUserVringState>(b);
        if (r.Index != index)
        {
            throw new IOException($"GET_VRING_BASE: reply for queue {r.Index}, asked {index}");
        }

        return r.Num;
    }

    private void SendAcked(VhostUserRequest req, ReadOnlySpan<byte> payload, ReadOnlySpan<int> fds)
    {
        bool ack = HasProtocolFeature(VhostUserProtocolFeature.ReplyAck);
        Send(req, payload, fds, ack);
        if (ack)
        {
            Check(req, _ep.ReceiveU64Reply(req, TimeoutMs, out ulong rc));
            if (rc != 0)
            {
                throw new IOException($"vhost-user back end at {Path} refused {req} (reply {rc})");
            }
        }
    }

    private void Send(VhostUserRequest req, ReadOnlySpan<byte> payload, ReadOnlySpan<int> fds, bool needReply)
    {
        int rc = _ep.SendRequest(req, payload, fds, needReply);
        if (rc != 0)
        {
            throw new IOException($"vhost-user {req} to {Path}: errno {-rc}");
        }
    }

    private void Check(VhostUserRequest req, VhostUserError e)
    {
        if (e != VhostUserError.None)
        {
            throw new IOException($"vhost-user back end at {Path}: reply to {req}: {e}");
        }
    }

    /// <summary>
    /// Whether the back end has closed the connection (hang-up, or end of file with no reply pending). Does not
    /// consume anything: a pending reply is left for the control plane. Any thread; one non-blocking poll.
    /// </summary>
    public bool IsPeerClosed() => _ep.IsPeerClosed();

    public void Dispose() => _ep.Dispose();
}
