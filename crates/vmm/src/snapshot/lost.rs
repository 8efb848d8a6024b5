//! Guest RAM mapped from snapshot memory files (a lazy restore): if such a file is truncated
//! under the running VM, the next touch of a lost page raises SIGBUS. tern then says so in one
//! line, naming the files, instead of dying silently.

use std::path::PathBuf;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use arch::GuestMemoryMmap;

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
pub(crate) fn guard_mapped_memory(files: Vec<(PathBuf, u64)>, mem: &GuestMemoryMmap) {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The SIGBUS message and the check after a lazily restored VM's crash name the memory
    /// files, and only a file that shrank counts as lost.
    #[test]
    fn lost_memory_files_are_named() {
        let dir = std::env::temp_dir().join(format!("tern-lost-mem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("memory.bin");
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
}
