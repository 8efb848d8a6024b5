#!/bin/sh
# L1 side of the virtio-net snapshot scenario (xtask/src/scenarios.rs, "tern-snapshot-net").
# Started by the rig agent as
#
#     sh /rig/l1/snapshot-net.sh CASE -- TERN-ARGV...
#
# CASE net: builds a bridge br0 (10.77.0.1/24) with one persistent TAP tap0 in L1, starts a
# TCP listener in L1 (busybox nc) and boots TERN-ARGV with `--net tap=tap0,...`, the serial
# port writing to a file and --api-socket. The guest (guest/scenarios/snapshot-net-workload.sh)
# pings L1 continuously and sends SNET_CHUNKS paced chunks of deterministic data to the listener
# over one TCP connection. Once the guest is SNAP_AT chunks in, this script pauses the VM,
# writes a snapshot with `tern snapshot create`, kills that tern with SIGKILL, checks that L1's
# end of the connection is still established, and restores the snapshot in a new tern
# (--restore-mode lazy) on the same TAP (tap0, reopened by name: it is persistent and stays in
# the bridge while no tern holds it). The restored guest must carry on where it stopped, its
# pings must be answered again, and the transfer must complete over the restored virtio-net
# with exactly the bytes generated here (sha256); then the guest powers off and tern exits 0.
#
# Output: "TERN-SNAP-PASS CASE/CHECK: what" per passed check, "TERN-SNAP-FAIL CASE/CHECK: why"
# per failed one, the serial output of both runs, and "TERN-SNAP-OK CASE" when every check
# passed (exit 0; otherwise exit 1).

set -u
export PATH=/usr/bin:/bin:/usr/sbin:/sbin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu

case_=${1:?usage: snapshot-net.sh CASE -- TERN-ARGV...}
shift
[ "${1:-}" = "--" ] && shift
[ $# -gt 0 ] || { echo "TERN-SNAP-FAIL $case_/args: no tern command line"; exit 1; }
tern=$1

# Snapshot once the guest printed this many progress lines.
SNAP_AT=12
# Seconds the first boot may take to reach SNAP_AT, and the restored guest to finish.
BOOT_TIMEOUT=120
RESTORE_TIMEOUT=120
# Ping replies the guest must get after the restore (one ping every 0.2 s).
PINGS_AFTER=5

W=/tmp/snapshot-$case_
SOCK=$W/api.sock
SNAP=$W/snap
TAP=tap0
TAPS=$TAP
mkdir -p "$W"
mount -t tmpfs -o size=400m tmpfs "$W" || { echo "TERN-SNAP-FAIL $case_/setup: cannot mount a tmpfs on $W"; exit 1; }

. /rig/l1/snapshot-lib.sh
. /rig/l1/snapnet-lib.sh

case "$(basename "$tern")" in
    tern*) ;;
    *) fail args "snapshot-net.sh drives tern, not $tern"; finish ;;
esac
net_l1_setup

# The first run: the scenario's argv with the guest action and its parameters, the serial port
# to a file, the NIC and the API socket.
memory=
set_next=
for a in "$@"; do
    case "$set_next" in
        --cmdline) a="$a rig.action=script:snapshot-net-workload $SNET_CMDLINE" ;;
        --serial) a="file:$W/serial-1.log" ;;
        --memory) memory=$a ;;
    esac
    set -- "$@" "$a"
    set_next=$a
done
# "$@" now holds the original argv followed by the edited one; keep the edited half.
shift $(($# / 2))
set -- "$@" --net "tap=$TAP,mac=$GUEST_MAC" --api-socket "$SOCK"
echo "TERN-SNAP-RUN $case_/first: $*"
start=$(now)
"$@" > "$W/tern-1.err" 2>&1 &
pid1=$!

# Wait for the guest to be SNAP_AT chunks into its transfer (or for tern to die).
n=0
reached=
t_first=
while [ $n -le $((BOOT_TIMEOUT * 5)) ]; do
    [ -z "$t_first" ] && seen "$W/serial-1.log" 1 && t_first=$(now)
    if seen "$W/serial-1.log" "$SNAP_AT"; then
        reached=1
        t_at=$(now)
        break
    fi
    kill -0 "$pid1" 2>/dev/null || break
    n=$((n + 1))
    sleep 0.2
done
if [ -z "$reached" ]; then
    if kill -0 "$pid1" 2>/dev/null; then
        why="no progress line $SNAP_AT after ${BOOT_TIMEOUT}s (L1 received $(size "$W/recv") bytes)"
        counters "$SOCK" first
    else
        wait "$pid1"
        why="tern exited with status $? before progress line $SNAP_AT"
    fi
    kill -9 "$pid1" 2>/dev/null
    fail boot "first run: $why"
    show serial-1 "$W/serial-1.log"
    show tern-1 "$W/tern-1.err"
    finish
fi
pass boot "first run: the guest booted, brought up its virtio-net and sent $SNAP_AT chunks in $(since "$start")s"
check_device "$W/serial-1.log"

# Pause, snapshot, kill.
pause_vm
at=$(progress "$W/serial-1.log" | tail -n 1)
at=${at:-0}
pings_at=$(progress_pings "$W/serial-1.log" "$at")
got_at=$(size "$W/recv")
total=$SNET_TOTAL
if [ "${pings_at:-0}" -gt 0 ]; then
    pass ping-before "the guest had $pings_at ping replies from L1 by progress line $at"
else
    fail ping-before "no ping replies by progress line $at ('${pings_at:-}')"
fi
if grep -q '^TERN-SNAPNET-SENT' "$W/serial-1.log"; then
    fail mid-transfer "the guest had already finished its transfer when it was paused"
elif [ "$at" -ge "$SNAP_AT" ] && [ "$at" -lt "$SNET_CHUNKS" ] && [ "$got_at" -gt 0 ] && [ "$got_at" -lt "$total" ]; then
    pass mid-transfer "paused after progress line $at of $SNET_CHUNKS; L1 had received $got_at of $total bytes"
else
    fail mid-transfer "paused after progress line '$at' with $got_at of $total bytes in L1; expected line $SNAP_AT..$((SNET_CHUNKS - 1)) and a partial transfer"
fi
counters "$SOCK" paused
snapshot_and_kill
show serial-1 "$W/serial-1.log"
show tern-1 "$W/tern-1.err"
check_snapshot_files "$memory"
# With no tern, L1's end of the transfer stays open: the restored guest must continue it.
sleep 1
if established && kill -0 "$nc_pid" 2>/dev/null; then
    pass conn-open "with the first tern gone, L1's end of the TCP connection (port $PORT) is still established ($(size "$W/recv") bytes received)"
else
    fail conn-open "after the kill, L1's listener is $(kill -0 "$nc_pid" 2>/dev/null && echo running || echo gone) and port $PORT has no established connection: $(cat /proc/net/tcp /proc/net/tcp6 | grep -i ":$(printf %04X $PORT) " | tr '\n' '|')"
fi
info "$TAP after the kill: $($IP link show "$TAP" | head -n 1)"

# The restored run: a new tern from the snapshot on the same TAP, its serial port to a new file.
echos_before=$(l1_echos)
got_before=$(size "$W/recv")
t=$(now)
set -- "$tern" run --restore "$SNAP" --restore-mode lazy --serial "file:$W/serial-2.log" \
    --api-socket "$W/api2.sock"
echo "TERN-SNAP-RUN $case_/restored: $*"
"$@" > "$W/tern-2.err" 2>&1 &
pid2=$!
# Until the restored tern exits, noting when the guest's first progress line came and when L1
# got new data.
n=0
t_resumed=
t_data=
while kill -0 "$pid2" 2>/dev/null && [ $n -le $((RESTORE_TIMEOUT * 5)) ]; do
    [ -z "$t_resumed" ] && [ -n "$(progress "$W/serial-2.log" 2>/dev/null)" ] && t_resumed=$(now)
    [ -z "$t_data" ] && [ "$(size "$W/recv")" -gt "$got_before" ] && t_data=$(now)
    n=$((n + 1))
    sleep 0.2
done
if ! kill -0 "$pid2" 2>/dev/null; then
    wait "$pid2"
    rc=$?
    pid2=
    if [ "$rc" = 0 ]; then
        pass restore-exit "the restored tern ran the guest to its power-off and exited 0 after $(since "$t")s"
    else
        fail restore-exit "the restored tern exited with status $rc after $(since "$t")s: $(grep -m 3 -i -E 'error|tern:' "$W/tern-2.err" | tr '\n' '|')"
    fi
else
    # What the stuck VM is doing: counters twice, 2 s apart.
    for k in 1 2; do
        counters "$W/api2.sock" "stuck-$k"
        [ $k = 1 ] && sleep 2
    done
    "$tern" info --api-socket "$W/api2.sock" 2>&1 | sed "s/^/TERN-SNAP-INFO $case_ info: /"
    kill -9 "$pid2"
    wait "$pid2"
    pid2=
    fail restore-exit "the restored guest had not powered off after ${RESTORE_TIMEOUT}s (last progress '$(progress "$W/serial-2.log" | tail -n 1)', L1 received $(size "$W/recv") of $total bytes)"
fi
echos_after=$(l1_echos)
info "restore: first progress line $([ -n "$t_resumed" ] && between "$t" "$t_resumed" || echo never)s, first new data in L1 $([ -n "$t_data" ] && between "$t" "$t_data" || echo never)s after the restored tern started; $(between "$t_first" "$t_at")s for chunks 1..$SNAP_AT before the snapshot"
show serial-2 "$W/serial-2.log"
show tern-2 "$W/tern-2.err"
info "$TAP: $(tap_stats "$TAP")"
info "guest: $(fact "$W/serial-2.log" TERN-GUEST-NET-STATS)"

# The restored guest went on from the snapshot: no new boot, first progress line right after the
# last one of the first run (or the one after, when the snapshot cut that line).
first=$(progress "$W/serial-2.log" | head -n 1)
if grep -q -E 'TERN-GUEST-INIT-REACHED|TERN-SNAPNET-START' "$W/serial-2.log"; then
    fail resumed "the restored guest started over (its init or transfer start is in the restored log)"
elif [ -n "$first" ] && [ "$first" -gt "$at" ] && [ "$first" -le $((at + 2)) ]; then
    pass resumed "the restored run's first progress line is $first, after $at at the snapshot"
else
    fail resumed "the restored run's first progress line is '${first:-none}', expected $((at + 1)) (the snapshot was taken after $at)"
fi
check_sequence "$W/serial-1.log" "$W/serial-2.log" snapshot

# Pings after the restore: the guest's reply count grew by PINGS_AFTER or more after its second
# progress line of the restored run (certainly computed after the restore), and L1 received
# echo requests while the restored tern ran.
second=$(progress "$W/serial-2.log" | sed -n 2p)
pings_mid=$(progress_pings "$W/serial-2.log" "${second:-x}")
ping_line=$(fact "$W/serial-2.log" TERN-SNAPNET-PING)
pings_end=$(field "$ping_line" replies)
echos=$((${echos_after:-0} - ${echos_before:-0}))
if [ -n "$pings_mid" ] && [ -n "$pings_end" ] && [ "$pings_end" -ge $((pings_mid + PINGS_AFTER)) ] && [ "$echos" -ge "$PINGS_AFTER" ]; then
    pass ping-after "the restored guest got $((pings_end - pings_mid)) more ping replies after progress line $second ($pings_at at the snapshot, $pings_end in all, last seq $(field "$ping_line" last-seq)); L1 received $echos echo requests during the restored run"
else
    fail ping-after "replies at restored progress line ${second:-none}: '${pings_mid:-}', at the end: '${pings_end:-}' (need $PINGS_AFTER more); L1 got $echos echo requests during the restored run"
fi

# The transfer: L1's listener saw the connection close after all the data, and it is exactly
# the stream generated here.
check_transfer "$W/serial-2.log" "$got_before" restore
if grep -q '^TERN-SNAPNET-DONE' "$W/serial-2.log" && grep -q TERN-GUEST-POWEROFF "$W/serial-2.log"; then
    pass done "the restored guest reported its transfer done and powered off"
else
    fail done "the restored guest's log lacks TERN-SNAPNET-DONE or TERN-GUEST-POWEROFF"
fi
finish
