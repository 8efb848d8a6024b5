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
# Output lines of the form TERN-GUEST-KEY=VALUE are collected by the rig as "guest facts";
# TERN-GUEST-ERROR=... fails a scenario.

echo TERN-GUEST-INIT-REACHED

export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

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
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        rig.action=*) action="${arg#rig.action=}" ;;
    esac
done

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
