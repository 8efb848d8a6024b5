//! The COM1 8250 UART (`vm-superio`), with buffered output to stdout, a file or nowhere.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use crate::{BusDevice, EventFdTrigger};

/// PIO base of COM1.
pub const COM1_BASE: u64 = 0x3f8;
/// Length of its register block.
pub const COM1_LEN: u64 = 8;
/// Its ISA IRQ.
pub const COM1_IRQ: u32 = 4;

/// The banner Linux prints when it panics.
pub const LINUX_PANIC_BANNER: &str = "Kernel panic - not syncing";

const FLUSH_AT: usize = 4096;
const LINE_KEEP: usize = 512;

/// Buffered guest console output. Output is flushed at each newline, when the buffer fills,
/// and whenever [`SerialDevice::flush`] is called (tern's event loop does so periodically).
pub struct SerialOut {
    sink: Option<Box<dyn Write + Send>>,
    buf: Vec<u8>,
    line: Vec<u8>,
    panic_seen: Arc<AtomicBool>,
}

impl SerialOut {
    /// Output to `sink` (`None` discards it). `panic_seen` is set when a line carries the
    /// Linux panic banner.
    pub fn new(sink: Option<Box<dyn Write + Send>>, panic_seen: Arc<AtomicBool>) -> Self {
        SerialOut {
            sink,
            buf: Vec::with_capacity(FLUSH_AT),
            line: Vec::new(),
            panic_seen,
        }
    }

    fn watch(&mut self, b: u8) {
        if b == b'\n' {
            if self
                .line
                .windows(LINUX_PANIC_BANNER.len())
                .any(|w| w == LINUX_PANIC_BANNER.as_bytes())
            {
                self.panic_seen.store(true, Ordering::SeqCst);
            }
            self.line.clear();
        } else if self.line.len() < LINE_KEEP {
            self.line.push(b);
        }
    }

    fn flush_buf(&mut self) {
        if let Some(s) = self.sink.as_mut() {
            // A closed stdout or a full disk must not stop the guest: drop the output.
            if s.write_all(&self.buf).and_then(|_| s.flush()).is_err() {
                self.sink = None;
            }
        }
        self.buf.clear();
    }
}

impl Write for SerialOut {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        for &b in data {
            self.watch(b);
        }
        if self.sink.is_some() {
            self.buf.extend_from_slice(data);
            if data.contains(&b'\n') || self.buf.len() >= FLUSH_AT {
                self.flush_buf();
            }
        }
        Ok(data.len())
    }

    /// vm-superio flushes after every byte; buffering is the point, so this does nothing and
    /// [`SerialDevice::flush`] flushes for real.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The UART as a bus device.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, NoEvents, SerialOut>,
}

impl SerialDevice {
    /// A UART raising `irq` and writing to `out`.
    pub fn new(irq: EventFdTrigger, out: SerialOut) -> Self {
        SerialDevice {
            serial: Serial::new(irq, out),
        }
    }

    /// Queues input bytes for the guest; returns how many were taken (the FIFO may be full).
    pub fn enqueue(&mut self, input: &[u8]) -> usize {
        let room = self.serial.fifo_capacity();
        let take = room.min(input.len());
        if take == 0 {
            return 0;
        }
        self.serial.enqueue_raw_bytes(&input[..take]).unwrap_or(0)
    }

    /// Flushes buffered output.
    pub fn flush(&mut self) {
        self.serial.writer_mut().flush_buf();
    }

    /// The UART's registers and receive FIFO, for a snapshot.
    pub fn save_state(&self) -> SerialState {
        let s = self.serial.state();
        SerialState {
            registers: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            fifo: s.in_buffer,
        }
    }

    /// Puts saved registers and FIFO back; the interrupt line and the output stay.
    pub fn restore_state(&mut self, s: &SerialState) -> Result<(), String> {
        let [baud_divisor_low, baud_divisor_high, interrupt_enable, interrupt_identification, line_control, line_status, modem_control, modem_status, scratch] =
            s.registers;
        let state = vm_superio::serial::SerialState {
            baud_divisor_low,
            baud_divisor_high,
            interrupt_enable,
            interrupt_identification,
            line_control,
            line_status,
            modem_control,
            modem_status,
            scratch,
            in_buffer: s.fifo.clone(),
        };
        let trigger = EventFdTrigger(
            self.serial
                .interrupt_evt()
                .0
                .try_clone()
                .map_err(|e| format!("serial: {e}"))?,
        );
        let panic_seen = self.serial.writer_mut().panic_seen.clone();
        let out = std::mem::replace(self.serial.writer_mut(), SerialOut::new(None, panic_seen));
        match Serial::from_state(&state, trigger, NoEvents, out) {
            Ok(serial) => {
                self.serial = serial;
                Ok(())
            }
            Err(e) => Err(format!("serial: cannot restore its state: {e:?}")),
        }
    }
}

/// The UART's state in a snapshot: the nine registers in `vm_superio`'s order (divisor low and
/// high, IER, IIR, LCR, LSR, MCR, MSR, scratch) and the receive FIFO.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SerialState {
    registers: [u8; 9],
    fifo: Vec<u8>,
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(b) = data.first_mut() {
            *b = self.serial.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(b) = data.first() {
            if let Err(e) = self.serial.write(offset as u8, *b) {
                tracing::debug!("serial: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use vmm_sys_util::eventfd::EventFd;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, d: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(d);
            Ok(d.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_is_buffered_until_newline_or_flush() {
        let sink = Shared::default();
        let panic = Arc::new(AtomicBool::new(false));
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(
            EventFdTrigger(evt),
            SerialOut::new(Some(Box::new(sink.clone())), panic.clone()),
        );
        for b in b"hi" {
            dev.write(0, &[*b]);
        }
        assert!(sink.0.lock().unwrap().is_empty());
        dev.write(0, b"\n");
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
        dev.write(0, b"x");
        dev.flush();
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\nx");
        assert!(!panic.load(Ordering::SeqCst));
        for b in b"[ 1.0] Kernel panic - not syncing: Attempted to kill init!\n" {
            dev.write(0, &[*b]);
        }
        assert!(panic.load(Ordering::SeqCst));
    }

    #[test]
    fn input_respects_fifo() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(
            EventFdTrigger(evt),
            SerialOut::new(None, Arc::new(AtomicBool::new(false))),
        );
        let big = vec![b'a'; 1000];
        let n = dev.enqueue(&big);
        assert!(n > 0 && n < 1000);
        assert_eq!(dev.enqueue(&big), 0);
        // Reading the receive buffer drains it.
        let mut b = [0u8];
        dev.read(0, &mut b);
        assert_eq!(b[0], b'a');
    }
}
