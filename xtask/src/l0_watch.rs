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
//! enabled; Shift alone types nothing). Each nudge is reported as a stall, with whether the
//! dump showed the lost interrupt (a vector pending in the local APIC's IRR, nothing in
//! service) and when L1 spoke again, measured from the moment the key press was written (a
//! line stamped before it means L1 came back by itself). An L1 that stays silent is still a
//! freeze, as before. In the first CI pass with the nudge (46 runs), every stall's dump showed
//! the timer's vector 0xec pending in IRR with the timer expired.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Silence after which the rig nudges L1 (the agent's heartbeat comes every 2 s). Short,
/// because everything in L1 waits while it stalls (a guest's ping timed out in a 15 s stall).
/// A nudge L1 did not need costs a key press and a report line; it does not make a failed run
/// run again unless the dump showed the lost interrupt and L1 woke right after the key.
pub const NUDGE_AFTER: Duration = Duration::from_secs(6);

/// L1 speaking within this long after the key press counts as woken by it.
pub const WAKE_WINDOW: f64 = 1.0;

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

/// What [`save_diagnostics`] found.
pub struct Diagnostics {
    /// Where they were written.
    pub path: Option<PathBuf>,
    /// The local APIC had a vector pending in IRR and none in service: the lost interrupt.
    pub lost_interrupt: bool,
}

/// True if a monitor transcript's `info lapic` shows a vector pending in IRR and nothing in
/// service (its `IRR` and `ISR` lines; the IO-APIC's are indented and not these).
pub fn lost_interrupt(transcript: &str) -> bool {
    let field = |name: &str| {
        transcript
            .lines()
            .map(|l| l.trim_end_matches('\r'))
            .find_map(|l| l.strip_prefix(name).filter(|_| !l.starts_with(' ')))
            .map(str::trim)
    };
    let pending =
        field("IRR\t").is_some_and(|v| v.split_whitespace().any(|w| w.parse::<u8>().is_ok()));
    pending && field("ISR\t") == Some("(none)")
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
) -> Diagnostics {
    let mut text = String::new();
    let mut lost = false;
    if let Some(m) = monitor(
        monitor_sock,
        "info status\ninfo registers\ninfo lapic\ninfo pic\ninfo irq\n",
    ) {
        lost = lost_interrupt(&m);
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
    let written = !text.is_empty() && std::fs::write(&path, text).is_ok();
    Diagnostics {
        path: written.then_some(path),
        lost_interrupt: lost,
    }
}

/// Presses and releases Shift on L1's keyboard. Returns when the command was written, or None
/// if the monitor could not be reached (whether QEMU then ran it is not checked).
pub fn nudge(monitor_sock: &Path) -> Option<Instant> {
    let mut stream = std::os::unix::net::UnixStream::connect(monitor_sock).ok()?;
    let at = Instant::now();
    stream.write_all(b"sendkey shift\n").ok()?;
    // Let the monitor read the command before the connection closes.
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = [0u8; 4096];
    let _ = stream.read(&mut buf);
    Some(at)
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
    /// False if the monitor could not be reached to send the key press.
    pub sent: bool,
    /// The dump showed the lost interrupt ([`lost_interrupt`]).
    pub lost_interrupt: bool,
    /// Seconds from writing the key press to L1's next line, as stamped when it arrived
    /// (negative: L1 spoke before the key press, while the dump was taken); `None` if L1 never
    /// spoke again.
    pub woke_after_secs: Option<f64>,
    pub diagnostics: Option<PathBuf>,
}

impl Stall {
    /// L1 spoke again within [`WAKE_WINDOW`] after the key press.
    pub fn woken_by_key(&self) -> bool {
        self.woke_after_secs
            .is_some_and(|w| (0.0..=WAKE_WINDOW).contains(&w))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_interrupt_is_read_from_the_lapic_lines() {
        // As the monitor prints them (the IO-APIC's lines are indented).
        let lost = "ESR\t 0x00000000\r\nISR\t (none)\r\nIRR\t 236 \r\n  IRR      (none)\r\n";
        assert!(lost_interrupt(lost));
        assert!(!lost_interrupt("ISR\t 236 \nIRR\t 236 \n"));
        assert!(!lost_interrupt(
            "ISR\t (none)\nIRR\t (none)\n  IRR      34\n"
        ));
        assert!(!lost_interrupt(""));
    }
}
