//! virtio-mem's worker thread: its one request queue.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::Bytes;
use vmm_sys_util::eventfd::EventFd;

use super::super::balloon::Discard;
use super::super::common::{drain, Ctx, Handler, Malformed, Request};
use super::{Shared, QUEUE_SIZE};

/// Request types (virtio 1.2, 5.15.6).
const REQ_PLUG: u16 = 0;
const REQ_UNPLUG: u16 = 1;
const REQ_UNPLUG_ALL: u16 = 2;
const REQ_STATE: u16 = 3;
/// Response types.
const RESP_ACK: u16 = 0;
const RESP_NACK: u16 = 1;
const RESP_ERROR: u16 = 3;
/// Block states a STATE request reports.
const STATE_PLUGGED: u16 = 0;
const STATE_UNPLUGGED: u16 = 1;
const STATE_MIXED: u16 = 2;
/// Bytes of a request and of a response.
const REQ_SIZE: usize = 24;
const RESP_SIZE: usize = 10;

/// One request as the driver sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct MemRequest {
    pub kind: u16,
    pub addr: u64,
    pub blocks: u16,
}

impl MemRequest {
    /// Decodes the 24 bytes of a `virtio_mem_req`.
    pub(super) fn parse(b: &[u8; REQ_SIZE]) -> Self {
        let mut addr = [0u8; 8];
        addr.copy_from_slice(&b[8..16]);
        MemRequest {
            kind: u16::from_le_bytes([b[0], b[1]]),
            addr: u64::from_le_bytes(addr),
            blocks: u16::from_le_bytes([b[16], b[17]]),
        }
    }
}

pub(super) struct MemWorker {
    pub(super) ctx: Ctx,
    pub(super) queue: Queue,
    pub(super) event: EventFd,
    pub(super) shared: Arc<Shared>,
    pub(super) discard: Arc<dyn Discard>,
}

impl Handler for MemWorker {
    fn fds(&self) -> Vec<RawFd> {
        vec![self.event.as_raw_fd()]
    }

    fn handle(&mut self, _token: usize) -> bool {
        drain(&self.event);
        match self.serve() {
            Ok(true) => {
                // A queue's worth served: come back through the notification.
                let _ = self.event.write(1);
                true
            }
            Ok(false) => true,
            Err(e) => self.ctx.fail(e),
        }
    }
}

impl MemWorker {
    /// Serves at most a queue's worth of requests; returns whether more may wait.
    fn serve(&mut self) -> Result<bool, Malformed> {
        let mut used = 0u16;
        let mut more = false;
        while let Some(req) = self.ctx.pop(&mut self.queue, 0)? {
            let r = MemRequest::parse(&self.read_request(&req)?);
            let (kind, state) = self.answer(r);
            let mut resp = [0u8; RESP_SIZE];
            resp[0..2].copy_from_slice(&kind.to_le_bytes());
            resp[8..10].copy_from_slice(&state.to_le_bytes());
            let written = req
                .bufs
                .iter()
                .filter(|b| b.writable)
                .map(|b| u64::from(b.len))
                .sum::<u64>();
            if written < RESP_SIZE as u64 {
                return Err(Malformed::Direction(
                    req.head,
                    "fewer than 10 device-writable bytes (a response)",
                ));
            }
            let n = self.ctx.write_bufs(&req, &resp)?;
            self.ctx.add_used(&mut self.queue, 0, req.head, n as u32)?;
            used += 1;
            if used == QUEUE_SIZE {
                more = true;
                break;
            }
        }
        if used > 0 {
            self.ctx.signal(&self.queue, 0);
        }
        Ok(more)
    }

    /// The first 24 device-readable bytes of a chain.
    fn read_request(&self, req: &Request) -> Result<[u8; REQ_SIZE], Malformed> {
        let mut out = [0u8; REQ_SIZE];
        let mut at = 0;
        for b in req.bufs.iter().filter(|b| !b.writable) {
            if at == REQ_SIZE {
                break;
            }
            let n = (REQ_SIZE - at).min(b.len as usize);
            self.ctx
                .mem
                .read_slice(&mut out[at..at + n], b.addr)
                .map_err(Malformed::Memory)?;
            at += n;
        }
        if at < REQ_SIZE {
            return Err(Malformed::Direction(
                req.head,
                "fewer than 24 device-readable bytes (a request)",
            ));
        }
        Ok(out)
    }

    /// The response to `r`: its type and, for STATE, the state.
    pub(super) fn answer(&self, r: MemRequest) -> (u16, u16) {
        let o = self.shared.opts;
        if r.kind == REQ_UNPLUG_ALL {
            let mut b = self.shared.lock();
            for (first, n) in b.runs(o.blocks()) {
                self.free(o.addr + first * o.block_size, n * o.block_size);
                (first..first + n).for_each(|i| b.set(i, false));
            }
            return (RESP_ACK, 0);
        }
        // The run of blocks the request names, when it lies in the region.
        let run = u64::from(r.blocks)
            .checked_mul(o.block_size)
            .filter(|&len| len > 0 && r.addr.is_multiple_of(o.block_size))
            .and_then(|len| {
                let start = r.addr.checked_sub(o.addr)?;
                (start.checked_add(len)? <= o.size)
                    .then_some((start / o.block_size, u64::from(r.blocks)))
            });
        let Some((first, n)) = run else {
            return (RESP_ERROR, 0);
        };
        let mut b = self.shared.lock();
        let plugged = (first..first + n).filter(|&i| b.get(i)).count() as u64;
        match r.kind {
            REQ_STATE => {
                let state = match plugged {
                    0 => STATE_UNPLUGGED,
                    p if p == n => STATE_PLUGGED,
                    _ => STATE_MIXED,
                };
                (RESP_ACK, state)
            }
            REQ_PLUG if plugged != 0 => (RESP_ERROR, 0),
            REQ_PLUG if (b.plugged + n) * o.block_size > b.requested => (RESP_NACK, 0),
            REQ_PLUG => {
                // The memory is mapped already; the guest faults it in as it uses it.
                (first..first + n).for_each(|i| b.set(i, true));
                (RESP_ACK, 0)
            }
            REQ_UNPLUG if plugged != n => (RESP_ERROR, 0),
            REQ_UNPLUG => {
                self.free(o.addr + first * o.block_size, n * o.block_size);
                (first..first + n).for_each(|i| b.set(i, false));
                (RESP_ACK, 0)
            }
            _ => (RESP_ERROR, 0),
        }
    }

    /// Gives the memory of unplugged blocks back to the host.
    fn free(&self, addr: u64, len: u64) {
        // The range reads as zeroes from now on: a diff snapshot or a migration must carry it.
        self.ctx.mark_dirty(addr, len);
        match self.discard.discard(addr, len) {
            Ok(()) => {
                self.shared.freed.fetch_add(len, Ordering::Relaxed);
            }
            Err(e) => ratelimit::warn_limited!(
                "virtio-mem: cannot free guest memory {addr:#x}+{len:#x}: {e}"
            ),
        }
    }
}
