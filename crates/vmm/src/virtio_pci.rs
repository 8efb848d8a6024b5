//! virtio devices on PCI: the root complex (configuration through ports 0xcf8/0xcfc and
//! ECAM), each device a virtio-pci function whose BARs go on the MMIO bus, whose queue
//! notifications become ioeventfds and whose MSI-X vectors become KVM GSIs with irqfds; INTx,
//! for drivers without MSI-X, through resampling irqfds.

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::EventFd;

use devices::pci::root::{ECAM_BUS_SIZE, PCI_CONFIG_IO_BASE, PCI_CONFIG_IO_LEN};
use devices::pci::{HostBridgeAcpi, MsiRouting, PciConfigIo, PciConfigMmio, PciRoot, PciWindows};
use lifecycle::event_loop::EventLoop;
use virtio::transport::pci::{IntxLine, VirtioPciDevice};
use virtio::{VirtioDevice, VmMemory};

use crate::device_manager::DeviceManager;
use crate::error::VmmError;
use crate::interrupts::{GsiRouting, MsiMessage, MsiVector};
use crate::virtio_devices::check_ids;

fn setup(e: impl std::fmt::Display) -> VmmError {
    VmmError::Setup(e.to_string())
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
