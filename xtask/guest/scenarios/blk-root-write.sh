# tern-blk-root, first boot: the root file system is the virtio-blk disk /dev/vda (ext4; the
# initramfs mounted it and switch_root'ed here). Write files with known content, sync, power
# off. The L1 script checks them in the image with debugfs, then boots again (blk-root-verify).
. /scenarios/blk-lib.sh
blk_check_root /dev/vda
blk_features vda
blk_check_file /base.txt "$BLK_BASE_TXT"
echo "tern-blk-root: hello from the first boot" > /data/hello.txt
blk_pattern 1048576 root > /data/pattern.bin
mkdir -p /data/many
i=0
while [ $i -lt 32 ]; do
    echo "small file $i" > /data/many/f$i
    i=$((i + 1))
done
blk_remount_ro
echo "TERN-GUEST-BLK-PATTERN-SHA256=$(sha256sum /data/pattern.bin | cut -d' ' -f1)"
echo TERN-GUEST-BLK-WRITTEN
