using System.Runtime.InteropServices;
using VhostBackend.Platform;
using VhostBackend.VhostUser;
using VhostBackend.Virtio;
using VhostBackend.Virtio.Tests;

namespace VhostBackend.Vhost.Tests;

/// <summary>
/// A model of a vhost-user front end (what QEMU does), for tests: speaks the protocol over a Unix socket,
/// shares a memfd as guest memory and drives one queue through <see cref="DriverRingModel"/>. Not QEMU.
/// </summary>
internal sealed class FrontEndModel : IDisposable
{
    private readonly VhostUserEndpoint _ep;

    public FrontEndModel(UnixConnection conn) => _ep = new VhostUserEndpoint(conn);

    public UnixConnection Connection => _ep.Connection;

    public VhostUserEndpoint Endpoint => _ep;

    /// <summary>
    /// Sends a request through the shared endpoint; messages the endpoint refuses to build (more fds than any
    /// request carries) go out raw, since the model also plays a hostile front end.
    /// </summary>
    public void Send(VhostUserRequest req, ReadOnlySpan<byte> payload, ReadOnlySpan<int> fds = default, bool needReply = false, uint? flags = null)
    {
        uint f = flags ?? (VhostUserConstants.Version | (needReply ? VhostUserConstants.FlagNeedReply : 0));
        int rc;
        if (fds.Length > VhostUserConstants.MaxFds)
        {
            var buf = new byte[12 + payload.Length];
            MemoryMarshal.Write(buf, new VhostUserHeader { Request = (uint)req, Flags = f, Size = (uint)payload.Length });
            payload.CopyTo(buf.AsSpan(12));
            rc = _ep.Connection.Send(buf, fds);
        }
        else
        {
            rc = _ep.Send((uint)req, f, payload, fds);
        }

        if (rc != 0)
        {
            throw new IOException($"send failed {rc}");
        }
    }

    public void Send<T>(VhostUserRequest req, T body, ReadOnlySpan<int> fds = default, bool needReply = false)
        where T : unmanaged =>
        Send(req, VhostUserEndpoint.AsBytes(in body), fds, needReply);

    /// <summary>
    /// Reads one reply (or, with <paramref name="reply"/> false, one back-end request from the backend channel);
    /// null when the back end closed the connection (or nothing came within the timeout).
    /// </summary>
    public (VhostUserHeader Header, byte[] Payload)? ReadReply(int timeoutMs = 5000, bool reply = true)
    {
        if (!_ep.WaitReadable(timeoutMs))
        {
            return null;
        }

        var payload = new byte[VhostUserConstants.MaxPayload];
        var fds = new int[UnixConnection.MaxFdsPerMessage];
        if (_ep.Receive(reply, out var h, payload, out int size, fds, out _) != VhostUserError.None)
        {
            return null;
        }

        return (h, payload.AsSpan(0, size).ToArray());
    }

    /// <summary>Reads a reply that may carry one fd (GET_INFLIGHT_FD); the caller owns the fd (-1 if none).</summary>
    public (VhostUserHeader Header, byte[] Payload, int Fd)? ReadReplyWithFd(int timeoutMs = 5000)
    {
        if (!_ep.WaitReadable(timeoutMs))
        {
            return null;
        }

        var payload = new byte[VhostUserConstants.MaxPayload];
        var fds = new int[UnixConnection.MaxFdsPerMessage];
        if (_ep.Receive(true, out var h, payload, out int size, fds, out int n, replyFds: 1) != VhostUserError.None)
        {
            return null;
        }

        return (h, payload.AsSpan(0, size).ToArray(), n == 1 ? fds[0] : -1);
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
        Send(req, VhostUserEndpoint.AsBytes(in value), fds, needReply: true);
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
        if (!_ep.WaitReadable(timeoutMs))
        {
            return false;
        }

        Span<byte> b = stackalloc byte[1];
        Span<int> fds = stackalloc int[UnixConnection.MaxFdsPerMessage];
        return _ep.Connection.Receive(b, fds, out _, out _) == 0;
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
    public ulong SetMemTable(DriverRingModel m) => SetMemTable(m.MemFd);

    /// <summary>SET_MEM_TABLE for the packed driver model (the same two-region layout as <see cref="DriverRingModel"/>).</summary>
    public ulong SetMemTable(PackedDriverModel m) => SetMemTable(m.MemFd);

    /// <summary>SET_MEM_TABLE of the models' two-region layout on any fd (tests hand over a hostile one).</summary>
    public ulong SetMemTable(int memFd)
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

        Send(VhostUserRequest.SetMemTable, payload, [memFd, memFd], needReply: true);
        return ReadU64Reply(VhostUserRequest.SetMemTable);
    }

    /// <summary>Configures queue <paramref name="index"/> on the model's ring and hands over kick/call eventfds.</summary>
    public ulong SetupQueue(DriverRingModel m, uint index, EventFd? kick, EventFd? call, ushort vringBase = 0)
    {
        ulong rc = SetStruct(VhostUserRequest.SetVringNum, new VhostUserVringState { Index = index, Num = m.Size });
        rc |= SetStruct(VhostUserRequest.SetVringBase, new VhostUserVringState { Index = index, Num = vringBase });
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

    /// <summary>Configures queue <paramref name="index"/> on the packed model's ring (desc = the ring, avail/used = the driver/device event areas).</summary>
    public ulong SetupPackedQueue(PackedDriverModel m, uint index, EventFd? kick, EventFd? call, uint vringBase = PackedVirtqueue.InitialBase)
    {
        ulong rc = SetStruct(VhostUserRequest.SetVringNum, new VhostUserVringState { Index = index, Num = m.Size });
        rc |= SetStruct(VhostUserRequest.SetVringBase, new VhostUserVringState { Index = index, Num = vringBase });
        rc |= SetStruct(VhostUserRequest.SetVringAddr, new VhostUserVringAddr
        {
            Index = index,
            DescUserAddr = m.ToUva(m.RingGpa),
            AvailUserAddr = m.ToUva(m.DriverEventGpa),
            UsedUserAddr = m.ToUva(m.DeviceEventGpa),
        });
        rc |= call is null ? SetU64(VhostUserRequest.SetVringCall, index | VhostUserConstants.VringNoFdMask) : SetU64(VhostUserRequest.SetVringCall, index, [call.Fd]);
        rc |= kick is null ? SetU64(VhostUserRequest.SetVringKick, index | VhostUserConstants.VringNoFdMask) : SetU64(VhostUserRequest.SetVringKick, index, [kick.Fd]);
        rc |= SetStruct(VhostUserRequest.SetVringEnable, new VhostUserVringState { Index = index, Num = 1 });
        return rc;
    }

    public void Dispose() => _ep.Dispose();
}
