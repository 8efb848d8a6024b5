//! Constants shared by the ring-0 assembly and the ring-3 runtime.

/// Most CPUs the probe can bring up (GDT/TSS/per-CPU tables are sized for it).
pub const MAX_CPUS: usize = 64;

/// GDT selectors. The order is fixed by `syscall`/`sysret` (STAR MSR):
/// kernel CS, kernel SS = CS+8; user SS = base+8, user CS = base+16 with base = 0x10.
pub const KERNEL_CS: u16 = 0x08;
pub const KERNEL_DS: u16 = 0x10;
pub const USER_DS: u16 = 0x18 | 3;
pub const USER_CS: u16 = 0x20 | 3;
/// First TSS descriptor (16 bytes each); CPU `i` uses `TSS_SEL0 + 16 * i`.
pub const TSS_SEL0: u16 = 0x30;
/// Size of a 64-bit TSS (no I/O bitmap: IOPL=3 grants ring 3 all ports).
pub const TSS_SIZE: usize = 104;
/// Number of 8-byte GDT slots: 6 fixed descriptors + 2 per TSS.
pub const GDT_SLOTS: usize = 6 + 2 * MAX_CPUS;

/// Boot protocol that entered the probe (`BOOT_PROTOCOL`).
pub const BOOT_PVH: u32 = 1;
pub const BOOT_LINUX64: u32 = 2;

/// Interrupt vectors.
pub const VEC_TIMER: u8 = 0x40;
pub const VEC_WAKE: u8 = 0x41;
pub const VEC_SPURIOUS: u8 = 0xff;
/// Ring-3 -> ring-0 service calls (`int $0x80`).
pub const VEC_SYSCALL: u8 = 0x80;

/// Local APIC (xAPIC MMIO), identity mapped.
pub const LAPIC_BASE: u64 = 0xFEE0_0000;

/// I/O ports of the hardware contract.
pub const PORT_COM1: u16 = 0x3f8;
pub const PORT_EXIT: u16 = 0xf4;
pub const PORT_DEBUG: u16 = 0x440;
/// A hardware-reduced ACPI sleep control register, and the S5 value with SLP_EN that powers
/// the VM off: how the probe ends where `PORT_EXIT` is missing and a reset would reboot it
/// (Cloud Hypervisor, in the benchmarks). Unclaimed under tern and QEMU, which exit at
/// `PORT_EXIT` first.
pub const PORT_SLEEP_CONTROL: u16 = 0x600;
pub const SLEEP_S5: u8 = (5 << 2) | (1 << 5);
/// Unclaimed port and MMIO address used by the `exits` scenario.
pub const PORT_UNCLAIMED: u16 = 0x700;
pub const MMIO_UNCLAIMED: u64 = 0xD000_0000;

/// Debug-port milestones (written to `PORT_DEBUG`).
pub const MILESTONE_ENTRY: u8 = 0x01;
pub const MILESTONE_LONG_MODE: u8 = 0x02;
pub const MILESTONE_RING3: u8 = 0x03;
pub const MILESTONE_FIRST_LINE: u8 = 0x10;
pub const MILESTONE_SMP_START: u8 = 0x20;
pub const MILESTONE_SMP_DONE: u8 = 0x21;
pub const MILESTONE_DONE: u8 = 0xfe;

/// Exit codes written to `PORT_EXIT`.
pub const EXIT_PASS: u8 = 0;
pub const EXIT_FAIL: u8 = 1;
pub const EXIT_PANIC: u8 = 2;
pub const EXIT_EXCEPTION: u8 = 3;
pub const EXIT_BAD_BOOT: u8 = 4;

/// The identity map covers physical memory [0, IDENTITY_MAP_END).
pub const IDENTITY_MAP_END: u64 = 4 << 30;

/// Per-CPU stack sizes (allocated from free RAM for APs).
pub const KSTACK_SIZE: u64 = 16 * 1024;
pub const ISTACK_SIZE: u64 = 8 * 1024;
pub const USTACK_SIZE: u64 = 64 * 1024;
