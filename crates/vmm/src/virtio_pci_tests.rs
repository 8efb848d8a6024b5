//! The BAR moves of `virtio_pci`, against real KVM.

use devices::pci::PciBdf;

use crate::component_tests::{built_vm, kvm_or_skip, scratch_dir};

/// A BAR the guest moves answers at its new address and no longer at the old one, and the
/// queue notification ioeventfds inside it move along (KVM refuses a second registration
/// of the same eventfd at the same address, and accepts one where it no longer is).
#[test]
fn a_moved_bar_answers_where_the_guest_put_it_with_its_ioeventfds() {
    let test = "a_moved_bar_answers_where_the_guest_put_it_with_its_ioeventfds";
    if kvm_or_skip(test).is_none() {
        return;
    }
    let dir = scratch_dir("barmove");
    let vm = built_vm(&dir, "pci");
    let bus = vm.pci.as_ref().expect("a PCI VM has its bus");
    let slot = bus.slot_of("disk0").expect("disk0 is on the bus");
    let bdf = PciBdf::new(0, slot, 0);
    let (old, size, notifies) = {
        let fns = super::lock(&bus.functions);
        let f = &fns[&slot];
        let b = f.bars.iter().find(|b| b.index == 0).expect("BAR 0");
        let n: Vec<(u64, vmm_sys_util::eventfd::EventFd)> = f
            .notifies
            .iter()
            .map(|n| (n.addr.unwrap(), n.event.try_clone().unwrap()))
            .collect();
        (b.addr, b.size, n)
    };
    assert!(!notifies.is_empty());
    let read_at = |addr: u64| {
        let mut b = [0u8; 4];
        let hit = bus.window.read().unwrap().read(addr, &mut b);
        (hit, u32::from_le_bytes(b))
    };
    // The common configuration's device_feature_select reads back what was written.
    assert!(bus.window.read().unwrap().write(old, &7u32.to_le_bytes()));
    assert_eq!(read_at(old), (true, 7));
    // The guest moves BAR 0 (64-bit: low then high dword) to the top of the window.
    let new = (arch::layout::PCI_MMIO32_END - size) & !(size - 1);
    assert_ne!(new, old);
    {
        let mut root = super::lock(&bus.root);
        root.config_write(bdf, 0x10, &(new as u32 | 0x4).to_le_bytes());
        root.config_write(bdf, 0x14, &((new >> 32) as u32).to_le_bytes());
    }
    assert_eq!(
        read_at(new),
        (true, 7),
        "the BAR answers at its new address"
    );
    assert!(!read_at(old).0, "nothing answers at the old one");
    // Outside the window (over the IOAPIC): nothing answers and no notification is placed
    // there; moved back inside, it answers again.
    let outside = 0xfec0_0000u64;
    let move_to = |addr: u64| {
        let mut root = super::lock(&bus.root);
        root.config_write(bdf, 0x10, &(addr as u32 | 0x4).to_le_bytes());
        root.config_write(bdf, 0x14, &((addr >> 32) as u32).to_le_bytes());
    };
    move_to(outside);
    assert!(!read_at(new).0 && !read_at(outside).0);
    for (addr, evt) in &notifies {
        let at = kvm_ioctls::IoEventAddress::Mmio(addr - old + outside);
        bus.vm
            .register_ioevent(evt, &at, kvm_ioctls::NoDatamatch)
            .expect("no notification registered outside the window");
        bus.vm
            .unregister_ioevent(evt, &at, kvm_ioctls::NoDatamatch)
            .unwrap();
    }
    move_to(new);
    assert_eq!(read_at(new), (true, 7));
    for (addr, evt) in &notifies {
        let moved = addr - old + new;
        let at = |a: u64| kvm_ioctls::IoEventAddress::Mmio(a);
        assert!(
            bus.vm
                .register_ioevent(evt, &at(moved), kvm_ioctls::NoDatamatch)
                .is_err(),
            "the notification is registered at {moved:#x}"
        );
        bus.vm
            .register_ioevent(evt, &at(*addr), kvm_ioctls::NoDatamatch)
            .expect("the old address is free");
        bus.vm
            .unregister_ioevent(evt, &at(*addr), kvm_ioctls::NoDatamatch)
            .unwrap();
    }
    drop(vm);
    std::fs::remove_dir_all(&dir).ok();
}
