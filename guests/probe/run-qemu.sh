#!/bin/sh
# Boot the probe under QEMU with KVM, as verified on the development host.
#
# Usage: ./run-qemu.sh ["kernel command line"] [extra QEMU arguments...]
#   e.g. ./run-qemu.sh "probe.run=hello,smp,mem,timer,exits,cpuid"
# Environment (defaults in brackets):
#   PROBE    ELF to boot [target/x86_64-unknown-linux-gnu/release/probe]
#   MACHINE  QEMU machine, microvm or pc [microvm]
#   ACCEL    kvm or tcg [kvm]
#   CPU      CPU model [host,-arch-capabilities] (plain "host" fails on the
#            development host: its KVM rejects MSR 0x10a; use "max" with tcg)
#   SMP      vCPUs [2]     MEM   RAM in MiB [64]     TIMEOUT  seconds [60]
#   DEBUGCON file that receives the debug-port (0x440) milestone bytes [none]
#
# Exit status: the probe's own status (0 all passed, 1 some failed, 2 panic,
# 3 CPU exception, 4 bad boot information), 124 on timeout, 125 when QEMU
# failed or the guest stopped without writing the exit port (e.g. triple fault).
set -u
dir=$(cd "$(dirname "$0")" && pwd)
probe=${PROBE:-$dir/target/x86_64-unknown-linux-gnu/release/probe}
append=${1:-probe.run=hello}
[ $# -gt 0 ] && shift
set -- -device isa-debug-exit,iobase=0xf4,iosize=0x04 "$@"
if [ -n "${DEBUGCON:-}" ]; then
    set -- -chardev file,id=probedbg,path="$DEBUGCON" -device isa-debugcon,iobase=0x440,chardev=probedbg "$@"
fi
timeout "${TIMEOUT:-60}" qemu-system-x86_64 -accel "${ACCEL:-kvm}" -M "${MACHINE:-microvm}" \
    -cpu "${CPU:-host,-arch-capabilities}" -smp "${SMP:-2}" -m "${MEM:-64}" \
    -nographic -no-reboot -kernel "$probe" -append "$append" "$@"
rc=$?
case $rc in
    124) echo "run-qemu: timeout" >&2; exit 124 ;;
    *) if [ $((rc % 2)) -eq 1 ]; then exit $(((rc - 1) / 2)); fi
       echo "run-qemu: QEMU exited with $rc without a probe status" >&2; exit 125 ;;
esac
