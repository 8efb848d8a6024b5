//! Release builds of tern on x86_64 Linux (glibc) link their functions in the order
//! `link-order.txt` lists (lld's `--symbol-ordering-file`): the functions a VM runs through
//! are placed together at the front of the text, so a VM maps a few hundred KiB of tern's code
//! instead of pieces of all of it (the kernel maps 64 KiB around every page of code that
//! faults). `cargo xtask link-order` regenerates the list; a symbol that no longer exists only
//! loses its place. `TERN_LINK_ORDER=0` turns this off, for a linker other than lld.
//!
//! Where the C library supports them (glibc 2.36 and later), relative relocations are packed
//! (`-z pack-relative-relocs`): the dynamic loader then reads a few KiB of them at start instead
//! of 180 KiB.

fn main() {
    println!("cargo:rerun-if-changed=link-order.txt");
    println!("cargo:rerun-if-env-changed=TERN_LINK_ORDER");
    let release = std::env::var("PROFILE").as_deref() == Ok("release");
    let gnu = std::env::var("TARGET").as_deref() == Ok("x86_64-unknown-linux-gnu");
    let off = std::env::var("TERN_LINK_ORDER").as_deref() == Ok("0");
    let list = std::path::Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default())
        .join("link-order.txt");
    if release && gnu && !off && list.is_file() {
        println!(
            "cargo:rustc-link-arg-bin=tern=-Wl,--symbol-ordering-file={}",
            list.display()
        );
        println!("cargo:rustc-link-arg-bin=tern=-Wl,--no-warn-symbol-ordering");
        if glibc_has_relr() {
            println!("cargo:rustc-link-arg-bin=tern=-Wl,-z,pack-relative-relocs");
        }
    }
}

/// Whether this host's C library defines `GLIBC_ABI_DT_RELR` (packed relative relocations): a
/// binary that uses them then names that version, and an older C library refuses to load it
/// rather than misread it.
fn glibc_has_relr() -> bool {
    [
        "/lib/x86_64-linux-gnu/libc.so.6",
        "/usr/lib/x86_64-linux-gnu/libc.so.6",
        "/lib64/libc.so.6",
    ]
    .iter()
    .find_map(|p| std::fs::read(p).ok())
    .is_some_and(|libc| libc.windows(17).any(|w| w == b"GLIBC_ABI_DT_RELR"))
}
