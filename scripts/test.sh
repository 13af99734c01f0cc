#!/usr/bin/env bash
# Installs what the tests need, builds everything, and runs every test suite: the fast unit tests, then the
# integration tests that boot real QEMU guests against the daemon. Prints one closing line:
#   "N passed, N failed, N skipped"
# Options: --unit (unit tests only), --filter EXPR (dotnet test filter for all suites; no fuzz run then),
# --no-fuzz (skip the fuzz suite). The fuzz suite (scripts/fuzz.sh, FUZZ_SECONDS per target, default 45: about
# 4.5 minutes in all) counts as one test: passed when afl-fuzz ran every target and found no crash or hang.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
unit_only=0
fuzz=1
filter=()
while [ $# -gt 0 ]; do
    case "$1" in
        --unit) unit_only=1 ;;
        --filter) filter=(--filter "$2"); fuzz=0; shift ;;
        --no-fuzz) fuzz=0 ;;
        *) echo "usage: scripts/test.sh [--unit] [--filter EXPR] [--no-fuzz]" >&2; exit 2 ;;
    esac
    shift
done
export DOTNET_CLI_TELEMETRY_OPTOUT=1 DOTNET_NOLOGO=1

bash scripts/install-deps.sh || { echo "install-deps failed"; exit 1; }
if [ $unit_only -eq 0 ]; then
    bash qemu/build-guest.sh || { echo "guest image build failed"; exit 1; }
fi

echo "== build"
if ! dotnet build VhostBackend.sln -c Release -nologo -v quiet -clp:ErrorsOnly; then
    echo "build failed"
    echo "0 passed, 1 failed"
    exit 1
fi

passed=0; failed=0; skipped=0; status=0
logdir="$(mktemp -d)"
run_suite() {
    local proj="$1" name log
    name="$(basename "$proj" .csproj)"
    log="$logdir/$name.log"
    echo "== $name"
    dotnet test "$proj" -c Release --no-build -nologo --logger "trx;LogFileName=$name.trx" --results-directory "$logdir" "${filter[@]}" >"$log" 2>&1
    local rc=$?
    grep -E -A6 '^\s*Failed |Error Message' "$log" | grep -v '^\s*at System\.' | head -200
    grep -E 'Passed!|Failed!|No test' "$log"
    # The slowest tests of the suite (the suite's time budget is watched from these), from its TRX results.
    if [ -f "$logdir/$name.trx" ]; then
        grep -o '<UnitTestResult [^>]*>' "$logdir/$name.trx" \
            | sed -nE 's/.*testName="([^"]*)".*duration="([0-9]+):([0-9]+):([0-9]+)(\.[0-9]*)?".*/\2 \3 \4 \1/p' \
            | awk '{ secs = $1 * 3600 + $2 * 60 + $3; if (secs >= 20) { $1 = $2 = $3 = ""; sub(/^ +/, ""); printf "   %6d s  %s\n", secs, $0 } }' \
            | sort -rn | head -8
    fi
    local line
    line="$(grep -E '(Passed|Failed)!  - Failed:' "$log" | tail -1)"
    if [ -n "$line" ]; then
        local f p s
        f="$(sed -E 's/.*Failed: *([0-9]+).*/\1/' <<<"$line")"
        p="$(sed -E 's/.*Passed: *([0-9]+).*/\1/' <<<"$line")"
        s="$(sed -E 's/.*Skipped: *([0-9]+).*/\1/' <<<"$line")"
        passed=$((passed + p)); failed=$((failed + f)); skipped=$((skipped + s))
    elif [ $rc -ne 0 ]; then
        echo "$name: test run failed (exit $rc):"; tail -40 "$log"
        failed=$((failed + 1))
    fi
    [ $rc -eq 0 ] || status=1
}

# The suites are the test projects of the solution (what the build above built).
for proj in $(dotnet sln VhostBackend.sln list | grep -E '^tests/.*\.Tests\.csproj$' | sort); do
    run_suite "$proj"
done

# Fuzzing (docs/RELIABILITY.md): a short AFL++ run of every target; any crash or hang, or a run that could not
# happen, fails it.
run_fuzz() {
    local log="$logdir/fuzz.log"
    echo "== fuzz"
    bash scripts/fuzz.sh -t "${FUZZ_SECONDS:-45}" -o "$logdir/fuzz-findings" >"$log" 2>&1
    local rc=$?
    sed -n '/== fuzz: summary/,$p' "$log"
    if [ $rc -eq 0 ]; then
        passed=$((passed + 1))
    else
        echo "fuzz: failed (exit $rc; findings in $logdir/fuzz-findings):"; tail -40 "$log"
        failed=$((failed + 1)); status=1
    fi
}
if [ $fuzz -eq 1 ]; then
    run_fuzz
fi
if [ $unit_only -eq 0 ]; then
    run_suite integration/VhostBackend.IntegrationTests.csproj
fi

echo "logs: $logdir"
echo "$passed passed, $failed failed, $skipped skipped"
[ $failed -eq 0 ] && [ $status -eq 0 ]
