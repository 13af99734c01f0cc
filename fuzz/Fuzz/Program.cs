using SharpFuzz;

namespace VhostBackend.Fuzz;

/// <summary>
/// The AFL++ harness (scripts/fuzz.sh runs it under afl-fuzz after SharpFuzz instrumented the project
/// assemblies). The first argument picks the target; expensive state is built once, outside the loop, so that an
/// execution costs only the code under test. An exception escaping a target is a finding (AFL counts it as a
/// crash); so is an execution that never returns (a hang, AFL's timeout).
///
/// <c>VhostBackend.Fuzz TARGET FILE|DIR...</c> replays inputs without AFL (regression checks, triage): every
/// input runs once and the first exception is printed with the input's name (exit code 1). Replay with the
/// uninstrumented build: instrumented assemblies need the coverage map only <see cref="Fuzzer.Run(Action{Stream})"/> sets up.
/// </summary>
internal static class Program
{
    private static readonly Dictionary<string, Func<IFuzzTarget>> s_targets = new(StringComparer.Ordinal)
    {
        ["vhost-msg"] = () => new VhostMessageTarget(),
        ["desc-chain"] = () => new DescChainTarget(),
        ["scsi-cdb"] = () => new ScsiCdbTarget(),
        ["rpc-bind"] = () => new RpcBindTarget(),
        ["nvmf-tcp"] = () => new NvmfTcpTarget(),
    };

    public static int Main(string[] args)
    {
        if (args.Length == 0 || !s_targets.TryGetValue(args[0], out var create))
        {
            Console.Error.WriteLine($"usage: VhostBackend.Fuzz {{{string.Join('|', s_targets.Keys)}}} [FILE|DIR...]");
            return 2;
        }

        if (args.Length > 1)
        {
            return Replay(create(), args[1..]);
        }

        // Instrumented code may run only inside Fuzzer.Run (it writes AFL's coverage map, which Run sets up), so
        // the target is built on the first execution; its set-up coverage is recorded that once only.
        IFuzzTarget? target = null;
        Fuzzer.Run(stream =>
        {
            target ??= create();
            using var ms = new MemoryStream();
            stream.CopyTo(ms);
            target.Run(ms.GetBuffer().AsSpan(0, (int)ms.Length));
        });
        return 0;
    }

    private static int Replay(IFuzzTarget target, string[] paths)
    {
        var files = paths.SelectMany<string, string>(p => Directory.Exists(p) ? Directory.GetFiles(p).Order(StringComparer.Ordinal) : [p]).ToArray();
        foreach (var f in files)
        {
            try
            {
                target.Run(File.ReadAllBytes(f));
            }
            catch (Exception e)
            {
                Console.Error.WriteLine($"{f}: {e}");
                return 1;
            }
        }

        Console.WriteLine($"{files.Length} inputs ran without a finding");
        return 0;
    }
}

/// <summary>One fuzz target: runs one input; throws when the input exposed a bug.</summary>
internal interface IFuzzTarget
{
    void Run(ReadOnlySpan<byte> input);
}

/// <summary>A broken invariant the code under test must keep (thrown so that AFL records a crash).</summary>
internal sealed class FuzzFindingException(string message) : Exception(message);
