using System.Text.RegularExpressions;
using System.Xml.Linq;
using Xunit;

namespace VhostBackend.Architecture.Tests;

public sealed partial class LayerGraphTests
{
    private static string Fail(IEnumerable<string> errors) => string.Join(Environment.NewLine, errors);

    [Fact]
    public void Every_Source_Project_Has_A_Row_In_The_Documented_Graph_And_No_Row_Is_Stale()
    {
        var projects = LayerGraph.SourceProjects().Keys.ToHashSet(StringComparer.Ordinal);
        var documented = LayerGraph.DocumentedGraph();
        var errors = new List<string>();
        errors.AddRange(projects.Where(p => !documented.ContainsKey(p)).Select(p => $"src project {p} has no row in docs/ARCHITECTURE.md"));
        errors.AddRange(documented.Keys.Where(p => !projects.Contains(p)).Select(p => $"docs/ARCHITECTURE.md lists {p}, which is not a src project"));
        foreach (var (p, allowed) in documented)
        {
            errors.AddRange(allowed.Where(t => !projects.Contains(t)).Select(t => $"row {p} names unknown project {t}"));
        }
        Assert.True(errors.Count == 0, Fail(errors));
    }

    [Fact]
    public void Documented_Graph_Keeps_The_Layer_Rules()
    {
        var errors = LayerRules.Violations(LayerGraph.DocumentedGraph());
        Assert.True(errors.Count == 0, Fail(errors));
    }

    [Fact]
    public void Declared_Project_References_Are_Documented_And_Keep_The_Rules()
    {
        var documented = LayerGraph.DocumentedGraph();
        var declared = new Dictionary<string, SortedSet<string>>(StringComparer.Ordinal);
        var errors = new List<string>();
        foreach (var (p, path) in LayerGraph.SourceProjects())
        {
            declared[p] = LayerGraph.DeclaredReferences(path);
            var allowed = documented.TryGetValue(p, out var a) ? a : [];
            errors.AddRange(declared[p].Where(t => !allowed.Contains(t))
                .Select(t => $"{p}.csproj references {t}, which docs/ARCHITECTURE.md does not allow"));
        }
        errors.AddRange(LayerRules.Violations(declared));
        Assert.True(errors.Count == 0, Fail(errors));
    }

    [Fact]
    public void Compiled_Assembly_References_Are_Documented_And_Keep_The_Rules()
    {
        var documented = LayerGraph.DocumentedGraph();
        var compiled = new Dictionary<string, SortedSet<string>>(StringComparer.Ordinal);
        var errors = new List<string>();
        foreach (var p in LayerGraph.SourceProjects().Keys)
        {
            string dll = LayerGraph.BuiltAssemblyPath(p);
            Assert.True(File.Exists(dll), $"built assembly missing: {dll} (the test project builds every src project first)");
            compiled[p] = LayerGraph.CompiledReferences(dll);
            var allowed = documented.TryGetValue(p, out var a) ? a : [];
            errors.AddRange(compiled[p].Where(t => !allowed.Contains(t))
                .Select(t => $"{p}.dll references {t}, which docs/ARCHITECTURE.md does not allow"));
        }
        errors.AddRange(LayerRules.Violations(compiled));
        Assert.True(errors.Count == 0, Fail(errors));
    }

    [Fact]
    public void Transitive_Project_References_Are_Disabled()
    {
        // Each project must declare what it uses: with transitive references a project could use a layer it
        // never names, and the declared graph above would not be the real one.
        var props = XDocument.Load(Path.Combine(LayerGraph.RepoRoot, "Directory.Build.props"));
        Assert.Contains(props.Descendants("DisableTransitiveProjectReferences"),
            e => string.Equals(e.Value.Trim(), "true", StringComparison.OrdinalIgnoreCase));
        foreach (var (p, path) in LayerGraph.SourceProjects())
        {
            var doc = XDocument.Load(path);
            Assert.DoesNotContain(doc.Descendants("DisableTransitiveProjectReferences"),
                e => !string.Equals(e.Value.Trim(), "true", StringComparison.OrdinalIgnoreCase));
        }
    }

    // The checker itself must be able to fail: each forbidden edge of the issue, added to the real graph, is reported.
    [Theory]
    [InlineData("Reactors", "Bdev")]
    [InlineData("Reactors", "Rpc")]
    [InlineData("Nvme", "Reactors")]
    [InlineData("Nvme", "Bdev")]
    [InlineData("Virtio", "Bdev")]
    [InlineData("VhostUser", "Reactors")]
    [InlineData("VhostUser", "Scsi")]
    [InlineData("Bdev", "BdevMalloc")]
    [InlineData("Bdev", "BdevNvme")]
    [InlineData("Scsi", "Vhost")]
    [InlineData("Rpc", "Bdev")]
    [InlineData("Daemon", "Vhost")]
    [InlineData("BdevMalloc", "BdevNull")]
    public void A_Forbidden_Edge_Is_Reported(string from, string to)
    {
        var graph = LayerGraph.DocumentedGraph().ToDictionary(kv => kv.Key, kv => new SortedSet<string>(kv.Value), StringComparer.Ordinal);
        Assert.Empty(LayerRules.Violations(graph));
        if (!graph.TryGetValue(from, out var edges))
        {
            graph[from] = edges = [];
        }
        edges.Add(to);
        Assert.NotEmpty(LayerRules.Violations(graph));
    }

    [Fact]
    public void Unsafe_Code_Stays_In_The_Documented_Files()
    {
        // docs/DEVELOPING.md lists, between the unsafe markers, every file that may hold unsafe code:
        // | `Project` | `File.cs`, `Other.cs` | why |. Only their projects enable AllowUnsafeBlocks.
        string text = File.ReadAllText(Path.Combine(LayerGraph.RepoRoot, "docs", "DEVELOPING.md"));
        int begin = text.IndexOf("<!-- unsafe:begin -->", StringComparison.Ordinal);
        int end = text.IndexOf("<!-- unsafe:end -->", StringComparison.Ordinal);
        Assert.True(begin >= 0 && end > begin, "docs/DEVELOPING.md has no unsafe table markers");
        var allowedFiles = new Dictionary<string, HashSet<string>>(StringComparer.Ordinal);
        foreach (string line in text[begin..end].Split('\n'))
        {
            string[] cells = line.Split('|');
            if (cells.Length < 4)
            {
                continue;
            }
            var project = Code().Matches(cells[1]);
            if (project.Count != 1)
            {
                continue;
            }
            allowedFiles[project[0].Groups[1].Value] = Code().Matches(cells[2]).Select(m => m.Groups[1].Value).ToHashSet(StringComparer.Ordinal);
        }

        var errors = new List<string>();
        foreach (var (p, csproj) in LayerGraph.SourceProjects())
        {
            bool enabled = LayerGraph.AllowsUnsafe(csproj);
            bool listed = allowedFiles.TryGetValue(p, out var files);
            if (enabled && !listed)
            {
                errors.Add($"{p} enables AllowUnsafeBlocks but docs/DEVELOPING.md lists no unsafe file in it");
            }
            foreach (string cs in Directory.GetFiles(Path.GetDirectoryName(csproj)!, "*.cs", SearchOption.AllDirectories))
            {
                if (cs.Contains($"{Path.DirectorySeparatorChar}obj{Path.DirectorySeparatorChar}", StringComparison.Ordinal))
                {
                    continue;
                }
                if (UnsafeKeyword().IsMatch(StripComments(File.ReadAllText(cs))) && !(listed && files!.Contains(Path.GetFileName(cs))))
                {
                    errors.Add($"{Path.GetRelativePath(LayerGraph.RepoRoot, cs)} holds unsafe code but is not listed in docs/DEVELOPING.md");
                }
            }
        }
        Assert.True(errors.Count == 0, Fail(errors));
    }

    private static string StripComments(string source) => Comments().Replace(source, "");

    [GeneratedRegex("`([A-Za-z0-9_.]+)`")]
    private static partial Regex Code();

    [GeneratedRegex(@"\bunsafe\b")]
    private static partial Regex UnsafeKeyword();

    [GeneratedRegex(@"//[^\n]*|/\*.*?\*/|""(?:[^""\\\n]|\\.)*""", RegexOptions.Singleline)]
    private static partial Regex Comments();
}
