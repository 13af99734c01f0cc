using System.Text.Json.Nodes;
using VhostBackend.Bdev.Rpc;
using VhostBackend.Bdev.Tests.Core;
using VhostBackend.BdevMalloc;
using VhostBackend.BdevNull;
using VhostBackend.Platform;
using VhostBackend.Rpc;
using Xunit;

namespace VhostBackend.Bdev.Tests.Modules;

/// <summary>The bdev module contract end to end: examine, claims, vbdevs before their base, hot-remove propagation.</summary>
public class ModuleContractTests
{
    private const int EPERM = 1;

    [Fact]
    public async Task Vbdev_Configured_Before_Its_Base_Is_Built_When_The_Base_Appears_And_Forwards_Io()
    {
        await using var kit = new BdevTestKit();
        var pt = PassthruModel.Start(kit.Bdevs, kit.Runtime);

        Assert.Null(pt.Create("pt0", "Malloc0")); // the base is missing: remembered, not an error
        Assert.Null(kit.Bdevs.Find("pt0"));

        var malloc = new MallocBdev("Malloc0", 64, 512);
        kit.Bdevs.Register(malloc); // examine builds pt0
        var vbdev = Assert.IsType<PassthruBdev>(kit.Bdevs.Find("pt0"));
        Assert.Equal(malloc.BlockCount, vbdev.BlockCount);
        Assert.Equal("passthru", malloc.ClaimedBy);

        using var desc = kit.Bdevs.Open("pt0", write: true);
        using var src = new NativeBuffer(1024);
        using var dst = new NativeBuffer(1024);
        new Random(7).NextBytes(src.Span[..1024]);
        Assert.Equal((0, true), await kit.Io(desc, (ch, cb) => ch.Write(desc, src.Split(0, 300, 724), 5, 2, cb, null)));

        // The bytes landed on the base (read it directly, read-only: allowed while claimed).
        using var baseDesc = kit.Bdevs.Open("Malloc0", write: false);
        Assert.Equal((0, true), await kit.Io(baseDesc, (ch, cb) => ch.Read(baseDesc, dst.Split(0, 1024), 5, 2, cb, null)));
        Assert.True(src.Span[..1024].SequenceEqual(dst.Span[..1024]));
    }

    [Fact]
    public void Save_Config_Writes_Module_Calls_Before_The_Bases_So_A_Replay_Builds_The_Vbdev()
    {
        var bdevs = new BdevManager();
        var rpc = new RpcRegistry();
        var subsystems = new SubsystemRegistry();
        BdevRpc.Register(rpc, subsystems, bdevs);
        var pt = new PassthruModel();
        bdevs.AddModule(pt);
        pt.Init(new BdevModuleContext(bdevs, null!, rpc, subsystems, Microsoft.Extensions.Logging.Abstractions.NullLoggerFactory.Instance));
        bdevs.Register(new MallocBdev("Malloc0", 16, 512));
        Assert.NotNull(pt.Create("pt0", "Malloc0"));
        bdevs.Register(new NullBdev("Null0", 16, 512));

        var calls = subsystems.Find("bdev")!.WriteConfig();
        var methods = calls.Select(c => (string)c!["method"]!).ToArray();
        Assert.Equal(new[] { "bdev_set_options", "bdev_passthru_create", "bdev_malloc_create", "bdev_null_create", "bdev_wait_for_examine" }, methods);
        Assert.Equal("Malloc0", (string)calls[1]!["params"]!["base_bdev_name"]!);
        Assert.True(calls.All(c => (string)c!["method"]! != "bdev_passthru_create" || c["params"]!["name"]!.GetValue<string>() == "pt0"));
    }

    [Fact]
    public async Task Claimed_Base_Cannot_Be_Claimed_Twice_Or_Opened_For_Write()
    {
        await using var kit = new BdevTestKit();
        var pt = PassthruModel.Start(kit.Bdevs, kit.Runtime);
        var other = PassthruModelOther.Create();
        var malloc = new MallocBdev("Malloc0", 16, 512);
        kit.Bdevs.Register(malloc);
        Assert.NotNull(pt.Create("pt0", "Malloc0"));

        Assert.Equal(-EPERM, kit.Bdevs.Claim(malloc, other));
        var e = Assert.Throws<BdevClaimedException>(() => kit.Bdevs.Open("Malloc0", write: true));
        Assert.Equal(EPERM, e.Errno);
        Assert.Contains("passthru module already claimed it", e.Message, StringComparison.Ordinal);
        using (kit.Bdevs.Open("Malloc0", write: false))
        {
        }

        // A second vbdev on the same base fails with the claim error and is forgotten.
        var claim = Assert.Throws<BdevClaimException>(() => pt.Create("pt1", "Malloc0"));
        Assert.Equal(EPERM, claim.Errno);
        Assert.Null(kit.Bdevs.Find("pt1"));

        // A bdev some other user has open for write cannot be claimed (SPDK: -EPERM) ...
        var n = new NullBdev("Null0", 16, 512);
        kit.Bdevs.Register(n);
        using (kit.Bdevs.Open("Null0", write: true))
        {
            Assert.Equal(-EPERM, kit.Bdevs.Claim(n, other));
        }

        // ... and once closed it can; the claimer's own read-only descriptor becomes a writer.
        using var own = kit.Bdevs.Open("Null0", write: false);
        Assert.Equal(0, kit.Bdevs.Claim(n, other, own));
        Assert.True(own.Writable);
        Assert.Equal("other", n.ClaimedBy);
        kit.Bdevs.ReleaseClaim(n, other);
        Assert.Null(n.ClaimedBy);
        Assert.Throws<InvalidOperationException>(() => kit.Bdevs.ReleaseClaim(n, other));

        // Deleting the vbdev gives the base back.
        Assert.True(await pt.DeleteAsync("pt0"));
        Assert.Null(kit.Bdevs.Find("pt0"));
        Assert.Null(malloc.ClaimedBy);
        using var w = kit.Bdevs.Open("Malloc0", write: true);
        Assert.False(await pt.DeleteAsync("pt0"));
    }

    [Fact]
    public async Task Hot_Remove_Of_The_Base_Removes_The_Vbdev_And_Notifies_Its_Openers()
    {
        await using var kit = new BdevTestKit();
        var pt = PassthruModel.Start(kit.Bdevs, kit.Runtime);
        var malloc = new MallocBdev("Malloc0", 16, 512);
        kit.Bdevs.Register(malloc);
        Assert.NotNull(pt.Create("pt0", "Malloc0"));

        var removed = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        BdevDesc? desc = null;
        desc = kit.Bdevs.Open("pt0", write: true, (type, _, _) =>
        {
            if (type == BdevEventType.Remove)
            {
                desc!.Dispose(); // the opener closes, as a vhost controller does
                removed.TrySetResult();
            }
        });
        using var buf = new NativeBuffer(512);
        Assert.Equal((0, true), await kit.Io(desc, (ch, cb) => ch.Write(desc, buf.Split(0, 512), 0, 1, cb, null)));

        await kit.Bdevs.UnregisterAsync(malloc, TimeSpan.FromSeconds(10)).WaitAsync(TimeSpan.FromSeconds(15));
        await removed.Task.WaitAsync(TimeSpan.FromSeconds(5));
        Assert.Null(kit.Bdevs.Find("pt0"));
        Assert.Null(kit.Bdevs.Find("Malloc0"));

        // The config is remembered: the vbdev comes back with its base.
        kit.Bdevs.Register(new MallocBdev("Malloc0", 16, 512));
        Assert.NotNull(kit.Bdevs.Find("pt0"));
        Assert.True(await pt.DeleteAsync("pt0"));
        Assert.Null(kit.Bdevs.Find("Malloc0")!.ClaimedBy);
    }

    [Fact]
    public void Every_Module_Examines_Every_New_Bdev_In_Registration_Order_And_A_Failing_Examine_Does_Not_Stop_Others()
    {
        var bdevs = new BdevManager();
        var seen = new List<string>();
        var a = new RecordingModule("a", seen, fail: true);
        var b = new RecordingModule("b", seen, fail: false);
        bdevs.AddModule(a);
        bdevs.AddModule(b);
        Assert.Throws<InvalidOperationException>(() => bdevs.AddModule(new RecordingModule("a", seen, fail: false)));
        bdevs.Register(new NullBdev("N0", 8, 512));
        bdevs.Register(new NullBdev("N1", 8, 512));
        Assert.Equal(new[] { "a:N0", "b:N0", "a:N1", "b:N1" }, seen);
        Assert.Same(b, bdevs.FindModule("b"));
        Assert.Equal(new BdevModule[] { a, b }, bdevs.Modules);
    }

    private sealed class RecordingModule : BdevModule
    {
        private readonly List<string> _seen;
        private readonly bool _fail;

        public RecordingModule(string name, List<string> seen, bool fail)
        {
            Name = name;
            _seen = seen;
            _fail = fail;
        }

        public override string Name { get; }

        public override void Init(BdevModuleContext context)
        {
        }

        public override void Examine(Bdev bdev)
        {
            _seen.Add(Name + ":" + bdev.Name);
            if (_fail)
            {
                throw new InvalidOperationException("examine failed");
            }
        }

        public override JsonObject GetStats() => new() { ["examined"] = _seen.Count };
    }

    /// <summary>A second claimer for the claim tests.</summary>
    private sealed class PassthruModelOther : BdevModule
    {
        public override string Name => "other";

        public static PassthruModelOther Create() => new();

        public override void Init(BdevModuleContext context)
        {
        }
    }
}
