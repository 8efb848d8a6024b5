//! virtio-console (device type 3), single port: receiveq0 (host to guest) and transmitq0
//! (guest to host), no MULTIPORT, no SIZE (the config reports 0 columns and rows).
//!
//! Guest output goes to a `Write` sink (stdout, a file, or nowhere), flushed after every batch
//! of transmit buffers. Input is pushed by the VMM through a [`ConsoleInput`] handle: bytes are
//! buffered (up to [`INPUT_CAPACITY`]) and the worker copies them into receive buffers as the
//! driver offers them. Written in-tree for the same reason as the other devices: no crate
//! models virtio devices against our transports. Malformed chains break the device, see
//! [the devices module](super); a failing sink is dropped (output discarded) rather than failing
//! the guest, as the serial port does.

use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::common::{drain, Ctx, Handler, Malformed, Request, Worker, CHUNK, MAX_CHAIN_BYTES};
use crate::{ActivateError, Interrupt, QueueEvent, VirtioDevice, VmMemory};

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Input bytes buffered while the guest has no receive buffer; more are refused.
pub const INPUT_CAPACITY: usize = 64 * 1024;

const RX: u16 = 0;
const TX: u16 = 1;

/// Config space: cols (le16), rows (le16), max_nr_ports (le32), emerg_wr (le32).
const CONFIG: [u8; 12] = [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];

/// The output sink.
pub type ConsoleOutput = Box<dyn Write + Send>;

struct InputShared {
    buf: Mutex<VecDeque<u8>>,
    kick: EventFd,
}

/// Feeds input to the guest; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct ConsoleInput(Arc<InputShared>);

impl ConsoleInput {
    /// Queues `bytes` for the guest and wakes the device; returns how many were taken (the
    /// rest does not fit in [`INPUT_CAPACITY`] until the guest reads).
    pub fn push(&self, bytes: &[u8]) -> usize {
        let taken = {
            let mut buf = self.0.buf.lock().unwrap_or_else(|p| p.into_inner());
            let n = bytes.len().min(INPUT_CAPACITY - buf.len());
            buf.extend(&bytes[..n]);
            n
        };
        if taken > 0 {
            if let Err(e) = self.0.kick.write(1) {
                ratelimit::warn_limited!("virtio-console: cannot wake the device: {e}");
            }
        }
        taken
    }

    /// Bytes waiting for the guest.
    pub fn pending(&self) -> usize {
        self.0.buf.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Takes up to `max` bytes.
    fn take(&self, max: usize) -> Vec<u8> {
        let mut buf = self.0.buf.lock().unwrap_or_else(|p| p.into_inner());
        let n = max.min(buf.len());
        buf.drain(..n).collect()
    }
}

/// The virtio-console device.
pub struct Console {
    output: Option<ConsoleOutput>,
    input: ConsoleInput,
    broken: Arc<AtomicBool>,
    worker: Option<Worker<ConsoleWorker>>,
}

impl Console {
    /// A console writing guest output to `output` (`None` discards it).
    pub fn new(output: Option<ConsoleOutput>) -> std::io::Result<Self> {
        let input = ConsoleInput(Arc::new(InputShared {
            buf: Mutex::new(VecDeque::new()),
            kick: EventFd::new(EFD_NONBLOCK)?,
        }));
        Ok(Console {
            output,
            input,
            broken: Arc::new(AtomicBool::new(false)),
            worker: None,
        })
    }

    /// The handle the VMM feeds guest input through.
    pub fn input_handle(&self) -> ConsoleInput {
        self.input.clone()
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, _features: u64) {}

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(src) = usize::try_from(offset).ok().and_then(|o| CONFIG.get(o..)) else {
            return;
        };
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }

    /// Nothing is writable without EMERG_WRITE, which is not offered.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: VmMemory,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<QueueEvent>,
    ) -> Result<(), ActivateError> {
        self.reset();
        let [rx, tx] = <[QueueEvent; 2]>::try_from(queues)
            .map_err(|q| ActivateError::BadQueue(format!("2 queues expected, got {}", q.len())))?;
        let handler = ConsoleWorker {
            ctx: Ctx::new(
                mem,
                interrupt,
                self.broken.clone(),
                "console",
                MAX_CHAIN_BYTES,
            ),
            rx: rx.queue,
            rx_event: rx.event,
            tx: tx.queue,
            tx_event: tx.event,
            input: self.input.clone(),
            output: self.output.take(),
        };
        match Worker::spawn(
            lifecycle::threads::Device::Console,
            "virtio-console",
            handler,
        ) {
            Ok(w) => {
                self.worker = Some(w);
                Ok(())
            }
            // The handler (and our output) is lost with the failed spawn: discard output.
            Err(e) => Err(ActivateError::Worker(e)),
        }
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            match w.stop() {
                Some(h) => self.output = h.output,
                None => ratelimit::warn_limited!("virtio-console: output lost with its worker"),
            }
        }
        self.broken.store(false, Ordering::SeqCst);
    }

    fn pause(&mut self, deadline: std::time::Instant) -> bool {
        super::common::pause_all(&self.worker, deadline)
    }

    fn resume(&mut self) {
        self.worker.iter().for_each(|w| w.resume());
    }

    fn broken(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }
}

struct ConsoleWorker {
    ctx: Ctx,
    rx: Queue,
    rx_event: EventFd,
    tx: Queue,
    tx_event: EventFd,
    input: ConsoleInput,
    output: Option<ConsoleOutput>,
}

const TOKEN_RX: usize = 0;
const TOKEN_TX: usize = 1;
const TOKEN_INPUT: usize = 2;

impl Handler for ConsoleWorker {
    fn fds(&self) -> Vec<RawFd> {
        // Indexed by the TOKEN_* constants.
        vec![
            self.rx_event.as_raw_fd(),
            self.tx_event.as_raw_fd(),
            self.input.0.kick.as_raw_fd(),
        ]
    }

    fn handle(&mut self, token: usize) -> bool {
        let res = match token {
            TOKEN_RX => {
                drain(&self.rx_event);
                self.receive()
            }
            TOKEN_TX => {
                drain(&self.tx_event);
                self.transmit()
            }
            TOKEN_INPUT => {
                drain(&self.input.0.kick);
                self.receive()
            }
            _ => Ok(()),
        };
        match res {
            Ok(()) => true,
            Err(e) => self.ctx.fail(e),
        }
    }
}

impl ConsoleWorker {
    /// Moves pending input into the receive buffers the driver offers.
    fn receive(&mut self) -> Result<(), Malformed> {
        let mut used = 0u16;
        let mut res = Ok(());
        while self.input.pending() > 0 && used < QUEUE_SIZE {
            match self.ctx.pop(&mut self.rx, RX) {
                Ok(Some(req)) => res = self.receive_one(&req),
                Ok(None) => break,
                Err(e) => res = Err(e),
            }
            if res.is_err() {
                break;
            }
            used += 1;
        }
        if used == QUEUE_SIZE {
            // Bounded batches, so a reset is never starved; carry on at the next wakeup.
            let _ = self.input.0.kick.write(1);
        }
        if used > 0 {
            self.ctx.signal(&self.rx, RX);
        }
        res
    }

    fn receive_one(&mut self, req: &Request) -> Result<(), Malformed> {
        req.expect(true)?;
        let room = req.bufs.iter().map(|b| b.len as usize).sum();
        let data = self.input.take(room);
        let n = self.ctx.write_bufs(req, &data)?;
        // n <= room <= MAX_CHAIN_BYTES, so it fits in u32.
        self.ctx.add_used(&mut self.rx, RX, req.head, n as u32)
    }

    /// Writes what the driver transmits to the output.
    fn transmit(&mut self) -> Result<(), Malformed> {
        let mut used = 0u16;
        let mut res = Ok(());
        while used < QUEUE_SIZE {
            match self.ctx.pop(&mut self.tx, TX) {
                Ok(Some(req)) => res = self.transmit_one(&req),
                Ok(None) => break,
                Err(e) => res = Err(e),
            }
            if res.is_err() {
                break;
            }
            used += 1;
        }
        if used == QUEUE_SIZE {
            let _ = self.tx_event.write(1);
        }
        if let Some(out) = self.output.as_mut() {
            if out.flush().is_err() {
                self.output = None;
            }
        }
        if used > 0 {
            self.ctx.signal(&self.tx, TX);
        }
        res
    }

    fn transmit_one(&mut self, req: &Request) -> Result<(), Malformed> {
        req.expect(false)?;
        let mut chunk = [0u8; CHUNK];
        for b in &req.bufs {
            let mut off = 0u32;
            while off < b.len {
                let n = (b.len - off).min(CHUNK as u32);
                let part = &mut chunk[..n as usize];
                // Cannot overflow: [addr, addr + len) lies in guest memory.
                let addr = GuestAddress(b.addr.0 + u64::from(off));
                self.ctx
                    .mem
                    .read_slice(part, addr)
                    .map_err(Malformed::Memory)?;
                self.emit(part);
                off += n;
            }
        }
        self.ctx.add_used(&mut self.tx, TX, req.head, 0)
    }

    fn emit(&mut self, data: &[u8]) {
        if let Some(out) = self.output.as_mut() {
            // A closed stdout or a full disk must not stop the guest: drop the output.
            if let Err(e) = out.write_all(data) {
                tracing::warn!("virtio-console: output failed, discarding from now on: {e}");
                self.output = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use devices::BusDevice;

    use super::*;
    use crate::testing::*;

    /// A writer tests can look into.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn get(&self) -> Vec<u8> {
            self.0.lock().unwrap().clone()
        }
    }

    struct Rig {
        d: Driver,
        rx: VirtQueue,
        tx: VirtQueue,
        sink: Sink,
        input: ConsoleInput,
    }

    fn console() -> Rig {
        let sink = Sink::default();
        let dev = Console::new(Some(Box::new(sink.clone()))).unwrap();
        let input = dev.input_handle();
        let mut d = Driver::new(Box::new(dev));
        let (rx, tx) = (VirtQueue::new(0x1000), VirtQueue::new(0x2000));
        assert_eq!(d.start(&[&rx, &tx]), 0xf);
        Rig {
            d,
            rx,
            tx,
            sink,
            input,
        }
    }

    fn put(d: &Driver, addr: u64, data: &[u8]) {
        d.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }

    fn get(d: &Driver, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        d.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    #[test]
    fn config_space() {
        let mut r = console();
        assert_eq!(r.d.read(0x8), 3);
        assert_eq!(r.d.read(0x100), 0, "cols and rows");
        assert_eq!(r.d.read(0x104), 1, "max_nr_ports");
        let mut b = [0xffu8; 4];
        r.d.t.read(0x10a, &mut b);
        assert_eq!(b, [0; 4]);
        r.d.t.read(0x1000_0000, &mut b);
        assert_eq!(b, [0; 4]);
        r.d.t.read(u64::MAX, &mut b);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn transmit_reaches_the_output() {
        let mut r = console();
        put(&r.d, BUFS, b"hello ");
        put(&r.d, BUFS + 0x100, b"world\n");
        let head =
            r.tx.add_chain(&r.d.mem, &[(BUFS, 6, false), (BUFS + 0x100, 6, false)]);
        r.d.notify(1);
        assert!(wait_for(|| r.tx.used_idx(&r.d.mem) == 1));
        assert_eq!(r.tx.used_elem(&r.d.mem, 0), (head.into(), 0));
        assert_eq!(r.sink.get(), b"hello world\n");
        assert!(wait_for(|| r.d.read(REG_ISR) & 1 != 0));
        assert!(r.d.irq.read().is_ok());

        // More than one chunk.
        let big: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        put(&r.d, BUFS + 0x1000, &big);
        r.tx.add_chain(&r.d.mem, &[(BUFS + 0x1000, 10_000, false)]);
        r.d.notify(1);
        assert!(wait_for(|| r.tx.used_idx(&r.d.mem) == 2));
        assert_eq!(r.sink.get()[12..], big[..]);
    }

    #[test]
    fn input_lands_in_receive_buffers() {
        let mut r = console();
        // Input before the guest offers a buffer waits for one.
        assert_eq!(r.input.push(b"abc"), 3);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(r.rx.used_idx(&r.d.mem), 0);
        let h =
            r.rx.add_chain(&r.d.mem, &[(BUFS, 2, true), (BUFS + 0x100, 16, true)]);
        r.d.notify(0);
        assert!(wait_for(|| r.rx.used_idx(&r.d.mem) == 1));
        assert_eq!(r.rx.used_elem(&r.d.mem, 0), (h.into(), 3));
        assert_eq!(get(&r.d, BUFS, 2), b"ab");
        assert_eq!(get(&r.d, BUFS + 0x100, 2), b"c\0");
        assert_eq!(r.input.pending(), 0);

        // A buffer offered first is filled when input arrives; input beyond it waits.
        r.rx.add_chain(&r.d.mem, &[(BUFS + 0x200, 4, true)]);
        r.d.notify(0);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(r.rx.used_idx(&r.d.mem), 1);
        assert_eq!(r.input.push(b"xyzzy"), 5);
        assert!(wait_for(|| r.rx.used_idx(&r.d.mem) == 2));
        assert_eq!(r.rx.used_elem(&r.d.mem, 1).1, 4);
        assert_eq!(get(&r.d, BUFS + 0x200, 4), b"xyzz");
        assert_eq!(r.input.pending(), 1);
        assert!(wait_for(|| r.d.read(REG_ISR) & 1 != 0));
    }

    #[test]
    fn input_is_bounded() {
        let dev = Console::new(None).unwrap();
        let input = dev.input_handle();
        assert_eq!(
            input.push(&vec![0; INPUT_CAPACITY - 10]),
            INPUT_CAPACITY - 10
        );
        assert_eq!(input.push(&[1; 100]), 10);
        assert_eq!(input.push(&[1]), 0);
    }

    #[test]
    fn hostile_chains_break_the_device() {
        type Setup = fn(&mut Rig) -> u32;
        let cases: [(&str, Setup); 4] = [
            ("writable buffer on transmitq", |r| {
                r.tx.add_chain(&r.d.mem, &[(BUFS, 4, true)]);
                1
            }),
            ("readable buffer on receiveq", |r| {
                r.input.push(b"x");
                r.rx.add_chain(&r.d.mem, &[(BUFS, 4, false)]);
                0
            }),
            ("transmit loop", |r| {
                r.tx.set_desc(&r.d.mem, 0, BUFS, 4, NEXT, 1);
                r.tx.set_desc(&r.d.mem, 1, BUFS, 4, NEXT, 0);
                r.tx.publish(&r.d.mem, 0);
                1
            }),
            ("transmit out of memory", |r| {
                r.tx.add_chain(&r.d.mem, &[(MEM_SIZE + 0x1000, 4, false)]);
                1
            }),
        ];
        for (what, setup) in cases {
            let mut r = console();
            let q = setup(&mut r);
            r.d.notify(q);
            assert!(r.d.wait_needs_reset(), "{what}");
            assert_eq!(r.tx.used_idx(&r.d.mem), 0, "{what}");
            assert_eq!(r.rx.used_idx(&r.d.mem), 0, "{what}");
            assert!(r.sink.get().is_empty(), "{what}");
        }
    }

    #[test]
    fn reset_stops_the_worker_and_keeps_the_output() {
        let mut r = console();
        r.d.write(REG_STATUS, 0);
        put(&r.d, BUFS, b"lost");
        r.tx.add_chain(&r.d.mem, &[(BUFS, 4, false)]);
        r.d.notify(1);
        r.input.push(b"kept");
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(r.tx.used_idx(&r.d.mem), 0);
        assert!(r.sink.get().is_empty());

        // Bring it up again: output still goes to the same sink, input was kept.
        let mem = r.d.mem.clone();
        mem.write_slice(&[0; 0x2000], GuestAddress(0x1000)).unwrap();
        let (mut rx, mut tx) = (VirtQueue::new(0x1000), VirtQueue::new(0x2000));
        assert_eq!(r.d.start(&[&rx, &tx]), 0xf);
        put(&r.d, BUFS, b"again");
        tx.add_chain(&mem, &[(BUFS, 5, false)]);
        r.d.notify(1);
        assert!(wait_for(|| tx.used_idx(&mem) == 1));
        assert_eq!(r.sink.get(), b"again");
        rx.add_chain(&mem, &[(BUFS + 0x100, 8, true)]);
        r.d.notify(0);
        assert!(wait_for(|| rx.used_idx(&mem) == 1));
        assert_eq!(get(&r.d, BUFS + 0x100, 4), b"kept");
    }

    #[test]
    fn failing_output_is_dropped() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut d = Driver::new(Box::new(Console::new(Some(Box::new(Broken))).unwrap()));
        let (rx, mut tx) = (VirtQueue::new(0x1000), VirtQueue::new(0x2000));
        assert_eq!(d.start(&[&rx, &tx]), 0xf);
        for i in 0..3 {
            tx.add_chain(&d.mem, &[(BUFS, 4, false)]);
            d.notify(1);
            assert!(wait_for(|| tx.used_idx(&d.mem) == i + 1));
        }
        assert_eq!(d.read(REG_STATUS) & NEEDS_RESET, 0);
    }
}
