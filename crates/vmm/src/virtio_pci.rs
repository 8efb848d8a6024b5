//! virtio devices on PCI: the root complex (configuration through ports 0xcf8/0xcfc and
//! ECAM), each device a virtio-pci function whose BARs go on the MMIO bus, whose queue
//! notifications become ioeventfds and whose MSI-X vectors become KVM GSIs with irqfds; INTx,
//! for drivers without MSI-X, through resampling irqfds.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, RwLock};

use devices::pci::{BarKind, BarRelocation};
use devices::{Bus, BusDevice};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::EventFd;

use devices::pci::root::{ECAM_BUS_SIZE, PCI_CONFIG_IO_BASE, PCI_CONFIG_IO_LEN};
use devices::pci::{HostBridgeAcpi, MsiRouting, PciConfigIo, PciConfigMmio, PciRoot, PciWindows};
use virtio::transport::pci::VirtioPciDevice;
use virtio::{VirtioDevice, VmMemory};

use crate::device_manager::DeviceManager;
use crate::error::VmmError;
use crate::interrupts::{GsiRouting, MsiMessage, MsiVector};
use crate::virtio_devices::check_ids;

/// One PCI function's MSI-X vectors, each a KVM GSI with an irqfd (none once the function
/// is unplugged: they went back to the routing table).
struct PciMsi {
    routing: Arc<GsiRouting>,
    vectors: Mutex<Vec<MsiVector>>,
}

impl PciMsi {
    /// Gives the vectors back (the function was unplugged); later triggers do nothing.
    fn release(&self) {
        let vectors = std::mem::take(&mut *lock(&self.vectors));
        for v in vectors {
            self.routing.release(v);
        }
    }
}

impl MsiRouting for PciMsi {
    fn update(&self, vector: u16, msg: Option<devices::pci::MsiMessage>) {
        let vectors = lock(&self.vectors);
        let Some(v) = vectors.get(usize::from(vector)) else {
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
        match lock(&self.vectors).get(usize::from(vector)) {
            Some(v) => v.irqfd.write(1),
            None => Ok(()),
        }
    }
}

use crate::error::setup;
use crate::intx::{IntxParts, IntxResampler, KvmIntx};
use crate::sync::lock;

/// A BAR as the VMM keeps it: where it answers in the BAR window, and what answers.
struct Bar {
    index: u8,
    addr: u64,
    size: u64,
    dev: Arc<Mutex<dyn BusDevice>>,
}

/// One virtio-pci function on the bus.
struct Function {
    id: String,
    dev: Arc<Mutex<VirtioPciDevice>>,
    msi: Arc<PciMsi>,
    bars: Vec<Bar>,
    /// Each queue notification register.
    notifies: Vec<Notify>,
    /// Its INTA#: the GSI, the line (a resampling irqfd) and its token in the resampler.
    intx: Option<(u32, Arc<KvmIntx>, u64)>,
}

/// A queue notification register: where it is in its BAR, and where it is registered with KVM
/// as an ioeventfd (None while its BAR cannot answer).
struct Notify {
    bar: u8,
    offset: u64,
    addr: Option<u64>,
    event: EventFd,
}

/// The functions by slot, shared with the BAR move handler.
type Functions = Arc<Mutex<BTreeMap<u8, Function>>>;

/// The VM's PCI bus while the guest runs: the root complex, the window of the MMIO bus where
/// BARs answer (the 32-bit PCI window, a bus of its own so that BARs can move and come and
/// go), each function's BARs, MSI-X vectors and queue notifications. Functions are plugged in
/// at build and by hotplug ([`plug`](Self::plug)), and taken out by hot unplug
/// ([`unplug`](Self::unplug)).
///
/// **BAR moves.** The guest may place BARs where it likes within the window; Linux does so for
/// every hotplugged function. Each move is followed at once, on the vCPU thread that wrote the
/// BAR: the BAR's range moves in the window, and the queue notification ioeventfds inside it
/// are registered again at their new addresses (a notification written meanwhile still
/// reaches the device through the BAR's MMIO handler).
pub struct PciBus {
    vm: Arc<VmFd>,
    mem: VmMemory,
    routing: Arc<GsiRouting>,
    root: Arc<Mutex<PciRoot>>,
    window: Arc<RwLock<Bus>>,
    functions: Functions,
    intx: IntxResampler,
}

/// What [`PciBus::plug`] returns: the function's slot and its transport (the component).
pub struct Plugged {
    /// The slot (device number on bus 0).
    pub slot: u8,
    /// The virtio-pci transport.
    pub dev: Arc<Mutex<VirtioPciDevice>>,
}

/// Where a VM's PCI functions go.
pub struct PciLayout {
    /// The 32-bit BAR window.
    pub mmio32: Range<u64>,
    /// The window above 4 GiB the firmware may move 64-bit BARs to.
    pub mmio64: Option<Range<u64>>,
    /// For a UEFI VM: the PC chipset identity OVMF needs, with its PM block at this port
    /// ([`PciRoot::set_pc_identity`]).
    pub pc_identity: Option<u16>,
}

impl PciBus {
    /// The root complex (config through ports 0xcf8/0xcfc and ECAM) as device `pci-root` of
    /// `dm`, with the BAR window on the MMIO bus; no functions yet.
    fn new(
        vm: &Arc<VmFd>,
        mem: &VmMemory,
        routing: &Arc<GsiRouting>,
        dm: &mut DeviceManager,
        mmio32: Range<u64>,
        mmio64: Option<Range<u64>>,
    ) -> Result<Self, VmmError> {
        // tern places every BAR in the 32-bit window; a 64-bit window is where the firmware
        // may move them (it takes them out of the 32-bit window as it goes: were tern to start
        // them where the firmware puts others, a BAR would land on another one's range).
        let windows = PciWindows {
            mmio32: mmio32.clone(),
            mmio64: None,
            io: None,
        };
        let root = Arc::new(Mutex::new(
            PciRoot::new(&windows).map_err(|e| setup(format!("PCI: {e}")))?,
        ));
        let window = Arc::new(RwLock::new(Bus::new()));
        let functions: Functions = Arc::default();
        {
            let (vm, window, functions) = (vm.clone(), window.clone(), functions.clone());
            let ranges: Vec<Range<u64>> = std::iter::once(mmio32.clone())
                .chain(mmio64.clone())
                .collect();
            lock(&root).set_relocation_notifier(Box::new(move |r| {
                follow_bar_move(&vm, (&window, &ranges), &functions, r)
            }));
        }
        const ROOT: &str = "pci-root";
        dm.describe(ROOT, "the PCI root complex").acpi = Some(Box::new(HostBridgeAcpi {
            last_bus: (arch::layout::PCI_ECAM_BUSES - 1) as u8,
            mmio32: (mmio32.start, mmio32.end),
            mmio64: mmio64.as_ref().map(|r| (r.start, r.end)),
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
        // One bus for both windows: its addresses are absolute.
        for r in std::iter::once(&mmio32).chain(mmio64.as_ref()) {
            dm.add_mmio_window(ROOT, window.clone(), r.start, r.end - r.start)?;
        }
        Ok(PciBus {
            vm: vm.clone(),
            mem: mem.clone(),
            routing: routing.clone(),
            root,
            window,
            functions,
            intx: IntxResampler::start()?,
        })
    }

    /// Plugs `dev` in as virtio-pci function `id` at `slot` (the first free one when None),
    /// with MSI-X and INTA# (a resampling irqfd on the slot's GSI, for drivers that leave
    /// MSI-X off); its BARs answer in the window and its queue notifications are ioeventfds.
    pub(crate) fn plug(
        &self,
        id: &str,
        dev: Box<dyn VirtioDevice>,
        slot: Option<u8>,
    ) -> Result<Plugged, VmmError> {
        let nvec = dev.queue_max_sizes().len() + 1;
        let mut vectors = Vec::with_capacity(nvec);
        for _ in 0..nvec {
            match self.routing.allocate() {
                Ok(v) => vectors.push(v),
                Err(e) => {
                    vectors.into_iter().for_each(|v| self.routing.release(v));
                    return Err(setup(format!("MSI-X: {e}")));
                }
            }
        }
        let msi = Arc::new(PciMsi {
            routing: self.routing.clone(),
            vectors: Mutex::new(vectors),
        });
        let vpci = match VirtioPciDevice::new(self.mem.clone(), dev, msi.clone()) {
            Ok(v) => Arc::new(Mutex::new(v)),
            Err(e) => {
                msi.release();
                return Err(setup(format!("virtio-pci: {e}")));
            }
        };
        let mut root = lock(&self.root);
        let attached = match slot {
            Some(s) => root.attach_at(s, vpci.clone()),
            None => root.attach(vpci.clone()),
        };
        let bdf = match attached {
            Ok(b) => b,
            Err(e) => {
                msi.release();
                return Err(setup(format!("PCI: {e}")));
            }
        };
        let mut f = Function {
            id: id.to_string(),
            dev: vpci.clone(),
            msi,
            bars: Vec::new(),
            notifies: Vec::new(),
            intx: None,
        };
        let result = self.wire(&root, bdf, &mut f);
        drop(root);
        if let Err(e) = result {
            self.take_down(bdf.device, f);
            return Err(e);
        }
        lock(&self.functions).insert(bdf.device, f);
        Ok(Plugged {
            slot: bdf.device,
            dev: vpci,
        })
    }

    /// BARs into the window, notifications as ioeventfds, INTA# through the resampler.
    fn wire(
        &self,
        root: &PciRoot,
        bdf: devices::pci::PciBdf,
        f: &mut Function,
    ) -> Result<(), VmmError> {
        for (bar, busdev) in root.bar_bus_devices(bdf) {
            self.window
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(busdev.clone(), bar.addr, bar.size)
                .map_err(setup)?;
            f.bars.push(Bar {
                index: bar.index,
                addr: bar.addr,
                size: bar.size,
                dev: busdev,
            });
        }
        let notifies = lock(&f.dev)
            .queue_notify_events()
            .map_err(|e| setup(format!("virtio-pci notify: {e}")))?;
        for n in notifies {
            let Some(bar) = f
                .bars
                .iter()
                .find(|b| (b.addr..b.addr + b.size).contains(&n.addr))
            else {
                return Err(setup(format!(
                    "virtio-pci: queue {} notifies outside its BARs",
                    n.queue
                )));
            };
            self.vm
                .register_ioevent(&n.event, &IoEventAddress::Mmio(n.addr), NoDatamatch)
                .map_err(|e| setup(format!("virtio-pci ioeventfd: {e}")))?;
            f.notifies.push(Notify {
                bar: bar.index,
                offset: n.addr - bar.addr,
                addr: Some(n.addr),
                event: n.event,
            });
        }
        // INTA#, for drivers that do not enable MSI-X.
        let gsi = arch::layout::pci_intx_gsi(bdf.device);
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| setup(format!("eventfd: {e}")))?;
        let resample =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| setup(format!("eventfd: {e}")))?;
        self.vm
            .register_irqfd_with_resample(&irqfd, &resample, gsi)
            .map_err(|e| setup(format!("INTx irqfd on GSI {gsi}: {e}")))?;
        let line = Arc::new(KvmIntx { irqfd });
        let d = lock(&f.dev);
        d.set_intx(line.clone());
        let token = self.intx.add(IntxParts {
            resample,
            line: line.clone(),
            pending: d.intx_pending(),
        });
        f.intx = Some((gsi, line, token));
        Ok(())
    }

    /// Undoes what [`plug`](Self::plug) did for `f` at `slot`.
    fn take_down(&self, slot: u8, f: Function) {
        {
            let mut w = self.window.write().unwrap_or_else(|p| p.into_inner());
            for b in &f.bars {
                if w.holds_at(b.addr, &b.dev) {
                    w.remove(b.addr);
                }
            }
        }
        for n in &f.notifies {
            if let Some(addr) = n.addr {
                let _ =
                    self.vm
                        .unregister_ioevent(&n.event, &IoEventAddress::Mmio(addr), NoDatamatch);
            }
        }
        if let Some((gsi, line, token)) = &f.intx {
            self.intx.remove(*token);
            let _ = self.vm.unregister_irqfd(&line.irqfd, *gsi);
        }
        f.msi.release();
        lock(&self.root).detach(slot);
    }

    /// Takes function `id` off the bus (after the guest ejected it): its slot, BAR space,
    /// MSI-X vectors and ioeventfds are free again. Returns its transport, or None when there
    /// is no such function.
    pub fn unplug(&self, id: &str) -> Option<Arc<Mutex<VirtioPciDevice>>> {
        let (slot, f) = {
            let mut fns = lock(&self.functions);
            let slot = *fns.iter().find(|(_, f)| f.id == id)?.0;
            (slot, fns.remove(&slot)?)
        };
        let dev = f.dev.clone();
        self.take_down(slot, f);
        Some(dev)
    }

    /// The slot of function `id`.
    pub fn slot_of(&self, id: &str) -> Option<u8> {
        lock(&self.functions)
            .iter()
            .find(|(_, f)| f.id == id)
            .map(|(s, _)| *s)
    }

    /// The id of the function at `slot`.
    pub fn id_at(&self, slot: u8) -> Option<String> {
        lock(&self.functions).get(&slot).map(|f| f.id.clone())
    }
}

/// Follows a guest's move of a memory BAR (see [`PciBus`]); runs on the vCPU thread that wrote
/// the BAR, with the root locked.
fn follow_bar_move(
    vm: &VmFd,
    (window, window_ranges): (&RwLock<Bus>, &[Range<u64>]),
    functions: &Mutex<BTreeMap<u8, Function>>,
    r: &BarRelocation,
) {
    if r.kind == BarKind::Io || r.bdf.bus != 0 || r.bdf.function != 0 {
        return;
    }
    let mut fns = lock(functions);
    let Some(f) = fns.get_mut(&r.bdf.device) else {
        return;
    };
    let Some(bar) = f.bars.iter_mut().find(|b| b.index == r.bar) else {
        return;
    };
    let old = bar.addr;
    {
        let mut w = window.write().unwrap_or_else(|p| p.into_inner());
        if w.holds_at(old, &bar.dev) {
            w.remove(old);
        }
        let inside = r.new_addr.checked_add(bar.size).is_some_and(|end| {
            window_ranges
                .iter()
                .any(|w| w.contains(&r.new_addr) && end <= w.end)
        });
        let placed = if inside {
            w.insert(bar.dev.clone(), r.new_addr, bar.size)
                .map_err(|e| e.to_string())
        } else {
            // Outside the window nothing routes to it, and its notifications must not take
            // over addresses of other devices.
            Err("outside the PCI window".to_string())
        };
        match placed {
            Ok(()) => bar.addr = r.new_addr,
            Err(e) => {
                // Not reachable until the guest moves it somewhere free. Placing BARs, firmware
                // passes through such addresses: 0 before it has placed one, and the new low
                // half with the old high half while it rewrites a 64-bit BAR (OVMF does both
                // for every device). Only an address outside the windows after the full move
                // means trouble, and the guest's driver then fails on its own.
                bar.addr = u64::MAX;
                tracing::debug!(
                    "PCI device {:?}: BAR {} moved to {:#x}, where it cannot answer: {e}",
                    r.bdf,
                    r.bar,
                    r.new_addr
                );
            }
        }
    }
    let (index, new) = (bar.index, bar.addr);
    for n in f.notifies.iter_mut().filter(|n| n.bar == index) {
        if let Some(addr) = n.addr.take() {
            let _ = vm.unregister_ioevent(&n.event, &IoEventAddress::Mmio(addr), NoDatamatch);
        }
        if new == u64::MAX {
            continue;
        }
        let moved = new + n.offset;
        match vm.register_ioevent(&n.event, &IoEventAddress::Mmio(moved), NoDatamatch) {
            Ok(()) => n.addr = Some(moved),
            Err(e) => ratelimit::warn_limited!(
                "PCI device {:?}: queue notifications at {moved:#x} go through the BAR handler: {e}",
                r.bdf
            ),
        }
    }
    tracing::debug!(
        "PCI device {:?}: BAR {} moved from {old:#x} to {:#x}",
        r.bdf,
        r.bar,
        r.new_addr
    );
}

/// Adds the PCI root complex (config through ports 0xcf8/0xcfc and ECAM) and plugs each
/// device in as a virtio-pci function with MSI-X and INTx, `ids[i]` (id, name) of `dm`: at the
/// slot `slots` records for its id (a VM rebuilt from a snapshot or a migration), the others
/// in the first free slots, in order. BARs live in `layout.mmio32`, and 64-bit ones also in
/// `layout.mmio64`.
#[allow(clippy::too_many_arguments)]
pub fn attach_pci(
    vm: &Arc<VmFd>,
    mem: &VmMemory,
    routing: &Arc<GsiRouting>,
    dm: &mut DeviceManager,
    devices: Vec<Box<dyn VirtioDevice>>,
    ids: &[(String, String)],
    slots: &BTreeMap<String, u8>,
    layout: PciLayout,
) -> Result<PciBus, VmmError> {
    check_ids(&devices, ids)?;
    let pc = layout.pc_identity;
    let bus = PciBus::new(vm, mem, routing, dm, layout.mmio32, layout.mmio64)?;
    if let Some(pm_base) = pc {
        lock(&bus.root).set_pc_identity(pm_base);
    }
    let mut plugged: Vec<Option<Arc<Mutex<VirtioPciDevice>>>> = ids.iter().map(|_| None).collect();
    let (hinted, rest): (Vec<_>, Vec<_>) = devices
        .into_iter()
        .zip(ids)
        .enumerate()
        .partition(|(_, (_, (id, _)))| slots.contains_key(id));
    for (i, (dev, (id, _))) in hinted.into_iter().chain(rest) {
        plugged[i] = Some(bus.plug(id, dev, slots.get(id).copied())?.dev);
    }
    for ((id, name), dev) in ids.iter().zip(plugged) {
        dm.describe(id, name).component = dev.map(|d| d as crate::components::Shared);
    }
    Ok(bus)
}

impl PciBus {
    /// Each function's slot, by id.
    pub fn slots(&self) -> BTreeMap<String, u8> {
        lock(&self.functions)
            .iter()
            .map(|(s, f)| (f.id.clone(), *s))
            .collect()
    }

    /// Before a restore: puts each function's BARs where the saved configuration space has
    /// them (a guest or its firmware may have moved them), through the root as a guest's BAR
    /// write would, so the window and the notification addresses follow. A section without a
    /// readable configuration space is left to the function's own restore, which checks it.
    pub fn place_bars_as_saved(&self, sections: &[lifecycle::Section]) {
        for (id, slot) in self.slots() {
            let Some(config) = sections.iter().find(|s| s.id == id).and_then(|s| {
                let t = s.state.get("transport")?;
                t.get("pci")?.get("config")?.as_array().cloned()
            }) else {
                continue;
            };
            let bdf = devices::pci::PciBdf::new(0, slot, 0);
            // The six BAR registers.
            for reg in (0x10u16..0x28).step_by(4) {
                let saved: Option<Vec<u8>> = config
                    .get(usize::from(reg)..usize::from(reg) + 4)
                    .and_then(|b| b.iter().map(|v| v.as_u64()?.try_into().ok()).collect());
                let Some(saved) = saved else { break };
                let mut root = lock(&self.root);
                let mut now = [0u8; 4];
                root.config_read(bdf, reg, &mut now);
                if now[..] != saved[..] {
                    root.config_write(bdf, reg, &saved);
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "virtio_pci_tests.rs"]
mod tests;
