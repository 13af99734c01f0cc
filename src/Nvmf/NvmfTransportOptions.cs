using System.Text.Json.Nodes;

namespace VhostBackend.Nvmf;

/// <summary>
/// Options of the TCP transport, with SPDK v24.01's names and defaults (lib/nvmf/tcp.c, transport.c). SPDK sizes its
/// shared buffer pool with <c>num_shared_buffers</c> x <c>io_unit_size</c>; here that product, split over the poll
/// groups (at least 4 x <c>max_io_size</c> each), is the budget of the per-request data buffers (grown once, kept; see
/// <see cref="NvmfPollGroup"/>). <c>buf_cache_size</c> and <c>control_msg_num</c> are accepted and reported. Options with a behaviour we do not implement (<c>dif_insert_or_strip</c>, <c>zcopy</c>) are refused
/// when set to true.
/// </summary>
public sealed class NvmfTransportOptions
{
    public const string TrType = "TCP";

    public uint MaxQueueDepth { get; set; } = 128;

    /// <summary>Queue pairs per controller, the admin queue included (SPDK's max_qpairs_per_ctrlr; RPC: max_io_qpairs_per_ctrlr + 1).</summary>
    public uint MaxQpairsPerCtrlr { get; set; } = 128;
    public uint InCapsuleDataSize { get; set; } = 4096;
    public uint MaxIoSize { get; set; } = 131072;
    public uint IoUnitSize { get; set; } = 131072;
    public uint MaxAqDepth { get; set; } = 128;
    public uint NumSharedBuffers { get; set; } = 511;
    public uint BufCacheSize { get; set; } = uint.MaxValue;
    public bool DifInsertOrStrip { get; set; }
    public bool Zcopy { get; set; }
    public uint AbortTimeoutSec { get; set; } = 1;
    public uint AcceptorPollRate { get; set; } = 10000;

    /// <summary>Send the C2HData SUCCESS flag (no CapsuleResp after a successful read) when the host allows it.</summary>
    public bool C2hSuccess { get; set; } = true;
    public uint SockPriority { get; set; }
    public uint ControlMsgNum { get; set; } = 32;

    /// <summary>The admin queue accepts this much in-capsule data whatever <see cref="InCapsuleDataSize"/> is (SPDK and Linux: 8 KiB).</summary>
    public const int AdminInCapsuleDataSize = 8192;

    /// <summary>Checks the values; returns the parameter at fault and why, or null.</summary>
    public (string Param, string Reason)? Validate()
    {
        if (MaxQueueDepth < 2 || MaxQueueDepth > 65535)
        {
            return ("max_queue_depth", "must be 2..65535 (SPDK: a uint16)");
        }

        if (MaxAqDepth < 2 || MaxAqDepth > 4096)
        {
            return ("max_aq_depth", "must be 2..4096");
        }

        if (MaxQpairsPerCtrlr < 2 || MaxQpairsPerCtrlr > 65535)
        {
            return ("max_io_qpairs_per_ctrlr", "must be 1..65534");
        }

        if (InCapsuleDataSize > 131072 || InCapsuleDataSize % 16 != 0)
        {
            return ("in_capsule_data_size", "must be a multiple of 16, at most 131072");
        }

        if (MaxIoSize < 4096 || MaxIoSize > (8u << 20) || (MaxIoSize & (MaxIoSize - 1)) != 0)
        {
            return ("max_io_size", "must be a power of two, 4096..8388608");
        }

        if (IoUnitSize == 0 || IoUnitSize > MaxIoSize)
        {
            return ("io_unit_size", "must be 1..max_io_size");
        }

        if (DifInsertOrStrip)
        {
            return ("dif_insert_or_strip", "not supported (no DIF/DIX)");
        }

        if (Zcopy)
        {
            return ("zcopy", "not supported");
        }

        if (SockPriority > 16)
        {
            return ("sock_priority", "must be 0..16");
        }

        if (AcceptorPollRate == 0 || AcceptorPollRate > 10_000_000)
        {
            return ("acceptor_poll_rate", "must be 1..10000000 microseconds");
        }

        return null;
    }

    /// <summary>nvmf_get_transports / save_config params (SPDK's nvmf_transport_dump_opts + the TCP ones).</summary>
    public JsonObject ToJson() => new()
        {
            ["trtype"] = TrType,
            ["max_queue_depth"] = MaxQueueDepth,
            ["max_io_qpairs_per_ctrlr"] = MaxQpairsPerCtrlr - 1,
            ["in_capsule_data_size"] = InCapsuleDataSize,
            ["max_io_size"] = MaxIoSize,
            ["io_unit_size"] = IoUnitSize,
            ["max_aq_depth"] = MaxAqDepth,
            ["num_shared_buffers"] = NumSharedBuffers,
            ["buf_cache_size"] = BufCacheSize,
            ["dif_insert_or_strip"] = DifInsertOrStrip,
            ["zcopy"] = Zcopy,
            ["c2h_success"] = C2hSuccess,
            ["sock_priority"] = SockPriority,
            ["abort_timeout_sec"] = AbortTimeoutSec,
        };
}
