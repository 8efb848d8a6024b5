#!/bin/sh
# L1 side of the snapshot scenario (xtask/src/scenarios.rs, "tern-snapshot-blk-console").
# Started by the rig agent as
#
#     sh /rig/l1/snapshot.sh CASE -- TERN-ARGV...
#
# CASE blk-console: boots TERN-ARGV with the root file system on a virtio-blk disk (a copy of
# the rig's ext4 image, on a tmpfs), a virtio-console writing to a file, the serial port writing
# to a file and --api-socket; the guest runs its snapshot-workload script (writes numbered files
# with a progress line per file on both consoles). Once the guest is a few files in, this
# script pauses the VM, writes a snapshot with `tern snapshot create`, kills that tern with
# SIGKILL, and restores the snapshot in a new tern (--restore-mode lazy) whose serial port and
# console write to new files. The restored guest must carry on where it stopped (not start
# over), finish, print its final line on both consoles and power off; then the disk image is
# checked with tools that share no code with tern: e2fsck, debugfs, sha256sum, against content
# generated here.
#
# Output: "TERN-SNAP-PASS CASE/CHECK: what" per passed check, "TERN-SNAP-FAIL CASE/CHECK: why"
# per failed one, the consoles' output of both runs, and "TERN-SNAP-OK CASE" when every check
# passed (exit 0; otherwise exit 1).

set -u
export PATH=/usr/bin:/bin:/usr/sbin:/sbin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu

case_=${1:?usage: snapshot.sh CASE -- TERN-ARGV...}
shift
[ "${1:-}" = "--" ] && shift
[ $# -gt 0 ] || { echo "TERN-SNAP-FAIL $case_/args: no tern command line"; exit 1; }
tern=$1

# The pristine disk image (BLK_ROOT in xtask/src/images.rs).
BLK_ROOT=/rig/blk/root.ext4
# The guest workload (xtask/guest/scenarios/snapshot-workload.sh): file count and size.
SNAP_FILES=40
SNAP_FILE_BYTES=131072
# Snapshot once the guest printed this many progress lines.
SNAP_AT=5
# Seconds the first boot may take to reach SNAP_AT, and the restored guest to finish.
BOOT_TIMEOUT=100
RESTORE_TIMEOUT=100

W=/tmp/snapshot-$case_
SOCK=$W/api.sock
SNAP=$W/snap
mkdir -p "$W"
mount -t tmpfs -o size=640m tmpfs "$W" || { echo "TERN-SNAP-FAIL $case_/setup: cannot mount a tmpfs on $W"; exit 1; }

# Nothing of this script's own to clean up.
finish_extra() { :; }
. /rig/l1/snapshot-lib.sh
sha() { sha256sum "$1" | cut -d' ' -f1; }
# progress FILE: the progress numbers in a console log, one per line, in order.
progress() { tr -d '\r' < "$1" | sed -n 's/^TERN-SNAP-PROGRESS \([0-9][0-9]*\)$/\1/p'; }
# seen LOG N: the console log has progress line N.
seen() { progress "$1" 2>/dev/null | grep -q -x "$2"; }
# rate T1 T2 FILES: seconds per file.
rate() { echo "$1 $2 $3" | awk '{ printf "%.2f", ($2 - $1) / $3 }'; }
# snap_content N: file N's content, as the guest's snapshot-workload.sh generates it.
snap_content() {
    awk -v t="$1" -v n=$((SNAP_FILE_BYTES / 20 + 1)) \
        'BEGIN { for (i = 0; i < n; i++) printf "tern-snap-%02d-%06d\n", t, i }' |
        head -c "$SNAP_FILE_BYTES"
}
# sequence_ok FILE1 FILE2 WHAT ID: the two console logs, one after the other, hold the progress
# lines 1..SNAP_FILES exactly once each and in order (a line cut by the snapshot is whole again
# once the logs are joined).
sequence_ok() {
    local got want
    cat "$1" "$2" > "$W/joined"
    got=$(progress "$W/joined" | tr '\n' ' ')
    want=$(seq 1 "$SNAP_FILES" | tr '\n' ' ')
    if [ "$got" = "$want" ]; then
        pass "$4" "$3: progress 1..$SNAP_FILES, each once, in order, across the snapshot"
    else
        fail "$4" "$3: progress lines across both runs are '$got', expected 1..$SNAP_FILES"
    fi
}

[ -f "$BLK_ROOT" ] || { fail setup "$BLK_ROOT missing from L1"; finish; }
for tool in debugfs e2fsck; do
    command -v $tool >/dev/null || { fail setup "$tool missing from L1"; finish; }
done
case "$(basename "$tern")" in
    tern*) ;;
    *) fail args "snapshot.sh drives tern, not $tern"; finish ;;
esac

img=$W/root.img
cp "$BLK_ROOT" "$img"

# The first run: the scenario's argv with the guest action, the serial port to a file, the
# disk, the console and the API socket.
memory=
set_next=
for a in "$@"; do
    case "$set_next" in
        --cmdline) a="$a rig.action=script:snapshot-workload root=/dev/vda rig.modules=virtio_console" ;;
        --serial) a="file:$W/serial-1.log" ;;
        --memory) memory=$a ;;
    esac
    set -- "$@" "$a"
    set_next=$a
done
# "$@" now holds the original argv followed by the edited one; keep the edited half.
shift $(($# / 2))
set -- "$@" --disk "path=$img,format=raw" --console "file:$W/hvc0-1.log" --api-socket "$SOCK"
echo "TERN-SNAP-RUN $case_/first: $*"
start=$(now)
"$@" > "$W/tern-1.err" 2>&1 &
pid1=$!

# Wait for the guest to be SNAP_AT files into its workload (or for tern to die).
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
        why="no progress line $SNAP_AT after ${BOOT_TIMEOUT}s"
    else
        wait "$pid1"
        why="tern exited with status $? before progress line $SNAP_AT"
    fi
    kill -9 "$pid1" 2>/dev/null
    fail boot "first run: $why"
    show serial-1 "$W/serial-1.log"
    show hvc0-1 "$W/hvc0-1.log"
    show tern-1 "$W/tern-1.err"
    finish
fi
pass boot "first run: the guest booted from /dev/vda and wrote $SNAP_AT files in $(since "$start")s"
# The guest's ACPI namespace has tern's VM generation ID device (the workload reports it).
vgen=$(sed -n 's/^TERN-SNAP-VMGENID //p' "$W/serial-1.log" | tr -d '\r' | head -n 1)
case "$vgen" in
    '\_SB_.VGEN') pass vmgenid-acpi "the guest found the VM generation ID device VMGENCTR at $vgen" ;;
    *) fail vmgenid-acpi "the guest reports the VM generation ID device as '${vgen:-nothing}', expected \\_SB_.VGEN" ;;
esac

# Pause, snapshot, kill.
pause_vm
at=$(progress "$W/serial-1.log" | tail -n 1)
at=${at:-0}
if tr -d '\r' < "$W/serial-1.log" | grep -q '^TERN-SNAP-DONE'; then
    fail mid-workload "the guest had already finished its workload when it was paused"
elif [ "$at" -ge "$SNAP_AT" ] && [ "$at" -lt "$SNAP_FILES" ]; then
    pass mid-workload "paused after progress line $at of $SNAP_FILES"
else
    fail mid-workload "paused after progress line '$at', expected $SNAP_AT..$((SNAP_FILES - 1))"
fi
snapshot_and_kill
show serial-1 "$W/serial-1.log"
show hvc0-1 "$W/hvc0-1.log"
show tern-1 "$W/tern-1.err"
check_snapshot_files "$memory"

# The restored run: a new tern from the snapshot, its consoles to new files.
t=$(now)
set -- "$tern" run --restore "$SNAP" --restore-mode lazy --serial "file:$W/serial-2.log" \
    --console "file:$W/hvc0-2.log" --api-socket "$W/api2.sock"
echo "TERN-SNAP-RUN $case_/restored: $*"
"$@" > "$W/tern-2.err" 2>&1 &
pid2=$!
# Until the restored tern exits, noting when the guest's first and last progress lines came.
n=0
t_resumed=
t_last=
while kill -0 "$pid2" 2>/dev/null && [ $n -le $((RESTORE_TIMEOUT * 2)) ]; do
    [ -z "$t_resumed" ] && [ -n "$(progress "$W/serial-2.log" 2>/dev/null)" ] && t_resumed=$(now)
    [ -z "$t_last" ] && seen "$W/serial-2.log" "$SNAP_FILES" && t_last=$(now)
    n=$((n + 1))
    sleep 0.5
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
    # What the stuck VM is doing: exit counts twice, 2 s apart (vCPUs running or idle), and
    # the device counters.
    for k in 1 2; do
        "$tern" counters --api-socket "$W/api2.sock" 2>&1 | sed "s/^/TERN-SNAP-INFO $case_ counters $k: /"
        [ $k = 1 ] && sleep 2
    done
    "$tern" info --api-socket "$W/api2.sock" 2>&1 | sed "s/^/TERN-SNAP-INFO $case_ info: /"
    kill -9 "$pid2"
    wait "$pid2"
    pid2=
    fail restore-exit "the restored guest had not powered off after ${RESTORE_TIMEOUT}s (last progress: serial '$(progress "$W/serial-2.log" | tail -n 1)', hvc0 '$(progress "$W/hvc0-2.log" | tail -n 1)')"
fi
if [ -n "$t_first" ] && [ -n "$t_resumed" ] && [ -n "$t_last" ]; then
    first=$(progress "$W/serial-2.log" | head -n 1)
    echo "TERN-SNAP-INFO $case_: $(rate "$t_first" "$t_at" $((SNAP_AT - 1)))s per file before the snapshot, $(rate "$t_resumed" "$t_last" $((SNAP_FILES - first)))s per file after the restore (first progress line $(between "$t" "$t_resumed")s after tern started); progress polled every 0.2 s / 0.5 s"
fi
show serial-2 "$W/serial-2.log"
show hvc0-2 "$W/hvc0-2.log"
show tern-2 "$W/tern-2.err"

# The restored guest went on from the snapshot: no new boot, first progress line right after
# the last one of the first run (or the one after, when the snapshot cut that line).
for log in serial hvc0; do
    at=$(progress "$W/$log-1.log" | tail -n 1)
    at=${at:-0}
    first=$(progress "$W/$log-2.log" | head -n 1)
    if grep -q -E 'TERN-GUEST-INIT-REACHED|TERN-SNAP-START' "$W/$log-2.log"; then
        fail "$log-resumed" "$log: the restored guest started over (its init or workload start is in the restored log)"
    elif [ -n "$first" ] && [ "$first" -gt "$at" ] && [ "$first" -le $((at + 2)) ]; then
        pass "$log-resumed" "$log: the restored run's first progress line is $first, after $at at the snapshot"
    else
        fail "$log-resumed" "$log: the restored run's first progress line is '${first:-none}', expected $((at + 1)) (the snapshot was taken after $at)"
    fi
done
sequence_ok "$W/serial-1.log" "$W/serial-2.log" serial serial-sequence
sequence_ok "$W/hvc0-1.log" "$W/hvc0-2.log" hvc0 hvc0-sequence

# The files, the manifest and the final line, against content generated here.
: > "$W/want-manifest"
i=1
while [ $i -le $SNAP_FILES ]; do
    f=f$(printf %02d $i)
    snap_content $i > "$W/want"
    echo "$(sha "$W/want")  $f" >> "$W/want-manifest"
    i=$((i + 1))
done
want_done=$(sha "$W/want-manifest")
for log in serial hvc0; do
    got=$(tr -d '\r' < "$W/$log-2.log" | sed -n 's/^TERN-SNAP-DONE \([0-9a-f]*\)$/\1/p' | head -n 1)
    if [ "$got" = "$want_done" ]; then
        pass "$log-done" "$log: the restored guest's final line carries the expected manifest sha256"
    else
        fail "$log-done" "$log: final line 'TERN-SNAP-DONE ${got:-<missing>}', expected TERN-SNAP-DONE $want_done"
    fi
done
if out=$(e2fsck -fn "$img" 2>&1); then
    pass fsck "e2fsck -fn finds the image clean"
else
    fail fsck "e2fsck -fn: $(echo "$out" | tail -n 5 | tr '\n' '|')"
fi
mkdir "$W/dump"
debugfs -R "rdump /data/snap $W/dump" "$img" > "$W/debugfs.out" 2>&1
bad=
i=1
while [ $i -le $SNAP_FILES ]; do
    f=f$(printf %02d $i)
    want=$(sed -n "${i}p" "$W/want-manifest" | cut -d' ' -f1)
    if [ ! -f "$W/dump/snap/$f" ]; then
        bad="$bad $f:missing"
    elif [ "$(sha "$W/dump/snap/$f")" != "$want" ]; then
        bad="$bad $f:$(stat -c %s "$W/dump/snap/$f")-bytes-wrong-content"
    fi
    i=$((i + 1))
done
if [ -z "$bad" ]; then
    pass files "debugfs: all $SNAP_FILES files in /data/snap have the expected content"
else
    fail files "debugfs: wrong files in /data/snap:$bad $(grep -m 2 -v '^debugfs' "$W/debugfs.out" | tr '\n' '|')"
fi
if [ -f "$W/dump/snap/MANIFEST" ] && cmp -s "$W/dump/snap/MANIFEST" "$W/want-manifest"; then
    pass manifest "debugfs: the guest's /data/snap/MANIFEST lists the expected sha256 of every file"
else
    fail manifest "debugfs: /data/snap/MANIFEST differs from the expected one: $(head -c 300 "$W/dump/snap/MANIFEST" 2>/dev/null | tr '\n' '|')"
fi
finish
