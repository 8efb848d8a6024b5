//! `tern run --machine-name` when machined cannot take the VM, on a real D-Bus message bus
//! (Debian's `dbus-daemon`, on a socket of the test's own, named to tern by
//! `DBUS_SYSTEM_BUS_ADDRESS`): a name machined already has, a bus without machined, no bus.
//! The real machined, which needs systemd as PID 1, is met in `systemd_machine.rs`; here a
//! service written with Debian's `python3-dbus` takes the name `org.freedesktop.machine1` and
//! answers `RegisterMachine` with machined's signature (`sayssus` → `o`) and its
//! `MachineExists` error, recording each call and the caller's pid as the bus reports it.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

const PYTHON: &str = "/usr/bin/python3";
const DBUS_DAEMON: &str = "/usr/bin/dbus-daemon";

/// machined's Manager as far as `RegisterMachine` goes: one JSON line per call in argv[2];
/// a name taken twice gets machined's `MachineExists` error.
const MACHINED: &str = r#"
import json, sys
import dbus, dbus.service, dbus.mainloop.glib
from gi.repository import GLib
dbus.mainloop.glib.DBusGMainLoop(set_as_default=True)
bus = dbus.bus.BusConnection(sys.argv[1])
taken = set()
class Manager(dbus.service.Object):
    @dbus.service.method("org.freedesktop.machine1.Manager", in_signature="sayssus",
                         out_signature="o", sender_keyword="sender")
    def RegisterMachine(self, name, id, service, cls, leader, root, sender=None):
        if name in taken:
            raise dbus.exceptions.DBusException("Machine '%s' already exists" % name,
                                                name="org.freedesktop.machine1.MachineExists")
        taken.add(name)
        dbus_obj = bus.get_object("org.freedesktop.DBus", "/org/freedesktop/DBus")
        pid = dbus.Interface(dbus_obj, "org.freedesktop.DBus").GetConnectionUnixProcessID(sender)
        with open(sys.argv[2], "a") as f:
            f.write(json.dumps({"name": str(name), "id": [int(b) for b in id],
                                "service": str(service), "class": str(cls),
                                "leader": int(leader), "root": str(root),
                                "caller": int(pid)}) + "\n")
        return dbus.ObjectPath("/org/freedesktop/machine1/machine/" + name.replace("-", "_2d"))
name = dbus.service.BusName("org.freedesktop.machine1", bus)
Manager(bus, "/org/freedesktop/machine1")
print("ready", flush=True)
GLib.MainLoop().run()
"#;

/// True when the bus and the service can run. Otherwise fails under CI=true (`cargo xtask
/// test` installs dbus, python3-dbus and python3-gi) and skips loudly elsewhere.
fn require_dbus(test: &str) -> bool {
    let ok = Path::new(DBUS_DAEMON).exists()
        && Command::new(PYTHON)
            .args([
                "-c",
                "import dbus, dbus.mainloop.glib; from gi.repository import GLib",
            ])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    if ok {
        return true;
    }
    if in_ci() {
        panic!("{test}: {DBUS_DAEMON} and {PYTHON} with dbus and gi are required under CI=true");
    }
    eprintln!("\n*** SKIPPED {test}: needs dbus, python3-dbus and python3-gi ***\n");
    false
}

/// A process of the test's, killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A message bus on `dir/bus` (the session bus' policy: anyone may own any name); its
/// address.
fn bus(dir: &Scratch) -> (Proc, String) {
    let path = dir.path("bus");
    let address = format!("unix:path={}", path.display());
    let mut p = Command::new(DBUS_DAEMON)
        .args([
            "--config-file=/usr/share/dbus-1/session.conf",
            "--nofork",
            "--print-address=1",
            &format!("--address={address}"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start dbus-daemon");
    let mut line = String::new();
    BufReader::new(p.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("unix:path="), "dbus-daemon said {line:?}");
    (Proc(p), address)
}

/// The stand-in for machined on the bus at `address`, recording calls in `log`.
fn machined(address: &str, log: &Path) -> Proc {
    let mut p = Command::new(PYTHON)
        .args(["-c", MACHINED, address, s(log)])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the machined stand-in");
    let mut line = String::new();
    BufReader::new(p.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    Proc(p)
}

/// `tern run --machine-name NAME` on the probe guest with the bus at `address`; its pid,
/// exit status and standard error.
fn run(name: &str, address: &str) -> (u32, Option<i32>, String) {
    let probe = probe();
    let child = Command::new(tern())
        .args([
            "run",
            "--kernel",
            s(&probe),
            "--memory",
            "64M",
            "--serial",
            "none",
            "--machine-name",
            name,
            "--cmdline",
            "probe.run=count probe.count_ms=200",
        ])
        .env("DBUS_SYSTEM_BUS_ADDRESS", address)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tern");
    let pid = child.id();
    let (code, err) = Tern(child).finish(Duration::from_secs(30));
    (pid, code, err)
}

fn calls(log: &Path) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn the_vm_registers_with_machined_over_the_system_bus() {
    let test = "the_vm_registers_with_machined_over_the_system_bus";
    if !require_kvm(test) || !require_dbus(test) {
        return;
    }
    let dir = Scratch::new("machined");
    let (_bus, address) = bus(&dir);
    let log = dir.path("calls.jsonl");
    let service = machined(&address, &log);

    // Registered under its name, as a VM of the service "tern", led by tern's own process.
    let (pid, code, err) = run("tern-vm1", &address);
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("not registered"), "{err}");
    let got = calls(&log);
    assert_eq!(got.len(), 1, "{got:?}");
    let c = &got[0];
    assert_eq!(c["name"], "tern-vm1");
    assert_eq!(c["service"], "tern");
    assert_eq!(c["class"], "vm");
    assert_eq!(c["root"], "");
    assert_eq!(c["id"], serde_json::json!([]));
    assert_eq!(c["leader"], pid);
    assert_eq!(c["caller"], pid, "the bus saw another process call");

    // A name machined already has: its error, in one line, and the VM runs anyway.
    let (_, code, err) = run("tern-vm1", &address);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("tern: the VM is not registered with systemd-machined: systemd-machined refused: org.freedesktop.machine1.MachineExists: Machine 'tern-vm1' already exists"),
        "{err}"
    );

    // A bus without machined.
    drop(service);
    let (_, code, err) = run("tern-vm2", &address);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains(
            "not registered with systemd-machined: systemd-machined does not run on this host"
        ),
        "{err}"
    );

    // No bus at all.
    let nowhere = format!("unix:path={}", dir.path("no-bus").display());
    let (_, code, err) = run("tern-vm3", &nowhere);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("not registered with systemd-machined: no system bus at"),
        "{err}"
    );
    assert_eq!(calls(&log).len(), 1);
}

#[test]
fn a_machine_name_machined_would_refuse_is_a_usage_error() {
    for bad in ["-vm", "vm_1", "vm 1", "vm/1", "a..b", ""] {
        let flag = format!("--machine-name={bad}");
        let r = tern_run(
            &["--kernel", "/nonexistent", &flag],
            Duration::from_secs(10),
        );
        assert_eq!(r.code, Some(2), "{bad:?}: {}", r.stderr);
        assert!(r.stderr.contains("--machine-name"), "{}", r.stderr);
    }
}
