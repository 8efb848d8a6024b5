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
use std::sync::{Arc, Mutex, OnceLock};

use ::api::firecracker::*;
use ::api::{VmInfo, VmState};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, put};
use axum::{Json, Router};
use serde_json::{json, Map, Value};

mod balloon;
mod devices;
mod files;
mod metrics;

pub use files::{open_sink, redirect_log};
pub use metrics::firecracker_metrics;

use crate::api::routes::answer;
use crate::api::{Action, Reply, Shared};
use balloon::{balloon_get, balloon_patch, balloon_put, balloon_stats, balloon_stats_patch};
use devices::{drive_patch, drive_put, net_patch, net_put};
use files::{logger, metrics as put_metrics, snapshot_create, snapshot_load};
use metrics::flush_metrics;

/// How the Firecracker dialect changes tern's log filter (`PUT /logger` `level`); set by the
/// binary, which owns the log subscriber.
pub static LOG_FILTER: OnceLock<LogFilterSetter> = OnceLock::new();

/// The logger's `show_log_origin`: each line names its source file and line.
pub static SHOW_ORIGIN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// The logger's `show_level: false`: lines do not name their level.
pub static HIDE_LEVEL: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Applies a logger's `show_level` and `show_log_origin` to tern's log lines.
pub fn set_log_style(l: &Logger) {
    use std::sync::atomic::Ordering::Relaxed;
    if let Some(o) = l.show_log_origin {
        SHOW_ORIGIN.store(o, Relaxed);
    }
    if let Some(s) = l.show_level {
        HIDE_LEVEL.store(!s, Relaxed);
    }
}

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
    /// Held by the metrics flush in progress.
    flush: Arc<tokio::sync::Mutex<()>>,
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

/// How often metrics are written without a `FlushMetrics`.
pub const METRICS_PERIOD: std::time::Duration = std::time::Duration::from_secs(60);

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
    ("PUT", "/entropy"),
    ("PUT", "/actions"),
    ("PATCH", "/vm"),
    ("GET", "/vm/config"),
    ("PUT", "/snapshot/create"),
    ("PUT", "/snapshot/load"),
    ("PUT", "/logger"),
    ("PUT", "/metrics"),
    ("GET", "/balloon"),
    ("PUT", "/balloon"),
    ("PATCH", "/balloon"),
    ("GET", "/balloon/statistics"),
    ("PATCH", "/balloon/statistics"),
];

pub(super) fn routes(shared: Shared, instance: Instance) -> Router {
    let st = FcState {
        s: shared,
        fc: Arc::new(Mutex::new(Fc {
            instance,
            last: Map::new(),
        })),
        flush: Arc::default(),
    };
    // As Firecracker, metrics go out every minute once there is a file for them.
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        let st = st.clone();
        rt.spawn(async move {
            let mut tick = tokio::time::interval(METRICS_PERIOD);
            tick.tick().await;
            loop {
                tick.tick().await;
                if st.lock().instance.metrics.is_some() {
                    let _ = flush_metrics(&st).await;
                }
            }
        });
    }
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
        .route("/entropy", put(devices::entropy))
        .route("/actions", put(actions))
        .route("/vm", patch(vm_state))
        .route("/vm/config", get(vm_config))
        .route("/snapshot/create", put(snapshot_create))
        .route("/snapshot/load", put(snapshot_load))
        .route("/logger", put(logger))
        .route("/metrics", put(put_metrics))
        .route(
            "/balloon",
            get(balloon_get).put(balloon_put).patch(balloon_patch),
        )
        .route(
            "/balloon/statistics",
            get(balloon_stats).patch(balloon_stats_patch),
        )
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

async fn vsock(State(st): State<FcState>, b: Bytes) -> Response {
    let v = match body::<Vsock>(&b) {
        Ok(v) => v,
        Err(r) => return r.into_response(),
    };
    let mut fc = st.lock();
    if let Err(r) = pre_boot(&fc) {
        return r.into_response();
    }
    let c = ::api::config::VsockConfig {
        cid: v.guest_cid,
        socket: v.uds_path.clone(),
    };
    if let Err(e) = c.validate() {
        return fault(400, e.to_string());
    }
    fc.instance.config.vsock = Some(v);
    done()
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
            if !(200..300).contains(&r.status) {
                return relay(r);
            }
            // The balloon's amount_mib is in the configuration: the VM starts with it.
            st.lock().instance.started = true;
            done()
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
