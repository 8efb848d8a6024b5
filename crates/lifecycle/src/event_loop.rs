//! The one event loop every tern thread that waits on file descriptors uses: the VMM's main
//! loop, the API wait before boot, the INTx resampler and each device worker. Descriptors are
//! registered with a token; a wait hands back the tokens that are ready, in the order the
//! kernel reported them, and an interrupted wait (a signal) is an empty one.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// Ready descriptors per wait; more wait for the next one.
const BATCH: usize = 16;

/// An epoll set and the buffer its waits fill.
pub struct EventLoop {
    epoll: Epoll,
    events: [EpollEvent; BATCH],
}

impl EventLoop {
    /// An empty loop.
    pub fn new() -> io::Result<EventLoop> {
        Ok(EventLoop {
            epoll: Epoll::new()?,
            events: [EpollEvent::default(); BATCH],
        })
    }

    /// Watches `fd` for input (level-triggered), reported as `token`.
    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        self.add_with(fd, token, false)
    }

    /// Watches `fd` for input, edge-triggered when `edge` (reported once per new arrival, for
    /// a handler that drains it).
    pub fn add_with(&self, fd: RawFd, token: u64, edge: bool) -> io::Result<()> {
        let mut set = EventSet::IN;
        if edge {
            set |= EventSet::EDGE_TRIGGERED;
        }
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(set, token))
    }

    /// Watches a socket for input and for room to write, edge-triggered (each reported once
    /// per change, for a handler that reads and writes until it would block).
    pub fn add_stream(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let set = EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED;
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(set, token))
    }

    /// Stops watching `fd`.
    pub fn remove(&self, fd: RawFd) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }

    /// Waits until something is ready or `timeout` passes (None: no limit); returns the ready
    /// tokens (none after a timeout or a signal).
    pub fn wait(&mut self, timeout: Option<Duration>) -> io::Result<Tokens<'_>> {
        let ms = timeout.map_or(-1, |t| i32::try_from(t.as_millis()).unwrap_or(i32::MAX));
        let n = match self.epoll.wait(ms, &mut self.events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(e),
        };
        Ok(Tokens(&self.events[..n]))
    }
}

impl std::os::fd::AsRawFd for EventLoop {
    /// The epoll instance, which is itself readable when one of its descriptors is ready: a
    /// loop nested in another.
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

/// The tokens one wait found ready.
pub struct Tokens<'a>(&'a [EpollEvent]);

impl Tokens<'_> {
    /// Whether `token` is among them.
    pub fn contains(&self, token: u64) -> bool {
        self.0.iter().any(|e| e.data() == token)
    }

    /// Them, in the kernel's order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.0.iter().map(EpollEvent::data)
    }

    /// Whether none is ready.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use vmm_sys_util::eventfd::EventFd;

    use super::*;

    #[test]
    fn ready_descriptors_come_back_as_their_tokens() {
        let (a, b) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
        let mut l = EventLoop::new().unwrap();
        l.add(a.as_raw_fd(), 7).unwrap();
        l.add_with(b.as_raw_fd(), 9, true).unwrap();
        assert!(l.wait(Some(Duration::from_millis(1))).unwrap().is_empty());
        b.write(1).unwrap();
        let t = l.wait(None).unwrap();
        assert!(t.contains(9) && !t.contains(7));
        a.write(1).unwrap();
        // Edge-triggered: b is not reported again until written again; a (level) is.
        let got: Vec<u64> = l.wait(None).unwrap().iter().collect();
        assert_eq!(got, vec![7]);
        assert_eq!(
            l.wait(Some(Duration::ZERO))
                .unwrap()
                .iter()
                .collect::<Vec<_>>(),
            vec![7]
        );
    }
}
