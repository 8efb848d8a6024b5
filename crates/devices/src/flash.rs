//! The UEFI variable store's flash: a CFI (Intel command set) NOR flash of the kind OVMF drives
//! through its `QemuFlashFvbServicesRuntimeDxe` — byte program (0x10/0x40), block erase
//! (0x20, confirmed by 0xd0), clear status (0x50), read status (0x70), read identifier (0x90)
//! and read array (0xff).
//!
//! In read-array mode the guest reads the flash straight from memory (a read-only KVM slot over
//! [`FlashMemory`]); only its writes — commands — reach this device. Any other mode makes reads
//! return status or identifier bytes, so the device asks the VMM to take the slot away
//! ([`Pflash::new`]'s `set_direct`) until the guest goes back to read-array. OVMF leaves
//! read-array mode twice per variable write, not per byte.
//!
//! The storage is either a private copy of a template (variables last as long as the VM) or a
//! shared mapping of the VM's own variable file, where programmed bytes land as the guest
//! writes them, as on a real flash part. Hand-written: no rust-vmm crate models a flash.

use std::fs::File;
use std::os::fd::AsRawFd;

use serde::{Deserialize, Serialize};

use crate::BusDevice;

/// Erase block size (OVMF's `PcdOvmfFirmwareBlockSize`).
pub const FLASH_BLOCK_SIZE: u64 = 4096;

const CMD_PROGRAM: u8 = 0x10;
const CMD_PROGRAM_ALT: u8 = 0x40;
const CMD_ERASE: u8 = 0x20;
const CMD_CLEAR_STATUS: u8 = 0x50;
const CMD_READ_STATUS: u8 = 0x70;
const CMD_READ_ID: u8 = 0x90;
const CMD_ERASE_CONFIRM: u8 = 0xd0;
const CMD_READ_ARRAY: u8 = 0xff;
/// Status register: the write state machine is ready.
const STATUS_READY: u8 = 0x80;
/// Status register: an erase (bit 5) and a program (bit 4) failed — a bad command sequence.
const STATUS_SEQUENCE_ERROR: u8 = 0x30;
/// Identifier: Intel, 28F-series part.
const ID_MANUFACTURER: u8 = 0x89;
const ID_DEVICE: u8 = 0x18;

/// What a guest read returns (and what the next write means).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FlashMode {
    /// Reads return the array (from memory; the device is not asked).
    ReadArray,
    /// Reads return the status register.
    Status,
    /// The next write is the byte to program; reads return status.
    Program,
    /// The next write must confirm the erase; reads return status.
    Erase,
    /// Reads return the identifier.
    Identifier,
}

/// The bytes of a flash, mapped where KVM can map them into the guest.
pub struct FlashMemory {
    ptr: *mut u8,
    len: usize,
    /// The variable file the bytes are a shared mapping of, if any.
    file: Option<File>,
}

// SAFETY: the mapping is owned by this value and only unmapped on drop; the raw pointer is
// only dereferenced through `&self`/`&mut self` methods.
unsafe impl Send for FlashMemory {}

impl FlashMemory {
    /// A private copy of `template` (what the guest programs is lost with the VM; also the
    /// firmware code's mapping).
    pub fn copy_of(template: &[u8]) -> std::io::Result<Self> {
        let len = template.len();
        // SAFETY: a fresh private anonymous mapping; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let m = FlashMemory {
            ptr: ptr.cast(),
            len,
            file: None,
        };
        // SAFETY: the mapping is `len` writable bytes; the template is `len` bytes.
        unsafe { std::ptr::copy_nonoverlapping(template.as_ptr(), m.ptr, len) };
        Ok(m)
    }

    /// A shared mapping of all of `file` (opened read-write): what the guest programs is
    /// written to the file.
    pub fn shared(file: File) -> std::io::Result<Self> {
        let len = usize::try_from(file.metadata()?.len())
            .map_err(|_| std::io::Error::other("variable file too large"))?;
        if len == 0 {
            return Err(std::io::Error::other("variable file is empty"));
        }
        // SAFETY: a shared mapping of an open file of `len` bytes; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(FlashMemory {
            ptr: ptr.cast(),
            len,
            file: Some(file),
        })
    }

    /// Where the bytes are in this process (for a KVM memory slot).
    pub fn host_address(&self) -> u64 {
        self.ptr as u64
    }

    /// Their length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` is a live mapping of `len` readable bytes owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The bytes, to change.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and the mapping is writable; `&mut self` is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// Writes what the guest programmed back to the variable file, if there is one.
    pub fn flush(&self) -> std::io::Result<()> {
        if self.file.is_none() {
            return Ok(());
        }
        // SAFETY: msync of the mapping this value owns.
        if unsafe { libc::msync(self.ptr.cast(), self.len, libc::MS_SYNC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for FlashMemory {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::warn!("cannot write the UEFI variables back to their file: {e}");
        }
        // SAFETY: the mapping `copy_of`/`shared` made; nothing else unmaps it.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Called with `true` when the guest may read the flash from memory again, `false` when its
/// reads must come to the device.
pub type SetDirect = Box<dyn FnMut(bool) + Send>;

/// The flash device (see the module documentation).
pub struct Pflash {
    mem: FlashMemory,
    mode: FlashMode,
    status: u8,
    set_direct: SetDirect,
}

/// The saved state: the mode, the status register and every byte of the flash (hex).
#[derive(Serialize, Deserialize)]
struct PflashState {
    mode: FlashMode,
    status: u8,
    data: String,
}

impl Pflash {
    /// A flash over `mem`, starting in read-array mode (the VMM maps `mem` for direct reads).
    pub fn new(mem: FlashMemory, set_direct: SetDirect) -> Self {
        Pflash {
            mem,
            mode: FlashMode::ReadArray,
            status: STATUS_READY,
            set_direct,
        }
    }

    /// The current mode.
    pub fn mode(&self) -> FlashMode {
        self.mode
    }

    /// The flash's bytes.
    pub fn memory(&self) -> &FlashMemory {
        &self.mem
    }

    fn enter(&mut self, mode: FlashMode) {
        let was_direct = self.mode == FlashMode::ReadArray;
        let direct = mode == FlashMode::ReadArray;
        self.mode = mode;
        if was_direct != direct {
            tracing::debug!("UEFI variable flash: {mode:?} mode");
            (self.set_direct)(direct);
        }
    }

    fn command(&mut self, cmd: u8) {
        match cmd {
            CMD_PROGRAM | CMD_PROGRAM_ALT => self.enter(FlashMode::Program),
            CMD_ERASE => self.enter(FlashMode::Erase),
            CMD_CLEAR_STATUS => {
                self.status = 0;
                self.enter(FlashMode::ReadArray);
            }
            CMD_READ_STATUS => self.enter(FlashMode::Status),
            CMD_READ_ID => self.enter(FlashMode::Identifier),
            CMD_READ_ARRAY => self.enter(FlashMode::ReadArray),
            // An unknown command: back to reading the array, as the part resets its state
            // machine.
            _ => self.enter(FlashMode::ReadArray),
        }
    }
}

impl BusDevice for Pflash {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mem = self.mem.bytes();
        for (i, d) in data.iter_mut().enumerate() {
            let at = offset.saturating_add(i as u64);
            *d = match self.mode {
                FlashMode::ReadArray => usize::try_from(at)
                    .ok()
                    .and_then(|a| mem.get(a))
                    .copied()
                    .unwrap_or(0xff),
                FlashMode::Identifier => match at & 1 {
                    0 => ID_MANUFACTURER,
                    _ => ID_DEVICE,
                },
                FlashMode::Status | FlashMode::Program | FlashMode::Erase => self.status,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Commands and data are bytes; a wider write carries its low byte (the bus is 8 bits).
        let Some(&value) = data.first() else {
            return;
        };
        let at = usize::try_from(offset).ok().filter(|&a| a < self.mem.len());
        match self.mode {
            FlashMode::Program => {
                if let Some(a) = at {
                    self.mem.bytes_mut()[a] = value;
                }
                self.status |= STATUS_READY;
                self.enter(FlashMode::Status);
            }
            FlashMode::Erase => {
                match (value, at) {
                    (CMD_ERASE_CONFIRM, Some(a)) => {
                        let block = FLASH_BLOCK_SIZE as usize;
                        let start = a / block * block;
                        let end = (start + block).min(self.mem.len());
                        self.mem.bytes_mut()[start..end].fill(0xff);
                        self.status |= STATUS_READY;
                    }
                    _ => self.status |= STATUS_READY | STATUS_SEQUENCE_ERROR,
                }
                self.enter(FlashMode::Status);
            }
            _ => self.command(value),
        }
    }
}

impl lifecycle::Component for Pflash {
    fn save(&mut self, id: &str) -> Result<Option<lifecycle::Section>, String> {
        let data = self
            .mem
            .bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let s = PflashState {
            mode: self.mode,
            status: self.status,
            data,
        };
        lifecycle::Section::new(id, 1, &s).map(Some)
    }

    fn restore(&mut self, section: &lifecycle::Section) -> Result<(), String> {
        let s: PflashState = section.parse(&[1])?;
        let id = &section.id;
        if s.data.len() != self.mem.len() * 2 {
            return Err(format!(
                "{id}: {} bytes of UEFI variable flash saved, this VM's has {}",
                s.data.len() / 2,
                self.mem.len()
            ));
        }
        let mut bytes = Vec::with_capacity(self.mem.len());
        for pair in s.data.as_bytes().chunks(2) {
            let b = std::str::from_utf8(pair)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("{id}: saved flash contents are not hex"))?;
            bytes.push(b);
        }
        self.mem.bytes_mut().copy_from_slice(&bytes);
        self.status = s.status;
        self.enter(s.mode);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lifecycle::Component;
    use std::sync::{Arc, Mutex};

    fn flash(len: usize) -> (Pflash, Arc<Mutex<Vec<bool>>>) {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let c = calls.clone();
        let template: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let f = Pflash::new(
            FlashMemory::copy_of(&template).unwrap(),
            Box::new(move |d| c.lock().unwrap().push(d)),
        );
        (f, calls)
    }

    fn rd(f: &mut Pflash, at: u64) -> u8 {
        let mut b = [0u8];
        f.read(at, &mut b);
        b[0]
    }

    #[test]
    fn ovmf_detects_a_flash() {
        // OVMF's probe: clear status, read back the array; then read status, expect 0.
        let (mut f, calls) = flash(8192);
        let original = rd(&mut f, 16);
        f.write(16, &[CMD_CLEAR_STATUS]);
        assert_eq!(rd(&mut f, 16), original);
        f.write(16, &[CMD_READ_STATUS]);
        assert_eq!(rd(&mut f, 16), 0);
        f.write(16, &[CMD_READ_ARRAY]);
        assert_eq!(rd(&mut f, 16), original);
        assert_eq!(*calls.lock().unwrap(), vec![false, true]);
    }

    #[test]
    fn program_and_erase() {
        let (mut f, calls) = flash(3 * 4096);
        // A program sequence of three bytes, then read-array: two slot changes in all.
        for (i, v) in [0xaa, 0xbb, 0xcc].into_iter().enumerate() {
            f.write(4100 + i as u64, &[CMD_PROGRAM]);
            f.write(4100 + i as u64, &[v]);
            assert_eq!(rd(&mut f, 0) & STATUS_READY, STATUS_READY);
        }
        f.write(4102, &[CMD_READ_ARRAY]);
        assert_eq!(&f.memory().bytes()[4100..4103], &[0xaa, 0xbb, 0xcc]);
        assert_eq!(*calls.lock().unwrap(), vec![false, true]);
        // Erase block 1 only.
        f.write(4096 + 7, &[CMD_ERASE]);
        f.write(4096 + 7, &[CMD_ERASE_CONFIRM]);
        f.write(0, &[CMD_READ_ARRAY]);
        let b = f.memory().bytes();
        assert!(b[4096..8192].iter().all(|&x| x == 0xff));
        // The blocks either side keep the template's bytes (i as u8).
        assert_eq!((b[4094], b[8193]), (0xfe, 0x01));
        // A bad confirm erases nothing and sets the error bits.
        f.write(0, &[CMD_ERASE]);
        f.write(0, &[0x33]);
        assert_eq!(rd(&mut f, 0), STATUS_READY | STATUS_SEQUENCE_ERROR);
        f.write(0, &[CMD_READ_ARRAY]);
        assert_eq!(f.memory().bytes()[1], 1);
        // The identifier.
        f.write(0, &[CMD_READ_ID]);
        assert_eq!((rd(&mut f, 0), rd(&mut f, 1)), (ID_MANUFACTURER, ID_DEVICE));
    }

    #[test]
    fn out_of_range_and_empty_writes_are_harmless() {
        let (mut f, _) = flash(4096);
        f.write(1 << 40, &[CMD_PROGRAM]);
        f.write(1 << 40, &[0]);
        f.write(u64::MAX, &[CMD_ERASE]);
        f.write(u64::MAX, &[CMD_ERASE_CONFIRM]);
        f.write(0, &[]);
        f.write(0, &[CMD_READ_ARRAY]);
        let mut b = [0u8; 4];
        f.read(u64::MAX - 1, &mut b);
        assert_eq!(b, [0xff; 4]);
        assert_eq!(f.memory().bytes()[5], 5);
    }

    #[test]
    fn state_round_trips_and_bad_state_is_refused() {
        let (mut f, _) = flash(4096);
        f.write(9, &[CMD_PROGRAM]);
        f.write(9, &[0x42]);
        let s = f.save("uefi-vars").unwrap().unwrap();
        let (mut g, calls) = flash(4096);
        g.restore(&s).unwrap();
        assert_eq!(g.mode(), FlashMode::Status);
        assert_eq!(*calls.lock().unwrap(), vec![false]);
        assert_eq!(g.memory().bytes()[9], 0x42);
        let (mut small, _) = flash(2048);
        assert!(small.restore(&s).unwrap_err().contains("4096"));
        let mut bad = s.clone();
        bad.state["data"] = serde_json::Value::String("zz".repeat(4096));
        assert!(g.restore(&bad).unwrap_err().contains("hex"));
    }

    #[test]
    fn a_shared_flash_writes_its_file() {
        let dir = std::env::temp_dir().join(format!("tern-flash-{}", std::process::id()));
        std::fs::write(&dir, vec![0u8; 8192]).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&dir)
            .unwrap();
        {
            let mut f = Pflash::new(FlashMemory::shared(file).unwrap(), Box::new(|_| {}));
            f.write(4096, &[CMD_ERASE]);
            f.write(4096, &[CMD_ERASE_CONFIRM]);
            f.write(5000, &[CMD_PROGRAM]);
            f.write(5000, &[0x12]);
            f.write(5000, &[CMD_READ_ARRAY]);
        }
        let b = std::fs::read(&dir).unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert!(b[..4096].iter().all(|&x| x == 0));
        assert_eq!(b[5000], 0x12);
        assert_eq!(b[4096], 0xff);
    }
}
