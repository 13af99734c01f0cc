#!/usr/bin/env bash
# Cost of logical volumes, measured with ./bdevperf straight on the bdev layer (no vhost), all on a null base
# (2^27 blocks of 512 B = 64 GiB, so thin lvols never run out of first writes during a run):
#   null        the null bdev itself                                   (the base)
#   passthru    a passthru vbdev on the null bdev: the cost of any one vbdev hop (a second bdev-layer submit and
#               completion), the floor for a thick lvol's overhead
#   thick       a thick lvol (1 GiB) on the null bdev
#   thin        a thin lvol of 64 MiB: the 1 s warm-up's writes allocate its 64 clusters, then the fast path
#   clone       a clone of a snapshot of a thick lvol: every read goes through to the snapshot's clusters
#   thin-first  a fresh 32 GiB thin lvol written sequentially in 1 MiB (= cluster) I/Os: every I/O allocates one
#               cluster (first-write cost); compared with thick-seq, the same on the thick lvol
# 4 KiB random read and random write at QD $qd (thin-first / thick-seq: 1 MiB sequential writes at QD 4), one
# reactor (-m 0x1); rounds interleaved (every configuration once per round) because throughput on this shared
# 2-vCPU machine swings. Prints every run, then per configuration and workload the median IOPS, CPU us per I/O,
# bytes allocated per I/O and the median of the per-round ratios to the null base (thin-first: to thick-seq).
#
# -i runs the reactor in interrupt mode (it sleeps when idle): on a machine with more runnable threads than cores a
# polling reactor is descheduled for whole time slices, which is what a first write's cost then measures.
#
# Usage: scripts/perf-lvol.sh [-t SECONDS] [-r ROUNDS] [-q QD] [-c "null thick ..."] [-o OUTDIR] [-i]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
secs=3
rounds=3
qd=128
configs="null passthru thick thin clone thick-seq thin-first"
out=""
mode=poll
while getopts "t:r:q:c:o:ih" opt; do
    case "$opt" in
        t) secs="$OPTARG" ;;
        r) rounds="$OPTARG" ;;
        q) qd="$OPTARG" ;;
        c) configs="$OPTARG" ;;
        o) out="$OPTARG" ;;
        i) mode=interrupt ;;
        *) sed -n '2,22p' "$0"; exit 0 ;;
    esac
done

work="$(mktemp -d /tmp/vb-lvol.XXXXXX)"
out="${out:-$work}"
mkdir -p "$out"
results="$out/lvol.jsonl"
: > "$results"
"$root/bdevperf" --help >/dev/null # build once, outside the measurements

null='{"method":"bdev_null_create","params":{"name":"N0","num_blocks":134217728,"block_size":512}}'
lvs='{"method":"bdev_lvol_create_lvstore","params":{"bdev_name":"N0","lvs_name":"lvs","cluster_sz":1048576}}'
lvol() { echo "{\"method\":\"bdev_lvol_create\",\"params\":{\"lvs_name\":\"lvs\",\"lvol_name\":\"$1\",\"size_in_mib\":$2,\"thin_provision\":$3}}"; }

config() { # config NAME -> "TARGET|CALLS"
    case "$1" in
        null) echo "N0|$null" ;;
        passthru) echo "P0|$null,{\"method\":\"bdev_passthru_create\",\"params\":{\"base_bdev_name\":\"N0\",\"name\":\"P0\"}}" ;;
        thick|thick-seq) echo "lvs/t|$null,$lvs,$(lvol t 1024 false)" ;;
        thin) echo "lvs/v|$null,$lvs,$(lvol v 64 true)" ;;
        clone) echo "lvs/c|$null,$lvs,$(lvol t 1024 false),{\"method\":\"bdev_lvol_snapshot\",\"params\":{\"lvol_name\":\"lvs/t\",\"snapshot_name\":\"s\"}},{\"method\":\"bdev_lvol_clone\",\"params\":{\"snapshot_name\":\"lvs/s\",\"clone_name\":\"c\"}}" ;;
        thin-first) echo "lvs/f|$null,$lvs,$(lvol f 32768 true)" ;;
        *) echo "perf-lvol: unknown configuration $1" >&2; exit 1 ;;
    esac
}

for round in $(seq 1 "$rounds"); do
    for c in $configs; do
        spec="$(config "$c")"
        target="${spec%%|*}"
        echo "{\"subsystems\":[{\"subsystem\":\"bdev\",\"config\":[${spec#*|}]}]}" > "$work/$c.json"
        case "$c" in
            thick-seq|thin-first) runs="write:1m:4:0" ;;
            thin) runs="randwrite:4096:$qd:1" ;; # reads of a thin lvol's unwritten clusters touch no device
            *) runs="randread:4096:$qd:1 randwrite:4096:$qd:1" ;;
        esac
        for run in $runs; do
            IFS=: read -r w o q warm <<< "$run"
            res="$("$root/bdevperf" -c "$work/$c.json" -T "$target" -q "$q" -o "$o" -w "$w" -t "$secs" -W "$warm" -m 0x1 --reactor-mode "$mode" --output json)"
            python3 - "$round" "$c" "$w" "$res" >> "$results" <<'EOF'
import json, sys
r = json.loads(sys.argv[4])["total"]
print(json.dumps({"round": int(sys.argv[1]), "config": sys.argv[2], "workload": sys.argv[3], "iops": r["iops"],
                  "cpu_us_per_io": r["cpu_us_per_io"], "bytes_per_io": r["allocated_bytes_per_io"], "errors": r["errors"]}))
EOF
            tail -1 "$results"
        done
    done
done

python3 - "$results" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
base_of = {"thin-first": "thick-seq", "thick-seq": None}
by = {}
for r in rows:
    by.setdefault((r["config"], r["workload"]), []).append(r)
print("\nconfig      workload   median IOPS  cpu us/IO  bytes/IO  ratio to base (median of per-round ratios)")
for (c, w), rs in by.items():
    base = base_of.get(c, "null")
    ratios = []
    for r in rs:
        b = [x for x in rows if x["config"] == base and x["workload"] == w and x["round"] == r["round"]]
        if base and b and b[0]["iops"] > 0:
            ratios.append(r["iops"] / b[0]["iops"])
    ratio = f"{statistics.median(ratios):.3f} vs {base}" if ratios else "-"
    print(f"{c:11} {w:10} {statistics.median(x['iops'] for x in rs):12.0f} {statistics.median(x['cpu_us_per_io'] for x in rs):10.4f} "
          f"{max(x['bytes_per_io'] for x in rs):9.1f}  {ratio}")
EOF
echo "results: $results"
