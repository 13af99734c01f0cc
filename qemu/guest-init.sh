#!/bin/sh
# Usage: installed as /init in the test-guest initramfs by qemu/build-guest.sh
#        (runs under busybox sh as PID 1; not meant to run on the host).
#
# What it does:
#   1. mounts proc, sysfs, devtmpfs (+devpts, /dev/shm), tmpfs on /tmp and /run;
#   2. loads the kernel modules listed in /etc/vbguest-modules with modprobe;
#   3. mounts the host's root file system read-only over virtio-9p (tag "hostroot")
#      on /host and prepares it for `chroot /host CMD` (dev, proc, sys, tmp, run);
#   4. starts the command AGENT on the virtio-serial port named
#      "org.vhostbackend.agent" and prints "VBGUEST READY" on the console.
#
# Agent protocol (one command at a time, strictly sequential):
#   host -> guest : one line = one shell command (run with `sh -c LINE`,
#                   stdin </dev/null, cwd /, stdout+stderr merged)
#   guest -> host : the command's output, then "\n@@VBRC=<exitcode>@@\n".
#                   The newline before the marker is always added by the agent,
#                   so the marker is always on its own line; a host strips exactly
#                   that one newline to recover the command's exact output.
#
# Kernel command line knobs (all optional):
#   vbguest.noshell   do not start an interactive shell on the serial console
#   vbguest.nohost    do not mount the host root over 9p
#   vbguest.9pcache=MODE  9p cache mode for /host (default none; loose/fscache
#                     are faster but do not see host files changed after boot)
#
# shellcheck shell=sh

PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
HOME=/tmp
TERM=linux
export PATH HOME TERM

AGENT_NAME=org.vhostbackend.agent

log() {
    echo "vbguest: $*" >/dev/console 2>/dev/null || echo "vbguest: $*"
}

# Prints the value of a "key=value" kernel command-line argument.
cmdline_value() {
    read -r cmdline </proc/cmdline
    # shellcheck disable=SC2086 # split the command line into words on purpose
    for word in $cmdline; do
        case "$word" in "$1="*) echo "${word#*=}"; return 0 ;; esac
    done
    return 1
}

has_cmdline_flag() {
    read -r cmdline </proc/cmdline
    # shellcheck disable=SC2086 # split the command line into words on purpose
    for word in $cmdline; do
        [ "$word" = "$1" ] && return 0
    done
    return 1
}

# --- 1. basic file systems -------------------------------------------------
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=755 tmpfs /run
[ -d /sys/kernel/debug ] && mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
[ -d /sys/kernel/config ] && mount -t configfs configfs /sys/kernel/config 2>/dev/null
hostname vbguest
ip link set lo up 2>/dev/null

# --- 2. kernel modules -----------------------------------------------------
if [ -r /etc/vbguest-modules ]; then
    while read -r mod; do
        case "$mod" in ''|'#'*) continue ;; esac
        modprobe "$mod" 2>/dev/null || log "warning: modprobe $mod failed"
    done </etc/vbguest-modules
fi
# configfs is needed by nvmet; it may only be mountable after modules loaded.
if ! grep -q ' /sys/kernel/config ' /proc/mounts; then
    mount -t configfs configfs /sys/kernel/config 2>/dev/null
fi

# --- 3. host root over 9p -------------------------------------------------
HOST_OK=0
if has_cmdline_flag vbguest.nohost; then
    log "host root not mounted (vbguest.nohost)"
else
    mkdir -p /host
    cache="$(cmdline_value vbguest.9pcache)" || cache=none
    # Fails quickly (ENOENT) when QEMU has no 9p device with this mount tag.
    if mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache="$cache",msize=512000 hostroot /host 2>/dev/null \
        || mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache="$cache" hostroot /host 2>/dev/null; then
        HOST_OK=1
        # Mounting on directories of a read-only file system is fine.
        mount -o rbind /dev /host/dev || log "warning: bind /host/dev failed"
        mount -t proc proc /host/proc || log "warning: /host/proc failed"
        mount -t sysfs sysfs /host/sys || log "warning: /host/sys failed"
        grep -q ' /sys/kernel/config ' /proc/mounts \
            && mount -t configfs configfs /host/sys/kernel/config 2>/dev/null
        for d in /host/tmp /host/var/tmp; do
            [ -d "$d" ] && { mount -t tmpfs -o mode=1777 tmpfs "$d" || log "warning: tmpfs $d failed"; }
        done
        mount -t tmpfs -o mode=755 tmpfs /host/run || log "warning: tmpfs /host/run failed"
        # Anything under the host's /run (e.g. /run/lock, /run/shm) would be gone.
        mkdir -p /host/run/lock /host/run/shm 2>/dev/null
        # A host directory hidden by those tmpfs (a checkout under /tmp, say) comes as its own 9p share.
        if share="$(cmdline_value vbguest.share)"; then
            mkdir -p "/host$share" \
                && mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache="$cache",msize=512000 hostshare "/host$share" \
                || log "warning: share $share failed"
        fi
    else
        log "host root not mounted (no 9p device with mount tag 'hostroot'?)"
    fi
fi

# --- 4. agent -------------------------------------------------------------
find_agent_port() {
    for f in /sys/class/virtio-ports/*/name; do
        [ -r "$f" ] || continue
        if [ "$(cat "$f")" = "$AGENT_NAME" ]; then
            dev="${f%/name}"
            echo "/dev/${dev##*/}"
            return 0
        fi
    done
    return 1
}

# Serve commands on the port forever. While no host is connected to the
# chardev socket, read() returns EOF; just poll until someone connects.
agent_loop() {
    port="$1"
    exec 3<>"$port" || { log "cannot open $port"; return 1; }
    while :; do
        if ! IFS= read -r line <&3; then
            # EOF (host side not connected) or a partial last line.
            if [ -z "$line" ]; then
                sleep 0.2
                continue
            fi
        fi
        line="${line%"$(printf '\r')"}"
        (cd / && exec sh -c "$line") </dev/null >&3 2>&3
        rc=$?
        printf '\n@@VBRC=%d@@\n' "$rc" >&3
    done
}

AGENT_PORT=""
i=0
while [ $i -lt 100 ]; do
    AGENT_PORT="$(find_agent_port)" && [ -e "$AGENT_PORT" ] && break
    AGENT_PORT=""
    i=$((i + 1))
    sleep 0.1
done

if [ -n "$AGENT_PORT" ]; then
    ( while :; do agent_loop "$AGENT_PORT"; sleep 1; done ) &
    log "agent on $AGENT_PORT (host root: $([ $HOST_OK = 1 ] && echo mounted || echo absent))"
    echo "VBGUEST READY"
else
    log "no virtio-serial port named $AGENT_NAME: agent not started"
    echo "VBGUEST READY (no agent)"
fi

# --- interactive console (for humans using qemu/run-guest.sh) ---------------
if has_cmdline_flag vbguest.noshell; then
    while :; do sleep 3600; done
fi
while :; do
    setsid cttyhack sh -l
    sleep 1
done
