namespace VhostBackend.IntegrationTests.Infrastructure;

/// <summary>Paths of a built test-guest image (see <c>qemu/build-guest.sh</c>).</summary>
/// <param name="KernelPath">The Debian kernel (<c>vmlinuz</c>).</param>
/// <param name="InitrdPath">The busybox initramfs with the agent (<c>initramfs.img</c>).</param>
public sealed record GuestImagePaths(string KernelPath, string InitrdPath);

/// <summary>
/// Builds (once per process) and locates the QEMU test guest. The image lives in
/// <c>${VHOSTBACKEND_CACHE:-$HOME/.cache/vhostbackend}/guest</c>; <c>qemu/build-guest.sh</c> is
/// idempotent and returns instantly when the image is up to date.
/// </summary>
public static class GuestImage
{
    /// <summary>How long the first build (apt-get download + initramfs packing) may take.</summary>
    public static readonly TimeSpan BuildTimeout = TimeSpan.FromMinutes(15);

    private static readonly Lazy<string> s_repoRoot = new(FindRepoRoot, LazyThreadSafetyMode.ExecutionAndPublication);
    private static readonly Lazy<GuestImagePaths> s_image = new(Build, LazyThreadSafetyMode.ExecutionAndPublication);

    /// <summary>
    /// The repository root: <c>$VHOSTBACKEND_REPO_ROOT</c> if set, otherwise the first directory,
    /// walking up from the test assembly (then from the current directory), that contains
    /// <c>VhostBackend.sln</c>/<c>VhostBackend.slnx</c> or <c>.git</c> and has <c>qemu/build-guest.sh</c>.
    /// </summary>
    public static string RepoRoot => s_repoRoot.Value;

    /// <summary>The repository's <c>qemu/</c> directory (build-guest.sh, run-guest.sh, guest-init.sh).</summary>
    /// <summary>True when the checkout is under /tmp, /var/tmp or /run, which the guest covers with private tmpfs.</summary>
    public static bool RepoHiddenInGuest =>
        new[] { "/tmp/", "/var/tmp/", "/run/" }.Any(d => (RepoRoot + "/").StartsWith(d, StringComparison.Ordinal));

    public static string QemuDirectory => Path.Combine(RepoRoot, "qemu");

    /// <summary>
    /// Runs <c>qemu/build-guest.sh</c> the first time it is called in this process and returns the
    /// kernel/initrd paths; later calls return the cached result (or rethrow the cached failure).
    /// </summary>
    /// <exception cref="GuestImageBuildException">The script failed; the message contains its output.</exception>
    public static GuestImagePaths EnsureBuilt() => s_image.Value;

    private static GuestImagePaths Build()
    {
        var script = Path.Combine(QemuDirectory, "build-guest.sh");
        HostProcessResult result;
        try
        {
            result = Tools.RunAsync("bash", [script], BuildTimeout, RepoRoot).GetAwaiter().GetResult();
        }
        catch (TimeoutException ex)
        {
            throw new GuestImageBuildException($"{script} timed out.", ex.Message, ex);
        }

        if (result.ExitCode != 0)
        {
            throw new GuestImageBuildException($"{script} failed with exit code {result.ExitCode}.", result.Output);
        }

        string? kernel = null;
        string? initrd = null;
        foreach (var line in result.Output.Split('\n'))
        {
            if (line.StartsWith("kernel: ", StringComparison.Ordinal))
            {
                kernel = line["kernel: ".Length..].Trim();
            }
            else if (line.StartsWith("initrd: ", StringComparison.Ordinal))
            {
                initrd = line["initrd: ".Length..].Trim();
            }
        }

        if (kernel is null || initrd is null || !File.Exists(kernel) || !File.Exists(initrd))
        {
            throw new GuestImageBuildException(
                $"{script} succeeded but did not report existing 'kernel:'/'initrd:' paths.", result.Output);
        }

        return new GuestImagePaths(kernel, initrd);
    }

    private static string FindRepoRoot()
    {
        var fromEnv = Environment.GetEnvironmentVariable("VHOSTBACKEND_REPO_ROOT");
        if (!string.IsNullOrEmpty(fromEnv))
        {
            if (!File.Exists(Path.Combine(fromEnv, "qemu", "build-guest.sh")))
            {
                throw new InvalidOperationException(
                    $"VHOSTBACKEND_REPO_ROOT={fromEnv} does not contain qemu/build-guest.sh.");
            }

            return Path.GetFullPath(fromEnv);
        }

        var starts = new[] { AppContext.BaseDirectory, Directory.GetCurrentDirectory() };
        foreach (var start in starts)
        {
            for (var dir = new DirectoryInfo(start); dir is not null; dir = dir.Parent)
            {
                var isRoot = File.Exists(Path.Combine(dir.FullName, "VhostBackend.sln"))
                    || File.Exists(Path.Combine(dir.FullName, "VhostBackend.slnx"))
                    || Directory.Exists(Path.Combine(dir.FullName, ".git"))
                    || File.Exists(Path.Combine(dir.FullName, ".git"));
                if (isRoot && File.Exists(Path.Combine(dir.FullName, "qemu", "build-guest.sh")))
                {
                    return dir.FullName;
                }
            }
        }

        throw new InvalidOperationException(
            "Cannot locate the repository root (a directory with VhostBackend.sln or .git and qemu/build-guest.sh) " +
            $"above '{AppContext.BaseDirectory}' or '{Directory.GetCurrentDirectory()}'. Set VHOSTBACKEND_REPO_ROOT.");
    }
}

/// <summary>Thrown when <c>qemu/build-guest.sh</c> fails; <see cref="Exception.Message"/> includes the script output.</summary>
public sealed class GuestImageBuildException : Exception
{
    /// <summary>Creates the exception.</summary>
    public GuestImageBuildException(string summary, string scriptOutput, Exception? inner = null)
        : base($"{summary}\n--- build-guest.sh output ---\n{scriptOutput}", inner)
    {
        ScriptOutput = scriptOutput;
    }

    /// <summary>The script's combined stdout/stderr.</summary>
    public string ScriptOutput { get; }
}
