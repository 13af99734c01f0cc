#!/usr/bin/env bash
# shellcheck disable=SC2054 # QEMU option values are comma-separated on purpose
# Usage: qemu/run-guest.sh [options] [-- raw QEMU args...]
#
# Boots the VhostBackend test guest (built by qemu/build-guest.sh, which is run
# automatically; instant when up to date) under QEMU/TCG, attached to the
# vhost-user sockets of a running daemon. Prints the exact QEMU command line
# (shell-quoted, on stderr, prefixed with "+ ") and then exec()s it, so the PID of
# this script becomes QEMU's.
#
# Options:
#   --blk SOCK[,queues=N][,reconnect=S]
#                        vhost-user-blk-pci on daemon socket SOCK (repeatable;
#                        default 2 queues; reconnect=S re-dials the socket every
#                        S seconds after the daemon went away)
#   --scsi SOCK[,queues=N][,reconnect=S]
#                        vhost-user-scsi-pci on daemon socket SOCK (repeatable)
#   --mem SIZE           guest RAM, shared memfd as vhost-user needs (default 1G)
#   --maxmem SIZE,slots=N
#                        room for memory hotplug (-m SIZE,slots=N,maxmem=...): pc-dimm
#                        devices added over QMP (device_add) land above the boot RAM
#   --smp N              vCPUs (default 2)
#   --machine TYPE       QEMU machine (default q35; q35 is needed for intel-iommu)
#   --agent SOCKPATH     command-agent virtio-serial port as a unix socket that
#                        QEMU listens on (server=on,wait=off); see guest-init.sh
#   --qmp SOCKPATH       QMP monitor as a listening unix socket
#   --serial stdio|FILE  serial console (ttyS0) target (default stdio)
#   --append "ARGS"      extra kernel command-line arguments (repeatable)
#   --extra "ARGS"       extra QEMU arguments, split on whitespace (repeatable);
#                        use "-- ARGS..." for arguments containing spaces
#   --no-hostroot        do not export the host's / to the guest over 9p
#   --share DIR          also export DIR (read-only) and mount it at /host/DIR: for directories the guest's
#                        private tmpfs on /host/tmp, /host/var/tmp and /host/run would hide
#   --guest-dir DIR      where build-guest.sh puts vmlinuz/initramfs.img
#                        (default ${VHOSTBACKEND_CACHE:-$HOME/.cache/vhostbackend}/guest)
#   --kernel FILE / --initrd FILE   use these instead of building
#   --qemu BINARY        default qemu-system-x86_64
#   --dry-run            only print the command line
#
# Example (two disks from a daemon, interactive serial console; Ctrl-A X quits):
#   qemu/run-guest.sh --blk /tmp/vb.0 --blk /tmp/vb.1,queues=4 --agent /tmp/agent.sock
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() { sed -n '/^# Usage:/,/^set -euo/{/^set -euo/d; s/^# \{0,1\}//; p}' "${BASH_SOURCE[0]}"; }
die() { echo "run-guest: $*" >&2; exit 2; }

BLKS=()
SCSIS=()
MEM=1G
MAXMEM=""
SMP=2
MACHINE=q35
AGENT=""
QMP=""
SERIAL=stdio
APPEND=()
EXTRA=()
HOSTROOT=1
SHARE=""
GUEST_DIR="${VHOSTBACKEND_CACHE:-${HOME:-/tmp}/.cache/vhostbackend}/guest"
KERNEL=""
INITRD=""
QEMU=qemu-system-x86_64
DRY_RUN=0

need_arg() { [[ $# -ge 2 ]] || die "$1 needs an argument"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --blk) need_arg "$@"; BLKS+=("$2"); shift 2 ;;
        --scsi) need_arg "$@"; SCSIS+=("$2"); shift 2 ;;
        --mem) need_arg "$@"; MEM="$2"; shift 2 ;;
        --maxmem) need_arg "$@"; MAXMEM="$2"; shift 2 ;;
        --smp) need_arg "$@"; SMP="$2"; shift 2 ;;
        --machine) need_arg "$@"; MACHINE="$2"; shift 2 ;;
        --agent) need_arg "$@"; AGENT="$2"; shift 2 ;;
        --qmp) need_arg "$@"; QMP="$2"; shift 2 ;;
        --serial) need_arg "$@"; SERIAL="$2"; shift 2 ;;
        --append) need_arg "$@"; APPEND+=("$2"); shift 2 ;;
        --extra)
            need_arg "$@"
            read -r -a words <<<"$2"
            EXTRA+=("${words[@]}")
            shift 2 ;;
        --no-hostroot) HOSTROOT=0; shift ;;
        --share) need_arg "$@"; SHARE="$2"; shift 2 ;;
        --guest-dir) need_arg "$@"; GUEST_DIR="$2"; shift 2 ;;
        --kernel) need_arg "$@"; KERNEL="$2"; shift 2 ;;
        --initrd) need_arg "$@"; INITRD="$2"; shift 2 ;;
        --qemu) need_arg "$@"; QEMU="$2"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; EXTRA+=("$@"); break ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
done

if [[ -z "$KERNEL" || -z "$INITRD" ]]; then
    bash "$SCRIPT_DIR/build-guest.sh" "$GUEST_DIR" >/dev/null
    if [[ -z "$KERNEL" ]]; then
        # vmlinux (uncompressed, PVH entry) boots ~3 s faster under TCG than vmlinuz.
        KERNEL="$GUEST_DIR/vmlinux"
        [[ -s "$KERNEL" ]] || KERNEL="$GUEST_DIR/vmlinuz"
    fi
    INITRD="${INITRD:-$GUEST_DIR/initramfs.img}"
fi

# Parses "SOCK[,queues=N][,reconnect=S]" into SOCK_PATH, SOCK_QUEUES, SOCK_RECONNECT.
parse_sock() {
    local spec="$1" opt
    SOCK_PATH="${spec%%,*}"
    SOCK_QUEUES=2
    SOCK_RECONNECT=""
    [[ "$spec" == *,* ]] || return 0
    local rest="${spec#*,}"
    IFS=',' read -r -a opts <<<"$rest"
    for opt in "${opts[@]}"; do
        case "$opt" in
            queues=*) SOCK_QUEUES="${opt#queues=}" ;;
            reconnect=*) SOCK_RECONNECT="${opt#reconnect=}" ;;
            *) die "unknown socket option '$opt' in '$spec'" ;;
        esac
    done
}

CMDLINE="console=ttyS0 panic=-1 quiet"
if [[ $HOSTROOT -eq 1 && -n "$SHARE" ]]; then
    [[ "$SHARE" == /* && "$SHARE" != *[[:space:]]* ]] || die "--share needs an absolute path without spaces"
    CMDLINE+=" vbguest.share=$SHARE"
fi
if [[ ${#APPEND[@]} -gt 0 ]]; then
    CMDLINE+=" ${APPEND[*]}"
fi

MEMOPT="$MEM"
if [[ -n "$MAXMEM" ]]; then
    [[ "$MAXMEM" =~ ^[0-9]+[KMGT]?,slots=[0-9]+$ ]] || die "--maxmem wants SIZE,slots=N (got '$MAXMEM')"
    MEMOPT="$MEM,slots=${MAXMEM#*,slots=},maxmem=${MAXMEM%%,*}"
fi

cmd=(
    "$QEMU"
    -nodefaults -no-user-config -display none -no-reboot
    -machine "$MACHINE" -accel tcg -cpu max
    -smp "$SMP" -m "$MEMOPT"
    -object "memory-backend-memfd,id=mem,size=$MEM,share=on"
    -numa node,memdev=mem
    -kernel "$KERNEL" -initrd "$INITRD"
    -append "$CMDLINE"
)

if [[ "$SERIAL" == stdio ]]; then
    cmd+=(-serial mon:stdio)
else
    cmd+=(-serial "file:$SERIAL")
fi

if [[ $HOSTROOT -eq 1 ]]; then
    cmd+=(
        -fsdev local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap
        -device virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot
    )
    if [[ -n "$SHARE" ]]; then
        cmd+=(
            -fsdev "local,id=hostshare,path=$SHARE,security_model=none,readonly=on,multidevs=remap"
            -device virtio-9p-pci,fsdev=hostshare,mount_tag=hostshare
        )
    fi
fi

if [[ -n "$AGENT" ]]; then
    cmd+=(
        -device virtio-serial-pci,id=vser0
        -chardev "socket,id=agent,path=$AGENT,server=on,wait=off"
        -device virtserialport,bus=vser0.0,chardev=agent,name=org.vhostbackend.agent
    )
fi

if [[ -n "$QMP" ]]; then
    cmd+=(-qmp "unix:$QMP,server=on,wait=off")
fi

i=0
for spec in "${BLKS[@]}"; do
    parse_sock "$spec"
    chardev="socket,id=vblk$i,path=$SOCK_PATH"
    [[ -z "$SOCK_RECONNECT" ]] || chardev+=",reconnect=$SOCK_RECONNECT"
    cmd+=(-chardev "$chardev" -device "vhost-user-blk-pci,id=blk$i,chardev=vblk$i,num-queues=$SOCK_QUEUES")
    i=$((i + 1))
done

i=0
for spec in "${SCSIS[@]}"; do
    parse_sock "$spec"
    chardev="socket,id=vscsi$i,path=$SOCK_PATH"
    [[ -z "$SOCK_RECONNECT" ]] || chardev+=",reconnect=$SOCK_RECONNECT"
    cmd+=(-chardev "$chardev" -device "vhost-user-scsi-pci,id=scsi$i,chardev=vscsi$i,num_queues=$SOCK_QUEUES")
    i=$((i + 1))
done

cmd+=("${EXTRA[@]}")

# Shell-quotes one word only when needed, so the printed line stays readable.
quote() {
    if [[ "$1" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
        printf '%s' "$1"
    else
        printf "'%s'" "${1//\'/\'\\\'\'}"
    fi
}
{
    printf '+'
    for word in "${cmd[@]}"; do
        printf ' '
        quote "$word"
    done
    printf '\n'
} >&2

if [[ $DRY_RUN -eq 1 ]]; then
    exit 0
fi
exec "${cmd[@]}"
