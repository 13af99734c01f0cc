#!/usr/bin/env bash
# Packed vs split virtqueues through the virtio-user front end: one ./vhostd (poll mode, core 0) exporting a null
# bdev on a vhost-blk controller with packed_ring, and ./bdevperf (core 1) attached with packed_ring true, then
# false, alternately (split, packed, split, packed, ...: vCPU placement swings on a shared machine hit both).
# Workloads: 4 KiB randread QD128 and QD1. Prints per workload and ring the median and best IOPS and the median
# mean latency, and packed/split.
#
# Usage: scripts/perf-packed.sh [-r ROUNDS] [-t SECONDS] [-W WARMUP] [-w "randread:128 randread:1"] [-s VQ_SIZE]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
rounds=3
secs=5
warm=1
workloads="randread:128 randread:1"
vq_size=256
while getopts "r:t:W:w:s:h" opt; do
    case "$opt" in
        r) rounds="$OPTARG" ;;
        t) secs="$OPTARG" ;;
        W) warm="$OPTARG" ;;
        w) workloads="$OPTARG" ;;
        s) vq_size="$OPTARG" ;;
        *) sed -n '2,8p' "$0"; exit 0 ;;
    esac
done

perf_name=perf-packed
source "$root/scripts/lib/perf.sh"
perf_init vb-packed results.jsonl

mkdir -p "$work/sockets"
cat > "$work/vhostd.json" <<JSON
{"subsystems":[
 {"subsystem":"bdev","config":[{"method":"bdev_null_create","params":{"name":"Null0","num_blocks":2097152,"block_size":512}}]},
 {"subsystem":"vhost_blk","config":[{"method":"vhost_create_blk_controller","params":{"ctrlr":"vhost.0","dev_name":"Null0","cpumask":"0x1","packed_ring":true}}]}
]}
JSON
"$root/vhostd" -m 0x1 --reactor-mode poll -S "$work/sockets" -r "$work/rpc.sock" -c "$work/vhostd.json" -L warning > "$work/vhostd.log" 2>&1 &
daemon_pid=$!
wait_socket "$work/sockets/vhost.0"

echo "perf-packed: $rounds round(s) x [$workloads], ${secs} s + ${warm} s warm-up, vq_size $vq_size; results in $results"
for r in $(seq 1 "$rounds"); do
    for wlq in $workloads; do
        wl="${wlq%%:*}"; qd="${wlq##*:}"
        for ring in split packed; do
            packed=false; [ "$ring" = packed ] && packed=true
            cfg="$work/bdevperf-$ring.json"
            cat > "$cfg" <<JSON
{"subsystems":[{"subsystem":"bdev","config":[{"method":"bdev_virtio_attach_controller","params":{"name":"VirtioBlk0","trtype":"user","traddr":"$work/sockets/vhost.0","dev_type":"blk","vq_count":1,"vq_size":$vq_size,"packed_ring":$packed}}]}]}
JSON
            if ! res="$(taskset -c 1 "$root/bdevperf" -m 0x2 -c "$cfg" -q "$qd" -o 4096 -w "$wl" -t "$secs" -W "$warm" --output json 2> "$work/bdevperf.err")"; then
                echo "perf-packed: bdevperf failed ($ring, $wl QD$qd):" >&2
                cat "$work/bdevperf.err" >&2
                exit 1
            fi
            python3 - "$ring" "$r" "$wl" "$qd" "$res" >> "$results" <<'PY'
import json, sys
ring, rnd, wl, qd, res = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
t = res["total"]
print(json.dumps({"ring": ring, "round": rnd, "workload": f"{wl}_qd{qd}", "iops": t["iops"], "mean_us": t["avg_latency_us"], "errors": t["errors"]}))
PY
            tail -n 1 "$results" | python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); print("  round %d %-15s %-6s %11.0f IOPS  mean %8.2f us  errors %d" % (r["round"], r["workload"], r["ring"], r["iops"], r["mean_us"], r["errors"]))'
        done
    done
done

python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print()
print(f"{'workload':<15} {'ring':<7} {'median IOPS':>12} {'best IOPS':>11} {'mean us (med)':>13} {'packed/split (med)':>18}")
for wl in sorted({r["workload"] for r in rows}):
    med = {}
    for ring in ("split", "packed"):
        rs = [r for r in rows if r["workload"] == wl and r["ring"] == ring]
        iops = [r["iops"] for r in rs]
        med[ring] = statistics.median(iops)
        ratio = f"{med['packed'] / med['split']:.2f}" if ring == "packed" else ""
        print(f"{wl:<15} {ring:<7} {med[ring]:>12,.0f} {max(iops):>11,.0f} {statistics.median(r['mean_us'] for r in rs):>13.2f} {ratio:>18}")
PY
