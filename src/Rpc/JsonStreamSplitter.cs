using System.Text.Json;

namespace VhostBackend.Rpc;

/// <summary>
/// Cuts a byte stream of concatenated JSON values (SPDK's JSON-RPC wire format: no framing, values back to back,
/// any whitespace between) into whole values. Resumable: a value split across many reads is scanned once, not
/// from the start on every read. Not thread-safe; one per connection.
///
/// Buffer ownership: the memory handed out by <see cref="GetWriteMemory"/> and <see cref="TryNext"/> belongs to
/// this splitter and is only valid until the next call to <see cref="GetWriteMemory"/>.
/// </summary>
public sealed class JsonStreamSplitter
{
    private readonly int _maxValueBytes;
    private byte[] _buf;
    private int _start;
    private int _scan;
    private int _end;
    private JsonReaderState _state;

    public JsonStreamSplitter(int maxValueBytes, int initialBuffer = 16 * 1024)
    {
        if (maxValueBytes <= 0)
        {
            throw new ArgumentOutOfRangeException(nameof(maxValueBytes));
        }

        _maxValueBytes = maxValueBytes;
        _buf = new byte[Math.Min(initialBuffer, maxValueBytes + 1)];
        _state = NewState();
    }

    public enum Result
    {
        /// <summary>A whole value was returned.</summary>
        Value,

        /// <summary>No whole value yet: read more.</summary>
        NeedMore,

        /// <summary>The bytes are not JSON (or nest too deep): a parse error; the stream cannot be resynchronized.</summary>
        Error,

        /// <summary>A value grew beyond the limit without ending.</summary>
        TooLarge,
    }

    /// <summary>Bytes received and not yet returned as a value (whitespace included).</summary>
    public int Pending => _end - _start;

    /// <summary>Whether anything but whitespace is pending (a value was cut short).</summary>
    public bool HasPartialValue
    {
        get
        {
            for (int i = _start; i < _end; i++)
            {
                if (!IsWhitespace(_buf[i]))
                {
                    return true;
                }
            }

            return false;
        }
    }

    /// <summary>Space to receive into (at least 1 byte); call <see cref="Advance"/> with the count received.</summary>
    public Memory<byte> GetWriteMemory()
    {
        if (_end == _buf.Length)
        {
            if (_start > 0)
            {
                Buffer.BlockCopy(_buf, _start, _buf, 0, _end - _start);
                _scan -= _start;
                _end -= _start;
                _start = 0;
            }

            if (_end == _buf.Length)
            {
                // Grow, but never past one byte more than the limit (enough to detect "too large").
                int size = (int)Math.Min((long)_buf.Length * 2, (long)_maxValueBytes + 1);
                if (size <= _buf.Length)
                {
                    size = _buf.Length + 1;
                }

                Array.Resize(ref _buf, size);
            }
        }

        return _buf.AsMemory(_end);
    }

    public void Advance(int count)
    {
        if (count < 0 || _end + count > _buf.Length)
        {
            throw new ArgumentOutOfRangeException(nameof(count));
        }

        _end += count;
    }

    /// <summary>Returns the next whole value, if the received bytes hold one.</summary>
    public Result TryNext(out ReadOnlyMemory<byte> value)
    {
        value = default;
        if (_scan == _start)
        {
            while (_start < _end && IsWhitespace(_buf[_start]))
            {
                _start++;
            }

            _scan = _start;
        }

        if (_start == _end)
        {
            return Result.NeedMore;
        }

        var reader = new Utf8JsonReader(_buf.AsSpan(_scan, _end - _scan), isFinalBlock: false, _state);
        try
        {
            while (reader.Read())
            {
                if (reader.CurrentDepth != 0)
                {
                    continue;
                }

                if (reader.TokenType is JsonTokenType.StartObject or JsonTokenType.StartArray or JsonTokenType.PropertyName)
                {
                    continue;
                }

                int valueEnd = _scan + (int)reader.BytesConsumed;
                if (valueEnd - _start > _maxValueBytes)
                {
                    return Result.TooLarge;
                }

                value = _buf.AsMemory(_start, valueEnd - _start);
                _start = valueEnd;
                _scan = valueEnd;
                _state = NewState();
                return Result.Value;
            }
        }
        catch (JsonException)
        {
            return Result.Error;
        }

        _scan += (int)reader.BytesConsumed;
        _state = reader.CurrentState;
        return _end - _start > _maxValueBytes ? Result.TooLarge : Result.NeedMore;
    }

    private static JsonReaderState NewState() => new(new JsonReaderOptions { MaxDepth = 64, CommentHandling = JsonCommentHandling.Disallow });

    private static bool IsWhitespace(byte b) => b is (byte)' ' or (byte)'\t' or (byte)'\r' or (byte)'\n';
}
