#!/bin/sh
# L1 side of the disk update scenario (xtask/src/scenarios.rs, "tern-disk-update"). Started
# by the rig agent as
#
#     sh /rig/l1/diskupdate.sh tern -- TERN-ARGV...
#
# Boots TERN-ARGV (its guest runs guest/scenarios/diskupdate.sh) with two disks on a tmpfs: a
# 64 MiB raw image (id data, the guest's vda) and a 32 MiB qcow2 image (id aux, vdb), and
# changes them while the guest runs, through `tern disk update`:
# 1. refusals, each one line naming the problem, nothing changed: shrinking data, an unknown
#    id, a size that is not whole sectors;
# 2. grow: data to 96 MiB, aux to 48 MiB; the guest must see both sizes (reporting the time
#    from the request to its line) and write and read back 1 MiB past data's old end;
# 3. limited: data at 50 ops/s; the guest's 4 KiB direct reads must run at 30-60 per second,
#    and `tern counters` must show data's requests waiting;
# 4. bw: data at 4 MiB/s and no ops limit; 1 MiB direct reads at 3-5 MiB/s;
# 5. unlimited: no limits; 4 KiB direct reads at more than three times the limited rate.
# Each of 3-5 moves aux by 1 MiB after the limit changed, which the guest waits for. The guest
# powers off and tern exits 0; then the images are checked on L1: data is 96 MiB and holds the
# guest's pattern at 80 MiB (its sha256 as the guest read it), aux passes `qemu-img check` at
# 51 MiB.
#
# Output: "TERN-DISKUP-PASS tern/CHECK: what" per passed check, "TERN-DISKUP-FAIL tern/CHECK:
# why" per failed one, the VM's output, and "TERN-DISKUP-OK tern" when every check passed.

set -u
export PATH=/usr/bin:/bin:/usr/sbin:/sbin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu

TAG=TERN-DISKUP
case_=${1:?usage: diskupdate.sh tern -- TERN-ARGV...}
shift
[ "${1:-}" = "--" ] && shift
[ $# -gt 0 ] || { echo "$TAG-FAIL $case_/args: no VMM command line"; exit 1; }
tern=$1
W=/tmp/diskup
SOCK=$W/api.sock
OUT=$W/vm.out
MIB=1048576
mkdir -p "$W"
mount -t tmpfs -o size=200m tmpfs "$W" || { echo "$TAG-FAIL $case_/setup: cannot mount a tmpfs on $W"; exit 1; }
. /rig/l1/l1-lib.sh
truncate -s 64M "$W/data.img"
if ! out=$(qemu-img create -q -f qcow2 "$W/aux.qcow2" 32M 2>&1); then
    fail setup "qemu-img create: $(oneline "$out")"
    verdict
fi
set -- "$@" --api-socket "$SOCK" --disk "path=$W/data.img,id=data" \
    --disk "path=$W/aux.qcow2,format=qcow2,id=aux"
# update ID KEY=VALUE...: tern disk update; its output.
update() {
    _id=$1
    shift
    "$tern" disk update --api-socket "$SOCK" "$_id" "$@" 2>&1
}
# step CHECK LINE: the guest must say TERN-GUEST-DISKUP-LINE within 60 s; sets line and ms
# (since start).
step() {
    if ! wait_for "$OUT" "TERN-GUEST-DISKUP-$2 " 60 "$pid"; then
        fail "$1" "the guest did not say $2 within 60 s"
        return 1
    fi
    ms=$(($(now_ms) - start))
    line=$(grep "TERN-GUEST-DISKUP-$2 " "$OUT" | tail -n 1 | tr -d '\r')
}
# value KEY: KEY=N from line.
value() { echo "$line" | sed -n "s/.*$1=\([0-9a-f]*\).*/\1/p"; }

echo "$TAG-RUN $case_: $*"
"$@" > "$OUT" 2>&1 &
pid=$!
POLL_S=0.1
start=$(now_ms)
if ! step ready READY; then
    kill -9 "$pid" 2>/dev/null
    finish_vmm exit "$pid" "$OUT"
    verdict
fi
pass ready "the guest sees both disks: $line"

for bad in "data size=32M:shrinking" "nope iops=5:no disk \`nope\`" "aux size=40000100:512-byte"; do
    args=${bad%%:*} why=${bad#*:}
    # (word splitting of args is meant: ID and KEY=VALUE.)
    # shellcheck disable=SC2086
    if out=$(update $args); then
        fail "refuse" "tern disk update $args was accepted: $(oneline "$out")"
    elif echo "$out" | grep -q "$why"; then
        pass "refuse" "tern disk update $args: $(oneline "$out")"
    else
        fail "refuse" "tern disk update $args said: $(oneline "$out")"
    fi
done
list=$("$tern" disk list --api-socket "$SOCK" 2>&1)
if echo "$list" | grep -q "^data	" && echo "$list" | grep -q "^aux	" \
    && [ "$(stat -c %s "$W/data.img")" = $((64 * MIB)) ]; then
    pass list "nothing changed; tern disk list: $(oneline "$list")"
else
    fail list "tern disk list: $(oneline "$list"); data.img $(stat -c %s "$W/data.img") bytes"
fi

start=$(now_ms)
if out=$(update data size=96M && update aux size=48M) && step grow GROWN; then
    if [ "$(value vda)" = $((96 * MIB)) ] && [ "$(value vdb)" = $((48 * MIB)) ]; then
        pass grow "the guest saw vda 96 MiB and vdb 48 MiB and wrote past the old end, $ms ms after the first request: $line"
    else
        fail grow "the guest said: $line"
    fi
    sha=$(value sha)
else
    fail grow "tern disk update said: $(oneline "${out:-}")"
fi

start=$(now_ms)
if out=$(update data iops=50 && update aux size=49M) && step limited LIMITED; then
    n=$(value iops)
    counters=$("$tern" counters --api-socket "$SOCK" 2>&1 | grep "data (")
    waits=$(echo "$counters" | sed -n 's/.*throttled \([0-9]*\).*/\1/p')
    if [ "${n:-0}" -ge 30 ] && [ "$n" -le 60 ] && [ "${waits:-0}" -gt 0 ]; then
        pass limited "4 KiB direct reads at $n/s under iops=50; $(oneline "$counters")"
    else
        fail limited "4 KiB direct reads at ${n:-?}/s under iops=50 (30-60 expected); $(oneline "$counters")"
    fi
else
    fail limited "tern disk update said: $(oneline "${out:-}")"
fi

if out=$(update data iops=0 bw=4M && update aux size=50M) && step bw BW; then
    k=$(value kibps)
    if [ "${k:-0}" -ge 3072 ] && [ "$k" -le 5120 ]; then
        pass bw "1 MiB direct reads at $k KiB/s under bw=4M"
    else
        fail bw "1 MiB direct reads at ${k:-?} KiB/s under bw=4M (3072-5120 expected)"
    fi
else
    fail bw "tern disk update said: $(oneline "${out:-}")"
fi

if out=$(update data bw=0 && update aux size=51M) && step unlimited UNLIMITED; then
    u=$(value iops)
    if [ "${u:-0}" -gt $((3 * ${n:-50})) ]; then
        pass unlimited "4 KiB direct reads at $u/s with the limits lifted (${n:-?}/s limited)"
    else
        fail unlimited "4 KiB direct reads at ${u:-?}/s with the limits lifted, ${n:-?}/s limited"
    fi
else
    fail unlimited "tern disk update said: $(oneline "${out:-}")"
fi

wait_for "$OUT" "TERN-GUEST-DISKUP-DONE" 60 "$pid"
finish_vmm exit "$pid" "$OUT"

size=$(stat -c %s "$W/data.img")
host_sha=$(dd if="$W/data.img" bs=$MIB skip=80 count=1 2>/dev/null | sha256sum | cut -d' ' -f1)
want_sha=$(yes "tern-blk-pattern-grown" | head -c $MIB | sha256sum | cut -d' ' -f1)
if [ "$size" = $((96 * MIB)) ] && [ "$host_sha" = "$want_sha" ] && [ "$host_sha" = "${sha:-}" ]; then
    pass data-image "data.img is 96 MiB and holds the guest's pattern at 80 MiB (sha256 $host_sha)"
else
    fail data-image "data.img is $size bytes; at 80 MiB sha256 $host_sha, the pattern's $want_sha, the guest read ${sha:-?}"
fi
info=$(qemu-img info "$W/aux.qcow2" 2>&1 | grep "virtual size")
if check=$(qemu-img check -q "$W/aux.qcow2" 2>&1) && echo "$info" | grep -q "($((51 * MIB)) bytes)"; then
    pass aux-image "aux.qcow2 passes qemu-img check; $info"
else
    fail aux-image "qemu-img check: $(oneline "$check"); $info"
fi
cd /
umount "$W" 2>/dev/null
verdict
