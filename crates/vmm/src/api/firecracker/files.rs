//! The Firecracker dialect's routes that touch files: snapshots (tern's snapshot directory at
//! `snapshot_path`, its memory file linked at `mem_file_path`) and the logger's and metrics'
//! files or FIFOs, all opened on the VMM's thread ([`Action::OnVmm`]).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ::api::firecracker::*;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};

use super::{body, done, fault, pre_boot, relay, set_log_style, FcState, LOG_FILTER};
use crate::api::routes::answer;
use crate::api::{Action, Reply, VmmTask};

pub(super) async fn snapshot_create(State(st): State<FcState>, b: Bytes) -> Response {
    let b = match body::<SnapshotCreate>(&b) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    if b.version.is_some() {
        return fault(
            400,
            "tern writes its own snapshot format: leave version out",
        );
    }
    let diff = match b.snapshot_type.as_deref() {
        None | Some("Full") => false,
        Some("Diff") => true,
        Some(t) => return fault(400, format!("unknown snapshot_type {t:?}: Full or Diff")),
    };
    let dir = b.snapshot_path.clone();
    let r = answer(
        &st.s,
        Action::Snapshot {
            dir: dir.clone(),
            diff,
        },
    )
    .await;
    if !(200..300).contains(&r.status) {
        return relay(r);
    }
    let mem = b.mem_file_path;
    let link = VmmTask::new(move || match link_memory(&dir, &mem) {
        Ok(()) => Reply::done(),
        Err(e) => Reply::error(500, e),
    });
    relay(answer(&st.s, Action::OnVmm(link)).await)
}

/// Makes `mem` name the memory file of the snapshot in `dir` (a hard link; an earlier file
/// there is replaced, as Firecracker overwrites it).
fn link_memory(dir: &Path, mem: &Path) -> Result<(), String> {
    let src = dir.join(crate::snapshot::MEMORY_FILE);
    match std::fs::symlink_metadata(mem) {
        Ok(m) if m.is_dir() => {
            return Err(format!("mem_file_path {} is a directory", mem.display()))
        }
        Ok(_) => std::fs::remove_file(mem)
            .map_err(|e| format!("cannot replace {}: {e}", mem.display()))?,
        Err(_) => {}
    }
    std::fs::hard_link(&src, mem).map_err(|e| {
        format!(
            "the snapshot is in {}, but its memory file cannot be linked to {}: {e} (it must be on the same file system)",
            dir.display(),
            mem.display()
        )
    })
}

/// The restore that `PUT /snapshot/load` `b` asks for, checked against the snapshot.
fn load_options(b: &SnapshotLoad) -> Result<::api::restore::RestoreOptions, String> {
    let dir = &b.snapshot_path;
    let snap = crate::snapshot::read(dir)?;
    let mem = match (&b.mem_backend, &b.mem_file_path) {
        (Some(_), Some(_)) => return Err("give mem_backend or mem_file_path, not both".into()),
        (Some(m), None) if m.backend_type == "File" => Some(m.backend_path.clone()),
        (Some(m), None) if m.backend_type == "Uffd" => {
            return Err("tern has no userfaultfd memory backend: it maps the memory file copy-on-write itself (backend_type File)".into())
        }
        (Some(m), None) => return Err(format!("unknown backend_type {:?}: File", m.backend_type)),
        (None, m) => m.clone(),
    };
    if let Some(mem) = mem {
        use std::os::unix::fs::MetadataExt;
        let ours = dir.join(crate::snapshot::MEMORY_FILE);
        let same = match (std::fs::metadata(&mem), std::fs::metadata(&ours)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            (Err(e), _) => return Err(format!("memory file {}: {e}", mem.display())),
            (_, Err(e)) => return Err(format!("{}: {e}", ours.display())),
        };
        if !same {
            return Err(format!(
                "tern reads guest memory from {}; {} is another file",
                ours.display(),
                mem.display()
            ));
        }
    }
    let track = b.track_dirty_pages.or(b.enable_diff_snapshots);
    if track.is_some_and(|t| t != snap.config.track_dirty_pages) {
        return Err(format!(
            "the snapshot's VM {} dirty pages, and a restored VM keeps that: leave track_dirty_pages out",
            if snap.config.track_dirty_pages { "tracks" } else { "does not track" }
        ));
    }
    let mut tap_remap = std::collections::BTreeMap::new();
    for o in b.network_overrides.iter().flatten() {
        let Some(n) = snap
            .config
            .nets
            .iter()
            .find(|n| n.id.as_deref() == Some(o.iface_id.as_str()))
        else {
            return Err(format!(
                "the snapshot has no network interface {}",
                o.iface_id
            ));
        };
        tap_remap.insert(n.tap.clone(), o.host_dev_name.clone());
    }
    Ok(::api::restore::RestoreOptions {
        dir: dir.clone(),
        mode: ::api::restore::RestoreMode::Lazy,
        paused: !b.resume_vm.unwrap_or(false),
        disk_remap: Default::default(),
        tap_remap,
        serial: None,
        console: None,
        vsock_socket: None,
    })
}

pub(super) async fn snapshot_load(State(st): State<FcState>, b: Bytes) -> Response {
    let b = match body::<SnapshotLoad>(&b) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    if let Err(r) = pre_boot(&st.lock()) {
        return r.into_response();
    }
    let task = VmmTask::new(move || match load_options(&b) {
        Ok(o) => Reply::ok(&o),
        Err(e) => Reply::error(400, format!("cannot load the snapshot: {e}")),
    });
    let r = answer(&st.s, Action::OnVmm(task)).await;
    let opts = match (r.status, &r.body) {
        (200, Some(b)) => match serde_json::from_value(b.clone()) {
            Ok(o) => o,
            Err(e) => return fault(500, e.to_string()),
        },
        _ => return relay(r),
    };
    let r = answer(&st.s, Action::Restore(Box::new(opts))).await;
    if (200..300).contains(&r.status) {
        st.lock().instance.started = true;
    }
    relay(r)
}

/// Opens `path` to append to, as Firecracker opens its log and metrics files: a FIFO for
/// reading and writing (so the open neither waits for a reader nor fails without one), any
/// other file for appending, made (0600) when missing. With `nonblocking`, a write to a FIFO
/// whose reader does not keep up fails instead of waiting (metrics: the line is dropped);
/// without, it waits (the log: stderr's writers expect it).
pub fn open_sink(path: &Path, nonblocking: bool) -> Result<File, String> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let fifo = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo());
    let mut o = std::fs::OpenOptions::new();
    if fifo {
        o.read(true).write(true);
    } else {
        o.append(true).create(true).mode(0o600);
    }
    let flags = if nonblocking {
        libc::O_CLOEXEC | libc::O_NONBLOCK
    } else {
        libc::O_CLOEXEC
    };
    o.custom_flags(flags)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))
}

/// Sends tern's standard error (its log) to `path`.
pub fn redirect_log(path: &Path) -> Result<(), String> {
    let f = open_sink(path, false)?;
    // SAFETY: dup2 onto standard error of a descriptor this function owns; the old standard
    // error is closed by the kernel, and the new one stays open after `f` drops.
    if unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&f), 2) } < 0 {
        return Err(format!(
            "cannot log to {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    // Whatever systemd connected standard error to, it is this file now.
    crate::systemd::stderr_redirected();
    Ok(())
}

pub(super) async fn logger(State(st): State<FcState>, b: Bytes) -> Response {
    let l = match body::<Logger>(&b) {
        Ok(l) => l,
        Err(r) => return r.into_response(),
    };
    if let Err(r) = pre_boot(&st.lock()) {
        return r.into_response();
    }
    let filter = match l.filter() {
        Ok(f) => f,
        Err(e) => return fault(400, e),
    };
    if filter.is_some() && LOG_FILTER.get().is_none() {
        return fault(400, "this tern cannot change its log level");
    }
    // The file first: a logger whose file cannot be opened changes nothing.
    if let Some(path) = l.log_path.clone() {
        let task = VmmTask::new(move || match redirect_log(&path) {
            Ok(()) => Reply::done(),
            Err(e) => Reply::error(400, e),
        });
        let r = answer(&st.s, Action::OnVmm(task)).await;
        if !(200..300).contains(&r.status) {
            return relay(r);
        }
    }
    if let (Some(f), Some(set)) = (filter, LOG_FILTER.get()) {
        if let Err(e) = set(f) {
            return fault(400, e);
        }
    }
    set_log_style(&l);
    st.lock().instance.config.logger = Some(l);
    done()
}

pub(super) async fn metrics(State(st): State<FcState>, b: Bytes) -> Response {
    let m = match body::<Metrics>(&b) {
        Ok(m) => m,
        Err(r) => return r.into_response(),
    };
    if let Err(r) = pre_boot(&st.lock()) {
        return r.into_response();
    }
    let fc = st.fc.clone();
    let path: PathBuf = m.metrics_path.clone();
    let task = VmmTask::new(move || match open_sink(&path, true) {
        Ok(f) => {
            fc.lock()
                .unwrap_or_else(|p| p.into_inner())
                .instance
                .metrics = Some(Arc::new(f));
            Reply::done()
        }
        Err(e) => Reply::error(400, e),
    });
    let r = answer(&st.s, Action::OnVmm(task)).await;
    if (200..300).contains(&r.status) {
        st.lock().instance.config.metrics = Some(m);
    }
    relay(r)
}
