//! Port and MMIO access from ring 3 (RFLAGS.IOPL=3; all memory is identity
//! mapped and user accessible).

use core::arch::asm;

#[inline(always)]
pub fn outb(port: u16, value: u8) {
    // SAFETY: ring 3 runs with IOPL=3; port I/O has no memory effects.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nostack, nomem, preserves_flags))
    };
}

#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") v, options(nostack, nomem, preserves_flags))
    };
    v
}

#[inline(always)]
pub fn outw(port: u16, value: u16) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") value, options(nostack, nomem, preserves_flags))
    };
}

#[inline(always)]
pub fn inw(port: u16) -> u16 {
    let v: u16;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in ax, dx", in("dx") port, out("ax") v, options(nostack, nomem, preserves_flags))
    };
    v
}

#[inline(always)]
pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, nomem, preserves_flags))
    };
}

#[inline(always)]
pub fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") v, options(nostack, nomem, preserves_flags))
    };
    v
}

/// 32-bit MMIO read of a physical address (identity mapped).
///
/// # Safety
/// `paddr` must be a device register (or RAM) that is safe to read.
#[inline(always)]
pub unsafe fn mmio_read32(paddr: u64) -> u32 {
    // SAFETY: forwarded to the caller.
    unsafe { (paddr as *const u32).read_volatile() }
}

/// 32-bit MMIO write to a physical address (identity mapped).
///
/// # Safety
/// `paddr` must be a device register (or RAM not otherwise in use).
#[inline(always)]
pub unsafe fn mmio_write32(paddr: u64, value: u32) {
    // SAFETY: forwarded to the caller.
    unsafe { (paddr as *mut u32).write_volatile(value) }
}

/// 16-bit MMIO read of a physical address (identity mapped).
///
/// # Safety
/// As for [`mmio_read32`].
#[inline(always)]
pub unsafe fn mmio_read16(paddr: u64) -> u16 {
    // SAFETY: forwarded to the caller.
    unsafe { (paddr as *const u16).read_volatile() }
}

/// 16-bit MMIO write to a physical address (identity mapped).
///
/// # Safety
/// As for [`mmio_write32`].
#[inline(always)]
pub unsafe fn mmio_write16(paddr: u64, value: u16) {
    // SAFETY: forwarded to the caller.
    unsafe { (paddr as *mut u16).write_volatile(value) }
}

/// 8-bit MMIO read of a physical address (identity mapped).
///
/// # Safety
/// As for [`mmio_read32`].
#[inline(always)]
pub unsafe fn mmio_read8(paddr: u64) -> u8 {
    // SAFETY: forwarded to the caller.
    unsafe { (paddr as *const u8).read_volatile() }
}

/// 8-bit MMIO write to a physical address (identity mapped).
///
/// # Safety
/// As for [`mmio_write32`].
#[inline(always)]
pub unsafe fn mmio_write8(paddr: u64, value: u8) {
    // SAFETY: forwarded to the caller.
    unsafe { (paddr as *mut u8).write_volatile(value) }
}

/// Read a plain value from guest-physical memory (boot structures, tables).
///
/// # Safety
/// `paddr` must lie in identity-mapped RAM holding at least `size_of::<T>()` bytes.
#[inline(always)]
pub unsafe fn phys_read<T: Copy>(paddr: u64) -> T {
    // SAFETY: forwarded to the caller; unaligned reads are allowed.
    unsafe { (paddr as *const T).read_unaligned() }
}

#[inline(always)]
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc is allowed in ring 3 (CR4.TSD clear) and has no side effects.
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nostack, nomem, preserves_flags))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

#[inline(always)]
pub fn pause() {
    core::hint::spin_loop();
}
