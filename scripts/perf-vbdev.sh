#!/usr/bin/env bash
# Cost and effect of the virtual bdevs, measured with ./bdevperf straight on the bdev layer (no vhost):
#   null         one null bdev                                  (the base)
#   passthru     a passthru bdev on a null bdev                 (the per-I/O cost of one vbdev hop)
#   split        part 0 of a 4-way split of a null bdev
#   delay0       a delay bdev with 0 us latencies on a null bdev  (the poller hand-off without any delay)
#   error        an error bdev (no injection) on a null bdev
#   raid0        raid0 (64 KiB strips) over two null bdevs
#   raid1        raid1 over two null bdevs
#   qos1         one null bdev limited to $qos IOPS (bdev QoS)
#   qos-raid0    raid0 over two null bdevs each limited to $qos IOPS: striping doubles what the bases allow
# 4 KiB random read and random write, QD $qd, one reactor (-m 0x1); rounds interleaved (every configuration
# once per round) because throughput on this 2-vCPU machine swings with vCPU placement. Prints every run, then
# per configuration and workload the median IOPS, CPU us per I/O and bytes allocated per I/O, and the ratio to
# the null (or qos1) baseline of the same round.
#
# Usage: scripts/perf-vbdev.sh [-t SECONDS] [-r ROUNDS] [-q QD] [-c "null passthru ..."] [-o OUTDIR]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
secs=5
rounds=5
qd=32
qos=20000
configs="null passthru split delay0 error raid0 raid1 qos1 qos-raid0"
out=""
while getopts "t:r:q:c:o:h" opt; do
    case "$opt" in
        t) secs="$OPTARG" ;;
        r) rounds="$OPTARG" ;;
        q) qd="$OPTARG" ;;
        c) configs="$OPTARG" ;;
        o) out="$OPTARG" ;;
        *) sed -n '2,17p' "$0"; exit 0 ;;
    esac
done

work="$(mktemp -d /tmp/vb-vbdev.XXXXXX)"
out="${out:-$work}"
mkdir -p "$out"
results="$out/vbdev.jsonl"
: > "$results"
"$root/bdevperf" --help >/dev/null # build once, outside the measurements

null() { echo "{\"method\":\"bdev_null_create\",\"params\":{\"name\":\"$1\",\"num_blocks\":2097152,\"block_size\":512}}"; }
qoslim() { echo "{\"method\":\"bdev_set_qos_limit\",\"params\":{\"name\":\"$1\",\"rw_ios_per_sec\":$qos}}"; }

config() { # config NAME -> "TARGET|CALLS"
    case "$1" in
        null) echo "N0|$(null N0)" ;;
        passthru) echo "P0|$(null N0),{\"method\":\"bdev_passthru_create\",\"params\":{\"base_bdev_name\":\"N0\",\"name\":\"P0\"}}" ;;
        split) echo "N0p0|$(null N0),{\"method\":\"bdev_split_create\",\"params\":{\"base_bdev\":\"N0\",\"split_count\":4}}" ;;
        delay0) echo "D0|$(null N0),{\"method\":\"bdev_delay_create\",\"params\":{\"base_bdev_name\":\"N0\",\"name\":\"D0\",\"avg_read_latency\":0,\"p99_read_latency\":0,\"avg_write_latency\":0,\"p99_write_latency\":0}}" ;;
        error) echo "EE_N0|$(null N0),{\"method\":\"bdev_error_create\",\"params\":{\"base_name\":\"N0\"}}" ;;
        raid0) echo "R0|$(null N0),$(null N1),{\"method\":\"bdev_raid_create\",\"params\":{\"name\":\"R0\",\"raid_level\":\"raid0\",\"strip_size_kb\":64,\"base_bdevs\":[\"N0\",\"N1\"]}}" ;;
        raid1) echo "R1|$(null N0),$(null N1),{\"method\":\"bdev_raid_create\",\"params\":{\"name\":\"R1\",\"raid_level\":\"raid1\",\"base_bdevs\":[\"N0\",\"N1\"]}}" ;;
        qos1) echo "N0|$(null N0),$(qoslim N0)" ;;
        qos-raid0) echo "R0|$(null N0),$(null N1),$(qoslim N0),$(qoslim N1),{\"method\":\"bdev_raid_create\",\"params\":{\"name\":\"R0\",\"raid_level\":\"raid0\",\"strip_size_kb\":64,\"base_bdevs\":[\"N0\",\"N1\"]}}" ;;
        *) echo "perf-vbdev: unknown configuration $1" >&2; exit 1 ;;
    esac
}

for round in $(seq 1 "$rounds"); do
    for c in $configs; do
        spec="$(config "$c")"
        target="${spec%%|*}"
        echo "{\"subsystems\":[{\"subsystem\":\"bdev\",\"config\":[${spec#*|}]}]}" > "$work/$c.json"
        for w in randread randwrite; do
            res="$("$root/bdevperf" -c "$work/$c.json" -T "$target" -q "$qd" -o 4096 -w "$w" -t "$secs" -W 1 -m 0x1 --output json)"
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
base_of = {"qos-raid0": "qos1"}
by = {}
for r in rows:
    by.setdefault((r["config"], r["workload"]), []).append(r)
print("\nconfig      workload   median IOPS  cpu us/IO  bytes/IO  ratio to base (median of per-round ratios)")
for (c, w), rs in by.items():
    base = base_of.get(c, "null")
    ratios = []
    for r in rs:
        b = [x for x in rows if x["config"] == base and x["workload"] == w and x["round"] == r["round"]]
        if b and b[0]["iops"] > 0:
            ratios.append(r["iops"] / b[0]["iops"])
    ratio = f"{statistics.median(ratios):.3f} vs {base}" if ratios else "-"
    print(f"{c:11} {w:10} {statistics.median(x['iops'] for x in rs):12.0f} {statistics.median(x['cpu_us_per_io'] for x in rs):10.4f} "
          f"{max(x['bytes_per_io'] for x in rs):9.1f}  {ratio}")
EOF
echo "results: $results"
