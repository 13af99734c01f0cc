using System.CommandLine;
using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace VhostBackend.Cli;

/// <summary>vhostctl: SPDK rpc.py-style commands for vhostd, human tables by default, --json for raw results.</summary>
public static partial class Program
{
    private static readonly Option<string> Server = new("--server", "-s") { Description = "JSON-RPC socket of vhostd", DefaultValueFactory = _ => "/var/tmp/vhost.sock", Recursive = true };
    private static readonly Option<bool> Json = new("--json") { Description = "print the raw JSON result", Recursive = true };
    private static readonly Option<double> Timeout = new("--timeout", "-t") { Description = "seconds to wait for a reply", DefaultValueFactory = _ => 60.0, Recursive = true };

    public static int Main(string[] args)
    {
        var root = new RootCommand("vhostctl: manage vhostd over JSON-RPC (SPDK rpc.py method names)");
        root.Options.Add(Server);
        root.Options.Add(Json);
        root.Options.Add(Timeout);

        var method = new Argument<string>("method") { Description = "RPC method name" };
        var paramsArg = new Argument<string?>("params") { Description = "params as a JSON object", Arity = ArgumentArity.ZeroOrOne };
        var call = new Command("call", "call any method: vhostctl call METHOD '{\"param\": 1}'") { method, paramsArg };
        call.SetAction(r => Run(r, r.GetValue(method)!, ParseParams(r.GetValue(paramsArg))));
        root.Subcommands.Add(call);

        Simple(root, "rpc_get_methods", "list methods");
        Simple(root, "spdk_get_version", "daemon version");
        Simple(root, "framework_get_reactors", "reactors and their statistics", Columns("reactors", "lcore", "tid", "busy", "idle", "in_interrupt", "allocated_bytes"));
        Simple(root, "thread_get_stats", "thread statistics", Columns("threads", "name", "id", "cpumask", "busy", "idle", "active_pollers_count", "timed_pollers_count"));
        Simple(root, "framework_get_subsystems", "subsystems", Columns(null, "subsystem", "depends_on"));
        Simple(root, "framework_start_init", "start initialization (after --wait-for-rpc)");
        Simple(root, "framework_wait_init", "wait until initialized");
        WithArgs(root, "framework_get_config", "a subsystem's config", [("name", "subsystem name", "string")]);

        var saveConfig = new Command("save_config", "print the running configuration (SPDK's JSON config format)");
        saveConfig.SetAction(r => WithClient(r, c =>
        {
            var subsystems = new JsonArray();
            foreach (var s in (JsonArray)c.Call("framework_get_subsystems", null)!)
            {
                string name = (string)s!["subsystem"]!;
                subsystems.Add(new JsonObject { ["subsystem"] = name, ["config"] = c.Call("framework_get_config", new JsonObject { ["name"] = name }) });
            }

            Console.WriteLine(new JsonObject { ["subsystems"] = subsystems }.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
            return 0;
        }));
        root.Subcommands.Add(saveConfig);

        var file = new Option<string?>("--json-file", "-j") { Description = "config file (default: standard input)" };
        var loadConfig = new Command("load_config", "replay a JSON config into a running daemon") { file };
        loadConfig.SetAction(r => WithClient(r, c =>
        {
            string? path = r.GetValue(file);
            var config = JsonNode.Parse(path is null ? Console.In.ReadToEnd() : File.ReadAllText(path)) as JsonObject
                ?? throw new RpcClientException("config must be a JSON object");
            // rpc.py's algorithm: call what the current RPC state allows, framework_start_init when it is allowed
            // (a --wait-for-rpc daemon), repeat until nothing more can be called.
            var pending = new List<JsonObject>();
            foreach (var s in config["subsystems"] as JsonArray ?? [])
            {
                foreach (var entry in s?["config"] as JsonArray ?? [])
                {
                    if (entry is JsonObject e && e["method"] is JsonValue)
                    {
                        pending.Add(e);
                    }
                }
            }

            while (true)
            {
                var allowed = ((JsonArray?)c.Call("rpc_get_methods", new JsonObject { ["current"] = true }) ?? []).Select(n => (string?)n).ToHashSet();
                bool progress = false;
                foreach (var e in pending.Where(e => allowed.Contains((string?)e["method"])).ToList())
                {
                    c.Call((string)e["method"]!, e["params"]?.DeepClone());
                    pending.Remove(e);
                    progress = true;
                }

                if (allowed.Contains("framework_start_init"))
                {
                    c.Call("framework_start_init", null);
                    progress = true;
                }

                if (!progress || pending.Count == 0)
                {
                    break;
                }
            }

            if (pending.Count > 0)
            {
                Console.Error.WriteLine($"vhostctl: {pending.Count} call(s) skipped because the RPC state that allows them has passed: {string.Join(", ", pending.Select(e => (string?)e["method"]).Distinct())}");
            }

            return 0;
        }));
        root.Subcommands.Add(loadConfig);

        var bdevCols = Columns(null, "name", "product_name", "block_size", "num_blocks", "uuid", "claimed");
        WithArgs(root, "bdev_get_bdevs", "list bdevs", [("-b|name", "bdev name", "string?")], bdevCols);
        WithArgs(root, "bdev_get_iostat", "I/O statistics", [("-b|name", "bdev name", "string?")], Columns("bdevs", "name", "num_read_ops", "bytes_read", "num_write_ops", "bytes_written", "num_unmap_ops"));
        SizedCreate(root, "bdev_malloc_create", "create a RAM bdev: [-b NAME] TOTAL_SIZE_MB BLOCK_SIZE", nameRequired: false);
        SizedCreate(root, "bdev_null_create", "create a null bdev: NAME TOTAL_SIZE_MB BLOCK_SIZE", nameRequired: true);
        WithArgs(root, "bdev_malloc_delete", "delete a RAM bdev", [("name", "bdev name", "string")]);
        WithArgs(root, "bdev_null_delete", "delete a null bdev", [("name", "bdev name", "string")]);
        WithArgs(root, "bdev_null_resize", "resize a null bdev (MiB)", [("name", "bdev name", "string"), ("new_size", "new size in MiB", "ulong")]);
        WithArgs(root, "bdev_aio_create", "file bdev: FILENAME NAME [BLOCK_SIZE]", [("filename", "file or block device", "string"), ("name", "bdev name", "string"), ("block_size", "block size", "uint?"), ("-r|readonly", "read-only", "flag")]);
        WithArgs(root, "bdev_aio_delete", "delete a file bdev", [("name", "bdev name", "string")]);
        WithArgs(root, "bdev_uring_create", "file bdev (io_uring): FILENAME NAME [BLOCK_SIZE]", [("filename", "file or block device", "string"), ("name", "bdev name", "string"), ("block_size", "block size", "uint?")]);
        WithArgs(root, "bdev_uring_delete", "delete a file bdev", [("name", "bdev name", "string")]);
        WithArgs(root, "bdev_set_qos_limit", "QoS limits", [("name", "bdev name", "string"), ("--rw_ios_per_sec|rw_ios_per_sec", "IOPS", "ulong?"), ("--rw_mbytes_per_sec|rw_mbytes_per_sec", "MiB/s", "ulong?"), ("--r_mbytes_per_sec|r_mbytes_per_sec", "read MiB/s", "ulong?"), ("--w_mbytes_per_sec|w_mbytes_per_sec", "write MiB/s", "ulong?")]);

        WithArgs(root, "vhost_create_blk_controller", "export a bdev over vhost-user-blk", [("ctrlr", "controller name", "string"), ("dev_name", "bdev name", "string"), ("--cpumask|cpumask", "reactor mask", "string?"), ("-r|readonly", "read-only", "flag"), ("-p|packed_ring", "offer packed virtqueues (VIRTIO_F_RING_PACKED)", "flag")]);
        WithArgs(root, "vhost_create_scsi_controller", "create a vhost-user-scsi controller", [("ctrlr", "controller name", "string"), ("--cpumask|cpumask", "reactor mask", "string?"), ("--delay|delay", "do not listen until vhost_start_scsi_controller", "flag")]);
        WithArgs(root, "vhost_start_scsi_controller", "start a controller created with --delay", [("ctrlr", "controller name", "string")]);
        WithArgs(root, "vhost_scsi_controller_add_target", "attach a bdev as a SCSI target", [("ctrlr", "controller name", "string"), ("scsi_target_num", "target number (-1: first free)", "int"), ("bdev_name", "bdev name", "string"), ("--readonly|readonly", "read-only LUN (our extension)", "flag")]);
        WithArgs(root, "vhost_scsi_controller_remove_target", "detach a SCSI target", [("ctrlr", "controller name", "string"), ("scsi_target_num", "target number", "int")]);
        WithArgs(root, "vhost_get_controllers", "list controllers", [("-n|name", "controller name", "string?")], Columns(null, "ctrlr", "cpumask", "socket", "delay_base_us", "iops_threshold"));
        WithArgs(root, "vhost_delete_controller", "delete a controller", [("ctrlr", "controller name", "string")]);
        WithArgs(root, "vhost_controller_set_coalescing", "interrupt coalescing", [("ctrlr", "controller name", "string"), ("delay_base_us", "delay in us", "uint"), ("iops_threshold", "IOPS threshold", "uint")]);
        // Virtual bdevs (rpc.py's flags and positionals).
        WithArgs(root, "bdev_passthru_create", "pass-through bdev on a base bdev", [("-b|base_bdev_name", "base bdev name", "string"), ("-p|name", "pass-through bdev name", "string"), ("-u|uuid", "UUID", "string?")]);
        WithArgs(root, "bdev_passthru_delete", "delete a pass-through bdev", [("name", "bdev name", "string")]);
        WithArgs(root, "bdev_delay_create", "delay bdev on a base bdev (latencies in us)", [("-b|base_bdev_name", "base bdev name", "string"), ("-d|name", "delay bdev name", "string"), ("-u|uuid", "UUID", "string?"), ("-r|avg_read_latency", "average read latency (us)", "ulong"), ("--p99_read_latency|p99_read_latency", "p99 read latency (us)", "ulong"), ("-w|avg_write_latency", "average write latency (us)", "ulong"), ("-n|p99_write_latency", "p99 write latency (us)", "ulong")]);
        WithArgs(root, "bdev_delay_delete", "delete a delay bdev", [("name", "bdev name", "string")]);
        WithArgs(root, "bdev_delay_update_latency", "change one latency of a delay bdev", [("delay_bdev_name", "delay bdev name", "string"), ("latency_type", "avg_read, avg_write, p99_read or p99_write", "string"), ("latency_us", "latency (us)", "ulong")]);
        WithArgs(root, "bdev_error_create", "error-injection bdev EE_<base>", [("base_name", "base bdev name", "string"), ("--uuid|uuid", "UUID", "string?")]);
        WithArgs(root, "bdev_error_delete", "delete an error-injection bdev", [("name", "bdev name", "string")]);
        WithArgs(root, "bdev_error_inject_error", "inject errors", [("name", "error bdev name", "string"), ("io_type", "clear, read, write, unmap, flush or all", "string"), ("error_type", "failure, pending, corrupt_data or nomem", "string"), ("-n|num", "number of commands to fail", "uint?"), ("-q|queue_depth", "queue depth at which to trigger", "uint?"), ("-o|corrupt_offset", "byte offset to xor", "ulong?"), ("-v|corrupt_value", "xor value (1-255)", "uint?")]);
        WithArgs(root, "bdev_split_create", "split a bdev: BASE SPLIT_COUNT [-s MB]", [("base_bdev", "base bdev name", "string"), ("split_count", "number of parts", "uint"), ("--split_size_mb|split_size_mb", "part size in MiB (default: even split)", "ulong?")]);
        WithArgs(root, "bdev_split_delete", "delete a bdev's split parts", [("base_bdev", "base bdev name", "string")]);
        // Logical volumes (rpc.py's positionals and flags).
        WithArgs(root, "bdev_lvol_create_lvstore", "create an lvstore on a bdev: BDEV_NAME LVS_NAME", [("bdev_name", "base bdev name", "string"), ("lvs_name", "lvstore name", "string"), ("-c|cluster_sz", "cluster size in bytes (default 4 MiB)", "uint?"), ("--clear-method|clear_method", "none, unmap (default) or write_zeroes", "string?"), ("-m|num_md_pages_per_cluster_ratio", "metadata pages per 100 clusters (default 100)", "uint?")]);
        WithArgs(root, "bdev_lvol_delete_lvstore", "delete an lvstore and its lvols", [("-u|uuid", "lvstore UUID", "string?"), ("-l|lvs_name", "lvstore name", "string?")]);
        WithArgs(root, "bdev_lvol_grow_lvstore", "grow an lvstore to its base bdev's current size", [("-u|uuid", "lvstore UUID", "string?"), ("-l|lvs_name", "lvstore name", "string?")]);
        WithArgs(root, "bdev_lvol_rename_lvstore", "rename an lvstore", [("old_name", "current name", "string"), ("new_name", "new name", "string")]);
        WithArgs(root, "bdev_lvol_get_lvstores", "list lvstores", [("-u|uuid", "lvstore UUID", "string?"), ("-l|lvs_name", "lvstore name", "string?")], Columns(null, "name", "uuid", "base_bdev", "total_data_clusters", "free_clusters", "cluster_size"));
        WithArgs(root, "bdev_lvol_create", "create an lvol: LVOL_NAME SIZE_IN_MIB", [("lvol_name", "lvol name", "string"), ("size_in_mib", "size in MiB", "ulong"), ("-t|thin_provision", "thin provisioned", "flag"), ("-u|uuid", "lvstore UUID", "string?"), ("-l|lvs_name", "lvstore name", "string?"), ("-c|clear_method", "none, unmap or write_zeroes", "string?")]);
        WithArgs(root, "bdev_lvol_snapshot", "snapshot an lvol: LVOL_NAME SNAPSHOT_NAME", [("lvol_name", "lvol bdev name or alias", "string"), ("snapshot_name", "snapshot name", "string")]);
        WithArgs(root, "bdev_lvol_clone", "clone a snapshot: SNAPSHOT_NAME CLONE_NAME", [("snapshot_name", "snapshot bdev name or alias", "string"), ("clone_name", "clone name", "string")]);
        WithArgs(root, "bdev_lvol_rename", "rename an lvol: OLD_NAME NEW_NAME", [("old_name", "lvol bdev name or alias", "string"), ("new_name", "new lvol name", "string")]);
        WithArgs(root, "bdev_lvol_resize", "resize an lvol: NAME SIZE_IN_MIB", [("name", "lvol bdev name or alias", "string"), ("size_in_mib", "new size in MiB", "ulong")]);
        WithArgs(root, "bdev_lvol_set_read_only", "make an lvol read-only", [("name", "lvol bdev name or alias", "string")]);
        WithArgs(root, "bdev_lvol_delete", "delete an lvol", [("name", "lvol bdev name or alias", "string")]);
        WithArgs(root, "bdev_lvol_inflate", "allocate every cluster of a clone and drop its parent", [("name", "lvol bdev name or alias", "string")]);
        WithArgs(root, "bdev_lvol_decouple_parent", "copy the parent's clusters into a clone and skip that parent", [("name", "lvol bdev name or alias", "string")]);
        WithArgs(root, "bdev_lvol_start_shallow_copy", "copy a read-only lvol's own clusters to a bdev: SRC_LVOL_NAME DST_BDEV_NAME", [("src_lvol_name", "lvol bdev name or alias", "string"), ("dst_bdev_name", "destination bdev name", "string")]);
        WithArgs(root, "bdev_lvol_check_shallow_copy", "status of a shallow copy: OPERATION_ID", [("operation_id", "id from bdev_lvol_start_shallow_copy", "uint")]);
        WithArgs(root, "bdev_lvol_get_lvols", "list lvols", [("-u|lvs_uuid", "lvstore UUID", "string?"), ("-l|lvs_name", "lvstore name", "string?")], Columns(null, "alias", "uuid", "is_thin_provisioned", "is_snapshot", "is_clone"));
        WithArgs(root, "bdev_raid_create", "create a raid bdev", [("-n|name", "raid bdev name", "string"), ("-z|strip_size_kb", "strip size (KiB)", "uint?"), ("-r|raid_level", "raid0, raid1 or concat", "string"), ("-b|base_bdevs", "base bdev names, whitespace separated", "list"), ("--uuid|uuid", "UUID", "string?"), ("--superblock|superblock", "on-disk superblock (not supported yet)", "flag")]);
        WithArgs(root, "bdev_raid_delete", "delete a raid bdev", [("name", "raid bdev name", "string")]);
        WithArgs(root, "bdev_raid_get_bdevs", "list raid bdevs: all, online, configuring or offline", [("category", "category", "string")], Columns(null, "name", "raid_level", "state", "strip_size_kb", "num_base_bdevs", "num_base_bdevs_discovered", "num_base_bdevs_operational"));
        WithArgs(root, "bdev_raid_add_base_bdev", "add a base bdev to a raid (a raid1 rebuilds it)", [("raid_bdev", "raid bdev name", "string"), ("base_bdev", "base bdev name", "string")]);
        WithArgs(root, "bdev_raid_remove_base_bdev", "remove a base bdev from its raid", [("name", "base bdev name", "string")]);
        WithArgs(root, "bdev_raid_set_options", "raid options", [("-w|process_window_size_kb", "rebuild window (KiB)", "uint?")]);
        WithArgs(root, "bdev_nvme_attach_controller", "attach an NVMe controller (PCIe or TCP)", [("-b|name", "controller name", "string"), ("-t|trtype", "transport: PCIe or TCP", "string"), ("-a|traddr", "PCI address or IP address", "string"), ("-f|adrfam", "IPv4 or IPv6 (TCP)", "string?"), ("-s|trsvcid", "port (TCP, default 4420)", "string?"), ("-n|subnqn", "subsystem NQN (TCP)", "string?"), ("-q|hostnqn", "host NQN (TCP)", "string?"), ("-i|hostaddr", "local address to bind (TCP)", "string?"), ("-c|hostsvcid", "local port to bind (TCP)", "string?"), ("-e|hdgst", "header digest (TCP)", "flag"), ("-d|ddgst", "data digest (TCP)", "flag"), ("--fabrics-timeout|fabrics_connect_timeout_us", "connect timeout (us, TCP)", "ulong?"), ("--num-io-queues|num_io_queues", "I/O queues to request", "uint?"), ("-l|ctrlr_loss_timeout_sec", "give the controller up after this long without a path (-1: never)", "int?"), ("-o|reconnect_delay_sec", "seconds between reconnect attempts", "uint?"), ("-u|fast_io_fail_timeout_sec", "fail I/O after the path is down this long (0: never)", "uint?"), ("-m|max_bdevs", "most namespaces to expose", "uint?")]);
        WithArgs(root, "bdev_nvme_detach_controller", "detach an NVMe controller", [("name", "controller name", "string"), ("-t|trtype", "transport", "string?"), ("-a|traddr", "address", "string?"), ("-f|adrfam", "address family", "string?"), ("-s|trsvcid", "port", "string?"), ("-n|subnqn", "subsystem NQN", "string?")]);
        WithArgs(root, "bdev_virtio_attach_controller", "attach a virtio-user device (a vhost-user front end): blk (one bdev) or scsi (one bdev per target found)", [("name", "controller name", "string"), ("-t|trtype", "transport: user", "string"), ("-a|traddr", "vhost-user socket path", "string"), ("-d|dev_type", "blk or scsi", "string"), ("--vq-count|vq_count", "request queues", "int?"), ("--vq-size|vq_size", "entries per queue", "int?")]);
        WithArgs(root, "bdev_virtio_detach_controller", "detach a virtio-user device and remove its bdevs", [("name", "controller name", "string")]);
        Simple(root, "bdev_virtio_scsi_get_devices", "list virtio-user SCSI controllers");
        Simple(root, "bdev_virtio_blk_get_devices", "list virtio-user blk controllers");
        WithArgs(root, "bdev_nvme_reset_controller", "reset (PCIe) or reconnect (TCP) an NVMe controller", [("name", "controller name", "string"), ("-c|cntlid", "controller id of the path", "uint?")]);
        WithArgs(root, "bdev_nvme_start_discovery", "attach every NVM subsystem a discovery controller lists (TCP)", [("-b|name", "discovery service name (controllers are <name>0, <name>1, ...)", "string"), ("-t|trtype", "transport: TCP", "string"), ("-a|traddr", "IP address", "string"), ("-f|adrfam", "IPv4 or IPv6", "string?"), ("-s|trsvcid", "port (default 8009)", "string?"), ("-q|hostnqn", "host NQN", "string?"), ("-w|wait_for_attach", "return after the listed subsystems are attached (else once the discovery log is read)", "flag"), ("-l|ctrlr_loss_timeout_sec", "ctrlr_loss_timeout_sec of the controllers", "int?"), ("-o|reconnect_delay_sec", "reconnect_delay_sec of the controllers", "uint?"), ("-u|fast_io_fail_timeout_sec", "fast_io_fail_timeout_sec of the controllers", "uint?")]);
        WithArgs(root, "bdev_nvme_stop_discovery", "stop a discovery service and detach its controllers", [("-b|name", "discovery service name", "string")]);
        WithArgs(root, "bdev_nvme_get_discovery_info", "list discovery services", []);
        WithArgs(root, "bdev_nvme_set_options", "NVMe module options (before any controller is attached)", [("-t|timeout_us", "I/O timeout (us, 0: none)", "ulong?"), ("-p|action_on_timeout", "none, reset or abort", "string?"), ("--timeout-admin-us|timeout_admin_us", "admin command timeout (us)", "ulong?"), ("-k|keep_alive_timeout_ms", "keep-alive timeout (ms)", "uint?"), ("--io-queue-requests|io_queue_requests", "requests per I/O queue", "uint?"), ("-l|ctrlr_loss_timeout_sec", "default ctrlr_loss_timeout_sec", "int?"), ("-o|reconnect_delay_sec", "default reconnect_delay_sec", "uint?"), ("-u|fast_io_fail_timeout_sec", "default fast_io_fail_timeout_sec", "uint?")]);
        WithArgs(root, "bdev_nvme_get_controllers", "list NVMe controllers", [("-n|name", "controller name", "string?")]);
        // NVMe-oF target (rpc.py's flags and positionals; docs/NVMF.md).
        WithArgs(root, "nvmf_create_transport", "create the NVMe-oF transport (TCP)", [("-t|trtype", "transport type: TCP", "string"), ("-q|max_queue_depth", "max outstanding I/O per queue", "uint?"), ("-m|max_io_qpairs_per_ctrlr", "max I/O qpairs per controller", "uint?"), ("-c|in_capsule_data_size", "in-capsule data size (bytes)", "uint?"), ("-i|max_io_size", "max I/O size (bytes)", "uint?"), ("-u|io_unit_size", "I/O unit size (bytes)", "uint?"), ("-a|max_aq_depth", "max admin queue depth", "uint?"), ("-n|num_shared_buffers", "shared buffers (accepted, sizes nothing here)", "uint?"), ("-b|buf_cache_size", "buffer cache size (accepted, sizes nothing here)", "uint?"), ("-o|c2h_success", "disable the C2H success optimization", "noflag"), ("-y|sock_priority", "socket priority (0-16)", "uint?"), ("-x|abort_timeout_sec", "abort timeout (s)", "uint?"), ("-e|control_msg_num", "control messages per poll group", "uint?"), ("--acceptor-poll-rate|acceptor_poll_rate", "acceptor poll period (us)", "uint?")]);
        WithArgs(root, "nvmf_get_transports", "list NVMe-oF transports", [("--trtype|trtype", "transport type", "string?")], Columns(null, "trtype", "max_queue_depth", "max_io_qpairs_per_ctrlr", "in_capsule_data_size", "max_io_size", "c2h_success"));
        WithArgs(root, "nvmf_create_subsystem", "create an NVM subsystem", [("nqn", "subsystem NQN", "string"), ("-s|serial_number", "serial number", "string?"), ("-d|model_number", "model number", "string?"), ("-a|allow_any_host", "allow any host", "flag"), ("-m|max_namespaces", "max namespaces", "uint?"), ("-i|min_cntlid", "min controller id", "uint?"), ("-I|max_cntlid", "max controller id", "uint?")]);
        WithArgs(root, "nvmf_delete_subsystem", "delete an NVM subsystem", [("nqn", "subsystem NQN", "string")]);
        WithArgs(root, "nvmf_get_subsystems", "list subsystems", [("nqn", "subsystem NQN", "string?")], Columns(null, "nqn", "subtype", "allow_any_host", "serial_number", "model_number"));
        WithArgs(root, "nvmf_subsystem_add_listener", "listen for a subsystem", [("nqn", "subsystem NQN", "string"), ("-t|listen_address.trtype", "transport type: TCP", "string"), ("-a|listen_address.traddr", "IP address", "string"), ("-f|listen_address.adrfam", "IPv4 or IPv6", "string?"), ("-s|listen_address.trsvcid", "port", "string?")]);
        WithArgs(root, "nvmf_subsystem_remove_listener", "stop listening for a subsystem", [("nqn", "subsystem NQN", "string"), ("-t|listen_address.trtype", "transport type: TCP", "string"), ("-a|listen_address.traddr", "IP address", "string"), ("-f|listen_address.adrfam", "IPv4 or IPv6", "string?"), ("-s|listen_address.trsvcid", "port", "string?")]);
        WithArgs(root, "nvmf_subsystem_add_ns", "add a namespace (a bdev)", [("nqn", "subsystem NQN", "string"), ("namespace.bdev_name", "bdev name", "string"), ("-n|namespace.nsid", "namespace id", "uint?"), ("-g|namespace.nguid", "NGUID (hex)", "string?"), ("-e|namespace.eui64", "EUI-64 (hex)", "string?"), ("-u|namespace.uuid", "UUID", "string?")]);
        WithArgs(root, "nvmf_subsystem_remove_ns", "remove a namespace", [("nqn", "subsystem NQN", "string"), ("nsid", "namespace id", "uint")]);
        WithArgs(root, "nvmf_subsystem_add_host", "allow a host", [("nqn", "subsystem NQN", "string"), ("host", "host NQN", "string")]);
        WithArgs(root, "nvmf_subsystem_remove_host", "disallow a host (its controllers are disconnected)", [("nqn", "subsystem NQN", "string"), ("host", "host NQN", "string")]);
        AllowAnyHost(root);
        WithArgs(root, "nvmf_get_stats", "NVMe-oF poll group statistics", []);
        WithArgs(root, "nvmf_subsystem_get_controllers", "controllers of a subsystem", [("nqn", "subsystem NQN", "string")], Columns(null, "cntlid", "hostnqn", "hostid", "num_io_qpairs"));
        WithArgs(root, "nvmf_subsystem_get_qpairs", "queue pairs of a subsystem", [("nqn", "subsystem NQN", "string")], Columns(null, "cntlid", "qid", "state", "thread"));
        WithArgs(root, "nvmf_subsystem_get_listeners", "listeners of a subsystem", [("nqn", "subsystem NQN", "string")]);
        AddLibvirtXml(root);

        var delay = new Option<double>("--delay", "-d") { Description = "seconds between refreshes (0.1 to 3600)", DefaultValueFactory = _ => 1.0 };
        var iterations = new Option<int>("--iterations", "-n") { Description = "refreshes before exiting (default 0: until q)", DefaultValueFactory = _ => 0 };
        var top = new Command("top", "live view like spdk_top: reactors, pollers, bdevs (IOPS, MB/s, latency), controllers; q quits; with --json one snapshot of rates over one -d interval") { delay, iterations };
        top.SetAction(r =>
        {
            double d = r.GetValue(delay);
            int n = r.GetValue(iterations);
            if (!double.IsFinite(d) || d < 0.1 || d > 3600)
            {
                Console.Error.WriteLine($"vhostctl top: -d/--delay: {d.ToString(CultureInfo.InvariantCulture)} is not between 0.1 and 3600 seconds");
                return 1;
            }

            if (n < 0)
            {
                Console.Error.WriteLine($"vhostctl top: -n/--iterations: {n} is negative");
                return 1;
            }

            return WithClient(r, c => Top.Run(c, d, n, r.GetValue(Json), r.GetValue(Server)!));
        });
        root.Subcommands.Add(top);

        return root.Parse(args).Invoke();
    }

    private sealed record Table(string? ArrayKey, string[] Columns);

    private static Table Columns(string? arrayKey, params string[] columns) => new(arrayKey, columns);

    private static void Simple(RootCommand root, string name, string description, Table? table = null)
    {
        var cmd = new Command(name, description);
        cmd.SetAction(r => Run(r, name, null, table));
        root.Subcommands.Add(cmd);
    }

    /// <summary>Declares a method's CLI: "name" = positional, "-x|name" or "--x|name" = option; types string, int, uint, ulong, list (whitespace-separated names sent as an array; suffix ? = optional), flag.</summary>
    private static void WithArgs(RootCommand root, string name, string description, (string Spec, string Help, string Type)[] specs, Table? table = null)
    {
        var cmd = new Command(name, description);
        var getters = new List<Func<ParseResult, (string Key, JsonNode? Value)>>();
        foreach (var (spec, help, type) in specs)
        {
            bool optional = type.EndsWith('?') || type is "flag" or "noflag";
            string baseType = type.TrimEnd('?');
            string key = spec.Contains('|') ? spec.Split('|')[1] : spec;
            if (spec.StartsWith('-'))
            {
                string alias = spec.Split('|')[0];
                string[] names = alias.StartsWith("--", StringComparison.Ordinal) ? [alias] : ["--" + key, alias];
                if (baseType is "flag" or "noflag")
                {
                    // flag: sends true when given; noflag: sends false when given (rpc.py's store_false, e.g. --c2h-success).
                    var o = new Option<bool>(names[0], names.Skip(1).ToArray()) { Description = help };
                    cmd.Options.Add(o);
                    bool sent = baseType == "flag";
                    getters.Add(r => (key, r.GetValue(o) ? JsonValue.Create(sent) : null));
                }
                else
                {
                    var o = new Option<string?>(names[0], names.Skip(1).ToArray()) { Description = help, Required = !optional };
                    cmd.Options.Add(o);
                    getters.Add(r => (key, Convert(key, baseType, r.GetValue(o))));
                }
            }
            else
            {
                var a = new Argument<string?>(key) { Description = help, Arity = optional ? ArgumentArity.ZeroOrOne : ArgumentArity.ExactlyOne };
                cmd.Arguments.Add(a);
                getters.Add(r => (key, Convert(key, baseType, r.GetValue(a))));
            }
        }

        cmd.SetAction(r =>
        {
            JsonObject? p = null;
            try
            {
                foreach (var g in getters)
                {
                    var (k, v) = g(r);
                    if (v is not null)
                    {
                        // "outer.inner" keys build nested objects (nvmf's listen_address and namespace).
                        var target = p ??= new JsonObject();
                        var parts = k.Split('.');
                        for (int i = 0; i < parts.Length - 1; i++)
                        {
                            target = (JsonObject)(target[parts[i]] ??= new JsonObject());
                        }

                        target[parts[^1]] = v;
                    }
                }
            }
            catch (FormatException e)
            {
                Console.Error.WriteLine($"vhostctl {name}: {e.Message}");
                return 1;
            }

            return Run(r, name, p, table);
        });
        root.Subcommands.Add(cmd);
    }

    /// <summary>rpc.py's nvmf_subsystem_allow_any_host NQN (-e|--enable | -d|--disable).</summary>
    private static void AllowAnyHost(RootCommand root)
    {
        var cmd = new Command("nvmf_subsystem_allow_any_host", "allow any host to connect (-e) or only the host list (-d)");
        var nqn = new Argument<string>("nqn") { Description = "subsystem NQN" };
        var enable = new Option<bool>("--enable", "-e") { Description = "allow any host" };
        var disable = new Option<bool>("--disable", "-d") { Description = "only listed hosts" };
        cmd.Arguments.Add(nqn);
        cmd.Options.Add(enable);
        cmd.Options.Add(disable);
        cmd.SetAction(r =>
        {
            if (r.GetValue(enable) == r.GetValue(disable))
            {
                Console.Error.WriteLine("vhostctl nvmf_subsystem_allow_any_host: give exactly one of --enable and --disable");
                return 1;
            }

            return Run(r, "nvmf_subsystem_allow_any_host", new JsonObject { ["nqn"] = r.GetValue(nqn), ["allow_any_host"] = r.GetValue(enable) });
        });
        root.Subcommands.Add(cmd);
    }

    private static void SizedCreate(RootCommand root, string name, string description, bool nameRequired)
    {
        var cmd = new Command(name, description);
        var bdevName = new Option<string?>("--name", "-b") { Description = "bdev name", Required = false };
        var positionalName = new Argument<string?>("name") { Arity = nameRequired ? ArgumentArity.ExactlyOne : ArgumentArity.ZeroOrOne, Description = "bdev name" };
        var size = new Argument<string>("total_size_mb") { Description = "size in MiB" };
        var bs = new Argument<string>("block_size") { Description = "block size in bytes" };
        if (nameRequired)
        {
            cmd.Arguments.Add(positionalName);
        }
        else
        {
            cmd.Options.Add(bdevName);
        }

        cmd.Arguments.Add(size);
        cmd.Arguments.Add(bs);
        cmd.SetAction(r =>
        {
            if (!ulong.TryParse(r.GetValue(size), out ulong mb) || !uint.TryParse(r.GetValue(bs), out uint blockSize) || blockSize == 0)
            {
                Console.Error.WriteLine($"vhostctl {name}: TOTAL_SIZE_MB and BLOCK_SIZE must be positive integers");
                return 1;
            }

            var p = new JsonObject { ["num_blocks"] = mb * 1024 * 1024 / blockSize, ["block_size"] = blockSize };
            string? n = nameRequired ? r.GetValue(positionalName) : r.GetValue(bdevName);
            if (n is not null)
            {
                p["name"] = n;
            }

            return Run(r, name, p);
        });
        root.Subcommands.Add(cmd);
    }

    private static JsonNode? Convert(string key, string type, string? value)
    {
        if (value is null)
        {
            return null;
        }

        return type switch
        {
            "int" => int.TryParse(value, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out int i) ? JsonValue.Create(i) : throw new FormatException($"{key}: '{value}' is not an integer"),
            "uint" => uint.TryParse(value, NumberStyles.None, CultureInfo.InvariantCulture, out uint u) ? JsonValue.Create(u) : throw new FormatException($"{key}: '{value}' is not a non-negative integer"),
            "ulong" => ulong.TryParse(value, NumberStyles.None, CultureInfo.InvariantCulture, out ulong l) ? JsonValue.Create(l) : throw new FormatException($"{key}: '{value}' is not a non-negative integer"),
            "list" => new JsonArray(value.Split((char[]?)null, StringSplitOptions.RemoveEmptyEntries).Select(x => (JsonNode?)JsonValue.Create(x)).ToArray()),
            _ => JsonValue.Create(value),
        };
    }

    private static JsonNode? ParseParams(string? text)
    {
        if (string.IsNullOrWhiteSpace(text))
        {
            return null;
        }

        try
        {
            return JsonNode.Parse(text);
        }
        catch (JsonException e)
        {
            throw new RpcClientException($"params are not valid JSON: {e.Message}");
        }
    }

    private static int WithClient(ParseResult r, Func<RpcClient, int> body)
    {
        try
        {
            using var client = RpcClient.Connect(r.GetValue(Server)!, TimeSpan.FromSeconds(r.GetValue(Timeout)));
            return body(client);
        }
        catch (RpcErrorException e)
        {
            Console.Error.WriteLine($"error {e.Code}: {e.Message}");
            return 1;
        }
        catch (Exception e) when (e is RpcClientException or IOException or JsonException or System.Net.Sockets.SocketException)
        {
            Console.Error.WriteLine($"vhostctl: {e.Message}");
            return 1;
        }
    }

    private static int Run(ParseResult r, string method, JsonNode? parameters, Table? table = null) => WithClient(r, c =>
    {
        var result = c.Call(method, parameters);
        if (!r.GetValue(Json) && result is JsonValue v && v.TryGetValue(out string? text))
        {
            Console.WriteLine(text); // like rpc.py: a created name is printed bare
            return 0;
        }

        if (r.GetValue(Json) || table is null)
        {
            Console.WriteLine(result is null ? "null" : result.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
            return 0;
        }

        PrintTable(result, table);
        return 0;
    });

    private static void PrintTable(JsonNode? result, Table table)
    {
        var rows = (table.ArrayKey is null ? result : result?[table.ArrayKey]) as JsonArray ?? [];
        var cells = rows.Select(row => table.Columns.Select(c => Cell(row?[c])).ToArray()).ToList();
        var widths = table.Columns.Select((c, i) => Math.Max(c.Length, cells.Count == 0 ? 0 : cells.Max(r => r[i].Length))).ToArray();
        Console.WriteLine(string.Join("  ", table.Columns.Select((c, i) => c.PadRight(widths[i]))).TrimEnd());
        foreach (var row in cells)
        {
            Console.WriteLine(string.Join("  ", row.Select((v, i) => v.PadRight(widths[i]))).TrimEnd());
        }
    }

    private static string Cell(JsonNode? v) => v switch
    {
        null => "-",
        JsonArray a => string.Join(",", a.Select(x => x?.ToString() ?? "")),
        JsonValue => v.ToString(),
        _ => v.ToJsonString(),
    };
}
