# tern-blk-readonly: /dev/vda is a writable scratch disk, /dev/vdb the rig's ext4 image
# attached read-only. The guest must see vdb as read-only, a raw write to it must fail while
# the same write to vda works, and vdb must still be readable. (The L1 script checks the
# read-only image's sha256 afterwards.)
. /scenarios/blk-lib.sh
if blk_wait_disks vda vdb; then
    blk_features vda
    blk_features vdb
    ro_a=$(cat /sys/block/vda/ro)
    ro_b=$(cat /sys/block/vdb/ro)
    getro=$(blockdev --getro /dev/vdb)
    echo "TERN-GUEST-BLK-RO-FLAGS=vda:$ro_a,vdb:$ro_b,getro-vdb:$getro"
    [ "$ro_b" = 1 ] && [ "$getro" = 1 ] || blk_fail "vdb is not read-only (sysfs ro=$ro_b, blockdev --getro=$getro)"
    [ "$ro_a" = 0 ] || blk_fail "vda (readonly=off) is read-only"
    # Control: a direct write to the writable disk works and reads back.
    blk_pattern 4096 rw > /tmp/rw.bin
    if dd if=/tmp/rw.bin of=/dev/vda bs=4096 count=1 oflag=direct conv=fsync 2>/tmp/dd.err; then
        got=$(dd if=/dev/vda bs=4096 count=1 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
        want=$(sha256sum /tmp/rw.bin | cut -d' ' -f1)
        [ "$got" = "$want" ] && echo "TERN-GUEST-BLK-RW-WRITE=ok" || blk_fail "vda read back $got after writing $want"
    else
        blk_fail "direct write to the writable vda failed: $(head -n 1 /tmp/dd.err)"
    fi
    if dd if=/dev/zero of=/dev/vdb bs=512 count=1 oflag=direct conv=fsync 2>/tmp/dd.err; then
        blk_fail "a direct write to the read-only vdb succeeded"
    else
        echo "TERN-GUEST-BLK-RO-WRITE=refused ($(head -n 1 /tmp/dd.err))"
    fi
    # Reads still work: mount the read-only ext4 image and read a file.
    mkdir -p /mnt/ro
    if mount -t ext4 -o ro /dev/vdb /mnt/ro; then
        blk_check_file /mnt/ro/base.txt "$BLK_BASE_TXT"
        umount /mnt/ro
    else
        blk_fail "cannot mount the read-only vdb"
    fi
    sync
    echo TERN-GUEST-BLK-READONLY-DONE
fi
