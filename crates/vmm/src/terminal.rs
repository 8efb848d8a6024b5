//! Raw mode for the controlling terminal while the guest owns it, restored on drop.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, AtomicPtr, Ordering};

/// The terminal in raw mode and its saved mode (a leaked copy), for a signal handler that
/// ends tern at once: [`restore_from_signal_handler`].
static RAW_FD: AtomicI32 = AtomicI32::new(-1);
static RAW_SAVED: AtomicPtr<libc::termios> = AtomicPtr::new(std::ptr::null_mut());

/// Puts the terminal tern set to raw mode back as it was; async-signal-safe (only atomic
/// loads and tcsetattr), for a handler about to `_exit`.
pub fn restore_from_signal_handler() {
    let (fd, saved) = (
        RAW_FD.load(Ordering::Acquire),
        RAW_SAVED.load(Ordering::Acquire),
    );
    if fd >= 0 && !saved.is_null() {
        // SAFETY: `saved` points to a leaked, never freed termios read from `fd`.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, saved) };
    }
}

/// Puts a TTY in raw mode and restores the saved mode when dropped.
pub struct RawTerminal {
    fd: RawFd,
    saved: libc::termios,
}

impl RawTerminal {
    /// Raw mode on `fd` if it is a TTY; `None` otherwise.
    pub fn enable(fd: RawFd) -> Option<Self> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it and we check the result.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid termios to write into.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // Keyboard input goes to the guest unprocessed: no echo, no line editing, no signals
        // (Ctrl-C reaches the guest; Ctrl-A x quits tern). Output post-processing stays on.
        raw.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ISIG | libc::IEXTEN);
        raw.c_iflag &= !(libc::IXON | libc::ICRNL | libc::INLCR | libc::IGNCR);
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        // SAFETY: `raw` is a valid termios derived from the current one.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        if RAW_SAVED.load(Ordering::Acquire).is_null() {
            RAW_SAVED.store(Box::into_raw(Box::new(saved)), Ordering::Release);
        }
        RAW_FD.store(fd, Ordering::Release);
        Some(RawTerminal { fd, saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        RAW_FD.store(-1, Ordering::Release);
        // SAFETY: restores the termios saved from the same descriptor.
        unsafe {
            libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved);
        }
    }
}
