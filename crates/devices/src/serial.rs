//! The COM1 8250 UART (`vm-superio`), with buffered output to stdout, a file or nowhere.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

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
/// Guest output waiting for the writer thread, at most; past it the oldest bytes are dropped.
pub const OUTPUT_BUFFER: usize = 256 << 10;
/// What the writer thread writes at a time.
const WRITE_CHUNK: usize = 4096;
/// How long a partial line (a prompt, an echoed key) waits for its newline before the writer
/// thread writes it anyway.
const PARTIAL_LINE_DELAY: Duration = Duration::from_millis(20);

/// Output on its way from the UART to the sink.
#[derive(Default)]
struct Pending {
    bytes: VecDeque<u8>,
    /// The writer should write what is buffered (a newline, a full chunk, a flush, or a partial
    /// line that waited long enough).
    kick: bool,
    /// The writer holds bytes it took and has not written yet.
    writing: bool,
    /// The sink failed: output is discarded from now on.
    dead: bool,
    /// The UART is gone: the writer ends once it wrote everything.
    closed: bool,
    /// Bytes dropped because the buffer was full (the oldest ones).
    dropped: u64,
}

/// The queue between the UART (on vCPU threads) and the thread writing to the sink.
#[derive(Default)]
struct Queue {
    pending: Mutex<Pending>,
    cv: Condvar,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn writer(&self, mut sink: Box<dyn Write + Send>) {
        let mut chunk = Vec::with_capacity(WRITE_CHUNK);
        loop {
            let mut p = self.lock();
            p.writing = false;
            self.cv.notify_all();
            // Wait for output to write (kicked, or a partial line that waited
            // [`PARTIAL_LINE_DELAY`]), or for the end (closed, all written). With nothing
            // buffered, sleep until the UART wakes this thread: an idle guest costs no wakeups.
            loop {
                if p.closed || (p.kick && !p.bytes.is_empty()) {
                    break;
                }
                if p.bytes.is_empty() {
                    p.kick = false;
                    p = self.cv.wait(p).unwrap_or_else(|e| e.into_inner());
                } else {
                    let (g, t) = self
                        .cv
                        .wait_timeout(p, PARTIAL_LINE_DELAY)
                        .unwrap_or_else(|e| e.into_inner());
                    p = g;
                    p.kick |= t.timed_out();
                }
            }
            if p.bytes.is_empty() {
                return;
            }
            let n = p.bytes.len().min(WRITE_CHUNK);
            chunk.clear();
            chunk.extend(p.bytes.drain(..n));
            p.writing = true;
            drop(p);
            // A closed stdout or a full disk must not stop the guest: drop the output.
            if sink.write_all(&chunk).and_then(|_| sink.flush()).is_err() {
                let mut p = self.lock();
                p.dead = true;
                p.bytes.clear();
                p.writing = false;
                self.cv.notify_all();
                return;
            }
        }
    }
}

/// A sink written by a thread of its own, from a bounded buffer: writing to it never blocks,
/// so a sink that does (a pipe nobody reads) never blocks a vCPU or a device worker. The
/// thread writes at each newline, when 4 KiB are waiting, on [`flush`](Write::flush), and a
/// partial line once no newline came for [`PARTIAL_LINE_DELAY`].
/// When [`OUTPUT_BUFFER`] bytes are waiting, the oldest are dropped and counted
/// ([`OutputHandle::dropped`]): the newest output (a panic, a prompt) is what a reader that
/// comes back needs. A sink that fails is dropped, and the output with it.
pub struct BufferedSink {
    queue: Arc<Queue>,
    what: &'static str,
}

impl BufferedSink {
    /// Starts the thread writing `what`'s output to `sink`; None (and an error logged) if it
    /// cannot start.
    pub fn new(sink: Box<dyn Write + Send>, what: &'static str) -> Option<Self> {
        let queue = Arc::new(Queue::default());
        let q = queue.clone();
        match lifecycle::threads::spawn(lifecycle::threads::Role::Io, "tern-output", move || {
            q.writer(sink)
        }) {
            Ok(_) => Some(BufferedSink { queue, what }),
            Err(e) => {
                tracing::error!("{what}: cannot start the output thread, output is discarded: {e}");
                None
            }
        }
    }

    /// A handle on this output, to wait for it to be written.
    pub fn output(&self) -> OutputHandle {
        OutputHandle(Some(self.queue.clone()), self.what)
    }
}

impl Drop for BufferedSink {
    fn drop(&mut self) {
        let mut p = self.queue.lock();
        p.closed = true;
        p.kick = true;
        self.queue.cv.notify_all();
    }
}

impl Write for BufferedSink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let q = &self.queue;
        let mut p = q.lock();
        if p.dead {
            return Ok(data.len());
        }
        let was_empty = p.bytes.is_empty();
        p.bytes.extend(data);
        let over = p.bytes.len().saturating_sub(OUTPUT_BUFFER);
        if over > 0 {
            if p.dropped == 0 {
                tracing::warn!(
                    "{}: the guest's output is not being read; dropping the oldest (more than {} KiB waiting)",
                    self.what,
                    OUTPUT_BUFFER >> 10
                );
            }
            p.bytes.drain(..over);
            p.dropped += over as u64;
        }
        if data.contains(&b'\n') || p.bytes.len() >= FLUSH_AT {
            p.kick = true;
            q.cv.notify_all();
        } else if was_empty {
            // The writer sleeps until output comes: wake it to time the partial line.
            q.cv.notify_all();
        }
        Ok(data.len())
    }

    /// Has the thread write what is buffered; does not wait for it.
    fn flush(&mut self) -> std::io::Result<()> {
        self.queue.lock().kick = true;
        self.queue.cv.notify_all();
        Ok(())
    }
}

/// A handle on a [`BufferedSink`]'s output, usable without the device that writes to it.
#[derive(Clone)]
pub struct OutputHandle(Option<Arc<Queue>>, &'static str);

impl OutputHandle {
    /// Has everything buffered written, waiting as long as the sink takes it: returns once
    /// all is written, or when nothing could be written for `idle` (a sink nobody reads).
    pub fn drain(&self, idle: Duration) {
        let Some(q) = &self.0 else { return };
        let mut p = q.lock();
        p.kick = true;
        q.cv.notify_all();
        let mut left = p.bytes.len();
        let mut since = Instant::now();
        while (!p.bytes.is_empty() || p.writing) && !p.dead {
            if p.bytes.len() < left {
                left = p.bytes.len();
                since = Instant::now();
            }
            let wait = idle.saturating_sub(since.elapsed());
            if wait.is_zero() {
                tracing::warn!(
                    "{}: {} bytes of guest output could not be written (nobody reads it)",
                    self.1,
                    p.bytes.len()
                );
                return;
            }
            p =
                q.cv.wait_timeout(p, wait)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// Bytes of output dropped so far because the buffer was full.
    pub fn dropped(&self) -> u64 {
        self.0.as_ref().map_or(0, |q| q.lock().dropped)
    }

    /// Whose output this is (`serial`, `virtio-console`).
    pub fn what(&self) -> &'static str {
        self.1
    }
}

/// What runs when a watched text appears.
type Watcher = Box<dyn FnMut() + Send>;

/// Guest console output of the UART, through a [`BufferedSink`], watched for the Linux panic
/// banner.
pub struct SerialOut {
    sink: Option<BufferedSink>,
    line: Vec<u8>,
    panic_seen: Arc<AtomicBool>,
    /// Texts that call their function as soon as the current line ends with them.
    watches: Vec<(&'static [u8], Watcher)>,
}

impl SerialOut {
    /// Output to `sink` (`None` discards it). `panic_seen` is set when a line carries the
    /// Linux panic banner.
    pub fn new(sink: Option<Box<dyn Write + Send>>, panic_seen: Arc<AtomicBool>) -> Self {
        SerialOut {
            sink: sink.and_then(|s| BufferedSink::new(s, "serial")),
            line: Vec::new(),
            panic_seen,
            watches: Vec::new(),
        }
    }

    /// Calls `f` each time the guest's output line reaches `text` (checked as it is written,
    /// so a line the guest does not end yet counts too).
    pub fn watch_for(&mut self, text: &'static str, f: Box<dyn FnMut() + Send>) {
        self.watches.push((text.as_bytes(), f));
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
            for (text, f) in &mut self.watches {
                if self.line.ends_with(text) {
                    f();
                }
            }
        }
    }

    /// A handle on this output, to wait for it outside the UART's lock.
    pub fn output(&self) -> OutputHandle {
        match &self.sink {
            Some(s) => s.output(),
            None => OutputHandle(None, "serial"),
        }
    }
}

impl Write for SerialOut {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        for &b in data {
            self.watch(b);
        }
        if let Some(s) = &mut self.sink {
            s.write_all(data)?;
        }
        Ok(data.len())
    }

    /// vm-superio flushes after every byte; buffering is the point, so this does nothing (the
    /// sink writes whole lines, and a partial line after a short wait).
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

    /// A handle on the output, to wait for it to be written without holding this device.
    pub fn output(&self) -> OutputHandle {
        self.serial.writer().output()
    }

    /// The UART's registers and receive FIFO, for a snapshot.
    fn save_state(&self) -> SerialState {
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
    fn restore_state(&mut self, s: &SerialState) -> Result<(), String> {
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

/// Layout versions of [`SerialState`] this tern reads (and the one it writes, last).
const SERIAL_STATE_VERSIONS: &[u32] = &[1];

impl lifecycle::Component for SerialDevice {
    fn save(&mut self, id: &str) -> Result<Option<lifecycle::Section>, String> {
        lifecycle::Section::new(id, 1, &self.save_state()).map(Some)
    }

    fn restore(&mut self, section: &lifecycle::Section) -> Result<(), String> {
        self.restore_state(&section.parse(SERIAL_STATE_VERSIONS)?)
    }
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

/// COM1 in the DSDT (`\_SB_.COM1`, `PNP0501`), so the guest routes its interrupt through the
/// IOAPIC: with hardware-reduced ACPI, Linux has no legacy PIC and maps ISA interrupts only
/// for devices ACPI describes.
pub struct SerialAcpi;

impl acpi_tables::Aml for SerialAcpi {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        use acpi_tables::aml;
        let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
        let uid = aml::Name::new("_UID".into(), &aml::ZERO);
        let io = aml::IO::new(COM1_BASE as u16, COM1_BASE as u16, 1, COM1_LEN as u8);
        let irq = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
        let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&io, &irq]));
        aml::Device::new("_SB_.COM1".into(), vec![&hid, &uid, &crs]).to_aml_bytes(sink);
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
    fn watched_text_is_seen_before_its_line_ends() {
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let h = hits.clone();
        let mut out = SerialOut::new(None, Arc::new(AtomicBool::new(false)));
        out.watch_for(
            "No bootable device",
            Box::new(move || {
                h.fetch_add(1, Ordering::SeqCst);
            }),
        );
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(EventFdTrigger(evt), out);
        for b in b"Booting...\nNo bootable device.  Retrying" {
            dev.write(0, &[*b]);
        }
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        for b in b" in 60 seconds\nNo bootable" {
            dev.write(0, &[*b]);
        }
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn output_is_written_by_line_and_a_partial_line_after_a_wait() {
        let sink = Shared::default();
        let panic = Arc::new(AtomicBool::new(false));
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(
            EventFdTrigger(evt),
            SerialOut::new(Some(Box::new(sink.clone())), panic.clone()),
        );
        // A partial line (a prompt) is written by itself, with no flush from anyone.
        for b in b"login: " {
            dev.write(0, &[*b]);
        }
        assert!(wait_for(|| &*sink.0.lock().unwrap() == b"login: "));
        for b in b"root\n" {
            dev.write(0, &[*b]);
        }
        assert!(wait_for(|| &*sink.0.lock().unwrap() == b"login: root\n"));
        assert!(!panic.load(Ordering::SeqCst));
        for b in b"[ 1.0] Kernel panic - not syncing: Attempted to kill init!\n" {
            dev.write(0, &[*b]);
        }
        assert!(panic.load(Ordering::SeqCst));
    }

    fn wait_for(mut f: impl FnMut() -> bool) -> bool {
        let t0 = Instant::now();
        while !f() {
            if t0.elapsed() > Duration::from_secs(10) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// A sink that takes nothing until opened: a pipe nobody reads.
    #[derive(Clone, Default)]
    struct Gate {
        open: Arc<(Mutex<bool>, Condvar)>,
        got: Shared,
    }
    impl Write for Gate {
        fn write(&mut self, d: &[u8]) -> std::io::Result<usize> {
            let (m, cv) = &*self.open;
            let mut open = m.lock().unwrap();
            while !*open {
                open = cv.wait(open).unwrap();
            }
            self.got.write(d)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_sink_that_blocks_never_blocks_the_guest() {
        let sink = Gate::default();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = Arc::new(Mutex::new(SerialDevice::new(
            EventFdTrigger(evt),
            SerialOut::new(
                Some(Box::new(sink.clone())),
                Arc::new(AtomicBool::new(false)),
            ),
        )));
        // A "vCPU" writes 1 MiB of lines while nobody reads: it must finish, and the lock must
        // stay free for others.
        let d = dev.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for i in 0..(1 << 20) / 16 {
                for b in format!("line {i:010}\n").bytes() {
                    d.lock().unwrap().write(0, &[b]);
                }
            }
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(60))
            .expect("a guest writing to the UART blocked on its sink");
        let out = dev.lock().unwrap().output();
        // Nothing can be written: the drain gives up after its idle time.
        let t0 = Instant::now();
        out.drain(Duration::from_millis(100));
        assert!(t0.elapsed() < Duration::from_secs(5));
        // The newest output was kept, the oldest dropped and counted.
        let dropped = out.dropped();
        assert!(
            dropped >= (1 << 20) - (OUTPUT_BUFFER + WRITE_CHUNK) as u64,
            "{dropped}"
        );
        {
            let (m, cv) = &*sink.open;
            *m.lock().unwrap() = true;
            cv.notify_all();
        }
        out.drain(Duration::from_secs(10));
        let got = sink.got.0.lock().unwrap().clone();
        assert_eq!(got.len() as u64 + dropped, 1 << 20);
        assert!(
            got.ends_with(b"line 0000065535\n"),
            "{:?}",
            &got[got.len() - 16..]
        );
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
