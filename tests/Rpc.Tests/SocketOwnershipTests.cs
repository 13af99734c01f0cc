using System.Text.Json.Nodes;
using VhostBackend.App;
using VhostBackend.Daemon;
using VhostBackend.Platform;
using Xunit;

namespace VhostBackend.Rpc.Tests;

/// <summary>
/// --socket-user/--socket-group/--socket-mode: the RPC socket and every vhost-user socket (from the config, created
/// over RPC later, started after a delay) get the owner, group and mode; bad values are refused naming the option.
/// </summary>
public sealed class SocketOwnershipTests
{
    private static uint DiskGroup()
    {
        // A group other than root's, so a gid that stays 0 cannot pass.
        Assert.True(SocketOwnership.TryResolveGroup("disk", out uint disk), "group 'disk' missing (Debian has gid 6)");
        Assert.NotEqual(0u, disk);
        return disk;
    }

    [Fact]
    public async Task RpcAndVhostSocketsGetModeAndGroup()
    {
        uint disk = DiskGroup();
        var config = JsonNode.Parse("""
            {"subsystems":[
              {"subsystem":"bdev","config":[{"method":"bdev_malloc_create","params":{"name":"M0","num_blocks":256,"block_size":512}},
                                            {"method":"bdev_malloc_create","params":{"name":"M1","num_blocks":256,"block_size":512}}]},
              {"subsystem":"vhost_blk","config":[{"method":"vhost_create_blk_controller","params":{"ctrlr":"vb0","dev_name":"M0"}}]}]}
            """)!.AsObject();
        await using var app = await TestApp.StartAsync(config: config, socketOwnership: new SocketOwnership(0, disk, (UnixFileMode)0x1A0 /* 0640 */));
        string vhostDir = app.App.Options.SocketDir;
        Assert.Equal(("640", disk), await DaemonNotifyTests.StatAsync(app.RpcSocket));
        Assert.Equal(("640", disk), await DaemonNotifyTests.StatAsync(Path.Combine(vhostDir, "vb0")));

        await using var c = await app.ConnectAsync();
        Assert.True((bool)(await c.ResultAsync("vhost_create_blk_controller", new JsonObject { ["ctrlr"] = "vb1", ["dev_name"] = "M1" }))!);
        Assert.Equal(("640", disk), await DaemonNotifyTests.StatAsync(Path.Combine(vhostDir, "vb1")));

        Assert.True((bool)(await c.ResultAsync("vhost_create_scsi_controller", new JsonObject { ["ctrlr"] = "vs0", ["delay"] = true }))!);
        Assert.False(File.Exists(Path.Combine(vhostDir, "vs0")));
        Assert.True((bool)(await c.ResultAsync("vhost_start_scsi_controller", new JsonObject { ["ctrlr"] = "vs0" }))!);
        Assert.Equal(("640", disk), await DaemonNotifyTests.StatAsync(Path.Combine(vhostDir, "vs0")));
    }

    [Fact]
    public async Task WithoutOptionsSocketsStayAsCreated()
    {
        await using var app = await TestApp.StartAsync();
        Assert.Null(app.App.Options.SocketOwnership);
        Assert.Equal(0u, (await DaemonNotifyTests.StatAsync(app.RpcSocket)).Gid);
    }

    [Fact]
    public void DaemonOptionsResolveNamesAndNumbers()
    {
        uint disk = DiskGroup();
        var o = DaemonOptions.Parse(["--socket-user", "root", "--socket-group", "disk", "--socket-mode", "0660"]);
        Assert.Equal(new SocketOwnership(0, disk, (UnixFileMode)0x1B0), o.App.SocketOwnership);
        o = DaemonOptions.Parse(["--socket-user=0", "--socket-group=6"]);
        Assert.Equal(new SocketOwnership(0, 6, null), o.App.SocketOwnership);
        o = DaemonOptions.Parse(["--socket-mode", "660"]);
        Assert.Equal(new SocketOwnership(null, null, (UnixFileMode)0x1B0), o.App.SocketOwnership);
        Assert.Null(DaemonOptions.Parse(["-L", "info"]).App.SocketOwnership);
    }

    [Theory]
    [InlineData("--socket-user", "no-such-user-vhb", "--socket-user: unknown user 'no-such-user-vhb'")]
    [InlineData("--socket-user", "", "--socket-user: unknown user ''")]
    [InlineData("--socket-user", "4294967295", "--socket-user: unknown user")]
    [InlineData("--socket-group", "no-such-group-vhb", "--socket-group: unknown group 'no-such-group-vhb'")]
    [InlineData("--socket-mode", "0999", "--socket-mode: '0999' is not an octal permission mode")]
    [InlineData("--socket-mode", "rw-rw----", "--socket-mode: 'rw-rw----' is not an octal permission mode")]
    [InlineData("--socket-mode", "4755", "--socket-mode: '4755' is not an octal permission mode")]
    [InlineData("--socket-mode", "", "--socket-mode: '' is not an octal permission mode")]
    public void DaemonOptionsRefuseBadValuesNamingTheOption(string option, string value, string message)
    {
        var e = Assert.Throws<ApplicationConfigException>(() => DaemonOptions.Parse([option, value]));
        Assert.StartsWith(message, e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void MissingValueNamesTheOption()
    {
        var e = Assert.Throws<ApplicationConfigException>(() => DaemonOptions.Parse(["--socket-mode"]));
        Assert.Contains("--socket-mode", e.Message, StringComparison.Ordinal);
    }
}
