//! Devices.
//!
//! Policy for hostile input, shared by all devices here: a malformed descriptor chain (empty,
//! looping, longer than the queue, leaving the descriptor table, a buffer outside guest memory,
//! a device-readable buffer after a device-writable one, a buffer in the wrong direction for the
//! queue, more than 1 MiB in total) or a bogus available index makes the device *broken*: its
//! worker stops (the chain is not returned to the guest), the transport reports
//! DEVICE_NEEDS_RESET through [`VirtioDevice::broken`](crate::VirtioDevice::broken), and the
//! device raises a configuration interrupt as the spec asks. Only a driver reset revives it.
//! Each device processes at most a queue's worth of chains per wakeup, so a guest refilling a
//! queue as fast as it is served cannot starve a reset.

pub mod balloon;
pub mod block;
mod common;
pub mod console;
pub mod mem;
pub mod net;
pub mod rng;
pub mod vsock;

pub use balloon::{Balloon, BalloonHandle, BalloonOptions, BalloonStatus, Discard};
pub use block::{Block, BlockCounters, BlockHandle, BlockOptions};
pub use console::{Console, ConsoleInput, ConsoleOutput};
pub use mem::{MemHandle, MemOptions, MemStatus, VirtioMem};
pub use net::{Limits, Net, NetCounters, NetHandle, NetOptions};
pub use rng::Rng;
pub use vsock::Vsock;
