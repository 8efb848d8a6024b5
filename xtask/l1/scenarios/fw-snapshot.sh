#!/bin/sh
# L1 side of the firmware snapshot scenario (xtask/src/scenarios.rs, "tern-debian-uefi-snapshot").
# Started by the rig agent as
#
#     sh /rig/l1/fw-snapshot.sh -- TERN-ARGV...
#
# TERN-ARGV boots the partitioned Debian disk (xtask/src/debian_fw.rs) through firmware. This
# script gives the boot a qcow2 overlay of that disk, its serial port a file and an API
# socket, and waits for GRUB, which runs on the firmware's boot services, to say it is loading
# the kernel. Then it pauses the VM, writes a snapshot, kills that tern with SIGKILL and
# restores the snapshot in a new tern (--restore-mode lazy). The restored VM must carry on
# where it stopped — GRUB starts Debian, systemd reaches its multi-user target and the guest
# powers off — and the restored tern must exit 0. Firmware, bootloader and kernel never run
# again from the start: the restored run must not show the firmware's first output.
#
# Output: "TERN-FWSNAP-PASS fw/CHECK: what" per passed check, "TERN-FWSNAP-FAIL fw/CHECK: why"
# per failed one, both runs' serial output, and "TERN-FWSNAP-OK fw" when every check passed.

set -u
export PATH=/usr/bin:/bin:/usr/sbin:/sbin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu

case_=fw
TAG=TERN-FWSNAP
[ "${1:-}" = "--" ] && shift
[ $# -gt 0 ] || { echo "$TAG-FAIL fw/args: no tern command line"; exit 1; }
tern=$1

BASE=/rig/debian/debian-fw.qcow2
# What GRUB prints once the firmware started it (xtask/src/debian_fw.rs).
GRUB_LINE="rig-grub: loading"
# Seconds the first run may take to reach GRUB, and the restored run to power off.
BOOT_TIMEOUT=240
RESTORE_TIMEOUT=240

W=/tmp/fw-snapshot
SOCK=$W/api.sock
SNAP=$W/snap
rm -rf "$W"
mkdir -p "$W"

finish_extra() { rm -rf "$W"; }
. /rig/l1/snapshot-lib.sh

[ -f "$BASE" ] || { fail setup "$BASE missing (L1 has no Debian disk)"; finish; }
if ! out=$(qemu-img create -q -f qcow2 -F qcow2 -b "$BASE" "$W/disk.qcow2" 2>&1); then
    fail setup "cannot create the overlay: $out"
    finish
fi

# The first run: the scenario's argv with the serial port to a file, the disk and the API socket.
memory=
set_next=
for a in "$@"; do
    case "$set_next" in
        --serial) a="file:$W/serial-1.log" ;;
        --memory) memory=$a ;;
    esac
    set -- "$@" "$a"
    set_next=$a
done
shift $(($# / 2))
set -- "$@" --disk "path=$W/disk.qcow2,format=qcow2" --api-socket "$SOCK"
echo "$TAG-RUN fw/first: $*"
start=$(now)
"$@" > "$W/tern-1.err" 2>&1 </dev/null &
pid1=$!

if ! why=$(wait_for_line "$W/serial-1.log" "$GRUB_LINE" "$pid1" "$BOOT_TIMEOUT"); then
    fail boot "first run: $why"
    show serial-1 "$W/serial-1.log"
    show tern-1 "$W/tern-1.err"
    finish
fi
pass boot "first run: the firmware started GRUB from the disk in $(since "$start")s"
# The line the firmware printed first, which the restored run must not print again.
first_line=$(tr -d '\r' < "$W/serial-1.log" | grep -m 1 -v '^[[:space:]]*$' | tr -d '\033' | cut -c 1-40)

pause_vm
snapshot_and_kill
show serial-1 "$W/serial-1.log"
show tern-1 "$W/tern-1.err"
check_snapshot_files "$memory"

t=$(now)
set -- "$tern" run --restore "$SNAP" --restore-mode lazy --serial "file:$W/serial-2.log" \
    --api-socket "$W/api2.sock"
echo "$TAG-RUN fw/restored: $*"
"$@" > "$W/tern-2.err" 2>&1 </dev/null &
pid2=$!
n=0
while kill -0 "$pid2" 2>/dev/null && [ $n -le $((RESTORE_TIMEOUT * 2)) ]; do
    n=$((n + 1))
    sleep 0.5
done
if kill -0 "$pid2" 2>/dev/null; then
    fail restore-exit "the restored tern was still running after ${RESTORE_TIMEOUT}s"
else
    wait "$pid2"
    rc=$?
    pid2=
    if [ "$rc" = 0 ]; then
        pass restore-exit "the restored tern ran the guest to its power-off and exited 0 after $(since "$t")s"
    else
        fail restore-exit "the restored tern exited with status $rc after $(since "$t")s"
    fi
fi
show serial-2 "$W/serial-2.log"
show tern-2 "$W/tern-2.err"
if tr -d '\r' < "$W/serial-2.log" | grep -q 'RIG-DEBIAN-STATE=running'; then
    pass systemd "the restored guest's systemd reached its multi-user target"
else
    fail systemd "the restored guest never reported RIG-DEBIAN-STATE=running"
fi
if [ -n "$first_line" ] && tr -d '\r\033' < "$W/serial-2.log" | grep -q -F -- "$first_line"; then
    fail resumed "the restored run printed the first run's first line again ('$first_line'): it started over"
else
    pass resumed "the restored run went on from GRUB (the first run's first line, '$first_line', did not come again)"
fi
finish
