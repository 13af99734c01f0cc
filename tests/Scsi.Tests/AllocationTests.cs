using System.Runtime.InteropServices;
using VhostBackend.Bdev;
using VhostBackend.Platform;

namespace VhostBackend.Scsi.Tests;

public sealed class AllocationTests : IAsyncLifetime
{
    private readonly ScsiHarness _h = new();

    public async Task InitializeAsync()
    {
        _h.AddMalloc("Malloc0", 8192, 512);
        await _h.AttachAsync("Malloc0");
    }

    public async Task DisposeAsync() => await _h.DisposeAsync();

    /// <summary>Keeps <c>depth</c> tasks busy with alternating WRITE(10)/READ(16) until <c>target</c> completions.</summary>
    private sealed unsafe class Loop
    {
        public readonly ScsiTask[] Tasks;
        public readonly byte*[] Buffers;
        public readonly byte[][] Cdbs;
        public int Completed;
        public int Target;
        public int Failures;
        public long AllocatedAtStart;
        public long AllocatedAtEnd;
        public TaskCompletionSource Done = new(TaskCreationOptions.RunContinuationsAsynchronously);
        private readonly ScsiLun _lun;

        public Loop(ScsiLun lun, ScsiLunChannel ch, int depth)
        {
            _lun = lun;
            Tasks = new ScsiTask[depth];
            Buffers = new byte*[depth];
            Cdbs = [Cdb.Rw10(true, 0, 8), Cdb.Rw16(false, 0, 8)];
            for (int i = 0; i < depth; i++)
            {
                Buffers[i] = (byte*)NativeMemory.AlignedAlloc(4096, 4096);
                var t = new ScsiTask { Channel = ch, Tag = (ulong)i };
                t.SetCompletion(static (task, s) => ((Loop)s!).OnDone(task), this);
                Tasks[i] = t;
            }
        }

        public void Submit(ScsiTask t)
        {
            int i = (int)t.Tag;
            int n = Completed + i;
            bool write = (n & 1) == 0;
            t.SetCdb(Cdbs[write ? 0 : 1]);
            var iovs = t.PrepareData(write ? ScsiDataDirection.ToDevice : ScsiDataDirection.FromDevice, 2);
            iovs[0] = new IoVec((nint)Buffers[i], 1024);
            iovs[1] = new IoVec((nint)Buffers[i] + 1024, 3072);
            _lun.Execute(t);
        }

        private void OnDone(ScsiTask t)
        {
            if (t.Status != ScsiStatus.Good)
            {
                Failures++;
            }

            if (++Completed >= Target)
            {
                if (Completed == Target + Tasks.Length - 1)
                {
                    AllocatedAtEnd = GC.GetAllocatedBytesForCurrentThread();
                    Done.TrySetResult();
                }

                return;
            }

            Submit(t);
        }

        public void Start(int target)
        {
            Completed = 0;
            Target = target;
            Done = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            AllocatedAtStart = GC.GetAllocatedBytesForCurrentThread();
            foreach (var t in Tasks)
            {
                Submit(t);
            }
        }
    }

    [Fact]
    public async Task ReadWrite_SteadyState_AllocatesNothingOnTheReactor()
    {
        var lun = _h.Device.GetLun(0)!;
        var ch = _h.ChannelOf(0)!;
        var loop = await _h.Reactor.InvokeAsync(() => new Loop(lun, ch, 4));

        await _h.Reactor.InvokeAsync(() => loop.Start(2000)); // warm-up: JIT, pools, iovec arrays
        await loop.Done.Task.WaitAsync(TimeSpan.FromSeconds(30));

        // Two measured windows, the smaller counts: a one-off allocation by the runtime on this thread (seen once in
        // CI: 8080 bytes in one window) lands in one window only, while anything per command shows in both.
        var windows = new long[2];
        for (int w = 0; w < windows.Length; w++)
        {
            await _h.Reactor.InvokeAsync(() => loop.Start(20000));
            await loop.Done.Task.WaitAsync(TimeSpan.FromSeconds(60));
            Assert.Equal(0, loop.Failures);
            windows[w] = loop.AllocatedAtEnd - loop.AllocatedAtStart;
        }

        long bytes = windows.Min();
        // Zero per command: a fixed few bytes from the harness's own task completion (thread-pool work item queued
        // by InvokeAsync's SetResult inside the window) are not per command; one allocation per 100 commands would fail.
        Assert.True(bytes < 200, $"{bytes} bytes allocated on the reactor over 20000 READ/WRITE commands (windows: {string.Join(", ", windows)})");
    }
}
