#!/usr/bin/env bash
# Runs the same ./bdevperf workloads (through the virtio-user bdev, i.e. as a vhost-user front end) against
# vhost-user-blk back ends and compares them:
#   ours-null     ./vhostd (poll mode) exporting a null bdev
#   ours-malloc   ./vhostd (poll mode) exporting a malloc bdev
#   ours-passthru ./vhostd (poll mode) exporting a passthru bdev on a null bdev (the cost of one vbdev hop)
#   qsd           qemu-storage-daemon, null-co (read-zeroes=off), main loop
#   qsd-iothread  qemu-storage-daemon, null-co (read-zeroes=off), export in an iothread
#   spdk-null     SPDK v24.01's vhost target (poll mode, one reactor) exporting a null bdev, when a built one is found
#                 ($SPDK_VHOST, else $SPDK_DIR/build/bin/vhost, SPDK_DIR defaulting to the anchor build /tmp/anchor-spdk/spdk)
#   ours-null-packed, spdk-null-packed   the same on a controller created with packed rings, attached with packed_ring
# Every back end is pinned to core 0, bdevperf to core 1 (-m 0x2). Workloads: 4 KiB randread QD128,
# randwrite QD128, randread QD1. Rounds are interleaved (A,B,C,D, A,B,C,D, ...) because IOPS on this
# 2-vCPU machine swing with vCPU placement; the summary shows best and median per back end and workload,
# and ratios to qemu-storage-daemon (main loop; to spdk-null when qsd is not run). Also: back-end CPU time over each bdevperf run (from
# /proc/PID/stat), bytes allocated per I/O in our daemon and gen-2 GCs (framework_get_reactors), and the
# daemon's bdev_get_iostat op count against what bdevperf counted.
#
# Usage: scripts/perf-compare.sh [-t SECONDS] [-W WARMUP] [-r ROUNDS] [-b "ours-null qsd ..."] [-o OUTDIR]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
secs=10
warm=2
rounds=3
backends="ours-null ours-malloc qsd qsd-iothread"
workloads="randread:128 randwrite:128 randread:1"
out=""
vq_size=256
while getopts "t:W:r:b:o:w:h" opt; do
    case "$opt" in
        t) secs="$OPTARG" ;;
        W) warm="$OPTARG" ;;
        r) rounds="$OPTARG" ;;
        b) backends="$OPTARG" ;;
        w) workloads="$OPTARG" ;;
        o) out="$OPTARG" ;;
        *) sed -n '2,20p' "$0"; exit 0 ;;
    esac
done

spdk_dir="${SPDK_DIR:-/tmp/anchor-spdk/spdk}"
spdk_vhost="${SPDK_VHOST:-$spdk_dir/build/bin/vhost}"
if [[ "$backends" == *spdk* ]] && [ ! -x "$spdk_vhost" ]; then
    echo "perf-compare: no SPDK vhost at $spdk_vhost (set SPDK_VHOST or SPDK_DIR, or build ../shared/anchors)" >&2
    exit 1
fi
qsd_bin="$(command -v qemu-storage-daemon || true)"
if [ -z "$qsd_bin" ] && [[ "$backends" == *qsd* ]]; then
    echo "perf-compare: qemu-storage-daemon not found (apt-get install qemu-system-common)" >&2
    exit 1
fi

perf_name=perf-compare
source "$root/scripts/lib/perf.sh"
perf_init vb-perf results.jsonl

rpc() { # rpc SOCKET METHOD [PARAMS_JSON] -> result JSON on stdout
    python3 - "$@" <<'EOF'
import json, socket, sys
path, method = sys.argv[1], sys.argv[2]
req = {"jsonrpc": "2.0", "id": 1, "method": method}
if len(sys.argv) > 3:
    req["params"] = json.loads(sys.argv[3])
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(path)
s.sendall(json.dumps(req).encode())
buf = b""
dec = json.JSONDecoder()
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    buf += chunk
    try:
        obj, _ = dec.raw_decode(buf.decode())
        break
    except ValueError:
        continue
print(json.dumps(obj.get("result", obj)))
EOF
}

start_backend() { # start_backend NAME -> sets daemon_pid, sock, rpc_sock, bdev
    local name="$1"
    sock="$work/$name.sock"
    rpc_sock=""
    bdev=""
    rm -f "$sock"
    case "$name" in
        ours-null|ours-null-packed|ours-malloc|ours-passthru)
            local create packed=false
            [ "$name" = ours-null-packed ] && packed=true
            if [ "$name" = ours-null ] || [ "$name" = ours-null-packed ]; then
                bdev=Null0
                create='{"method":"bdev_null_create","params":{"name":"Null0","num_blocks":2097152,"block_size":512}}'
            elif [ "$name" = ours-passthru ]; then
                bdev=Pass0
                create='{"method":"bdev_null_create","params":{"name":"Null0","num_blocks":2097152,"block_size":512}},{"method":"bdev_passthru_create","params":{"base_bdev_name":"Null0","name":"Pass0"}}'
            else
                bdev=Malloc0
                create='{"method":"bdev_malloc_create","params":{"name":"Malloc0","num_blocks":524288,"block_size":512}}'
            fi
            mkdir -p "$work/sockets-$name"
            cat > "$work/$name.json" <<EOF
{"subsystems":[
 {"subsystem":"bdev","config":[$create]},
 {"subsystem":"vhost_blk","config":[{"method":"vhost_create_blk_controller","params":{"ctrlr":"vhost.0","dev_name":"$bdev","cpumask":"0x1","packed_ring":$packed}}]}
]}
EOF
            rpc_sock="$work/$name.rpc"
            "$root/vhostd" -m 0x1 --reactor-mode poll -S "$work/sockets-$name" -r "$rpc_sock" -c "$work/$name.json" -L warning \
                > "$work/$name.log" 2>&1 &
            daemon_pid=$!
            sock="$work/sockets-$name/vhost.0"
            wait_socket "$sock"
            wait_socket "$rpc_sock"
            ;;
        qsd|qsd-iothread)
            local iot=() expo="type=vhost-user-blk,id=exp0,node-name=null0,addr.type=unix,addr.path=$sock,writable=on,num-queues=1"
            if [ "$name" = qsd-iothread ]; then
                iot=(--object iothread,id=iot0)
                expo="$expo,iothread=iot0"
            fi
            taskset -c 0 "$qsd_bin" "${iot[@]}" \
                --blockdev driver=null-co,node-name=null0,size=1073741824,read-zeroes=off \
                --export "$expo" > "$work/$name.log" 2>&1 &
            daemon_pid=$!
            wait_socket "$sock"
            ;;
        spdk-null|spdk-null-packed)
            # SPDK needs 2 MB hugepages on /dev/hugepages; -u: no PCI probing (DPDK would take this VM's virtio NIC).
            if [ "$(cat /proc/sys/vm/nr_hugepages)" -lt 1024 ]; then echo 1024 > /proc/sys/vm/nr_hugepages || true; fi
            grep -qs '^[^ ]* /dev/hugepages hugetlbfs ' /proc/mounts || { mkdir -p /dev/hugepages; mount -t hugetlbfs -o pagesize=2M nodev /dev/hugepages; }
            local srpc="$work/$name.spdk.rpc" p=()
            [ "$name" = spdk-null-packed ] && p=(-p)
            mkdir -p "$work/sockets-$name"
            rm -f "$srpc"
            LD_LIBRARY_PATH="$spdk_dir/build/lib:${LD_LIBRARY_PATH:-}" taskset -c 0 "$spdk_vhost" -m 0x1 -u -s 1024 \
                -S "$work/sockets-$name" -r "$srpc" --disable-cpumask-locks > "$work/$name.log" 2>&1 &
            daemon_pid=$!
            wait_socket "$srpc"
            for _ in $(seq 1 100); do python3 "$spdk_dir/scripts/rpc.py" -s "$srpc" spdk_get_version >/dev/null 2>&1 && break; sleep 0.1; done
            python3 "$spdk_dir/scripts/rpc.py" -s "$srpc" bdev_null_create Null0 1024 512 >/dev/null
            python3 "$spdk_dir/scripts/rpc.py" -s "$srpc" vhost_create_blk_controller vhost.0 Null0 --cpumask 0x1 "${p[@]}"
            sock="$work/sockets-$name/vhost.0"
            wait_socket "$sock"
            ;;
        *) echo "perf-compare: unknown back end $name" >&2; exit 1 ;;
    esac
}

run_one() { # run_one BACKEND ROUND WORKLOAD QD
    local be="$1" round="$2" wl="$3" qd="$4"
    local cfg="$work/bdevperf-$be.json" ring=false
    [[ "$be" == *-packed ]] && ring=true
    cat > "$cfg" <<EOF
{"subsystems":[{"subsystem":"bdev","config":[{"method":"bdev_virtio_attach_controller","params":{"name":"VirtioBlk0","trtype":"user","traddr":"$sock","dev_type":"blk","vq_count":1,"vq_size":$vq_size,"packed_ring":$ring}}]}]}
EOF
    local before_r="{}" after_r="{}" before_s="{}" after_s="{}"
    if [ -n "$rpc_sock" ]; then
        before_r="$(rpc "$rpc_sock" framework_get_reactors)"
        before_s="$(rpc "$rpc_sock" bdev_get_iostat "{\"name\":\"$bdev\"}")"
    fi
    # Steady-state sampler: allocation and op counters a moment after warm-up and just before the end.
    local sampler=""
    if [ -n "$rpc_sock" ]; then
        python3 - "$rpc_sock" "$bdev" "$warm" "$secs" "$work" <<'EOF2' &
import json, socket, sys, time
path, bdev, warm, secs, work = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
def rpc(method, params=None):
    req = {"jsonrpc": "2.0", "id": 1, "method": method}
    if params is not None:
        req["params"] = params
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(json.dumps(req).encode())
    buf, dec = b"", json.JSONDecoder()
    while True:
        buf += s.recv(65536)
        try:
            return dec.raw_decode(buf.decode())[0]["result"]
        except ValueError:
            continue
ops = lambda st: st["bdevs"][0]["num_read_ops"] + st["bdevs"][0]["num_write_ops"]
first = ops(rpc("bdev_get_iostat", {"name": bdev}))
deadline = time.time() + 60
while ops(rpc("bdev_get_iostat", {"name": bdev})) == first and time.time() < deadline:
    time.sleep(0.05)
time.sleep(warm + 0.5)   # I/O started: skip the warm-up
for tag in ("a", "b"):   # back to back: b - a is what one sample pair allocates
    json.dump(rpc("framework_get_reactors"), open(f"{work}/steady-{tag}-r.json", "w"))
    json.dump(rpc("bdev_get_iostat", {"name": bdev}), open(f"{work}/steady-{tag}-s.json", "w"))
time.sleep(max(0.5, secs - 1.0))
json.dump(rpc("framework_get_reactors"), open(f"{work}/steady-c-r.json", "w"))
json.dump(rpc("bdev_get_iostat", {"name": bdev}), open(f"{work}/steady-c-s.json", "w"))
EOF2
        sampler=$!
    fi
    local c0 t0 c1 t1
    c0="$(cpu_ticks "$daemon_pid")"
    t0="$(date +%s.%N)"
    local res
    if ! res="$(taskset -c 1 "$root/bdevperf" -m 0x2 -c "$cfg" -q "$qd" -o 4096 -w "$wl" -t "$secs" -W "$warm" --output json 2> "$work/bdevperf.err")"; then
        echo "perf-compare: bdevperf failed against $be ($wl QD$qd):" >&2
        cat "$work/bdevperf.err" >&2
        return 1
    fi
    c1="$(cpu_ticks "$daemon_pid")"
    t1="$(date +%s.%N)"
    local steady="{}"
    if [ -n "$rpc_sock" ]; then
        wait "$sampler" || true
        steady="$(python3 - "$work" <<'EOF2'
import json, sys
w = sys.argv[1]
try:
    # A and B back to back (B - A = what one pair of sampling RPCs allocates, plus a few I/Os), C late in the run.
    ra, rb, rc = (json.load(open(f"{w}/steady-{x}-r.json")) for x in "abc")
    sa, sb, sc = (json.load(open(f"{w}/steady-{x}-s.json")) for x in "abc")
    ops = lambda s: s["bdevs"][0]["num_read_ops"] + s["bdevs"][0]["num_write_ops"]
    tot = lambda r: r["total_allocated_bytes"]
    print(json.dumps({"ops": ops(sc) - ops(sb), "alloc": tot(rc) - tot(rb), "rpc_alloc": tot(rb) - tot(ra),
                      "gen0": rc["gen0_collections"] - rb["gen0_collections"], "gen2": rc["gen2_collections"] - rb["gen2_collections"]}))
except Exception as e:
    print("{}")
EOF2
)"
        rm -f "$work"/steady-*.json
        after_r="$(rpc "$rpc_sock" framework_get_reactors)"
        after_s="$(rpc "$rpc_sock" bdev_get_iostat "{\"name\":\"$bdev\"}")"
    fi
    python3 - "$be" "$round" "$wl" "$qd" "$c0" "$c1" "$t0" "$t1" "$(getconf CLK_TCK)" "$before_r" "$after_r" "$before_s" "$after_s" "$res" "$steady" >> "$results" <<'EOF'
import json, sys
be, rnd, wl, qd, c0, c1, t0, t1, hz = sys.argv[1:10]
br, ar, bs, as_, res, steady = (json.loads(x) for x in sys.argv[10:16])
tot = res["total"]
row = {"backend": be, "round": int(rnd), "workload": f"{wl}_qd{qd}", "iops": tot["iops"],
       "mean_us": tot["avg_latency_us"], "p99_us": tot["p99_latency_us"], "ios": tot["ios"], "errors": tot["errors"],
       "daemon_cpu_s": (int(c1) - int(c0)) / int(hz), "wall_s": float(t1) - float(t0),
       "bdevperf_alloc_per_io": tot["allocated_bytes_per_io"]}
if "total_allocated_bytes" in ar:
    row["daemon_alloc_bytes"] = ar["total_allocated_bytes"] - br["total_allocated_bytes"]
    row["daemon_reactor_alloc_bytes"] = sum(r["allocated_bytes"] for r in ar["reactors"]) - sum(r["allocated_bytes"] for r in br["reactors"])
    row["daemon_gen2"] = ar["gen2_collections"] - br["gen2_collections"]
    def ops(s):
        b = s.get("bdevs", [{}])[0]
        return b.get("num_read_ops", 0) + b.get("num_write_ops", 0)
    row["daemon_ops"] = ops(as_) - ops(bs)
    if steady:
        row["steady"] = steady
print(json.dumps(row))
EOF
    tail -n 1 "$results" | python3 -c '
import json, sys
r = json.loads(sys.stdin.read())
print("  %-16s round %d %-15s %11.0f IOPS  mean %8.2f us  p99 %8.2f us  back-end CPU %.2f/%.2f s" % (r["backend"], r["round"], r["workload"], r["iops"], r["mean_us"], r["p99_us"], r["daemon_cpu_s"], r["wall_s"]))'
}

echo "perf-compare: ${rounds} round(s) of [$backends] x [$workloads], ${secs} s + ${warm} s warm-up each; results in $results"
for round in $(seq 1 "$rounds"); do
    for be in $backends; do
        start_backend "$be"
        for w in $workloads; do
            run_one "$be" "$round" "${w%%:*}" "${w##*:}"
        done
        stop_daemon
    done
done

python3 - "$results" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
keys = sorted({(r["workload"], r["backend"]) for r in rows}, key=lambda k: (k[0], k[1]))
names = {r["backend"] for r in rows}
ref = "qsd" if "qsd" in names else ("spdk-null" if "spdk-null" in names else sorted(names)[0])
print()
print(f"ratios (x ref) are to {ref}")
print(f"{'workload':<15} {'backend':<16} {'best IOPS':>11} {'median IOPS':>12} {'x ref(best)':>11} {'x ref(med)':>10} {'mean us (med)':>13} {'x ref':>6} {'p99 us (med)':>12} {'CPU s/run':>9} {'B/IO daemon':>11} {'steady ops':>10} {'steady B/IO':>11} {'net B/IO':>8} {'gen2':>4} {'daemon ops/bdevperf ios':>23}")
summary = {}
for wl, be in keys:
    rs = [r for r in rows if r["workload"] == wl and r["backend"] == be]
    iops = [r["iops"] for r in rs]
    summary[(wl, be)] = (max(iops), statistics.median(iops), statistics.median(r["mean_us"] for r in rs))
for wl, be in keys:
    rs = [r for r in rows if r["workload"] == wl and r["backend"] == be]
    best, med, mean = summary[(wl, be)]
    p99 = statistics.median(r["p99_us"] for r in rs)
    cpu = statistics.median(r["daemon_cpu_s"] for r in rs)
    rb = summary.get((wl, ref))
    xb = f"{best / rb[0]:.2f}" if rb else "-"
    xm = f"{med / rb[1]:.2f}" if rb else "-"
    xl = f"{mean / rb[2]:.2f}" if rb else "-"
    if "daemon_alloc_bytes" in rs[0]:
        ios = sum(r["ios"] for r in rs)
        bpio = f"{sum(r['daemon_alloc_bytes'] for r in rs) / ios:.3f}"
        gen2 = str(sum(r["daemon_gen2"] for r in rs))
        cons = f"{statistics.median(r['daemon_ops'] / r['ios'] for r in rs):.3f}"
        st = [r["steady"] for r in rs if r.get("steady", {}).get("ops", 0) > 0]
        sops = sum(x["ops"] for x in st)
        sops_s = f"{sops:,}" if st else "-"
        sbpio = f"{sum(x['alloc'] for x in st) / sops:.4f}" if st else "-"
        nbpio = f"{sum(x['alloc'] - x['rpc_alloc'] for x in st) / sops:.4f}" if st else "-"
    else:
        bpio = gen2 = cons = sops_s = sbpio = nbpio = "-"
    print(f"{wl:<15} {be:<16} {best:>11,.0f} {med:>12,.0f} {xb:>11} {xm:>10} {mean:>13.2f} {xl:>6} {p99:>12.2f} {cpu:>9.2f} {bpio:>11} {sops_s:>10} {sbpio:>11} {nbpio:>8} {gen2:>4} {cons:>23}")
print()
print("B/IO daemon: bytes allocated in the whole daemon (GC.GetTotalAllocatedBytes) over each bdevperf run, including")
print("attach/detach and warm-up, divided by the measured I/Os. steady ops / steady B/IO: the daemon's ops and bytes allocated")
print("between two samples inside the measured window (after warm-up), summed over rounds; net B/IO subtracts what the")
print("sampling RPCs themselves allocate (measured by a back-to-back sample pair). daemon ops/bdevperf ios: bdev_get_iostat read+write ops")
print("over the run (warm-up included) per I/O bdevperf counted in its measured window (> 1 by the warm-up share).")
EOF
