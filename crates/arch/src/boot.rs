//! Loading a kernel, its command line and initrd into guest memory, and describing the machine
//! to it through the Linux zero page or the PVH start info.
//!
//! Kernel forms:
//! - ELF `vmlinux` with a PVH note: entered through PVH (32-bit, `ebx` = start info) unless
//!   [`BootProtocol::Linux`] asks for the 64-bit Linux entry.
//! - ELF without a PVH note: 64-bit Linux entry at `e_entry`.
//! - bzImage: by default its payload is decompressed on the host ([`crate::bzimage`]) and the
//!   resulting vmlinux entered directly in 64-bit mode, which skips the guest-side
//!   decompressor; with [`BzImageEntry::Guest`] (or when the payload's format is unsupported)
//!   the protected-mode kernel is loaded as is and entered at its 64-bit entry (`+0x200`).

use std::io::{Read, Seek, SeekFrom};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{Bytes, GuestAddress, ReadVolatile, VolatileMemoryError, VolatileSlice};

use crate::layout::*;
use crate::memory::{e820_map, low_ram_end};
use crate::regs::EntryMode;
use crate::GuestMemoryMmap;

/// Errors loading a kernel.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Neither ELF nor bzImage.
    #[error(
        "kernel is neither an ELF vmlinux nor a bzImage (no ELF magic, no 'HdrS' setup header)"
    )]
    UnknownFormat,
    /// The file is too short to be a kernel.
    #[error("kernel file is truncated ({0} bytes)")]
    Truncated(usize),
    /// linux-loader refused the ELF image.
    #[error("invalid ELF kernel: {0}")]
    Elf(String),
    /// linux-loader refused the bzImage.
    #[error("invalid bzImage kernel: {0}")]
    BzImage(String),
    /// The bzImage is too old or not 64-bit capable.
    #[error("bzImage does not support the 64-bit boot protocol (protocol {version:#x}, xloadflags {xloadflags:#x})")]
    Not64Bit {
        /// Boot protocol version.
        version: u16,
        /// Extended load flags.
        xloadflags: u16,
    },
    /// PVH was requested for a kernel without a PVH entry.
    #[error("PVH boot requested but the kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)")]
    NoPvhEntry,
    /// The command line is too long.
    #[error("kernel command line is {len} bytes; at most {max} are allowed")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The command line contains a NUL byte.
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    /// Kernel and initrd do not fit.
    #[error("kernel ({kernel_mib} MiB) and initrd ({initrd_mib} MiB) do not fit in {mem_mib} MiB of guest memory")]
    DoesNotFit {
        /// Kernel footprint in MiB.
        kernel_mib: u64,
        /// Initrd size in MiB.
        initrd_mib: u64,
        /// Guest memory in MiB.
        mem_mib: u64,
    },
    /// Writing boot structures failed.
    #[error("cannot write {0} into guest memory")]
    Write(&'static str),
    /// Reading the initrd failed.
    #[error("cannot read initrd: {0}")]
    Initrd(std::io::Error),
    /// Reading the kernel file failed.
    #[error("cannot read the kernel: {0}")]
    Read(std::io::Error),
}

/// Which entry to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BootProtocol {
    /// PVH when the kernel has a PVH note, else the 64-bit Linux entry.
    #[default]
    Auto,
    /// Always PVH.
    Pvh,
    /// Always the 64-bit Linux boot protocol.
    Linux,
}

/// How a bzImage is entered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BzImageEntry {
    /// Decompress the payload on the host and enter vmlinux directly.
    #[default]
    Host,
    /// Let the kernel's own decompressor run in the guest.
    Guest,
}

/// A kernel image: bytes in memory, or a file read piece by piece.
///
/// From a file, only the headers (and an ELF's notes) are read into tern's memory; an ELF
/// kernel's segments go straight from the file into guest memory. Reading a 50 MiB vmlinux
/// whole first cost a second copy of it and the faults on a fresh heap buffer: 0.1-0.2 s of a
/// boot in the nested rig. A bzImage is still read whole (the host decompresses its payload).
pub enum KernelImage<'a> {
    /// The image's bytes.
    Bytes(&'a [u8]),
    /// The image file.
    File(&'a mut std::fs::File),
}

/// The most read of an ELF's note segments, all together, to find its notes.
const ELF_NOTES_MAX: u64 = 1 << 20;
/// The most PT_NOTE segments, and bytes in each, of an ELF kernel tern loads. The loader walks
/// every note of every note segment one read at a time, so a crafted file with thousands of
/// segments of tiny notes would keep it busy for hours; a Linux vmlinux has one segment of a
/// few hundred bytes.
const ELF_NOTE_SEGMENTS_MAX: usize = 16;
const ELF_NOTE_SEGMENT_MAX: u64 = 64 << 10;
/// An ELF64 program header's size (the only one the loader accepts).
const ELF64_PHDR: u64 = 56;

impl KernelImage<'_> {
    /// Up to `len` bytes at `off` (fewer at the end of the image).
    fn read_at(&mut self, off: u64, len: u64) -> std::io::Result<Vec<u8>> {
        match self {
            KernelImage::Bytes(b) => {
                let start = usize::try_from(off).unwrap_or(usize::MAX).min(b.len());
                let end = start.saturating_add(usize::try_from(len).unwrap_or(usize::MAX));
                Ok(b[start..end.min(b.len())].to_vec())
            }
            KernelImage::File(f) => {
                let mut v = Vec::new();
                f.seek(SeekFrom::Start(off))?;
                (&mut **f).take(len).read_to_end(&mut v)?;
                Ok(v)
            }
        }
    }

    /// The whole image.
    fn read_all(&mut self) -> std::io::Result<std::borrow::Cow<'_, [u8]>> {
        match self {
            KernelImage::Bytes(b) => Ok(std::borrow::Cow::Borrowed(b)),
            KernelImage::File(f) => {
                let mut v = Vec::new();
                f.seek(SeekFrom::Start(0))?;
                f.read_to_end(&mut v)?;
                Ok(std::borrow::Cow::Owned(v))
            }
        }
    }

    /// The first bytes: enough for [`kernel_kind`] and the ELF header's fields.
    fn head(&mut self) -> Result<Vec<u8>, BootError> {
        self.read_at(0, 0x1000).map_err(BootError::Read)
    }

    /// Whether this is a Linux kernel (bzImage, or ELF with a "Linux" ELF note).
    pub fn is_linux(&mut self) -> bool {
        let Ok(head) = self.head() else {
            return false;
        };
        match kernel_kind(&head) {
            Ok(KernelKind::BzImage) => true,
            Ok(KernelKind::Elf) => elf_notes(self, &head)
                .iter()
                .any(|(name, _, _)| name == b"Linux"),
            Err(_) => false,
        }
    }
}

/// What to boot.
pub struct KernelSpec<'a> {
    /// The kernel image.
    pub kernel: KernelImage<'a>,
    /// The initrd, if any: a file and its size.
    pub initrd: Option<(&'a mut std::fs::File, u64)>,
    /// The command line (without NUL).
    pub cmdline: &'a str,
    /// Guest RAM size in bytes.
    pub mem_size: u64,
    /// Entry protocol.
    pub protocol: BootProtocol,
    /// bzImage entry method.
    pub bzimage_entry: BzImageEntry,
    /// Address of the ACPI RSDP, when the VM has ACPI tables.
    pub rsdp: Option<u64>,
}

/// What the boot vCPU needs to start the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootInfo {
    /// Entry point (guest physical).
    pub entry: u64,
    /// Entry mode.
    pub mode: EntryMode,
    /// Human-readable description of how the kernel was loaded.
    pub how: String,
    /// Where the initrd was placed, and its size.
    pub initrd: Option<(u64, u64)>,
    /// The guest memory the kernel image occupies from the start: from its load address (an
    /// ELF's entry, a bzImage's load address) to the end of what was written there or, for a
    /// kernel decompressed by tern, of what it uses from its load address on (bss, brk and
    /// early page tables included). Where huge pages pay (see the VMM's `advise_loaded`).
    pub kernel: (u64, u64),
}

/// Kernel image kinds tern recognises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelKind {
    /// ELF executable.
    Elf,
    /// Linux bzImage.
    BzImage,
}

/// Recognises the kernel format from its first bytes.
pub fn kernel_kind(image: &[u8]) -> Result<KernelKind, BootError> {
    if image.len() >= 4 && &image[0..4] == b"\x7fELF" {
        if image.len() < 64 {
            return Err(BootError::Truncated(image.len()));
        }
        return Ok(KernelKind::Elf);
    }
    if image.len() >= 0x206 && &image[0x202..0x206] == b"HdrS" {
        if image.len() < 0x1000 {
            return Err(BootError::Truncated(image.len()));
        }
        return Ok(KernelKind::BzImage);
    }
    if image.len() < 0x206 {
        return Err(BootError::Truncated(image.len()));
    }
    Err(BootError::UnknownFormat)
}

/// Whether the image is a Linux kernel (bzImage, or ELF with a "Linux" ELF note).
pub fn is_linux(image: &[u8]) -> bool {
    KernelImage::Bytes(image).is_linux()
}

/// Refuses an ELF whose note segments would keep the loader busy: more than
/// [`ELF_NOTE_SEGMENTS_MAX`] of them, or one over [`ELF_NOTE_SEGMENT_MAX`] bytes. Reads the
/// program header table as the loader does (`e_phnum` entries of 56 bytes at `e_phoff`); a
/// header the loader would refuse is left for it to refuse.
fn check_note_segments(image: &mut KernelImage, head: &[u8]) -> Result<(), BootError> {
    let (Some(phoff), Some(phentsize), Some(phnum)) =
        (rd64(head, 0x20), rd16(head, 0x36), rd16(head, 0x38))
    else {
        return Ok(());
    };
    if u64::from(phentsize) != ELF64_PHDR {
        return Ok(());
    }
    let table = image
        .read_at(phoff, ELF64_PHDR * u64::from(phnum))
        .map_err(BootError::Read)?;
    let mut segments = 0;
    for ph in table.chunks_exact(ELF64_PHDR as usize) {
        if rd32(ph, 0) != Some(4) {
            continue;
        }
        segments += 1;
        let size = rd64(ph, 32).unwrap_or(0);
        if segments > ELF_NOTE_SEGMENTS_MAX || size > ELF_NOTE_SEGMENT_MAX {
            return Err(BootError::Elf(format!(
                "more than {ELF_NOTE_SEGMENTS_MAX} note segments, or one over {} KiB: not a kernel tern loads",
                ELF_NOTE_SEGMENT_MAX >> 10
            )));
        }
    }
    Ok(())
}

/// Little-endian readers of a byte slice: `None` past its end.
fn rd16(b: &[u8], o: usize) -> Option<u16> {
    b.get(o..o.checked_add(2)?)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
}

fn rd32(b: &[u8], o: usize) -> Option<u32> {
    b.get(o..o.checked_add(4)?)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap_or([0; 4])))
}

fn rd64(b: &[u8], o: usize) -> Option<u64> {
    b.get(o..o.checked_add(8)?)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
}

/// The (name, type, descriptor) of every note in the ELF's PT_NOTE segments (`head`: its
/// first bytes); malformed notes end the walk. The program header table and the note
/// segments are read from the image, at most [`ELF_NOTES_MAX`] bytes of segments in all.
fn elf_notes(image: &mut KernelImage, head: &[u8]) -> Vec<(Vec<u8>, u32, Vec<u8>)> {
    let mut out = Vec::new();
    let (Some(phoff), Some(phentsize), Some(phnum)) =
        (rd64(head, 0x20), rd16(head, 0x36), rd16(head, 0x38))
    else {
        return out;
    };
    let table_len = (u64::from(phentsize) * u64::from(phnum)).min(ELF_NOTES_MAX);
    let Ok(table) = image.read_at(phoff, table_len) else {
        return out;
    };
    let mut budget = ELF_NOTES_MAX;
    for i in 0..usize::from(phnum) {
        let ph = i * usize::from(phentsize);
        if ph >= table.len() {
            break;
        }
        if rd32(&table, ph) != Some(4) {
            continue;
        }
        let (Some(off), Some(size)) = (rd64(&table, ph + 8), rd64(&table, ph + 32)) else {
            continue;
        };
        if budget == 0 {
            break;
        }
        let Ok(seg) = image.read_at(off, size.min(budget)) else {
            continue;
        };
        budget -= seg.len() as u64;
        let word = |o| rd32(&seg, o);
        let mut p = 0usize;
        while p + 12 <= seg.len() {
            let (Some(namesz), Some(descsz), Some(ty)) = (word(p), word(p + 4), word(p + 8)) else {
                break;
            };
            let name_start = p + 12;
            let desc_start = name_start + (namesz as usize).div_ceil(4) * 4;
            let next = desc_start.saturating_add((descsz as usize).div_ceil(4) * 4);
            let (Some(name), Some(desc)) = (
                seg.get(name_start..name_start + namesz as usize),
                seg.get(desc_start..desc_start.saturating_add(descsz as usize)),
            ) else {
                break;
            };
            let name = name.strip_suffix(b"\0").unwrap_or(name).to_vec();
            out.push((name, ty, desc.to_vec()));
            if next <= p {
                break;
            }
            p = next;
        }
    }
    out
}

/// A `Read + Seek + ReadVolatile` view of a byte slice, for linux-loader.
struct SliceReader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Read for SliceReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let rest = self.data.get(self.pos..).unwrap_or(&[]);
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.pos += n;
        Ok(n)
    }
}

impl Seek for SliceReader<'_> {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        let new = match pos {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => (self.data.len() as u64).checked_add_signed(d),
            SeekFrom::Current(d) => (self.pos as u64).checked_add_signed(d),
        };
        let new = new.ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        self.pos = usize::try_from(new).unwrap_or(usize::MAX);
        Ok(new)
    }
}

impl ReadVolatile for SliceReader<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let mut rest = self.data.get(self.pos..).unwrap_or(&[]);
        let n = rest.read_volatile(buf)?;
        self.pos += n;
        Ok(n)
    }
}

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
const XLF_KERNEL_64: u16 = 1;
/// Where the decompressed 64-bit kernel expects to run (CONFIG_PHYSICAL_START default).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// Reads the setup header from a bzImage.
fn bzimage_setup_header(image: &[u8]) -> Result<setup_header, BootError> {
    let mut hdr = setup_header::default();
    let size = std::mem::size_of::<setup_header>();
    let bytes = image
        .get(0x1f1..0x1f1 + size)
        .ok_or(BootError::Truncated(image.len()))?;
    // SAFETY: `setup_header` is a packed plain-old-data struct of exactly `size` bytes (every
    // bit pattern is valid), and `bytes` holds exactly `size` bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            &mut hdr as *mut setup_header as *mut u8,
            size,
        );
    }
    Ok(hdr)
}

fn default_setup_header() -> setup_header {
    setup_header {
        boot_flag: KERNEL_BOOT_FLAG_MAGIC,
        header: KERNEL_HDR_MAGIC,
        kernel_alignment: KERNEL_MIN_ALIGNMENT_BYTES,
        ..Default::default()
    }
}

fn mib(v: u64) -> u64 {
    v.div_ceil(1 << 20)
}

/// Loads the kernel, command line and initrd, and writes the zero page or PVH start info.
pub fn load_kernel(mem: &GuestMemoryMmap, spec: KernelSpec<'_>) -> Result<BootInfo, BootError> {
    if spec.cmdline.as_bytes().contains(&0) {
        return Err(BootError::CmdlineNul);
    }
    let mut image = spec.kernel;
    let head = image.head()?;
    let kind = kernel_kind(&head)?;
    // Load the kernel image itself.
    // What the loader wrote, where that is less than `kernel_end` (a compressed kernel that
    // decompresses itself elsewhere).
    let mut written_end = None;
    let (entry, mode, hdr, (kernel_start, kernel_end), how) = match kind {
        KernelKind::Elf => {
            check_note_segments(&mut image, &head)?;
            let high = Some(GuestAddress(HIMEM_START));
            let res = match &mut image {
                KernelImage::Bytes(b) => {
                    Elf::load(mem, None, &mut SliceReader { data: b, pos: 0 }, high)
                }
                KernelImage::File(f) => Elf::load(mem, None, *f, high),
            }
            .map_err(|e| map_elf_err(e, spec.mem_size))?;
            let e_entry = rd64(&head, 0x18).unwrap_or(0);
            match (spec.protocol, res.pvh_boot_cap) {
                (BootProtocol::Pvh | BootProtocol::Auto, PvhBootCapability::PvhEntryPresent(a)) => {
                    (
                        a.0,
                        EntryMode::Pvh,
                        None,
                        (res.kernel_load.0, res.kernel_end),
                        "ELF kernel, PVH entry".to_string(),
                    )
                }
                (BootProtocol::Pvh, _) => return Err(BootError::NoPvhEntry),
                _ => (
                    e_entry,
                    EntryMode::Linux64,
                    Some(default_setup_header()),
                    (res.kernel_load.0, res.kernel_end),
                    "ELF kernel, 64-bit Linux entry".to_string(),
                ),
            }
        }
        KernelKind::BzImage => {
            let all = image.read_all().map_err(BootError::Read)?;
            let hdr = bzimage_setup_header(&all)?;
            let (version, xloadflags) = (hdr.version, hdr.xloadflags);
            if version < 0x020c || xloadflags & XLF_KERNEL_64 == 0 {
                return Err(BootError::Not64Bit {
                    version,
                    xloadflags,
                });
            }
            if spec.protocol == BootProtocol::Pvh {
                return Err(BootError::NoPvhEntry);
            }
            let decompressed = match spec.bzimage_entry {
                BzImageEntry::Host => crate::bzimage::extract_vmlinux(&all).ok(),
                BzImageEntry::Guest => None,
            };
            match decompressed {
                Some(vmlinux) => {
                    let res = Elf::load(
                        mem,
                        None,
                        &mut SliceReader {
                            data: &vmlinux,
                            pos: 0,
                        },
                        Some(GuestAddress(HIMEM_START)),
                    )
                    .map_err(|e| map_elf_err(e, spec.mem_size))?;
                    let e_entry =
                        u64::from_le_bytes(vmlinux[0x18..0x20].try_into().unwrap_or([0; 8]));
                    // The kernel uses init_size bytes from its load address (bss, brk, early
                    // page tables), which may exceed the ELF's memory size.
                    let init_end = res
                        .kernel_load
                        .0
                        .saturating_add(u64::from(hdr.init_size))
                        .max(res.kernel_end);
                    // The entry of a vmlinux ELF is its physical startup_64.
                    let entry = e_entry & 0x7fff_ffff;
                    (
                        entry,
                        EntryMode::Linux64,
                        Some(hdr),
                        (res.kernel_load.0, init_end),
                        "bzImage, payload decompressed by tern, 64-bit entry".to_string(),
                    )
                }
                None => {
                    let res = BzImage::load(
                        mem,
                        None,
                        &mut SliceReader { data: &all, pos: 0 },
                        Some(GuestAddress(HIMEM_START)),
                    )
                    .map_err(|e| match e {
                        linux_loader::loader::Error::Bzimage(
                            linux_loader::loader::bzimage::Error::ReadBzImageCompressedKernel,
                        ) => BootError::DoesNotFit {
                            kernel_mib: mib(all.len() as u64),
                            initrd_mib: 0,
                            mem_mib: mib(spec.mem_size),
                        },
                        e => BootError::BzImage(e.to_string()),
                    })?;
                    let hdr = res.setup_header.unwrap_or(hdr);
                    let init_end = res
                        .kernel_load
                        .0
                        .saturating_add(u64::from(hdr.init_size))
                        .max(res.kernel_end);
                    written_end = Some(res.kernel_end);
                    (
                        res.kernel_load.0 + 0x200,
                        EntryMode::Linux64,
                        Some(hdr),
                        (res.kernel_load.0, init_end),
                        "bzImage, in-guest decompression, 64-bit entry".to_string(),
                    )
                }
            }
        }
    };

    let low_end = low_ram_end(spec.mem_size);
    if kernel_end > low_end {
        return Err(BootError::DoesNotFit {
            kernel_mib: mib(kernel_end),
            initrd_mib: 0,
            mem_mib: mib(spec.mem_size),
        });
    }

    // Command line.
    let max_cmdline = match &hdr {
        Some(h) if h.cmdline_size > 0 && kind == KernelKind::BzImage => {
            (h.cmdline_size as usize).min(CMDLINE_MAX_SIZE)
        }
        _ => CMDLINE_MAX_SIZE,
    };
    let cmd = spec.cmdline.as_bytes();
    if cmd.len() > max_cmdline {
        return Err(BootError::CmdlineTooLong {
            len: cmd.len(),
            max: max_cmdline,
        });
    }
    let mut cbuf = cmd.to_vec();
    cbuf.push(0);
    mem.write_slice(&cbuf, GuestAddress(CMDLINE_START))
        .map_err(|_| BootError::Write("the command line"))?;

    // Initrd: as high as allowed in low memory, page aligned, above the kernel.
    let mut initrd_at = None;
    if let Some((file, size)) = spec.initrd {
        let addr_max = match &hdr {
            Some(h) if h.initrd_addr_max != 0 => u64::from(h.initrd_addr_max),
            _ => DEFAULT_INITRD_ADDR_MAX,
        };
        let top = low_end.min(addr_max.saturating_add(1));
        let too_big = || BootError::DoesNotFit {
            kernel_mib: mib(kernel_end),
            initrd_mib: mib(size),
            mem_mib: mib(spec.mem_size),
        };
        let addr = top.checked_sub(size).ok_or_else(too_big)? & !0xfff;
        if addr < kernel_end {
            return Err(too_big());
        }
        file.seek(SeekFrom::Start(0)).map_err(BootError::Initrd)?;
        mem.read_exact_volatile_from(GuestAddress(addr), file, size as usize)
            .map_err(|e| BootError::Initrd(std::io::Error::other(e.to_string())))?;
        initrd_at = Some((addr, size));
    }

    match mode {
        EntryMode::Linux64 => write_zero_page(
            mem,
            hdr.unwrap_or_else(default_setup_header),
            cmd.len(),
            initrd_at,
            spec.mem_size,
        )?,
        EntryMode::Pvh => write_pvh_info(mem, initrd_at, spec.mem_size, spec.rsdp)?,
    }
    Ok(BootInfo {
        entry,
        mode,
        how,
        initrd: initrd_at,
        kernel: (kernel_start, written_end.unwrap_or(kernel_end)),
    })
}

fn map_elf_err(e: linux_loader::loader::Error, mem_size: u64) -> BootError {
    match e {
        linux_loader::loader::Error::Elf(linux_loader::loader::elf::Error::ReadKernelImage) => {
            BootError::Elf(format!(
                "a loadable segment lies outside guest memory ({} MiB) or past the end of the file",
                mib(mem_size)
            ))
        }
        e => BootError::Elf(
            e.to_string()
                .trim_start_matches("Kernel Loader: ")
                .to_string(),
        ),
    }
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    hdr: setup_header,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
    mem_size: u64,
) -> Result<(), BootError> {
    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32 + 1;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
        params.ext_ramdisk_image = (addr >> 32) as u32;
        params.ext_ramdisk_size = (size >> 32) as u32;
    }
    let map = e820_map(mem_size);
    for (i, e) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        };
    }
    params.e820_entries = map.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(|_| BootError::Write("the zero page"))
}

const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

fn write_pvh_info(
    mem: &GuestMemoryMmap,
    initrd: Option<(u64, u64)>,
    mem_size: u64,
    rsdp: Option<u64>,
) -> Result<(), BootError> {
    let map = e820_map(mem_size);
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        rsdp_paddr: rsdp.unwrap_or(0),
        ..Default::default()
    };
    if let Some((addr, size)) = initrd {
        let m = hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        };
        mem.write_obj(m, GuestAddress(PVH_MODLIST_START))
            .map_err(|_| BootError::Write("the PVH module list"))?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    for (i, e) in map.iter().enumerate().take(PVH_MEMMAP_MAX_ENTRIES) {
        let m = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        };
        mem.write_obj(m, GuestAddress(PVH_MEMMAP_START + (i as u64) * 24))
            .map_err(|_| BootError::Write("the PVH memory map"))?;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_START))
        .map_err(|_| BootError::Write("the PVH start info"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest(mib: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (mib << 20) as usize)]).unwrap()
    }

    /// A minimal ELF64 with one PT_LOAD at `paddr` and optionally a Xen PVH note.
    fn tiny_elf(paddr: u64, payload: &[u8], pvh_entry: Option<u32>) -> Vec<u8> {
        let mut note = Vec::new();
        if let Some(e) = pvh_entry {
            note.extend_from_slice(&4u32.to_le_bytes());
            note.extend_from_slice(&4u32.to_le_bytes());
            note.extend_from_slice(&18u32.to_le_bytes());
            note.extend_from_slice(b"Xen\0");
            note.extend_from_slice(&e.to_le_bytes());
        }
        let phnum: u16 = if pvh_entry.is_some() { 2 } else { 1 };
        let data_off = 64 + 56 * u64::from(phnum);
        let note_off = data_off + payload.len() as u64;
        let mut f = vec![0u8; 64];
        f[0..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[6] = 1;
        f[16..18].copy_from_slice(&2u16.to_le_bytes());
        f[18..20].copy_from_slice(&62u16.to_le_bytes());
        f[0x18..0x20].copy_from_slice(&paddr.to_le_bytes());
        f[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        f[0x34..0x36].copy_from_slice(&64u16.to_le_bytes());
        f[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        f[0x38..0x3a].copy_from_slice(&phnum.to_le_bytes());
        let ph = |ty: u32, off: u64, addr: u64, sz: u64| {
            let mut p = vec![0u8; 56];
            p[0..4].copy_from_slice(&ty.to_le_bytes());
            p[8..16].copy_from_slice(&off.to_le_bytes());
            p[16..24].copy_from_slice(&addr.to_le_bytes());
            p[24..32].copy_from_slice(&addr.to_le_bytes());
            p[32..40].copy_from_slice(&sz.to_le_bytes());
            p[40..48].copy_from_slice(&sz.to_le_bytes());
            p
        };
        f.extend(ph(1, data_off, paddr, payload.len() as u64));
        if pvh_entry.is_some() {
            f.extend(ph(4, note_off, 0, note.len() as u64));
        }
        f.extend_from_slice(payload);
        f.extend_from_slice(&note);
        f
    }

    fn spec<'a>(
        kernel: &'a [u8],
        cmdline: &'a str,
        mib: u64,
        protocol: BootProtocol,
    ) -> KernelSpec<'a> {
        KernelSpec {
            kernel: KernelImage::Bytes(kernel),
            initrd: None,
            cmdline,
            mem_size: mib << 20,
            protocol,
            bzimage_entry: BzImageEntry::Host,
            rsdp: None,
        }
    }

    #[test]
    fn elf_with_pvh_note_uses_pvh() {
        let m = guest(32);
        let k = tiny_elf(0x20_0000, &[0x90; 64], Some(0x20_0010));
        let info = load_kernel(&m, spec(&k, "console=ttyS0", 32, BootProtocol::Auto)).unwrap();
        assert_eq!(info.mode, EntryMode::Pvh);
        assert_eq!(info.entry, 0x20_0010);
        let si: hvm_start_info = m.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(si.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(si.memmap_entries, 4);
        let e0: hvm_memmap_table_entry = m.read_obj(GuestAddress(si.memmap_paddr)).unwrap();
        assert_eq!((e0.addr, e0.type_), (0, 1));
        let mut c = [0u8; 14];
        m.read_slice(&mut c, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&c, b"console=ttyS0\0");
        // Forcing the Linux entry on the same kernel uses e_entry and a zero page.
        let info = load_kernel(&m, spec(&k, "x", 32, BootProtocol::Linux)).unwrap();
        assert_eq!(info.mode, EntryMode::Linux64);
        assert_eq!(info.entry, 0x20_0000);
        let bp: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let (entries, magic) = (bp.e820_entries, bp.hdr.header);
        assert_eq!(entries, 4);
        assert_eq!(magic, KERNEL_HDR_MAGIC);
    }

    #[test]
    fn pvh_initrd_module_and_rsdp_survive() {
        let m = guest(32);
        let k = tiny_elf(0x20_0000, &[0x90; 64], Some(0x20_0010));
        let path = std::env::temp_dir().join(format!("tern-pvh-initrd-{}", std::process::id()));
        std::fs::write(&path, vec![7u8; 8192]).unwrap();
        let mut f = std::fs::File::open(&path).unwrap();
        let mut s = spec(&k, "console=ttyS0", 32, BootProtocol::Auto);
        s.initrd = Some((&mut f, 8192));
        s.rsdp = Some(0xe_0000);
        let info = load_kernel(&m, s).unwrap();
        let (addr, size) = info.initrd.unwrap();
        let si: hvm_start_info = m.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!((si.nr_modules, si.rsdp_paddr), (1, 0xe_0000));
        let module: hvm_modlist_entry = m.read_obj(GuestAddress(si.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (addr, size));
        let b: u8 = m.read_obj(GuestAddress(module.paddr)).unwrap();
        assert_eq!(b, 7);
        // Nothing the loader wrote overlaps: start info, module list and memory map are disjoint.
        assert!(PVH_INFO_START + std::mem::size_of::<hvm_start_info>() as u64 <= si.modlist_paddr);
        assert!(si.modlist_paddr + 32 <= si.memmap_paddr);
        std::fs::remove_file(path).ok();
    }

    #[test]
    fn pvh_requested_without_note() {
        let m = guest(32);
        let k = tiny_elf(0x20_0000, &[0x90; 64], None);
        assert!(matches!(
            load_kernel(&m, spec(&k, "", 32, BootProtocol::Pvh)),
            Err(BootError::NoPvhEntry)
        ));
    }

    #[test]
    fn segment_outside_memory() {
        let m = guest(16);
        let k = tiny_elf(0x200_0000, &[0x90; 64], None);
        let e = load_kernel(&m, spec(&k, "", 16, BootProtocol::Auto)).unwrap_err();
        assert!(e.to_string().contains("outside guest memory"), "{e}");
    }

    #[test]
    fn overlong_and_nul_cmdline() {
        let m = guest(32);
        let k = tiny_elf(0x20_0000, &[0x90; 64], None);
        let long = "a".repeat(CMDLINE_MAX_SIZE + 1);
        assert!(matches!(
            load_kernel(&m, spec(&k, &long, 32, BootProtocol::Auto)),
            Err(BootError::CmdlineTooLong { .. })
        ));
        assert!(matches!(
            load_kernel(&m, spec(&k, "a\0b", 32, BootProtocol::Auto)),
            Err(BootError::CmdlineNul)
        ));
    }

    #[test]
    fn initrd_too_big() {
        let m = guest(16);
        let k = tiny_elf(0x20_0000, &[0x90; 64], None);
        let path = std::env::temp_dir().join(format!("tern-initrd-test-{}", std::process::id()));
        std::fs::write(&path, vec![1u8; 4096]).unwrap();
        let mut f = std::fs::File::open(&path).unwrap();
        let mut s = spec(&k, "", 16, BootProtocol::Auto);
        s.initrd = Some((&mut f, 20 << 20));
        assert!(matches!(
            load_kernel(&m, s),
            Err(BootError::DoesNotFit { .. })
        ));
        // A fitting one lands page-aligned at the top of RAM.
        let mut s = spec(&k, "", 16, BootProtocol::Auto);
        s.initrd = Some((&mut f, 4096));
        let info = load_kernel(&m, s).unwrap();
        assert_eq!(info.initrd, Some(((16 << 20) - 4096, 4096)));
        std::fs::remove_file(path).ok();
    }

    #[test]
    fn kernel_from_file_loads_as_from_bytes() {
        let payload: Vec<u8> = (0..8192u32).map(|i| i as u8).collect();
        let mut k = tiny_elf(0x20_0000, &payload, Some(0x20_0010));
        let path = std::env::temp_dir().join(format!("tern-kernel-file-{}", std::process::id()));
        std::fs::write(&path, &k).unwrap();
        let mut f = std::fs::File::open(&path).unwrap();
        assert!(!KernelImage::File(&mut f).is_linux());
        let m = guest(32);
        let mut s = spec(&k, "x", 32, BootProtocol::Auto);
        s.kernel = KernelImage::File(&mut f);
        let from_file = load_kernel(&m, s).unwrap();
        let mut loaded = vec![0u8; payload.len()];
        m.read_slice(&mut loaded, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(loaded, payload);
        let from_bytes = load_kernel(&guest(32), spec(&k, "x", 32, BootProtocol::Auto)).unwrap();
        assert_eq!(from_file, from_bytes);
        // A "Linux" note (namesz 6, padded to 8; no descriptor) is found in the file.
        let pos = k.windows(4).position(|w| w == b"Xen\0").unwrap();
        k[pos - 12..pos - 8].copy_from_slice(&6u32.to_le_bytes());
        k[pos - 8..pos - 4].copy_from_slice(&0u32.to_le_bytes());
        k[pos..pos + 8].copy_from_slice(b"Linux\0\0\0");
        assert!(is_linux(&k));
        std::fs::write(&path, &k).unwrap();
        let mut f = std::fs::File::open(&path).unwrap();
        assert!(KernelImage::File(&mut f).is_linux());
        // A file cut short inside a segment is refused with a line, as bytes are.
        std::fs::write(&path, &k[..k.len() - 4096]).unwrap();
        let mut f = std::fs::File::open(&path).unwrap();
        let mut s = spec(&k, "x", 32, BootProtocol::Auto);
        s.kernel = KernelImage::File(&mut f);
        assert!(matches!(load_kernel(&m, s), Err(BootError::Elf(_))));
        std::fs::remove_file(path).ok();
    }

    #[test]
    fn oversized_note_segments_refused() {
        let m = guest(32);
        // The PVH note's program header is the second: its p_filesz at 64 + 56 + 32.
        let mut k = tiny_elf(0x20_0000, &[0x90; 64], Some(0x20_0010));
        k[152..160].copy_from_slice(&(1u64 << 20).to_le_bytes());
        let err = load_kernel(&m, spec(&k, "", 32, BootProtocol::Auto)).unwrap_err();
        assert!(
            matches!(&err, BootError::Elf(e) if e.contains("note segments")),
            "{err}"
        );
        // Seventeen note segments are too many, whatever their size.
        let mut k = tiny_elf(0x20_0000, &[0x90; 64], Some(0x20_0010));
        let note_ph = k[120..176].to_vec();
        k[0x38..0x3a].copy_from_slice(&18u16.to_le_bytes());
        let mut many = k[..176].to_vec();
        for _ in 0..16 {
            many.extend_from_slice(&note_ph);
        }
        many.extend_from_slice(&k[176..]);
        let err = load_kernel(&m, spec(&many, "", 32, BootProtocol::Auto)).unwrap_err();
        assert!(
            matches!(&err, BootError::Elf(e) if e.contains("note segments")),
            "{err}"
        );
    }

    #[test]
    fn garbage_never_panics() {
        let m = guest(16);
        assert!(matches!(
            kernel_kind(b"hello"),
            Err(BootError::Truncated(5))
        ));
        assert!(matches!(
            kernel_kind(&[0u8; 4096]),
            Err(BootError::UnknownFormat)
        ));
        // Deterministic pseudo-random inputs, some with valid magics to reach deeper code.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for i in 0..400 {
            let len = (i * 37) % 9000;
            let mut v: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            if i % 3 == 0 && v.len() >= 64 {
                v[0..4].copy_from_slice(b"\x7fELF");
                v[4] = 2;
                v[5] = 1;
            }
            if i % 3 == 1 && v.len() >= 0x1000 {
                v[0x202..0x206].copy_from_slice(b"HdrS");
            }
            let _ = is_linux(&v);
            let _ = load_kernel(&m, spec(&v, "", 16, BootProtocol::Auto));
        }
    }

    #[test]
    fn elf_notes_find_linux() {
        let mut k = tiny_elf(0x20_0000, &[0; 16], Some(0x20_0000));
        assert!(!is_linux(&k));
        // Rename the Xen note to "Lin\0" -> not "Linux"; a real Linux note needs namesz 6.
        let pos = k.windows(4).position(|w| w == b"Xen\0").unwrap();
        k[pos..pos + 4].copy_from_slice(b"Lin\0");
        assert!(!is_linux(&k));
    }
}
