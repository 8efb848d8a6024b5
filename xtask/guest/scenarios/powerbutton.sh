# The ACPI power button: load the button driver, let busybox acpid run a power-off action for
# the power button event, then wait; the rig sends tern SIGTERM when it sees the line below,
# tern presses the button (ACPI GED -> Notify(PWRB, 0x80)) and the guest powers off.
rig_modload evdev button || echo "TERN-GUEST-ERROR: cannot load evdev.ko/button.ko"
ls /dev/input/ >/dev/null 2>&1 || echo "TERN-GUEST-ERROR: no input devices"
mkdir -p /etc/acpi/PWRF
cat > /etc/acpi/PWRF/00000080 <<'EOS'
#!/bin/sh
echo TERN-GUEST-POWER-BUTTON > /dev/console
poweroff -f
EOS
chmod +x /etc/acpi/PWRF/00000080
acpid -c /etc/acpi -l /tmp/acpid.log
sleep 0.3
echo TERN-GUEST-WAITING-FOR-BUTTON
sleep 50
echo "TERN-GUEST-ERROR: no power button event within 50 s"
cat /tmp/acpid.log
