#!/bin/sh
# L1 side of the firmware lifecycle scenarios (xtask/src/scenarios.rs,
# "tern-debian-uefi-snapshot" and "tern-debian-uefi-migrate"). Started by the rig agent as
#
#     sh /rig/l1/fw-lifecycle.sh snapshot|migrate -- TERN-ARGV...
#
# TERN-ARGV boots the partitioned Debian disk (xtask/src/debian_fw.rs) through firmware. This
# script gives the boot a qcow2 overlay of that disk, its serial port a file and an API
# socket, and waits for GRUB, which runs on the firmware's boot services, to say it is loading
# the kernel. Then:
# - snapshot: it pauses the VM, writes a snapshot, kills that tern with SIGKILL and restores
#   the snapshot in a new tern (--restore-mode lazy);
# - migrate: it starts a destination tern (--incoming unix:...) and migrates the running VM
#   there with `tern migrate`; the source tern must then exit 0 on its own.
# The second tern must carry on where the first stopped — GRUB starts Debian, systemd reaches
# its multi-user target and the guest powers off — and exit 0. Firmware, bootloader and kernel
# never run again from the start: the second run must not show the firmware's first output.
#
# Output: "TERN-FW-PASS CASE/CHECK: what" per passed check, "TERN-FW-FAIL CASE/CHECK: why" per
# failed one, both runs' serial output, and "TERN-FW-OK CASE" when every check passed.

set -u
export PATH=/usr/bin:/bin:/usr/sbin:/sbin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu

TAG=TERN-FW
case_=${1:-}
shift
case "$case_" in
    snapshot | migrate) ;;
    *) echo "$TAG-FAIL $case_/args: the case is snapshot or migrate"; exit 1 ;;
esac
[ "${1:-}" = "--" ] && shift
[ $# -gt 0 ] || { echo "$TAG-FAIL $case_/args: no tern command line"; exit 1; }
tern=$1

BASE=/rig/debian/debian-fw.qcow2
# What GRUB prints once the firmware started it (xtask/src/debian_fw.rs).
GRUB_LINE="rig-grub: loading"
# Seconds the first run may take to reach GRUB, the migration to finish, the source to exit
# after it, and the second run to power off.
BOOT_TIMEOUT=240
MIGRATE_TIMEOUT=240
SOURCE_EXIT_TIMEOUT=30
SECOND_TIMEOUT=240

W=/tmp/fw-$case_
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
echo "$TAG-RUN $case_/first: $*"
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
# What the firmware and GRUB cost in exits (for whoever looks into firmware boot times).
"$tern" counters --api-socket "$SOCK" 2>&1 | sed "s/^/$TAG-INFO $case_ counters at GRUB: /"
# The line the firmware printed first, which the restored run must not print again.
first_line=$(tr -d '\r' < "$W/serial-1.log" | grep -m 1 -v '^[[:space:]]*$' | tr -d '\033' | cut -c 1-40)

if [ "$case_" = snapshot ]; then
    pause_vm
    snapshot_and_kill
    show serial-1 "$W/serial-1.log"
    show tern-1 "$W/tern-1.err"
    check_snapshot_files "$memory"
    t=$(now)
    set -- "$tern" run --restore "$SNAP" --restore-mode lazy --serial "file:$W/serial-2.log" \
        --api-socket "$W/api2.sock"
    echo "$TAG-RUN $case_/restored: $*"
    "$@" > "$W/tern-2.err" 2>&1 </dev/null &
    pid2=$!
else
    URL=unix:$W/migrate.sock
    # The disk is the overlay in $W on a backing file beside $BASE.
    set -- "$tern" run --incoming "$URL" --serial "file:$W/serial-2.log" --accept-dir "$W" \
        --accept-dir "$(dirname "$BASE")" --api-socket "$W/api2.sock"
    echo "$TAG-RUN $case_/destination: $*"
    "$@" > "$W/tern-2.err" 2>&1 </dev/null &
    pid2=$!
    if why=$(wait_for_line "$W/tern-2.err" "waiting for a migrating VM on unix:" "$pid2" 30); then
        pass incoming "the destination tern listens on $URL"
    else
        fail incoming "the destination: $why"
        show tern-2 "$W/tern-2.err"
        finish
    fi
    t=$(now)
    out=$(timeout "$MIGRATE_TIMEOUT" "$tern" migrate --api-socket "$SOCK" --to "$URL" 2>&1)
    rc=$?
    echo "$out" | sed "s/^/$TAG-INFO $case_ tern migrate: /"
    if [ "$rc" = 0 ]; then
        pass migrate "tern migrate exited 0 after $(since "$t")s: $(echo "$out" | grep -m 1 '^migrated to')"
    else
        fail migrate "tern migrate exited with status $rc: $(echo "$out" | tail -n 3 | tr '\n' '|')"
    fi
    if ! wait_gone "$pid1" "$SOURCE_EXIT_TIMEOUT"; then
        fail source-exit "the source tern still runs ${SOURCE_EXIT_TIMEOUT}s after tern migrate returned"
        kill -9 "$pid1"
        wait "$pid1"
    else
        wait "$pid1"
        rc=$?
        if [ "$rc" = 0 ]; then
            pass source-exit "the source tern exited 0 once the VM ran at the destination"
        else
            fail source-exit "the source tern exited with status $rc: $(tail -n 3 "$W/tern-1.err" | tr '\n' '|')"
        fi
    fi
    pid1=
    show serial-1 "$W/serial-1.log"
    show tern-1 "$W/tern-1.err"
fi

if ! wait_gone "$pid2" "$SECOND_TIMEOUT"; then
    fail second-exit "the second tern was still running after ${SECOND_TIMEOUT}s"
else
    wait "$pid2"
    rc=$?
    pid2=
    if [ "$rc" = 0 ]; then
        pass second-exit "the second tern ran the guest to its power-off and exited 0 after $(since "$t")s"
    else
        fail second-exit "the second tern exited with status $rc after $(since "$t")s"
    fi
fi
show serial-2 "$W/serial-2.log"
show tern-2 "$W/tern-2.err"
if tr -d '\r' < "$W/serial-2.log" | grep -q 'RIG-DEBIAN-STATE=running'; then
    pass systemd "the guest's systemd reached its multi-user target in the second run"
else
    fail systemd "the guest never reported RIG-DEBIAN-STATE=running in the second run"
fi
if [ -n "$first_line" ] && tr -d '\r\033' < "$W/serial-2.log" | grep -q -F -- "$first_line"; then
    fail resumed "the second run printed the first run's first line again ('$first_line'): it started over"
else
    pass resumed "the second run went on from GRUB (the first run's first line, '$first_line', did not come again)"
fi
finish
