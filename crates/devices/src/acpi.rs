//! ACPI power management registers: the hardware-reduced ones every kernel boot has (sleep
//! control with S5 = power off, sleep status, reset), and for firmware boots the fixed-hardware
//! PM1 event and control blocks and the PM timer ([`Pm1Block`]).

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

/// The fixed-hardware registers at [`Pm1Block`]'s ports: PM1 status (+0) and enable (+2),
/// PM1 control (+4), PM timer (+8).
pub const PM1_BLOCK_LEN: u64 = 12;
/// PM1 control: SCI_EN (ACPI mode is always on: there is no SMI command port).
const PM1_SCI_EN: u16 = 1;
/// PM1 control: SLP_EN.
const PM1_SLP_EN: u16 = 1 << 13;
/// The PM timer's rate.
const PM_TIMER_HZ: u128 = 3_579_545;

/// The fixed-hardware ACPI PM1 registers and PM timer a firmware-booted VM has: an OS that
/// finds full (not hardware-reduced) ACPI also takes over the legacy PIC and PIT the firmware
/// used. Writing SLP_EN with the `_S5_` sleep type (or 0, the PIIX4's) powers off. No fixed
/// event is ever raised (the power button is the GED's), so the SCI stays quiet.
pub struct Pm1Block {
    s5_sleep_type: u8,
    sts: u16,
    en: u16,
    cnt: u16,
    start: std::time::Instant,
    on_request: Box<dyn FnMut(PmRequest) + Send>,
}

impl Pm1Block {
    /// Registers powering off on SLP_EN with `s5_sleep_type`.
    pub fn new(s5_sleep_type: u8, on_request: Box<dyn FnMut(PmRequest) + Send>) -> Self {
        Pm1Block {
            s5_sleep_type,
            sts: 0,
            en: 0,
            cnt: PM1_SCI_EN,
            start: std::time::Instant::now(),
            on_request,
        }
    }

    fn image(&self) -> [u8; PM1_BLOCK_LEN as usize] {
        let ticks = self.start.elapsed().as_nanos() * PM_TIMER_HZ / 1_000_000_000;
        let tmr = (ticks as u32) & 0x00ff_ffff;
        let mut b = [0u8; PM1_BLOCK_LEN as usize];
        b[0..2].copy_from_slice(&self.sts.to_le_bytes());
        b[2..4].copy_from_slice(&self.en.to_le_bytes());
        b[4..6].copy_from_slice(&(self.cnt | PM1_SCI_EN).to_le_bytes());
        b[8..12].copy_from_slice(&tmr.to_le_bytes());
        b
    }
}

impl BusDevice for Pm1Block {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset < 8 {
            tracing::debug!("ACPI PM1: read of {} bytes at +{offset}", data.len());
        }
        let img = self.image();
        for (i, d) in data.iter_mut().enumerate() {
            *d = usize::try_from(offset)
                .ok()
                .and_then(|o| img.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!("ACPI PM1: write {data:02x?} at +{offset}");
        let mut img = self.image();
        let mut cleared = [0u8; 2];
        for (i, &v) in data.iter().enumerate() {
            let Some(o) = usize::try_from(offset).ok().map(|o| o + i) else {
                return;
            };
            match o {
                // Status bits are cleared by writing ones.
                0 | 1 => cleared[o] = v,
                2..=5 => img[o] = v,
                _ => {}
            }
        }
        self.sts &= !u16::from_le_bytes(cleared);
        self.en = u16::from_le_bytes([img[2], img[3]]);
        let cnt = u16::from_le_bytes([img[4], img[5]]);
        self.cnt = cnt & !PM1_SLP_EN;
        let typ = ((cnt >> 10) & 0x7) as u8;
        // Type 0 is the PIIX4's S5, which OVMF's ResetSystem writes whatever `_S5_` says.
        if cnt & PM1_SLP_EN != 0 && (typ == self.s5_sleep_type || typ == 0) {
            (self.on_request)(PmRequest::PowerOff);
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

    #[test]
    fn pm1_block_powers_off_and_counts() {
        let reqs = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let r = reqs.clone();
        let mut pm = Pm1Block::new(5, Box::new(move |q| r.lock().unwrap().push(q)));
        let mut b = [0u8; 2];
        pm.read(4, &mut b);
        assert_eq!(u16::from_le_bytes(b) & 1, 1, "SCI_EN");
        let mut t1 = [0u8; 4];
        pm.read(8, &mut t1);
        std::thread::sleep(std::time::Duration::from_millis(5));
        let mut t2 = [0u8; 4];
        pm.read(8, &mut t2);
        let d = u32::from_le_bytes(t2).wrapping_sub(u32::from_le_bytes(t1)) & 0xff_ffff;
        assert!(d > 17_000, "{d} ticks in 5 ms");
        // S3 does nothing; S5 with SLP_EN powers off.
        pm.write(4, &((3u16 << 10) | PM1_SLP_EN).to_le_bytes());
        assert!(reqs.lock().unwrap().is_empty());
        pm.write(4, &((5u16 << 10) | PM1_SLP_EN).to_le_bytes());
        assert_eq!(*reqs.lock().unwrap(), vec![PmRequest::PowerOff]);
        pm.write(4, &PM1_SLP_EN.to_le_bytes());
        assert_eq!(reqs.lock().unwrap().len(), 2, "type 0 (OVMF's shutdown)");
        pm.write(2, &0x0100u16.to_le_bytes());
        pm.read(2, &mut b);
        assert_eq!(u16::from_le_bytes(b), 0x0100);
    }
}
