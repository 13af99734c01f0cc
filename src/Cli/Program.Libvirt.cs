using System.CommandLine;
using System.Globalization;
using System.Security;
using System.Text;
using System.Text.Json.Nodes;

namespace VhostBackend.Cli;

/// <summary><c>vhostctl libvirt-xml CTRLR</c>: the libvirt domain XML that attaches an existing controller.</summary>
public static partial class Program
{
    /// <summary>libvirt's namespace for <c>&lt;qemu:commandline&gt;</c>.</summary>
    public const string QemuNamespace = "http://libvirt.org/schemas/domain/qemu/1.0";

    private static void AddLibvirtXml(RootCommand root)
    {
        var ctrlr = new Argument<string>("ctrlr") { Description = "controller name (vhost_get_controllers)" };
        var target = new Option<string?>("--target") { Description = "guest device name of a blk disk (default vdb)" };
        var queues = new Option<int>("--queues") { Description = "virtqueues the guest uses (default 2)", DefaultValueFactory = _ => 2 };
        var reconnect = new Option<int?>("--reconnect")
        {
            Description = "seconds between QEMU's reconnect attempts after the daemon went away; 0: off (default 1 for blk, 0 for scsi: QEMU before 8.2 cannot reconnect vhost-user-scsi and fails to start with it)",
        };
        var cmd = new Command("libvirt-xml", "print the libvirt XML that attaches a controller: <disk type='vhostuser'> for vhost-user-blk, <qemu:commandline> for vhost-user-scsi")
        {
            ctrlr, target, queues, reconnect,
        };
        cmd.SetAction(r => WithClient(r, c =>
        {
            var list = c.Call("vhost_get_controllers", new JsonObject { ["name"] = r.GetValue(ctrlr) }) as JsonArray;
            if (list is not [JsonObject controller])
            {
                throw new RpcClientException($"ctrlr: no controller named '{r.GetValue(ctrlr)}'");
            }

            int q = r.GetValue(queues);
            if (q is < 1 or > 32)
            {
                throw new RpcClientException($"--queues: {q} is outside 1..32");
            }

            int? rc = r.GetValue(reconnect);
            if (rc < 0)
            {
                throw new RpcClientException($"--reconnect: {rc} is negative");
            }

            Console.Write(LibvirtXml(controller, r.GetValue(target) ?? "vdb", q, rc));
            return 0;
        }));
        root.Subcommands.Add(cmd);
    }

    /// <summary>The XML fragment for one controller as <c>vhost_get_controllers</c> describes it.</summary>
    public static string LibvirtXml(JsonObject controller, string targetDev, int queues, int? reconnect)
    {
        string name = (string?)controller["ctrlr"] ?? throw new RpcClientException("vhost_get_controllers: a controller without 'ctrlr'");
        string socket = (string?)controller["socket"] ?? throw new RpcClientException($"vhost_get_controllers: '{name}' has no 'socket'");
        if (controller["client"] is JsonValue client && client.TryGetValue(out bool isClient) && isClient)
        {
            throw new RpcClientException(
                $"ctrlr: '{name}' is a client-mode controller (the daemon connects); libvirt's vhost-user devices connect to the daemon: create it without \"client\"");
        }

        if (socket.Contains(',', StringComparison.Ordinal))
        {
            throw new RpcClientException($"socket: '{socket}' contains ',', which QEMU's option syntax cannot carry");
        }

        string q = queues.ToString(CultureInfo.InvariantCulture);
        var sb = new StringBuilder();
        var backend = controller["backend_specific"] as JsonObject;
        if (backend?["scsi"] is not null)
        {
            int reconnectSeconds = reconnect ?? 0;
            // libvirt 9 has no element for vhost-user-scsi: QEMU options in the qemu namespace.
            string id = "vhostscsi_" + new string(name.Select(ch => char.IsAsciiLetterOrDigit(ch) ? ch : '_').ToArray());
            string chardev = $"socket,id={id},path={socket}" + (reconnectSeconds > 0 ? $",reconnect={reconnectSeconds.ToString(CultureInfo.InvariantCulture)}" : string.Empty);
            sb.Append("<!-- vhost-user-scsi controller '").Append(Escape(name)).Append("': inside <domain xmlns:qemu='").Append(QemuNamespace).Append("'> -->\n");
            sb.Append("<qemu:commandline>\n");
            // -device in JSON: QEMU creates legacy-syntax -device options before libvirt's own (JSON) devices, so a
            // legacy one takes a PCI slot libvirt has already given to another device and QEMU refuses to start.
            string device = new JsonObject { ["driver"] = "vhost-user-scsi-pci", ["id"] = id, ["chardev"] = id, ["num_queues"] = queues }.ToJsonString();
            foreach (var arg in new[] { "-chardev", chardev, "-device", device })
            {
                sb.Append("  <qemu:arg value='").Append(Escape(arg)).Append("'/>\n");
            }

            sb.Append("</qemu:commandline>\n");
            return sb.ToString();
        }

        if (backend?["block"] is null)
        {
            throw new RpcClientException($"ctrlr: '{name}' is neither a vhost-user-blk nor a vhost-user-scsi controller");
        }

        int blkReconnect = reconnect ?? 1;
        sb.Append("<!-- vhost-user-blk controller '").Append(Escape(name)).Append("': inside <devices>; the domain needs <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking> -->\n");
        sb.Append("<disk type='vhostuser' device='disk'>\n");
        sb.Append("  <driver name='qemu' type='raw' queues='").Append(q).Append("'/>\n");
        sb.Append("  <source type='unix' path='").Append(Escape(socket)).Append('\'');
        if (blkReconnect > 0)
        {
            sb.Append(">\n    <reconnect enabled='yes' timeout='").Append(blkReconnect.ToString(CultureInfo.InvariantCulture)).Append("'/>\n  </source>\n");
        }
        else
        {
            sb.Append("/>\n");
        }

        sb.Append("  <target dev='").Append(Escape(targetDev)).Append("' bus='virtio'/>\n");
        sb.Append("</disk>\n");
        return sb.ToString();
    }

    private static string Escape(string s) => SecurityElement.Escape(s);
}
