#!/usr/bin/env bash
# Issue 14's benchmark: in one q35 + intel-iommu TCG guest, on the same emulated NVMe controller, interleaved rounds
# of the Linux nvme driver with fio (io_uring, interrupt and --hipri polled), ./bdevperf on our NVMe bdev over
# vfio-pci (poll and interrupt reactor), and ./vhostd serving the namespace over vhost-user-blk to a virtio-user
# ./bdevperf (the vhost hop). 4 KiB randread QD1 and QD32. Prints medians and per-round ratios; the table is also
# written to .build/bench-nvme-vfio.txt. See integration/NvmeVfioBenchmark.cs.
#
# Usage: scripts/perf-nvme-vfio.sh [-r ROUNDS] [-t SECONDS]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
rounds=3
secs=5
while getopts "r:t:h" opt; do
    case "$opt" in
        r) rounds="$OPTARG" ;;
        t) secs="$OPTARG" ;;
        *) sed -n '2,9p' "$0"; exit 0 ;;
    esac
done
cd "$root"
dotnet build integration -c Release -nologo -v quiet -clp:ErrorsOnly
VB_BENCH=1 VB_BENCH_ROUNDS="$rounds" VB_BENCH_SECONDS="$secs" dotnet test integration -c Release --no-build \
    --filter FullyQualifiedName~NvmeVfioBenchmark --logger "console;verbosity=detailed"
