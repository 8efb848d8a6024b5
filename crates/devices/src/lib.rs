//! Devices of a tern VM that live on the port-I/O and MMIO buses: the 8250 UART, the CMOS RTC,
//! the ACPI PM registers and power button, the i8042 reset line, the debug-exit and boot-timer
//! ports, the PCI root complex, and the bus that dispatches guest accesses to them. Stateful
//! ones are `lifecycle::Component`s; each describes itself to ACPI (`acpi_tables::Aml`).

pub mod acpi;
pub mod bus;
pub mod flash;
pub mod fw_cfg;
pub mod legacy;
pub mod pci;
pub mod rtc;
pub mod serial;

pub use bus::{Bus, BusDevice, BusError};

use vmm_sys_util::eventfd::EventFd;

/// An interrupt line or event, signalled by writing to an eventfd (an irqfd when the fd is
/// registered with KVM).
pub struct EventFdTrigger(pub EventFd);

impl EventFdTrigger {
    /// Clones the underlying eventfd.
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(EventFdTrigger(self.0.try_clone()?))
    }
}

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
