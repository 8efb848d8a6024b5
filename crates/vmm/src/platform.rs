//! The legacy platform every tern VM has: COM1, the CMOS RTC, the i8042 (for its reset line),
//! the ACPI PM registers and power button, the VM generation ID's notification, and tern's
//! debug ports; placed on the port I/O bus, their interrupts as irqfds.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use arch::layout::*;
use devices::acpi::{AcpiPm, PmRequest, PowerButton};
use devices::legacy::{
    DebugExit, DebugPort, PortB, DEBUG_EXIT_PORT, DEBUG_PORT, I8042, I8042_BASE, I8042_LEN,
};
use devices::rtc::{Rtc, RtcAcpi, RTC_BASE, RTC_LEN};
use devices::serial::{SerialAcpi, SerialDevice, SerialOut, COM1_BASE, COM1_IRQ, COM1_LEN};
use devices::EventFdTrigger;

use crate::config::VmConfig;
use crate::console::open_char_sink;
use crate::control::{VmControl, VmExit};
use crate::device_manager::DeviceManager;
use crate::error::{kvm_err, setup, VmmError};

/// What the VMM keeps a hand on of the legacy devices (the device manager has them all).
pub struct Platform {
    /// COM1.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// Raises the ACPI power button (GED).
    pub power_button: EventFd,
    /// Raises `\_SB_.GED1`: the VM generation ID changed.
    pub vmgenid_evt: EventFd,
    /// Set when the guest's console showed a kernel panic.
    pub panic_seen: Arc<AtomicBool>,
}

/// The PIT's input clock.
const PIT_HZ: u128 = 1_193_182;

/// CLOCK_MONOTONIC in nanoseconds: the clock of KVM's PIT timestamps.
fn monotonic_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes only to `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

/// A PIT channel's output at `now` (ns), from KVM's state of it: the time since its count was
/// loaded in input clock ticks, against the count, per counting mode.
fn timer2_out(ch: &kvm_bindings::kvm_pit_channel_state, now: i64) -> bool {
    let count = if ch.count == 0 {
        0x10000
    } else {
        u128::from(ch.count)
    };
    let elapsed = u128::try_from(now.saturating_sub(ch.count_load_time)).unwrap_or(0);
    let d = elapsed * PIT_HZ / 1_000_000_000;
    match ch.mode {
        0 => d >= count,
        1 => d < count,
        2 | 6 => !d.is_multiple_of(count) || d == 0,
        3 | 7 => d % count < count.div_ceil(2),
        _ => d == count,
    }
}

fn irqfd(vm: &VmFd, gsi: u32, what: &'static str) -> Result<EventFd, VmmError> {
    let e = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| setup(format!("eventfd: {e}")))?;
    vm.register_irqfd(&e, gsi).map_err(kvm_err(what))?;
    Ok(e)
}

impl Platform {
    /// Creates the legacy devices, each described in `dm` under its id.
    pub fn create(
        config: &VmConfig,
        vm: &Arc<VmFd>,
        ctl: &Arc<VmControl>,
        start: Instant,
        dm: &mut DeviceManager,
    ) -> Result<Platform, VmmError> {
        let panic_seen = Arc::new(AtomicBool::new(false));
        let sink = open_char_sink(&config.serial, "serial output file")?;
        let serial_irq = irqfd(vm, COM1_IRQ, "register serial irqfd")?;
        let mut out = SerialOut::new(sink, panic_seen.clone());
        if config.firmware.is_some() {
            for text in crate::firmware::NO_BOOT_DEVICE {
                out.watch_for(text, crate::firmware::no_boot_device(ctl));
            }
        }
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            EventFdTrigger(serial_irq),
            out,
        )));
        let power_button = irqfd(vm, ACPI_GED_GSI, "register power button irqfd")?;
        let vmgenid_evt = irqfd(vm, ACPI_VMGENID_GSI, "register VM generation ID irqfd")?;
        // The devices that end the VM (reset, power off, debug exit) record the reason on the
        // vCPU thread that wrote to them, before it could run on: that vCPU sees the VM
        // stopping and does not re-enter KVM_RUN, and the first reason recorded wins (a guest
        // that resets and then triple-faults has reset).
        let c = ctl.clone();
        let mut i8042 = I8042::new(Box::new(move || c.request_exit(VmExit::Reset)));
        // Firmware and bootloaders time their calibration on port 0x61; a kernel boot leaves it
        // reading 0, as before (Linux gets its clock rates from KVM).
        if config.firmware.is_some() {
            let pit_vm = vm.clone();
            i8042 = i8042.with_port_b(PortB::new(Box::new(move || {
                pit_vm
                    .get_pit2()
                    .is_ok_and(|p| timer2_out(&p.channels[2], monotonic_ns()))
            })));
        }
        let c = ctl.clone();
        let debug_exit = DebugExit::new(Box::new(move |s| c.request_exit(VmExit::DebugExit(s))));
        let c = ctl.clone();
        let acpi_pm = AcpiPm::new(
            arch::acpi::S5_SLEEP_TYPE,
            ACPI_RESET_VALUE,
            Box::new(move |r| {
                c.request_exit(match r {
                    PmRequest::PowerOff => VmExit::PowerOff,
                    PmRequest::Reset => VmExit::Reset,
                })
            }),
        );
        let rtc = Arc::new(Mutex::new(Rtc::new()));

        // Described in DSDT order; stateful ones in snapshot walk order.
        let com1 = dm.describe("com1", "the COM1 UART");
        com1.component = Some(serial.clone());
        com1.acpi = Some(Box::new(SerialAcpi));
        let cmos = dm.describe("rtc", "the CMOS RTC");
        cmos.component = Some(rtc.clone());
        // Format-2 snapshots from before the RTC's RAM was saved have no state for it.
        cmos.optional_in_old_snapshots = true;
        cmos.acpi = Some(Box::new(RtcAcpi));
        dm.describe("acpi-pm", "the ACPI PM registers and power button")
            .acpi = Some(Box::new(PowerButton { gsi: ACPI_GED_GSI }));
        // A firmware owns the page below 1 MiB the generation ID would take.
        if config.firmware.is_none() {
            dm.describe("vmgenid", "the VM generation ID").acpi =
                Some(Box::new(crate::vmgenid::VmGenIdAcpi));
        }
        dm.add_pio(
            "acpi-pm",
            Arc::new(Mutex::new(acpi_pm)),
            ACPI_SLEEP_CONTROL_PORT,
            3,
        )?;
        if config.firmware.is_some() {
            let c = ctl.clone();
            let pm1 = devices::acpi::Pm1Block::new(
                arch::acpi::S5_SLEEP_TYPE,
                Box::new(move |r| {
                    if r == PmRequest::PowerOff {
                        c.request_exit(VmExit::PowerOff)
                    }
                }),
            );
            dm.add_pio(
                "acpi-pm1",
                Arc::new(Mutex::new(pm1)),
                crate::firmware::pm1_base(config),
                devices::acpi::PM1_BLOCK_LEN,
            )?;
        }
        dm.add_pio("com1", serial.clone(), COM1_BASE, COM1_LEN)?;
        dm.add_pio("i8042", Arc::new(Mutex::new(i8042)), I8042_BASE, I8042_LEN)?;
        dm.add_pio(
            "debug-exit",
            Arc::new(Mutex::new(debug_exit)),
            DEBUG_EXIT_PORT,
            4,
        )?;
        let timer = Arc::new(Mutex::new(DebugPort::new(start)));
        dm.add_pio("debug-port", timer, DEBUG_PORT, 1)?;
        dm.add_pio("rtc", rtc, RTC_BASE, RTC_LEN)?;

        Ok(Platform {
            serial,
            power_button,
            vmgenid_evt,
            panic_seen,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timer2_output_follows_the_count() {
        let ch = |mode, count| kvm_bindings::kvm_pit_channel_state {
            mode,
            count,
            count_load_time: 1_000_000_000,
            ..Default::default()
        };
        let at = |ticks: i64| 1_000_000_000 + ticks * 1_000_000_000 / 1_193_182 + 1;
        // Mode 0 (interrupt on terminal count): low until the count has run out.
        assert!(!timer2_out(&ch(0, 1000), at(999)));
        assert!(timer2_out(&ch(0, 1000), at(1001)));
        // Mode 3 (square wave): high for the first half of each period.
        assert!(timer2_out(&ch(3, 1000), at(100)));
        assert!(!timer2_out(&ch(3, 1000), at(700)));
        assert!(timer2_out(&ch(3, 1000), at(1100)));
        // A count of 0 means 65536; before the load time nothing has elapsed.
        assert!(!timer2_out(&ch(0, 0), at(65000)));
        assert!(!timer2_out(&ch(0, 10), 0));
    }
}
