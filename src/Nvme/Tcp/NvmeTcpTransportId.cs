using System.Net;
using System.Net.Sockets;

namespace VhostBackend.Nvme.Tcp;

/// <summary>
/// Where an NVMe/TCP controller is and who we are (SPDK's spdk_nvme_transport_id plus the host fields of
/// spdk_nvme_ctrlr_opts): target address and port, subsystem NQN, host NQN and id, the local address to bind, digests.
/// </summary>
public sealed record NvmeTcpTransportId
{
    public const string DefaultHostNqnPrefix = "nqn.2014-08.org.nvmexpress:uuid:";

    /// <summary>Target IP address (traddr).</summary>
    public required IPAddress Address { get; init; }

    /// <summary>Target port (trsvcid), 4420 by convention.</summary>
    public int Port { get; init; } = 4420;

    /// <summary>Subsystem NQN (subnqn).</summary>
    public string SubNqn { get; init; } = NvmeFabrics.DiscoveryNqn;

    /// <summary>Host NQN (hostnqn); by default one made of <see cref="HostId"/>.</summary>
    public string? HostNqn { get; init; }

    /// <summary>Host identifier sent in Connect data.</summary>
    public Guid HostId { get; init; } = Guid.NewGuid();

    /// <summary>Local address to bind (hostaddr), or null.</summary>
    public IPAddress? HostAddress { get; init; }

    /// <summary>Local port to bind (hostsvcid), 0 for any.</summary>
    public int HostPort { get; init; }

    /// <summary>Request header digests (hdgst).</summary>
    public bool HeaderDigest { get; init; }

    /// <summary>Request data digests (ddgst).</summary>
    public bool DataDigest { get; init; }

    public string EffectiveHostNqn => HostNqn ?? DefaultHostNqnPrefix + HostId.ToString("D");

    public AddressFamily Family => Address.AddressFamily;

    public override string ToString() => $"tcp:{Address}:{Port}/{SubNqn}";
}
