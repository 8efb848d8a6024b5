//! A tern process's one VM from start to end: waiting for a configuration through the API when
//! none was given, building the VM (or restoring it from a snapshot), running it, and building
//! it afresh when the guest reboots and the configuration says to restart.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ::api::{VmInfo, VmState};
use lifecycle::event_loop::EventLoop;
use lifecycle::threads::{spawn, Role};
use vmm_sys_util::eventfd::EventFd;

use crate::api::{Action, ApiServer, Reply, Request as ApiRequest};
use crate::builder::{build, Origin, VmShell};
use crate::config::{CharBackend, OnReboot, VmConfig};
use crate::console::{spawn_stdin_thread, StdinTarget};
use crate::control::VmExit;
use crate::error::VmmError;
use crate::migration::receive::{receive, Incoming, Received};
use crate::signals::{block_stop_signals, read_signal};
use crate::snapshot::Restore;
use crate::terminal::RawTerminal;
use crate::vcpu::install_kick_handler;
use crate::vm::Vm;

/// Runs the VM described by `config` until it ends (rebuilding it on reboot when configured
/// so). `start` is when tern started, for boot-time measurements.
///
/// With an API server, `config` may be `None`: tern then waits for `PUT /v1/vm` and
/// `PUT /v1/vm/boot`, and serves the API for the VM's whole life.
pub fn run(
    config: Option<VmConfig>,
    api: Option<ApiServer>,
    mut restore: Option<Restore>,
    mut incoming: Option<Incoming>,
    start: Instant,
) -> Result<VmExit, VmmError> {
    install_kick_handler()
        .map_err(|e| VmmError::Setup(format!("cannot install the vCPU kick handler: {e}")))?;
    let signals = block_stop_signals()?;
    let mut shell = None;
    let mut config = config;
    let mut received = None;
    if config.is_none() && incoming.is_none() {
        if let Some(a) = &api {
            shell = spawn(Role::Vmm, "tern-prepare", VmShell::create).ok();
            crate::systemd::ready("waiting for a VM through the API");
            match wait_for_boot(a, &signals, None)? {
                Ok(b) if b.incoming.is_some() => {
                    b.req.reply(Reply::accepted());
                    incoming = b.incoming;
                    // The shell made while waiting is not used: the VM is built when its
                    // source describes it.
                    shell = None;
                }
                Ok(b) => {
                    restore = b.restore;
                    config = Some(b.config);
                    return run_loop(
                        config,
                        api,
                        restore,
                        None,
                        Some(b.req),
                        shell,
                        signals,
                        start,
                    );
                }
                Err(exit) => return Ok(exit),
            }
        }
    }
    if let Some(inc) = incoming.take() {
        match receive_vm(inc, api.as_ref(), &signals, start)? {
            Ok(r) => {
                config = Some(r.config.clone());
                received = Some(r);
            }
            Err(exit) => return Ok(exit),
        }
    }
    run_loop(config, api, restore, received, None, shell, signals, start)
}

/// [`run`] once the first VM's origin is known.
#[allow(clippy::too_many_arguments)]
fn run_loop(
    config: Option<VmConfig>,
    api: Option<ApiServer>,
    mut restore: Option<Restore>,
    mut received: Option<Received<Vm>>,
    mut boot_req: Option<ApiRequest>,
    shell: Option<std::thread::JoinHandle<Result<VmShell, VmmError>>>,
    signals: File,
    start: Instant,
) -> Result<VmExit, VmmError> {
    let mut shell = shell;
    let Some(mut config) = config else {
        return Err(crate::config::ConfigError::Missing(
            "kernel (--kernel PATH) or firmware (--firmware bios|uefi|PATH)",
        )
        .into());
    };
    config.validate()?;
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
        let mut handover = None;
        // Devices without ids get theirs now, for the API to show and name them by.
        config.assign_device_ids();
        let built = if let Some(r) = received.take() {
            handover = Some(r.handover);
            Ok(r.vm)
        } else {
            crate::virtio_devices::probe_disk_formats(&mut config);
            crate::confinement::check_config(&config)
                .and_then(|()| {
                    let origin = if restoring.is_some() {
                        Origin::Snapshot
                    } else {
                        Origin::Boot
                    };
                    build(&config, start, origin, shell)
                })
                .and_then(|mut vm| {
                    if let Some(r) = &restoring {
                        // Shared guest memory must hold the guest's pages (a local migration hands
                        // it over): such a VM is restored eagerly.
                        let lazy = r.lazy && !config.memory_shared;
                        vm.restore(&r.dir, &r.snapshot, lazy, r.paused)?;
                        tracing::info!(
                            "restored {} ({}) in {:.1} ms",
                            r.dir.display(),
                            if r.lazy { "lazy" } else { "eager" },
                            t0.elapsed().as_secs_f64() * 1e3
                        );
                    }
                    Ok(vm)
                })
        };
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
                    Ok(BootRequest {
                        req,
                        incoming: Some(inc),
                        ..
                    }) => {
                        req.reply(Reply::accepted());
                        match receive_vm(inc, Some(a), &signals, start)? {
                            Ok(r) => {
                                config = r.config.clone();
                                received = Some(r);
                                continue;
                            }
                            Err(exit) => return Ok(exit),
                        }
                    }
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
        if let Some(h) = handover.take() {
            // The VM is this tern's: the source exits when it hears so.
            h.running();
            vm.announce();
            tracing::info!(
                "migration: the VM runs here, {:.1} ms after tern started",
                start.elapsed().as_secs_f64() * 1e3
            );
        }
        crate::systemd::ready(match &restoring {
            Some(r) if r.paused => "the VM is restored and paused",
            _ => "the VM runs",
        });
        let mut exit = vm.run(&signals, &stdin_quit, api.as_ref(), &mut config)?;
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
            crate::systemd::status("the guest rebooted; restarting the VM");
            continue;
        }
        if exit == VmExit::Reset && crate::firmware::is_uefi(&config) {
            crate::report!(
                crate::systemd::NOTICE,
                "tern: the guest reset and tern exits (--on-reboot exit); OVMF resets once on its first boot with a fresh variable store, so UEFI VMs want --on-reboot restart"
            );
        }
        return Ok(exit);
    }
}

/// Waits for a VM migrating in on `inc` and receives it; how tern was stopped meanwhile
/// otherwise (a stop signal, a failed migration, `PUT /v1/vm/shutdown`). With an API server,
/// the migration arrives on a thread of its own while this one answers the API (the VM is
/// `created` until it runs; `GET /v1/vm/migrate` says a migration is arriving).
fn receive_vm(
    inc: Incoming,
    api: Option<&ApiServer>,
    signals: &File,
    start: Instant,
) -> Result<Result<Received<Vm>, VmExit>, VmmError> {
    use std::os::fd::AsFd;
    let build = move |c: &VmConfig, m| build_incoming(c, m, start);
    let Some(api) = api else {
        crate::systemd::ready(&format!(
            "waiting for a VM migrating in on {}",
            inc.listener.local()
        ));
        return Ok(match receive(&inc, signals.as_fd(), build) {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(VmExit::Signal(read_signal(signals))),
            Err(e) => Err(VmExit::Error(e)),
        });
    };
    let setup = |e: std::io::Error| VmmError::Setup(format!("receiving a migration: {e}"));
    let (stop_rx, mut stop_tx) = std::io::pipe().map_err(setup)?;
    let done = EventFd::new(libc::EFD_NONBLOCK).map_err(setup)?;
    let done_tx = done.try_clone().map_err(setup)?;
    let url = inc.listener.local();
    crate::systemd::ready(&format!("waiting for a VM migrating in on {url}"));
    let thread = spawn(Role::Vmm, "tern-receive", move || {
        let r = receive(&inc, stop_rx.as_fd(), build);
        let _ = done_tx.write(1);
        r
    })
    .map_err(setup)?;
    let status = ::api::migrate::MigrationStatus {
        state: ::api::migrate::MigrationState::Active,
        url: Some(url),
        ..Default::default()
    };
    const API: u64 = 1;
    const SIGNAL: u64 = 2;
    const DONE: u64 = 3;
    let epoll_err = |e: std::io::Error| VmmError::Setup(format!("epoll: {e}"));
    let mut events = EventLoop::new().map_err(epoll_err)?;
    events.add(api.event_fd(), API).map_err(epoll_err)?;
    events.add(signals.as_raw_fd(), SIGNAL).map_err(epoll_err)?;
    events.add(done.as_raw_fd(), DONE).map_err(epoll_err)?;
    let mut stopped = None;
    loop {
        let ready = events.wait(None).map_err(epoll_err)?;
        if ready.contains(SIGNAL) && stopped.is_none() {
            stopped = Some(VmExit::Signal(read_signal(signals)));
            let _ = std::io::Write::write_all(&mut stop_tx, b"x");
        }
        for req in api.take() {
            let reply = match req.action {
                Action::Info => Reply::ok(&VmInfo::new(VmState::Created, None)),
                Action::OnVmm(ref t) => t.run(),
                Action::MigrateStatus => Reply::ok(&status),
                Action::Shutdown { .. } => {
                    if stopped.is_none() {
                        stopped = Some(VmExit::ApiStop);
                        let _ = std::io::Write::write_all(&mut stop_tx, b"x");
                    }
                    Reply::accepted()
                }
                _ => Reply::error(
                    409,
                    "a VM is migrating in: wait until it runs (GET /v1/vm/migrate)",
                ),
            };
            req.reply(reply);
        }
        if ready.contains(DONE) {
            break;
        }
    }
    let got = thread
        .join()
        .unwrap_or_else(|_| Err("the thread receiving the migration panicked".into()));
    Ok(match (got, stopped) {
        (_, Some(exit)) => Err(exit),
        (Ok(Some(r)), None) => Ok(r),
        (Ok(None), None) => Err(VmExit::ApiStop),
        (Err(e), None) => Err(VmExit::Error(e)),
    })
}

/// Builds the VM a migration's source describes (its disks are locked at the switch-over).
fn build_incoming(config: &VmConfig, memory: Option<File>, start: Instant) -> Result<Vm, String> {
    crate::confinement::check_config(config).map_err(|e| e.to_string())?;
    crate::builder::build_on(config, start, Origin::Migration, None, memory)
        .map_err(|e| e.to_string())
}

/// What the API asked for before any VM existed.
struct BootRequest {
    config: VmConfig,
    /// Answered once the VM is built (and restored).
    req: ApiRequest,
    /// A snapshot to bring back instead of booting.
    restore: Option<Restore>,
    /// A migration to wait for instead of booting.
    incoming: Option<Incoming>,
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
    let epoll_err = |e: std::io::Error| VmmError::Setup(format!("epoll: {e}"));
    let mut events = EventLoop::new().map_err(epoll_err)?;
    events.add(api.event_fd(), API).map_err(epoll_err)?;
    events.add(signals.as_raw_fd(), SIGNAL).map_err(epoll_err)?;
    loop {
        if events.wait(None).map_err(epoll_err)?.contains(SIGNAL) {
            return Ok(Err(VmExit::Signal(read_signal(signals))));
        }
        for req in api.take() {
            let state = if config.is_some() {
                VmState::Configured
            } else {
                VmState::Created
            };
            if let Err(r) = crate::states::check(state, &req.action) {
                req.reply(r);
                continue;
            }
            match req.action {
                Action::Info => {
                    let r = Reply::ok(&VmInfo::new(state, config.clone()));
                    req.reply(r);
                }
                Action::OnVmm(ref t) => {
                    let r = t.run();
                    req.reply(r);
                }
                Action::Configure(ref c) => match c.validate() {
                    Ok(()) => {
                        config = Some((**c).clone());
                        req.reply(Reply::done());
                    }
                    Err(e) => req.reply(Reply::error(400, e.to_string())),
                },
                Action::Restore(ref opts) => match crate::snapshot::open(opts) {
                    Ok(r) => {
                        return Ok(Ok(BootRequest {
                            config: r.snapshot.config.clone(),
                            req,
                            restore: Some(r),
                            incoming: None,
                        }))
                    }
                    Err(e) => req.reply(Reply::error(400, format!("cannot restore: {e}"))),
                },
                Action::Boot => {
                    if let Some(c) = config.take() {
                        return Ok(Ok(BootRequest {
                            config: c,
                            req,
                            restore: None,
                            incoming: None,
                        }));
                    }
                    req.reply(crate::states::not_handled(state));
                }
                Action::Shutdown { .. } => {
                    req.reply(Reply::accepted());
                    return Ok(Err(VmExit::ApiStop));
                }
                Action::MigrateStatus => {
                    req.reply(Reply::ok(&::api::migrate::MigrationStatus::default()))
                }
                Action::MigrateReceive(ref opts) => {
                    match crate::migration::Listener::bind(&opts.url) {
                        Ok(listener) => {
                            let opts = (**opts).clone();
                            return Ok(Ok(BootRequest {
                                config: config.unwrap_or_default(),
                                req,
                                restore: None,
                                incoming: Some(Incoming { listener, opts }),
                            }));
                        }
                        Err(e) => req.reply(Reply::error(400, e)),
                    }
                }
                _ => req.reply(crate::states::not_handled(state)),
            }
        }
    }
}
