#!/bin/sh
# Guest (L2) /init for the tern nested rig. Generated into build/images/guest-initrd.cpio by
# `cargo xtask images`.
#
# Kernel command line parameters it acts on:
#   rig.action=poweroff       (default) report facts, then power off
#   rig.action=reboot         reboot -f
#   rig.action=panic          crash the kernel (sysrq c); use with panic=-1 / panic=N
#   rig.action=shell          interactive shell on the console, power off when it exits
#   rig.action=script:NAME    source /scenarios/NAME.sh (from xtask/guest/scenarios/), then
#                             report facts and power off (unless the script did otherwise)
#   root=/dev/vdX             like a distribution initramfs: load virtio_blk, mount that disk
#                             (ext4, read-write) and switch_root to it. The disk is the rig's
#                             blk-root image, whose /sbin/init is this same script; it finds
#                             /etc/rig-disk-root there and goes on with rig.action.
#   rig.modules=a,b           load these modules from the initramfs first (the disk has no
#                             modules: a root=/dev/vdX guest that needs more drivers than
#                             virtio_blk, e.g. virtio_console, names them here)
# Output lines of the form TERN-GUEST-KEY=VALUE are collected by the rig as "guest facts";
# TERN-GUEST-ERROR=... fails a scenario.

echo TERN-GUEST-INIT-REACHED

export PATH=/bin:/sbin:/usr/bin:/usr/sbin
# After a switch_root these are already there (moved over from the initramfs).
[ -e /proc/self ] || mount -t proc proc /proc
[ -d /sys/kernel ] || mount -t sysfs sysfs /sys
grep -q '^devtmpfs /dev ' /proc/mounts || mount -t devtmpfs devtmpfs /dev 2>/dev/null

# rig_modload NAME...: insmod NAME and its dependencies (order precomputed at build time in
# /lib/modules/rig-modules.list as "name: /path/dep.ko ... /path/name.ko").
rig_modload() {
    for m in "$@"; do
        m=$(echo "$m" | tr - _)
        line=$(grep "^$m:" /lib/modules/rig-modules.list) || {
            echo "TERN-GUEST-ERROR=module-missing:$m"
            return 1
        }
        for ko in ${line#*:}; do
            insmod "$ko" 2>/dev/null
        done
        grep -q "^$m " /proc/modules || {
            echo "TERN-GUEST-ERROR=module-load-failed:$m"
            return 1
        }
    done
}

rig_report() {
    echo "TERN-GUEST-NPROC=$(grep -c ^processor /proc/cpuinfo)"
    echo "TERN-GUEST-UPTIME=$(cut -d' ' -f1 /proc/uptime)"
}

rig_poweroff() {
    rig_report
    echo TERN-GUEST-POWEROFF
    poweroff -f
}

action=poweroff
root=
modules=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        rig.action=*) action="${arg#rig.action=}" ;;
        rig.modules=*) modules="${arg#rig.modules=}" ;;
        root=/dev/*) root="${arg#root=}" ;;
    esac
done

# rig.modules=: only from the initramfs (after a switch_root they are loaded already).
if [ -n "$modules" ] && [ ! -e /etc/rig-disk-root ]; then
    rig_modload $(echo "$modules" | tr , ' ')
fi

# root=/dev/vdX: mount the virtio-blk disk and switch_root to its /sbin/init.
if [ -n "$root" ] && [ ! -e /etc/rig-disk-root ]; then
    rig_modload virtio_pci virtio_mmio virtio_blk
    n=0
    while [ ! -b "$root" ] && [ $n -lt 100 ]; do
        sleep 0.1
        n=$((n + 1))
    done
    if [ ! -b "$root" ]; then
        echo "TERN-GUEST-ERROR=root-device-missing:$root"
        ls /sys/block
        rig_poweroff
    fi
    echo "TERN-GUEST-ROOT-DEVICE=$root size=$(cat /sys/class/block/${root#/dev/}/size)"
    mkdir -p /newroot
    if ! mount -t ext4 -o rw "$root" /newroot; then
        echo "TERN-GUEST-ERROR=root-mount-failed:$root"
        dmesg | tail -n 20
        rig_poweroff
    fi
    if [ ! -x /newroot/sbin/init ] || [ ! -e /newroot/etc/rig-disk-root ]; then
        echo "TERN-GUEST-ERROR=root-not-a-rig-disk:$root"
        rig_poweroff
    fi
    for m in /proc /sys /dev; do
        mount --move "$m" "/newroot$m"
    done
    echo "TERN-GUEST-SWITCH-ROOT=$root"
    exec switch_root /newroot /sbin/init
fi
if [ -e /etc/rig-disk-root ]; then
    echo "TERN-GUEST-ROOTFS=$(awk '$2 == "/" { print $1 ":" $3 ":" substr($4, 1, 2) }' /proc/mounts | tail -n 1)"
fi

case "$action" in
    poweroff)
        rig_poweroff
        ;;
    reboot)
        rig_report
        echo TERN-GUEST-REBOOTING
        reboot -f
        ;;
    panic)
        rig_report
        echo TERN-GUEST-PANICKING
        echo c > /proc/sysrq-trigger
        ;;
    shell)
        rig_report
        echo "rig guest shell; 'poweroff -f' or exit to stop"
        setsid cttyhack sh
        poweroff -f
        ;;
    script:*)
        name="${action#script:}"
        if [ -f "/scenarios/$name.sh" ]; then
            . "/scenarios/$name.sh"
        else
            echo "TERN-GUEST-ERROR=no-such-script:$name"
        fi
        rig_poweroff
        ;;
    *)
        echo "TERN-GUEST-ERROR=unknown-action:$action"
        rig_poweroff
        ;;
esac
# Not reached unless poweroff/reboot failed; keep PID 1 alive rather than panic.
echo "TERN-GUEST-ERROR=still-running-after:$action"
while true; do sleep 3600; done
