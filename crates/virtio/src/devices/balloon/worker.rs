//! The balloon's worker thread: its queues, the statistics timer and refresh requests.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::super::common::{drain, Ctx, Handler, Malformed, Request};
use super::{Discard, GuestStats, Shared, MAX_SMALL_CHAIN, PAGE, QUEUE_SIZE};

/// What a queue is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Role {
    Inflate,
    Deflate,
    Stats,
    Report,
}

pub(super) struct BalloonWorker {
    pub(super) ctx: Ctx,
    /// The queues the driver enabled, in the transport's order, with their notifications.
    pub(super) queues: Vec<(Role, (Queue, EventFd))>,
    pub(super) timer: TimerFd,
    pub(super) refresh: EventFd,
    /// The statistics buffer the driver gave, held until the next request for figures.
    pub(super) held: Option<u16>,
    pub(super) shared: Arc<Shared>,
    pub(super) discard: Arc<dyn Discard>,
}

impl Handler for BalloonWorker {
    /// One token per queue (its index), then the statistics timer, then the refresh request.
    fn fds(&self) -> Vec<RawFd> {
        let mut v: Vec<RawFd> = self
            .queues
            .iter()
            .map(|(_, (_, e))| e.as_raw_fd())
            .collect();
        v.push(self.timer.as_raw_fd());
        v.push(self.refresh.as_raw_fd());
        v
    }

    fn handle(&mut self, token: usize) -> bool {
        let n = self.queues.len();
        let res = if token < n {
            drain(&self.queues[token].1 .1);
            self.serve(token)
        } else {
            if token == n {
                let _ = self.timer.wait();
            } else {
                drain(&self.refresh);
            }
            self.ask_for_stats()
        };
        match res {
            Ok(()) => true,
            Err(e) => self.ctx.fail(e),
        }
    }
}

impl BalloonWorker {
    /// Serves queue `qi`: at most a queue's worth of chains per wakeup (see the devices
    /// module), then comes back through its own notification.
    fn serve(&mut self, qi: usize) -> Result<(), Malformed> {
        let (role, (mut q, e)) = self.queues.swap_remove(qi);
        // swap_remove moved the last queue to `qi`; put everything back in order after.
        let res = self.serve_queue(role, qi as u16, &mut q);
        self.queues.push((role, (q, e)));
        let last = self.queues.len() - 1;
        self.queues.swap(qi, last);
        let more = res?;
        if more {
            let _ = self.queues[qi].1 .1.write(1);
        }
        Ok(())
    }

    /// Returns whether chains may be left.
    fn serve_queue(&mut self, role: Role, qi: u16, q: &mut Queue) -> Result<bool, Malformed> {
        let mut used = 0u16;
        let mut more = false;
        while let Some(req) = self.ctx.pop(q, qi)? {
            match role {
                Role::Inflate | Role::Deflate => {
                    req.expect(false)?;
                    let pfns = self.page_numbers(&req)?;
                    if role == Role::Inflate {
                        self.inflate(pfns);
                    } else {
                        self.shared
                            .deflated
                            .fetch_add(pfns.len() as u64, Ordering::Relaxed);
                    }
                    self.ctx.add_used(q, qi, req.head, 0)?;
                    used += 1;
                }
                Role::Stats => {
                    req.expect(false)?;
                    let values = self.stats(&req)?;
                    *self.shared.stats.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(GuestStats {
                            at: Instant::now(),
                            values,
                        });
                    // One buffer at a time: one sent before is given back.
                    if let Some(old) = self.held.replace(req.head) {
                        self.ctx.add_used(q, qi, old, 0)?;
                        used += 1;
                    }
                }
                Role::Report => {
                    req.expect(true)?;
                    self.report(&req);
                    self.ctx.add_used(q, qi, req.head, 0)?;
                    used += 1;
                }
            }
            if used == QUEUE_SIZE {
                more = true;
                break;
            }
        }
        if used > 0 {
            self.ctx.signal(q, qi);
        }
        Ok(more)
    }

    /// The page numbers of an inflate or deflate request.
    fn page_numbers(&self, req: &Request) -> Result<Vec<u32>, Malformed> {
        let bytes = self.read_all(req, MAX_SMALL_CHAIN)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    fn read_all(&self, req: &Request, max: u64) -> Result<Vec<u8>, Malformed> {
        let total: u64 = req.bufs.iter().map(|b| u64::from(b.len)).sum();
        if total > max {
            return Err(Malformed::TooLong(req.head, max));
        }
        let mut out = vec![0u8; total as usize];
        let mut at = 0;
        for b in &req.bufs {
            let n = b.len as usize;
            self.ctx
                .mem
                .read_slice(&mut out[at..at + n], b.addr)
                .map_err(Malformed::Memory)?;
            at += n;
        }
        Ok(out)
    }

    /// Frees the pages of an inflate request, adjacent ones together; pages outside guest
    /// memory are skipped and counted.
    fn inflate(&self, mut pfns: Vec<u32>) {
        pfns.sort_unstable();
        pfns.dedup();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for p in pfns {
            let addr = u64::from(p) * PAGE;
            if !self
                .ctx
                .mem
                .check_range(GuestAddress(addr), PAGE as usize, Permissions::Write)
            {
                self.shared.invalid.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            match runs.last_mut() {
                // Adjacent and in the same region: one range.
                Some((start, len))
                    if *start + *len == addr
                        && self.ctx.mem.check_range(
                            GuestAddress(*start),
                            (*len + PAGE) as usize,
                            Permissions::Write,
                        ) =>
                {
                    *len += PAGE
                }
                _ => runs.push((addr, PAGE)),
            }
        }
        for (addr, len) in runs {
            self.free(addr, len);
            self.shared
                .inflated
                .fetch_add(len / PAGE, Ordering::Relaxed);
        }
    }

    /// Frees the ranges of a free page report (whole pages only; nothing when the guest
    /// poisons free pages with a non-zero value, which freed pages would not hold).
    fn report(&self, req: &Request) {
        if self.shared.poison.load(Ordering::SeqCst) != 0 {
            return;
        }
        for b in &req.bufs {
            let start = b.addr.0.next_multiple_of(PAGE);
            let end = (b.addr.0 + u64::from(b.len)) / PAGE * PAGE;
            if end > start {
                self.free(start, end - start);
                self.shared
                    .reported
                    .fetch_add(end - start, Ordering::Relaxed);
            }
        }
    }

    fn free(&self, addr: u64, len: u64) {
        // The range reads as zeroes from now on: a diff snapshot or a migration must carry it.
        self.ctx.mark_dirty(addr, len);
        if let Err(e) = self.discard.discard(addr, len) {
            ratelimit::warn_limited!(
                "virtio-balloon: cannot free guest memory {addr:#x}+{len:#x}: {e}"
            );
        }
    }

    fn stats(&self, req: &Request) -> Result<Vec<(u16, u64)>, Malformed> {
        let bytes = self.read_all(req, MAX_SMALL_CHAIN)?;
        Ok(bytes
            .chunks_exact(10)
            .map(|c| {
                let tag = u16::from_le_bytes([c[0], c[1]]);
                let mut v = [0u8; 8];
                v.copy_from_slice(&c[2..10]);
                (tag, u64::from_le_bytes(v))
            })
            .collect())
    }

    /// Gives the held statistics buffer back, so the driver refills it.
    fn ask_for_stats(&mut self) -> Result<(), Malformed> {
        let Some(qi) = self.queues.iter().position(|(r, _)| *r == Role::Stats) else {
            return Ok(());
        };
        let Some(head) = self.held.take() else {
            return Ok(());
        };
        let q = &mut self.queues[qi].1 .0;
        self.ctx.add_used(q, qi as u16, head, 0)?;
        self.ctx.signal(q, qi as u16);
        Ok(())
    }
}
