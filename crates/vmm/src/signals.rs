//! The stop signals (SIGINT, SIGTERM): blocked in every thread and read by the main loop from
//! a signalfd.

use std::fs::File;
use std::io::Read;

use crate::error::VmmError;

/// Reads one signal number from the signalfd.
pub fn read_signal(signals: &File) -> i32 {
    let mut info = [0u8; 128];
    let mut f = signals;
    match f.read(&mut info) {
        Ok(128) => i32::from_ne_bytes([info[0], info[1], info[2], info[3]]),
        _ => libc::SIGTERM,
    }
}

/// The set of stop signals: SIGINT and SIGTERM.
fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before sigaddset adds to it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        set
    }
}

/// Blocks SIGINT and SIGTERM in the calling thread (and threads it starts later), so only the
/// VMM's signalfd sees them.
pub fn block_stop_signals_in_this_thread() -> std::io::Result<()> {
    let set = stop_signals();
    // SAFETY: blocks signals in this thread's mask; `set` is an initialised sigset.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    // pthread_sigmask returns its error number (errno is left alone).
    if r != 0 {
        return Err(std::io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// Blocks SIGINT/SIGTERM in the calling thread (inherited by threads spawned later) and
/// returns a signalfd the main thread reads them from.
pub fn block_stop_signals() -> Result<File, VmmError> {
    block_stop_signals_in_this_thread()
        .map_err(|e| VmmError::Setup(format!("cannot block SIGINT/SIGTERM: {e}")))?;
    let set = stop_signals();
    // SAFETY: creates a new descriptor for an initialised sigset; no memory is shared.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(VmmError::Setup(format!(
            "signalfd: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: `fd` is a fresh descriptor we own.
    Ok(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}
