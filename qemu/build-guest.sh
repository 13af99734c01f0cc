#!/usr/bin/env bash
# Usage: qemu/build-guest.sh [--force] [OUTDIR]
#
# Builds the QEMU test guest used by qemu/run-guest.sh and the C# integration
# tests: a Debian kernel (vmlinuz, and vmlinux = the same kernel uncompressed, an
# ELF that QEMU boots directly via PVH; under TCG that skips ~3 s of in-guest xz
# decompression) plus a small initramfs (initramfs.img) made of
# busybox-static, the kernel modules the tests need, and qemu/guest-init.sh as
# /init (which mounts the host's / read-only over 9p and runs a command agent on
# a virtio-serial port).
#
#   OUTDIR   default: ${VHOSTBACKEND_CACHE:-$HOME/.cache/vhostbackend}/guest
#   --force  rebuild even if the stamp says the guest is up to date
#
# Environment:
#   VBGUEST_KERNEL_PKG  kernel package to use instead of the one linux-image-amd64
#                       depends on (e.g. linux-image-6.1.0-56-amd64)
#
# Idempotent: a stamp (hash of this script and guest-init.sh) makes a second run
# instant and offline. The downloaded .deb is cached in OUTDIR/debs. On success
# the last lines of output are "kernel: PATH" (vmlinux if PVH-bootable, else
# vmlinuz), "vmlinuz: PATH" and "initrd: PATH".
# Needs root (apt-get, mknod) or passwordless sudo for qemu/install-deps.sh.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
INIT_SRC="$SCRIPT_DIR/guest-init.sh"

FORCE=0
OUTDIR=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --force) FORCE=1; shift ;;
        -h|--help) sed -n '/^# Usage:/,/^set -euo/{/^set -euo/d; s/^# \{0,1\}//; p}' "${BASH_SOURCE[0]}"; exit 0 ;;
        -*) echo "build-guest: unknown option $1" >&2; exit 2 ;;
        *) OUTDIR="$1"; shift ;;
    esac
done
OUTDIR="${OUTDIR:-${VHOSTBACKEND_CACHE:-${HOME:-/tmp}/.cache/vhostbackend}/guest}"

# Modules loaded at boot by /init (in this order). Names are module names as
# modprobe understands them ('-' and '_' are interchangeable); their dependencies
# are resolved with modprobe --show-depends and added automatically. A module
# that is built into the kernel is fine (nothing to copy). af_packet is built in
# on Debian 12 (CONFIG_PACKET=y).
MODULES=(
    virtio_pci virtio_console virtio_blk virtio_scsi virtio_net
    scsi_mod sd_mod sg
    netfs fscache 9pnet 9pnet_virtio 9p
    crc32c_generic crc32c_intel libcrc32c
    nvme_core nvme nvme_fabrics nvme_tcp nvmet nvmet_tcp
    vfio vfio_iommu_type1 vfio_pci
    af_packet
)

log() { echo "build-guest: $*" >&2; }

stamp_value() {
    {
        sha256sum "${BASH_SOURCE[0]}" "$INIT_SRC" | cut -d' ' -f1
        echo "${VBGUEST_KERNEL_PKG:-default}"
    } | sha256sum | cut -d' ' -f1
}

mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
STAMP="$OUTDIR/.stamp"
KERNEL="$OUTDIR/vmlinuz"
VMLINUX="$OUTDIR/vmlinux"
INITRD="$OUTDIR/initramfs.img"

done_msg() {
    if [[ -s "$VMLINUX" ]]; then
        echo "kernel: $VMLINUX"
    else
        echo "kernel: $KERNEL"
    fi
    echo "vmlinuz: $KERNEL"
    echo "initrd: $INITRD"
}

# Writes the uncompressed ELF kernel embedded in bzImage $1 to $2 (like the
# kernel's scripts/extract-vmlinux). Returns non-zero if none was found.
extract_vmlinux() {
    local image="$1" out="$2" fmt pat off
    local -a dec
    for fmt in xz zstd gzip; do
        case "$fmt" in
            xz) pat='\xfd7zXZ\x00'; dec=(xz -dc --single-stream) ;;
            zstd) pat='\x28\xb5\x2f\xfd'; dec=(zstd -dcq) ;;
            gzip) pat='\x1f\x8b\x08'; dec=(gzip -dcq) ;;
        esac
        while read -r off; do
            tail -c "+$((off + 1))" "$image" | "${dec[@]}" >"$out" 2>/dev/null || true
            if [[ "$(head -c 4 "$out" | od -An -tx1 | tr -d ' \n')" == 7f454c46 ]]; then
                return 0
            fi
        done < <(LC_ALL=C grep -obUaP "$pat" "$image" | cut -d: -f1)
    done
    rm -f "$out"
    return 1
}

up_to_date() {
    [[ $FORCE -eq 0 && -s "$KERNEL" && -s "$INITRD" && -f "$STAMP" ]] \
        && [[ "$(cat "$STAMP")" == "$(stamp_value)" ]]
}

# Fast path, no lock needed.
if up_to_date; then
    done_msg
    exit 0
fi

# Serialize concurrent builds (e.g. parallel test processes).
exec 9>"$OUTDIR/.lock"
flock 9
if up_to_date; then
    done_msg
    exit 0
fi

# --- tools -----------------------------------------------------------------
need_install=0
for tool in apt-get apt-cache dpkg cpio depmod modprobe xz gzip zstd flock; do
    command -v "$tool" >/dev/null 2>&1 || need_install=1
done
BUSYBOX=""
for cand in /bin/busybox /usr/bin/busybox; do
    if [[ -x "$cand" ]]; then BUSYBOX="$cand"; break; fi
done
if ! dpkg-query -W -f='${db:Status-Status}' busybox-static 2>/dev/null | grep -qx installed; then
    need_install=1
fi
if [[ $need_install -eq 1 ]]; then
    log "installing missing dependencies"
    bash "$SCRIPT_DIR/install-deps.sh"
    for cand in /bin/busybox /usr/bin/busybox; do
        if [[ -x "$cand" ]]; then BUSYBOX="$cand"; break; fi
    done
fi
[[ -n "$BUSYBOX" ]] || { log "busybox-static not found"; exit 1; }

# --- kernel package ----------------------------------------------------------
find_kernel_pkg() {
    apt-cache depends linux-image-amd64 2>/dev/null \
        | sed -n 's/^ *|\{0,1\}Depends: <\{0,1\}\(linux-image-[0-9][^ >]*\)>\{0,1\}.*/\1/p' \
        | head -n1
}

apt_update() {
    if [[ "$(id -u)" -eq 0 ]]; then apt-get update -qq; else sudo -n apt-get update -qq; fi
}

KPKG="${VBGUEST_KERNEL_PKG:-}"
if [[ -z "$KPKG" ]]; then
    KPKG="$(find_kernel_pkg)"
    if [[ -z "$KPKG" ]]; then
        log "apt lists look empty; running apt-get update"
        apt_update
        KPKG="$(find_kernel_pkg)"
    fi
fi
[[ -n "$KPKG" ]] || { log "cannot determine the kernel package linux-image-amd64 depends on"; exit 1; }
log "kernel package: $KPKG"

DEBDIR="$OUTDIR/debs"
mkdir -p "$DEBDIR"
shopt -s nullglob
debs=("$DEBDIR/${KPKG}"_*.deb)
if [[ ${#debs[@]} -eq 0 ]]; then
    log "downloading $KPKG"
    if ! (cd "$DEBDIR" && apt-get download -o APT::Sandbox::User=root "$KPKG"); then
        # Stale apt lists can point at a superseded version that is gone from the mirror.
        log "download failed; running apt-get update and retrying"
        apt_update
        (cd "$DEBDIR" && apt-get download -o APT::Sandbox::User=root "$KPKG")
    fi
    debs=("$DEBDIR/${KPKG}"_*.deb)
fi
shopt -u nullglob
[[ ${#debs[@]} -ge 1 ]] || { log "apt-get download $KPKG produced no .deb"; exit 1; }
DEB="${debs[-1]}"

WORK="$(mktemp -d /tmp/vbguest-build.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT

log "extracting $(basename "$DEB")"
KROOT="$WORK/kernel"
dpkg -x "$DEB" "$KROOT"

# Debian 12 ships modules in /lib/modules; newer (merged-/usr) ones in /usr/lib/modules.
if [[ -d "$KROOT/lib/modules" ]]; then
    KMODDIR="$KROOT/lib/modules"
elif [[ -d "$KROOT/usr/lib/modules" ]]; then
    KMODDIR="$KROOT/usr/lib/modules"
    ln -s usr/lib "$KROOT/lib"
else
    log "no lib/modules in $DEB"; exit 1
fi
KVER="$(basename "$(find "$KMODDIR" -mindepth 1 -maxdepth 1 -type d | head -n1)")"
[[ -n "$KVER" ]] || { log "cannot determine kernel version"; exit 1; }
log "kernel version: $KVER"

VMLINUZ=""
for cand in "$KROOT/boot/vmlinuz-$KVER" "$KMODDIR/$KVER/vmlinuz"; do
    if [[ -f "$cand" ]]; then VMLINUZ="$cand"; break; fi
done
[[ -n "$VMLINUZ" ]] || { log "no vmlinuz in $DEB"; exit 1; }

# Full-tree depmod so modprobe can resolve names, aliases and dependencies.
depmod -b "$KROOT" "$KVER"

# --- module subset -------------------------------------------------------------
STAGE="$WORK/initramfs"
SMODDIR="$STAGE/lib/modules/$KVER"
mkdir -p "$SMODDIR"

declare -A wanted=()
for mod in "${MODULES[@]}"; do
    if ! deps="$(modprobe -d "$KROOT" -S "$KVER" --show-depends "$mod" 2>&1)"; then
        log "module '$mod' not found in $KVER: $deps"
        exit 1
    fi
    while read -r kind path _; do
        case "$kind" in
            insmod) wanted["$path"]=1 ;;
            builtin) ;;
            *) ;;
        esac
    done <<<"$deps"
done

for path in "${!wanted[@]}"; do
    rel="${path#"$KMODDIR/$KVER/"}"
    mkdir -p "$SMODDIR/$(dirname "$rel")"
    cp "$path" "$SMODDIR/$rel"
done
for f in modules.order modules.builtin modules.builtin.modinfo; do
    if [[ -f "$KMODDIR/$KVER/$f" ]]; then cp "$KMODDIR/$KVER/$f" "$SMODDIR/"; fi
done

# busybox's modprobe/insmod cannot reliably load compressed modules (and the
# kernel's in-kernel decompression is only used by kmod's finit_module flags),
# so ship them uncompressed. Debian 12 kernels are uncompressed already;
# newer ones use .ko.xz (or .ko.zst).
ncomp=0
while IFS= read -r -d '' ko; do
    case "$ko" in
        *.ko.xz) xz -d "$ko" ;;
        *.ko.zst) zstd -q -d --rm "$ko" ;;
        *.ko.gz) gzip -d "$ko" ;;
    esac
    ncomp=$((ncomp + 1))
done < <(find "$SMODDIR" \( -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz' \) -print0)
if [[ -f "$SMODDIR/modules.order" && $ncomp -gt 0 ]]; then
    sed -i -E 's/\.ko\.(xz|zst|gz)$/.ko/' "$SMODDIR/modules.order"
fi
depmod -b "$STAGE" "$KVER"
log "modules: ${#wanted[@]} files ($ncomp decompressed)"

# --- busybox + init --------------------------------------------------------
for d in bin sbin usr/bin usr/sbin etc proc sys dev tmp run host root mnt var/tmp; do
    mkdir -p "$STAGE/$d"
done
cp "$BUSYBOX" "$STAGE/bin/busybox"
while IFS= read -r applet; do
    [[ -n "$applet" && "$applet" != "bin/busybox" ]] || continue
    mkdir -p "$STAGE/$(dirname "$applet")"
    [[ -e "$STAGE/$applet" ]] || ln -s /bin/busybox "$STAGE/$applet"
done < <("$BUSYBOX" --list-full)
[[ -e "$STAGE/bin/sh" ]] || ln -s /bin/busybox "$STAGE/bin/sh"

install -m 0755 "$INIT_SRC" "$STAGE/init"
printf '%s\n' "${MODULES[@]}" >"$STAGE/etc/vbguest-modules"
echo "$KPKG $KVER" >"$STAGE/etc/vbguest-release"
echo "root:x:0:0:root:/root:/bin/sh" >"$STAGE/etc/passwd"
echo "root:x:0:" >"$STAGE/etc/group"
# The kernel opens /dev/console before running /init.
if [[ "$(id -u)" -eq 0 ]]; then
    mknod -m 600 "$STAGE/dev/console" c 5 1
fi

log "packing initramfs"
(cd "$STAGE" && find . -print0 | LC_ALL=C sort -z \
    | cpio --null -o -H newc --owner=0:0 --quiet) | gzip -6n >"$WORK/initramfs.img"

cp "$VMLINUZ" "$KERNEL.tmp" && mv -f "$KERNEL.tmp" "$KERNEL"
rm -f "$VMLINUX"
KCONFIG="$KROOT/boot/config-$KVER"
if [[ -f "$KCONFIG" ]] && grep -q '^CONFIG_PVH=y' "$KCONFIG"; then
    if extract_vmlinux "$VMLINUZ" "$WORK/vmlinux"; then
        mv -f "$WORK/vmlinux" "$VMLINUX"
        log "extracted PVH-bootable vmlinux ($(du -h "$VMLINUX" | cut -f1))"
    else
        log "warning: could not extract vmlinux; booting the compressed vmlinuz"
    fi
fi
cp "$WORK/initramfs.img" "$INITRD.tmp" && mv -f "$INITRD.tmp" "$INITRD"
echo "$KPKG $KVER" >"$OUTDIR/kernel-release"
stamp_value >"$STAMP"
log "built guest in $OUTDIR ($(du -h "$INITRD" | cut -f1) initramfs)"
done_msg
