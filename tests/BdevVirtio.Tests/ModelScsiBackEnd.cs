using System.Buffers.Binary;
using System.Text.Json.Nodes;
using Microsoft.Extensions.Logging;
using VhostBackend.Platform;
using VhostBackend.Reactors;
using VhostBackend.Vhost;
using VhostBackend.VhostUser;
using VhostBackend.Virtio;
using VhostBackend.Virtio.Scsi;

namespace VhostBackend.BdevVirtio.Tests;

/// <summary>
/// A MODEL vhost-user-scsi back end (test only) that answers badly on purpose, to check the front end validates
/// what it receives. One request queue. Targets: 0 is a good 512-byte disk of <see cref="Blocks"/> blocks except
/// for the I/O below; 1 reports a 520-byte block size; 2 answers every command with CHECK CONDITION / UNIT
/// ATTENTION (present but never ready); 3 reports a READ CAPACITY (16) of 2^64 blocks; the rest are BAD_TARGET.
/// Reads and writes of target 0: LBA 1 ends in CHECK CONDITION / MEDIUM ERROR, LBA 2 reports a residual, LBA 3 is
/// completed without a response (used length 0), LBA 4 answers an out-of-range sense length; others succeed
/// (reads return 0xAB).
/// </summary>
internal sealed class ModelScsiBackEnd : VhostController
{
    public const ulong Blocks = 1024;

    public ModelScsiBackEnd(string socketPath, ReactorRuntime runtime, ILogger logger)
        : base("model-scsi", socketPath, CpuSet.Of([runtime.Reactors[0].Core]), runtime, logger)
    {
    }

    /// <summary>Commands seen per target (any opcode).</summary>
    public int[] Commands { get; } = new int[256];

    public override ulong Features =>
        VirtioFeatures.Bit(VirtioFeatures.Version1) | VirtioFeatures.Bit(VhostUserConstants.ProtocolFeaturesBit)
        | VirtioFeatures.Bit(VirtioScsiFeature.Hotplug) | VirtioFeatures.Bit(VirtioScsiFeature.InOut);

    public override ulong ProtocolFeatures => (1UL << VhostUserProtocolFeature.Mq) | (1UL << VhostUserProtocolFeature.ReplyAck);

    public override int MaxQueues => 3;

    public override string TypeName => "model_scsi";

    public override int ReadConfig(uint offset, Span<byte> dest) => -Errno.ENOTSUP;

    public override Task<IVhostQueueRunner> StartQueueAsync(VhostUserSession session, VhostUserReadyQueue ready) =>
        StartQueueAsync(new ModelQueue(this, session, ready.Index, ready.Queue, ready.Call, ready.Kick, NextReactor()), ready);

    public override JsonObject BackendSpecific() => new();

    public override IEnumerable<JsonObject> ConfigCalls() => [];

    private sealed class ModelQueue : VhostQueue
    {
        private readonly ModelScsiBackEnd _model;
        private readonly DescSegment[] _segs = new DescSegment[64];
        private readonly byte[] _data = new byte[256 * 1024];

        public ModelQueue(ModelScsiBackEnd model, VhostUserSession session, int index, DeviceVirtqueue vq, EventFd? call, EventFd? kick, Reactor reactor)
            : base(model, session, index, vq, call, kick, reactor, "model_scsi")
        {
            _model = model;
        }

        // Control and event queues keep their buffers (no events, no TMFs).
        protected override bool CanTakeRequest => Index >= VirtioScsi.FirstRequestQueue;

        protected override void Process(ushort head)
        {
            var err = Vq.WalkChain(head, _segs, out var info);
            if (err != ChainError.None || !DescChain.TryRead(_segs, 0, info.FirstWritable, 0, out VirtioScsiCmdReq req))
            {
                Complete(head, 0, wasInFlight: false);
                return;
            }

            var segs = _segs.AsSpan(0, info.SegmentCount);
            ReadOnlySpan<byte> lun = req.Lun;
            ReadOnlySpan<byte> cdb = req.Cdb;
            int target = lun[1];
            _model.Commands[target]++;
            var resp = default(VirtioScsiCmdResp);
            int dataIn = 0;
            var data = _data.AsSpan();
            data[..256].Clear();
            bool noResponse = false;
            if (target > 3)
            {
                resp.Response = VirtioScsi.SBadTarget;
            }
            else if (target == 2)
            {
                CheckCondition(ref resp, 0x6, 0x29); // UNIT ATTENTION, POWER ON OCCURRED, forever
            }
            else
            {
                switch (cdb[0])
                {
                    case 0x12 when (cdb[1] & 1) == 0: // standard INQUIRY: direct access block device
                        data[4] = 31;
                        dataIn = 36;
                        break;
                    case 0x12: // VPD: supported pages = 0x00 only
                        data[1] = cdb[2];
                        data[3] = 1;
                        dataIn = 5;
                        break;
                    case 0x00:
                        break;
                    case 0x25: // READ CAPACITY (10)
                        BinaryPrimitives.WriteUInt32BigEndian(data, target == 3 ? uint.MaxValue : (uint)(Blocks - 1));
                        BinaryPrimitives.WriteUInt32BigEndian(data[4..], target == 1 ? 520u : 512u);
                        dataIn = 8;
                        break;
                    case 0x9E: // READ CAPACITY (16): 2^64 blocks
                        BinaryPrimitives.WriteUInt64BigEndian(data, ulong.MaxValue);
                        BinaryPrimitives.WriteUInt32BigEndian(data[8..], 512);
                        dataIn = 32;
                        break;
                    case 0x28:
                    case 0x2A:
                    {
                        uint lba = BinaryPrimitives.ReadUInt32BigEndian(cdb[2..]);
                        int len = BinaryPrimitives.ReadUInt16BigEndian(cdb[7..]) * 512;
                        if (cdb[0] == 0x28)
                        {
                            data[..len].Fill(0xAB);
                            dataIn = len;
                        }

                        switch (lba)
                        {
                            case 1:
                                CheckCondition(ref resp, 0x3, 0x11); // MEDIUM ERROR, UNRECOVERED READ ERROR
                                dataIn = 0;
                                break;
                            case 2:
                                resp.Resid = 512;
                                break;
                            case 3:
                                noResponse = true;
                                break;
                            case 4:
                                CheckCondition(ref resp, 0x4, 0x44);
                                resp.SenseLen = 0xFFFF_FFFF; // longer than the 96-byte sense buffer
                                dataIn = 0;
                                break;
                        }

                        break;
                    }

                    default:
                        CheckCondition(ref resp, 0x5, 0x20); // ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE
                        break;
                }
            }

            if (noResponse)
            {
                Complete(head, 0, wasInFlight: false);
                return;
            }

            int written = DescChain.Write(segs, info.FirstWritable, segs.Length, 0, in resp);
            if (dataIn > 0)
            {
                CopyToChain(segs, info.FirstWritable, segs.Length, VirtioScsi.CmdRespSize, data[..dataIn]);
            }

            Complete(head, (uint)(written + dataIn), wasInFlight: false);
        }

        private static void CheckCondition(ref VirtioScsiCmdResp resp, byte key, byte asc)
        {
            resp.Status = 0x02;
            resp.SenseLen = 18;
            Span<byte> sense = resp.Sense;
            sense[0] = 0x70;
            sense[2] = key;
            sense[7] = 10;
            sense[12] = asc;
        }
    }
}
