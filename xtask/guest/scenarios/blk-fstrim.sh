# tern-blk-fstrim: /dev/vda is a raw ext4 image whose every block is allocated on the L1 host.
# Fill a file, delete it, fstrim: the VMM must turn the discards into holes in the image file
# (the L1 script compares its allocated blocks before and after).
. /scenarios/blk-lib.sh
if blk_wait_disks vda; then
    blk_features vda
    max=$(cat /sys/block/vda/queue/discard_max_bytes)
    [ "$max" -gt 0 ] || blk_fail "vda offers no discard (discard_max_bytes=$max)"
    mkdir -p /mnt/trim
    if mount -t ext4 /dev/vda /mnt/trim; then
        blk_pattern 4194304 fill > /mnt/trim/fill
        sync
        rm /mnt/trim/fill
        sync
        out=$(fstrim -v /mnt/trim 2>&1)
        echo "TERN-GUEST-BLK-FSTRIM-OUTPUT=$(echo "$out" | tr ' ' '_')"
        bytes=$(echo "$out" | awk '/bytes trimmed/ { print $2 }')
        if [ -n "$bytes" ] && [ "$bytes" -gt 0 ]; then
            echo "TERN-GUEST-BLK-FSTRIM-BYTES=$bytes"
        else
            blk_fail "fstrim trimmed nothing: $out"
        fi
        umount /mnt/trim || blk_fail "cannot unmount vda"
    else
        blk_fail "cannot mount vda"
    fi
    echo TERN-GUEST-BLK-FSTRIM-DONE
fi
