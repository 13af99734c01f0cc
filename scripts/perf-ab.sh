#!/usr/bin/env bash
# Before/after comparison of two checkouts (e.g. a refactoring): runs scripts/perf-compare.sh of checkout A and of
# checkout B alternately (A, B, A, B, ...: one round each, so vCPU placement swings hit both), each with its own
# ./vhostd and ./bdevperf, and prints per workload and back end the median and best IOPS and mean latency of A and
# B, B/A, and each checkout's ratio to qemu-storage-daemon measured in the same rounds.
#
# Usage: scripts/perf-ab.sh [-r ROUNDS] [-t SECONDS] [-b BACKENDS] [-w WORKLOADS] A_ROOT B_ROOT
set -euo pipefail
rounds=4
secs=5
backends="ours-malloc qsd"
workloads="randread:128 randwrite:128 randread:1"
while getopts "r:t:b:w:h" opt; do
    case "$opt" in
        r) rounds="$OPTARG" ;;
        t) secs="$OPTARG" ;;
        b) backends="$OPTARG" ;;
        w) workloads="$OPTARG" ;;
        *) sed -n '2,8p' "$0"; exit 0 ;;
    esac
done
shift $((OPTIND - 1))
[ $# -eq 2 ] || { sed -n '2,8p' "$0"; exit 2; }
a="$(cd "$1" && pwd)"; b="$(cd "$2" && pwd)"
out="$(mktemp -d /tmp/perf-ab.XXXXXX)"
echo "perf-ab: A=$a B=$b, $rounds alternating rounds; results in $out"
for r in $(seq 1 "$rounds"); do
    for side in A B; do
        root="$a"; [ "$side" = B ] && root="$b"
        echo "== round $r: $side"
        "$root/scripts/perf-compare.sh" -r 1 -t "$secs" -W 1 -b "$backends" -w "$workloads" -o "$out/$side-$r" | grep -E '^  ' || true
    done
done
python3 - "$out" "$rounds" <<'PY'
import json, statistics, sys, os
out, rounds = sys.argv[1], int(sys.argv[2])
rows = []
for side in "AB":
    for r in range(1, rounds + 1):
        p = f"{out}/{side}-{r}/results.jsonl"
        if os.path.exists(p):
            for l in open(p):
                if l.strip():
                    x = json.loads(l); x["side"] = side; rows.append(x)
keys = sorted({(x["workload"], x["backend"]) for x in rows})
def stat(side, wl, be, f):
    v = [x[f] for x in rows if x["side"] == side and x["workload"] == wl and x["backend"] == be]
    return (statistics.median(v), max(v) if f == "iops" else min(v)) if v else (float("nan"), float("nan"))
print()
print(f"{'workload':<15} {'backend':<12} {'A med IOPS':>11} {'B med IOPS':>11} {'B/A med':>8} {'B/A best':>8} {'A mean us':>9} {'B mean us':>9} {'A x qsd':>8} {'B x qsd':>8}")
for wl, be in keys:
    am, ab = stat("A", wl, be, "iops"); bm, bb = stat("B", wl, be, "iops")
    al, _ = stat("A", wl, be, "mean_us"); bl, _ = stat("B", wl, be, "mean_us")
    qa, _ = stat("A", wl, "qsd", "iops"); qb, _ = stat("B", wl, "qsd", "iops")
    print(f"{wl:<15} {be:<12} {am:>11,.0f} {bm:>11,.0f} {bm/am:>8.2f} {bb/ab:>8.2f} {al:>9.2f} {bl:>9.2f} {am/qa:>8.2f} {bm/qb:>8.2f}")
PY
