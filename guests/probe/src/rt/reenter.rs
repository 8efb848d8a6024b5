//! Self-test of the Linux 64-bit entry under a loader that only speaks PVH
//! (QEMU): `probe.reenter=linux64` builds a `boot_params` (zero page) from the
//! current boot information and jumps to the ELF entry point from ring 0 with
//! RSI pointing at it, as a Linux 64-bit boot loader would. The re-entered
//! probe runs `probe.reenter_run=` (default `hello`) and exits as usual.

use super::bootinfo::BootInfo;
use super::phys::PhysAlloc;
use super::sys;

extern "C" {
    fn linux64_entry();
}

/// Build the zero page and jump; returns only if there is no memory for it.
pub fn linux64(bi: &BootInfo, pa: &mut PhysAlloc) -> Result<(), &'static str> {
    let zp = pa.alloc(8192, 4096).ok_or("no memory for boot_params")?;
    let cmdline = zp + 4096;
    let put = |off: u64, bytes: &[u8]| {
        // SAFETY: [zp, zp + 8192) was just allocated for this.
        unsafe {
            core::ptr::copy_nonoverlapping(bytes.as_ptr(), (zp + off) as *mut u8, bytes.len())
        };
    };
    put(0, &[0u8; 4096]);
    put(0x202, b"HdrS");
    put(0x228, &(cmdline as u32).to_le_bytes());
    put(0x0c8, &((cmdline >> 32) as u32).to_le_bytes());
    put(0x070, &bi.rsdp.unwrap_or(0).to_le_bytes());
    let regions = bi.regions();
    let n = regions.len().min(128);
    put(0x1e8, &[n as u8]);
    for (i, r) in regions.iter().take(n).enumerate() {
        let e = 0x2d0 + 20 * i as u64;
        put(e, &r.base.to_le_bytes());
        put(e + 8, &r.size.to_le_bytes());
        put(e + 16, &r.kind.to_le_bytes());
    }

    // New command line: the old one without probe.reenter*/probe.run, plus
    // probe.run=<probe.reenter_run or hello>.
    let mut line = crate::scenarios::Line::<2048>::new();
    let mut run = "hello";
    for word in bi.cmdline().split(' ').filter(|w| !w.is_empty()) {
        if let Some(v) = word.strip_prefix("probe.reenter_run=") {
            run = v;
        } else if !word.starts_with("probe.reenter=") && !word.starts_with("probe.run=") {
            let _ = core::fmt::Write::write_fmt(&mut line, format_args!("{word} "));
        }
    }
    let _ = core::fmt::Write::write_fmt(&mut line, format_args!("probe.run={run}\0"));
    put(4096, line.as_str().as_bytes());

    crate::println!("probe: reenter entry=linux64 boot_params={zp:#x}");
    sys::syscall(
        sys::nr::REENTER,
        linux64_entry as *const () as u64,
        zp,
        0,
        0,
    );
    Err("reentry returned")
}
