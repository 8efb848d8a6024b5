//! virtio-net: descriptor chains on the receive, transmit and control queues through the
//! device's workers, on a TAP in a network namespace of the fuzzer's own (created once, kept
//! across runs), with a frame from the input sent to the guest when the flags say so.
#![no_main]
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use net::Tap;
use tern_fuzz::{Driver, Input};
use virtio::devices::net::{Limits, Net, NetOptions};

const TAP: &str = "tfz0";
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;

/// A packet socket on the TAP: what it sends, the device reads from the TAP.
fn setup() -> &'static OwnedFd {
    static PEER: OnceLock<OwnedFd> = OnceLock::new();
    PEER.get_or_init(|| {
        // SAFETY: unshare only moves this thread (and those it starts) to a new network
        // namespace.
        assert_eq!(
            unsafe { libc::unshare(libc::CLONE_NEWNET) },
            0,
            "unshare(CLONE_NEWNET) (run as root)"
        );
        for f in ["all", "default"] {
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{f}/disable_ipv6"), "1");
        }
        let tap = Tap::open(TAP, 1).expect("TAP").remove(0);
        // SAFETY: TUNSETPERSIST takes an int by value: the TAP outlives this descriptor, so
        // each run attaches to it instead of creating an interface.
        assert!(unsafe { libc::ioctl(tap.fd(), TUNSETPERSIST, 1 as libc::c_ulong) } >= 0);
        let mut req = [0u8; 40];
        req[..TAP.len()].copy_from_slice(TAP.as_bytes());
        // SAFETY: plain socket creation, and SIOC[GS]IFFLAGS / SIOCGIFINDEX on a 40-byte ifreq.
        let ifindex = unsafe {
            let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
            assert!(s >= 0);
            assert!(libc::ioctl(s, libc::SIOCGIFFLAGS, req.as_mut_ptr()) >= 0);
            let flags = i16::from_ne_bytes([req[16], req[17]]) | libc::IFF_UP as i16;
            req[16..18].copy_from_slice(&flags.to_ne_bytes());
            assert!(libc::ioctl(s, libc::SIOCSIFFLAGS, req.as_mut_ptr()) >= 0);
            assert!(libc::ioctl(s, libc::SIOCGIFINDEX, req.as_mut_ptr()) >= 0);
            libc::close(s);
            i32::from_ne_bytes([req[16], req[17], req[18], req[19]])
        };
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket creation; ownership moves into the OwnedFd.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(fd >= 0);
        // SAFETY: `fd` is ours.
        let peer = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain data; bind reads its size.
        unsafe {
            let mut sa: libc::sockaddr_ll = std::mem::zeroed();
            sa.sll_family = libc::AF_PACKET as u16;
            sa.sll_protocol = proto;
            sa.sll_ifindex = ifindex;
            assert!(
                libc::bind(
                    peer.as_raw_fd(),
                    (&sa as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32
                ) >= 0
            );
        }
        drop(tap);
        peer
    })
}

fuzz_target!(|data: &[u8]| {
    let peer = setup();
    let mut input = Input(data);
    let flags = input.u8();
    let frame_len = usize::from(input.u8()).max(14);
    let taps = Tap::open(TAP, 1).expect("TAP");
    let opts = NetOptions {
        mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
        mtu: if flags & 2 != 0 { 68 } else { 1500 },
        offload: flags & 4 != 0,
        rx: Limits::default(),
        tx: Limits::default(),
    };
    let mut d = Driver::new(Box::new(Net::new(taps, opts)));
    let mask = d.start(&mut input);
    if flags & 1 != 0 {
        let frame: Vec<u8> = data.iter().copied().cycle().take(frame_len).collect();
        // SAFETY: `frame` is a live buffer of its length. A refused frame is just not sent.
        unsafe { libc::send(peer.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
    }
    d.notify_and_settle(mask);
});
