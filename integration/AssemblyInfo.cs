// Each integration test boots a QEMU/TCG guest, which is CPU-heavy on the 2-core CI machine:
// run test classes one after another rather than in parallel.
[assembly: Xunit.CollectionBehavior(DisableTestParallelization = true)]
