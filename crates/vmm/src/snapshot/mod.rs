//! Snapshots: a paused VM's state and memory, written to a directory, and brought back into a
//! freshly built VM of the same configuration.
//!
//! Layout of a snapshot directory: `state.json` (versioned; the configuration, one section of
//! state per component of the VM keyed by its id — see [`crate::components`] — the memory
//! layout and FNV-1a checksums of the state and the memory) and `memory.bin` (guest RAM,
//! region after region; pages of zeroes are holes). Both are written into a temporary
//! directory next to the target, synced and renamed into place, so a crash leaves no half
//! snapshot.
//!
//! A diff snapshot's `memory.bin` holds only the pages written since the snapshot it names as
//! its parent (the rest are holes; `dirty.bin` says which pages it holds); restoring one lays
//! the chain of diffs over the full snapshot at its root.
//!
//! Format 3 (this tern) keeps component sections; format 2 (tern up to commit 7190234) kept
//! fixed fields for the KVM VM, the vCPUs, the UART, the RTC and the virtio transports in attach
//! order, and is read by turning those into the same sections. Disks and TAPs are reopened from
//! the configuration.
//!
//! Submodules: [`kvm`] (KVM's own vCPU and VM state), [`memory`] (the memory file), [`lost`]
//! (a lazily mapped memory file truncated under the VM).

pub mod kvm;
pub mod lost;
pub mod memory;
mod remap;

use std::io::Write;
use std::path::{Path, PathBuf};

use lifecycle::Section;
use serde::{Deserialize, Serialize};

use arch::GuestMemoryMmap;

use crate::VmConfig;
pub use ::api::restore::{RestoreMode, RestoreOptions};
use memory::{fnv, FNV_INIT, PAGE};

pub use kvm::{check_cpu_features, VcpuState, VmState};
pub use lost::mapped_memory_lost;
pub use remap::{apply_host_side, HostSide};

/// Version of the snapshot format this tern writes and reads.
pub const FORMAT_VERSION: u32 = 3;
const STATE_FILE: &str = "state.json";
/// The guest memory file in a snapshot directory.
pub const MEMORY_FILE: &str = "memory.bin";
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
const DIRTY_FILE: &str = "dirty.bin";

/// A snapshot to bring back instead of booting.
pub struct Restore {
    /// The snapshot directory.
    pub dir: std::path::PathBuf,
    /// Its state (read and checked).
    pub snapshot: Snapshot,
    /// Stay paused after restoring.
    pub paused: bool,
    /// Map the memory file copy-on-write (pages load on first touch) instead of reading it.
    pub lazy: bool,
}

/// Everything in `state.json` (format 3).
#[derive(Serialize, Deserialize)]
pub struct Snapshot {
    /// [`FORMAT_VERSION`].
    pub version: u32,
    /// The tern that wrote it.
    pub tern: String,
    /// The VM's configuration.
    pub config: VmConfig,
    /// Each component's state, in the VM's walk order.
    components: Vec<Section>,
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

/// `state.json` as format 2 wrote it; read only to be turned into sections.
#[derive(Deserialize)]
struct SnapshotV2 {
    tern: String,
    config: VmConfig,
    vm: serde_json::Value,
    vcpus: Vec<serde_json::Value>,
    serial: serde_json::Value,
    #[serde(default)]
    rtc: Option<serde_json::Value>,
    /// Virtio transport states in attach order.
    devices: Vec<serde_json::Value>,
    memory: Vec<(u64, u64)>,
    memory_fnv: u64,
    #[serde(default)]
    parent: Option<Parent>,
    #[serde(default)]
    dirty_fnv: u64,
    state_fnv: u64,
}

impl SnapshotV2 {
    /// The same snapshot with format 3's sections: format 2's states are each component's
    /// layout version 1. Virtio transports were saved in attach order, which the
    /// configuration gives.
    fn into_sections(self) -> Result<Snapshot, String> {
        let ids = crate::virtio_devices::device_ids(&self.config);
        if ids.len() != self.devices.len() {
            return Err(format!(
                "{} virtio device states saved, the configuration has {} devices",
                self.devices.len(),
                ids.len()
            ));
        }
        let v1 = |id: String, state| Section {
            id,
            version: 1,
            state,
        };
        let mut components = vec![v1("kvm-vm".into(), self.vm)];
        components.extend(
            self.vcpus
                .into_iter()
                .enumerate()
                .map(|(i, s)| v1(format!("vcpu{i}"), s)),
        );
        components.push(v1("com1".into(), self.serial));
        components.extend(self.rtc.map(|s| v1("rtc".into(), s)));
        components.extend(ids.into_iter().zip(self.devices).map(|(id, s)| v1(id, s)));
        Ok(Snapshot {
            version: 2,
            tern: self.tern,
            config: self.config,
            components,
            memory: self.memory,
            memory_fnv: self.memory_fnv,
            parent: self.parent,
            dirty_fnv: self.dirty_fnv,
            state_fnv: self.state_fnv,
        })
    }
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
    /// All of it. Only `extents` (guest address, length; in order) may hold anything but
    /// zeroes: the rest is not read (reading memory the host never gave the guest would fault
    /// it in), and counts in the checksum as the zeroes it is.
    Full {
        /// The parts that may hold data (see [`crate::memory::GuestRam::extents_with_data`]).
        extents: Vec<(u64, u64)>,
    },
    /// The pages set in `dirty` (one bit per 4 KiB page of the regions end to end), over
    /// `parent`.
    Diff {
        /// The earlier snapshot.
        parent: Parent,
        /// Written pages.
        dirty: &'a [u64],
    },
}

/// Writes a snapshot of a paused VM to `dir` (which must not exist yet): its configuration,
/// its components' `sections` and `mem` as `content` says; returns the state's checksum (what a
/// diff snapshot built on this one records).
pub fn write(
    dir: &Path,
    config: &VmConfig,
    sections: Vec<Section>,
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
        let path = tmp.join(MEMORY_FILE);
        let f = create_private(&path)?;
        memory::bypass_page_cache(&f);
        let (memory_fnv, parent_snap, dirty_fnv) = match content {
            MemoryContent::Full { extents } => {
                (memory::write_full(&f, &path, mem, &extents)?, None, 0)
            }
            MemoryContent::Diff { parent, dirty } => {
                let h = memory::write_diff(&f, &path, mem, dirty)?;
                let words: Vec<u8> = dirty.iter().flat_map(|w| w.to_le_bytes()).collect();
                let dpath = tmp.join(DIRTY_FILE);
                let mut d = create_private(&dpath)?;
                d.write_all(&words)
                    .and_then(|()| d.sync_all())
                    .map_err(|e| format!("writing {}: {e}", dpath.display()))?;
                (h, Some(parent), fnv(FNV_INIT, &words))
            }
        };
        f.sync_all()
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
        let mut snap = Snapshot {
            version: FORMAT_VERSION,
            tern: env!("CARGO_PKG_VERSION").to_string(),
            config: config.clone(),
            components: sections,
            memory: memory::layout(mem),
            memory_fnv,
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
pub fn open(opts: &RestoreOptions) -> Result<Restore, String> {
    sandbox::landlock::check(&opts.dir, false)?;
    let mut snap = read(&opts.dir)?;
    let c = &mut snap.config;
    apply_host_side(c, "the snapshot", &HostSide::restore(opts))?;
    // The configuration inside a snapshot is checked as any other, once the options
    // are applied (for `tern run --restore` and `PUT /v1/vm/restore` alike).
    c.validate().map_err(|e| {
        format!(
            "{}: the snapshot's configuration is invalid: {e}",
            opts.dir.join(STATE_FILE).display()
        )
    })?;
    Ok(Restore {
        dir: opts.dir.clone(),
        snapshot: snap,
        paused: opts.paused,
        lazy: opts.mode == RestoreMode::Lazy,
    })
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

/// The checksum `state.json` must carry: FNV-1a of its text with `state_fnv` (its last field,
/// as tern writes it) set to 0. Computed on the text itself, so it holds whatever fields later
/// tern versions add to the structures inside.
fn state_checksum(text: &[u8]) -> Option<(u64, u64)> {
    const KEY: &[u8] = b",\"state_fnv\":";
    let at = text.windows(KEY.len()).rposition(|w| w == KEY)?;
    let digits = &text[at + KEY.len()..];
    let end = digits.iter().position(|b| !b.is_ascii_digit())?;
    if &digits[end..] != b"}" {
        return None;
    }
    let stated: u64 = std::str::from_utf8(&digits[..end]).ok()?.parse().ok()?;
    let mut unsigned = text[..at + KEY.len()].to_vec();
    unsigned.extend_from_slice(b"0}");
    Some((stated, fnv(FNV_INIT, &unsigned)))
}

/// Reads and checks `dir/state.json` (format 3, or format 2 turned into sections).
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
    #[derive(Deserialize)]
    struct Version {
        version: u32,
        tern: String,
    }
    let v: Version = serde_json::from_slice(&text)
        .map_err(|e| format!("{} is not a tern snapshot: {e}", path.display()))?;
    if v.version != FORMAT_VERSION && v.version != 2 {
        return Err(format!(
            "{} has snapshot format {} (written by tern {}); this tern reads format {FORMAT_VERSION} (and format 2)",
            dir.display(),
            v.version,
            v.tern
        ));
    }
    let snap = if v.version == 2 {
        serde_json::from_slice::<SnapshotV2>(&text)
            .map_err(|e| format!("{} is not a tern snapshot: {e}", path.display()))?
            .into_sections()
            .map_err(|e| format!("{}: {e}", path.display()))?
    } else {
        serde_json::from_slice::<Snapshot>(&text)
            .map_err(|e| format!("{} is not a tern snapshot: {e}", path.display()))?
    };
    match state_checksum(&text) {
        Some((stated, actual)) if stated == actual && stated == snap.state_fnv => Ok(snap),
        _ => Err(format!(
            "{} is corrupted (checksum mismatch)",
            path.display()
        )),
    }
}

/// Entry points for tern's fuzz targets (`fuzz/`); not an API.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// `text` with a valid checksum, when it parses as a format-3 snapshot at all: what `read`
    /// then takes past its checksum check to the checks after it.
    pub fn sign(text: &[u8]) -> Option<Vec<u8>> {
        let mut snap: Snapshot = serde_json::from_slice(text).ok()?;
        snap.state_fnv = 0;
        snap.state_fnv = fnv(FNV_INIT, &serde_json::to_vec(&snap).ok()?);
        serde_json::to_vec(&snap).ok()
    }
}

impl Snapshot {
    /// The components' sections, in the saving VM's walk order.
    pub fn sections(&self) -> &[Section] {
        &self.components
    }

    /// The snapshot this diff snapshot builds on.
    pub fn parent(&self) -> Option<&Parent> {
        self.parent.as_ref()
    }

    /// The directories restoring this snapshot (read from `dir`) reads: `dir`, then those of
    /// the snapshots it is a diff over, newest first (at most 64 in all).
    pub fn chain_dirs(&self, dir: &Path) -> Result<Vec<std::path::PathBuf>, String> {
        let mut dirs = vec![dir.to_path_buf()];
        let mut next = self.parent().map(|p| p.dir.clone());
        while let Some(d) = next {
            if dirs.len() >= 64 {
                return Err(format!(
                    "snapshot {}: the chain of diff snapshots is longer than 64",
                    dir.display()
                ));
            }
            next = read(&d)?.parent().map(|p| p.dir.clone());
            dirs.push(d);
        }
        Ok(dirs)
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
        let path = base_dir.join(MEMORY_FILE);
        let f = memory::open(&path, &base.memory, mem)?;
        if lazy {
            memory::map(&f, &path, mem)?;
            mapped.push((path, total));
        } else if memory::load(&f, &path, mem)? != base.memory_fnv {
            return Err(format!(
                "{} is corrupted (checksum mismatch)",
                path.display()
            ));
        }
        for (d, s) in &layers[1..] {
            let path = d.join(MEMORY_FILE);
            let f = memory::open(&path, &s.memory, mem)?;
            let bits = memory::read_bitmap(&d.join(DIRTY_FILE), total.div_ceil(PAGE), s.dirty_fnv)?;
            let (was_mapped, h) = memory::apply_diff(&f, &path, mem, &bits, lazy)?;
            if was_mapped {
                mapped.push((path, total));
            } else if h != s.memory_fnv {
                return Err(format!(
                    "{} is corrupted (checksum mismatch)",
                    path.display()
                ));
            }
        }
        if !mapped.is_empty() {
            lost::guard_mapped_memory(mapped, mem);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// The state checksum is computed on the text: the last `state_fnv` counts as 0.
    #[test]
    fn state_checksum_is_over_the_text_with_its_own_field_zeroed() {
        let unsigned = br#"{"a":1,"state_fnv":0}"#;
        let h = fnv(FNV_INIT, unsigned);
        let signed = format!(r#"{{"a":1,"state_fnv":{h}}}"#);
        assert_eq!(state_checksum(signed.as_bytes()), Some((h, h)));
        assert_eq!(state_checksum(br#"{"a":1,"state_fnv":12} "#), None);
        assert_eq!(state_checksum(br#"{"a":1}"#), None);
    }
}
