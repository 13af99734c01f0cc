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

    public sealed class ShallowCopyParams
    {
        [JsonRequired] public string SrcLvolName { get; set; } = "";
        [JsonRequired] public string DstBdevName { get; set; } = "";
    }

    public sealed class ShallowCopyCheckParams
    {
        [JsonRequired] public uint OperationId { get; set; }
    }

    public sealed class ResizeParams
    {
        [JsonRequired] public string Name { get; set; } = "";
        public ulong Size { get; set; }
        public ulong SizeInMib { get; set; }
    }

    /// <summary>SPDK's errno reply with the parameter at fault and the reason: "No such device: name: no lvol named x".</summary>
    private static RpcException Err(int errno, string param, string reason) => RpcErrno.Error(errno, param, reason);

    /// <summary>A refused operation: SPDK answers -32602 with strerror; the parameter and the reason are appended.</summary>
    private static RpcException Failed(int errno, string param, string reason) =>
        RpcException.InvalidParams($"{PErrno.Message(errno)}: {param}: {reason}");

    /// <summary>The lvstore chosen by exactly one of <paramref name="uuid"/> / <paramref name="name"/>
    /// (SPDK: -EINVAL when both or neither, -ENODEV when not found).</summary>
    private static LvsEntry Store(LvolModule m, string? uuid, string? name, string uuidParam = "uuid", string nameParam = "lvs_name")
    {
        if ((uuid == null) == (name == null))
        {
            throw Err(PErrno.EINVAL, uuid == null ? nameParam : uuidParam, $"give exactly one of {uuidParam} or {nameParam}");
        }
        return m.FindStore(uuid, name)
            ?? throw (uuid != null
                ? Err(PErrno.ENODEV, uuidParam, $"no lvol store with uuid {uuid}")
                : Err(PErrno.ENODEV, nameParam, $"no lvol store named {name}"));
    }

    private static LvolBdev Lvol(LvolModule m, string name, string param) =>
        m.FindLvol(name) ?? throw Err(PErrno.ENODEV, param, $"no lvol named {name}");

    /// <summary>A new lvol or lvstore name checked before anything changes (SPDK: -EINVAL empty or too long).</summary>
    private static void CheckName(string name, string what, string param, bool errnoReply)
    {
        try
        {
            LvolStore.ValidateName(name, what);
        }
        catch (BlobException e)
        {
            throw errnoReply ? Err(e.Errno, param, e.Message) : Failed(e.Errno, param, e.Message);
        }
    }

    /// <summary>size or size_in_mib (exactly one) in bytes, with the parameter named when it is wrong.</summary>
    private static (ulong Bytes, string Param) Size(ulong size, ulong sizeInMib)
    {
        if ((size == 0) == (sizeInMib == 0))
        {
            throw Failed(PErrno.EINVAL, size == 0 ? "size_in_mib" : "size", "give exactly one of size or size_in_mib");
        }
        if (size != 0)
        {
            return (size, "size");
        }
        if (sizeInMib > ulong.MaxValue / (1024 * 1024))
        {
            throw Failed(PErrno.EINVAL, "size_in_mib", $"{sizeInMib} MiB is too large");
        }
        return (sizeInMib * 1024 * 1024, "size_in_mib");
    }

    private static int LvolClearMethod(string? s) => s?.ToLowerInvariant() switch
    {
        null => 0,
        "none" => 1,
        "unmap" => 2,
        "write_zeroes" => 3,
        _ => throw Err(PErrno.EINVAL, "clear_method", $"'{s}' is not none, unmap or write_zeroes"),
    };

    /// <summary>
    /// Runs an operation; a <see cref="BlobException"/> becomes SPDK's -32602 reply naming the parameter:
    /// <paramref name="newNameParam"/> for a name that exists, <paramref name="sizeParam"/> for no space,
    /// <paramref name="target"/> (the lvol or lvstore operated on) otherwise.
    /// </summary>
    private static async Task<JsonNode?> Run(string target, Func<Task<JsonNode?>> f, string? newNameParam = null, string? sizeParam = null)
    {
        try
        {
            return await f().ConfigureAwait(true);
        }
        catch (BlobException e)
        {
            throw Failed(e.Errno, ParamFor(e, target, newNameParam, sizeParam), e.Message);
        }
    }

    private static string ParamFor(BlobException e, string target, string? newNameParam, string? sizeParam) => e.Param ?? e.Errno switch
    {
        BlobErrnoAlias.EEXIST when newNameParam != null => newNameParam,
        BlobErrnoAlias.ENOSPC when sizeParam != null => sizeParam,
        _ => target,
    };

    public static void Register(RpcRegistry rpc, LvolModule m)
    {
        rpc.Register("bdev_lvol_create_lvstore", async r =>
        {
            var p = BdevRpc.Decode<CreateLvstoreParams>(r);
            string clear = p.ClearMethod?.ToLowerInvariant() ?? "unmap";
            if (clear is not ("none" or "unmap" or "write_zeroes"))
            {
                throw Err(PErrno.EINVAL, "clear_method", $"'{p.ClearMethod}' is not none, unmap or write_zeroes");
            }
            CheckName(p.LvsName, "lvol store", "lvs_name", errnoReply: true);
            if (p.ClusterSz != 0 && (p.ClusterSz < BlobFormat.PageSize || p.ClusterSz % BlobFormat.PageSize != 0))
            {
                throw Err(PErrno.EINVAL, "cluster_sz", $"{p.ClusterSz} is not a multiple of {BlobFormat.PageSize}");
            }
            try
            {
                var uuid = await m.CreateLvstoreAsync(p.BdevName, p.LvsName, p.ClusterSz, clear, p.NumMdPagesPerClusterRatio).ConfigureAwait(true);
                return JsonValue.Create(uuid.ToString());
            }
            catch (BlobException e) when (e.Param != null)
            {
                throw Failed(e.Errno, e.Param, e.Message);
            }
            catch (BlobException e) when (e.Errno is BlobErrnoAlias.EEXIST)
            {
                throw Err(e.Errno, "lvs_name", e.Message);
            }
            catch (BlobException e) when (e.Errno is BlobErrnoAlias.ENODEV or BlobErrnoAlias.EPERM or BlobErrnoAlias.EINVAL)
            {
                throw Err(e.Errno, "bdev_name", e.Message);
            }
            catch (BlobException e)
            {
                // The store does not fit the base (SPDK's async failure: -32602 with strerror).
                throw Failed(e.Errno, e.Errno == BlobErrnoAlias.ENOMEM && p.NumMdPagesPerClusterRatio != 0 ? "num_md_pages_per_cluster_ratio" : "bdev_name", e.Message);
            }
        });
        rpc.Register("bdev_lvol_delete_lvstore", r =>
        {
            var p = BdevRpc.Decode<LvsSelectParams>(r);
            var e = Store(m, p.Uuid, p.LvsName);
            return Run(p.Uuid != null ? "uuid" : "lvs_name", async () =>
            {
                await m.DeleteLvstoreAsync(e).ConfigureAwait(true);
                return JsonValue.Create(true);
            });
        });
        rpc.Register("bdev_lvol_rename_lvstore", r =>
        {
            var p = BdevRpc.Decode<RenameParams>(r);
            var e = m.FindStore(null, p.OldName) ?? throw Err(PErrno.ENOENT, "old_name", $"no lvol store named {p.OldName}");
            CheckName(p.NewName, "lvol store", "new_name", errnoReply: false);
            return Run("old_name", async () =>
            {
                await m.RenameLvstoreAsync(e, p.NewName).ConfigureAwait(true);
                return JsonValue.Create(true);
            }, newNameParam: "new_name");
        });
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
            var list = p.LvsUuid == null && p.LvsName == null ? m.Stores : [Store(m, p.LvsUuid, p.LvsName, "lvs_uuid", "lvs_name")];
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
            var (size, sizeParam) = Size(p.Size, p.SizeInMib);
            int clear = LvolClearMethod(p.ClearMethod);
            var e = Store(m, p.Uuid, p.LvsName);
            CheckName(p.LvolName, "lvol", "lvol_name", errnoReply: true);
            try
            {
                var b = await m.CreateLvolAsync(e, p.LvolName, size, p.ThinProvision, clear).ConfigureAwait(true);
                return JsonValue.Create(b.Name);
            }
            catch (BlobException ex)
            {
                // SPDK answers a refused create with the errno itself.
                throw Err(ex.Errno, ParamFor(ex, p.Uuid != null ? "uuid" : "lvs_name", "lvol_name", sizeParam), ex.Message);
            }
        });
        rpc.Register("bdev_lvol_snapshot", r =>
        {
            var p = BdevRpc.Decode<SnapshotParams>(r);
            var origin = Lvol(m, p.LvolName, "lvol_name");
            CheckName(p.SnapshotName, "snapshot", "snapshot_name", errnoReply: false);
            return Run("lvol_name", async () =>
            {
                var b = await m.SnapshotAsync(origin, p.SnapshotName).ConfigureAwait(true);
                return JsonValue.Create(b.Name);
            }, newNameParam: "snapshot_name");
        });
        rpc.Register("bdev_lvol_clone", r =>
        {
            var p = BdevRpc.Decode<CloneParams>(r);
            if (p.CloneName == null)
            {
                throw Failed(PErrno.EINVAL, "clone_name", "missing");
            }
            var snapshot = Lvol(m, p.SnapshotName, "snapshot_name");
            CheckName(p.CloneName, "clone", "clone_name", errnoReply: false);
            return Run("snapshot_name", async () =>
            {
                var b = await m.CloneAsync(snapshot, p.CloneName).ConfigureAwait(true);
                return JsonValue.Create(b.Name);
            }, newNameParam: "clone_name");
        });
        rpc.Register("bdev_lvol_rename", r =>
        {
            var p = BdevRpc.Decode<RenameParams>(r);
            var b = Lvol(m, p.OldName, "old_name");
            CheckName(p.NewName, "lvol", "new_name", errnoReply: false);
            return Run("old_name", async () =>
            {
                await m.RenameLvolAsync(b, p.NewName).ConfigureAwait(true);
                return JsonValue.Create(true);
            }, newNameParam: "new_name");
        });
        rpc.Register("bdev_lvol_resize", r =>
        {
            var p = BdevRpc.Decode<ResizeParams>(r);
            var (size, sizeParam) = Size(p.Size, p.SizeInMib);
            var b = Lvol(m, p.Name, "name");
            return Run("name", async () =>
            {
                await m.ResizeAsync(b, size).ConfigureAwait(true);
                return JsonValue.Create(true);
            }, sizeParam: sizeParam);
        });
        rpc.Register("bdev_lvol_grow_lvstore", r =>
        {
            var p = BdevRpc.Decode<LvsSelectParams>(r);
            var e = Store(m, p.Uuid, p.LvsName);
            return Run(p.Uuid != null ? "uuid" : "lvs_name", async () =>
            {
                await e.Store.GrowAsync().ConfigureAwait(true);
                return JsonValue.Create(true);
            });
        });
        // SPDK v24.05's shallow copy (not in v24.01): the start answers the operation id; what the blobstore
        // refuses shows up in the check as state "error" with strerror, as SPDK reports it.
        rpc.Register("bdev_lvol_start_shallow_copy", r =>
        {
            var p = BdevRpc.Decode<ShallowCopyParams>(r);
            var b = m.FindLvol(p.SrcLvolName) ?? throw Err(PErrno.ENODEV, "src_lvol_name", $"no lvol named {p.SrcLvolName}");
            try
            {
                var st = m.StartShallowCopy(b, p.DstBdevName);
                return new JsonObject { ["operation_id"] = st.OperationId };
            }
            catch (BlobException e)
            {
                throw Failed(e.Errno, "dst_bdev_name", e.Message);
            }
        });
        rpc.Register("bdev_lvol_check_shallow_copy", r =>
        {
            var p = BdevRpc.Decode<ShallowCopyCheckParams>(r);
            var st = m.CheckShallowCopy(p.OperationId, out bool ended)
                ?? throw Err(PErrno.ENODEV, "operation_id", $"no shallow copy with operation id {p.OperationId}");
            var o = new JsonObject
            {
                ["copied_clusters"] = st.CopiedClusters,
                ["total_clusters"] = st.TotalClusters,
            };
            if (st.Result != 0)
            {
                o["state"] = "error";
                o["error"] = PErrno.Message(-st.Result);
            }
            else
            {
                o["state"] = ended ? "complete" : "in progress";
            }
            return o;
        });
        RegisterNamed(rpc, "bdev_lvol_set_read_only", (b) => m.SetReadOnlyAsync(b), m);
        RegisterNamed(rpc, "bdev_lvol_delete", (b) => m.DeleteLvolAsync(b), m);
        RegisterNamed(rpc, "bdev_lvol_inflate", (b) => m.InflateAsync(b), m);
        RegisterNamed(rpc, "bdev_lvol_decouple_parent", (b) => m.DecoupleParentAsync(b), m);
    }

    /// <summary>An RPC whose only param is <c>name</c> (an lvol) and whose reply is true.</summary>
    private static void RegisterNamed(RpcRegistry rpc, string method, Func<LvolBdev, Task> op, LvolModule m)
    {
        rpc.Register(method, r =>
        {
            var p = BdevRpc.Decode<NameParams>(r);
            var b = Lvol(m, p.Name, "name");
            return Run("name", async () =>
            {
                await op(b).ConfigureAwait(true);
                return JsonValue.Create(true);
            });
        });
    }
}
