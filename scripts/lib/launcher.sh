#!/usr/bin/env bash
# Shared by ./vhostd, ./vhostctl and ./bdevperf: build a tool on first use (or when its sources changed),
# then run it. Once built, the checkout may be read-only: nothing is written when the build is current.
# Usage (sourced): vb_run_tool <project dir relative to repo root> <assembly name> [args...]
set -euo pipefail

VB_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

vb_needs_build() {
    local dll="$1"
    [ -f "$dll" ] || return 0
    # Rebuild when any source or project file of the repo's src/ is newer than the output.
    [ -w "$VB_ROOT" ] || return 1
    [ -n "$(find "$VB_ROOT/src" "$VB_ROOT/Directory.Build.props" -newer "$dll" \( -name '*.cs' -o -name '*.csproj' -o -name '*.props' \) -print -quit 2>/dev/null)" ]
}

vb_run_tool() {
    local project="$1" name="$2"
    shift 2
    local dll="$VB_ROOT/.build/bin/$name/Release/net10.0/$name.dll"
    if vb_needs_build "$dll"; then
        if [ ! -w "$VB_ROOT" ]; then
            echo "error: $name is not built and $VB_ROOT is read-only; build it once on a writable checkout" >&2
            exit 1
        fi
        echo "building $name (first use)..." >&2
        if ! dotnet build "$VB_ROOT/$project" -c Release -nologo -v quiet -clp:ErrorsOnly >&2; then
            echo "error: build of $name failed" >&2
            exit 1
        fi
        # An incremental build leaves an up-to-date assembly untouched; mark it current so the next start
        # does not build again (and a benchmark never measures a build).
        touch "$dll"
    fi
    export DOTNET_CLI_TELEMETRY_OPTOUT=1 DOTNET_NOLOGO=1
    exec dotnet "$dll" "$@"
}
