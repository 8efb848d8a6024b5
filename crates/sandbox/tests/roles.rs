//! Each role's filter, applied for real: a child process (this test binary run again) confines
//! itself the way `tern run` does, starts a thread of the role, makes one call its list allows
//! and one it does not, and must be stopped at the second with the line naming the thread, its
//! role and the call.

use std::process::Command;

use lifecycle::threads::{spawn, Device, Role};
use sandbox::seccomp::{install, Mode};

const CHILD_ROLE: &str = "SANDBOX_TEST_ROLE";
const CHILD_MODE: &str = "SANDBOX_TEST_MODE";

fn role_named(name: &str) -> Role {
    *sandbox::seccomp::ROLES
        .iter()
        .find(|r| r.name() == name)
        .unwrap_or_else(|| panic!("no role {name}"))
}

/// A call no thread of tern makes: a packet socket.
fn forbidden_call() -> i64 {
    // SAFETY: socket(2) with constant arguments; the descriptor, if any, is leaked on purpose
    // (the process ends right after).
    i64::from(unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) })
}

/// Runs in the child: confine, then make the forbidden call in a thread of `role`.
fn child(role: &str, mode: &str) {
    let mode: Mode = mode.parse().unwrap();
    install(mode, None).unwrap();
    let role = role_named(role);
    let body = move || {
        // Allowed everywhere.
        // SAFETY: getpid has no arguments and cannot fail.
        assert!(unsafe { libc::getpid() } > 0);
        println!("allowed call made");
        let r = forbidden_call();
        println!("forbidden call returned {r}");
    };
    if role == Role::Vmm {
        body();
    } else {
        spawn(role, "tern-test", body).unwrap().join().unwrap();
    }
    println!("child done");
}

fn run_child(role: &str, mode: &str) -> (Option<i32>, String, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_entry", "--nocapture", "--test-threads=1"])
        .env(CHILD_ROLE, role)
        .env(CHILD_MODE, mode)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn child_entry() {
    if let (Ok(role), Ok(mode)) = (std::env::var(CHILD_ROLE), std::env::var(CHILD_MODE)) {
        child(&role, &mode);
    }
}

#[test]
fn every_role_stops_a_call_outside_its_list_with_a_line_naming_it() {
    for role in sandbox::seccomp::ROLES
        .iter()
        .filter(|r| **r != Role::Spawner)
    {
        let name = role.name();
        let (code, stdout, stderr) = run_child(name, "on");
        assert_eq!(code, Some(159), "role {name}: {stdout}\n{stderr}");
        assert!(
            stdout.contains("allowed call made"),
            "role {name}: {stdout}"
        );
        assert!(
            !stdout.contains("forbidden call returned"),
            "role {name}: {stdout}"
        );
        let thread = if *role == Role::Vmm {
            "tern-main"
        } else {
            "tern-test"
        };
        let line = format!(
            "tern: seccomp: thread {thread} ({name}) made system call socket (41), which its \
             filter does not allow; stopping tern"
        );
        assert!(stderr.contains(&line), "role {name}: {stderr}");
    }
}

#[test]
fn log_mode_lets_the_call_through() {
    let (code, stdout, stderr) = run_child("vcpu", "log");
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("forbidden call returned"), "{stdout}");
    assert!(!stderr.contains("seccomp:"), "{stderr}");
}

#[test]
fn a_role_cannot_start_threads_of_its_own() {
    // Threads come from the spawner; a thread calling clone3/clone itself gets EPERM.
    if std::env::var(CHILD_ROLE).is_ok() {
        return;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "clone_child", "--nocapture", "--test-threads=1"])
        .env("SANDBOX_TEST_CLONE", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("own thread refused: Operation not permitted"),
        "{stdout}"
    );
    assert!(stdout.contains("spawned thread ran"), "{stdout}");
}

#[test]
fn clone_child() {
    if std::env::var("SANDBOX_TEST_CLONE").is_err() {
        return;
    }
    install(Mode::On, None).unwrap();
    spawn(Role::DeviceWorker(Device::Net), "tern-test", || {
        // Bypasses lifecycle::threads::spawn on purpose.
        match std::thread::Builder::new().spawn(|| ()) {
            Ok(_) => println!("own thread started"),
            Err(e) => println!("own thread refused: {e}"),
        }
        // Through the spawner it works.
        spawn(Role::DeviceWorker(Device::Net), "tern-test2", || {
            println!("spawned thread ran")
        })
        .unwrap()
        .join()
        .unwrap();
    })
    .unwrap()
    .join()
    .unwrap();
}

const STOP_CHILD: &str = "SANDBOX_TEST_STOP";

/// A stopped and continued tern (job control: Ctrl-Z and `fg`, `kill -STOP` and `-CONT`, a
/// debugger attaching) must go on: a thread stopped in a timed wait (a sleep, a condition
/// variable with a timeout) resumes it through `restart_syscall`, which every role allows.
#[test]
fn every_role_survives_being_stopped_in_a_timed_wait() {
    if std::env::var(CHILD_ROLE).is_ok() || std::env::var(STOP_CHILD).is_ok() {
        return;
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "stop_child", "--nocapture", "--test-threads=1"])
        .env(STOP_CHILD, "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("all waiting") {
        line.clear();
        assert!(
            std::io::BufRead::read_line(&mut out, &mut line).unwrap() > 0,
            "the child ended before its threads waited"
        );
    }
    // Every thread is in its wait by now (they wait 2 s from before the line).
    std::thread::sleep(std::time::Duration::from_millis(300));
    let pid = child.id() as i32;
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    unsafe {
        assert_eq!(libc::kill(pid, libc::SIGSTOP), 0);
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    // SAFETY: as above.
    unsafe {
        assert_eq!(libc::kill(pid, libc::SIGCONT), 0);
    }
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(status.success(), "{status}: {rest}\n{err}");
    assert!(rest.contains("child done"), "{rest}\n{err}");
}

#[test]
fn stop_child() {
    if std::env::var(STOP_CHILD).is_err() {
        return;
    }
    install(Mode::On, None).unwrap();
    let wait = || {
        // A sleep, and a condition variable's timed wait (a futex with a timeout).
        std::thread::sleep(std::time::Duration::from_secs(1));
        let (m, cv) = (std::sync::Mutex::new(()), std::sync::Condvar::new());
        let g = m.lock().unwrap();
        drop(
            cv.wait_timeout(g, std::time::Duration::from_secs(1))
                .unwrap(),
        );
    };
    let threads: Vec<_> = sandbox::seccomp::ROLES
        .iter()
        .filter(|r| !matches!(r, Role::Vmm | Role::Spawner))
        .map(|r| spawn(*r, "tern-test", wait).unwrap())
        .collect();
    println!("all waiting");
    wait();
    for t in threads {
        t.join().unwrap();
    }
    println!("child done");
}
