#!/bin/sh
# L1 side of the real-distribution scenarios (xtask/src/scenarios.rs, group "debian"). Runs
# inside L1, started by the rig agent as
#
#     sh /rig/l1/debian.sh [fw|sdboot|blank] -- VMM-ARGV...
#
# VMM-ARGV boots Debian's kernel and initramfs (xtask/src/debian.rs), or with "fw" the
# firmware that boots the partitioned Debian disk through GRUB, with "sdboot" the firmware that
# boots it through systemd-boot on a disk put before it, or with "blank" the firmware
# with a blank disk (nothing to boot: the VMM must say so and exit); this script gives the
# boot its own qcow2 overlay on the pristine Debian root (read-only, on the disk L1 mounted at
# /rig/debian), appends it as the guest's /dev/vda (tern: --disk; QEMU: -drive if=virtio), runs
# the VMM and removes the overlay. It prints "TERN-DEBIAN-OK" when the VMM exited 0 and
# "TERN-DEBIAN-FAIL why" otherwise; the guest's own "RIG-DEBIAN-STATE=..." line says how far
# systemd got.
# It also logs the exits the guest caused ("TERN-EXITS ...", below).
set -u
export PATH=/usr/bin:/bin:/usr/sbin:/sbin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
# QEMU keeps the temporary copy of a snapshot=on drive (the UEFI variables) in /var/tmp (it
# takes TMPDIR=/tmp for /var/tmp too), which L1 lacks.
mkdir -p /var/tmp

BASE=/rig/debian/debian.qcow2
# Given, a disk put before the root disk (in its own overlay too).
FIRST=
# "fw": the partitioned disk that boots through firmware and GRUB (xtask/src/debian_fw.rs);
# "sdboot": the same behind a disk whose ESP boots it with systemd-boot.
if [ "${1:-}" = "fw" ]; then
    BASE=/rig/debian/debian-fw.qcow2
    shift
elif [ "${1:-}" = "sdboot" ]; then
    BASE=/rig/debian/debian-fw.qcow2
    FIRST=/rig/debian/debian-sdboot.qcow2
    shift
elif [ "${1:-}" = "blank" ]; then
    BASE=
    shift
fi
[ "${1:-}" = "--" ] && shift
[ $# -gt 0 ] || { echo "TERN-DEBIAN-FAIL no VMM command line"; exit 1; }
for f in $BASE $FIRST; do
    [ -f "$f" ] || { echo "TERN-DEBIAN-FAIL $f missing (L1 has no Debian disk)"; exit 1; }
done

# The exits the guest caused, counted by L1's KVM (tracepoint histograms, kept in the kernel:
# no trace buffer, a few hundred cycles per exit), the same way for tern and for QEMU. After the
# run one line per kind: "TERN-EXITS <event>: <key>=<count> ..." with the 12 most frequent.
T=/sys/kernel/tracing
PROFILE="kvm_exit:exit_reason.hex kvm_userspace_exit:reason kvm_pio:port.hex,rw kvm_mmio:gpa.hex,type kvm_msr:ecx.hex,write kvm_page_fault:fault_address.hex"
profile_start() {
    [ -d $T/events ] || mount -t tracefs nodev $T 2>/dev/null
    [ -d $T/events/kvm ] || { echo "TERN-EXITS unavailable: no kvm tracepoints in $T"; return 0; }
    for p in $PROFILE; do
        echo "hist:keys=${p#*:}:sort=hitcount.descending:size=512" >"$T/events/kvm/${p%%:*}/trigger" 2>/dev/null ||
            echo "TERN-EXITS ${p%%:*}: cannot attach a histogram"
    done
}
profile_report() {
    [ -d $T/events/kvm ] || return 0
    for p in $PROFILE; do
        e=$T/events/kvm/${p%%:*}
        [ -f "$e/hist" ] || continue
        awk -v ev="${p%%:*}" '
            /^\{/ { k = $0; sub(/^\{ */, "", k); sub(/ *\}.*/, "", k); gsub(/[a-z_]+: +/, "", k)
                     gsub(/, +/, "/", k); while (k ~ /0x0[0-9a-f]/) sub(/0x0/, "0x", k)
                     n = $0; sub(/.*hitcount: */, "", n); sub(/ .*/, "", n)
                     if (shown < 12) line = line " " k "=" n; shown++ }
            /^ *Hits:/ { total = $2 }
            END { printf "TERN-EXITS %s: total=%s%s\n", ev, total, line }' "$e/hist"
        echo "!hist:keys=${p#*:}:sort=hitcount.descending:size=512" >"$e/trigger" 2>/dev/null
    done
}

# new_overlay OUT BASE: a qcow2 at OUT over BASE (blank, 64 MiB, when BASE is empty), added to
# the VM's disks in order; the run fails if it cannot be made.
disks=
new_overlay() {
    if [ -n "$2" ]; then
        out=$(qemu-img create -q -f qcow2 -F qcow2 -b "$2" "$1" 2>&1)
    else
        out=$(qemu-img create -q -f qcow2 "$1" 64M 2>&1)
    fi || {
        echo "TERN-DEBIAN-FAIL cannot create the overlay: $out"
        rm -f $disks
        exit 1
    }
    disks="$disks $1"
}
[ -z "$FIRST" ] || new_overlay /tmp/debian-first-$$.qcow2 "$FIRST"
new_overlay /tmp/debian-overlay-$$.qcow2 "$BASE"
for disk in $disks; do
    case "$(basename "$1")" in
        tern*) set -- "$@" --disk "path=$disk,format=qcow2" ;;
        qemu-system-*) set -- "$@" -drive "file=$disk,format=qcow2,if=virtio" ;;
        *) echo "TERN-DEBIAN-FAIL unknown VMM $1"; rm -f $disks; exit 1 ;;
    esac
done
profile_start
"$@" </dev/null
rc=$?
profile_report
rm -f $disks
# A VM given a UEFI variable file: OVMF must have written its boot entries there.
case " $* " in
    *" --uefi-vars "*)
        vars=$(printf '%s\n' "$@" | sed -n '/^--uefi-vars$/{n;p}')
        if [ -f "$vars" ] && ! cmp -s "$vars" /usr/share/OVMF/OVMF_VARS_4M.fd; then
            echo "TERN-UEFI-VARS-WRITTEN $vars"
        else
            echo "TERN-DEBIAN-FAIL OVMF wrote nothing to $vars"
        fi
        rm -f "$vars"
        ;;
esac
if [ "$rc" = 0 ]; then
    echo "TERN-DEBIAN-OK"
else
    echo "TERN-DEBIAN-FAIL the VMM exited with status $rc"
fi
exit "$rc"
