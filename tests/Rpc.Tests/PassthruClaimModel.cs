using VhostBackend.Bdev;

namespace VhostBackend.Rpc.Tests;

/// <summary>
/// A model of a module that claims its base bdevs (SPDK's passthru, reduced to the claim; not a product module):
/// <see cref="Claim"/> opens a bdev read-only and claims it, as a vbdev module does before building on a base.
/// </summary>
internal sealed class PassthruClaimModel : BdevModule
{
    private BdevManager _bdevs = null!;

    public override string Name => "passthru";

    public override void Init(BdevModuleContext context) => _bdevs = context.Bdevs;

    /// <summary>Opens and claims <paramref name="bdevName"/>; dispose the result to release it. Call on the main reactor.</summary>
    public IDisposable Claim(string bdevName)
    {
        var desc = _bdevs.Open(bdevName, write: false);
        int rc = _bdevs.Claim(desc.Bdev, this, desc);
        if (rc != 0)
        {
            desc.Dispose();
            throw new InvalidOperationException($"claim of {bdevName} failed: {rc}");
        }

        return new Release(this, desc);
    }

    private sealed class Release : IDisposable
    {
        private readonly PassthruClaimModel _module;
        private readonly BdevDesc _desc;

        public Release(PassthruClaimModel module, BdevDesc desc)
        {
            _module = module;
            _desc = desc;
        }

        public void Dispose()
        {
            _module._bdevs.ReleaseClaim(_desc.Bdev, _module);
            _desc.Dispose();
        }
    }
}
