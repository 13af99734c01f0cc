using Xunit;

namespace VhostBackend.Reactors.Tests;

public class MessageQueueTests
{
    [Fact]
    public void ManyProducers_AllMessagesArrive_InPerProducerOrder()
    {
        var q = new MessageQueue(1024);
        const int producers = 4, perProducer = 50_000;
        var last = new int[producers];
        Array.Fill(last, -1);
        int received = 0;
        Action<object?> fn = static _ => { };
        var threads = Enumerable.Range(0, producers).Select(p => new Thread(() =>
        {
            for (int i = 0; i < perProducer; i++)
            {
                var msg = (p, i);
                while (!q.TryEnqueue(fn, msg))
                {
                    Thread.SpinWait(10);
                }
            }
        })).ToList();
        threads.ForEach(t => t.Start());
        while (received < producers * perProducer)
        {
            if (q.TryDequeue(out var f, out var arg))
            {
                Assert.Same(fn, f);
                var (p, i) = ((int, int))arg!;
                Assert.Equal(last[p] + 1, i);
                last[p] = i;
                received++;
            }
        }

        threads.ForEach(t => t.Join());
        Assert.True(q.IsEmpty);
        Assert.All(last, l => Assert.Equal(perProducer - 1, l));
    }

    [Fact]
    public void Full_Queue_Refuses_Then_Accepts_After_Dequeue()
    {
        var q = new MessageQueue(4);
        for (int i = 0; i < 4; i++)
        {
            Assert.True(q.TryEnqueue(static _ => { }, i));
        }

        Assert.False(q.TryEnqueue(static _ => { }, 99));
        Assert.True(q.TryDequeue(out _, out var first));
        Assert.Equal(0, first);
        Assert.True(q.TryEnqueue(static _ => { }, 4));
    }

    [Theory]
    [InlineData(0)]
    [InlineData(3)]
    [InlineData(100)]
    public void Capacity_Must_Be_Power_Of_Two(int capacity) =>
        Assert.Throws<ArgumentOutOfRangeException>(() => new MessageQueue(capacity));
}
