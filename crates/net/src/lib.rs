//! Linux TAP devices for tern's virtio-net: opening (or creating) a TAP with `IFF_VNET_HDR`, so
//! frames carry the 12-byte `virtio_net_hdr_v1` in both directions and checksum/segmentation
//! offloads pass between guest and host untouched, and `IFF_MULTI_QUEUE` for one file
//! descriptor per queue pair.
//!
//! No rust-vmm crate wraps TAP devices, hence these few ioctls.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Size of `struct virtio_net_hdr_v1` (with `num_buffers`), the header on every frame.
pub const VNET_HDR_LEN: usize = 12;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;

/// `TUNSETOFFLOAD` bits: what the host may hand us without segmenting or checksumming it.
pub const TUN_F_CSUM: u32 = 0x01;
/// TCPv4 segmentation offload.
pub const TUN_F_TSO4: u32 = 0x02;
/// TCPv6 segmentation offload.
pub const TUN_F_TSO6: u32 = 0x04;
/// TSO with ECN.
pub const TUN_F_TSO_ECN: u32 = 0x08;

/// TAP errors, each naming the device.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(io::Error),
    /// The name is unusable.
    #[error("invalid TAP name '{0}': at most 15 bytes, no '/' or NUL")]
    Name(String),
    /// Attaching failed.
    #[error("cannot attach to TAP {name}: {err}")]
    Attach {
        /// The TAP.
        name: String,
        /// Why.
        err: io::Error,
    },
    /// An ioctl on the TAP failed.
    #[error("TAP {name}: {what}: {err}")]
    Ioctl {
        /// The TAP.
        name: String,
        /// Which setting.
        what: &'static str,
        /// Why.
        err: io::Error,
    },
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// One queue of a TAP device (non-blocking).
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens `queues` queues of the TAP `name`, creating it if it does not exist (a name with
    /// `%d`, such as `tern%d`, makes the kernel pick a free one). A TAP tern creates lives until
    /// its last descriptor closes, i.e. until the VM ends. With more than one queue the TAP
    /// must be (or is created) multi-queue.
    pub fn open(name: &str, queues: usize) -> Result<Vec<Tap>, TapError> {
        if name.is_empty()
            || name.len() >= libc::IFNAMSIZ
            || name.contains('/')
            || name.contains('\0')
        {
            return Err(TapError::Name(name.to_string()));
        }
        let mut taps = Vec::with_capacity(queues);
        let mut name = name.to_string();
        for _ in 0..queues.max(1) {
            let tap = Self::open_one(&name, queues > 1)?;
            name = tap.name.clone();
            taps.push(tap);
        }
        Ok(taps)
    }

    fn open_one(name: &str, multi_queue: bool) -> Result<Tap, TapError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        if multi_queue {
            req.flags |= IFF_MULTI_QUEUE;
        }
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is (repr(C), full size).
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(TapError::Attach {
                name: name.to_string(),
                err: io::Error::last_os_error(),
            });
        }
        let len = req
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(libc::IFNAMSIZ);
        let tap = Tap {
            file,
            name: String::from_utf8_lossy(&req.name[..len]).into_owned(),
        };
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer.
        if unsafe { libc::ioctl(tap.fd(), TUNSETVNETHDRSZ, &hdr_len) } < 0 {
            return Err(tap.ioctl_err("set the vnet header size"));
        }
        Ok(tap)
    }

    fn ioctl_err(&self, what: &'static str) -> TapError {
        TapError::Ioctl {
            name: self.name.clone(),
            what,
            err: io::Error::last_os_error(),
        }
    }

    /// Tells the kernel which offloads the guest accepts (`TUN_F_*`): frames the host sends
    /// may then arrive unsegmented or with partial checksums.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        if unsafe { libc::ioctl(self.fd(), TUNSETOFFLOAD, flags as libc::c_ulong) } < 0 {
            return Err(self.ioctl_err("set offloads"));
        }
        Ok(())
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The descriptor, for epoll.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Reads one frame (vnet header first) into `buf`; `WouldBlock` when none is queued.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is a live, writable buffer of `buf.len()` bytes.
        let r = unsafe { libc::read(self.fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r as usize)
    }

    /// Writes one frame gathered from `iov` (vnet header first).
    ///
    /// # Safety
    /// Every iovec must describe memory readable for its length for the duration of the call.
    pub unsafe fn writev(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: forwarded from the caller; `iov` is a live array of `iov.len()` iovecs.
        let r = unsafe { libc::writev(self.fd(), iov.as_ptr(), iov.len() as libc::c_int) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r as usize)
    }
}

/// A RARP announcement of `mac` (reverse request, "who has this address", sent from it to
/// everyone), padded to Ethernet's 60-byte minimum: what a VMM sends for a guest that just
/// moved, so bridges and switches learn the port its MAC is behind now.
pub fn rarp_announcement(mac: [u8; 6]) -> [u8; 60] {
    let mut f = [0u8; 60];
    f[..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x8035u16.to_be_bytes()); // RARP
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&3u16.to_be_bytes()); // reverse request
    f[22..28].copy_from_slice(&mac); // sender hardware address; sender IP 0
    f[32..38].copy_from_slice(&mac); // target hardware address; target IP 0
    f
}

impl Tap {
    /// Sends `frame` out of the TAP, as if the guest had (behind a zero vnet header).
    pub fn inject(&self, frame: &[u8]) -> io::Result<()> {
        let hdr = [0u8; VNET_HDR_LEN];
        let iov = [
            libc::iovec {
                iov_base: hdr.as_ptr() as *mut libc::c_void,
                iov_len: hdr.len(),
            },
            libc::iovec {
                iov_base: frame.as_ptr() as *mut libc::c_void,
                iov_len: frame.len(),
            },
        ];
        // SAFETY: both iovecs describe live local buffers for their lengths.
        unsafe { self.writev(&iov) }.map(|_| ())
    }
}

/// Whether an I/O error means the TAP device is gone (deleted by an administrator).
pub fn is_gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EBADFD) | Some(libc::EIO) | Some(libc::ENXIO) | Some(libc::ENODEV)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Moves this test thread into a network namespace of its own (false if none can be made).
    fn in_private_netns() -> bool {
        // SAFETY: unshare affects only this thread; no memory is involved.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            let e = io::Error::last_os_error();
            assert!(
                std::env::var_os("CI").is_none(),
                "unshare(CLONE_NEWNET): {e}"
            );
            eprintln!("SKIP: cannot create a network namespace ({e})");
            return false;
        }
        true
    }

    fn interface_exists(name: &str) -> bool {
        // /proc/thread-self/net shows this thread's network namespace.
        std::fs::read_to_string("/proc/thread-self/net/dev")
            .map(|s| {
                s.lines()
                    .any(|l| l.trim_start().starts_with(&format!("{name}:")))
            })
            .unwrap_or(false)
    }

    #[test]
    fn an_auto_tap_is_created_and_goes_away_with_its_last_queue() {
        if !in_private_netns() {
            return;
        }
        let taps = Tap::open("tern%d", 2).unwrap();
        let name = taps[0].name().to_string();
        assert!(name.starts_with("tern") && name != "tern%d", "{name}");
        assert_eq!(taps[1].name(), name, "both queues on one TAP");
        assert!(
            interface_exists(&name),
            "{name} not in /proc/thread-self/net/dev"
        );
        taps[0].set_offload(TUN_F_CSUM | TUN_F_TSO4).unwrap();
        drop(taps);
        assert!(!interface_exists(&name), "{name} outlived its queues");
    }

    #[test]
    fn bad_names_are_refused() {
        for n in ["", "a/b", "sixteen-chars-xx"] {
            assert!(matches!(Tap::open(n, 1), Err(TapError::Name(_))), "{n}");
        }
    }
}
