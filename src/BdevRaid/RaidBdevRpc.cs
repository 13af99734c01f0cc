using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.Json.Serialization;
using VhostBackend.Platform;
using VhostBackend.Rpc;

namespace VhostBackend.BdevRaid;

/// <summary>
/// The raid methods with SPDK 24.01's params and errors (bdev_raid_rpc.c): a decoding failure is -32700
/// "spdk_json_decode_object failed" (SPDK_JSONRPC_ERROR_PARSE_ERROR), except bdev_raid_add_base_bdev's, which is
/// -32603; method failures are the negative errno with SPDK's messages. base_bdevs is a JSON array of names (the
/// server decodes an array; rpc.py splits its whitespace-separated argument into one).
/// </summary>
public static class RaidBdevRpc
{
    private const string DecodeFailed = "spdk_json_decode_object failed";

    public sealed class CreateParams
    {
        [JsonRequired]
        public string Name { get; set; } = "";

        public uint StripSizeKb { get; set; }

        [JsonRequired]
        public string RaidLevel { get; set; } = "";

        [JsonRequired]
        public string[] BaseBdevs { get; set; } = [];

        public Guid? Uuid { get; set; }

        public bool Superblock { get; set; }
    }

    public sealed class NameParams
    {
        [JsonRequired]
        public string Name { get; set; } = "";
    }

    public sealed class GetParams
    {
        [JsonRequired]
        public string Category { get; set; } = "";
    }

    public sealed class AddBaseParams
    {
        [JsonRequired]
        public string BaseBdev { get; set; } = "";

        [JsonRequired]
        public string RaidBdev { get; set; } = "";
    }

    public sealed class OptionsParams
    {
        public uint? ProcessWindowSizeKb { get; set; }
    }

    private static T Decode<T>(RpcRequest r, int code = RpcErrorCodes.ParseError)
        where T : class, new() => r.Bind<T>(code, DecodeFailed);

    public static void Register(RpcRegistry rpc, RaidBdevModule module)
    {
        rpc.Register("bdev_raid_create", r => CreateAsync(module, r), RpcStates.Runtime);
        rpc.Register("bdev_raid_delete", r => DeleteAsync(module, Decode<NameParams>(r)), RpcStates.Runtime);
        rpc.Register("bdev_raid_get_bdevs", r => Get(module, Decode<GetParams>(r)), RpcStates.Runtime);
        rpc.Register("bdev_raid_add_base_bdev", r => AddBase(module, Decode<AddBaseParams>(r, RpcErrorCodes.InternalError)), RpcStates.Runtime);
        rpc.Register("bdev_raid_remove_base_bdev", r => RemoveBaseAsync(module, Decode<NameParams>(r)), RpcStates.Runtime);
        rpc.Register("bdev_raid_set_options", r => SetOptions(module, r), RpcStates.Both);
    }

    private static async Task<JsonNode?> CreateAsync(RaidBdevModule module, RpcRequest r)
    {
        var p = Decode<CreateParams>(r);

        // SPDK decodes raid_level with its own decoder: an unknown name fails the decoding (-32700).
        if (!RaidNames.TryParseLevel(p.RaidLevel, out var level, out bool known) && !known)
        {
            throw new RpcException(RpcErrorCodes.ParseError, $"{DecodeFailed}: unknown raid_level '{p.RaidLevel}'");
        }

        if (p.Superblock)
        {
            // Ours: the on-disk superblock is not implemented.
            throw RpcException.Errno(Errno.ENOTSUP, $"Failed to create RAID bdev {p.Name}: superblock is not supported");
        }

        try
        {
            bool implemented = RaidNames.TryParseLevel(p.RaidLevel, out _, out _);
            await module.CreateAsync(p.Name, implemented ? level : null, p.StripSizeKb, p.BaseBdevs, p.Uuid).ConfigureAwait(true);
        }
        catch (RaidException e)
        {
            throw RpcException.Errno(e.Errno, $"Failed to create RAID bdev {p.Name}: {Errno.Message(e.Errno)}");
        }

        return null;
    }

    private static async Task<JsonNode?> DeleteAsync(RaidBdevModule module, NameParams p)
    {
        if (module.Find(p.Name) is null)
        {
            throw RpcException.Errno(Errno.ENODEV, $"raid bdev {p.Name} not found");
        }

        try
        {
            await module.DeleteAsync(p.Name).ConfigureAwait(true);
        }
        catch (RaidException e) when (e.Errno == Errno.ENODEV)
        {
            throw RpcException.Errno(Errno.ENODEV, $"raid bdev {p.Name} not found");
        }
        catch (RaidException e)
        {
            throw new RpcException(RpcErrorCodes.InternalError, Errno.Message(e.Errno)); // SPDK's bdev_raid_delete_done
        }

        return null;
    }

    private static Task<JsonNode?> Get(RaidBdevModule module, GetParams p)
    {
        if (!RaidNames.TryParseCategory(p.Category, out var state))
        {
            throw RpcErrno.Error(Errno.EINVAL, "category", $"'{p.Category}' is not one of all, online, configuring, offline");
        }

        var arr = new JsonArray();
        foreach (var a in module.Arrays)
        {
            if (state is null || a.State == state)
            {
                arr.Add(module.Info(a));
            }
        }

        return Task.FromResult<JsonNode?>(arr);
    }

    private static Task<JsonNode?> AddBase(RaidBdevModule module, AddBaseParams p)
    {
        if (module.Find(p.RaidBdev) is null)
        {
            throw RpcException.Errno(Errno.ENODEV, $"raid bdev {p.RaidBdev} is not found in config");
        }

        try
        {
            module.AddBase(p.RaidBdev, p.BaseBdev);
        }
        catch (RaidException e) when (e.Errno == Errno.ENODEV)
        {
            throw RpcException.Errno(Errno.ENODEV, $"Failed to open bdev {p.BaseBdev}: {Errno.Message(Errno.ENODEV)}");
        }
        catch (RaidException e)
        {
            throw RpcException.Errno(e.Errno, $"Failed to attach base bdev {p.BaseBdev} to RAID bdev {p.RaidBdev}: {Errno.Message(e.Errno)}");
        }

        return Task.FromResult<JsonNode?>(null);
    }

    private static async Task<JsonNode?> RemoveBaseAsync(RaidBdevModule module, NameParams p)
    {
        try
        {
            await module.RemoveBaseAsync(p.Name).ConfigureAwait(true);
        }
        catch (RaidException e)
        {
            throw RpcException.Errno(e.Errno, "Failed to remove base bdev from raid bdev");
        }

        return null;
    }

    private static Task<JsonNode?> SetOptions(RaidBdevModule module, RpcRequest r)
    {
        var p = r.Params is { ValueKind: JsonValueKind.Object } ? Decode<OptionsParams>(r) : new OptionsParams();
        if (p.ProcessWindowSizeKb is { } kb)
        {
            if (kb == 0)
            {
                throw RpcErrno.Error(Errno.EINVAL, "process_window_size_kb", "must be greater than 0"); // SPDK's raid_bdev_set_opts
            }

            module.ProcessWindowSizeKb = kb;
        }

        return Task.FromResult<JsonNode?>(null);
    }
}
