using VhostBackend.BdevMalloc;

namespace VhostBackend.Blob.Tests;

/// <summary>Every lvol RPC error names the parameter at fault and the reason, after SPDK's code and strerror
/// ("strerror: param: reason", as the other modules answer).</summary>
public class LvolRpcErrorTests
{
    private const int MiB = 1024 * 1024;

    private static async Task Fails(LvolKit kit, string method, object p, int code, string message)
    {
        var e = await kit.CallFails(method, p);
        Assert.Equal(code, e.Code);
        Assert.StartsWith(message, e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task ErrorsNameTheParameterAndTheReason()
    {
        await using var kit = new LvolKit();
        kit.Bdevs.Register(new MallocBdev("M0", 32 * MiB / 512, 512));
        kit.Bdevs.Register(new MallocBdev("Tiny", 8, 512));
        await kit.Call("bdev_wait_for_examine");

        // bdev_lvol_create_lvstore: sync refusals are the errno, as SPDK's vbdev_lvs_create returns them.
        await Fails(kit, "bdev_lvol_create_lvstore", new { bdev_name = "M0", lvs_name = "x", clear_method = "bogus" }, -22, "Invalid argument: clear_method: 'bogus'");
        await Fails(kit, "bdev_lvol_create_lvstore", new { bdev_name = "M0", lvs_name = "" }, -22, "Invalid argument: lvs_name: ");
        await Fails(kit, "bdev_lvol_create_lvstore", new { bdev_name = "M0", lvs_name = new string('n', 64) }, -22, "Invalid argument: lvs_name: ");
        await Fails(kit, "bdev_lvol_create_lvstore", new { bdev_name = "M0", lvs_name = "x", cluster_sz = 1000 }, -22, "Invalid argument: cluster_sz: ");
        await Fails(kit, "bdev_lvol_create_lvstore", new { bdev_name = "nope", lvs_name = "x" }, -19, "No such device: bdev_name: ");
        await Fails(kit, "bdev_lvol_create_lvstore", new { bdev_name = "Tiny", lvs_name = "x" }, -32602, "No space left on device: bdev_name: ");
        await Fails(kit, "bdev_lvol_create_lvstore", new { bdev_name = "M0", lvs_name = "x", cluster_sz = MiB, num_md_pages_per_cluster_ratio = 1 }, -32602,
            "Invalid argument: num_md_pages_per_cluster_ratio: ");
        await kit.Call("bdev_lvol_create_lvstore", new { bdev_name = "M0", lvs_name = "lvs", cluster_sz = MiB });
        await Fails(kit, "bdev_lvol_create_lvstore", new { bdev_name = "M0", lvs_name = "lvs" }, -17, "File exists: lvs_name: ");

        // Selecting the store.
        await Fails(kit, "bdev_lvol_get_lvstores", new { lvs_name = "none" }, -19, "No such device: lvs_name: no lvol store named none");
        await Fails(kit, "bdev_lvol_get_lvstores", new { uuid = Guid.NewGuid().ToString() }, -19, "No such device: uuid: ");
        await Fails(kit, "bdev_lvol_get_lvstores", new { uuid = Guid.NewGuid().ToString(), lvs_name = "lvs" }, -22, "Invalid argument: uuid: ");
        await Fails(kit, "bdev_lvol_get_lvols", new { lvs_uuid = Guid.NewGuid().ToString() }, -19, "No such device: lvs_uuid: ");
        await Fails(kit, "bdev_lvol_delete_lvstore", new { }, -22, "Invalid argument: lvs_name: ");
        await Fails(kit, "bdev_lvol_rename_lvstore", new { old_name = "none", new_name = "y" }, -2, "No such file or directory: old_name: ");

        // bdev_lvol_create: the errno itself.
        await Fails(kit, "bdev_lvol_create", new { lvs_name = "lvs", lvol_name = "x" }, -32602, "Invalid argument: size_in_mib: ");
        await Fails(kit, "bdev_lvol_create", new { lvs_name = "lvs", lvol_name = "x", size = 1, size_in_mib = 1 }, -32602, "Invalid argument: size: ");
        await Fails(kit, "bdev_lvol_create", new { lvs_name = "lvs", lvol_name = "x", size_in_mib = ulong.MaxValue / 2 }, -32602, "Invalid argument: size_in_mib: ");
        await Fails(kit, "bdev_lvol_create", new { lvs_name = "lvs", lvol_name = "x", size_in_mib = 1, clear_method = "bogus" }, -22, "Invalid argument: clear_method: ");
        await Fails(kit, "bdev_lvol_create", new { lvs_name = "none", lvol_name = "x", size_in_mib = 1 }, -19, "No such device: lvs_name: ");
        await Fails(kit, "bdev_lvol_create", new { lvs_name = "lvs", lvol_name = "", size_in_mib = 1 }, -22, "Invalid argument: lvol_name: ");
        await Fails(kit, "bdev_lvol_create", new { lvs_name = "lvs", lvol_name = "big", size_in_mib = 1024 }, -28, "No space left on device: size_in_mib: ");
        await kit.Call("bdev_lvol_create", new { lvs_name = "lvs", lvol_name = "v", size_in_mib = 2, thin_provision = true });
        await Fails(kit, "bdev_lvol_create", new { lvs_name = "lvs", lvol_name = "v", size_in_mib = 1 }, -17, "File exists: lvol_name: ");

        // Operations on an lvol: -32602 with strerror, the parameter and the reason.
        await Fails(kit, "bdev_lvol_snapshot", new { lvol_name = "lvs/none", snapshot_name = "s" }, -19, "No such device: lvol_name: no lvol named lvs/none");
        await Fails(kit, "bdev_lvol_snapshot", new { lvol_name = "lvs/v", snapshot_name = "v" }, -32602, "File exists: snapshot_name: ");
        await Fails(kit, "bdev_lvol_snapshot", new { lvol_name = "lvs/v", snapshot_name = "" }, -32602, "Invalid argument: snapshot_name: ");
        await kit.Call("bdev_lvol_snapshot", new { lvol_name = "lvs/v", snapshot_name = "s" });
        await Fails(kit, "bdev_lvol_snapshot", new { lvol_name = "lvs/s", snapshot_name = "s2" }, -32602, "Invalid argument: lvol_name: ");
        await Fails(kit, "bdev_lvol_clone", new { snapshot_name = "lvs/s" }, -32602, "Invalid argument: clone_name: ");
        await Fails(kit, "bdev_lvol_clone", new { snapshot_name = "lvs/v", clone_name = "c" }, -32602, "Invalid argument: snapshot_name: ");
        await Fails(kit, "bdev_lvol_clone", new { snapshot_name = "lvs/s", clone_name = "v" }, -32602, "File exists: clone_name: ");
        await Fails(kit, "bdev_lvol_rename", new { old_name = "lvs/v", new_name = "s" }, -32602, "File exists: new_name: ");
        await Fails(kit, "bdev_lvol_rename", new { old_name = "lvs/none", new_name = "y" }, -19, "No such device: old_name: ");
        await Fails(kit, "bdev_lvol_resize", new { name = "lvs/v", size_in_mib = 1024 }, -32602, "No space left on device: size_in_mib: ");
        await Fails(kit, "bdev_lvol_resize", new { name = "lvs/s", size_in_mib = 4 }, -32602, "Operation not permitted: name: ");
        await Fails(kit, "bdev_lvol_resize", new { name = "lvs/none", size = 4096 }, -19, "No such device: name: ");
        await Fails(kit, "bdev_lvol_inflate", new { name = "lvs/s" }, -32602, "Operation not permitted: name: ");
        await Fails(kit, "bdev_lvol_decouple_parent", new { name = "lvs/s" }, -32602, "Invalid argument: name: ");
        await Fails(kit, "bdev_lvol_delete", new { name = "lvs/none" }, -19, "No such device: name: ");
        await Fails(kit, "bdev_lvol_set_read_only", new { name = "lvs/none" }, -19, "No such device: name: ");
    }
}

public class LvolstoreMdRatioTests
{
    private const int MiB = 1024 * 1024;

    [Theory]
    [InlineData(0u, 64u)] // SPDK's default ratio 100: one md page per cluster
    [InlineData(50u, 32u)]
    [InlineData(300u, 192u)]
    public async Task NumMdPagesPerClusterRatioSizesTheMdRegionAsSpdk(uint ratio, uint mdLen)
    {
        await using var kit = new LvolKit();
        kit.Bdevs.Register(new MallocBdev("M0", 64 * MiB / 512, 512));
        await kit.Call("bdev_lvol_create_lvstore", new { bdev_name = "M0", lvs_name = "lvs", cluster_sz = MiB, num_md_pages_per_cluster_ratio = ratio });
        var bs = kit.Lvol.Stores.Single().Store.BlobStore;
        Assert.Equal(mdLen, bs.SuperBlockCopy.MdLen);
        // The store is usable.
        await kit.Call("bdev_lvol_create", new { lvs_name = "lvs", lvol_name = "v", size_in_mib = 1, thin_provision = true });
    }
}
