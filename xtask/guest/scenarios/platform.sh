# Platform checks: the CMOS RTC was found through ACPI and agrees with the system clock
# (kvmclock) to within a minute, and the guest's ACPI parsing raised no errors.
rtc_name=$(cat /sys/class/rtc/rtc0/name 2>/dev/null)
rtc_time=$(cat /sys/class/rtc/rtc0/since_epoch 2>/dev/null)
now=$(date +%s)
echo "TERN-GUEST-RTC=${rtc_name:-none} rtc=${rtc_time:-none} date=$now"
if [ -z "$rtc_time" ]; then
    echo "TERN-GUEST-ERROR: no RTC"
elif [ $((rtc_time - now)) -gt 60 ] || [ $((now - rtc_time)) -gt 60 ]; then
    echo "TERN-GUEST-ERROR: RTC and system clock differ by more than 60 s"
elif [ "$now" -lt 1700000000 ]; then
    echo "TERN-GUEST-ERROR: the guest's wall clock is not the current time ($now)"
else
    echo "TERN-GUEST-RTC-OK"
fi
if dmesg | grep -i -E "ACPI (BIOS )?Error|ACPI Exception" >/dev/null; then
    echo "TERN-GUEST-ERROR: ACPI errors in dmesg"
    dmesg | grep -i -E "ACPI (BIOS )?Error|ACPI Exception"
else
    echo "TERN-GUEST-ACPI-OK"
fi
