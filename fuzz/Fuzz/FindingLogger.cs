using Microsoft.Extensions.Logging;

namespace VhostBackend.Fuzz;

/// <summary>
/// A logger that keeps the first exception logged at error level. Code under test that catches everything to
/// stay alive (a session's protocol thread, the RPC dispatcher) logs what it caught; for the fuzzer an exception
/// that got that far is a bug, so targets rethrow it after the execution.
/// With FUZZ_VERBOSE=1 in the environment (replay triage) every line is printed to stderr as well.
/// </summary>
internal sealed class FindingLogger : ILogger
{
    private static readonly bool s_verbose = Environment.GetEnvironmentVariable("FUZZ_VERBOSE") == "1";

    private Exception? _first;

    public IDisposable? BeginScope<TState>(TState state)
        where TState : notnull => null;

    public bool IsEnabled(LogLevel logLevel) => s_verbose || logLevel >= LogLevel.Error;

    public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter)
    {
        if (s_verbose)
        {
            Console.Error.WriteLine($"{logLevel}: {formatter(state, exception)}");
        }

        if (logLevel >= LogLevel.Error && exception is not null)
        {
            Interlocked.CompareExchange(ref _first, new FuzzFindingException($"{formatter(state, exception)}: {exception}"), null);
        }
    }

    /// <summary>Throws (and forgets) the first exception logged since the last call.</summary>
    public void ThrowIfAny()
    {
        var e = Interlocked.Exchange(ref _first, null);
        if (e is not null)
        {
            throw e;
        }
    }
}
