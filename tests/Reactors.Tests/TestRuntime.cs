using VhostBackend.Platform;

namespace VhostBackend.Reactors.Tests;

internal static class TestRuntime
{
    /// <summary>A started runtime with <paramref name="count"/> reactors, unpinned so tests don't fight over cores.</summary>
    public static ReactorRuntime Start(int count = 2, ReactorMode mode = ReactorMode.Poll)
    {
        var cores = Enumerable.Range(0, count).Select(i => CpuSet.Online().Cores[i % CpuSet.Online().Cores.Count]).Distinct().ToArray();
        var rt = new ReactorRuntime(CpuSet.Of(cores), new ReactorOptions { Mode = mode, PinThreads = false, AdaptiveIdleMicroseconds = 1000 });
        rt.Start();
        return rt;
    }

    public static async Task<bool> WaitUntil(Func<bool> cond, int timeoutMs = 5000)
    {
        var deadline = Environment.TickCount64 + timeoutMs;
        while (!cond())
        {
            if (Environment.TickCount64 > deadline)
            {
                return false;
            }

            await Task.Delay(2);
        }

        return true;
    }
}
