#!/usr/bin/env bash
# Shared by scripts/perf-compare.sh and scripts/perf-scaling.sh (sourced). The caller sets $root (repo root)
# and $perf_name (its name, for messages), then calls perf_init PREFIX RESULTS_FILE_NAME.
# Provides: $work, $out, $results, $daemon_pid; cpu_ticks PID, wait_socket PATH, stop_daemon.

perf_init() { # perf_init PREFIX RESULTS_NAME: work dir, output dir ($out may be preset), results file, exit trap, build
    work="$(mktemp -d "/tmp/$1.XXXXXX")"
    out="${out:-$work}"
    mkdir -p "$out"
    results="$out/$2"
    : > "$results"
    daemon_pid=""
    trap perf_cleanup EXIT
    # Build once up front so no build runs inside a measurement.
    "$root/vhostd" --help >/dev/null
    "$root/bdevperf" --help >/dev/null
}

perf_cleanup() {
    if [ -n "$daemon_pid" ] && kill -0 "$daemon_pid" 2>/dev/null; then
        stop_daemon
    fi
}

stop_daemon() {
    kill "$daemon_pid" 2>/dev/null || true
    wait "$daemon_pid" 2>/dev/null || true
    daemon_pid=""
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; } # utime + stime of PID, in clock ticks (1/100 s)

wait_socket() { # wait_socket PATH: up to 10 s for a Unix socket to appear
    for _ in $(seq 1 200); do
        [ -S "$1" ] && return 0
        sleep 0.05
    done
    echo "$perf_name: $1 did not appear" >&2
    return 1
}
