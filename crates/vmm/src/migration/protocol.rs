//! The migration stream, as bytes: a preamble, then framed messages.
//!
//! The source opens with the preamble, [`MAGIC`] and the protocol version (u32, little
//! endian), so that a destination refuses a stream it does not speak before reading anything
//! else. Every message after it is an 8-byte header (kind byte, three zero bytes, payload
//! length u32 LE) and its payload:
//!
//! | kind | direction | payload |
//! |---|---|---|
//! | `Hello` | source → destination | JSON [`Hello`]: tern version, configuration, CPUID, memory layout |
//! | `Accept` | destination → source | none: the VM is built, memory may come |
//! | `Refuse` | destination → source | UTF-8 reason |
//! | `Pages` | source → destination | guest address u64, page count u32, 0 u32, then the pages |
//! | `Zeroes` | source → destination | guest address u64, page count u32, 0 u32: pages that are now all zero |
//! | `State` | source → destination | JSON [`FinalState`]: every component's section |
//! | `Ready` | destination → source | none: restored, waiting for `Go` |
//! | `Go` | source → destination | none: the source will not run the VM again |
//! | `Running` | destination → source | none: the VM runs on the destination |
//! | `Failed` | destination → source | UTF-8 reason (the destination discards the VM) |
//! | `Cancel` | source → destination | UTF-8 reason (the source keeps the VM) |
//! | `Sync` | source → destination | none: answer once everything before it is in memory |
//! | `Synced` | destination → source | none: the answer (socket buffers hold nothing more) |
//! | `Memory` | source → destination | JSON [`SharedMemory`], the shared memory file's descriptor attached (`unix:` only) |
//!
//! Hand-written: it is tern's own wire format; it carries the same sections as a snapshot.
//! Everything read is bounded and checked (a hostile peer gets a one-line error, never a
//! panic or an allocation it chose).

use std::io::{Read, Write};

use kvm_bindings::kvm_cpuid_entry2;
use lifecycle::Section;
use serde::{Deserialize, Serialize};

use crate::VmConfig;

/// The first bytes of a migration stream.
pub const MAGIC: [u8; 8] = *b"TERNMIG\n";
/// The protocol version this tern speaks.
pub const VERSION: u32 = 1;
/// Guest page size as the stream counts pages.
pub const PAGE: u64 = 4096;
/// Most pages in one `Pages` message.
pub const MAX_PAGES: u32 = 256;
/// Largest JSON payload (`Hello`, `State`): as a snapshot's `state.json`.
pub const MAX_JSON: u32 = crate::snapshot::MAX_STATE_SIZE as u32;
/// Largest reason text.
pub const MAX_TEXT: u32 = 4096;
/// Bytes of a `Pages`/`Zeroes` payload before the pages.
pub const RUN_HEADER: u32 = 16;

/// A message's kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// The VM to build.
    Hello = 1,
    /// Built; send memory.
    Accept = 2,
    /// Cannot take the VM.
    Refuse = 3,
    /// Pages of memory.
    Pages = 4,
    /// Pages that read as zero.
    Zeroes = 5,
    /// The components' state.
    State = 6,
    /// Restored.
    Ready = 7,
    /// Run it.
    Go = 8,
    /// It runs.
    Running = 9,
    /// The destination failed.
    Failed = 10,
    /// The source gave up.
    Cancel = 11,
    /// Guest memory itself (a local migration): JSON [`SharedMemory`], with the shared
    /// memory file's descriptor attached.
    Memory = 12,
    /// Answer once everything before this is in guest memory.
    Sync = 13,
    /// Everything before the `Sync` is in guest memory.
    Synced = 14,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Kind> {
        use Kind::*;
        [
            Hello, Accept, Refuse, Pages, Zeroes, State, Ready, Go, Running, Failed, Cancel,
            Memory, Sync, Synced,
        ]
        .into_iter()
        .find(|k| *k as u8 == b)
    }

    /// The largest payload a message of this kind may have.
    fn max_len(self) -> u32 {
        match self {
            Kind::Hello | Kind::State => MAX_JSON,
            Kind::Memory => MAX_TEXT,
            Kind::Refuse | Kind::Failed | Kind::Cancel => MAX_TEXT,
            Kind::Pages => RUN_HEADER + MAX_PAGES * PAGE as u32,
            Kind::Zeroes => RUN_HEADER,
            Kind::Accept | Kind::Ready | Kind::Go | Kind::Running | Kind::Sync | Kind::Synced => 0,
        }
    }
}

/// What the source says about the VM before any memory moves.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// The sending tern's version.
    pub tern: String,
    /// The VM's configuration (the destination applies its remaps).
    pub config: VmConfig,
    /// vCPU 0's CPUID on the source: the features the guest may use.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// (guest address, length) of each RAM region.
    pub memory: Vec<(u64, u64)>,
    /// A local migration: guest memory follows as a file descriptor (a `Memory` message)
    /// instead of as pages.
    #[serde(default)]
    pub local: bool,
}

/// What a `Memory` message says about the descriptor it carries.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedMemory {
    /// Bytes of guest RAM in the file (its regions end to end).
    pub size: u64,
}

/// What the source sends once the VM is stopped.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinalState {
    /// Every component's section, in the source's walk order.
    pub components: Vec<Section>,
    /// The VM was paused on the source (by its user): it stays paused.
    pub paused: bool,
}

/// Protocol errors: one line each.
pub type Error = String;

/// Writes the preamble.
pub fn write_preamble(w: &mut impl Write) -> std::io::Result<()> {
    let mut b = [0u8; 12];
    b[..8].copy_from_slice(&MAGIC);
    b[8..].copy_from_slice(&VERSION.to_le_bytes());
    w.write_all(&b)
}

/// Reads and checks the preamble: Err(reason) for a stream that is not tern's, or of another
/// version.
pub fn read_preamble(r: &mut impl Read) -> Result<(), Error> {
    let mut b = [0u8; 12];
    r.read_exact(&mut b)
        .map_err(|e| format!("reading the migration preamble: {e}"))?;
    if b[..8] != MAGIC {
        return Err("the peer does not speak tern's migration protocol".into());
    }
    let v = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
    if v != VERSION {
        return Err(format!(
            "the source speaks migration protocol version {v}; this tern speaks version {VERSION}"
        ));
    }
    Ok(())
}

/// Writes a message header for `len` bytes of payload.
pub fn write_header(w: &mut impl Write, kind: Kind, len: u32) -> std::io::Result<()> {
    let mut h = [0u8; 8];
    h[0] = kind as u8;
    h[4..].copy_from_slice(&len.to_le_bytes());
    w.write_all(&h)
}

/// Writes a whole message.
pub fn write_msg(w: &mut impl Write, kind: Kind, payload: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|l| *l <= kind.max_len())
        .ok_or_else(|| std::io::Error::other(format!("{kind:?} message too large")))?;
    write_header(w, kind, len)?;
    w.write_all(payload)
}

/// Writes a message with a JSON payload; the bytes written, header included.
pub fn write_json(w: &mut impl Write, kind: Kind, v: &impl Serialize) -> std::io::Result<u64> {
    let text = serde_json::to_vec(v).map_err(std::io::Error::other)?;
    write_msg(w, kind, &text)?;
    Ok(8 + text.len() as u64)
}

/// The header of a run of pages: its guest address and page count.
pub fn run_header(addr: u64, pages: u32) -> [u8; RUN_HEADER as usize] {
    let mut b = [0u8; RUN_HEADER as usize];
    b[..8].copy_from_slice(&addr.to_le_bytes());
    b[8..12].copy_from_slice(&pages.to_le_bytes());
    b
}

/// A message as read: its kind and payload length, checked against the kind's limit.
#[derive(Debug, PartialEq, Eq)]
pub struct Header {
    /// The kind.
    pub kind: Kind,
    /// Payload bytes that follow.
    pub len: u32,
}

/// Reads a message header.
pub fn read_header(r: &mut impl Read) -> std::io::Result<Result<Header, Error>> {
    let mut h = [0u8; 8];
    r.read_exact(&mut h)?;
    Ok(parse_header(&h))
}

/// Checks a message header.
pub fn parse_header(h: &[u8; 8]) -> Result<Header, Error> {
    let kind =
        Kind::from_byte(h[0]).ok_or_else(|| format!("unknown migration message kind {}", h[0]))?;
    if h[1..4] != [0, 0, 0] {
        return Err(format!("malformed {kind:?} message header"));
    }
    let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    if len > kind.max_len() {
        return Err(format!(
            "{kind:?} message of {len} bytes (at most {} allowed)",
            kind.max_len()
        ));
    }
    Ok(Header { kind, len })
}

/// Parses the payload of a `Pages` or `Zeroes` message (`len` bytes in all) from its first
/// [`RUN_HEADER`] bytes: (guest address, pages), checked against the payload's length and the
/// guest's `memory` regions (the run lies within one).
pub fn parse_run(
    kind: Kind,
    head: &[u8; RUN_HEADER as usize],
    len: u32,
    memory: &[(u64, u64)],
) -> Result<(u64, u32), Error> {
    let addr = u64::from_le_bytes(head[..8].try_into().unwrap_or_default());
    let pages = u32::from_le_bytes(head[8..12].try_into().unwrap_or_default());
    if head[12..] != [0, 0, 0, 0] || pages == 0 || pages > MAX_PAGES || addr % PAGE != 0 {
        return Err(format!(
            "malformed {kind:?} message ({pages} pages at {addr:#x})"
        ));
    }
    let Some(body) = len.checked_sub(RUN_HEADER).map(u64::from) else {
        return Err(format!(
            "{kind:?} message of {len} bytes is shorter than its header"
        ));
    };
    let want = if kind == Kind::Pages {
        u64::from(pages) * PAGE
    } else {
        0
    };
    if body != want {
        return Err(format!(
            "{kind:?} message of {pages} pages carries {body} bytes"
        ));
    }
    let end = addr.checked_add(u64::from(pages) * PAGE);
    if !memory
        .iter()
        .any(|&(a, l)| addr >= a && a.checked_add(l).zip(end).is_some_and(|(e, end)| end <= e))
    {
        return Err(format!(
            "{kind:?} message for {pages} pages at {addr:#x}, outside guest RAM"
        ));
    }
    Ok((addr, pages))
}

/// Parses a text payload (a reason).
pub fn parse_text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).chars().take(512).collect()
}

/// Parses a JSON payload.
pub fn parse_json<T: serde::de::DeserializeOwned>(kind: Kind, b: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(b).map_err(|e| format!("malformed {kind:?} message: {e}"))
}

/// Reads a message's payload into a fresh buffer (its length is bounded by its kind).
pub fn read_payload(r: &mut impl Read, h: &Header) -> std::io::Result<Vec<u8>> {
    let mut b = vec![0u8; h.len as usize];
    r.read_exact(&mut b)?;
    Ok(b)
}

/// Entry points for tern's fuzz targets (`fuzz/`); not an API.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// Everything a destination parses from a source, over `data` as a stream: the
    /// preamble, then messages until the data ends or one is refused.
    pub fn parse_stream(data: &[u8]) {
        let memory = [(0u64, 0xa_0000u64), (0x10_0000, 0x100_0000)];
        let mut r = data;
        if read_preamble(&mut r).is_err() {
            // Also try the rest as messages, so the fuzzer need not find the magic first.
            r = data;
        }
        while let Ok(Ok(h)) = read_header(&mut r) {
            let Ok(p) = read_payload(&mut r, &h) else {
                return;
            };
            match h.kind {
                Kind::Hello => {
                    let _ = parse_json::<Hello>(h.kind, &p);
                }
                Kind::State => {
                    let _ = parse_json::<FinalState>(h.kind, &p);
                }
                Kind::Pages | Kind::Zeroes => {
                    if p.len() >= RUN_HEADER as usize {
                        let head: [u8; RUN_HEADER as usize] =
                            p[..RUN_HEADER as usize].try_into().unwrap_or_default();
                        let _ = parse_run(h.kind, &head, h.len, &memory);
                    }
                }
                _ => {
                    let _ = parse_text(&p);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preamble_round_trips_and_other_versions_are_named() {
        let mut b = Vec::new();
        write_preamble(&mut b).unwrap();
        read_preamble(&mut b.as_slice()).unwrap();
        b[8] = 2;
        let e = read_preamble(&mut b.as_slice()).unwrap_err();
        assert_eq!(
            e,
            "the source speaks migration protocol version 2; this tern speaks version 1"
        );
        let e = read_preamble(&mut &b"GET / HTTP/1.1\r\n"[..]).unwrap_err();
        assert!(e.contains("does not speak"), "{e}");
    }

    #[test]
    fn headers_are_bounded_by_kind() {
        let mut b = Vec::new();
        write_msg(&mut b, Kind::Go, &[]).unwrap();
        let h = read_header(&mut b.as_slice()).unwrap().unwrap();
        assert_eq!(
            h,
            Header {
                kind: Kind::Go,
                len: 0
            }
        );
        assert!(parse_header(&[99, 0, 0, 0, 0, 0, 0, 0])
            .unwrap_err()
            .contains("kind 99"));
        assert!(parse_header(&[8, 0, 0, 0, 1, 0, 0, 0])
            .unwrap_err()
            .contains("Go message of 1"));
        let huge = [Kind::Hello as u8, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
        assert!(parse_header(&huge).unwrap_err().contains("at most"));
        assert!(write_msg(&mut b, Kind::Go, &[1]).is_err());
    }

    #[test]
    fn runs_must_lie_in_guest_ram_and_match_their_length() {
        let mem = [(0u64, 0xa_0000u64), (0x10_0000, 0x10_0000)];
        let ok = parse_run(Kind::Pages, &run_header(0x10_0000, 2), 16 + 8192, &mem);
        assert_eq!(ok.unwrap(), (0x10_0000, 2));
        assert_eq!(
            parse_run(Kind::Zeroes, &run_header(0x9_f000, 1), 16, &mem).unwrap(),
            (0x9_f000, 1)
        );
        // Across the hole, past the end, unaligned, empty, too long, wrong length, shorter
        // than the run's header.
        for (addr, n, len) in [
            (0x10_0000, 1, 8),
            (0x9_f000, 2, 16 + 8192),
            (0x1f_f000, 2, 16 + 8192),
            (0x10_0001, 1, 16 + 4096),
            (0x10_0000, 0, 16),
            (0x10_0000, MAX_PAGES + 1, 16),
            (0x10_0000, 2, 16 + 4096),
            (u64::MAX - 4095, 1, 16 + 4096),
        ] {
            assert!(
                parse_run(Kind::Pages, &run_header(addr, n), len, &mem).is_err(),
                "{addr:#x} {n} {len}"
            );
        }
    }
}
