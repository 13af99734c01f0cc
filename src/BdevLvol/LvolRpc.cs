using System.Text.Json.Nodes;
using System.Text.Json.Serialization;
using VhostBackend.Bdev.Rpc;
using VhostBackend.Blob;
using VhostBackend.Rpc;
using BlobErrnoAlias = VhostBackend.Blob.Errno;
using PErrno = VhostBackend.Platform.Errno;

namespace VhostBackend.BdevLvol;

/// <summary>
/// SPDK v24.01's lvol RPCs (module/bdev/lvol/vbdev_lvol_rpc.c) with their params and errors: a params decoding
/// failure is -32603 "spdk_json_decode_object failed"; an lvol or lvstore that does not exist is -19 (ENODEV);
/// a refused operation is -32602 with strerror, a refused create the errno itself, as SPDK answers.
/// </summary>
public static class LvolRpc
{
    public sealed class CreateLvstoreParams
    {
        [JsonRequired] public string BdevName { get; set; } = "";
        [JsonRequired] public string LvsName { get; set; } = "";
        public uint ClusterSz { get; set; }
        public string? ClearMethod { get; set; }
        public uint NumMdPagesPerClusterRatio { get; set; }
    }

    public sealed class LvsSelectParams
    {
        public string? Uuid { get; set; }
        public string? LvsName { get; set; }
    }

    public sealed class GetLvolsParams
    {
        public string? LvsUuid { get; set; }
        public string? LvsName { get; set; }
    }

    public sealed class RenameParams
    {
        [JsonRequired] public string OldName { get; set; } = "";
        [JsonRequired] public string NewName { get; set; } = "";
    }

    public sealed class CreateParams
    {
        public string? Uuid { get; set; }
        public string? LvsName { get; set; }
        [JsonRequired] public string LvolName { get; set; } = "";
        public ulong Size { get; set; }
        public ulong SizeInMib { get; set; }
        public bool ThinProvision { get; set; }
        public string? ClearMethod { get; set; }
    }

    public sealed class SnapshotParams
    {
        [JsonRequired] public string LvolName { get; set; } = "";
        [JsonRequired] public string SnapshotName { get; set; } = "";
    }

    public sealed class CloneParams
    {
        [JsonRequired] public string SnapshotName { get; set; } = "";
        public string? CloneName { get; set; }
    }

    public sealed class NameParams
    {
        [JsonRequired] public string Name { get; set; } = "";
    }

    public sealed class ResizeParams
    {
        [JsonRequired] public string Name { get; set; } = "";
        public ulong Size { get; set; }
        public ulong SizeInMib { get; set; }
    }

    private static RpcException Err(int errno) => RpcException.Errno(errno, PErrno.Message(errno));

    private static RpcException Failed(BlobException e) => RpcException.InvalidParams(PErrno.Message(e.Errno));

    private static LvsEntry Store(LvolModule m, string? uuid, string? name)
    {
        if ((uuid == null) == (name == null))
        {
            throw Err(PErrno.EINVAL);
        }
        return m.FindStore(uuid, name) ?? throw Err(PErrno.ENODEV);
    }

    private static LvolBdev Lvol(LvolModule m, string name) => m.FindLvol(name) ?? throw Err(PErrno.ENODEV);

    private static int LvolClearMethod(string? s) => s?.ToLowerInvariant() switch
    {
        null => 0,
        "none" => 1,
        "unmap" => 2,
        "write_zeroes" => 3,
        _ => throw RpcException.Errno(PErrno.EINVAL, "Invalid clean_method option"),
    };

    private static async Task<JsonNode?> Run(Func<Task<JsonNode?>> f)
    {
        try
        {
            return await f().ConfigureAwait(true);
        }
        catch (BlobException e)
        {
            throw Failed(e);
        }
    }

    public static void Register(RpcRegistry rpc, LvolModule m)
    {
        rpc.Register("bdev_lvol_create_lvstore", async r =>
        {
            var p = BdevRpc.Decode<CreateLvstoreParams>(r);
            string clear = p.ClearMethod?.ToLowerInvariant() ?? "unmap";
            if (clear is not ("none" or "unmap" or "write_zeroes"))
            {
                throw RpcException.Errno(PErrno.EINVAL, "Invalid clear_method parameter");
            }
            try
            {
                var uuid = await m.CreateLvstoreAsync(p.BdevName, p.LvsName, p.ClusterSz, clear).ConfigureAwait(true);
                return JsonValue.Create(uuid.ToString());
            }
            catch (BlobException e) when (e.Errno is BlobErrnoAlias.EEXIST or BlobErrnoAlias.ENODEV or BlobErrnoAlias.EPERM or BlobErrnoAlias.EINVAL)
            {
                throw Err(e.Errno);
            }
            catch (BlobException e)
            {
                throw Failed(e);
            }
        });
        rpc.Register("bdev_lvol_delete_lvstore", r => Run(async () =>
        {
            var p = BdevRpc.Decode<LvsSelectParams>(r);
            await m.DeleteLvstoreAsync(Store(m, p.Uuid, p.LvsName)).ConfigureAwait(true);
            return JsonValue.Create(true);
        }));
        rpc.Register("bdev_lvol_rename_lvstore", r => Run(async () =>
        {
            var p = BdevRpc.Decode<RenameParams>(r);
            var e = m.FindStore(null, p.OldName) ?? throw RpcException.Errno(PErrno.ENOENT, $"Lvol store {p.OldName} not found");
            await m.RenameLvstoreAsync(e, p.NewName).ConfigureAwait(true);
            return JsonValue.Create(true);
        }));
        rpc.Register("bdev_lvol_get_lvstores", r =>
        {
            var p = BdevRpc.Decode<LvsSelectParams>(r);
            var list = p.Uuid == null && p.LvsName == null ? m.Stores : [Store(m, p.Uuid, p.LvsName)];
            var arr = new JsonArray();
            foreach (var e in list)
            {
                var bs = e.Store.BlobStore;
                arr.Add(new JsonObject
                {
                    ["uuid"] = e.Store.Uuid.ToString(),
                    ["name"] = e.Store.Name,
                    ["base_bdev"] = e.Desc.Bdev.Name,
                    ["total_data_clusters"] = bs.TotalDataClusters,
                    ["free_clusters"] = bs.FreeClusters,
                    ["block_size"] = bs.IoUnitSize,
                    ["cluster_size"] = bs.ClusterSize,
                });
            }
            return arr;
        });
        rpc.Register("bdev_lvol_get_lvols", r =>
        {
            var p = BdevRpc.Decode<GetLvolsParams>(r);
            var list = p.LvsUuid == null && p.LvsName == null ? m.Stores : [Store(m, p.LvsUuid, p.LvsName)];
            var arr = new JsonArray();
            foreach (var e in list)
            {
                foreach (var l in e.Store.Lvols.OrderBy(l => l.Blob.Id))
                {
                    var lvol = new JsonObject
                    {
                        ["alias"] = l.Alias,
                        ["uuid"] = l.Uuid.ToString(),
                        ["name"] = l.Name,
                        ["is_thin_provisioned"] = l.IsThinProvisioned,
                        ["is_snapshot"] = l.IsSnapshot,
                        ["is_clone"] = l.IsClone,
                        ["is_esnap_clone"] = false,
                        ["is_degraded"] = false,
                        ["lvs"] = new JsonObject { ["name"] = e.Store.Name, ["uuid"] = e.Store.Uuid.ToString() },
                    };
                    if (l.Blob.CopyProgress is { } copy)
                    {
                        // Ours (SPDK reports no progress): an inflate or decouple_parent under way on this lvol.
                        lvol["progress"] = new JsonObject
                        {
                            ["operation"] = copy.Operation,
                            ["clusters_copied"] = copy.Done,
                            ["clusters_total"] = copy.Total,
                        };
                    }

                    arr.Add(lvol);
                }
            }
            return (JsonNode?)arr;
        });
        rpc.Register("bdev_lvol_create", async r =>
        {
            var p = BdevRpc.Decode<CreateParams>(r);
            if ((p.Size == 0) == (p.SizeInMib == 0))
            {
                throw RpcException.InvalidParams("One of size or size_in_mib must be specified (and not both)");
            }
            int clear = LvolClearMethod(p.ClearMethod);
            var e = Store(m, p.Uuid, p.LvsName);
            ulong size = p.Size != 0 ? p.Size : checked(p.SizeInMib * 1024 * 1024);
            try
            {
                var b = await m.CreateLvolAsync(e, p.LvolName, size, p.ThinProvision, clear).ConfigureAwait(true);
                return JsonValue.Create(b.Name);
            }
            catch (BlobException ex)
            {
                throw Err(ex.Errno);
            }
        });
        rpc.Register("bdev_lvol_snapshot", r => Run(async () =>
        {
            var p = BdevRpc.Decode<SnapshotParams>(r);
            var b = await m.SnapshotAsync(Lvol(m, p.LvolName), p.SnapshotName).ConfigureAwait(true);
            return JsonValue.Create(b.Name);
        }));
        rpc.Register("bdev_lvol_clone", r => Run(async () =>
        {
            var p = BdevRpc.Decode<CloneParams>(r);
            if (p.CloneName == null)
            {
                throw RpcException.InvalidParams(PErrno.Message(PErrno.EINVAL));
            }
            var b = await m.CloneAsync(Lvol(m, p.SnapshotName), p.CloneName).ConfigureAwait(true);
            return JsonValue.Create(b.Name);
        }));
        rpc.Register("bdev_lvol_rename", r => Run(async () =>
        {
            var p = BdevRpc.Decode<RenameParams>(r);
            await m.RenameLvolAsync(Lvol(m, p.OldName), p.NewName).ConfigureAwait(true);
            return JsonValue.Create(true);
        }));
        rpc.Register("bdev_lvol_resize", r => Run(async () =>
        {
            var p = BdevRpc.Decode<ResizeParams>(r);
            if ((p.Size == 0) == (p.SizeInMib == 0))
            {
                throw RpcException.InvalidParams("One of size or size_in_mib must be specified (and not both)");
            }
            var b = Lvol(m, p.Name);
            await m.ResizeAsync(b, p.Size != 0 ? p.Size : checked(p.SizeInMib * 1024 * 1024)).ConfigureAwait(true);
            return JsonValue.Create(true);
        }));
        rpc.Register("bdev_lvol_set_read_only", r => Run(async () =>
        {
            var p = BdevRpc.Decode<NameParams>(r);
            await m.SetReadOnlyAsync(Lvol(m, p.Name)).ConfigureAwait(true);
            return JsonValue.Create(true);
        }));
        rpc.Register("bdev_lvol_delete", r => Run(async () =>
        {
            var p = BdevRpc.Decode<NameParams>(r);
            await m.DeleteLvolAsync(Lvol(m, p.Name)).ConfigureAwait(true);
            return JsonValue.Create(true);
        }));
        rpc.Register("bdev_lvol_inflate", r => Run(async () =>
        {
            var p = BdevRpc.Decode<NameParams>(r);
            await m.InflateAsync(Lvol(m, p.Name)).ConfigureAwait(true);
            return JsonValue.Create(true);
        }));
        rpc.Register("bdev_lvol_decouple_parent", r => Run(async () =>
        {
            var p = BdevRpc.Decode<NameParams>(r);
            await m.DecoupleParentAsync(Lvol(m, p.Name)).ConfigureAwait(true);
            return JsonValue.Create(true);
        }));
    }
}
