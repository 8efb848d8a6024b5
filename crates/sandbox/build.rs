//! Compiles every thread role's seccomp filters, for `--seccomp on` and `--seccomp log`, from
//! the allow-lists in src/lists.rs, and writes them as tables of BPF instructions that
//! src/seccomp.rs builds in: tern then applies filters without compiling any at start.

use std::fmt::Write;

#[path = "src/compile.rs"]
#[allow(dead_code)]
mod compile;
#[path = "src/lists.rs"]
#[allow(dead_code)]
mod lists;
#[path = "src/syscalls.rs"]
#[allow(dead_code)]
mod syscalls;

use compile::{compile, refusals, role_rules, Mode, ROLES};
use seccompiler::sock_filter;

fn program(p: &[sock_filter]) -> String {
    let mut s = String::from("&[");
    for i in p {
        let _ = write!(s, "insn({}, {}, {}, {}), ", i.code, i.jt, i.jf, i.k);
    }
    s.push(']');
    s
}

fn main() {
    for f in ["src/compile.rs", "src/lists.rs", "src/syscalls.rs"] {
        println!("cargo:rerun-if-changed={f}");
    }
    let mut out = String::new();
    for (mode, name) in [(Mode::On, "FILTERS_ON"), (Mode::Log, "FILTERS_LOG")] {
        let _ = writeln!(out, "static {name}: &[Filters] = &[");
        for role in ROLES {
            let what = |e: String| format!("seccomp filter of role {}: {e}", role.name());
            let own = compile(&role_rules(*role), mode)
                .map_err(what)
                .unwrap_or_else(|e| panic!("{e}"));
            let refused = refusals(*role)
                .map_err(what)
                .unwrap_or_else(|e| panic!("{e}"));
            let refused: Vec<String> = refused.iter().map(|p| program(p)).collect();
            let _ = writeln!(
                out,
                "    Filters {{ role: {:?}, refusals: &[{}], own: {} }},",
                role.name(),
                refused.join(", "),
                program(&own)
            );
        }
        out.push_str("];\n");
    }
    let dir = std::env::var("OUT_DIR").expect("OUT_DIR");
    std::fs::write(std::path::Path::new(&dir).join("filters.rs"), out)
        .expect("cannot write filters.rs");
}
