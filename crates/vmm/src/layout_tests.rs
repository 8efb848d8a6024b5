//! The shape of this crate, checked: no module uses a module that uses it back (so each can be
//! read, and changed, knowing only what is below it), and no source file outgrows a reading
//! (about 600 lines).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Each top-level module of `src/` → the top-level modules its non-test code names through
/// `crate::`.
fn uses() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut files = vec![src.clone()];
    while let Some(p) = files.pop() {
        if p.is_dir() {
            files.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        let rel = p.strip_prefix(&src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        let text = std::fs::read_to_string(&p).unwrap();
        let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
        let names = out.entry(top.clone()).or_default();
        for (i, _) in code.match_indices("crate::") {
            let rest = &code[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if name != top && !name.is_empty() {
                names.insert(name);
            }
        }
    }
    out
}

#[test]
fn no_module_uses_a_module_that_uses_it_back() {
    let uses = uses();
    let mut cycles = Vec::new();
    for (a, names) in &uses {
        for b in names {
            if a < b && uses.get(b).is_some_and(|n| n.contains(a)) {
                cycles.push(format!("{a} <-> {b}"));
            }
        }
    }
    assert!(cycles.is_empty(), "modules that use each other: {cycles:?}");
}

#[test]
fn no_source_file_is_over_600_lines() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut long = Vec::new();
    let mut files = vec![src];
    while let Some(p) = files.pop() {
        if p.is_dir() {
            files.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else if std::fs::read_to_string(&p).unwrap().lines().count() > 600 {
            long.push(p.display().to_string());
        }
    }
    assert!(long.is_empty(), "files over 600 lines: {long:?}");
}
