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

/// Blocks SIGINT and SIGTERM in the calling thread (and threads it starts later), so only the
/// VMM's signalfd sees them.
pub fn block_stop_signals_in_this_thread() -> std::io::Result<()> {
    // SAFETY: sigset_t is plain data initialised by sigemptyset/sigaddset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        // pthread_sigmask returns its error number (errno is left alone).
        let r = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if r != 0 {
            return Err(std::io::Error::from_raw_os_error(r));
        }
    }
    Ok(())
}

/// Blocks SIGINT/SIGTERM in the calling thread (inherited by threads spawned later) and
/// returns a signalfd the main thread reads them from.
pub fn block_stop_signals() -> Result<File, VmmError> {
    // SAFETY: sigset_t is plain data initialised by sigemptyset/sigaddset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(VmmError::Setup("cannot block SIGINT/SIGTERM".into()));
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(VmmError::Setup(format!(
                "signalfd: {}",
                std::io::Error::last_os_error()
            )));
        }
        // SAFETY: `fd` is a fresh descriptor we own.
        Ok(<File as std::os::fd::FromRawFd>::from_raw_fd(fd))
    }
}
