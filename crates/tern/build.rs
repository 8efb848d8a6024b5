//! Release builds of tern on x86_64 Linux (glibc) link their functions in the order
//! `link-order.txt` lists (lld's `--symbol-ordering-file`): the functions a VM runs through
//! are placed together at the front of the text, so a VM maps a few hundred KiB of tern's code
//! instead of pieces of all of it (the kernel maps 64 KiB around every page of code that
//! faults). `cargo xtask link-order` regenerates the list; a symbol that no longer exists only
//! loses its place. It is used only where rustc links with its own lld (Rust 1.90 and later,
//! no other linker configured); `TERN_LINK_ORDER=0` turns it off. The list names v0 symbols
//! (`.cargo/config.toml`); a build whose `RUSTFLAGS` replace that setting only loses the order.
//!
//! tern is linked statically (`.cargo/config.toml`), and the list includes the C library's
//! functions it runs, so they sit beside tern's own.
//!
//! The same runs decide the order of the read-only data: `rodata-order.ld`, a linker script
//! that lld inserts before `.rodata`, gathers the constants those runs read (and the pages the
//! kernel read, such as the seccomp filters) into one output section, `.rodata.hot`, with the
//! merged constants and strings and the C library's character tables after them. The kernel
//! maps 64 KiB around every page of data that faults too, and tern's hot constants were spread
//! over all of its 512 KiB of `.rodata`. Most of them have no symbol (`.rodata..Lanon.*`), so
//! the script names their input sections; a name that no longer exists matches nothing. The
//! link writes a map (`tern.map` beside the binary), from which `cargo xtask link-order`
//! learns where each input section went.
//!
//! Where the C library supports them (glibc 2.36 and later), relative relocations are packed
//! (`-z pack-relative-relocs`): the static binary's start-up code then applies a few KiB of
//! them instead of reading 180 KiB.

fn main() {
    println!("cargo:rerun-if-changed=link-order.txt");
    println!("cargo:rerun-if-changed=rodata-order.ld");
    println!("cargo:rerun-if-env-changed=TERN_LINK_ORDER");
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER");
    let release = std::env::var("PROFILE").as_deref() == Ok("release");
    let gnu = std::env::var("TARGET").as_deref() == Ok("x86_64-unknown-linux-gnu");
    let off = std::env::var("TERN_LINK_ORDER").as_deref() == Ok("0");
    let list = std::path::Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default())
        .join("link-order.txt");
    if release && gnu && !off && list.is_file() && links_with_rust_lld() {
        println!(
            "cargo:rustc-link-arg-bin=tern=-Wl,--symbol-ordering-file={}",
            list.display()
        );
        println!("cargo:rustc-link-arg-bin=tern=-Wl,--no-warn-symbol-ordering");
        let script = list.with_file_name("rodata-order.ld");
        if script.is_file() {
            println!("cargo:rustc-link-arg-bin=tern=-Wl,-T,{}", script.display());
        }
        // OUT_DIR is <target>/<profile>/build/tern-<hash>/out: the map goes beside the binary.
        if let Some(dir) = std::env::var_os("OUT_DIR")
            .map(std::path::PathBuf::from)
            .and_then(|o| o.ancestors().nth(3).map(|d| d.to_path_buf()))
        {
            println!(
                "cargo:rustc-link-arg-bin=tern=-Wl,-Map={}",
                dir.join("tern.map").display()
            );
        }
        if glibc_has_relr() {
            println!("cargo:rustc-link-arg-bin=tern=-Wl,-z,pack-relative-relocs");
        }
    }
}

/// Whether rustc links this build with its own lld: Rust 1.90 or later on this target, with no
/// linker named in the environment or the flags.
fn links_with_rust_lld() -> bool {
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    if flags.contains("linker") || flags.contains("fuse-ld") {
        return false;
    }
    if std::env::var_os("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER").is_some() {
        return false;
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let Ok(out) = std::process::Command::new(rustc).arg("-V").output() else {
        return false;
    };
    // "rustc 1.95.0 (…)"
    let text = String::from_utf8_lossy(&out.stdout);
    let mut v = text
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .split(['.', '-'])
        .map(|n| n.parse::<u32>().unwrap_or(0));
    (v.next().unwrap_or(0), v.next().unwrap_or(0)) >= (1, 90)
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
