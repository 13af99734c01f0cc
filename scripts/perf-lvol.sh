#!/usr/bin/env bash
# Cost of logical volumes, measured with ./bdevperf straight on the bdev layer (no vhost), on a null base (2^27 blocks
# of 512 B = 64 GiB, so thin lvols never run out of first writes during a run) and/or a malloc base (RAM, 512 B
# blocks: a 4 KiB memcpy per I/O, the realistic cheap base; 64 MiB, and 72 MiB under the lvols, whose thick lvol is
# then 64 MiB like the thin one, so every configuration's random I/O covers the same 64 MiB of memory):
#   base        the base bdev itself (null or malloc; "null" is accepted as the old name of this configuration)
#   passthru    a passthru vbdev on the base: the cost of any one vbdev hop
#   thick       a thick lvol (1 GiB on null, 64 MiB on malloc) on the base
#   thin        a thin lvol of 64 MiB, fully allocated before the run: bdevperf --precondition writes it once in
#               full through a channel of its own (its 64 first writes), then the measured jobs open
#   clone       a clone of a snapshot of a thick lvol: every read goes through to the snapshot's clusters
#   thin-first  a fresh 32 GiB thin lvol written sequentially in 1 MiB (= cluster) I/Os: every I/O allocates one
#               cluster (first-write cost); compared with thick-seq, the same on the thick lvol (null base only)
# 4 KiB random read and random write at QD $qd (thin-first / thick-seq: 1 MiB sequential writes at QD 4), one
# reactor (-m 0x1); rounds interleaved (every base and configuration once per round) because throughput on this
# shared 2-vCPU machine swings. Prints every run, then per base, configuration and workload the median IOPS, CPU us
# per I/O, bytes allocated per I/O and the median of the per-round ratios to the base (thin-first: to thick-seq).
#
# -p adds the peer: SPDK v24.01's own bdevperf ($SPDK_BDEVPERF, else $SPDK_DIR/build/examples/bdevperf, SPDK_DIR
# defaulting to /tmp/anchor-spdk/spdk) with the same JSON config, one reactor (-m 0x1, 2 MB hugepages), in the same
# rounds for the configurations base, thick and thin ("spdk-base", "spdk-thick", "spdk-thin"), so its lvol/base ratio
# stands next to ours. On a null base SPDK cannot create an lvstore (its null bdev reads back no metadata: "could not
# open super blob"), so the peer runs on the malloc base only. SPDK's bdevperf has no warm-up option: its thin lvol
# allocates its 64 clusters inside the measured time.
#
# -i runs the reactor in interrupt mode (it sleeps when idle): on a machine with more runnable threads than cores a
# polling reactor is descheduled for whole time slices, which is what a first write's cost then measures.
# BDEVPERF=<a built VhostBackend.BdevPerf.dll> measures that build (e.g. an older one) instead of ./bdevperf.
#
# -I MS interleaves within each run instead: the configuration's JSON also creates "N1", a second base just like the
# one measured as "base", and bdevperf runs both on the one reactor taking turns of MS ms (--interleave): the ratio
# printed is the median over the run's adjacent turn pairs of the configuration's IOPS over N1's, then the median of
# that over the rounds. Slow drifts of the host (the vCPUs moving between host cores) hit both alike; what is left
# between runs is mostly each process's own JIT (tiered PGO) outcome, hence the rounds. "base" is then not run on its
# own; thin-first and thick-seq run as without -I; -p is not taken with -I.
#
# Usage: scripts/perf-lvol.sh [-t SECONDS] [-r ROUNDS] [-q QD] [-b "null malloc"] [-c "base thick ..."] [-p] [-o OUTDIR] [-i] [-I MS]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
secs=3
rounds=3
qd=128
configs="base passthru thick thin clone thick-seq thin-first"
bases="null"
peer=0
out=""
mode=poll
interleave=0
while getopts "t:r:q:b:c:po:iI:h" opt; do
    case "$opt" in
        t) secs="$OPTARG" ;;
        r) rounds="$OPTARG" ;;
        q) qd="$OPTARG" ;;
        b) bases="$OPTARG" ;;
        c) configs="$OPTARG" ;;
        p) peer=1 ;;
        o) out="$OPTARG" ;;
        i) mode=interrupt ;;
        I) interleave="$OPTARG" ;;
        *) sed -n '2,29p' "$0"; exit 0 ;;
    esac
done

if [ "$interleave" != 0 ] && [ "$peer" = 1 ]; then
    echo "perf-lvol: -I and -p cannot be combined (SPDK's bdevperf has no --interleave)" >&2
    exit 1
fi

work="$(mktemp -d /tmp/vb-lvol.XXXXXX)"
out="${out:-$work}"
mkdir -p "$out"
results="$out/lvol.jsonl"
: > "$results"
if [ -n "${BDEVPERF:-}" ]; then
    ours=(dotnet "$BDEVPERF")
else
    ours=("$root/bdevperf")
    "$root/bdevperf" --help >/dev/null # build once, outside the measurements
fi
spdk_dir="${SPDK_DIR:-/tmp/anchor-spdk/spdk}"
spdk_bdevperf="${SPDK_BDEVPERF:-$spdk_dir/build/examples/bdevperf}"
if [ "$peer" = 1 ] && [ ! -x "$spdk_bdevperf" ]; then
    echo "perf-lvol: -p: no SPDK bdevperf at $spdk_bdevperf (set SPDK_BDEVPERF or SPDK_DIR)" >&2
    exit 1
fi

lvs='{"method":"bdev_lvol_create_lvstore","params":{"bdev_name":"N0","lvs_name":"lvs","cluster_sz":1048576}}'
lvol() { echo "{\"method\":\"bdev_lvol_create\",\"params\":{\"lvs_name\":\"lvs\",\"lvol_name\":\"$1\",\"size_in_mib\":$2,\"thin_provision\":$3}}"; }

config() { # config BASE NAME -> "TARGET|CALLS"
    local base blocks thick=1024
    case "$1" in
        null) base='{"method":"bdev_null_create","params":{"name":"N0","num_blocks":134217728,"block_size":512}}' ;;
        # malloc: every configuration touches 64 MiB at random (the base and passthru a 64 MiB disk, the lvols 64 MiB
        # of a 72 MiB disk that also holds the lvstore's metadata), so cache and TLB misses are alike in all of them.
        malloc) thick=64
            if [ "$2" = base ] || [ "$2" = passthru ]; then blocks=131072; else blocks=147456; fi
            base="{\"method\":\"bdev_malloc_create\",\"params\":{\"name\":\"N0\",\"num_blocks\":$blocks,\"block_size\":512}}" ;;
        *) echo "perf-lvol: unknown base $1" >&2; exit 1 ;;
    esac
    case "$2" in
        base|null) echo "N0|$base" ;;
        passthru) echo "P0|$base,{\"method\":\"bdev_passthru_create\",\"params\":{\"base_bdev_name\":\"N0\",\"name\":\"P0\"}}" ;;
        thick|thick-seq) echo "lvs/t|$base,$lvs,$(lvol t $thick false)" ;;
        thin) echo "lvs/v|$base,$lvs,$(lvol v 64 true)" ;;
        clone) echo "lvs/c|$base,$lvs,$(lvol t $thick false),{\"method\":\"bdev_lvol_snapshot\",\"params\":{\"lvol_name\":\"lvs/t\",\"snapshot_name\":\"s\"}},{\"method\":\"bdev_lvol_clone\",\"params\":{\"snapshot_name\":\"lvs/s\",\"clone_name\":\"c\"}}" ;;
        thin-first) echo "lvs/f|$base,$lvs,$(lvol f 32768 true)" ;;
        *) echo "perf-lvol: unknown configuration $2" >&2; exit 1 ;;
    esac
}

ensure_hugepages() { # SPDK's apps need 2 MB hugepages on /dev/hugepages
    if [ "$(cat /proc/sys/vm/nr_hugepages)" -lt 1024 ]; then
        echo 1024 > /proc/sys/vm/nr_hugepages || true
    fi
    grep -qs '^[^ ]* /dev/hugepages hugetlbfs ' /proc/mounts || { mkdir -p /dev/hugepages; mount -t hugetlbfs -o pagesize=2M nodev /dev/hugepages; }
}

record() { # record ROUND BASE CONFIG WORKLOAD RESULT_JSON
    python3 - "$@" >> "$results" <<'PY'
import json, sys
r = json.loads(sys.argv[5])["total"]
row = {"round": int(sys.argv[1]), "base": sys.argv[2], "config": sys.argv[3], "workload": sys.argv[4], "iops": r["iops"],
       "cpu_us_per_io": r.get("cpu_us_per_io"), "bytes_per_io": r.get("allocated_bytes_per_io"), "errors": r["errors"]}
if "turn_ratio" in r: # -I: measured against N1 in the same run, turn by turn
    row["turn_ratio"] = r["turn_ratio"]
    row["base_iops"] = r["base_iops"]
print(json.dumps(row))
PY
    tail -1 "$results"
}

spdk_run() { # spdk_run CONFIG_JSON TARGET WORKLOAD -> {"total": {...}} from SPDK bdevperf's "Total" row
    local text
    ensure_hugepages
    text="$(env "LD_LIBRARY_PATH=$spdk_dir/build/lib" "$spdk_bdevperf" --json "$1" -T "$2" -q "$qd" -o 4096 -w "$3" -t "$secs" \
        -m 0x1 -s 1024 -r "$work/spdk-bdevperf.sock" --disable-cpumask-locks 2>&1)" || { echo "$text" >&2; return 1; }
    printf '%s\n' "$text" | python3 -c '
import json, re, sys
text = sys.stdin.read()
m = [l for l in text.splitlines() if re.match(r"\s*Total\s*:", l)]
if not m:
    sys.stderr.write(text); sys.exit(1)
v = [float(x) for x in re.findall(r"[0-9]+(?:\.[0-9]+)?", m[-1].split(":", 1)[1])]
print(json.dumps({"total": {"iops": v[0], "errors": int(v[2] * float(sys.argv[1]))}}))' "$secs"
}

for round in $(seq 1 "$rounds"); do
    for b in $bases; do
        list="$configs"
        if [ "$peer" = 1 ] && [ "$b" != null ]; then
            for c in $configs; do
                case "$c" in base|null|thick|thin) list="$list spdk-$c" ;; esac
            done
        fi
        for c in $list; do
            if [ "$b" != null ]; then
                case "$c" in thin-first|thick-seq) continue ;; esac
            fi
            spec="$(config "$b" "${c#spdk-}")"
            target="${spec%%|*}"
            il=0
            if [ "$interleave" != 0 ]; then
                case "$c" in
                    base|null) continue ;; # the comparator N1 runs inside every other configuration's runs
                    thin-first|thick-seq) ;;
                    *) il=1
                        cmp="$(config "$b" base)"
                        spec="$target|${cmp#*|},${spec#*|}"
                        spec="${spec/\"name\":\"N0\"/\"name\":\"N1\"}" ;; # the first N0 is the comparator's
                esac
            fi
            echo "{\"subsystems\":[{\"subsystem\":\"bdev\",\"config\":[${spec#*|}]}]}" > "$work/$b-$c.json"
            case "$c" in
                thick-seq|thin-first) runs="write:1m:4:0" ;;
                # Reads of a thin lvol's unwritten clusters touch no device: randwrite only. Ours is preconditioned
                # (fully allocated before its jobs open, like a filled disk; bytes/IO above 0 would say an allocation
                # fell inside the run). A warm-up that allocates inside the measured job instead leaves that job's
                # I/O pool in the scrambled order of the first writes' completions, which a null base then keeps for
                # good: a cost of the benchmark, not of the lvol (docs/LVOL.md, session 30). SPDK's bdevperf has no
                # precondition: its thin lvol allocates inside the measured time.
                thin) runs="randwrite:4096:$qd:1:--precondition" ;;
                spdk-thin) runs="randwrite:4096:$qd:5" ;;
                *) runs="randread:4096:$qd:1 randwrite:4096:$qd:1" ;;
            esac
            for run in $runs; do
                IFS=: read -r w o q warm extra <<< "$run"
                if [[ "$c" == spdk-* ]]; then
                    res="$(spdk_run "$work/$b-$c.json" "$target" "$w")"
                elif [ "$il" = 1 ]; then
                    res="$("${ours[@]}" -c "$work/$b-$c.json" -T N1 -T "$target" -q "$q" -o "$o" -w "$w" -t "$secs" -W "$warm" ${extra:+"$extra"} -m 0x1 --reactor-mode "$mode" --interleave "$interleave" --output json)"
                    res="$(python3 -c '
import json, sys
d = json.loads(sys.argv[1]); j = d["jobs"][1]; t = d["total"]
print(json.dumps({"total": {"iops": j["iops"], "cpu_us_per_io": None, "allocated_bytes_per_io": t["allocated_bytes_per_io"], "errors": t["errors"],
                            "turn_ratio": j["turn_ratio_to_first"]["median"], "base_iops": d["jobs"][0]["iops"]}}))' "$res")"
                else
                    res="$("${ours[@]}" -c "$work/$b-$c.json" -T "$target" -q "$q" -o "$o" -w "$w" -t "$secs" -W "$warm" ${extra:+"$extra"} -m 0x1 --reactor-mode "$mode" --output json)"
                fi
                record "$round" "$b" "$c" "$w" "$res"
            done
        done
    done
done

python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def base_of(b, c):
    if c == "thin-first":
        return "thick-seq"
    if c in ("thick-seq", "base", "null", "spdk-base", "spdk-null"):
        return None
    if c.startswith("spdk-"):
        return "spdk-base" if any(r["base"] == b and r["config"] == "spdk-base" for r in rows) else "spdk-null"
    return "base" if any(r["base"] == b and r["config"] == "base" for r in rows) else "null"
by = {}
for r in rows:
    by.setdefault((r["base"], r["config"], r["workload"]), []).append(r)
fmt = lambda v, f: "-" if v is None else format(v, f)
print("\nbase    config      workload   median IOPS  cpu us/IO  bytes/IO  ratio to base (median of per-round ratios) [min-max]")
for (b, c, w), rs in by.items():
    base = base_of(b, c)
    ratios = []
    if all("turn_ratio" in r for r in rs):
        ratios = [r["turn_ratio"] for r in rs]
        base = "N1 (same run, turn by turn)"
    for r in rs if not ratios else []:
        x = [y for y in rows if y["base"] == b and y["config"] == base and y["workload"] == w and y["round"] == r["round"]]
        if base and x and x[0]["iops"] > 0:
            ratios.append(r["iops"] / x[0]["iops"])
    ratio = f"{statistics.median(ratios):.3f} vs {base} [{min(ratios):.3f}-{max(ratios):.3f}]" if ratios else "-"
    cpus = [x["cpu_us_per_io"] for x in rs if x["cpu_us_per_io"] is not None]
    allocs = [x["bytes_per_io"] for x in rs if x["bytes_per_io"] is not None]
    print(f"{b:7} {c:11} {w:10} {statistics.median(x['iops'] for x in rs):12.0f} "
          f"{fmt(statistics.median(cpus) if cpus else None, '10.4f'):>10} {fmt(max(allocs) if allocs else None, '9.1f'):>9}  {ratio}")
PY
echo "results: $results"
