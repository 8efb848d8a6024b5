//! Snapshots: a paused VM's state (vCPUs, in-kernel irqchip, PIT, KVM clock) and memory, written
//! to a directory, and brought back into a freshly built VM of the same configuration.
//!
//! Layout of a snapshot directory: `state.json` (versioned; the configuration, every vCPU's
//! and the VM's KVM state, the memory layout and FNV-1a checksums of the state and the memory)
//! and `memory.bin` (guest RAM, region after region; pages of zeroes are holes). Both are
//! written into a temporary directory next to the target, synced and renamed into place, so a
//! crash leaves no half snapshot.
//!
//! A diff snapshot's `memory.bin` holds only the pages written since the snapshot it names as
//! its parent (the rest are holes; `dirty.bin` says which pages it holds); restoring one lays
//! the chain of diffs over the full snapshot at its root.
//!
//! Devices: the COM1 UART's registers, and each virtio device's transport state (the driver's
//! configuration, MSI-X, and where each queue stopped: a paused device has answered every
//! request it took, so nothing is in flight). Disks and TAPs are reopened from the
//! configuration.

use std::io::Write;
use std::path::{Path, PathBuf};

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use arch::GuestMemoryMmap;

use crate::VmConfig;
pub use ::api::restore::{RestoreMode, RestoreOptions};

/// Version of the snapshot format this tern writes and reads.
pub const FORMAT_VERSION: u32 = 2;
const STATE_FILE: &str = "state.json";
const MEMORY_FILE: &str = "memory.bin";
/// Largest `state.json` read: far above what 254 vCPUs and every device need.
pub const MAX_STATE_SIZE: u64 = 16 << 20;

/// Creates `path` for writing, readable and writable by its owner only (mode 0600 whatever
/// the umask): snapshot files hold the guest's memory and registers.
fn create_private(path: &Path) -> Result<std::fs::File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))
}

/// One vCPU's KVM state.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    cpuid: Vec<kvm_cpuid_entry2>,
    msrs: Vec<kvm_msr_entry>,
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: kvm_xsave,
    xcrs: kvm_xcrs,
    lapic: kvm_lapic_state,
    mp_state: kvm_mp_state,
    events: kvm_vcpu_events,
}

/// The VM-wide KVM state.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    irqchips: Vec<kvm_irqchip>,
    pit: kvm_pit_state2,
    clock: kvm_clock_data,
}

/// Everything in `state.json`.
#[derive(Serialize, Deserialize)]
pub struct Snapshot {
    /// [`FORMAT_VERSION`].
    pub version: u32,
    /// The tern that wrote it.
    pub tern: String,
    /// The VM's configuration.
    pub config: VmConfig,
    vm: VmState,
    vcpus: Vec<VcpuState>,
    /// The COM1 UART.
    serial: devices::serial::SerialState,
    /// The CMOS RTC's RAM.
    #[serde(default)]
    rtc: Option<devices::rtc::RtcState>,
    /// Each virtio device's transport state, in attach order.
    devices: Vec<virtio::transport::TransportState>,
    /// (guest address, length) of each RAM region, in `memory.bin` order.
    memory: Vec<(u64, u64)>,
    memory_fnv: u64,
    /// For a diff snapshot: the snapshot it builds on. Its `memory.bin` then holds only the
    /// pages marked in `dirty.bin` (the rest of the file is a hole), and `memory_fnv` covers
    /// those pages in order.
    #[serde(default)]
    parent: Option<Parent>,
    /// FNV-1a of `dirty.bin` (diff snapshots).
    #[serde(default)]
    dirty_fnv: u64,
    /// FNV-1a of this structure's JSON with `state_fnv` = 0.
    state_fnv: u64,
}

/// FNV-1a over 64-bit little-endian words (then the remaining bytes): a checksum that keeps
/// up with reading memory, for detecting damage (not tampering by someone who recomputes it).
fn fnv(h: u64, data: &[u8]) -> u64 {
    const PRIME: u64 = 0x0100_0000_01b3;
    let mut words = data.chunks_exact(8);
    let mut h = words.by_ref().fold(h, |h, w| {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        (h ^ u64::from_le_bytes(b)).wrapping_mul(PRIME)
    });
    for &b in words.remainder() {
        h = (h ^ u64::from(b)).wrapping_mul(PRIME);
    }
    h
}

const FNV_INIT: u64 = 0xcbf2_9ce4_8422_2325;

/// Captures a vCPU's state; `msr_list` names the MSRs to save. Called on the vCPU's thread
/// while it is parked outside `KVM_RUN`.
pub fn save_vcpu(fd: &VcpuFd, msr_list: &[u32]) -> Result<VcpuState, String> {
    let e = |what: &'static str| move |err: kvm_ioctls::Error| format!("{what}: {err}");
    let cpuid = fd
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(e("get CPUID"))?
        .as_slice()
        .to_vec();
    let mut msrs = Msrs::from_entries(
        &msr_list
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect::<Vec<_>>(),
    )
    .map_err(|err| format!("MSR list: {err:?}"))?;
    // KVM stops at the first MSR it cannot read; skip that one and carry on.
    let mut saved = Vec::new();
    let mut rest: Vec<kvm_msr_entry> = msrs.as_slice().to_vec();
    while !rest.is_empty() {
        msrs = Msrs::from_entries(&rest).map_err(|err| format!("MSR list: {err:?}"))?;
        let n = fd.get_msrs(&mut msrs).map_err(e("get MSRs"))?;
        saved.extend_from_slice(&msrs.as_slice()[..n]);
        rest.drain(..(n + 1).min(rest.len()));
    }
    Ok(VcpuState {
        cpuid,
        msrs: saved,
        regs: fd.get_regs().map_err(e("get registers"))?,
        sregs: fd.get_sregs().map_err(e("get special registers"))?,
        xsave: fd.get_xsave().map_err(e("get XSAVE"))?,
        xcrs: fd.get_xcrs().map_err(e("get XCRs"))?,
        lapic: fd.get_lapic().map_err(e("get LAPIC"))?,
        mp_state: fd.get_mp_state().map_err(e("get MP state"))?,
        events: fd.get_vcpu_events().map_err(e("get vCPU events"))?,
    })
}

/// Puts a saved state into a vCPU (created, not yet run).
pub fn restore_vcpu(fd: &VcpuFd, s: &VcpuState) -> Result<(), String> {
    let e = |what: &'static str| move |err: kvm_ioctls::Error| format!("{what}: {err}");
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(|err| format!("CPUID: {err:?}"))?;
    fd.set_cpuid2(&cpuid).map_err(e("set CPUID"))?;
    fd.set_sregs(&s.sregs).map_err(e("set special registers"))?;
    fd.set_regs(&s.regs).map_err(e("set registers"))?;
    // SAFETY: KVM_SET_XSAVE reads a `kvm_xsave` of the size the process's enabled XSAVE
    // features need; tern never enables dynamic XSTATE features (no arch_prctl
    // ARCH_REQ_XCOMP_GUEST_PERM), so that is the 4096 bytes `s.xsave` holds. Its contents come
    // from the snapshot file and are not trusted: KVM checks them and fails the call with
    // EINVAL on a bad XSAVE header, it never reads past the struct because of them.
    unsafe { fd.set_xsave(&s.xsave) }.map_err(e("set XSAVE"))?;
    fd.set_xcrs(&s.xcrs).map_err(e("set XCRs"))?;
    // The LAPIC before the MSRs: KVM drops a write of IA32_TSC_DEADLINE unless the APIC is
    // enabled (the APIC base, from the special registers) and its timer is in TSC-deadline
    // mode (LVTT, from the LAPIC state). Written earlier, a guest's armed deadline timer would
    // be lost and the guest would wait for a timer interrupt that never comes.
    fd.set_lapic(&s.lapic).map_err(e("set LAPIC"))?;
    let msrs = Msrs::from_entries(&s.msrs).map_err(|err| format!("MSRs: {err:?}"))?;
    let n = fd.set_msrs(&msrs).map_err(e("set MSRs"))?;
    if n != s.msrs.len() {
        tracing::warn!(
            "KVM took {n} of {} saved MSRs (next: {:#x})",
            s.msrs.len(),
            s.msrs[n].index
        );
    }
    fd.set_mp_state(s.mp_state).map_err(e("set MP state"))?;
    fd.set_vcpu_events(&s.events)
        .map_err(e("set vCPU events"))?;
    Ok(())
}

/// The CPUID feature registers a snapshot's vCPUs may rely on: (leaf, subleaf, register
/// name, register index: eax 0, ebx 1, ecx 2, edx 3).
/// Bits KVM sets in a running vCPU's CPUID from the guest's own control registers, not from
/// what the CPU has: OSXSAVE (leaf 1 ecx bit 27, CR4.OSXSAVE) and OSPKE (leaf 7.0 ecx bit 4,
/// CR4.PKE). A snapshot of any guest that enabled XSAVE carries them; the host's set never does.
const GUEST_SET_BITS: &[(u32, u32, usize, u32)] = &[(0x1, 0, 2, 1 << 27), (0x7, 0, 2, 1 << 4)];

const FEATURE_REGS: &[(u32, u32, &str, usize)] = &[
    (0x1, 0, "ecx", 2),
    (0x1, 0, "edx", 3),
    (0x7, 0, "ebx", 1),
    (0x7, 0, "ecx", 2),
    (0x7, 0, "edx", 3),
    (0x7, 1, "eax", 0),
    (0xd, 1, "eax", 0),
    (0x8000_0001, 0, "ecx", 2),
    (0x8000_0001, 0, "edx", 3),
    (0x8000_0007, 0, "edx", 3),
    (0x8000_0008, 0, "ebx", 1),
];

/// Fails, naming the missing bits, when the saved vCPU CPUID has a feature that `host` (what
/// tern gives a vCPU on this host) lacks: the guest would use an instruction this CPU does not
/// run. Features the host has and the snapshot lacks are fine (the guest does not use them).
pub fn check_cpu_features(
    saved: &[kvm_cpuid_entry2],
    host: &[kvm_cpuid_entry2],
) -> Result<(), String> {
    let reg = |entries: &[kvm_cpuid_entry2], leaf: u32, sub: u32, r: usize| {
        entries
            .iter()
            .find(|e| e.function == leaf && (e.index == sub || (sub == 0 && e.flags & 1 == 0)))
            .map_or(0, |e| [e.eax, e.ebx, e.ecx, e.edx][r])
    };
    let missing: Vec<String> = FEATURE_REGS
        .iter()
        .filter_map(|&(leaf, sub, name, r)| {
            let guest_set: u32 = GUEST_SET_BITS
                .iter()
                .filter(|g| (g.0, g.1, g.2) == (leaf, sub, r))
                .map(|g| g.3)
                .sum();
            let m = reg(saved, leaf, sub, r) & !reg(host, leaf, sub, r) & !guest_set;
            (m != 0).then(|| format!("CPUID {leaf:#x}.{sub} {name} bits {m:#x}"))
        })
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the snapshot was taken on a CPU with features this host lacks ({}); restore it on a host with the same CPU model",
            missing.join(", ")
        ))
    }
}

/// Captures the VM-wide state.
pub fn save_vm(vm: &VmFd) -> Result<VmState, String> {
    let mut irqchips = Vec::new();
    for id in [
        KVM_IRQCHIP_PIC_MASTER,
        KVM_IRQCHIP_PIC_SLAVE,
        KVM_IRQCHIP_IOAPIC,
    ] {
        let mut c = kvm_irqchip {
            chip_id: id,
            ..Default::default()
        };
        vm.get_irqchip(&mut c)
            .map_err(|err| format!("get irqchip {id}: {err}"))?;
        irqchips.push(c);
    }
    Ok(VmState {
        irqchips,
        pit: vm.get_pit2().map_err(|err| format!("get PIT: {err}"))?,
        clock: vm.get_clock().map_err(|err| format!("get clock: {err}"))?,
    })
}

/// Puts the VM-wide state back.
pub fn restore_vm(vm: &VmFd, s: &VmState) -> Result<(), String> {
    for c in &s.irqchips {
        vm.set_irqchip(c)
            .map_err(|err| format!("set irqchip {}: {err}", c.chip_id))?;
    }
    vm.set_pit2(&s.pit)
        .map_err(|err| format!("set PIT: {err}"))?;
    let mut clock = s.clock;
    // Only the clock value is restored; the flags describe the host it came from.
    clock.flags = 0;
    vm.set_clock(&clock)
        .map_err(|err| format!("set clock: {err}"))
}

/// The snapshot a diff snapshot builds on.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Parent {
    /// Its directory (absolute).
    pub dir: PathBuf,
    /// Its `state_fnv`, to notice it was replaced.
    pub state_fnv: u64,
}

/// What memory a snapshot holds.
pub enum MemoryContent<'a> {
    /// All of it.
    Full,
    /// The pages set in `dirty` (one bit per 4 KiB page of the regions end to end), over
    /// `parent`.
    Diff {
        /// The earlier snapshot.
        parent: Parent,
        /// Written pages.
        dirty: &'a [u64],
    },
}

const DIRTY_FILE: &str = "dirty.bin";
const PAGE: u64 = virtio::dirty::PAGE_SIZE;

/// Byte ranges (start, length) of `data` made of whole pages that are not all zeroes (the
/// last page may be partial).
#[cfg(test)]
fn nonzero_runs(data: &[u8]) -> Vec<(usize, usize)> {
    scan_pages(FNV_INIT, data).1
}

/// Whether `b` is all zeroes (8 bytes at a time, which the compiler vectorizes).
fn is_zero(b: &[u8]) -> bool {
    let words = b.chunks_exact(8);
    let tail = words.remainder().iter().fold(0u8, |a, &x| a | x);
    words.fold(0u64, |a, w| {
        a | u64::from_ne_bytes(w.try_into().unwrap_or([0xff; 8]))
    }) == 0
        && tail == 0
}

/// One pass over `data`: its [`fnv`] continued from `h`, and the byte ranges (start, length)
/// of its pages that are not all zeroes (the last page may be partial). A zero page costs one
/// multiplication in the checksum instead of 512.
fn scan_pages(mut h: u64, data: &[u8]) -> (u64, Vec<(usize, usize)>) {
    let zero_page = fnv_zeroes(1, PAGE);
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, page) in data.chunks(PAGE as usize).enumerate() {
        if is_zero(page) {
            h = if page.len() as u64 == PAGE {
                h.wrapping_mul(zero_page)
            } else {
                fnv_zeroes(h, page.len() as u64)
            };
            continue;
        }
        h = fnv(h, page);
        let start = i * PAGE as usize;
        match runs.last_mut() {
            Some((s0, l)) if *s0 + *l == start => *l += page.len(),
            _ => runs.push((start, page.len())),
        }
    }
    (h, runs)
}

/// Runs of set bits in `bits` (over `pages` pages), as (first page, count).
fn page_runs(bits: &[u64], pages: u64) -> Vec<(u64, u64)> {
    let mut runs = Vec::new();
    let mut start = None;
    for p in 0..pages {
        let set = bits
            .get((p / 64) as usize)
            .is_some_and(|w| w & (1 << (p % 64)) != 0);
        match (set, start) {
            (true, None) => start = Some(p),
            (false, Some(s0)) => {
                runs.push((s0, p - s0));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s0) = start {
        runs.push((s0, pages - s0));
    }
    runs
}

/// Splits page runs at region boundaries: (host pointer, file offset, bytes) for each piece.
fn run_pieces(mem: &GuestMemoryMmap, runs: &[(u64, u64)]) -> Vec<(*mut u8, u64, u64)> {
    let regions: Vec<(u64, u64, *mut u8)> = {
        let mut off = 0;
        mem.iter()
            .map(|r| {
                let e = (off, r.len(), r.as_ptr());
                off += r.len();
                e
            })
            .collect()
    };
    let mut out = Vec::new();
    for &(p, n) in runs {
        let (mut lo, hi) = (p * PAGE, (p + n) * PAGE);
        for &(off, len, ptr) in &regions {
            if lo >= hi {
                break;
            }
            let end = (off + len).min(hi);
            if lo >= off && lo < end {
                // SAFETY: lo - off < len: the pointer stays inside the region's mapping.
                out.push((unsafe { ptr.add((lo - off) as usize) }, lo, end - lo));
                lo = end;
            }
        }
    }
    out
}

/// Maps `len` bytes of `f` from `off` copy-on-write (`MAP_PRIVATE|MAP_FIXED`) at `ptr`: pages
/// load from the file on first touch, and writes never reach it.
///
/// # Safety
/// `[ptr, ptr + len)` lies inside one live mapping of guest memory that nothing reads or
/// writes meanwhile; its pages are replaced.
unsafe fn map_over(
    ptr: *mut u8,
    len: u64,
    f: &std::fs::File,
    off: u64,
    path: &Path,
) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    // SAFETY: the caller guarantees the range is guest memory tern owns and nothing uses.
    let p = unsafe {
        libc::mmap(
            ptr.cast(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
            f.as_raw_fd(),
            off as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED || p.cast::<u8>() != ptr {
        return Err(format!(
            "cannot map {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Device state captured from a paused VM.
pub struct DeviceStates {
    /// The COM1 UART.
    pub serial: devices::serial::SerialState,
    /// The CMOS RTC.
    pub rtc: devices::rtc::RtcState,
    /// Each virtio transport, in attach order.
    pub virtio: Vec<virtio::transport::TransportState>,
}

/// Writes a snapshot of a paused VM to `dir` (which must not exist yet).
pub fn write(
    dir: &Path,
    config: &VmConfig,
    vm: VmState,
    vcpus: Vec<VcpuState>,
    devices: DeviceStates,
    mem: &GuestMemoryMmap,
    content: MemoryContent<'_>,
) -> Result<u64, String> {
    if dir.exists() {
        return Err(format!("{} already exists", dir.display()));
    }
    let name = dir
        .file_name()
        .ok_or_else(|| format!("{} is not a directory name", dir.display()))?;
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp: PathBuf = parent.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    remove_stale_temporaries(parent, &name.to_string_lossy());
    let _ = std::fs::remove_dir_all(&tmp);
    // Owner-only, like the files in it, whatever the umask.
    std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
        .create(&tmp)
        .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
    let res = (|| {
        let memory: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        let mut h = FNV_INIT;
        let path = tmp.join(MEMORY_FILE);
        let f = create_private(&path)?;
        let werr = |e: std::io::Error| format!("writing {}: {e}", path.display());
        let (parent_snap, dirty_fnv) = match content {
            MemoryContent::Full => {
                // Pages of zeroes are left as holes: most of a guest's memory usually is, and
                // a hole reads back as zeroes (eagerly or mapped).
                use std::os::unix::fs::FileExt;
                let total: u64 = memory.iter().map(|(_, l)| l).sum();
                f.set_len(total).map_err(werr)?;
                let mut off = 0u64;
                for r in mem.iter() {
                    // SAFETY: the region is a live mapping of `len()` bytes owned by `mem`;
                    // the VM is paused, so nothing writes it while it is read.
                    let bytes = unsafe { std::slice::from_raw_parts(r.as_ptr(), r.len() as usize) };
                    let (next, runs) = scan_pages(h, bytes);
                    h = next;
                    for (start, len) in runs {
                        f.write_all_at(&bytes[start..start + len], off + start as u64)
                            .map_err(werr)?;
                    }
                    off += r.len();
                }
                (None, 0)
            }
            MemoryContent::Diff { parent, dirty } => {
                use std::os::unix::fs::FileExt;
                let total: u64 = memory.iter().map(|(_, l)| l).sum();
                f.set_len(total).map_err(werr)?;
                let runs = page_runs(dirty, total.div_ceil(PAGE));
                for (ptr, off, len) in run_pieces(mem, &runs) {
                    // SAFETY: `run_pieces` keeps each piece inside one live region of `mem`;
                    // the VM is paused.
                    let bytes = unsafe { std::slice::from_raw_parts(ptr, len as usize) };
                    h = fnv(h, bytes);
                    f.write_all_at(bytes, off).map_err(werr)?;
                }
                let words: Vec<u8> = dirty.iter().flat_map(|w| w.to_le_bytes()).collect();
                let dpath = tmp.join(DIRTY_FILE);
                let mut d = create_private(&dpath)?;
                d.write_all(&words)
                    .and_then(|()| d.sync_all())
                    .map_err(|e| format!("writing {}: {e}", dpath.display()))?;
                (Some(parent), fnv(FNV_INIT, &words))
            }
        };
        f.sync_all().map_err(werr)?;
        let mut snap = Snapshot {
            version: FORMAT_VERSION,
            tern: env!("CARGO_PKG_VERSION").to_string(),
            config: config.clone(),
            vm,
            vcpus,
            serial: devices.serial,
            rtc: Some(devices.rtc),
            devices: devices.virtio,
            memory,
            memory_fnv: h,
            parent: parent_snap,
            dirty_fnv,
            state_fnv: 0,
        };
        let unsigned = serde_json::to_vec(&snap).map_err(|e| e.to_string())?;
        snap.state_fnv = fnv(FNV_INIT, &unsigned);
        let json = serde_json::to_vec(&snap).map_err(|e| e.to_string())?;
        let path = tmp.join(STATE_FILE);
        let mut f = create_private(&path)?;
        f.write_all(&json)
            .and_then(|()| f.sync_all())
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
        // The directory's entries must be on disk before the rename makes it the snapshot.
        std::fs::File::open(&tmp)
            .and_then(|d| d.sync_all())
            .map_err(|e| format!("cannot sync {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, dir)
            .map_err(|e| format!("cannot move the snapshot to {}: {e}", dir.display()))?;
        // Make the rename itself durable.
        if let Ok(d) = std::fs::File::open(parent) {
            let _ = d.sync_all();
        }
        Ok(snap.state_fnv)
    })();
    if res.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    res
}

/// Reads and checks the snapshot `opts` name and applies them to its configuration.
pub fn open(opts: &RestoreOptions) -> Result<crate::Restore, String> {
    let mut snap = read(&opts.dir)?;
    let c = &mut snap.config;
    for (old, new) in &opts.disk_remap {
        let i = c.disks.iter().position(|d| &d.path == old).ok_or_else(|| {
            format!(
                "disk remap: the snapshot has no disk {} (it has: {})",
                old.display(),
                list(c.disks.iter().map(|d| d.path.display().to_string()))
            )
        })?;
        c.disks[i].path = new.clone();
        // Another file: its format is probed afresh (a stated format still holds).
        c.disks[i].probed_format = None;
    }
    for (old, new) in &opts.tap_remap {
        let (i, n) = c
            .nets
            .iter()
            .enumerate()
            .find(|(_, n)| &n.tap == old)
            .ok_or_else(|| {
                format!(
                    "TAP remap: the snapshot has no TAP {old} (it has: {})",
                    list(c.nets.iter().map(|n| n.tap.clone()))
                )
            })?;
        // The guest keeps the MAC it has; only the host side moves.
        let mac = n.effective_mac(i);
        c.nets[i].mac = Some(mac);
        c.nets[i].tap = new.clone();
    }
    if let Some(s) = &opts.serial {
        c.serial = s.clone();
    }
    if let Some(con) = &opts.console {
        if c.console.is_none() {
            return Err("the snapshot's VM has no virtio-console to redirect".into());
        }
        c.console = Some(con.clone());
    }
    // The configuration inside a snapshot is checked as any other, once the options
    // are applied (for `tern run --restore` and `PUT /v1/vm/restore` alike).
    c.validate().map_err(|e| {
        format!(
            "{}: the snapshot's configuration is invalid: {e}",
            opts.dir.join(STATE_FILE).display()
        )
    })?;
    Ok(crate::Restore {
        dir: opts.dir.clone(),
        snapshot: snap,
        paused: opts.paused,
        lazy: opts.mode == RestoreMode::Lazy,
    })
}

fn list(items: impl Iterator<Item = String>) -> String {
    let v: Vec<String> = items.collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// Removes the temporary directories (`.NAME.tmp-PID`) of snapshots to `NAME` whose tern
/// died while writing them (killed, or the host crashed).
fn remove_stale_temporaries(parent: &Path, name: &str) {
    let prefix = format!(".{name}.tmp-");
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let file_name = e.file_name();
        let Some(pid) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|p| p.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        // SAFETY: signal 0 only checks whether the process exists.
        let gone = unsafe { libc::kill(pid, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            tracing::info!("removing {}, left by a tern that died", e.path().display());
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Reads and checks `dir/state.json`.
pub fn read(dir: &Path) -> Result<Snapshot, String> {
    use std::io::Read;
    let path = dir.join(STATE_FILE);
    let mut text = Vec::new();
    std::fs::File::open(&path)
        .and_then(|f| f.take(MAX_STATE_SIZE + 1).read_to_end(&mut text))
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if text.len() as u64 > MAX_STATE_SIZE {
        return Err(format!(
            "{} is larger than {} MiB: not a tern snapshot's state",
            path.display(),
            MAX_STATE_SIZE >> 20
        ));
    }
    let mut snap: Snapshot = serde_json::from_slice(&text)
        .map_err(|e| format!("{} is not a tern snapshot: {e}", path.display()))?;
    if snap.version != FORMAT_VERSION {
        return Err(format!(
            "{} has snapshot format {} (written by tern {}); this tern reads format {FORMAT_VERSION}",
            dir.display(),
            snap.version,
            snap.tern
        ));
    }
    let want = snap.state_fnv;
    snap.state_fnv = 0;
    let unsigned = serde_json::to_vec(&snap).map_err(|e| e.to_string())?;
    if fnv(FNV_INIT, &unsigned) != want {
        return Err(format!(
            "{} is corrupted (checksum mismatch)",
            path.display()
        ));
    }
    snap.state_fnv = want;
    Ok(snap)
}

/// Entry points for tern's fuzz targets (`fuzz/`); not an API.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// `text` with a valid checksum, when it parses as a snapshot at all: what `read` then
    /// takes past its checksum check to the checks after it.
    pub fn sign(text: &[u8]) -> Option<Vec<u8>> {
        let mut snap: Snapshot = serde_json::from_slice(text).ok()?;
        snap.state_fnv = 0;
        snap.state_fnv = fnv(FNV_INIT, &serde_json::to_vec(&snap).ok()?);
        serde_json::to_vec(&snap).ok()
    }
}

impl Snapshot {
    /// Saved vCPU states.
    pub fn vcpus(&self) -> &[VcpuState] {
        &self.vcpus
    }

    /// The first vCPU's saved CPUID.
    pub fn cpuid(&self) -> &[kvm_cpuid_entry2] {
        self.vcpus.first().map_or(&[], |v| &v.cpuid)
    }

    /// Saved VM-wide state.
    pub fn vm(&self) -> &VmState {
        &self.vm
    }

    /// Saved UART state.
    pub fn serial(&self) -> &devices::serial::SerialState {
        &self.serial
    }

    /// Saved RTC state (absent in snapshots from before it was saved).
    pub fn rtc(&self) -> Option<&devices::rtc::RtcState> {
        self.rtc.as_ref()
    }

    /// Saved virtio transport states, in attach order.
    pub fn devices(&self) -> &[virtio::transport::TransportState] {
        &self.devices
    }

    /// Fails unless `mem` has the regions the snapshot was taken with.
    fn check_layout(&self, mem: &GuestMemoryMmap) -> Result<(), String> {
        let layout: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        if layout != self.memory {
            return Err(format!(
                "the snapshot's memory layout {:?} does not match the VM's {layout:?}",
                self.memory
            ));
        }
        Ok(())
    }

    /// The snapshot this diff snapshot builds on.
    pub fn parent(&self) -> Option<&Parent> {
        self.parent.as_ref()
    }

    /// Its state checksum (what a diff snapshot built on it records).
    pub fn state_fnv(&self) -> u64 {
        self.state_fnv
    }

    /// Brings back guest memory: the full snapshot at the root of the diff chain, then each
    /// diff snapshot's pages over it, oldest first. Lazy maps every layer copy-on-write;
    /// eager reads it and checks its checksum.
    pub fn restore_memory(
        &self,
        dir: &Path,
        mem: &GuestMemoryMmap,
        lazy: bool,
    ) -> Result<(), String> {
        // Newest first.
        let mut chain: Vec<(PathBuf, Snapshot)> = Vec::new();
        let mut next = self.parent.clone();
        while let Some(p) = next {
            if chain.len() >= 64 {
                return Err(format!(
                    "{}: more than 64 diff snapshots in a chain",
                    dir.display()
                ));
            }
            let parent = read(&p.dir).map_err(|e| format!("its parent snapshot: {e}"))?;
            if parent.state_fnv != p.state_fnv {
                return Err(format!(
                    "its parent snapshot {} is not the one it was taken over (it was replaced)",
                    p.dir.display()
                ));
            }
            if parent.memory != self.memory {
                return Err(format!(
                    "its parent snapshot {} has another memory layout",
                    p.dir.display()
                ));
            }
            next = parent.parent.clone();
            chain.push((p.dir, parent));
        }
        let layers =
            std::iter::once((dir, self)).chain(chain.iter().map(|(d, s)| (d.as_path(), s)));
        let mut layers: Vec<(&Path, &Snapshot)> = layers.collect();
        layers.reverse();
        let (base_dir, base) = layers[0];
        let total: u64 = self.memory.iter().map(|(_, l)| l).sum();
        let mut mapped = Vec::new();
        if lazy {
            base.map_memory(base_dir, mem)?;
            mapped.push((base_dir.join(MEMORY_FILE), total));
        } else {
            base.load_memory(base_dir, mem)?;
        }
        for (d, s) in &layers[1..] {
            if s.apply_diff(d, mem, lazy)? {
                mapped.push((d.join(MEMORY_FILE), total));
            }
        }
        if !mapped.is_empty() {
            guard_mapped_memory(mapped, mem);
        }
        Ok(())
    }

    /// Puts a diff snapshot's pages over `mem`; true when they are mapped from its memory file
    /// (rather than read).
    fn apply_diff(&self, dir: &Path, mem: &GuestMemoryMmap, lazy: bool) -> Result<bool, String> {
        use std::os::unix::fs::FileExt;
        let (f, path) = self.open_memory(dir, mem)?;
        let total: u64 = self.memory.iter().map(|(_, l)| l).sum();
        let pages = total.div_ceil(PAGE);
        let dpath = dir.join(DIRTY_FILE);
        let want = pages.div_ceil(64) * 8;
        // Its length is known: no more than that is read.
        let mut words = Vec::new();
        std::fs::File::open(&dpath)
            .and_then(|f| {
                use std::io::Read;
                f.take(want + 1).read_to_end(&mut words)
            })
            .map_err(|e| format!("cannot read {}: {e}", dpath.display()))?;
        if words.len() as u64 != want || fnv(FNV_INIT, &words) != self.dirty_fnv {
            return Err(format!("{} is corrupted or truncated", dpath.display()));
        }
        let bits: Vec<u64> = words
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        let pieces = run_pieces(mem, &page_runs(&bits, pages));
        // Each mapped piece is a mapping of its own; past a few thousand, reading is cheaper
        // than the mappings (and the process's mapping limit is far away).
        let map = lazy && pieces.len() <= 4096;
        let mut h = FNV_INIT;
        for (ptr, off, n) in pieces {
            if map {
                // SAFETY: the piece lies inside one live region of `mem` (`run_pieces`); no vCPU
                // runs yet.
                unsafe { map_over(ptr, n, &f, off, &path) }?;
            } else {
                // SAFETY: the piece lies inside one live region of `mem` (`run_pieces`); no vCPU
                // runs yet and nothing else references these bytes while they are read.
                let bytes = unsafe { std::slice::from_raw_parts_mut(ptr, n as usize) };
                f.read_exact_at(bytes, off)
                    .map_err(|e| format!("{} is unreadable: {e}", path.display()))?;
                h = fnv(h, bytes);
            }
        }
        if !lazy && h != self.memory_fnv {
            return Err(format!(
                "{} is corrupted (checksum mismatch)",
                path.display()
            ));
        }
        Ok(map)
    }

    /// Opens `dir/memory.bin` once `mem` has the snapshot's layout and the file the length of
    /// the snapshot's memory (holes included); returns it with its path.
    fn open_memory(
        &self,
        dir: &Path,
        mem: &GuestMemoryMmap,
    ) -> Result<(std::fs::File, PathBuf), String> {
        self.check_layout(mem)?;
        let path = dir.join(MEMORY_FILE);
        let f = std::fs::File::open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let total: u64 = self.memory.iter().map(|(_, l)| l).sum();
        let len = f.metadata().map_err(|e| e.to_string())?.len();
        if len != total {
            return Err(format!(
                "{} has {len} bytes, the VM's memory {total}: it is truncated or not this snapshot's",
                path.display()
            ));
        }
        Ok((f, path))
    }

    /// Maps `dir/memory.bin` copy-on-write over `mem`'s regions (`MAP_PRIVATE|MAP_FIXED` at the
    /// same host addresses, which KVM's memslots keep pointing at): pages load on first touch,
    /// so restoring costs the same for any guest size. The layout and the file's length are
    /// checked; the memory checksum is not (that would read every page).
    pub fn map_memory(&self, dir: &Path, mem: &GuestMemoryMmap) -> Result<(), String> {
        let (f, path) = self.open_memory(dir, mem)?;
        let mut offset = 0u64;
        for r in mem.iter() {
            // SAFETY: the range is exactly a live mapping owned by `mem` (it stays owned and is
            // unmapped by it later), and no vCPU runs yet.
            unsafe { map_over(r.as_ptr(), r.len(), &f, offset, &path) }?;
            offset += r.len();
        }
        Ok(())
    }

    /// Loads `dir/memory.bin` into `mem` (eagerly), checking layout and checksum.
    pub fn load_memory(&self, dir: &Path, mem: &GuestMemoryMmap) -> Result<(), String> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::FileExt;
        let (f, path) = self.open_memory(dir, mem)?;
        // Only the file's data is read: its holes are pages of zeroes, which the freshly built
        // VM's memory already is (they still count in the checksum).
        let seek = |off: u64, whence: libc::c_int| -> Option<u64> {
            // SAFETY: lseek on a descriptor we own; it only moves the file offset.
            let r = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, whence) };
            u64::try_from(r).ok()
        };
        let mut h = FNV_INIT;
        let mut base = 0u64;
        for r in mem.iter() {
            // SAFETY: the region is a live mapping of `len()` bytes owned by `mem`; no vCPU runs
            // yet, and nothing else holds a reference into it.
            let bytes = unsafe { std::slice::from_raw_parts_mut(r.as_ptr(), r.len() as usize) };
            let end = r.len();
            let mut pos = 0u64;
            while pos < end {
                // Where data starts (a filesystem without holes says: here).
                let data = seek(base + pos, libc::SEEK_DATA)
                    .map_or(end, |d| d.saturating_sub(base).min(end))
                    .max(pos);
                h = fnv_zeroes(h, data - pos);
                pos = data;
                if pos >= end {
                    break;
                }
                let hole = seek(base + pos, libc::SEEK_HOLE)
                    .map_or(end, |d| d.saturating_sub(base).min(end))
                    .max(pos + 1);
                let chunk = &mut bytes[pos as usize..hole as usize];
                f.read_exact_at(chunk, base + pos)
                    .map_err(|e| format!("{} is truncated or unreadable: {e}", path.display()))?;
                h = fnv(h, chunk);
                pos = hole;
            }
            base += end;
        }
        if h != self.memory_fnv {
            return Err(format!(
                "{} is corrupted (checksum mismatch)",
                path.display()
            ));
        }
        Ok(())
    }
}

/// The memory files a lazily restored VM's RAM is mapped from, with the length each had.
static MAPPED_FILES: std::sync::Mutex<Vec<(PathBuf, u64)>> = std::sync::Mutex::new(Vec::new());

/// Host address ranges (start, length) of the guest RAM mapped from memory files, for the
/// SIGBUS handler (a length of 0 ends the list).
static MAPPED_RANGES: [(AtomicUsize, AtomicUsize); 4] = [
    (AtomicUsize::new(0), AtomicUsize::new(0)),
    (AtomicUsize::new(0), AtomicUsize::new(0)),
    (AtomicUsize::new(0), AtomicUsize::new(0)),
    (AtomicUsize::new(0), AtomicUsize::new(0)),
];

/// The line the SIGBUS handler writes (a leaked buffer, so the handler only reads memory).
static SIGBUS_MESSAGE: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
static SIGBUS_MESSAGE_LEN: AtomicUsize = AtomicUsize::new(0);

/// Exit status after a lost memory file (tern's status for VMM errors).
const EXIT_MEMORY_LOST: libc::c_int = 1;

/// `si_code` of a SIGBUS for an access to a mapped page past the end of its file.
const BUS_ADRERR: libc::c_int = 2;

use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

/// What tern says when the memory files under a lazily restored VM lost pages it maps.
fn lost_memory_message(files: &[(PathBuf, u64)]) -> String {
    let names: Vec<String> = files.iter().map(|(p, _)| p.display().to_string()).collect();
    format!(
        "guest memory mapped from {} cannot be read any more: the file was truncated or shrunk under the lazily restored VM; stopping it",
        names.join(", ")
    )
}

/// Reached when a thread touches a page of a mapped memory file that no longer exists (the
/// file was truncated under the VM): host code (devices, snapshots) gets SIGBUS there. Writes
/// one line and ends tern; a SIGBUS anywhere else gets the default action.
extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel hands an SA_SIGINFO handler a valid siginfo; for SIGBUS its fault
    // address is set.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    let ours = code == BUS_ADRERR
        && MAPPED_RANGES.iter().any(|(s, l)| {
            let (s, l) = (s.load(Ordering::Acquire), l.load(Ordering::Acquire));
            l != 0 && addr >= s && addr - s < l
        });
    let msg = SIGBUS_MESSAGE.load(Ordering::Acquire);
    if ours && !msg.is_null() {
        crate::terminal::restore_from_signal_handler();
        // SAFETY: `msg` points to a leaked buffer of SIGBUS_MESSAGE_LEN bytes that is never
        // freed; write(2) and _exit(2) are async-signal-safe.
        unsafe {
            libc::write(2, msg.cast(), SIGBUS_MESSAGE_LEN.load(Ordering::Acquire));
            libc::_exit(EXIT_MEMORY_LOST);
        }
    }
    // Not a page of a memory file: back to the default action, which the faulting access
    // meets when it runs again.
    // SAFETY: signal(2) is async-signal-safe and only changes this signal's disposition.
    unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
}

/// Records that `mem` is mapped from `files` and installs the SIGBUS handler that reports a
/// truncated memory file in one line instead of tern dying silently.
fn guard_mapped_memory(files: Vec<(PathBuf, u64)>, mem: &GuestMemoryMmap) {
    let line = format!("tern: {}\n", lost_memory_message(&files));
    let buf: &'static mut [u8] = Box::leak(line.into_bytes().into_boxed_slice());
    SIGBUS_MESSAGE_LEN.store(buf.len(), Ordering::Release);
    SIGBUS_MESSAGE.store(buf.as_mut_ptr(), Ordering::Release);
    for (slot, r) in MAPPED_RANGES.iter().zip(
        mem.iter()
            .map(|r| (r.as_ptr() as usize, r.len() as usize))
            .chain(std::iter::repeat((0, 0))),
    ) {
        slot.1.store(0, Ordering::Release);
        slot.0.store(r.0, Ordering::Release);
        slot.1.store(r.1, Ordering::Release);
    }
    *MAPPED_FILES.lock().unwrap_or_else(|p| p.into_inner()) = files;
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        // SAFETY: a zeroed sigaction is valid; the handler has the SA_SIGINFO signature and
        // only calls async-signal-safe functions.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigbus
                as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void)
                as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) != 0 {
                tracing::warn!(
                    "cannot install the SIGBUS handler: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    });
}

/// For a lazily restored VM: one line naming the memory files when one of them is now
/// shorter than when it was mapped (the guest then lost memory, and may have crashed for
/// it), else None.
pub fn mapped_memory_lost() -> Option<String> {
    let files = MAPPED_FILES.lock().unwrap_or_else(|p| p.into_inner());
    let lost = files
        .iter()
        .any(|(p, len)| std::fs::metadata(p).is_ok_and(|m| m.len() < *len));
    lost.then(|| lost_memory_message(&files))
}

/// [`fnv`] over `n` zero bytes (n a multiple of 8, or the tail of a call): every step XORs
/// zero and multiplies by the prime, so it is `h * prime^steps`.
fn fnv_zeroes(h: u64, n: u64) -> u64 {
    const PRIME: u64 = 0x0100_0000_01b3;
    let (mut steps, mut base, mut acc) = (n / 8 + n % 8, PRIME, 1u64);
    while steps > 0 {
        if steps & 1 == 1 {
            acc = acc.wrapping_mul(base);
        }
        base = base.wrapping_mul(base);
        steps >>= 1;
    }
    h.wrapping_mul(acc)
}

#[cfg(test)]
mod tests {
    use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
    use kvm_ioctls::Kvm;

    use super::*;

    const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
    /// LVT timer register offset in the LAPIC page; mode bits 18:17 = 10b is TSC-deadline.
    const APIC_LVTT: usize = 0x320;
    const LVTT_TSC_DEADLINE: u32 = 2 << 17;

    /// KVM, or None after a loud skip (a failure under CI=true).
    fn kvm(test: &str) -> Option<Kvm> {
        match Kvm::new() {
            Ok(k) => Some(k),
            Err(e) if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") => {
                panic!("{test}: /dev/kvm is required under CI=true but cannot be opened: {e}")
            }
            Err(e) => {
                eprintln!("\n*** SKIPPED {test}: /dev/kvm cannot be opened ({e}); this test needs KVM ***\n");
                None
            }
        }
    }

    /// A VM with an in-kernel irqchip and one vCPU with KVM's supported CPUID (which offers
    /// the TSC-deadline timer).
    fn vm_and_vcpu(kvm: &Kvm) -> (VmFd, VcpuFd) {
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        vcpu.set_cpuid2(&cpuid).unwrap();
        (vm, vcpu)
    }

    fn tsc_deadline(vcpu: &VcpuFd) -> u64 {
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_IA32_TSC_DEADLINE,
            ..Default::default()
        }])
        .unwrap();
        assert_eq!(vcpu.get_msrs(&mut msrs).unwrap(), 1);
        msrs.as_slice()[0].data
    }

    /// A guest's armed TSC-deadline timer survives save and restore (KVM ignores the deadline
    /// MSR unless the LAPIC is already in TSC-deadline mode, so the order of restoring matters;
    /// a lost deadline leaves a Linux guest waiting for a timer interrupt forever).
    #[test]
    fn restore_keeps_an_armed_tsc_deadline_timer() {
        let Some(kvm) = kvm("restore_keeps_an_armed_tsc_deadline_timer") else {
            return;
        };
        let (_vm, a) = vm_and_vcpu(&kvm);
        let mut lapic = a.get_lapic().unwrap();
        let lvtt = LVTT_TSC_DEADLINE | 0xec;
        for (i, b) in lvtt.to_le_bytes().iter().enumerate() {
            lapic.regs[APIC_LVTT + i] = *b as _;
        }
        a.set_lapic(&lapic).unwrap();
        // Far in the future: the timer must stay armed, not fire.
        let deadline = 1u64 << 60;
        let msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_IA32_TSC_DEADLINE,
            data: deadline,
            ..Default::default()
        }])
        .unwrap();
        assert_eq!(a.set_msrs(&msrs).unwrap(), 1);
        assert_eq!(
            tsc_deadline(&a),
            deadline,
            "KVM did not arm the deadline timer"
        );

        let msr_list = kvm.get_msr_index_list().unwrap();
        let saved = save_vcpu(&a, msr_list.as_slice()).unwrap();
        assert!(saved.msrs.iter().any(|m| m.index == MSR_IA32_TSC_DEADLINE));
        let (_vm2, b) = vm_and_vcpu(&kvm);
        restore_vcpu(&b, &saved).unwrap();
        assert_eq!(
            tsc_deadline(&b),
            deadline,
            "the restored vCPU lost its TSC-deadline timer"
        );
    }

    fn leaf(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: if function == 0x7 || function == 0xd {
                1
            } else {
                0
            },
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    /// A `state.json` past [`MAX_STATE_SIZE`] is refused before it is read whole.
    #[test]
    fn oversized_state_is_refused() {
        let dir = std::env::temp_dir().join(format!("tern-state-size-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = std::fs::File::create(dir.join(STATE_FILE)).unwrap();
        // Sparse; one byte over the limit.
        f.set_len(MAX_STATE_SIZE + 1).unwrap();
        let e = read(&dir).err().unwrap();
        assert_eq!(
            e,
            format!(
                "{} is larger than 16 MiB: not a tern snapshot's state",
                dir.join(STATE_FILE).display()
            )
        );
        f.set_len(MAX_STATE_SIZE).unwrap();
        let e = read(&dir).err().unwrap();
        assert!(e.contains("is not a tern snapshot"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }

    /// The SIGBUS message and the check after a lazily restored VM's crash name the memory
    /// files, and only a file that shrank counts as lost.
    #[test]
    fn lost_memory_files_are_named() {
        let dir = std::env::temp_dir().join(format!("tern-lost-mem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(MEMORY_FILE);
        std::fs::write(&p, vec![0u8; 8192]).unwrap();
        let m = lost_memory_message(&[(p.clone(), 8192)]);
        assert!(
            m.starts_with(&format!("guest memory mapped from {} ", p.display())),
            "{m}"
        );
        assert!(!m.contains('\n'));
        *MAPPED_FILES.lock().unwrap() = vec![(p.clone(), 8192)];
        assert_eq!(mapped_memory_lost(), None);
        std::fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(4096)
            .unwrap();
        assert_eq!(mapped_memory_lost(), Some(m));
        MAPPED_FILES.lock().unwrap().clear();
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn checksum_of_zeroes_without_reading_them() {
        for n in [0u64, 8, 4096, 3 * 4096 + 8, 1 << 20] {
            let zeroes = vec![0u8; n as usize];
            assert_eq!(fnv_zeroes(12345, n), fnv(12345, &zeroes), "{n} bytes");
        }
        assert_eq!(fnv_zeroes(7, 13), fnv(7, &[0u8; 13]));
    }

    #[test]
    fn zero_pages_are_skipped() {
        let mut d = vec![0u8; 5 * 4096 + 100];
        d[4096 + 7] = 1; // page 1
        d[2 * 4096] = 2; // page 2
        d[5 * 4096 + 99] = 3; // the partial last page
        assert_eq!(nonzero_runs(&d), vec![(4096, 2 * 4096), (5 * 4096, 100)]);
        assert!(nonzero_runs(&[0u8; 8192]).is_empty());
        // The checksum of the scan is the plain one.
        assert_eq!(scan_pages(99, &d).0, fnv(99, &d));
    }

    #[test]
    fn cpu_features_must_be_a_subset_of_the_hosts() {
        let host = vec![
            leaf(0x1, 0, [0, 0, 0x8000_0001, 0xff]),
            leaf(0x7, 0, [0, 0b1011, 0, 0]),
            leaf(0x7, 1, [0, 0, 0, 0]),
        ];
        // Fewer features than the host: fine.
        let older = vec![
            leaf(0x1, 0, [0, 0, 1, 0x0f]),
            leaf(0x7, 0, [0, 0b0001, 0, 0]),
        ];
        assert!(check_cpu_features(&older, &host).is_ok());
        // A feature the host lacks (leaf 7 ebx bit 2): refused, naming it.
        let newer = vec![
            leaf(0x1, 0, [0, 0, 1, 0x0f]),
            leaf(0x7, 0, [0, 0b0101, 0, 0]),
        ];
        let e = check_cpu_features(&newer, &host).unwrap_err();
        assert!(e.contains("CPUID 0x7.0 ebx bits 0x4"), "{e}");
        // A leaf the host does not have at all.
        let e = check_cpu_features(&[leaf(0x8000_0001, 0, [0, 0, 0x20, 0])], &host).unwrap_err();
        assert!(e.contains("CPUID 0x80000001.0 ecx bits 0x20"), "{e}");
        // OSXSAVE and OSPKE come from the guest's CR4 (KVM sets them in a running vCPU's
        // CPUID), never from the host's set: a guest that enabled XSAVE restores.
        let xsave_guest = vec![
            leaf(0x1, 0, [0, 0, 1 | 1 << 27, 0x0f]),
            leaf(0x7, 0, [0, 0b0001, 1 << 4, 0]),
        ];
        assert!(check_cpu_features(&xsave_guest, &host).is_ok());
    }
}
