//! The peers' steps in `cargo xtask bench-snapshot`: Firecracker and Cloud Hypervisor boot the
//! same probe guest, snapshot it through their own APIs and restore it, in the same runs as
//! tern and QEMU. Their figures fill the rows tern's do ([`super::bench_snapshot`]); a step a
//! peer has no equivalent of stays NaN ("-" in the table).
//!
//! - Firecracker (API socket, serial console on stdout): `PATCH /vm {"state": "Paused"}` +
//!   `PUT /snapshot/create` (Full; a state file and a memory file). Restore: `PUT
//!   /snapshot/load` with the `File` memory backend and `resume_vm` on a Firecracker already
//!   serving its API. Its memory file is mapped private and faulted in as the guest touches it,
//!   so it fills the lazy rows; it has no eager restore and no restore on its command line, so
//!   its "CLI" rows are from process start through its API socket and the same load.
//! - Cloud Hypervisor (`--api-socket`, `--serial tty` on stdout): `PUT /api/v1/vm.pause` +
//!   `PUT /api/v1/vm.snapshot` (a directory). Restore: `PUT /api/v1/vm.restore` with
//!   `resume: true` on an empty Cloud Hypervisor, `memory_restore_mode` `OnDemand`
//!   (userfaultfd) in the lazy rows and `Copy` in the eager ones; from its command line,
//!   `--restore source_url=…,memory_restore_mode=…,resume=true`.
//!
//! Every restore is checked as tern's are: the first tick continues the snapshot's counter.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::bench_peers::{probe_args, Kind, Peer, ProbeGuest};
use crate::bench_snapshot::{
    check_continues, cmdline, ms, path_str, sizes_mib, ticks, wait_booted, wait_first_tick, Proc,
    TernResult, STEP_TIMEOUT,
};

/// One request to a peer's API; its status must be 2xx.
fn call(sock: &Path, method: &str, path: &str, body: Option<&Value>) -> Result<()> {
    let body = body.map(Value::to_string);
    api::client::Client::new(sock)
        .with_timeout(Some(STEP_TIMEOUT))
        .send(method, path, body.as_deref())?;
    Ok(())
}

/// The path that answers 200 once a peer's API serves.
fn ping_path(kind: Kind) -> &'static str {
    match kind {
        Kind::Firecracker => "/",
        Kind::CloudHypervisor => "/api/v1/vmm.ping",
    }
}

/// Waits until the API of the peer process `p` answers on `sock`.
fn wait_api(p: &mut Proc, kind: Kind, sock: &Path) -> Result<()> {
    p.wait_for("the API socket", Duration::from_secs(30), || {
        api::client::Client::new(sock)
            .with_timeout(Some(Duration::from_secs(5)))
            .call("GET", ping_path(kind), None)
            .ok()
            .filter(|(st, _)| *st == 200)
    })
    .map(|_| ())
}

fn name(kind: Kind) -> &'static str {
    match kind {
        Kind::Firecracker => "Firecracker",
        Kind::CloudHypervisor => "Cloud Hypervisor",
    }
}

/// The snapshot's location: Firecracker's state and memory files, or Cloud Hypervisor's
/// directory, all in `dir/<peer>-snap`.
fn snap_dir(peer: &Peer, dir: &Path) -> std::path::PathBuf {
    dir.join(format!("{}-snap", peer.kind.short()))
}

/// Boots the probe under `peer` and snapshots it; the last tick before the snapshot.
fn create(peer: &Peer, probe: &Path, dir: &Path, size_mib: u64, r: &mut TernResult) -> Result<u64> {
    let k = peer.kind;
    let sock = dir.join(format!("{}-boot.sock", k.short()));
    let log = dir.join(format!("{}-boot.log", k.short()));
    let cmd = cmdline(size_mib);
    let g = ProbeGuest {
        kernel: probe,
        cmdline: &cmd,
        memory_mib: u32::try_from(size_mib).context("guest size")?,
        rng: false,
        disk: None,
        tap: None,
        api_socket: Some(&sock),
    };
    let args = probe_args(peer, &g, "snapshot")?;
    let err = dir.join(format!("{}-boot.err", k.short()));
    let mut vm = Proc::spawn_to(&peer.program, &args, name(k), &err, Some(&log))?;
    wait_api(&mut vm, k, &sock)?;
    wait_booted(&mut vm, &log)?;
    let snap = snap_dir(peer, dir);
    std::fs::create_dir_all(&snap)?;
    let t0 = Instant::now();
    match k {
        Kind::Firecracker => {
            call(&sock, "PATCH", "/vm", Some(&json!({ "state": "Paused" })))?;
            let body = json!({
                "snapshot_type": "Full",
                "snapshot_path": snap.join("vmstate"),
                "mem_file_path": snap.join("memory"),
            });
            call(&sock, "PUT", "/snapshot/create", Some(&body))?;
        }
        Kind::CloudHypervisor => {
            call(&sock, "PUT", "/api/v1/vm.pause", None)?;
            let body = json!({ "destination_url": format!("file://{}", path_str(&snap)?) });
            call(&sock, "PUT", "/api/v1/vm.snapshot", Some(&body))?;
        }
    }
    r.create_s = t0.elapsed().as_secs_f64();
    let last = ticks(&log).last().copied().unwrap_or(0);
    drop(vm);
    (r.apparent, r.du) = sizes_mib(&snap)?;
    Ok(last)
}

/// The restore request for `peer`'s API: (method, path, body).
fn restore_request(peer: &Peer, dir: &Path, lazy: bool) -> Result<(&'static str, Value)> {
    let snap = snap_dir(peer, dir);
    Ok(match peer.kind {
        Kind::Firecracker => (
            "/snapshot/load",
            json!({
                "snapshot_path": snap.join("vmstate"),
                "mem_backend": { "backend_type": "File", "backend_path": snap.join("memory") },
                "resume_vm": true,
            }),
        ),
        Kind::CloudHypervisor => (
            "/api/v1/vm.restore",
            json!({
                "source_url": format!("file://{}", path_str(&snap)?),
                "memory_restore_mode": if lazy { "OnDemand" } else { "Copy" },
                "resume": true,
            }),
        ),
    })
}

/// An empty peer already serving its API restores the snapshot: (request → answered,
/// request → first tick) in ms.
fn api_restore(peer: &Peer, dir: &Path, lazy: bool, last: u64) -> Result<(f64, f64)> {
    let k = peer.kind;
    let mode = if lazy { "lazy" } else { "eager" };
    let sock = dir.join(format!("{}-api-{mode}.sock", k.short()));
    let log = dir.join(format!("{}-api-{mode}.log", k.short()));
    let args = api_only_args(k, &sock);
    let err = dir.join(format!("{}-api-{mode}.err", k.short()));
    let mut vm = Proc::spawn_to(&peer.program, &args, name(k), &err, Some(&log))?;
    wait_api(&mut vm, k, &sock)?;
    let (path, body) = restore_request(peer, dir, lazy)?;
    let t0 = Instant::now();
    call(&sock, "PUT", path, Some(&body))?;
    let reply = t0.elapsed();
    let first = wait_first_tick(&mut vm, &log)?;
    let tick = t0.elapsed();
    check_continues(&format!("{} API restore ({mode})", name(k)), first, last)?;
    Ok((ms(reply), ms(tick)))
}

/// The command line of a peer with an API socket and no VM.
fn api_only_args(kind: Kind, sock: &Path) -> Vec<String> {
    match kind {
        Kind::Firecracker => vec![
            "--api-sock".into(),
            sock.display().to_string(),
            "--level".into(),
            "Error".into(),
        ],
        Kind::CloudHypervisor => vec!["--api-socket".into(), format!("path={}", sock.display())],
    }
}

/// From process start to the restored guest's first tick, ms: Cloud Hypervisor's `--restore`;
/// Firecracker's process start, API socket and load (it has no restore on its command line).
fn cold_restore(peer: &Peer, dir: &Path, lazy: bool, last: u64) -> Result<f64> {
    let k = peer.kind;
    let mode = if lazy { "lazy" } else { "eager" };
    let sock = dir.join(format!("{}-cold-{mode}.sock", k.short()));
    let log = dir.join(format!("{}-cold-{mode}.log", k.short()));
    let err = dir.join(format!("{}-cold-{mode}.err", k.short()));
    let mut args = api_only_args(k, &sock);
    if k == Kind::CloudHypervisor {
        args.extend([
            "--restore".into(),
            format!(
                "source_url=file://{},memory_restore_mode={},resume=true",
                path_str(&snap_dir(peer, dir))?,
                if lazy { "ondemand" } else { "copy" }
            ),
        ]);
    }
    let t0 = Instant::now();
    let mut vm = Proc::spawn_to(&peer.program, &args, name(k), &err, Some(&log))?;
    if k == Kind::Firecracker {
        wait_api(&mut vm, k, &sock)?;
        let (path, body) = restore_request(peer, dir, lazy)?;
        call(&sock, "PUT", path, Some(&body))?;
    }
    let first = wait_first_tick(&mut vm, &log)?;
    let tick = t0.elapsed();
    check_continues(
        &format!("{} restore from start ({mode})", name(k)),
        first,
        last,
    )?;
    Ok(ms(tick))
}

/// Figures with none filled in yet: all NaN.
fn no_figures() -> TernResult {
    let nan = f64::NAN;
    TernResult {
        create_s: nan,
        apparent: nan,
        du: nan,
        api_lazy_reply: nan,
        api_lazy_tick: nan,
        api_eager_reply: nan,
        api_eager_tick: nan,
        cold_lazy_tick: nan,
        cold_eager_tick: nan,
        clone_rate: nan,
        clone_all_ticked: nan,
    }
}

/// One peer's steps of run number `run` in `dir` (created here, removed at the end with the
/// snapshot): the snapshot, then its restores, lazy and eager alternating which goes first as
/// tern's do. Rows the peer has no step for are NaN.
pub(crate) fn peer_run(
    peer: &Peer,
    probe: &Path,
    dir: &Path,
    size_mib: u64,
    run: usize,
) -> Result<TernResult> {
    std::fs::create_dir_all(dir)?;
    // Filled in step by step; the eager rows stay NaN for Firecracker, the clone rows for both.
    let mut r = no_figures();
    let last = create(peer, probe, dir, size_mib, &mut r).context("snapshot")?;
    let eager = peer.kind == Kind::CloudHypervisor;
    let modes: &[bool] = match (eager, run.is_multiple_of(2)) {
        (false, _) => &[true],
        (true, true) => &[true, false],
        (true, false) => &[false, true],
    };
    for &lazy in modes {
        let what = if lazy { "lazy" } else { "eager" };
        let api =
            api_restore(peer, dir, lazy, last).with_context(|| format!("API restore, {what}"))?;
        if lazy {
            (r.api_lazy_reply, r.api_lazy_tick) = api;
        } else {
            (r.api_eager_reply, r.api_eager_tick) = api;
        }
    }
    for &lazy in modes {
        let what = if lazy { "lazy" } else { "eager" };
        let cold = cold_restore(peer, dir, lazy, last)
            .with_context(|| format!("restore from start, {what}"))?;
        if lazy {
            r.cold_lazy_tick = cold;
        } else {
            r.cold_eager_tick = cold;
        }
    }
    std::fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    Ok(r)
}
