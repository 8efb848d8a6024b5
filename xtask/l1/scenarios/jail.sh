#!/bin/sh
# L1 side of the jailer scenario (xtask/src/scenarios.rs, "tern-jail"). Started by the rig agent
# as
#
#     sh /rig/l1/jail.sh -- TERN-ARGV...
#
# where TERN-ARGV is the scenario's `tern run ...` command line. Runs it under `tern jail` as
# uid/gid 10123, with its chroot base on a tmpfs (so tern, its libraries, the kernel and the
# initrd, on L1's initramfs, are bind-mounted in; and as L1's root is its initramfs, the jail
# takes its MS_MOVE + chroot fallback instead of pivot_root, detaching that tmpfs too) and a
# cgroup v2 memory.max and pids.max (cgroup2 is mounted on /sys/fs/cgroup first when L1 has
# none). While tern runs it
# reads back, from outside the jail: tern's uid and gid (real, effective, saved, fs), its groups,
# no_new_privs and capabilities, its root directory (the jail's, and nothing of L1's tree in
# it), its cgroup and the limits there. Then the guest must reach its init, power off and
# tern (and `tern jail`) exit 0.
#
# Output: "TERN-JAIL-PASS CHECK: what" per passed check, "TERN-JAIL-FAIL CHECK: why" per failed
# one, the VM's output, and "TERN-JAIL-OK" when every check passed (exit 0; otherwise
# "TERN-JAIL-FAILED", exit 1).

set -u
export PATH=/usr/bin:/bin:/usr/sbin:/sbin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu

[ "${1:-}" = "--" ] && shift
[ $# -gt 1 ] || { echo "TERN-JAIL-FAIL args: no tern command line"; exit 1; }
tern=$1
shift

ID=rig-jail
JUID=10123
JGID=10123
BASE=/tmp/jail
ROOT=$BASE/tern/$ID/root
CG=/sys/fs/cgroup
MEM_MAX=536870912
PIDS_MAX=64
OUT=/tmp/tern-jail.out
# Seconds the guest may take from tern's start to its power-off.
BOOT_TIMEOUT=90

failed=0
pass() { echo "TERN-JAIL-PASS $1: $2"; }
fail() {
    failed=1
    echo "TERN-JAIL-FAIL $1: $2"
}
# expect ID WHAT GOT WANT
expect() {
    if [ "$3" = "$4" ]; then
        pass "$1" "$2 ($3)"
    else
        fail "$1" "$2: got '$3', want '$4'"
    fi
}
finish() {
    cat "$OUT" 2>/dev/null
    rmdir "$CG/tern/$ID" "$CG/tern" 2>/dev/null
    umount "$BASE" 2>/dev/null
    if [ "$failed" = 0 ]; then
        echo "TERN-JAIL-OK"
        exit 0
    fi
    echo "TERN-JAIL-FAILED"
    exit 1
}

# cgroup v2 on /sys/fs/cgroup (L1's init mounts no cgroups).
if ! grep -q "^cgroup2 $CG " /proc/mounts; then
    mkdir -p "$CG"
    mount -t cgroup2 cgroup2 "$CG" || { fail setup "cannot mount cgroup2 on $CG"; finish; }
fi
mkdir -p "$BASE"
mount -t tmpfs -o size=16m,mode=755 tmpfs "$BASE" || { fail setup "cannot mount a tmpfs on $BASE"; finish; }

"$tern" jail --id "$ID" --uid "$JUID" --gid "$JGID" --chroot-base "$BASE" \
    --cgroup "memory.max=$MEM_MAX" --cgroup "pids.max=$PIDS_MAX" \
    -- "$@" > "$OUT" 2>&1 &
jail=$!

# tern jail writes tern's pid (as L1 sees it) once it forked; the child becomes uid JUID just
# before it execs tern.
pid=
n=0
while [ $n -lt 100 ]; do
    if [ -z "$pid" ] && [ -s "$BASE/tern/$ID/tern.pid" ]; then
        pid=$(cat "$BASE/tern/$ID/tern.pid")
    fi
    if [ -n "$pid" ] && grep -q "^Uid:[[:space:]]*$JUID[[:space:]]" "/proc/$pid/status" 2>/dev/null; then
        break
    fi
    kill -0 "$jail" 2>/dev/null || break
    n=$((n + 1))
    sleep 0.1
done

if [ -n "$pid" ] && [ -e "/proc/$pid/status" ]; then
    pass started "tern jail started tern as pid $pid"
    status() { sed -n "s/^$1:[[:space:]]*//p" "/proc/$pid/status" | tr -s '\t ' ' ' | sed 's/ $//'; }
    expect uid "real, effective, saved and fs uid" "$(status Uid)" "$JUID $JUID $JUID $JUID"
    expect gid "real, effective, saved and fs gid" "$(status Gid)" "$JGID $JGID $JGID $JGID"
    expect groups "no supplementary groups" "$(status Groups)" ""
    expect no-new-privs "no_new_privs" "$(status NoNewPrivs)" "1"
    expect caps "no effective, permitted, inheritable or ambient capabilities" \
        "$(status CapEff) $(status CapPrm) $(status CapInh) $(status CapAmb)" \
        "0000000000000000 0000000000000000 0000000000000000 0000000000000000"
    expect comm "the process is tern" "$(cat "/proc/$pid/comm")" "tern"
    # Its root is the jail's root directory (same inode), in which L1's own files are absent
    # and tern and the guest's kernel are present.
    got=$(stat -L -c '%d:%i' "/proc/$pid/root" 2>&1)
    want=$(stat -c '%d:%i' "$ROOT" 2>&1)
    expect root "/proc/$pid/root is the jail's $ROOT" "$got" "$want"
    inside=""
    for f in /rig/xtask /bin/busybox /init /sys/fs/cgroup/cgroup.procs; do
        [ -e "/proc/$pid/root$f" ] && inside="$inside $f"
    done
    for f in /usr/bin/tern /rig/guest/vmlinuz-cloud /rig/guest/guest-initrd.cpio /dev/kvm; do
        [ -e "/proc/$pid/root$f" ] || inside="$inside missing:$f"
    done
    expect root-content "L1's files are not in the jail, tern's are" "${inside# }" ""
    # Its cgroup, and the limits in it.
    expect cgroup "tern's cgroup" "$(cat "/proc/$pid/cgroup")" "0::/tern/$ID"
    if grep -qx "$pid" "$CG/tern/$ID/cgroup.procs" 2>/dev/null; then
        pass cgroup-procs "pid $pid is in $CG/tern/$ID/cgroup.procs"
    else
        fail cgroup-procs "pid $pid is not in $CG/tern/$ID/cgroup.procs"
    fi
    expect memory-max "$CG/tern/$ID/memory.max" "$(cat "$CG/tern/$ID/memory.max" 2>&1)" "$MEM_MAX"
    expect pids-max "$CG/tern/$ID/pids.max" "$(cat "$CG/tern/$ID/pids.max" 2>&1)" "$PIDS_MAX"
    # Every thread of tern (vCPUs, device workers) is in it too, and counts against pids.max.
    outside=""
    for t in /proc/$pid/task/*; do
        [ "$(cat "$t/cgroup" 2>/dev/null || echo "0::/tern/$ID")" = "0::/tern/$ID" ] || outside="$outside ${t##*/}"
    done
    expect threads "threads of tern outside /tern/$ID" "${outside# }" ""
    current=$(cat "$CG/tern/$ID/pids.current" 2>&1)
    if [ "$current" -ge 1 ] 2>/dev/null && [ "$current" -le "$PIDS_MAX" ]; then
        pass pids-current "$CG/tern/$ID/pids.current is $current"
    else
        fail pids-current "$CG/tern/$ID/pids.current is '$current'"
    fi
else
    fail started "tern jail did not start tern (pid '${pid}')"
fi

# The guest boots, reaches its init and powers off; tern and tern jail then exit 0.
n=0
while kill -0 "$jail" 2>/dev/null; do
    n=$((n + 1))
    if [ $n -gt $((BOOT_TIMEOUT * 5)) ]; then
        fail exit "tern still running after $BOOT_TIMEOUT s"
        kill -9 "$jail" ${pid:+"$pid"} 2>/dev/null
        break
    fi
    sleep 0.2
done
wait "$jail"
rc=$?
expect exit "tern jail's exit status (tern's)" "$rc" "0"
if grep -q TERN-GUEST-INIT-REACHED "$OUT" && grep -q TERN-GUEST-UPTIME= "$OUT"; then
    pass guest "the guest reached its init and powered off"
else
    # (Not naming the markers here: the rig would find them in this line.)
    fail guest "the guest's init-reached and uptime lines are missing from tern's output"
fi
finish
