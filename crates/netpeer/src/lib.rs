//! Host-side test peer for the probe guest's virtio-net scenarios (`vnet`, `vnethostile`,
//! `vnetbench`; protocol in guests/probe/README.md, "virtio-net frame protocol"), used by
//! tern's tests (crates/tern/tests/probe_net.rs) and `cargo xtask bench-net`.
//!
//! [`NetNs`] is a network namespace `tern-<pid>-<n>` with a TAP device `tap0` in it; the VMM
//! runs inside it (`ip netns exec`, see [`NetNs::exec_args`]). [`Peer`] is the host end of the
//! frame protocol: a thread that enters the namespace with setns(2) and talks to `tap0` through
//! AF_PACKET sockets (echo, control, sink, flood). Nothing outside the namespace is touched;
//! the namespace is deleted on drop.
//!
//! Needs root (network namespaces, TAP devices) and `ip` (iproute2).

use std::io;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

mod peer;

pub use peer::{capture, Peer, PeerStats, PEER_MAC};

/// Runs `ip args`, failing with its output if it exits non-zero.
fn ip(args: &[&str]) -> io::Result<()> {
    let o = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("ip(8) (iproute2) is required: {e}")))?;
    if !o.status.success() {
        return Err(io::Error::other(format!(
            "ip {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )));
    }
    Ok(())
}

/// A network namespace `tern-<pid>-<n>` holding an up TAP device `tap0` (IPv6 off, so the
/// kernel sends nothing on its own); deleted on drop.
pub struct NetNs {
    pub name: String,
    pub tap: String,
}

impl NetNs {
    /// A namespace with a single-queue `tap0`.
    pub fn new() -> io::Result<NetNs> {
        NetNs::with_tap(&[])
    }

    /// A namespace with `tap0` created with extra `ip tuntap add` words (e.g. `multi_queue`).
    pub fn with_tap(tap_args: &[&str]) -> io::Result<NetNs> {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "tern-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name])?;
        // From here on the guard deletes the namespace, even if a step below fails.
        let ns = NetNs {
            name,
            tap: "tap0".into(),
        };
        ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])?;
        ns.exec(&["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"])?;
        let mut add = vec!["ip", "tuntap", "add", "dev", "tap0", "mode", "tap"];
        add.extend_from_slice(tap_args);
        ns.exec(&add)?;
        ns.exec(&["ip", "link", "set", "tap0", "up"])?;
        Ok(ns)
    }

    /// Where `ip netns` keeps the namespace (for setns(2)).
    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// Runs `cmd` inside the namespace to completion, failing with its output if it fails.
    pub fn exec(&self, cmd: &[&str]) -> io::Result<()> {
        let mut args = vec!["netns", "exec", &self.name];
        args.extend_from_slice(cmd);
        ip(&args)
    }

    /// The arguments to `ip` that run `program args` inside the namespace
    /// (`netns exec NAME program args…`); `ip netns exec` execs the program, so killing `ip`
    /// kills it.
    pub fn exec_args<I, S>(&self, program: &str, args: I) -> Vec<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut a = vec![
            "netns".to_string(),
            "exec".to_string(),
            self.name.clone(),
            program.to_string(),
        ];
        a.extend(args.into_iter().map(|s| s.as_ref().to_string()));
        a
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
