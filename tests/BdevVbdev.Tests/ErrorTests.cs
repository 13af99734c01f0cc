using VhostBackend.Bdev;
using VhostBackend.BdevError;
using Xunit;

namespace VhostBackend.BdevVbdev.Tests;

/// <summary>The error vbdev's injections, as SPDK v24.01's vbdev_error.c applies them.</summary>
public class ErrorTests
{
    [Fact]
    public async Task Failure_Counts_Down_And_Applies_Only_To_Its_Io_Type()
    {
        await using var kit = new VbdevKit();
        kit.AddMalloc();
        var e = (ErrorBdev)kit.Error.Create("M", null)!;
        Assert.Equal("EE_M", e.Name);
        using var desc = kit.Bdevs.Open("EE_M", write: true);
        using var buf = new TestBuffer(512);
        e.Inject(BdevIoType.Read, ErrorType.Failure, 2, 0, 0, 0);

        Assert.Equal(BdevIoStatus.Success, (await kit.Io(desc, (ch, cb) => ch.Write(desc, buf.Whole(), 0, 1, cb, null))).Status);
        Assert.Equal(BdevIoStatus.Failed, (await kit.Io(desc, (ch, cb) => ch.Read(desc, buf.Whole(), 0, 1, cb, null))).Status);
        Assert.Equal(1, e.Injection(BdevIoType.Read).Num);
        Assert.Equal(BdevIoStatus.Failed, (await kit.Io(desc, (ch, cb) => ch.Read(desc, buf.Whole(), 0, 1, cb, null))).Status);
        Assert.Equal(BdevIoStatus.Success, (await kit.Io(desc, (ch, cb) => ch.Read(desc, buf.Whole(), 0, 1, cb, null))).Status);
        Assert.Equal(0, e.Injection(BdevIoType.Read).Num);

        // "all" covers unmap and flush too; "clear" stops every injection.
        e.Inject(null, ErrorType.Failure, 10, 0, 0, 0);
        Assert.Equal(BdevIoStatus.Failed, (await kit.Io(desc, (ch, cb) => ch.Unmap(desc, 0, 1, cb, null))).Status);
        Assert.Equal(BdevIoStatus.Failed, (await kit.Io(desc, (ch, cb) => ch.Flush(desc, 0, 1, cb, null))).Status);
        Assert.Equal(BdevIoStatus.Failed, (await kit.Io(desc, (ch, cb) => ch.Write(desc, buf.Whole(), 0, 1, cb, null))).Status);
        Assert.Equal(BdevIoStatus.Success, (await kit.Io(desc, (ch, cb) => ch.WriteZeroes(desc, 0, 1, cb, null))).Status); // not injectable in SPDK
        e.ClearInjections();
        Assert.Equal(BdevIoStatus.Success, (await kit.Io(desc, (ch, cb) => ch.Unmap(desc, 0, 1, cb, null))).Status);
        Assert.Equal(BdevIoStatus.Success, (await kit.Io(desc, (ch, cb) => ch.Read(desc, buf.Whole(), 0, 1, cb, null))).Status);
    }

    [Fact]
    public async Task Nomem_Is_Retried_By_The_Bdev_Layer_And_Never_Reaches_The_Submitter()
    {
        await using var kit = new VbdevKit();
        kit.AddMalloc();
        var e = (ErrorBdev)kit.Error.Create("M", null)!;
        using var desc = kit.Bdevs.Open("EE_M", write: true);
        using var baseDesc = kit.Bdevs.Open("M", write: false);
        using var buf = new TestBuffer(512);
        using var back = new TestBuffer(512);
        buf.Span.Fill(0x5a);
        e.Inject(BdevIoType.Write, ErrorType.NoMemory, 2, 0, 0, 0);

        // As in SPDK (nomem_io): the layer queues the I/O the module answered NoMemory and submits it again (here
        // with nothing else in flight: after its retry delay), twice; the submitter sees one successful write.
        var status = (await kit.Io(desc, (ch, cb) => ch.Write(desc, buf.Whole(), 9, 1, cb, null))).Status;
        Assert.Equal(BdevIoStatus.Success, status);
        Assert.Equal(0, e.Injection(BdevIoType.Write).Num); // both NoMemory answers were given (and retried)
        Assert.Equal(BdevIoStatus.Success, (await kit.Io(baseDesc, (ch, cb) => ch.Read(baseDesc, back.Whole(), 9, 1, cb, null))).Status);
        Assert.True(back.Span.SequenceEqual(buf.Span));
    }

    [Fact]
    public async Task Corrupt_Data_Flips_A_Written_Byte_Before_The_Base_And_A_Read_Byte_After_It()
    {
        await using var kit = new VbdevKit();
        kit.AddMalloc();
        var e = (ErrorBdev)kit.Error.Create("M", null)!;
        using var desc = kit.Bdevs.Open("EE_M", write: true);
        using var baseDesc = kit.Bdevs.Open("M", write: false);
        using var buf = new TestBuffer(1024);
        using var back = new TestBuffer(1024);
        buf.Span.Fill(0x11);

        // Offset 700 is in the second segment: the offset runs across the whole buffer list.
        e.Inject(BdevIoType.Write, ErrorType.CorruptData, 1, 0, 700, 0xff);
        Assert.Equal(BdevIoStatus.Success, (await kit.Io(desc, (ch, cb) => ch.Write(desc, buf.Iov(0, 512, 512), 4, 2, cb, null))).Status);
        Assert.Equal(BdevIoStatus.Success, (await kit.Io(baseDesc, (ch, cb) => ch.Read(baseDesc, back.Whole(), 4, 2, cb, null))).Status);
        Assert.Equal(0x11 ^ 0xff, back.Span[700]);
        back.Span[700] = 0x11;
        Assert.True(back.Span.IndexOfAnyExcept((byte)0x11) < 0);

        // The count ran out: the next write is intact.
        buf.Span.Fill(0x11);
        Assert.Equal(BdevIoStatus.Success, (await kit.Io(desc, (ch, cb) => ch.Write(desc, buf.Whole(), 4, 2, cb, null))).Status);
        Assert.Equal(BdevIoStatus.Success, (await kit.Io(baseDesc, (ch, cb) => ch.Read(baseDesc, back.Whole(), 4, 2, cb, null))).Status);
        Assert.True(back.Span.IndexOfAnyExcept((byte)0x11) < 0);

        // A read is corrupted after the base returned it; the base stays intact.
        e.Inject(BdevIoType.Read, ErrorType.CorruptData, 1, 0, 3, 0x01);
        Assert.Equal(BdevIoStatus.Success, (await kit.Io(desc, (ch, cb) => ch.Read(desc, back.Whole(), 4, 2, cb, null))).Status);
        Assert.Equal(0x10, back.Span[3]);
        Assert.Equal(BdevIoStatus.Success, (await kit.Io(desc, (ch, cb) => ch.Read(desc, back.Whole(), 4, 2, cb, null))).Status);
        Assert.Equal(0x11, back.Span[3]);
    }

    [Fact]
    public async Task Queue_Depth_Injects_Only_Above_That_Many_Io_At_The_Base()
    {
        await using var kit = new VbdevKit();
        kit.AddMalloc();
        var e = (ErrorBdev)kit.Error.Create("M", null)!;
        using var desc = kit.Bdevs.Open("EE_M", write: true);
        using var buf = new TestBuffer(4096);
        e.Inject(BdevIoType.Read, ErrorType.Failure, 1, 2, 0, 0);

        // One at a time: never 2 at the base, so no failure.
        Assert.Equal(BdevIoStatus.Success, (await kit.Io(desc, (ch, cb) => ch.Read(desc, buf.Iov(0, 512), 0, 1, cb, null))).Status);

        // Four in one go (the base completes each after the submit returns): the third sees 2 in flight and fails.
        var ios = await kit.Start(desc, 4, (ch, i, cb) => ch.Read(desc, buf.Iov(i * 512, 512), (ulong)i, 1, cb, null));
        var statuses = await Task.WhenAll(ios);
        Assert.Equal(new[] { BdevIoStatus.Success, BdevIoStatus.Success, BdevIoStatus.Failed, BdevIoStatus.Success }, statuses);
    }

    [Fact]
    public async Task Pending_Io_Is_Failed_By_A_Reset_And_Aborted_By_Delete_Without_Hanging()
    {
        await using var kit = new VbdevKit();
        kit.AddMalloc();
        var e = (ErrorBdev)kit.Error.Create("M", null)!;
        using var buf = new TestBuffer(4096);
        e.Inject(BdevIoType.Read, ErrorType.Pending, 3, 0, 0, 0);

        using (var desc = kit.Bdevs.Open("EE_M", write: true))
        {
            var reads = await kit.Start(desc, 2, (ch, i, cb) => ch.Read(desc, buf.Iov(i * 512, 512), 0, 1, cb, null));
            await Task.Delay(100);
            Assert.False(reads[0].IsCompleted || reads[1].IsCompleted);
            var reset = await kit.Start(desc, 1, (ch, _, cb) => ch.Reset(desc, cb, null));
            Assert.Equal(BdevIoStatus.Success, await reset[0].WaitAsync(TimeSpan.FromSeconds(5)));
            Assert.Equal(BdevIoStatus.Failed, await reads[0].WaitAsync(TimeSpan.FromSeconds(5)));
            Assert.Equal(BdevIoStatus.Failed, await reads[1].WaitAsync(TimeSpan.FromSeconds(5)));
        }

        var removed = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var d2 = kit.Bdevs.Open("EE_M", write: true, static (_, _, c) => ((TaskCompletionSource)c!).TrySetResult(), removed);
        var held = await kit.Start(d2, 1, (ch, _, cb) => ch.Read(d2, buf.Iov(0, 512), 0, 1, cb, null));
        await Task.Delay(100);
        Assert.False(held[0].IsCompleted);
        var delete = kit.Error.DeleteAsync("EE_M");
        await removed.Task.WaitAsync(TimeSpan.FromSeconds(5));
        Assert.Equal(BdevIoStatus.Aborted, await held[0].WaitAsync(TimeSpan.FromSeconds(5)));
        d2.Dispose();
        Assert.True(await delete.WaitAsync(TimeSpan.FromSeconds(10)));
        Assert.Null(kit.Bdevs.Find("EE_M"));
        Assert.Null(kit.Bdevs.Find("M")!.ClaimedBy);
    }

    [Fact]
    public async Task Base_Removal_Forgets_The_Config_As_Spdk_Does()
    {
        await using var kit = new VbdevKit();
        var m = kit.AddMalloc();
        kit.Error.Create("M", null);
        kit.Error.Create("Missing", Guid.Parse("11111111-2222-3333-4444-555555555555")); // waiting: saved all the same
        var calls = new System.Text.Json.Nodes.JsonArray();
        kit.Error.WriteConfig(calls);
        Assert.Equal(2, calls.Count);
        Assert.Equal("{\"base_name\":\"Missing\",\"uuid\":\"11111111-2222-3333-4444-555555555555\"}", calls[1]!["params"]!.ToJsonString());

        await kit.Bdevs.UnregisterAsync(m, TimeSpan.FromSeconds(10));
        Assert.Null(kit.Bdevs.Find("EE_M"));
        calls = new System.Text.Json.Nodes.JsonArray();
        kit.Error.WriteConfig(calls);
        Assert.Equal("Missing", (string)Assert.Single(calls)!["params"]!["base_name"]!);

        // The base coming back does not bring EE_M back.
        kit.AddMalloc();
        Assert.Null(kit.Bdevs.Find("EE_M"));
    }
}
