//! Guest memory as its owner keeps it: the RAM regions and their KVM slots, and the dirty log
//! (pages vCPUs wrote, from KVM; pages devices wrote, from the VM's `virtio::dirty::DirtyLog`),
//! which can be switched on and off at any time, read and cleared.

use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use arch::GuestMemoryMmap;
use virtio::VmMemory;

use crate::error::{kvm_err, VmmError};

/// The regions of guest memory `config` asks for, as (guest address, size): RAM below and
/// above the 32-bit hole, then the hotpluggable region of its virtio-mem device, if any.
pub fn layout(config: &crate::VmConfig) -> Vec<(u64, u64)> {
    arch::memory::guest_regions(config.memory.0, config.hotplug_memory())
}

/// Guests with at least this much RAM ask for transparent huge pages (see [`allocate`]).
pub const THP_MIN_BYTES: u64 = 256 << 20;

/// Asks the host for transparent huge pages under guest RAM, where it offers them on request:
/// fewer TLB misses for the guest, and O_DIRECT disk I/O into guest memory pins 2 MiB pages
/// instead of 4 KiB ones (1 MiB reads into a 256 MiB probe guest went from 670 to 2290 MB/s).
fn advise_huge_pages(mem: &GuestMemoryMmap) {
    let advice = libc::MADV_HUGEPAGE;
    for region in mem.iter() {
        // SAFETY: advice on a mapping we own, over exactly its extent; it changes no contents.
        let r = unsafe { libc::madvise(region.as_ptr().cast(), region.len() as usize, advice) };
        if r != 0 {
            tracing::debug!(
                "madvise({advice}) on guest memory: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Allocates guest memory for `regions` (see [`layout`]) from private anonymous memory, which
/// the host only backs as the guest touches it. Guests of [`THP_MIN_BYTES`] or more get huge
/// pages, before a kernel is loaded into them: a kernel image loaded into 4 KiB pages stays in
/// them, and the guest then takes a nested page fault for each one it touches (see
/// [`advise_loaded`]). Smaller ones do not ask, because on a host that gives huge pages only
/// on request every 2 MiB page a small guest touches at all would count whole against the
/// VM's memory (a 64 MiB guest that touches little took 2 MiB more); their kernel gets huge
/// pages from [`advise_loaded`]. Nor are they told `MADV_NOHUGEPAGE`: a host whose THP setting
/// is `always` gives them huge pages, as it does Firecracker's and QEMU's guests (in tern's
/// nested rig, a 128 MiB guest's memory in 4 KiB pages cost it 7,800 nested page faults and
/// 1 s of a 3 s boot).
pub fn allocate(regions: &[(u64, u64)]) -> Result<GuestMemoryMmap, VmmError> {
    let mem = map_anonymous(regions)?;
    let size: u64 = mem.iter().map(|r| r.len()).sum();
    if size >= THP_MIN_BYTES {
        advise_huge_pages(&mem);
    }
    Ok(mem)
}

fn map_anonymous(regions: &[(u64, u64)]) -> Result<GuestMemoryMmap, VmmError> {
    let size: u64 = regions.iter().map(|r| r.1).sum();
    let ranges: Vec<(GuestAddress, usize)> = regions
        .iter()
        .map(|&(a, s)| (GuestAddress(a), s as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| VmmError::Memory(size >> 20, e.to_string()))
}

/// The size of a transparent huge page on x86-64.
const HUGE_PAGE: usize = 2 << 20;

/// Huge pages for what a kernel boot loaded into a guest smaller than [`THP_MIN_BYTES`]:
/// the 2 MiB blocks that lie whole inside the kernel image and the initrd (`loaded`, as guest
/// address and length; the image as `BootInfo::kernel` gives it, the memory the kernel uses
/// from its first instructions on) are advised `MADV_HUGEPAGE` and collapsed into huge pages
/// (`MADV_COLLAPSE`, Linux 6.1 and later). Left in 4 KiB pages, every page of the image the
/// guest touches costs it one nested page fault (about 10,000 for a 46 MiB Debian kernel),
/// which in tern's nested rig took 0.5 s of a 2.6 s boot. The rest of a small guest is left to
/// the host's THP setting, and a small image (the probe's) lies whole in no block, so what
/// the guest is charged grows at most by the parts of those blocks the loader did not write
/// (an ELF's bss, for one). Larger guests are advised huge pages before the load (see
/// [`allocate`]) and need nothing here. Best effort: a host that refuses leaves the pages as
/// they are.
pub fn advise_loaded(mem: &GuestMemoryMmap, loaded: &[(u64, u64)]) {
    let size: u64 = mem.iter().map(|r| r.len()).sum();
    if size >= THP_MIN_BYTES {
        return;
    }
    for &(gpa, len) in loaded {
        let Some(region) = mem.find_region(GuestAddress(gpa)) else {
            continue;
        };
        let offset = gpa - region.start_addr().0;
        let len = len.min(region.len() - offset) as usize;
        let host = region.as_ptr() as usize + offset as usize;
        // KVM maps a huge page into the guest only where guest and host addresses agree
        // modulo its size.
        if (host as u64 ^ gpa) & (HUGE_PAGE as u64 - 1) != 0 {
            continue;
        }
        let first = host.next_multiple_of(HUGE_PAGE);
        let end = (host + len) & !(HUGE_PAGE - 1);
        if first >= end {
            continue;
        }
        for advice in [libc::MADV_HUGEPAGE, libc::MADV_COLLAPSE] {
            // SAFETY: advice on whole 2 MiB blocks inside a guest memory mapping this process
            // owns; neither changes the memory's contents (MADV_COLLAPSE copies them into a
            // huge page).
            if unsafe { libc::madvise(first as *mut libc::c_void, end - first, advice) } != 0 {
                tracing::debug!(
                    "madvise({advice}) on the loaded kernel and initrd: {}",
                    std::io::Error::last_os_error()
                );
                break;
            }
        }
    }
}

/// Allocates guest memory for `regions` (see [`layout`]), backed by one shared memory file
/// (regions at their offsets in it, end to end): what a local migration hands over. With
/// `file`, maps that one (received from the tern the VM comes from) instead of making one.
pub fn allocate_shared(
    regions: &[(u64, u64)],
    file: Option<std::fs::File>,
) -> Result<(GuestMemoryMmap, std::fs::File), VmmError> {
    use vm_memory::FileOffset;
    let size: u64 = regions.iter().map(|r| r.1).sum();
    let err = |e: String| VmmError::Memory(size >> 20, e);
    let file = match file {
        Some(f) => {
            let len = f.metadata().map_err(|e| err(e.to_string()))?.len();
            if len != size {
                return Err(err(format!(
                    "the shared memory handed over holds {len} bytes, not {size}"
                )));
            }
            f
        }
        None => {
            // SAFETY: memfd_create with a NUL-terminated name; the descriptor is owned below.
            let fd = unsafe { libc::memfd_create(c"tern-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
            if fd < 0 {
                return Err(err(format!(
                    "memfd_create: {}",
                    std::io::Error::last_os_error()
                )));
            }
            // SAFETY: `fd` is a fresh descriptor nobody else owns.
            let f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            f.set_len(size).map_err(|e| err(e.to_string()))?;
            f
        }
    };
    let mut offset = 0u64;
    let mut ranges = Vec::new();
    for &(a, s) in regions {
        let f = file.try_clone().map_err(|e| err(e.to_string()))?;
        ranges.push((
            GuestAddress(a),
            s as usize,
            Some(FileOffset::new(f, offset)),
        ));
        offset += s;
    }
    let mem = GuestMemoryMmap::from_ranges_with_files(&ranges).map_err(|e| err(e.to_string()))?;
    Ok((mem, file))
}

/// The parts of `[offset, offset + len)` of `file` that hold data, as (offset from `offset`,
/// length) in whole pages (`SEEK_DATA`/`SEEK_HOLE`); None when the file system cannot tell.
pub fn data_extents(file: &std::fs::File, offset: u64, len: u64) -> Option<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let end = offset + len;
    let mut out = Vec::new();
    let mut at = offset;
    while at < end {
        // SAFETY: lseek on a descriptor we own; it only moves the file offset.
        let data = unsafe { libc::lseek(file.as_raw_fd(), at as i64, libc::SEEK_DATA) };
        if data < 0 {
            return match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::ENXIO) => Some(out),
                _ => None,
            };
        }
        let data = (data as u64).min(end);
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(file.as_raw_fd(), data as i64, libc::SEEK_HOLE) };
        if hole < 0 {
            return None;
        }
        let hole = (hole as u64).min(end);
        let start = data / virtio::dirty::PAGE_SIZE * virtio::dirty::PAGE_SIZE;
        let stop = hole.div_ceil(virtio::dirty::PAGE_SIZE) * virtio::dirty::PAGE_SIZE;
        out.push((start - offset, stop.min(end) - start));
        at = hole;
    }
    Some(out)
}

/// The pages of `[host, host + len)` of this process's memory that the host gave it (present
/// or swapped out, per `pagemap`, `/proc/self/pagemap`), as runs of (offset from `host`,
/// length); None when `pagemap` cannot be read.
pub fn present_extents(pagemap: &std::fs::File, host: u64, len: u64) -> Option<Vec<(u64, u64)>> {
    use std::os::unix::fs::FileExt;
    const PAGE: u64 = virtio::dirty::PAGE_SIZE;
    // Entries read at a time (8 bytes each: bit 63 present, bit 62 swapped).
    const CHUNK: u64 = 4096;
    let pages = len / PAGE;
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut buf = vec![0u8; (CHUNK * 8) as usize];
    let mut p = 0;
    while p < pages {
        let n = (pages - p).min(CHUNK);
        let bytes = &mut buf[..(n * 8) as usize];
        pagemap.read_exact_at(bytes, (host / PAGE + p) * 8).ok()?;
        for (i, e) in bytes.chunks_exact(8).enumerate() {
            let e = u64::from_le_bytes(e.try_into().unwrap_or_default());
            if e & (3 << 62) == 0 {
                continue;
            }
            let off = (p + i as u64) * PAGE;
            match out.last_mut() {
                Some((start, l)) if *start + *l == off => *l += PAGE,
                _ => out.push((off, PAGE)),
            }
        }
        p += n;
    }
    Some(out)
}

/// The KVM memory slots of `mem`: slot `i` is region `i`, logging dirty pages when `log`.
pub fn slots(mem: &GuestMemoryMmap, log: bool) -> Vec<kvm_userspace_memory_region> {
    mem.iter()
        .enumerate()
        .map(|(slot, region)| kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if log { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        })
        .collect()
}

/// Registers `slots` with KVM.
///
/// # Safety
/// Each slot must describe a live mapping that outlives the VM fd (or its re-registration).
pub unsafe fn register(vm: &VmFd, slots: Vec<kvm_userspace_memory_region>) -> Result<(), VmmError> {
    for r in slots {
        // SAFETY: the caller guarantees the mapping outlives the slot.
        unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("register guest memory"))?;
    }
    Ok(())
}

/// A VM's guest memory and its dirty log.
pub struct GuestRam {
    mem: GuestMemoryMmap,
    /// The same memory as the devices share it, with the log of what they write.
    shared: VmMemory,
    vm: Arc<VmFd>,
    /// Pages written before a snapshot that failed: still dirty for the next one.
    carry: Mutex<Vec<u64>>,
    /// The shared memory file behind `mem`, when it has one.
    backing: Option<std::fs::File>,
    /// A snapshot's memory file is mapped over guest memory (lazy restore): pages not yet
    /// faulted in hold the file's contents, not zeroes.
    file_mapped: std::sync::atomic::AtomicBool,
}

impl GuestRam {
    /// `mem`, registered with `vm` already (dirty log off).
    pub fn new(mem: GuestMemoryMmap, vm: Arc<VmFd>, backing: Option<std::fs::File>) -> GuestRam {
        GuestRam {
            shared: VmMemory::new(mem.clone()),
            mem,
            vm,
            carry: Mutex::new(Vec::new()),
            backing,
            file_mapped: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Notes that a snapshot's memory file is mapped over guest memory (a lazy restore).
    pub fn set_file_mapped(&self) {
        self.file_mapped
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Which parts of guest memory may hold anything but zeroes, as (guest address, length)
    /// in whole pages: for shared memory, the parts of its file that hold data; for private
    /// anonymous memory, the pages the host ever gave it (present or swapped out, per
    /// `pagemap`, this process's `/proc/self/pagemap`); all of it otherwise (a lazily
    /// restored snapshot's mapping, or when the kernel cannot tell). The rest reads as zeroes
    /// and need not be read (reading it would fault it in).
    pub fn extents_with_data(&self, pagemap: Option<&std::fs::File>) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut offset = 0u64;
        let file_mapped = self.file_mapped.load(std::sync::atomic::Ordering::SeqCst);
        for r in self.mem.iter() {
            let (addr, len) = (r.start_addr().0, r.len());
            let found = match (&self.backing, pagemap) {
                (Some(f), _) => data_extents(f, offset, len),
                (None, Some(pm)) if !file_mapped => present_extents(pm, r.as_ptr() as u64, len),
                _ => None,
            };
            match found {
                Some(e) => out.extend(e.into_iter().map(|(o, l)| (addr + o, l))),
                None => out.push((addr, len)),
            }
            offset += len;
        }
        out
    }

    /// The shared memory file behind guest memory (`memory_shared`), if any.
    pub fn backing(&self) -> Option<&std::fs::File> {
        self.backing.as_ref()
    }

    /// The memory.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The memory as devices share it.
    pub fn shared(&self) -> &VmMemory {
        &self.shared
    }

    /// Whether the dirty log is on.
    pub fn logging(&self) -> bool {
        self.shared.dirty().is_on()
    }

    /// Starts logging written pages from now on: KVM's log on every slot (`registered`: the
    /// slots were registered with logging on already), and a clean device bitmap.
    pub fn start_dirty_log(&self, registered: bool) -> Result<(), VmmError> {
        if !registered {
            // SAFETY: the same live mappings as registered at build, which `self.mem` keeps.
            unsafe { register(&self.vm, slots(&self.mem, true)) }?;
        }
        self.shared.start_dirty_log();
        Ok(())
    }

    /// Stops logging written pages: KVM's log off on every slot, the device bitmap dropped.
    pub fn stop_dirty_log(&self) -> Result<(), VmmError> {
        self.shared.dirty().stop();
        // SAFETY: the same live mappings as registered at build, which `self.mem` keeps.
        unsafe { register(&self.vm, slots(&self.mem, false)) }
    }

    /// Marks `[addr, addr + len)` written by tern itself (while logging).
    pub fn mark(&self, addr: u64, len: u64) {
        self.shared.dirty().mark(addr, len);
    }

    /// The pages written since the last call (by vCPUs: KVM's dirty log; by devices: their
    /// log; and any carried over from a failed snapshot), one bit per page of the regions end
    /// to end; clears them. None when the log is off.
    pub fn take_dirty(&self) -> Result<Option<Vec<u64>>, String> {
        let Some(mut bits) = self.shared.dirty().take() else {
            return Ok(None);
        };
        let carry = std::mem::take(&mut *self.carry.lock().unwrap_or_else(|p| p.into_inner()));
        for (w, c) in bits.iter_mut().zip(carry) {
            *w |= c;
        }
        let mut first = 0u64;
        for (slot, r) in self.mem.iter().enumerate() {
            let log = self
                .vm
                .get_dirty_log(slot as u32, r.len() as usize)
                .map_err(|e| format!("KVM dirty log of memory slot {slot}: {e}"))?;
            let pages = r.len().div_ceil(virtio::dirty::PAGE_SIZE);
            for p in 0..pages {
                if log
                    .get((p / 64) as usize)
                    .is_some_and(|w| w & (1 << (p % 64)) != 0)
                {
                    let g = first + p;
                    if let Some(w) = bits.get_mut((g / 64) as usize) {
                        *w |= 1 << (g % 64);
                    }
                }
            }
            first += pages;
        }
        Ok(Some(bits))
    }

    /// Keeps `bits` (taken for a snapshot that then failed) dirty for the next take.
    pub fn carry(&self, bits: Vec<u64>) {
        *self.carry.lock().unwrap_or_else(|p| p.into_inner()) = bits;
    }
}

/// Frees guest memory the guest gave back (a balloon): the way depends on what backs it, and
/// the range reads as zeroes afterwards in every case.
impl virtio::devices::Discard for GuestRam {
    fn discard(&self, addr: u64, len: u64) -> std::io::Result<()> {
        let region = self
            .mem
            .iter()
            .find(|r| {
                let start = r.start_addr().0;
                addr >= start && addr.checked_add(len).is_some_and(|e| e <= start + r.len())
            })
            .ok_or_else(|| {
                std::io::Error::other(format!("{addr:#x}+{len:#x} is not within one RAM region"))
            })?;
        let host = region.as_ptr() as usize + (addr - region.start_addr().0) as usize;
        let ptr = host as *mut libc::c_void;
        let len = len as usize;
        let file_mapped = self.file_mapped.load(std::sync::atomic::Ordering::SeqCst);
        let ok = if file_mapped {
            // A snapshot's file mapped copy-on-write: MADV_DONTNEED would bring the file's
            // pages back, not zeroes. Fresh anonymous memory goes over the range instead.
            // SAFETY: [ptr, ptr + len) lies in one region of guest memory, which tern keeps
            // mapped for the VM's life; replacing its pages is what the guest asked for (it
            // gave them up), and KVM follows the new mapping through its MMU notifier.
            let p = unsafe {
                libc::mmap(
                    ptr,
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            p == ptr
        } else {
            // Shared memory (a memfd): MADV_REMOVE frees the file's pages too. Private
            // anonymous memory: MADV_DONTNEED.
            let advice = if self.backing.is_some() {
                libc::MADV_REMOVE
            } else {
                libc::MADV_DONTNEED
            };
            // SAFETY: as above; the advice only drops the range's pages.
            unsafe { libc::madvise(ptr, len, advice) == 0 }
        };
        if ok {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    /// The field `key` (`VmFlags:`, `AnonHugePages:`) of the mapping that holds `addr`, from
    /// /proc/self/smaps. Tests run in parallel threads, and the kernel merges neighbouring
    /// mappings with the same flags, so a mapping need not start where one of them put it.
    fn smaps_field(addr: usize, key: &str) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            let range = line.split_once(' ').and_then(|(r, _)| r.split_once('-'));
            if let Some((lo, hi)) = range {
                if let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                {
                    inside = (lo..hi).contains(&addr);
                    continue;
                }
            }
            if inside {
                if let Some(v) = line.strip_prefix(key) {
                    return v.to_string();
                }
            }
        }
        panic!("no {key} for a mapping holding {addr:#x}")
    }

    fn vm_flags(addr: usize) -> String {
        smaps_field(addr, "VmFlags:")
    }

    /// A test that cannot get what it needs: fails under `CI=true`, where the machine must
    /// have it, and says loudly that it is skipped elsewhere.
    fn skip(why: &str) {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but {why}"
        );
        eprintln!("SKIPPED: {why}");
    }

    #[test]
    fn huge_pages_only_for_large_guests() {
        if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
            // The advice fails (EINVAL) on a kernel without THP, and sets no flag.
            skip("this kernel has no transparent huge pages");
            return;
        }
        let small = allocate(&[(0, 64 << 20)]).unwrap();
        let flags = vm_flags(small.iter().next().unwrap().as_ptr() as usize);
        assert!(!flags.contains(" nh"), "64 MiB: {flags}");
        assert!(!flags.contains(" hg"), "64 MiB: {flags}");
        let large = allocate(&[(0, THP_MIN_BYTES)]).unwrap();
        let flags = vm_flags(large.iter().next().unwrap().as_ptr() as usize);
        assert!(flags.contains(" hg"), "256 MiB: {flags}");
        assert!(!flags.contains(" nh"), "256 MiB: {flags}");
    }

    /// The AnonHugePages of the mapping that holds `addr`, in KiB.
    fn anon_huge_kib(addr: usize) -> u64 {
        let v = smaps_field(addr, "AnonHugePages:");
        v.trim().trim_end_matches("kB").trim().parse().unwrap()
    }

    #[test]
    fn a_small_guests_loaded_kernel_gets_huge_pages() {
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled");
        if thp.as_deref().map_or(true, |t| t.contains("[never]")) {
            skip("this kernel offers no transparent huge pages");
            return;
        }
        let mem = allocate(&[(0, 64 << 20)]).unwrap();
        let base = mem.iter().next().unwrap().as_ptr() as usize;
        if !base.is_multiple_of(HUGE_PAGE) {
            // Linux aligns anonymous mappings of whole 2 MiB blocks to 2 MiB (6.7 on, and
            // the stable kernels it was taken into); without it no block would qualify.
            skip("this kernel placed the mapping off a 2 MiB boundary");
            return;
        }
        // A "kernel" from 3 MiB + 4 KiB to 9 MiB: it fills the blocks at 4 and 6 MiB whole,
        // the ones at 2 and 8 MiB in part. A small image (the probe's) fills none.
        let kernel = (3u64 << 20) + 4096;
        let len = (9u64 << 20) - kernel;
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        mem.write_slice(&data, GuestAddress(kernel)).unwrap();
        mem.write_slice(&[1; 8192], GuestAddress(40 << 20)).unwrap();
        advise_loaded(&mem, &[(kernel, len), (40 << 20, 8192)]);
        let block = base + (4 << 20);
        assert!(vm_flags(block).contains(" hg"), "{}", vm_flags(block));
        // Linux 6.1 and later collapse the blocks at once, unless no huge page was free
        // just then (EAGAIN, ENOMEM): once more before judging.
        if anon_huge_kib(block) < 4096 {
            advise_loaded(&mem, &[(kernel, len)]);
        }
        let collapsed = anon_huge_kib(block);
        if std::env::var("CI").as_deref() == Ok("true") || collapsed > 0 {
            assert_eq!(collapsed, 4096, "the two whole blocks");
        } else {
            eprintln!("SKIPPED (in part): this kernel did not collapse the blocks (MADV_COLLAPSE)");
        }
        // The rest is left to the host's setting, and the contents are unchanged.
        assert!(!vm_flags(base).contains(" hg"), "{}", vm_flags(base));
        assert!(!vm_flags(base + (8 << 20)).contains(" hg"));
        let mut back = vec![0; len as usize];
        mem.read_slice(&mut back, GuestAddress(kernel)).unwrap();
        assert!(back == data, "the loaded image changed");
        // A guest that has huge pages throughout is left as it is.
        let large = allocate(&[(0, THP_MIN_BYTES)]).unwrap();
        let at = large.iter().next().unwrap().as_ptr() as usize;
        advise_loaded(&large, &[(0, 8 << 20)]);
        assert!(vm_flags(at).contains(" hg"), "{}", vm_flags(at));
    }
}
