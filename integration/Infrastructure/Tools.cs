using System.Diagnostics;
using System.Text;

namespace VhostBackend.IntegrationTests.Infrastructure;

/// <summary>
/// Helpers for host-side tools: locating executables on <c>PATH</c>, shell quoting, and running
/// a host process with a timeout. Tests usually run host tools inside the guest through
/// <c>chroot /host TOOL ...</c> (see <see cref="QemuGuest.ExecHostAsync"/>), so a tool that exists
/// on the host also exists in the guest.
/// </summary>
public static class Tools
{
    /// <summary>
    /// Returns the full path of executable <paramref name="name"/> found on <c>PATH</c> (or
    /// <paramref name="name"/> itself if it contains a '/' and is an executable file), or
    /// <see langword="null"/> if there is none.
    /// </summary>
    public static string? Which(string name)
    {
        ArgumentException.ThrowIfNullOrEmpty(name);
        if (name.Contains('/'))
        {
            return IsExecutableFile(name) ? Path.GetFullPath(name) : null;
        }

        var path = Environment.GetEnvironmentVariable("PATH");
        if (string.IsNullOrEmpty(path))
        {
            path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
        }

        foreach (var dir in path.Split(':', StringSplitOptions.RemoveEmptyEntries))
        {
            var candidate = Path.Combine(dir, name);
            if (IsExecutableFile(candidate))
            {
                return candidate;
            }
        }

        return null;
    }

    /// <summary>True if executable <paramref name="name"/> exists on the host (see <see cref="Which"/>).</summary>
    public static bool Exists(string name) => Which(name) is not null;

    /// <summary>
    /// Returns the path of host tool <paramref name="name"/>, or throws
    /// <see cref="InvalidOperationException"/> explaining how to install it.
    /// </summary>
    /// <param name="name">Executable name, e.g. <c>fio</c>, <c>sg_inq</c>, <c>nvme</c>.</param>
    /// <param name="debianPackage">Debian package that provides it, for the error message (e.g. <c>sg3-utils</c>).</param>
    public static string Require(string name, string? debianPackage = null)
    {
        return Which(name) ?? throw new InvalidOperationException(
            $"Host tool '{name}' was not found on PATH. Install it with " +
            $"'apt-get install {debianPackage ?? name}' (qemu/install-deps.sh installs everything the guest tests need).");
    }

    /// <summary>Quotes <paramref name="value"/> as one POSIX shell word (single quotes).</summary>
    public static string ShellQuote(string value)
    {
        ArgumentNullException.ThrowIfNull(value);
        if (value.Length > 0 && value.All(c => char.IsAsciiLetterOrDigit(c) || "_-./=:,+@%".Contains(c)))
        {
            return value;
        }

        return "'" + value.Replace("'", "'\\''", StringComparison.Ordinal) + "'";
    }

    /// <summary>
    /// Runs a host process to completion, capturing stdout and stderr interleaved into one string.
    /// On timeout the process is killed and <see cref="TimeoutException"/> is thrown with the output so far.
    /// </summary>
    public static async Task<HostProcessResult> RunAsync(
        string fileName,
        IEnumerable<string> arguments,
        TimeSpan timeout,
        string? workingDirectory = null,
        CancellationToken cancellationToken = default)
    {
        var psi = new ProcessStartInfo(fileName)
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            RedirectStandardInput = true,
            UseShellExecute = false,
        };
        if (workingDirectory is not null)
        {
            psi.WorkingDirectory = workingDirectory;
        }

        foreach (var arg in arguments)
        {
            psi.ArgumentList.Add(arg);
        }

        var output = new StringBuilder();
        using var process = new Process { StartInfo = psi };
        process.OutputDataReceived += (_, e) => Append(e.Data);
        process.ErrorDataReceived += (_, e) => Append(e.Data);
        var sw = Stopwatch.StartNew();
        process.Start();
        process.StandardInput.Close();
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();

        using var cts = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        cts.CancelAfter(timeout);
        try
        {
            await process.WaitForExitAsync(cts.Token).ConfigureAwait(false);
        }
        catch (OperationCanceledException)
        {
            try
            {
                process.Kill(entireProcessTree: true);
            }
            catch (InvalidOperationException)
            {
                // Already exited.
            }

            cancellationToken.ThrowIfCancellationRequested();
            throw new TimeoutException(
                $"'{fileName} {string.Join(' ', psi.ArgumentList)}' did not finish within {timeout}. Output so far:\n{Snapshot()}");
        }

        // WaitForExitAsync also waits for the redirected streams to reach EOF.
        return new HostProcessResult(process.ExitCode, Snapshot(), sw.Elapsed);

        void Append(string? line)
        {
            if (line is null)
            {
                return;
            }

            lock (output)
            {
                output.Append(line).Append('\n');
            }
        }

        string Snapshot()
        {
            lock (output)
            {
                return output.ToString();
            }
        }
    }

    private static bool IsExecutableFile(string path)
    {
        try
        {
            if (!File.Exists(path))
            {
                return false;
            }

            if (OperatingSystem.IsWindows())
            {
                return true;
            }

            const UnixFileMode anyExecute = UnixFileMode.UserExecute | UnixFileMode.GroupExecute | UnixFileMode.OtherExecute;
            return (File.GetUnixFileMode(path) & anyExecute) != 0;
        }
        catch (IOException)
        {
            return false;
        }
        catch (UnauthorizedAccessException)
        {
            return false;
        }
    }
}

/// <summary>Result of <see cref="Tools.RunAsync"/>.</summary>
/// <param name="ExitCode">The process exit code.</param>
/// <param name="Output">stdout and stderr, interleaved line by line.</param>
/// <param name="Duration">Wall-clock run time.</param>
public sealed record HostProcessResult(int ExitCode, string Output, TimeSpan Duration);
