//! Small legacy port devices: i8042 (reset line) with port B (0x61), debug-exit, the
//! boot-timer debug port and the firmware's log port.

use std::time::Instant;

use crate::BusDevice;

/// PIO base of the i8042 controller (data port 0x60, command port 0x64).
pub const I8042_BASE: u64 = 0x60;
/// Length of its range.
pub const I8042_LEN: u64 = 5;
/// PIO port of the debug-exit device: a byte written here ends the VM with that status.
/// QEMU's `isa-debug-exit` (at `iobase=0xf4`) accepts the same write.
pub const DEBUG_EXIT_PORT: u64 = 0xf4;
/// PIO port of the boot-timer debug port: a byte written here is a milestone code.
pub const DEBUG_PORT: u64 = 0x440;

/// The i8042 keyboard controller: enough of it for guests to initialise the controller
/// quickly (configuration byte, self tests, output port) and to reset the machine through it
/// (`reboot=k`: command 0xfe, or clearing bit 0 of the output port).
///
/// A keyboard with no key ever pressed sits on its first port and answers its commands the
/// way a PS/2 keyboard does (acknowledge, reset and self-test result, identity, echo), so
/// firmware finds it at once: OVMF waits a second for an acknowledgement on every probe of a
/// silent port, and with no answer spent 40 s of a nested boot polling the controller. No mouse
/// is attached: commands for it get no answer. The controller raises no interrupt; firmware
/// polls it, and Linux under tern is told not to look for it (`i8042.nopnp` with
/// `i8042.dumbkbd` in the default command line, and no 8042 flag in the FADT).
///
/// Why in-tree: `vm-superio`'s i8042 implements only the reset command and reads back 0, which
/// makes Linux wait for its controller probe to time out on every boot.
pub struct I8042 {
    reset: Box<dyn FnMut() + Send>,
    port_b: Option<PortB>,
    ctr: u8,
    out: std::collections::VecDeque<u8>,
    pending: Option<u8>,
    /// A keyboard command waiting for its parameter byte.
    kbd_pending: Option<u8>,
    last_was_command: bool,
}

const I8042_STATUS_OBF: u8 = 1 << 0;
const I8042_STATUS_SYS: u8 = 1 << 2;
const I8042_STATUS_CMD: u8 = 1 << 3;
/// Keyboard interrupt enabled, system flag, translation on.
const I8042_DEFAULT_CTR: u8 = 0x45;
/// Configuration byte: the controller translates the keyboard's scan codes to set 1.
const I8042_CTR_TRANSLATE: u8 = 1 << 6;
/// A keyboard's acknowledgement of a command or parameter byte.
const KBD_ACK: u8 = 0xfa;

impl I8042 {
    /// A controller calling `reset` when the guest pulses the reset line. It is called on the
    /// vCPU thread during the guest's port write, so the VMM can record the reset before that
    /// vCPU runs another instruction (a guest that resets and then faults must be seen to
    /// reset).
    pub fn new(reset: Box<dyn FnMut() + Send>) -> Self {
        I8042 {
            reset,
            port_b: None,
            ctr: I8042_DEFAULT_CTR,
            out: Default::default(),
            pending: None,
            kbd_pending: None,
            last_was_command: false,
        }
    }

    /// Serves port 0x61 (between the data and command ports) with `port_b`.
    pub fn with_port_b(mut self, port_b: PortB) -> Self {
        self.port_b = Some(port_b);
        self
    }

    fn reply(&mut self, b: u8) {
        if self.out.len() < 16 {
            self.out.push_back(b);
        }
    }

    fn pulse_reset(&mut self) {
        (self.reset)();
    }

    fn command(&mut self, cmd: u8) {
        match cmd {
            0x20 => self.reply(self.ctr),
            0x60 | 0xd1 | 0xd2 | 0xd3 | 0xd4 => self.pending = Some(cmd),
            0xaa => self.reply(0x55),
            0xab => self.reply(0x00),
            0xa9 => self.reply(0xff),
            0xd0 => self.reply(0x01),
            // Pulse output lines: bit 0 low pulses the CPU reset line.
            0xf0..=0xff if cmd & 1 == 0 => self.pulse_reset(),
            _ => {}
        }
    }

    fn data(&mut self, v: u8) {
        match self.pending.take() {
            Some(0x60) => self.ctr = v,
            Some(0xd1) if v & 1 == 0 => self.pulse_reset(),
            Some(0xd2) => self.reply(v),
            // No mouse: what is written to it goes unanswered.
            Some(0xd3 | 0xd4) => {}
            _ => self.keyboard(v),
        }
    }

    /// A byte for the keyboard: a command, or the parameter of the one before.
    fn keyboard(&mut self, v: u8) {
        let translated = self.ctr & I8042_CTR_TRANSLATE != 0;
        if let Some(cmd) = self.kbd_pending.take() {
            self.reply(KBD_ACK);
            // Scan code set 0xf0 with parameter 0 asks which set is in use: set 2, which
            // the controller shows as its set-1 translation.
            if cmd == 0xf0 && v == 0 {
                self.reply(if translated { 0x41 } else { 0x02 });
            }
            return;
        }
        match v {
            // Set LEDs, get/set scan code set, set typematic rate: a parameter follows.
            0xed | 0xf0 | 0xf3 => {
                self.reply(KBD_ACK);
                self.kbd_pending = Some(v);
            }
            0xee => self.reply(0xee),
            // Identify: an MF2 keyboard.
            0xf2 => {
                self.reply(KBD_ACK);
                self.reply(0xab);
                self.reply(if translated { 0x41 } else { 0x83 });
            }
            // Resend: nothing was lost.
            0xfe => {}
            // Reset: acknowledged, then the self test passed.
            0xff => {
                self.reply(KBD_ACK);
                self.reply(0xaa);
            }
            // Enable, disable, set defaults and the rest.
            _ => self.reply(KBD_ACK),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let Some(b) = data.first_mut() else { return };
        *b = match offset {
            0 => self.out.pop_front().unwrap_or(0),
            1 => self.port_b.as_mut().map_or(0, PortB::read),
            4 => {
                let mut st = I8042_STATUS_SYS;
                if !self.out.is_empty() {
                    st |= I8042_STATUS_OBF;
                }
                if self.last_was_command {
                    st |= I8042_STATUS_CMD;
                }
                st
            }
            _ => 0,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            0 => {
                self.last_was_command = false;
                self.data(v);
            }
            1 => {
                if let Some(p) = &mut self.port_b {
                    p.bits = v & PORT_B_WRITABLE;
                }
            }
            4 => {
                self.last_was_command = true;
                self.command(v);
            }
            _ => {}
        }
    }
}

/// Port 0x61, the PC's system control port B: the PIT's timer 2 gate and speaker data (bits 0
/// and 1, kept as written), a toggle each read (bit 4, "refresh"), and timer 2's output (bit
/// 5), which firmware and bootloaders poll to time their calibration loops.
pub struct PortB {
    bits: u8,
    refresh: bool,
    timer2_out: Box<dyn FnMut() -> bool + Send>,
}

/// The bits of port B a guest sets.
const PORT_B_WRITABLE: u8 = 0x03;

impl PortB {
    /// Port B reading timer 2's output from `timer2_out`.
    pub fn new(timer2_out: Box<dyn FnMut() -> bool + Send>) -> Self {
        PortB {
            bits: 0,
            refresh: false,
            timer2_out,
        }
    }

    fn read(&mut self) -> u8 {
        self.refresh = !self.refresh;
        let mut v = self.bits;
        if self.refresh {
            v |= 1 << 4;
        }
        if (self.timer2_out)() {
            v |= 1 << 5;
        }
        v
    }
}

/// Ends the VM with the status byte the guest writes.
pub struct DebugExit {
    on_exit: Box<dyn FnMut(u8) + Send>,
}

impl DebugExit {
    /// A debug-exit device calling `on_exit(status)`.
    pub fn new(on_exit: Box<dyn FnMut(u8) + Send>) -> Self {
        DebugExit { on_exit }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(b) = data.first() {
            (self.on_exit)(*b);
        }
    }
}

/// The firmware's debug console (QEMU's `debugcon`): SeaBIOS and OVMF write their log here
/// byte by byte once a read of the port returns [`FIRMWARE_LOG_MAGIC`].
pub const FIRMWARE_LOG_PORT: u64 = 0x402;
/// What a read of the firmware log port returns: it tells firmware the port is there.
pub const FIRMWARE_LOG_MAGIC: u8 = 0xe9;
/// Longest line the firmware log keeps; the rest of a longer line is dropped.
const FIRMWARE_LOG_LINE: usize = 512;

/// Collects the firmware's log into lines and hands each to a callback. A guest writing
/// without end costs one bounded buffer.
pub struct FirmwareLog {
    line: Vec<u8>,
    announce: bool,
    on_line: Box<dyn FnMut(&str) + Send>,
}

impl FirmwareLog {
    /// A log calling `on_line` with each complete line, without its end. Unless `announce`,
    /// the port reads as absent and firmware does not write its log at all (each byte is a
    /// VM exit).
    pub fn new(announce: bool, on_line: Box<dyn FnMut(&str) + Send>) -> Self {
        FirmwareLog {
            line: Vec::new(),
            announce,
            on_line,
        }
    }
}

impl BusDevice for FirmwareLog {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(if self.announce {
            FIRMWARE_LOG_MAGIC
        } else {
            0xff
        });
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        for &b in data {
            match b {
                b'\n' => {
                    let text = String::from_utf8_lossy(&self.line).into_owned();
                    let text = text.trim_end_matches('\r');
                    if !text.is_empty() {
                        (self.on_line)(text);
                    }
                    self.line.clear();
                }
                _ if self.line.len() < FIRMWARE_LOG_LINE => self.line.push(b),
                _ => {}
            }
        }
    }
}

/// One milestone the guest reported.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Milestone {
    /// The code written.
    pub code: u8,
    /// Microseconds since the VMM started.
    pub micros: u64,
}

/// The boot-timer debug port: the guest writes milestone codes, tern timestamps them relative
/// to its own start and logs them (`tern::boot` target at info level).
pub struct DebugPort {
    start: Instant,
    seen: Vec<Milestone>,
}

impl DebugPort {
    /// A debug port measuring from `start`.
    pub fn new(start: Instant) -> Self {
        DebugPort {
            start,
            seen: Vec::new(),
        }
    }

    /// Milestones seen so far (at most 256 are kept).
    pub fn milestones(&self) -> &[Milestone] {
        &self.seen
    }
}

impl BusDevice for DebugPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(code) = data.first().copied() else {
            return;
        };
        let micros = self.start.elapsed().as_micros() as u64;
        let ms = micros as f64 / 1000.0;
        if self.seen.len() < 256 {
            self.seen.push(Milestone { code, micros });
            tracing::info!(target: "tern::boot", "guest milestone {code:#04x} at {ms:.3} ms");
        } else {
            // A guest writing the port in a loop (e.g. as an I/O delay) is not logged per write.
            ratelimit::info_limited!(
                target: "tern::boot",
                "guest milestone {code:#04x} at {ms:.3} ms"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[test]
    fn i8042_reset_pulse_signals() {
        let resets = Arc::new(AtomicU32::new(0));
        let r = resets.clone();
        let mut dev = I8042::new(Box::new(move || {
            r.fetch_add(1, Ordering::SeqCst);
        }));
        let taken = |n: &AtomicU32| n.swap(0, Ordering::SeqCst);
        dev.write(4, &[0xfe]);
        assert_eq!(taken(&resets), 1);
        // Ordinary commands do not reset; they answer through the output buffer.
        dev.write(4, &[0x20]);
        assert_eq!(taken(&resets), 0);
        let mut b = [0u8];
        dev.read(4, &mut b);
        assert_eq!(b[0] & I8042_STATUS_OBF, I8042_STATUS_OBF);
        dev.read(0, &mut b);
        assert_eq!(b[0], I8042_DEFAULT_CTR);
        dev.read(4, &mut b);
        assert_eq!(b[0] & I8042_STATUS_OBF, 0);
        // Write the configuration byte, read it back.
        dev.write(4, &[0x60]);
        dev.write(0, &[0x61]);
        dev.write(4, &[0x20]);
        dev.read(0, &mut b);
        assert_eq!(b[0], 0x61);
        dev.write(4, &[0xaa]);
        dev.read(0, &mut b);
        assert_eq!(b[0], 0x55);
        // Output port with bit 0 clear resets too.
        dev.write(4, &[0xd1]);
        dev.write(0, &[0x00]);
        assert_eq!(taken(&resets), 1);
        dev.write(0, &[]);
    }

    /// Everything the controller has to say, in order.
    fn drain(dev: &mut I8042) -> Vec<u8> {
        let mut got = Vec::new();
        let mut b = [0u8];
        loop {
            dev.read(4, &mut b);
            if b[0] & I8042_STATUS_OBF == 0 {
                return got;
            }
            dev.read(0, &mut b);
            got.push(b[0]);
        }
    }

    #[test]
    fn i8042_keyboard_answers_like_a_ps2_keyboard() {
        let mut dev = I8042::new(Box::new(|| panic!("no reset expected")));
        // Reset: acknowledged, self test passed.
        dev.write(0, &[0xff]);
        assert_eq!(drain(&mut dev), [0xfa, 0xaa]);
        // Enable scanning (OVMF's presence probe).
        dev.write(0, &[0xf4]);
        assert_eq!(drain(&mut dev), [0xfa]);
        // Identify, translated (the default configuration) and not.
        dev.write(0, &[0xf2]);
        assert_eq!(drain(&mut dev), [0xfa, 0xab, 0x41]);
        dev.write(4, &[0x60]);
        dev.write(0, &[0x05]);
        dev.write(0, &[0xf2]);
        assert_eq!(drain(&mut dev), [0xfa, 0xab, 0x83]);
        // LEDs take a parameter; each byte is acknowledged, and the parameter is not a
        // command (0xff here is not a reset).
        dev.write(0, &[0xed]);
        dev.write(0, &[0xff]);
        assert_eq!(drain(&mut dev), [0xfa, 0xfa]);
        // Which scan code set: set 2.
        dev.write(0, &[0xf0]);
        dev.write(0, &[0x00]);
        assert_eq!(drain(&mut dev), [0xfa, 0xfa, 0x02]);
        dev.write(0, &[0xee]);
        assert_eq!(drain(&mut dev), [0xee]);
        // No mouse: bytes for it get no answer, and do not reach the keyboard.
        dev.write(4, &[0xd4]);
        dev.write(0, &[0xff]);
        assert!(drain(&mut dev).is_empty());
        // A guest that never reads does not grow the output buffer without bound.
        for _ in 0..100 {
            dev.write(0, &[0xf2]);
        }
        assert_eq!(drain(&mut dev).len(), 16);
    }

    #[test]
    fn debug_exit_reports_status() {
        let got = Arc::new(AtomicU32::new(999));
        let g = got.clone();
        let mut dev = DebugExit::new(Box::new(move |s| g.store(u32::from(s), Ordering::SeqCst)));
        dev.write(0, &[3]);
        assert_eq!(got.load(Ordering::SeqCst), 3);
        dev.write(0, &[]);
        assert_eq!(got.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn debug_port_timestamps_in_order() {
        let mut dev = DebugPort::new(Instant::now());
        for c in 0..300u16 {
            dev.write(0, &[c as u8]);
        }
        assert_eq!(dev.milestones().len(), 256);
        assert!(dev
            .milestones()
            .windows(2)
            .all(|w| w[0].micros <= w[1].micros));
        assert_eq!(dev.milestones()[1].code, 1);
    }

    #[test]
    fn firmware_log_lines() {
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let l = lines.clone();
        let mut log = FirmwareLog::new(true, Box::new(move |s| l.lock().unwrap().push(s.into())));
        let mut quiet = FirmwareLog::new(false, Box::new(|_| {}));
        let mut b = [0u8];
        quiet.read(0, &mut b);
        assert_eq!(b[0], 0xff);
        let mut b = [0u8];
        log.read(0, &mut b);
        assert_eq!(b[0], FIRMWARE_LOG_MAGIC);
        for c in b"SeaBIOS\r\n\nNo bootable device.\n".iter() {
            log.write(0, &[*c]);
        }
        log.write(0, &[b'x'; 2000]);
        log.write(0, b"\n");
        let got = lines.lock().unwrap().clone();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], "SeaBIOS");
        assert_eq!(got[1], "No bootable device.");
        assert_eq!(got[2].len(), FIRMWARE_LOG_LINE);
    }

    #[test]
    fn port_b_shows_timer2_and_keeps_the_gate() {
        let out = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let o = out.clone();
        let mut kbc = I8042::new(Box::new(|| {})).with_port_b(PortB::new(Box::new(move || {
            o.load(std::sync::atomic::Ordering::SeqCst)
        })));
        kbc.write(1, &[0xff]);
        let mut b = [0u8];
        kbc.read(1, &mut b);
        assert_eq!(b[0] & 0x23, 0x03);
        out.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut c = [0u8];
        kbc.read(1, &mut c);
        assert_eq!(c[0] & 0x20, 0x20);
        // The refresh bit toggles between reads.
        assert_ne!(b[0] & 0x10, c[0] & 0x10);
    }
}
