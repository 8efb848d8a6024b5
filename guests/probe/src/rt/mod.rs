//! The ring-3 runtime: everything the scenarios use. All of it runs natively
//! (CPL 3, IOPL 3) on the development host.

pub mod apic;
pub mod bootinfo;
pub mod clock;
pub mod cmdline;
pub mod cpu;
pub mod cpuid;
pub mod io;
pub mod paging;
pub mod pci;
pub mod phys;
pub mod reenter;
pub mod serial;
pub mod smp;
pub mod sys;
pub mod virtio;

use core::cell::UnsafeCell;

/// A global that is written during single-threaded setup (or by one owner at a
/// time, by protocol) and read afterwards. Access is `unsafe`: the caller states
/// why no conflicting access can happen.
#[repr(transparent)]
pub struct RacyCell<T>(UnsafeCell<T>);

// SAFETY: users of `get` uphold the no-data-race protocol described above.
unsafe impl<T: Send> Sync for RacyCell<T> {}

impl<T> RacyCell<T> {
    pub const fn new(v: T) -> Self {
        RacyCell(UnsafeCell::new(v))
    }

    pub fn as_ptr(&self) -> *mut T {
        self.0.get()
    }
}

/// Write a boot milestone to the debug port (timestamped by tern).
pub fn milestone(code: u8) {
    io::outb(crate::layout::PORT_DEBUG, code);
}

/// Print the final line and leave through the exit port; falls back to an
/// i8042 reset and then halts.
pub fn exit(status: u8) -> ! {
    crate::println!("probe: done status={status}");
    milestone(crate::layout::MILESTONE_DONE);
    io::outb(crate::layout::PORT_EXIT, status);
    io::outb(crate::layout::PORT_SLEEP_CONTROL, crate::layout::SLEEP_S5);
    io::outb(0x64, 0xfe);
    sys::halt_forever()
}
