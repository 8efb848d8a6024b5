//! Hardware-reduced ACPI power management registers: sleep control (S5 = power off), sleep
//! status, and the reset register.

use crate::BusDevice;

/// What the guest asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PmRequest {
    /// S5: power off.
    PowerOff,
    /// Reset register written.
    Reset,
}

/// The three one-byte registers at consecutive ports: +0 sleep control, +1 sleep status,
/// +2 reset.
pub struct AcpiPm {
    s5_sleep_type: u8,
    reset_value: u8,
    on_request: Box<dyn FnMut(PmRequest) + Send>,
}

impl AcpiPm {
    /// Registers reporting `_S5_` sleep type `s5_sleep_type` and reset value `reset_value`.
    pub fn new(
        s5_sleep_type: u8,
        reset_value: u8,
        on_request: Box<dyn FnMut(PmRequest) + Send>,
    ) -> Self {
        AcpiPm {
            s5_sleep_type,
            reset_value,
            on_request,
        }
    }
}

/// SLP_EN bit of the sleep control register.
const SLP_EN: u8 = 1 << 5;

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status: wake status never set; other registers read as zero.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            0 if v & SLP_EN != 0 && (v >> 2) & 0x7 == self.s5_sleep_type => {
                (self.on_request)(PmRequest::PowerOff)
            }
            2 if v == self.reset_value => (self.on_request)(PmRequest::Reset),
            _ => {}
        }
    }
}

/// The power button as the DSDT describes it: `\_SB_.PWRB` (`PNP0C0C`) and a generic event
/// device, `\_SB_.GED_` (hardware-reduced ACPI has no fixed-feature button), whose interrupt
/// `gsi` makes the guest evaluate `_EVT`, which notifies PWRB (0x80: the button was pressed).
pub struct PowerButton {
    /// The GED's interrupt.
    pub gsi: u32,
}

impl acpi_tables::Aml for PowerButton {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        use acpi_tables::aml;
        let pwrb_hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0C0C"));
        let pwrb_uid = aml::Name::new("_UID".into(), &aml::ZERO);
        aml::Device::new("_SB_.PWRB".into(), vec![&pwrb_hid, &pwrb_uid]).to_aml_bytes(sink);
        let hid = aml::Name::new("_HID".into(), &"ACPI0013");
        let uid = aml::Name::new("_UID".into(), &aml::ZERO);
        let irq = aml::Interrupt::new(true, true, false, false, self.gsi);
        let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&irq]));
        let pwrb: aml::Path = "\\_SB_.PWRB".into();
        let notify = aml::Notify::new(&pwrb, &0x80u8);
        let evt = aml::Method::new("_EVT".into(), 1, true, vec![&notify]);
        aml::Device::new("_SB_.GED_".into(), vec![&hid, &uid, &crs, &evt]).to_aml_bytes(sink);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn s5_and_reset() {
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        let mut pm = AcpiPm::new(5, 1, Box::new(move |r| g.lock().unwrap().push(r)));
        pm.write(0, &[5 << 2]); // no SLP_EN
        pm.write(0, &[(3 << 2) | SLP_EN]); // S3: ignored
        pm.write(0, &[(5 << 2) | SLP_EN]);
        pm.write(2, &[2]);
        pm.write(2, &[1]);
        pm.write(1, &[0xff]);
        pm.write(0, &[]);
        assert_eq!(
            *got.lock().unwrap(),
            vec![PmRequest::PowerOff, PmRequest::Reset]
        );
        let mut b = [0xffu8];
        pm.read(1, &mut b);
        assert_eq!(b[0], 0);
    }
}
