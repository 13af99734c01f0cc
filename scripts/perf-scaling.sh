#!/usr/bin/env bash
# Reactor scaling of ./vhostd, measured through the same front end: one reactor (-m 0x1) against two reactors
# (-m 0x3), each serving a two-queue vhost-user-blk controller (cpumask of the controller = the daemon's mask,
# so with two reactors each queue has its own). The daemon runs in interrupt mode and so does ./bdevperf
# (-m 0x3 -C: one job and one virtqueue per core), so on this 2-core machine whichever side has work gets the
# CPU instead of four spinning threads sharing two cores. 4 KiB random read, QD per job (two jobs), null and
# malloc bdevs; rounds interleaved (1, 2, 1, 2, ...) because IOPS swing with vCPU placement; prints every run,
# then best and median per configuration and the two-reactor / one-reactor ratio.
#
# Usage: scripts/perf-scaling.sh [-t SECONDS] [-W WARMUP] [-r ROUNDS] [-q QD_PER_JOB] [-b "null malloc"] [-o OUTDIR]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
secs=5
warm=1
rounds=3
qd=64
bdevs="null malloc"
out=""
while getopts "t:W:r:q:b:o:h" opt; do
    case "$opt" in
        t) secs="$OPTARG" ;;
        W) warm="$OPTARG" ;;
        r) rounds="$OPTARG" ;;
        q) qd="$OPTARG" ;;
        b) bdevs="$OPTARG" ;;
        o) out="$OPTARG" ;;
        *) sed -n '2,10p' "$0"; exit 0 ;;
    esac
done

perf_name=perf-scaling
source "$root/scripts/lib/perf.sh"
perf_init vb-scaling scaling.jsonl

for round in $(seq 1 "$rounds"); do
    for kind in $bdevs; do
        for mask in 0x1 0x3; do
            case "$kind" in
                null) create='{"method":"bdev_null_create","params":{"name":"D0","num_blocks":2097152,"block_size":512}}' ;;
                malloc) create='{"method":"bdev_malloc_create","params":{"name":"D0","num_blocks":524288,"block_size":512}}' ;;
                *) echo "perf-scaling: unknown bdev kind $kind" >&2; exit 1 ;;
            esac
            sockdir="$work/sockets"
            rm -rf "$sockdir" "$work/rpc"
            mkdir -p "$sockdir"
            cat > "$work/daemon.json" <<EOF
{"subsystems":[{"subsystem":"bdev","config":[$create]},
 {"subsystem":"vhost_blk","config":[{"method":"vhost_create_blk_controller","params":{"ctrlr":"vhost.0","dev_name":"D0","cpumask":"$mask"}}]}]}
EOF
            cat > "$work/bdevperf.json" <<EOF
{"subsystems":[{"subsystem":"bdev","config":[{"method":"bdev_virtio_attach_controller","params":{"name":"VirtioBlk0","trtype":"user","traddr":"$sockdir/vhost.0","dev_type":"blk","vq_count":2,"vq_size":256}}]}]}
EOF
            "$root/vhostd" -m "$mask" --reactor-mode interrupt -S "$sockdir" -r "$work/rpc" -c "$work/daemon.json" -L warning > "$work/daemon.log" 2>&1 &
            daemon_pid=$!
            wait_socket "$sockdir/vhost.0"
            c0="$(cpu_ticks "$daemon_pid")"
            if ! res="$("$root/bdevperf" -m 0x3 -C --reactor-mode interrupt -c "$work/bdevperf.json" -q "$qd" -o 4096 -w randread -t "$secs" -W "$warm" --output json 2> "$work/bdevperf.err")"; then
                echo "perf-scaling: bdevperf failed ($kind, -m $mask):" >&2
                cat "$work/bdevperf.err" >&2
                exit 1
            fi
            c1="$(cpu_ticks "$daemon_pid")"
            stop_daemon
            python3 - "$res" "$kind" "$mask" "$round" "$((c1 - c0))" >> "$results" <<'EOF'
import json, sys
res, kind, mask, rnd, ticks = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
tot = res["total"]
print(json.dumps({"bdev": kind, "reactors": 1 if mask == "0x1" else 2, "round": rnd, "iops": tot["iops"],
                  "mean_us": tot["avg_latency_us"], "p99_us": tot["p99_latency_us"], "daemon_cpu_s": ticks / 100.0}))
EOF
            tail -n 1 "$results"
        done
    done
done

python3 - "$results" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print()
print("| bdev | reactors | best IOPS | median IOPS | median mean latency (us) | daemon CPU s/run (median) |")
print("|---|---|---|---|---|---|")
summary = {}
for kind in dict.fromkeys(r["bdev"] for r in rows):
    for n in (1, 2):
        rs = [r for r in rows if r["bdev"] == kind and r["reactors"] == n]
        iops = [r["iops"] for r in rs]
        summary[(kind, n)] = (max(iops), statistics.median(iops))
        print(f"| {kind} | {n} | {max(iops):,.0f} | {statistics.median(iops):,.0f} | "
              f"{statistics.median(r['mean_us'] for r in rs):.1f} | {statistics.median(r['daemon_cpu_s'] for r in rs):.2f} |")
print()
for kind in dict.fromkeys(r["bdev"] for r in rows):
    b1, m1 = summary[(kind, 1)]
    b2, m2 = summary[(kind, 2)]
    per_round = [next(r["iops"] for r in rows if r["bdev"] == kind and r["reactors"] == 2 and r["round"] == k) /
                 next(r["iops"] for r in rows if r["bdev"] == kind and r["reactors"] == 1 and r["round"] == k)
                 for k in sorted({r["round"] for r in rows})]
    print(f"{kind}: two reactors / one: best {b2 / b1:.2f}x, median {m2 / m1:.2f}x, per round " +
          ", ".join(f"{x:.2f}x" for x in per_round))
EOF
echo "results: $results"
