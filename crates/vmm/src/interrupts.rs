//! KVM interrupt routing for message-signalled interrupts.
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole routing table, so tern keeps it: the default
//! entries KVM creates with the in-kernel irqchip (GSIs 0-15 to the PIC and the IOAPIC,
//! 16-23 to the IOAPIC) plus one MSI entry per allocated vector (GSI 24 and up). Each MSI
//! vector has an eventfd registered as an irqfd on its GSI: a device signals the guest by
//! writing the eventfd, and KVM injects the message without involving a vCPU thread.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip,
    kvm_irq_routing_msi, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use arch::layout::MSI_FIRST_GSI;

/// Routing errors.
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    /// No GSIs left.
    #[error("no free GSI for another MSI vector")]
    Exhausted,
    /// A KVM call failed.
    #[error("{0}: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    /// The routing table could not be built.
    #[error("cannot build the KVM routing table")]
    Table,
    /// An eventfd could not be created.
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
}

/// Most GSIs KVM routes on x86 (KVM_MAX_IRQ_ROUTES is 4096).
const MAX_GSI: u32 = 4096;

fn irqchip_entry(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            irqchip: kvm_irq_routing_irqchip { irqchip: chip, pin },
        },
        ..Default::default()
    }
}

/// The routes KVM installs by default with an in-kernel irqchip.
pub fn default_routes() -> Vec<kvm_irq_routing_entry> {
    let mut v = Vec::new();
    for gsi in 0..16u32 {
        let chip = if gsi < 8 {
            KVM_IRQCHIP_PIC_MASTER
        } else {
            KVM_IRQCHIP_PIC_SLAVE
        };
        v.push(irqchip_entry(gsi, chip, gsi % 8));
    }
    for gsi in 0..24u32 {
        v.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    v
}

/// An MSI message: address and data as the guest programmed them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address.
    pub address: u64,
    /// Message data.
    pub data: u32,
}

fn msi_entry(gsi: u32, m: MsiMessage) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            msi: kvm_irq_routing_msi {
                address_lo: m.address as u32,
                address_hi: (m.address >> 32) as u32,
                data: m.data,
                ..Default::default()
            },
        },
        ..Default::default()
    }
}

struct Inner {
    next_gsi: u32,
    /// GSIs given back by removed devices, to reuse.
    free: Vec<u32>,
    msi: BTreeMap<u32, MsiMessage>,
}

/// The VM's routing table.
pub struct GsiRouting {
    vm: Arc<VmFd>,
    inner: Mutex<Inner>,
}

/// One allocated MSI vector: its GSI and the irqfd that fires it.
pub struct MsiVector {
    /// The GSI KVM routes.
    pub gsi: u32,
    /// Writing 1 here injects the message (once routed).
    pub irqfd: EventFd,
}

impl GsiRouting {
    /// Routing for `vm`, starting with KVM's defaults.
    pub fn new(vm: Arc<VmFd>) -> Self {
        GsiRouting {
            vm,
            inner: Mutex::new(Inner {
                next_gsi: MSI_FIRST_GSI,
                free: Vec::new(),
                msi: BTreeMap::new(),
            }),
        }
    }

    /// Allocates a GSI for an MSI vector and registers its irqfd. Until [`set`](Self::set)
    /// gives it a message, firing it does nothing.
    pub fn allocate(&self) -> Result<MsiVector, RoutingError> {
        let gsi = {
            let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            match g.free.pop() {
                Some(gsi) => gsi,
                None if g.next_gsi >= MAX_GSI => return Err(RoutingError::Exhausted),
                None => {
                    g.next_gsi += 1;
                    g.next_gsi - 1
                }
            }
        };
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(RoutingError::EventFd)?;
        self.vm
            .register_irqfd(&irqfd, gsi)
            .map_err(|e| RoutingError::Kvm("register irqfd", e))?;
        Ok(MsiVector { gsi, irqfd })
    }

    /// Gives back a vector of a removed device: its irqfd and route go, its GSI is reused.
    pub fn release(&self, v: MsiVector) {
        if let Err(e) = self.vm.unregister_irqfd(&v.irqfd, v.gsi) {
            tracing::warn!("GSI {}: cannot unregister its irqfd: {e}", v.gsi);
        }
        if let Err(e) = self.set(v.gsi, None) {
            tracing::warn!("GSI {}: cannot remove its route: {e}", v.gsi);
        }
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .free
            .push(v.gsi);
    }

    /// Routes `gsi` to `msg`, or removes its route (masked or disabled vector).
    pub fn set(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), RoutingError> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let changed = match msg {
            Some(m) => g.msi.insert(gsi, m) != Some(m),
            None => g.msi.remove(&gsi).is_some(),
        };
        if !changed {
            return Ok(());
        }
        let mut entries = default_routes();
        entries.extend(g.msi.iter().map(|(gsi, m)| msi_entry(*gsi, *m)));
        let table = KvmIrqRouting::from_entries(&entries).map_err(|_| RoutingError::Table)?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(|e| RoutingError::Kvm("set GSI routing", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_match_kvm() {
        let r = default_routes();
        assert_eq!(r.len(), 16 + 24);
        // GSI 4 (COM1) goes to PIC master pin 4 and IOAPIC pin 4.
        let com1: Vec<_> = r.iter().filter(|e| e.gsi == 4).collect();
        assert_eq!(com1.len(), 2);
        let chip = |e: &kvm_irq_routing_entry| {
            // SAFETY: these default routes are all irqchip entries (type
            // KVM_IRQ_ROUTING_IRQCHIP), which carry the irqchip member of the union.
            unsafe { (e.u.irqchip.irqchip, e.u.irqchip.pin) }
        };
        assert!(r.iter().all(|e| e.type_ == KVM_IRQ_ROUTING_IRQCHIP));
        let chips: Vec<(u32, u32)> = com1.iter().map(|e| chip(e)).collect();
        assert!(chips.contains(&(KVM_IRQCHIP_PIC_MASTER, 4)));
        assert!(chips.contains(&(KVM_IRQCHIP_IOAPIC, 4)));
        // GSI 12 goes to the slave PIC, pin 4.
        assert!(r
            .iter()
            .any(|e| e.gsi == 12 && chip(e) == (KVM_IRQCHIP_PIC_SLAVE, 4)));
        assert!(r.iter().all(|e| e.gsi < MSI_FIRST_GSI));
    }

    #[test]
    fn msi_entry_splits_the_address() {
        let e = msi_entry(
            30,
            MsiMessage {
                address: 0x1_fee0_1000,
                data: 0x4041,
            },
        );
        assert_eq!(e.type_, KVM_IRQ_ROUTING_MSI);
        // SAFETY: MSI entries carry the msi member of the union.
        let m = unsafe { e.u.msi };
        assert_eq!(
            (m.address_lo, m.address_hi, m.data),
            (0xfee0_1000, 1, 0x4041)
        );
    }
}
