//! A built VM: its parts, and what the VMM does with it while it runs (the main loop, the API
//! requests a running VM answers, pause, snapshot and restore as walks over its components).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lifecycle::event_loop::EventLoop;
use vmm_sys_util::eventfd::EventFd;

use ::api::{Counters, VcpuCounters, VmInfo, VmState};
use devices::serial::SerialDevice;

use crate::api::{Action, ApiServer, Reply};
use crate::components::Components;
use crate::config::VmConfig;
use crate::control::{VmControl, VmExit};
use crate::error::VmmError;
use crate::memory::GuestRam;
use crate::sync::lock;
use crate::vcpu::ExitCounters;
use crate::vcpus::Vcpus;

/// A built VM (the `builder` module makes one).
pub struct Vm {
    pub(crate) ram: Arc<GuestRam>,
    pub(crate) ctl: Arc<VmControl>,
    pub(crate) vcpus: Vcpus,
    /// Everything stateful, in walk order.
    pub(crate) components: Arc<Components>,
    /// The devices: ids, bus ranges, states, ACPI descriptions.
    pub(crate) devices: crate::device_manager::DeviceManager,
    pub(crate) serial: Arc<Mutex<SerialDevice>>,
    pub(crate) power_button: EventFd,
    /// Raises `\_SB_.GED1`: the VM generation ID changed.
    pub(crate) vmgenid_evt: EventFd,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) panic_seen: Arc<AtomicBool>,
    pub(crate) console_input: Option<virtio::devices::ConsoleInput>,
    pub(crate) console_output: Option<devices::serial::OutputHandle>,
    /// The PCI bus, with the VM's virtio-pci functions (PCI transport).
    pub(crate) pci: Option<crate::virtio_pci::PciBus>,
    /// The PCI hotplug controller (PCI transport).
    pub(crate) pci_hotplug: Option<std::sync::Arc<crate::pci_hotplug::PciHotplug>>,
    pub(crate) started: Instant,
    /// The snapshot this VM last wrote or was restored from: what a diff builds on.
    pub(crate) last_snapshot: Mutex<Option<crate::snapshot::Parent>>,
    /// The firmware image mapped below 4 GiB, for a firmware boot (which has no VM generation
    /// ID: the page it would use below 1 MiB belongs to the firmware).
    pub(crate) firmware_rom: Option<crate::firmware::FirmwareRom>,
    /// The disks and interfaces: handles, counters, image locks (handed over by a
    /// migration), TAPs to announce (after a migration). Changed by device hotplug.
    pub(crate) devs: Mutex<crate::device_set::DeviceSet>,
    /// The outgoing migration, while one runs (and after, for its status).
    pub(crate) migration: Mutex<Option<crate::migration::Outgoing>>,
    /// The last outgoing migration's status.
    pub(crate) migration_status: Arc<Mutex<::api::migrate::MigrationStatus>>,
    /// The memory balloon, when the VM has one.
    pub(crate) balloon: Option<virtio::devices::BalloonHandle>,
    /// The CPU hotplug controller, when `max_cpus` exceeds `cpus`.
    pub(crate) cpu_hotplug: Option<Arc<crate::cpu_hotplug::CpuHotplug>>,
    /// The virtio-mem device, when `max_memory` exceeds `memory`.
    pub(crate) mem_hotplug: Option<virtio::devices::MemHandle>,
}

impl crate::migration::receive::Arrival for Vm {
    fn memory(&self) -> &arch::GuestMemoryMmap {
        self.ram.mem()
    }

    fn cpuid(&self) -> &[kvm_bindings::kvm_cpuid_entry2] {
        self.vcpus.cpuid()
    }

    fn restore_state(&self, sections: &[lifecycle::Section], paused: bool) -> Result<(), String> {
        if let Some(pci) = &self.pci {
            pci.place_bars_as_saved(sections);
        }
        self.components.restore(sections)?;
        if paused {
            self.components.pause()?;
        }
        Ok(())
    }

    fn lock_disks(&self) -> Result<(), String> {
        for l in lock(&self.devs).all_locks() {
            l.acquire()
                .map_err(|e| format!("cannot lock the disk: {e}"))?;
        }
        Ok(())
    }
}

impl Vm {
    /// The VM's devices.
    pub fn devices(&self) -> &crate::device_manager::DeviceManager {
        &self.devices
    }

    /// Presses the guest's power button and, unless tern never stops a guest that was asked
    /// (Firecracker's dialect, or `--shutdown-timeout 0`, where only SIGTERM stops the VM, at
    /// once), starts the time it has to power off.
    fn press_power_button(&self, deadline: &mut Option<Instant>) {
        let _ = self.power_button.write(1);
        let no_deadline = crate::personality::firecracker() || self.shutdown_timeout.is_zero();
        if deadline.is_none() && !no_deadline {
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
        if self.firmware_rom.is_some() {
            return Ok(());
        }
        crate::vmgenid::write_new(self.ram.mem()).map_err(VmmError::Setup)?;
        // tern's own write: a diff snapshot must carry it too.
        self.ram.mark(
            arch::layout::VMGENID_ADDR,
            arch::layout::VMGENID_SIZE as u64,
        );
        self.vmgenid_evt.write(1).map_err(|e| {
            VmmError::Setup(format!(
                "cannot signal the new VM generation ID to the guest: {e}"
            ))
        })
    }

    /// Announces the guest's MACs on their TAPs (a gratuitous RARP each, three times over
    /// 300 ms, from a thread of its own), so that bridges and switches learn where the guest
    /// is now: after it migrated here.
    pub fn announce(&self) {
        let list: Vec<(Arc<net::Tap>, [u8; 6])> = lock(&self.devs)
            .announcers
            .iter()
            .map(|(_, t, m)| (t.clone(), *m))
            .collect();
        if list.is_empty() {
            return;
        }
        let sent =
            lifecycle::threads::spawn(lifecycle::threads::Role::Io, "tern-announce", move || {
                for wait in [0, 100, 200] {
                    std::thread::sleep(Duration::from_millis(wait));
                    for (tap, mac) in &list {
                        if let Err(e) = tap.inject(&net::rarp_announcement(*mac)) {
                            tracing::warn!("cannot announce the guest on TAP {}: {e}", tap.name());
                        }
                    }
                }
            });
        if let Err(e) = sent {
            tracing::warn!("cannot announce the guest's MACs: {e}");
        }
    }

    /// Whether an outgoing migration runs.
    fn migrating(&self) -> bool {
        lock(&self.migration).as_ref().is_some_and(|m| m.active())
    }

    /// Starts migrating the VM as `opts` says (`PUT /v1/vm/migrate/send`): 202, and the
    /// migration goes on in the background.
    fn start_migration(&self, opts: &::api::migrate::SendOptions, config: &VmConfig) -> Reply {
        use crate::migration::{send::VmParts, Outgoing};
        if let Err(e) = opts.validate() {
            return Reply::error(400, format!("cannot migrate: {e}"));
        }
        let mut m = lock(&self.migration);
        if m.as_ref().is_some_and(|m| m.active()) {
            return Reply::error(409, "cannot migrate: a migration is in progress already");
        }
        let target = match crate::migration::Target::resolve(&opts.url) {
            Ok(t) => t,
            Err(e) => return Reply::error(400, format!("cannot migrate: {e}")),
        };
        let parts = VmParts {
            ram: self.ram.clone(),
            components: self.components.clone(),
            ctl: self.ctl.clone(),
            config: config.clone(),
            cpuid: self.vcpus.cpuid().to_vec(),
            locks: lock(&self.devs).all_locks(),
            pagemap: std::fs::File::open("/proc/self/pagemap").ok(),
        };
        match Outgoing::start(parts, opts.clone(), target, self.migration_status.clone()) {
            Ok(o) => {
                *m = Some(o);
                Reply::accepted()
            }
            Err(e) => Reply::error(500, format!("cannot migrate: {e}")),
        }
    }

    /// Writes a snapshot of the paused VM to `dir`.
    fn snapshot(
        &self,
        dir: &std::path::Path,
        config: &VmConfig,
        diff: bool,
    ) -> Result<(), (u16, String)> {
        sandbox::landlock::check(dir, true).map_err(|e| (400, e))?;
        if dir.exists() {
            return Err((400, format!("{} already exists", dir.display())));
        }
        let parent = self
            .last_snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let parent = match (diff, self.ram.logging(), parent) {
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
        let sections = self.components.save().map_err(|e| (500, e))?;
        // Every snapshot of a tracking VM starts the next diff afresh.
        for (addr, len) in self.components.written_memory() {
            self.ram.mark(addr, len);
        }
        let dirty = self.ram.take_dirty().map_err(|e| (500, e))?;
        let content = match (&parent, &dirty) {
            (Some(p), Some(bits)) => crate::snapshot::MemoryContent::Diff {
                parent: p.clone(),
                dirty: bits,
            },
            // Memory the host never gave the guest is skipped (a 1 GiB guest that used
            // 256 MiB: 768 MiB not read); without `/proc/self/pagemap`, all of it is read.
            _ => crate::snapshot::MemoryContent::Full {
                extents: self
                    .ram
                    .extents_with_data(std::fs::File::open("/proc/self/pagemap").ok().as_ref()),
            },
        };
        match crate::snapshot::write(dir, config, sections, self.ram.mem(), content) {
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
                    self.ram.carry(bits);
                }
                Err((500, e))
            }
        }
    }

    /// Replaces the freshly built VM's memory and every component's state with a snapshot's,
    /// in walk order (devices last: their workers may raise interrupts at once, which must
    /// find the restored irqchip and LAPICs).
    pub fn restore(
        &mut self,
        dir: &std::path::Path,
        snap: &crate::snapshot::Snapshot,
        lazy: bool,
        paused: bool,
    ) -> Result<(), VmmError> {
        let e = |m: String| VmmError::Setup(format!("restoring {}: {m}", dir.display()));
        snap.restore_memory(dir, self.ram.mem(), lazy).map_err(e)?;
        if lazy {
            self.ram.set_file_mapped();
        }
        if let Some(pci) = &self.pci {
            pci.place_bars_as_saved(snap.sections());
        }
        self.components.restore(snap.sections()).map_err(e)?;
        *self.last_snapshot.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(crate::snapshot::Parent {
                dir: std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf()),
                state_fnv: snap.state_fnv(),
            });
        if paused {
            // The vCPUs park before they first run; the devices pause now.
            self.components.pause().map_err(e)?;
        }
        // A restored VM is a clone: it gets a generation ID of its own.
        self.new_generation()
    }

    /// Answers one API request while the VM runs.
    fn api_request(
        &self,
        action: &Action,
        exit_counters: &[Arc<ExitCounters>],
        config: &mut VmConfig,
        button_deadline: &mut Option<Instant>,
    ) -> Reply {
        let paused = self.components.paused();
        let state = if paused {
            VmState::Paused
        } else {
            VmState::Running
        };
        if let Err(r) = crate::states::check(state, action) {
            return r;
        }
        if self.migrating()
            && matches!(
                action,
                Action::Pause
                    | Action::Resume
                    | Action::Snapshot { .. }
                    | Action::Reboot
                    | Action::BalloonSet(_)
                    | Action::Resize(_)
                    | Action::DiskUpdate { .. }
                    | Action::NetUpdate { .. }
                    | Action::AddDisk(_)
                    | Action::AddNet(_)
                    | Action::RemoveDevice { .. }
            )
        {
            return Reply::error(
                409,
                "a migration is in progress (GET /v1/vm/migrate shows it; DELETE /v1/vm/migrate cancels it)",
            );
        }
        match action {
            Action::Info => {
                let (present, requested, max) =
                    crate::resize::vcpu_counts(self.cpu_hotplug.as_deref(), config);
                let (mem_now, mem_requested, mem_max) =
                    crate::resize::memory_sizes(self.mem_hotplug.as_ref(), config);
                Reply::ok(&VmInfo {
                vcpus: Some(present),
                vcpus_requested: Some(requested),
                vcpus_max: Some(max),
                memory_bytes: Some(mem_now),
                memory_requested_bytes: Some(mem_requested),
                memory_max_bytes: Some(mem_max),
                uptime_ms: Some(self.started.elapsed().as_millis() as u64),
                generation_id: crate::vmgenid::read(self.ram.mem())
                    .ok()
                    .filter(|_| self.firmware_rom.is_none())
                    .map(|id| crate::vmgenid::hex(&id)),
                taps: Some(
                    lock(&self.devs)
                        .stats
                        .iter()
                        .filter_map(|d| match d {
                            crate::virtio_devices::DeviceStats::Net { tap, .. } => {
                                Some(tap.clone())
                            }
                            _ => None,
                        })
                        .collect(),
                ),
                ..VmInfo::new(state, Some(config.clone()))
            })
            }
            Action::OnVmm(t) => t.run(),
            Action::Pause => match self.components.pause() {
                Ok(()) => {
                    crate::systemd::status("the VM is paused");
                    Reply::done()
                }
                Err(e) => Reply::error(500, format!("cannot pause: {e}; the VM keeps running")),
            },
            Action::Resume => {
                self.components.resume();
                crate::systemd::status("the VM runs");
                Reply::done()
            }
            Action::Shutdown { force: true } => {
                self.ctl.request_exit(VmExit::ApiStop);
                Reply::accepted()
            }
            Action::Shutdown { force: false } => {
                self.press_power_button(button_deadline);
                Reply::accepted()
            }
            Action::Reboot => {
                self.ctl.request_exit(VmExit::Reset);
                Reply::accepted()
            }
            Action::Snapshot { dir, diff } => match self.snapshot(dir, config, *diff) {
                Ok(()) => Reply::done(),
                Err((status, e)) => Reply::error(status, format!("cannot snapshot: {e}")),
            },
            Action::MigrateSend(opts) => self.start_migration(opts, config),
            Action::MigrateStatus => {
                if let Some(m) = lock(&self.migration).as_ref() {
                    m.status_read();
                }
                Reply::ok(&*lock(&self.migration_status))
            }
            Action::MigrateCancel => match lock(&self.migration).as_ref() {
                Some(m) if m.cancel() => Reply::accepted(),
                Some(m) if m.active() => Reply::error(
                    409,
                    "the migration is handing the VM over to the destination; it cannot be cancelled now",
                ),
                _ => Reply::error(409, "no migration is in progress"),
            },
            Action::Counters => {
                let vcpus: Vec<_> = exit_counters
                    .iter()
                    .enumerate()
                    .map(|(i, c)| VcpuCounters {
                        vcpu: i as u32,
                        pio_exits: c.pio.load(Ordering::Relaxed),
                        mmio_exits: c.mmio.load(Ordering::Relaxed),
                        other_exits: c.other.load(Ordering::Relaxed),
                        cpu_time_ns: c.cpu_time_ns(),
                    })
                    .collect();
                let devices: Vec<_> = lock(&self.devs)
                    .stats
                    .iter()
                    .map(|d| d.counters())
                    .collect();
                let process = crate::host::process_counters();
                Reply::ok(&Counters {
                    vcpus,
                    devices,
                    process,
                })
            }
            Action::BalloonInfo => match &self.balloon {
                Some(b) => Reply::ok(&crate::balloon::info(b, config)),
                None => crate::balloon::none(),
            },
            Action::Resize(r) => crate::resize::resize(
                self.cpu_hotplug.as_deref(),
                self.mem_hotplug.as_ref(),
                r,
                config,
            ),
            Action::BalloonSet(r) => match &self.balloon {
                Some(b) => crate::balloon::set(b, r),
                None => crate::balloon::none(),
            },
            Action::DiskUpdate { id, update } => {
                crate::device_updates::update_disk(&mut lock(&self.devs), id, update, config)
            }
            Action::AddDisk(d) => self.add_disk(d, config),
            Action::AddNet(n) => self.add_net(n, config),
            Action::RemoveDevice { kind, id } => self.remove_device(*kind, id, config),
            Action::NetUpdate { id, update } => {
                crate::device_updates::update_net(&lock(&self.devs).nets, id, update, config)
            }
            _ => crate::states::not_handled(state),
        }
    }

    /// Runs the VM until it stops: starts the vCPUs, then serves signals, the API and the
    /// user's quit key on this thread.
    pub fn run(
        self,
        signals: &File,
        stdin_quit: &EventFd,
        api: Option<&ApiServer>,
        config: &mut VmConfig,
    ) -> Result<VmExit, VmmError> {
        let exit_counters = self.vcpus.counters();
        self.vcpus.start()?;

        const EXIT: u64 = 1;
        const SIGNAL: u64 = 3;
        const QUIT: u64 = 4;
        const API: u64 = 5;
        const EJECTED: u64 = 6;
        let epoll_err = |e: std::io::Error| VmmError::Setup(format!("epoll: {e}"));
        let mut events = EventLoop::new().map_err(epoll_err)?;
        events
            .add(self.ctl.exit_evt.as_raw_fd(), EXIT)
            .map_err(epoll_err)?;
        events.add(signals.as_raw_fd(), SIGNAL).map_err(epoll_err)?;
        events
            .add(stdin_quit.as_raw_fd(), QUIT)
            .map_err(epoll_err)?;
        if let Some(a) = api {
            events.add(a.event_fd(), API).map_err(epoll_err)?;
        }
        if let Some(hp) = &self.pci_hotplug {
            events.add(hp.ejected_fd(), EJECTED).map_err(epoll_err)?;
        }
        // Where each PCI function sits, for snapshots and migrations to rebuild it there.
        if let Some(p) = &self.pci {
            config.pci_slots = p.slots();
        }
        let mut button_deadline: Option<Instant> = None;
        while !self.ctl.stopping() {
            if button_deadline.is_some_and(|d| Instant::now() >= d) {
                self.ctl
                    .request_exit(VmExit::ShutdownTimeout(self.shutdown_timeout.as_secs()));
            }
            // Asleep until something happens: an idle VM wakes this thread for nothing. The
            // one timer is the deadline the power button gives the guest to power off.
            let timeout = button_deadline
                .map(|d| d.saturating_duration_since(Instant::now()) + Duration::from_millis(1));
            let ready = events.wait(timeout).map_err(epoll_err)?;
            for token in ready.iter() {
                match token {
                    SIGNAL => {
                        let signo = crate::signals::read_signal(signals);
                        // Firecracker's dialect, or no time to power off: SIGTERM stops now.
                        let at_once =
                            crate::personality::firecracker() || self.shutdown_timeout.is_zero();
                        if signo == libc::SIGTERM && button_deadline.is_none() && !at_once {
                            // First SIGTERM: ask the guest to shut down, as a power button.
                            self.press_power_button(&mut button_deadline);
                            crate::report!(
                                crate::systemd::NOTICE,
                                "tern: SIGTERM: pressed the power button; the guest has {} s to power off (SIGTERM again or SIGINT stops it now)",
                                self.shutdown_timeout.as_secs()
                            );
                        } else {
                            self.ctl.request_exit(VmExit::Signal(signo));
                        }
                    }
                    QUIT => self.ctl.request_exit(VmExit::UserQuit),
                    EJECTED => self.finish_unplugs(config),
                    API => {
                        for req in api.map(ApiServer::take).unwrap_or_default() {
                            let r = self.api_request(
                                &req.action,
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
        }

        // Stop every vCPU: the stop flag is set; kick each out of KVM_RUN until it returns.
        self.vcpus.stop();
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
                crate::report!(
                    crate::systemd::WARNING,
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
