#!/usr/bin/env bash
# Usage: qemu/install-deps.sh
#
# Installs (via Debian apt) everything the QEMU test-guest tooling needs:
#   - to build the guest (qemu/build-guest.sh): apt (apt-get download), dpkg,
#     busybox-static, cpio, kmod (depmod/modprobe), xz-utils, zstd, gzip
#   - to run the guest (qemu/run-guest.sh): qemu-system-x86
#   - host tools the integration tests run inside the guest via `chroot /host`:
#     fio, sg3-utils, nvme-cli
# Only missing packages are installed; when everything is present this is a no-op
# and needs no network. Must run as root (or with passwordless sudo).
set -euo pipefail

packages=(
    qemu-system-x86
    qemu-utils
    busybox-static
    cpio
    kmod
    xz-utils
    zstd
    gzip
    fio
    sg3-utils
    nvme-cli
)

missing=()
for pkg in "${packages[@]}"; do
    status="$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)"
    if [[ "$status" != "installed" ]]; then
        missing+=("$pkg")
    fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
    echo "install-deps: all packages present"
    exit 0
fi

SUDO=()
if [[ "$(id -u)" -ne 0 ]]; then
    SUDO=(sudo -n)
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
