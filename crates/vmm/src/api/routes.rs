//! The API's routes: each request's body and query parsed into an [`Action`], sent to the VMM,
//! and its [`Reply`] written back; `GET /metrics` renders two answers as Prometheus text.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::oneshot;

use super::{Action, Reply, Request, Shared, MAX_BODY};
use crate::VmConfig;

pub(super) fn router(shared: Shared, firecracker: Option<super::firecracker::Instance>) -> Router {
    let fc = firecracker.is_some();
    let r = Router::new()
        .route("/ping", get(ping))
        .route("/metrics", get(metrics))
        .route("/v1/vm", get(info).put(configure))
        .route("/v1/vm/boot", put(|s| ask(s, Action::Boot)))
        .route("/v1/vm/pause", put(|s| ask(s, Action::Pause)))
        .route("/v1/vm/resume", put(|s| ask(s, Action::Resume)))
        .route("/v1/vm/shutdown", put(shutdown))
        .route("/v1/vm/reboot", put(|s| ask(s, Action::Reboot)))
        .route("/v1/vm/counters", get(|s| ask(s, Action::Counters)))
        .route("/v1/vm/snapshot", put(snapshot))
        .route("/v1/vm/restore", put(restore))
        .route(
            "/v1/vm/migrate",
            get(|s| ask(s, Action::MigrateStatus)).delete(|s| ask(s, Action::MigrateCancel)),
        )
        .route("/v1/vm/migrate/send", put(migrate_send))
        .route("/v1/vm/migrate/receive", put(migrate_receive))
        .route("/v1/vm/resize", put(resize))
        .route("/v1/vm/disks", put(disk_add))
        .route("/v1/vm/disks/{id}", patch(disk_update).delete(disk_remove))
        .route("/v1/vm/nets", put(net_add))
        .route("/v1/vm/nets/{id}", patch(net_update).delete(net_remove))
        .route(
            "/v1/vm/balloon",
            get(|s| ask(s, Action::BalloonInfo)).put(balloon_set),
        )
        .with_state(shared.clone());
    let r = match firecracker {
        Some(i) => r.merge(super::firecracker::routes(shared, i)),
        None => r,
    };
    r.fallback(move || async move { not_found(fc, 404, "no such route") })
        .method_not_allowed_fallback(move || async move {
            not_found(fc, 405, "method not allowed on this route")
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
}

/// An unknown route or method: in the Firecracker dialect's error shape when it is served.
fn not_found(firecracker: bool, status: u16, msg: &str) -> Response {
    if firecracker {
        super::firecracker::fault(status, msg)
    } else {
        reply(Reply::error(status, msg))
    }
}

pub(super) fn reply(r: Reply) -> Response {
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    match r.body {
        Some(b) => (status, Json(b)).into_response(),
        None => status.into_response(),
    }
}

async fn ask(State(s): State<Shared>, action: Action) -> Response {
    reply(answer(&s, action).await)
}

/// The VMM's answer to `action`.
pub(super) async fn answer(s: &Shared, action: Action) -> Reply {
    let (tx, rx) = oneshot::channel();
    if s.tx.send(Request { action, reply: tx }).is_err() {
        return Reply::error(503, "the VMM is shutting down");
    }
    let _ = s.evt.write(1);
    rx.await
        .unwrap_or_else(|_| Reply::error(503, "the VMM is shutting down"))
}

/// `GET /metrics`: the VM's state and, once it is booted, its counters, in Prometheus' text
/// format (see `api::metrics`).
async fn metrics(State(s): State<Shared>) -> Response {
    fn body<T: serde::de::DeserializeOwned>(r: Reply) -> Result<T, Reply> {
        match (r.status, r.body) {
            (200, Some(b)) => serde_json::from_value(b)
                .map_err(|e| Reply::error(500, format!("cannot read the VMM's answer: {e}"))),
            (status, body) => Err(Reply { status, body }),
        }
    }
    let info: ::api::VmInfo = match body(answer(&s, Action::Info).await) {
        Ok(i) => i,
        Err(r) => return reply(r),
    };
    let counters = match info.state {
        ::api::VmState::Running | ::api::VmState::Paused => {
            // The VM may end between the two questions: what is known of it still goes out.
            body::<::api::Counters>(answer(&s, Action::Counters).await).ok()
        }
        _ => None,
    };
    (
        [(
            axum::http::header::CONTENT_TYPE,
            ::api::metrics::CONTENT_TYPE,
        )],
        ::api::metrics::render(&info, counters.as_ref()),
    )
        .into_response()
}

async fn ping() -> Response {
    reply(Reply::ok(&json!({ "tern": env!("CARGO_PKG_VERSION") })))
}

async fn info(s: State<Shared>) -> Response {
    ask(s, Action::Info).await
}

/// A body error as 400 (413 when too large), naming what is wrong.
fn body_error(status: StatusCode, text: String) -> Response {
    let status = if status == StatusCode::PAYLOAD_TOO_LARGE {
        413
    } else {
        400
    };
    reply(Reply::error(status, text))
}

async fn configure(s: State<Shared>, body: Result<Json<VmConfig>, JsonRejection>) -> Response {
    match body {
        Ok(Json(c)) => ask(s, Action::Configure(Box::new(c))).await,
        Err(e) => body_error(e.status(), e.body_text()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotBody {
    dir: std::path::PathBuf,
    #[serde(default)]
    diff: bool,
}

async fn snapshot(s: State<Shared>, body: Result<Json<SnapshotBody>, JsonRejection>) -> Response {
    match body {
        Ok(Json(b)) => {
            ask(
                s,
                Action::Snapshot {
                    dir: b.dir,
                    diff: b.diff,
                },
            )
            .await
        }
        Err(e) => body_error(e.status(), e.body_text()),
    }
}

async fn restore(
    s: State<Shared>,
    body: Result<Json<crate::snapshot::RestoreOptions>, JsonRejection>,
) -> Response {
    match body {
        Ok(Json(b)) => ask(s, Action::Restore(Box::new(b))).await,
        Err(e) => body_error(e.status(), e.body_text()),
    }
}

async fn migrate_send(
    s: State<Shared>,
    body: Result<Json<::api::migrate::SendOptions>, JsonRejection>,
) -> Response {
    match body {
        Ok(Json(b)) => ask(s, Action::MigrateSend(Box::new(b))).await,
        Err(e) => body_error(e.status(), e.body_text()),
    }
}

async fn migrate_receive(
    s: State<Shared>,
    body: Result<Json<::api::migrate::ReceiveOptions>, JsonRejection>,
) -> Response {
    match body {
        Ok(Json(b)) => ask(s, Action::MigrateReceive(Box::new(b))).await,
        Err(e) => body_error(e.status(), e.body_text()),
    }
}

async fn resize(
    s: State<Shared>,
    body: Result<Json<::api::resize::ResizeRequest>, JsonRejection>,
) -> Response {
    match body {
        Ok(Json(b)) => ask(s, Action::Resize(b)).await,
        Err(e) => body_error(e.status(), e.body_text()),
    }
}

async fn disk_add(
    s: State<Shared>,
    body: Result<Json<crate::config::DiskConfig>, JsonRejection>,
) -> Response {
    match body {
        Ok(Json(d)) => ask(s, Action::AddDisk(Box::new(d))).await,
        Err(e) => body_error(e.status(), e.body_text()),
    }
}

async fn net_add(
    s: State<Shared>,
    body: Result<Json<crate::config::NetConfig>, JsonRejection>,
) -> Response {
    match body {
        Ok(Json(n)) => ask(s, Action::AddNet(Box::new(n))).await,
        Err(e) => body_error(e.status(), e.body_text()),
    }
}

async fn disk_remove(s: State<Shared>, id: Result<UrlPath<String>, PathRejection>) -> Response {
    match id {
        Ok(UrlPath(id)) => {
            let kind = ::api::devices::DeviceKind::Disk;
            ask(s, Action::RemoveDevice { kind, id }).await
        }
        Err(e) => body_error(e.status(), e.body_text()),
    }
}

async fn net_remove(s: State<Shared>, id: Result<UrlPath<String>, PathRejection>) -> Response {
    match id {
        Ok(UrlPath(id)) => {
            let kind = ::api::devices::DeviceKind::Net;
            ask(s, Action::RemoveDevice { kind, id }).await
        }
        Err(e) => body_error(e.status(), e.body_text()),
    }
}

async fn disk_update(
    s: State<Shared>,
    id: Result<UrlPath<String>, PathRejection>,
    body: Result<Json<::api::devices::DiskUpdate>, JsonRejection>,
) -> Response {
    match (id, body) {
        (Ok(UrlPath(id)), Ok(Json(update))) => ask(s, Action::DiskUpdate { id, update }).await,
        (Err(e), _) => body_error(e.status(), e.body_text()),
        (_, Err(e)) => body_error(e.status(), e.body_text()),
    }
}

async fn net_update(
    s: State<Shared>,
    id: Result<UrlPath<String>, PathRejection>,
    body: Result<Json<::api::devices::NetUpdate>, JsonRejection>,
) -> Response {
    match (id, body) {
        (Ok(UrlPath(id)), Ok(Json(update))) => ask(s, Action::NetUpdate { id, update }).await,
        (Err(e), _) => body_error(e.status(), e.body_text()),
        (_, Err(e)) => body_error(e.status(), e.body_text()),
    }
}

async fn balloon_set(
    s: State<Shared>,
    body: Result<Json<::api::balloon::BalloonRequest>, JsonRejection>,
) -> Response {
    match body {
        Ok(Json(b)) => ask(s, Action::BalloonSet(b)).await,
        Err(e) => body_error(e.status(), e.body_text()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShutdownQuery {
    #[serde(default)]
    force: bool,
}

async fn shutdown(s: State<Shared>, q: Result<Query<ShutdownQuery>, QueryRejection>) -> Response {
    match q {
        Ok(Query(q)) => ask(s, Action::Shutdown { force: q.force }).await,
        Err(e) => body_error(e.status(), e.body_text()),
    }
}
