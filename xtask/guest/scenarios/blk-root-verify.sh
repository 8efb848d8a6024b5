# tern-blk-root, second boot of the same image: the files the first boot wrote are there, read
# back through the VMM's virtio-blk read path (the page cache is cold: this is a new guest).
. /scenarios/blk-lib.sh
blk_check_root /dev/vda
blk_check_file /data/hello.txt "tern-blk-root: hello from the first boot"
want=$(blk_pattern 1048576 root | sha256sum | cut -d' ' -f1)
got=$(sha256sum /data/pattern.bin | cut -d' ' -f1)
[ "$got" = "$want" ] || blk_fail "/data/pattern.bin sha256 $got, expected $want"
n=$(ls /data/many | wc -l)
[ "$n" = 32 ] || blk_fail "/data/many has $n files, expected 32"
blk_check_file /data/many/f31 "small file 31"
echo "tern-blk-root: the second boot was here" > /data/second.txt
blk_remount_ro
echo TERN-GUEST-BLK-VERIFIED
