#!/bin/sh
# L1 side of the virtio-blk scenarios (xtask/src/scenarios.rs, group "block"). Runs inside L1,
# started by the rig agent as
#
#     sh /rig/l1/blk.sh CASE -- VMM-ARGV...
#
# where VMM-ARGV is the scenario's normal VMM command line (tern, or QEMU to check the rig and
# these scripts themselves). For each guest boot it appends the disks (tern: `--disk SPEC`;
# QEMU: `-drive`/`-device virtio-blk-*`) and the guest's `rig.action=` (plus `root=` when the
# root file system is on a disk) to that command line. The disk images live on a tmpfs and are
# checked after the VMM exits with tools that share no code with the VMM's block layer:
# sha256sum, e2fsck, debugfs, qemu-img.
#
# Output: "TERN-BLK-PASS CASE/CHECK: what" for each check that passed, "TERN-BLK-FAIL CASE/CHECK:
# why" for one that failed, and "TERN-BLK-OK CASE" at the end when every check passed (exit 0;
# otherwise exit 1). The guest's own output is passed through (TERN-GUEST-ERROR fails it too).
#
# CASEs: root, qcow2-overlay, readonly, fstrim, fstrim-loop (see each function below).

set -u
export PATH=/usr/bin:/bin:/usr/sbin:/sbin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu

case_=${1:?usage: blk.sh CASE -- VMM-ARGV...}
shift
[ "${1:-}" = "--" ] && shift
[ $# -gt 0 ] || { echo "TERN-BLK-FAIL $case_/args: no VMM command line"; exit 1; }

# The pristine disk image built by `cargo xtask images` (BLK_ROOT in xtask/src/images.rs) and
# the content of its /base.txt (BLK_BASE_TXT there, also in guest/scenarios/blk-lib.sh).
BLK_ROOT=/rig/blk/root.ext4
BLK_BASE_TXT="tern-blk-base: written by cargo xtask images"
# Seconds one guest boot may take before it is killed.
BOOT_TIMEOUT=90

case "$(basename "$1")" in
    tern*) kind=tern ;;
    qemu-system-*) kind=qemu ;;
    *) echo "TERN-BLK-FAIL $case_/args: unknown VMM $1"; exit 1 ;;
esac

W=/tmp/blk-$case_
mkdir -p "$W"
mount -t tmpfs -o size=256m tmpfs "$W" || { echo "TERN-BLK-FAIL $case_/setup: cannot mount a tmpfs on $W"; exit 1; }
# The VMM's argv, one argument per line (none contains a newline), reused by every boot.
for a in "$@"; do
    printf '%s\n' "$a"
done > "$W/argv"

failed=0
checks=0
pass() {
    checks=$((checks + 1))
    echo "TERN-BLK-PASS $case_/$1: $2"
}
fail() {
    checks=$((checks + 1))
    failed=1
    echo "TERN-BLK-FAIL $case_/$1: $2"
}
finish() {
    cd /
    umount "$W" 2>/dev/null
    if [ "$failed" = 0 ] && [ "$checks" -gt 0 ]; then
        echo "TERN-BLK-OK $case_ ($checks checks)"
        exit 0
    fi
    echo "TERN-BLK-FAILED $case_"
    exit 1
}
# (Functions declare their variables local: sh functions otherwise share the caller's.)
# check ID WHAT COMMAND...: runs COMMAND, passes when it succeeds; on failure shows its output.
check() {
    local id=$1 what=$2 out
    shift 2
    if out=$("$@" 2>&1); then
        pass "$id" "$what"
    else
        fail "$id" "$what: failed: $(echo "$out" | tail -n 5 | tr '\n' '|')"
    fi
}
sha() { sha256sum "$1" | cut -d' ' -f1; }
# alloc FILE: allocated KiB on the host.
alloc() { echo $(($(stat -c %b "$1") * $(stat -c %B "$1") / 1024)); }

# boot LABEL ACTION EXTRA-CMDLINE DISK...: one guest boot. DISK is a tern --disk spec
# (path=FILE[,format=raw|qcow2][,readonly=on]); for QEMU it becomes -drive/-device. The guest's
# output goes to this script's output and to $W/LABEL.out. Fails (and finishes) unless the VMM
# exits 0 within BOOT_TIMEOUT and the guest printed its power-off line.
boot() {
    local label=$1 action=$2 extra=$3 disks a prev blkdev i d file fmt ro kv start end rc why
    shift 3
    disks="$*"
    set --
    prev=
    while IFS= read -r a; do
        case "$prev" in
            --cmdline | -append) a="$a rig.action=$action${extra:+ $extra}" ;;
        esac
        set -- "$@" "$a"
        prev=$a
    done < "$W/argv"
    blkdev=virtio-blk-device
    case "$*" in *pcie=on* | *" pc "* | *q35*) blkdev=virtio-blk-pci ;; esac
    i=0
    for d in $disks; do
        if [ "$kind" = tern ]; then
            set -- "$@" --disk "$d"
        else
            file= fmt=raw ro=
            for kv in $(echo "$d" | tr ',' ' '); do
                case "$kv" in
                    path=*) file=${kv#path=} ;;
                    format=*) fmt=${kv#format=} ;;
                    readonly=on) ro=,readonly=on ;;
                esac
            done
            set -- "$@" -drive "file=$file,format=$fmt,if=none,id=disk$i,discard=unmap$ro" \
                -device "$blkdev,drive=disk$i"
        fi
        i=$((i + 1))
    done
    echo "TERN-BLK-BOOT $case_/$label: $*"
    start=$(cut -d' ' -f1 /proc/uptime)
    { timeout -s KILL "$BOOT_TIMEOUT" "$@" 2>&1; echo $? > "$W/$label.rc"; } | tee "$W/$label.out"
    rc=$(cat "$W/$label.rc")
    end=$(cut -d' ' -f1 /proc/uptime)
    echo "TERN-BLK-BOOT-END $case_/$label: exit $rc after $(echo "$start $end" | awk '{ printf "%.1f", $2 - $1 }')s"
    if [ "$rc" != 0 ]; then
        why=$(grep -i -m 3 -E 'error|unknown|unexpected|invalid|panic' "$W/$label.out" | tr '\r\n' '  ')
        [ "$rc" = 137 ] && why="killed after ${BOOT_TIMEOUT}s; $why"
        fail "$label-boot" "$kind exited with status $rc (expected 0): ${why:-see the log}"
        finish
    fi
    if ! grep -q TERN-GUEST-POWEROFF "$W/$label.out"; then
        fail "$label-boot" "$kind exited 0 but the guest never reached its power-off line"
        finish
    fi
    if grep -q TERN-GUEST-ERROR "$W/$label.out"; then
        fail "$label-guest" "the guest reported: $(grep -m 3 TERN-GUEST-ERROR "$W/$label.out" | tr '\r\n' '  ')"
    fi
}
# guest_said LABEL ID WHAT PATTERN: the guest's output of boot LABEL matches PATTERN (grep -E).
guest_said() {
    if grep -q -E "$4" "$W/$1.out"; then
        pass "$2" "$3"
    else
        fail "$2" "$3: the guest never printed /$4/"
    fi
}
# img_cat IMAGE PATH: a file's content read from an ext4 image by debugfs (not by the VMM).
img_cat() { debugfs -R "cat $2" "$1" 2>/dev/null; }
# img_has IMAGE PATH EXPECTED ID: debugfs finds PATH in IMAGE with exactly the EXPECTED line.
img_has() {
    local got
    got=$(img_cat "$1" "$2")
    if [ "$got" = "$3" ]; then
        pass "$4" "debugfs reads $2 from $(basename "$1") with the expected content"
    else
        fail "$4" "debugfs reads $2 from $(basename "$1") as '$(echo "$got" | head -c 200)', expected '$3'"
    fi
}
# img_sha IMAGE PATH: sha256 of a file dumped from an ext4 image by debugfs.
img_sha() {
    rm -f "$W/dump"
    debugfs -R "dump $2 $W/dump" "$1" >/dev/null 2>&1
    [ -f "$W/dump" ] && sha "$W/dump"
}
pattern_sha() { yes "tern-blk-pattern-$2" | head -c "$1" | sha256sum | cut -d' ' -f1; }
fsck_clean() { check "$1" "e2fsck -fn finds $(basename "$2") clean" e2fsck -fn "$2"; }

[ -f "$BLK_ROOT" ] || { fail setup "$BLK_ROOT missing from L1"; finish; }
for tool in debugfs e2fsck qemu-img; do
    command -v $tool >/dev/null || { fail setup "$tool missing from L1"; finish; }
done

# --- root: the guest's root file system is an ext4 image on virtio-blk (/dev/vda); it
# writes files; the host reads them with debugfs; a second boot reads them back. ---
case_root() {
    img=$W/root.img
    cp "$BLK_ROOT" "$img"
    boot write script:blk-root-write root=/dev/vda "path=$img,format=raw"
    guest_said write write-rootfs "boot 1: the guest mounted /dev/vda (ext4, rw) as / and ran its init from it" \
        'TERN-GUEST-ROOTFS=/dev/vda:ext4:rw'
    guest_said write write-files "boot 1: the guest wrote its files, synced and remounted / read-only" \
        'TERN-GUEST-BLK-WRITTEN'
    fsck_clean write-fsck "$img"
    img_has "$img" /data/hello.txt "tern-blk-root: hello from the first boot" write-hello
    want=$(pattern_sha 1048576 root)
    got=$(img_sha "$img" /data/pattern.bin)
    if [ "$got" = "$want" ]; then
        pass write-pattern "debugfs: /data/pattern.bin (1 MiB) has the expected sha256"
    else
        fail write-pattern "debugfs: /data/pattern.bin sha256 '${got:-missing}', expected $want"
    fi
    img_has "$img" /data/many/f31 "small file 31" write-many
    boot verify script:blk-root-verify root=/dev/vda "path=$img,format=raw"
    guest_said verify verify-read "boot 2: the guest read back the first boot's files from /dev/vda" \
        'TERN-GUEST-BLK-VERIFIED'
    img_has "$img" /data/second.txt "tern-blk-root: the second boot was here" verify-second
    fsck_clean verify-fsck "$img"
}

# --- qcow2-overlay: root on a qcow2 overlay of a raw base image; the base must not change,
# the overlay must stay consistent and hold the guest's new file. ---
case_qcow2_overlay() {
    base=$W/base.raw
    overlay=$W/overlay.qcow2
    cp "$BLK_ROOT" "$base"
    before=$(sha "$base")
    check create "qemu-img create -f qcow2 -b base.raw -F raw overlay.qcow2" \
        qemu-img create -f qcow2 -b "$base" -F raw "$overlay"
    [ "$failed" = 0 ] || finish
    boot overlay script:blk-overlay root=/dev/vda "path=$overlay,format=qcow2"
    guest_said overlay overlay-rootfs "the guest booted with / on the qcow2 overlay (/dev/vda, ext4, rw)" \
        'TERN-GUEST-ROOTFS=/dev/vda:ext4:rw'
    guest_said overlay overlay-write "the guest wrote /newfile.txt, synced and remounted / read-only" \
        'TERN-GUEST-BLK-OVERLAY-WRITTEN'
    after=$(sha "$base")
    if [ "$after" = "$before" ]; then
        pass base-unchanged "the raw base image's sha256 is unchanged"
    else
        fail base-unchanged "the raw base image changed (sha256 $before -> $after)"
    fi
    check qemu-img-check "qemu-img check overlay.qcow2 reports no errors or leaks" \
        qemu-img check "$overlay"
    check convert "qemu-img convert -O raw overlay.qcow2 out.raw" \
        qemu-img convert -O raw "$overlay" "$W/out.raw"
    img_has "$W/out.raw" /newfile.txt "tern-blk-qcow2-overlay: written through the overlay" newfile
    img_has "$W/out.raw" /base.txt "$BLK_BASE_TXT" basefile
    want=$(pattern_sha 1048576 overlay)
    got=$(img_sha "$W/out.raw" /data/pattern.bin)
    if [ "$got" = "$want" ]; then
        pass pattern "debugfs: /data/pattern.bin (1 MiB) in the converted overlay has the expected sha256"
    else
        fail pattern "debugfs: /data/pattern.bin sha256 '${got:-missing}', expected $want"
    fi
    fsck_clean fsck "$W/out.raw"
    rm -f "$W/out.raw"
}

# --- readonly: a second disk with readonly=on: the guest sees it read-only, cannot write it,
# can read it; the image is bit-for-bit unchanged. ---
case_readonly() {
    ro=$W/ro.img
    scratch=$W/scratch.raw
    cp "$BLK_ROOT" "$ro"
    dd if=/dev/zero of="$scratch" bs=65536 count=16 2>/dev/null
    before=$(sha "$ro")
    boot ro script:blk-readonly "" "path=$scratch,format=raw" "path=$ro,format=raw,readonly=on"
    guest_said ro ro-flag "the guest sees vdb read-only (sysfs ro=1, blockdev --getro=1) and vda writable" \
        'TERN-GUEST-BLK-RO-FLAGS=vda:0,vdb:1,getro-vdb:1'
    guest_said ro ro-write-refused "a direct write to the read-only vdb failed in the guest" \
        'TERN-GUEST-BLK-RO-WRITE=refused'
    guest_said ro rw-write "the same direct write to the writable vda worked and read back" \
        'TERN-GUEST-BLK-RW-WRITE=ok'
    guest_said ro ro-read "the guest mounted the read-only vdb and read /base.txt" \
        'TERN-GUEST-BLK-READ-OK=/mnt/ro/base.txt'
    after=$(sha "$ro")
    if [ "$after" = "$before" ]; then
        pass ro-unchanged "the read-only image's sha256 is unchanged"
    else
        fail ro-unchanged "the read-only image changed (sha256 $before -> $after)"
    fi
    want=$(pattern_sha 4096 rw)
    got=$(head -c 4096 "$scratch" | sha256sum | cut -d' ' -f1)
    if [ "$got" = "$want" ]; then
        pass rw-on-host "the guest's write to vda is in the scratch image on the host"
    else
        fail rw-on-host "the scratch image's first 4 KiB have sha256 $got, expected $want"
    fi
}

# --- fstrim: a fully allocated raw image; the guest fills and deletes a file and runs fstrim;
# the image file's allocated blocks must shrink (discard -> hole punched), the file system must
# stay intact. fstrim-loop: the same with the image behind a loop device, given to tern as a
# host block device. ---
case_fstrim() {
    local dev=
    img=$W/trim.img
    # cat writes every byte, zeros included: the image is fully allocated on the tmpfs.
    cat "$BLK_ROOT" > "$img"
    size_k=$(($(stat -c %s "$img") / 1024))
    before=$(alloc "$img")
    if [ "$before" -lt $((size_k * 9 / 10)) ]; then
        fail setup "the image is not fully allocated before the test ($before of $size_k KiB)"
        finish
    fi
    if [ "$case_" = fstrim-loop ]; then
        # The guest's disk is a loop device over the image: a host block device.
        dev=$(losetup -f) && losetup "$dev" "$img" || { fail loop "cannot attach $img to a loop device"; finish; }
        pass loop "the image is attached to $dev ($(cat "/sys/block/${dev#/dev/}/size") sectors)"
        boot trim script:blk-fstrim "" "path=$dev,format=raw"
        losetup -d "$dev"
    else
        boot trim script:blk-fstrim "" "path=$img,format=raw"
    fi
    guest_said trim fstrim "the guest's fstrim -v reported trimmed bytes" \
        'TERN-GUEST-BLK-FSTRIM-BYTES=[1-9]'
    after=$(alloc "$img")
    echo "TERN-BLK-INFO $case_: image allocation $before KiB before, $after KiB after (size $size_k KiB)"
    # The file system has ~9 MiB free (a 4 MiB file was written and deleted there); demand that
    # at least 4 MiB of the image became holes.
    if [ "$after" -le $((before - 4096)) ]; then
        pass shrink "the image's allocated blocks shrank from $before to $after KiB"
    else
        fail shrink "the image's allocated blocks did not shrink by 4 MiB ($before -> $after KiB): discard did not punch holes"
    fi
    fsck_clean fsck "$img"
    img_has "$img" /base.txt "$BLK_BASE_TXT" basefile
}

case "$case_" in
    root) case_root ;;
    qcow2-overlay) case_qcow2_overlay ;;
    readonly) case_readonly ;;
    fstrim | fstrim-loop) case_fstrim ;;
    *) fail args "unknown case $case_" ;;
esac
finish
