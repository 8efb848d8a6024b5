# tern-snapshot-blk-console: a workload that the L1 script (xtask/l1/scenarios/snapshot.sh)
# snapshots in the middle, kills, and restores in a new tern. The root file system is the
# virtio-blk disk /dev/vda; the virtio-console hvc0 (virtio_console loaded by the initramfs,
# rig.modules=) carries a copy of every progress line.
#
# Writes SNAP_FILES files of SNAP_FILE_BYTES deterministic bytes to /data/snap (f01, f02, ...),
# syncing after each and printing "TERN-SNAP-PROGRESS n" on the serial console and on hvc0.
# Then writes /data/snap/MANIFEST (sha256sum of every file, as read back from the page cache;
# the same sums must come back from the disk after dropping the caches), remounts / read-only
# and prints "TERN-SNAP-DONE <sha256 of MANIFEST>" on both consoles before powering off.
# Both sides must agree on the names, sizes and content below (snap_content).
. /scenarios/blk-lib.sh

SNAP_FILES=40
SNAP_FILE_BYTES=131072
# Pause between files, so the L1 script can snapshot the guest while it is half way through.
SNAP_PAUSE=0.2

# snap_content N: the content of file N: 20-byte lines "tern-snap-NN-LLLLLL" (L = line number,
# so a block written at the wrong offset shows), cut at SNAP_FILE_BYTES.
snap_content() {
    awk -v t="$1" -v n=$((SNAP_FILE_BYTES / 20 + 1)) \
        'BEGIN { for (i = 0; i < n; i++) printf "tern-snap-%02d-%06d\n", t, i }' |
        head -c "$SNAP_FILE_BYTES"
}

# snap_stalled N: what the guest is doing when its workload made no progress for a while
# (after progress line N): blocked tasks and their kernel stacks, the disk's in-flight
# requests, the virtio interrupt counts. Serial console only.
snap_stalled() {
    local p
    echo "TERN-SNAP-STALL no progress for 10 s after line $1; uptime $(cut -d' ' -f1 /proc/uptime)"
    echo "TERN-SNAP-STALL vda inflight (reads writes): $(cat /sys/block/vda/inflight 2>/dev/null)"
    grep -i -E 'virtio|timer|LOC' /proc/interrupts | sed 's/^/TERN-SNAP-STALL irq: /'
    for p in /proc/[0-9]*; do
        case "$(awk '{ print $3 }' "$p/stat" 2>/dev/null)" in
            D | R)
                echo "TERN-SNAP-STALL task $(basename "$p") $(cat "$p/comm") state $(awk '{ print $3 }' "$p/stat") wchan $(cat "$p/wchan" 2>/dev/null)"
                sed 's/^/TERN-SNAP-STALL   /' "$p/stack" 2>/dev/null
                ;;
        esac
    done
    echo w > /proc/sysrq-trigger
    dmesg | tail -n 60 | sed 's/^/TERN-SNAP-STALL dmesg: /'
}

# snap_watchdog: reports (once per stall) when the workload's progress stands still for 10 s.
snap_watchdog() {
    local last= now same=0
    while sleep 2; do
        now=$(cat /run/snap-progress 2>/dev/null)
        [ "$now" = done ] && return
        if [ "$now" = "$last" ]; then
            same=$((same + 1))
        else
            same=0
            last=$now
        fi
        [ $same -eq 5 ] && snap_stalled "$now"
    done
}

snap_workload() {
    local n i f sums
    blk_check_root /dev/vda
    n=0
    while [ ! -c /dev/hvc0 ] && [ $n -lt 100 ]; do
        sleep 0.1
        n=$((n + 1))
    done
    if [ ! -c /dev/hvc0 ]; then
        blk_fail "/dev/hvc0 never appeared (virtio_console: $(grep -c '^virtio_console ' /proc/modules))"
        return 1
    fi
    # tern's VM generation ID device, as Linux's ACPI scan found it (its path, or "missing").
    echo "TERN-SNAP-VMGENID $(cat /sys/bus/acpi/devices/VMGENCTR:00/path 2>/dev/null || echo missing)"
    # hvc0 stays open across the snapshot, like a long-running program's console would.
    exec 3> /dev/hvc0
    echo "TERN-SNAP-START files=$SNAP_FILES bytes=$SNAP_FILE_BYTES"
    echo "TERN-SNAP-START files=$SNAP_FILES bytes=$SNAP_FILE_BYTES" >&3
    mkdir -p /data/snap
    mount -t tmpfs tmpfs /run && echo 0 > /run/snap-progress
    snap_watchdog &
    i=1
    while [ $i -le $SNAP_FILES ]; do
        f=/data/snap/f$(printf %02d $i)
        snap_content $i > "$f"
        sync
        echo "TERN-SNAP-PROGRESS $i"
        echo "TERN-SNAP-PROGRESS $i" >&3
        echo $i > /run/snap-progress
        sleep "$SNAP_PAUSE"
        i=$((i + 1))
    done
    cd /data/snap || return 1
    sha256sum f[0-9][0-9] > MANIFEST
    sync
    # The same sums read from the disk, not from the page cache.
    echo 3 > /proc/sys/vm/drop_caches
    sums=$(sha256sum f[0-9][0-9])
    if [ "$sums" != "$(cat MANIFEST)" ]; then
        blk_fail "the files read back from /dev/vda differ from what was written: $(echo "$sums" | diff MANIFEST - | head -n 6 | tr '\n' '|')"
    fi
    cd /
    echo done > /run/snap-progress
    blk_remount_ro
    f=$(sha256sum /data/snap/MANIFEST | cut -d' ' -f1)
    echo "TERN-SNAP-DONE $f"
    echo "TERN-SNAP-DONE $f" >&3
    exec 3>&-
}

snap_workload
