using System.Text.Json.Nodes;

namespace VhostBackend.Rpc;

/// <summary>
/// A configuration subsystem in SPDK's sense (<c>bdev</c>, <c>vhost_blk</c>, <c>vhost_scsi</c>, <c>nvmf</c>): its
/// running state can be written as a list of replayable method calls, <c>{"method": ..., "params": ...}</c>.
/// </summary>
public sealed class Subsystem
{
    public Subsystem(string name, Func<JsonArray> writeConfig, params string[] dependsOn)
    {
        Name = name;
        WriteConfig = writeConfig;
        DependsOn = dependsOn;
    }

    public string Name { get; }

    /// <summary>Called on the main reactor; returns the method calls that recreate the current state.</summary>
    public Func<JsonArray> WriteConfig { get; }

    public IReadOnlyList<string> DependsOn { get; }

    public static JsonObject Call(string method, JsonNode? parameters)
    {
        var o = new JsonObject { ["method"] = method };
        if (parameters is not null)
        {
            o["params"] = parameters;
        }

        return o;
    }
}

/// <summary>The subsystems in init order (dependencies first).</summary>
public sealed class SubsystemRegistry
{
    private readonly List<Subsystem> _subsystems = new();

    public void Add(Subsystem subsystem)
    {
        lock (_subsystems)
        {
            if (_subsystems.Any(s => s.Name == subsystem.Name))
            {
                throw new InvalidOperationException($"subsystem '{subsystem.Name}' registered twice");
            }

            _subsystems.Add(subsystem);
        }
    }

    /// <summary>
    /// Every subsystem in init order: each after the subsystems it depends on (unregistered dependencies are
    /// ignored), otherwise in registration order.
    /// </summary>
    public IReadOnlyList<Subsystem> All
    {
        get
        {
            Subsystem[] registered;
            lock (_subsystems)
            {
                registered = _subsystems.ToArray();
            }

            var ordered = new List<Subsystem>(registered.Length);
            var state = new Dictionary<string, int>(StringComparer.Ordinal); // 1 = visiting, 2 = done
            void Visit(Subsystem s)
            {
                if (state.TryGetValue(s.Name, out int st))
                {
                    if (st == 1)
                    {
                        throw new InvalidOperationException($"subsystem dependency cycle at '{s.Name}'");
                    }

                    return;
                }

                state[s.Name] = 1;
                foreach (var d in s.DependsOn)
                {
                    if (Array.Find(registered, r => r.Name == d) is { } dep)
                    {
                        Visit(dep);
                    }
                }

                state[s.Name] = 2;
                ordered.Add(s);
            }

            foreach (var s in registered)
            {
                Visit(s);
            }

            return ordered;
        }
    }

    public Subsystem? Find(string name) => All.FirstOrDefault(s => s.Name == name);
}
