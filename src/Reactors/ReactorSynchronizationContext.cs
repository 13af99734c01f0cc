namespace VhostBackend.Reactors;

/// <summary>Keeps async control-plane code on its reactor: continuations are posted as reactor messages.</summary>
internal sealed class ReactorSynchronizationContext : SynchronizationContext
{
    private readonly Reactor _reactor;

    public ReactorSynchronizationContext(Reactor reactor) => _reactor = reactor;

    public override void Post(SendOrPostCallback d, object? state) =>
        _reactor.Send(static s =>
        {
            var (cb, st) = ((SendOrPostCallback, object?))s!;
            cb(st);
        }, (d, state));

    public override void Send(SendOrPostCallback d, object? state)
    {
        if (_reactor.IsCurrent)
        {
            d(state);
            return;
        }

        _reactor.InvokeAsync(() => d(state)).GetAwaiter().GetResult();
    }

    public override SynchronizationContext CreateCopy() => this;
}
