//! Compiling the allow-lists of [`crate::lists`] into seccomp filters with the `seccompiler`
//! crate. The build script runs this, through `#[path]`, and tern starts with the filters it
//! wrote (see [`crate::seccomp`]); tests compile them here too, to check the lists.

use std::collections::BTreeMap;

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
