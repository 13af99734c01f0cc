using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace VhostBackend.Reactors;

/// <summary>
/// Bounded lock-free multi-producer single-consumer queue of (function, argument) messages
/// (Vyukov's sequence-per-cell design). Enqueue from any thread, dequeue only from the owning reactor.
///
/// Ordering: a producer claims a cell by CAS on <c>_tail</c>, writes the payload, then publishes it with a
/// release store of the cell's sequence (<see cref="Volatile.Write(ref long, long)"/>). The consumer
/// acquire-loads the sequence before reading the payload, so it never sees a half-written message.
/// The consumer frees a cell with a release store of <c>seq + capacity</c>, after clearing the payload,
/// so a producer that reuses the cell can never have its write overtaken.
///
/// Nothing is allocated per message: cells are pre-allocated and hold delegate and argument references.
/// When the ring is full, <see cref="TryEnqueue"/> returns false and the caller decides (the reactor spills
/// to an overflow list, which is the only allocating path and is counted).
/// </summary>
internal sealed class MessageQueue
{
    [StructLayout(LayoutKind.Sequential)]
    private struct Cell
    {
        public long Sequence;
        public Action<object?>? Fn;
        public object? Arg;
    }

    private readonly Cell[] _cells;
    private readonly long _mask;
    private PaddedLong _tail;
    private PaddedLong _head;

    public MessageQueue(int capacity)
    {
        if (capacity < 2 || (capacity & (capacity - 1)) != 0)
        {
            throw new ArgumentOutOfRangeException(nameof(capacity), "capacity must be a power of two >= 2");
        }

        _cells = new Cell[capacity];
        _mask = capacity - 1;
        for (int i = 0; i < capacity; i++)
        {
            _cells[i].Sequence = i;
        }
    }

    public bool TryEnqueue(Action<object?> fn, object? arg)
    {
        long pos = Volatile.Read(ref _tail.Value);
        while (true)
        {
            ref Cell cell = ref _cells[pos & _mask];
            // Acquire: pairs with the consumer's release when it freed this cell.
            long seq = Volatile.Read(ref cell.Sequence);
            long diff = seq - pos;
            if (diff == 0)
            {
                if (Interlocked.CompareExchange(ref _tail.Value, pos + 1, pos) == pos)
                {
                    cell.Fn = fn;
                    cell.Arg = arg;
                    // Release: payload stores become visible before the consumer sees the sequence.
                    Volatile.Write(ref cell.Sequence, pos + 1);
                    return true;
                }

                pos = Volatile.Read(ref _tail.Value);
            }
            else if (diff < 0)
            {
                return false; // full
            }
            else
            {
                pos = Volatile.Read(ref _tail.Value);
            }
        }
    }

    /// <summary>Consumer only.</summary>
    public bool TryDequeue(out Action<object?> fn, out object? arg)
    {
        long pos = _head.Value;
        ref Cell cell = ref _cells[pos & _mask];
        // Acquire: pairs with the producer's release of the sequence; the payload is complete.
        long seq = Volatile.Read(ref cell.Sequence);
        if (seq != pos + 1)
        {
            fn = null!;
            arg = null;
            return false;
        }

        fn = cell.Fn!;
        arg = cell.Arg;
        cell.Fn = null;
        cell.Arg = null;
        _head.Value = pos + 1;
        // Release: the cleared payload is written before producers may claim the cell again.
        Volatile.Write(ref cell.Sequence, pos + _mask + 1);
        return true;
    }

    /// <summary>Whether a message is ready (consumer side; a racing producer may make it stale at once).</summary>
    public bool IsEmpty
    {
        get
        {
            long pos = _head.Value;
            return Volatile.Read(ref _cells[pos & _mask].Sequence) != pos + 1;
        }
    }
}

/// <summary>A long alone on its cache line (128 bytes apart to defeat adjacent-line prefetch).</summary>
[StructLayout(LayoutKind.Explicit, Size = 128)]
internal struct PaddedLong
{
    [FieldOffset(64)] public long Value;
}
