//! virtio-rng (device type 4): one request queue; every device-writable buffer the driver
//! offers is filled with random bytes and returned with the length written.
//!
//! The bytes come from ChaCha20 (`rand_chacha`) keyed from the host's `getrandom(2)` and
//! rekeyed from it after every [`RESEED_BYTES`], as `rand`'s `ThreadRng` is. Filling straight
//! from `getrandom(2)` cost 13 µs per 4 KiB on these hosts (the kernel's generator runs
//! ChaCha20 without SIMD), half of a request's whole time in the guest; ChaCha20 here takes
//! under 3 µs. The key lives only in this worker; a restored or
//! migrated VM's new tern process draws a fresh one. If the host's generator fails, the device
//! returns what it has written so far and draws nothing more from the old key.
//!
//! Written in-tree because no maintained crate provides virtio device models that plug into
//! our own transports. Malformed chains (including one with a device-readable buffer) break the
//! device, see [the devices module](super).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::common::{drain, Ctx, Handler, Malformed, Request, Worker, CHUNK, MAX_CHAIN_BYTES};
use crate::{ActivateError, Interrupt, QueueEvent, VirtioDevice, VmMemory};

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;

/// Bytes served from one key before the next is drawn from the host.
pub const RESEED_BYTES: u64 = 64 << 10;

/// The virtio-rng device.
pub struct Rng {
    broken: Arc<AtomicBool>,
    worker: Option<Worker<RngWorker>>,
}

impl Rng {
    /// A new, inactive device.
    pub fn new() -> Self {
        Rng {
            broken: Arc::new(AtomicBool::new(false)),
            worker: None,
        }
    }
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, _features: u64) {}

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: VmMemory,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<QueueEvent>,
    ) -> Result<(), ActivateError> {
        self.reset();
        let [q] = <[QueueEvent; 1]>::try_from(queues)
            .map_err(|q| ActivateError::BadQueue(format!("1 queue expected, got {}", q.len())))?;
        let handler = RngWorker {
            ctx: Ctx::new(mem, interrupt, self.broken.clone(), "rng", MAX_CHAIN_BYTES),
            queue: q.queue,
            event: q.event,
            stream: KeyedStream::default(),
        };
        self.worker = Some(
            Worker::spawn(lifecycle::threads::Device::Rng, "virtio-rng", handler)
                .map_err(ActivateError::Worker)?,
        );
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
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

struct RngWorker {
    ctx: Ctx,
    queue: Queue,
    event: EventFd,
    stream: KeyedStream,
}

/// ChaCha20 keyed from the host, rekeyed after [`RESEED_BYTES`].
#[derive(Default)]
struct KeyedStream {
    cipher: Option<ChaCha20Rng>,
    /// Bytes served from the current key.
    served: u64,
}

impl KeyedStream {
    /// Fills `buf`; on the host generator's failure, draws nothing from the old key.
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let cipher = match &mut self.cipher {
                Some(c) if self.served < RESEED_BYTES => c,
                slot => {
                    // The old key goes first: nothing is drawn from it if the host fails.
                    *slot = None;
                    let mut key = [0u8; 32];
                    getrandom(&mut key)?;
                    self.served = 0;
                    slot.insert(ChaCha20Rng::from_seed(key))
                }
            };
            let n = (buf.len() - done).min((RESEED_BYTES - self.served) as usize);
            cipher.fill_bytes(&mut buf[done..done + n]);
            self.served += n as u64;
            done += n;
        }
        Ok(())
    }
}

impl Handler for RngWorker {
    fn fds(&self) -> Vec<RawFd> {
        vec![self.event.as_raw_fd()]
    }

    fn handle(&mut self, _token: usize) -> bool {
        drain(&self.event);
        let mut used = 0;
        let res = self.process(&mut used);
        if used > 0 {
            self.ctx.signal(&self.queue, 0);
        }
        match res {
            Ok(()) => true,
            Err(e) => self.ctx.fail(e),
        }
    }
}

impl RngWorker {
    fn process(&mut self, used: &mut u16) -> Result<(), Malformed> {
        while let Some(req) = self.ctx.pop(&mut self.queue, 0)? {
            req.expect(true)?;
            let len = self.fill(&req)?;
            self.ctx.add_used(&mut self.queue, 0, req.head, len)?;
            *used += 1;
            if *used == QUEUE_SIZE {
                // A guest refilling the queue as fast as we serve it must not starve a reset:
                // come back after the worker had a chance to see its kill event.
                let _ = self.event.write(1);
                break;
            }
        }
        Ok(())
    }

    fn fill(&mut self, req: &Request) -> Result<u32, Malformed> {
        let mut chunk = [0u8; CHUNK];
        let mut written = 0u32;
        for b in &req.bufs {
            let mut off = 0u32;
            while off < b.len {
                let n = (b.len - off).min(CHUNK as u32);
                let part = &mut chunk[..n as usize];
                if let Err(e) = self.stream.fill(part) {
                    ratelimit::warn_limited!("virtio-rng: getrandom failed: {e}");
                    return Ok(written);
                }
                // Cannot overflow: [addr, addr + len) was checked to lie in guest memory.
                let addr = GuestAddress(b.addr.0 + u64::from(off));
                self.ctx
                    .mem
                    .write_slice(part, addr)
                    .map_err(Malformed::Memory)?;
                off += n;
                written += n;
            }
        }
        Ok(written)
    }
}

/// Fills `buf` from the kernel's CSPRNG (the key of [`KeyedStream`]).
fn getrandom(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a live, exclusively borrowed buffer of `rest.len()` writable bytes;
        // the kernel writes at most that many.
        let r = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        } else {
            done += r as usize;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use vm_memory::Bytes;

    use super::*;
    use crate::testing::*;

    fn rng() -> (Driver, VirtQueue) {
        let mut d = Driver::new(Box::new(Rng::new()));
        let q = VirtQueue::new(0x1000);
        assert_eq!(d.start(&[&q]), 0xf);
        (d, q)
    }

    fn bytes(d: &Driver, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        d.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    #[test]
    fn fills_buffers_with_random_bytes() {
        let (mut d, mut q) = rng();
        assert_eq!(d.read(0x8), 4);
        let h0 = q.add_chain(&d.mem, &[(BUFS, 64, true)]);
        let h1 = q.add_chain(
            &d.mem,
            &[(BUFS + 0x100, 100, true), (BUFS + 0x200, 5000, true)],
        );
        d.notify(0);
        assert!(wait_for(|| q.used_idx(&d.mem) == 2));
        assert_eq!(q.used_elem(&d.mem, 0), (h0.into(), 64));
        assert_eq!(q.used_elem(&d.mem, 1), (h1.into(), 5100));
        let a = bytes(&d, BUFS, 64);
        let b = bytes(&d, BUFS + 0x100, 100);
        let c = bytes(&d, BUFS + 0x200, 5000);
        assert!(a.iter().any(|&x| x != a[0]), "constant output");
        assert_ne!(a[..32], b[..32]);
        assert!(c[4096..].iter().any(|&x| x != 0), "second chunk not filled");
        // Nothing past the buffers.
        assert!(bytes(&d, BUFS + 64, 0x100 - 64).iter().all(|&x| x == 0));
        assert!(wait_for(|| d.read(REG_ISR) & 1 != 0));
        assert!(d.irq.read().unwrap() >= 1);
        d.write(REG_ACK, 1);
        assert_eq!(d.read(REG_ISR), 0);
        assert_eq!(d.read(REG_STATUS) & NEEDS_RESET, 0);
    }

    /// The stream is keyed from the host per device and rekeyed after RESEED_BYTES: what
    /// follows the boundary is not what the old key would have produced.
    #[test]
    fn stream_rekeys_from_the_host() {
        let (mut s, mut t) = (KeyedStream::default(), KeyedStream::default());
        let (mut a, mut b) = ([0u8; 64], [0u8; 64]);
        s.fill(&mut a).unwrap();
        t.fill(&mut b).unwrap();
        assert_ne!(a, b, "two devices got the same key");
        let mut rest = vec![0u8; RESEED_BYTES as usize - 64];
        s.fill(&mut rest).unwrap();
        assert_eq!(s.served, RESEED_BYTES);
        let mut old = s.cipher.clone().unwrap();
        let (mut next, mut would_have_been) = ([0u8; 64], [0u8; 64]);
        s.fill(&mut next).unwrap();
        old.fill_bytes(&mut would_have_been);
        assert_ne!(next, would_have_been, "not rekeyed");
        assert_eq!(s.served, 64);
        // A request that straddles the boundary is served from both keys, in full.
        let mut big = vec![0u8; RESEED_BYTES as usize + 100];
        s.fill(&mut big).unwrap();
        assert_eq!(s.served, 164);
        assert!(big[big.len() - 100..].iter().any(|&x| x != 0));
    }

    /// Guest memory added while the device runs is usable by its next request, and what the
    /// device writes is marked in the VM's dirty log once it is on.
    #[test]
    fn sees_memory_added_later_and_marks_it_dirty() {
        let (mut d, mut q) = rng();
        let extra = crate::memory::GuestRegionMmap::from_range(
            GuestAddress(MEM_SIZE + 0x10_0000),
            0x2000,
            None,
        )
        .unwrap();
        d.vm_mem.add_region(extra).unwrap();
        let log = d.vm_mem.start_dirty_log();
        let at = MEM_SIZE + 0x10_1000;
        let h = q.add_chain(&d.mem, &[(at, 64, true)]);
        d.notify(0);
        assert!(wait_for(|| q.used_idx(&d.mem) == 1));
        assert_eq!(q.used_elem(&d.mem, 0), (h.into(), 64));
        assert_eq!(d.read(REG_STATUS) & NEEDS_RESET, 0);
        let mut v = [0u8; 64];
        d.vm_mem
            .memory()
            .read_slice(&mut v, GuestAddress(at))
            .unwrap();
        assert!(v.iter().any(|&x| x != 0), "not filled");
        // Page 1 of the added region: after the first region's pages.
        let bit = (MEM_SIZE / crate::dirty::PAGE_SIZE + 1) as usize;
        let bits = log.take().unwrap();
        assert_ne!(bits[bit / 64] & 1 << (bit % 64), 0);
        assert_eq!(bits.iter().map(|w| w.count_ones()).sum::<u32>(), 1);
    }

    #[test]
    fn no_interrupt_when_driver_suppresses_it() {
        let (mut d, mut q) = rng();
        d.mem.write_obj(1u16, GuestAddress(q.avail)).unwrap();
        q.add_chain(&d.mem, &[(BUFS, 8, true)]);
        d.notify(0);
        assert!(wait_for(|| q.used_idx(&d.mem) == 1));
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(d.read(REG_ISR), 0);
    }

    /// Runs one hostile request; the device must break (not hang, not panic, not use it).
    fn breaks(what: &str, setup: impl FnOnce(&Driver, &mut VirtQueue)) {
        let (mut d, mut q) = rng();
        setup(&d, &mut q);
        d.notify(0);
        assert!(d.wait_needs_reset(), "{what}: device not broken");
        assert_eq!(q.used_idx(&d.mem), 0, "{what}");
        assert_ne!(d.read(REG_ISR) & 2, 0, "{what}: no config interrupt");
        // A reset revives it.
        let mut q = VirtQueue::new(0x1000);
        d.mem
            .write_slice(&[0; 0x1000], GuestAddress(0x1000))
            .unwrap();
        assert_eq!(d.start(&[&q]), 0xf, "{what}");
        q.add_chain(&d.mem, &[(BUFS, 16, true)]);
        d.notify(0);
        assert!(wait_for(|| q.used_idx(&d.mem) == 1), "{what}: not revived");
    }

    #[test]
    fn hostile_chains_break_the_device() {
        breaks("read-only buffer", |d, q| {
            q.add_chain(&d.mem, &[(BUFS, 16, false)]);
        });
        breaks("readable after writable", |d, q| {
            q.add_chain(&d.mem, &[(BUFS, 16, true), (BUFS + 16, 16, false)]);
        });
        breaks("out of guest memory", |d, q| {
            q.add_chain(&d.mem, &[(MEM_SIZE - 8, 16, true)]);
        });
        breaks("address overflow", |d, q| {
            q.add_chain(&d.mem, &[(u64::MAX - 4, 16, true)]);
        });
        breaks("too long", |d, q| {
            q.add_chain(&d.mem, &[(0, (MEM_SIZE / 2) as u32 + 1, true)]);
        });
        breaks("descriptor loop", |d, q| {
            q.set_desc(&d.mem, 0, BUFS, 16, WRITE | NEXT, 1);
            q.set_desc(&d.mem, 1, BUFS + 16, 16, WRITE | NEXT, 0);
            q.publish(&d.mem, 0);
        });
        breaks("self loop", |d, q| {
            q.set_desc(&d.mem, 3, BUFS, 16, WRITE | NEXT, 3);
            q.publish(&d.mem, 3);
        });
        breaks("next outside the table", |d, q| {
            q.set_desc(&d.mem, 0, BUFS, 16, WRITE | NEXT, 999);
            q.publish(&d.mem, 0);
        });
        breaks("head outside the table", |d, q| q.publish(&d.mem, 200));
        breaks("avail index far ahead", |d, q| {
            q.set_avail_idx(&d.mem, 1000)
        });
    }

    #[test]
    fn reset_stops_the_worker() {
        let (mut d, mut q) = rng();
        d.write(REG_STATUS, 0);
        assert_eq!(d.read(REG_STATUS), 0);
        q.add_chain(&d.mem, &[(BUFS, 16, true)]);
        d.notify(0);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(q.used_idx(&d.mem), 0);
        assert!(bytes(&d, BUFS, 16).iter().all(|&x| x == 0));
        assert_eq!(d.irq.read().ok(), None);
    }

    #[test]
    fn drop_joins_the_worker() {
        let (d, _q) = rng();
        drop(d);
    }
}
