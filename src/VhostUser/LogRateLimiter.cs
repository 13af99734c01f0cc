using VhostBackend.Platform;

namespace VhostBackend.VhostUser;

/// <summary>
/// A token bucket for log lines on paths a guest controls: <see cref="TryAcquire"/> is checked before any message
/// is built, costs two comparisons, and never allocates. Owned by one thread (a reactor, a protocol thread): no synchronisation.
/// </summary>
public struct LogRateLimiter
{
    private readonly int _burst;
    private readonly long _ticksPerToken;
    private long _tokens;
    private long _lastRefill;
    private long _suppressed;

    public LogRateLimiter(int burst, int perSecond)
    {
        _burst = burst;
        _ticksPerToken = Math.Max(1, Ticks.Frequency / Math.Max(1, perSecond));
        _tokens = burst;
        _lastRefill = 0;
        _suppressed = 0;
    }

    /// <summary>Whether a line may be logged at <paramref name="now"/> (ticks); if so, how many were suppressed since the last one.</summary>
    public bool TryAcquire(long now, out long suppressed)
    {
        if (_tokens == 0 && now - _lastRefill >= _ticksPerToken)
        {
            _tokens = Math.Min(_burst, (now - _lastRefill) / _ticksPerToken);
        }

        if (_tokens == 0)
        {
            _suppressed++;
            suppressed = 0;
            return false;
        }

        _tokens--;
        _lastRefill = now;
        suppressed = _suppressed;
        _suppressed = 0;
        return true;
    }
}
