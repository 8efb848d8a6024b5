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
/// (`reboot=k`: command 0xfe, or clearing bit 0 of the output port). No keyboard or mouse is
/// attached, so device commands get no answer.
///
/// Why in-tree: `vm-superio`'s i8042 implements only the reset command and reads back 0, which
/// makes Linux wait for its controller probe to time out on every boot.
pub struct I8042 {
    reset: Box<dyn FnMut() + Send>,
    port_b: Option<PortB>,
    ctr: u8,
    out: std::collections::VecDeque<u8>,
    pending: Option<u8>,
    last_was_command: bool,
}

const I8042_STATUS_OBF: u8 = 1 << 0;
const I8042_STATUS_SYS: u8 = 1 << 2;
const I8042_STATUS_CMD: u8 = 1 << 3;
/// Keyboard interrupt enabled, system flag, translation on.
const I8042_DEFAULT_CTR: u8 = 0x45;

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
            // No keyboard or mouse: device commands go unanswered.
            _ => {}
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
        // Output port with bit 0 clear resets too; keyboard commands get no reply.
        dev.write(0, &[0xff]);
        dev.read(4, &mut b);
        assert_eq!(b[0] & I8042_STATUS_OBF, 0);
        dev.write(4, &[0xd1]);
        dev.write(0, &[0x00]);
        assert_eq!(taken(&resets), 1);
        dev.write(0, &[]);
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
