//! PCI INTx through KVM: each line a resampling irqfd, and one thread that raises a line
//! again when the guest acknowledges it while its function still has an interrupt pending.

use std::sync::Arc;

use lifecycle::event_loop::EventLoop;
use virtio::transport::pci::IntxLine;
use vmm_sys_util::eventfd::EventFd;

use crate::error::setup;
use crate::error::VmmError;

/// INTx through a KVM irqfd in resample mode.
pub(crate) struct KvmIntx {
    pub(crate) irqfd: EventFd,
}

impl IntxLine for KvmIntx {
    fn assert(&self) -> std::io::Result<()> {
        self.irqfd.write(1)
    }
}

/// Re-raises level-triggered INTx lines that are still pending when the guest acknowledges
/// them (KVM signals the resample eventfd on EOI). One thread for all PCI functions; stopped
/// and joined on drop.
pub struct IntxResampler {
    stop: EventFd,
    thread: Option<std::thread::JoinHandle<()>>,
}

pub(crate) type Pending = Arc<dyn Fn() -> bool + Send + Sync>;

impl IntxResampler {
    pub(crate) fn start(lines: Vec<(EventFd, Arc<KvmIntx>, Pending)>) -> Result<Self, VmmError> {
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| setup(format!("eventfd: {e}")))?;
        let stop2 = stop
            .try_clone()
            .map_err(|e| setup(format!("eventfd: {e}")))?;
        use std::os::fd::AsRawFd;
        let epoll_err = |e: std::io::Error| setup(format!("epoll: {e}"));
        let mut events = EventLoop::new().map_err(epoll_err)?;
        events.add(stop.as_raw_fd(), u64::MAX).map_err(epoll_err)?;
        for (i, (resample, _, _)) in lines.iter().enumerate() {
            events
                .add(resample.as_raw_fd(), i as u64)
                .map_err(epoll_err)?;
        }
        let thread =
            lifecycle::threads::spawn(lifecycle::threads::Role::Vmm, "tern-intx", move || {
                loop {
                    let Ok(ready) = events.wait(None) else {
                        return;
                    };
                    for token in ready.iter() {
                        let Some((resample, line, pending)) = lines.get(token as usize) else {
                            return; // the stop event
                        };
                        let _ = resample.read();
                        if pending() {
                            let _ = line.assert();
                        }
                    }
                }
            })
            .map_err(|e| setup(format!("cannot start the INTx thread: {e}")))?;
        let _ = stop2;
        Ok(IntxResampler {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for IntxResampler {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
