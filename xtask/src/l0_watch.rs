//! Watching the L0 emulator while L1 runs: its CPU time, its monitor's view of L1, and the key
//! press that wakes an L1 whose interrupt the emulator lost.
//!
//! QEMU's TCG sets the L1 vCPU's interrupt-request bits from two threads. The main loop raises
//! them under the global lock when a device or L1's local APIC timer fires. The vCPU thread
//! itself ORs in the SVM virtual-interrupt bit at VMRUN, without that lock, whenever L1's KVM
//! enters L2 with `V_IRQ` set (its interrupt-window request). When both happen at once, one
//! read-modify-write can undo the other, and the APIC's request is lost. The APIC still holds
//! the vector in IRR, but nothing asks the vCPU to look at it again until the APIC changes. An
//! L1 waiting for its next timer tick then halts for good: that is the freeze the rig's
//! diagnostics show (HLT, IF=1, the one-shot timer expired, vector 0xec pending in IRR, nothing
//! in service).
//!
//! Any new interrupt into L1 makes the APIC re-evaluate, and the lost request comes back. After
//! [`NUDGE_AFTER`] of silence the rig therefore saves the monitor's view of L1 and sends L1 a
//! Shift key press through the monitor (i8042, IRQ 1: the L1 kernel's keyboard driver keeps it
//! enabled; Shift alone types nothing). Each nudge is reported as a stall, with how soon L1
//! spoke again. An L1 that stays silent is still a freeze, as before. In the first CI pass with
//! the nudge, L1 stalled three times in 46 runs, each time with the timer's vector 0xec pending
//! in IRR, and each time spoke again within 0.1 s of the key press.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Silence after which the rig nudges L1 (the agent's heartbeat comes every 2 s). Short,
/// because everything in L1 waits while it stalls (a guest's ping timed out in a 15 s stall);
/// a nudge L1 did not need costs nothing but the key press.
pub const NUDGE_AFTER: Duration = Duration::from_secs(6);

/// CPU time (user + system) a process has used, from `/proc/PID/stat`.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf(3) only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(ticks as f64 / if hz > 0 { hz as f64 } else { 100.0 })
}

/// Sends `commands` (newline-terminated) to the L0 monitor; returns what it answered.
pub fn monitor(sock: &Path, commands: &str) -> Option<String> {
    let mut stream = std::os::unix::net::UnixStream::connect(sock).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .ok()?;
    stream.write_all(commands.as_bytes()).ok()?;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if !out.is_empty() {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// What the L0 emulator is doing: its monitor's view of L1's CPU and, with `threads` and gdb
/// installed, the emulator's threads (a vCPU thread waiting on its condition variable means L1
/// halted and no interrupt woke it; one waiting on a lock means the emulator deadlocked; gdb
/// stops the emulator for a second or two). Written to `path`.
pub fn save_diagnostics(
    monitor_sock: &Path,
    pid: u32,
    threads: bool,
    path: PathBuf,
) -> Option<PathBuf> {
    let mut text = String::new();
    if let Some(m) = monitor(
        monitor_sock,
        "info status\ninfo registers\ninfo lapic\ninfo pic\ninfo irq\n",
    ) {
        text.push_str("== L0 monitor\n");
        text.push_str(&m);
        text.push('\n');
    }
    if let Some(gdb) = crate::util::which("gdb").filter(|_| threads) {
        let out = Command::new(gdb)
            .args(["-batch", "-nx", "-p"])
            .arg(pid.to_string())
            .args(["-ex", "thread apply all bt"])
            .stdin(Stdio::null())
            .output();
        if let Ok(out) = out {
            text.push_str("== L0 threads (gdb)\n");
            text.push_str(&String::from_utf8_lossy(&out.stdout));
        }
    }
    if text.is_empty() {
        return None;
    }
    std::fs::write(&path, text).ok()?;
    Some(path)
}

/// Presses and releases Shift on L1's keyboard. Returns false if the monitor did not answer.
pub fn nudge(monitor_sock: &Path) -> bool {
    monitor(monitor_sock, "sendkey shift\n").is_some()
}

/// One stall: L1 was silent for [`NUDGE_AFTER`], the rig saved diagnostics and nudged it.
#[derive(Debug, Clone)]
pub struct Stall {
    /// The run L1 was busy with (or `(between runs)`), and its VMM.
    pub run: String,
    pub vmm: Option<crate::scenarios::Vmm>,
    pub l1_boot: usize,
    /// Seconds into the run when L1 was last heard from.
    pub last_heard_secs: f64,
    /// CPU seconds the L0 emulator used during the silence, up to the nudge.
    pub l0_cpu_secs: Option<f64>,
    /// False if the monitor did not take the key press.
    pub sent: bool,
    /// Seconds from the nudge to L1's next line; `None` if L1 never spoke again (it froze).
    pub woke_after_secs: Option<f64>,
    pub diagnostics: Option<PathBuf>,
}
