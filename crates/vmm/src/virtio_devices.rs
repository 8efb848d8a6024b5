//! Creating the VM's virtio devices from its config, and attaching them through virtio-mmio:
//! their register windows on the MMIO bus, queue notifications as KVM ioeventfds (the vCPU
//! thread never runs device code) and interrupts as irqfds. PCI is the `virtio_pci` module.

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::EventFd;

use arch::layout::{VIRTIO_MMIO_FIRST_GSI, VIRTIO_MMIO_MAX, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START};
use block::{Disk, DiskOptions, EngineKind, ImageFormat};
use net::Tap;
use virtio::devices::{
    Balloon, BalloonHandle, BalloonOptions, Block, BlockOptions, Console, ConsoleInput, Limits,
    MemHandle, MemOptions, Net, NetOptions, Rng, VirtioMem,
};
use virtio::transport::mmio::{MmioSlot, MmioTransport};
use virtio::{VirtioDevice, VmMemory};

use crate::config::{CharBackend, DiskCache, DiskConfig, DiskFormat, DiskIo, NetConfig, VmConfig};
use crate::device_manager::DeviceManager;
pub use crate::device_set::{DeviceSet, DeviceStats};
use crate::error::setup;
use crate::error::VmmError;

/// The virtio devices a config asks for, not yet attached.
pub struct VirtioDevices {
    /// The devices, in attach order.
    pub devices: Vec<Box<dyn VirtioDevice>>,
    /// Where the virtio-console takes its input, when it reads stdin.
    pub console_input: Option<ConsoleInput>,
    /// The virtio-console's output, to wait for at the VM's end.
    pub console_output: Option<devices::serial::OutputHandle>,
    /// The disks and interfaces as the VMM keeps them.
    pub set: DeviceSet,
    /// The balloon's handle, when the VM has one.
    pub balloon: Option<BalloonHandle>,
    /// The virtio-mem device's handle, when the VM has hotpluggable memory.
    pub mem: Option<MemHandle>,
}

/// Creates the devices `config` asks for; the disks' images are locked when `lock_disks` (a VM
/// migrating in takes its locks at the switch-over).
pub fn create(
    config: &VmConfig,
    lock_disks: bool,
    ram: &Arc<crate::memory::GuestRam>,
) -> Result<VirtioDevices, VmmError> {
    let mut set = DeviceSet::default();
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    let mut console_input = None;
    let mut console_output = None;
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
    for ((i, d), id) in config.disks.iter().enumerate().zip(config.disk_ids()) {
        let blk = open_disk(&format!("tern-disk{i}"), d, lock_disks)?;
        devices.push(Box::new(set.add_disk(&id, d, blk)));
    }
    for ((i, n), id) in config.nets.iter().enumerate().zip(config.net_ids()) {
        let net = open_net(i, n)?;
        devices.push(Box::new(set.add_net(&id, net)));
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
        // Its first size, which the guest's driver reads as it comes up (a restore then
        // brings back the snapshot's).
        if let Some(size) = b.size {
            let pages = u32::try_from(size.0 / 4096).unwrap_or(u32::MAX);
            dev.handle()
                .set_target(pages)
                .map_err(|e| setup(format!("virtio-balloon size {size}: {e}")))?;
        }
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
    if let Some(v) = &config.vsock {
        let dev = virtio::devices::Vsock::new(u64::from(v.cid), &v.socket)
            .map_err(|e| setup(format!("virtio-vsock socket {}: {e}", v.socket.display())))?;
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
        set,
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
    for (d, id) in config.disks.iter().zip(config.disk_ids()) {
        names.push(format!("virtio-blk {id} ({})", d.path.display()));
    }
    for (n, id) in config.nets.iter().zip(config.net_ids()) {
        names.push(format!("virtio-net {id} (TAP {})", n.tap));
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
    if let Some(v) = &config.vsock {
        names.push(format!(
            "virtio-vsock (CID {}, {})",
            v.cid,
            v.socket.display()
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
    ids.extend(config.disk_ids());
    ids.extend(config.net_ids());
    if config.balloon.is_some() {
        ids.push("virtio-balloon".to_string());
    }
    if config.hotplug_memory() > 0 {
        ids.push("virtio-mem".to_string());
    }
    if config.vsock.is_some() {
        ids.push("virtio-vsock".to_string());
    }
    ids
}

/// Opens disk `d` (its locks taken when `lock`) and wraps it in a virtio-blk device whose
/// serial is `serial` unless `d` names one; returns it with the image's locks.
pub(crate) fn open_disk(
    serial: &str,
    d: &DiskConfig,
    lock: bool,
) -> Result<(Block, Vec<block::ImageLock>), VmmError> {
    let (disk, locks) = open_image(d, lock)?;
    let engine = match d.io {
        DiskIo::Auto | DiskIo::IoUring => EngineKind::IoUring,
        DiskIo::Sync => EngineKind::Sync,
    };
    let serial = d.serial.clone().unwrap_or_else(|| serial.to_string());
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

/// Opens disk `d`'s image (its locks taken when `lock`); returns it with the image's locks.
pub(crate) fn open_image(
    d: &DiskConfig,
    lock: bool,
) -> Result<(Disk, Vec<block::ImageLock>), VmmError> {
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
        crate::report!(crate::systemd::WARNING, "tern: warning: {w}");
    }
    // An empty image is a drive without a medium (Kata's placeholder drives are empty files
    // until another image is put behind them); a partial sector is a mistake.
    if disk.size() > 0 && disk.size() < 512 {
        return Err(setup(format!(
            "disk image {} is smaller than one 512-byte sector",
            d.path.display()
        )));
    }
    Ok((disk, locks))
}

/// Opens (or creates) the TAP of interface `i` and wraps it in a virtio-net device.
pub(crate) fn open_net(i: usize, n: &NetConfig) -> Result<Net, VmmError> {
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
pub(crate) fn check_ids(
    devices: &[Box<dyn VirtioDevice>],
    ids: &[(String, String)],
) -> Result<(), VmmError> {
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
