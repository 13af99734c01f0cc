namespace VhostBackend.Blob.Tests;

/// <summary>A device that stops after its N-th write (every later write fails and changes nothing): a power cut
/// between two writes. Each write is whole or absent (SPDK's assumption of atomic 4 KiB md page writes).</summary>
internal sealed class CrashingDevice(MemoryBlobDevice inner) : IBlobDevice
{
    public long Limit { get; set; } = long.MaxValue;

    public long Writes { get; private set; }

    public int BlockSize => inner.BlockSize;

    public ulong BlockCount => inner.BlockCount;

    public ValueTask ReadAsync(ulong offset, Memory<byte> buffer) => inner.ReadAsync(offset, buffer);

    private void Count()
    {
        if (Writes >= Limit)
        {
            throw new IOException("device stopped (crash injection)");
        }
        Writes++;
    }

    public ValueTask WriteAsync(ulong offset, ReadOnlyMemory<byte> buffer)
    {
        Count();
        return inner.WriteAsync(offset, buffer);
    }

    public ValueTask WriteZeroesAsync(ulong offset, ulong length)
    {
        Count();
        return inner.WriteZeroesAsync(offset, length);
    }

    public ValueTask FlushAsync() => ValueTask.CompletedTask;
}

public class CrashConsistencyTests
{
    private const int Cs = 64 * 1024;

    private sealed record Step(string What, Func<LvolStore, Task> Run, Action<Dictionary<string, byte[]>> Model);

    private static byte[] Data(string tag, int cluster, int offset, int length) => GoldenImages.Pattern(tag, (long)cluster * Cs + offset, length);

    private static Step Write(string lvol, string tag, int cluster, int offset, int length) => new(
        $"write {lvol} c{cluster}",
        lvs => lvs.WriteAsync(lvs.FindByName(lvol)!, (ulong)(cluster * Cs + offset), Data(tag, cluster, offset, length)).AsTask(),
        m => Data(tag, cluster, offset, length).CopyTo(m[lvol], cluster * Cs + offset));

    private static Step Resize(string lvol, int clusters) => new(
        $"resize {lvol} {clusters}",
        lvs => lvs.ResizeLvolAsync(lvs.FindByName(lvol)!, (ulong)clusters * Cs),
        m =>
        {
            var a = m[lvol];
            Array.Resize(ref a, clusters * Cs);
            m[lvol] = a;
        });

    private static List<Step> Workload() =>
    [
        new("create a thick", lvs => lvs.CreateLvolAsync("a", 4 * Cs, false), m => m["a"] = new byte[4 * Cs]),
        Write("a", "A", 0, 0, 8192),
        new("create b thin", lvs => lvs.CreateLvolAsync("b", 8 * Cs, true), m => m["b"] = new byte[8 * Cs]),
        Write("b", "B", 2, 4096, 4096),
        Write("b", "B", 5, 0, Cs),
        new("snapshot b s1", lvs => lvs.SnapshotAsync(lvs.FindByName("b")!, "s1"), m => m["s1"] = (byte[])m["b"].Clone()),
        Write("b", "C", 2, 0, 512),
        new("clone s1 c1", lvs => lvs.CloneAsync(lvs.FindByName("s1")!, "c1"), m => m["c1"] = (byte[])m["s1"].Clone()),
        Write("c1", "D", 5, 8192, 1024),
        Resize("b", 12),
        Write("b", "E", 11, 0, 4096),
        Resize("a", 6),
        new("delete a", lvs => lvs.DeleteLvolAsync(lvs.FindByName("a")!), m => m.Remove("a")),
        new("create d thick", lvs => lvs.CreateLvolAsync("d", 3 * Cs, false), m => m["d"] = new byte[3 * Cs]),
        new("inflate c1", lvs => lvs.InflateAsync(lvs.FindByName("c1")!), _ => { }),
        Write("c1", "F", 0, 0, 4096),
        new("snapshot c1 s2", lvs => lvs.SnapshotAsync(lvs.FindByName("c1")!, "s2"), m => m["s2"] = (byte[])m["c1"].Clone()),
        new("decouple b", lvs => lvs.DecoupleParentAsync(lvs.FindByName("b")!), _ => { }),
        new("delete s1", lvs => lvs.DeleteLvolAsync(lvs.FindByName("s1")!), m => m.Remove("s1")),
        Write("c1", "G", 1, 0, 4096),
        new("delete s2 (merge into c1)", lvs => lvs.DeleteLvolAsync(lvs.FindByName("s2")!), m => m.Remove("s2")),
        Resize("b", 4),
        new("rename d d2", lvs => lvs.RenameLvolAsync(lvs.FindByName("d")!, "d2"), m =>
        {
            m["d2"] = m["d"];
            m.Remove("d");
        }),
        new("xattrs on b", async lvs =>
        {
            var b = lvs.FindByName("b")!;
            for (int i = 0; i < 3; i++)
            {
                await lvs.BlobStore.SetXattrAsync(b.Blob.Id, $"big{i}", new byte[3000]);
            }
        }, _ => { }),
        new("snapshot b s3", lvs => lvs.SnapshotAsync(lvs.FindByName("b")!, "s3"), m => m["s3"] = (byte[])m["b"].Clone()),
    ];

    private static Dictionary<string, byte[]> Copy(Dictionary<string, byte[]> m) => m.ToDictionary(kv => kv.Key, kv => (byte[])kv.Value.Clone());

    private static async Task<(CrashingDevice Dev, MemoryBlobDevice Mem, int Completed)> Run(long limit)
    {
        var mem = new MemoryBlobDevice(512, 16ul * 1024 * 1024 / 512);
        var dev = new CrashingDevice(mem);
        var lvs = await LvolStore.CreateAsync(dev, "lvs", Cs);
        dev.Limit = limit == long.MaxValue ? long.MaxValue : dev.Writes + limit;
        int completed = 0;
        try
        {
            foreach (var s in Workload())
            {
                await s.Run(lvs);
                completed++;
            }
        }
        catch (IOException)
        {
        }
        return (dev, mem, completed);
    }

    private static bool Matches(LvolStore lvs, Dictionary<string, byte[]> model, out string why)
    {
        why = "";
        var names = lvs.Lvols.Select(l => l.Name).Order().ToList();
        if (!names.SequenceEqual(model.Keys.Order()))
        {
            why = $"lvols [{string.Join(",", names)}] vs model [{string.Join(",", model.Keys.Order())}]";
            return false;
        }
        foreach (var l in lvs.Lvols)
        {
            var d = new byte[l.SizeBytes];
            lvs.ReadAsync(l, 0, d).AsTask().GetAwaiter().GetResult();
            if (!d.AsSpan().SequenceEqual(model[l.Name]))
            {
                why = $"content of {l.Name}";
                return false;
            }
        }
        return true;
    }

    [Fact]
    public async Task EveryCrashPointLoadsToTheLastCommittedStateOrTheNext()
    {
        var steps = Workload();
        var models = new List<Dictionary<string, byte[]>> { new() };
        foreach (var s in steps)
        {
            var m = Copy(models[^1]);
            s.Model(m);
            models.Add(m);
        }
        var (full, fullMem, done) = await Run(long.MaxValue);
        Assert.Equal(steps.Count, done);
        long total = full.Writes;
        Assert.True(total > 60, $"workload issues {total} writes");
        // The uninterrupted run matches the final model and survives a clean reload.
        var final = await LvolStore.LoadAsync(new MemoryBlobDevice(512, (byte[])fullMem.Data.Clone()));
        Assert.True(Matches(final, models[^1], out var w0), w0);

        int repaired = 0;
        for (long n = 0; n < total; n++)
        {
            var (_, mem, completed) = await Run(n);
            var image = (byte[])mem.Data.Clone();
            LvolStore lvs;
            try
            {
                lvs = await LvolStore.LoadAsync(new MemoryBlobDevice(512, image));
            }
            catch (Exception e)
            {
                Assert.Fail($"crash after write {n} (in '{steps[Math.Min(completed, steps.Count - 1)].What}'): load failed: {e.Message}");
                return;
            }
            var ctx = $"crash after write {n} of {total}, {completed} steps done, in '{(completed < steps.Count ? steps[completed].What : "-")}'";
            Assert.True(lvs.BlobStore.LoadReport.Recovered, ctx);
            Assert.Empty(lvs.BlobStore.LoadReport.Dropped);
            Assert.Null(lvs.BlobStore.CheckMasks());
            Assert.Empty(lvs.BlobStore.ClustersOwnedTwice());
            repaired += lvs.BlobStore.LoadReport.Repairs.Count;
            bool before = Matches(lvs, models[completed], out var why1);
            bool after = completed + 1 < models.Count && Matches(lvs, models[completed + 1], out _);
            Assert.True(before || after, $"{ctx}: neither the committed state nor the next ({why1})");
            // The recovered store unloads clean and loads again with the same masks.
            await lvs.UnloadAsync();
            var again = await LvolStore.LoadAsync(new MemoryBlobDevice(512, image));
            Assert.False(again.BlobStore.LoadReport.Recovered, ctx);
            Assert.False(again.BlobStore.LoadReport.MaskMismatch, ctx);
            Assert.True(Matches(again, before ? models[completed] : models[completed + 1], out var why2), $"{ctx}: after a clean reload {why2}");
        }
        // The crash points inside snapshot creation and snapshot removal exercised the load-time repair.
        Assert.True(repaired > 0);
    }
}
