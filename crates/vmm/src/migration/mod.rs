//! Live migration: a running VM moves to another tern, on this host or another, over TCP or a
//! Unix socket, with pre-copy.
//!
//! The source ([`send`]) runs on a thread of its own while the VM runs: it connects, describes
//! the VM (configuration, CPUID, memory layout), sends all of guest memory but its zero pages,
//! then rounds of the pages written meanwhile (KVM's dirty log and the devices' log) until
//! what is left fits the downtime limit at the bandwidth it measured. It then stops the VM,
//! sends the last pages and every component's section (the same sections a snapshot holds),
//! and hands over: the destination ([`receive`]) restores everything and says it is ready; the
//! source gives up its disk locks and says go; the destination takes the locks, says it runs,
//! and runs the VM; the source exits. Until the destination says it runs, any failure (it
//! refused, died, the link broke, a timeout, a cancel) leaves the VM running on the source.
//!
//! The wire format is [`protocol`]; this module holds the transports.

mod accept;
mod outgoing;
pub mod protocol;
pub mod receive;
pub mod send;
mod throttle;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

pub use ::api::migrate::{
    MigrationState, MigrationStatus, MigrationUrl, OnTimeout, ReceiveOptions, SendOptions,
};
pub use outgoing::Outgoing;

/// Where the source connects: TCP addresses resolved ahead (on the VMM's thread, which may
/// read the resolver's files), or a Unix socket path.
#[derive(Clone, Debug)]
pub enum Target {
    /// Candidate addresses of a TCP destination.
    Tcp(Vec<SocketAddr>),
    /// A Unix socket.
    Unix(PathBuf),
}

impl Target {
    /// Resolves `url`.
    pub fn resolve(url: &MigrationUrl) -> Result<Target, String> {
        match url {
            MigrationUrl::Unix(p) => Ok(Target::Unix(p.clone())),
            MigrationUrl::Tcp(a) => {
                let addrs: Vec<SocketAddr> = a
                    .to_socket_addrs()
                    .map_err(|e| format!("cannot resolve {a}: {e}"))?
                    .collect();
                if addrs.is_empty() {
                    return Err(format!("{a} resolves to no address"));
                }
                Ok(Target::Tcp(addrs))
            }
        }
    }

    /// Connects, trying each address for at most `timeout`.
    pub fn connect(&self, timeout: Duration) -> Result<Stream, String> {
        match self {
            Target::Unix(p) => UnixStream::connect(p)
                .map(Stream::Unix)
                .map_err(|e| format!("cannot connect to unix:{}: {e}", p.display())),
            Target::Tcp(addrs) => {
                let mut last = None;
                for a in addrs {
                    match TcpStream::connect_timeout(a, timeout) {
                        Ok(s) => {
                            let _ = s.set_nodelay(true);
                            return Ok(Stream::Tcp(s));
                        }
                        Err(e) => last = Some(format!("cannot connect to tcp:{a}: {e}")),
                    }
                }
                Err(last.unwrap_or_else(|| "no address to connect to".into()))
            }
        }
    }
}

/// A migration connection.
#[derive(Debug)]
pub enum Stream {
    /// Over TCP.
    Tcp(TcpStream),
    /// Over a Unix socket.
    Unix(UnixStream),
}

impl Stream {
    /// Sets how long one read or write may block (None: forever).
    pub fn set_timeouts(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t).and_then(|()| s.set_write_timeout(t)),
            Stream::Unix(s) => s.set_read_timeout(t).and_then(|()| s.set_write_timeout(t)),
        }
    }

    /// Ends both directions (the peer reads EOF).
    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

/// A connection that can carry a file descriptor with a message (a Unix socket can).
pub trait Conn: Read + Write {
    /// Receives up to `buf.len()` bytes and the descriptor sent with them, if any.
    fn recv_fd(&mut self, buf: &mut [u8]) -> std::io::Result<(usize, Option<std::fs::File>)>;
}

impl Stream {
    /// Sends `buf` with the descriptor `fd` attached (Unix sockets only).
    pub fn send_fd(&mut self, buf: &[u8], fd: &impl AsRawFd) -> std::io::Result<()> {
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        match self {
            Stream::Unix(s) => {
                let n = s
                    .send_with_fd(buf, fd.as_raw_fd())
                    .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
                if n != buf.len() {
                    return Err(std::io::Error::other(
                        "short write of a descriptor's message",
                    ));
                }
                Ok(())
            }
            Stream::Tcp(_) => Err(std::io::Error::other(
                "file descriptors travel only over unix: sockets",
            )),
        }
    }
}

impl Conn for Stream {
    fn recv_fd(&mut self, buf: &mut [u8]) -> std::io::Result<(usize, Option<std::fs::File>)> {
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        match self {
            Stream::Unix(s) => s
                .recv_with_fd(buf)
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno())),
            Stream::Tcp(_) => Err(std::io::Error::other(
                "file descriptors travel only over unix: sockets",
            )),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

/// A destination waiting for its source.
#[derive(Debug)]
pub enum Listener {
    /// On a TCP address.
    Tcp(TcpListener),
    /// On a Unix socket (removed when dropped).
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Listens on `url` (a Unix socket path must not exist, or be a stale socket).
    pub fn bind(url: &MigrationUrl) -> Result<Listener, String> {
        match url {
            MigrationUrl::Tcp(a) => TcpListener::bind(a.as_str())
                .map(Listener::Tcp)
                .map_err(|e| format!("cannot listen on {url}: {e}")),
            MigrationUrl::Unix(p) => {
                let l = crate::unix_socket::listen(p, "migration socket")
                    .map_err(|e| format!("cannot listen on {url}: {e}"))?;
                // Accepting blocks (with a stop descriptor polled beside it).
                l.set_nonblocking(false)
                    .map_err(|e| format!("cannot listen on {url}: {e}"))?;
                Ok(Listener::Unix(l, p.clone()))
            }
        }
    }

    /// The address it listens on (`tcp:IP:PORT` with the port bound, or `unix:PATH`).
    pub fn local(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| format!("tcp:{a}"))
                .unwrap_or_else(|_| "tcp:?".into()),
            Listener::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }

    /// Waits for the source, or for `stop` to become readable (then None).
    pub fn accept(&self, stop: BorrowedFd<'_>) -> Result<Option<Stream>, String> {
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.as_raw(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: stop.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two pollfds we own, for descriptors that stay open during the call.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(format!("poll: {e}"));
            }
            if fds[1].revents != 0 {
                return Ok(None);
            }
            if fds[0].revents != 0 {
                let s = match self {
                    Listener::Tcp(l) => l.accept().map(|(s, _)| {
                        let _ = s.set_nodelay(true);
                        Stream::Tcp(s)
                    }),
                    Listener::Unix(l, _) => l.accept().map(|(s, _)| Stream::Unix(s)),
                };
                return s
                    .map(Some)
                    .map_err(|e| format!("accepting the source's connection: {e}"));
            }
        }
    }

    fn as_raw(&self) -> i32 {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}
