//! Boot-time vCPU state: GDT, identity page tables, registers, FPU, MSRs and LAPIC LVTs.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::layout::*;

/// Errors while writing boot state into guest memory.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Guest memory too small or not writable at a fixed boot address.
    #[error("cannot write {what} at guest address {addr:#x}")]
    Write {
        /// What was being written.
        what: &'static str,
        /// Where.
        addr: u64,
    },
}

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// 64-bit long mode, paging on, `rsi` = zero page (Linux 64-bit boot protocol).
    Linux64,
    /// 32-bit protected mode, paging off, `ebx` = `hvm_start_info` (PVH).
    Pvh,
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// Builds a GDT entry from flags, base and limit (the layout the CPU expects).
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << (56 - 24))
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << (48 - 16))
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// Turns a GDT entry back into the `kvm_segment` KVM wants for selector `index`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let limit = ((entry & 0x000f_0000_0000_0000) >> 32) as u32 | (entry & 0xffff) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base: ((entry & 0xff00_0000_0000_0000) >> 32) | ((entry & 0x0000_00ff_ffff_0000) >> 16),
        // With 4 KiB granularity, the limit counts pages: scale it to bytes.
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: if (entry >> 47) & 1 == 0 { 1 } else { 0 },
    }
}

/// The boot GDT: null, code, data, TSS. The code segment is 64-bit for Linux64, 32-bit for PVH.
pub fn boot_gdt(mode: EntryMode) -> [u64; 4] {
    let code = match mode {
        EntryMode::Linux64 => gdt_entry(0xa09b, 0, 0xfffff),
        EntryMode::Pvh => gdt_entry(0xc09b, 0, 0xfffff),
    };
    [
        gdt_entry(0, 0, 0),
        code,
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

/// Writes the GDT, an empty IDT and (for Linux64) identity page tables covering 4 GiB, then
/// fills in `sregs` for `mode`.
pub fn setup_sregs<M: GuestMemory>(
    mem: &M,
    mode: EntryMode,
    sregs: &mut kvm_sregs,
) -> Result<(), RegsError> {
    let gdt = boot_gdt(mode);
    for (i, e) in gdt.iter().enumerate() {
        let addr = BOOT_GDT_START + (i as u64) * 8;
        mem.write_obj(*e, GuestAddress(addr))
            .map_err(|_| RegsError::Write { what: "GDT", addr })?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|_| RegsError::Write {
            what: "IDT",
            addr: BOOT_IDT_START,
        })?;

    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    match mode {
        EntryMode::Linux64 => {
            setup_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        EntryMode::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    Ok(())
}

/// Identity-maps the first 4 GiB with 2 MiB pages: PML4 -> PDPT -> 4 page directories.
pub fn setup_page_tables<M: GuestMemory>(mem: &M) -> Result<(), RegsError> {
    let w = |val: u64, addr: u64| {
        mem.write_obj(val, GuestAddress(addr))
            .map_err(|_| RegsError::Write {
                what: "page tables",
                addr,
            })
    };
    w(PDPTE_START | 0x03, PML4_START)?;
    for pd in 0..4u64 {
        let pd_addr = PDE_START + pd * 0x1000;
        w(pd_addr | 0x03, PDPTE_START + pd * 8)?;
        for i in 0..512u64 {
            // Present, writable, 2 MiB page.
            w(((pd << 30) + (i << 21)) | 0x83, pd_addr + i * 8)?;
        }
    }
    Ok(())
}

/// General-purpose registers of the boot vCPU.
pub fn boot_regs(mode: EntryMode, entry: u64) -> kvm_regs {
    match mode {
        EntryMode::Linux64 => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        },
        EntryMode::Pvh => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rbx: PVH_INFO_START,
            ..Default::default()
        },
    }
}

/// Initial FPU state: x87 control word and MXCSR at their reset values.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSR indices tern sets at boot.
pub mod msr {
    /// IA32_SYSENTER_CS.
    pub const SYSENTER_CS: u32 = 0x174;
    /// IA32_SYSENTER_ESP.
    pub const SYSENTER_ESP: u32 = 0x175;
    /// IA32_SYSENTER_EIP.
    pub const SYSENTER_EIP: u32 = 0x176;
    /// STAR.
    pub const STAR: u32 = 0xc000_0081;
    /// LSTAR.
    pub const LSTAR: u32 = 0xc000_0082;
    /// CSTAR.
    pub const CSTAR: u32 = 0xc000_0083;
    /// SYSCALL_MASK.
    pub const SYSCALL_MASK: u32 = 0xc000_0084;
    /// KERNEL_GS_BASE.
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
    /// IA32_TSC.
    pub const TSC: u32 = 0x10;
    /// IA32_MISC_ENABLE.
    pub const MISC_ENABLE: u32 = 0x1a0;
    /// IA32_MTRR_DEF_TYPE.
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
}

/// The MSR values every vCPU starts with: syscall MSRs cleared, fast strings on, MTRRs enabled
/// with write-back as the default memory type.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(msr::SYSENTER_CS, 0),
        e(msr::SYSENTER_ESP, 0),
        e(msr::SYSENTER_EIP, 0),
        e(msr::STAR, 0),
        e(msr::CSTAR, 0),
        e(msr::KERNEL_GS_BASE, 0),
        e(msr::SYSCALL_MASK, 0),
        e(msr::LSTAR, 0),
        e(msr::TSC, 0),
        e(msr::MISC_ENABLE, 1),
        e(msr::MTRR_DEF_TYPE, (1 << 11) | 6),
    ]
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(state: &kvm_lapic_state, off: usize) -> u32 {
    let b = &state.regs[off..off + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(state: &mut kvm_lapic_state, off: usize, val: u32) {
    for (i, b) in val.to_le_bytes().iter().enumerate() {
        state.regs[off + i] = *b as _;
    }
}

/// Programs LINT0 as ExtINT (the PIC) and LINT1 as NMI, as firmware would.
pub fn set_lint(state: &mut kvm_lapic_state) {
    let set_mode = |reg: u32, mode: u32| (reg & !0x700) | (mode << 8);
    let lvt0 = lapic_reg(state, APIC_LVT0);
    set_lapic_reg(state, APIC_LVT0, set_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(state, APIC_LVT1);
    set_lapic_reg(state, APIC_LVT1, set_mode(lvt1, APIC_MODE_NMI));
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn gdt_entries_round_trip() {
        let e = gdt_entry(0xa09b, 0, 0xfffff);
        assert_eq!(e, 0x00af_9b00_0000_ffff);
        let s = segment_from_gdt(e, 1);
        assert_eq!(s.selector, 8);
        assert_eq!(s.l, 1);
        assert_eq!(s.db, 0);
        assert_eq!(s.type_, 0xb);
        assert_eq!(s.present, 1);
        assert_eq!(s.limit, 0xffff_ffff);
        let d = segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!(d.db, 1);
        assert_eq!(d.selector, 16);
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
    }

    #[test]
    fn linux64_sregs_and_identity_map() {
        let m = mem();
        let mut s = kvm_sregs::default();
        setup_sregs(&m, EntryMode::Linux64, &mut s).unwrap();
        assert_eq!(s.cr3, PML4_START);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_ne!(s.efer & EFER_LMA, 0);
        let pml4: u64 = m.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        // 2 MiB page number 513 (in the second page directory) maps 0x4020_0000.
        let pde: u64 = m.read_obj(GuestAddress(PDE_START + 0x1000 + 8)).unwrap();
        assert_eq!(pde, 0x4020_0000 | 0x83);
        let gdt1: u64 = m.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(gdt1, gdt_entry(0xa09b, 0, 0xfffff));
    }

    #[test]
    fn pvh_sregs_are_protected_mode_without_paging() {
        let m = mem();
        let mut s = kvm_sregs::default();
        setup_sregs(&m, EntryMode::Pvh, &mut s).unwrap();
        assert_eq!(s.cr0 & X86_CR0_PG, 0);
        assert_eq!(s.cr0 & X86_CR0_PE, 1);
        assert_eq!(s.cs.db, 1);
        assert_eq!(s.cs.l, 0);
        assert_eq!(boot_regs(EntryMode::Pvh, 0x1234).rbx, PVH_INFO_START);
        assert_eq!(boot_regs(EntryMode::Linux64, 0x1234).rsi, ZERO_PAGE_START);
    }

    #[test]
    fn too_small_memory_is_an_error() {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let mut s = kvm_sregs::default();
        assert!(setup_sregs(&m, EntryMode::Linux64, &mut s).is_err());
    }

    #[test]
    fn lint_modes() {
        let mut st = kvm_lapic_state::default();
        set_lint(&mut st);
        assert_eq!((lapic_reg(&st, APIC_LVT0) >> 8) & 7, APIC_MODE_EXTINT);
        assert_eq!((lapic_reg(&st, APIC_LVT1) >> 8) & 7, APIC_MODE_NMI);
    }
}
