#!/bin/sh
# Usage: scripts/setup.sh [config|reset|status|help]
#
# Prepares NVMe devices for the userspace driver (like SPDK's scripts/setup.sh):
#   config (default)  load vfio-pci, bind each selected NVMe device to vfio-pci
#                     (driver_override + drivers_probe), reserve hugepages
#   reset             give the devices back to their previous kernel driver
#                     (normally nvme), release the hugepages reserved here
#   status            list NVMe devices with driver and IOMMU group, and hugepages
#
# Environment:
#   PCI_ALLOWED   space-separated PCI addresses to use (default: every NVMe
#                 controller, PCI class 0x010802); e.g. PCI_ALLOWED="0000:00:04.0"
#   PCI_BLOCKED   addresses never touched
#   HUGEMEM       MiB of 2 MiB hugepages to reserve (default 512; 0 = none)
#   NRHUGE        number of hugepages (overrides HUGEMEM)
#   DRIVER_OVERRIDE  driver to bind instead of vfio-pci
#
# POSIX sh (works under busybox in the test guest). Needs root. The previous
# driver of each device is remembered in $STATE_DIR for `reset`.
set -eu

SYSPCI=/sys/bus/pci
STATE_DIR="${STATE_DIR:-/run/vhostbackend-setup}"
DRIVER="${DRIVER_OVERRIDE:-vfio-pci}"
NVME_CLASS=0x010802

log() { echo "setup.sh: $*" >&2; }
die() { log "$*"; exit 1; }

normalize() {
    # 00:04.0 -> 0000:00:04.0
    case "$1" in
        ????:??:??.?) echo "$1" ;;
        ??:??.?) echo "0000:$1" ;;
        *) echo "$1" ;;
    esac
}

is_blocked() {
    for b in ${PCI_BLOCKED:-}; do
        [ "$(normalize "$b")" = "$1" ] && return 0
    done
    return 1
}

# Selected devices: PCI_ALLOWED or every NVMe controller.
devices() {
    if [ -n "${PCI_ALLOWED:-}" ]; then
        for a in $PCI_ALLOWED; do
            a="$(normalize "$a")"
            [ -d "$SYSPCI/devices/$a" ] || { log "no PCI device $a"; continue; }
            is_blocked "$a" || echo "$a"
        done
        return 0
    fi
    for d in "$SYSPCI"/devices/*; do
        [ -r "$d/class" ] || continue
        if [ "$(cat "$d/class")" = "$NVME_CLASS" ]; then
            a="${d##*/}"
            is_blocked "$a" || echo "$a"
        fi
    done
}

driver_of() {
    if [ -e "$SYSPCI/devices/$1/driver" ]; then
        basename "$(readlink "$SYSPCI/devices/$1/driver")"
    else
        echo ""
    fi
}

group_of() {
    if [ -e "$SYSPCI/devices/$1/iommu_group" ]; then
        basename "$(readlink "$SYSPCI/devices/$1/iommu_group")"
    else
        echo ""
    fi
}

bind_to() {
    addr="$1"
    drv="$2"
    cur="$(driver_of "$addr")"
    if [ "$cur" = "$drv" ]; then
        return 0
    fi
    if [ -n "$cur" ]; then
        echo "$addr" >"$SYSPCI/devices/$addr/driver/unbind"
    fi
    echo "$drv" >"$SYSPCI/devices/$addr/driver_override"
    echo "$addr" >"$SYSPCI/drivers_probe" 2>/dev/null || true
    # Older kernels: bind explicitly when drivers_probe did not.
    if [ "$(driver_of "$addr")" != "$drv" ] && [ -e "$SYSPCI/drivers/$drv/bind" ]; then
        echo "$addr" >"$SYSPCI/drivers/$drv/bind" 2>/dev/null || true
    fi
    [ "$(driver_of "$addr")" = "$drv" ]
}

hugepages_path=/proc/sys/vm/nr_hugepages

config() {
    if [ "$DRIVER" = vfio-pci ]; then
        if [ ! -d "$SYSPCI/drivers/vfio-pci" ]; then
            modprobe vfio-pci 2>/dev/null || true
        fi
        [ -d "$SYSPCI/drivers/vfio-pci" ] || die "vfio-pci driver is not available (modprobe vfio-pci failed)"
        [ -d /sys/kernel/iommu_groups ] && [ -n "$(ls /sys/kernel/iommu_groups 2>/dev/null)" ] \
            || log "warning: no IOMMU groups: enable the IOMMU (intel_iommu=on) or vfio-pci cannot be used"
    fi
    mkdir -p "$STATE_DIR"
    n=0
    for addr in $(devices); do
        cur="$(driver_of "$addr")"
        if [ "$cur" != "$DRIVER" ] && [ ! -e "$STATE_DIR/$addr" ]; then
            echo "$cur" >"$STATE_DIR/$addr"
        fi
        if [ -n "$cur" ] && [ "$cur" = nvme ] && [ -d "$SYSPCI/devices/$addr/nvme" ]; then
            for blk in "$SYSPCI"/devices/"$addr"/nvme/*/nvme*n*; do
                [ -e "$blk" ] || continue
                b="${blk##*/}"
                if grep -q "^/dev/$b" /proc/mounts 2>/dev/null; then
                    log "skipping $addr: /dev/$b is mounted"
                    continue 2
                fi
            done
        fi
        if bind_to "$addr" "$DRIVER"; then
            log "$addr ($cur -> $DRIVER), IOMMU group $(group_of "$addr")"
            n=$((n + 1))
        else
            die "binding $addr to $DRIVER failed (driver now: '$(driver_of "$addr")')"
        fi
    done
    [ "$n" -gt 0 ] || log "no NVMe device selected"

    if [ -n "${NRHUGE:-}" ]; then
        nr="$NRHUGE"
    else
        nr=$(( ${HUGEMEM:-512} / 2 ))
    fi
    if [ -w "$hugepages_path" ] && [ "$nr" -gt 0 ]; then
        cur="$(cat "$hugepages_path")"
        if [ "$cur" -lt "$nr" ]; then
            [ -e "$STATE_DIR/hugepages" ] || echo "$cur" >"$STATE_DIR/hugepages"
            echo "$nr" >"$hugepages_path"
        fi
        got="$(cat "$hugepages_path")"
        log "hugepages: $got x 2 MiB reserved"
        [ "$got" -ge "$nr" ] || log "warning: asked for $nr hugepages, got $got (the driver falls back to locked 4 KiB pages)"
    fi
}

reset() {
    for addr in $(devices); do
        cur="$(driver_of "$addr")"
        prev=""
        [ -r "$STATE_DIR/$addr" ] && prev="$(cat "$STATE_DIR/$addr")"
        if [ "$cur" = "$DRIVER" ] || [ -n "$prev" ]; then
            if [ -n "$cur" ]; then
                echo "$addr" >"$SYSPCI/devices/$addr/driver/unbind"
            fi
            # An empty override lets the kernel pick the matching driver again (nvme).
            echo "" >"$SYSPCI/devices/$addr/driver_override"
            echo "$addr" >"$SYSPCI/drivers_probe" 2>/dev/null || true
            log "$addr ($cur -> $(driver_of "$addr"))"
            rm -f "$STATE_DIR/$addr"
        fi
    done
    if [ -r "$STATE_DIR/hugepages" ] && [ -w "$hugepages_path" ]; then
        cat "$STATE_DIR/hugepages" >"$hugepages_path"
        rm -f "$STATE_DIR/hugepages"
        log "hugepages: $(cat "$hugepages_path") reserved"
    fi
}

status() {
    echo "BDF           Vendor Device Driver     IOMMU-group"
    for d in "$SYSPCI"/devices/*; do
        [ -r "$d/class" ] || continue
        [ "$(cat "$d/class")" = "$NVME_CLASS" ] || continue
        a="${d##*/}"
        printf '%s  %s %s %-10s %s\n' "$a" "$(cat "$d/vendor")" "$(cat "$d/device")" "$(driver_of "$a")" "$(group_of "$a")"
    done
    [ -r "$hugepages_path" ] && echo "hugepages: $(cat "$hugepages_path") x 2 MiB"
    return 0
}

[ "$(id -u)" = 0 ] || die "must run as root"
case "${1:-config}" in
    config) config ;;
    reset) reset ;;
    status) status ;;
    help|-h|--help) sed -n '2,/^set -eu/{/^set -eu/d;s/^# \{0,1\}//;p}' "$0" ;;
    *) die "unknown command '$1' (config|reset|status)" ;;
esac
