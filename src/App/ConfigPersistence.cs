using System.Text;
using System.Text.Json;
using Microsoft.Extensions.Logging;
using VhostBackend.Platform;
using VhostBackend.Rpc;

namespace VhostBackend.App;

/// <summary>
/// Keeps the running configuration in a file (SPDK's save_config format) so a restarted daemon comes back with
/// the bdevs and controllers it had: written once the start-up config is applied, then after every RPC method
/// that succeeded and changed the configuration, and the daemon starts from it when it exists
/// (<see cref="ApplicationOptions.PersistConfigFile"/>).
/// <para>
/// Each write is atomic and durable: the new text goes to <c>FILE.tmp</c>, which is fsynced and renamed over
/// FILE, then the directory is fsynced; a crash at any point leaves either the old or the new config, never a
/// torn one. Writes are serialized and each takes a fresh snapshot, so the last write reflects the last change.
/// Getter methods (<c>*_get_*</c>) do not trigger a snapshot; a snapshot equal to the file's text is not
/// rewritten. Only RPC changes are persisted: a bdev that vanishes by hot-remove stays in the file, so it is
/// configured again (and its vbdevs rebuilt on examine) when the daemon restarts with the device back.
/// </para>
/// </summary>
public sealed class ConfigPersistence : IDisposable
{
    private static readonly JsonSerializerOptions Indented = new() { WriteIndented = true };
    private readonly string _path;
    private readonly RpcDispatcher _dispatcher;
    private readonly SubsystemRegistry _subsystems;
    private readonly ILogger _logger;
    private readonly SemaphoreSlim _writeLock = new(1, 1);
    private readonly Action<string> _onSucceeded;
    private string? _lastText;
    private int _armed;
    private int _disposed;
    private long _writes;

    public ConfigPersistence(string path, RpcDispatcher dispatcher, SubsystemRegistry subsystems, ILogger logger)
    {
        _path = Path.GetFullPath(path);
        _dispatcher = dispatcher;
        _subsystems = subsystems;
        _logger = logger;
        _onSucceeded = OnSucceeded;
        _dispatcher.Succeeded += _onSucceeded;
        if (File.Exists(_path))
        {
            _lastText = File.ReadAllText(_path);
        }
    }

    /// <summary>The file, as an absolute path.</summary>
    public string FilePath => _path;

    /// <summary>How many times the file was written (tests).</summary>
    public long Writes => Interlocked.Read(ref _writes);

    /// <summary>Starts persisting (after the start-up config is applied) and writes the current state once.</summary>
    public Task ArmAsync()
    {
        Volatile.Write(ref _armed, 1);
        return SaveAsync();
    }

    /// <summary>Writes the running config if it differs from the file. Never throws: failures are logged.</summary>
    public async Task SaveAsync()
    {
        if (Volatile.Read(ref _disposed) != 0)
        {
            return;
        }

        await _writeLock.WaitAsync().ConfigureAwait(false);
        try
        {
            var config = await JsonConfig.SaveAsync(_dispatcher, _subsystems).ConfigureAwait(false);
            string text = config.ToJsonString(Indented) + "\n";
            if (text == _lastText)
            {
                return;
            }

            WriteAtomically(text);
            _lastText = text;
            Interlocked.Increment(ref _writes);
            _logger.LogDebug("running config saved to {Path}", _path);
        }
        catch (Exception e)
        {
            _logger.LogError(e, "could not save the running config to {Path}", _path);
        }
        finally
        {
            _writeLock.Release();
        }
    }

    /// <summary>Waits for a write in progress.</summary>
    public async Task FlushAsync()
    {
        await _writeLock.WaitAsync().ConfigureAwait(false);
        _writeLock.Release();
    }

    private void WriteAtomically(string text)
    {
        string tmp = _path + ".tmp";
        using (var f = new FileStream(tmp, FileMode.Create, FileAccess.Write, FileShare.None))
        {
            f.Write(Encoding.UTF8.GetBytes(text));
            f.Flush(flushToDisk: true);
        }

        File.Move(tmp, _path, overwrite: true);
        string dir = Path.GetDirectoryName(_path) ?? "/";
        int rc = FileOps.SyncDirectory(dir);
        if (rc < 0)
        {
            _logger.LogWarning("fsync of {Dir} after saving the config failed: {Error}", dir, Errno.Message(-rc));
        }
    }

    private void OnSucceeded(string method)
    {
        if (Volatile.Read(ref _armed) == 0 || method.Contains("_get_", StringComparison.Ordinal) || method.StartsWith("rpc_get", StringComparison.Ordinal) ||
            method.StartsWith("spdk_get", StringComparison.Ordinal) || method == "framework_wait_init")
        {
            return;
        }

        _ = SaveAsync();
    }

    public void Dispose()
    {
        if (Interlocked.Exchange(ref _disposed, 1) == 0)
        {
            _dispatcher.Succeeded -= _onSucceeded;
        }
    }
}
