# vCPU hotplug under the Debian kernel, driven from L1 (xtask/l1/scenarios/cpuhotplug.sh):
# L1 resizes the VM 1 -> 4 -> 2 -> 4 vCPUs. The kernel adds the vCPUs tern plugs in (ACPI
# device check) and offlines and ejects those it is asked to remove (ACPI eject request) by
# itself; this script onlines added ones (as udev would), and whenever the set of online
# CPUs changes it says so and runs a task pinned to each online CPU, which must report that it
# ran there. It powers off once it has seen 4, 2 and 4 CPUs in that order.
cpus_online() { cat /sys/devices/system/cpu/online; }
# online_ids: the kernel's online mask ("0-1,3") as a list of CPU numbers. The mask, not the
# cpuN/online files: a vCPU being added has its cpuN directory a moment before its online file.
online_ids() {
    for r in $(cpus_online | tr ',' ' '); do
        case "$r" in
            *-*) seq "${r%-*}" "${r#*-}" ;;
            *) echo "$r" ;;
        esac
    done
}
online_count() { online_ids | wc -l; }
# work_on_each: runs a task pinned to each online CPU; each must report (field 39 of its
# /proc/self/stat) that it ran there. A CPU the kernel takes offline meanwhile (while it
# ejects a vCPU) is left out: the next change of the count runs this again.
work_on_each() {
    ok=""
    for id in $(online_ids); do
        ran=$(taskset -c "$id" awk '{ print $39 }' /proc/self/stat 2>&1)
        if [ "$ran" = "$id" ]; then
            ok="$ok $id"
        elif ! online_ids | grep -qx "$id"; then
            echo "TERN-GUEST-CPUS-LEFT $id went offline while checked"
        else
            echo "TERN-GUEST-ERROR: a task pinned to CPU $id ran on '$ran'"
        fi
    done
    echo "TERN-GUEST-CPUS-WORKED$ok"
}
seen=""
stage=0
last=""
echo "TERN-GUEST-CPUS-READY online=$(cpus_online) count=$(online_count)"
n=0
while [ $n -lt 1200 ]; do
    for c in /sys/devices/system/cpu/cpu[0-9]*; do
        [ -f "$c/online" ] && [ "$(cat "$c/online")" = 0 ] && echo 1 > "$c/online" 2>/dev/null
    done
    count=$(online_count)
    if [ "$count" != "$last" ]; then
        last=$count
        echo "TERN-GUEST-CPUS online=$(cpus_online) count=$count"
        work_on_each
        seen="$seen $count"
        # 4, then 2, then 4 again; a count passed on the way (3, while one of two vCPUs is
        # ejected and the other not yet) does not count against it.
        case "$stage$count" in
            04) stage=1 ;;
            12) stage=2 ;;
            24) stage=3 ;;
        esac
        [ "$stage" = 3 ] && break
    fi
    n=$((n + 1))
    sleep 0.2
done
case "$stage" in
    3)
        echo "TERN-GUEST-CPUS-DONE seen:$seen"
        # L1 reads tern's view of the last step before the guest powers off.
        sleep 5
        ;;
    *) echo "TERN-GUEST-ERROR: CPU counts seen:$seen, not 4, then 2, then 4, within 240 s" ;;
esac
