using System.Text.Json.Nodes;
using VhostBackend.Platform;
using VhostBackend.Reactors;

namespace VhostBackend.App;

/// <summary>What an application (vhostd, bdevperf) starts with: SPDK's app options.</summary>
public sealed class ApplicationOptions
{
    public string Name { get; set; } = "vhost";

    /// <summary>-m/--cpumask: reactor cores.</summary>
    public CpuSet CpuMask { get; set; } = CpuSet.Of(0);

    public ReactorOptions Reactor { get; set; } = new();

    /// <summary>-r/--rpc-socket; null or empty: no RPC server.</summary>
    public string? RpcSocket { get; set; } = "/var/tmp/vhost.sock";

    /// <summary>-c/--json: a config file in SPDK's format.</summary>
    public string? ConfigFile { get; set; }

    /// <summary>A config given in memory (the daemon's embedded default) when no file is given.</summary>
    public JsonObject? Config { get; set; }

    /// <summary>-S/--socket-dir: where vhost-user sockets are created.</summary>
    public string SocketDir { get; set; } = Environment.CurrentDirectory;

    /// <summary>
    /// --socket-user/--socket-group/--socket-mode (ours): owner, group and mode of the RPC socket and of every
    /// vhost-user controller socket, applied when each is created; null: as created (root's umask).
    /// </summary>
    public SocketOwnership? SocketOwnership { get; set; }

    /// <summary>--wait-for-rpc: apply the config and start subsystems only on framework_start_init.</summary>
    public bool WaitForRpc { get; set; }

    /// <summary>
    /// Virtual size of the shared I/O memory (<see cref="Application.SharedMemory"/>: what a virtio-user front end
    /// sends its back end; pages are committed only when touched). bdevperf's <c>-s MiB</c>. A back end with an IOMMU
    /// pins all of it, so a small one maps faster.
    /// </summary>
    public ulong SharedMemoryBytes { get; set; } = DefaultSharedMemoryBytes;

    public const ulong DefaultSharedMemoryBytes = 512UL << 20;

    /// <summary>
    /// --persist-config (ours): keep the running config in this file (save_config format, rewritten atomically
    /// after every change over RPC) and start from it when it exists, instead of <see cref="ConfigFile"/> or
    /// <see cref="Config"/> (those seed the first start). See <see cref="ConfigPersistence"/>.
    /// </summary>
    public string? PersistConfigFile { get; set; }
}

/// <summary>A configuration or option error the user must fix; the daemon prints it and exits 1.</summary>
public sealed class ApplicationConfigException : Exception
{
    public ApplicationConfigException(string message, Exception? inner = null)
        : base(message, inner)
    {
    }
}
