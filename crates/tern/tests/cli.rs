//! End-to-end tests of `tern run` with tiny hand-assembled guests and bad input: exit codes,
//! the debug-exit and reset paths, signals, and one clear line for every user mistake.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;

/// A minimal ELF64 with one PT_LOAD of `code` at 1 MiB and a PVH note pointing at it. The code
/// runs in 32-bit protected mode (PVH) or 64-bit mode (`--boot-protocol linux`); the snippets
/// below use only instructions that encode the same way in both.
fn tiny_guest(name: &str, code: &[u8]) -> PathBuf {
    let paddr: u64 = 0x10_0000;
    let mut note = Vec::new();
    for v in [4u32, 4, 18] {
        note.extend_from_slice(&v.to_le_bytes());
    }
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&(paddr as u32).to_le_bytes());
    let data_off = 64 + 2 * 56;
    let note_off = data_off + code.len() as u64;
    let mut f = vec![0u8; 64];
    f[0..4].copy_from_slice(b"\x7fELF");
    f[4] = 2;
    f[5] = 1;
    f[6] = 1;
    f[16..18].copy_from_slice(&2u16.to_le_bytes());
    f[18..20].copy_from_slice(&62u16.to_le_bytes());
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[0x18..0x20].copy_from_slice(&paddr.to_le_bytes());
    f[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
    f[0x34..0x36].copy_from_slice(&64u16.to_le_bytes());
    f[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
    f[0x38..0x3a].copy_from_slice(&2u16.to_le_bytes());
    let ph = |ty: u32, off: u64, addr: u64, sz: u64| {
        let mut p = vec![0u8; 56];
        p[0..4].copy_from_slice(&ty.to_le_bytes());
        p[4..8].copy_from_slice(&5u32.to_le_bytes());
        p[8..16].copy_from_slice(&off.to_le_bytes());
        p[16..24].copy_from_slice(&addr.to_le_bytes());
        p[24..32].copy_from_slice(&addr.to_le_bytes());
        p[32..40].copy_from_slice(&sz.to_le_bytes());
        p[40..48].copy_from_slice(&sz.to_le_bytes());
        p
    };
    f.extend(ph(1, data_off, paddr, code.len() as u64));
    f.extend(ph(4, note_off, 0, note.len() as u64));
    f.extend_from_slice(code);
    f.extend_from_slice(&note);
    let dir = std::env::temp_dir().join(format!("tern-cli-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, f).unwrap();
    p
}

/// mov dx, 0x3f8; then `out dx, al` for each byte.
fn print(s: &[u8]) -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03];
    for b in s {
        c.extend_from_slice(&[0xb0, *b, 0xee]);
    }
    c
}

/// mov al, status; out 0xf4, al; cli; hlt; jmp back to hlt.
fn debug_exit(status: u8) -> Vec<u8> {
    vec![0xb0, status, 0xe6, 0xf4, 0xfa, 0xf4, 0xeb, 0xfd]
}

/// i8042 reset pulse: mov al, 0xfe; out 0x64, al; cli; hlt loop.
fn kbd_reset() -> Vec<u8> {
    vec![0xb0, 0xfe, 0xe6, 0x64, 0xfa, 0xf4, 0xeb, 0xfd]
}

fn s(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

const T: Duration = Duration::from_secs(20);

fn one_line_error(r: &Run, needle: &str) {
    assert_eq!(r.code, Some(1), "expected exit 1; stderr: {}", r.stderr);
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {:?}", lines);
    assert!(lines[0].starts_with("tern: "), "{}", lines[0]);
    assert!(
        lines[0].contains(needle),
        "'{}' does not mention '{needle}'",
        lines[0]
    );
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
}

#[test]
fn debug_exit_status_becomes_exit_code_on_both_entries() {
    if !require_kvm("debug_exit_status_becomes_exit_code_on_both_entries") {
        return;
    }
    let mut code = print(b"hello from tern\n");
    code.extend(debug_exit(7));
    let k = tiny_guest("exit7.elf", &code);
    for proto in ["auto", "pvh", "linux"] {
        let r = tern_run(
            &[
                "--kernel",
                s(&k),
                "--memory",
                "32M",
                "--boot-protocol",
                proto,
            ],
            T,
        );
        assert_eq!(r.code, Some(7), "{proto}: {}", r.stderr);
        assert_eq!(r.stdout, "hello from tern\n", "{proto}");
    }
}

/// A port and an address nobody answers read as all ones, as on a PC (firmware takes that as
/// "no device": OVMF's TPM probe at 0xfed40000 gives up at once instead of timing out).
#[test]
fn unclaimed_reads_float_high() {
    if !require_kvm("unclaimed_reads_float_high") {
        return;
    }
    let code = [
        0xe4, 0x99, // in al, 0x99
        0x88, 0xc3, // mov bl, al
        0xa0, 0x00, 0x00, 0xd4, 0xfe, // mov al, [0xfed40000]
        0x20, 0xd8, // and al, bl
        0xe6, 0xf4, // out 0xf4, al: the exit status
        0xfa, 0xf4, 0xeb, 0xfd, // cli; hlt forever
    ];
    let k = tiny_guest("unclaimed.elf", &code);
    let r = tern_run(
        &[
            "--kernel",
            s(&k),
            "--memory",
            "32M",
            "--boot-protocol",
            "pvh",
        ],
        T,
    );
    assert_eq!(r.code, Some(0xff), "{}", r.stderr);
}

#[test]
fn serial_to_file_and_none() {
    if !require_kvm("serial_to_file_and_none") {
        return;
    }
    let mut code = print(b"to a file\n");
    code.extend(debug_exit(0));
    let k = tiny_guest("file.elf", &code);
    let out = std::env::temp_dir().join(format!("tern-serial-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&out);
    let spec = format!("file:{}", out.display());
    let r = tern_run(
        &["--kernel", s(&k), "--memory", "32M", "--serial", &spec],
        T,
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.stdout, "");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "to a file\n");
    let r = tern_run(
        &["--kernel", s(&k), "--memory", "32M", "--serial", "none"],
        T,
    );
    assert_eq!(r.code, Some(0));
    assert_eq!(r.stdout, "");
    let _ = std::fs::remove_file(&out);
}

#[test]
fn guest_reset_exits_zero_and_restart_reboots() {
    if !require_kvm("guest_reset_exits_zero_and_restart_reboots") {
        return;
    }
    let mut code = print(b"boot\n");
    code.extend(kbd_reset());
    let k = tiny_guest("reset.elf", &code);
    let r = tern_run(&["--kernel", s(&k), "--memory", "32M", "--cpus", "2"], T);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(r.stdout, "boot\n");
    // With --on-reboot restart the VM boots again and again until stopped.
    let r = tern_run(
        &[
            "--kernel",
            s(&k),
            "--memory",
            "32M",
            "--on-reboot",
            "restart",
        ],
        Duration::from_secs(2),
    );
    assert!(r.timed_out);
    assert!(r.stdout.matches("boot\n").count() >= 3, "{}", r.stdout);
}

/// Guest code starting with `prefix` (at 1 MiB) and then triple-faulting (PVH, 32-bit): load
/// an IDT with limit 0, then raise an exception: #UD -> #DF -> triple fault. The empty IDT
/// descriptor lives in the code itself (6 zero bytes after the jump).
fn then_triple_fault(prefix: Vec<u8>) -> Vec<u8> {
    let mut code = prefix;
    // lidt [abs 0x100000 + offset]: 0f 01 1d <disp32> in 32-bit mode.
    let idt_at = 0x10_0000u32 + code.len() as u32 + 3 + 4 + 2 + 2;
    code.extend_from_slice(&[0x0f, 0x01, 0x1d]);
    code.extend_from_slice(&idt_at.to_le_bytes());
    code.extend_from_slice(&[0x0f, 0x0b]); // ud2
    code.extend_from_slice(&[0xeb, 0xfe]); // (not reached)
    code.extend_from_slice(&[0u8; 6]);
    code
}

#[test]
fn a_reset_followed_by_a_triple_fault_is_a_reset() {
    if !require_kvm("a_reset_followed_by_a_triple_fault_is_a_reset") {
        return;
    }
    // As Linux's emergency restart does: pulse the i8042 reset line, then fall through to a
    // triple fault. The reset came first, so this is a reboot, never a crash.
    let mut code = print(b"boot\n");
    code.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64]); // mov al, 0xfe; out 0x64, al
    let k = tiny_guest("reset-tf.elf", &then_triple_fault(code));
    for i in 0..20 {
        let r = tern_run(&["--kernel", s(&k), "--memory", "32M"], T);
        assert_eq!(r.code, Some(0), "run {i}: {}", r.stderr);
        assert_eq!(r.stdout, "boot\n", "run {i}");
        assert!(!r.stderr.contains("triple fault"), "run {i}: {}", r.stderr);
    }
    // With --on-reboot restart it reboots again and again until stopped.
    let r = tern_run(
        &[
            "--kernel",
            s(&k),
            "--memory",
            "32M",
            "--on-reboot",
            "restart",
        ],
        Duration::from_secs(3),
    );
    assert!(r.timed_out, "tern ended ({:?}): {}", r.code, r.stderr);
    assert!(r.stdout.matches("boot\n").count() >= 3, "{}", r.stdout);
    assert!(!r.stderr.contains("triple fault"), "{}", r.stderr);
}

#[test]
fn triple_fault_is_a_clear_nonzero_exit() {
    if !require_kvm("triple_fault_is_a_clear_nonzero_exit") {
        return;
    }
    let k = tiny_guest("tf.elf", &then_triple_fault(Vec::new()));
    let r = tern_run(&["--kernel", s(&k), "--memory", "32M"], T);
    assert_eq!(r.code, Some(3), "stderr: {}", r.stderr);
    assert!(
        r.stderr.contains("triple fault") || r.stderr.contains("internal error"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("rip="), "{}", r.stderr);
}

#[test]
fn sigint_stops_a_running_vm_at_once() {
    if !require_kvm("sigint_stops_a_running_vm_at_once") {
        return;
    }
    let mut code = print(b"up\n");
    code.extend_from_slice(&[0xfa, 0xf4, 0xeb, 0xfd]); // cli; hlt forever
    let k = tiny_guest("idle.elf", &code);
    let child = std::process::Command::new(tern())
        .args(["run", "--kernel", s(&k), "--memory", "32M", "--cpus", "3"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: sending SIGINT to our own child process.
    unsafe { libc_kill(child.id() as i32, 2) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "up\n");
    assert!(err.contains("stopped by signal 2"), "{err}");
}

#[test]
fn sigterm_presses_the_power_button_then_stops_on_timeout_or_a_second_sigterm() {
    if !require_kvm("sigterm_presses_the_power_button_then_stops_on_timeout_or_a_second_sigterm") {
        return;
    }
    // This guest ignores the power button.
    let mut code = print(b"up\n");
    code.extend_from_slice(&[0xfa, 0xf4, 0xeb, 0xfd]);
    let k = tiny_guest("deaf.elf", &code);
    let spawn_with = |timeout: &str| {
        std::process::Command::new(tern())
            .args([
                "run",
                "--kernel",
                s(&k),
                "--memory",
                "32M",
                "--shutdown-timeout",
                timeout,
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let spawn = || spawn_with("1");
    // One SIGTERM: the button is pressed, the guest ignores it, tern stops it after 1 s.
    let child = spawn();
    std::thread::sleep(Duration::from_millis(300));
    let t = std::time::Instant::now();
    // SAFETY: signalling our own child process.
    unsafe { libc_kill(child.id() as i32, 15) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("pressed the power button"), "{err}");
    assert!(err.contains("did not power off within 1 s"), "{err}");
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "stopped before the timeout"
    );
    // Two SIGTERMs: the second stops it at once.
    let child = spawn();
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: as above.
    unsafe { libc_kill(child.id() as i32, 15) };
    std::thread::sleep(Duration::from_millis(100));
    // SAFETY: as above.
    unsafe { libc_kill(child.id() as i32, 15) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("stopped by signal 15"), "{err}");
    // --shutdown-timeout 0: the first SIGTERM stops it at once, pressing nothing.
    let child = spawn_with("0");
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: as above.
    unsafe { libc_kill(child.id() as i32, 15) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("stopped by signal 15"), "{err}");
    assert!(!err.contains("power button"), "{err}");
    // --shutdown-timeout 0 and the power button pressed through the API: the guest keeps all
    // the time it takes (tern does not stop it), and SIGTERM still stops it at once.
    let dir = Scratch::new("shutdown-0");
    let sock = dir.path("api.sock");
    let child = std::process::Command::new(tern())
        .args([
            "run",
            "--kernel",
            s(&k),
            "--memory",
            "32M",
            "--shutdown-timeout",
            "0",
            "--api-socket",
            s(&sock),
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the API socket", Duration::from_secs(10), || sock.exists());
    let r = run_with_timeout(
        &tern(),
        &["shutdown", "--api-socket", s(&sock)],
        Duration::from_secs(10),
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let mut child = Tern(child);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        child.running(),
        "tern stopped the guest after the API's button press"
    );
    // SAFETY: as above.
    unsafe { libc_kill(child.0.id() as i32, 15) };
    let (code, err) = child.finish(Duration::from_secs(5));
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("stopped by signal 15"), "{err}");
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

#[test]
fn bad_input_gets_one_clear_line() {
    let k = tiny_guest("ok.elf", &debug_exit(0));
    one_line_error(
        &tern_run(&["--kernel", "/nonexistent/vmlinuz"], T),
        "cannot read kernel /nonexistent/vmlinuz",
    );
    one_line_error(
        &tern_run(&["--kernel", s(&k), "--cpus", "0"], T),
        "invalid cpus '0'",
    );
    one_line_error(
        &tern_run(&["--kernel", s(&k), "--cpus", "255"], T),
        "invalid cpus '255'",
    );
    one_line_error(
        &tern_run(&["--kernel", s(&k), "--memory", "8M"], T),
        "invalid memory '8M'",
    );
    one_line_error(
        &tern_run(&["--kernel", s(&k), "--initrd", "/nonexistent/initrd"], T),
        "cannot read initrd",
    );
    one_line_error(&tern_run(&[], T), "missing kernel");
    // Over 64 KiB with a multi-byte character across byte 32 (its excerpt once panicked).
    let long = format!("{}é{}", "a".repeat(31), "b".repeat(70_000));
    one_line_error(
        &tern_run(&["--kernel", s(&k), "--cmdline", &long], T),
        "invalid cmdline 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa...': is 70033 bytes",
    );
    one_line_error(
        &tern_run(
            &[
                "--kernel",
                s(&k),
                "--shutdown-timeout",
                "18446744073709551615",
            ],
            T,
        ),
        "invalid shutdown_timeout '18446744073709551615': must be at most 86400 seconds",
    );
    let cfg = std::env::temp_dir().join(format!("tern-bad-{}.toml", std::process::id()));
    std::fs::write(&cfg, "kernel = \"/k\"\nvcpus = 2\n").unwrap();
    one_line_error(&tern_run(&["--config", s(&cfg)], T), "vcpus");
    let _ = std::fs::remove_file(&cfg);
    // Flag syntax errors come from the argument parser with status 2.
    let r = tern_run(&["--kernel", s(&k), "--memory", "lots"], T);
    assert_eq!(r.code, Some(2));
    assert!(r.stderr.contains("--memory"), "{}", r.stderr);
    let r = tern_run(&["--kernel", s(&k), "--serial", "tcp:1"], T);
    assert_eq!(r.code, Some(2));
    // A vCPU cgroup descriptor (tern jail passes them) that is not open: one line, status 2.
    let r = tern_run(&["--kernel", s(&k), "--vcpu-cgroup-fd", "99"], T);
    assert_eq!(r.code, Some(2), "{}", r.stderr);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stderr
            .starts_with("tern: --vcpu-cgroup-fd 99: not an open descriptor"),
        "{}",
        r.stderr
    );
}

#[test]
fn bad_kernels_and_sizes_get_one_clear_line() {
    if !require_kvm("bad_kernels_and_sizes_get_one_clear_line") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("tern-badk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let w = |name: &str, data: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        p
    };
    let empty = w("empty", b"");
    one_line_error(&tern_run(&["--kernel", s(&empty)], T), "truncated");
    let text = w("text", &b"#!/bin/sh\necho not a kernel\n".repeat(100));
    one_line_error(
        &tern_run(&["--kernel", s(&text)], T),
        "neither an ELF vmlinux nor a bzImage",
    );
    // A truncated ELF: the header promises a segment the file does not contain.
    let mut code = print(b"x");
    code.extend(debug_exit(0));
    let good = std::fs::read(tiny_guest("trunc-src.elf", &code)).unwrap();
    let trunc = w("trunc.elf", &good[..good.len() - 30]);
    one_line_error(
        &tern_run(&["--kernel", s(&trunc), "--memory", "32M"], T),
        "ELF",
    );
    // Kernel + initrd larger than memory.
    let big = w("big-initrd", &vec![0u8; 40 << 20]);
    one_line_error(
        &tern_run(
            &[
                "--kernel",
                s(&tiny_guest("ok2.elf", &code)),
                "--initrd",
                s(&big),
                "--memory",
                "32M",
            ],
            T,
        ),
        "do not fit",
    );
    // Overlong command line.
    let long = "x".repeat(70_000);
    one_line_error(
        &tern_run(
            &[
                "--kernel",
                s(&tiny_guest("ok3.elf", &code)),
                "--cmdline",
                &long,
            ],
            T,
        ),
        "cmdline",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn random_bytes_as_kernel_never_panic() {
    if !require_kvm("random_bytes_as_kernel_never_panic") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("tern-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..60 {
        let len = (next() % 20_000) as usize;
        let mut v: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        // Give a third of them an ELF header and a third a bzImage magic to get past sniffing.
        if i % 3 == 0 && v.len() >= 64 {
            v[0..4].copy_from_slice(b"\x7fELF");
            v[4] = 2;
            v[5] = 1;
            v[0x36] = 56;
            v[0x37] = 0;
        } else if i % 3 == 1 && v.len() >= 0x1000 {
            v[0x202..0x206].copy_from_slice(b"HdrS");
            v[0x206] = 0x0f;
            v[0x207] = 0x02;
            v[0x236] |= 1;
        }
        let p = dir.join(format!("k{i}"));
        std::fs::write(&p, &v).unwrap();
        let r = tern_run(
            &["--kernel", s(&p), "--memory", "32M"],
            Duration::from_secs(5),
        );
        assert!(!r.stderr.contains("panicked"), "input {i}: {}", r.stderr);
        assert!(
            r.code.is_some(),
            "input {i} killed by a signal or hung (timed out: {})",
            r.timed_out
        );
        // Either rejected with one line, or booted garbage that crashed/exited cleanly.
        if r.code == Some(1) {
            assert_eq!(r.stderr.lines().count(), 1, "input {i}: {}", r.stderr);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
