//! Descriptor tables. Ring 3 computes the IDT and TSS contents (natively fast)
//! before any CPU takes an interrupt; ring 0
//! (`cpu_setup` in boot.rs) loads them with `lidt` / `ltr` at CPU start.

use core::sync::atomic::Ordering;

use super::RacyCell;
use crate::boot;
use crate::layout::{
    KERNEL_CS, MAX_CPUS, TSS_SIZE, VEC_SPURIOUS, VEC_SYSCALL, VEC_TIMER, VEC_WAKE,
};
use crate::ring0::AP_KSTACK_TOPS;

#[derive(Clone, Copy)]
#[repr(C)]
struct IdtEntry {
    offset_lo: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_hi: u32,
    zero: u32,
}

impl IdtEntry {
    const EMPTY: IdtEntry = IdtEntry {
        offset_lo: 0,
        selector: 0,
        ist: 0,
        type_attr: 0,
        offset_mid: 0,
        offset_hi: 0,
        zero: 0,
    };

    /// Present 64-bit interrupt gate, DPL 0, on IST1 (so an interrupt taken in
    /// ring 0 never writes below the interrupted stack pointer).
    fn gate(handler: u64) -> Self {
        Self::gate_with(handler, 1, 0x8e)
    }

    fn gate_with(handler: u64, ist: u8, type_attr: u8) -> Self {
        IdtEntry {
            offset_lo: handler as u16,
            selector: KERNEL_CS,
            ist,
            type_attr,
            offset_mid: (handler >> 16) as u16,
            offset_hi: (handler >> 32) as u32,
            zero: 0,
        }
    }
}

#[repr(C, align(16))]
struct Idt([IdtEntry; 256]);

#[derive(Clone, Copy)]
#[repr(C, packed(4))]
struct Tss {
    reserved0: u32,
    rsp: [u64; 3],
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    iopb: u16,
}

const _: () = assert!(core::mem::size_of::<Tss>() == TSS_SIZE);

/// All TSSs followed by one I/O permission bitmap that they share (every
/// port allowed). IOPL=3 should make the bitmap unnecessary, but the
/// development host's KVM checks ring-3 port I/O against the TSS bitmap, so
/// each TSS's I/O-map base points at the shared bitmap and its limit covers it.
#[repr(C, align(4096))]
struct TssArea {
    tss: [Tss; MAX_CPUS],
    io_bitmap: [u8; 8192],
    /// Terminating byte of the bitmap (must be all ones).
    io_bitmap_end: u8,
}

const BITMAP_OFFSET: usize = MAX_CPUS * TSS_SIZE;
/// Descriptor limit of TSS 0 (the byte after the bitmap); TSS i: minus i * TSS_SIZE.
pub const TSS0_LIMIT: usize = BITMAP_OFFSET + 8192;

const fn tss_area() -> TssArea {
    let mut tss = [Tss {
        reserved0: 0,
        rsp: [0; 3],
        reserved1: 0,
        ist: [0; 7],
        reserved2: 0,
        reserved3: 0,
        iopb: 0,
    }; MAX_CPUS];
    let mut i = 0;
    while i < MAX_CPUS {
        tss[i].iopb = (BITMAP_OFFSET - i * TSS_SIZE) as u16;
        i += 1;
    }
    TssArea {
        tss,
        io_bitmap: [0; 8192],
        io_bitmap_end: 0xff,
    }
}

/// The IDT, loaded by `cpu_setup` (boot.rs) on every CPU.
#[no_mangle]
static IDT: RacyCell<Idt> = RacyCell::new(Idt([IdtEntry::EMPTY; 256]));
/// One TSS per CPU (+ the I/O bitmap); `cpu_setup` writes the GDT descriptor
/// of TSS i and loads it. Statically initialised: ring 3 does port I/O before
/// it could fill anything in.
#[no_mangle]
static TSS_ARRAY: RacyCell<TssArea> = RacyCell::new(tss_area());

/// Fill the IDT. Called once on the BSP before any CPU loads it.
pub fn build_idt() {
    // SAFETY: single-threaded setup; no CPU has loaded the IDT yet.
    let idt = unsafe { &mut (*IDT.as_ptr()).0 };
    let other = boot::irq_other as *const () as u64;
    for e in idt.iter_mut() {
        *e = IdtEntry::gate(other);
    }
    // SAFETY: `exc_stub_table` is a read-only table assembled in boot.rs.
    let stubs = unsafe { &boot::exc_stub_table };
    for (e, &stub) in idt.iter_mut().zip(stubs.iter()) {
        // Exceptions on IST2, apart from interrupts (IST1): an exception
        // inside a syscall (MSR probing) must not reuse the syscall's stack.
        *e = IdtEntry::gate_with(stub, 2, 0x8e);
    }
    // #UD without IST: it doubles as the syscall entry on the development
    // host (see `ring0_exception`), which may `sti; hlt` (IST1 interrupts) or
    // take a #GP (IST2) while it runs.
    idt[6] = IdtEntry::gate_with(stubs[6], 0, 0x8e);
    idt[usize::from(VEC_TIMER)] = IdtEntry::gate(boot::irq_timer as *const () as u64);
    idt[usize::from(VEC_WAKE)] = IdtEntry::gate(boot::irq_wake as *const () as u64);
    idt[usize::from(VEC_SPURIOUS)] = IdtEntry::gate(boot::irq_spurious as *const () as u64);
    // DPL 3 so ring 3 may `int $0x80`; no IST: it runs on TSS.RSP0, and an
    // interrupt during its `sti; hlt` uses IST1 without clobbering it.
    idt[usize::from(VEC_SYSCALL)] =
        IdtEntry::gate_with(boot::int80_entry as *const () as u64, 0, 0xee);
}

/// Fill the TSS of CPU `index`: RSP0 (syscalls from ring 3), IST1
/// (interrupts) and IST2 (exceptions). Done by the BSP before that CPU can
/// take an interrupt (for APs: before they are started).
pub fn prepare_tss(index: usize, kstack_top: u64, istack_top: u64, estack_top: u64) {
    // SAFETY: CPU `index` is not using these fields yet; the BSP is the only writer.
    unsafe {
        let tss = &mut (*TSS_ARRAY.as_ptr()).tss[index];
        tss.rsp[0] = kstack_top;
        tss.ist[0] = istack_top;
        tss.ist[1] = estack_top;
    }
    AP_KSTACK_TOPS[index].store(kstack_top, Ordering::Relaxed);
}
