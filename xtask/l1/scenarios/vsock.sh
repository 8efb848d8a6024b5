#!/bin/sh
# L1 side of the vsock scenario (xtask/src/scenarios.rs, "tern-vsock"). Started by the rig
# agent as
#
#     sh /rig/l1/vsock.sh CASE -- TERN-ARGV...
#
# Runs tern (TERN-ARGV, whose guest runs xtask/guest/scenarios/vsock.sh) with
# --vsock cid=3,socket=SOCK and an API socket.
# 1. Listens on SOCK_5000 (what a guest connection to the host's port 5000 reaches) and, once
#    the guest listens on vsock port 1024, connects to SOCK with CONNECT 1024. Both connections
#    must carry a line and its echo.
# 2. Accepts the guest's connection to port 5001 on SOCK_5001 and keeps it open; pauses the VM,
#    snapshots it, kills tern with SIGKILL and restores the snapshot in a new tern (lazy). The
#    guest's held connection must end with ECONNRESET; its new connection to port 5002 and L1's
#    CONNECT 1025 must carry a line and its echo.
# 3. Migrates the restored VM live to a third tern on this host whose vsock is on another
#    socket (--vsock-socket SOCK2): the guest's connection held to port 5003 must end with
#    ECONNRESET, a new one to port 5004 reach SOCK2_5004, and CONNECT 1026 on SOCK2 reach the
#    guest. The source must exit 0 and remove SOCK; the destination exit 0 and remove SOCK2.
#
# Output: "TERN-VSOCK-PASS CASE/CHECK: what" per passed check, "TERN-VSOCK-FAIL CASE/CHECK: why"
# per failed one, the VM's output, and "TERN-VSOCK-OK CASE" when every check passed.

set -u
export PATH=/usr/bin:/bin:/usr/sbin:/sbin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu

case_=${1:?usage: vsock.sh CASE -- TERN-ARGV...}
shift
[ "${1:-}" = "--" ] && shift
tern=$1
TAG=TERN-VSOCK
W=/tmp/tern-vsock-$case_
V=$W/v.sock
OUT=$W/tern-1.out
OUT2=$W/tern-2.out
SNAP=$W/snap
rm -rf "$W"
mkdir -p "$W"
. /rig/l1/l1-lib.sh

# host_connect CHECK PORT MSG: L1 connects to the guest's PORT through tern's socket; tern must
# answer OK, and the guest's listener echo MSG.
host_connect() {
    host=$(vsock-rig unix-connect "$V" "$2" "$3" 2>&1)
    if echo "$host" | grep -q '^VSOCK-RIG ok=OK [0-9]' &&
        echo "$host" | grep -q "^VSOCK-RIG answer=echo:$3"; then
        pass "$1" "CONNECT $2 got tern's OK and the guest listener's echo of '$3'"
    else
        fail "$1" "CONNECT $2: $(oneline "$host")"
    fi
}
# guest_line CHECK FILE FACT WANT WHAT: the guest's FACT line in FILE holds WANT.
guest_line() {
    if grep -q -F "TERN-GUEST-$3=$4" "$2"; then
        pass "$1" "$5"
    else
        fail "$1" "$5: not seen; the guest said '$(grep -F "TERN-GUEST-$3=" "$2" | tr -d '\r')'"
    fi
}

# 1: a first boot, connections both ways.
vsock-rig unix-echo "${V}_5000" > "$W/echo-5000" 2>&1 &
epid=$!
vsock-rig unix-hold "${V}_5001" > "$W/hold-5001" 2>&1 &
hpid=$!
"$@" --vsock "cid=3,socket=$V" --api-socket "$W/api.sock" > "$OUT" 2>&1 &
pid=$!
if wait_for "$OUT" TERN-GUEST-VSOCK-LISTENING 120 "$pid"; then
    pass listening "the guest's driver bound and its program listens on vsock port 1024"
    sleep 0.3
    host_connect host-to-guest 1024 host-hello
else
    fail listening "the guest did not listen within 120 s"
fi
if wait_for "$OUT" 'TERN-GUEST-VSOCK-HELD=VSOCK-RIG held=5001' 60 "$pid"; then
    guest_line guest-to-host "$OUT" VSOCK-CONNECT 'VSOCK-RIG answer=echo:guest-hello' \
        "a guest connection to the host's port 5000 reached ${V}_5000 and got its echo"
    guest_line guest-served "$OUT" VSOCK-SERVED 'VSOCK-RIG listening=1024 VSOCK-RIG served=host-hello' \
        "the guest's listener served L1's line"
    if grep -q 'served=guest-hello' "$W/echo-5000"; then
        pass l1-served "L1's listener served the guest's line"
    else
        fail l1-served "$(oneline "$(cat "$W/echo-5000")")"
    fi
    pass held "the guest holds a connection to the host's port 5001"
else
    fail held "the guest holds no connection to port 5001: $(oneline "$(grep TERN-GUEST-VSOCK "$OUT")")"
    kill -9 "$pid" "$epid" "$hpid" 2>/dev/null
    cat "$OUT"
    verdict
fi

# 2: snapshot, kill, restore.
if out=$("$tern" pause --api-socket "$W/api.sock" 2>&1); then
    pass pause "tern pause"
else
    fail pause "$(oneline "$out")"
fi
if out=$("$tern" snapshot create --dir "$SNAP" --api-socket "$W/api.sock" 2>&1); then
    pass snapshot "tern snapshot create wrote $SNAP"
else
    fail snapshot "$(oneline "$out")"
fi
kill -9 "$pid"
wait "$pid"
echo "$TAG-LOG vsock/first run:"
tr -d '\r' < "$OUT"
echo "$TAG-LOG-END vsock/first run"
vsock-rig unix-echo "${V}_5002" > "$W/echo-5002" 2>&1 &
vsock-rig unix-hold "${V}_5003" > "$W/hold-5003" 2>&1 &
h3pid=$!
"$tern" run --restore "$SNAP" --restore-mode lazy --api-socket "$W/api2.sock" > "$OUT2" 2>&1 &
pid=$!
if wait_for "$OUT2" TERN-GUEST-VSOCK-HOLD-ENDED= 120 "$pid"; then
    guest_line reset "$OUT2" VSOCK-HOLD-ENDED 'VSOCK-RIG held=5001 VSOCK-RIG hold-ended=ECONNRESET' \
        "after the restore the guest's held connection ended with ECONNRESET (transport reset)"
    sleep 0.3
    host_connect host-to-guest-restored 1025 after-restore
else
    fail reset "the held connection did not end within 120 s of the restore"
fi
if wait_for "$OUT2" 'TERN-GUEST-VSOCK-HELD3=VSOCK-RIG held=5003' 60 "$pid"; then
    guest_line guest-to-host-restored "$OUT2" VSOCK-CONNECT2 'VSOCK-RIG answer=echo:after-restore' \
        "after the restore a guest connection to the host's port 5002 got its echo"
    guest_line guest-served-restored "$OUT2" VSOCK-SERVED2 'VSOCK-RIG listening=1025 VSOCK-RIG served=after-restore' \
        "after the restore the guest's listener (made before the snapshot) served L1's line"
else
    fail held3 "the restored guest holds no connection to port 5003"
fi
if grep -q 'hold-ended=eof' "$W/hold-5001"; then
    pass l1-held "L1's end of the held connection closed when the first tern died"
else
    fail l1-held "$(oneline "$(cat "$W/hold-5001")")"
fi

# 3: a live migration of the restored VM to a third tern on this host, its vsock on V2 (the
# source keeps V until it ends). The destination accepts the kernel and initrd where the argv
# has them.
V2=$W/v2.sock
URL=unix:$W/mig.sock
OUT3=$W/tern-3.out
accept=
set_next=
for a in "$@"; do
    case "$set_next" in --kernel | --initrd) accept="$accept --accept-dir $(dirname "$a")" ;; esac
    set_next=$a
done
vsock-rig unix-echo "${V2}_5004" > "$W/echo-5004" 2>&1 &
# shellcheck disable=SC2086 # $accept is a list of flags; the directories have no spaces
"$tern" run --incoming "$URL" --vsock-socket "$V2" $accept --api-socket "$W/api3.sock" \
    > "$OUT3" 2>&1 &
pid3=$!
if wait_for "$OUT3" "waiting for a migrating VM" 30 "$pid3"; then
    if out=$("$tern" migrate --api-socket "$W/api2.sock" --to "$URL" 2>&1); then
        pass migrate "tern migrate: $(oneline "$out")"
    else
        fail migrate "tern migrate: $(oneline "$out")"
    fi
else
    fail migrate "the destination does not wait on $URL: $(oneline "$(head -c 400 "$OUT3")")"
fi
n=0
while kill -0 "$pid" 2>/dev/null && [ $n -lt 150 ]; do
    n=$((n + 1))
    sleep 0.2
done
if ! kill -0 "$pid" 2>/dev/null; then
    wait "$pid"
    rc=$?
    [ "$rc" = 0 ] && pass source-exit "the source tern exited 0 after the migration" ||
        fail source-exit "the source tern exited with status $rc"
else
    fail source-exit "the source tern still runs 30 s after tern migrate"
    kill -9 "$pid" 2>/dev/null
fi
echo "$TAG-LOG vsock/restored run:"
tr -d '\r' < "$OUT2"
echo "$TAG-LOG-END vsock/restored run"
if [ -e "$V" ]; then
    fail socket "the source tern left its vsock socket $V behind"
else
    pass socket "the source tern removed its vsock socket"
fi
if wait_for "$OUT3" TERN-GUEST-VSOCK-HOLD3-ENDED= 120 "$pid3"; then
    guest_line reset-migrated "$OUT3" VSOCK-HOLD3-ENDED 'VSOCK-RIG held=5003 VSOCK-RIG hold-ended=ECONNRESET' \
        "after the migration the guest's held connection ended with ECONNRESET (transport reset)"
    sleep 0.3
    vsock_host="$V"
    V=$V2
    host_connect host-to-guest-migrated 1026 after-migration
    V=$vsock_host
else
    fail reset-migrated "the held connection did not end within 120 s of the migration"
fi
finish_vmm exit "$pid3" "$OUT3"
guest_line guest-to-host-migrated "$OUT3" VSOCK-CONNECT3 'VSOCK-RIG answer=echo:after-migration' \
    "after the migration a guest connection to the host's port 5004 reached ${V2}_5004 and got its echo"
guest_line guest-served-migrated "$OUT3" VSOCK-SERVED3 'VSOCK-RIG listening=1026 VSOCK-RIG served=after-migration' \
    "after the migration the guest's listener (made before it) served L1's line"
kill "$h3pid" 2>/dev/null
if [ -e "$V2" ]; then
    fail socket-migrated "the destination tern left its vsock socket $V2 behind"
else
    pass socket-migrated "the destination tern removed its vsock socket"
fi
verdict
