//! Building a VM from a validated [`VmConfig`] and running it to its end.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use arch::layout::*;
use arch::GuestMemoryMmap;
use devices::acpi::{AcpiPm, PmRequest};
use devices::legacy::{
    DebugExit, DebugPort, DEBUG_EXIT_PORT, DEBUG_PORT, I8042, I8042_BASE, I8042_LEN,
};
use devices::rtc::{Rtc, RTC_BASE, RTC_LEN};
use devices::serial::{SerialDevice, SerialOut, COM1_BASE, COM1_IRQ, COM1_LEN};
use devices::{Bus, EventFdTrigger};

use crate::api::{Action, ApiServer, Reply, Request as ApiRequest};
use crate::config::{BootProtocol, CharBackend, Decompress, OnReboot, Transport, VmConfig};
use crate::terminal::RawTerminal;
use crate::vcpu::{install_kick_handler, kick_signal, set_boot_msrs, ExitCounters, Vcpu};

/// Errors building or running a VM; each is one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// `/dev/kvm` unusable.
    #[error("cannot use /dev/kvm: {0}")]
    Kvm(String),
    /// A KVM ioctl failed while building the VM.
    #[error("KVM setup failed: {what}: {err}")]
    KvmSetup {
        /// What was being done.
        what: &'static str,
        /// The error.
        err: kvm_ioctls::Error,
    },
    /// Guest memory could not be allocated.
    #[error("cannot allocate {0} MiB of guest memory: {1}")]
    Memory(u64, String),
    /// A file named in the config could not be opened.
    #[error("cannot read {what} {path}: {err}")]
    File {
        /// kernel, initrd, ...
        what: &'static str,
        /// Its path.
        path: String,
        /// The error.
        err: std::io::Error,
    },
    /// Kernel loading failed.
    #[error("cannot boot kernel {path}: {err}")]
    Boot {
        /// The kernel path.
        path: String,
        /// The error.
        err: arch::boot::BootError,
    },
    /// Setting up the machine failed.
    #[error("{0}")]
    Setup(String),
}

/// Where a character device's output goes: stdout, a file opened for appending, or nowhere.
/// A file tern creates is readable by its owner only (mode 0600: guest output may hold
/// secrets); an existing file keeps its mode.
pub(crate) fn open_char_sink(
    backend: &CharBackend,
    what: &'static str,
) -> Result<Option<Box<dyn std::io::Write + Send>>, VmmError> {
    use std::os::unix::fs::OpenOptionsExt;
    Ok(match backend {
        CharBackend::Stdio => Some(Box::new(std::io::stdout())),
        CharBackend::File(p) => Some(Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(p)
                .map_err(|err| VmmError::File {
                    what,
                    path: p.display().to_string(),
                    err,
                })?,
        )),
        CharBackend::None => None,
    })
}

/// How a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off.
    PowerOff,
    /// The guest reset (reboot).
    Reset,
    /// The guest wrote `status` to the debug-exit port.
    DebugExit(u8),
    /// The guest kernel panicked (seen on its console, or reported by the guest).
    GuestPanic,
    /// A vCPU triple-faulted.
    TripleFault {
        /// Which vCPU.
        vcpu: u8,
        /// Its registers.
        regs: String,
    },
    /// KVM could not emulate something.
    InternalError {
        /// Which vCPU.
        vcpu: u8,
        /// KVM's suberror code.
        suberror: u32,
        /// Registers at the time.
        regs: String,
    },
    /// tern was asked to stop (signal number).
    Signal(i32),
    /// The power button was pressed but the guest did not power off within this many seconds.
    ShutdownTimeout(u64),
    /// The user pressed the escape sequence.
    UserQuit,
    /// Stopped through the API (`PUT /v1/vm/shutdown?force=true`).
    ApiStop,
    /// A VMM error while running.
    Error(String),
}

/// A snapshot to bring back instead of booting.
pub struct Restore {
    /// The snapshot directory.
    pub dir: std::path::PathBuf,
    /// Its state (read and checked).
    pub snapshot: crate::snapshot::Snapshot,
    /// Stay paused after restoring.
    pub paused: bool,
    /// Map the memory file copy-on-write (pages load on first touch) instead of reading it.
    pub lazy: bool,
}

/// How long the VM's devices get to finish their in-flight I/O and stop, once its vCPUs are
/// parked, before a pause gives up (and the VM runs on).
pub const DEVICE_PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Pause bookkeeping: whether vCPUs should park, and how many have.
#[derive(Default)]
struct PauseState {
    requested: bool,
    parked: usize,
    /// The device workers are paused (by a pause, or by a paused restore before any vCPU
    /// ran): a resume must resume them, however many vCPUs it finds parked.
    devices_paused: bool,
    /// Bumped to ask parked vCPUs for their state (snapshots).
    save_generation: u64,
    /// MSRs to save.
    save_msrs: Vec<u32>,
    /// vCPU id → its saved state.
    saved: std::collections::BTreeMap<u8, Result<crate::snapshot::VcpuState, String>>,
}

/// State shared between the VM's threads.
pub struct VmControl {
    stop: AtomicBool,
    exit: Mutex<Option<VmExit>>,
    exit_evt: EventFd,
    pause: Mutex<PauseState>,
    pause_cv: Condvar,
}

impl VmControl {
    fn new() -> Result<Self, VmmError> {
        Ok(VmControl {
            stop: AtomicBool::new(false),
            exit: Mutex::new(None),
            exit_evt: EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|e| VmmError::Setup(format!("eventfd: {e}")))?,
            pause: Mutex::new(PauseState::default()),
            pause_cv: Condvar::new(),
        })
    }

    /// Whether the VM is stopping.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Ends the VM with `reason` (the first reason wins).
    pub fn request_exit(&self, reason: VmExit) {
        let mut g = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(reason);
        }
        self.stop.store(true, Ordering::Release);
        let _ = self.exit_evt.write(1);
        // Paused vCPUs wake up to stop.
        let _p = self.pause.lock().unwrap_or_else(|p| p.into_inner());
        self.pause_cv.notify_all();
    }

    fn pause_state(&self) -> std::sync::MutexGuard<'_, PauseState> {
        self.pause.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called by a vCPU thread outside `KVM_RUN`: waits while the VM is paused, saving the
    /// vCPU's state when a snapshot asks for it.
    pub fn park_if_paused(&self, id: u8, fd: &kvm_ioctls::VcpuFd) {
        let mut s = self.pause_state();
        if !s.requested {
            return;
        }
        s.parked += 1;
        let mut seen = s.save_generation;
        self.pause_cv.notify_all();
        while s.requested && !self.stopping() {
            if s.save_generation != seen {
                seen = s.save_generation;
                let state = crate::snapshot::save_vcpu(fd, &s.save_msrs);
                s.saved.insert(id, state);
                self.pause_cv.notify_all();
            }
            s = self.pause_cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.parked -= 1;
    }

    /// Asks the parked vCPUs for their states; returns them in id order.
    fn save_vcpus(
        &self,
        n: usize,
        msrs: Vec<u32>,
    ) -> Result<Vec<crate::snapshot::VcpuState>, String> {
        let mut s = self.pause_state();
        s.saved.clear();
        s.save_msrs = msrs;
        s.save_generation += 1;
        self.pause_cv.notify_all();
        let deadline = Instant::now() + Duration::from_secs(5);
        while s.saved.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("the vCPUs did not report their state within 5 s".into());
            }
            s = self
                .pause_cv
                .wait_timeout(s, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        std::mem::take(&mut s.saved)
            .into_values()
            .enumerate()
            .map(|(i, r)| r.map_err(|e| format!("vCPU {i}: {e}")))
            .collect()
    }

    /// Whether a pause is in effect.
    pub fn paused(&self) -> bool {
        self.pause_state().requested
    }

    fn take_exit(&self) -> Option<VmExit> {
        self.exit.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// Runs the VM described by `config` until it ends (rebuilding it on reboot when configured
/// so). `start` is when tern started, for boot-time measurements.
///
/// With an API server, `config` may be `None`: tern then waits for `PUT /v1/vm` and
/// `PUT /v1/vm/boot`, and serves the API for the VM's whole life.
pub fn run(
    config: Option<VmConfig>,
    api: Option<ApiServer>,
    mut restore: Option<Restore>,
    start: Instant,
) -> Result<VmExit, VmmError> {
    install_kick_handler()
        .map_err(|e| VmmError::Setup(format!("cannot install the vCPU kick handler: {e}")))?;
    let signals = block_stop_signals()?;
    let mut shell = None;
    let (mut config, mut boot_req) = match config {
        Some(c) => {
            c.validate()?;
            (c, None)
        }
        None => {
            let Some(api) = &api else {
                return Err(crate::config::ConfigError::Missing("kernel (--kernel PATH)").into());
            };
            // The KVM VM is made while tern waits (a failure here is met again, and reported,
            // when the VM is built for real).
            shell = std::thread::Builder::new()
                .name("tern-prepare".into())
                .spawn(|| VmShell::create(true))
                .ok();
            match wait_for_boot(api, &signals, None)? {
                Ok(b) => {
                    restore = b.restore;
                    (b.config, Some(b.req))
                }
                Err(exit) => return Ok(exit),
            }
        }
    };
    let stdin_target: Arc<Mutex<Option<StdinTarget>>> = Arc::new(Mutex::new(None));
    let stdin_quit =
        EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VmmError::Setup(format!("eventfd: {e}")))?;
    let mut raw_terminal = None;
    let mut stdin_thread = false;
    loop {
        // The guest owns the terminal when the serial port or the virtio-console uses stdio
        // (raw mode only when stdin is a terminal). Decided per configuration: one set through
        // the API may replace one that failed to boot.
        if config.serial == CharBackend::Stdio || config.console == Some(CharBackend::Stdio) {
            if raw_terminal.is_none() {
                raw_terminal = RawTerminal::enable(0);
            }
            if !stdin_thread {
                spawn_stdin_thread(
                    stdin_target.clone(),
                    stdin_quit
                        .try_clone()
                        .map_err(|e| VmmError::Setup(e.to_string()))?,
                );
                stdin_thread = true;
            }
        }
        // Only the first VM may come from a snapshot; a reboot starts the guest afresh.
        let restoring = restore.take();
        let t0 = Instant::now();
        let shell = shell
            .take()
            .and_then(|h| h.join().ok())
            .and_then(Result::ok);
        crate::virtio_devices::probe_disk_formats(&mut config);
        let built = Vm::build(&config, start, restoring.is_some(), shell).and_then(|mut vm| {
            if let Some(r) = &restoring {
                vm.restore(&r.dir, &r.snapshot, r.lazy, r.paused)?;
                tracing::info!(
                    "restored {} ({}) in {:.1} ms",
                    r.dir.display(),
                    if r.lazy { "lazy" } else { "eager" },
                    t0.elapsed().as_secs_f64() * 1e3
                );
            }
            Ok(vm)
        });
        let vm = match built {
            Ok(vm) => vm,
            Err(e) => {
                // A boot or restore requested through the API fails back to the caller, and
                // tern waits for a better request.
                let (Some(req), Some(a)) = (boot_req.take(), &api) else {
                    return Err(e);
                };
                let what = if restoring.is_some() {
                    "restore"
                } else {
                    "boot"
                };
                req.reply(Reply::error(400, format!("cannot {what}: {e}")));
                let keep = if restoring.is_some() {
                    None
                } else {
                    Some(config)
                };
                match wait_for_boot(a, &signals, keep)? {
                    Ok(b) => {
                        config = b.config;
                        boot_req = Some(b.req);
                        restore = b.restore;
                        continue;
                    }
                    Err(exit) => return Ok(exit),
                }
            }
        };
        if let Some(req) = boot_req.take() {
            req.reply(Reply::done());
        }
        *stdin_target.lock().unwrap_or_else(|p| p.into_inner()) = Some(match &vm.console_input {
            Some(c) => StdinTarget::Console(c.clone()),
            None => StdinTarget::Serial(vm.serial.clone()),
        });
        let mut exit = vm.run(&signals, &stdin_quit, api.as_ref(), &config)?;
        if restoring.as_ref().is_some_and(|r| r.lazy) {
            // A guest that lost the memory file under it fails in ways of its own (a triple
            // fault, KVM_RUN failing with EFAULT): name the real cause.
            if let (
                VmExit::TripleFault { .. } | VmExit::InternalError { .. } | VmExit::Error(_),
                Some(lost),
            ) = (&exit, crate::snapshot::mapped_memory_lost())
            {
                exit = VmExit::Error(lost);
            }
        }
        *stdin_target.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if exit == VmExit::Reset && config.on_reboot == OnReboot::Restart {
            tracing::info!("guest rebooted; restarting the VM");
            continue;
        }
        return Ok(exit);
    }
}

/// What the API asked for before any VM existed.
struct BootRequest {
    config: VmConfig,
    /// Answered once the VM is built (and restored).
    req: ApiRequest,
    /// A snapshot to bring back instead of booting.
    restore: Option<Restore>,
}

/// Serves the API before boot (states `created` and `configured`) until a boot request comes
/// with a valid configuration, or a restore request with a readable snapshot; returns it, or
/// how tern was stopped meanwhile.
fn wait_for_boot(
    api: &ApiServer,
    signals: &File,
    mut config: Option<VmConfig>,
) -> Result<Result<BootRequest, VmExit>, VmmError> {
    const API: u64 = 1;
    const SIGNAL: u64 = 2;
    let epoll = Epoll::new().map_err(|e| VmmError::Setup(format!("epoll: {e}")))?;
    for (fd, token) in [(api.event_fd(), API), (signals.as_raw_fd(), SIGNAL)] {
        epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
            .map_err(|e| VmmError::Setup(format!("epoll: {e}")))?;
    }
    let mut events = vec![EpollEvent::default(); 4];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(VmmError::Setup(format!("epoll: {e}"))),
        };
        for ev in &events[..n] {
            if ev.data() == SIGNAL {
                return Ok(Err(VmExit::Signal(read_signal(signals))));
            }
        }
        for req in api.take() {
            let state = if config.is_some() {
                "configured"
            } else {
                "created"
            };
            match req.action {
                Action::Info => {
                    let r = Reply::ok(serde_json::json!({ "state": state, "config": config }));
                    req.reply(r);
                }
                Action::Configure(ref c) => match c.validate() {
                    Ok(()) => {
                        config = Some((**c).clone());
                        req.reply(Reply::done());
                    }
                    Err(e) => req.reply(Reply::error(400, e.to_string())),
                },
                Action::Restore(ref opts) => match opts.open() {
                    Ok(r) => {
                        return Ok(Ok(BootRequest {
                            config: r.snapshot.config.clone(),
                            req,
                            restore: Some(r),
                        }))
                    }
                    Err(e) => req.reply(Reply::error(400, format!("cannot restore: {e}"))),
                },
                Action::Boot => match config.take() {
                    Some(c) => {
                        return Ok(Ok(BootRequest {
                            config: c,
                            req,
                            restore: None,
                        }))
                    }
                    None => req.reply(Reply::error(
                        409,
                        "cannot boot: the VM is not configured (PUT /v1/vm first)",
                    )),
                },
                Action::Shutdown { .. } => {
                    req.reply(Reply::accepted());
                    return Ok(Err(VmExit::ApiStop));
                }
                Action::Pause => req.reply(Reply::conflict("pause", state)),
                Action::Resume => req.reply(Reply::conflict("resume", state)),
                Action::Reboot => req.reply(Reply::conflict("reboot", state)),
                Action::Counters => req.reply(Reply::conflict("read counters", state)),
                Action::Snapshot { .. } => req.reply(Reply::conflict("snapshot", state)),
            }
        }
    }
}

/// Pauses every device (`names[i]` is device `i`'s) against one deadline. If one does not
/// stop in time, resumes them all and names those that did not stop.
fn pause_devices(
    pausers: &[crate::virtio_devices::DevicePauser],
    names: &[String],
    deadline: Instant,
) -> Result<(), String> {
    let started = Instant::now();
    let stuck: Vec<String> = pausers
        .iter()
        .enumerate()
        .filter(|(_, p)| {
            !p.lock()
                .unwrap_or_else(|e| e.into_inner())
                .pause_device(deadline)
        })
        .map(|(i, _)| {
            names
                .get(i)
                .cloned()
                .unwrap_or_else(|| format!("virtio device {i}"))
        })
        .collect();
    if stuck.is_empty() {
        return Ok(());
    }
    resume_devices(pausers);
    Err(format!(
        "{} did not finish its in-flight I/O and stop within {:.1} s",
        stuck.join(", "),
        deadline.saturating_duration_since(started).as_secs_f64()
    ))
}

fn resume_devices(pausers: &[crate::virtio_devices::DevicePauser]) {
    pausers
        .iter()
        .for_each(|p| p.lock().unwrap_or_else(|e| e.into_inner()).resume_device());
}

/// Reads one signal number from the signalfd.
fn read_signal(signals: &File) -> i32 {
    let mut info = [0u8; 128];
    let mut f = signals;
    match f.read(&mut info) {
        Ok(128) => i32::from_ne_bytes([info[0], info[1], info[2], info[3]]),
        _ => libc::SIGTERM,
    }
}

/// Blocks SIGINT/SIGTERM in every thread (inherited by threads spawned later) and returns a
/// signalfd the main thread reads them from.
/// Blocks SIGINT and SIGTERM in the calling thread (and threads it starts later), so only the
/// VMM's signalfd sees them.
pub fn block_stop_signals_in_this_thread() -> std::io::Result<()> {
    // SAFETY: sigset_t is plain data initialised by sigemptyset/sigaddset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn block_stop_signals() -> Result<File, VmmError> {
    // SAFETY: sigset_t is plain data initialised by sigemptyset/sigaddset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(VmmError::Setup("cannot block SIGINT/SIGTERM".into()));
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(VmmError::Setup(format!(
                "signalfd: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: `fd` is a fresh descriptor we own.
        Ok(<File as std::os::fd::FromRawFd>::from_raw_fd(fd))
    }
}

/// Forwards stdin to the current VM's serial port. Ctrl-A x quits tern (as in QEMU);
/// Ctrl-A Ctrl-A sends a literal Ctrl-A.
/// Where terminal input goes: the serial port, or the virtio-console when it owns stdio.
enum StdinTarget {
    Serial(Arc<Mutex<SerialDevice>>),
    Console(virtio::devices::ConsoleInput),
}

fn spawn_stdin_thread(target: Arc<Mutex<Option<StdinTarget>>>, quit: EventFd) {
    let _ = std::thread::Builder::new()
        .name("tern-stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0u8; 256];
            let mut escape = false;
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut out = Vec::with_capacity(n);
                for &b in &buf[..n] {
                    if escape {
                        escape = false;
                        match b {
                            b'x' | b'X' => {
                                let _ = quit.write(1);
                                return;
                            }
                            0x01 => out.push(0x01),
                            _ => out.push(b),
                        }
                    } else if b == 0x01 {
                        escape = true;
                    } else {
                        out.push(b);
                    }
                }
                let mut pending = &out[..];
                while !pending.is_empty() {
                    let taken = match &*target.lock().unwrap_or_else(|p| p.into_inner()) {
                        Some(StdinTarget::Serial(d)) => {
                            d.lock().unwrap_or_else(|p| p.into_inner()).enqueue(pending)
                        }
                        Some(StdinTarget::Console(c)) => c.push(pending),
                        None => pending.len(),
                    };
                    pending = &pending[taken..];
                    if taken == 0 {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
            }
        });
}

struct Vm {
    _kvm: Kvm,
    _vm: Arc<VmFd>,
    _mem: GuestMemoryMmap,
    serial: Arc<Mutex<SerialDevice>>,
    rtc: Arc<Mutex<Rtc>>,
    ctl: Arc<VmControl>,
    power_button: EventFd,
    /// Raises `\_SB_.GED1`: the VM generation ID changed.
    vmgenid_evt: EventFd,
    shutdown_timeout: Duration,
    panic_seen: Arc<AtomicBool>,
    console_input: Option<virtio::devices::ConsoleInput>,
    console_output: Option<devices::serial::OutputHandle>,
    _intx: Option<crate::virtio_devices::IntxResampler>,
    vcpus: Vec<Vcpu>,
    device_stats: Vec<crate::virtio_devices::DeviceStats>,
    pausers: Vec<crate::virtio_devices::DevicePauser>,
    /// What the user calls each of `pausers`' devices.
    device_names: Vec<String>,
    started: Instant,
    /// Guest memory devices wrote, when the VM tracks dirty pages.
    dirty: Option<virtio::dirty::DirtyLog>,
    /// Pages written before a snapshot that failed: still dirty for the next one.
    dirty_carry: Mutex<Vec<u64>>,
    /// The snapshot this VM last wrote or was restored from: what a diff builds on.
    last_snapshot: Mutex<Option<crate::snapshot::Parent>>,
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |err| VmmError::KvmSetup { what, err }
}

/// A KVM VM with what every tern VM has whatever its configuration: TSS and identity map
/// addresses, the in-kernel irqchip and (when `has_pit`) the PIT. An API-only tern makes one
/// while it waits, so a boot or restore request does not pay for it.
struct VmShell {
    kvm: Kvm,
    vm: Arc<VmFd>,
    has_pit: bool,
}

impl VmShell {
    /// Opens `/dev/kvm`, checks what tern needs and creates the VM (with its PIT when
    /// `with_pit`: creating it starts a kernel thread, which a cold start overlaps with other
    /// work instead).
    fn create(with_pit: bool) -> Result<VmShell, VmmError> {
        let kvm = Kvm::new().map_err(|e| {
            VmmError::Kvm(format!(
                "{e} (is the kvm module loaded, and may this user open /dev/kvm?)"
            ))
        })?;
        for (cap, name) in [
            (Cap::Irqchip, "in-kernel irqchip"),
            (Cap::UserMemory, "user memory"),
            (Cap::Ioeventfd, "ioeventfd"),
            (Cap::Irqfd, "irqfd"),
            (Cap::Pit2, "PIT2"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmmError::Kvm(format!("KVM lacks {name} support")));
            }
        }
        let vm = Arc::new(kvm.create_vm().map_err(kvm_err("create VM"))?);
        vm.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(kvm_err("set TSS address"))?;
        vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(kvm_err("set identity map address"))?;
        vm.create_irq_chip()
            .map_err(kvm_err("create in-kernel irqchip"))?;
        if with_pit {
            create_pit(&vm)?;
        }
        Ok(VmShell {
            kvm,
            vm,
            has_pit: with_pit,
        })
    }
}

fn create_pit(vm: &VmFd) -> Result<(), VmmError> {
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("create PIT"))
}

/// The kernel a configuration boots.
fn kernel_path(config: &VmConfig) -> Result<&std::path::Path, VmmError> {
    Ok(config
        .kernel
        .as_deref()
        .ok_or(crate::config::ConfigError::Missing(
            "kernel (--kernel PATH)",
        ))?)
}

/// Writes the ACPI tables, the kernel, initrd, command line, boot structures and MP table
/// into guest memory.
fn load_guest(
    config: &VmConfig,
    mem: &GuestMemoryMmap,
    acpi_platform: &arch::acpi::AcpiPlatform,
    kernel_bytes: Vec<u8>,
    mut initrd: Option<(File, u64)>,
    linux: bool,
) -> Result<arch::boot::BootInfo, VmmError> {
    let mem_size = config.memory.0;
    let kernel_path = kernel_path(config)?;
    let protocol = match config.boot_protocol {
        BootProtocol::Auto => arch::boot::BootProtocol::Auto,
        BootProtocol::Pvh => arch::boot::BootProtocol::Pvh,
        BootProtocol::Linux => arch::boot::BootProtocol::Linux,
    };
    let bzimage_entry = match config.decompress {
        Decompress::Host => arch::boot::BzImageEntry::Host,
        Decompress::Guest => arch::boot::BzImageEntry::Guest,
    };
    let rsdp =
        arch::acpi::setup_acpi(mem, acpi_platform).map_err(|e| VmmError::Setup(e.to_string()))?;
    crate::vmgenid::write_new(mem).map_err(VmmError::Setup)?;
    let boot = arch::boot::load_kernel(
        mem,
        arch::boot::KernelSpec {
            kernel: &kernel_bytes,
            initrd: initrd.as_mut().map(|(f, l)| (f, *l)),
            cmdline: config.effective_cmdline(),
            mem_size,
            protocol,
            bzimage_entry,
            rsdp: Some(rsdp),
        },
    )
    .map_err(|err| VmmError::Boot {
        path: kernel_path.display().to_string(),
        err,
    })?;
    drop(kernel_bytes);
    if linux {
        if let Some(why) = crate::host::emulation_backed_kvm() {
            eprintln!(
                    "tern: warning: /dev/kvm on this host is emulation-backed ({why}): guest kernel-mode code is emulated instruction by instruction, so a stock Linux kernel will not boot in reasonable time here; use a host with VT-x/AMD-V (or tern's nested test rig, see README)"
                );
        }
    }
    tracing::info!("kernel loaded: {}; entry {:#x}", boot.how, boot.entry);
    arch::mptable::setup_mptable(mem, config.cpus).map_err(|e| VmmError::Setup(e.to_string()))?;

    Ok(boot)
}

impl Vm {
    /// Builds the VM `config` describes. For a restore (`restoring`), guest memory and vCPU
    /// state come from the snapshot afterwards, so the kernel, initrd and boot tables are not
    /// loaded (the files need not exist any more).
    fn build(
        config: &VmConfig,
        start: Instant,
        restoring: bool,
        shell: Option<VmShell>,
    ) -> Result<Vm, VmmError> {
        let kernel = if restoring {
            None
        } else {
            let kernel_path = kernel_path(config)?;
            Some(std::fs::read(kernel_path).map_err(|err| VmmError::File {
                what: "kernel",
                path: kernel_path.display().to_string(),
                err,
            })?)
        };
        let initrd = match &config.initrd {
            Some(_) if restoring => None,
            Some(p) => {
                let f = File::open(p).map_err(|err| VmmError::File {
                    what: "initrd",
                    path: p.display().to_string(),
                    err,
                })?;
                let len = f
                    .metadata()
                    .map_err(|err| VmmError::File {
                        what: "initrd",
                        path: p.display().to_string(),
                        err,
                    })?
                    .len();
                Some((f, len))
            }
            None => None,
        };
        let linux = kernel.as_deref().is_some_and(arch::boot::is_linux);
        let shell = match shell {
            Some(s) => s,
            None => VmShell::create(false)?,
        };
        let VmShell { kvm, vm, has_pit } = shell;
        let max_vcpus = kvm.get_max_vcpus();
        if config.cpus as usize > max_vcpus {
            return Err(VmmError::Kvm(format!(
                "{} vCPUs requested but this host's KVM allows at most {max_vcpus}",
                config.cpus
            )));
        }

        // Guest memory.
        let mem_size = config.memory.0;
        let ranges: Vec<(GuestAddress, usize)> = arch::memory::ram_regions(mem_size)
            .into_iter()
            .map(|(a, s)| (GuestAddress(a), s as usize))
            .collect();
        let mem = GuestMemoryMmap::from_ranges(&ranges)
            .map_err(|e| VmmError::Memory(mem_size >> 20, e.to_string()))?;
        // Transparent huge pages for guest RAM where the host offers them on request (as QEMU and
        // Cloud Hypervisor do): fewer TLB misses for the guest, and O_DIRECT disk I/O into guest
        // memory pins 2 MiB pages instead of 4 KiB ones.
        for region in mem.iter() {
            // SAFETY: advice on a mapping we own, over exactly its extent; it changes no contents.
            let r = unsafe {
                libc::madvise(
                    region.as_ptr().cast(),
                    region.len() as usize,
                    libc::MADV_HUGEPAGE,
                )
            };
            if r != 0 {
                tracing::debug!(
                    "madvise(MADV_HUGEPAGE) on guest memory: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
        // Registering guest memory and creating the PIT (which starts a kernel thread) are
        // among the slowest KVM calls on some hosts; they run on their own thread while this
        // one loads the kernel and sets up devices and vCPUs, and are joined before the VM can
        // run.
        let regions: Vec<kvm_userspace_memory_region> = mem
            .iter()
            .enumerate()
            .map(|(slot, region)| kvm_userspace_memory_region {
                slot: slot as u32,
                flags: if config.track_dirty_pages {
                    kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            })
            .collect();
        let vm_for_slots = vm.clone();
        let register_memory = std::thread::Builder::new()
            .name("tern-memslots".into())
            .spawn(move || -> Result<(), VmmError> {
                if !has_pit {
                    create_pit(&vm_for_slots)?;
                }
                for r in regions {
                    // SAFETY: each region is a live mapping owned by `mem`, which `build` keeps
                    // until this thread is joined, and which the returned `Vm` then keeps for
                    // as long as the VM fd exists.
                    unsafe { vm_for_slots.set_user_memory_region(r) }
                        .map_err(kvm_err("register guest memory"))?;
                }
                Ok(())
            })
            .map_err(|e| VmmError::Setup(format!("cannot start a thread: {e}")))?;
        // `mem` (and so the mapping) stays alive here until the thread is joined, whether or
        // not the rest of the build succeeds; clones share the same mapping.
        let result = Self::build_rest(config, start, kvm, vm, mem.clone(), kernel, initrd, linux);
        let registered = register_memory
            .join()
            .unwrap_or_else(|_| Err(VmmError::Setup("guest memory registration panicked".into())));
        drop(mem);
        let vm = result?;
        registered?;
        Ok(vm)
    }

    #[allow(clippy::too_many_arguments)]
    fn build_rest(
        config: &VmConfig,
        start: Instant,
        kvm: Kvm,
        vm: Arc<VmFd>,
        mem: GuestMemoryMmap,
        kernel: Option<Vec<u8>>,
        initrd: Option<(File, u64)>,
        linux: bool,
    ) -> Result<Vm, VmmError> {
        let virtio = crate::virtio_devices::create(config)?;
        let mut acpi_platform = arch::acpi::AcpiPlatform {
            num_cpus: config.cpus as u8,
            ..Default::default()
        };
        if !virtio.devices.is_empty() {
            match config.transport {
                Transport::Mmio => {
                    acpi_platform.virtio_mmio = (0..virtio.devices.len())
                        .map(crate::virtio_devices::mmio_slot)
                        .collect();
                }
                Transport::Pci => {}
            }
        }
        if config.transport == Transport::Pci {
            acpi_platform.pci = Some(arch::acpi::PciAcpi {
                ecam_base: PCI_ECAM_START,
                last_bus: (PCI_ECAM_BUSES - 1) as u8,
                mmio32: (PCI_MMIO32_START, PCI_MMIO32_END),
            });
        }
        // A restored VM gets its memory and registers from the snapshot.
        let boot = match kernel {
            Some(k) => Some(load_guest(config, &mem, &acpi_platform, k, initrd, linux)?),
            None => None,
        };

        // Devices.
        let ctl = Arc::new(VmControl::new()?);
        let panic_seen = Arc::new(AtomicBool::new(false));
        let sink = open_char_sink(&config.serial, "serial output file")?;
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| VmmError::Setup(format!("eventfd: {e}")))?;
        vm.register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(kvm_err("register serial irqfd"))?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            EventFdTrigger(serial_irq),
            SerialOut::new(sink, panic_seen.clone()),
        )));
        let power_button = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| VmmError::Setup(format!("eventfd: {e}")))?;
        vm.register_irqfd(&power_button, ACPI_GED_GSI)
            .map_err(kvm_err("register power button irqfd"))?;
        let vmgenid_evt = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| VmmError::Setup(format!("eventfd: {e}")))?;
        vm.register_irqfd(&vmgenid_evt, ACPI_VMGENID_GSI)
            .map_err(kvm_err("register VM generation ID irqfd"))?;
        // The devices that end the VM (reset, power off, debug exit) record the reason on the
        // vCPU thread that wrote to them, before it could run on: that vCPU sees the VM
        // stopping and does not re-enter KVM_RUN, and the first reason recorded wins (a guest
        // that resets and then triple-faults has reset).
        let ctl1 = ctl.clone();
        let i8042 = I8042::new(Box::new(move || ctl1.request_exit(VmExit::Reset)));
        let ctl2 = ctl.clone();
        let debug_exit = DebugExit::new(Box::new(move |s| ctl2.request_exit(VmExit::DebugExit(s))));

        let ctl3 = ctl.clone();
        let acpi_pm = AcpiPm::new(
            arch::acpi::S5_SLEEP_TYPE,
            ACPI_RESET_VALUE,
            Box::new(move |r| {
                ctl3.request_exit(match r {
                    PmRequest::PowerOff => VmExit::PowerOff,
                    PmRequest::Reset => VmExit::Reset,
                })
            }),
        );

        let mut pio = Bus::new();
        pio.insert(Arc::new(Mutex::new(acpi_pm)), ACPI_SLEEP_CONTROL_PORT, 3)
            .map_err(|e| VmmError::Setup(e.to_string()))?;
        let bus_err = |e: devices::BusError| VmmError::Setup(e.to_string());
        pio.insert(serial.clone(), COM1_BASE, COM1_LEN)
            .map_err(bus_err)?;
        pio.insert(Arc::new(Mutex::new(i8042)), I8042_BASE, I8042_LEN)
            .map_err(bus_err)?;
        pio.insert(Arc::new(Mutex::new(debug_exit)), DEBUG_EXIT_PORT, 4)
            .map_err(bus_err)?;
        pio.insert(Arc::new(Mutex::new(DebugPort::new(start))), DEBUG_PORT, 1)
            .map_err(bus_err)?;
        let rtc = Arc::new(Mutex::new(Rtc::new()));
        pio.insert(rtc.clone(), RTC_BASE, RTC_LEN)
            .map_err(bus_err)?;
        let mut mmio = Bus::new();
        let console_input = virtio.console_input;
        let console_output = virtio.console_output;
        let device_stats = virtio.stats;
        let mut intx = None;
        let mut pausers = Vec::new();
        // Guest memory as the devices share it (and the log of what they write).
        let guest_memory = virtio::VmMemory::new(mem.clone());
        match config.transport {
            Transport::Mmio => crate::virtio_devices::attach_mmio(
                &vm,
                &guest_memory,
                &mut mmio,
                virtio.devices,
                &mut pausers,
            )?,
            Transport::Pci => {
                let routing = Arc::new(crate::interrupts::GsiRouting::new(vm.clone()));
                intx = Some(crate::virtio_devices::attach_pci(
                    &vm,
                    &guest_memory,
                    &routing,
                    &mut pio,
                    &mut mmio,
                    virtio.devices,
                    &mut pausers,
                )?);
            }
        }
        let mmio = Arc::new(mmio);
        let pio = Arc::new(pio);

        // vCPUs.
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("get supported CPUID"))?;
        let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
        let mut vcpus = Vec::with_capacity(config.cpus as usize);
        for id in 0..config.cpus as u8 {
            let fd = vm
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("create vCPU"))?;
            let entries = arch::cpuid::vcpu_cpuid(
                supported.as_slice(),
                arch::cpuid::CpuidOptions {
                    id,
                    count: config.cpus as u8,
                    tsc_deadline,
                },
            );
            let cpuid = CpuId::from_entries(&entries)
                .map_err(|e| VmmError::Setup(format!("CPUID: {e:?}")))?;
            fd.set_cpuid2(&cpuid).map_err(kvm_err("set CPUID"))?;
            set_boot_msrs(&fd).map_err(VmmError::Setup)?;
            let mut lapic = fd.get_lapic().map_err(kvm_err("get LAPIC"))?;
            arch::regs::set_lint(&mut lapic);
            fd.set_lapic(&lapic).map_err(kvm_err("set LAPIC"))?;
            if let (0, Some(boot)) = (id, &boot) {
                let mut sregs = fd.get_sregs().map_err(kvm_err("get sregs"))?;
                arch::regs::setup_sregs(&mem, boot.mode, &mut sregs)
                    .map_err(|e| VmmError::Setup(e.to_string()))?;
                fd.set_sregs(&sregs).map_err(kvm_err("set sregs"))?;
                fd.set_regs(&arch::regs::boot_regs(boot.mode, boot.entry))
                    .map_err(kvm_err("set regs"))?;
                fd.set_fpu(&arch::regs::boot_fpu())
                    .map_err(kvm_err("set FPU"))?;
            }
            vcpus.push(Vcpu {
                fd,
                id,
                pio: pio.clone(),
                mmio: mmio.clone(),
                ctl: ctl.clone(),
                counters: Arc::new(ExitCounters::default()),
            });
        }

        let dirty = config
            .track_dirty_pages
            .then(|| guest_memory.start_dirty_log());
        Ok(Vm {
            rtc,
            _kvm: kvm,
            _vm: vm,
            _mem: mem,
            serial,
            ctl,
            power_button,
            vmgenid_evt,
            shutdown_timeout: Duration::from_secs(config.shutdown_timeout),
            panic_seen,
            console_input,
            console_output,
            _intx: intx,
            vcpus,
            device_stats,
            pausers,
            device_names: crate::virtio_devices::device_names(config),
            started: Instant::now(),
            dirty,
            dirty_carry: Mutex::new(Vec::new()),
            last_snapshot: Mutex::new(None),
        })
    }

    fn press_power_button(&self, deadline: &mut Option<Instant>) {
        let _ = self.power_button.write(1);
        if deadline.is_none() {
            // Validation bounds the timeout; past the clock's range, wait the longest allowed.
            let now = Instant::now();
            *deadline = Some(
                now.checked_add(self.shutdown_timeout)
                    .or_else(|| {
                        now.checked_add(Duration::from_secs(crate::config::MAX_SHUTDOWN_TIMEOUT))
                    })
                    .unwrap_or(now),
            );
        }
    }

    /// Gives the VM a new generation ID and tells the guest (`Notify (\_SB_.VGEN, 0x80)`
    /// through `\_SB_.GED1`): after a restore, so every clone of a snapshot has its own.
    fn new_generation(&self) -> Result<(), VmmError> {
        crate::vmgenid::write_new(&self._mem).map_err(VmmError::Setup)?;
        // tern's own write: a diff snapshot must carry it too.
        if let Some(d) = &self.dirty {
            d.mark(
                arch::layout::VMGENID_ADDR,
                arch::layout::VMGENID_SIZE as u64,
            );
        }
        self.vmgenid_evt.write(1).map_err(|e| {
            VmmError::Setup(format!(
                "cannot signal the new VM generation ID to the guest: {e}"
            ))
        })
    }

    /// Parks every vCPU outside `KVM_RUN`, then every device worker (after its in-flight I/O).
    /// Fails, with the VM running on as before, if the vCPUs did not all stop within 5 s or a
    /// device within [`DEVICE_PAUSE_TIMEOUT`] more: the main loop is held up no longer than
    /// that, however long a device's I/O hangs.
    fn pause_vcpus(&self, handles: &[JoinHandle<()>]) -> Result<(), String> {
        self.ctl.pause_state().requested = true;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if self.ctl.pause_state().parked == handles.len() {
                // vCPUs first: none is inside a device's registers while devices pause.
                let paused = pause_devices(
                    &self.pausers,
                    &self.device_names,
                    Instant::now() + DEVICE_PAUSE_TIMEOUT,
                );
                if paused.is_err() {
                    self.resume_vcpus();
                } else {
                    self.ctl.pause_state().devices_paused = true;
                }
                return paused;
            }
            if Instant::now() >= deadline {
                self.resume_vcpus();
                return Err("the vCPUs did not stop within 5 s".into());
            }
            for h in handles {
                let _ = h.kill(kick_signal());
            }
            let s = self.ctl.pause_state();
            let _ = self
                .ctl
                .pause_cv
                .wait_timeout(s, Duration::from_millis(1))
                .map_err(|p| p.into_inner());
        }
    }

    /// Resumes what a pause (or a paused restore) stopped: the device workers, then the vCPUs.
    fn resume_vcpus(&self) {
        if std::mem::take(&mut self.ctl.pause_state().devices_paused) {
            resume_devices(&self.pausers);
        }
        self.ctl.pause_state().requested = false;
        self.ctl.pause_cv.notify_all();
    }

    /// Writes a snapshot of the paused VM to `dir`.
    fn snapshot(
        &self,
        dir: &std::path::Path,
        config: &VmConfig,
        diff: bool,
    ) -> Result<(), (u16, String)> {
        if dir.exists() {
            return Err((400, format!("{} already exists", dir.display())));
        }
        let parent = self
            .last_snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let parent = match (diff, config.track_dirty_pages, parent) {
            (false, _, _) => None,
            (true, false, _) => return Err((
                400,
                "a diff snapshot needs a VM that tracks dirty pages (tern run --track-dirty-pages)"
                    .into(),
            )),
            (true, true, None) => {
                return Err((
                    400,
                    "no earlier snapshot of this VM to build a diff on: take a full snapshot first"
                        .into(),
                ))
            }
            (true, true, Some(p)) => Some(p),
        };
        let msrs = self
            ._kvm
            .get_msr_index_list()
            .map_err(|e| (500, format!("MSR list: {e}")))?
            .as_slice()
            .to_vec();
        let vcpus = self
            .ctl
            .save_vcpus(config.cpus as usize, msrs)
            .map_err(|e| (500, e))?;
        let vm = crate::snapshot::save_vm(&self._vm).map_err(|e| (500, e))?;
        let devices = crate::snapshot::DeviceStates {
            serial: self
                .serial
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .save_state(),
            rtc: self
                .rtc
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .save_state(),
            virtio: self
                .pausers
                .iter()
                .map(|p| p.lock().unwrap_or_else(|e| e.into_inner()).save_state())
                .collect(),
        };
        // Every snapshot of a tracking VM starts the next diff afresh.
        let dirty = match &self.dirty {
            Some(d) => {
                for r in devices.virtio.iter().flat_map(|t| t.used_rings()) {
                    d.mark(r.0, r.1);
                }
                Some(self.take_dirty(d).map_err(|e| (500, e))?)
            }
            None => None,
        };
        let content = match (&parent, &dirty) {
            (Some(p), Some(bits)) => crate::snapshot::MemoryContent::Diff {
                parent: p.clone(),
                dirty: bits,
            },
            _ => crate::snapshot::MemoryContent::Full,
        };
        match crate::snapshot::write(dir, config, vm, vcpus, devices, &self._mem, content) {
            Ok(state_fnv) => {
                *self.last_snapshot.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(crate::snapshot::Parent {
                        dir: std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf()),
                        state_fnv,
                    });
                Ok(())
            }
            Err(e) => {
                if let Some(bits) = dirty {
                    *self.dirty_carry.lock().unwrap_or_else(|p| p.into_inner()) = bits;
                }
                Err((500, e))
            }
        }
    }

    /// The pages written since the last snapshot (by vCPUs: KVM's dirty log; by devices: their
    /// dirty log; and any carried over from a failed snapshot), one bit per page of the regions
    /// end to end; clears them.
    fn take_dirty(&self, devices: &virtio::dirty::DirtyLog) -> Result<Vec<u64>, String> {
        let mut bits = devices
            .take()
            .ok_or_else(|| "the devices' dirty log is off".to_string())?;
        let carry =
            std::mem::take(&mut *self.dirty_carry.lock().unwrap_or_else(|p| p.into_inner()));
        for (w, c) in bits.iter_mut().zip(carry) {
            *w |= c;
        }
        let mut first = 0u64;
        for (slot, r) in self._mem.iter().enumerate() {
            let log = self
                ._vm
                .get_dirty_log(slot as u32, r.len() as usize)
                .map_err(|e| format!("KVM dirty log of memory slot {slot}: {e}"))?;
            let pages = r.len().div_ceil(virtio::dirty::PAGE_SIZE);
            for p in 0..pages {
                if log
                    .get((p / 64) as usize)
                    .is_some_and(|w| w & (1 << (p % 64)) != 0)
                {
                    let g = first + p;
                    if let Some(w) = bits.get_mut((g / 64) as usize) {
                        *w |= 1 << (g % 64);
                    }
                }
            }
            first += pages;
        }
        Ok(bits)
    }

    /// Replaces the freshly built VM's memory, VM, vCPU and device state with a snapshot's.
    /// Devices come last: their workers may raise interrupts at once, which must find the
    /// restored irqchip and LAPICs.
    fn restore(
        &mut self,
        dir: &std::path::Path,
        snap: &crate::snapshot::Snapshot,
        lazy: bool,
        paused: bool,
    ) -> Result<(), VmmError> {
        let e = |m: String| VmmError::Setup(format!("restoring {}: {m}", dir.display()));
        snap.restore_memory(dir, &self._mem, lazy).map_err(e)?;
        if snap.vcpus().len() != self.vcpus.len() {
            return Err(e(format!(
                "{} vCPUs saved, {} configured",
                snap.vcpus().len(),
                self.vcpus.len()
            )));
        }
        // What this host's KVM gives a tern vCPU (read back from the freshly built one, before
        // the snapshot's state replaces it).
        let host = match self.vcpus.first() {
            Some(v) => {
                v.fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES)
                    .map_err(|err| e(format!("get CPUID: {err}")))?
                    .as_slice()
                    .to_vec()
            }
            None => Vec::new(),
        };
        crate::snapshot::check_cpu_features(snap.cpuid(), &host).map_err(e)?;
        if snap.devices().len() != self.pausers.len() {
            return Err(e(format!(
                "{} virtio devices saved, {} configured",
                snap.devices().len(),
                self.pausers.len()
            )));
        }
        crate::snapshot::restore_vm(&self._vm, snap.vm()).map_err(e)?;
        *self.last_snapshot.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(crate::snapshot::Parent {
                dir: std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf()),
                state_fnv: snap.state_fnv(),
            });
        for (v, s) in self.vcpus.iter().zip(snap.vcpus()) {
            crate::snapshot::restore_vcpu(&v.fd, s)
                .map_err(|m| e(format!("vCPU {}: {m}", v.id)))?;
        }
        self.serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .restore_state(snap.serial())
            .map_err(e)?;
        if let Some(r) = snap.rtc() {
            self.rtc
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .restore_state(r)
                .map_err(e)?;
        }
        for (i, (p, s)) in self.pausers.iter().zip(snap.devices()).enumerate() {
            p.lock()
                .unwrap_or_else(|e| e.into_inner())
                .restore_state(s)
                .map_err(|m| e(format!("virtio device {i}: {m}")))?;
        }
        if paused {
            self.ctl.pause_state().requested = true;
            pause_devices(
                &self.pausers,
                &self.device_names,
                Instant::now() + DEVICE_PAUSE_TIMEOUT,
            )
            .map_err(e)?;
            self.ctl.pause_state().devices_paused = true;
        }
        // A restored VM is a clone: it gets a generation ID of its own.
        self.new_generation()
    }

    /// Answers one API request while the VM runs.
    fn api_request(
        &self,
        action: &Action,
        handles: &[JoinHandle<()>],
        exit_counters: &[Arc<ExitCounters>],
        config: &VmConfig,
        button_deadline: &mut Option<Instant>,
    ) -> Reply {
        let paused = self.ctl.paused();
        let state = if paused { "paused" } else { "running" };
        match action {
            Action::Info => Reply::ok(serde_json::json!({
                "state": state,
                "config": config,
                "vcpus": config.cpus,
                "memory_bytes": config.memory.0,
                "uptime_ms": self.started.elapsed().as_millis() as u64,
                "generation_id": crate::vmgenid::read(&self._mem)
                    .ok()
                    .map(|id| crate::vmgenid::hex(&id)),
                "taps": self.device_stats.iter().filter_map(|d| match d {
                    crate::virtio_devices::DeviceStats::Net { tap, .. } => Some(tap.clone()),
                    _ => None,
                }).collect::<Vec<_>>(),
            })),
            Action::Configure(_) => Reply::conflict("configure", state),
            Action::Boot => Reply::conflict("boot", state),
            Action::Pause if paused => Reply::conflict("pause", "paused already"),
            Action::Pause => match self.pause_vcpus(handles) {
                Ok(()) => Reply::done(),
                Err(e) => Reply::error(500, format!("cannot pause: {e}; the VM keeps running")),
            },
            Action::Resume if !paused => Reply::conflict("resume", "running"),
            Action::Resume => {
                self.resume_vcpus();
                Reply::done()
            }
            Action::Shutdown { force: true } => {
                self.ctl.request_exit(VmExit::ApiStop);
                Reply::accepted()
            }
            Action::Shutdown { force: false } if paused => Reply::error(
                409,
                "cannot press the power button of a paused VM: resume it first, or use ?force=true",
            ),
            Action::Shutdown { force: false } => {
                self.press_power_button(button_deadline);
                Reply::accepted()
            }
            Action::Reboot => {
                self.ctl.request_exit(VmExit::Reset);
                Reply::accepted()
            }
            Action::Restore(_) => Reply::error(
                409,
                "cannot restore: a VM exists already (restore into a tern started with only --api-socket)",
            ),
            Action::Snapshot { .. } if !paused => {
                Reply::conflict("snapshot", "running (pause it first)")
            }
            Action::Snapshot { dir, diff } => match self.snapshot(dir, config, *diff) {
                Ok(()) => Reply::done(),
                Err((status, e)) => Reply::error(status, format!("cannot snapshot: {e}")),
            },
            Action::Counters => {
                let vcpus: Vec<_> = exit_counters
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        serde_json::json!({
                            "vcpu": i,
                            "pio_exits": c.pio.load(Ordering::Relaxed),
                            "mmio_exits": c.mmio.load(Ordering::Relaxed),
                            "other_exits": c.other.load(Ordering::Relaxed),
                        })
                    })
                    .collect();
                let devices: Vec<_> = self.device_stats.iter().map(|d| d.to_json()).collect();
                Reply::ok(serde_json::json!({ "vcpus": vcpus, "devices": devices }))
            }
        }
    }

    fn run(
        mut self,
        signals: &File,
        stdin_quit: &EventFd,
        api: Option<&ApiServer>,
        config: &VmConfig,
    ) -> Result<VmExit, VmmError> {
        let exit_counters: Vec<Arc<ExitCounters>> =
            self.vcpus.iter().map(|v| v.counters.clone()).collect();
        let mut handles: Vec<JoinHandle<()>> = Vec::new();
        for v in self.vcpus.drain(..) {
            let name = format!("tern-vcpu{}", v.id);
            let h = std::thread::Builder::new()
                .name(name)
                .spawn(move || v.run())
                .map_err(|e| VmmError::Setup(format!("cannot start vCPU thread: {e}")))?;
            handles.push(h);
        }

        const EXIT: u64 = 1;
        const SIGNAL: u64 = 3;
        const QUIT: u64 = 4;
        const API: u64 = 5;
        let epoll = Epoll::new().map_err(|e| VmmError::Setup(format!("epoll: {e}")))?;
        let mut fds = vec![
            (self.ctl.exit_evt.as_raw_fd(), EXIT),
            (signals.as_raw_fd(), SIGNAL),
            (stdin_quit.as_raw_fd(), QUIT),
        ];
        if let Some(a) = api {
            fds.push((a.event_fd(), API));
        }
        for (fd, token) in fds {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(|e| VmmError::Setup(format!("epoll: {e}")))?;
        }
        let mut events = vec![EpollEvent::default(); 8];
        let mut button_deadline: Option<Instant> = None;
        while !self.ctl.stopping() {
            if button_deadline.is_some_and(|d| Instant::now() >= d) {
                self.ctl
                    .request_exit(VmExit::ShutdownTimeout(self.shutdown_timeout.as_secs()));
            }
            let n = match epoll.wait(50, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
                Err(e) => return Err(VmmError::Setup(format!("epoll: {e}"))),
            };
            for ev in &events[..n] {
                match ev.data() {
                    SIGNAL => {
                        let signo = read_signal(signals);
                        if signo == libc::SIGTERM && button_deadline.is_none() {
                            // First SIGTERM: ask the guest to shut down, as a power button.
                            self.press_power_button(&mut button_deadline);
                            eprintln!(
                                "tern: SIGTERM: pressed the power button; the guest has {} s to power off (SIGTERM again or SIGINT stops it now)",
                                self.shutdown_timeout.as_secs()
                            );
                        } else {
                            self.ctl.request_exit(VmExit::Signal(signo));
                        }
                    }
                    QUIT => self.ctl.request_exit(VmExit::UserQuit),
                    API => {
                        for req in api.map(ApiServer::take).unwrap_or_default() {
                            let r = self.api_request(
                                &req.action,
                                &handles,
                                &exit_counters,
                                config,
                                &mut button_deadline,
                            );
                            req.reply(r);
                        }
                    }
                    _ => {}
                }
            }
            self.serial
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .flush();
        }

        // Stop every vCPU: the stop flag is set; kick each out of KVM_RUN until it returns.
        for h in &handles {
            let _ = h.kill(kick_signal());
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for h in handles {
            while !h.is_finished() && Instant::now() < deadline {
                let _ = h.kill(kick_signal());
                std::thread::sleep(Duration::from_millis(1));
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
        // The guest's last output, written while the sink takes it (not held up by a reader
        // that stopped reading).
        let serial = self
            .serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .output();
        for out in std::iter::once(serial).chain(self.console_output.clone()) {
            out.drain(Duration::from_secs(1));
            if out.dropped() > 0 {
                eprintln!(
                    "tern: {} bytes of {} output were dropped: nobody read it fast enough",
                    out.dropped(),
                    out.what()
                );
            }
        }
        let mut exit = self
            .ctl
            .take_exit()
            .unwrap_or(VmExit::Error("VM stopped without a reason".into()));
        if exit == VmExit::Reset && self.panic_seen.load(Ordering::SeqCst) {
            exit = VmExit::GuestPanic;
        }
        Ok(exit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;
    use virtio::transport::{PauseDevice, TransportState};

    /// A device whose pause succeeds, or whose I/O hangs past any deadline.
    struct FakeDevice {
        hangs: bool,
        resumed: Arc<AtomicU32>,
    }

    impl PauseDevice for FakeDevice {
        fn pause_device(&mut self, deadline: Instant) -> bool {
            if self.hangs {
                std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
            }
            !self.hangs
        }
        fn resume_device(&mut self) {
            self.resumed.fetch_add(1, Ordering::SeqCst);
        }
        fn save_state(&self) -> TransportState {
            unreachable!("the pause tests take no snapshot")
        }
        fn restore_state(&mut self, _: &TransportState) -> Result<(), String> {
            Err("the pause tests restore nothing".into())
        }
    }

    #[test]
    fn a_device_that_does_not_stop_fails_the_pause_by_name_and_everything_resumes() {
        let resumed = Arc::new(AtomicU32::new(0));
        let dev = |hangs| -> crate::virtio_devices::DevicePauser {
            Arc::new(Mutex::new(FakeDevice {
                hangs,
                resumed: resumed.clone(),
            }))
        };
        let names: Vec<String> = [
            "virtio-rng",
            "virtio-blk disk 0 (/hung.img)",
            "virtio-console",
        ]
        .map(String::from)
        .to_vec();
        let t0 = Instant::now();
        let e = pause_devices(
            &[dev(false), dev(true), dev(false)],
            &names,
            t0 + Duration::from_millis(200),
        )
        .unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        assert_eq!(
            e,
            "virtio-blk disk 0 (/hung.img) did not finish its in-flight I/O and stop within 0.2 s"
        );
        // Those that stopped go on too: the VM stays as it was.
        assert_eq!(resumed.load(Ordering::SeqCst), 3);
        assert_eq!(pause_devices(&[dev(false)], &names, Instant::now()), Ok(()));
    }
}
