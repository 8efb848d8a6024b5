//! The CMOS real-time clock (MC146818) at ports 0x70/0x71, so guests read the right wall-clock
//! time at boot. Time comes from the host's clock at each read (UTC, BCD, 24-hour mode);
//! guest writes to the time registers are accepted but not kept (the clock follows the host),
//! alarms and periodic interrupts are not emulated. 128 bytes of CMOS RAM are kept.
//!
//! Why in-tree: vm-superio only has the Arm PL031 RTC.

use crate::BusDevice;

/// PIO base (index port; data port is +1).
pub const RTC_BASE: u64 = 0x70;
/// Length of the range.
pub const RTC_LEN: u64 = 2;

const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const CENTURY: u8 = 0x32;
/// Register B: 24-hour mode, BCD (bit 2 clear).
const REG_B_24H: u8 = 1 << 1;
/// Register D: valid RAM and time.
const REG_D_VRT: u8 = 1 << 7;

/// The RTC's state in a snapshot.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct RtcState {
    index: u8,
    ram: Vec<u8>,
}

/// The RTC and CMOS RAM.
pub struct Rtc {
    index: u8,
    ram: [u8; 128],
    now: Box<dyn Fn() -> i64 + Send>,
}

fn bcd(v: u32) -> u8 {
    (((v / 10) << 4) | (v % 10)) as u8
}

/// (year, month, day, hour, minute, second, weekday 1=Sunday) of a Unix time, UTC.
fn civil(t: i64) -> (i64, u32, u32, u32, u32, u32, u32) {
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400) as u32;
    // Howard Hinnant's days-from-civil inverse.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = if m <= 2 { y + 1 } else { y };
    let weekday = ((days + 4).rem_euclid(7) + 1) as u32; // 1970-01-01 was a Thursday
    (
        year,
        m,
        d,
        secs / 3600,
        (secs / 60) % 60,
        secs % 60,
        weekday,
    )
}

impl Rtc {
    /// An RTC reading the host's real-time clock.
    pub fn new() -> Self {
        Self::with_clock(Box::new(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0)
        }))
    }

    /// An RTC reading `now()` (Unix seconds) — for tests.
    pub fn with_clock(now: Box<dyn Fn() -> i64 + Send>) -> Self {
        let mut ram = [0u8; 128];
        ram[REG_A as usize] = 0x26; // 32.768 kHz time base, 1024 Hz rate; UIP clear
        ram[REG_B as usize] = REG_B_24H;
        ram[REG_D as usize] = REG_D_VRT;
        Rtc { index: 0, ram, now }
    }

    /// The index register and CMOS RAM, for a snapshot (the time itself follows the host).
    fn save_state(&self) -> RtcState {
        RtcState {
            index: self.index,
            ram: self.ram.to_vec(),
        }
    }

    /// Puts saved CMOS RAM and index back.
    fn restore_state(&mut self, s: &RtcState) -> Result<(), String> {
        // The guest's index port keeps 7 bits (bit 7 is the NMI mask); a larger index would
        // address past the CMOS RAM.
        if s.index > 0x7f {
            return Err(format!(
                "RTC: saved CMOS index {:#x} is out of range (at most 0x7f)",
                s.index
            ));
        }
        self.ram =
            s.ram.as_slice().try_into().map_err(|_| {
                format!("RTC: {} bytes of CMOS RAM saved, 128 expected", s.ram.len())
            })?;
        self.index = s.index;
        Ok(())
    }

    fn read_reg(&mut self, reg: u8) -> u8 {
        let (year, mon, day, h, m, s, wd) = civil((self.now)());
        match reg {
            0x00 => bcd(s),
            0x02 => bcd(m),
            0x04 => bcd(h),
            0x06 => bcd(wd),
            0x07 => bcd(day),
            0x08 => bcd(mon),
            0x09 => bcd(year.rem_euclid(100) as u32),
            CENTURY => bcd((year.div_euclid(100)).clamp(0, 99) as u32),
            REG_C => {
                // Reading C clears pending interrupt flags; none are ever raised.
                let v = self.ram[REG_C as usize];
                self.ram[REG_C as usize] = 0;
                v
            }
            r => self.ram[usize::from(r & 0x7f)],
        }
    }
}

impl Default for Rtc {
    fn default() -> Self {
        Self::new()
    }
}

impl lifecycle::Component for Rtc {
    fn save(&mut self, id: &str) -> Result<Option<lifecycle::Section>, String> {
        lifecycle::Section::new(id, 1, &self.save_state()).map(Some)
    }

    fn restore(&mut self, section: &lifecycle::Section) -> Result<(), String> {
        self.restore_state(&section.parse(&[1])?)
    }
}

impl BusDevice for Rtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let Some(b) = data.first_mut() else { return };
        *b = match offset {
            0 => self.index,
            _ => self.read_reg(self.index),
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            // Bit 7 of the index port is the NMI mask; the register is the low 7 bits.
            0 => self.index = v & 0x7f,
            _ => match self.index {
                0x00..=0x09 | CENTURY | REG_C | REG_D => {}
                // Keep the guest's mode bits except binary/12-hour, which tern does not do.
                REG_B => self.ram[REG_B as usize] = (v & !0x06) | REG_B_24H,
                REG_A => self.ram[REG_A as usize] = v & 0x7f,
                r => self.ram[usize::from(r)] = v,
            },
        }
    }
}

/// The CMOS RTC in the DSDT (`\_SB_.RTC_`, `PNP0B00`): its two ports and IRQ 8.
pub struct RtcAcpi;

impl acpi_tables::Aml for RtcAcpi {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        use acpi_tables::aml;
        let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0B00"));
        let io = aml::IO::new(RTC_BASE as u16, RTC_BASE as u16, 1, RTC_LEN as u8);
        let irq = aml::Interrupt::new(true, true, false, false, 8);
        let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&io, &irq]));
        aml::Device::new("_SB_.RTC_".into(), vec![&hid, &crs]).to_aml_bytes(sink);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(rtc: &mut Rtc, reg: u8) -> u8 {
        rtc.write(0, &[reg | 0x80]);
        let mut b = [0u8];
        rtc.read(1, &mut b);
        b[0]
    }

    #[test]
    fn cmos_ram_survives_save_and_restore() {
        let mut a = Rtc::with_clock(Box::new(|| 0));
        a.write(0, &[0x40]);
        a.write(1, &[0x5a]); // CMOS RAM byte 0x40
        a.write(0, &[0x41]);
        let s = a.save_state();
        let mut b = Rtc::with_clock(Box::new(|| 0));
        b.restore_state(&s).unwrap();
        assert_eq!(read(&mut b, 0x40), 0x5a);
        assert!(b
            .restore_state(&RtcState {
                index: 0,
                ram: vec![0; 3]
            })
            .is_err());
    }

    /// A saved index past the CMOS RAM is refused, so a guest access through it cannot index
    /// out of bounds.
    #[test]
    fn out_of_range_saved_index_is_refused() {
        let mut good = Rtc::with_clock(Box::new(|| 0));
        good.write(0, &[0x7f]);
        let mut s = good.save_state();
        let mut b = Rtc::with_clock(Box::new(|| 0));
        b.restore_state(&s).unwrap();
        for index in [0x80, 0xc5, 0xff] {
            s.index = index;
            let mut b = Rtc::with_clock(Box::new(|| 0));
            let e = b.restore_state(&s).unwrap_err();
            assert!(
                e.contains("CMOS index") && e.contains("out of range"),
                "{e}"
            );
            // The RTC keeps a valid state; guest accesses work.
            b.write(1, &[0x12]);
            let mut v = [0u8];
            b.read(1, &mut v);
        }
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), (1970, 1, 1, 0, 0, 0, 5));
        // 2026-11-24 01:02:03 UTC, a Tuesday.
        assert_eq!(civil(1_795_482_123), (2026, 11, 24, 1, 2, 3, 3));
        // 2000-02-29 (leap day) 23:59:59, a Tuesday.
        assert_eq!(civil(951_868_799), (2000, 2, 29, 23, 59, 59, 3));
    }

    #[test]
    fn reads_bcd_time_from_the_clock() {
        let mut rtc = Rtc::with_clock(Box::new(|| 1_795_482_123));
        assert_eq!(read(&mut rtc, 0x00), 0x03);
        assert_eq!(read(&mut rtc, 0x02), 0x02);
        assert_eq!(read(&mut rtc, 0x04), 0x01);
        assert_eq!(read(&mut rtc, 0x07), 0x24);
        assert_eq!(read(&mut rtc, 0x08), 0x11);
        assert_eq!(read(&mut rtc, 0x09), 0x26);
        assert_eq!(read(&mut rtc, CENTURY), 0x20);
        assert_eq!(
            read(&mut rtc, REG_A) & 0x80,
            0,
            "update in progress never set"
        );
        assert_eq!(read(&mut rtc, REG_B) & 0x06, REG_B_24H);
        assert_eq!(read(&mut rtc, REG_D), REG_D_VRT);
    }

    #[test]
    fn cmos_ram_and_index() {
        let mut rtc = Rtc::with_clock(Box::new(|| 0));
        rtc.write(0, &[0x40]);
        rtc.write(1, &[0x5a]);
        assert_eq!(read(&mut rtc, 0x40), 0x5a);
        let mut b = [0u8];
        rtc.read(0, &mut b);
        assert_eq!(b[0], 0x40);
        // Time registers ignore writes; binary mode is refused.
        rtc.write(0, &[0x00]);
        rtc.write(1, &[0x99]);
        assert_eq!(read(&mut rtc, 0x00), 0x00);
        rtc.write(0, &[REG_B]);
        rtc.write(1, &[0x04]);
        assert_eq!(read(&mut rtc, REG_B) & 0x04, 0);
        rtc.write(1, &[]);
        rtc.read(1, &mut []);
    }
}
