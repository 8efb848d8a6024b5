//! COM1 16550 output from ring 3, and the `println!` family.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

use super::io::{inb, outb};
use crate::layout::PORT_COM1;

const THR: u16 = PORT_COM1;
const IER: u16 = PORT_COM1 + 1;
const FCR: u16 = PORT_COM1 + 2;
const LCR: u16 = PORT_COM1 + 3;
const MCR: u16 = PORT_COM1 + 4;
const LSR: u16 = PORT_COM1 + 5;
const LSR_THR_EMPTY: u8 = 0x20;

static LOCK: AtomicBool = AtomicBool::new(false);

/// 115200 8N1, FIFOs on, no interrupts.
pub fn init() {
    outb(IER, 0x00);
    outb(LCR, 0x80); // DLAB
    outb(THR, 0x01); // divisor 1 = 115200
    outb(IER, 0x00);
    outb(LCR, 0x03); // 8N1
    outb(FCR, 0xc7);
    outb(MCR, 0x03); // DTR | RTS
}

fn putc(c: u8) {
    // Bounded wait: a missing UART must not hang the probe.
    let mut spins = 0u32;
    while inb(LSR) & LSR_THR_EMPTY == 0 && spins < 100_000 {
        spins += 1;
    }
    outb(THR, c);
}

/// Writer that must be used under `LOCK` (see `print`).
pub struct Serial;

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if b == b'\n' {
                putc(b'\r');
            }
            putc(b);
        }
        Ok(())
    }
}

/// Print under a spin lock so lines from several CPUs do not interleave.
pub fn print(args: fmt::Arguments<'_>) {
    while LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
    let _ = Serial.write_fmt(args);
    LOCK.store(false, Ordering::Release);
}

#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::rt::serial::print(format_args!($($arg)*)) };
}

#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::rt::serial::print(format_args!("{}\n", format_args!($($arg)*))) };
}
