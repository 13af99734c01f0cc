using System.Buffers;
using System.Numerics;
using System.Text.Json.Nodes;
using VhostBackend.Bdev;
using VhostBackend.Blob;
using VhostBackend.Platform;
using VhostBackend.Reactors;
using Errno = VhostBackend.Platform.Errno;

namespace VhostBackend.BdevLvol;

/// <summary>
/// One lvol as a bdev (SPDK's vbdev_lvol, product "Logical Volume"): named by the lvol's uuid, aliased
/// <c>lvs_name/lvol_name</c>. The bdev layer splits I/O at cluster boundaries (<see cref="Bdev.Bdev.OptimalIoBoundaryBlocks"/>),
/// so each read or write touches one cluster.
/// <para>Fast path (no allocation, no lock): a read goes to the first blob up the backing chain that has the
/// cluster (zeroes when none does); a write to an allocated cluster goes straight to the base. Most are resolved
/// by the bdev layer's remap in the caller's pass (<see cref="LvolRemap"/>, counted by the layer); the rest come
/// here and are counted in their reactor's <see cref="LvsChannel"/> (no atomic operation), so a snapshot can
/// quiesce both. Slow path (first write to a cluster, a write while the
/// blob is quiesced, unmap and write zeroes over several clusters or an unallocated one): the data is copied out and the blobstore allocates on its metadata
/// serializer; the completion is posted back to the submitting reactor.</para>
/// </summary>
public sealed class LvolBdev : Bdev.Bdev
{
    private static readonly BdevIoCompletion s_readDone = static (_, ok, arg) => ((BdevIo)arg!).Complete(ok);

    private static readonly BdevIoCompletion s_writeDone = static (_, ok, arg) =>
    {
        var io = (BdevIo)arg!;
        ((LvsChannel)io.ModuleContext!).InFlight[io.ModuleTag]--;
        io.Complete(ok);
    };

    private readonly LvsEntry _lvs;
    private readonly ulong _blocksPerCluster;
    /// <summary>log2 of <see cref="_blocksPerCluster"/> when it is a power of two (always with SPDK's cluster
    /// sizes), so the I/O path splits an offset with a shift and a mask instead of two divisions; -1 otherwise.</summary>
    private readonly int _clusterShift;

    public LvolBdev(LvsEntry lvs, Lvol lvol)
        : base(lvol.Uuid.ToString(), "Logical Volume", lvs.Desc.Bdev.BlockSize, lvol.SizeBytes / lvs.Desc.Bdev.BlockSize, lvol.Uuid)
    {
        _lvs = lvs;
        Lvol = lvol;
        _blocksPerCluster = lvs.Store.ClusterSize / lvs.Desc.Bdev.BlockSize;
        _clusterShift = ulong.IsPow2(_blocksPerCluster) ? BitOperations.Log2(_blocksPerCluster) : -1;
        OptimalIoBoundaryBlocks = (uint)_blocksPerCluster;
        RequiredAlignment = lvs.Desc.Bdev.RequiredAlignment;
        Aliases.Add(lvol.Alias);
    }

    public Lvol Lvol { get; }

    /// <summary>The lvstore the lvol lives in.</summary>
    internal LvsEntry Store => _lvs;

    /// <summary>Set when the bdev layer destructs the bdev: every descriptor was closed. An unregister that timed
    /// out leaves it false; the lvol's clusters must then not be freed (an opener may still do I/O to them).</summary>
    internal bool Destructed { get; private set; }

    protected override ValueTask DestructAsync()
    {
        Destructed = true;
        return ValueTask.CompletedTask;
    }

    internal void Resized() => SetBlockCount(Lvol.SizeBytes / BlockSize);

    public override bool SupportsIoType(BdevIoType type) => type switch
    {
        BdevIoType.Read or BdevIoType.Reset => true,
        BdevIoType.Write or BdevIoType.Unmap or BdevIoType.WriteZeroes => !Lvol.IsReadOnly,
        _ => false,
    };

    protected override IoChannel GetModuleChannel(Reactor reactor) => reactor.GetIoChannel(_lvs.IoDevice);

    /// <summary>The remap fast path (<see cref="BdevRemap"/>): the caller's channel resolves the cluster map in its
    /// own pass and submits straight to the base's module; everything else comes to <see cref="Submit"/>.</summary>
    protected override BdevRemap? CreateRemap(IoChannel moduleChannel) =>
        _clusterShift >= 0 ? new LvolRemap(Lvol, (LvsChannel)moduleChannel.Context, _lvs.Desc, _clusterShift) : null;

    protected override void Submit(IoChannel moduleChannel, BdevIo io)
    {
        var ch = (LvsChannel)moduleChannel.Context;
        ch.ModuleIos++;
        var blob = Lvol.Blob;
        ulong ci, within;
        if (_clusterShift >= 0)
        {
            ci = io.OffsetBlocks >> _clusterShift;
            within = io.OffsetBlocks & (_blocksPerCluster - 1);
        }
        else
        {
            ci = io.OffsetBlocks / _blocksPerCluster;
            within = io.OffsetBlocks % _blocksPerCluster;
        }
        bool oneCluster = within + io.NumBlocks <= _blocksPerCluster;
        switch (io.Type)
        {
            case BdevIoType.Read:
                if (!oneCluster)
                {
                    SlowRead(io);
                    return;
                }
                // Past a parent's end the backing reads zeroes, whatever the grandparent holds (chains are
                // loop-free: the store drops looping blobs at load).
                for (var b = blob; b != null && b.TryGetCluster(ci, out uint c); b = b.ParentBlob)
                {
                    if (c != 0)
                    {
                        ulong at = c * _blocksPerCluster + within;
                        if (ch.Base.TryForward(_lvs.Desc, io, at))
                        {
                            return;
                        }
                        int rc = ch.Base.Read(_lvs.Desc, io.Iovs, at, io.NumBlocks, s_readDone, io);
                        if (rc != 0)
                        {
                            io.Complete(rc == -Errno.ENOMEM ? BdevIoStatus.NoMemory : BdevIoStatus.Failed);
                        }
                        return;
                    }
                }
                foreach (var v in io.Iovs)
                {
                    v.AsSpan().Clear();
                }
                io.Complete(BdevIoStatus.Success);
                return;
            case BdevIoType.Write:
                if (Lvol.IsReadOnly)
                {
                    io.Complete(BdevIoStatus.Failed);
                    return;
                }
                if (oneCluster && !blob.IsFrozen)
                {
                    uint c = blob.ClusterAt(ci);
                    if (c != 0)
                    {
                        int g = ch.EnterFastWrite(io);
                        ulong at = c * _blocksPerCluster + within;
                        if (ch.Base.TryForward(_lvs.Desc, io, at, ch.ForwardedWriteDone))
                        {
                            return;
                        }
                        io.ModuleContext = ch;
                        int rc = ch.Base.Write(_lvs.Desc, io.Iovs, at, io.NumBlocks, s_writeDone, io);
                        if (rc != 0)
                        {
                            ch.InFlight[g]--;
                            io.Complete(rc == -Errno.ENOMEM ? BdevIoStatus.NoMemory : BdevIoStatus.Failed);
                        }
                        return;
                    }
                }
                SlowWrite(io);
                return;
            case BdevIoType.Unmap:
            case BdevIoType.WriteZeroes:
                if (Lvol.IsReadOnly)
                {
                    io.Complete(BdevIoStatus.Failed);
                    return;
                }
                bool unmap = io.Type == BdevIoType.Unmap && _lvs.Device.SupportsUnmap;
                if (oneCluster && (unmap || _lvs.Desc.Bdev.SupportsIoType(BdevIoType.WriteZeroes)))
                {
                    // SPDK's blob unmap / write zeroes of one cluster: an allocated cluster's range goes to the
                    // base as the same command; an unallocated one is left alone by an unmap (a clone still reads
                    // its parent there, as in SPDK) and by write zeroes when nothing is under it.
                    uint c0 = blob.ClusterAt(ci);
                    if (c0 == 0 && (unmap || blob.ParentBlob == null))
                    {
                        io.Complete(BdevIoStatus.Success);
                        return;
                    }
                    if (c0 != 0 && !blob.IsFrozen)
                    {
                        int g = ch.EnterFastWrite(io);
                        ulong at = c0 * _blocksPerCluster + within;
                        if (ch.Base.TryForward(_lvs.Desc, io, at, ch.ForwardedWriteDone))
                        {
                            return;
                        }
                        io.ModuleContext = ch;
                        int rc = unmap
                            ? ch.Base.Unmap(_lvs.Desc, at, io.NumBlocks, s_writeDone, io)
                            : ch.Base.WriteZeroes(_lvs.Desc, at, io.NumBlocks, s_writeDone, io);
                        if (rc != 0)
                        {
                            ch.InFlight[g]--;
                            io.Complete(rc == -Errno.ENOMEM ? BdevIoStatus.NoMemory : BdevIoStatus.Failed);
                        }
                        return;
                    }
                }
                ulong offset = io.OffsetBlocks * BlockSize, length = io.NumBlocks * BlockSize;
                Finish(io, unmap
                    ? _lvs.Store.BlobStore.UnmapAsync(blob.Id, offset, length).AsTask()
                    : _lvs.Store.BlobStore.WriteZeroesAsync(blob.Id, offset, length).AsTask(), null);
                return;
            default:
                io.Complete(BdevIoStatus.Success);
                return;
        }
    }

    // The slow path's copy of the data comes from the shared array pool (per-core buckets, so in effect per
    // channel) and goes back when the I/O completes: no large-object allocation per first write.
    private void SlowWrite(BdevIo io)
    {
        int n = checked((int)io.Length);
        var data = ArrayPool<byte>.Shared.Rent(n);
        IoVecs.CopyTo(io.Iovs, 0, data.AsSpan(0, n));
        Finish(io, _lvs.Store.BlobStore.WriteAsync(Lvol.Blob.Id, io.OffsetBlocks * BlockSize, data.AsMemory(0, n)).AsTask(), data, read: false);
    }

    private void SlowRead(BdevIo io)
    {
        int n = checked((int)io.Length);
        var data = ArrayPool<byte>.Shared.Rent(n);
        Finish(io, _lvs.Store.BlobStore.ReadAsync(Lvol.Blob.Id, io.OffsetBlocks * BlockSize, data.AsMemory(0, n)).AsTask(), data, read: true);
    }

    /// <summary>Completes <paramref name="io"/> on its reactor when <paramref name="work"/> ends (a read's data
    /// copied into its iovecs there); a pooled <paramref name="data"/> buffer is returned then. Work that ends on
    /// the I/O's own reactor (a first write on the main reactor runs there from start to end, see
    /// <see cref="BdevBlobDevice"/>) completes it right away, without a message.</summary>
    private static void Finish(BdevIo io, Task work, byte[]? data, bool read = false)
    {
        if (work.IsCompleted && io.Channel.Reactor.IsCurrent)
        {
            FinishOnReactor(io, data, read, work.IsCompletedSuccessfully);
            return;
        }
        work.ContinueWith(static (t, s) =>
        {
            var (io, data, read) = ((BdevIo, byte[]?, bool))s!;
            bool ok = t.IsCompletedSuccessfully;
            if (io.Channel.Reactor.IsCurrent)
            {
                FinishOnReactor(io, data, read, ok);
                return;
            }
            io.Channel.Reactor.Send(static st =>
            {
                var (io, data, read, ok) = ((BdevIo, byte[]?, bool, bool))st!;
                FinishOnReactor(io, data, read, ok);
            }, (io, data, read, ok));
        }, (io, data, read), CancellationToken.None, TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);
    }

    private static void FinishOnReactor(BdevIo io, byte[]? data, bool read, bool ok)
    {
        if (ok && read && data != null)
        {
            IoVecs.CopyFrom(data.AsSpan(0, checked((int)io.Length)), io.Iovs);
        }
        if (data != null)
        {
            ArrayPool<byte>.Shared.Return(data);
        }
        io.Complete(ok);
    }

    /// <summary>SPDK's <c>vbdev_lvol_dump_info_json</c>: a clone names its <c>base_snapshot</c>, a snapshot its <c>clones</c>.</summary>
    public override JsonObject DriverSpecific()
    {
        var lvol = new JsonObject
        {
            ["lvol_store_uuid"] = _lvs.Store.Uuid.ToString(),
            ["base_bdev"] = _lvs.Desc.Bdev.Name,
            ["thin_provision"] = Lvol.IsThinProvisioned,
            ["num_allocated_clusters"] = Lvol.AllocatedClusters,
            ["snapshot"] = Lvol.IsSnapshot,
            ["clone"] = Lvol.IsClone,
        };
        if (Lvol.IsClone && Lvol.Parent is { } parent)
        {
            lvol["base_snapshot"] = parent.Name;
        }

        if (Lvol.IsSnapshot)
        {
            lvol["clones"] = new JsonArray(Lvol.Clones.Select(c => (JsonNode?)JsonValue.Create(c.Name)).ToArray());
        }

        lvol["esnap_clone"] = false;
        return new JsonObject { ["lvol"] = lvol };
    }
}

/// <summary>
/// A reactor's channel for the lvols of one lvstore: that reactor's channel of the base, and the fast-path writes
/// in flight on this reactor counted in two generations. The counts are touched only on this reactor (no atomic
/// operation per I/O); <see cref="LvsIoDevice.DrainAsync"/> flips the generation on every reactor and waits for the
/// old one to empty, which is how a quiesce (snapshot, inflate's commit) waits for the writes admitted before it.
/// </summary>
public sealed class LvsChannel
{
    public LvsChannel(BdevChannel baseChannel)
    {
        Base = baseChannel;
        ForwardedWriteDone = io => InFlight[(int)io.ModuleTag]--;
    }

    public BdevChannel Base { get; }

    internal readonly int[] InFlight = new int[2];
    internal int Generation;

    /// <summary>I/Os of this store's lvols that came to the module's <see cref="LvolBdev"/> Submit on this reactor,
    /// i.e. not resolved by the remap fast path in the caller's pass (tests and diagnostics; this reactor only).</summary>
    public long ModuleIos { get; internal set; }

    /// <summary>A fast-path write forwarded in place (<see cref="BdevChannel.TryForward"/>) is uncounted here when
    /// the base gives it back (one delegate per channel, so the I/O carries only its generation, not the channel).</summary>
    internal readonly Action<BdevIo> ForwardedWriteDone;

    /// <summary>Counts <paramref name="io"/> as a fast-path write of the current generation (returned; also kept
    /// in the I/O's <see cref="BdevIo.ModuleTag"/> for its completion; a write that is not forwarded also sets its
    /// <see cref="BdevIo.ModuleContext"/> to this channel).</summary>
    internal int EnterFastWrite(BdevIo io)
    {
        int g = Generation;
        InFlight[g]++;
        io.ModuleTag = g;
        return g;
    }
}

/// <summary>
/// An lvol bdev channel's remap fast path (<see cref="BdevRemap"/>), its decision made in the caller's pass: a read
/// within one cluster that a blob up the backing chain has, or a write within one allocated cluster of a writable
/// blob, while the lvol's blob is not quiesced (frozen). Anything else (first writes, zero reads, I/O while quiesced,
/// I/O across clusters, read-only) is left to <see cref="LvolBdev"/>'s Submit. The layer looks the lvol's own
/// allocated clusters up itself, in the blob's <see cref="Blob.Blob.IoClusters"/> (empty while the blob is frozen; a
/// resize or snapshot publishes the new map), and asks <see cref="TryTranslate"/> only for the rest: reads down the
/// backing chain, and I/O it will refuse. Nothing is counted here: the layer counts remapped I/O in flight on the
/// caller's channel, and a quiesce waits for that count (<see cref="LvsIoDevice.DrainAsync"/>).
/// </summary>
internal sealed class LvolRemap(Lvol lvol, LvsChannel ch, BdevDesc baseDesc, int clusterShift)
    : BdevRemap(baseDesc, ch.Base, lvol.Blob.IoClusters, clusterShift)
{
    private readonly ulong _withinMask = (1UL << clusterShift) - 1;

    public override bool TryTranslate(BdevIo io, out ulong baseOffsetBlocks)
    {
        baseOffsetBlocks = 0;
        ulong offset = io.OffsetBlocks;
        ulong within = offset & _withinMask;
        var blob = lvol.Blob;
        if (within + io.NumBlocks > _withinMask + 1 || blob.IsFrozen)
        {
            return false;
        }

        ulong ci = offset >> ExtentShift;
        if (io.Type == BdevIoType.Read)
        {
            // Past a parent's end the backing reads zeroes (the module does that), whatever the grandparent holds.
            for (var b = blob; b != null && b.TryGetCluster(ci, out uint c); b = b.ParentBlob)
            {
                if (c != 0)
                {
                    baseOffsetBlocks = ((ulong)c << ExtentShift) + within;
                    return true;
                }
            }

            return false;
        }

        // (Read-only needs no check here: the layer refused the write in this same pass, LvolBdev.SupportsIoType.)
        uint wc = blob.ClusterAt(ci);
        baseOffsetBlocks = ((ulong)wc << ExtentShift) + within;
        return wc != 0;
    }
}

/// <summary>The I/O device of one lvstore's base: its per-reactor context is the base channel.</summary>
public sealed class LvsIoDevice(BdevDesc desc) : IoDevice("lvs:" + desc.Bdev.Name)
{
    private readonly SemaphoreSlim _drain = new(1, 1);

    protected override object CreateChannelContext(Reactor reactor) => new LvsChannel(desc.GetIoChannel());

    protected override void DestroyChannelContext(Reactor reactor, object context) => BdevDesc.PutIoChannel(((LvsChannel)context).Base);

    /// <summary>
    /// Waits for every fast-path write of the store admitted before the call, and for every I/O of
    /// <paramref name="frozen"/>'s lvol remapped before it (SPDK freezes a blob's I/O with a message to each channel
    /// the same way). The caller has set the blob's <see cref="Blob.Blob.IsFrozen"/> first: an I/O admitted on a
    /// reactor after that reactor ran this drain's message saw the flag (the message ordered it) and took the module's
    /// path, where a write waits for the thaw. Module-path writes are counted per reactor in two generations (the
    /// message flips them); remapped I/O is counted by the bdev layer on the lvol's channels. Channels made after the
    /// channel list was read see the flag as well. Drains run one at a time (a second flip must not reuse a generation
    /// still draining).
    /// </summary>
    public async Task DrainAsync(Blob.Blob frozen)
    {
        await _drain.WaitAsync().ConfigureAwait(false);
        try
        {
            var old = new List<(LvsChannel Channel, int Generation)>();
            await ForEachChannelAsync(c =>
            {
                var ch = (LvsChannel)c.Context;
                int g = ch.Generation;
                ch.Generation = g ^ 1;
                lock (old)
                {
                    old.Add((ch, g));
                }
            }).ConfigureAwait(false);
            foreach (var (ch, g) in old)
            {
                while (Volatile.Read(ref ch.InFlight[g]) != 0)
                {
                    await Task.Delay(1).ConfigureAwait(false);
                }
            }

            Func<Bdev.Bdev, bool> ofFrozen = b => b is LvolBdev l && l.Lvol.Blob == frozen;
            while (desc.Bdev.RemappedInFlight(ofFrozen) != 0)
            {
                await Task.Delay(1).ConfigureAwait(false);
            }
        }
        finally
        {
            _drain.Release();
        }
    }
}

/// <summary>A loaded lvstore: the store, its claimed base, the blobstore device and the registered lvol bdevs.</summary>
public sealed class LvsEntry(LvolStore store, BdevDesc desc, BdevBlobDevice device)
{
    public LvolStore Store { get; } = store;
    public BdevDesc Desc { get; } = desc;
    public BdevBlobDevice Device { get; } = device;
    public LvsIoDevice IoDevice { get; } = Init(store, new LvsIoDevice(desc));
    public Dictionary<Lvol, LvolBdev> Bdevs { get; } = [];

    private static LvsIoDevice Init(LvolStore store, LvsIoDevice dev)
    {
        store.BlobStore.DrainFastWrites = dev.DrainAsync;
        return dev;
    }

    /// <summary>Set once the base's removal began the store's hot removal (main reactor only).</summary>
    internal bool HotRemoved { get; set; }
}
