using System.Runtime.InteropServices;
using VhostBackend.Platform;
using VhostBackend.Vhost;

namespace VhostBackend.BdevVirtio;

/// <summary>
/// The front-end (client) side of the vhost-user protocol: what QEMU sends to a vhost-user back end. Blocking
/// request/reply calls over the Unix socket, for the control plane only (attach and detach run on the thread
/// pool). Every wait for a reply is bounded by <see cref="TimeoutMs"/>; any protocol violation by the back end
/// throws <see cref="IOException"/> with the request it concerned.
/// </summary>
public sealed unsafe class VhostUserFrontEnd : IDisposable
{
    private readonly UnixConnection _conn;
    private ulong _protocolFeatures;

    private VhostUserFrontEnd(UnixConnection conn, string path)
    {
        _conn = conn;
        Path = path;
    }

    public string Path { get; }

    /// <summary>Longest wait for one reply.</summary>
    public int TimeoutMs { get; set; } = 10_000;

    /// <summary>Protocol features agreed with SET_PROTOCOL_FEATURES.</summary>
    public ulong ProtocolFeatures => _protocolFeatures;

    public bool HasProtocolFeature(int bit) => (_protocolFeatures & (1UL << bit)) != 0;

    /// <summary>Connects to the back end's listening socket.</summary>
    public static VhostUserFrontEnd Connect(string path) => new(UnixConnection.Connect(path), path);

    /// <summary>A request whose reply is a u64 (GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM).</summary>
    public ulong GetU64(VhostUserRequest req)
    {
        Send(req, ReadOnlySpan<byte>.Empty, default, false);
        Span<byte> reply = stackalloc byte[8];
        ReadReply(req, reply, exactSize: true);
        return MemoryMarshal.Read<ulong>(reply);
    }

    /// <summary>A request with a u64 payload and no reply (SET_FEATURES, SET_PROTOCOL_FEATURES, SET_VRING_KICK/CALL), acknowledged when REPLY_ACK is on.</summary>
    public void SetU64(VhostUserRequest req, ulong value, ReadOnlySpan<int> fds = default)
    {
        Span<byte> b = stackalloc byte[8];
        MemoryMarshal.Write(b, in value);
        SendAcked(req, b, fds);
    }

    /// <summary>A request with a struct payload and no reply, acknowledged when REPLY_ACK is on.</summary>
    public void SetStruct<T>(VhostUserRequest req, in T body, ReadOnlySpan<int> fds = default)
        where T : unmanaged
    {
        Span<byte> b = stackalloc byte[sizeof(T)];
        MemoryMarshal.Write(b, in body);
        SendAcked(req, b, fds);
    }

    /// <summary>SET_PROTOCOL_FEATURES; REPLY_ACK applies from the next request on.</summary>
    public void SetProtocolFeatures(ulong features)
    {
        Span<byte> b = stackalloc byte[8];
        MemoryMarshal.Write(b, in features);
        Send(VhostUserRequest.SetProtocolFeatures, b, default, false);
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

        Span<byte> b = stackalloc byte[8 + (32 * VhostUserConstants.MaxMemTableRegions)];
        var h = new VhostUserMemoryHeader { NRegions = (uint)regions.Length };
        MemoryMarshal.Write(b, in h);
        for (int i = 0; i < regions.Length; i++)
        {
            MemoryMarshal.Write(b[(8 + (32 * i))..], in regions[i]);
        }

        SendAcked(VhostUserRequest.SetMemTable, b[..(8 + (32 * regions.Length))], fds);
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
        int n = ReadReply(VhostUserRequest.GetConfig, b, exactSize: false);
        if (n != 12 + dest.Length)
        {
            return false;
        }

        var rh = MemoryMarshal.Read<VhostUserConfigHeader>(b);
        if (rh.Size != (uint)dest.Length)
        {
            return false;
        }

        b.Slice(12, dest.Length).CopyTo(dest);
        return true;
    }

    /// <summary>GET_VRING_BASE: stops the ring on the back end and returns its next avail index.</summary>
    public uint GetVringBase(uint index)
    {
        Span<byte> b = stackalloc byte[8];
        var s = new VhostUserVringState { Index = index, Num = 0 };
        MemoryMarshal.Write(b, in s);
        Send(VhostUserRequest.GetVringBase, b, default, false);
        ReadReply(VhostUserRequest.GetVringBase, b, exactSize: true);
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
            Span<byte> b = stackalloc byte[8];
            ReadReply(req, b, exactSize: true);
            ulong rc = MemoryMarshal.Read<ulong>(b);
            if (rc != 0)
            {
                throw new IOException($"vhost-user back end at {Path} refused {req} (reply {rc})");
            }
        }
    }

    private void Send(VhostUserRequest req, ReadOnlySpan<byte> payload, ReadOnlySpan<int> fds, bool needReply)
    {
        Span<byte> buf = stackalloc byte[12 + 12 + VhostUserConstants.ConfigSpaceMax + 256];
        if (payload.Length > buf.Length - 12)
        {
            throw new ArgumentException("payload too large");
        }

        var h = new VhostUserHeader
        {
            Request = (uint)req,
            Flags = VhostUserConstants.Version | (needReply ? VhostUserConstants.FlagNeedReply : 0),
            Size = (uint)payload.Length,
        };
        MemoryMarshal.Write(buf, in h);
        payload.CopyTo(buf[12..]);
        int rc = _conn.Send(buf[..(12 + payload.Length)], fds);
        if (rc != 0)
        {
            throw new IOException($"vhost-user {req} to {Path}: {Native.StrError(-rc)}");
        }
    }

    /// <summary>Reads one reply to <paramref name="req"/> into <paramref name="dest"/>; returns its payload size.</summary>
    private int ReadReply(VhostUserRequest req, Span<byte> dest, bool exactSize)
    {
        Span<byte> hb = stackalloc byte[12];
        if (!_conn.WaitReadable(TimeoutMs))
        {
            throw new IOException($"vhost-user back end at {Path} did not answer {req} within {TimeoutMs} ms");
        }

        if (!_conn.ReceiveExact(hb))
        {
            throw new IOException($"vhost-user back end at {Path} closed the connection (waiting for the reply to {req})");
        }

        var h = MemoryMarshal.Read<VhostUserHeader>(hb);
        if (h.Request != (uint)req || (h.Flags & VhostUserConstants.FlagReply) == 0 || (h.Flags & VhostUserConstants.VersionMask) != VhostUserConstants.Version)
        {
            throw new IOException($"vhost-user back end at {Path}: unexpected reply (request {h.Request}, flags 0x{h.Flags:x}) to {req}");
        }

        if (h.Size > dest.Length || (exactSize && h.Size != dest.Length))
        {
            throw new IOException($"vhost-user back end at {Path}: reply to {req} has {h.Size} bytes, expected {dest.Length}");
        }

        if (h.Size > 0 && !_conn.ReceiveExact(dest[..(int)h.Size]))
        {
            throw new IOException($"vhost-user back end at {Path} closed the connection in the reply to {req}");
        }

        return (int)h.Size;
    }

    /// <summary>
    /// Whether the back end has closed the connection (hang-up, or end of file with no reply pending). Does not
    /// consume anything: a pending reply is left for the control plane. Any thread; one non-blocking poll.
    /// </summary>
    public bool IsPeerClosed()
    {
        int fd = _conn.FileDescriptor;
        if (fd < 0)
        {
            return true;
        }

        SocketNative.PollFd pfd = default;
        pfd.Fd = fd;
        pfd.Events = SocketNative.POLLIN;
        if (SocketNative.poll(&pfd, 1, 0) <= 0)
        {
            return false;
        }

        if ((pfd.REvents & (PollHup | PollErr)) != 0)
        {
            return true;
        }

        byte b;
        return SocketNative.recv(fd, &b, 1, MsgPeek | MsgDontWait) == 0;
    }

    private const short PollErr = 0x8;
    private const short PollHup = 0x10;
    private const int MsgPeek = 0x2;
    private const int MsgDontWait = 0x40;

    public void Dispose() => _conn.Dispose();
}
