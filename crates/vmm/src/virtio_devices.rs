//! Creating the VM's virtio devices from its config and attaching them through the chosen
//! transport: their register windows on the MMIO bus, queue notifications as KVM ioeventfds
//! (the vCPU thread never runs device code) and interrupts as irqfds.

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::EventFd;

use arch::layout::{VIRTIO_MMIO_FIRST_GSI, VIRTIO_MMIO_MAX, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START};
use block::{Disk, DiskOptions, EngineKind, ImageFormat};
use net::Tap;
use virtio::devices::{
    Balloon, BalloonHandle, BalloonOptions, Block, BlockCounters, BlockOptions, Console,
    ConsoleInput, Limits, MemHandle, MemOptions, Net, NetCounters, NetOptions, Rng, VirtioMem,
};
use virtio::transport::mmio::{MmioSlot, MmioTransport};
use virtio::{VirtioDevice, VmMemory};

use crate::config::{CharBackend, DiskCache, DiskConfig, DiskFormat, DiskIo, NetConfig, VmConfig};
use crate::device_manager::DeviceManager;
use crate::error::VmmError;
use crate::interrupts::{GsiRouting, MsiMessage, MsiVector};
use devices::pci::root::{ECAM_BUS_SIZE, PCI_CONFIG_IO_BASE, PCI_CONFIG_IO_LEN};
use devices::pci::{HostBridgeAcpi, MsiRouting, PciConfigIo, PciConfigMmio, PciRoot, PciWindows};
use lifecycle::event_loop::EventLoop;
use virtio::transport::pci::{IntxLine, VirtioPciDevice};

/// The virtio devices a config asks for, not yet attached.
pub struct VirtioDevices {
    /// The devices, in attach order.
    pub devices: Vec<Box<dyn VirtioDevice>>,
    /// Where the virtio-console takes its input, when it reads stdin.
    pub console_input: Option<ConsoleInput>,
    /// The virtio-console's output, to wait for at the VM's end.
    pub console_output: Option<devices::serial::OutputHandle>,
    /// I/O counters of the disks and interfaces, for the API.
    pub stats: Vec<DeviceStats>,
    /// The disks' image locks.
    pub locks: Vec<block::ImageLock>,
    /// Each NIC's TAP and guest MAC, to announce the guest after a migration.
    pub announcers: Vec<(Arc<Tap>, [u8; 6])>,
    /// The balloon's handle, when the VM has one.
    pub balloon: Option<BalloonHandle>,
    /// The virtio-mem device's handle, when the VM has hotpluggable memory.
    pub mem: Option<MemHandle>,
}

/// A device's counters, as the API reports them.
#[derive(Clone)]
pub enum DeviceStats {
    /// A virtio-blk disk.
    Block {
        /// The image.
        path: String,
        /// Its counters.
        counters: Arc<BlockCounters>,
    },
    /// A virtio-net interface.
    Net {
        /// The TAP.
        tap: String,
        /// Its counters.
        counters: Arc<NetCounters>,
    },
}

impl DeviceStats {
    /// The counters as the API reports them.
    pub fn counters(&self) -> ::api::DeviceCounters {
        use std::sync::atomic::Ordering::Relaxed;
        match self {
            DeviceStats::Block { path, counters: c } => ::api::DeviceCounters::Block {
                path: path.clone(),
                read_ops: c.read_ops.load(Relaxed),
                read_bytes: c.read_bytes.load(Relaxed),
                write_ops: c.write_ops.load(Relaxed),
                write_bytes: c.write_bytes.load(Relaxed),
                flush_ops: c.flush_ops.load(Relaxed),
                discard_ops: c.discard_ops.load(Relaxed),
                errors: c.errors.load(Relaxed),
                throttled: c.throttled.load(Relaxed),
            },
            DeviceStats::Net { tap, counters: c } => ::api::DeviceCounters::Net {
                tap: tap.clone(),
                rx_frames: c.rx_frames.load(Relaxed),
                rx_bytes: c.rx_bytes.load(Relaxed),
                rx_dropped: c.rx_dropped.load(Relaxed),
                tx_frames: c.tx_frames.load(Relaxed),
                tx_bytes: c.tx_bytes.load(Relaxed),
                tx_dropped: c.tx_dropped.load(Relaxed),
                link_down: c.link_down.load(Relaxed),
                throttled: c.throttled.load(Relaxed),
            },
        }
    }
}

fn setup(e: impl std::fmt::Display) -> VmmError {
    VmmError::Setup(e.to_string())
}

/// Creates the devices `config` asks for; the disks' images are locked when `lock_disks` (a VM
/// migrating in takes its locks at the switch-over).
pub fn create(
    config: &VmConfig,
    lock_disks: bool,
    ram: &Arc<crate::memory::GuestRam>,
) -> Result<VirtioDevices, VmmError> {
    let mut locks = Vec::new();
    let mut announcers = Vec::new();
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    let mut console_input = None;
    let mut console_output = None;
    let mut stats = Vec::new();
    if config.rng {
        devices.push(Box::new(Rng::new()));
    }
    if let Some(backend) = &config.console {
        // Written by a thread of its own: a sink that blocks (a stdout nobody reads) must not
        // block the device's worker, nor a vCPU resetting the device and waiting for it.
        let sink = crate::console::open_char_sink(backend, "console output file")?
            .and_then(|s| devices::serial::BufferedSink::new(s, "virtio-console"));
        console_output = sink.as_ref().map(|s| s.output());
        let sink = sink.map(|s| Box::new(s) as Box<dyn std::io::Write + Send>);
        let console = Console::new(sink).map_err(|e| setup(format!("virtio-console: {e}")))?;
        if *backend == CharBackend::Stdio {
            console_input = Some(console.input_handle());
        }
        devices.push(Box::new(console));
    }
    for (i, d) in config.disks.iter().enumerate() {
        let (blk, l) = open_disk(i, d, lock_disks)?;
        locks.extend(l);
        stats.push(DeviceStats::Block {
            path: d.path.display().to_string(),
            counters: blk.counters(),
        });
        devices.push(Box::new(blk));
    }
    for (i, n) in config.nets.iter().enumerate() {
        let net = open_net(i, n)?;
        announcers.extend(net.announcer());
        stats.push(DeviceStats::Net {
            tap: net.tap_name().to_string(),
            counters: net.counters(),
        });
        devices.push(Box::new(net));
    }
    let mut balloon = None;
    if let Some(b) = &config.balloon {
        let opts = BalloonOptions {
            deflate_on_oom: b.deflate_on_oom,
            free_page_reporting: b.free_page_reporting,
            stats_interval: std::time::Duration::from_secs(b.stats_s.into()),
        };
        let dev = Balloon::new(opts, config.memory.0, ram.clone())
            .map_err(|e| setup(format!("virtio-balloon: {e}")))?;
        balloon = Some(dev.handle());
        devices.push(Box::new(dev));
    }
    let mut mem = None;
    let hotplug = arch::memory::hotplug_region(config.memory.0, config.hotplug_memory());
    if let Some((addr, size)) = hotplug {
        let opts = MemOptions {
            addr,
            size,
            block_size: crate::config::HOTPLUG_BLOCK_SIZE,
        };
        let dev =
            VirtioMem::new(opts, ram.clone()).map_err(|e| setup(format!("virtio-mem: {e}")))?;
        mem = Some(dev.handle());
        devices.push(Box::new(dev));
    }
    if devices.len() as u64 > VIRTIO_MMIO_MAX {
        return Err(setup(format!(
            "at most {VIRTIO_MMIO_MAX} virtio devices are supported"
        )));
    }
    Ok(VirtioDevices {
        devices,
        console_input,
        console_output,
        stats,
        locks,
        announcers,
        balloon,
        mem,
    })
}

fn image_format(f: DiskFormat) -> ImageFormat {
    match f {
        DiskFormat::Raw => ImageFormat::Raw,
        DiskFormat::Qcow2 => ImageFormat::Qcow2,
    }
}

/// Probes the format of every disk given without one, once, before the VM is first built: the
/// answer is kept in the configuration (`probed_format`) for the VM's reboots and snapshots,
/// so a guest that writes an image header into its raw disk does not change how tern opens it.
/// A disk that cannot be read is left for opening to report.
pub fn probe_disk_formats(config: &mut VmConfig) {
    for d in config.disks.iter_mut() {
        if d.format.is_some() || d.probed_format.is_some() {
            continue;
        }
        if let Ok(f) = block::probe_format(&d.path) {
            d.probed_format = Some(match f {
                ImageFormat::Raw => DiskFormat::Raw,
                ImageFormat::Qcow2 => DiskFormat::Qcow2,
            });
            tracing::info!(
                "disk {}: no format given, probed {f} (give format= to state it)",
                d.path.display()
            );
        }
    }
}

/// What the user calls each device [`create`] makes, in the same order: for messages about
/// one of them.
pub fn device_names(config: &VmConfig) -> Vec<String> {
    let mut names = Vec::new();
    if config.rng {
        names.push("virtio-rng".to_string());
    }
    if config.console.is_some() {
        names.push("virtio-console".to_string());
    }
    for (i, d) in config.disks.iter().enumerate() {
        names.push(format!("virtio-blk disk {i} ({})", d.path.display()));
    }
    for (i, n) in config.nets.iter().enumerate() {
        names.push(format!("virtio-net {i} (TAP {})", n.tap));
    }
    if config.balloon.is_some() {
        names.push("virtio-balloon".to_string());
    }
    if config.hotplug_memory() > 0 {
        names.push(format!(
            "virtio-mem ({} MiB hotpluggable)",
            config.hotplug_memory() >> 20
        ));
    }
    names
}

/// The component id of each device [`create`] makes, in the same order: the key of its state
/// in a snapshot.
pub fn device_ids(config: &VmConfig) -> Vec<String> {
    let mut ids = Vec::new();
    if config.rng {
        ids.push("virtio-rng".to_string());
    }
    if config.console.is_some() {
        ids.push("virtio-console".to_string());
    }
    ids.extend((0..config.disks.len()).map(|i| format!("disk{i}")));
    ids.extend((0..config.nets.len()).map(|i| format!("net{i}")));
    if config.balloon.is_some() {
        ids.push("virtio-balloon".to_string());
    }
    if config.hotplug_memory() > 0 {
        ids.push("virtio-mem".to_string());
    }
    ids
}

/// Opens disk `i` and wraps it in a virtio-blk device.
fn open_disk(
    i: usize,
    d: &DiskConfig,
    lock: bool,
) -> Result<(Block, Vec<block::ImageLock>), VmmError> {
    let opts = DiskOptions {
        path: d.path.clone(),
        format: d.format.map(image_format),
        probed: d.probed_format.map(image_format),
        data_file: d.data_file.clone(),
        read_only: d.readonly,
        direct: d.cache == DiskCache::None,
    };
    let (disk, warning) = if lock {
        Disk::open(&opts)
    } else {
        Disk::open_unlocked(&opts)
    }
    .map_err(setup)?;
    let locks = disk.locks().map_err(setup)?;
    if let Some(w) = warning {
        eprintln!("tern: warning: {w}");
    }
    if disk.size() < 512 {
        return Err(setup(format!(
            "disk image {} is smaller than one 512-byte sector",
            d.path.display()
        )));
    }
    let engine = match d.io {
        DiskIo::Auto | DiskIo::IoUring => EngineKind::IoUring,
        DiskIo::Sync => EngineKind::Sync,
    };
    let serial = d.serial.clone().unwrap_or_else(|| format!("tern-disk{i}"));
    let blk = Block::new(
        Arc::new(disk),
        BlockOptions {
            serial,
            queues: d.queues,
            engine,
            iops: d.iops,
            bandwidth: d.bw,
        },
    );
    Ok((blk, locks))
}

/// Opens (or creates) the TAP of interface `i` and wraps it in a virtio-net device.
fn open_net(i: usize, n: &NetConfig) -> Result<Net, VmmError> {
    let name = if n.tap == "auto" { "tern%d" } else { &n.tap };
    let taps = Tap::open(name, usize::from(n.queues)).map_err(setup)?;
    if n.tap == "auto" {
        tracing::info!("virtio-net {i}: created TAP {}", taps[0].name());
    }
    let mac = n.effective_mac(i);
    Ok(Net::new(
        taps,
        NetOptions {
            mac: mac.0,
            mtu: n.mtu,
            offload: n.offload,
            rx: Limits {
                ops: n.rx_ops,
                bytes: n.rx_bw,
            },
            tx: Limits {
                ops: n.tx_ops,
                bytes: n.tx_bw,
            },
        },
    ))
}

/// Where the `i`-th virtio-mmio device lives.
pub fn mmio_slot(i: usize) -> MmioSlot {
    MmioSlot {
        index: i as u32,
        base: VIRTIO_MMIO_START + i as u64 * VIRTIO_MMIO_SIZE,
        size: VIRTIO_MMIO_SIZE,
        gsi: VIRTIO_MMIO_FIRST_GSI + i as u32,
    }
}

/// Every device has its id and name ([`device_ids`] and [`device_names`] follow [`create`]).
fn check_ids(devices: &[Box<dyn VirtioDevice>], ids: &[(String, String)]) -> Result<(), VmmError> {
    if devices.len() == ids.len() {
        return Ok(());
    }
    Err(setup(format!(
        "{} virtio devices but {} device ids (an internal error)",
        devices.len(),
        ids.len()
    )))
}

/// Attaches each device through virtio-mmio at [`mmio_slot`]`(i)`, as device `ids[i]` (id,
/// name) of `dm`: its register window, its state and its DSDT entry.
pub fn attach_mmio(
    vm: &VmFd,
    mem: &VmMemory,
    dm: &mut DeviceManager,
    devices: Vec<Box<dyn VirtioDevice>>,
    ids: &[(String, String)],
) -> Result<(), VmmError> {
    check_ids(&devices, ids)?;
    for ((i, dev), (id, name)) in devices.into_iter().enumerate().zip(ids) {
        let slot = mmio_slot(i);
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| setup(format!("eventfd: {e}")))?;
        vm.register_irqfd(&irq, slot.gsi)
            .map_err(|e| setup(format!("virtio-mmio irqfd on GSI {}: {e}", slot.gsi)))?;
        let transport = MmioTransport::new(mem.clone(), dev, irq)
            .map_err(|e| setup(format!("virtio-mmio: {e}")))?;
        for (offset, queue, evt) in transport.queue_notify_eventfds() {
            vm.register_ioevent(evt, &IoEventAddress::Mmio(slot.base + offset), queue)
                .map_err(|e| setup(format!("virtio-mmio ioeventfd: {e}")))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        let entry = dm.describe(id, name);
        entry.component = Some(transport.clone());
        entry.acpi = Some(Box::new(slot));
        dm.add_mmio(id, transport, slot.base, slot.size)?;
    }
    Ok(())
}

/// One PCI function's MSI-X vectors, each a KVM GSI with an irqfd.
struct PciMsi {
    routing: Arc<GsiRouting>,
    vectors: Vec<MsiVector>,
}

impl MsiRouting for PciMsi {
    fn update(&self, vector: u16, msg: Option<devices::pci::MsiMessage>) {
        let Some(v) = self.vectors.get(usize::from(vector)) else {
            return;
        };
        let msg = msg.map(|m| MsiMessage {
            address: m.addr,
            data: m.data,
        });
        if let Err(e) = self.routing.set(v.gsi, msg) {
            ratelimit::warn_limited!("MSI-X vector {vector}: {e}");
        }
    }

    fn trigger(&self, vector: u16) -> std::io::Result<()> {
        match self.vectors.get(usize::from(vector)) {
            Some(v) => v.irqfd.write(1),
            None => Ok(()),
        }
    }
}

/// INTx through a KVM irqfd in resample mode.
struct KvmIntx {
    irqfd: EventFd,
}

impl IntxLine for KvmIntx {
    fn assert(&self) -> std::io::Result<()> {
        self.irqfd.write(1)
    }
}

/// Re-raises level-triggered INTx lines that are still pending when the guest acknowledges
/// them (KVM signals the resample eventfd on EOI). One thread for all PCI functions; stopped
/// and joined on drop.
pub struct IntxResampler {
    stop: EventFd,
    thread: Option<std::thread::JoinHandle<()>>,
}

type Pending = Arc<dyn Fn() -> bool + Send + Sync>;

impl IntxResampler {
    fn start(lines: Vec<(EventFd, Arc<KvmIntx>, Pending)>) -> Result<Self, VmmError> {
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| setup(format!("eventfd: {e}")))?;
        let stop2 = stop
            .try_clone()
            .map_err(|e| setup(format!("eventfd: {e}")))?;
        use std::os::fd::AsRawFd;
        let epoll_err = |e: std::io::Error| setup(format!("epoll: {e}"));
        let mut events = EventLoop::new().map_err(epoll_err)?;
        events.add(stop.as_raw_fd(), u64::MAX).map_err(epoll_err)?;
        for (i, (resample, _, _)) in lines.iter().enumerate() {
            events
                .add(resample.as_raw_fd(), i as u64)
                .map_err(epoll_err)?;
        }
        let thread =
            lifecycle::threads::spawn(lifecycle::threads::Role::Vmm, "tern-intx", move || {
                loop {
                    let Ok(ready) = events.wait(None) else {
                        return;
                    };
                    for token in ready.iter() {
                        let Some((resample, line, pending)) = lines.get(token as usize) else {
                            return; // the stop event
                        };
                        let _ = resample.read();
                        if pending() {
                            let _ = line.assert();
                        }
                    }
                }
            })
            .map_err(|e| setup(format!("cannot start the INTx thread: {e}")))?;
        let _ = stop2;
        Ok(IntxResampler {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for IntxResampler {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Adds the PCI root complex (config through ports 0xcf8/0xcfc and ECAM) and attaches each
/// device as a virtio-pci function with MSI-X; BARs go on the MMIO bus, queue notifications
/// become ioeventfds.
pub fn attach_pci(
    vm: &VmFd,
    mem: &VmMemory,
    routing: &Arc<GsiRouting>,
    dm: &mut DeviceManager,
    devices: Vec<Box<dyn VirtioDevice>>,
    ids: &[(String, String)],
) -> Result<IntxResampler, VmmError> {
    let mut intx_lines = Vec::new();
    let windows = PciWindows {
        mmio32: arch::layout::PCI_MMIO32_START..arch::layout::PCI_MMIO32_END,
        mmio64: None,
        io: None,
    };
    let root = Arc::new(Mutex::new(
        PciRoot::new(&windows).map_err(|e| setup(format!("PCI: {e}")))?,
    ));
    root.lock()
        .unwrap_or_else(|p| p.into_inner())
        .set_relocation_notifier(Box::new(|r| {
            ratelimit::warn_limited!(
                "guest moved BAR {} of PCI device {:?} from {:#x} to {:#x}; tern does not follow BAR moves yet",
                r.bar,
                r.bdf,
                r.old_addr,
                r.new_addr
            )
        }));
    const ROOT: &str = "pci-root";
    dm.describe(ROOT, "the PCI root complex").acpi = Some(Box::new(HostBridgeAcpi {
        last_bus: (arch::layout::PCI_ECAM_BUSES - 1) as u8,
        mmio32: (arch::layout::PCI_MMIO32_START, arch::layout::PCI_MMIO32_END),
        intx: (1..32u8)
            .map(|slot| (slot, arch::layout::pci_intx_gsi(slot)))
            .collect(),
    }));
    let config_io = Arc::new(Mutex::new(PciConfigIo::new(root.clone())));
    let entry = dm.describe(ROOT, "the PCI root complex");
    entry.component = Some(config_io.clone());
    // Format-2 snapshots from before the root's state was saved have none.
    entry.optional_in_old_snapshots = true;
    dm.add_pio(ROOT, config_io, PCI_CONFIG_IO_BASE, PCI_CONFIG_IO_LEN)?;
    dm.add_mmio(
        ROOT,
        Arc::new(Mutex::new(PciConfigMmio::new(root.clone()))),
        arch::layout::PCI_ECAM_START,
        ECAM_BUS_SIZE,
    )?;
    check_ids(&devices, ids)?;
    for (dev, (id, name)) in devices.into_iter().zip(ids) {
        let nvec = dev.queue_max_sizes().len() + 1;
        let vectors = (0..nvec)
            .map(|_| routing.allocate())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| setup(format!("MSI-X: {e}")))?;
        let msi = Arc::new(PciMsi {
            routing: routing.clone(),
            vectors,
        });
        let vpci = Arc::new(Mutex::new(
            VirtioPciDevice::new(mem.clone(), dev, msi)
                .map_err(|e| setup(format!("virtio-pci: {e}")))?,
        ));
        dm.describe(id, name).component = Some(vpci.clone());
        let mut r = root.lock().unwrap_or_else(|p| p.into_inner());
        let bdf = r
            .attach(vpci.clone())
            .map_err(|e| setup(format!("PCI: {e}")))?;
        // INTA#, for drivers that do not enable MSI-X.
        let gsi = arch::layout::pci_intx_gsi(bdf.device);
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| setup(format!("eventfd: {e}")))?;
        let resample =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| setup(format!("eventfd: {e}")))?;
        vm.register_irqfd_with_resample(&irqfd, &resample, gsi)
            .map_err(|e| setup(format!("INTx irqfd on GSI {gsi}: {e}")))?;
        let line = Arc::new(KvmIntx { irqfd });
        for (bar, busdev) in r.bar_bus_devices(bdf) {
            dm.add_mmio(id, busdev, bar.addr, bar.size)?;
        }
        drop(r);
        {
            let v = vpci.lock().unwrap_or_else(|p| p.into_inner());
            v.set_intx(line.clone());
            intx_lines.push((resample, line, v.intx_pending()));
        }
        let notifies = vpci
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .queue_notify_events()
            .map_err(|e| setup(format!("virtio-pci notify: {e}")))?;
        for n in notifies {
            vm.register_ioevent(
                &n.event,
                &IoEventAddress::Mmio(n.addr),
                kvm_ioctls::NoDatamatch,
            )
            .map_err(|e| setup(format!("virtio-pci ioeventfd: {e}")))?;
        }
    }
    IntxResampler::start(intx_lines)
}
