using System.Diagnostics.Metrics;

namespace VhostBackend.Bdev.Tests.Core;

/// <summary>A <see cref="MeterListener"/> on one <see cref="Meter"/> instance that keeps the last collection's measurements.</summary>
internal sealed class MetricsCollector : IDisposable
{
    private readonly MeterListener _listener = new();
    private readonly List<(string Name, Dictionary<string, string?> Tags, double Value)> _values = new();

    public MetricsCollector(Meter meter)
    {
        _listener.InstrumentPublished = (i, l) =>
        {
            if (ReferenceEquals(i.Meter, meter))
            {
                l.EnableMeasurementEvents(i);
            }
        };
        _listener.SetMeasurementEventCallback<long>((i, v, tags, _) => Add(i, v, tags));
        _listener.SetMeasurementEventCallback<int>((i, v, tags, _) => Add(i, v, tags));
        _listener.SetMeasurementEventCallback<double>((i, v, tags, _) => Add(i, v, tags));
        _listener.Start();
    }

    /// <summary>Clears the previous values and records every observable instrument now (on the calling thread).</summary>
    public void Collect()
    {
        lock (_values)
        {
            _values.Clear();
        }

        _listener.RecordObservableInstruments();
    }

    /// <summary>Sum of the values of <paramref name="name"/> whose tags include all of <paramref name="tags"/> ("key=value").</summary>
    public double Sum(string name, params string[] tags)
    {
        lock (_values)
        {
            return _values.Where(v => v.Name == name && tags.All(t => v.Tags.TryGetValue(t.Split('=')[0], out var x) && x == t.Split('=', 2)[1])).Sum(v => v.Value);
        }
    }

    public List<(Dictionary<string, string?> Tags, double Value)> All(string name)
    {
        lock (_values)
        {
            return _values.Where(v => v.Name == name).Select(v => (v.Tags, v.Value)).ToList();
        }
    }

    public void Dispose() => _listener.Dispose();

    private void Add(Instrument i, double v, ReadOnlySpan<KeyValuePair<string, object?>> tags)
    {
        var d = new Dictionary<string, string?>();
        foreach (var t in tags)
        {
            d[t.Key] = Convert.ToString(t.Value, System.Globalization.CultureInfo.InvariantCulture);
        }

        lock (_values)
        {
            _values.Add((i.Name, d, v));
        }
    }
}
