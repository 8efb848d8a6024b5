//! Firecracker's API at the socket's root (`tern firecracker`, or tern started as
//! `firecracker`), beside tern's own routes: what Kata Containers, firecracker-containerd and
//! the Firecracker SDKs send, mapped onto tern's actions.
//!
//! Before `InstanceStart` the configuration is kept here, in Firecracker's shape
//! ([`FullConfig`]); `InstanceStart` turns it into a [`VmConfig`](crate::VmConfig)
//! (`PUT /v1/vm`) and boots it. After that, requests become tern's own: `PATCH /vm` pauses and
//! resumes, `PATCH /drives/{id}` and `PATCH /network-interfaces/{id}` change rate limits,
//! `SendCtrlAltDel` presses the power button (the guest powers off and tern ends, where
//! Firecracker's guest reboots into the same end), and the snapshot routes map onto tern's
//! snapshot directories and lazy restore: `snapshot_path` is the directory, and
//! `mem_file_path` a hard link to its memory file.
//!
//! Answers follow Firecracker's: 204 on success, and `{"fault_message": …}` with 400 (500 for
//! the VMM's own failures) otherwise. What tern cannot honour is refused by name.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use ::api::firecracker::*;
use ::api::{Counters, DeviceCounters, VmInfo, VmState};
use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, put};
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use super::routes::answer;
use super::{Action, Reply, Shared, VmmTask};

/// How the Firecracker dialect changes tern's log filter (`PUT /logger` `level`); set by the
/// binary, which owns the log subscriber.
pub static LOG_FILTER: OnceLock<LogFilterSetter> = OnceLock::new();

/// Sets tern's log filter (a tracing filter such as `info`).
pub type LogFilterSetter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// What a Firecracker instance starts with.
#[derive(Clone, Debug, Default)]
pub struct Instance {
    /// Its id (`--id`).
    pub id: String,
    /// The configuration so far (from `--config-file`, or empty).
    pub config: FullConfig,
    /// Whether its VM was started already (`--config-file` boots at once).
    pub started: bool,
    /// Where `FlushMetrics` writes (`--metrics-path`, or the config file's `metrics`).
    pub metrics: Option<Arc<File>>,
}

struct Fc {
    instance: Instance,
    /// The counters last written to the metrics file, which Firecracker's metrics are
    /// differences from.
    last: Map<String, Value>,
}

#[derive(Clone)]
struct FcState {
    s: Shared,
    fc: Arc<Mutex<Fc>>,
}

impl FcState {
    fn lock(&self) -> std::sync::MutexGuard<'_, Fc> {
        self.fc.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A Firecracker error answer.
pub fn fault(status: u16, msg: impl Into<String>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    (
        status,
        Json(Fault {
            fault_message: msg.into(),
        }),
    )
        .into_response()
}

/// A refusal, answered as a [`fault`].
struct Refused(u16, String);

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        fault(self.0, self.1)
    }
}

fn done() -> Response {
    StatusCode::NO_CONTENT.into_response()
}

/// tern's answer in Firecracker's terms: success is 204, a refusal 400, a failure 500.
fn relay(r: Reply) -> Response {
    match r.status {
        200..=299 => done(),
        s => fault(if s >= 500 { 500 } else { 400 }, message(&r)),
    }
}

fn message(r: &Reply) -> String {
    r.body
        .as_ref()
        .and_then(|b| b["error"].as_str())
        .unwrap_or("failed")
        .to_string()
}

/// A JSON body, with or without a `Content-Type` (Firecracker does not ask for one).
fn body<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, Refused> {
    serde_json::from_slice(b).map_err(|e| Refused(400, format!("invalid body: {e}")))
}

const AFTER_START: &str = "The requested operation is not supported after starting the microVM.";

/// Ok before `InstanceStart` (or a snapshot load).
fn pre_boot(fc: &Fc) -> Result<(), Refused> {
    if fc.instance.started {
        return Err(Refused(400, AFTER_START.into()));
    }
    Ok(())
}

/// Every route of the Firecracker dialect: (method, path).
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/"),
    ("GET", "/version"),
    ("GET", "/machine-config"),
    ("PUT", "/machine-config"),
    ("PATCH", "/machine-config"),
    ("PUT", "/boot-source"),
    ("PUT", "/drives/{id}"),
    ("PATCH", "/drives/{id}"),
    ("PUT", "/network-interfaces/{id}"),
    ("PATCH", "/network-interfaces/{id}"),
    ("PUT", "/vsock"),
    ("PUT", "/actions"),
    ("PATCH", "/vm"),
    ("GET", "/vm/config"),
    ("PUT", "/snapshot/create"),
    ("PUT", "/snapshot/load"),
    ("PUT", "/logger"),
    ("PUT", "/metrics"),
];

pub(super) fn routes(shared: Shared, instance: Instance) -> Router {
    let st = FcState {
        s: shared,
        fc: Arc::new(Mutex::new(Fc {
            instance,
            last: Map::new(),
        })),
    };
    Router::new()
        .route("/", get(root))
        .route("/version", get(version))
        .route(
            "/machine-config",
            get(machine_get).put(machine_put).patch(machine_patch),
        )
        .route("/boot-source", put(boot_source))
        .route("/drives/{id}", put(drive_put).patch(drive_patch))
        .route("/network-interfaces/{id}", put(net_put).patch(net_patch))
        .route("/vsock", put(vsock))
        .route("/actions", put(actions))
        .route("/vm", patch(vm_state))
        .route("/vm/config", get(vm_config))
        .route("/snapshot/create", put(snapshot_create))
        .route("/snapshot/load", put(snapshot_load))
        .route("/logger", put(logger))
        .route("/metrics", put(metrics))
        .with_state(st)
}

async fn info(st: &FcState) -> Result<VmInfo, Refused> {
    let r = answer(&st.s, Action::Info).await;
    r.body
        .and_then(|b| serde_json::from_value(b).ok())
        .ok_or_else(|| Refused(500, "cannot read the VM's state".into()))
}

async fn root(State(st): State<FcState>) -> Response {
    let state = match info(&st).await {
        Ok(i) => match i.state {
            VmState::Running => "Running",
            VmState::Paused => "Paused",
            _ => "Not started",
        },
        Err(r) => return r.into_response(),
    };
    Json(InstanceInfo {
        app_name: "Firecracker".into(),
        id: st.lock().instance.id.clone(),
        state: state.into(),
        vmm_version: FIRECRACKER_VERSION.into(),
    })
    .into_response()
}

async fn version() -> Response {
    Json(json!({ "firecracker_version": FIRECRACKER_VERSION })).into_response()
}

async fn machine_get(State(st): State<FcState>) -> Response {
    Json(st.lock().instance.config.machine_config.clone()).into_response()
}

fn set_machine(st: &FcState, m: MachineConfig) -> Response {
    let mut fc = st.lock();
    if let Err(r) = pre_boot(&fc) {
        return r.into_response();
    }
    if let Err(e) = m.check() {
        return fault(400, e);
    }
    fc.instance.config.machine_config = m;
    done()
}

async fn machine_put(State(st): State<FcState>, b: Bytes) -> Response {
    match body::<MachineConfig>(&b) {
        Ok(m) => set_machine(&st, m),
        Err(r) => r.into_response(),
    }
}

async fn machine_patch(State(st): State<FcState>, b: Bytes) -> Response {
    match body::<MachineConfigPatch>(&b) {
        Ok(p) => {
            let m = st.lock().instance.config.machine_config.patched(&p);
            set_machine(&st, m)
        }
        Err(r) => r.into_response(),
    }
}

async fn boot_source(State(st): State<FcState>, b: Bytes) -> Response {
    let b = match body::<BootSource>(&b) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let mut fc = st.lock();
    if let Err(r) = pre_boot(&fc) {
        return r.into_response();
    }
    fc.instance.config.boot_source = Some(b);
    done()
}

/// The id in the URL, which must be the body's.
fn same_id(url: Result<UrlPath<String>, PathRejection>, body_id: &str) -> Result<String, Refused> {
    match url {
        Ok(UrlPath(id)) if id == body_id => Ok(id),
        Ok(UrlPath(id)) => Err(Refused(
            400,
            format!("the id in the path ({id}) is not the body's ({body_id})"),
        )),
        Err(e) => Err(Refused(400, e.body_text())),
    }
}

async fn drive_put(
    State(st): State<FcState>,
    url: Result<UrlPath<String>, PathRejection>,
    b: Bytes,
) -> Response {
    let d = match body::<Drive>(&b) {
        Ok(d) => d,
        Err(r) => return r.into_response(),
    };
    if let Err(r) = same_id(url, &d.drive_id) {
        return r.into_response();
    }
    let mut fc = st.lock();
    if let Err(r) = pre_boot(&fc) {
        return r.into_response();
    }
    match fc.instance.config.put_drive(d) {
        Ok(()) => done(),
        Err(e) => fault(400, e),
    }
}

async fn drive_patch(
    State(st): State<FcState>,
    url: Result<UrlPath<String>, PathRejection>,
    b: Bytes,
) -> Response {
    let p = match body::<DrivePatch>(&b) {
        Ok(p) => p,
        Err(r) => return r.into_response(),
    };
    let id = match same_id(url, &p.drive_id) {
        Ok(id) => id,
        Err(r) => return r.into_response(),
    };
    let started = {
        let mut fc = st.lock();
        if !fc.instance.started {
            let Some(d) = fc
                .instance
                .config
                .drives
                .iter_mut()
                .find(|d| d.drive_id == id)
            else {
                return fault(400, format!("no drive {id}"));
            };
            let mut new = d.clone();
            if let Some(path) = &p.path_on_host {
                new.path_on_host = Some(path.clone());
            }
            if let Some(r) = &p.rate_limiter {
                new.rate_limiter = Some(r.clone());
            }
            if let Err(e) = disk_config(&new) {
                return fault(400, e);
            }
            *d = new;
            return done();
        }
        true
    };
    debug_assert!(started);
    if p.path_on_host.is_some() {
        return fault(
            400,
            "tern cannot put another file behind a running drive yet: path_on_host can only change before InstanceStart",
        );
    }
    let (bw, iops) = match p.rate_limiter.as_ref().map(RateLimiter::rates) {
        Some(Ok(r)) => r,
        Some(Err(e)) => return fault(400, e),
        None => return done(),
    };
    let update = ::api::devices::DiskUpdate {
        iops: Some(iops),
        bw: Some(bw),
        size: None,
    };
    relay(answer(&st.s, Action::DiskUpdate { id, update }).await)
}

async fn net_put(
    State(st): State<FcState>,
    url: Result<UrlPath<String>, PathRejection>,
    b: Bytes,
) -> Response {
    let n = match body::<NetworkInterface>(&b) {
        Ok(n) => n,
        Err(r) => return r.into_response(),
    };
    if let Err(r) = same_id(url, &n.iface_id) {
        return r.into_response();
    }
    let mut fc = st.lock();
    if let Err(r) = pre_boot(&fc) {
        return r.into_response();
    }
    match fc.instance.config.put_net(n) {
        Ok(()) => done(),
        Err(e) => fault(400, e),
    }
}

async fn net_patch(
    State(st): State<FcState>,
    url: Result<UrlPath<String>, PathRejection>,
    b: Bytes,
) -> Response {
    let p = match body::<NetworkInterfacePatch>(&b) {
        Ok(p) => p,
        Err(r) => return r.into_response(),
    };
    let id = match same_id(url, &p.iface_id) {
        Ok(id) => id,
        Err(r) => return r.into_response(),
    };
    {
        let mut fc = st.lock();
        if !fc.instance.started {
            let Some(n) = fc
                .instance
                .config
                .network_interfaces
                .iter_mut()
                .find(|n| n.iface_id == id)
            else {
                return fault(400, format!("no network interface {id}"));
            };
            let mut new = n.clone();
            if p.rx_rate_limiter.is_some() {
                new.rx_rate_limiter = p.rx_rate_limiter.clone();
            }
            if p.tx_rate_limiter.is_some() {
                new.tx_rate_limiter = p.tx_rate_limiter.clone();
            }
            if let Err(e) = net_config(&new) {
                return fault(400, e);
            }
            *n = new;
            return done();
        }
    }
    let rates = |r: &Option<RateLimiter>| r.as_ref().map(RateLimiter::rates).transpose();
    let (rx, tx) = match (rates(&p.rx_rate_limiter), rates(&p.tx_rate_limiter)) {
        (Ok(rx), Ok(tx)) => (rx, tx),
        (Err(e), _) | (_, Err(e)) => return fault(400, e),
    };
    let update = ::api::devices::NetUpdate {
        rx_bw: rx.map(|r| r.0),
        rx_ops: rx.map(|r| r.1),
        tx_bw: tx.map(|r| r.0),
        tx_ops: tx.map(|r| r.1),
    };
    relay(answer(&st.s, Action::NetUpdate { id, update }).await)
}

async fn vsock(b: Bytes) -> Response {
    match body::<Vsock>(&b) {
        Ok(_) => fault(400, "tern has no virtio-vsock device yet"),
        Err(r) => r.into_response(),
    }
}

async fn actions(State(st): State<FcState>, b: Bytes) -> Response {
    let a = match body::<InstanceAction>(&b) {
        Ok(a) => a,
        Err(r) => return r.into_response(),
    };
    match a.action_type.as_str() {
        "InstanceStart" => {
            let config = {
                let fc = st.lock();
                if let Err(r) = pre_boot(&fc) {
                    return r.into_response();
                }
                fc.instance.config.vm_config()
            };
            let config = match config {
                Ok(c) => c,
                Err(e) => return fault(400, e),
            };
            let r = answer(&st.s, Action::Configure(Box::new(config))).await;
            if !(200..300).contains(&r.status) {
                return relay(r);
            }
            let r = answer(&st.s, Action::Boot).await;
            if (200..300).contains(&r.status) {
                st.lock().instance.started = true;
            }
            relay(r)
        }
        "SendCtrlAltDel" => relay(answer(&st.s, Action::Shutdown { force: false }).await),
        "FlushMetrics" => flush_metrics(&st).await,
        other => fault(
            400,
            format!("unknown action_type {other:?}: InstanceStart, SendCtrlAltDel or FlushMetrics"),
        ),
    }
}

async fn vm_state(State(st): State<FcState>, b: Bytes) -> Response {
    let action = match body::<VmStatePatch>(&b) {
        Ok(v) if v.state == "Paused" => Action::Pause,
        Ok(v) if v.state == "Resumed" => Action::Resume,
        Ok(v) => {
            return fault(
                400,
                format!("unknown state {:?}: Paused or Resumed", v.state),
            )
        }
        Err(r) => return r.into_response(),
    };
    relay(answer(&st.s, action).await)
}

async fn vm_config(State(st): State<FcState>) -> Response {
    Json(st.lock().instance.config.clone()).into_response()
}

async fn snapshot_create(State(st): State<FcState>, b: Bytes) -> Response {
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
    })
}

async fn snapshot_load(State(st): State<FcState>, b: Bytes) -> Response {
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
/// other file for appending, made (0600) when missing. Writes wait for a slow reader.
pub fn open_sink(path: &Path) -> Result<File, String> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let fifo = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo());
    let mut o = std::fs::OpenOptions::new();
    if fifo {
        o.read(true).write(true);
    } else {
        o.append(true).create(true).mode(0o600);
    }
    o.custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))
}

/// Sends tern's standard error (its log) to `path`.
pub fn redirect_log(path: &Path) -> Result<(), String> {
    let f = open_sink(path)?;
    // SAFETY: dup2 onto standard error of a descriptor this function owns; the old standard
    // error is closed by the kernel, and the new one stays open after `f` drops.
    if unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&f), 2) } < 0 {
        return Err(format!(
            "cannot log to {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

async fn logger(State(st): State<FcState>, b: Bytes) -> Response {
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
    if let Some(f) = filter {
        match LOG_FILTER.get() {
            Some(set) => {
                if let Err(e) = set(f) {
                    return fault(400, e);
                }
            }
            None => return fault(400, "this tern cannot change its log level"),
        }
    }
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
    st.lock().instance.config.logger = Some(l);
    done()
}

async fn metrics(State(st): State<FcState>, b: Bytes) -> Response {
    let m = match body::<Metrics>(&b) {
        Ok(m) => m,
        Err(r) => return r.into_response(),
    };
    if let Err(r) = pre_boot(&st.lock()) {
        return r.into_response();
    }
    let fc = st.fc.clone();
    let path: PathBuf = m.metrics_path.clone();
    let task = VmmTask::new(move || match open_sink(&path) {
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

/// Firecracker's metrics from tern's counters: totals per device kind (`block`, `net`), each
/// device on its own (`block_ID`, `net_ID`) and the vCPUs' exits (`vcpu`).
pub fn firecracker_metrics(c: &Counters) -> Map<String, Value> {
    let mut out = Map::new();
    let mut add = |group: &str, key: &str, v: u64| {
        let g = out
            .entry(group.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(g) = g {
            let e = g.entry(key.to_string()).or_insert(json!(0));
            *e = json!(e.as_u64().unwrap_or(0) + v);
        }
    };
    for v in &c.vcpus {
        add("vcpu", "exit_io", v.pio_exits);
        add("vcpu", "exit_mmio", v.mmio_exits);
        add("vcpu", "exit_other", v.other_exits);
    }
    for d in &c.devices {
        match d {
            DeviceCounters::Block {
                id,
                read_ops,
                read_bytes,
                write_ops,
                write_bytes,
                flush_ops,
                errors,
                throttled,
                ..
            } => {
                let per = format!("block_{}", id.as_deref().unwrap_or("?"));
                for g in ["block", per.as_str()] {
                    add(g, "read_count", *read_ops);
                    add(g, "read_bytes", *read_bytes);
                    add(g, "write_count", *write_ops);
                    add(g, "write_bytes", *write_bytes);
                    add(g, "flush_count", *flush_ops);
                    add(g, "invalid_reqs_count", *errors);
                    add(g, "rate_limiter_throttled_events", *throttled);
                }
            }
            DeviceCounters::Net {
                id,
                rx_frames,
                rx_bytes,
                rx_dropped,
                tx_frames,
                tx_bytes,
                tx_dropped,
                throttled,
                ..
            } => {
                let per = format!("net_{}", id.as_deref().unwrap_or("?"));
                for g in ["net", per.as_str()] {
                    add(g, "rx_packets_count", *rx_frames);
                    add(g, "rx_bytes_count", *rx_bytes);
                    add(g, "rx_fails", *rx_dropped);
                    add(g, "tx_packets_count", *tx_frames);
                    add(g, "tx_bytes_count", *tx_bytes);
                    add(g, "tx_fails", *tx_dropped);
                    add(g, "rx_rate_limiter_throttled", *throttled);
                }
            }
            DeviceCounters::Other => {}
        }
    }
    out
}

/// `now` less `last`, key by key (Firecracker writes what changed since its last flush).
fn difference(now: &Map<String, Value>, last: &Map<String, Value>) -> Map<String, Value> {
    now.iter()
        .map(|(k, v)| {
            let v = match (v, last.get(k)) {
                (Value::Object(n), Some(Value::Object(l))) => Value::Object(difference(n, l)),
                (Value::Object(n), _) => Value::Object(difference(n, &Map::new())),
                (n, l) => json!(n
                    .as_u64()
                    .unwrap_or(0)
                    .saturating_sub(l.and_then(Value::as_u64).unwrap_or(0))),
            };
            (k.clone(), v)
        })
        .collect()
}

async fn flush_metrics(st: &FcState) -> Response {
    let Some(file) = st.lock().instance.metrics.clone() else {
        return fault(400, "no metrics file: PUT /metrics first");
    };
    let counters = match info(st).await {
        Ok(i) if matches!(i.state, VmState::Running | VmState::Paused) => {
            let r = answer(&st.s, Action::Counters).await;
            r.body
                .and_then(|b| serde_json::from_value::<Counters>(b).ok())
                .unwrap_or_default()
        }
        Ok(_) => Counters::default(),
        Err(r) => return r.into_response(),
    };
    let now = firecracker_metrics(&counters);
    let mut line = {
        let mut fc = st.lock();
        let d = difference(&now, &fc.last);
        fc.last = now;
        d
    };
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    line.insert("utc_timestamp_ms".into(), json!(ms));
    let mut text = Value::Object(line).to_string();
    text.push('\n');
    match std::io::Write::write_all(&mut &*file, text.as_bytes()) {
        Ok(()) => done(),
        Err(e) => fault(500, format!("cannot write the metrics: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_differences_since_the_last_flush() {
        let c = |n: u64| Counters {
            vcpus: vec![::api::VcpuCounters {
                vcpu: 0,
                pio_exits: n,
                mmio_exits: 1,
                other_exits: 0,
                cpu_time_ns: 0,
            }],
            devices: vec![],
        };
        let first = firecracker_metrics(&c(10));
        assert_eq!(difference(&first, &Map::new())["vcpu"]["exit_io"], 10);
        let second = firecracker_metrics(&c(25));
        let d = difference(&second, &first);
        assert_eq!(d["vcpu"]["exit_io"], 15);
        assert_eq!(d["vcpu"]["exit_mmio"], 0);
    }
}
