using System.Net;
using System.Net.Sockets;
using System.Text.Json.Nodes;
using VhostBackend.Bdev;
using VhostBackend.Nvme;

namespace VhostBackend.Nvmf;

/// <summary>A listen address (SPDK's transport id of a listener): TCP, IPv4 or IPv6, address and service id.</summary>
public sealed record NvmfListenAddress(string AdrFam, string TrAddr, string TrSvcId)
{
    public IPAddress Address => IPAddress.Parse(TrAddr);
    public int Port => int.Parse(TrSvcId, System.Globalization.CultureInfo.InvariantCulture);
    public AddressFamily Family => AdrFam == "IPv6" ? AddressFamily.InterNetworkV6 : AddressFamily.InterNetwork;

    public JsonObject ToJson() => new()
    {
        ["trtype"] = NvmfTransportOptions.TrType,
        ["adrfam"] = AdrFam,
        ["traddr"] = TrAddr,
        ["trsvcid"] = TrSvcId,
    };

    public bool Matches(IPEndPoint local) => local.Port == Port && (Address.Equals(local.Address) || Address.Equals(IPAddress.Any) || Address.Equals(IPAddress.IPv6Any)
        || (local.Address.IsIPv4MappedToIPv6 && local.Address.MapToIPv4().Equals(Address)));
}

/// <summary>
/// A namespace: a bdev opened for write, published to connections through the subsystem's namespace snapshot. When it
/// is removed, every connection that holds a channel to it gives the channel back (after its in-flight I/O on it) and
/// only then is the descriptor closed.
/// </summary>
public sealed class NvmfNamespace
{
    internal NvmfNamespace(uint nsid, BdevDesc desc, Guid uuid, byte[] nguid, ulong eui64)
    {
        Nsid = nsid;
        Desc = desc;
        Uuid = uuid;
        Nguid = nguid;
        Eui64 = eui64;
    }

    public uint Nsid { get; }
    public BdevDesc Desc { get; }
    public Bdev.Bdev Bdev => Desc.Bdev;
    public Guid Uuid { get; }
    public byte[] Nguid { get; }
    public ulong Eui64 { get; }

    /// <summary>Set when it leaves the subsystem; connections stop using it.</summary>
    internal volatile bool Removed;

    /// <summary>Connections still holding a channel (control path counter).</summary>
    internal int PendingReleases;
    internal TaskCompletionSource? Released;

    /// <summary>
    /// The namespace as SPDK writes it (nvmf_get_subsystems with <paramref name="includeName"/>, save_config without):
    /// nguid, eui64 and uuid only when non-zero.
    /// </summary>
    internal JsonObject ToJson(bool includeName)
    {
        var o = new JsonObject { ["nsid"] = Nsid, ["bdev_name"] = Bdev.Name };
        if (includeName)
        {
            o["name"] = Bdev.Name;
        }

        if (Nguid.AsSpan().ContainsAnyExcept((byte)0))
        {
            o["nguid"] = Convert.ToHexString(Nguid);
        }

        if (Eui64 != 0)
        {
            o["eui64"] = Eui64.ToString("X16", System.Globalization.CultureInfo.InvariantCulture);
        }

        if (Uuid != Guid.Empty)
        {
            o["uuid"] = Uuid.ToString();
        }

        return o;
    }

    internal void ChannelReleased()
    {
        if (Interlocked.Decrement(ref PendingReleases) == 0)
        {
            Released?.TrySetResult();
        }
    }
}

/// <summary>
/// An NVM subsystem (or the discovery subsystem): NQN, serial and model number, allowed hosts, namespaces, listeners
/// and the controllers hosts created with Connect. Mutated on the main reactor (RPCs) under <see cref="NvmfTarget.Lock"/>;
/// connections read the namespace snapshot lock-free and take the lock only to connect.
/// </summary>
public sealed class NvmfSubsystem
{
    public const int DefaultMaxNamespaces = 32;

    internal NvmfSubsystem(NvmfTarget target, string nqn, bool discovery, string serial, string model, uint maxNamespaces, ushort minCntlid, ushort maxCntlid)
    {
        Target = target;
        Nqn = nqn;
        IsDiscovery = discovery;
        SerialNumber = serial;
        ModelNumber = model;
        MaxNamespaces = maxNamespaces;
        MinCntlid = minCntlid;
        MaxCntlid = maxCntlid;
        _namespaces = new NvmfNamespace?[maxNamespaces == 0 ? DefaultMaxNamespaces : maxNamespaces];
        if (!discovery && maxNamespaces == 0)
        {
            MaxNamespaces = DefaultMaxNamespaces;
        }

        _nextCntlid = minCntlid;
    }

    public NvmfTarget Target { get; }
    public string Nqn { get; }
    public bool IsDiscovery { get; }
    public string SerialNumber { get; }
    public string ModelNumber { get; }

    /// <summary>Namespace slots (nsid 1..MaxNamespaces); a create with 0 gets SPDK's default, 32, and reports 32.</summary>
    public uint MaxNamespaces { get; }
    public ushort MinCntlid { get; }
    public ushort MaxCntlid { get; }
    public bool AllowAnyHost { get; internal set; }
    internal readonly List<string> Hosts = new();
    internal readonly List<NvmfListenAddress> Listeners = new();
    internal readonly List<NvmfController> Controllers = new();
    private ushort _nextCntlid;
    internal bool Deleted;

    private NvmfNamespace?[] _namespaces;

    /// <summary>Namespaces by nsid - 1 (null: inactive). Immutable once published: replaced on every change.</summary>
    public NvmfNamespace?[] NamespaceSnapshot => Volatile.Read(ref _namespaces);

    /// <summary>The largest nsid a controller reports (Identify NN).</summary>
    public uint MaxNsid => (uint)NamespaceSnapshot.Length;

    internal void Publish(NvmfNamespace?[] next) => Volatile.Write(ref _namespaces, next);

    public bool HostAllowed(string hostNqn)
    {
        lock (Target.Lock)
        {
            return IsDiscovery || AllowAnyHost || Hosts.Contains(hostNqn, StringComparer.Ordinal);
        }
    }

    /// <summary>Allocates a controller id in [min, max] not in use (under the target lock); 0 when none is free.</summary>
    internal ushort AllocateCntlid()
    {
        int span = MaxCntlid - MinCntlid + 1;
        for (int i = 0; i < span; i++)
        {
            ushort id = _nextCntlid;
            _nextCntlid = id >= MaxCntlid ? MinCntlid : (ushort)(id + 1);
            if (!Controllers.Exists(c => c.Cntlid == id))
            {
                return id;
            }
        }

        return 0;
    }

    internal JsonObject ToJson()
    {
        var listeners = new JsonArray();
        var hosts = new JsonArray();
        lock (Target.Lock)
        {
            foreach (var l in Listeners)
            {
                var o = l.ToJson();
                o.Insert(0, "transport", NvmfTransportOptions.TrType);
                listeners.Add(o);
            }

            foreach (var h in Hosts)
            {
                hosts.Add(new JsonObject { ["nqn"] = h });
            }
        }

        var j = new JsonObject
        {
            ["nqn"] = Nqn,
            ["subtype"] = IsDiscovery ? "Discovery" : "NVMe",
            ["listen_addresses"] = listeners,
            ["allow_any_host"] = IsDiscovery || AllowAnyHost,
            ["hosts"] = hosts,
        };
        if (!IsDiscovery)
        {
            j["serial_number"] = SerialNumber;
            j["model_number"] = ModelNumber;
            j["max_namespaces"] = MaxNamespaces;

            j["min_cntlid"] = (int)MinCntlid;
            j["max_cntlid"] = (int)MaxCntlid;
            var nss = new JsonArray();
            foreach (var ns in NamespaceSnapshot)
            {
                if (ns is null)
                {
                    continue;
                }

                nss.Add(ns.ToJson(includeName: true));
            }

            j["namespaces"] = nss;
        }

        return j;
    }
}
