using System.Diagnostics;
using System.Globalization;
using System.Net.Sockets;
using System.Text;

namespace VhostBackend.IntegrationTests.Infrastructure;

/// <summary>
/// A vhost-user device to attach to the guest: QEMU connects (as client) to the daemon's
/// listening unix socket <paramref name="SocketPath"/>.
/// </summary>
/// <param name="SocketPath">The daemon's vhost-user socket. Must not contain ','.</param>
/// <param name="NumQueues">Number of virtqueues (request queues) QEMU asks for.</param>
/// <param name="ReconnectSeconds">
/// If set, QEMU re-dials the socket every N seconds after the daemon went away
/// (<c>-chardev socket,...,reconnect=N</c>), for daemon-restart tests.
/// </param>
public sealed record VhostUserDevice(string SocketPath, int NumQueues = 2, int? ReconnectSeconds = null);

/// <summary>Options for <see cref="QemuGuest.StartAsync"/>. All have working defaults.</summary>
public sealed class QemuGuestOptions
{
    /// <summary>Guest RAM in QEMU syntax (default <c>1G</c>); backed by a shared memfd, as vhost-user needs.</summary>
    public string Memory { get; init; } = "1G";

    /// <summary>
    /// Room for memory hotplug, <c>SIZE,slots=N</c> (e.g. <c>1G,slots=2</c>: QEMU's <c>-m RAM,slots=N,maxmem=SIZE</c>);
    /// null (default) for none. pc-dimm devices added over QMP then land above the boot RAM.
    /// </summary>
    public string? MaxMemory { get; init; }

    /// <summary>Number of vCPUs (default 2).</summary>
    public int Cpus { get; init; } = 2;

    /// <summary>QEMU machine type (default <c>q35</c>, which is required for <c>-device intel-iommu</c>).</summary>
    public string Machine { get; init; } = "q35";

    /// <summary><c>vhost-user-blk-pci</c> devices, in order (they appear as /dev/vda, /dev/vdb, ... in the guest).</summary>
    public IReadOnlyList<VhostUserDevice> BlkDevices { get; init; } = [];

    /// <summary><c>vhost-user-scsi-pci</c> controllers, in order.</summary>
    public IReadOnlyList<VhostUserDevice> ScsiDevices { get; init; } = [];

    /// <summary>Extra QEMU arguments appended verbatim (one list element = one argv word).</summary>
    public IReadOnlyList<string> ExtraQemuArgs { get; init; } = [];

    /// <summary>
    /// Extra kernel command-line arguments appended to <c>console=ttyS0 panic=-1 quiet</c>
    /// (e.g. <c>intel_iommu=on</c>, <c>vbguest.9pcache=loose</c>).
    /// </summary>
    public IReadOnlyList<string> ExtraKernelArgs { get; init; } = [];

    /// <summary>Export the host's <c>/</c> read-only over 9p and mount it on the guest's <c>/host</c> (default true).</summary>
    public bool MountHostRoot { get; init; } = true;

    /// <summary>
    /// 9p cache mode of the <c>/host</c> mount (default <c>none</c>: every read goes to the host, so files the host
    /// changes after boot are seen at once). <c>loose</c> uses the guest page cache and makes repeated program starts
    /// much faster (e.g. a .NET hello-world ~1 s instead of ~5-6 s under TCG), but the guest may then see stale data
    /// for host files modified while it runs.
    /// </summary>
    public string HostRootCache { get; init; } = "none";

    /// <summary>How long to wait for QEMU to start and the guest agent to answer (default 60 s).</summary>
    public TimeSpan BootTimeout { get; init; } = TimeSpan.FromSeconds(60);

    /// <summary>Optional name used in the work-directory name and log lines.</summary>
    public string? Name { get; init; }

    /// <summary>
    /// A migration destination: QEMU starts with <c>-incoming</c> and this URI (e.g. <c>unix:/path</c>), and
    /// <see cref="QemuGuest.StartAsync"/> returns once the agent socket is connected, without waiting for a boot
    /// (the guest runs once the migration completes; then the agent answers as on the source).
    /// </summary>
    public string? Incoming { get; init; }

    /// <summary>
    /// Optional log sink (e.g. <c>ITestOutputHelper.WriteLine</c>) for the QEMU command line, QEMU's own
    /// stderr and every executed command. Exceptions thrown by the sink are ignored.
    /// </summary>
    public Action<string>? Log { get; init; }

    /// <summary>
    /// Keep the work directory (console log, QEMU output) after disposal. Also enabled by the
    /// environment variable <c>VBGUEST_KEEP=1</c>.
    /// </summary>
    public bool KeepWorkDirectory { get; init; }
}

/// <summary>Result of a command run in the guest by <see cref="QemuGuest.ExecAsync(string, TimeSpan, CancellationToken)"/>.</summary>
/// <param name="Command">The shell command that was run.</param>
/// <param name="ExitCode">Its exit status.</param>
/// <param name="Output">stdout and stderr, merged, exactly as written (no trailing newline added or removed).</param>
/// <param name="Duration">Host-measured round-trip time.</param>
public sealed record GuestResult(string Command, int ExitCode, string Output, TimeSpan Duration)
{
    /// <summary>True if <see cref="ExitCode"/> is 0.</summary>
    public bool Succeeded => ExitCode == 0;

    /// <summary>Returns this result, or throws <see cref="GuestCommandFailedException"/> if the exit code is not 0.</summary>
    public GuestResult EnsureSuccess() => Succeeded ? this : throw new GuestCommandFailedException(this);

    /// <inheritdoc/>
    public override string ToString() =>
        $"`{Command}` -> rc={ExitCode} in {Duration.TotalSeconds:F2}s\n{Output}";
}

/// <summary>Thrown by <see cref="GuestResult.EnsureSuccess"/>.</summary>
public sealed class GuestCommandFailedException(GuestResult result)
    : Exception($"Guest command failed: {result}")
{
    /// <summary>The failed command's result.</summary>
    public GuestResult Result { get; } = result;
}

/// <summary>Thrown when the guest cannot be started or the agent connection breaks (e.g. QEMU exited).</summary>
public sealed class QemuGuestException(string message, Exception? inner = null) : Exception(message, inner);

/// <summary>
/// A running QEMU/TCG test guest (see <c>qemu/run-guest.sh</c> and <c>qemu/guest-init.sh</c>):
/// a Debian kernel + busybox initramfs, the host's <c>/</c> mounted read-only on <c>/host</c>
/// (prepared for <c>chroot /host</c>), optional vhost-user-blk/scsi devices, and a command agent
/// on a virtio-serial port that runs one shell command at a time.
/// </summary>
/// <remarks>
/// <para>Commands run as root in the initramfs (busybox). Host programs run with <see cref="ExecHostAsync"/>
/// (<c>chroot /host /bin/sh -c ...</c>). <c>/host</c> is read-only; <c>/host/tmp</c>, <c>/host/var/tmp</c> and
/// <c>/host/run</c> are guest-private tmpfs, so the host's <c>/tmp</c> is NOT visible in the guest: share files
/// through another host path (e.g. under the repository's <c>.build/</c> or <c>$HOME/.cache</c>).</para>
/// <para>Loaded at boot: virtio_pci/blk/scsi/net/console, sd_mod, sg, 9p, nvme, nvme_tcp, nvmet, nvmet_tcp,
/// vfio, vfio_pci, vfio_iommu_type1, crc32c (see <c>MODULES</c> in <c>qemu/build-guest.sh</c>).
/// vhost-user-blk disks appear as <c>/dev/vdX</c>; vhost-user-scsi LUNs as <c>/dev/sdX</c> and <c>/dev/sgN</c>.</para>
/// <para>Set <c>VBGUEST_KEEP=1</c> to keep the work directory (console log, QEMU output) for debugging.</para>
/// </remarks>
/// <example>
/// <code>
/// await using var guest = await QemuGuest.StartAsync(new QemuGuestOptions
/// {
///     BlkDevices = [new VhostUserDevice("/tmp/vb/blk0.sock", NumQueues: 2)],
///     Log = output.WriteLine,
/// });
/// var r = await guest.ExecHostAsync("fio --name=t --filename=/dev/vda --rw=randread --runtime=10 --time_based", TimeSpan.FromMinutes(1));
/// r.EnsureSuccess();
/// </code>
/// </example>
public sealed class QemuGuest : IAsyncDisposable
{
    /// <summary>The virtio-serial port name the guest agent listens on.</summary>
    public const string AgentPortName = "org.vhostbackend.agent";

    /// <summary>Timeout used by the <see cref="ExecAsync(string)"/> overload.</summary>
    public static readonly TimeSpan DefaultExecTimeout = TimeSpan.FromSeconds(60);

    private static readonly byte[] s_markerStart = "\n@@VBRC="u8.ToArray();

    private readonly Process _process;
    private readonly QemuGuestOptions _options;
    private readonly SemaphoreSlim _execLock = new(1, 1);
    private readonly StringBuilder _qemuOutput = new();
    private readonly MemoryStream _rx = new();
    private readonly byte[] _readBuffer = new byte[64 * 1024];
    private Socket? _agent;
    private bool _desynced;
    private int _disposed;

    private QemuGuest(Process process, QemuGuestOptions options, string workDirectory)
        : this(process, options, workDirectory, Path.Combine(workDirectory, "console.log"), Path.Combine(workDirectory, "agent.sock"))
    {
    }

    private QemuGuest(Process process, QemuGuestOptions options, string workDirectory, string consoleLogPath, string agentSocketPath)
    {
        _process = process;
        _options = options;
        WorkDirectory = workDirectory;
        ConsoleLogPath = consoleLogPath;
        AgentSocketPath = agentSocketPath;
        QmpSocketPath = Path.Combine(workDirectory, "qmp.sock");
    }

    /// <summary>
    /// Attaches to a guest someone else started (libvirt): QEMU process <paramref name="qemuPid"/>, the agent's
    /// virtio-serial port on <paramref name="agentSocketPath"/> (QEMU listens), the serial console in
    /// <paramref name="consoleLogPath"/>. Disposing powers the guest off like a guest this class started; the
    /// work directory (the caller's) is kept.
    /// </summary>
    public static async Task<QemuGuest> AttachAsync(int qemuPid, string agentSocketPath, string consoleLogPath, QemuGuestOptions options, CancellationToken cancellationToken = default)
    {
        var process = Process.GetProcessById(qemuPid);
        var guest = new QemuGuest(process, new QemuGuestOptions
        {
            Name = options.Name,
            Log = options.Log,
            BootTimeout = options.BootTimeout,
            KeepWorkDirectory = true,
        }, Path.GetDirectoryName(consoleLogPath)!, consoleLogPath, agentSocketPath);
        var sw = Stopwatch.StartNew();
        try
        {
            using var bootCts = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
            bootCts.CancelAfter(options.BootTimeout);
            await guest.ConnectAgentAsync(bootCts.Token, options.BootTimeout, cancellationToken).ConfigureAwait(false);
            var token = "VBREADY-" + Guid.NewGuid().ToString("N");
            var ready = await guest.ExecAsync("echo " + token, options.BootTimeout, cancellationToken).ConfigureAwait(false);
            if (ready.ExitCode != 0 || !ready.Output.Contains(token, StringComparison.Ordinal))
            {
                throw new QemuGuestException($"Unexpected agent answer during boot: {ready}\n{guest.Diagnostics()}");
            }

            guest.BootTime = sw.Elapsed;
            guest.LogLine($"attached to guest (QEMU pid {qemuPid}) after {guest.BootTime.TotalSeconds:F2}s");
            return guest;
        }
        catch
        {
            await guest.DisposeAsync().ConfigureAwait(false);
            throw;
        }
    }

    /// <summary>Temporary directory holding the console log and the agent/QMP sockets.</summary>
    public string WorkDirectory { get; }

    /// <summary>File receiving the guest's serial console (ttyS0): kernel messages and /init's output.</summary>
    public string ConsoleLogPath { get; }

    /// <summary>Unix socket (QEMU listens) connected to the guest agent's virtio-serial port.</summary>
    public string AgentSocketPath { get; }

    /// <summary>Unix socket (QEMU listens) of the QMP monitor, for tests that hot-plug or query devices.</summary>
    public string QmpSocketPath { get; }

    /// <summary>The QEMU command line as printed by <c>qemu/run-guest.sh</c> (shell-quoted), once known.</summary>
    public string? QemuCommandLine { get; private set; }

    /// <summary>PID of the qemu-system-x86_64 process.</summary>
    public int ProcessId => _process.Id;

    /// <summary>True once QEMU has exited (guest powered off, crashed, or <see cref="Kill"/>ed).</summary>
    public bool HasExited => _process.HasExited;

    /// <summary>Time from launching QEMU until the agent answered its first command.</summary>
    public TimeSpan BootTime { get; private set; }

    /// <summary>The whole serial-console log so far (empty if not yet created).</summary>
    public string ConsoleText
    {
        get
        {
            try
            {
                using var fs = new FileStream(ConsoleLogPath, FileMode.Open, FileAccess.Read, FileShare.ReadWrite | FileShare.Delete);
                using var reader = new StreamReader(fs, Encoding.UTF8);
                return reader.ReadToEnd();
            }
            catch (IOException)
            {
                return string.Empty;
            }
        }
    }

    /// <summary>QEMU's own stdout/stderr so far (command line, warnings, errors).</summary>
    public string QemuOutput
    {
        get
        {
            lock (_qemuOutput)
            {
                return _qemuOutput.ToString();
            }
        }
    }

    /// <summary>
    /// Boots a guest: builds the image if needed (<see cref="GuestImage.EnsureBuilt"/>), starts QEMU via
    /// <c>qemu/run-guest.sh</c>, connects to the agent socket and waits until the agent answers.
    /// </summary>
    /// <exception cref="TimeoutException">The guest did not become ready within <see cref="QemuGuestOptions.BootTimeout"/>.</exception>
    /// <exception cref="QemuGuestException">QEMU exited or the agent connection failed.</exception>
    public static async Task<QemuGuest> StartAsync(QemuGuestOptions? options = null, CancellationToken cancellationToken = default)
    {
        options ??= new QemuGuestOptions();
        var image = GuestImage.EnsureBuilt();
        var prefix = "vbguest-" + (options.Name is null ? string.Empty : Sanitize(options.Name) + "-");
        var workDir = Directory.CreateTempSubdirectory(prefix).FullName;

        var psi = new ProcessStartInfo("bash")
        {
            RedirectStandardInput = true,
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
            WorkingDirectory = workDir,
        };
        var process = new Process { StartInfo = psi, EnableRaisingEvents = true };
        var guest = new QemuGuest(process, options, workDir);
        var args = psi.ArgumentList;
        args.Add(Path.Combine(GuestImage.QemuDirectory, "run-guest.sh"));
        args.Add("--kernel");
        args.Add(image.KernelPath);
        args.Add("--initrd");
        args.Add(image.InitrdPath);
        args.Add("--serial");
        args.Add(guest.ConsoleLogPath);
        args.Add("--agent");
        args.Add(guest.AgentSocketPath);
        args.Add("--qmp");
        args.Add(guest.QmpSocketPath);
        args.Add("--mem");
        args.Add(options.Memory);
        if (options.MaxMemory is { } maxMem)
        {
            args.Add("--maxmem");
            args.Add(maxMem);
        }

        args.Add("--smp");
        args.Add(options.Cpus.ToString(CultureInfo.InvariantCulture));
        args.Add("--machine");
        args.Add(options.Machine);
        foreach (var dev in options.BlkDevices)
        {
            args.Add("--blk");
            args.Add(DeviceSpec(dev));
        }

        foreach (var dev in options.ScsiDevices)
        {
            args.Add("--scsi");
            args.Add(DeviceSpec(dev));
        }

        if (options.HostRootCache != "none")
        {
            args.Add("--append");
            args.Add("vbguest.9pcache=" + options.HostRootCache);
        }

        foreach (var karg in options.ExtraKernelArgs)
        {
            args.Add("--append");
            args.Add(karg);
        }

        if (!options.MountHostRoot)
        {
            args.Add("--no-hostroot");
        }
        else if (GuestImage.RepoHiddenInGuest)
        {
            // The checkout lives under a directory the guest replaces with its own tmpfs: share it on its own.
            args.Add("--share");
            args.Add(GuestImage.RepoRoot);
        }

        args.Add("--");
        if (options.Incoming is { } incoming)
        {
            args.Add("-incoming");
            args.Add(incoming);
        }

        foreach (var qarg in options.ExtraQemuArgs)
        {
            args.Add(qarg);
        }

        process.OutputDataReceived += (_, e) => guest.OnQemuOutput(e.Data);
        process.ErrorDataReceived += (_, e) => guest.OnQemuOutput(e.Data);

        var sw = Stopwatch.StartNew();
        try
        {
            process.Start();
        }
        catch (Exception ex) when (ex is System.ComponentModel.Win32Exception or InvalidOperationException)
        {
            TryDeleteDirectory(workDir);
            process.Dispose();
            throw new QemuGuestException($"Cannot start bash {Path.Combine(GuestImage.QemuDirectory, "run-guest.sh")}: {ex.Message}", ex);
        }

        process.StandardInput.Close();
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();

        try
        {
            using var bootCts = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
            bootCts.CancelAfter(options.BootTimeout);
            await guest.ConnectAgentAsync(bootCts.Token, options.BootTimeout, cancellationToken).ConfigureAwait(false);
            if (options.Incoming is not null)
            {
                guest.LogLine($"migration destination waiting on {options.Incoming} (pid {process.Id}, work dir {workDir})");
                return guest;
            }

            var remaining = options.BootTimeout - sw.Elapsed;
            if (remaining < TimeSpan.FromSeconds(1))
            {
                remaining = TimeSpan.FromSeconds(1);
            }

            var token = "VBREADY-" + Guid.NewGuid().ToString("N");
            GuestResult ready;
            try
            {
                ready = await guest.ExecAsync("echo " + token, remaining, cancellationToken).ConfigureAwait(false);
            }
            catch (TimeoutException ex)
            {
                throw new TimeoutException(
                    $"Guest did not become ready within {options.BootTimeout}.\n{guest.Diagnostics()}", ex);
            }

            if (ready.ExitCode != 0 || !ready.Output.Contains(token, StringComparison.Ordinal))
            {
                throw new QemuGuestException($"Unexpected agent answer during boot: {ready}\n{guest.Diagnostics()}");
            }

            guest.BootTime = sw.Elapsed;
            guest.LogLine($"guest ready after {guest.BootTime.TotalSeconds:F2}s (pid {process.Id}, work dir {workDir})");
            return guest;
        }
        catch
        {
            await guest.DisposeAsync().ConfigureAwait(false);
            throw;
        }
    }

    /// <summary>Runs <paramref name="shellCommand"/> in the guest with <see cref="DefaultExecTimeout"/>.</summary>
    public Task<GuestResult> ExecAsync(string shellCommand) => ExecAsync(shellCommand, DefaultExecTimeout);

    /// <summary>
    /// Runs <paramref name="shellCommand"/> with <c>sh -c</c> in the guest's initramfs environment (busybox;
    /// cwd <c>/</c>; stdin <c>/dev/null</c>; stdout and stderr merged) and returns its exit code and output.
    /// Multi-line commands are allowed (they are transported base64-encoded and <c>eval</c>ed).
    /// Calls are serialized: the guest agent runs one command at a time.
    /// </summary>
    /// <exception cref="TimeoutException">
    /// No answer within <paramref name="timeout"/>; the message contains the console tail. The command keeps running
    /// in the guest: the next call first waits (within its own timeout) for the agent to become free.
    /// </exception>
    /// <exception cref="QemuGuestException">The agent connection closed (QEMU exited or was killed).</exception>
    public async Task<GuestResult> ExecAsync(string shellCommand, TimeSpan timeout, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(shellCommand);
        ObjectDisposedException.ThrowIf(Volatile.Read(ref _disposed) != 0, this);
        var wire = shellCommand.Contains('\n') || shellCommand.Contains('\r')
            ? $"eval \"$(echo {Convert.ToBase64String(Encoding.UTF8.GetBytes(shellCommand))} | base64 -d)\""
            : shellCommand;

        var sw = Stopwatch.StartNew();
        using var cts = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        cts.CancelAfter(timeout);
        try
        {
            await _execLock.WaitAsync(cts.Token).ConfigureAwait(false);
        }
        catch (OperationCanceledException) when (!cancellationToken.IsCancellationRequested)
        {
            throw new TimeoutException(
                $"Guest command `{shellCommand}` could not start within {timeout}: another command is still running.\n{Diagnostics()}");
        }

        try
        {
            var socket = _agent ?? throw new QemuGuestException("The guest agent is not connected.");
            if (_desynced)
            {
                await ResyncAsync(socket, cts.Token).ConfigureAwait(false);
            }

            await socket.SendAsync(Encoding.UTF8.GetBytes(wire + "\n"), SocketFlags.None, cts.Token).ConfigureAwait(false);
            var (rc, output) = await ReadResponseAsync(socket, cts.Token).ConfigureAwait(false);
            var result = new GuestResult(shellCommand, rc, output, sw.Elapsed);
            LogLine($"guest$ {shellCommand}  -> rc={rc} ({sw.Elapsed.TotalSeconds:F2}s)");
            return result;
        }
        catch (OperationCanceledException) when (!cancellationToken.IsCancellationRequested)
        {
            _desynced = true;
            throw new TimeoutException($"Guest command `{shellCommand}` did not finish within {timeout}.\n{Diagnostics()}");
        }
        catch (OperationCanceledException)
        {
            _desynced = true;
            throw;
        }
        catch (Exception ex) when (ex is SocketException or IOException)
        {
            throw new QemuGuestException($"Guest agent connection failed while running `{shellCommand}`: {ex.Message}\n{Diagnostics()}", ex);
        }
        finally
        {
            _execLock.Release();
        }
    }

    /// <summary>Runs <paramref name="hostCommand"/> in the guest inside <c>chroot /host /bin/sh -c ...</c>, i.e. with the host's programs (fio, sg_inq, nvme, dotnet, ...).</summary>
    public Task<GuestResult> ExecHostAsync(string hostCommand, TimeSpan timeout, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(hostCommand);
        return ExecAsync("chroot /host /bin/sh -c " + Tools.ShellQuote(hostCommand), timeout, cancellationToken);
    }

    /// <summary>The last <paramref name="maxLines"/> lines of the serial console, for failure messages.</summary>
    public string ConsoleTail(int maxLines = 40)
    {
        var lines = ConsoleText.Replace("\r", string.Empty, StringComparison.Ordinal).Split('\n');
        return string.Join('\n', lines.Skip(Math.Max(0, lines.Length - maxLines)));
    }

    /// <summary>Kills QEMU immediately with SIGKILL (no guest shutdown), e.g. for crash tests. Idempotent.</summary>
    public void Kill()
    {
        try
        {
            if (!_process.HasExited)
            {
                _process.Kill(entireProcessTree: false);
            }
        }
        catch (InvalidOperationException)
        {
            // Already exited.
        }
    }

    /// <summary>Waits until QEMU exits; returns false if it is still running after <paramref name="timeout"/>.</summary>
    public async Task<bool> WaitForExitAsync(TimeSpan timeout)
    {
        using var cts = new CancellationTokenSource(timeout);
        try
        {
            await _process.WaitForExitAsync(cts.Token).ConfigureAwait(false);
            return true;
        }
        catch (OperationCanceledException)
        {
            return _process.HasExited;
        }
    }

    /// <summary>
    /// Powers the guest off (<c>poweroff -f</c> via the agent, if it is idle), kills QEMU if it has not exited
    /// within a few seconds, and deletes the work directory (unless kept).
    /// </summary>
    public async ValueTask DisposeAsync()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
        {
            return;
        }

        try
        {
            if (!_process.HasExited && _agent is not null && await _execLock.WaitAsync(TimeSpan.FromMilliseconds(200)).ConfigureAwait(false))
            {
                try
                {
                    if (!_desynced)
                    {
                        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(2));
                        await _agent.SendAsync("poweroff -f\n"u8.ToArray(), SocketFlags.None, cts.Token).ConfigureAwait(false);
                        await WaitForExitAsync(TimeSpan.FromSeconds(5)).ConfigureAwait(false);
                    }
                }
                catch (Exception ex) when (ex is SocketException or IOException or OperationCanceledException or ObjectDisposedException)
                {
                    // Fall through to Kill().
                }
                finally
                {
                    _execLock.Release();
                }
            }
        }
        catch (InvalidOperationException)
        {
            // Process never started.
        }

        Kill();
        try
        {
            await WaitForExitAsync(TimeSpan.FromSeconds(10)).ConfigureAwait(false);
        }
        catch (InvalidOperationException)
        {
            // Process never started.
        }

        _agent?.Dispose();
        _process.Dispose();
        var keep = _options.KeepWorkDirectory || Environment.GetEnvironmentVariable("VBGUEST_KEEP") == "1";
        if (keep)
        {
            try
            {
                await File.WriteAllTextAsync(Path.Combine(WorkDirectory, "qemu.log"), QemuOutput).ConfigureAwait(false);
            }
            catch (IOException)
            {
                // Best effort.
            }

            LogLine($"kept guest work directory {WorkDirectory}");
        }
        else
        {
            TryDeleteDirectory(WorkDirectory);
        }
    }

    /// <summary>QEMU output and console tail, for exception messages.</summary>
    public string Diagnostics()
    {
        string state;
        try
        {
            state = _process.HasExited ? $"QEMU exited with code {_process.ExitCode}" : "QEMU is running";
        }
        catch (InvalidOperationException)
        {
            state = "QEMU not started";
        }

        return $"{state}.\n--- QEMU output ---\n{QemuOutput}--- console tail ({ConsoleLogPath}) ---\n{ConsoleTail()}";
    }

    private async Task ConnectAgentAsync(CancellationToken token, TimeSpan bootTimeout, CancellationToken userToken)
    {
        while (true)
        {
            if (_process.HasExited)
            {
                await WaitForExitAsync(TimeSpan.FromSeconds(2)).ConfigureAwait(false);
                throw new QemuGuestException($"QEMU exited before the agent socket was available.\n{Diagnostics()}");
            }

            if (File.Exists(AgentSocketPath))
            {
                var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
                try
                {
                    await socket.ConnectAsync(new UnixDomainSocketEndPoint(AgentSocketPath), token).ConfigureAwait(false);
                    _agent = socket;
                    return;
                }
                catch (SocketException)
                {
                    socket.Dispose();
                }
                catch (OperationCanceledException)
                {
                    socket.Dispose();
                    throw;
                }
            }

            try
            {
                await Task.Delay(50, token).ConfigureAwait(false);
            }
            catch (OperationCanceledException) when (!userToken.IsCancellationRequested)
            {
                throw new TimeoutException($"QEMU did not create the agent socket within {bootTimeout}.\n{Diagnostics()}");
            }
        }
    }

    private async Task<(int ExitCode, string Output)> ReadResponseAsync(Socket socket, CancellationToken token)
    {
        while (true)
        {
            if (TryTakeResponse(out var rc, out var output))
            {
                return (rc, output);
            }

            var n = await socket.ReceiveAsync(_readBuffer.AsMemory(), SocketFlags.None, token).ConfigureAwait(false);
            if (n == 0)
            {
                await WaitForExitAsync(TimeSpan.FromSeconds(2)).ConfigureAwait(false);
                throw new QemuGuestException($"Guest agent connection closed.\n{Diagnostics()}");
            }

            _rx.Write(_readBuffer, 0, n);
        }
    }

    // After a timed-out command the agent may still be running it and will later answer it.
    // Send a sync echo and discard answers until ours comes back.
    private async Task ResyncAsync(Socket socket, CancellationToken token)
    {
        var syncToken = "VBSYNC-" + Guid.NewGuid().ToString("N");
        await socket.SendAsync(Encoding.UTF8.GetBytes("echo " + syncToken + "\n"), SocketFlags.None, token).ConfigureAwait(false);
        while (true)
        {
            var (_, output) = await ReadResponseAsync(socket, token).ConfigureAwait(false);
            if (output.Contains(syncToken, StringComparison.Ordinal))
            {
                _desynced = false;
                return;
            }
        }
    }

    // Response framing: OUTPUT "\n@@VBRC=" DIGITS "@@\n".
    private bool TryTakeResponse(out int exitCode, out string output)
    {
        exitCode = 0;
        output = string.Empty;
        var data = _rx.GetBuffer().AsSpan(0, (int)_rx.Length);
        var start = data.IndexOf(s_markerStart);
        if (start < 0)
        {
            return false;
        }

        var pos = start + s_markerStart.Length;
        var digitsStart = pos;
        while (pos < data.Length && (char.IsAsciiDigit((char)data[pos]) || (pos == digitsStart && data[pos] == (byte)'-')))
        {
            pos++;
        }

        if (pos + 3 > data.Length)
        {
            return false; // Incomplete marker; wait for more bytes.
        }

        if (pos == digitsStart || data[pos] != (byte)'@' || data[pos + 1] != (byte)'@' || data[pos + 2] != (byte)'\n')
        {
            throw new QemuGuestException($"Malformed agent response: {Encoding.UTF8.GetString(data)}");
        }

        exitCode = int.Parse(Encoding.ASCII.GetString(data[digitsStart..pos]), NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture);
        output = Encoding.UTF8.GetString(data[..start]);
        var consumed = pos + 3;
        var rest = data[consumed..].ToArray();
        _rx.SetLength(0);
        _rx.Write(rest);
        return true;
    }

    private void OnQemuOutput(string? line)
    {
        if (line is null)
        {
            return;
        }

        lock (_qemuOutput)
        {
            _qemuOutput.Append(line).Append('\n');
        }

        if (line.StartsWith("+ ", StringComparison.Ordinal) && QemuCommandLine is null)
        {
            QemuCommandLine = line[2..];
        }

        LogLine("qemu: " + line);
    }

    private void LogLine(string message)
    {
        var log = _options.Log;
        if (log is null)
        {
            return;
        }

        var name = _options.Name is null ? "guest" : "guest " + _options.Name;
        try
        {
            log($"[{name}] {message}");
        }
        catch (Exception)
        {
            // The sink (e.g. an xunit ITestOutputHelper of a finished test) may throw; never crash the test host.
        }
    }

    private static string DeviceSpec(VhostUserDevice dev)
    {
        if (dev.SocketPath.Contains(',', StringComparison.Ordinal))
        {
            throw new ArgumentException($"vhost-user socket path must not contain ',': {dev.SocketPath}");
        }

        ArgumentOutOfRangeException.ThrowIfLessThan(dev.NumQueues, 1);
        var spec = $"{dev.SocketPath},queues={dev.NumQueues.ToString(CultureInfo.InvariantCulture)}";
        if (dev.ReconnectSeconds is { } s)
        {
            spec += $",reconnect={s.ToString(CultureInfo.InvariantCulture)}";
        }

        return spec;
    }

    private static string Sanitize(string name) =>
        new(name.Select(c => char.IsAsciiLetterOrDigit(c) || c is '-' or '_' ? c : '_').Take(40).ToArray());

    private static void TryDeleteDirectory(string dir)
    {
        try
        {
            Directory.Delete(dir, recursive: true);
        }
        catch (IOException)
        {
            // Best effort.
        }
        catch (UnauthorizedAccessException)
        {
            // Best effort.
        }
    }
}
