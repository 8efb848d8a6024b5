#!/bin/sh
# L1 side of the live-migration scenario (xtask/src/scenarios.rs, "tern-migrate-net").
# Started by the rig agent as
#
#     sh /rig/l1/migrate-net.sh CASE -- TERN-ARGV...
#
# CASE migrate: builds a bridge br0 (10.77.0.1/24) with two persistent TAPs tap0 and tap1 in L1,
# starts a TCP listener in L1 (busybox nc) and boots TERN-ARGV (the source) with
# `--net tap=tap0,...`, a virtio-blk data disk (a copy of the rig's ext4 image, on a tmpfs), the
# serial port writing to a file and --api-socket. The guest
# (guest/scenarios/migrate-net-workload.sh) mounts the disk, pings L1 continuously, sends
# SNET_CHUNKS paced chunks of deterministic data to the listener over one TCP connection and
# appends a synced record per chunk to a file on the disk. Once the guest is MIGRATE_AT chunks
# in, this script starts a destination tern (`tern run --incoming unix:... --tap-remap
# tap0=tap1`, its serial port to a new file) and live-migrates the guest to it with `tern
# migrate`. Both terns name the same image path: the source holds its lock until the
# switch-over, the destination takes it then. The source tern must exit 0 once the VM runs at
# the destination; the guest must carry on there (not start over) with its MAC behind tap1, its
# pings must be answered again, the transfer must complete over the same connection with
# exactly the bytes generated here (sha256), and the guest must power off (the destination
# exiting 0). Then the image is checked with tools that share no code with tern: e2fsck and
# debugfs, against the records generated here. L1 also pings the guest every 0.2 s from before
# the migration to its end, to measure in L1's time how long the guest was unreachable.
#
# Output: "TERN-MIG-PASS CASE/CHECK: what" per passed check, "TERN-MIG-FAIL CASE/CHECK: why"
# per failed one, the serial output and tern's stderr of both terns, and "TERN-MIG-OK CASE"
# when every check passed (exit 0; otherwise exit 1).

set -u
export PATH=/usr/bin:/bin:/usr/sbin:/sbin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu

TAG=TERN-MIG
case_=${1:?usage: migrate-net.sh CASE -- TERN-ARGV...}
shift
[ "${1:-}" = "--" ] && shift
[ $# -gt 0 ] || { echo "$TAG-FAIL $case_/args: no tern command line"; exit 1; }
tern=$1

# The pristine ext4 image the data disk is copied from (BLK_ROOT in xtask/src/images.rs).
BLK_ROOT=/rig/blk/root.ext4
# Migrate once the guest printed this many progress lines.
MIGRATE_AT=12
# Seconds the source may take to reach MIGRATE_AT, the destination to start listening, tern
# migrate to finish, the source to exit after it, and the destination to run the guest to its
# power-off.
BOOT_TIMEOUT=120
LISTEN_TIMEOUT=10
MIGRATE_TIMEOUT=150
SOURCE_EXIT_TIMEOUT=20
FINISH_TIMEOUT=120
# Ping replies the guest must get after the switch-over (one ping every 0.2 s).
PINGS_AFTER=5

W=/tmp/migrate-$case_
SOCK=$W/api.sock
SOCK2=$W/api2.sock
URL=unix:$W/m.sock
TAPS="tap0 tap1"
mkdir -p "$W"
mount -t tmpfs -o size=400m tmpfs "$W" || { echo "$TAG-FAIL $case_/setup: cannot mount a tmpfs on $W"; exit 1; }

. /rig/l1/snapshot-lib.sh
. /rig/l1/snapnet-lib.sh
# L1's pings to the guest, on top of the network and listener.
finish_extra() {
    [ -n "${ping_pid:-}" ] && kill "$ping_pid" 2>/dev/null
    [ -n "${nc_pid:-}" ] && kill "$nc_pid" 2>/dev/null
    net_teardown
}
# record_lines FROM TO: the records the guest appends, as migrate-net-workload.sh writes them.
record_lines() { seq "$1" "$2" | awk '{ printf "tern-migrate-record-%06d\n", $1 }'; }
# ping_gap LOG: "missing:N after-seq:S replies:R" for L1's ping log: the longest run of missing
# replies (N, each 0.2 s), after reply S, and the replies in all.
ping_gap() {
    sed -n 's/.* seq=\([0-9]*\) .*/\1/p' "$1" |
        awk 'NR > 1 && $1 - prev - 1 > gap { gap = $1 - prev - 1; at = prev } { prev = $1; n++ }
             END { printf "missing:%d after-seq:%s replies:%d", gap, (at == "" ? "-" : at), n }'
}

case "$(basename "$tern")" in
    tern*) ;;
    *) fail args "migrate-net.sh drives tern, not $tern"; finish ;;
esac
[ -f "$BLK_ROOT" ] || { fail setup "$BLK_ROOT missing from L1"; finish; }
for tool in debugfs e2fsck; do
    command -v $tool >/dev/null || { fail setup "$tool missing from L1"; finish; }
done
img=$W/data.ext4
cp "$BLK_ROOT" "$img" || { fail setup "cannot copy $BLK_ROOT to $img"; finish; }
net_l1_setup

# The source: the scenario's argv with the guest action and its parameters, the serial port to
# a file, the NIC on tap0, the data disk and the API socket.
# The destination accepts the files the source names where they are: the data disk in $W,
# the kernel and initrd where the argv has them.
accept="--accept-dir $W"
set_next=
for a in "$@"; do
    case "$set_next" in
        --cmdline) a="$a rig.action=script:migrate-net-workload $SNET_CMDLINE" ;;
        --serial) a="file:$W/serial-1.log" ;;
        --kernel | --initrd) accept="$accept --accept-dir $(dirname "$a")" ;;
    esac
    set -- "$@" "$a"
    set_next=$a
done
# "$@" now holds the original argv followed by the edited one; keep the edited half.
shift $(($# / 2))
set -- "$@" --net "tap=tap0,mac=$GUEST_MAC" --disk "path=$img,format=raw" --api-socket "$SOCK"
echo "$TAG-RUN $case_/source: $*"
start=$(now)
"$@" > "$W/tern-1.err" 2>&1 &
pid1=$!

# Wait for the guest to be MIGRATE_AT chunks into its transfer (or for tern to die).
n=0
reached=
while [ $n -le $((BOOT_TIMEOUT * 5)) ]; do
    if seen "$W/serial-1.log" "$MIGRATE_AT"; then
        reached=1
        break
    fi
    kill -0 "$pid1" 2>/dev/null || break
    n=$((n + 1))
    sleep 0.2
done
if [ -z "$reached" ]; then
    if kill -0 "$pid1" 2>/dev/null; then
        why="no progress line $MIGRATE_AT after ${BOOT_TIMEOUT}s (L1 received $(size "$W/recv") bytes)"
        counters "$SOCK" source
    else
        wait "$pid1"
        why="tern exited with status $? before progress line $MIGRATE_AT"
    fi
    fail boot "source: $why"
    show serial-1 "$W/serial-1.log"
    show tern-1 "$W/tern-1.err"
    finish
fi
pass boot "source: the guest booted, brought up its virtio-net and sent $MIGRATE_AT chunks in $(since "$start")s"
check_device "$W/serial-1.log"
if grep -q '^TERN-MIGNET-DISK=mounted' "$W/serial-1.log"; then
    pass disk "the guest mounted its virtio-blk disk (ext4) on /data and writes a record per chunk"
else
    fail disk "the guest did not report its data disk mounted"
fi
at=$(progress "$W/serial-1.log" | tail -n 1)
pings_at=$(progress_pings "$W/serial-1.log" "$at")
if [ "${pings_at:-0}" -gt 0 ]; then
    pass ping-before "the guest had $pings_at ping replies from L1 by progress line $at"
else
    fail ping-before "no ping replies by progress line $at ('${pings_at:-}')"
fi

# L1 pings the guest from here to the end (the gap in its replies is the guest's outage as L1
# sees it).
ping -i 0.2 "$GUEST_IP" > "$W/l1-ping.log" 2>&1 &
ping_pid=$!

# The destination: waits on URL, the guest's TAP moves to tap1.
# shellcheck disable=SC2086 # $accept is a list of flags; the directories have no spaces
set -- "$tern" run --incoming "$URL" --tap-remap tap0=tap1 --serial "file:$W/serial-2.log" \
    $accept --api-socket "$SOCK2"
echo "$TAG-RUN $case_/destination: $*"
"$@" > "$W/tern-2.err" 2>&1 &
pid2=$!
n=0
while [ $n -lt $((LISTEN_TIMEOUT * 10)) ] && ! grep -q "waiting for a migrating VM on unix:" "$W/tern-2.err"; do
    kill -0 "$pid2" 2>/dev/null || break
    n=$((n + 1))
    sleep 0.1
done
if grep -q "waiting for a migrating VM on unix:" "$W/tern-2.err" && [ -S "${URL#unix:}" ]; then
    pass incoming "the destination tern listens on $URL: $(grep -m 1 "waiting for a migrating VM" "$W/tern-2.err")"
else
    fail incoming "the destination tern is not waiting on $URL after ${LISTEN_TIMEOUT}s: $(head -c 300 "$W/tern-2.err" | tr '\n' '|')"
    show serial-1 "$W/serial-1.log"
    show tern-1 "$W/tern-1.err"
    show tern-2 "$W/tern-2.err"
    finish
fi

# The migration.
echos_before=$(l1_echos)
got_before=$(size "$W/recv")
t=$(now)
out=$(timeout "$MIGRATE_TIMEOUT" "$tern" migrate --api-socket "$SOCK" --to "$URL" 2>&1)
rc=$?
t_migrated=$(now)
echo "$out" | sed "s/^/$TAG-INFO $case_ tern migrate: /"
downtime=$(echo "$out" | sed -n 's/^migrated to unix:.*: downtime \([0-9.]*\) ms.*/\1/p' | head -n 1)
if [ "$rc" = 0 ] && [ -n "$downtime" ]; then
    pass migrate "tern migrate exited 0 after $(between "$t" "$t_migrated")s: $(echo "$out" | grep '^migrated to' | head -n 1)"
else
    fail migrate "tern migrate exited with status $rc after $(between "$t" "$t_migrated")s: $(echo "$out" | tail -n 3 | tr '\n' '|')"
    counters "$SOCK" source
fi

# The source tern ends on its own once the VM runs at the destination.
n=0
while kill -0 "$pid1" 2>/dev/null && [ $n -lt $((SOURCE_EXIT_TIMEOUT * 5)) ]; do
    n=$((n + 1))
    sleep 0.2
done
if kill -0 "$pid1" 2>/dev/null; then
    fail source-exit "the source tern still runs ${SOURCE_EXIT_TIMEOUT}s after tern migrate returned"
    kill -9 "$pid1"
    wait "$pid1"
else
    wait "$pid1"
    rc=$?
    said=$(grep -m 1 "the VM migrated to unix:.* and runs there" "$W/tern-1.err")
    if [ "$rc" = 0 ] && [ -n "$said" ]; then
        pass source-exit "the source tern exited 0: $said"
    else
        fail source-exit "the source tern exited with status $rc: $(tail -n 3 "$W/tern-1.err" | tr '\n' '|')"
    fi
fi
pid1=
show serial-1 "$W/serial-1.log"
show tern-1 "$W/tern-1.err"

# The destination runs the guest to its power-off; note when its first progress line came and
# when L1 got new data.
n=0
t_resumed=
t_data=
while kill -0 "$pid2" 2>/dev/null && [ $n -le $((FINISH_TIMEOUT * 5)) ]; do
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
        pass dest-exit "the destination tern ran the guest to its power-off and exited 0 $(since "$t_migrated")s after the migration"
    else
        fail dest-exit "the destination tern exited with status $rc: $(grep -m 3 -i -E 'error|tern:' "$W/tern-2.err" | tr '\n' '|')"
    fi
else
    for k in 1 2; do
        counters "$SOCK2" "stuck-$k"
        [ $k = 1 ] && sleep 2
    done
    "$tern" info --api-socket "$SOCK2" 2>&1 | sed "s/^/$TAG-INFO $case_ info: /"
    kill -9 "$pid2"
    wait "$pid2"
    pid2=
    fail dest-exit "the guest had not powered off ${FINISH_TIMEOUT}s after the migration (last progress '$(progress "$W/serial-2.log" | tail -n 1)', L1 received $(size "$W/recv") of $SNET_TOTAL bytes)"
fi
echos_after=$(l1_echos)
kill "$ping_pid" 2>/dev/null
wait "$ping_pid" 2>/dev/null
ping_pid=
info "migration: started $(between "$start" "$t")s after the source, tern migrate took $(between "$t" "$t_migrated")s (downtime ${downtime:-?} ms); first progress line at the destination $([ -n "$t_resumed" ] && between "$t_migrated" "$t_resumed" || echo never)s, first new data in L1 $([ -n "$t_data" ] && between "$t" "$t_data" || echo never)s after tern migrate started"
show serial-2 "$W/serial-2.log"
show tern-2 "$W/tern-2.err"
show l1-ping "$W/l1-ping.log"
for tp in $TAPS; do
    info "$tp: $(tap_stats "$tp")"
done
info "guest: $(fact "$W/serial-2.log" TERN-GUEST-NET-STATS)"

# The guest went on at the destination, mid-transfer: no new boot, the source's log ends before
# the transfer's end and the destination's carries on from there (its first progress line is
# the next one, or the one after when the switch-over cut a line before its number ended).
last1=$(progress "$W/serial-1.log" | tail -n 1)
first2=$(progress "$W/serial-2.log" | head -n 1)
if grep -q -E 'TERN-GUEST-INIT-REACHED|TERN-SNAPNET-START' "$W/serial-2.log"; then
    fail destination "the guest started over at the destination (its init or transfer start is in the destination's log)"
elif grep -q '^TERN-SNAPNET-SENT' "$W/serial-1.log"; then
    fail destination "the guest had finished its transfer before the switch-over (the source's log has TERN-SNAPNET-SENT)"
elif [ -n "$first2" ] && [ -n "$last1" ] && [ "$first2" -gt "$last1" ] && [ "$first2" -le $((last1 + 2)) ]; then
    pass destination "the guest runs at the destination: its first progress line there is $first2, after $last1 at the source (migration started at $at of $SNET_CHUNKS)"
else
    fail destination "the destination's first progress line is '${first2:-none}', the source's last '${last1:-none}'"
fi
check_sequence "$W/serial-1.log" "$W/serial-2.log" migration

# Pings after the switch-over: the guest's reply count grew by PINGS_AFTER or more after its
# second progress line at the destination, and L1 received echo requests meanwhile. L1's own
# pings to the guest show how long it was unreachable.
second=$(progress "$W/serial-2.log" | sed -n 2p)
pings_mid=$(progress_pings "$W/serial-2.log" "${second:-x}")
ping_line=$(fact "$W/serial-2.log" TERN-SNAPNET-PING)
pings_end=$(field "$ping_line" replies)
echos=$((${echos_after:-0} - ${echos_before:-0}))
gap=$(ping_gap "$W/l1-ping.log")
missing=$(field "$gap" missing)
gap_s=$(echo "${missing:-0}" | awk '{ printf "%.1f", $1 * 0.2 }')
guest_gap=$(fact "$W/serial-2.log" TERN-MIGNET-PING-GAP)
guest_gap_s=$(echo "$(field "$guest_gap" missing)" | awk '{ printf "%.1f", $1 * 0.2 }')
info "pings across the switch-over: L1 to the guest $gap (longest gap ~${gap_s}s of L1's time); the guest to L1 ${guest_gap:-?} (longest gap ~${guest_gap_s}s of the guest's time)"
if [ -n "$pings_mid" ] && [ -n "$pings_end" ] && [ "$pings_end" -ge $((pings_mid + PINGS_AFTER)) ] && [ "$echos" -ge "$PINGS_AFTER" ]; then
    pass ping-after "the guest got $((pings_end - pings_mid)) more ping replies after its progress line $second at the destination ($pings_at at $at, $pings_end in all, last seq $(field "$ping_line" last-seq)); L1 received $echos echo requests from tern migrate on; the longest gap in replies ~${gap_s}s for L1's pings to the guest, ~${guest_gap_s}s for the guest's"
else
    fail ping-after "replies at the destination's progress line ${second:-none}: '${pings_mid:-}', at the end: '${pings_end:-}' (need $PINGS_AFTER more); L1 got $echos echo requests from tern migrate on; L1's pings: $gap"
fi

# The transfer, over the connection the source opened.
check_transfer "$W/serial-2.log" "$got_before" migration

# The disk: clean, and every record there once, in order.
if out=$(e2fsck -f -n "$img" 2>&1); then
    pass fsck "e2fsck -f -n: the data disk's file system is clean ($(echo "$out" | tail -n 1))"
else
    fail fsck "e2fsck -f -n found problems: $(echo "$out" | tail -n 8 | tr '\n' '|')"
fi
debugfs -R "cat /migrate/records" "$img" > "$W/records" 2> "$W/debugfs.err"
record_lines 1 "$SNET_CHUNKS" > "$W/records-want"
said=$(fact "$W/serial-2.log" TERN-MIGNET-RECORDS)
want_sum=$(sha256sum < "$W/records-want" | cut -d' ' -f1)
if cmp -s "$W/records" "$W/records-want" && [ "$(field "$said" count)" = "$SNET_CHUNKS" ] && [ "$(field "$said" sha256)" = "$want_sum" ]; then
    pass records "the disk holds all $SNET_CHUNKS records, in order, as the guest read them back (sha256 $want_sum)"
else
    fail records "the disk's /migrate/records has $(wc -l < "$W/records") lines (first difference: $(cmp "$W/records-want" "$W/records" 2>&1 | head -n 1)); the guest said '${said:-nothing}'; $(head -c 200 "$W/debugfs.err")"
fi
if grep -q '^TERN-SNAPNET-DONE' "$W/serial-2.log" && grep -q '^TERN-MIGNET-UNMOUNTED' "$W/serial-2.log" &&
    grep -q TERN-GUEST-POWEROFF "$W/serial-2.log"; then
    pass done "the guest reported its transfer done, unmounted its disk and powered off at the destination"
else
    fail done "the destination's log lacks TERN-SNAPNET-DONE, TERN-MIGNET-UNMOUNTED or TERN-GUEST-POWEROFF"
fi
finish
