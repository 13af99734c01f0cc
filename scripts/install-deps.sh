#!/usr/bin/env bash
# Installs everything the build and the test suite need on Debian 12 (idempotent; apt only when missing).
# The .NET 10 SDK must already be on PATH (it is not a Debian package).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if ! command -v dotnet >/dev/null 2>&1; then
    echo "install-deps: the .NET 10 SDK (dotnet) is required and not on PATH" >&2
    exit 1
fi
bash "$root/qemu/install-deps.sh"
extra=()
# afl++: afl-fuzz for scripts/fuzz.sh (the fuzz suite of scripts/test.sh).
# libvirt-daemon-system, libvirt-clients (virsh, virt-xml-validate) and libxml2-utils (xmllint, which virt-xml-validate
# runs; libvirt-clients does not depend on it): integration/LibvirtTests (libvirtd runs
# without systemd: the test starts virtlogd and libvirtd itself when they are not running). tmux: the pseudo-terminal in which
# tests/Rpc.Tests (TopTests) drives `vhostctl top`.
for pkg in qemu-system-common python3 util-linux iproute2 afl++ libvirt-daemon-system libvirt-clients libxml2-utils libvirt-daemon-driver-qemu tmux; do
    if [ "$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)" != installed ]; then
        extra+=("$pkg")
    fi
done
if [ ${#extra[@]} -gt 0 ]; then
    SUDO=(); [ "$(id -u)" -eq 0 ] || SUDO=(sudo -n)
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${extra[@]}"
fi
