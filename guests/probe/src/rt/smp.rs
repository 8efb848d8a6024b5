//! CPU discovery (MP table, ACPI MADT, `probe.cpus=N`) and AP bring-up with
//! INIT-SIPI-SIPI, plus a per-CPU job mailbox for running ring-3 work on APs.

use core::sync::atomic::{fence, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use super::bootinfo::BootInfo;
use super::io::phys_read;
use super::phys::{self, PhysAlloc};
use super::{apic, clock, cpu, milestone, sys};
use crate::boot;
use crate::layout::{
    ISTACK_SIZE, KSTACK_SIZE, MAX_CPUS, MILESTONE_SMP_DONE, MILESTONE_SMP_START, USTACK_SIZE,
    VEC_SPURIOUS, VEC_WAKE,
};
use crate::ring0::{AP_MAX_INDEX, AP_NEXT_INDEX, AP_USTACK_TOPS};

/// Where the CPU count came from.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum CpuSource {
    MpTable,
    Madt,
    Cmdline,
    Default,
}

impl CpuSource {
    pub fn name(self) -> &'static str {
        match self {
            CpuSource::MpTable => "mptable",
            CpuSource::Madt => "madt",
            CpuSource::Cmdline => "cmdline",
            CpuSource::Default => "default",
        }
    }
}

pub struct Topology {
    pub count: usize,
    pub source: CpuSource,
    /// APIC IDs from the firmware table (if any), BSP first when flagged.
    pub apic_ids: [u32; MAX_CPUS],
    pub n_ids: usize,
}

fn checksum_ok(paddr: u64, len: u64) -> bool {
    let mut sum = 0u8;
    for i in 0..len {
        // SAFETY: firmware tables below 4 GiB are identity mapped.
        sum = sum.wrapping_add(unsafe { phys_read::<u8>(paddr + i) });
    }
    sum == 0
}

fn scan(start: u64, end: u64, sig: &[u8], step: u64) -> Option<u64> {
    let mut p = start;
    while p + sig.len() as u64 <= end {
        // SAFETY: scanning the BIOS areas below 1 MiB, identity mapped.
        if sig
            .iter()
            .enumerate()
            .all(|(i, &c)| unsafe { phys_read::<u8>(p + i as u64) } == c)
        {
            return Some(p);
        }
        p += step;
    }
    None
}

/// Search the EBDA's first KiB, the last KiB below 640 KiB and the BIOS ROM.
fn scan_bios(sig: &[u8], rom_start: u64) -> Option<u64> {
    // SAFETY: the BDA word at 0x40e holds the EBDA segment.
    let ebda = u64::from(unsafe { phys_read::<u16>(0x40e) }) << 4;
    let mut areas = [(0u64, 0u64); 3];
    areas[0] = if (0x80000..0xa0000).contains(&ebda) {
        (ebda, ebda + 1024)
    } else {
        (0, 0)
    };
    areas[1] = (0x9fc00, 0xa0000);
    areas[2] = (rom_start, 0x100000);
    areas
        .iter()
        .filter(|a| a.1 > a.0)
        .find_map(|&(s, e)| scan(s, e, sig, 16))
}

fn from_mptable(t: &mut Topology) -> bool {
    let Some(fp) = scan_bios(b"_MP_", 0xf0000) else {
        return false;
    };
    // SAFETY: the floating pointer structure found above (16 bytes or more).
    let (cfg, len16) = unsafe { (u64::from(phys_read::<u32>(fp + 4)), phys_read::<u8>(fp + 8)) };
    if len16 == 0 || !checksum_ok(fp, u64::from(len16) * 16) || cfg == 0 {
        return false;
    }
    // SAFETY: the MP configuration table header at `cfg`.
    let (sig, base_len, count) = unsafe {
        (
            phys_read::<[u8; 4]>(cfg),
            phys_read::<u16>(cfg + 4),
            phys_read::<u16>(cfg + 34),
        )
    };
    if &sig != b"PCMP" || !checksum_ok(cfg, u64::from(base_len)) {
        return false;
    }
    let end = cfg + u64::from(base_len);
    let mut p = cfg + 44;
    for _ in 0..count {
        if p >= end {
            break;
        }
        // SAFETY: entries lie within the checksummed table.
        let kind: u8 = unsafe { phys_read(p) };
        if kind == 0 {
            // SAFETY: processor entry (20 bytes).
            let (id, flags) = unsafe { (phys_read::<u8>(p + 1), phys_read::<u8>(p + 3)) };
            if flags & 1 != 0 {
                push_id(t, u32::from(id), flags & 2 != 0);
            }
            p += 20;
        } else {
            p += 8;
        }
    }
    t.n_ids > 0
}

fn push_id(t: &mut Topology, id: u32, bsp: bool) {
    if t.n_ids >= MAX_CPUS {
        return;
    }
    if bsp && t.n_ids > 0 {
        t.apic_ids.copy_within(0..t.n_ids, 1);
        t.apic_ids[0] = id;
    } else {
        t.apic_ids[t.n_ids] = id;
    }
    t.n_ids += 1;
}

fn find_madt(rsdp: u64) -> Option<u64> {
    // SAFETY: RSDP fields (20 bytes for revision 0, 36 for 2+).
    let (sig, rev, rsdt, xsdt) = unsafe {
        (
            phys_read::<[u8; 8]>(rsdp),
            phys_read::<u8>(rsdp + 15),
            phys_read::<u32>(rsdp + 16),
            phys_read::<u64>(rsdp + 24),
        )
    };
    if &sig != b"RSD PTR " || !checksum_ok(rsdp, 20) {
        return None;
    }
    let (table, entry_size) = if rev >= 2 && xsdt != 0 && xsdt < (4 << 30) {
        (xsdt, 8)
    } else {
        (u64::from(rsdt), 4)
    };
    // SAFETY: the (X)SDT header.
    let len = u64::from(unsafe { phys_read::<u32>(table + 4) });
    let mut p = table + 36;
    while p + entry_size <= table + len {
        // SAFETY: entries of the (X)SDT.
        let t = unsafe {
            if entry_size == 8 {
                phys_read::<u64>(p)
            } else {
                u64::from(phys_read::<u32>(p))
            }
        };
        // SAFETY: each entry points to a table header.
        if t != 0 && t < (4 << 30) && unsafe { phys_read::<[u8; 4]>(t) } == *b"APIC" {
            return Some(t);
        }
        p += entry_size;
    }
    None
}

fn from_madt(t: &mut Topology, bi: &BootInfo) -> bool {
    let rsdp = bi.rsdp.or_else(|| scan_bios(b"RSD PTR ", 0xe0000));
    let Some(madt) = rsdp.and_then(find_madt) else {
        return false;
    };
    // SAFETY: MADT header.
    let len = u64::from(unsafe { phys_read::<u32>(madt + 4) });
    let bsp_id = apic::id();
    let mut p = madt + 44;
    while p + 2 <= madt + len {
        // SAFETY: MADT entries (type, length, ...) within the table.
        let (kind, elen) = unsafe { (phys_read::<u8>(p), phys_read::<u8>(p + 1)) };
        if elen < 2 {
            break;
        }
        // SAFETY: fields of LAPIC (type 0) and x2APIC (type 9) entries.
        unsafe {
            if kind == 0 && phys_read::<u32>(p + 4) & 1 != 0 {
                let id = u32::from(phys_read::<u8>(p + 3));
                push_id(t, id, id == bsp_id);
            } else if kind == 9 && phys_read::<u32>(p + 8) & 1 != 0 {
                let id = phys_read::<u32>(p + 4);
                push_id(t, id, id == bsp_id);
            }
        }
        p += u64::from(elen);
    }
    t.n_ids > 0
}

/// How many CPUs to expect: `probe.cpus=N` wins; otherwise the larger of
/// the MP table and the ACPI MADT counts (a firmware may build its MP table
/// from the CPUs it managed to wake itself: SeaBIOS under the development
/// host's KVM lists only the BSP there while the MADT has them all).
pub fn discover(bi: &BootInfo, cmdline_cpus: Option<u64>) -> Topology {
    let empty = || Topology {
        count: 1,
        source: CpuSource::Default,
        apic_ids: [0; MAX_CPUS],
        n_ids: 0,
    };
    let mut mp = empty();
    let mut madt = empty();
    let have_mp = from_mptable(&mut mp);
    let have_madt = from_madt(&mut madt, bi);
    let use_madt = have_madt && (!have_mp || madt.n_ids > mp.n_ids);
    let mut t = if use_madt {
        madt.source = CpuSource::Madt;
        madt
    } else if have_mp {
        mp.source = CpuSource::MpTable;
        mp
    } else {
        empty()
    };
    if t.n_ids > 0 {
        t.count = t.n_ids;
    }
    if let Some(n) = cmdline_cpus {
        t.count = (n as usize).clamp(1, MAX_CPUS);
        t.source = CpuSource::Cmdline;
    }
    t
}

// ---------------------------------------------------------------- bring-up

/// APs that reached ring 3 (BSP not counted).
static ONLINE: AtomicUsize = AtomicUsize::new(0);
/// APIC ID of each CPU index (u32::MAX until it reports in).
static APIC_IDS: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(u32::MAX) }; MAX_CPUS];
/// Job mailbox: address of a `fn(usize)` to run, 0 when empty.
static JOB: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Jobs completed per CPU.
static JOBS_DONE: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// CPUs with resources prepared (BSP included), i.e. the bring-up was done.
static PREPARED: AtomicUsize = AtomicUsize::new(0);

pub fn online_aps() -> usize {
    ONLINE.load(Ordering::Acquire)
}

pub fn apic_id_of(index: usize) -> Option<u32> {
    let id = APIC_IDS[index].load(Ordering::Acquire);
    (id != u32::MAX).then_some(id)
}

/// Record the BSP (index 0).
pub fn register_bsp() {
    APIC_IDS[0].store(apic::id(), Ordering::Release);
}

pub struct BringUp {
    pub elapsed_ns: u64,
    pub trampoline: u64,
}

/// Start all APs (broadcast INIT-SIPI-SIPI) and wait until `expected - 1`
/// have reported in or `timeout_ns` passed. Idempotent.
pub fn start_aps(
    bi: &BootInfo,
    pa: &mut PhysAlloc,
    expected: usize,
    timeout_ns: u64,
) -> Result<BringUp, &'static str> {
    let expected = expected.clamp(1, MAX_CPUS);
    if PREPARED.load(Ordering::Acquire) != 0 || expected == 1 {
        return Ok(BringUp {
            elapsed_ns: 0,
            trampoline: 0,
        });
    }
    for (i, ustack_top) in AP_USTACK_TOPS.iter().enumerate().take(expected).skip(1) {
        let k = pa
            .alloc(KSTACK_SIZE, 4096)
            .ok_or("no memory for AP stacks")?;
        let s = pa
            .alloc(ISTACK_SIZE, 4096)
            .ok_or("no memory for AP stacks")?;
        let e = pa
            .alloc(ISTACK_SIZE, 4096)
            .ok_or("no memory for AP stacks")?;
        let u = pa
            .alloc(USTACK_SIZE, 4096)
            .ok_or("no memory for AP stacks")?;
        cpu::prepare_tss(i, k + KSTACK_SIZE, s + ISTACK_SIZE, e + ISTACK_SIZE);
        ustack_top.store(u + USTACK_SIZE, Ordering::Relaxed);
    }
    AP_NEXT_INDEX.store(1, Ordering::Relaxed);
    AP_MAX_INDEX.store(expected as u32, Ordering::Relaxed);
    PREPARED.store(expected, Ordering::Release);

    let page = phys::low_page(bi).ok_or("no free page below 640 KiB for the AP trampoline")?;
    // SAFETY: the trampoline is a byte range in the image; `page` is free low RAM
    // (boot information was copied out before).
    unsafe {
        let start = &raw const boot::ap_tramp_start;
        let len = (&raw const boot::ap_tramp_end as usize) - (start as usize);
        core::ptr::copy_nonoverlapping(start, page as *mut u8, len);
    }
    fence(Ordering::SeqCst);

    milestone(MILESTONE_SMP_START);
    let t0 = clock::now_ns();
    apic::send_ipi(0, apic::ICR_INIT_ALL_BUT_SELF);
    clock::delay_ns(1_000_000);
    let sipi = apic::ICR_SIPI_ALL_BUT_SELF | (page >> 12) as u32;
    apic::send_ipi(0, sipi);
    clock::delay_ns(200_000);
    if ONLINE.load(Ordering::Acquire) < expected - 1 {
        apic::send_ipi(0, sipi);
    }
    while ONLINE.load(Ordering::Acquire) < expected - 1 {
        if clock::now_ns().wrapping_sub(t0) > timeout_ns {
            return Err("timeout waiting for APs");
        }
        core::hint::spin_loop();
    }
    milestone(MILESTONE_SMP_DONE);
    Ok(BringUp {
        elapsed_ns: clock::now_ns().wrapping_sub(t0),
        trampoline: page,
    })
}

/// Ring-3 entry of an AP (from `ap_long_entry`), with its CPU index.
#[no_mangle]
extern "C" fn ap_user_main(index: u32) -> ! {
    let index = index as usize;
    apic::enable(VEC_SPURIOUS);
    clock::register_cpu(index);
    APIC_IDS[index].store(apic::id(), Ordering::Release);
    ONLINE.fetch_add(1, Ordering::AcqRel);
    loop {
        let job = JOB[index].swap(0, Ordering::AcqRel);
        if job != 0 {
            // SAFETY: only `run_on` stores into JOB, and it stores a `fn(usize)`.
            let f: fn(usize) = unsafe { core::mem::transmute::<usize, fn(usize)>(job as usize) };
            f(index);
            JOBS_DONE[index].fetch_add(1, Ordering::AcqRel);
        } else {
            // Sleeps only if the mailbox is still empty, checked with IF=0.
            sys::syscall(sys::nr::HALT, JOB[index].as_ptr() as u64, 0, 0, 0);
        }
    }
}

/// Post `f` to CPU `index` (an online AP) and wake it with an IPI.
pub fn run_on(index: usize, f: fn(usize)) -> Result<(), &'static str> {
    let id = apic_id_of(index).ok_or("CPU not online")?;
    if JOB[index]
        .compare_exchange(0, f as usize as u64, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return Err("CPU busy");
    }
    apic::send_ipi(id, apic::ICR_FIXED | u32::from(VEC_WAKE));
    Ok(())
}

pub fn jobs_done(index: usize) -> u64 {
    JOBS_DONE[index].load(Ordering::Acquire)
}
