# Helpers for the virtio-blk guest scripts (blk-*.sh); sourced by them, not a scenario itself.
# The L1 side of these scenarios is xtask/l1/scenarios/blk.sh, which checks the disk images
# after the guest powered off; both sides must agree on the names and contents below.

# Content of /base.txt in the rig's disk image (BLK_BASE_TXT in xtask/src/images.rs).
BLK_BASE_TXT="tern-blk-base: written by cargo xtask images"

# blk_pattern BYTES TAG: deterministic data (no zeros), also generated on the L1 side.
blk_pattern() {
    yes "tern-blk-pattern-$2" | head -c "$1"
}

blk_fail() {
    echo "TERN-GUEST-ERROR=blk: $*"
}

# blk_wait_disks vda vdb...: load the virtio block driver, wait for the disks (up to 10 s).
blk_wait_disks() {
    rig_modload virtio_pci virtio_mmio virtio_blk || return 1
    for d in "$@"; do
        n=0
        while [ ! -b "/dev/$d" ] && [ $n -lt 100 ]; do
            sleep 0.1
            n=$((n + 1))
        done
        [ -b "/dev/$d" ] || { blk_fail "/dev/$d never appeared ($(ls /sys/block | tr '\n' ' '))"; return 1; }
    done
}

# blk_features vda: what the driver negotiated, as one fact line.
blk_features() {
    q=/sys/block/$1/queue
    echo "TERN-GUEST-BLK-FEATURES-$1=size:$(cat /sys/block/$1/size),ro:$(cat /sys/block/$1/ro),cache:$(tr ' ' '-' < $q/write_cache),discard:$(cat $q/discard_max_bytes),write-zeroes:$(cat $q/write_zeroes_max_bytes),lbs:$(cat $q/logical_block_size),max-segments:$(cat $q/max_segments),queues:$(ls /sys/block/$1/mq 2>/dev/null | wc -l),serial:$(cat /sys/block/$1/serial 2>/dev/null)"
}

# blk_check_root DEV: the root file system is DEV, ext4, mounted read-write.
blk_check_root() {
    line=$(awk '$2 == "/" { print $1 " " $3 " " $4 }' /proc/mounts | tail -n 1)
    case "$line" in
        "$1 ext4 rw"*) echo "TERN-GUEST-BLK-ROOT-OK=$1" ;;
        *) blk_fail "root file system is '$line', not $1 ext4 rw" ;;
    esac
}

# blk_check_file PATH EXPECTED: PATH holds exactly EXPECTED (one line).
blk_check_file() {
    got=$(cat "$1" 2>&1)
    if [ "$got" = "$2" ]; then
        echo "TERN-GUEST-BLK-READ-OK=$1"
    else
        blk_fail "$1 holds '$got', expected '$2'"
    fi
}

# blk_remount_ro: flush everything and remount / read-only, so the image is clean (journal
# checkpointed) when the VMM exits and the L1 host's e2fsck/debugfs see the final state.
blk_remount_ro() {
    sync
    mount -o remount,ro / || blk_fail "cannot remount / read-only"
}
