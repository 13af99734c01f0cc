using VhostBackend.Platform;
using Xunit;

namespace VhostBackend.Reactors.Tests;

public class CpuSetTests
{
    [Theory]
    [InlineData("0x3", new[] { 0, 1 })]
    [InlineData("3", new[] { 0, 1 })]
    [InlineData("0x1", new[] { 0 })]
    [InlineData("[0,1]", new[] { 0, 1 })]
    [InlineData("[0-2,5]", new[] { 0, 1, 2, 5 })]
    [InlineData("0x10", new[] { 4 })]
    public void Parses_Spdk_Notations(string text, int[] cores)
    {
        Assert.Equal(cores, CpuSet.Parse(text).Cores);
    }

    [Theory]
    [InlineData("")]
    [InlineData("0x0")]
    [InlineData("zz")]
    [InlineData("[1-0]")]
    [InlineData("[0,")]
    [InlineData("[a]")]
    public void Rejects_Bad_Masks(string text)
    {
        Assert.False(CpuSet.TryParse(text, out _, out var error));
        Assert.NotEmpty(error);
    }

    [Fact]
    public void Mask_Round_Trips()
    {
        Assert.Equal("0x25", CpuSet.Parse("[0,2,5]").ToMaskString());
    }

    [Fact]
    public void Runtime_Rejects_Cores_That_Are_Not_Online()
    {
        Assert.Throws<ArgumentException>(() => new ReactorRuntime(CpuSet.Of(1000)));
    }
}
