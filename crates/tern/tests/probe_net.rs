//! tern's virtio-net against the probe's ring-3 driver (guests/probe, scenarios `vnet`,
//! `vnethostile`, `vnetbench`) on both transports, and the same driver under QEMU.
//!
//! Every test gets its own network namespace with a TAP device `tap0` in it and the host end
//! of the frame protocol running in a thread (crates/netpeer: `NetNs`, `Peer`); the VMM runs
//! inside the namespace (`ip netns exec`). Nothing outside the namespace is touched; the
//! namespace is deleted when the test ends, pass or fail. Throughput is measured by
//! `cargo xtask bench-net`, not here.
//!
//! Needs root (network namespaces, TAP devices), `ip` (iproute2) and /dev/kvm.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use common::*;
use netpeer::{NetNs, Peer, PeerStats};

/// The MAC the QEMU test gives its device.
const QEMU_MAC: &str = "52:54:00:12:34:56";
/// Frames the echo tests exchange (`probe.vnet_frames`'s default).
const FRAMES: u64 = 100;

fn num(fields: &HashMap<String, String>, key: &str) -> u64 {
    let v = fields
        .get(key)
        .unwrap_or_else(|| panic!("no {key} in {fields:?}"));
    v.parse()
        .unwrap_or_else(|_| panic!("{key}={v} is not a number"))
}

/// A fresh namespace with the peer running on its TAP.
fn ns_with_peer() -> (NetNs, Peer) {
    let ns = NetNs::new().expect("network namespace");
    let peer = Peer::start(&ns).expect("host peer");
    (ns, peer)
}

/// Runs `program args` inside `ns`, killing it after `timeout`.
fn ns_run(ns: &NetNs, program: &Path, args: &[&str], timeout: Duration) -> Run {
    let a = ns.exec_args(program.to_str().expect("utf-8 path"), args);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    run_with_timeout(Path::new("ip"), &a, timeout)
}

// ---------------------------------------------------------------------------------------------
// Running the probe.

/// Boots the probe under tern inside `ns` with `--net tap=<tap><net_opts>` on `transport`.
pub fn tern_net_run(
    ns: &NetNs,
    transport: &str,
    scenarios: &str,
    extra_cmdline: &str,
    net_opts: &str,
) -> Run {
    let probe = probe();
    let cmdline = format!("probe.run={scenarios} {extra_cmdline}");
    let net = format!("tap={}{net_opts}", ns.tap);
    ns_run(
        ns,
        &tern(),
        &[
            "run",
            "--kernel",
            probe.to_str().expect("utf-8 path"),
            "--cmdline",
            &cmdline,
            "--serial",
            "stdio",
            "--memory",
            "64M",
            "--transport",
            transport,
            "--net",
            &net,
        ],
        Duration::from_secs(90),
    )
}

/// Boots the probe under QEMU inside `ns` (as `common::qemu_probe_run`) on `machine`, with a
/// tap netdev `n0` on the namespace's TAP and `device` (e.g. `virtio-net-pci,netdev=n0`).
pub fn qemu_net_run(qemu: &Path, ns: &NetNs, machine: &str, device: &str, cmdline: &str) -> Run {
    let probe = probe();
    let netdev = format!(
        "tap,id=n0,ifname={},script=no,downscript=no,vhost=off",
        ns.tap
    );
    let mut args = vec![
        "-accel",
        "kvm",
        "-M",
        machine,
        "-cpu",
        "host,-arch-capabilities",
        "-smp",
        "1",
        "-m",
        "64",
        "-nographic",
        "-no-reboot",
        "-nodefaults",
        "-serial",
        "stdio",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-kernel",
        probe.to_str().expect("utf-8 path"),
        "-append",
        cmdline,
        "-netdev",
        &netdev,
        "-device",
        device,
    ];
    if machine.starts_with("microvm") {
        args.extend_from_slice(&["-global", "virtio-mmio.force-legacy=false"]);
    }
    ns_run(ns, qemu, &args, Duration::from_secs(90))
}

fn assert_done(r: &Run) {
    assert!(!r.timed_out, "timed out\n{}\n{}", r.stdout, r.stderr);
    if r.stderr.contains("--net") && !r.stdout.contains("probe: done") {
        panic!(
            "tern refused the --net option (no virtio-net yet?): exit {:?}\n{}",
            r.code, r.stderr
        );
    }
    assert!(
        r.stdout.contains("probe: done status=0"),
        "exit {:?}\n{}\n{}",
        r.code,
        r.stdout,
        r.stderr
    );
}

/// Shows the probe's virtio-net lines (with `--nocapture`).
fn show(r: &Run) {
    for l in r.stdout.lines().filter(|l| l.starts_with("probe: vnet")) {
        eprintln!("{l}");
    }
}

/// Checks a passed `vnet` report and the peer's view of it.
fn check_echo(r: &Run, peer: &PeerStats) -> HashMap<String, String> {
    show(r);
    let v = r.scenario("vnet");
    assert_eq!(num(&v, "frames"), FRAMES, "{v:?}");
    assert_eq!(num(&v, "sent"), FRAMES, "{v:?}");
    assert_eq!(num(&v, "received"), FRAMES, "{v:?}");
    assert_eq!(num(&v, "bad"), 0, "{v:?}");
    assert_eq!(v["link"], "up", "{v:?}");
    let mac = &v["mac"];
    assert!(
        mac.len() == 17 && mac != "00:00:00:00:00:00",
        "no MAC from the configuration: {v:?}"
    );
    assert!(num(&v, "mtu") >= 68, "{v:?}");
    assert_eq!(peer.echoed, FRAMES, "{peer:?}\n{v:?}");
    assert_eq!(peer.echo_bad, 0, "{peer:?}");
    v
}

fn echo(transport: &str) {
    let (ns, peer) = ns_with_peer();
    let r = tern_net_run(&ns, transport, "vnet", "", "");
    let st = peer.stop().expect("host peer");
    assert_done(&r);
    let v = check_echo(&r, &st);
    assert_eq!(v["transport"], transport, "{v:?}");
    assert_eq!(num(&v, "mtu"), 1500, "{v:?}");
}

#[test]
fn net_echo_over_mmio() {
    if !require_kvm("net_echo_over_mmio") || !require_netns("net_echo_over_mmio") {
        return;
    }
    echo("mmio");
}

#[test]
fn net_echo_over_pci() {
    if !require_kvm("net_echo_over_pci") || !require_netns("net_echo_over_pci") {
        return;
    }
    echo("pci");
}

#[test]
fn net_hostile_over_pci() {
    if !require_kvm("net_hostile_over_pci") || !require_netns("net_hostile_over_pci") {
        return;
    }
    let (ns, peer) = ns_with_peer();
    let r = tern_net_run(&ns, "pci", "vnethostile", "", "");
    let st = peer.stop().expect("host peer");
    show(&r);
    eprintln!("peer: {st:?}");
    assert_done(&r);
    let h = r.scenario("vnethostile");
    let cases = num(&h, "cases");
    assert!(cases >= 7, "{h:?}");
    assert_eq!(num(&h, "recovered"), cases, "{h:?}");
    assert_eq!(num(&h, "resets"), 0, "{h:?}");
    assert_eq!(
        num(&h, "returned"),
        cases,
        "every bad chain must come back: {h:?}"
    );
    // The echo before the cases and one after each.
    assert_eq!(st.echoed, cases + 1, "{st:?}");
    assert!(
        !r.stderr.contains("needs a reset"),
        "a malformed frame broke the device: {}",
        r.stderr
    );
}

#[test]
fn net_probe_driver_under_qemu() {
    if !require_kvm("net_probe_driver_under_qemu") || !require_netns("net_probe_driver_under_qemu")
    {
        return;
    }
    let Some(qemu) = qemu("net_probe_driver_under_qemu") else {
        return;
    };
    let (ns, peer) = ns_with_peer();
    let device = format!("virtio-net-pci,netdev=n0,mac={QEMU_MAC}");
    let r = qemu_net_run(qemu, &ns, "pc", &device, "probe.run=vnet");
    let st = peer.stop().expect("host peer");
    assert_done(&r);
    let v = check_echo(&r, &st);
    assert_eq!(v["mac"], QEMU_MAC, "{v:?}");
    assert_eq!(v["transport"], "pci", "{v:?}");
}

/// `vnetbench`'s control protocol against QEMU (virtio-mmio), briefly: every test must move
/// frames in both directions and the peer must see them.
#[test]
fn net_bench_protocol_under_qemu() {
    if !require_kvm("net_bench_protocol_under_qemu")
        || !require_netns("net_bench_protocol_under_qemu")
    {
        return;
    }
    let Some(qemu) = qemu("net_bench_protocol_under_qemu") else {
        return;
    };
    let (ns, peer) = ns_with_peer();
    let r = qemu_net_run(
        qemu,
        &ns,
        "microvm,acpi=off",
        "virtio-net-device,netdev=n0",
        "probe.run=vnetbench probe.vnet_ms=300",
    );
    let st = peer.stop().expect("host peer");
    assert_done(&r);
    let b = r.scenario("vnetbench");
    eprintln!("vnetbench under QEMU (300 ms per test): {b:?}\npeer: {st:?}");
    for key in ["tx_pps", "tx_seen", "rx_pps", "rx_sent", "rx_gso_frames"] {
        assert!(num(&b, key) > 0, "{key}: {b:?}");
    }
    assert!(
        num(&b, "rx_pps") * 3 / 10 <= num(&b, "rx_sent"),
        "more frames received than the peer sent: {b:?}"
    );
    assert!(st.sink > 0 && st.ipv4 > 0 && st.flood_sent > 0, "{st:?}");
    assert!(st.max_frame > 1514, "the peer saw no TSO frame: {st:?}");
}
