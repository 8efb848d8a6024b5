//! The source side: pre-copy on a thread of its own while the VM runs, then the switch-over.
//!
//! Rounds: the first sends every page that is not all zero (the destination's memory starts
//! zeroed); each later one takes the dirty log and sends what it names (pages that became zero
//! as a marker only). Before each round the source estimates the downtime a switch-over would
//! take now (the bytes still dirty over the bandwidth the last round achieved); once it fits
//! the limit, the VM stops and the rest goes. A guest that keeps writing faster than that is
//! given up on (or forced) at the timeout; with auto-converge its vCPUs are parked for a
//! growing share of every 100 ms meanwhile.

use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_cpuid_entry2;
use vm_memory::{Bytes, GuestAddress};

use super::protocol::{self, FinalState, Hello, Kind, MAX_PAGES, PAGE};
use super::throttle::{Throttler, MAX_THROTTLE_PERCENT};
use super::{MigrationState, MigrationStatus, OnTimeout, SendOptions, Stream, Target};
use crate::components::Components;
use crate::control::{VmControl, VmExit};
use crate::memory::GuestRam;
use crate::sync::lock;
use crate::VmConfig;

/// How long connecting, and any one read or write on the connection, may take.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// What the sending thread needs of the VM.
pub struct VmParts {
    /// Guest memory and its dirty log.
    pub ram: Arc<GuestRam>,
    /// Everything stateful, to stop and save.
    pub components: Arc<Components>,
    /// To end the VM once it runs on the destination.
    pub ctl: Arc<VmControl>,
    /// The VM's configuration.
    pub config: VmConfig,
    /// vCPU 0's CPUID.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// The disks' image locks, handed over at the switch-over.
    pub locks: Vec<Arc<block::ImageLock>>,
    /// `/proc/self/pagemap`, to skip guest memory the host never gave the guest (opened by
    /// the VMM's thread: the migration thread may not open files).
    pub pagemap: Option<std::fs::File>,
}

/// How a migration ended for the source.
enum Failure {
    /// Before the VM was handed over: it runs on here.
    Kept(String),
    /// After the destination was told to run the VM, without hearing that it does: the VM
    /// must not run here again.
    Unknown(String),
}

/// Migrates the VM; the end it must be asked for when the migration is over (it migrated, or
/// may now run on the destination), if any. The caller asks for it once it has dropped `p`:
/// the VM's devices must have no owner left on this thread when the VMM's thread ends the
/// VM, or tern could exit before they are dropped (a vsock device removes its socket then).
pub(super) fn run(
    p: &VmParts,
    opts: &SendOptions,
    target: &Target,
    status: &Mutex<MigrationStatus>,
    cancel: &AtomicBool,
    seen: &AtomicBool,
) -> Option<VmExit> {
    let t0 = Instant::now();
    let mut s = Sender {
        p,
        opts,
        status,
        cancel,
        t0,
        started_log: false,
        taken: Vec::new(),
        bytes: 0,
        buf: vec![0u8; (MAX_PAGES as u64 * PAGE) as usize],
    };
    let result = s.migrate(target);
    if let Err(Failure::Kept(_)) = &result {
        // Before the failure shows: a new migration may start as soon as it does.
        s.give_back_dirty_log();
    }
    let mut st = lock(status);
    st.total_ms = t0.elapsed().as_millis() as u64;
    match result {
        Ok(downtime) => {
            st.state = MigrationState::Completed;
            st.bytes_sent = s.bytes;
            st.downtime_ms = Some(downtime.as_secs_f64() * 1e3);
            st.bytes_remaining = 0;
            let url = st.url.clone().unwrap_or_default();
            let ms = downtime.as_secs_f64() * 1e3;
            drop(st);
            tracing::info!("migrated to {url}: downtime {ms:.1} ms");
            // `tern migrate` polls for the outcome; give it a moment to read it (on a loaded
            // host its next poll can come well over half a second later).
            let deadline = Instant::now() + Duration::from_secs(3);
            while !seen.load(Ordering::SeqCst) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            Some(VmExit::Migrated {
                url,
                downtime_us: downtime.as_micros() as u64,
            })
        }
        Err(Failure::Kept(e)) => {
            st.state = if cancel.load(Ordering::SeqCst) {
                MigrationState::Cancelled
            } else {
                MigrationState::Failed
            };
            st.error = Some(format!("{e}; the VM keeps running on the source"));
            drop(st);
            tracing::warn!("migration: {e}; the VM keeps running here");
            None
        }
        Err(Failure::Unknown(e)) => {
            st.state = MigrationState::Failed;
            st.error = Some(e.clone());
            drop(st);
            Some(VmExit::Error(format!(
                "migration: {e}, after the destination was told to run the VM: it may run \
                 there, so this tern stops without running it again"
            )))
        }
    }
}

struct Sender<'a> {
    p: &'a VmParts,
    opts: &'a SendOptions,
    status: &'a Mutex<MigrationStatus>,
    cancel: &'a AtomicBool,
    t0: Instant,
    /// The dirty log was off before: turned off again if the migration fails.
    started_log: bool,
    /// Every dirty bitmap taken (for a VM that logs for diff snapshots: given back on failure).
    taken: Vec<u64>,
    /// Bytes written to the stream.
    bytes: u64,
    buf: Vec<u8>,
}

fn io(what: &str) -> impl Fn(std::io::Error) -> Failure + '_ {
    move |e| Failure::Kept(format!("{what}: {e}"))
}

impl Sender<'_> {
    fn migrate(&mut self, target: &Target) -> Result<Duration, Failure> {
        let mut conn = target.connect(IO_TIMEOUT).map_err(Failure::Kept)?;
        conn.set_timeouts(Some(IO_TIMEOUT))
            .map_err(io("setting the connection's timeouts"))?;
        let res = self.transfer(&mut conn);
        if let Err(Failure::Kept(why)) = &res {
            // Tell the destination to discard what it has (it may be gone already).
            let why: String = why.chars().take(512).collect();
            let _ = protocol::write_msg(&mut conn, Kind::Cancel, why.as_bytes());
        }
        conn.shutdown();
        res
    }

    fn transfer(&mut self, conn: &mut Stream) -> Result<Duration, Failure> {
        let p = self.p;
        let sending = io("sending to the destination");
        protocol::write_preamble(conn).map_err(&sending)?;
        let hello = Hello {
            tern: env!("CARGO_PKG_VERSION").to_string(),
            config: p.config.clone(),
            cpuid: p.cpuid.clone(),
            memory: crate::snapshot::memory::layout(p.ram.mem()),
            local: self.opts.local,
        };
        self.bytes += protocol::write_json(conn, Kind::Hello, &hello).map_err(&sending)?;
        if self.opts.local {
            // The memory itself: nothing is copied, and nothing is logged.
            let Some(file) = p.ram.backing() else {
                return Err(Failure::Kept(
                    "a local migration hands guest memory over, which needs shared memory \
                     (tern run --memory-shared)"
                        .into(),
                ));
            };
            let size: u64 = crate::snapshot::memory::layout(p.ram.mem())
                .iter()
                .map(|r| r.1)
                .sum();
            let payload = serde_json::to_vec(&protocol::SharedMemory { size })
                .map_err(|e| Failure::Kept(e.to_string()))?;
            protocol::write_header(conn, Kind::Memory, payload.len() as u32)
                .and_then(|()| conn.send_fd(&payload, file))
                .map_err(&sending)?;
            self.bytes += 8 + payload.len() as u64;
        }
        match reply(conn)? {
            (Kind::Accept, _) => {}
            (Kind::Refuse, why) => {
                return Err(Failure::Kept(format!(
                    "the destination refused the VM: {why}"
                )))
            }
            (k, _) => {
                return Err(Failure::Kept(format!(
                    "the destination answered {k:?} to Hello"
                )))
            }
        }
        if self.opts.local {
            self.set(|s| s.iteration = 0);
            return self.switch_over(conn);
        }

        // From here on every write to guest memory is logged.
        if !p.ram.logging() {
            p.ram
                .start_dirty_log(false)
                .map_err(|e| Failure::Kept(format!("cannot start the dirty log: {e}")))?;
            self.started_log = true;
        }
        self.take_dirty()?;
        self.set(|s| s.state = MigrationState::Active);

        // Round 1: everything.
        let mut round_start = Instant::now();
        let mut round_bytes = self.bytes;
        self.set(|s| s.iteration = 1);
        for (addr, len) in self.first_round_extents() {
            let pages = len / PAGE;
            let mut i = 0;
            while i < pages {
                let n = (pages - i).min(u64::from(MAX_PAGES));
                self.send_run(conn, addr + i * PAGE, n as u32, false)?;
                i += n;
            }
        }

        self.sync(conn)?;
        // Throttling for auto-converge, on a thread of its own.
        let throttle = Arc::new(AtomicU32::new(0));
        let throttler = Throttler::start(self.p.components.clone(), throttle.clone());
        let mut last_take = Instant::now();
        let result = loop {
            self.check_cancel()?;
            let elapsed = self.t0.elapsed();
            let timed_out = elapsed >= Duration::from_secs(self.opts.timeout_s);
            let bits = self.take_dirty()?;
            let since = last_take.elapsed().as_secs_f64().max(1e-3);
            last_take = Instant::now();
            let dirty: u64 = bits.iter().map(|w| u64::from(w.count_ones())).sum();
            let dirty_bytes = dirty * PAGE;
            let secs = round_start.elapsed().as_secs_f64().max(1e-3);
            let bandwidth = ((self.bytes - round_bytes) as f64 / secs).max(1.0);
            let expected_ms = dirty_bytes as f64 / bandwidth * 1e3;
            let dirty_rate = (dirty_bytes as f64 / since) as u64;
            self.set(|s| {
                s.bytes_remaining = dirty_bytes;
                s.bandwidth = bandwidth as u64;
                s.dirty_rate = dirty_rate;
                s.expected_downtime_ms = expected_ms;
            });
            if expected_ms <= self.opts.downtime_ms as f64 {
                // Small enough: the final round takes these pages with the rest.
                p.ram.carry(bits);
                break Ok(());
            }
            if timed_out {
                match self.opts.on_timeout {
                    OnTimeout::Cancel => {
                        p.ram.carry(bits);
                        break Err(Failure::Kept(format!(
                            "the migration did not converge within {} s ({} MiB still dirty, \
                             the guest writes {} MiB/s, the link carries {} MiB/s); cancelled",
                            self.opts.timeout_s,
                            dirty_bytes >> 20,
                            dirty_rate >> 20,
                            (bandwidth as u64) >> 20
                        )));
                    }
                    OnTimeout::Force => {
                        p.ram.carry(bits);
                        break Ok(());
                    }
                }
            }
            if self.opts.auto_converge && dirty_rate as f64 > bandwidth / 2.0 {
                let now = throttle.load(Ordering::Relaxed);
                let next = if now == 0 {
                    20
                } else {
                    (now + 10).min(MAX_THROTTLE_PERCENT)
                };
                throttle.store(next, Ordering::Relaxed);
                self.set(|s| s.throttle_percent = next);
            }
            round_start = Instant::now();
            round_bytes = self.bytes;
            self.set(|s| s.iteration += 1);
            if let Err(e) = self.send_bits(conn, &bits).and_then(|()| self.sync(conn)) {
                break Err(e);
            }
        };
        throttler.stop();
        result?;
        self.switch_over(conn)
    }

    /// Stops the VM, sends the rest and hands it over; the downtime on success.
    fn switch_over(&mut self, conn: &mut Stream) -> Result<Duration, Failure> {
        let p = self.p;
        self.check_cancel()?;
        let stopped = Instant::now();
        self.set(|s| s.state = MigrationState::Completing);
        let was_paused = p.components.paused();
        if !was_paused {
            p.components
                .pause()
                .map_err(|e| Failure::Kept(format!("cannot stop the VM: {e}")))?;
        }
        let resume = |f: Failure| {
            if !was_paused {
                p.components.resume();
            }
            f
        };
        let components = p.components.save().map_err(|e| resume(Failure::Kept(e)))?;
        for (addr, len) in p.components.written_memory() {
            p.ram.mark(addr, len);
        }
        let bits = self.take_dirty().map_err(resume)?;
        self.send_bits(conn, &bits).map_err(resume)?;
        let state = FinalState {
            components,
            paused: was_paused,
        };
        self.bytes += protocol::write_json(conn, Kind::State, &state)
            .map_err(io("sending the VM's state"))
            .map_err(resume)?;
        match reply(conn).map_err(resume)? {
            (Kind::Ready, _) => {}
            (Kind::Failed, why) => {
                return Err(resume(Failure::Kept(format!(
                    "the destination could not restore the VM: {why}"
                ))))
            }
            (k, _) => {
                return Err(resume(Failure::Kept(format!(
                    "the destination answered {k:?} to the VM's state"
                ))))
            }
        }
        // The point of no return: the disks are the destination's once it hears Go.
        for l in p.locks.iter() {
            l.release();
        }
        if let Err(e) = protocol::write_msg(conn, Kind::Go, &[]) {
            // Whether Go left at all is unknown only if part of it was written; a failed
            // write of 8 bytes on a healthy socket writes none.
            return Err(Failure::Unknown(format!("sending Go: {e}")));
        }
        self.bytes += 8;
        match reply(conn) {
            Ok((Kind::Running, _)) => Ok(stopped.elapsed()),
            Ok((Kind::Failed, why)) => {
                // The destination did not run it: take the disks back and go on here.
                let relock: Vec<String> = p
                    .locks
                    .iter()
                    .filter_map(|l| l.acquire().err().map(|e| e.to_string()))
                    .collect();
                if !relock.is_empty() {
                    return Err(Failure::Unknown(format!(
                        "the destination failed to start the VM ({why}) and its disks cannot \
                         be locked again: {}",
                        relock.join("; ")
                    )));
                }
                Err(resume(Failure::Kept(format!(
                    "the destination could not start the VM: {why}"
                ))))
            }
            Ok((k, _)) => Err(Failure::Unknown(format!(
                "the destination answered {k:?} to Go"
            ))),
            Err(Failure::Kept(e) | Failure::Unknown(e)) => Err(Failure::Unknown(e)),
        }
    }

    /// What the first round reads: the parts of guest RAM that may hold anything but zeroes
    /// (see [`GuestRam::extents_with_data`]); the destination's memory starts zeroed.
    fn first_round_extents(&self) -> Vec<(u64, u64)> {
        self.p.ram.extents_with_data(self.p.pagemap.as_ref())
    }

    /// Waits until the destination has everything sent so far in guest memory: the socket
    /// buffers (megabytes over TCP) must not hold pages when the VM stops, or they would add
    /// to the downtime, and a round's bandwidth is what reached the destination.
    fn sync(&mut self, conn: &mut Stream) -> Result<(), Failure> {
        protocol::write_msg(conn, Kind::Sync, &[]).map_err(io("sending to the destination"))?;
        self.bytes += 8;
        match reply(conn)? {
            (Kind::Synced, _) => Ok(()),
            (k, _) => Err(Failure::Kept(format!(
                "the destination answered {k:?} to Sync"
            ))),
        }
    }

    fn check_cancel(&self) -> Result<(), Failure> {
        if self.cancel.load(Ordering::SeqCst) {
            return Err(Failure::Kept("cancelled".into()));
        }
        Ok(())
    }

    fn set(&self, f: impl FnOnce(&mut MigrationStatus)) {
        let mut s = lock(self.status);
        f(&mut s);
        s.bytes_sent = self.bytes;
        s.total_ms = self.t0.elapsed().as_millis() as u64;
    }

    /// The dirty log since the last take (kept, to give back on failure).
    fn take_dirty(&mut self) -> Result<Vec<u64>, Failure> {
        let bits = self
            .p
            .ram
            .take_dirty()
            .map_err(|e| Failure::Kept(format!("reading the dirty log: {e}")))?
            .unwrap_or_default();
        if self.taken.len() < bits.len() {
            self.taken.resize(bits.len(), 0);
        }
        for (t, b) in self.taken.iter_mut().zip(&bits) {
            *t |= b;
        }
        Ok(bits)
    }

    /// After a failure: the dirty log as it was before (off, or with every page taken since
    /// marked again for the next diff snapshot).
    fn give_back_dirty_log(&mut self) {
        if self.started_log {
            if let Err(e) = self.p.ram.stop_dirty_log() {
                tracing::warn!("migration: cannot stop the dirty log: {e}");
            }
        } else if !self.taken.is_empty() {
            let mut all = std::mem::take(&mut self.taken);
            if let Ok(Some(now)) = self.p.ram.take_dirty() {
                for (a, n) in all.iter_mut().zip(now) {
                    *a |= n;
                }
            }
            self.p.ram.carry(all);
        }
    }

    /// Sends the pages set in `bits` (one bit per page of the regions end to end).
    fn send_bits(&mut self, conn: &mut Stream, bits: &[u64]) -> Result<(), Failure> {
        let regions = crate::snapshot::memory::layout(self.p.ram.mem());
        let mut first = 0u64;
        for (addr, len) in regions {
            let pages = len / PAGE;
            let mut i = 0;
            while i < pages {
                let set = |p: u64| {
                    let g = first + p;
                    bits.get((g / 64) as usize)
                        .is_some_and(|w| w & (1 << (g % 64)) != 0)
                };
                if !set(i) {
                    i += 1;
                    continue;
                }
                let mut n = 1;
                while i + n < pages && n < u64::from(MAX_PAGES) && set(i + n) {
                    n += 1;
                }
                self.send_run(conn, addr + i * PAGE, n as u32, true)?;
                i += n;
            }
            first += pages;
        }
        Ok(())
    }

    /// Sends `n` pages from `addr`: runs of nonzero pages as `Pages`, runs of zero pages as
    /// `Zeroes` (`zeroes`) or not at all (the first round: the destination starts zeroed).
    fn send_run(
        &mut self,
        conn: &mut Stream,
        addr: u64,
        n: u32,
        zeroes: bool,
    ) -> Result<(), Failure> {
        self.check_cancel()?;
        let len = (u64::from(n) * PAGE) as usize;
        let mut buf = std::mem::take(&mut self.buf);
        let res = (|| {
            self.p
                .ram
                .mem()
                .read_slice(&mut buf[..len], GuestAddress(addr))
                .map_err(|e| Failure::Kept(format!("reading guest memory at {addr:#x}: {e}")))?;
            let zero = |i: usize| {
                buf[i * PAGE as usize..(i + 1) * PAGE as usize]
                    .chunks_exact(8)
                    .all(|w| w == [0u8; 8])
            };
            let mut i = 0usize;
            let n = n as usize;
            let mut zero_pages = 0u64;
            let mut sent_pages = 0u64;
            while i < n {
                let z = zero(i);
                let mut j = i + 1;
                while j < n && zero(j) == z {
                    j += 1;
                }
                let at = addr + i as u64 * PAGE;
                let count = (j - i) as u32;
                if z {
                    zero_pages += u64::from(count);
                    if zeroes {
                        let head = protocol::run_header(at, count);
                        protocol::write_msg(conn, Kind::Zeroes, &head)
                            .map_err(io("sending memory"))?;
                        self.bytes += 8 + head.len() as u64;
                    }
                } else {
                    let body = &buf[i * PAGE as usize..j * PAGE as usize];
                    let head = protocol::run_header(at, count);
                    protocol::write_header(
                        conn,
                        Kind::Pages,
                        protocol::RUN_HEADER + body.len() as u32,
                    )
                    .and_then(|()| std::io::Write::write_all(conn, &head))
                    .and_then(|()| std::io::Write::write_all(conn, body))
                    .map_err(io("sending memory"))?;
                    self.bytes += 8 + head.len() as u64 + body.len() as u64;
                    sent_pages += u64::from(count);
                }
                i = j;
            }
            self.set(|s| {
                s.pages_sent += sent_pages;
                s.zero_pages += zero_pages;
            });
            self.limit_bandwidth();
            Ok(())
        })();
        self.buf = buf;
        res
    }

    /// Sleeps as long as the stream is ahead of `max_bandwidth`.
    fn limit_bandwidth(&self) {
        let max = self.opts.max_bandwidth;
        if max == 0 {
            return;
        }
        let due = Duration::from_secs_f64(self.bytes as f64 / max as f64);
        let elapsed = self.t0.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
    }
}

/// Reads the destination's answer: its kind and its text (for `Refuse` and `Failed`).
fn reply(conn: &mut Stream) -> Result<(Kind, String), Failure> {
    let lost = |e: std::io::Error| {
        Failure::Kept(if e.kind() == std::io::ErrorKind::UnexpectedEof {
            "the destination closed the connection".to_string()
        } else {
            format!("waiting for the destination: {e}")
        })
    };
    let h = protocol::read_header(conn)
        .map_err(lost)?
        .map_err(|e| Failure::Kept(format!("the destination sent {e}")))?;
    if !matches!(
        h.kind,
        Kind::Accept | Kind::Refuse | Kind::Ready | Kind::Running | Kind::Failed | Kind::Synced
    ) {
        return Err(Failure::Kept(format!(
            "the destination sent a {:?} message",
            h.kind
        )));
    }
    let mut b = vec![0u8; h.len as usize];
    conn.read_exact(&mut b).map_err(lost)?;
    Ok((h.kind, protocol::parse_text(&b)))
}
