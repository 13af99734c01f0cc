using System.Reflection.Metadata;
using System.Reflection.PortableExecutable;
using System.Text.RegularExpressions;
using System.Xml.Linq;

namespace VhostBackend.Architecture.Tests;

/// <summary>
/// The project graph, read three ways: the table in docs/ARCHITECTURE.md (what each project may reference), the
/// ProjectReference items of every src/*/*.csproj (what it declares) and the assembly references of every built
/// assembly (what it really uses: the compiler drops a reference nothing uses). Names are short: "Bdev" for
/// VhostBackend.Bdev.
/// </summary>
public static partial class LayerGraph
{
    public const string Prefix = "VhostBackend.";

    public static string RepoRoot { get; } = FindRepoRoot();

    private static string FindRepoRoot()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir != null; dir = dir.Parent)
        {
            if (File.Exists(Path.Combine(dir.FullName, "VhostBackend.sln")))
            {
                return dir.FullName;
            }
        }
        throw new InvalidOperationException($"VhostBackend.sln not found above {AppContext.BaseDirectory}");
    }

    /// <summary>Every shipped project: src/&lt;Folder&gt;/VhostBackend.&lt;Name&gt;.csproj, by short name.</summary>
    public static IReadOnlyDictionary<string, string> SourceProjects()
    {
        var result = new SortedDictionary<string, string>(StringComparer.Ordinal);
        foreach (var path in Directory.GetFiles(Path.Combine(RepoRoot, "src"), "*.csproj", SearchOption.AllDirectories))
        {
            result.Add(ShortName(Path.GetFileNameWithoutExtension(path)), path);
        }
        return result;
    }

    public static string ShortName(string assemblyName) =>
        assemblyName.StartsWith(Prefix, StringComparison.Ordinal) ? assemblyName[Prefix.Length..] : assemblyName;

    /// <summary>The short names a project file declares as ProjectReference.</summary>
    public static SortedSet<string> DeclaredReferences(string csprojPath)
    {
        var doc = XDocument.Load(csprojPath);
        var set = new SortedSet<string>(StringComparer.Ordinal);
        foreach (var item in doc.Descendants("ProjectReference"))
        {
            string include = (string?)item.Attribute("Include") ?? "";
            set.Add(ShortName(Path.GetFileNameWithoutExtension(include.Replace('\\', '/'))));
        }
        return set;
    }

    /// <summary>A project's AllowUnsafeBlocks as its own file sets it (the repository default is false).</summary>
    public static bool AllowsUnsafe(string csprojPath)
    {
        var doc = XDocument.Load(csprojPath);
        return doc.Descendants("AllowUnsafeBlocks").Any(e => string.Equals(e.Value.Trim(), "true", StringComparison.OrdinalIgnoreCase));
    }

    /// <summary>Where the build put the shipped assemblies: .build/bin/&lt;Project&gt;/&lt;Config&gt;/&lt;TFM&gt;/.</summary>
    public static string BuiltAssemblyPath(string shortName)
    {
        // This test runs from .build/bin/VhostBackend.Architecture.Tests/<Config>/<TFM>/.
        var tfmDir = new DirectoryInfo(AppContext.BaseDirectory.TrimEnd(Path.DirectorySeparatorChar));
        var configDir = tfmDir.Parent!;
        var binDir = configDir.Parent!.Parent!;
        string name = Prefix + shortName;
        return Path.Combine(binDir.FullName, name, configDir.Name, tfmDir.Name, name + ".dll");
    }

    /// <summary>The project assemblies a built assembly references (short names), read from its metadata, never loaded.</summary>
    public static SortedSet<string> CompiledReferences(string assemblyPath)
    {
        using var stream = File.OpenRead(assemblyPath);
        using var pe = new PEReader(stream);
        var md = pe.GetMetadataReader();
        var set = new SortedSet<string>(StringComparer.Ordinal);
        foreach (var handle in md.AssemblyReferences)
        {
            string name = md.GetString(md.GetAssemblyReference(handle).Name);
            if (name.StartsWith(Prefix, StringComparison.Ordinal))
            {
                set.Add(ShortName(name));
            }
        }
        return set;
    }

    /// <summary>
    /// The "may reference" table of docs/ARCHITECTURE.md: rows between the markers
    /// <c>&lt;!-- layer-graph:begin --&gt;</c> and <c>&lt;!-- layer-graph:end --&gt;</c>, each
    /// <c>| `Project` | `A`, `B` | ... |</c> ("—" for none).
    /// </summary>
    public static IReadOnlyDictionary<string, SortedSet<string>> DocumentedGraph()
    {
        string text = File.ReadAllText(Path.Combine(RepoRoot, "docs", "ARCHITECTURE.md"));
        int begin = text.IndexOf("<!-- layer-graph:begin -->", StringComparison.Ordinal);
        int end = text.IndexOf("<!-- layer-graph:end -->", StringComparison.Ordinal);
        if (begin < 0 || end < begin)
        {
            throw new InvalidOperationException("docs/ARCHITECTURE.md has no layer-graph table markers");
        }
        var graph = new SortedDictionary<string, SortedSet<string>>(StringComparer.Ordinal);
        foreach (string line in text[begin..end].Split('\n'))
        {
            string[] cells = line.Split('|');
            if (cells.Length < 4)
            {
                continue;
            }
            var project = Names().Matches(cells[1]);
            if (project.Count != 1)
            {
                continue; // header or separator row
            }
            var allowed = new SortedSet<string>(StringComparer.Ordinal);
            foreach (Match m in Names().Matches(cells[2]))
            {
                allowed.Add(m.Groups[1].Value);
            }
            graph.Add(project[0].Groups[1].Value, allowed);
        }
        return graph;
    }

    [GeneratedRegex("`([A-Za-z]+)`")]
    private static partial Regex Names();

    /// <summary>Every project reachable from <paramref name="start"/> (excluding itself).</summary>
    public static SortedSet<string> Reach(IReadOnlyDictionary<string, SortedSet<string>> graph, string start)
    {
        var seen = new SortedSet<string>(StringComparer.Ordinal);
        var stack = new Stack<string>();
        stack.Push(start);
        while (stack.Count > 0)
        {
            string p = stack.Pop();
            if (!graph.TryGetValue(p, out var next))
            {
                continue;
            }
            foreach (string n in next)
            {
                if (seen.Add(n))
                {
                    stack.Push(n);
                }
            }
        }
        return seen;
    }
}
