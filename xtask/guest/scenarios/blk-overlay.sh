# tern-blk-qcow2-overlay: the root file system is a qcow2 overlay (/dev/vda) on a raw base
# image. Everything read so far (busybox, this script) came through the overlay from its
# backing file; now write a new file, sync, power off. The L1 script checks that the base is
# unchanged, `qemu-img check` passes and the new file is in the overlay.
. /scenarios/blk-lib.sh
blk_check_root /dev/vda
blk_features vda
blk_check_file /base.txt "$BLK_BASE_TXT"
echo "tern-blk-qcow2-overlay: written through the overlay" > /newfile.txt
blk_pattern 1048576 overlay > /data/pattern.bin
blk_remount_ro
echo TERN-GUEST-BLK-OVERLAY-WRITTEN
