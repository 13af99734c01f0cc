#!/usr/bin/env bash
# Fuzzes the protocol parsers with AFL++ through SharpFuzz (docs/RELIABILITY.md, "Fuzzing"):
#   scripts/fuzz.sh [-t SECONDS_PER_TARGET] [-o OUTPUT_DIR] [TARGET...]
# Targets: vhost-msg desc-chain scsi-cdb rpc-bind nvmf-tcp (default: all, 45 s each: the CI run; a long run is -t 3600).
# Builds fuzz/Fuzz, instruments the fuzzed project assemblies (a copy of the build output, never the build
# itself), runs afl-fuzz per target from fuzz/corpus/<target>, and prints per target the execs, execs/s, corpus
# size (queue entries), crashes and hangs. Crashing and hanging inputs are copied to OUTPUT_DIR/<target>/
# (default .build/fuzz/findings). Exit status: 0 only when every target ran and found nothing; 1 when something
# was found; 2 when afl-fuzz, sharpfuzz or the build could not run (a fuzz run that did not happen never passes).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
seconds=45
outdir="$root/.build/fuzz/findings"
all=(vhost-msg desc-chain scsi-cdb rpc-bind nvmf-tcp)
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        -t) seconds="$2"; shift ;;
        -o) outdir="$2"; shift ;;
        -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
        -*) echo "usage: scripts/fuzz.sh [-t SECONDS_PER_TARGET] [-o OUTPUT_DIR] [TARGET...]" >&2; exit 2 ;;
        *) targets+=("$1") ;;
    esac
    shift
done
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")
for t in "${targets[@]}"; do
    [ -d "fuzz/corpus/$t" ] || { echo "fuzz: unknown target $t (known: ${all[*]})" >&2; exit 2; }
done
export DOTNET_CLI_TELEMETRY_OPTOUT=1 DOTNET_NOLOGO=1

if ! command -v afl-fuzz >/dev/null 2>&1; then
    SUDO=(); [ "$(id -u)" -eq 0 ] || SUDO=(sudo -n)
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends afl++ >/dev/null
fi
command -v afl-fuzz >/dev/null 2>&1 || { echo "fuzz: afl-fuzz is not installed (Debian package afl++)" >&2; exit 2; }
dotnet tool restore >/dev/null || { echo "fuzz: dotnet tool restore (sharpfuzz) failed" >&2; exit 2; }

echo "== fuzz: build"
dotnet build fuzz/Fuzz/VhostBackend.Fuzz.csproj -c Release -nologo -v quiet -clp:ErrorsOnly >/dev/null \
    || { echo "fuzz: harness build failed" >&2; exit 2; }
work="$root/.build/fuzz/work"
rm -rf "$work"
mkdir -p "$work/findings"
cp -r .build/bin/VhostBackend.Fuzz/Release/net10.0 "$work/bin"
# Only the code under test is instrumented: not System.*, not SharpFuzz, not the reactor and platform plumbing
# (thread timing there would make coverage unstable).
for asm in VhostUser Virtio Scsi Rpc Bdev BdevMalloc Vhost Nvme Nvmf; do
    if ! dotnet tool run sharpfuzz "$work/bin/VhostBackend.$asm.dll" >"$work/sharpfuzz-$asm.log" 2>&1; then
        echo "fuzz: sharpfuzz could not instrument VhostBackend.$asm.dll:" >&2
        cat "$work/sharpfuzz-$asm.log" >&2
        exit 2
    fi
done

export AFL_SKIP_BIN_CHECK=1 AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_AFFINITY=1
export AFL_FORKSRV_INIT_TMOUT=60000
status=0
printf '%-11s %10s %8s %7s %8s %6s %s\n' target execs execs/s corpus crashes hangs seconds >"$work/summary"
for t in "${targets[@]}"; do
    echo "== fuzz: $t (${seconds}s)"
    out="$work/findings/$t"
    stats="$out/default/fuzzer_stats"
    # afl-fuzz's start-up (fork server, dry run of the corpus) can abort on a loaded machine without running a single
    # input (CI once saw "No instrumentation detected" for a target that runs fine otherwise): one retry of a run that
    # produced no stats at all. A run that did start reports its findings as it is; nothing found is never retried.
    for attempt in 1 2; do
        timeout -k 10 $((seconds + 120)) afl-fuzz -i "fuzz/corpus/$t" -o "$out" -t 5000 -m none -V "$seconds" \
            -- dotnet "$work/bin/VhostBackend.Fuzz.dll" "$t" >"$work/afl-$t.log" 2>&1
        rc=$?
        [ -f "$stats" ] && break
        if [ $attempt = 1 ]; then
            echo "fuzz: afl-fuzz did not start $t (exit $rc); retrying once:" >&2
            grep -a -E "PROGRAM ABORT|Location" "$work/afl-$t.log" >&2 || tail -5 "$work/afl-$t.log" >&2
            rm -rf "$out"
        fi
    done
    if [ ! -f "$stats" ]; then
        echo "fuzz: afl-fuzz did not run $t (exit $rc):" >&2
        tail -30 "$work/afl-$t.log" >&2
        status=2
        continue
    fi
    stat() { sed -nE "s/^$1 *: *//p" "$stats" | head -1; }
    execs="$(stat execs_done)"; eps="$(stat execs_per_sec)"; corpus="$(stat corpus_count)"
    crashes="$(stat saved_crashes)"; hangs="$(stat saved_hangs)"; runtime="$(stat run_time)"
    printf '%-11s %10s %8s %7s %8s %6s %s\n' "$t" "$execs" "$eps" "$corpus" "${crashes:-?}" "${hangs:-?}" "$runtime" | tee -a "$work/summary"
    if [ "${execs:-0}" -eq 0 ] || [ -z "$crashes" ]; then
        echo "fuzz: $t: afl-fuzz ran no executions (exit $rc)" >&2
        tail -30 "$work/afl-$t.log" >&2
        status=2
    elif [ "$crashes" -gt 0 ] || [ "$hangs" -gt 0 ]; then
        mkdir -p "$outdir/$t"
        cp "$out"/default/crashes/id:* "$out"/default/hangs/id:* "$outdir/$t/" 2>/dev/null
        echo "fuzz: $t: $crashes crashes, $hangs hangs; inputs in $outdir/$t (replay: dotnet .build/bin/VhostBackend.Fuzz/Release/net10.0/VhostBackend.Fuzz.dll $t FILE)"
        [ $status -eq 2 ] || status=1
    fi
done
echo "== fuzz: summary"
cat "$work/summary"
exit $status
