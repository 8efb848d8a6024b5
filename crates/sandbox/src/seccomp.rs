//! seccomp filters, one per thread role, compiled from the allow-lists in [`crate::lists`] with
//! the `seccompiler` crate and applied as each thread starts (through
//! [`lifecycle::threads::set_policy`]).
//!
//! A call outside a thread's list is stopped: with [`Mode::On`] the kernel sends the thread
//! `SIGSYS`, and the handler here writes one line naming the thread, its role and the call,
//! then ends tern with exit status 159 (128 + `SIGSYS`). With [`Mode::Log`] the kernel lets the
//! call through and logs it (`dmesg`, the audit log: `type=1326 … syscall=N comm="…"`).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{IntoRawFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};

use lifecycle::threads::{Device, Role};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::lists::{Arg, Rule};
use crate::syscalls::SYSCALLS;

/// What a call outside a thread's list meets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Filters are applied; a violation ends tern with one line naming the thread and call.
    On,
    /// Filters are applied, but violations are only logged by the kernel.
    Log,
    /// No filters.
    Off,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(Mode::On),
            "log" => Ok(Mode::Log),
            "off" => Ok(Mode::Off),
            _ => Err(format!("seccomp mode {s:?}: expected on, log or off")),
        }
    }
}

/// Every role's filter is built for, in the order `role_lists` returns them.
pub const ROLES: &[Role] = &[
    Role::Vmm,
    Role::Vcpu,
    Role::DeviceWorker(Device::Block),
    Role::DeviceWorker(Device::Net),
    Role::DeviceWorker(Device::Rng),
    Role::DeviceWorker(Device::Console),
    Role::DeviceWorker(Device::Balloon),
    Role::DeviceWorker(Device::Mem),
    Role::DeviceWorker(Device::Vsock),
    Role::Api,
    Role::Io,
    Role::Migration,
    Role::Spawner,
];

/// The number of a system call named in the allow-lists.
pub fn number(name: &str) -> Option<i64> {
    SYSCALLS
        .iter()
        .find(|(_, n)| *n == name)
        .map(|(nr, _)| i64::from(*nr))
}

/// The name of system call `nr`, if it has one.
pub fn name(nr: i64) -> Option<&'static str> {
    SYSCALLS
        .iter()
        .find(|(n, _)| i64::from(*n) == nr)
        .map(|(_, name)| *name)
}

/// The rules of `role` (for the spawner: every role's rules and its own, since every thread
/// begins under the spawner's filter).
pub fn role_rules(role: Role) -> Vec<Rule> {
    if role != Role::Spawner {
        return crate::lists::rules(role);
    }
    let mut all = crate::lists::rules(Role::Spawner);
    for r in ROLES.iter().filter(|r| **r != Role::Spawner) {
        all.extend(crate::lists::rules(*r));
    }
    all
}

fn condition(a: &Arg) -> Result<SeccompCondition, String> {
    let (idx, op, value) = match *a {
        Arg::Eq(i, v) => (i, SeccompCmpOp::Eq, v),
        Arg::MaskedEq(i, mask, v) => (i, SeccompCmpOp::MaskedEq(mask), v),
    };
    SeccompCondition::new(idx, SeccompCmpArgLen::Qword, op, value).map_err(|e| e.to_string())
}

/// Compiles `rules` into a filter whose mismatch action `mode` decides.
pub fn compile(rules: &[Rule], mode: Mode) -> Result<BpfProgram, String> {
    let mut map: BTreeMap<i64, Option<Vec<SeccompRule>>> = BTreeMap::new();
    for (i, r) in rules.iter().enumerate() {
        // Lists overlap (every role has the common list; the spawner has them all): a rule
        // already compiled would only lengthen the filter.
        if rules[..i].contains(r) {
            continue;
        }
        let nr = number(r.syscall)
            .ok_or_else(|| format!("allow-list names an unknown system call {:?}", r.syscall))?;
        let entry = map.entry(nr).or_insert_with(|| Some(Vec::new()));
        if r.when.is_empty() {
            // Allowed whatever the arguments: no rule list (seccompiler's "always").
            *entry = None;
        } else if let Some(list) = entry {
            let conds = r.when.iter().map(condition).collect::<Result<_, _>>()?;
            list.push(SeccompRule::new(conds).map_err(|e| e.to_string())?);
        }
    }
    let rules = map
        .into_iter()
        .map(|(nr, rules)| (nr, rules.unwrap_or_default()))
        .collect();
    let mismatch = match mode {
        Mode::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    };
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| e.to_string())?;
    BpfProgram::try_from(filter).map_err(|e| e.to_string())
}

/// The filter that makes the calls [`crate::lists::refused`] names for `role` fail with their
/// error (stacked on the role's own filter, which allows them): one filter per error number,
/// since seccompiler gives a filter one action for every match.
pub fn refusals(role: Role) -> Result<Vec<BpfProgram>, String> {
    let calls = crate::lists::refused(role);
    let mut programs: Vec<BpfProgram> = Vec::new();
    let mut errnos: Vec<i32> = calls.iter().map(|c| c.1).collect();
    errnos.dedup();
    for errno in errnos {
        let rules = calls
            .iter()
            .filter(|c| c.1 == errno)
            .map(|(n, _)| {
                number(n)
                    .map(|nr| (nr, Vec::new()))
                    .ok_or_else(|| format!("unknown system call {n:?}"))
            })
            .collect::<Result<_, _>>()?;
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(errno as u32),
            TargetArch::x86_64,
        )
        .map_err(|e| e.to_string())?;
        programs.push(BpfProgram::try_from(filter).map_err(|e| e.to_string())?);
    }
    Ok(programs)
}

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

/// The compiled filters of each role, by role name: its refusals, then its own.
struct Programs {
    roles: BTreeMap<&'static str, (Vec<BpfProgram>, BpfProgram)>,
}

/// Applies the filter of `role` to the calling thread, named `name` in violation reports.
fn apply(programs: &Programs, role: Role, name: &str) {
    set_who(name, role);
    // The refusals go first: applying a filter takes `prctl` and `seccomp`, which the role's
    // own filter does not allow.
    let result = programs
        .roles
        .get(role.name())
        .ok_or_else(|| "no filter for this role".to_string())
        .and_then(|(refusals, own)| {
            refusals
                .iter()
                .chain(std::iter::once(own))
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
/// Call it once, before any thread of tern's is started.
pub fn install(mode: Mode, report: Option<File>) -> Result<(), String> {
    if mode == Mode::Off {
        return Ok(());
    }
    let mut roles = BTreeMap::new();
    for &role in ROLES {
        let what = |e: String| format!("seccomp filter of role {}: {e}", role.name());
        let own = compile(&role_rules(role), mode).map_err(what)?;
        roles.insert(role.name(), (refusals(role).map_err(what)?, own));
    }
    let programs = Programs { roles };
    if let Some(f) = report {
        let fd: RawFd = f.into_raw_fd();
        REPORT_FD.store(fd, Ordering::Relaxed);
    }
    install_sigsys_handler().map_err(|e| format!("cannot handle SIGSYS: {e}"))?;
    let programs = std::sync::Arc::new(programs);
    let for_threads = programs.clone();
    lifecycle::threads::set_policy(Box::new(move |role, name| apply(&for_threads, role, name)))?;
    apply(&programs, Role::Vmm, "tern-main");
    Ok(())
}
