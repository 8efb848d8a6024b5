//! Kernel loading: any bytes as the kernel file (ELF, bzImage, PVH note or not), with a
//! command line, into 64 MiB of guest memory, as `tern --kernel` does. bzImages are entered
//! through their own decompressor here (host decompression is the `bzimage` target's, with an
//! output limit that keeps runs short).
#![no_main]
use std::sync::OnceLock;

use arch::boot::{load_kernel, BootProtocol, BzImageEntry, KernelImage, KernelSpec};
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestAddress;

const MEM: u64 = 64 << 20;

fuzz_target!(|data: &[u8]| {
    static GUEST: OnceLock<arch::GuestMemoryMmap> = OnceLock::new();
    let mem = GUEST.get_or_init(|| {
        arch::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
    });
    let Some((&flags, kernel)) = data.split_first() else {
        return;
    };
    let protocol = match flags % 3 {
        0 => BootProtocol::Auto,
        1 => BootProtocol::Pvh,
        _ => BootProtocol::Linux,
    };
    let _ = load_kernel(
        mem,
        KernelSpec {
            kernel: KernelImage::Bytes(kernel),
            initrd: None,
            cmdline: "console=ttyS0 panic=1",
            mem_size: MEM,
            protocol,
            bzimage_entry: BzImageEntry::Guest,
            rsdp: if flags & 4 != 0 { Some(0xe_0000) } else { None },
        },
    );
    let _ = arch::boot::kernel_kind(kernel);
});
