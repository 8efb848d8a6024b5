//! The shipped unit under a real systemd: this host's Debian booted as a container
//! (`systemd-nspawn --volatile=yes --boot`: systemd as PID 1, its journal, D-Bus and
//! systemd-machined), with /dev/kvm, this build of tern and the probe guest bound in.
//! `systemctl start tern@probe` must return once the VM runs (`Type=notify`), `machinectl`
//! must list the VM with its unit and leader (`--machine-name`), the journal must file tern's
//! lines under their own priorities, and `systemctl stop` must end the VM and its machine.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

const NSPAWN: &str = "/usr/bin/systemd-nspawn";

/// True when a container can boot here. Otherwise fails under CI=true (`cargo xtask test`
/// installs systemd-container) and skips loudly elsewhere.
fn require_nspawn(test: &str) -> bool {
    if Path::new(NSPAWN).exists() && Path::new("/usr/bin/nsenter").exists() {
        return true;
    }
    if in_ci() {
        panic!("{test}: {NSPAWN} (systemd-container) and nsenter are required under CI=true");
    }
    eprintln!("\n*** SKIPPED {test}: needs systemd-container ***\n");
    false
}

/// A booted container: the nspawn process and the container's systemd (its PID 1).
struct Container {
    nspawn: Child,
    init: u32,
    console: PathBuf,
}

impl Container {
    /// Boots this host's OS read-only (a tmpfs root, /usr from the host) with `binds`
    /// (`SOURCE:TARGET`, read-only) and /dev/kvm; waits until systemd says it runs.
    fn boot(name: &str, binds: &[String], console: PathBuf) -> Container {
        let mut cmd = Command::new(NSPAWN);
        cmd.args([
            "--directory=/",
            "--volatile=yes",
            &format!("--machine={name}"),
            // The host has no machined of its own to tell; the test's shell is the unit.
            "--register=no",
            "--keep-unit",
            "--console=passive",
            // Its own network namespace: nothing in it touches the host's interfaces.
            "--private-network",
            "--bind=/dev/kvm",
        ]);
        for b in binds {
            cmd.arg(format!("--bind-ro={b}"));
        }
        // No first-boot questions on a console nobody reads.
        cmd.args(["--boot", "systemd.firstboot=off"])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&console).unwrap())
            .stderr(Stdio::inherit());
        let nspawn = cmd.spawn().expect("start systemd-nspawn");
        let mut c = Container {
            init: 0,
            nspawn,
            console,
        };
        let t0 = Instant::now();
        while c.init == 0 {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "no systemd in the container: {}",
                c.log()
            );
            c.init = children(c.nspawn.id())
                .into_iter()
                .find(|&p| comm(p) == "systemd")
                .unwrap_or(0);
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut state = String::new();
        while t0.elapsed() < Duration::from_secs(90) {
            state = c.run(&["systemctl", "is-system-running"]).stdout_text();
            if matches!(state.trim(), "running" | "degraded") {
                return c;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "the container's systemd is '{state}' after 90 s: {}",
            c.log()
        );
    }

    /// `argv` inside the container's namespaces.
    fn run(&self, argv: &[&str]) -> Output {
        Command::new("/usr/bin/nsenter")
            .args([
                "-t",
                &self.init.to_string(),
                "-m",
                "-u",
                "-i",
                "-n",
                "-p",
                "--",
            ])
            .args(argv)
            .stdin(Stdio::null())
            .output()
            .expect("nsenter")
    }

    /// `argv` inside, which must succeed; its standard output.
    fn ok(&self, argv: &[&str]) -> String {
        let out = self.run(argv);
        assert!(
            out.status.success(),
            "{argv:?}: {}{}",
            out.stdout_text(),
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout_text()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.run(&["systemctl", "poweroff"]);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(30) {
            if self.nspawn.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Killing its PID 1 ends every process of the container (0 would be this test's own
        // process group: only a PID 1 that was found).
        if self.init != 0 {
            // SAFETY: kill(2) on the container's init, found among nspawn's children.
            unsafe { libc::kill(self.init as i32, libc::SIGKILL) };
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}

trait Text {
    fn stdout_text(&self) -> String;
}

impl Text for Output {
    fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// The children of process `pid`.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| {
            status_field(&format!("/proc/{p}/status"), "PPid")
                .is_some_and(|pp| pp.trim() == pid.to_string())
        })
        .collect()
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// `systemctl show -p PROPERTY --value UNIT` inside.
fn property(c: &Container, unit: &str, property: &str) -> String {
    c.ok(&["systemctl", "show", "-p", property, "--value", unit])
        .trim()
        .to_string()
}

#[test]
fn systemd_runs_the_unit_and_machined_lists_its_vm() {
    let test = "systemd_runs_the_unit_and_machined_lists_its_vm";
    if !require_kvm(test) || !require_nspawn(test) {
        return;
    }
    let dir = Scratch::new("nspawn");
    // The unit as installed in the container, running this build of tern.
    let unit = dir.path("tern@.service");
    let template = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../contrib/systemd/tern@.service"
    ))
    .unwrap();
    std::fs::write(
        &unit,
        template.replace("/usr/local/bin/tern", "/opt/tern/tern"),
    )
    .unwrap();
    let etc = dir.path("etc-tern");
    std::fs::create_dir_all(&etc).unwrap();
    // A guest that counts for a minute, and 1 s to power off when asked (it does not).
    std::fs::write(
        etc.join("probe.toml"),
        "kernel = \"/opt/tern/probe\"\nmemory = \"64M\"\nserial = \"stdio\"\n\
         shutdown_timeout = 1\ncmdline = \"probe.run=count probe.count_ms=60000\"\n",
    )
    .unwrap();
    let name = format!("tern-test-{}", std::process::id());
    let c = Container::boot(
        &name,
        &[
            format!("{}:/opt/tern/tern", s(&tern())),
            format!("{}:/opt/tern/probe", s(&probe())),
            format!("{}:/etc/tern", s(&etc)),
            format!("{}:/etc/systemd/system/tern@.service", s(&unit)),
            // The unit wants network-online.target; with no network of its own to wait for,
            // the container would wait two minutes for it (masked).
            "/dev/null:/etc/systemd/system/systemd-networkd-wait-online.service".to_string(),
        ],
        dir.path("console.txt"),
    );

    // Type=notify: start returns once tern says the VM runs.
    c.ok(&["systemctl", "start", "tern@probe"]);
    assert_eq!(property(&c, "tern@probe", "ActiveState"), "active");
    assert_eq!(property(&c, "tern@probe", "StatusText"), "the VM runs");
    let leader = property(&c, "tern@probe", "MainPID");

    // machined has the VM, led by tern, filed under its unit.
    let list = c.ok(&["machinectl", "list", "--no-legend"]);
    let row: Vec<&str> = list
        .lines()
        .find(|l| l.starts_with("probe "))
        .unwrap_or_else(|| panic!("machinectl list: {list}"))
        .split_whitespace()
        .collect();
    assert_eq!(&row[..3], &["probe", "vm", "tern"], "{list}");
    let show = c.ok(&["machinectl", "show", "probe"]);
    for want in [
        format!("Leader={leader}"),
        "Unit=tern@probe.service".to_string(),
        "Class=vm".to_string(),
        "Service=tern".to_string(),
    ] {
        assert!(show.lines().any(|l| l == want), "no {want} in {show}");
    }

    // The journal has the guest's console at info and tern's own lines at their priority.
    let t0 = Instant::now();
    while !c
        .ok(&["journalctl", "-u", "tern@probe", "-o", "cat"])
        .contains("probe: count tick=")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no ticks in the journal"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // systemctl stop: SIGTERM presses the power button; the guest ignores it and tern stops
    // it after the file's 1 s. The machine goes with it.
    c.ok(&["systemctl", "stop", "tern@probe"]);
    assert_eq!(property(&c, "tern@probe", "ActiveState"), "inactive");
    assert_eq!(property(&c, "tern@probe", "Result"), "success");
    // machined lets go of it once systemd tells it the unit stopped.
    let t0 = Instant::now();
    loop {
        let list = c.ok(&["machinectl", "list", "--no-legend"]);
        if !list.contains("probe") {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{list}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let notices = c.ok(&[
        "journalctl",
        "-u",
        "tern@probe",
        "-p",
        "notice",
        "-o",
        "cat",
    ]);
    assert!(
        notices.contains("did not power off within 1 s"),
        "tern's notice is not filed as one: {notices}"
    );
    assert!(
        !notices.contains("probe: count tick="),
        "the guest's console is filed above info: {notices}"
    );
    drop(c);
}
