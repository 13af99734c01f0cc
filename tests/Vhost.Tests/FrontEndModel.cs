using System.Runtime.InteropServices;
using VhostBackend.Platform;
using VhostBackend.Virtio;
using VhostBackend.Virtio.Tests;

namespace VhostBackend.Vhost.Tests;

/// <summary>
/// A model of a vhost-user front end (what QEMU does), for tests: speaks the protocol over a Unix socket,
/// shares a memfd as guest memory and drives one queue through <see cref="DriverRingModel"/>. Not QEMU.
/// </summary>
internal sealed unsafe class FrontEndModel : IDisposable
{
    private readonly UnixConnection _conn;

    public FrontEndModel(UnixConnection conn) => _conn = conn;

    public UnixConnection Connection => _conn;

    public void Send(VhostUserRequest req, ReadOnlySpan<byte> payload, ReadOnlySpan<int> fds = default, bool needReply = false, uint? flags = null)
    {
        var buf = new byte[12 + payload.Length];
        var h = new VhostUserHeader { Request = (uint)req, Flags = flags ?? (VhostUserConstants.Version | (needReply ? VhostUserConstants.FlagNeedReply : 0)), Size = (uint)payload.Length };
        MemoryMarshal.Write(buf, in h);
        payload.CopyTo(buf.AsSpan(12));
        int rc = _conn.Send(buf, fds);
        if (rc != 0)
        {
            throw new IOException($"send failed {rc}");
        }
    }

    public void Send<T>(VhostUserRequest req, T body, ReadOnlySpan<int> fds = default, bool needReply = false)
        where T : unmanaged
    {
        var b = new byte[sizeof(T)];
        MemoryMarshal.Write(b, in body);
        Send(req, b, fds, needReply);
    }

    /// <summary>Reads one reply; null when the back end closed the connection (or nothing came within the timeout).</summary>
    public (VhostUserHeader Header, byte[] Payload)? ReadReply(int timeoutMs = 5000)
    {
        if (!_conn.WaitReadable(timeoutMs))
        {
            return null;
        }

        var hb = new byte[12];
        if (!_conn.ReceiveExact(hb))
        {
            return null;
        }

        var h = MemoryMarshal.Read<VhostUserHeader>(hb);
        var p = new byte[h.Size];
        if (h.Size > 0 && !_conn.ReceiveExact(p))
        {
            return null;
        }

        return (h, p);
    }

    public ulong ReadU64Reply(VhostUserRequest expected)
    {
        var r = ReadReply() ?? throw new IOException($"no reply to {expected}");
        if (r.Header.Request != (uint)expected || (r.Header.Flags & VhostUserConstants.FlagReply) == 0 || r.Payload.Length != 8)
        {
            throw new IOException($"bad reply to {expected}: req {r.Header.Request} flags {r.Header.Flags} size {r.Payload.Length}");
        }

        return MemoryMarshal.Read<ulong>(r.Payload);
    }

    public ulong Get(VhostUserRequest req)
    {
        Send(req, ReadOnlySpan<byte>.Empty);
        return ReadU64Reply(req);
    }

    public ulong SetU64(VhostUserRequest req, ulong value, ReadOnlySpan<int> fds = default)
    {
        var b = new byte[8];
        MemoryMarshal.Write(b, in value);
        Send(req, b, fds, needReply: true);
        return ReadU64Reply(req);
    }

    public ulong SetStruct<T>(VhostUserRequest req, T body)
        where T : unmanaged
    {
        Send(req, body, needReply: true);
        return ReadU64Reply(req);
    }

    /// <summary>Whether the back end has closed the connection (EOF within the timeout).</summary>
    public bool IsClosedByPeer(int timeoutMs = 3000)
    {
        if (!_conn.WaitReadable(timeoutMs))
        {
            return false;
        }

        Span<byte> b = stackalloc byte[1];
        Span<int> fds = stackalloc int[UnixConnection.MaxFdsPerMessage];
        return _conn.Receive(b, fds, out _, out _) == 0;
    }

    /// <summary>Full negotiation like QEMU 7.2: features, protocol features, owner, queue count.</summary>
    public (ulong Features, ulong Protocol) Negotiate(ulong wantProtocol)
    {
        ulong features = Get(VhostUserRequest.GetFeatures);
        ulong proto = Get(VhostUserRequest.GetProtocolFeatures);
        Send(VhostUserRequest.SetProtocolFeatures, BitConverter.GetBytes(proto & wantProtocol));
        Send(VhostUserRequest.SetOwner, ReadOnlySpan<byte>.Empty);
        return (features, proto);
    }

    /// <summary>Sends SET_MEM_TABLE describing the model's two regions (same memfd, offsets 0 and RegionSize).</summary>
    public ulong SetMemTable(DriverRingModel m)
    {
        var payload = new byte[8 + (2 * 32)];
        MemoryMarshal.Write(payload, new VhostUserMemoryHeader { NRegions = 2 });
        for (int i = 0; i < 2; i++)
        {
            var r = new VhostUserMemoryRegion
            {
                GuestPhysAddr = DriverRingModel.GpaBase + ((ulong)i * DriverRingModel.RegionSize),
                MemorySize = DriverRingModel.RegionSize,
                UserspaceAddr = DriverRingModel.UvaBase + ((ulong)i * DriverRingModel.RegionSize),
                MmapOffset = (ulong)i * DriverRingModel.RegionSize,
            };
            MemoryMarshal.Write(payload.AsSpan(8 + (32 * i)), in r);
        }

        Send(VhostUserRequest.SetMemTable, payload, [m.MemFd, m.MemFd], needReply: true);
        return ReadU64Reply(VhostUserRequest.SetMemTable);
    }

    /// <summary>Configures queue <paramref name="index"/> on the model's ring and hands over kick/call eventfds.</summary>
    public ulong SetupQueue(DriverRingModel m, uint index, EventFd? kick, EventFd? call)
    {
        ulong rc = SetStruct(VhostUserRequest.SetVringNum, new VhostUserVringState { Index = index, Num = m.Size });
        rc |= SetStruct(VhostUserRequest.SetVringBase, new VhostUserVringState { Index = index, Num = 0 });
        rc |= SetStruct(VhostUserRequest.SetVringAddr, new VhostUserVringAddr
        {
            Index = index,
            DescUserAddr = m.ToUva(m.DescGpa),
            AvailUserAddr = m.ToUva(m.AvailGpa),
            UsedUserAddr = m.ToUva(m.UsedGpa),
        });
        rc |= call is null ? SetU64(VhostUserRequest.SetVringCall, index | VhostUserConstants.VringNoFdMask) : SetU64(VhostUserRequest.SetVringCall, index, [call.Fd]);
        rc |= kick is null ? SetU64(VhostUserRequest.SetVringKick, index | VhostUserConstants.VringNoFdMask) : SetU64(VhostUserRequest.SetVringKick, index, [kick.Fd]);
        rc |= SetStruct(VhostUserRequest.SetVringEnable, new VhostUserVringState { Index = index, Num = 1 });
        return rc;
    }

    public void Dispose() => _conn.Dispose();
}
