//! seccomp filters, one per thread role, compiled from the allow-lists in [`crate::lists`] with
//! the `seccompiler` crate and applied as each thread starts (through
//! [`lifecycle::threads::set_policy`]).
//!
//! A call outside a thread's list is stopped: with [`Mode::On`] the kernel sends the thread
//! `SIGSYS`, and the handler here writes one line naming the thread, its role and the call,
//! then ends tern with exit status 159 (128 + `SIGSYS`). With [`Mode::Log`] the kernel lets the
//! call through and logs it (`dmesg`, the audit log: `type=1326 … syscall=N comm="…"`).

use std::cell::Cell;
use std::fs::File;
use std::os::fd::{IntoRawFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};

use lifecycle::threads::Role;
use seccompiler::sock_filter;

pub use crate::compile::{compile, name, number, refusals, role_rules, Mode, ROLES};

/// One role's filters as the build script compiled them: its refusals, then its own. The
/// tables list the roles in [`ROLES`]' order.
struct Filters {
    /// The role's name: only the test that checks the tables' order reads it.
    #[cfg_attr(not(test), allow(dead_code))]
    role: &'static str,
    refusals: &'static [&'static [sock_filter]],
    own: &'static [sock_filter],
}

/// One BPF instruction (the build script's output is a table of these).
const fn insn(code: u16, jt: u8, jf: u8, k: u32) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

// `FILTERS_ON` and `FILTERS_LOG`: every role's filters, for `Mode::On` and `Mode::Log`.
include!(concat!(env!("OUT_DIR"), "/filters.rs"));

/// Where violations are also written (besides stderr), `-1` for nowhere.
static REPORT_FD: AtomicI32 = AtomicI32::new(-1);

/// Bytes of "NAME (ROLE)" kept per thread for the violation message.
const WHO_LEN: usize = 48;

thread_local! {
    /// This thread's name and role, for the SIGSYS handler (a plain array: reading it in a
    /// signal handler allocates nothing and runs no initialiser).
    static WHO: Cell<[u8; WHO_LEN]> = const { Cell::new([0; WHO_LEN]) };
}

fn set_who(name: &str, role: Role) {
    let mut buf = [0u8; WHO_LEN];
    let text = format!("{name} ({})", role.name());
    let n = text.len().min(WHO_LEN);
    buf[..n].copy_from_slice(&text.as_bytes()[..n]);
    WHO.with(|w| w.set(buf));
}

/// Appends `s` to `buf` at `*at` (truncating at the end of `buf`).
fn push(buf: &mut [u8], at: &mut usize, s: &[u8]) {
    for &b in s {
        if *at < buf.len() {
            buf[*at] = b;
            *at += 1;
        }
    }
}

fn push_number(buf: &mut [u8], at: &mut usize, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    push(buf, at, &digits[i..]);
}

/// The violation line for call `nr` made by the thread `who` describes.
pub fn violation_line(buf: &mut [u8], who: &[u8], nr: i64) -> usize {
    let mut at = 0;
    push(buf, &mut at, b"tern: seccomp: thread ");
    let who_len = who.iter().position(|b| *b == 0).unwrap_or(who.len());
    push(
        buf,
        &mut at,
        if who_len == 0 {
            b"(unnamed)"
        } else {
            &who[..who_len]
        },
    );
    push(buf, &mut at, b" made system call ");
    match name(nr) {
        Some(n) => push(buf, &mut at, n.as_bytes()),
        None => push(buf, &mut at, b"?"),
    }
    push(buf, &mut at, b" (");
    push_number(buf, &mut at, nr as u64);
    push(
        buf,
        &mut at,
        b"), which its filter does not allow; stopping tern\n",
    );
    at
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers. For SIGSYS from
    // seccomp, the union after the three leading ints and their padding (offset 16) holds
    // `_sigsys { void *_call_addr; int _syscall; unsigned _arch; }`: the call number sits
    // 8 bytes into it.
    let nr = unsafe { *(info as *const u8).add(24).cast::<libc::c_int>() };
    let who = WHO.with(|w| w.get());
    let mut buf = [0u8; 200];
    let n = violation_line(&mut buf, &who, i64::from(nr));
    for fd in [2, REPORT_FD.load(Ordering::Relaxed)] {
        if fd >= 0 {
            // SAFETY: writes `n` initialised bytes of `buf` to a descriptor; write(2) is
            // async-signal-safe and in every role's list.
            unsafe { libc::write(fd, buf.as_ptr().cast(), n) };
        }
    }
    // SAFETY: ends the process at once (exit_group is in every role's list); nothing of
    // tern's state is touched.
    unsafe { libc::syscall(libc::SYS_exit_group, 128 + libc::SIGSYS) };
}

fn install_sigsys_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid starting point; the fields set below are the
    // handler (an extern "C" fn with the SA_SIGINFO signature) and its flags.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = on_sigsys as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
    // SAFETY: installs a handler for SIGSYS with a valid sigaction; the old action is not
    // wanted.
    if unsafe { libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Applies the filter of `role`, from `table`, to the calling thread, named `name` in
/// violation reports.
fn apply(table: &[Filters], role: Role, name: &str) {
    set_who(name, role);
    // The refusals go first: applying a filter takes `prctl` and `seccomp`, which the role's
    // own filter does not allow.
    // Found by position, not by name: comparing names would read every role's name, constants
    // spread over tern's read-only data, at the start of every thread.
    let result = ROLES
        .iter()
        .position(|r| *r == role)
        .and_then(|i| table.get(i))
        .ok_or_else(|| "no filter for this role".to_string())
        .and_then(|f| {
            f.refusals
                .iter()
                .chain(std::iter::once(&f.own))
                .try_for_each(|p| seccompiler::apply_filter(p).map_err(|e| e.to_string()))
        });
    if let Err(e) = result {
        // Fail closed: a thread that cannot be confined must not run.
        eprintln!(
            "tern: cannot apply the seccomp filter of thread {name} ({}): {e}",
            role.name()
        );
        std::process::exit(1);
    }
}

/// Confines tern: from now on every thread started through [`lifecycle::threads::spawn`]
/// applies its role's filter first, and the calling thread (the VMM's main thread) applies
/// [`Role::Vmm`]'s. `report`, when given, receives a copy of every violation line.
///
/// The filters were compiled when tern was built (build.rs), from the same lists: compiling
/// them at every start took most of tern's start-up instructions and about 1 MiB of its peak
/// memory.
///
/// With [`Mode::Off`] threads are still started through the spawner, with no filter: tern
/// then runs the same thread plumbing whatever the mode, and `cargo xtask link-order` (whose
/// valgrind runs cannot apply filters) sees the code a confined tern runs.
///
/// Call it once, before any thread of tern's is started.
pub fn install(mode: Mode, report: Option<File>) -> Result<(), String> {
    let table: &'static [Filters] = match mode {
        Mode::Off => return lifecycle::threads::set_policy(Box::new(|_, _| {})),
        Mode::On => FILTERS_ON,
        Mode::Log => FILTERS_LOG,
    };
    if let Some(f) = report {
        let fd: RawFd = f.into_raw_fd();
        REPORT_FD.store(fd, Ordering::Relaxed);
    }
    install_sigsys_handler().map_err(|e| format!("cannot handle SIGSYS: {e}"))?;
    lifecycle::threads::set_policy(Box::new(move |role, name| apply(table, role, name)))?;
    apply(table, Role::Vmm, "tern-main");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tables built in are what compiling the lists gives now.
    #[test]
    fn built_in_filters_match_the_lists() {
        for (mode, table) in [(Mode::On, FILTERS_ON), (Mode::Log, FILTERS_LOG)] {
            assert_eq!(table.len(), ROLES.len());
            for (role, f) in ROLES.iter().zip(table) {
                assert_eq!(f.role, role.name());
                assert_eq!(f.own, &compile(&role_rules(*role), mode).unwrap()[..]);
                let refusals = refusals(*role).unwrap();
                assert_eq!(f.refusals.len(), refusals.len());
                for (a, b) in f.refusals.iter().zip(&refusals) {
                    assert_eq!(*a, &b[..]);
                }
            }
        }
    }
}
