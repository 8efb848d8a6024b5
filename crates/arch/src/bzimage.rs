//! bzImage inspection and vmlinux extraction.
//!
//! A bzImage is the real-mode setup code (with the boot-protocol setup header), followed by the
//! protected-mode part, which holds a compressed copy of the kernel's ELF `vmlinux` (the
//! "payload"). Since boot protocol 2.08 the setup header says where that payload is
//! (`payload_offset`, relative to the start of the protected-mode part, and `payload_length`).
//!
//! [`extract_vmlinux`] finds the payload, decompresses it with pure-Rust decoders and returns the
//! ELF image, so a VMM (or a test rig) can boot the same kernel through its ELF entry points
//! (PVH, 64-bit Linux boot) without needing a separately built `vmlinux`.
//!
//! The image is untrusted input: every offset is bounds-checked, decompression output is capped
//! ([`DEFAULT_OUTPUT_LIMIT`], or a caller-chosen limit), and no input makes this module panic.
//!
//! Why in-tree: `linux-loader` loads a bzImage through its 16/32-bit entry but does not extract
//! the payload; no maintained crate does the Linux-specific framing (the LZ4 "legacy" frame, the
//! size trailer the kernel build appends), so that small part lives here while the actual
//! decompression uses `flate2`, `lzma-rust2`, `lz4_flex` and `ruzstd`.

use std::io::Read;

/// Default cap on the decompressed payload size (512 MiB). Real kernels are far smaller
/// (a distribution vmlinux is 50–70 MiB).
pub const DEFAULT_OUTPUT_LIMIT: usize = 512 << 20;

/// Offset of `setup_sects` in the bzImage.
const SETUP_SECTS_OFFSET: usize = 0x1f1;
/// Offset of the `HdrS` magic.
const HEADER_MAGIC_OFFSET: usize = 0x202;
const HEADER_MAGIC: &[u8; 4] = b"HdrS";
const VERSION_OFFSET: usize = 0x206;
const LOADFLAGS_OFFSET: usize = 0x211;
const INITRD_ADDR_MAX_OFFSET: usize = 0x22c;
const KERNEL_ALIGNMENT_OFFSET: usize = 0x230;
const RELOCATABLE_OFFSET: usize = 0x234;
const XLOADFLAGS_OFFSET: usize = 0x236;
const CMDLINE_SIZE_OFFSET: usize = 0x238;
const PAYLOAD_OFFSET_OFFSET: usize = 0x248;
const PAYLOAD_LENGTH_OFFSET: usize = 0x24c;
const PREF_ADDRESS_OFFSET: usize = 0x258;
const INIT_SIZE_OFFSET: usize = 0x260;
/// Smallest image that holds every header field we read.
const MIN_HEADER_LEN: usize = 0x264;
/// First boot protocol with `payload_offset`/`payload_length`.
const MIN_PAYLOAD_PROTOCOL: u16 = 0x0208;

/// LZ4 legacy frame magic (0x184C2102, little endian).
const LZ4_LEGACY_MAGIC: u32 = 0x184c_2102;
/// Each LZ4 legacy block decompresses to at most 8 MiB.
const LZ4_LEGACY_BLOCK_MAX: usize = 8 << 20;

/// Errors from parsing a bzImage or extracting its vmlinux.
#[derive(Debug, thiserror::Error)]
pub enum BzImageError {
    /// The image is shorter than the setup header.
    #[error("image is too small ({len} bytes) to hold a bzImage setup header")]
    TooSmall {
        /// Length of the image.
        len: usize,
    },
    /// No `HdrS` magic at 0x202.
    #[error("not a bzImage: no \"HdrS\" setup-header magic at offset 0x202")]
    BadMagic,
    /// The boot protocol predates the payload fields.
    #[error(
        "boot protocol {}.{:02} is older than 2.08 and does not describe its payload",
        .version >> 8,
        .version & 0xff
    )]
    ProtocolTooOld {
        /// The protocol version from the header.
        version: u16,
    },
    /// The payload the header describes does not lie inside the image.
    #[error(
        "payload (offset {offset:#x}, length {length:#x} after {setup_size:#x} bytes of setup) \
         lies outside the {image_len}-byte image"
    )]
    PayloadOutOfBounds {
        /// Size of the real-mode setup part.
        setup_size: usize,
        /// `payload_offset` from the header.
        offset: u32,
        /// `payload_length` from the header.
        length: u32,
        /// Length of the image.
        image_len: usize,
    },
    /// The payload is compressed with a format this module does not decode.
    #[error("unsupported payload compression: {0}")]
    UnsupportedFormat(PayloadFormat),
    /// The payload's first bytes match no known compression format.
    #[error("unrecognised payload compression (first bytes {0:02x?})")]
    UnknownFormat(Vec<u8>),
    /// The decoder rejected the payload.
    #[error("{format} payload is corrupt: {reason}")]
    Corrupt {
        /// The payload's format.
        format: PayloadFormat,
        /// What the decoder said.
        reason: String,
    },
    /// The decompressed payload exceeds the output limit.
    #[error("decompressed payload exceeds the {limit}-byte limit")]
    TooLarge {
        /// The limit in force.
        limit: usize,
    },
    /// The decompressed payload does not start with the ELF magic.
    #[error("decompressed payload is not an ELF image (starts with {0:02x?})")]
    NotElf(Vec<u8>),
    /// The ELF headers are inconsistent.
    #[error("decompressed vmlinux has a malformed ELF header: {0}")]
    BadElf(&'static str),
}

/// Compression format of a bzImage payload, detected from its magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadFormat {
    /// gzip (1f 8b).
    Gzip,
    /// xz (fd 37 7a 58 5a 00), possibly with a BCJ filter.
    Xz,
    /// legacy .lzma (5d 00 00).
    Lzma,
    /// LZ4 legacy frame (02 21 4c 18).
    Lz4Legacy,
    /// zstd (28 b5 2f fd).
    Zstd,
    /// bzip2 ("BZh") — detected, not decoded.
    Bzip2,
    /// LZO (89 4c 5a 4f) — detected, not decoded.
    Lzo,
}

impl PayloadFormat {
    /// Detects the format from the first bytes of a payload.
    pub fn detect(payload: &[u8]) -> Option<PayloadFormat> {
        const MAGICS: &[(&[u8], PayloadFormat)] = &[
            (&[0x1f, 0x8b], PayloadFormat::Gzip),
            (&[0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00], PayloadFormat::Xz),
            (&[0x5d, 0x00, 0x00], PayloadFormat::Lzma),
            (&[0x02, 0x21, 0x4c, 0x18], PayloadFormat::Lz4Legacy),
            (&[0x28, 0xb5, 0x2f, 0xfd], PayloadFormat::Zstd),
            (b"BZh", PayloadFormat::Bzip2),
            (&[0x89, 0x4c, 0x5a, 0x4f], PayloadFormat::Lzo),
        ];
        MAGICS
            .iter()
            .find(|(magic, _)| payload.starts_with(magic))
            .map(|&(_, format)| format)
    }
}

impl std::fmt::Display for PayloadFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PayloadFormat::Gzip => "gzip",
            PayloadFormat::Xz => "xz",
            PayloadFormat::Lzma => "lzma",
            PayloadFormat::Lz4Legacy => "lz4 (legacy frame)",
            PayloadFormat::Zstd => "zstd",
            PayloadFormat::Bzip2 => "bzip2",
            PayloadFormat::Lzo => "lzo",
        })
    }
}

/// What the setup header says about the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetupInfo {
    /// Number of 512-byte setup sectors (a header value of 0 means 4).
    pub setup_sects: u8,
    /// Boot protocol version, e.g. 0x020f for 2.15.
    pub protocol_version: u16,
    /// Size of the real-mode part: `(setup_sects + 1) * 512`; the protected-mode part follows.
    pub setup_size: usize,
    /// `loadflags` (bit 0: LOADED_HIGH).
    pub loadflags: u8,
    /// `initrd_addr_max`.
    pub initrd_addr_max: u32,
    /// `kernel_alignment`.
    pub kernel_alignment: u32,
    /// `relocatable_kernel`.
    pub relocatable: bool,
    /// `xloadflags` (bit 0: XLF_KERNEL_64, 64-bit entry at +0x200).
    pub xloadflags: u16,
    /// `cmdline_size`: maximum command-line length, excluding the NUL.
    pub cmdline_size: u32,
    /// `payload_offset`, relative to the start of the protected-mode part.
    pub payload_offset: u32,
    /// `payload_length`, including the 4-byte size trailer the kernel build appends.
    pub payload_length: u32,
    /// `pref_address`.
    pub pref_address: u64,
    /// `init_size`: memory the kernel needs from its load address while it boots.
    pub init_size: u32,
    /// Compression format of the payload, if recognised.
    pub payload_format: Option<PayloadFormat>,
}

impl SetupInfo {
    /// Byte range of the payload within the image (checked against the image by
    /// [`setup_header_info`]).
    pub fn payload_range(&self) -> std::ops::Range<usize> {
        let start = self.setup_size + self.payload_offset as usize;
        start..start + self.payload_length as usize
    }
}

fn read_u16(data: &[u8], offset: usize) -> u16 {
    let mut bytes = [0u8; 2];
    if let Some(src) = data.get(offset..offset + 2) {
        bytes.copy_from_slice(src);
    }
    u16::from_le_bytes(bytes)
}

fn read_u32(data: &[u8], offset: usize) -> u32 {
    let mut bytes = [0u8; 4];
    if let Some(src) = data.get(offset..offset + 4) {
        bytes.copy_from_slice(src);
    }
    u32::from_le_bytes(bytes)
}

fn read_u64(data: &[u8], offset: usize) -> u64 {
    let mut bytes = [0u8; 8];
    if let Some(src) = data.get(offset..offset + 8) {
        bytes.copy_from_slice(src);
    }
    u64::from_le_bytes(bytes)
}

/// Parses the bzImage setup header and locates the payload.
pub fn setup_header_info(image: &[u8]) -> Result<SetupInfo, BzImageError> {
    if image.len() < MIN_HEADER_LEN {
        return Err(BzImageError::TooSmall { len: image.len() });
    }
    if &image[HEADER_MAGIC_OFFSET..HEADER_MAGIC_OFFSET + 4] != HEADER_MAGIC {
        return Err(BzImageError::BadMagic);
    }
    let protocol_version = read_u16(image, VERSION_OFFSET);
    if protocol_version < MIN_PAYLOAD_PROTOCOL {
        return Err(BzImageError::ProtocolTooOld {
            version: protocol_version,
        });
    }
    let setup_sects = match image[SETUP_SECTS_OFFSET] {
        0 => 4,
        n => n,
    };
    let setup_size = (usize::from(setup_sects) + 1) * 512;
    let payload_offset = read_u32(image, PAYLOAD_OFFSET_OFFSET);
    let payload_length = read_u32(image, PAYLOAD_LENGTH_OFFSET);
    let end = (setup_size as u64) + u64::from(payload_offset) + u64::from(payload_length);
    if end > image.len() as u64 {
        return Err(BzImageError::PayloadOutOfBounds {
            setup_size,
            offset: payload_offset,
            length: payload_length,
            image_len: image.len(),
        });
    }
    let start = setup_size + payload_offset as usize;
    let payload = &image[start..start + payload_length as usize];
    Ok(SetupInfo {
        setup_sects,
        protocol_version,
        setup_size,
        loadflags: image[LOADFLAGS_OFFSET],
        initrd_addr_max: read_u32(image, INITRD_ADDR_MAX_OFFSET),
        kernel_alignment: read_u32(image, KERNEL_ALIGNMENT_OFFSET),
        relocatable: image[RELOCATABLE_OFFSET] != 0,
        xloadflags: read_u16(image, XLOADFLAGS_OFFSET),
        cmdline_size: read_u32(image, CMDLINE_SIZE_OFFSET),
        payload_offset,
        payload_length,
        pref_address: read_u64(image, PREF_ADDRESS_OFFSET),
        init_size: read_u32(image, INIT_SIZE_OFFSET),
        payload_format: PayloadFormat::detect(payload),
    })
}

/// Extracts the ELF vmlinux from a bzImage, with the [`DEFAULT_OUTPUT_LIMIT`] cap.
///
/// The result is trimmed to the ELF file's own extent: with `CONFIG_X86_NEED_RELOCS` the kernel
/// build appends a relocation table after the ELF image inside the payload, which is not part of
/// the vmlinux.
pub fn extract_vmlinux(image: &[u8]) -> Result<Vec<u8>, BzImageError> {
    extract_vmlinux_with_limit(image, DEFAULT_OUTPUT_LIMIT)
}

/// [`extract_vmlinux`] with a caller-chosen cap on the decompressed size.
pub fn extract_vmlinux_with_limit(image: &[u8], limit: usize) -> Result<Vec<u8>, BzImageError> {
    let mut data = decompress_payload(image, limit)?;
    let extent = elf_extent(&data)?;
    data.truncate(extent);
    Ok(data)
}

/// Decompresses the bzImage payload as is (ELF image plus any appended relocations), producing
/// at most `limit` bytes.
pub fn decompress_payload(image: &[u8], limit: usize) -> Result<Vec<u8>, BzImageError> {
    let info = setup_header_info(image)?;
    let payload = &image[info.payload_range()];
    let Some(format) = info.payload_format else {
        return Err(BzImageError::UnknownFormat(
            payload.iter().take(8).copied().collect(),
        ));
    };
    decompress(format, payload, limit)
}

/// Decompresses `payload` in the given format, producing at most `limit` bytes.
pub fn decompress(
    format: PayloadFormat,
    payload: &[u8],
    limit: usize,
) -> Result<Vec<u8>, BzImageError> {
    let corrupt = |reason: String| BzImageError::Corrupt { format, reason };
    match format {
        PayloadFormat::Gzip => read_limited(flate2::read::GzDecoder::new(payload), format, limit),
        PayloadFormat::Xz => read_limited(lzma_rust2::XzReader::new(payload, false), format, limit),
        PayloadFormat::Lzma => {
            let limit_kib = u32::try_from(limit / 1024).unwrap_or(u32::MAX);
            let reader = lzma_rust2::LzmaReader::new_mem_limit(payload, limit_kib, None)
                .map_err(|e| corrupt(e.to_string()))?;
            read_limited(reader, format, limit)
        }
        PayloadFormat::Zstd => {
            let reader = ruzstd::decoding::StreamingDecoder::new(payload)
                .map_err(|e| corrupt(e.to_string()))?;
            read_limited(reader, format, limit)
        }
        PayloadFormat::Lz4Legacy => decompress_lz4_legacy(payload, limit),
        PayloadFormat::Bzip2 | PayloadFormat::Lzo => Err(BzImageError::UnsupportedFormat(format)),
    }
}

/// Reads a decoder to its end, failing once it yields more than `limit` bytes.
fn read_limited<R: Read>(
    reader: R,
    format: PayloadFormat,
    limit: usize,
) -> Result<Vec<u8>, BzImageError> {
    let mut out = Vec::new();
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    reader
        .take(cap)
        .read_to_end(&mut out)
        .map_err(|e| BzImageError::Corrupt {
            format,
            reason: e.to_string(),
        })?;
    if out.len() > limit {
        return Err(BzImageError::TooLarge { limit });
    }
    Ok(out)
}

/// Decodes the LZ4 legacy frame the kernel build produces (`lz4 -l`): the magic, then blocks of
/// `[u32 LE compressed size][compressed data]`, each decompressing to at most 8 MiB on its own.
/// The magic may repeat between blocks (concatenated streams); the kernel build appends the
/// 4-byte uncompressed size, which shows up as a lone 4-byte tail (or as a block size that cannot
/// fit in what is left) and ends the stream.
fn decompress_lz4_legacy(payload: &[u8], limit: usize) -> Result<Vec<u8>, BzImageError> {
    let corrupt = |reason: String| BzImageError::Corrupt {
        format: PayloadFormat::Lz4Legacy,
        reason,
    };
    let mut out = Vec::new();
    let mut pos = 4; // after the magic (checked by the caller's detection)
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK_MAX];
    while payload.len().saturating_sub(pos) >= 4 {
        let word = read_u32(payload, pos);
        let rest = payload.len() - pos - 4;
        if word == LZ4_LEGACY_MAGIC {
            pos += 4;
            continue;
        }
        if word == 0 || rest == 0 {
            // End marker, or the size trailer.
            break;
        }
        let size = word as usize;
        if size > rest {
            if out.is_empty() {
                return Err(corrupt(format!(
                    "block of {size} bytes at offset {pos} overruns the payload ({rest} bytes left)"
                )));
            }
            // Trailing bytes that are not a block: the size trailer plus padding.
            break;
        }
        let data = &payload[pos + 4..pos + 4 + size];
        let n = lz4_flex::block::decompress_into(data, &mut block)
            .map_err(|e| corrupt(format!("block at offset {pos}: {e}")))?;
        if out.len() + n > limit {
            return Err(BzImageError::TooLarge { limit });
        }
        out.extend_from_slice(&block[..n]);
        pos += 4 + size;
    }
    if out.is_empty() {
        return Err(corrupt("no data blocks".to_string()));
    }
    Ok(out)
}

/// Returns the length of the ELF file at the start of `data`: the furthest byte any header,
/// segment or section refers to.
fn elf_extent(data: &[u8]) -> Result<usize, BzImageError> {
    if !data.starts_with(b"\x7fELF") {
        return Err(BzImageError::NotElf(data.iter().take(8).copied().collect()));
    }
    // Field offsets for (class 32, class 64).
    struct Layout {
        ehdr_size: u64,
        phoff: (usize, bool),
        shoff: (usize, bool),
        phentsize: usize,
        phnum: usize,
        shentsize: usize,
        shnum: usize,
        ph_offset: (usize, bool),
        ph_filesz: (usize, bool),
        sh_offset: (usize, bool),
        sh_size: (usize, bool),
    }
    const ELF32: Layout = Layout {
        ehdr_size: 52,
        phoff: (0x1c, false),
        shoff: (0x20, false),
        phentsize: 0x2a,
        phnum: 0x2c,
        shentsize: 0x2e,
        shnum: 0x30,
        ph_offset: (0x04, false),
        ph_filesz: (0x10, false),
        sh_offset: (0x10, false),
        sh_size: (0x14, false),
    };
    const ELF64: Layout = Layout {
        ehdr_size: 64,
        phoff: (0x20, true),
        shoff: (0x28, true),
        phentsize: 0x36,
        phnum: 0x38,
        shentsize: 0x3a,
        shnum: 0x3c,
        ph_offset: (0x08, true),
        ph_filesz: (0x20, true),
        sh_offset: (0x18, true),
        sh_size: (0x20, true),
    };
    let layout = match data.get(4) {
        Some(1) => &ELF32,
        Some(2) => &ELF64,
        _ => return Err(BzImageError::BadElf("unknown ELF class")),
    };
    if data.get(5) != Some(&1) {
        return Err(BzImageError::BadElf("not little-endian"));
    }
    let len = data.len() as u64;
    if len < layout.ehdr_size {
        return Err(BzImageError::BadElf("truncated ELF header"));
    }
    let word = |base: u64, (offset, wide): (usize, bool)| -> Result<u64, BzImageError> {
        let at = usize::try_from(base)
            .ok()
            .and_then(|b| b.checked_add(offset))
            .ok_or(BzImageError::BadElf("header offset overflow"))?;
        let size = if wide { 8 } else { 4 };
        if at.checked_add(size).is_none_or(|end| end > data.len()) {
            return Err(BzImageError::BadElf(
                "header table past the end of the image",
            ));
        }
        Ok(if wide {
            read_u64(data, at)
        } else {
            u64::from(read_u32(data, at))
        })
    };
    let half = |offset: usize| u64::from(read_u16(data, offset));

    let mut extent = layout.ehdr_size;
    for (table_off, entsize, num, fields) in [
        (
            layout.phoff,
            layout.phentsize,
            layout.phnum,
            (layout.ph_offset, layout.ph_filesz, None),
        ),
        (
            layout.shoff,
            layout.shentsize,
            layout.shnum,
            (layout.sh_offset, layout.sh_size, Some(4usize)),
        ),
    ] {
        let base = word(0, table_off)?;
        let entsize = half(entsize);
        let num = half(num);
        if num == 0 {
            continue;
        }
        let table_end = entsize
            .checked_mul(num)
            .and_then(|s| s.checked_add(base))
            .ok_or(BzImageError::BadElf("size overflow"))?;
        if table_end > len {
            return Err(BzImageError::BadElf(
                "header table past the end of the image",
            ));
        }
        extent = extent.max(table_end);
        let (off_field, size_field, type_field) = fields;
        for i in 0..num {
            let entry = base + i * entsize;
            if let Some(type_off) = type_field {
                // SHT_NOBITS (8) sections occupy no file space.
                if word(entry, (type_off, false))? == 8 {
                    continue;
                }
            }
            let start = word(entry, off_field)?;
            let size = word(entry, size_field)?;
            if size == 0 {
                continue;
            }
            let end = start
                .checked_add(size)
                .ok_or(BzImageError::BadElf("size overflow"))?;
            if end > len {
                return Err(BzImageError::BadElf(
                    "segment or section past the end of the image",
                ));
            }
            extent = extent.max(end);
        }
    }
    usize::try_from(extent).map_err(|_| BzImageError::BadElf("size overflow"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A minimal ELF64 file: header, one PT_LOAD program header covering `body`, and no
    /// sections.
    fn synthetic_elf(body_len: usize) -> Vec<u8> {
        let mut elf = vec![0u8; 64 + 56];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2; // ELFCLASS64
        elf[5] = 1; // little endian
        elf[6] = 1;
        elf[0x10..0x12].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        elf[0x12..0x14].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let ph = 64;
        elf[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        elf[ph + 8..ph + 16].copy_from_slice(&120u64.to_le_bytes()); // p_offset
        elf[ph + 0x20..ph + 0x28].copy_from_slice(&(body_len as u64).to_le_bytes()); // filesz
                                                                                     // A compressible but not trivial body.
        elf.extend((0..body_len).map(|i| ((i * 7) ^ (i >> 5)) as u8));
        elf
    }

    fn with_size_trailer(mut compressed: Vec<u8>, uncompressed: usize) -> Vec<u8> {
        compressed.extend_from_slice(&(uncompressed as u32).to_le_bytes());
        compressed
    }

    fn compress(format: PayloadFormat, data: &[u8]) -> Vec<u8> {
        match format {
            PayloadFormat::Gzip => {
                let mut enc =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                enc.write_all(data).unwrap();
                enc.finish().unwrap()
            }
            PayloadFormat::Xz => {
                let mut options = lzma_rust2::XzOptions::with_preset(1);
                // Like the kernel build: x86 BCJ filter in front of LZMA2, CRC32 check.
                options.prepend_pre_filter(lzma_rust2::FilterType::BcjX86, 0);
                options.set_check_sum_type(lzma_rust2::CheckType::Crc32);
                let mut w = lzma_rust2::XzWriter::new(Vec::new(), options).unwrap();
                w.write_all(data).unwrap();
                let out = w.finish().unwrap();
                with_size_trailer(out, data.len())
            }
            PayloadFormat::Lzma => {
                // Like the kernel's `lzma -9`: the .lzma header with unknown size (-1) and an
                // end marker, then the size trailer.
                let options = lzma_rust2::LzmaOptions::with_preset(1);
                let mut w =
                    lzma_rust2::LzmaWriter::new_use_header(Vec::new(), &options, None).unwrap();
                w.write_all(data).unwrap();
                let out = w.finish().unwrap();
                with_size_trailer(out, data.len())
            }
            PayloadFormat::Lz4Legacy => {
                let mut out = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
                for chunk in data.chunks(LZ4_LEGACY_BLOCK_MAX) {
                    let block = lz4_flex::block::compress(chunk);
                    out.extend_from_slice(&(block.len() as u32).to_le_bytes());
                    out.extend_from_slice(&block);
                }
                with_size_trailer(out, data.len())
            }
            PayloadFormat::Zstd => {
                let out = ruzstd::encoding::compress_to_vec(
                    data,
                    ruzstd::encoding::CompressionLevel::Fastest,
                );
                with_size_trailer(out, data.len())
            }
            PayloadFormat::Bzip2 | PayloadFormat::Lzo => unreachable!("no encoder"),
        }
    }

    /// A bzImage shell: 4 setup sectors (header value 0), protocol 2.15, a little padding before
    /// the payload.
    fn synthetic_bzimage(payload: &[u8]) -> Vec<u8> {
        let setup_size = 5 * 512;
        let payload_offset = 0x40u32;
        let mut image = vec![0u8; setup_size + payload_offset as usize];
        image[SETUP_SECTS_OFFSET] = 0;
        image[HEADER_MAGIC_OFFSET..HEADER_MAGIC_OFFSET + 4].copy_from_slice(HEADER_MAGIC);
        image[VERSION_OFFSET..VERSION_OFFSET + 2].copy_from_slice(&0x020fu16.to_le_bytes());
        image[PAYLOAD_OFFSET_OFFSET..PAYLOAD_OFFSET_OFFSET + 4]
            .copy_from_slice(&payload_offset.to_le_bytes());
        image[PAYLOAD_LENGTH_OFFSET..PAYLOAD_LENGTH_OFFSET + 4]
            .copy_from_slice(&(payload.len() as u32).to_le_bytes());
        image.extend_from_slice(payload);
        image.extend_from_slice(&[0xcc; 100]); // trailing protected-mode code
        image
    }

    const ENCODABLE: [PayloadFormat; 5] = [
        PayloadFormat::Gzip,
        PayloadFormat::Xz,
        PayloadFormat::Lzma,
        PayloadFormat::Lz4Legacy,
        PayloadFormat::Zstd,
    ];

    #[test]
    fn round_trip_every_format() {
        let elf = synthetic_elf(300_000);
        // The relocation table the kernel build appends after the ELF image.
        let mut payload_data = elf.clone();
        payload_data.extend_from_slice(&[0xab; 1000]);
        for format in ENCODABLE {
            let image = synthetic_bzimage(&compress(format, &payload_data));
            let info = setup_header_info(&image).unwrap();
            assert_eq!(info.setup_sects, 4);
            assert_eq!(info.setup_size, 2560);
            assert_eq!(info.protocol_version, 0x020f);
            assert_eq!(info.payload_format, Some(format));
            let raw = decompress_payload(&image, DEFAULT_OUTPUT_LIMIT)
                .unwrap_or_else(|e| panic!("{format}: {e}"));
            assert_eq!(raw, payload_data, "{format}");
            let vmlinux = extract_vmlinux(&image).unwrap();
            assert_eq!(vmlinux, elf, "{format}: trimmed to the ELF extent");
        }
    }

    #[test]
    fn lz4_spanning_several_blocks() {
        let data = synthetic_elf(LZ4_LEGACY_BLOCK_MAX * 2 + 12345);
        let image = synthetic_bzimage(&compress(PayloadFormat::Lz4Legacy, &data));
        assert_eq!(extract_vmlinux(&image).unwrap(), data);
    }

    #[test]
    fn output_limit_is_enforced() {
        let data = synthetic_elf(200_000);
        for format in ENCODABLE {
            let image = synthetic_bzimage(&compress(format, &data));
            match extract_vmlinux_with_limit(&image, 100_000) {
                Err(BzImageError::TooLarge { limit: 100_000 }) => {}
                // The lzma reader refuses a dictionary bigger than the limit up front.
                Err(BzImageError::Corrupt { .. }) if format == PayloadFormat::Lzma => {}
                other => panic!("{format}: {other:?}"),
            }
        }
    }

    #[test]
    fn header_errors() {
        assert!(matches!(
            setup_header_info(&[0u8; 100]),
            Err(BzImageError::TooSmall { len: 100 })
        ));
        assert!(matches!(
            setup_header_info(&[0u8; 4096]),
            Err(BzImageError::BadMagic)
        ));
        let mut image = synthetic_bzimage(&compress(PayloadFormat::Gzip, &synthetic_elf(10)));
        image[VERSION_OFFSET..VERSION_OFFSET + 2].copy_from_slice(&0x0206u16.to_le_bytes());
        assert!(matches!(
            setup_header_info(&image),
            Err(BzImageError::ProtocolTooOld { version: 0x0206 })
        ));
        let mut image = synthetic_bzimage(&compress(PayloadFormat::Gzip, &synthetic_elf(10)));
        image[PAYLOAD_LENGTH_OFFSET..PAYLOAD_LENGTH_OFFSET + 4]
            .copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            extract_vmlinux(&image),
            Err(BzImageError::PayloadOutOfBounds { .. })
        ));
    }

    #[test]
    fn unsupported_and_unknown_formats() {
        let image = synthetic_bzimage(b"BZh91AY&SY....");
        assert!(matches!(
            extract_vmlinux(&image),
            Err(BzImageError::UnsupportedFormat(PayloadFormat::Bzip2))
        ));
        let image = synthetic_bzimage(&[0x89, 0x4c, 0x5a, 0x4f, 0, 0, 0]);
        assert!(matches!(
            extract_vmlinux(&image),
            Err(BzImageError::UnsupportedFormat(PayloadFormat::Lzo))
        ));
        let image = synthetic_bzimage(b"garbage!");
        assert!(matches!(
            extract_vmlinux(&image),
            Err(BzImageError::UnknownFormat(_))
        ));
    }

    #[test]
    fn not_elf_is_rejected() {
        let image = synthetic_bzimage(&compress(PayloadFormat::Gzip, b"definitely not an ELF"));
        assert!(matches!(
            extract_vmlinux(&image),
            Err(BzImageError::NotElf(_))
        ));
        let mut elf = synthetic_elf(1000);
        elf.truncate(500); // the program header now points past the end
        let image = synthetic_bzimage(&compress(PayloadFormat::Gzip, &elf));
        assert!(matches!(
            extract_vmlinux(&image),
            Err(BzImageError::BadElf(_))
        ));
    }

    #[test]
    fn truncated_payloads_fail_cleanly() {
        let data = synthetic_elf(50_000);
        for format in ENCODABLE {
            let compressed = compress(format, &data);
            for cut in [1, 3, 5, 8, 13, compressed.len() / 2, compressed.len() - 9] {
                let image = synthetic_bzimage(&compressed[..cut.min(compressed.len())]);
                // Must not panic; a cut stream must not yield the full, valid vmlinux.
                if let Ok(v) = extract_vmlinux(&image) {
                    assert_ne!(v, data, "{format} cut at {cut}");
                }
            }
        }
    }

    /// xorshift64*: deterministic pseudo-random bytes without a dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    #[test]
    fn fuzz_random_input_never_panics() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let valid: Vec<Vec<u8>> = ENCODABLE
            .iter()
            .map(|&f| compress(f, &synthetic_elf(4096)))
            .collect();
        for round in 0..3000 {
            let mut payload = match round % 3 {
                // Magic followed by garbage.
                0 => {
                    let magic: &[u8] = match round % 5 {
                        0 => &[0x1f, 0x8b, 8, 0],
                        1 => &[0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00],
                        2 => &[0x5d, 0x00, 0x00],
                        3 => &[0x02, 0x21, 0x4c, 0x18],
                        _ => &[0x28, 0xb5, 0x2f, 0xfd],
                    };
                    let mut p = magic.to_vec();
                    let n = (rng.next() % 512) as usize;
                    p.extend(rng.bytes(n));
                    p
                }
                // A valid stream with a few flipped bytes.
                1 => {
                    let mut p = valid[round % valid.len()].clone();
                    for _ in 0..1 + rng.next() % 4 {
                        let i = (rng.next() as usize) % p.len();
                        p[i] ^= 1 << (rng.next() % 8);
                    }
                    p
                }
                // Pure noise.
                _ => {
                    let n = (rng.next() % 256) as usize;
                    rng.bytes(n)
                }
            };
            if round % 7 == 0 {
                payload.truncate((rng.next() as usize) % (payload.len() + 1));
            }
            let image = synthetic_bzimage(&payload);
            let _ = extract_vmlinux_with_limit(&image, 16 << 20);
            // Random headers too.
            let header_len = MIN_HEADER_LEN + (rng.next() % 2048) as usize;
            let mut header = rng.bytes(header_len);
            if round % 2 == 0 {
                header[HEADER_MAGIC_OFFSET..HEADER_MAGIC_OFFSET + 4].copy_from_slice(HEADER_MAGIC);
            }
            let _ = setup_header_info(&header);
            let _ = extract_vmlinux_with_limit(&header, 16 << 20);
        }
    }
}
