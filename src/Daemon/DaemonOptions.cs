using VhostBackend.App;
using VhostBackend.Platform;
using VhostBackend.Reactors;

namespace VhostBackend.Daemon;

/// <summary>vhostd's command line: SPDK vhost application options.</summary>
public sealed class DaemonOptions
{
    public const string Usage = """
        Usage: vhostd [options]
        VhostBackend daemon: serves bdevs to QEMU guests over vhost-user (virtio-blk, virtio-scsi).
        With no arguments at all it runs the embedded default: a sparse file-backed disk exported as vhost.0.
        With options but no -c it starts empty, like SPDK's vhost app (configure it over RPC), unless --default.

          -m, --cpumask MASK         reactor cores: hex mask (0x3) or list ([0,1]); default 0x1
          -S, --socket-dir DIR       directory for vhost-user sockets; default /var/tmp
          -r, --rpc-socket PATH      JSON-RPC socket; default /var/tmp/vhost.sock
              --socket-user USER     owner (name or uid) of the RPC socket and of every vhost-user socket
              --socket-group GROUP   their group (name or gid), e.g. kvm so libvirt's QEMU can connect
              --socket-mode MODE     their permissions in octal, e.g. 0660 (default: as created, umask)
          -c, --json FILE            JSON config in SPDK's format, applied at start
              --wait-for-rpc         wait for framework_start_init before applying the config
              --persist-config FILE  keep the running config in FILE (rewritten atomically after every
                                     change over RPC) and start from FILE when it exists (-c seeds the first start)
              --reactor-mode MODE    poll, interrupt or adaptive (default adaptive)
              --interrupt-mode       same as --reactor-mode interrupt
              --default              also run the embedded default (when options are given, without -c)
              --default-disk PATH    file of the embedded default disk (default /var/tmp/vhostbackend/disk0.img)
              --default-disk-size N  its size when created, in MiB (default 1024)
          -L, --log-level LEVEL      error, warning, info, debug (default info)
              --log-file PATH        also log to this file
          -h, --help                 this text
        """;

    public ApplicationOptions App { get; } = new() { Name = "vhost", SocketDir = "/var/tmp" };
    public string LogLevel { get; private set; } = "info";
    public string? LogFile { get; private set; }
    public bool Help { get; private set; }
    public string DefaultDiskPath { get; private set; } = "/var/tmp/vhostbackend/disk0.img";
    public long DefaultDiskMiB { get; private set; } = 1024;

    /// <summary>Whether the embedded default (file disk exported as vhost.0) runs: no arguments at all, or --default.</summary>
    public bool UseEmbeddedDefault { get; private set; }

    public static DaemonOptions Parse(string[] args)
    {
        var o = new DaemonOptions { UseEmbeddedDefault = args.Length == 0 };
        uint? socketUser = null;
        uint? socketGroup = null;
        UnixFileMode? socketMode = null;
        for (int i = 0; i < args.Length; i++)
        {
            string a = args[i];
            string? inline = null;
            int eq = a.IndexOf('=');
            if (a.StartsWith("--", StringComparison.Ordinal) && eq > 0)
            {
                inline = a[(eq + 1)..];
                a = a[..eq];
            }

            string Value()
            {
                if (inline is not null)
                {
                    return inline;
                }

                if (i + 1 >= args.Length)
                {
                    throw new ApplicationConfigException($"option {a} needs a value");
                }

                return args[++i];
            }

            switch (a)
            {
                case "-m":
                case "--cpumask":
                    string mask = Value();
                    if (!CpuSet.TryParse(mask, out var set, out var err))
                    {
                        throw new ApplicationConfigException($"-m/--cpumask: {err}");
                    }

                    o.App.CpuMask = set;
                    break;
                case "-S":
                case "--socket-dir":
                    o.App.SocketDir = Value();
                    break;
                case "-r":
                case "--rpc-socket":
                    o.App.RpcSocket = Value();
                    break;
                case "-c":
                case "--json":
                case "--config":
                    o.App.ConfigFile = Value();
                    break;
                case "--socket-user":
                    string user = Value();
                    if (!SocketOwnership.TryResolveUser(user, out uint uid))
                    {
                        throw new ApplicationConfigException($"--socket-user: unknown user '{user}'");
                    }

                    socketUser = uid;
                    break;
                case "--socket-group":
                    string group = Value();
                    if (!SocketOwnership.TryResolveGroup(group, out uint gid))
                    {
                        throw new ApplicationConfigException($"--socket-group: unknown group '{group}'");
                    }

                    socketGroup = gid;
                    break;
                case "--socket-mode":
                    string modeText = Value();
                    if (!SocketOwnership.TryParseMode(modeText, out var socketModeValue))
                    {
                        throw new ApplicationConfigException($"--socket-mode: '{modeText}' is not an octal permission mode (e.g. 0660)");
                    }

                    socketMode = socketModeValue;
                    break;
                case "--persist-config":
                    o.App.PersistConfigFile = Value();
                    break;
                case "--wait-for-rpc":
                    o.App.WaitForRpc = true;
                    break;
                case "--interrupt-mode":
                    o.App.Reactor.Mode = ReactorMode.Interrupt;
                    break;
                case "--reactor-mode":
                    string mode = Value();
                    if (!ReactorOptions.TryParseMode(mode, out var parsed))
                    {
                        throw new ApplicationConfigException($"--reactor-mode: unknown mode '{mode}' (poll, interrupt, adaptive)");
                    }

                    o.App.Reactor.Mode = parsed;
                    break;
                case "--default":
                    o.UseEmbeddedDefault = true;
                    break;
                case "--default-disk":
                    o.DefaultDiskPath = Value();
                    break;
                case "--default-disk-size":
                    string size = Value();
                    if (!long.TryParse(size, out long mib) || mib < 1 || mib > 1 << 24)
                    {
                        throw new ApplicationConfigException($"--default-disk-size: '{size}' is not a size in MiB");
                    }

                    o.DefaultDiskMiB = mib;
                    break;
                case "-L":
                case "--log-level":
                    string level = Value();
                    if (level is not ("error" or "warning" or "info" or "debug" or "trace"))
                    {
                        throw new ApplicationConfigException($"-L/--log-level: unknown level '{level}' (error, warning, info, debug)");
                    }

                    o.LogLevel = level;
                    break;
                case "--log-file":
                    o.LogFile = Value();
                    break;
                case "-h":
                case "--help":
                    o.Help = true;
                    return o;
                default:
                    throw new ApplicationConfigException($"unknown option '{args[i]}' (see --help)");
            }
        }

        if (socketUser is not null || socketGroup is not null || socketMode is not null)
        {
            o.App.SocketOwnership = new SocketOwnership(socketUser, socketGroup, socketMode);
        }

        if (o.App.ConfigFile is not null && o.UseEmbeddedDefault)
        {
            throw new ApplicationConfigException("--default and -c/--json exclude each other");
        }

        if (o.App.ConfigFile is { } cfg && !File.Exists(cfg))
        {
            throw new ApplicationConfigException($"-c/--json: config file '{cfg}' does not exist");
        }

        if (o.App.PersistConfigFile is { } persist &&
            (persist.Length == 0 || Directory.Exists(persist) || !Directory.Exists(Path.GetDirectoryName(Path.GetFullPath(persist)))))
        {
            throw new ApplicationConfigException($"--persist-config: '{persist}' is not a file path in an existing directory");
        }

        if (!Directory.Exists(o.App.SocketDir))
        {
            throw new ApplicationConfigException($"-S/--socket-dir: directory '{o.App.SocketDir}' does not exist");
        }

        return o;
    }
}
