#!/usr/bin/env bash
# NVMe-oF/TCP target benchmark on loopback: the same initiator (./bdevperf with bdev_nvme, our NVMe/TCP initiator)
# against NVMe-oF/TCP targets, each exporting one bdev in one subsystem on 127.0.0.1:
#   ours-null     ./vhostd (src/Nvmf) exporting a null bdev
#   ours-malloc   ./vhostd exporting a malloc bdev (adds a memcpy per I/O on the target)
#   spdk-null     SPDK v24.01's nvmf_tgt exporting a null bdev, when a built one is found ($SPDK_NVMF_TGT, else
#                 $SPDK_DIR/build/bin/nvmf_tgt, SPDK_DIR defaulting to the anchor build /tmp/anchor-spdk/spdk);
#                 skipped with a note otherwise
# The target runs on core 0 (one reactor, poll mode unless -M), bdevperf on core 1 (-m 0x2, one qpair).
# Workloads: 4 KiB randread QD1 (latency) and QD128 (IOPS). Rounds are interleaved (every target once per round,
# restarted per round) because results on this 2-vCPU machine swing with what else runs.
# Per run: IOPS, mean and p99 latency (bdevperf --output json), the target's CPU time over the run
# (utime+stime from /proc/PID/stat; a poll-mode reactor burns its core whatever the load, so this is an upper
# bound), the target reactor's busy time (framework_get_reactors busy ticks / tick_rate, SPDK's definition: time in
# iterations that did work) per I/O in microseconds and in cycles (x the CPU clock from /proc/cpuinfo), and, for
# our target, bytes allocated per I/O (GC.GetTotalAllocatedBytes between two samples inside the measured window,
# minus what the sampling RPCs allocate themselves) and gen-2 collections.
#
# Initiators (-i): "ours" is ./bdevperf (our NVMe/TCP initiator); "spdk" is SPDK v24.01's bdevperf
# ($SPDK_DIR/build/examples/bdevperf, SPDK's initiator) with the same JSON config; each initiator runs against each
# target in every round. Per run the initiator's CPU time (utime+stime of the bdevperf process, from wait4) per I/O,
# in microseconds and cycles, is recorded: with both bdevperfs polling on one core it is the initiator's cost per I/O
# when the initiator is the bottleneck (QD128 against the cheapest target).
#
# Usage: scripts/perf-nvmf.sh [-t SECONDS] [-W WARMUP] [-r ROUNDS] [-b "ours-null ours-malloc spdk-null"]
#                             [-i "ours spdk"] [-w "randread:1 randread:128"] [-M poll|adaptive|interrupt] [-o OUTDIR]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
secs=5
warm=1
rounds=3
backends="ours-null ours-malloc spdk-null"
workloads="randread:1 randread:128"
mode=poll
out=""
initiators="ours"
while getopts "t:W:r:b:i:w:M:o:h" opt; do
    case "$opt" in
        t) secs="$OPTARG" ;;
        W) warm="$OPTARG" ;;
        r) rounds="$OPTARG" ;;
        b) backends="$OPTARG" ;;
        i) initiators="$OPTARG" ;;
        w) workloads="$OPTARG" ;;
        M) mode="$OPTARG" ;;
        o) out="$OPTARG" ;;
        *) sed -n '2,20p' "$0"; exit 0 ;;
    esac
done

nqn="nqn.2016-06.io.spdk:perf1"
spdk_dir="${SPDK_DIR:-/tmp/anchor-spdk/spdk}"
spdk_tgt="${SPDK_NVMF_TGT:-$spdk_dir/build/bin/nvmf_tgt}"
spdk_bdevperf="${SPDK_BDEVPERF:-$spdk_dir/build/examples/bdevperf}"
cpu_mhz="$(awk -F: '/^cpu MHz/ {print $2; exit}' /proc/cpuinfo | tr -d ' ')"
cpu_mhz="${cpu_mhz:-0}"

perf_name=perf-nvmf
source "$root/scripts/lib/perf.sh"
perf_init vb-nvmf results.jsonl

rpc() { # rpc SOCKET METHOD [PARAMS_JSON] -> result JSON on stdout; exits non-zero on a JSON-RPC error
    python3 - "$@" <<'EOF'
import json, socket, sys
path, method = sys.argv[1], sys.argv[2]
req = {"jsonrpc": "2.0", "id": 1, "method": method}
if len(sys.argv) > 3:
    req["params"] = json.loads(sys.argv[3])
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(30)
s.connect(path)
s.sendall(json.dumps(req).encode())
buf, dec = b"", json.JSONDecoder()
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
if "error" in obj:
    print(f"{method}: {json.dumps(obj['error'])}", file=sys.stderr)
    sys.exit(1)
print(json.dumps(obj.get("result")))
EOF
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

configure_target() { # configure_target RPC_SOCKET BDEV_CREATE_METHOD BDEV_PARAMS
    local s="$1"
    rpc "$s" "$2" "$3" >/dev/null
    rpc "$s" nvmf_create_transport '{"trtype":"TCP"}' >/dev/null
    rpc "$s" nvmf_create_subsystem "{\"nqn\":\"$nqn\",\"allow_any_host\":true,\"serial_number\":\"VBPERF0001\"}" >/dev/null
    rpc "$s" nvmf_subsystem_add_ns "{\"nqn\":\"$nqn\",\"namespace\":{\"bdev_name\":\"Disk0\"}}" >/dev/null
    rpc "$s" nvmf_subsystem_add_listener "{\"nqn\":\"$nqn\",\"listen_address\":{\"trtype\":\"TCP\",\"adrfam\":\"IPv4\",\"traddr\":\"127.0.0.1\",\"trsvcid\":\"$port\"}}" >/dev/null
}

ensure_hugepages() { # SPDK's apps need 2 MB hugepages on /dev/hugepages
    if [ "$(cat /proc/sys/vm/nr_hugepages)" -lt 1024 ]; then
        echo 1024 > /proc/sys/vm/nr_hugepages || true
    fi
    grep -qs '^[^ ]* /dev/hugepages hugetlbfs ' /proc/mounts || { mkdir -p /dev/hugepages; mount -t hugetlbfs -o pagesize=2M nodev /dev/hugepages; }
}

ours=0
start_target() { # start_target NAME -> daemon_pid, rpc_sock, port; returns 2 when the target is not available
    local name="$1"
    port="$(free_port)"
    rpc_sock="$work/$name.rpc"
    rm -f "$rpc_sock"
    local create params
    case "$name" in
        *-null) create=bdev_null_create; params='{"name":"Disk0","num_blocks":262144,"block_size":4096}' ;;
        *-malloc) create=bdev_malloc_create; params='{"name":"Disk0","num_blocks":65536,"block_size":4096}' ;;
        *) echo "perf-nvmf: unknown target $name" >&2; exit 1 ;;
    esac
    case "$name" in
        ours-*)
            ours=1
            mkdir -p "$work/sockets-$name"
            taskset -c 0 "$root/vhostd" -m 0x1 --reactor-mode "$mode" -S "$work/sockets-$name" -r "$rpc_sock" -L warning \
                > "$work/$name.log" 2>&1 &
            daemon_pid=$!
            ;;
        spdk-*)
            ours=0
            [ -x "$spdk_tgt" ] || return 2
            # SPDK needs 2 MB hugepages mounted on /dev/hugepages (as the anchor scripts in ../shared/anchors set up);
            # -u: no PCI probing (DPDK would otherwise try to take this VM's virtio NIC).
            ensure_hugepages
            LD_LIBRARY_PATH="$spdk_dir/build/lib:${LD_LIBRARY_PATH:-}" taskset -c 0 "$spdk_tgt" -m 0x1 -u -r "$rpc_sock" \
                --disable-cpumask-locks -s 1024 > "$work/$name.log" 2>&1 &
            daemon_pid=$!
            ;;
    esac
    wait_socket "$rpc_sock"
    for _ in $(seq 1 100); do rpc "$rpc_sock" spdk_get_version >/dev/null 2>&1 && break; sleep 0.1; done
    configure_target "$rpc_sock" "$create" "$params"
}

run_one() { # run_one TARGET ROUND WORKLOAD QD INITIATOR
    local be="$1" round="$2" wl="$3" qd="$4" ini="${5:-ours}"
    local cfg="$work/bdevperf-$be.json"
    cat > "$cfg" <<EOF
{"subsystems":[{"subsystem":"bdev","config":[{"method":"bdev_nvme_attach_controller","params":{"name":"Nvme0","trtype":"TCP","adrfam":"IPv4","traddr":"127.0.0.1","trsvcid":"$port","subnqn":"$nqn"}}]}]}
EOF
    local before_r after_r before_s after_s
    before_r="$(rpc "$rpc_sock" framework_get_reactors)"
    before_s="$(rpc "$rpc_sock" bdev_get_iostat '{"name":"Disk0"}')"
    # Steady-state allocation sampler (ours only): two samples back to back a moment after warm-up (their
    # difference is what one sample pair allocates) and one near the end, each with the bdev's op count.
    local sampler=""
    if [ "$ours" = 1 ]; then
        python3 - "$rpc_sock" "$warm" "$secs" "$work" <<'EOF2' &
import json, socket, sys, time
path, warm, secs, work = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
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
ops = lambda: (lambda b: b["num_read_ops"] + b["num_write_ops"])(rpc("bdev_get_iostat", {"name": "Disk0"})["bdevs"][0])
first, deadline = ops(), time.time() + 60
while ops() == first and time.time() < deadline:
    time.sleep(0.05)
time.sleep(warm + 0.5)  # I/O started: skip the warm-up
out = {}
for tag in ("a", "b"):  # back to back: b - a is what one sample pair allocates
    out[tag] = {"r": rpc("framework_get_reactors"), "ops": ops()}
time.sleep(max(0.5, secs - 1.0))
out["c"] = {"r": rpc("framework_get_reactors"), "ops": ops()}
json.dump(out, open(f"{work}/steady.json", "w"))
EOF2
        sampler=$!
    fi
    local c0 t0 c1 t1 res
    c0="$(cpu_ticks "$daemon_pid")"
    t0="$(date +%s.%N)"
    # The initiator runs under a wrapper that reports its CPU time (wait4 rusage) in $work/initiator.cpu.
    local -a cmd
    if [ "$ini" = spdk ]; then
        ensure_hugepages
        cmd=(env "LD_LIBRARY_PATH=$spdk_dir/build/lib" "$spdk_bdevperf" --json "$cfg" -q "$qd" -o 4096 -w "$wl" -t "$((secs + warm))"
             -m 0x2 -u -s 512 -r "$work/spdk-bdevperf.sock" --disable-cpumask-locks)
    else
        cmd=("$root/bdevperf" -m 0x2 -c "$cfg" -q "$qd" -o 4096 -w "$wl" -t "$secs" -W "$warm" --output json)
    fi
    if ! res="$(taskset -c 1 python3 -c '
import os, resource, subprocess, sys
p = subprocess.run(sys.argv[2:])
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
open(sys.argv[1], "w").write("%f" % (ru.ru_utime + ru.ru_stime))
sys.exit(p.returncode)' "$work/initiator.cpu" "${cmd[@]}" 2> "$work/bdevperf.err")"; then
        echo "perf-nvmf: $ini bdevperf failed against $be ($wl QD$qd):" >&2
        cat "$work/bdevperf.err" >&2
        return 1
    fi
    if [ "$ini" = spdk ]; then
        # SPDK's bdevperf prints a table; its "Total" row: runtime? IOPS MiB/s Fail/s TO/s Average min max (us).
        res="$(printf '%s\n' "$res" | python3 -c '
import json, re, sys
text = sys.stdin.read()
m = [l for l in text.splitlines() if re.match(r"\s*Total\s*:", l)]
if not m:
    sys.stderr.write(text); sys.exit(1)
v = [float(x) for x in re.findall(r"[0-9]+(?:\.[0-9]+)?", m[-1].split(":", 1)[1])]
iops, fail, avg = v[0], v[2], v[4]
secs = float(sys.argv[1])
print(json.dumps({"total": {"iops": iops, "avg_latency_us": avg, "p99_latency_us": None, "ios": int(iops * secs), "errors": int(fail * secs)}}))' "$((secs + warm))")"
    fi
    local ini_cpu
    ini_cpu="$(cat "$work/initiator.cpu" 2>/dev/null || echo 0)"
    c1="$(cpu_ticks "$daemon_pid")"
    t1="$(date +%s.%N)"
    after_r="$(rpc "$rpc_sock" framework_get_reactors)"
    after_s="$(rpc "$rpc_sock" bdev_get_iostat '{"name":"Disk0"}')"
    local steady="{}"
    if [ -n "$sampler" ]; then
        wait "$sampler" || true
        [ -f "$work/steady.json" ] && steady="$(cat "$work/steady.json")"
        rm -f "$work/steady.json"
    fi
    python3 - "$be" "$round" "$wl" "$qd" "$c0" "$c1" "$t0" "$t1" "$(getconf CLK_TCK)" "$cpu_mhz" "$before_r" "$after_r" "$before_s" "$after_s" "$res" "$steady" "$ini" "$ini_cpu" >> "$results" <<'EOF'
import json, sys
be, rnd, wl, qd, c0, c1, t0, t1, hz, mhz = sys.argv[1:11]
br, ar, bs, as_, res, steady = (json.loads(x) for x in sys.argv[11:17])
ini, ini_cpu = sys.argv[17], float(sys.argv[18])
tot = res["total"]
ios = max(1, tot["ios"])
rate = ar.get("tick_rate") or 1
busy = (sum(r["busy"] for r in ar["reactors"]) - sum(r["busy"] for r in br["reactors"])) / rate
row = {"target": be, "initiator": ini, "round": int(rnd), "workload": f"{wl}_qd{qd}", "iops": tot["iops"], "mean_us": tot["avg_latency_us"],
       "p99_us": tot["p99_latency_us"], "ios": tot["ios"], "errors": tot["errors"],
       "target_cpu_s": (int(c1) - int(c0)) / int(hz), "wall_s": float(t1) - float(t0), "target_busy_s": busy,
       "initiator_alloc_per_io": tot.get("allocated_bytes_per_io")}
# Per-I/O costs use the target's own op count over the run (bdev_get_iostat on Disk0: warm-up included, as is the
# busy and CPU time).
bops = lambda st: (lambda b: b["num_read_ops"] + b["num_write_ops"])(st["bdevs"][0])
ops = bops(as_) - bops(bs)
row["target_ops"] = ops
row["busy_us_per_io"] = busy * 1e6 / max(1, ops)
row["busy_cycles_per_io"] = row["busy_us_per_io"] * float(mhz)
row["cpu_us_per_io"] = row["target_cpu_s"] * 1e6 / max(1, ops)
row["initiator_cpu_s"] = ini_cpu
row["initiator_cpu_us_per_io"] = ini_cpu * 1e6 / max(1, ops)
row["initiator_cycles_per_io"] = row["initiator_cpu_us_per_io"] * float(mhz)
if "total_allocated_bytes" in ar:
    row["target_gen2"] = ar["gen2_collections"] - br["gen2_collections"]
    if steady.get("c"):
        a, b, c = steady["a"], steady["b"], steady["c"]
        tot_b = lambda x: x["r"]["total_allocated_bytes"]
        window_ops = c["ops"] - b["ops"]
        row["steady_ops"] = window_ops
        row["steady_alloc_bytes"] = tot_b(c) - tot_b(b)
        row["steady_rpc_alloc_bytes"] = tot_b(b) - tot_b(a)
        row["steady_net_bytes_per_io"] = (tot_b(c) - tot_b(b) - (tot_b(b) - tot_b(a))) / max(1, window_ops)
        row["steady_reactor_alloc_bytes"] = sum(r["allocated_bytes"] for r in c["r"]["reactors"]) - sum(r["allocated_bytes"] for r in b["r"]["reactors"])
print(json.dumps(row))
EOF
    tail -n 1 "$results" | python3 -c '
import json, sys
r = json.loads(sys.stdin.read())
al = r.get("steady_net_bytes_per_io")
print("  %-11s <- %-4s round %d %-13s %10.0f IOPS  mean %8.2f us  p99 %8s us  target busy %6.2f us/IO (%6.0f cycles)  CPU %5.2f/%5.2f s  initiator CPU %6.2f us/IO  %s" % (
    r["target"], r["initiator"], r["round"], r["workload"], r["iops"], r["mean_us"], "-" if r["p99_us"] is None else "%.2f" % r["p99_us"],
    r["busy_us_per_io"], r["busy_cycles_per_io"], r["target_cpu_s"], r["wall_s"], r["initiator_cpu_us_per_io"], "-" if al is None else "%.3f B/IO" % al))'
}

echo "perf-nvmf: ${rounds} round(s) of [$backends] x [$workloads], ${secs} s + ${warm} s warm-up each, target reactor mode $mode; CPU ${cpu_mhz} MHz; results in $results"
skipped=""
for round in $(seq 1 "$rounds"); do
    for be in $backends; do
        rc=0
        start_target "$be" || rc=$?
        if [ "$rc" = 2 ]; then
            [[ "$skipped" == *"$be"* ]] || { skipped="$skipped $be"; echo "perf-nvmf: $be skipped: no nvmf_tgt at $spdk_tgt (set SPDK_NVMF_TGT or SPDK_DIR)" >&2; }
            continue
        fi
        for w in $workloads; do
            for ini in $initiators; do
                if [ "$ini" = spdk ] && [ ! -x "$spdk_bdevperf" ]; then
                    [[ "$skipped" == *"spdk-initiator"* ]] || { skipped="$skipped spdk-initiator"; echo "perf-nvmf: initiator spdk skipped: no bdevperf at $spdk_bdevperf" >&2; }
                    continue
                fi
                run_one "$be" "$round" "${w%%:*}" "${w##*:}" "$ini"
            done
        done
        stop_daemon
    done
done

python3 - "$results" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
if not rows:
    print("perf-nvmf: no results"); sys.exit(1)
keys = sorted({(r["workload"], r["target"], r.get("initiator", "ours")) for r in rows})
print()
print(f"{'workload':<14} {'target':<12} {'init':<5} {'best IOPS':>10} {'med IOPS':>10} {'mean us(med)':>12} {'p99 us(med)':>11} {'busy us/IO':>10} {'cycles/IO':>9} {'CPU us/IO':>9} {'ini us/IO':>9} {'steady ops':>10} {'B/IO':>8} {'gen2':>4} {'errors':>6}")
for wl, t, ini in keys:
    rs = [r for r in rows if r["workload"] == wl and r["target"] == t and r.get("initiator", "ours") == ini]
    med = lambda k: statistics.median(r[k] for r in rs)
    st = [r for r in rs if "steady_ops" in r and r["steady_ops"] > 0]
    sops = sum(r["steady_ops"] for r in st)
    bpio = f"{sum(r['steady_net_bytes_per_io'] * r['steady_ops'] for r in st) / sops:.3f}" if st else "-"
    gen2 = str(sum(r.get("target_gen2", 0) for r in rs)) if "target_gen2" in rs[0] else "-"
    p99 = [r["p99_us"] for r in rs if r["p99_us"] is not None]
    p99s = f"{statistics.median(p99):>11.2f}" if p99 else f"{'-':>11}"
    print(f"{wl:<14} {t:<12} {ini:<5} {max(r['iops'] for r in rs):>10,.0f} {med('iops'):>10,.0f} {med('mean_us'):>12.2f} {p99s} "
          f"{med('busy_us_per_io'):>10.3f} {med('busy_cycles_per_io'):>9.0f} {med('cpu_us_per_io'):>9.3f} {med('initiator_cpu_us_per_io'):>9.3f} {sops:>10,.0f} {bpio:>8} {gen2:>4} {sum(r['errors'] for r in rs):>6}")
print()
print("busy us/IO: the target reactor's busy time (iterations that did work) over the run, per I/O; cycles/IO = that x the")
print("CPU clock. CPU us/IO: the target process's utime+stime per I/O (a poll-mode reactor spins: an upper bound).")
print("ini us/IO: the initiator process's utime+stime per I/O (both bdevperfs poll: an upper bound, equal to 1/IOPS when saturated).")
print("B/IO: bytes the target process allocated (GC.GetTotalAllocatedBytes) between two samples inside the measured window,")
print("minus what one sampling RPC pair allocates, per target op in that window; gen2: gen-2 GCs over the runs.")
print("Per-I/O figures divide by the target bdev's op count over the whole run (bdev_get_iostat; warm-up included).")
EOF
echo "results: $results"
