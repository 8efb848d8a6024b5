//! The destination side: waits for the source, builds the VM it describes (refusing, before
//! any memory moves, a protocol version, CPU or configuration it cannot take), writes the
//! pages it sends into guest memory, restores the components' state, and runs the VM once the
//! source has let it go.
//!
//! The destination never runs a VM whose source may still run it: it restores, says `Ready`,
//! and waits for `Go`. A source that goes away before `Go` (killed, the link broken, or a
//! cancel) leaves nothing running here: tern exits with one line saying so.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use arch::GuestMemoryMmap;
use kvm_bindings::kvm_cpuid_entry2;
use lifecycle::Section;

use super::protocol::{self, FinalState, Hello, Kind, MAX_PAGES, PAGE, RUN_HEADER};
use super::{Conn, Listener, ReceiveOptions, Stream};
use crate::VmConfig;

/// What the destination needs of the VM it builds for the source's description.
pub trait Arrival {
    /// Guest memory, to write the pages into.
    fn memory(&self) -> &GuestMemoryMmap;
    /// vCPU 0's CPUID on this host.
    fn cpuid(&self) -> &[kvm_cpuid_entry2];
    /// Puts the components' state back (and keeps the VM paused when `paused`).
    fn restore_state(&self, sections: &[Section], paused: bool) -> Result<(), String>;
    /// Takes the disks' image locks.
    fn lock_disks(&self) -> Result<(), String>;
}

/// How long the source may stay silent before the destination gives up.
const SILENCE: Duration = Duration::from_secs(60);

/// A tern waiting for a VM: where it listens and what it changes on the way in.
pub struct Incoming {
    /// The listening socket.
    pub listener: Listener,
    /// Remaps and redirections.
    pub opts: ReceiveOptions,
}

/// A received VM, ready to run once the source is told it does.
pub struct Received<V> {
    /// The VM, restored (paused when it was paused on the source).
    pub vm: V,
    /// Its configuration, as built here.
    pub config: VmConfig,
    /// The connection, to tell the source the VM runs.
    pub handover: Handover,
}

/// The last word to the source.
pub struct Handover(Stream);

impl Handover {
    /// Tells the source the VM runs here (it then exits).
    pub fn running(mut self) {
        if let Err(e) = protocol::write_msg(&mut self.0, Kind::Running, &[]) {
            tracing::warn!("migration: cannot tell the source the VM runs here: {e}");
        }
        self.0.shutdown();
    }
}

/// Reads from the source, waking every second to see whether tern was told to stop or the
/// source went silent.
struct Patient<'a, S> {
    conn: &'a mut S,
    signals: Option<BorrowedFd<'a>>,
    last: Instant,
}

impl<S: Conn> Patient<'_, S> {
    /// Receives exactly `len` bytes sent with a descriptor, and the descriptor.
    fn recv_fd(&mut self, len: usize) -> std::io::Result<(Vec<u8>, Option<File>)> {
        let mut buf = vec![0u8; len];
        loop {
            match self.conn.recv_fd(&mut buf) {
                Ok((n, fd)) if n == len => return Ok((buf, fd)),
                Ok((0, _)) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok((n, _)) => {
                    return Err(std::io::Error::other(format!(
                        "a descriptor came with {n} bytes, not {len}"
                    )))
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if self.signals.is_some_and(stopped) {
                        return Err(std::io::Error::other("tern was told to stop"));
                    }
                    if self.last.elapsed() >= SILENCE {
                        return Err(std::io::Error::other("the source went silent"));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl<S: Read> Read for Patient<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.conn.read(buf) {
                Ok(n) => {
                    self.last = Instant::now();
                    return Ok(n);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if self.signals.is_some_and(stopped) {
                        return Err(std::io::Error::other("tern was told to stop"));
                    }
                    if self.last.elapsed() >= SILENCE {
                        return Err(std::io::Error::other(format!(
                            "the source sent nothing for {} s",
                            SILENCE.as_secs()
                        )));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Whether `stop` is readable: a stop signal is pending on the signalfd (left there for the
/// caller), or whoever waits for the VM wrote to it.
fn stopped(stop: BorrowedFd<'_>) -> bool {
    let mut fd = libc::pollfd {
        fd: stop.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd we own, for a descriptor open during the call; no wait.
    unsafe { libc::poll(&mut fd, 1, 0) > 0 }
}

/// Waits for a source on `incoming` and receives its VM, built here by `build` from the
/// configuration the source sends (with the host side changed as `incoming` says). None when
/// `stop` became readable first (a stop signal, or the API's shutdown).
pub fn receive<V: Arrival>(
    incoming: &Incoming,
    stop: BorrowedFd<'_>,
    build: impl FnOnce(&VmConfig, Option<File>) -> Result<V, String>,
) -> Result<Option<Received<V>>, String> {
    crate::report!(
        crate::systemd::NOTICE,
        "tern: waiting for a migrating VM on {}",
        incoming.listener.local()
    );
    let Some(mut conn) = incoming.listener.accept(stop)? else {
        return Ok(None);
    };
    conn.set_timeouts(Some(Duration::from_secs(1)))
        .map_err(|e| format!("migration connection: {e}"))?;
    let got = take(&mut conn, &incoming.opts, Some(stop), build);
    match got {
        Ok((vm, config)) => Ok(Some(Received {
            vm,
            config,
            handover: Handover(conn),
        })),
        Err((answer, why)) => {
            if let Some(kind) = answer {
                let _ = protocol::write_msg(&mut conn, kind, why.as_bytes());
            }
            conn.shutdown();
            Err(why)
        }
    }
}

/// An error, and the answer the source gets for it (none when it went away or cancelled).
type Fail = (Option<Kind>, String);

fn lost(e: std::io::Error) -> Fail {
    let why = if e.kind() == std::io::ErrorKind::UnexpectedEof {
        "the source closed the connection".to_string()
    } else {
        e.to_string()
    };
    (
        None,
        format!("migration: the source went away mid-migration ({why}); no VM runs here"),
    )
}

fn take<V: Arrival, S: Conn>(
    conn: &mut S,
    opts: &ReceiveOptions,
    signals: Option<BorrowedFd<'_>>,
    build: impl FnOnce(&VmConfig, Option<File>) -> Result<V, String>,
) -> Result<(V, VmConfig), Fail> {
    let refuse = |why: String| (Some(Kind::Refuse), format!("migration refused: {why}"));
    let mut r = Patient {
        conn,
        signals,
        last: Instant::now(),
    };
    protocol::read_preamble(&mut r).map_err(refuse)?;
    let h = protocol::read_header(&mut r)
        .map_err(lost)?
        .map_err(refuse)?;
    if h.kind != Kind::Hello {
        return Err(refuse(format!("expected Hello, got {:?}", h.kind)));
    }
    let payload = protocol::read_payload(&mut r, &h).map_err(lost)?;
    let hello: Hello = protocol::parse_json(h.kind, &payload).map_err(refuse)?;
    let mut config = hello.config;
    crate::snapshot::apply_host_side(
        &mut config,
        "the migrating VM",
        &crate::snapshot::HostSide::receive(opts),
    )
    .map_err(refuse)?;
    super::accept::check(&config, opts).map_err(refuse)?;
    config
        .validate()
        .map_err(|e| refuse(format!("its configuration is invalid here: {e}")))?;
    // A local migration: guest memory itself comes next, as a descriptor.
    let memory = if hello.local {
        let h = protocol::read_header(&mut r)
            .map_err(lost)?
            .map_err(refuse)?;
        if h.kind != Kind::Memory {
            return Err(refuse(format!("expected Memory, got {:?}", h.kind)));
        }
        let (payload, fd) = r.recv_fd(h.len as usize).map_err(lost)?;
        let shared: protocol::SharedMemory =
            protocol::parse_json(h.kind, &payload).map_err(refuse)?;
        let Some(fd) = fd else {
            return Err(refuse("the Memory message carried no descriptor".into()));
        };
        let size: u64 = crate::memory::layout(&config).iter().map(|r| r.1).sum();
        if shared.size != size {
            return Err(refuse(format!(
                "the shared memory holds {} bytes; the VM has {size}",
                shared.size
            )));
        }
        Some(fd)
    } else {
        None
    };
    let vm =
        build(&config, memory).map_err(|e| refuse(format!("cannot build the VM here: {e}")))?;
    crate::snapshot::check_cpu_features(&hello.cpuid, vm.cpuid()).map_err(|e| {
        refuse(
            e.replace("the snapshot was taken", "the VM runs")
                .replace("restore it on", "migrate it to"),
        )
    })?;
    let memory = crate::snapshot::memory::layout(vm.memory());
    if hello.memory != memory {
        return Err(refuse(format!(
            "the source's memory layout {:?} differs from this tern's {:?} for the same size",
            hello.memory, memory
        )));
    }
    let r_conn = r.conn;
    protocol::write_msg(r_conn, Kind::Accept, &[]).map_err(lost)?;
    let mut r = Patient {
        conn: r_conn,
        signals,
        last: Instant::now(),
    };
    tracing::info!("migration: receiving a VM of {} MiB", config.memory.0 >> 20);

    let failed = |why: String| (Some(Kind::Failed), format!("migration failed: {why}"));
    let mut buf = vec![0u8; (u64::from(MAX_PAGES) * PAGE) as usize];
    let zeroes = vec![0u8; (u64::from(MAX_PAGES) * PAGE) as usize];
    let state: FinalState = loop {
        let h = protocol::read_header(&mut r)
            .map_err(lost)?
            .map_err(failed)?;
        match h.kind {
            Kind::Pages | Kind::Zeroes => {
                if h.len < RUN_HEADER {
                    return Err(failed(format!(
                        "{:?} message of {} bytes is shorter than its header",
                        h.kind, h.len
                    )));
                }
                let mut head = [0u8; RUN_HEADER as usize];
                r.read_exact(&mut head).map_err(lost)?;
                let (addr, pages) =
                    protocol::parse_run(h.kind, &head, h.len, &memory).map_err(failed)?;
                let len = (u64::from(pages) * PAGE) as usize;
                let src = if h.kind == Kind::Pages {
                    r.read_exact(&mut buf[..len]).map_err(lost)?;
                    &buf[..len]
                } else {
                    &zeroes[..len]
                };
                vm.memory()
                    .write_slice(src, GuestAddress(addr))
                    .map_err(|e| failed(format!("writing guest memory at {addr:#x}: {e}")))?;
            }
            Kind::Sync => {
                // Everything before it is in guest memory: say so.
                protocol::write_msg(r.conn, Kind::Synced, &[]).map_err(lost)?;
            }
            Kind::State => {
                let p = protocol::read_payload(&mut r, &h).map_err(lost)?;
                break protocol::parse_json(h.kind, &p).map_err(failed)?;
            }
            Kind::Cancel => {
                let p = protocol::read_payload(&mut r, &h).map_err(lost)?;
                return Err((
                    None,
                    format!(
                        "migration: the source cancelled it ({}); no VM runs here",
                        protocol::parse_text(&p)
                    ),
                ));
            }
            k => return Err(failed(format!("unexpected {k:?} message"))),
        }
    };
    vm.restore_state(&state.components, state.paused)
        .map_err(|e| failed(format!("restoring the VM's state: {e}")))?;
    let conn = r.conn;
    protocol::write_msg(conn, Kind::Ready, &[]).map_err(lost)?;
    let mut r = Patient {
        conn,
        signals,
        last: Instant::now(),
    };
    let h = protocol::read_header(&mut r)
        .map_err(lost)?
        .map_err(failed)?;
    match h.kind {
        Kind::Go => {}
        Kind::Cancel => {
            let p = protocol::read_payload(&mut r, &h).map_err(lost)?;
            return Err((
                None,
                format!(
                    "migration: the source cancelled it ({}); no VM runs here",
                    protocol::parse_text(&p)
                ),
            ));
        }
        k => return Err(failed(format!("expected Go, got {k:?}"))),
    }
    // The source gave its disks up: they are this tern's now.
    vm.lock_disks().map_err(failed)?;
    Ok((vm, config))
}

/// Entry points for tern's fuzz targets (`fuzz/`); not an API.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// A VM of at most 16 MiB in plain memory, for a fuzzed source to describe.
    pub struct Fake(GuestMemoryMmap);

    impl Arrival for Fake {
        fn memory(&self) -> &GuestMemoryMmap {
            &self.0
        }
        fn cpuid(&self) -> &[kvm_cpuid_entry2] {
            &[]
        }
        fn restore_state(&self, sections: &[Section], _: bool) -> Result<(), String> {
            for s in sections {
                s.parse::<serde_json::Value>(&[1])?;
            }
            Ok(())
        }
        fn lock_disks(&self) -> Result<(), String> {
            Ok(())
        }
    }

    /// Input bytes as the source's side of a connection; what the destination answers is
    /// dropped.
    struct Pipe<'a>(&'a [u8]);

    impl Read for Pipe<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.0.read(buf)
        }
    }

    impl Conn for Pipe<'_> {
        fn recv_fd(&mut self, buf: &mut [u8]) -> std::io::Result<(usize, Option<File>)> {
            self.0.read(buf).map(|n| (n, None))
        }
    }

    impl std::io::Write for Pipe<'_> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A well-formed stream: a 16 MiB VM's Hello, a page, two pages of zeroes, a Sync, an
    /// empty state and Go.
    pub fn sample_stream() -> Vec<u8> {
        let mut b = Vec::new();
        protocol::write_preamble(&mut b).unwrap_or_default();
        let mut config = VmConfig {
            kernel: Some("/tmp/vmlinux".into()),
            ..VmConfig::default()
        };
        config.memory = crate::config::MemSize(16 << 20);
        let memory = crate::memory::allocate(&crate::memory::layout(&config))
            .map(|m| crate::snapshot::memory::layout(&m))
            .unwrap_or_default();
        let hello = Hello {
            tern: "fuzz".into(),
            config,
            cpuid: Vec::new(),
            memory,
            local: false,
        };
        let _ = protocol::write_json(&mut b, Kind::Hello, &hello);
        let mut page = protocol::run_header(0x10_0000, 1).to_vec();
        page.extend_from_slice(&[0x5a; PAGE as usize]);
        let _ = protocol::write_msg(&mut b, Kind::Pages, &page);
        let _ = protocol::write_msg(&mut b, Kind::Zeroes, &protocol::run_header(0x20_0000, 2));
        let _ = protocol::write_msg(&mut b, Kind::Sync, &[]);
        let state = FinalState {
            components: Vec::new(),
            paused: false,
        };
        let _ = protocol::write_json(&mut b, Kind::State, &state);
        let _ = protocol::write_msg(&mut b, Kind::Go, &[]);
        b
    }

    /// Receives `data` as a source's stream, as `tern run --incoming` does, into [`Fake`].
    pub fn receive_stream(data: &[u8]) -> Result<(), String> {
        let opts = ReceiveOptions {
            url: super::super::MigrationUrl::Unix("/fuzz".into()),
            disk_remap: Default::default(),
            tap_remap: Default::default(),
            serial: None,
            console: None,
            vsock_socket: None,
            // The sample names its kernel in /tmp; nothing is opened here.
            accept_dirs: vec!["/tmp".into()],
            accept_taps: vec!["*".into()],
        };
        let build = |c: &VmConfig, _: Option<File>| {
            if c.memory.0.max(c.max_memory.map_or(0, |m| m.0)) > 16 << 20 {
                return Err("too large for the fuzzer".to_string());
            }
            crate::memory::allocate(&crate::memory::layout(c))
                .map(Fake)
                .map_err(|e| e.to_string())
        };
        take(&mut Pipe(data), &opts, None, build)
            .map(|_| ())
            .map_err(|(_, e)| e)
    }
}

#[cfg(test)]
mod tests {
    use super::fuzzing::{receive_stream, sample_stream};

    #[test]
    fn a_well_formed_stream_is_received_and_damaged_ones_refused_by_name() {
        let good = sample_stream();
        receive_stream(&good).unwrap();
        if let Ok(p) = std::env::var("TERN_WRITE_MIGRATION_SEED") {
            std::fs::write(p, &good).unwrap();
        }
        // Cut anywhere: the source went away.
        for cut in [0, 5, 12, 20, good.len() / 2, good.len() - 1] {
            let e = receive_stream(&good[..cut]).unwrap_err();
            assert!(
                e.contains("went away") || e.contains("preamble"),
                "cut at {cut}: {e}"
            );
        }
        // Another protocol version.
        let mut v2 = good.clone();
        v2[8] = 2;
        let e = receive_stream(&v2).unwrap_err();
        assert!(e.contains("protocol version 2"), "{e}");
    }
}
