//! Link the probe as a freestanding static image using `link.ld`.
//!
//! The code-generation flags live in `.cargo/config.toml`, which cargo only
//! reads when it runs inside this folder: refuse to build without them rather
//! than produce an image that cannot boot.
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR");
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    if !flags.split('\x1f').any(|f| f == "relocation-model=static") {
        panic!(
            "the probe must be built from inside {dir} (cd there and run `cargo build --release`), \
             so that its .cargo/config.toml applies"
        );
    }
    println!("cargo:rerun-if-changed=link.ld");
    println!("cargo:rerun-if-changed=build.rs");
    for arg in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-Wl,--build-id=none",
        "-Wl,-z,max-page-size=4096",
        "-Wl,-z,noexecstack",
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rustc-link-arg-bins=-Wl,-T,{dir}/link.ld");
}
